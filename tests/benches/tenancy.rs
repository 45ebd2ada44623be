//! Multi-tenancy figures against the real release binary:
//!
//! 1. `latency`: p50 of a single-object GET and of a one-document apply, one client at a time.
//!    Run it once more with `CLUSTERCLAW_BIN` pointing at a build without authorization and
//!    audit to see what they add (the figure is the ratio of the two p50s).
//! 2. `flood`: one token sending ten times its rate limit while another tenant's client reads;
//!    the other tenant's GET p99, next to the same client's p99 with no flood.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench tenancy`; `CLUSTERCLAW_BENCH_PART=latency`
//! or `flood` runs one part.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clusterclaw_tests::server::TestServer;
use serde_json::json;

const GET_RUNS: usize = 3000;
const APPLY_RUNS: usize = 300;
const FLOOD_LIMIT: u32 = 100;
const FLOOD_TASKS: u32 = 20;
const FLOOD_FOR: Duration = Duration::from_secs(10);
const READERS: usize = 4;
/// Keeps the reading token (4 clients) under its own limit of FLOOD_LIMIT a second.
const READ_PAUSE: Duration = Duration::from_millis(50);

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)] * 1000.0
}

fn setup(server: &TestServer) -> anyhow::Result<()> {
    let docs = json!({"items": [
        {"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": "a"}},
        {"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": "b"}},
        {"apiVersion": "clusterclaw.io/v1", "kind": "Project", "metadata": {"name": "p", "tenant": "a"}},
        {"apiVersion": "clusterclaw.io/v1", "kind": "Project", "metadata": {"name": "p", "tenant": "b"}},
        {"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
         "metadata": {"name": "x", "tenant": "a", "project": "p"}, "spec": {"version": "2026.7.1"}},
        {"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
         "metadata": {"name": "y", "tenant": "b", "project": "p"}, "spec": {"version": "2026.7.1"}},
    ]});
    let r = server.http(
        "POST",
        "/api/v1/apply",
        Some(&docs.to_string()),
        Some(server.admin_token()),
    );
    if r.status != 200 {
        bail!("setup apply: {} {}", r.status, r.body);
    }
    Ok(())
}

/// p50 and p99 of sequential single GETs and one-document applies with `token`.
fn latency(server: &TestServer, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let base = server.api_url().to_string();
    let token = server.admin_token().to_string();
    let (get, apply) = rt.block_on(async move {
        let client = reqwest::Client::new();
        let url = format!("{base}/api/v1/tenants/a/projects/p/instances/x");
        let mut get = Vec::with_capacity(GET_RUNS);
        for _ in 0..GET_RUNS {
            let t = Instant::now();
            let r = client.get(&url).bearer_auth(&token).send().await?;
            let ok = r.status().is_success();
            r.bytes().await?;
            get.push(t.elapsed().as_secs_f64());
            if !ok {
                bail!("GET failed");
            }
        }
        let mut apply = Vec::with_capacity(APPLY_RUNS);
        for i in 0..APPLY_RUNS {
            let doc = json!({"items": [{"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
                "metadata": {"name": "x", "tenant": "a", "project": "p"},
                "spec": {"version": "2026.7.1", "replicas": 1 + (i % 2)}}]});
            let t = Instant::now();
            let r = client
                .post(format!("{base}/api/v1/apply"))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(doc.to_string())
                .send()
                .await?;
            let ok = r.status().is_success();
            r.bytes().await?;
            apply.push(t.elapsed().as_secs_f64());
            if !ok {
                bail!("apply failed");
            }
        }
        Ok::<_, anyhow::Error>((get, apply))
    })?;
    let (mut get, mut apply) = (get, apply);
    get.sort_by(f64::total_cmp);
    apply.sort_by(f64::total_cmp);
    println!(
        "GET one instance, 1 client        p50 {:.3} ms  p99 {:.3} ms  over {GET_RUNS}",
        pct(&get, 0.5),
        pct(&get, 0.99)
    );
    println!(
        "apply one instance (a change)     p50 {:.3} ms  p99 {:.3} ms  over {APPLY_RUNS}",
        pct(&apply, 0.5),
        pct(&apply, 0.99)
    );
    Ok(())
}

fn token(server: &TestServer, role: &str, tenant: &str) -> anyhow::Result<String> {
    let body = json!({"kind": "api", "role": role, "tenant": tenant}).to_string();
    let r = server.http(
        "POST",
        "/api/v1/tokens",
        Some(&body),
        Some(server.admin_token()),
    );
    if r.status != 201 {
        bail!("token create: {} {}", r.status, r.body);
    }
    r.json()["token"]
        .as_str()
        .map(str::to_string)
        .context("no token in the answer")
}

/// Another tenant's reads, with or without a flood from tenant a's token.
async fn read_while(
    base: Arc<String>,
    reader: Arc<String>,
    flooder: Option<Arc<String>>,
) -> anyhow::Result<(Vec<f64>, usize, usize)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let deadline = Instant::now() + FLOOD_FOR;
    let mut floods = Vec::new();
    if let Some(flooder) = flooder {
        // FLOOD_TASKS tasks, each paced to FLOOD_LIMIT * 10 / FLOOD_TASKS requests a second.
        let every = Duration::from_secs_f64(FLOOD_TASKS as f64 / (FLOOD_LIMIT as f64 * 10.0));
        for _ in 0..FLOOD_TASKS {
            let (client, base, flooder) = (client.clone(), base.clone(), flooder.clone());
            floods.push(tokio::spawn(async move {
                let (mut sent, mut refused) = (0usize, 0usize);
                let mut tick = tokio::time::interval(every);
                while Instant::now() < deadline {
                    tick.tick().await;
                    let r = client
                        .get(format!("{base}/api/v1/tenants/a/projects/p/instances/x"))
                        .bearer_auth(flooder.as_str())
                        .send()
                        .await;
                    sent += 1;
                    if let Ok(r) = r {
                        refused += usize::from(r.status().as_u16() == 429);
                        let _ = r.bytes().await;
                    }
                }
                (sent, refused)
            }));
        }
    }
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let (client, base, reader) = (client.clone(), base.clone(), reader.clone());
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = client
                    .get(format!("{base}/api/v1/tenants/b/projects/p/instances/y"))
                    .bearer_auth(reader.as_str())
                    .send()
                    .await?;
                let status = r.status();
                r.bytes().await?;
                lat.push(t.elapsed().as_secs_f64());
                if !status.is_success() {
                    bail!("the other tenant's GET answered {status}");
                }
                tokio::time::sleep(READ_PAUSE).await;
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut lat = Vec::new();
    for r in readers {
        lat.extend(r.await??);
    }
    let (mut sent, mut refused) = (0, 0);
    for f in floods {
        let (s, r) = f.await?;
        sent += s;
        refused += r;
    }
    lat.sort_by(f64::total_cmp);
    Ok((lat, sent, refused))
}

fn flood(rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[rate_limit]\nper_token = {{ rate = {FLOOD_LIMIT}, burst = {FLOOD_LIMIT} }}\nper_tenant = {{ rate = 10000 }}\n"
        ),
    )?;
    let server = TestServer::start_with(&["--config", config.to_str().unwrap_or_default()])?;
    setup(&server)?;
    let flooder = Arc::new(token(&server, "viewer", "a")?);
    let reader = Arc::new(token(&server, "viewer", "b")?);
    let base = Arc::new(server.api_url().to_string());
    let (quiet, _, _) = rt.block_on(read_while(base.clone(), reader.clone(), None))?;
    let (busy, sent, refused) = rt.block_on(read_while(base, reader, Some(flooder)))?;
    println!(
        "flood: one token at {}/s against a limit of {FLOOD_LIMIT}/s: {sent} sent, {refused} answered 429",
        sent as u64 / FLOOD_FOR.as_secs()
    );
    println!(
        "other tenant's GET, no flood      p50 {:.2} ms  p99 {:.2} ms  over {}",
        pct(&quiet, 0.5),
        pct(&quiet, 0.99),
        quiet.len()
    );
    println!(
        "other tenant's GET, during flood  p50 {:.2} ms  p99 {:.2} ms  over {}   target p99 < 20 ms",
        pct(&busy, 0.5),
        pct(&busy, 0.99),
        busy.len()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let part = std::env::var("CLUSTERCLAW_BENCH_PART").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "tenancy figures ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    if part.is_empty() || part == "latency" {
        let server = TestServer::start()?;
        setup(&server)?;
        latency(&server, &rt)?;
    }
    if part.is_empty() || part == "flood" {
        flood(&rt)?;
    }
    Ok(())
}
