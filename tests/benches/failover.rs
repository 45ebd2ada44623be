//! Failover figures, end to end with the real release binaries, mutual TLS, real Docker and the
//! stand-in Gateway image: a server with a heartbeat timeout of [`TTL`] and two agents, each
//! reaching it through its own cuttable TCP proxy; one instance of two replicas (one per host)
//! with `failover: {policy: Reschedule, after: AFTER, stopAfter: STOP_AFTER}`. The proxy of one
//! host is cut, and the bench measures, per run:
//!
//! - **detection**: cut -> the host reads `NotReady` through the API (target: within the
//!   heartbeat timeout + 1 s);
//! - **replacement**: cut -> the moved replica reads `Ready` on the other host. The control
//!   plane waits the heartbeat timeout and then `after` by design, so the figure compared with
//!   the target is what comes on top of those two: the replacement's overhead (target: within
//!   the image's own start time + 2 s, that start time measured in the same run as a plain
//!   `docker run` of the image until its first passing `/readyz`).
//!
//! Where the overhead goes is printed from the server's and the new host's own clocks (one
//! machine, one clock): `notReadySince` -> the new placement reaching the other agent ("new
//! assignments" in its log) -> its container started -> its first passing readiness probe
//! ("replica ready") -> Ready seen through the API.
//!
//! Fencing is checked on the way: a sampler lists the runs' containers every 200 ms and the run
//! fails if one replica is ever seen running twice.
//!
//! `CLUSTERCLAW_BENCH_FAILOVER_RUNS` (default 5) sets the number of runs, each on a fresh
//! cluster. Run with `cargo bench -p clusterclaw-tests --bench failover`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clusterclaw_tests::agent::*;
use clusterclaw_tests::proxy::TcpProxy;
use clusterclaw_tests::server::TestServer;
use serde_json::Value;

/// The server's heartbeat timeout.
const TTL: Duration = Duration::from_secs(5);
/// `failover.after`.
const AFTER: Duration = Duration::from_secs(10);
/// `failover.stopAfter`.
const STOP_AFTER: Duration = Duration::from_secs(5);
/// How often the bench reads the API while it waits for a change.
const POLL: Duration = Duration::from_millis(20);

/// The figures of one run.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// cut -> host NotReady through the API.
    detection: Duration,
    /// cut -> the moved replica Ready on the other host through the API.
    replacement: Duration,
    /// Plain `docker run` of the image -> its first passing `/readyz`.
    image_start: Duration,
    /// notReadySince -> the other agent has the new placement.
    to_assignment: Duration,
    /// ... -> its container started.
    to_started: Duration,
    /// ... -> the agent's first passing readiness probe of it.
    to_agent_ready: Duration,
    /// ... -> Ready seen through the API.
    to_ready: Duration,
}

impl Run {
    /// What the replacement takes on top of the heartbeat timeout and `after`.
    fn overhead(&self) -> Duration {
        self.replacement.saturating_sub(TTL + AFTER)
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn one_run(image: &str, run: usize) -> anyhow::Result<Run> {
    let scope = Scope::new(&format!("bench-fo{run}"));
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let timeout = format!("{}s", TTL.as_secs());
    let server = TestServer::start_on(
        &format!("127.0.0.1:{port}"),
        &["--heartbeat-timeout", &timeout],
    )?;
    let target: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let token = join_token(&server, 2, "10m");
    let mut hosts = Vec::new();
    for i in 0..2 {
        let proxy = TcpProxy::start(target)?;
        let name = unique(&format!("bfo{i}"));
        let mut agent = TestAgent::enroll(&server, proxy.port(), &token, &["--name", &name])?;
        let host = agent.wait_enrolled()?;
        cleanup.host(&host);
        wait_host_ready(&server, &host)?;
        hosts.push((host, agent, proxy));
    }
    scope.apply(&server, "base", &scope.base_manifest());
    let name = "bot";
    let manifest = scope.instance_manifest(name, image, 2, &BTreeMap::new())
        + &format!(
            "  failover:\n    policy: Reschedule\n    after: {}s\n    stopAfter: {}s\n",
            AFTER.as_secs(),
            STOP_AFTER.as_secs()
        );
    scope.apply(&server, name, &manifest);
    let placements = || -> BTreeMap<String, (String, String)> {
        scope
            .instance(&server, name)
            .pointer("/status/replicaStatus")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|r| {
                        let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                        (s("name"), (s("host"), s("state")))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_for("2 Ready replicas, one per host", WAIT, || {
        let p = placements();
        let on: std::collections::BTreeSet<&String> = p.values().map(|(h, _)| h).collect();
        Ok((p.len() == 2 && on.len() == 2 && p.values().all(|(_, s)| s == "Ready")).then_some(()))
    })?;
    let sampler = DoubleSampler::start(&scope.tenant, Duration::from_millis(200));
    let (lost, other) = (hosts[0].0.clone(), hosts[1].0.clone());
    let moved = placements()
        .into_iter()
        .find(|(_, (h, _))| *h == lost)
        .map(|(r, _)| r)
        .context("a replica on the host to cut")?;
    let other_log_before = hosts[1].1.log().len();

    let cut = Instant::now();
    hosts[0].2.cut();
    let host_json = wait_for("the cut host NotReady", WAIT, || {
        let v = server.get_json(&format!("/api/v1/hosts/{lost}"));
        Ok((v.pointer("/status/phase").and_then(Value::as_str) == Some("NotReady")).then_some(v))
    })?;
    let detection = cut.elapsed();
    wait_for_every(POLL, "the replica Ready on the other host", || {
        Ok(placements()
            .get(&moved)
            .filter(|(h, s)| *h == other && s == "Ready")
            .map(drop))
    })?;
    let replacement = cut.elapsed();
    let ready_at = SystemTime::now();
    sampler.finish()?;

    // Where the time went, on the machine's one clock.
    let since = host_json
        .pointer("/status/notReadySince")
        .and_then(Value::as_str)
        .context("a NotReady host without notReadySince")?;
    let since = unix(humantime::parse_rfc3339(since).context("notReadySince")?);
    let log = hosts[1].1.log();
    let tail = &log[other_log_before..];
    let after_since = |msg: &str, pick: &dyn Fn(&Value) -> bool| -> anyhow::Result<f64> {
        log_events(tail, msg)
            .into_iter()
            .filter(|(_, f)| pick(f))
            .map(|(t, _)| unix(t))
            .find(|t| *t >= since)
            .with_context(|| format!("no \"{msg}\" in the other agent's log after notReadySince"))
    };
    let assigned = after_since("new assignments", &|f| f["replicas"].as_u64() == Some(2))?;
    let started = after_since("replica container started", &|f| {
        f["replica"].as_str().is_some_and(|r| r.contains(&moved))
    })?;
    let agent_ready = after_since("replica ready", &|f| {
        f["replica"].as_str().is_some_and(|r| r.contains(&moved))
    })?;
    let ready = unix(ready_at);
    let d = |a: f64, b: f64| Duration::from_secs_f64((b - a).max(0.0));

    let image_start = plain_docker_ready(image, 1, &format!("cchosts-bfo-{}", unique("plain")))?;
    drop(hosts);
    drop(cleanup);
    Ok(Run {
        detection,
        replacement,
        image_start,
        to_assignment: d(since, assigned),
        to_started: d(since, started),
        to_agent_ready: d(since, agent_ready),
        to_ready: d(since, ready),
    })
}

/// [`wait_for`] reading every `every`.
fn wait_for_every(
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<Option<()>>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if f()?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn main() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        bail!("no Docker engine: the failover benchmark needs one");
    };
    let runs: usize = std::env::var("CLUSTERCLAW_BENCH_FAILOVER_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let mut all = Vec::new();
    for i in 0..runs {
        let r = one_run(&image, i)?;
        println!(
            "run {}: detection {:.2}s; replacement {:.2}s ({:.2}s over heartbeat timeout + after; image start {:.2}s); from notReadySince: assignment {:.2}s, container started {:.2}s, ready on the agent {:.2}s, Ready through the API {:.2}s",
            i + 1,
            secs(r.detection),
            secs(r.replacement),
            secs(r.overhead()),
            secs(r.image_start),
            secs(r.to_assignment),
            secs(r.to_started),
            secs(r.to_agent_ready),
            secs(r.to_ready),
        );
        all.push(r);
    }
    let m = |f: fn(&Run) -> Duration| median(all.iter().map(f).collect());
    let (detection, replacement, overhead, start) = (
        m(|r| r.detection),
        m(|r| r.replacement),
        m(Run::overhead),
        m(|r| r.image_start),
    );
    let worst_detection = all.iter().map(|r| r.detection).max().unwrap_or_default();
    let worst_overhead = all.iter().map(Run::overhead).max().unwrap_or_default();
    println!(
        "failover ({runs} runs; heartbeat timeout {}s, after {}s, stopAfter {}s; medians):",
        TTL.as_secs(),
        AFTER.as_secs(),
        STOP_AFTER.as_secs()
    );
    println!(
        "  detection (cut -> host NotReady)        median {:.2}s, max {:.2}s (target < {:.1}s)",
        secs(detection),
        secs(worst_detection),
        secs(TTL) + 1.0
    );
    println!(
        "  replacement (cut -> Ready elsewhere)    median {:.2}s: {:.2}s over heartbeat timeout + after, max {:.2}s (target < image start {:.2}s + 2 s = {:.2}s)",
        secs(replacement),
        secs(overhead),
        secs(worst_overhead),
        secs(start),
        secs(start) + 2.0
    );
    println!(
        "  from notReadySince: assignment on the other host {:.2}s, container started {:.2}s, ready on the agent {:.2}s, Ready through the API {:.2}s",
        secs(m(|r| r.to_assignment)),
        secs(m(|r| r.to_started)),
        secs(m(|r| r.to_agent_ready)),
        secs(m(|r| r.to_ready)),
    );
    let started_to_ready: Vec<Duration> = all
        .iter()
        .map(|r| r.to_ready.saturating_sub(r.to_started))
        .collect();
    println!(
        "  container started -> Ready through the API: median {:.2}s, max {:.2}s",
        secs(median(started_to_ready.clone())),
        secs(started_to_ready.iter().max().copied().unwrap_or_default()),
    );
    let detected = all
        .iter()
        .filter(|r| r.detection < TTL + Duration::from_secs(1))
        .count();
    let replaced = all
        .iter()
        .filter(|r| r.overhead() < r.image_start + Duration::from_secs(2))
        .count();
    println!(
        "  within target: detection {detected}/{runs} runs, replacement {replaced}/{runs} runs"
    );
    Ok(())
}
