//! Several servers on one PostgreSQL database (the test server, a schema of its own), real
//! server binaries and one real agent on Docker knowing both servers:
//!
//! - **Leader failover**: `kill -9` of the leading server → the new leader's first decision
//!   (an instance applied through the survivor right after the kill, placed on the host by the
//!   new leader's scheduler). Round after round, the killed server is started again and
//!   follows, then the leader is killed again. Median and max; the target is under 10 s.
//! - **A write on one server reaching a watch on another**: a watch of a project's instance
//!   list is open on one server; changes (a label carrying the change's number) are applied
//!   through the other; the time from the write's acknowledgement (its 200 answer) to the
//!   moment the watch delivered the change's line. p50, p99 and max; the target is a p99 under
//!   100 ms.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench ha` (needs `tests/postgres-setup.sh`
//! and Docker). Knobs: `CLUSTERCLAW_BENCH_HA_ROUNDS` (default 5), `CLUSTERCLAW_BENCH_HA_LEASE`
//! (seconds, default 3), `CLUSTERCLAW_BENCH_HA_CHANGES` (default 200).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clusterclaw_tests::agent::{
    DockerCleanup, Scope, TestAgent, WAIT, free_port, join_token, percentile, require_docker,
    unique, wait_host_ready,
};
use clusterclaw_tests::ha::{LEASE, database, failover_round, server, wait_leading};
use clusterclaw_tests::server::TestServer;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const LABEL: &str = "haseq";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The change number a watch line carries, if it is a change of the watched instance.
fn seq_of(line: &str) -> Option<u64> {
    let needle = format!("\"{LABEL}\":\"");
    let rest = &line[line.find(&needle)? + needle.len()..];
    rest[..rest.find('"')?].parse().ok()
}

/// Watches `path` on `api` (`http://HOST:PORT`) and sends when each change number was first
/// seen to `seen`; `opened` is told once the stream started.
async fn watch(
    api: String,
    path: String,
    token: String,
    opened: tokio::sync::oneshot::Sender<()>,
    seen: tokio::sync::mpsc::UnboundedSender<(u64, Instant)>,
) -> anyhow::Result<()> {
    let addr = api.trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: application/x-ndjson\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if !line.contains(" 200 ") {
        bail!("GET {path}: {}", line.trim());
    }
    let _ = opened.send(());
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if let Some(seq) = seq_of(&line)
            && seen.send((seq, Instant::now())).is_err()
        {
            return Ok(());
        }
    }
}

fn manifest(scope: &Scope, seq: u64) -> String {
    format!(
        "apiVersion: clusterclaw.io/v1\nkind: OpenClawInstance\nmetadata:\n  name: watched\n  tenant: {}\n  project: {}\n  labels:\n    {LABEL}: \"{seq}\"\nspec:\n  version: 2026.7.1\n  replicas: 0\n",
        scope.tenant, scope.project
    )
}

/// Write through `writer`, watch on `watcher`: the delay of every change.
fn notification(
    writer: &TestServer,
    watcher: &TestServer,
    scope: &Scope,
    changes: u64,
) -> anyhow::Result<Vec<Duration>> {
    scope.apply_http(writer, &manifest(scope, 0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (opened_tx, opened) = tokio::sync::oneshot::channel();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let path = format!(
        "/api/v1/tenants/{}/projects/{}/instances?watch=true",
        scope.tenant, scope.project
    );
    let task = rt.spawn(watch(
        watcher.api_url().to_string(),
        path,
        watcher.admin_token().to_string(),
        opened_tx,
        seen_tx,
    ));
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), opened).await })
        .context("the watch did not open")??;
    let mut delays = Vec::new();
    for seq in 1..=changes {
        scope.apply_http(writer, &manifest(scope, seq));
        let acked = Instant::now();
        let at = rt.block_on(async {
            loop {
                match tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
                    Ok(Some((s, at))) if s == seq => return Ok(at),
                    Ok(Some(_)) => continue,
                    Ok(None) => bail!("the watch ended"),
                    Err(_) => bail!("change {seq} did not reach the watch within 10 s"),
                }
            }
        })?;
        delays.push(at.saturating_duration_since(acked));
        std::thread::sleep(Duration::from_millis(20));
    }
    task.abort();
    Ok(delays)
}

fn main() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        bail!("no Docker engine: the HA benchmark needs one");
    };
    let rounds = env_or("CLUSTERCLAW_BENCH_HA_ROUNDS", 5).max(1) as usize;
    let changes = env_or("CLUSTERCLAW_BENCH_HA_CHANGES", 200).max(1);
    if env_or("CLUSTERCLAW_BENCH_HA_LEASE", LEASE.as_secs()) != LEASE.as_secs() {
        bail!(
            "CLUSTERCLAW_BENCH_HA_LEASE: only {}s is supported",
            LEASE.as_secs()
        );
    }
    let scratch = tempfile::tempdir()?;
    let (_schema, store, password_file) =
        database(scratch.path()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let scope = Scope::new("habench");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let ports = [free_port(), free_port()];
    let mut servers = vec![server(&store, &password_file, ports[0], None)];
    wait_leading(&servers[0], WAIT)?;
    let second = server(&store, &password_file, ports[1], Some(&servers[0]));
    servers.push(second);
    let token = join_token(&servers[0], 1, "10m");
    let other = format!("https://127.0.0.1:{}", ports[1]);
    let name = unique("habench");
    let mut agent = TestAgent::enroll(
        &servers[0],
        ports[0],
        &token,
        &["--server", &other, "--name", &name],
    )?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&servers[1], &host)?;
    scope.apply_http(&servers[1], &scope.base_manifest());

    // A write through the follower reaching a watch on the leader, and the other way round.
    let mut delays = notification(&servers[1], &servers[0], &scope, changes / 2)?;
    delays.extend(notification(
        &servers[0],
        &servers[1],
        &scope,
        changes - changes / 2,
    )?);
    delays.sort();
    println!(
        "a write on one server reaching a watch on the other ({} changes, both ways, debug: {}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; load {}",
        delays.len(),
        cfg!(debug_assertions),
        percentile(&delays, 0.5).as_secs_f64() * 1e3,
        percentile(&delays, 0.99).as_secs_f64() * 1e3,
        delays[delays.len() - 1].as_secs_f64() * 1e3,
        load()
    );

    let mut leader = 0;
    let mut took = Vec::new();
    for round in 0..rounds {
        let t = failover_round(
            &mut servers,
            leader,
            &scope,
            &image,
            &host,
            &format!("after-{round}"),
        )?;
        println!("round {}: {:.2}s; load {}", round + 1, secs(t), load());
        took.push(t);
        servers[leader].restart()?;
        leader = 1 - leader;
    }
    took.sort();
    println!(
        "leader failover, kill -9 to the new leader's first decision (lease {LEASE:?}, {rounds} rounds, debug: {}): median {:.2}s, max {:.2}s; load {}",
        cfg!(debug_assertions),
        secs(took[took.len() / 2]),
        secs(took[took.len() - 1]),
        load()
    );
    agent.kill9();
    Ok(())
}
