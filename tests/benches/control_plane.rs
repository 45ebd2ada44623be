//! Control-plane figures, measured end to end against the real release binaries:
//! `apply` of 1,000 instances, `get instances -o json` over 10,000, server memory with
//! 10,000 stored, and single-object GET latency under 64 concurrent clients.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench control_plane`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clusterclaw_tests::server::TestServer;

/// Timed `apply` runs (each adds 1,000 new instances).
const APPLY_RUNS: usize = 5;
const INSTANCES_PER_FILE: usize = 1_000;
const STORED_INSTANCES: usize = 10_000;
const GET_RUNS: usize = 10;
const CLIENTS: usize = 64;
/// Idle time before the settled memory figure is read.
const SETTLE: Duration = Duration::from_secs(3);
const LOAD_DURATION: Duration = Duration::from_secs(10);
/// Upper bound of requests per client, so the load stops by itself.
const MAX_REQUESTS_PER_CLIENT: usize = 20_000;

fn manifest(project: &str) -> String {
    let mut s = String::with_capacity(INSTANCES_PER_FILE * 300);
    let _ = write!(
        s,
        "apiVersion: clusterclaw.io/v1\nkind: Project\nmetadata:\n  name: {project}\n  tenant: bench\n"
    );
    for i in 0..INSTANCES_PER_FILE {
        let _ = write!(
            s,
            "---\napiVersion: clusterclaw.io/v1\nkind: OpenClawInstance\nmetadata:\n  name: bot-{i}\n  tenant: bench\n  project: {project}\n  labels:\n    team: t{}\nspec:\n  version: 2026.7.1\n  replicas: 2\n  resources:\n    cpu: 500m\n    memory: 1Gi\n  config:\n    agents:\n      defaults:\n        model: anthropic/claude-sonnet-4\n  env:\n    LOG_LEVEL: info\n",
            i % 10
        );
    }
    s
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

fn main() -> anyhow::Result<()> {
    let server = TestServer::start()?;
    let tenant = server.write_file(
        "tenant.yaml",
        "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: bench\n",
    );
    server
        .cli(&["apply", "-f", tenant.to_str().unwrap_or_default()])
        .ok();

    // 1. apply -f of one file with 1,000 instances, each run into a new project.
    let mut apply_secs = Vec::new();
    let files = STORED_INSTANCES / INSTANCES_PER_FILE;
    for run in 0..files {
        let path = server.write_file(&format!("p{run}.yaml"), &manifest(&format!("p{run}")));
        let started = Instant::now();
        let out = server.cli(&["apply", "-f", path.to_str().unwrap_or_default()]);
        let took = started.elapsed().as_secs_f64();
        let out = out.ok();
        let created = out
            .stdout
            .lines()
            .filter(|l| l.ends_with(" created"))
            .count();
        if created != INSTANCES_PER_FILE + 1 {
            bail!(
                "apply run {run} created {created} objects, expected {}",
                INSTANCES_PER_FILE + 1
            );
        }
        if run < APPLY_RUNS {
            apply_secs.push(took);
        }
    }
    server.settled_index();

    // 2. get instances -o json over 10,000.
    let mut get_secs = Vec::new();
    for _ in 0..GET_RUNS {
        let started = Instant::now();
        let out = server.cli(&["get", "instances", "-A", "-o", "json"]);
        get_secs.push(started.elapsed().as_secs_f64());
        let out = out.ok();
        let items = out.json()["items"].as_array().map(Vec::len).unwrap_or(0);
        if items != STORED_INSTANCES {
            bail!("get returned {items} instances, expected {STORED_INSTANCES}");
        }
    }

    // 3. Resident memory with 10,000 stored: right after the lists above, and once the server
    // has been idle for a moment (what it holds with 10,000 instances, not what a burst of
    // 10 MB list bodies briefly needs).
    let pid = server.pid().context("the server is not running")?;
    let (rss_burst, _) = rss_kib(pid)?;
    std::thread::sleep(SETTLE);
    let (rss, hwm) = rss_kib(pid)?;

    // 4. Single-object GET, 64 concurrent clients.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let url = format!(
        "{}/api/v1/tenants/bench/projects/p0/instances/",
        server.api_url()
    );
    let token = format!("Bearer {}", server.admin_token());
    let latencies = rt.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(CLIENTS)
            .build()?;
        let url = Arc::new(url);
        let deadline = Instant::now() + LOAD_DURATION;
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let (client, url, token) = (client.clone(), url.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(4096);
                let mut i = c;
                while Instant::now() < deadline && lat.len() < MAX_REQUESTS_PER_CLIENT {
                    let u = format!("{url}bot-{}", i % INSTANCES_PER_FILE);
                    let started = Instant::now();
                    let resp = client
                        .get(&u)
                        .header("authorization", &token)
                        .send()
                        .await?;
                    let status = resp.status();
                    resp.bytes().await?;
                    lat.push(started.elapsed().as_secs_f64());
                    if !status.is_success() {
                        anyhow::bail!("GET {u}: {status}");
                    }
                    i += CLIENTS;
                }
                Ok::<_, anyhow::Error>(lat)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let mut lat = latencies;
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] * 1000.0;
    let (rss_after, hwm_after) = rss_kib(pid)?;

    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "control-plane figures ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "apply -f (1,000 instances)            median {:.3} s  max {:.3} s  over {} runs   target < 2 s",
        median(&mut apply_secs.clone()),
        max(&apply_secs),
        apply_secs.len()
    );
    println!(
        "get instances -o json (10,000)        median {:.3} s  max {:.3} s  over {} runs  target < 0.5 s",
        median(&mut get_secs.clone()),
        max(&get_secs),
        get_secs.len()
    );
    println!(
        "server RSS, 10,000 instances stored   {:.1} MB idle {SETTLE:?} after the lists ({:.1} MB right after them, peak {:.1} MB)   target < 60 MB",
        rss as f64 / 1024.0,
        rss_burst as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "GET one instance, {CLIENTS} clients         p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  {} requests, {:.0}/s  target p99 < 5 ms",
        pct(0.50),
        pct(0.99),
        lat.last().copied().unwrap_or(0.0) * 1000.0,
        lat.len(),
        lat.len() as f64 / LOAD_DURATION.as_secs_f64()
    );
    println!(
        "server RSS after the load             {:.1} MB (peak {:.1} MB)",
        rss_after as f64 / 1024.0,
        hwm_after as f64 / 1024.0
    );
    Ok(())
}
