//! End to end: the real `clusterclaw` server and `clusterclaw-agent` binaries as processes, real mutual TLS, real Docker and the stand-in OpenClaw image.
//!
//! Every test uses its own tenant and host names, and a guard declared first (so dropped last)
//! that removes every container, volume and network carrying those names' labels, even when the
//! test fails. Intervals are shortened through the agent's flags so that the whole file stays
//! within a few minutes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use clusterclaw_agent::enroll::{self, IdentityFiles};
use clusterclaw_proto::agent::WatchAssignmentsRequest;
use clusterclaw_tests::server::TestServer;
use clusterclaw_tests::{docker_available, ensure_standin_image};
use serde_json::{Value, json};

/// Agent flags that make every loop quick enough for tests.
const FAST: [&str; 16] = [
    "--report-interval",
    "1s",
    "--resync-interval",
    "500ms",
    "--poll-wait",
    "30s",
    "--probe-interval",
    "1s",
    "--probe-timeout",
    "500ms",
    "--probe-initial-delay",
    "2s",
    "--probe-failure-threshold",
    "2",
    "--restart-backoff",
    "1s",
];
const WAIT: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------ helpers

/// A name unique to this test run: `<prefix>-<pid>-<nanos>`, a valid DNS label.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{:x}-{nanos:x}", std::process::id())
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("run docker")?;
    ensure!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Removes everything labelled with one of the given label filters, on drop.
#[derive(Default)]
struct DockerCleanup {
    filters: std::sync::Mutex<Vec<String>>,
}

impl DockerCleanup {
    fn tenant(tenant: &str) -> Self {
        let c = DockerCleanup::default();
        c.add(&format!("io.clusterclaw.tenant={tenant}"));
        c
    }

    fn add(&self, filter: &str) {
        self.filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("label={filter}"));
    }

    fn host(&self, host: &str) {
        self.add(&format!("io.clusterclaw.host={host}"));
    }
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        let filters = self
            .filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for filter in &filters {
            for (list, remove) in [
                (
                    vec!["ps", "-aq", "--filter", filter.as_str()],
                    vec!["rm", "-f", "-v"],
                ),
                (
                    vec!["volume", "ls", "-q", "--filter", filter.as_str()],
                    vec!["volume", "rm", "-f"],
                ),
                (
                    vec!["network", "ls", "-q", "--filter", filter.as_str()],
                    vec!["network", "rm"],
                ),
            ] {
                let Ok(out) = Command::new("docker").args(&list).output() else {
                    continue;
                };
                let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                if !ids.is_empty() {
                    let _ = Command::new("docker").args(&remove).args(&ids).output();
                }
            }
        }
    }
}

/// The `clusterclaw-agent` binary, built once per test process next to this test executable.
fn agent_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_agent().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn build_agent() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("CLUSTERCLAW_AGENT_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().context("locate the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not in <target>/<profile>/deps")?
        .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .context("no target directory above the profile directory")?;
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .unwrap_or("debug")
        .to_string();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "clusterclaw-agent",
        "--bin",
        "clusterclaw-agent",
        "--manifest-path",
    ])
    .arg(&manifest)
    .arg("--target-dir")
    .arg(target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let status = cmd.status().context("run cargo build for the agent")?;
    ensure!(status.success(), "cargo build of clusterclaw-agent failed");
    let bin = profile_dir.join("clusterclaw-agent");
    ensure!(bin.exists(), "{} does not exist", bin.display());
    Ok(bin)
}

/// A `clusterclaw-agent` process on its own data directory; killed on drop.
struct TestAgent {
    data: tempfile::TempDir,
    log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl TestAgent {
    /// Starts an agent with `args` (its data directory is added).
    fn start(args: &[&str]) -> anyhow::Result<TestAgent> {
        let data = tempfile::Builder::new()
            .prefix("clusterclaw-agent-")
            .tempdir()?;
        let log = data.path().with_extension("log");
        let mut agent = TestAgent {
            data,
            log,
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts an agent that enrolls with `server`.
    fn enroll(server: &TestServer, port: u16, token: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let ca = server
            .endpoints()
            .ca_cert
            .clone()
            .context("endpoints.json names no CA certificate")?;
        let url = format!("https://127.0.0.1:{port}");
        let ca = ca.display().to_string();
        let mut args = vec![
            "--server",
            &url,
            "--ca-cert",
            &ca,
            "--join-token",
            token,
            "--log-format",
            "json",
        ];
        args.extend(FAST);
        args.extend(extra);
        TestAgent::start(&args)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(agent_bin()?)
            .args(&self.args)
            .arg("--data-dir")
            .arg(self.data.path())
            .env_remove("CLUSTERCLAW_JOIN_TOKEN")
            .env("RUST_LOG", "info,clusterclaw_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start clusterclaw-agent")?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts the agent again on the same data directory with only the fast flags (no token).
    fn restart_plain(&mut self) -> anyhow::Result<()> {
        self.kill9();
        let mut args: Vec<String> = vec!["--log-format".into(), "json".into()];
        args.extend(FAST.iter().map(|s| s.to_string()));
        self.args = args;
        self.spawn()
    }

    fn data_dir(&self) -> &Path {
        self.data.path()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for the host identity and returns the host id.
    fn wait_enrolled(&mut self) -> anyhow::Result<String> {
        let files = IdentityFiles::in_dir(self.data.path());
        let deadline = Instant::now() + WAIT;
        loop {
            if files.exist()
                && let Ok(id) = enroll::load(&files)
            {
                return Ok(id.record.host_id);
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "the agent exited ({status}) before enrolling:\n{}",
                    self.log()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "the agent did not enroll within {WAIT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit on its own.
    fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let child = self.child.as_mut().context("the agent is not running")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the agent still runs after {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn identity(&self) -> anyhow::Result<enroll::HostIdentity> {
        Ok(enroll::load(&IdentityFiles::in_dir(self.data.path()))?)
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- agent log ({}):\n{}", self.log.display(), self.log());
        }
        let _ = fs::remove_file(&self.log);
    }
}

fn join_token(server: &TestServer, uses: u32, ttl: &str) -> String {
    let body = json!({"kind": "join", "ttl": ttl, "uses": uses}).to_string();
    let resp = server.http(
        "POST",
        "/api/v1/tokens",
        Some(&body),
        Some(server.admin_token()),
    );
    assert_eq!(resp.status, 201, "create a join token: {}", resp.body);
    resp.json()["token"]
        .as_str()
        .expect("a token in the answer")
        .to_string()
}

fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            match last_err {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_host_ready(server: &TestServer, host: &str) -> anyhow::Result<Value> {
    wait_for(&format!("host {host} Ready"), WAIT, || {
        let r = server.http(
            "GET",
            &format!("/api/v1/hosts/{host}"),
            None,
            Some(server.admin_token()),
        );
        if r.status != 200 {
            return Ok(None);
        }
        let v = r.json();
        Ok((v.pointer("/status/phase") == Some(&json!("Ready"))).then_some(v))
    })
}

/// One test's tenant, project and instance manifests.
struct Scope {
    tenant: String,
    project: String,
}

impl Scope {
    fn new(prefix: &str) -> Scope {
        Scope {
            tenant: unique(prefix),
            project: "e2e".into(),
        }
    }

    fn base_manifest(&self) -> String {
        format!(
            "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: {t}\n---\n\
             apiVersion: clusterclaw.io/v1\nkind: Project\nmetadata:\n  name: {p}\n  tenant: {t}\n",
            t = self.tenant,
            p = self.project
        )
    }

    fn instance_manifest(
        &self,
        name: &str,
        image: &str,
        replicas: u32,
        env: &BTreeMap<&str, &str>,
    ) -> String {
        let mut m = format!(
            "apiVersion: clusterclaw.io/v1\nkind: OpenClawInstance\nmetadata:\n  name: {name}\n  tenant: {t}\n  project: {p}\n\
             spec:\n  image: {image}\n  replicas: {replicas}\n  resources:\n    cpu: 100m\n    memory: 64Mi\n",
            t = self.tenant,
            p = self.project
        );
        if !env.is_empty() {
            m.push_str("  env:\n");
            for (k, v) in env {
                m.push_str(&format!("    {k}: \"{v}\"\n"));
            }
        }
        m
    }

    fn apply(&self, server: &TestServer, name: &str, manifest: &str) {
        let path = server.write_file(&format!("{}-{name}.yaml", self.tenant), manifest);
        server
            .cli(&["apply", "-f", path.to_str().expect("utf-8 path")])
            .ok();
    }

    /// `POST /api/v1/apply` (what `clusterclaw apply` sends), without starting a CLI process.
    fn apply_http(&self, server: &TestServer, manifest: &str) {
        let r = server.http(
            "POST",
            "/api/v1/apply",
            Some(manifest),
            Some(server.admin_token()),
        );
        assert_eq!(r.status, 200, "apply: {}", r.body);
    }

    fn instance_path(&self, name: &str) -> String {
        format!(
            "/api/v1/tenants/{}/projects/{}/instances/{name}",
            self.tenant, self.project
        )
    }

    fn instance(&self, server: &TestServer, name: &str) -> Value {
        server.get_json(&self.instance_path(name))
    }

    fn scale(&self, server: &TestServer, name: &str, replicas: u32) {
        let r = server.http(
            "PUT",
            &format!("{}/scale", self.instance_path(name)),
            Some(&json!({ "replicas": replicas }).to_string()),
            Some(server.admin_token()),
        );
        assert_eq!(r.status, 200, "scale: {}", r.body);
    }

    fn delete(&self, server: &TestServer, name: &str) {
        let r = server.http(
            "DELETE",
            &self.instance_path(name),
            None,
            Some(server.admin_token()),
        );
        assert_eq!(r.status, 200, "delete: {}", r.body);
    }

    /// The instance's containers: replica name → (full id, host label, state, started at).
    fn containers(&self, instance: &str) -> anyhow::Result<BTreeMap<String, Container>> {
        let out = docker(&[
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &format!("label=io.clusterclaw.tenant={}", self.tenant),
            "--filter",
            &format!("label=io.clusterclaw.instance={instance}"),
            "--format",
            "{{.ID}}",
        ])?;
        let mut found = BTreeMap::new();
        for id in out.split_whitespace() {
            let v: Value = serde_json::from_str(&docker(&["inspect", id])?)?;
            let c = &v[0];
            let label = |k: &str| {
                c.pointer(&format!("/Config/Labels/io.clusterclaw.{k}"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let port = c
                .pointer("/NetworkSettings/Ports/18789~1tcp/0/HostPort")
                .and_then(Value::as_str)
                .and_then(|p| p.parse().ok());
            found.insert(
                label("replica"),
                Container {
                    id: id.to_string(),
                    host: label("host"),
                    running: c.pointer("/State/Running") == Some(&json!(true)),
                    started_at: c
                        .pointer("/State/StartedAt")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    port,
                    volume: c
                        .pointer("/Mounts")
                        .and_then(Value::as_array)
                        .and_then(|m| {
                            m.iter()
                                .find(|m| m["Destination"] == "/home/node/.openclaw")
                                .and_then(|m| m["Name"].as_str())
                        })
                        .unwrap_or_default()
                        .to_string(),
                },
            );
        }
        Ok(found)
    }

    fn volumes(&self) -> anyhow::Result<Vec<String>> {
        Ok(docker(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label=io.clusterclaw.tenant={}", self.tenant),
        ])?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
    }

    fn networks(&self) -> anyhow::Result<Vec<String>> {
        Ok(docker(&[
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label=io.clusterclaw.tenant={}", self.tenant),
        ])?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Container {
    id: String,
    host: String,
    running: bool,
    started_at: String,
    port: Option<u16>,
    volume: String,
}

/// `GET path` on 127.0.0.1:`port` (the Gateway's published port); the JSON body.
fn gateway_get(port: u16, path: &str) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let (status, body) =
        clusterclaw_agent::probe::parse_response(&raw).map_err(anyhow::Error::msg)?;
    ensure!(status == 200, "GET {path}: HTTP {status}");
    Ok(serde_json::from_slice(&body)?)
}

/// Waits until the instance has `n` Ready replicas (status and running containers agree).
fn wait_ready(
    server: &TestServer,
    scope: &Scope,
    name: &str,
    n: usize,
) -> anyhow::Result<(Value, BTreeMap<String, Container>)> {
    wait_for(&format!("{name} with {n} ready replicas"), WAIT, || {
        let v = scope.instance(server, name);
        let ready = v.pointer("/status/readyReplicas").and_then(Value::as_u64);
        let states: Vec<&str> = v
            .pointer("/status/replicaStatus")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|r| r["state"].as_str()).collect())
            .unwrap_or_default();
        if ready != Some(n as u64) || states.len() != n || states.iter().any(|s| *s != "Ready") {
            return Ok(None);
        }
        let containers = scope.containers(name)?;
        if containers.len() != n || containers.values().any(|c| !c.running) {
            return Ok(None);
        }
        Ok(Some((v, containers)))
    })
}

fn require_docker() -> anyhow::Result<Option<String>> {
    if !docker_available()? {
        return Ok(None);
    }
    Ok(Some(ensure_standin_image()?))
}

// -------------------------------------------------------------------- tests

/// One host: enroll; 3 replicas; scale 3 → 1 → 2; an env change replaces containers with the
/// state kept; `kill -9` of the agent disturbs nothing; the server goes away and comes back;
/// delete removes everything.
#[test]
fn one_host_lifecycle() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-life");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let mut server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("life-host");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    assert_eq!(host, host_name, "--name names the host");
    assert!(
        !agent.log().contains(&token),
        "the join token never reaches the log"
    );
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).map(|m| m.permissions().mode() & 0o777)
    };
    let files = IdentityFiles::in_dir(agent.data_dir());
    assert_eq!(mode(&files.key)?, 0o600);
    let host_obj = wait_host_ready(&server, &host)?;
    assert!(
        host_obj.pointer("/spec/capacity/cpu").is_some(),
        "{host_obj}"
    );

    // Three replicas.
    let name = "bot";
    scope.apply(&server, "base", &scope.base_manifest());
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(name, &image, 3, &BTreeMap::new()),
    );
    let (status, three) = wait_ready(&server, &scope, name, 3)?;
    assert_eq!(
        status.pointer("/status/phase"),
        Some(&json!("Running")),
        "{status}"
    );
    for r in status["status"]["replicaStatus"].as_array().unwrap() {
        let replica = r["name"].as_str().unwrap();
        let c = &three[replica];
        assert_eq!(r["containerId"].as_str(), Some(c.id.as_str()), "{r}");
        assert_eq!(r["hostPort"].as_u64(), c.port.map(u64::from), "{r}");
        assert_eq!(r["host"].as_str(), Some(host.as_str()));
        assert_eq!(c.host, host);
    }
    let info = gateway_get(three[&format!("{name}-0")].port.unwrap(), "/standin/info")?;
    assert_eq!(info["boots"], 1);

    // Scale 3 → 1: the highest ordinals go with their volumes; ordinal 0 is left alone.
    scope.scale(&server, name, 1);
    let (_, one) = wait_ready(&server, &scope, name, 1)?;
    assert_eq!(one[&format!("{name}-0")], three[&format!("{name}-0")]);
    wait_for("the volumes of removed replicas to go", WAIT, || {
        Ok((scope.volumes()?.len() == 1).then_some(()))
    })?;

    // 1 → 2.
    scope.scale(&server, name, 2);
    let (_, two) = wait_ready(&server, &scope, name, 2)?;
    assert_eq!(two[&format!("{name}-0")], three[&format!("{name}-0")]);

    // An env change replaces both containers; the state volume is kept (the boot counter
    // goes on).
    let boots_before: BTreeMap<String, u64> = two
        .iter()
        .map(|(r, c)| {
            let info = gateway_get(c.port.unwrap(), "/standin/info")?;
            Ok((r.clone(), info["boots"].as_u64().unwrap_or_default()))
        })
        .collect::<anyhow::Result<_>>()?;
    let env = BTreeMap::from([("OPENCLAW_E2E_COLOUR", "blue")]);
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(name, &image, 2, &env),
    );
    let replaced = wait_for("both containers replaced", WAIT, || {
        let (_, now) = wait_ready(&server, &scope, name, 2)?;
        Ok(now.iter().all(|(r, c)| two[r].id != c.id).then_some(now))
    })?;
    for (r, c) in &replaced {
        assert_eq!(c.volume, two[r].volume, "the state volume is kept");
        let info = gateway_get(c.port.unwrap(), "/standin/info")?;
        assert_eq!(info["env"]["OPENCLAW_E2E_COLOUR"], "blue", "{info}");
        assert_eq!(info["boots"].as_u64(), Some(boots_before[r] + 1), "{info}");
    }

    // kill -9 and restart the agent: same containers, not restarted.
    agent.restart_plain()?;
    wait_for("the restarted agent to report", WAIT, || {
        Ok(agent
            .log()
            .contains("loaded the host identity")
            .then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let after_kill = scope.containers(name)?;
    assert_eq!(after_kill, replaced, "the agent adopted its containers");
    let (_, _) = wait_ready(&server, &scope, name, 2)?;

    // The server goes away: containers keep running, and a killed one is restarted from the
    // saved assignments.
    server.terminate()?;
    let victim = format!("{name}-1");
    docker(&["kill", &replaced[&victim].id])?;
    let restarted = wait_for("the agent to restart the killed replica", WAIT, || {
        let c = scope.containers(name)?;
        Ok((c.len() == 2
            && c.values().all(|c| c.running)
            && c[&victim].started_at != replaced[&victim].started_at)
            .then_some(c))
    })?;
    assert_eq!(
        restarted[&victim].id, replaced[&victim].id,
        "restarted, not replaced"
    );
    assert_eq!(
        restarted[&format!("{name}-0")],
        replaced[&format!("{name}-0")]
    );
    assert!(
        agent.log().contains("cannot fetch assignments"),
        "{}",
        agent.log()
    );

    // The server comes back: status catches up (the restart is counted).
    server.restart()?;
    let caught_up = Instant::now();
    wait_for("status to catch up", WAIT, || {
        let v = scope.instance(&server, name);
        let restarts = v
            .pointer("/status/replicaStatus")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().find(|r| r["name"] == victim.as_str()))
            .and_then(|r| r["restarts"].as_u64())
            .unwrap_or_default();
        Ok((restarts >= 1 && v.pointer("/status/readyReplicas") == Some(&json!(2))).then_some(()))
    })?;
    eprintln!(
        "status caught up {:?} after the server came back",
        caught_up.elapsed()
    );
    wait_host_ready(&server, &host)?;

    // Delete: containers, volumes and the tenant network go.
    scope.delete(&server, name);
    wait_for("everything of the instance to go", WAIT, || {
        Ok((scope.containers(name)?.is_empty()
            && scope.volumes()?.is_empty()
            && scope.networks()?.is_empty())
        .then_some(()))
    })?;
    Ok(())
}

/// Two agents on one engine are two hosts: replicas spread over them. A missing image is
/// reported as ImagePullFailed; an unhealthy Gateway is restarted (counted) and the instance is
/// Degraded.
#[test]
fn two_hosts_and_failing_replicas() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-two");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 2, "10m");
    let (name_a, name_b) = (unique("two-a"), unique("two-b"));
    let mut a = TestAgent::enroll(
        &server,
        port,
        &token,
        &["--name", &name_a, "--label", "e2e=two"],
    )?;
    let mut b = TestAgent::enroll(
        &server,
        port,
        &token,
        &["--name", &name_b, "--label", "e2e=two"],
    )?;
    let host_a = a.wait_enrolled()?;
    let host_b = b.wait_enrolled()?;
    cleanup.host(&host_a);
    cleanup.host(&host_b);
    assert_ne!(a.identity()?.cert_pem, b.identity()?.cert_pem);
    wait_host_ready(&server, &host_a)?;
    let host = wait_host_ready(&server, &host_b)?;
    assert_eq!(host.pointer("/metadata/labels/e2e"), Some(&json!("two")));

    scope.apply(&server, "base", &scope.base_manifest());
    let name = "spread";
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(name, &image, 4, &BTreeMap::new()),
    );
    let (status, containers) = wait_ready(&server, &scope, name, 4)?;
    let hosts: BTreeSet<&str> = containers.values().map(|c| c.host.as_str()).collect();
    assert_eq!(
        hosts,
        BTreeSet::from([host_a.as_str(), host_b.as_str()]),
        "replicas spread over both hosts"
    );
    for r in status["status"]["replicaStatus"].as_array().unwrap() {
        let c = &containers[r["name"].as_str().unwrap()];
        assert_eq!(r["host"].as_str(), Some(c.host.as_str()), "{r}");
    }

    // A missing image.
    let missing = "missing";
    scope.apply(
        &server,
        missing,
        &scope.instance_manifest(
            missing,
            "clusterclaw-test/does-not-exist:never",
            1,
            &BTreeMap::new(),
        ),
    );
    let failed = wait_for("ImagePullFailed", WAIT, || {
        let v = scope.instance(&server, missing);
        let r = v.pointer("/status/replicaStatus/0").cloned();
        Ok(r.filter(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.contains("ImagePullFailed"))
        }))
    })?;
    assert_eq!(failed["state"], "Failed", "{failed}");

    // An unhealthy Gateway: restarted by the agent, counted, and the instance is Degraded.
    let sick = "sick";
    scope.apply(
        &server,
        sick,
        &scope.instance_manifest(
            sick,
            &image,
            1,
            &BTreeMap::from([("STANDIN_UNHEALTHY", "1")]),
        ),
    );
    let degraded = wait_for("restarts and a Degraded instance", WAIT, || {
        let v = scope.instance(&server, sick);
        let restarts = v
            .pointer("/status/replicaStatus/0/restarts")
            .and_then(Value::as_u64)
            .unwrap_or_default();
        Ok((restarts >= 1 && v.pointer("/status/phase") == Some(&json!("Degraded"))).then_some(v))
    })?;
    eprintln!("degraded: {}", degraded["status"]);
    for instance in [name, missing, sick] {
        scope.delete(&server, instance);
    }
    wait_for("the test's containers to go", WAIT, || {
        Ok(
            (scope.containers(name)?.is_empty() && scope.containers(sick)?.is_empty())
                .then_some(()),
        )
    })?;
    Ok(())
}

/// One `WatchAssignments` call through the client `make` builds (inside a runtime, as tonic
/// needs).
fn watch_with(
    make: impl FnOnce() -> Result<
        clusterclaw_proto::agent::agent_service_client::AgentServiceClient<
            tonic::transport::Channel,
        >,
        clusterclaw_agent::client::ClientError,
    >,
) -> anyhow::Result<Result<(), tonic::Status>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut client = make()?;
        Ok(client
            .watch_assignments(WatchAssignmentsRequest {
                known_index: 0,
                wait_seconds: 1,
            })
            .await
            .map(drop))
    })
}

/// Refusals: bad join tokens end the agent with a clear error; an unreachable server at
/// enrollment is retried and said so; bad settings exit 64; no certificate, a certificate of
/// another CA and a revoked host's certificate are refused on the agent port.
#[test]
fn refusals() -> anyhow::Result<()> {
    let Some(_image) = require_docker()? else {
        return Ok(());
    };
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let expiring = join_token(&server, 5, "1m");
    let expiring_since = Instant::now();
    let cleanup = DockerCleanup::default();

    // Bad settings: every problem at once, exit 64.
    let mut bad = TestAgent::start(&["--report-interval", "soon", "--label", "no-equals"])?;
    let status = bad.wait_exit(Duration::from_secs(20))?;
    assert_eq!(status.code(), Some(64), "{}", bad.log());
    for needle in ["--report-interval", "--label no-equals", "not enrolled yet"] {
        assert!(bad.log().contains(needle), "{needle}: {}", bad.log());
    }

    // A wrong token.
    let mut wrong = TestAgent::enroll(&server, port, "ccj_not-a-real-token", &[])?;
    let status = wrong.wait_exit(Duration::from_secs(30))?;
    assert_eq!(status.code(), Some(1), "{}", wrong.log());
    assert!(wrong.log().contains("refused to enroll"), "{}", wrong.log());
    assert!(
        !wrong.log().contains("ccj_not-a-real-token"),
        "{}",
        wrong.log()
    );

    // A used-up token.
    let once = join_token(&server, 1, "10m");
    let mut first = TestAgent::enroll(&server, port, &once, &["--name", &unique("ref-a")])?;
    let host = first.wait_enrolled()?;
    cleanup.host(&host);
    let mut second = TestAgent::enroll(&server, port, &once, &[])?;
    let status = second.wait_exit(Duration::from_secs(30))?;
    assert_eq!(status.code(), Some(1), "{}", second.log());
    assert!(second.log().contains("used up"), "{}", second.log());

    // The server cannot be reached at enrollment: retries, and says so each time.
    let nowhere = free_port();
    let ca = server.endpoints().ca_cert.clone().unwrap();
    let mut waiting = TestAgent::start(&[
        "--server",
        &format!("https://127.0.0.1:{nowhere}"),
        "--ca-cert",
        ca.to_str().unwrap(),
        "--join-token",
        &expiring,
    ])?;
    wait_for("two retries to be logged", Duration::from_secs(30), || {
        Ok((waiting.log().matches("retrying").count() >= 2).then_some(()))
    })?;
    assert!(
        waiting.log().contains("cannot reach the control plane"),
        "{}",
        waiting.log()
    );
    assert!(
        waiting.child.as_mut().unwrap().try_wait()?.is_none(),
        "it keeps trying"
    );
    waiting.kill9();

    // mTLS: no certificate.
    let url = format!("https://127.0.0.1:{port}");
    let ca_pem = fs::read_to_string(&ca)?;
    let refused = watch_with(|| clusterclaw_agent::client::anonymous(&url, &ca_pem))?
        .expect_err("no certificate is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    // The enrolled host itself is let in.
    let identity = first.identity()?;
    watch_with(|| clusterclaw_agent::client::authenticated(&identity))?
        .map_err(|s| anyhow::anyhow!("the enrolled host is refused: {s:?}"))?;

    // A certificate from another cluster's CA.
    let other_port = free_port();
    let other = TestServer::start_on(&format!("127.0.0.1:{other_port}"), &[])?;
    let other_token = join_token(&other, 1, "10m");
    let mut stranger = TestAgent::enroll(
        &other,
        other_port,
        &other_token,
        &["--name", &unique("ref-x")],
    )?;
    let stranger_host = stranger.wait_enrolled()?;
    cleanup.host(&stranger_host);
    let mut foreign = stranger.identity()?;
    stranger.kill9();
    foreign.record.server = url.clone();
    foreign.ca_pem = ca_pem.clone();
    let refused = watch_with(|| clusterclaw_agent::client::authenticated(&foreign))?
        .expect_err("a certificate of another CA is refused");
    assert_ne!(refused.code(), tonic::Code::Ok, "{refused:?}");

    // A revoked (deleted) host.
    let r = server.http(
        "DELETE",
        &format!("/api/v1/hosts/{host}"),
        None,
        Some(server.admin_token()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let refused = watch_with(|| clusterclaw_agent::client::authenticated(&identity))?
        .expect_err("a revoked host is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    wait_for("the agent to log the refusal", WAIT, || {
        Ok(first.log().contains("refused").then_some(()))
    })?;

    // An expired token.
    let left = Duration::from_secs(62).saturating_sub(expiring_since.elapsed());
    std::thread::sleep(left);
    let mut late = TestAgent::enroll(&server, port, &expiring, &[])?;
    let status = late.wait_exit(Duration::from_secs(30))?;
    assert_eq!(status.code(), Some(1), "{}", late.log());
    assert!(late.log().contains("expired"), "{}", late.log());
    Ok(())
}

/// Timestamps of the agent's JSON log lines whose message is `message`, with their fields.
fn log_events(log: &str, message: &str) -> Vec<(SystemTime, Value)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.pointer("/fields/message") == Some(&json!(message)))
        .filter_map(|v| {
            let ts = humantime::parse_rfc3339(v["timestamp"].as_str()?).ok()?;
            Some((ts, v["fields"].clone()))
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU time (user + system) of a process, from /proc.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based over the whole line).
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

/// The plain-Docker baseline: `docker run` of `n` stand-ins one after the other, until every
/// `/readyz` passes.
fn plain_docker_ready(image: &str, n: usize, tag: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut ports = Vec::new();
    let names: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    for name in &names {
        let port = free_port();
        docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--label",
            &format!("io.clusterclaw.test={tag}"),
            "-p",
            &format!("127.0.0.1:{port}:18789"),
            image,
        ])?;
        ports.push(port);
    }
    for port in ports {
        wait_for("/readyz of a plain container", WAIT, || {
            Ok(gateway_get(port, "/readyz")
                .ok()
                .filter(|v| v["ready"] == true)
                .map(drop))
        })?;
    }
    let took = started.elapsed();
    let _ = Command::new("docker")
        .args(["rm", "-f"])
        .args(&names)
        .output();
    Ok(took)
}

/// The figures, measured on this machine and printed; the assertions are loose bounds
/// that only a broken design (polling instead of long polls, busy loops, slow probes) exceeds.
#[test]
fn figures_on_loopback() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-fig");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let baseline_tag = unique("e2e-plain");
    cleanup.add(&format!("io.clusterclaw.test={baseline_tag}"));
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &unique("fig")])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;
    scope.apply(&server, "base", &scope.base_manifest());

    // 1. From apply to 3 Ready replicas, against plain `docker run` + first passing /readyz.
    let mut agent_runs = Vec::new();
    let mut plain_runs = Vec::new();
    for round in 0..3 {
        plain_runs.push(plain_docker_ready(
            &image,
            3,
            &format!("{baseline_tag}-{round}"),
        )?);
        let name = format!("ready-{round}");
        let manifest = scope.instance_manifest(&name, &image, 3, &BTreeMap::new());
        let log_before = agent.log().len();
        let sent = SystemTime::now();
        let started = Instant::now();
        scope.apply_http(&server, &manifest);
        wait_for("3 Ready replicas", WAIT, || {
            let v = scope.instance(&server, &name);
            Ok((v.pointer("/status/readyReplicas") == Some(&json!(3))).then_some(()))
        })?;
        agent_runs.push(started.elapsed());
        if round == 0 {
            let log = agent.log();
            let log = log.get(log_before..).unwrap_or_default();
            for event in ["new assignments", "replica container started"] {
                let at: Vec<Duration> = log_events(log, event)
                    .iter()
                    .map(|(t, _)| t.duration_since(sent).unwrap_or_default())
                    .collect();
                eprintln!("figure: timeline: {event:?} at {at:?} after the apply was sent");
            }
        }
        scope.delete(&server, &name);
        wait_for("the round's containers to go", WAIT, || {
            Ok(scope.containers(&name)?.is_empty().then_some(()))
        })?;
    }
    agent_runs.sort();
    plain_runs.sort();
    let ratio = agent_runs[1].as_secs_f64() / plain_runs[1].as_secs_f64();
    eprintln!(
        "figure: apply -> 3 Ready: median {:?} (runs {agent_runs:?}); plain docker run x3 + /readyz: median {:?} (runs {plain_runs:?}); ratio {ratio:.2}",
        agent_runs[1], plain_runs[1]
    );

    // 2. Spec change -> the agent has the new assignments (saved, acting).
    let name = "latency";
    let mut env_value = String::from("0");
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(
            name,
            &image,
            1,
            &BTreeMap::from([("OPENCLAW_SEQ", env_value.as_str())]),
        ),
    );
    wait_ready(&server, &scope, name, 1)?;
    let mut latencies = Vec::new();
    for i in 1..=20 {
        env_value = i.to_string();
        let before = log_events(&agent.log(), "new assignments").len();
        let manifest = scope.instance_manifest(
            name,
            &image,
            1,
            &BTreeMap::from([("OPENCLAW_SEQ", env_value.as_str())]),
        );
        let sent = SystemTime::now();
        scope.apply_http(&server, &manifest);
        let got = wait_for("the agent to receive the change", WAIT, || {
            let events = log_events(&agent.log(), "new assignments");
            Ok(events.get(before).map(|(t, _)| *t))
        })?;
        latencies.push(got.duration_since(sent).unwrap_or_default());
        wait_for("the replaced replica to be Ready", WAIT, || {
            let v = scope.instance(&server, name);
            let ok = v.pointer("/status/readyReplicas") == Some(&json!(1))
                && v.pointer("/status/replicaStatus/0/generation")
                    == v.pointer("/metadata/generation");
            Ok(ok.then_some(()))
        })?;
    }
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    eprintln!(
        "figure: spec change (apply request sent) -> agent has it: p50 {p50:?}, p99 {p99:?}, max {:?} over {} changes",
        latencies[latencies.len() - 1],
        latencies.len()
    );
    scope.delete(&server, name);

    // 3. Resident memory and CPU while managing 10 running replicas.
    let name = "ten";
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(name, &image, 10, &BTreeMap::new()),
    );
    wait_ready(&server, &scope, name, 10)?;
    std::thread::sleep(Duration::from_secs(3));
    let pid = agent.pid().context("the agent runs")?;
    let window = Duration::from_secs(20);
    let cpu_before = cpu_time(pid)?;
    let t0 = Instant::now();
    let mut rss_max = 0;
    while t0.elapsed() < window {
        rss_max = rss_max.max(rss_bytes(pid)?);
        std::thread::sleep(Duration::from_millis(500));
    }
    let cpu = (cpu_time(pid)? - cpu_before).as_secs_f64() / t0.elapsed().as_secs_f64() * 100.0;
    eprintln!(
        "figure: 10 replicas (report interval 1s, probe interval 1s, resync 500ms): agent RSS max {:.1} MiB, CPU {cpu:.2}% of one core over {window:?}",
        rss_max as f64 / (1 << 20) as f64
    );
    scope.delete(&server, name);
    wait_for("the ten containers to go", WAIT, || {
        Ok(scope.containers(name)?.is_empty().then_some(()))
    })?;

    // Loose bounds: a debug build under a parallel test load, with intervals 10x shorter than
    // the defaults.
    assert!(p50 < Duration::from_millis(250), "spec change p50 {p50:?}");
    assert!(ratio < 3.0, "apply -> Ready is {ratio:.2}x plain docker");
    assert!(rss_max < 64 << 20, "RSS {rss_max}");
    assert!(cpu < 10.0, "CPU {cpu:.2}%");
    Ok(())
}
