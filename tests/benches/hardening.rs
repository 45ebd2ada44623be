//! Server memory under two cheap attacks, against the real release binary: 1,000 connections
//! that announce a 1 MB body and send 3 bytes, and 16 concurrent YAML alias bombs to
//! `/api/v1/apply` with a valid token.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench hardening`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clusterclaw_tests::agent::rss_bytes;
use clusterclaw_tests::server::TestServer;

/// Measured runs of each attack.
const RUNS: usize = 5;
/// Connections of the slow-body attack, and what each announces and sends.
const SLOW_CONNECTIONS: usize = 1_000;
const ANNOUNCED: usize = 1_000_000;
const SENT: &[u8] = b"kin";
/// How long the slow connections are held before the memory is read (under the server's
/// 10 s body stall timeout, so every one of them is still waiting for its body).
const HOLD: Duration = Duration::from_secs(3);
/// Concurrent bombs, and rounds of them per run.
const BOMBERS: usize = 16;
const BOMB_ROUNDS: usize = 20;
/// Idle time for the server to give memory back between runs.
const SETTLE: Duration = Duration::from_secs(2);
const RSS_SAMPLE: Duration = Duration::from_millis(5);

/// The 1.3 KB billion-laughs document: nine levels of nine aliases over nine strings.
fn bomb() -> String {
    let mut text = String::from(
        "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata: {name: bomb}\nx0: &x0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for i in 1..9 {
        let p = i - 1;
        text.push_str(&format!(
            "x{i}: &x{i} [*x{p},*x{p},*x{p},*x{p},*x{p},*x{p},*x{p},*x{p},*x{p}]\n"
        ));
    }
    text
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Resident memory once the server has been idle for [`SETTLE`].
fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    std::thread::sleep(SETTLE);
    rss_bytes(pid)
}

/// The highest resident memory seen while `work` runs.
fn peak_rss_during<T>(pid: u32, work: impl FnOnce() -> T) -> anyhow::Result<(T, u64)> {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid).unwrap_or(0));
                std::thread::sleep(RSS_SAMPLE);
            }
            peak.max(rss_bytes(pid).unwrap_or(0))
        })
    };
    let out = work();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().map_err(|_| anyhow::anyhow!("sampler"))?;
    Ok((out, peak))
}

/// One run of the slow-body attack: growth of the server's memory while the connections wait.
fn slow_bodies(addr: &str, token: &str, pid: u32) -> anyhow::Result<u64> {
    let before = settled_rss(pid)?;
    let head = format!(
        "POST /api/v1/apply HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/yaml\r\nContent-Length: {ANNOUNCED}\r\n\r\n"
    );
    let mut conns = Vec::with_capacity(SLOW_CONNECTIONS);
    let opened = Instant::now();
    for _ in 0..SLOW_CONNECTIONS {
        let mut s = TcpStream::connect(addr)?;
        s.write_all(head.as_bytes())?;
        s.write_all(SENT)?;
        conns.push(s);
    }
    std::thread::sleep(HOLD.saturating_sub(opened.elapsed()));
    let during = rss_bytes(pid)?;
    // Every connection is still open and waiting: none has been answered yet.
    for s in &mut conns {
        s.set_nonblocking(true)?;
        let mut buf = [0u8; 1];
        match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => bail!("a slow connection was answered early: {other:?}"),
        }
    }
    drop(conns);
    Ok(during.saturating_sub(before))
}

/// One run of the bomb attack: peak growth of the server's memory, and the median answer time.
fn bombs(addr: &str, token: &str, pid: u32) -> anyhow::Result<(u64, f64)> {
    let before = settled_rss(pid)?;
    let body = bomb();
    let request = format!(
        "POST /api/v1/apply HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (answers, peak) = peak_rss_during(pid, || {
        let mut threads = Vec::new();
        for _ in 0..BOMBERS {
            let (addr, request) = (addr.to_string(), request.clone());
            threads.push(std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let mut took = Vec::new();
                for _ in 0..BOMB_ROUNDS {
                    let started = Instant::now();
                    let mut s = TcpStream::connect(&addr)?;
                    s.write_all(request.as_bytes())?;
                    let mut out = String::new();
                    s.read_to_string(&mut out)?;
                    took.push(started.elapsed().as_secs_f64() * 1000.0);
                    if !out.starts_with("HTTP/1.1 413") {
                        bail!("a bomb was not refused with 413: {out}");
                    }
                }
                Ok(took)
            }));
        }
        let mut all = Vec::new();
        for t in threads {
            match t.join() {
                Ok(r) => all.extend(r?),
                Err(_) => bail!("a bomber thread panicked"),
            }
        }
        Ok(all)
    })?;
    let mut answers = answers?;
    Ok((peak.saturating_sub(before), median(&mut answers)))
}

fn main() -> anyhow::Result<()> {
    // This process holds a thousand sockets at once.
    clusterclaw_agent::rlimit::raise_nofile().context("raise the open-files limit")?;
    let server = TestServer::start()?;
    let pid = server.pid().context("the server is not running")?;
    let addr = server
        .api_url()
        .strip_prefix("http://")
        .context("a plain HTTP API")?
        .to_string();
    let token = server.admin_token().to_string();
    // Warm up: the first requests set up the store, the allocator's arenas and the audit log.
    for _ in 0..50 {
        server.get_json("/api/v1/tenants");
    }
    let baseline = settled_rss(pid)?;

    let mut slow = Vec::new();
    for _ in 0..RUNS {
        slow.push(mb(slow_bodies(&addr, &token, pid)?));
    }
    let mut bomb_growth = Vec::new();
    let mut bomb_ms = Vec::new();
    for _ in 0..RUNS {
        let (grown, ms) = bombs(&addr, &token, pid)?;
        bomb_growth.push(mb(grown));
        bomb_ms.push(ms);
    }
    let after = settled_rss(pid)?;

    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "hardening figures ({} cores), server RSS {:.1} MB at start, {:.1} MB at the end",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        mb(baseline),
        mb(after)
    );
    println!(
        "RSS growth, {SLOW_CONNECTIONS} connections announcing {ANNOUNCED} bytes and sending {}   median {:.1} MB  max {:.1} MB  over {RUNS} runs   target < 50 MB",
        SENT.len(),
        median(&mut slow.clone()),
        max(&slow)
    );
    println!(
        "RSS growth, {BOMBERS} concurrent alias bombs ({} bytes) x {BOMB_ROUNDS}        median {:.1} MB  max {:.1} MB  over {RUNS} runs   target < 50 MB",
        bomb().len(),
        median(&mut bomb_growth.clone()),
        max(&bomb_growth)
    );
    println!(
        "alias bomb answered 413 in              median {:.2} ms (median of the runs' medians)",
        median(&mut bomb_ms)
    );
    Ok(())
}
