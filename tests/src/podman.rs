//! Podman for end-to-end tests: a `podman system service` on a socket of the test's own, and the stand-in image loaded into Podman's store.
//!
//! The stand-in image is built with Docker ([`crate::ensure_standin_image`]) and copied into
//! Podman (`docker save | podman load`) under the same name whenever Podman's copy is missing or
//! carries another source hash. `tests/podman-setup.sh` installs Podman and configures it for
//! machines whose engine may not raise resource limits; `.ci/run` runs it.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::standin::ensure_standin_image;

/// Whether tests that need Podman can run.
///
/// Runs `tests/podman-setup.sh` when there is no `podman` command. `Ok(false)` means "skip":
/// still none (the set-up could not install it) and `CI` is not `true`. Under `CI=true` a missing Podman is an error, so a CI run never passes by skipping.
pub fn podman_available() -> anyhow::Result<bool> {
    let found = || {
        Command::new("podman")
            .arg("--version")
            .output()
            .map(|out| out.status.success())
            .unwrap_or(false)
    };
    if found() {
        return Ok(true);
    }
    // The project's own set-up installs and configures it (where this user may install).
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("podman-setup.sh");
    eprintln!("no `podman` command; running {}", script.display());
    let ran = Command::new(&script).status().is_ok_and(|s| s.success());
    if ran && found() {
        return Ok(true);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("CI=true but there is no `podman` command (tests/podman-setup.sh installs it)");
    }
    eprintln!("no `podman` command; skipping (tests/podman-setup.sh installs it; CI=true fails)");
    Ok(false)
}

/// `podman system service` on a socket in a temporary directory; stopped on drop.
pub struct PodmanService {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PodmanService {
    /// Starts the service and waits until its API answers `/_ping`.
    pub fn start() -> anyhow::Result<PodmanService> {
        let dir = tempfile::Builder::new()
            .prefix("clusterclaw-podman-")
            .tempdir()?;
        let log = fs::File::create(dir.path().join("service.log"))?;
        let socket = dir.path().join("podman.sock");
        let child = Command::new("podman")
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start `podman system service`")?;
        let mut service = PodmanService {
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ping(&socket).is_ok() {
                return Ok(service);
            }
            if let Some(status) = service
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "`podman system service` exited ({status}):\n{}",
                    service.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the Podman API did not answer within 30s:\n{}",
                    service.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("podman.sock")
    }

    /// The address to give the agent's `--docker-host`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- podman service log:\n{}", self.log());
        }
    }
}

fn ping(socket: &Path) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    if !raw.starts_with(b"HTTP/1.1 200") {
        bail!("/_ping: {}", String::from_utf8_lossy(&raw));
    }
    Ok(())
}

/// Runs `podman` with `args`; the trimmed standard output.
pub fn podman(args: &[&str]) -> anyhow::Result<String> {
    crate::agent::engine_cli("podman", args)
}

/// The stand-in image in Podman's store, copied from Docker when missing or stale.
pub fn ensure_standin_in_podman() -> anyhow::Result<String> {
    static LOADED: OnceLock<Result<String, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            ensure_standin_image()
                .and_then(|image| copy_to_podman(&image).map(|()| image))
                .map_err(|err| format!("{err:#}"))
        })
        .clone()
        .map_err(|err| anyhow::anyhow!("stand-in image in podman: {err}"))
}

fn image_id(cli: &str, reference: &str) -> Option<String> {
    let out = Command::new(cli)
        .args(["image", "inspect", "--format", "{{.Id}}", reference])
        .output()
        .ok()?;
    out.status.success().then(|| {
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        id.strip_prefix("sha256:").map(str::to_owned).unwrap_or(id)
    })
}

/// Copies Docker's image `reference` into Podman's store (`docker save | podman load`) unless
/// Podman already holds the same image (same id) under that name.
pub fn copy_to_podman(reference: &str) -> anyhow::Result<()> {
    let want = image_id("docker", reference)
        .with_context(|| format!("docker has no image {reference}"))?;
    if image_id("podman", reference).as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    let mut save = Command::new("docker")
        .args(["save", reference])
        .stdout(Stdio::piped())
        .spawn()
        .context("run `docker save`")?;
    let stdout = save.stdout.take().context("docker save's output")?;
    let load = Command::new("podman")
        .args(["load", "--quiet"])
        .stdin(stdout)
        .output()
        .context("run `podman load`")?;
    let saved = save.wait()?;
    if !saved.success() || !load.status.success() {
        bail!(
            "`docker save {reference} | podman load` failed ({saved}, {}): {}",
            load.status,
            String::from_utf8_lossy(&load.stderr)
        );
    }
    if image_id("podman", reference).as_deref() != Some(want.as_str()) {
        bail!("podman loaded {reference} but holds another image under that name");
    }
    Ok(())
}
