//! Builds the stand-in OpenClaw image (`tests/fixtures/openclaw-standin`) for tests that run real containers.
//!
//! The image is built once per change of the fixture's sources: its label
//! [`STANDIN_HASH_LABEL`] holds a SHA-256 of those sources, and a build happens only when the
//! tagged image is missing or carries another hash. A file lock under the target directory keeps
//! concurrent test binaries from building at the same time; within one process the result is
//! memoised.
//!
//! Nothing can be pulled to build it: the image is `FROM scratch` and holds one static binary.
//! The state directory `/home/node/.openclaw` is part of the image, owned by 1000:1000, so that
//! the engine copies that ownership into a new, empty named volume mounted there (volume
//! copy-up): the container runs as uid 1000 on a read-only root filesystem and could not fix the
//! ownership itself.
//!
//! [`ensure_standin_versions`] also tags three images derived from it, which differ only in
//! environment variables baked in, for tests of updates between OpenClaw versions: two "versions"
//! with a state schema each ([`STANDIN_V1`], schema 1, and [`STANDIN_V2`], schema 2: the
//! stand-in's one-way migration, see its `main.rs`), and a newer "version" that never turns
//! ready ([`STANDIN_BROKEN`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

/// Repository and tag of the stand-in image.
pub const STANDIN_IMAGE: &str = "clusterclaw-test/openclaw-standin:dev";
/// Repository of the stand-in images.
pub const STANDIN_REPO: &str = "clusterclaw-test/openclaw-standin";
/// The "version" 2026.1.1 of the stand-in: state schema 1.
pub const STANDIN_V1: &str = "clusterclaw-test/openclaw-standin:2026.1.1";
/// The "version" 2026.2.1 of the stand-in: state schema 2 (an upgrade from [`STANDIN_V1`]
/// migrates the state; [`STANDIN_V1`] then refuses to start on it).
pub const STANDIN_V2: &str = "clusterclaw-test/openclaw-standin:2026.2.1";
/// The "version" 2026.3.1 of the stand-in: its `/readyz` never turns ready
/// (`STANDIN_NOT_READY=1`); it leaves the state's schema alone.
pub const STANDIN_BROKEN: &str = "clusterclaw-test/openclaw-standin:2026.3.1";

/// The derived tags: reference and the environment baked into it.
const VERSIONS: [(&str, &[(&str, &str)]); 3] = [
    (STANDIN_V1, &[("STANDIN_SCHEMA", "1")]),
    (STANDIN_V2, &[("STANDIN_SCHEMA", "2")]),
    (STANDIN_BROKEN, &[("STANDIN_NOT_READY", "1")]),
];

/// The stand-in images for update tests, all built and tagged.
#[derive(Clone, Debug)]
pub struct StandinVersions {
    /// The default tag ([`STANDIN_IMAGE`]): no schema, always ready.
    pub default: String,
    /// [`STANDIN_V1`].
    pub v1: String,
    /// [`STANDIN_V2`].
    pub v2: String,
    /// [`STANDIN_BROKEN`].
    pub broken: String,
}

/// Builds the stand-in image and its "version" tags when missing or stale.
pub fn ensure_standin_versions() -> anyhow::Result<StandinVersions> {
    static BUILT: OnceLock<Result<StandinVersions, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_versions().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow::anyhow!("stand-in version images: {err}"))
}

fn build_versions() -> anyhow::Result<StandinVersions> {
    let default = ensure_standin_image()?;
    let base_hash = standin_source_hash()?;
    let dir = build_dir();
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let lock_path = dir.join("versions.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("lock {}", lock_path.display()))?;
    for (reference, env) in VERSIONS {
        let mut dockerfile = format!("FROM {default}\n");
        for (key, value) in env {
            dockerfile.push_str(&format!("ENV {key}={value}\n"));
        }
        let mut hasher = Sha256::new();
        hasher.update(base_hash.as_bytes());
        hasher.update([0]);
        hasher.update(dockerfile.as_bytes());
        let hash: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if label_of(reference).as_deref() == Some(hash.as_str()) {
            continue;
        }
        let context = dir.join(format!(
            "context-{}",
            reference.rsplit(':').next().unwrap_or("version")
        ));
        if context.exists() {
            fs::remove_dir_all(&context).with_context(|| format!("clear {}", context.display()))?;
        }
        fs::create_dir_all(&context).with_context(|| format!("create {}", context.display()))?;
        fs::write(context.join("Dockerfile"), &dockerfile)
            .with_context(|| format!("write {}/Dockerfile", context.display()))?;
        let status = Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "--quiet", "--tag", reference, "--label"])
            .arg(format!("{STANDIN_HASH_LABEL}={hash}"))
            .arg(&context)
            .status()
            .context("run `docker build`")?;
        if !status.success() {
            bail!("`docker build` of {reference} failed: {status}");
        }
        if label_of(reference).as_deref() != Some(hash.as_str()) {
            bail!("`docker build` succeeded but {reference} does not carry the expected hash");
        }
    }
    Ok(StandinVersions {
        default,
        v1: STANDIN_V1.to_owned(),
        v2: STANDIN_V2.to_owned(),
        broken: STANDIN_BROKEN.to_owned(),
    })
}

/// The hash label of an image, when it exists.
fn label_of(reference: &str) -> Option<String> {
    let format = format!("{{{{ index .Config.Labels \"{STANDIN_HASH_LABEL}\" }}}}");
    let out = Command::new("docker")
        .args(["image", "inspect", "--format", &format, reference])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Image label holding the hash of the sources the image was built from.
pub const STANDIN_HASH_LABEL: &str = "io.clusterclaw.test.standin-hash";

/// Builds the stand-in image when it is missing or stale and returns its reference.
pub fn ensure_standin_image() -> anyhow::Result<String> {
    static BUILT: OnceLock<Result<String, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_if_stale().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow::anyhow!("stand-in image: {err}"))
}

/// Whether tests that need a Docker engine can run.
///
/// `Ok(false)` means "skip": no engine answers and `CI` is not `true`. Under `CI=true` a missing
/// engine is an error, so a CI run can never pass by skipping.
pub fn docker_available() -> anyhow::Result<bool> {
    let answered = Command::new("docker")
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .output()
        .map(|out| out.status.success())
        .unwrap_or(false);
    if answered {
        return Ok(true);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("CI=true but no Docker engine answers `docker version`");
    }
    eprintln!("no Docker engine answers `docker version`; skipping (set CI=true to fail instead)");
    Ok(false)
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/openclaw-standin")
}

fn build_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("standin")
}

/// SHA-256 over the fixture's sources (relative path and content of every file), in path order.
pub fn standin_source_hash() -> anyhow::Result<String> {
    let root = fixture_dir();
    let mut files = Vec::new();
    collect_files(&root, &mut files)?;
    files.sort();
    let mut hasher = Sha256::new();
    for file in files {
        let relative = file.strip_prefix(&root).unwrap_or(&file);
        hasher.update(relative.to_string_lossy().as_bytes());
        hasher.update([0]);
        let content = fs::read(&file).with_context(|| format!("read {}", file.display()))?;
        hasher.update((content.len() as u64).to_le_bytes());
        hasher.update(&content);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn image_hash() -> Option<String> {
    label_of(STANDIN_IMAGE)
}

fn build_if_stale() -> anyhow::Result<String> {
    let hash = standin_source_hash()?;
    if image_hash().as_deref() == Some(hash.as_str()) {
        return Ok(STANDIN_IMAGE.to_owned());
    }
    let dir = build_dir();
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let lock_path = dir.join("build.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("lock {}", lock_path.display()))?;
    // Another process may have built it while this one waited for the lock.
    if image_hash().as_deref() == Some(hash.as_str()) {
        return Ok(STANDIN_IMAGE.to_owned());
    }
    let previous = image_id();
    let binary = build_binary(&dir)?;
    let context = assemble_context(&dir, &binary)?;
    let status = Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "--quiet", "--tag", STANDIN_IMAGE, "--label"])
        .arg(format!("{STANDIN_HASH_LABEL}={hash}"))
        .arg(&context)
        .status()
        .context("run `docker build`")?;
    if !status.success() {
        bail!("`docker build` of {} failed: {status}", context.display());
    }
    if image_hash().as_deref() != Some(hash.as_str()) {
        bail!("`docker build` succeeded but {STANDIN_IMAGE} does not carry the expected hash");
    }
    // The image built from older sources is now untagged; drop it unless something uses it.
    if let Some(previous) = previous.filter(|old| image_id().as_ref() != Some(old)) {
        let _ = Command::new("docker")
            .args(["image", "rm", &previous])
            .output();
    }
    Ok(STANDIN_IMAGE.to_owned())
}

fn image_id() -> Option<String> {
    let out = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", STANDIN_IMAGE])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn build_binary(dir: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = fixture_dir().join("Cargo.toml");
    let status = Command::new(cargo)
        .args(["build", "--release", "--locked", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(dir.join("target"))
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("run cargo to build the stand-in binary")?;
    if !status.success() {
        bail!("cargo build of {} failed: {status}", manifest.display());
    }
    Ok(dir.join("target/release/openclaw-standin"))
}

fn assemble_context(dir: &Path, binary: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let context = dir.join("context");
    if context.exists() {
        fs::remove_dir_all(&context).with_context(|| format!("clear {}", context.display()))?;
    }
    let tmp = context.join("rootfs/tmp");
    let state = context.join("home/node/.openclaw");
    for d in [&tmp, &context.join("rootfs/etc/openclaw"), &state] {
        fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))?;
    fs::set_permissions(&state, fs::Permissions::from_mode(0o750))?;
    fs::copy(fixture_dir().join("Dockerfile"), context.join("Dockerfile"))
        .context("copy the Dockerfile")?;
    fs::copy(binary, context.join("openclaw-standin"))
        .with_context(|| format!("copy {}", binary.display()))?;
    Ok(context)
}
