//! Runs the real `clusterclaw` binary as a control plane on a temporary data directory, and its
//! CLI against it.
//!
//! The binary is the one cargo builds next to the test executable (`target/<profile>/clusterclaw`);
//! it is built once per test process with `cargo build -p clusterclaw-server --bin clusterclaw`, so
//! that a test never runs a stale server. `CLUSTERCLAW_BIN` names another binary instead.
//!
//! Everything here is synchronous: call it from plain `#[test]` functions.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::Value;

/// How long a server may take to write `endpoints.json`.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variables of the CLI and server that a test must not inherit.
const CLEARED_ENV: [&str; 8] = [
    "CLUSTERCLAW_SERVER",
    "CLUSTERCLAW_TOKEN",
    "CLUSTERCLAW_CA_CERT",
    "CLUSTERCLAW_TENANT",
    "CLUSTERCLAW_PROJECT",
    "CLUSTERCLAW_CONFIG",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
];

/// What a started server writes to `<data-dir>/endpoints.json`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// `http://127.0.0.1:PORT`
    pub api: String,
    pub agent: String,
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    pub pid: u32,
}

/// Exit code and output of one CLI run.
#[derive(Clone, Debug)]
pub struct CliOutput {
    /// The exit code; -1 when killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Panics with both streams unless the command succeeded.
    #[track_caller]
    pub fn ok(self) -> CliOutput {
        assert_eq!(
            self.code, 0,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Panics with both streams unless the command exited with `code`.
    #[track_caller]
    pub fn code(self, code: i32) -> CliOutput {
        assert_eq!(
            self.code, code,
            "unexpected exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Standard output as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// An HTTP answer.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// The `clusterclaw` binary, built once per process.
pub fn clusterclaw_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_bin().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn build_bin() -> anyhow::Result<PathBuf> {
    workspace_bin("CLUSTERCLAW_BIN", "clusterclaw-server", "clusterclaw")
}

/// A binary of this workspace for the profile the running test or bench was built with:
/// `$env_override` when set, else `cargo build -p package --bin bin` into the same target
/// directory (cheap when it is up to date).
pub fn workspace_bin(env_override: &str, package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_override) {
        return Ok(PathBuf::from(path));
    }
    // <target>/<profile>/deps/<test executable>
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
        package,
        "--bin",
        bin,
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
    let status = cmd
        .status()
        .with_context(|| format!("run cargo build for {bin}"))?;
    if !status.success() {
        bail!("cargo build -p {package} --bin {bin} failed ({status})");
    }
    let path = profile_dir.join(bin);
    if !path.exists() {
        bail!("cargo built {bin}, but {} does not exist", path.display());
    }
    Ok(path)
}

/// A `clusterclaw server` process on its own data directory; killed on drop.
pub struct TestServer {
    bin: PathBuf,
    data_dir: tempfile::TempDir,
    scratch: tempfile::TempDir,
    extra_args: Vec<String>,
    /// Extra environment of the server process.
    env: Vec<(String, String)>,
    agent_listen: String,
    soft_nofile: Option<u64>,
    child: Option<Child>,
    endpoints: Endpoints,
    admin_token: String,
    runtime: tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl TestServer {
    /// Starts a server with the API and agent ports on ephemeral ports of 127.0.0.1.
    pub fn start() -> anyhow::Result<TestServer> {
        TestServer::start_with(&[])
    }

    /// Like [`TestServer::start`], with more `clusterclaw server` arguments.
    pub fn start_with(extra_args: &[&str]) -> anyhow::Result<TestServer> {
        TestServer::start_on("127.0.0.1:0", extra_args)
    }

    /// Like [`TestServer::start_with`], with the agent port on `agent_listen` (kept across
    /// [`TestServer::restart`], so that agents find the server again).
    pub fn start_on(agent_listen: &str, extra_args: &[&str]) -> anyhow::Result<TestServer> {
        TestServer::start_full(agent_listen, extra_args, &[], None)
    }

    /// [`TestServer::start_on`] for one more server of a shared store (PostgreSQL) that
    /// `first` serves: its data directory gets copies of the first's `admin.token` (a server
    /// writes the file only when it creates the token) and `secrets.key` (every server of a
    /// store must seal and open with the same key).
    pub fn start_joining(
        agent_listen: &str,
        extra_args: &[&str],
        first: &TestServer,
    ) -> anyhow::Result<TestServer> {
        let seed: (&Path, &[&str]) = (first.data_dir(), &["admin.token", "secrets.key"]);
        TestServer::start_inner(agent_listen, extra_args, &[], None, Some(seed))
    }

    /// [`TestServer::start_on`] on a data directory that holds copies of the files and
    /// directories `names` of `from` (another server's pki/, secrets.key, admin.token).
    pub fn start_seeded(
        agent_listen: &str,
        extra_args: &[&str],
        from: &Path,
        names: &[&str],
    ) -> anyhow::Result<TestServer> {
        let seed = (from, names);
        TestServer::start_inner(agent_listen, extra_args, &[], None, Some(seed))
    }

    /// [`TestServer::start_on`] with extra environment variables for the server process.
    pub fn start_with_env(
        agent_listen: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<TestServer> {
        TestServer::start_full(agent_listen, extra_args, env, None)
    }

    /// Like [`TestServer::start`], with the server's soft limit on open files set to
    /// `soft_nofile` when it starts (as a service manager's default would), through
    /// `sh -c 'ulimit -Sn N; exec clusterclaw ...'`.
    pub fn start_with_soft_nofile(soft_nofile: u64) -> anyhow::Result<TestServer> {
        TestServer::start_full("127.0.0.1:0", &[], &[], Some(soft_nofile))
    }

    fn start_full(
        agent_listen: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
        soft_nofile: Option<u64>,
    ) -> anyhow::Result<TestServer> {
        TestServer::start_inner(agent_listen, extra_args, env, soft_nofile, None)
    }

    fn start_inner(
        agent_listen: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
        soft_nofile: Option<u64>,
        seed: Option<(&Path, &[&str])>,
    ) -> anyhow::Result<TestServer> {
        clusterclaw_agent::crypto::install_provider();
        let bin = clusterclaw_bin()?;
        let data_dir = tempfile::Builder::new()
            .prefix("clusterclaw-data-")
            .tempdir()?;
        let scratch = tempfile::Builder::new()
            .prefix("clusterclaw-work-")
            .tempdir()?;
        if let Some((from, names)) = seed {
            for name in names {
                copy_tree(&from.join(name), &data_dir.path().join(name))
                    .with_context(|| format!("copy {name} from {}", from.display()))?;
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Idle pooled connections are dropped well before the server closes idle keep-alive
        // connections (it waits 10 s for the next request's headers), so a request is never
        // sent on a connection the server is closing.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_idle_timeout(Duration::from_secs(4))
            .build()?;
        let mut server = TestServer {
            bin,
            data_dir,
            scratch,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            agent_listen: agent_listen.to_string(),
            soft_nofile,
            child: None,
            endpoints: Endpoints {
                api: String::new(),
                agent: String::new(),
                ca_cert: None,
                pid: 0,
            },
            admin_token: String::new(),
            runtime,
            http,
        };
        server.spawn()?;
        Ok(server)
    }

    fn log_path(&self) -> PathBuf {
        self.scratch.path().join("server.log")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let endpoints_file = self.data_dir.path().join("endpoints.json");
        let _ = fs::remove_file(&endpoints_file);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = match self.soft_nofile {
            None => Command::new(&self.bin),
            Some(n) => {
                // `exec` keeps the process id, so the server is still this child.
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -Sn {n} && exec \"$0\" \"$@\""))
                    .arg(&self.bin);
                sh
            }
        };
        cmd.arg("server")
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .args(["--api-listen", "127.0.0.1:0", "--agent-listen"])
            .arg(&self.agent_listen)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for var in CLEARED_ENV {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {}", self.bin.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let endpoints = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "clusterclaw server exited during start-up ({status}); its log:\n{}",
                    self.log()
                );
            }
            if let Ok(text) = fs::read_to_string(&endpoints_file)
                && let Ok(e) = serde_json::from_str::<Endpoints>(&text)
                && e.pid == child.id()
            {
                break e;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "clusterclaw server wrote no endpoints.json within {START_TIMEOUT:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        let token_file = self.data_dir.path().join("admin.token");
        self.admin_token = fs::read_to_string(&token_file)
            .with_context(|| format!("read {}", token_file.display()))?
            .trim()
            .to_string();
        self.endpoints = endpoints;
        self.child = Some(child);
        Ok(())
    }

    /// `http://127.0.0.1:PORT` of the REST API.
    pub fn api_url(&self) -> &str {
        &self.endpoints.api
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// A directory for manifests and CLI config files of this test.
    pub fn scratch_dir(&self) -> &Path {
        self.scratch.path()
    }

    /// What the server wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Writes a file under the scratch directory (creating parents) and returns its path.
    pub fn write_file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.scratch.path().join(name);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).expect("create the scratch subdirectory");
        }
        fs::write(&path, content).expect("write the scratch file");
        path
    }

    /// Runs the CLI as the admin of this server (server and token from the environment, and an
    /// empty CLI config file).
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.cli_with(
            args,
            &[
                ("CLUSTERCLAW_SERVER", self.api_url()),
                ("CLUSTERCLAW_TOKEN", self.admin_token()),
            ],
            None,
        )
    }

    /// Runs the CLI with exactly the given `CLUSTERCLAW_*` variables (nothing inherited; the CLI
    /// config file is `<scratch>/cli-config.toml` unless `CLUSTERCLAW_CONFIG` is given) and
    /// optional standard input.
    pub fn cli_with(&self, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> CliOutput {
        run_cli(&self.bin, self.scratch.path(), args, env, stdin)
    }

    /// `clusterclaw secret set NAME -t TENANT -p PROJECT --from-file KEY=FILE` as the admin,
    /// the value written to a scratch file first (a tenant's secret when `project` is empty);
    /// panics unless it succeeds.
    #[track_caller]
    pub fn set_secret(&self, tenant: &str, project: &str, name: &str, key: &str, value: &str) {
        let file = self.write_file(&format!("secret-{name}-{key}"), &format!("{value}\n"));
        self.cli(&[
            "secret",
            "set",
            name,
            "-t",
            tenant,
            "-p",
            project,
            "--from-file",
            &format!("{key}={}", file.display()),
        ])
        .ok();
    }

    /// Runs the CLI as the admin (as [`TestServer::cli`]) but gives up after `timeout`: the
    /// process is killed and `None` returned (for commands that wait, such as
    /// `rollout status -w`).
    pub fn cli_within(&self, args: &[&str], timeout: Duration) -> Option<CliOutput> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).current_dir(self.scratch.path());
        for var in CLEARED_ENV {
            cmd.env_remove(var);
        }
        cmd.env(
            "CLUSTERCLAW_CONFIG",
            self.scratch.path().join("cli-config.toml"),
        )
        .env("CLUSTERCLAW_SERVER", self.api_url())
        .env("CLUSTERCLAW_TOKEN", self.admin_token())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.bin.display()));
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        match status {
            Some(status) => Some(CliOutput {
                code: status.code().unwrap_or(-1),
                stdout,
                stderr,
            }),
            None => {
                eprintln!(
                    "`clusterclaw {}` still ran after {timeout:?}; killed\nstdout:\n{stdout}\nstderr:\n{stderr}",
                    args.join(" ")
                );
                None
            }
        }
    }

    /// Sends an HTTP request to the API; `token` is sent as a bearer token.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> HttpResponse {
        self.try_http(method, path, body, token)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`TestServer::http`] that answers an error instead of panicking when the request
    /// cannot be sent or its answer read (the server is down).
    pub fn try_http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> anyhow::Result<HttpResponse> {
        self.runtime.block_on(send(
            &self.http,
            &format!("{}{path}", self.api_url()),
            method,
            body,
            token,
        ))
    }
}

/// Sends one HTTP request with `client`: `token` as a bearer token, a body starting with `{`
/// or `[` as JSON, any other as YAML.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    method: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> anyhow::Result<HttpResponse> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).context("an HTTP method")?;
    let mut req = client.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        let ctype = if b.trim_start().starts_with(['{', '[']) {
            "application/json"
        } else {
            "application/yaml"
        };
        req = req.header("Content-Type", ctype).body(b.to_string());
    }
    let resp = req.send().await.with_context(|| url.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp.text().await.with_context(|| url.to_string())?;
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

impl TestServer {
    /// GET as the admin, expecting 200 and JSON.
    #[track_caller]
    pub fn get_json(&self, path: &str) -> Value {
        let resp = self.http("GET", path, None, Some(&self.admin_token));
        assert_eq!(resp.status, 200, "GET {path}: {}", resp.body);
        resp.json()
    }

    /// The store index, from `GET /api/v1/info`.
    #[track_caller]
    pub fn index(&self) -> u64 {
        let info = self.get_json("/api/v1/info");
        info["index"]
            .as_u64()
            .unwrap_or_else(|| panic!("no index in /api/v1/info: {info}"))
    }

    /// Waits until the store index stops moving (controllers write status after a change), so
    /// that a test can then assert that something did not move it. Returns the settled index.
    #[track_caller]
    pub fn settled_index(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = self.index();
        let mut quiet_since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.index();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(400) {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "the store index kept moving for 20s (at {now})"
            );
        }
    }

    /// The process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("the server is not running")
        };
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "clusterclaw server did not exit within {STOP_TIMEOUT:?} of SIGTERM; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL (`kill -9`) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data directory (stopping it first if it runs).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.terminate()?;
        }
        self.spawn()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copies a file, or a directory and everything in it, keeping permissions.
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    if fs::metadata(from)?.is_dir() {
        fs::create_dir_all(to)?;
        fs::set_permissions(to, fs::metadata(from)?.permissions())?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        fs::copy(from, to).map(drop)
    }
}

/// Runs `clusterclaw` with a clean environment: only `env` of the CLI's own variables, and a
/// CLI config file under `work_dir` unless `CLUSTERCLAW_CONFIG` is given.
pub fn run_cli(
    bin: &Path,
    work_dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&str>,
) -> CliOutput {
    let mut cmd = Command::new(bin);
    cmd.args(args).current_dir(work_dir);
    for var in CLEARED_ENV {
        cmd.env_remove(var);
    }
    cmd.env("CLUSTERCLAW_CONFIG", work_dir.join("cli-config.toml"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let input = input.to_string();
        // Write from a thread so that a large input cannot deadlock against a full stdout pipe.
        std::thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        });
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {}: {e}", bin.display()));
    CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Each control loop's passes so far, by loop: (count, seconds in all).
pub type LoopPasses = BTreeMap<String, (u64, f64)>;

impl TestServer {
    /// Each control loop's passes so far, from `clusterclaw_control_loop_pass_seconds` on the
    /// server's `/metrics`.
    pub fn loop_passes(&self) -> LoopPasses {
        self.histograms("clusterclaw_control_loop_pass_seconds")
            .into_iter()
            .map(|(labels, h)| {
                let name = labels
                    .trim_start_matches("loop=\"")
                    .trim_end_matches('"')
                    .to_string();
                (name, (h.count, h.sum))
            })
            .collect()
    }
}

/// A histogram of the server's `/metrics`, by its labels: cumulative bucket counts (upper
/// bound, count), the sum and the count.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// What was observed after `before` (an earlier reading of the same histogram).
    pub fn since(&self, before: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| {
                    let b = before
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map_or(0, |(_, n)| *n);
                    (*le, n.saturating_sub(b))
                })
                .collect(),
            sum: self.sum - before.sum,
            count: self.count.saturating_sub(before.count),
        }
    }

    /// The upper bound of the bucket the `q` quantile falls in.
    pub fn quantile_bound(&self, q: f64) -> f64 {
        let want = (self.count as f64 * q).ceil() as u64;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= want)
            .map_or(f64::INFINITY, |(le, _)| *le)
    }

    /// "N x mean M ms, p50 ≤ A ms, p90 ≤ B ms, p99 ≤ C ms".
    pub fn summary(&self) -> String {
        let mean = if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64 * 1000.0
        };
        format!(
            "{} x mean {mean:.1} ms, p50 ≤ {} ms, p90 ≤ {} ms, p99 ≤ {} ms",
            self.count,
            self.quantile_bound(0.5) * 1000.0,
            self.quantile_bound(0.9) * 1000.0,
            self.quantile_bound(0.99) * 1000.0
        )
    }
}

impl TestServer {
    /// The histogram `name` on `/metrics`, by its labels as written there (`a="b"`).
    pub fn histograms(&self, name: &str) -> BTreeMap<String, Histogram> {
        let r = self.http("GET", "/metrics", None, Some(self.admin_token()));
        let mut out: BTreeMap<String, Histogram> = BTreeMap::new();
        for line in r.body.lines() {
            let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('_')) else {
                continue;
            };
            let Some((series, value)) = rest.rsplit_once(' ') else {
                continue;
            };
            let (what, labels) = series.split_once('{').unwrap_or((series, "}"));
            let labels = labels.trim_end_matches('}');
            let value: f64 = value.parse().unwrap_or(0.0);
            match what {
                "bucket" => {
                    let (le, rest) = match labels.rsplit_once("le=\"") {
                        Some((rest, le)) => (le.trim_end_matches('"'), rest),
                        None => continue,
                    };
                    let le: f64 = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or(f64::INFINITY)
                    };
                    let key = rest.trim_end_matches(',').to_string();
                    out.entry(key).or_default().buckets.push((le, value as u64));
                }
                "sum" => out.entry(labels.to_string()).or_default().sum = value,
                "count" => out.entry(labels.to_string()).or_default().count = value as u64,
                _ => {}
            }
        }
        out
    }
}

/// What the control loops did between two [`TestServer::loop_passes`] readings, as
/// "name N x M ms" (passes and mean time of one), one loop after another.
pub fn loop_passes_between(before: &LoopPasses, after: &LoopPasses) -> String {
    let parts: Vec<String> = after
        .iter()
        .map(|(name, (n, secs))| {
            let (n0, s0) = before.get(name).copied().unwrap_or_default();
            let passes = n.saturating_sub(n0);
            let mean_ms = if passes == 0 {
                0.0
            } else {
                (secs - s0) / passes as f64 * 1000.0
            };
            format!("{name} {passes} x {mean_ms:.1} ms")
        })
        .collect();
    parts.join(", ")
}
