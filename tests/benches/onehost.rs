//! One host against the tools people use today: 10 Gateways (the stand-in image) from nothing to
//! every `/readyz` answering, on this machine's Docker, three ways in alternating rounds:
//!
//! - **docker run**: 10 plain `docker run -d --name N --label L -p 127.0.0.1:PORT:18789 IMAGE`
//!   started at once (no limits, no hardening, the default bridge network), as a user would;
//! - **compose**: `docker-compose -p P -f F up -d` of a file with 10 services, each the image
//!   with `ports: ["127.0.0.1:PORT:18789"]` (compose makes the project's network first);
//! - **clusterclaw**: `clusterclaw apply -f` of one instance with `replicas: 10` against a real
//!   release server, with a real release agent (default settings, mutual TLS) on the same
//!   engine, which runs each replica hardened (uid 1000, all capabilities dropped,
//!   no-new-privileges, read-only root with a tmpfs `/tmp`, CPU/memory/pids limits, an init
//!   process, its own named state volume, the tenant's bridge network made for it); after
//!   every round the bench checks those settings on each of the 10 containers.
//!
//! Every way is timed from the moment its command is started to the moment the bench's own
//! HTTP probe (every [`POLL`] on each published port) has seen `"ready": true` from all 10. The
//! ports of the clusterclaw replicas are found through the engine's API (`/containers/json`
//! over its socket, every [`POLL`]) as the agent publishes them. Everything made is removed
//! between rounds (not timed), and every wait is bounded: a command that outlasts
//! [`COMMAND_TIMEOUT`] is killed, a round that outlasts [`ROUND_TIMEOUT`] fails the bench, and
//! the engine's objects (named with a unique prefix and labelled) are removed on the way out.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench onehost` (rounds:
//! `CLUSTERCLAW_BENCH_ONEHOST_ROUNDS`, default 3; one warm-up round of each way comes first;
//! `CLUSTERCLAW_BENCH_ONEHOST_AGENT_LOG=FILE` keeps the agent's log there).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;
use serde_json::Value;

/// Gateways started by each way.
const GATEWAYS: usize = 10;
/// Measured rounds when `CLUSTERCLAW_BENCH_ONEHOST_ROUNDS` is not set.
const DEFAULT_ROUNDS: usize = 3;
/// How often each port is probed (and the engine asked for new clusterclaw containers).
const POLL: Duration = Duration::from_millis(15);
/// How long one probe (connect, send, read) may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// The longest any one command of the bench (`docker`, `docker-compose`, `clusterclaw`) may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
/// The longest a round may take until every Gateway is ready.
const ROUND_TIMEOUT: Duration = Duration::from_secs(90);
/// The longest the clean-up after a round may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(90);
/// The Gateway's port inside its container.
const GATEWAY_PORT: u64 = 18789;
/// The engine's socket (the bench asks it for the ports the agent published).
const DOCKER_SOCKET: &str = "/var/run/docker.sock";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Way {
    DockerRun,
    Compose,
    Clusterclaw,
}

impl Way {
    const ALL: [Way; 3] = [Way::DockerRun, Way::Compose, Way::Clusterclaw];

    fn label(self) -> &'static str {
        match self {
            Way::DockerRun => "10 x docker run (parallel)",
            Way::Compose => "docker-compose up -d, 10 services",
            Way::Clusterclaw => "clusterclaw apply, 10 replicas",
        }
    }
}

/// A command, killed when it outlasts `timeout`; its output when it succeeded.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {what}"))?;
    let mut stdout = child.stdout.take().context("stdout is piped")?;
    let mut stderr = child.stderr.take().context("stderr is piped")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    match status {
        None => bail!("{what} still ran after {timeout:?}; killed\n{out}{err}"),
        Some(s) if !s.success() => bail!("{what} failed ({s}):\n{out}{err}"),
        Some(_) => Ok(out),
    }
}

/// Whether `/readyz` on 127.0.0.1:`port` answers `"ready": true` (within [`PROBE_TIMEOUT`]).
fn ready(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else {
        return false;
    };
    if s.set_read_timeout(Some(PROBE_TIMEOUT)).is_err()
        || s.set_write_timeout(Some(PROBE_TIMEOUT)).is_err()
        || s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .is_err()
    {
        return false;
    }
    let mut raw = Vec::new();
    if s.read_to_end(&mut raw).is_err() {
        return false;
    }
    clusterclaw_agent::probe::parse_response(&raw)
        .ok()
        .filter(|(status, _)| *status == 200)
        .and_then(|(_, body)| serde_json::from_slice::<Value>(&body).ok())
        .is_some_and(|v| v["ready"] == true)
}

/// `GET path` on the engine's API over its socket; the JSON body.
fn engine_get(path: &str) -> anyhow::Result<Value> {
    let mut s = UnixStream::connect(DOCKER_SOCKET).context("connect to the engine's socket")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let (status, body) =
        clusterclaw_agent::probe::parse_response(&raw).map_err(anyhow::Error::msg)?;
    ensure!(
        status == 200,
        "engine GET {path}: HTTP {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(serde_json::from_slice(&body)?)
}

/// `text` percent-encoded for a query string.
fn url_encode(text: &str) -> String {
    let mut encoded = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    encoded
}

/// Host ports publishing the Gateway port of the containers carrying every label of `labels`.
fn published_ports(labels: &[String]) -> anyhow::Result<Vec<u16>> {
    let filters = serde_json::json!({ "label": labels }).to_string();
    let list = engine_get(&format!(
        "/containers/json?filters={}",
        url_encode(&filters)
    ))?;
    let mut ports = Vec::new();
    for c in list.as_array().into_iter().flatten() {
        for p in c["Ports"].as_array().into_iter().flatten() {
            if p["PrivatePort"].as_u64() == Some(GATEWAY_PORT)
                && let Some(public) = p["PublicPort"].as_u64().and_then(|p| u16::try_from(p).ok())
                && !ports.contains(&public)
            {
                ports.push(public);
            }
        }
    }
    Ok(ports)
}

/// Fails unless every container carrying the labels runs with the hardened settings the
/// comparison is about (so that a faster figure can never come from dropping them).
fn check_hardened(labels: &[String]) -> anyhow::Result<usize> {
    let filters = serde_json::json!({ "label": labels }).to_string();
    let list = engine_get(&format!(
        "/containers/json?filters={}",
        url_encode(&filters)
    ))?;
    let mut checked = 0;
    for c in list.as_array().into_iter().flatten() {
        let id = c["Id"].as_str().context("a container without an id")?;
        let v = engine_get(&format!("/containers/{id}/json"))?;
        let host = &v["HostConfig"];
        let security = host["SecurityOpt"].to_string();
        ensure!(
            host["ReadonlyRootfs"] == true
                && host["CapDrop"].to_string().contains("ALL")
                && security.contains("no-new-privileges")
                && host["Memory"].as_i64().unwrap_or(0) > 0
                && host["NanoCpus"].as_i64().unwrap_or(0) > 0
                && host["PidsLimit"].as_i64().unwrap_or(0) > 0
                && host["Init"] == true
                && v["Config"]["User"] == "1000:1000",
            "container {id} does not run hardened: {host}"
        );
        checked += 1;
    }
    Ok(checked)
}

/// Probes every port `ports` names (asked again every [`POLL`] until it names [`GATEWAYS`]
/// ports) until each answered ready once; the time from `started` to the last of them.
/// `still_fine` fails when the command that starts them failed.
fn wait_all_ready(
    started: Instant,
    mut ports: impl FnMut() -> anyhow::Result<Vec<u16>>,
    mut still_fine: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let deadline = started + ROUND_TIMEOUT;
    let mut known: BTreeMap<u16, Option<Duration>> = BTreeMap::new();
    loop {
        let round = Instant::now();
        if known.len() < GATEWAYS {
            for p in ports()? {
                known.entry(p).or_insert(None);
            }
        }
        for (port, seen) in known.iter_mut() {
            if seen.is_none() && ready(*port) {
                *seen = Some(started.elapsed());
            }
        }
        if known.len() >= GATEWAYS && known.values().all(Option::is_some) {
            return Ok(known.values().flatten().copied().max().unwrap_or_default());
        }
        still_fine()?;
        if Instant::now() > deadline {
            bail!(
                "not every Gateway answered ready within {ROUND_TIMEOUT:?}: {} ports known, ready: {:?}",
                known.len(),
                known
            );
        }
        std::thread::sleep(POLL.saturating_sub(round.elapsed()));
    }
}

/// Waits, within [`CLEANUP_TIMEOUT`], until `gone` says so.
fn wait_gone(what: &str, mut gone: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    loop {
        if gone()? {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what} still there after {CLEANUP_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the engine lists of `kind` (`ps -a`, `volume ls`, `network ls`) for a label filter.
fn listed(kind: &[&str], filter: &str) -> anyhow::Result<Vec<String>> {
    let mut cmd = Command::new("docker");
    cmd.args(kind).args(["-q", "--filter", filter]);
    Ok(run_bounded(&mut cmd, COMMAND_TIMEOUT)?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// Removes the containers, volumes and networks labelled `filter` (bounded).
fn remove_labelled(filter: &str) -> anyhow::Result<()> {
    for (kind, remove) in [
        (&["ps", "-a"][..], &["rm", "-f", "-v"][..]),
        (&["volume", "ls"][..], &["volume", "rm", "-f"][..]),
        (&["network", "ls"][..], &["network", "rm"][..]),
    ] {
        // A network may still count an endpoint of a container removed a moment ago.
        let mut attempt = 0;
        loop {
            let ids = listed(kind, filter)?;
            if ids.is_empty() {
                break;
            }
            match run_bounded(
                Command::new("docker").args(remove).args(&ids),
                COMMAND_TIMEOUT,
            ) {
                Ok(_) => break,
                Err(err) if attempt >= 10 => return Err(err),
                Err(_) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    Ok(())
}

/// 10 plain `docker run` at once.
fn docker_run(image: &str, tag: &str) -> anyhow::Result<Duration> {
    let ports: Vec<u16> = (0..GATEWAYS).map(|_| free_port()).collect();
    let label = format!("io.clusterclaw.test={tag}");
    let started = Instant::now();
    let runs: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let mut cmd = Command::new("docker");
            cmd.args(["run", "-d", "--name", &format!("{tag}-{i}"), "--label"])
                .arg(&label)
                .arg("-p")
                .arg(format!("127.0.0.1:{port}:18789"))
                .arg(image);
            std::thread::spawn(move || run_bounded(&mut cmd, COMMAND_TIMEOUT).map(drop))
        })
        .collect();
    let mut runs: Vec<_> = runs.into_iter().map(Some).collect();
    let took = wait_all_ready(
        started,
        || Ok(ports.clone()),
        || {
            for run in runs.iter_mut() {
                if run.as_ref().is_some_and(|r| r.is_finished())
                    && let Some(r) = run.take()
                {
                    r.join()
                        .map_err(|_| anyhow::anyhow!("a docker run thread panicked"))??;
                }
            }
            Ok(())
        },
    );
    for r in runs.into_iter().flatten() {
        // Bounded by the command's own timeout.
        let _ = r.join();
    }
    took
}

/// A compose file of 10 services, each the image with a published port.
fn compose_file(image: &str, tag: &str) -> String {
    let mut file = String::from("version: \"2.4\"\nservices:\n");
    for i in 0..GATEWAYS {
        file.push_str(&format!(
            "  gw{i}:\n    image: {image}\n    ports:\n      - \"127.0.0.1:{}:18789\"\n    labels:\n      io.clusterclaw.test: {tag}\n",
            free_port()
        ));
    }
    file.push_str(&format!(
        "networks:\n  default:\n    labels:\n      io.clusterclaw.test: {tag}\n"
    ));
    file
}

fn compose_ports(file: &str) -> Vec<u16> {
    file.lines()
        .filter_map(|l| l.trim().strip_prefix("- \"127.0.0.1:"))
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect()
}

/// The compose command line: `docker-compose`, or `docker compose` when only that exists.
fn compose_cli() -> anyhow::Result<Vec<String>> {
    for cli in [vec!["docker-compose"], vec!["docker", "compose"]] {
        let mut cmd = Command::new(cli[0]);
        cmd.args(&cli[1..]).arg("version");
        if run_bounded(&mut cmd, COMMAND_TIMEOUT).is_ok() {
            return Ok(cli.into_iter().map(str::to_owned).collect());
        }
    }
    bail!("neither `docker-compose` nor `docker compose` runs: install Debian's docker-compose")
}

fn compose_command(cli: &[String], project: &str, file: &Path) -> Command {
    let mut cmd = Command::new(&cli[0]);
    cmd.args(&cli[1..]).args(["-p", project, "-f"]).arg(file);
    cmd
}

/// `docker-compose up -d` of 10 services.
fn compose_up(cli: &[String], image: &str, tag: &str, dir: &Path) -> anyhow::Result<Duration> {
    let file = compose_file(image, tag);
    let ports = compose_ports(&file);
    ensure!(ports.len() == GATEWAYS, "the compose file's ports");
    let path = dir.join(format!("{tag}.yml"));
    std::fs::write(&path, &file).with_context(|| format!("write {}", path.display()))?;
    let started = Instant::now();
    let mut cmd = compose_command(cli, tag, &path);
    cmd.args(["up", "-d"]);
    let up = std::thread::spawn(move || run_bounded(&mut cmd, COMMAND_TIMEOUT).map(drop));
    let mut up = Some(up);
    let took = wait_all_ready(
        started,
        || Ok(ports.clone()),
        || {
            if up.as_ref().is_some_and(|u| u.is_finished())
                && let Some(u) = up.take()
            {
                u.join()
                    .map_err(|_| anyhow::anyhow!("the compose thread panicked"))??;
            }
            Ok(())
        },
    );
    if let Some(u) = up {
        let _ = u.join();
    }
    took
}

fn compose_down(cli: &[String], tag: &str, dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(format!("{tag}.yml"));
    let mut cmd = compose_command(cli, tag, &path);
    cmd.args(["down", "-v", "-t", "1"]);
    if let Err(err) = run_bounded(&mut cmd, COMMAND_TIMEOUT) {
        eprintln!("compose down failed; removing by label: {err:#}");
    }
    remove_labelled(&format!("label=io.clusterclaw.test={tag}"))
}

/// The clusterclaw way: one instance of 10 replicas, applied with the CLI.
struct Cluster {
    server: TestServer,
    /// Runs for as long as the cluster is used.
    agent: TestAgent,
    scope: Scope,
    image: String,
}

/// Where the time of one clusterclaw round went, from the agent's log (milliseconds after the
/// apply was started): the assignments on the host, the first and the last container started.
#[derive(Debug, Default)]
struct Timeline {
    assigned: Option<f64>,
    first_started: Option<f64>,
    last_started: Option<f64>,
}

impl Cluster {
    fn timeline(&self, since: SystemTime, name: &str) -> Timeline {
        let log = self.agent.log();
        let after = |t: SystemTime| {
            t.duration_since(since)
                .ok()
                .map(|d| d.as_secs_f64() * 1000.0)
        };
        let started: Vec<f64> = log_events(&log, "replica container started")
            .into_iter()
            .filter(|(_, f)| {
                f["replica"]
                    .as_str()
                    .is_some_and(|r| r.contains(&format!("/{name}-")))
            })
            .filter_map(|(t, _)| after(t))
            .collect();
        Timeline {
            assigned: log_events(&log, "new assignments")
                .into_iter()
                .filter_map(|(t, _)| after(t))
                .reduce(f64::min),
            first_started: started.iter().copied().reduce(f64::min),
            last_started: started.iter().copied().reduce(f64::max),
        }
    }

    fn apply(&self, name: &str) -> anyhow::Result<Duration> {
        let manifest =
            self.scope
                .instance_manifest(name, &self.image, GATEWAYS as u32, &BTreeMap::new());
        let path = self
            .server
            .write_file(&format!("{}-{name}.yaml", self.scope.tenant), &manifest);
        let path = path.to_str().context("a UTF-8 path")?.to_owned();
        let labels = vec![
            format!("io.clusterclaw.tenant={}", self.scope.tenant),
            format!("io.clusterclaw.instance={name}"),
        ];
        std::thread::scope(|s| {
            let started = Instant::now();
            let wall = SystemTime::now();
            let apply = s.spawn(|| {
                self.server
                    .cli_within(&["apply", "-f", &path], COMMAND_TIMEOUT)
            });
            let mut apply = Some(apply);
            let took = wait_all_ready(
                started,
                || published_ports(&labels),
                || {
                    if apply.as_ref().is_some_and(|a| a.is_finished())
                        && let Some(a) = apply.take()
                    {
                        let out = a
                            .join()
                            .map_err(|_| anyhow::anyhow!("the apply thread panicked"))?
                            .context("`clusterclaw apply` did not finish in time")?;
                        ensure!(
                            out.code == 0,
                            "`clusterclaw apply` failed ({}):\n{}{}",
                            out.code,
                            out.stdout,
                            out.stderr
                        );
                    }
                    Ok(())
                },
            );
            if let Some(a) = apply {
                let _ = a.join();
            }
            let took = took.and_then(|took| {
                let hardened = check_hardened(&labels)?;
                ensure!(
                    hardened == GATEWAYS,
                    "{hardened} hardened containers checked, not {GATEWAYS}"
                );
                Ok(took)
            });
            if took.is_ok() {
                let t = self.timeline(wall, name);
                let f = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.0}"));
                println!(
                    "        clusterclaw: assignments on the host after {} ms, containers started {}..{} ms",
                    f(t.assigned),
                    f(t.first_started),
                    f(t.last_started)
                );
            }
            took
        })
    }

    /// Deletes the instance and waits until its containers and the tenant's network are gone.
    fn delete(&self, name: &str) -> anyhow::Result<()> {
        let r = self.server.try_http(
            "DELETE",
            &self.scope.instance_path(name),
            None,
            Some(self.server.admin_token()),
        )?;
        ensure!(
            r.status == 200,
            "delete {name}: HTTP {}: {}",
            r.status,
            r.body
        );
        let tenant = format!("label=io.clusterclaw.tenant={}", self.scope.tenant);
        let instance = format!("label=io.clusterclaw.instance={name}");
        wait_gone("the instance's containers", || {
            let mut cmd = Command::new("docker");
            cmd.args(["ps", "-aq", "--filter", &tenant, "--filter", &instance]);
            Ok(run_bounded(&mut cmd, COMMAND_TIMEOUT)?.trim().is_empty())
        })?;
        wait_gone("the tenant's network", || {
            Ok(listed(&["network", "ls"], &tenant)?.is_empty())
        })
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let rounds =
        match std::env::var("CLUSTERCLAW_BENCH_ONEHOST_ROUNDS") {
            Ok(v) => v.parse::<usize>().ok().filter(|n| *n > 0).context(
                "CLUSTERCLAW_BENCH_ONEHOST_ROUNDS: a whole number of rounds, at least 1",
            )?,
            Err(_) => DEFAULT_ROUNDS,
        };
    let Some(image) = require_docker()? else {
        bail!("no Docker engine: the one-host benchmark needs one");
    };
    let compose = compose_cli()?;
    // Built (if needed) before anything is started or timed.
    agent_bin()?;
    let run_tag = unique("onehost");
    let scratch = tempfile::Builder::new().prefix("onehost-").tempdir()?;
    let scope = Scope::new("onehost");
    // Everything the bench makes carries one of these labels and goes on the way out.
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    cleanup.add(&format!("io.clusterclaw.test={run_tag}"));
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let mut agent =
        TestAgent::enroll_with_defaults(&server, port, &token, &["--name", &unique("onehost")])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;
    scope.apply(&server, "base", &scope.base_manifest());
    let cluster = Cluster {
        server,
        agent,
        scope,
        image: image.clone(),
    };

    println!(
        "one host, {GATEWAYS} Gateways ({image}) from nothing to every /readyz ready; probe every {POLL:?}; {} cores; load average at start {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        load_average()
    );
    let mut measured: BTreeMap<Way, Vec<Duration>> = BTreeMap::new();
    // Round 0 warms the engine, the image and both binaries up; it is not counted.
    for round in 0..=rounds {
        let mut order = Way::ALL;
        order.rotate_left(round % Way::ALL.len());
        for way in order {
            // Labels and names stay under the run's tag, so that the guard finds them.
            let tag = format!("{run_tag}-r{round}-{}", way as u8);
            let took = match way {
                Way::DockerRun => {
                    let took = docker_run(&image, &tag);
                    remove_labelled(&format!("label=io.clusterclaw.test={tag}"))?;
                    took?
                }
                Way::Compose => {
                    let took = compose_up(&compose, &image, &tag, scratch.path());
                    compose_down(&compose, &tag, scratch.path())?;
                    took?
                }
                Way::Clusterclaw => {
                    let name = format!("gw-{round}");
                    let took = cluster.apply(&name);
                    cluster.delete(&name)?;
                    took?
                }
            };
            println!(
                "round {round}{}  {:<36} {:>6.0} ms   (load {})",
                if round == 0 { " (warm-up)" } else { "" },
                way.label(),
                took.as_secs_f64() * 1000.0,
                load_average()
            );
            if round > 0 {
                measured.entry(way).or_default().push(took);
            }
        }
    }

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let floor = median(&measured[&Way::DockerRun]);
    println!(
        "medians of {rounds} alternating rounds (load average at the end {}):",
        load_average()
    );
    for way in Way::ALL {
        let runs = &measured[&way];
        let m = median(runs);
        println!(
            "  {:<36} median {:>6.0} ms  {:.2}x the docker run floor   (runs {:?})",
            way.label(),
            ms(m),
            m.as_secs_f64() / floor.as_secs_f64(),
            runs.iter().map(|d| ms(*d).round()).collect::<Vec<_>>()
        );
    }
    let ours = median(&measured[&Way::Clusterclaw]);
    let compose_median = median(&measured[&Way::Compose]);
    println!(
        "clusterclaw / docker run {:.2}x (target <= 1.2x); clusterclaw / compose {:.2}x (target < 1x)",
        ours.as_secs_f64() / floor.as_secs_f64(),
        ours.as_secs_f64() / compose_median.as_secs_f64()
    );
    if let Some(path) = std::env::var_os("CLUSTERCLAW_BENCH_ONEHOST_AGENT_LOG") {
        std::fs::write(&path, cluster.agent.log())
            .with_context(|| format!("write the agent's log to {}", Path::new(&path).display()))?;
    }
    drop(cluster);
    drop(cleanup);
    Ok(())
}
