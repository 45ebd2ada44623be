//! Log streaming figures, end to end with the real release binaries, mutual TLS between agent
//! and server, real Docker and the stand-in Gateway image: time from the `GET .../logs` call to
//! the first line on loopback (median and p95 over several calls), and a replica writing 1,000
//! lines a second relayed to one follower: the agent's CPU (from /proc/<pid>/stat) and the
//! resident memory of server and agent at the start and end of the run.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench logs`; the follow run lasts
//! `CLUSTERCLAW_BENCH_LOGS_SECS` seconds (default 60).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;

/// Calls timed for the first-line figure.
const FIRST_LINE_CALLS: usize = 20;
/// Lines a second the replica writes.
const RATE: u32 = 1000;

/// Sends `GET path` to the API and returns the reader positioned at the body, with the time
/// the request was written.
fn open(server: &TestServer, path: &str) -> anyhow::Result<(BufReader<TcpStream>, Instant)> {
    let addr = server
        .api_url()
        .strip_prefix("http://")
        .context("the API is not plain http")?;
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let started = Instant::now();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        server.admin_token()
    )?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.contains(" 200 ") {
        bail!("GET {path}: {status}");
    }
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        if header == "\r\n" || header.is_empty() {
            break;
        }
    }
    Ok((reader, started))
}

fn main() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        bail!("no Docker engine: the logs benchmark needs one");
    };
    let secs: u64 = std::env::var("CLUSTERCLAW_BENCH_LOGS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    agent_bin()?;
    let scope = Scope::new("bench-logs");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let mut agent =
        TestAgent::enroll_with_defaults(&server, port, &token, &["--name", &unique("bench")])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;
    scope.apply(&server, "base", &scope.base_manifest());
    let name = "chatty";
    let rate = RATE.to_string();
    let env = BTreeMap::from([
        ("STANDIN_LOG_LINES_PER_SEC", rate.as_str()),
        ("OPENCLAW_BENCH_SECRET", "bench-secret-value-0001"),
    ]);
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(name, &image, 1, &env),
    );
    wait_ready(&server, &scope, name, 1)?;
    let path = format!("{}/logs", scope.instance_path(name));

    // 1. From the call to the first line.
    let mut firsts = Vec::new();
    for _ in 0..=FIRST_LINE_CALLS {
        let (mut reader, started) = open(&server, &format!("{path}?tail=1"))?;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                bail!("the stream ended before its first line");
            }
            if line.contains("openclaw-standin") {
                break;
            }
        }
        firsts.push(started.elapsed());
    }
    // The first call warms connections up; it is not counted.
    firsts.remove(0);
    firsts.sort();

    // 2. A follower of 1,000 lines a second.
    let agent_pid = agent.pid().context("the agent is not running")?;
    let server_pid = server.pid().context("the server is not running")?;
    let (mut reader, _) = open(&server, &format!("{path}?follow=true&tail=0"))?;
    let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let counted = counted.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if line.contains("log line ") {
                            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            }
        });
    }
    std::thread::sleep(Duration::from_secs(5));
    let window = Duration::from_secs(secs);
    let cpu_before = cpu_time(agent_pid)?;
    let server_cpu_before = cpu_time(server_pid)?;
    let lines_before = counted.load(std::sync::atomic::Ordering::Relaxed);
    let t0 = Instant::now();
    let mut rss: Vec<(u64, u64)> = Vec::new();
    while t0.elapsed() < window {
        rss.push((rss_bytes(server_pid)?, rss_bytes(agent_pid)?));
        std::thread::sleep(Duration::from_secs(1));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let agent_cpu = (cpu_time(agent_pid)? - cpu_before).as_secs_f64() / elapsed * 100.0;
    let server_cpu = (cpu_time(server_pid)? - server_cpu_before).as_secs_f64() / elapsed * 100.0;
    let lines =
        (counted.load(std::sync::atomic::Ordering::Relaxed) - lines_before) as f64 / elapsed;
    if lines < f64::from(RATE) * 0.9 {
        eprintln!(
            "the follower received {lines:.0} lines/s of the {RATE} written: the relay lost lines or fell behind"
        );
    }
    let tenth = (rss.len() / 10).max(1);
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2] as f64 / 1e6
    };
    let (mut s_start, mut a_start): (Vec<u64>, Vec<u64>) = rss[..tenth].iter().copied().unzip();
    let (mut s_end, mut a_end): (Vec<u64>, Vec<u64>) =
        rss[rss.len() - tenth..].iter().copied().unzip();

    scope.delete(&server, name);
    wait_for("the container to go", WAIT, || {
        Ok(scope.containers(name)?.is_empty().then_some(()))
    })?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "log figures ({} cores, {} build)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "GET .../logs -> first line      median {:.1} ms  p95 {:.1} ms  max {:.1} ms over {} calls   target < 300 ms",
        ms(percentile(&firsts, 0.5)),
        ms(percentile(&firsts, 0.95)),
        ms(firsts[firsts.len() - 1]),
        firsts.len()
    );
    println!(
        "follow of {RATE} lines/s over {secs} s  received {lines:.0} lines/s; agent CPU {agent_cpu:.2}% of one core (target < 5%); server CPU {server_cpu:.2}%"
    );
    println!(
        "RSS (median of the first / last tenth)  server {:.1} -> {:.1} MB; agent {:.1} -> {:.1} MB   target: not growing",
        median(&mut s_start),
        median(&mut s_end),
        median(&mut a_start),
        median(&mut a_end)
    );
    drop(agent);
    Ok(())
}
