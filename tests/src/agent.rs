//! Harness for end-to-end tests and benchmarks of the agent: the real `clusterclaw-agent`
//! binary as a process against a real server, real Docker and the stand-in Gateway image, with
//! guards that remove every container, volume and network a test creates.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use clusterclaw_agent::enroll::{self, IdentityFiles};
use serde_json::{Value, json};

use crate::server::TestServer;
use crate::{docker_available, ensure_standin_image};

/// Agent flags that make every loop quick enough for tests.
pub const FAST: [&str; 16] = [
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
pub const WAIT: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------ helpers

/// A name unique to this test run: `<prefix>-<pid>-<nanos>`, a valid DNS label.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{:x}-{nanos:x}", std::process::id())
}

pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn docker(args: &[&str]) -> anyhow::Result<String> {
    engine_cli("docker", args)
}

/// Runs the engine's command line (`docker` or `podman`, which take the same arguments here)
/// and returns its trimmed standard output.
pub fn engine_cli(cli: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cli)
        .args(args)
        .output()
        .with_context(|| format!("run {cli}"))?;
    ensure!(
        out.status.success(),
        "{cli} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Removes everything labelled with one of the given label filters, on drop.
/// Works through the `docker` command line unless built with [`DockerCleanup::tenant_on`].
#[derive(Default)]
pub struct DockerCleanup {
    pub filters: std::sync::Mutex<Vec<String>>,
    /// The engine's command line; `docker` when empty.
    pub cli: String,
}

impl DockerCleanup {
    pub fn tenant(tenant: &str) -> Self {
        let c = DockerCleanup::default();
        c.add(&format!("io.clusterclaw.tenant={tenant}"));
        c
    }

    /// As [`DockerCleanup::tenant`], through another engine's command line (`podman`).
    pub fn tenant_on(cli: &str, tenant: &str) -> Self {
        let c = DockerCleanup {
            filters: Default::default(),
            cli: cli.to_owned(),
        };
        c.add(&format!("io.clusterclaw.tenant={tenant}"));
        c
    }

    pub fn add(&self, filter: &str) {
        self.filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("label={filter}"));
    }

    pub fn host(&self, host: &str) {
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
        let cli = if self.cli.is_empty() {
            "docker"
        } else {
            self.cli.as_str()
        };
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
                let Ok(out) = Command::new(cli).args(&list).output() else {
                    continue;
                };
                let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                if !ids.is_empty() {
                    let _ = Command::new(cli).args(&remove).args(&ids).output();
                }
            }
        }
    }
}

/// The `clusterclaw-agent` binary, built once per test process next to this test executable.
pub fn agent_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_agent().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn build_agent() -> anyhow::Result<PathBuf> {
    crate::server::workspace_bin(
        "CLUSTERCLAW_AGENT_BIN",
        "clusterclaw-agent",
        "clusterclaw-agent",
    )
}

/// A `clusterclaw-agent` process on its own data directory; killed on drop.
pub struct TestAgent {
    pub data: tempfile::TempDir,
    pub log: PathBuf,
    pub args: Vec<String>,
    pub child: Option<Child>,
    /// Environment variables set on every start (after the defaults, so `RUST_LOG` here wins).
    pub env: Vec<(String, String)>,
}

impl TestAgent {
    /// Starts an agent with `args` (its data directory is added).
    pub fn start(args: &[&str]) -> anyhow::Result<TestAgent> {
        let data = tempfile::Builder::new()
            .prefix("clusterclaw-agent-")
            .tempdir()?;
        let log = data.path().with_extension("log");
        let mut agent = TestAgent {
            data,
            log,
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            env: Vec::new(),
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts an agent that enrolls with `server`, with every interval shortened ([`FAST`]).
    pub fn enroll(
        server: &TestServer,
        port: u16,
        token: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args = FAST.to_vec();
        args.extend(extra);
        TestAgent::enroll_with_defaults(server, port, token, &args)
    }

    /// Starts an agent that enrolls with `server`, with the agent's default intervals.
    pub fn enroll_with_defaults(
        server: &TestServer,
        port: u16,
        token: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
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
        args.extend(extra);
        TestAgent::start(&args)
    }

    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(agent_bin()?)
            .args(&self.args)
            .arg("--data-dir")
            .arg(self.data.path())
            .env_remove("CLUSTERCLAW_JOIN_TOKEN")
            // The harness's own variable, which the agent would refuse as an unknown setting.
            .env_remove("CLUSTERCLAW_AGENT_BIN")
            .env("RUST_LOG", "info,clusterclaw_agent=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start clusterclaw-agent")?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts the agent again on the same data directory with only the fast flags (no token).
    pub fn restart_plain(&mut self) -> anyhow::Result<()> {
        self.kill9();
        let mut args: Vec<String> = vec!["--log-format".into(), "json".into()];
        args.extend(FAST.iter().map(|s| s.to_string()));
        self.args = args;
        self.spawn()
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for the host identity and returns the host id.
    pub fn wait_enrolled(&mut self) -> anyhow::Result<String> {
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
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
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

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn identity(&self) -> anyhow::Result<enroll::HostIdentity> {
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

pub fn join_token(server: &TestServer, uses: u32, ttl: &str) -> String {
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

pub fn wait_for<T>(
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

pub fn wait_host_ready(server: &TestServer, host: &str) -> anyhow::Result<Value> {
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
pub struct Scope {
    pub tenant: String,
    pub project: String,
    /// The engine's command line the container look-ups use: `docker` or `podman`.
    pub cli: &'static str,
}

impl Scope {
    pub fn new(prefix: &str) -> Scope {
        Scope {
            tenant: unique(prefix),
            project: "e2e".into(),
            cli: "docker",
        }
    }

    /// A scope whose containers, volumes and networks are looked up with `podman`.
    pub fn podman(prefix: &str) -> Scope {
        Scope {
            cli: "podman",
            ..Scope::new(prefix)
        }
    }

    pub fn base_manifest(&self) -> String {
        format!(
            "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: {t}\n---\n\
             apiVersion: clusterclaw.io/v1\nkind: Project\nmetadata:\n  name: {p}\n  tenant: {t}\n",
            t = self.tenant,
            p = self.project
        )
    }

    pub fn instance_manifest(
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

    pub fn apply(&self, server: &TestServer, name: &str, manifest: &str) {
        let path = server.write_file(&format!("{}-{name}.yaml", self.tenant), manifest);
        server
            .cli(&["apply", "-f", path.to_str().expect("utf-8 path")])
            .ok();
    }

    /// `POST /api/v1/apply` (what `clusterclaw apply` sends), without starting a CLI process.
    pub fn apply_http(&self, server: &TestServer, manifest: &str) {
        let r = server.http(
            "POST",
            "/api/v1/apply",
            Some(manifest),
            Some(server.admin_token()),
        );
        assert_eq!(r.status, 200, "apply: {}", r.body);
    }

    pub fn instance_path(&self, name: &str) -> String {
        format!(
            "/api/v1/tenants/{}/projects/{}/instances/{name}",
            self.tenant, self.project
        )
    }

    pub fn instance(&self, server: &TestServer, name: &str) -> Value {
        server.get_json(&self.instance_path(name))
    }

    pub fn scale(&self, server: &TestServer, name: &str, replicas: u32) {
        let r = server.http(
            "PUT",
            &format!("{}/scale", self.instance_path(name)),
            Some(&json!({ "replicas": replicas }).to_string()),
            Some(server.admin_token()),
        );
        assert_eq!(r.status, 200, "scale: {}", r.body);
    }

    pub fn delete(&self, server: &TestServer, name: &str) {
        let r = server.http(
            "DELETE",
            &self.instance_path(name),
            None,
            Some(server.admin_token()),
        );
        assert_eq!(r.status, 200, "delete: {}", r.body);
    }

    /// The instance's containers: replica name → (full id, host label, state, started at).
    pub fn containers(&self, instance: &str) -> anyhow::Result<BTreeMap<String, Container>> {
        let out = engine_cli(
            self.cli,
            &[
                "ps",
                "-a",
                "--no-trunc",
                "--filter",
                &format!("label=io.clusterclaw.tenant={}", self.tenant),
                "--filter",
                &format!("label=io.clusterclaw.instance={instance}"),
                "--format",
                "{{.ID}}",
            ],
        )?;
        let mut found = BTreeMap::new();
        for id in out.split_whitespace() {
            let v: Value = serde_json::from_str(&engine_cli(self.cli, &["inspect", id])?)?;
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

    pub fn volumes(&self) -> anyhow::Result<Vec<String>> {
        Ok(engine_cli(
            self.cli,
            &[
                "volume",
                "ls",
                "-q",
                "--filter",
                &format!("label=io.clusterclaw.tenant={}", self.tenant),
            ],
        )?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
    }

    pub fn networks(&self) -> anyhow::Result<Vec<String>> {
        Ok(engine_cli(
            self.cli,
            &[
                "network",
                "ls",
                "-q",
                "--filter",
                &format!("label=io.clusterclaw.tenant={}", self.tenant),
            ],
        )?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    pub id: String,
    pub host: String,
    pub running: bool,
    pub started_at: String,
    pub port: Option<u16>,
    pub volume: String,
}

/// `GET path` on 127.0.0.1:`port` (the Gateway's published port); the JSON body.
pub fn gateway_get(port: u16, path: &str) -> anyhow::Result<Value> {
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

/// One plain HTTP/1.1 request to 127.0.0.1:`port`: the status and the body.
pub fn gateway_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let body = body.unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    clusterclaw_agent::probe::parse_response(&raw).map_err(anyhow::Error::msg)
}

/// The content of the file `name` in the stand-in's state directory (`GET /standin/file`),
/// `None` when there is no such file.
pub fn standin_file(port: u16, name: &str) -> anyhow::Result<Option<String>> {
    let (status, body) = gateway_request(port, "GET", &format!("/standin/file?name={name}"), None)?;
    match status {
        200 => Ok(Some(String::from_utf8_lossy(&body).into_owned())),
        404 => Ok(None),
        other => bail!(
            "GET /standin/file?name={name}: HTTP {other}: {}",
            String::from_utf8_lossy(&body)
        ),
    }
}

/// Writes the file `name` in the stand-in's state directory (`PUT /standin/file`).
pub fn standin_put_file(port: u16, name: &str, content: &str) -> anyhow::Result<()> {
    let (status, body) = gateway_request(
        port,
        "PUT",
        &format!("/standin/file?name={name}"),
        Some(content.as_bytes()),
    )?;
    ensure!(
        status == 200,
        "PUT /standin/file?name={name}: HTTP {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

/// Waits until the instance has `n` Ready replicas (status and running containers agree).
pub fn wait_ready(
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
        // Ready is what the host reported of the container the engine runs now, not a state
        // left over from the container it replaced (the report of the new one may be on its way).
        let reported: BTreeMap<&str, &str> = v
            .pointer("/status/replicaStatus")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|r| Some((r["name"].as_str()?, r["containerId"].as_str()?)))
                    .collect()
            })
            .unwrap_or_default();
        if containers
            .iter()
            .any(|(r, c)| reported.get(r.as_str()).is_some_and(|id| *id != c.id))
        {
            return Ok(None);
        }
        Ok(Some((v, containers)))
    })
}

pub fn require_docker() -> anyhow::Result<Option<String>> {
    if !docker_available()? {
        return Ok(None);
    }
    Ok(Some(ensure_standin_image()?))
}

/// Timestamps of the agent's JSON log lines whose message is `message`, with their fields.
pub fn log_events(log: &str, message: &str) -> Vec<(SystemTime, Value)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.pointer("/fields/message") == Some(&json!(message)))
        .filter_map(|v| {
            let ts = humantime::parse_rfc3339(v["timestamp"].as_str()?).ok()?;
            Some((ts, v["fields"].clone()))
        })
        .collect()
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU time (user + system) of a process, from /proc.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based over the whole line).
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
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
pub fn plain_docker_ready(image: &str, n: usize, tag: &str) -> anyhow::Result<Duration> {
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

/// A running container: (replica, host, id).
pub type Running = Vec<(String, String, String)>;

/// The running containers of `tenant`'s replicas: (replica, host, id).
pub fn running_replicas(tenant: &str) -> anyhow::Result<Running> {
    let out = docker(&[
        "ps",
        "--no-trunc",
        "--filter",
        &format!("label=io.clusterclaw.tenant={tenant}"),
        "--format",
        "{{.Label \"io.clusterclaw.replica\"}} {{.Label \"io.clusterclaw.host\"}} {{.ID}}",
    ])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            Some((
                p.next()?.to_string(),
                p.next()?.to_string(),
                p.next()?.to_string(),
            ))
        })
        .collect())
}

/// Samples `docker ps` every `period` until dropped; remembers any moment where one replica had
/// two running containers.
pub struct DoubleSampler {
    stop: Arc<AtomicBool>,
    doubles: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DoubleSampler {
    pub fn start(tenant: &str, period: Duration) -> DoubleSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let doubles = Arc::new(Mutex::new(Vec::new()));
        let (s, d, tenant) = (stop.clone(), doubles.clone(), tenant.to_string());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Ok(list) = running_replicas(&tenant) {
                    let mut by_replica: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
                    for (replica, host, _) in &list {
                        by_replica.entry(replica).or_default().push(host);
                    }
                    for (replica, hosts) in by_replica {
                        if hosts.len() > 1 {
                            d.lock()
                                .unwrap()
                                .push(format!("{replica} running on {hosts:?}"));
                        }
                    }
                }
                std::thread::sleep(period);
            }
        });
        DoubleSampler {
            stop,
            doubles,
            thread: Some(thread),
        }
    }

    /// Stops sampling; fails when two copies of a replica were ever seen running.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let d = self.doubles.lock().unwrap().clone();
        anyhow::ensure!(d.is_empty(), "two running copies of a replica: {d:?}");
        Ok(())
    }
}

impl Drop for DoubleSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
