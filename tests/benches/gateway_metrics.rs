//! Gateway figures relayed for 100 replicas: what scraping and relaying them costs an agent.
//!
//! A child process serves 100 Gateways' `/api/diagnostics/prometheus` on loopback (each the
//! stand-in's series plus more, about 60 series and 6 KiB a replica, behind a bearer token).
//! This process does exactly what the agent's report loop does for them on every report: one
//! concurrent scrape of the 100 with the agent's own code (`clusterclaw_agent::gateway`: HTTP,
//! token, parse, caps), then the status report carrying them, encoded as it goes on the wire.
//! Its CPU time (user + system, from /proc/self/stat) over the rounds gives the CPU per round,
//! and the share of one core at the agent's default report interval (10 s) and at 1 s.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench gateway_metrics`; `CLUSTERCLAW_BENCH_GW_ROUNDS`
//! sets the rounds (default 60, one a second).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use clusterclaw_agent::gateway::{self, Caps};
use clusterclaw_proto::agent as pb;
use clusterclaw_tests::agent::{cpu_time, percentile};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REPLICAS: usize = 100;
const TOKEN: &str = "bench-gateway-token-3f9a";
/// Extra series per replica beyond the stand-in's own, for a realistic family count.
const EXTRA_SERIES: usize = 40;
/// The agent's default report interval.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

fn text(extra: usize) -> String {
    let mut out = String::from(
        "# HELP openclaw_run_completed_total Agent runs completed.\n\
         # TYPE openclaw_run_completed_total counter\n\
         openclaw_run_completed_total{channel=\"webchat\",model=\"m-1\",outcome=\"ok\",provider=\"p\",trigger=\"message\"} 1234\n\
         openclaw_run_completed_total{channel=\"webchat\",model=\"m-1\",outcome=\"error\",provider=\"p\",trigger=\"message\"} 12\n\
         # TYPE openclaw_run_duration_seconds histogram\n",
    );
    for le in ["0.5", "1", "2.5", "5", "10", "30", "60", "+Inf"] {
        out.push_str(&format!(
            "openclaw_run_duration_seconds_bucket{{outcome=\"ok\",le=\"{le}\"}} 1234\n"
        ));
    }
    out.push_str(
        "openclaw_run_duration_seconds_sum{outcome=\"ok\"} 4321.5\n\
         openclaw_run_duration_seconds_count{outcome=\"ok\"} 1234\n\
         # TYPE openclaw_model_call_total counter\n\
         openclaw_model_call_total{model=\"m-1\",outcome=\"ok\",provider=\"p\"} 2400\n\
         # TYPE openclaw_model_tokens_total counter\n\
         openclaw_model_tokens_total{model=\"m-1\",provider=\"p\",token_type=\"input\"} 1500000\n\
         openclaw_model_tokens_total{model=\"m-1\",provider=\"p\",token_type=\"output\"} 300000\n\
         # TYPE openclaw_model_cost_usd_total counter\n\
         openclaw_model_cost_usd_total{model=\"m-1\",provider=\"p\"} 12.75\n\
         # TYPE openclaw_tool_execution_total counter\n\
         openclaw_tool_execution_total{outcome=\"ok\",tool=\"web_search\"} 321\n\
         # TYPE openclaw_bench_extra gauge\n",
    );
    for n in 0..extra {
        out.push_str(&format!(
            "openclaw_bench_extra{{tool=\"tool-{n}\",outcome=\"ok\"}} {n}\n"
        ));
    }
    out
}

/// The child: 100 Gateways on loopback; prints their ports, serves until stdin closes.
async fn serve_gateways() -> anyhow::Result<()> {
    let body = std::sync::Arc::new(text(EXTRA_SERIES));
    let mut ports = Vec::new();
    for _ in 0..REPLICAS {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        ports.push(listener.local_addr()?.port());
        let body = body.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf[..n]);
                    let ok = head.contains(&format!("Authorization: Bearer {TOKEN}\r\n"));
                    let answer = if ok {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
                    };
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
    }
    println!(
        "{}",
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Until the parent goes.
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 1];
        let _ = std::io::Read::read(&mut std::io::stdin(), &mut sink);
    })
    .await;
    Ok(())
}

/// One round as the agent's report loop does it: scrape every replica, build and encode the
/// report. The encoded size.
async fn round(addrs: &[SocketAddr]) -> usize {
    let scraped = scrape_all(addrs).await;
    let replicas = scraped
        .into_iter()
        .enumerate()
        .map(|(i, m)| pb::ReplicaStatus {
            tenant: "t".into(),
            project: "p".into(),
            instance: format!("bot-{}", i / 4),
            replica: format!("bot-{}-{}", i / 4, i % 4),
            state: pb::ReplicaState::Ready as i32,
            gateway_metrics: Some(m),
            ..Default::default()
        })
        .collect();
    let report = pb::StatusReport {
        replicas,
        ..Default::default()
    };
    report.encode_to_vec().len()
}

async fn scrape_all(addrs: &[SocketAddr]) -> Vec<pb::GatewayMetrics> {
    let mut set = tokio::task::JoinSet::new();
    for (i, a) in addrs.iter().enumerate() {
        let a = *a;
        set.spawn(async move { (i, gateway::scrape(a, TOKEN, Caps::default()).await) });
    }
    let mut out = vec![pb::GatewayMetrics::default(); addrs.len()];
    while let Some(r) = set.join_next().await {
        if let Ok((i, m)) = r {
            out[i] = m;
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if std::env::args().any(|a| a == "--serve-gateways") {
        return rt.block_on(serve_gateways());
    }
    let rounds: usize = std::env::var("CLUSTERCLAW_BENCH_GW_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--serve-gateways")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start the Gateways")?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().context("child stdout")?),
        &mut line,
    )?;
    let addrs: Vec<SocketAddr> = line
        .split_whitespace()
        .map(|p| Ok(SocketAddr::from(([127, 0, 0, 1], p.parse::<u16>()?))))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(addrs.len() == REPLICAS, "{line}");

    let me = std::process::id();
    let result = rt.block_on(async {
        // A check and a warm-up round.
        let first = scrape_all(&addrs).await;
        let series: usize = first
            .iter()
            .map(|m| m.families.iter().map(|f| f.samples.len()).sum::<usize>())
            .sum();
        anyhow::ensure!(
            first.iter().all(|m| m.error.is_empty() && !m.truncated),
            "a scrape failed: {:?}",
            first.iter().find(|m| !m.error.is_empty()).map(|m| &m.error)
        );
        let bytes = round(&addrs).await;
        let mut walls = Vec::new();
        let cpu0 = cpu_time(me)?;
        let t0 = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for _ in 0..rounds {
            tick.tick().await;
            let started = Instant::now();
            round(&addrs).await;
            walls.push(started.elapsed());
        }
        let cpu = cpu_time(me)? - cpu0;
        Ok::<_, anyhow::Error>((series, bytes, walls, cpu, t0.elapsed()))
    });
    drop(child.stdin.take());
    let _ = child.wait();
    let (series, bytes, mut walls, cpu, elapsed) = result?;
    walls.sort();
    let per_round = cpu.as_secs_f64() / rounds as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "Gateway figures relayed for {REPLICAS} replicas ({} series, {:.0} KiB encoded report; {} cores)",
        series,
        bytes as f64 / 1024.0,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "one round (scrape {REPLICAS}, parse, encode)  wall p50 {:.1} ms  p99 {:.1} ms   CPU {:.1} ms a round over {rounds} rounds",
        ms(percentile(&walls, 0.5)),
        ms(percentile(&walls, 0.99)),
        per_round * 1000.0
    );
    println!(
        "CPU share of one core: {:.3}% at the default 10 s report interval, {:.2}% at 1 s (measured over {:.0} s)   target < 1% at the default interval",
        per_round / DEFAULT_INTERVAL.as_secs_f64() * 100.0,
        cpu.as_secs_f64() / elapsed.as_secs_f64() * 100.0,
        elapsed.as_secs_f64()
    );
    Ok(())
}
