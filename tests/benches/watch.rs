//! Watch fan-out, end to end against the real server binary: 1,000 concurrent subscribers of
//! one project's instance list (`GET .../instances?watch=true&resourceVersion=N`, JSON lines
//! over chunked HTTP/1.1), then a series of changes to one instance (a label carrying the
//! change's number, applied with `POST /api/v1/apply`). For every change and every subscriber
//! the bench takes the time from the write's acknowledgement (its 200 answer) to the moment the
//! subscriber has decoded the change's line; it prints p50/p99/max over all of them, the time
//! until the slowest subscriber had each change (p50/p99 over the changes), and the server's
//! CPU and resident memory while it fans out.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench watch`. Knobs (environment):
//! `CLUSTERCLAW_BENCH_WATCH_SUBSCRIBERS` (default 1000), `CLUSTERCLAW_BENCH_WATCH_CHANGES`
//! (default 300) and `CLUSTERCLAW_BENCH_WATCH_INTERVAL_MS` (pause between changes, default 20).
//!
//! The subscribers run in this process on a two-worker runtime and share the machine's cores
//! with the server, so their own decoding is part of every figure.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clusterclaw_tests::agent::{cpu_time, percentile, rss_bytes};
use clusterclaw_tests::server::TestServer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TENANT: &str = "watchbench";
const PROJECT: &str = "fanout";
const INSTANCE: &str = "watched";
/// The label whose value numbers the changes.
const LABEL: &str = "watchseq";
/// How long the last change may take to reach every subscriber before the bench gives up.
const DRAIN: Duration = Duration::from_secs(30);
/// Subscribers connecting at once while the bench opens them.
const CONNECT_WAVE: usize = 100;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn manifest(seq: u64) -> String {
    format!(
        "apiVersion: clusterclaw.io/v1\nkind: OpenClawInstance\nmetadata:\n  name: {INSTANCE}\n  tenant: {TENANT}\n  project: {PROJECT}\n  labels:\n    {LABEL}: \"{seq}\"\nspec:\n  version: 2026.7.1\n  replicas: 0\n"
    )
}

/// The change number a watch line carries, if it is a change of the watched instance.
fn seq_of(line: &[u8]) -> Option<u64> {
    let needle = format!("\"{LABEL}\":\"");
    let at = line
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?;
    let rest = &line[at + needle.len()..];
    let end = rest.iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// One subscriber: opens the watch, reports when its stream has started, and returns when
/// each change number was first seen, until it has seen `last`.
async fn subscriber(
    addr: String,
    path: String,
    token: String,
    started: Arc<AtomicUsize>,
    last: u64,
) -> anyhow::Result<Vec<(u64, Instant)>> {
    let mut stream = TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: application/x-ndjson\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut reader = BufReader::with_capacity(16 * 1024, stream);
    let mut head = String::new();
    reader.read_line(&mut head).await?;
    if !head.contains(" 200 ") {
        bail!("GET {path}: {}", head.trim());
    }
    let mut chunked = false;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 {
            bail!("the connection closed inside the headers");
        }
        if header == "\r\n" {
            break;
        }
        let lower = header.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if !chunked {
        bail!("the watch answer is not chunked");
    }
    started.fetch_add(1, Ordering::SeqCst);
    let mut seen = Vec::with_capacity(last as usize);
    let mut highest = 0;
    let mut pending: Vec<u8> = Vec::new();
    let mut size_line = String::new();
    loop {
        size_line.clear();
        if reader.read_line(&mut size_line).await? == 0 {
            bail!("the watch ended after change {highest} of {last}");
        }
        let hex = size_line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(hex, 16)
            .with_context(|| format!("bad chunk size line {size_line:?}"))?;
        if size == 0 {
            bail!("the watch ended after change {highest} of {last}");
        }
        let at = pending.len();
        pending.resize(at + size, 0);
        reader.read_exact(&mut pending[at..]).await?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).await?;
        let now = Instant::now();
        let mut from = 0;
        while let Some(n) = pending[from..].iter().position(|b| *b == b'\n') {
            let line = &pending[from..from + n];
            if line.starts_with(b"{\"type\":\"ERROR\"") {
                bail!("the watch was closed: {}", String::from_utf8_lossy(line));
            }
            if let Some(seq) = seq_of(line)
                && seq > highest
            {
                highest = seq;
                seen.push((seq, now));
            }
            from += n + 1;
        }
        pending.drain(..from);
        if highest >= last {
            return Ok(seen);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let subscribers = env_or("CLUSTERCLAW_BENCH_WATCH_SUBSCRIBERS", 1000) as usize;
    let changes = env_or("CLUSTERCLAW_BENCH_WATCH_CHANGES", 300).max(1);
    let interval = Duration::from_millis(env_or("CLUSTERCLAW_BENCH_WATCH_INTERVAL_MS", 20));

    let server = TestServer::start()?;
    let base = format!(
        "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: {TENANT}\n---\n\
         apiVersion: clusterclaw.io/v1\nkind: Project\nmetadata:\n  name: {PROJECT}\n  tenant: {TENANT}\n---\n{}",
        manifest(0)
    );
    let r = server.http(
        "POST",
        "/api/v1/apply",
        Some(&base),
        Some(server.admin_token()),
    );
    if r.status != 200 {
        bail!("apply of the base objects: {} {}", r.status, r.body);
    }
    let from = server.settled_index();
    let server_pid = server.pid().context("the server is not running")?;
    let addr = server
        .api_url()
        .strip_prefix("http://")
        .context("the API is not plain http")?
        .to_string();
    let token = server.admin_token().to_string();
    let api = server.api_url().to_string();
    let path = format!(
        "/api/v1/tenants/{TENANT}/projects/{PROJECT}/instances?watch=true&resourceVersion={from}"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let run = rt.block_on(async move {
        // 1. Open the subscribers.
        let started = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::with_capacity(subscribers);
        for i in 0..subscribers {
            tasks.push(tokio::spawn(subscriber(
                addr.clone(),
                path.clone(),
                token.clone(),
                started.clone(),
                changes,
            )));
            if (i + 1) % CONNECT_WAVE == 0 {
                let want = i + 1;
                let deadline = Instant::now() + Duration::from_secs(30);
                while started.load(Ordering::SeqCst) < want {
                    if Instant::now() > deadline {
                        bail!(
                            "only {} of {want} watches started within 30 s",
                            started.load(Ordering::SeqCst)
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while started.load(Ordering::SeqCst) < subscribers {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {subscribers} watches started within 30 s",
                    started.load(Ordering::SeqCst)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_idle = rss_bytes(server_pid)?;

        // 2. The changes, one after the other, each acknowledged before the next.
        let client = reqwest::Client::builder().build()?;
        let cpu_before = cpu_time(server_pid)?;
        let t0 = Instant::now();
        let mut acks = Vec::with_capacity(changes as usize);
        let mut rss_peak = rss_idle;
        for seq in 1..=changes {
            let sent = Instant::now();
            let resp = client
                .post(format!("{api}/api/v1/apply"))
                .bearer_auth(&token)
                .header("content-type", "application/yaml")
                .body(manifest(seq))
                .send()
                .await?;
            let status = resp.status();
            let body = resp.text().await?;
            let acked = Instant::now();
            if !status.is_success() {
                bail!("apply of change {seq}: {status} {body}");
            }
            acks.push((sent, acked));
            if seq % 50 == 0 {
                rss_peak = rss_peak.max(rss_bytes(server_pid)?);
            }
            tokio::time::sleep(interval).await;
        }
        // 3. Every subscriber's receipts.
        let mut receipts = Vec::with_capacity(subscribers);
        let mut failed = Vec::new();
        for t in tasks {
            match tokio::time::timeout(DRAIN, t).await {
                Ok(Ok(Ok(seen))) => receipts.push(seen),
                Ok(Ok(Err(e))) => failed.push(format!("{e:#}")),
                Ok(Err(e)) => failed.push(e.to_string()),
                Err(_) => failed.push("no last change within the drain time".into()),
            }
        }
        let elapsed = t0.elapsed();
        let cpu = cpu_time(server_pid)? - cpu_before;
        let rss_end = rss_bytes(server_pid)?;
        Ok((
            acks, receipts, failed, elapsed, cpu, rss_idle, rss_peak, rss_end,
        ))
    })?;
    let (acks, receipts, failed, elapsed, cpu, rss_idle, rss_peak, rss_end) = run;
    if !failed.is_empty() {
        bail!(
            "{} of {subscribers} subscribers failed; the first: {}",
            failed.len(),
            failed[0]
        );
    }

    // From the acknowledgement (zero when the line came first) and from the request.
    let mut from_ack = Vec::with_capacity(subscribers * changes as usize);
    let mut from_send = Vec::with_capacity(subscribers * changes as usize);
    let mut slowest = vec![Duration::ZERO; changes as usize];
    let mut missed = 0usize;
    for seen in &receipts {
        let mut got = vec![None; changes as usize];
        for (seq, at) in seen {
            if let Some(slot) = got.get_mut((*seq - 1) as usize) {
                *slot = Some(*at);
            }
        }
        for (i, at) in got.iter().enumerate() {
            let Some(at) = at else {
                missed += 1;
                continue;
            };
            let (sent, acked) = acks[i];
            let d = at.saturating_duration_since(acked);
            from_ack.push(d);
            from_send.push(at.saturating_duration_since(sent));
            slowest[i] = slowest[i].max(d);
        }
    }
    from_ack.sort();
    from_send.sort();
    slowest.sort();
    let mut apply: Vec<Duration> = acks.iter().map(|(s, a)| *a - *s).collect();
    apply.sort();

    println!(
        "watch fan-out figures ({} cores, {} build; the subscribers share the cores with the server)",
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
        "{subscribers} subscribers, {changes} changes {interval:?} apart; {} deliveries, {missed} never seen",
        from_ack.len()
    );
    println!(
        "write acknowledged -> subscriber has the line   p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms   target p99 < 100 ms",
        ms(percentile(&from_ack, 0.5)),
        ms(percentile(&from_ack, 0.99)),
        ms(from_ack[from_ack.len() - 1])
    );
    println!(
        "write sent -> subscriber has the line           p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(percentile(&from_send, 0.5)),
        ms(percentile(&from_send, 0.99)),
        ms(from_send[from_send.len() - 1])
    );
    println!(
        "write acknowledged -> all {subscribers} have it        p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms (over {changes} changes)",
        ms(percentile(&slowest, 0.5)),
        ms(percentile(&slowest, 0.99)),
        ms(slowest[slowest.len() - 1])
    );
    println!(
        "apply (the write itself)                        p50 {:.2} ms  p99 {:.2} ms",
        ms(percentile(&apply, 0.5)),
        ms(percentile(&apply, 0.99))
    );
    println!(
        "server CPU {:.1}% of one core over {:.1} s; RSS {:.1} MB with the watches open, peak {:.1} MB, {:.1} MB at the end",
        cpu.as_secs_f64() / elapsed.as_secs_f64() * 100.0,
        elapsed.as_secs_f64(),
        rss_idle as f64 / 1e6,
        rss_peak as f64 / 1e6,
        rss_end as f64 / 1e6
    );
    Ok(())
}
