//! The web console against the real server binary with 10,000 instances stored: the time the
//! server takes to answer the overview (`/ui/`) and the instance list (`/ui/instances`), the
//! bytes a browser transfers for each page (the HTML, the stylesheet and the script,
//! uncompressed), and how long a status change takes to reach an open page: from the write's
//! acknowledgement, through the watch stream the page's script follows
//! (`/ui/watch/instances`, server-sent events), to the re-fetched page that shows it (what the
//! script does on a change, less the browser's own DOM swap).
//!
//! Run with `cargo bench -p clusterclaw-tests --bench console`. Knobs (environment):
//! `CLUSTERCLAW_BENCH_CONSOLE_RUNS` (page loads per page, default 20) and
//! `CLUSTERCLAW_BENCH_CONSOLE_CHANGES` (status changes, default 20).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clusterclaw_tests::agent::percentile;
use clusterclaw_tests::console_http;
use clusterclaw_tests::server::TestServer;

const STORED_INSTANCES: usize = 10_000;
const INSTANCES_PER_APPLY: usize = 1_000;
const TENANT: &str = "consolebench";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn manifest(project: &str) -> String {
    let mut s = String::with_capacity(INSTANCES_PER_APPLY * 300);
    let _ = write!(
        s,
        "apiVersion: clusterclaw.io/v1\nkind: Project\nmetadata:\n  name: {project}\n  tenant: {TENANT}\n"
    );
    for i in 0..INSTANCES_PER_APPLY {
        let _ = write!(
            s,
            "---\napiVersion: clusterclaw.io/v1\nkind: OpenClawInstance\nmetadata:\n  name: bot-{i}\n  tenant: {TENANT}\n  project: {project}\n  labels:\n    team: t{}\nspec:\n  version: 2026.7.1\n  replicas: 0\n  config:\n    agents:\n      defaults:\n        model: anthropic/claude-sonnet-4\n",
            i % 10
        );
    }
    s
}

fn changed(seq: u64) -> String {
    format!(
        "apiVersion: clusterclaw.io/v1\nkind: OpenClawInstance\nmetadata:\n  name: bot-0\n  tenant: {TENANT}\n  project: p0\n  labels:\n    team: t0\n    change: \"{seq}\"\nspec:\n  version: 2026.7.1\n  replicas: 0\n  config:\n    agents:\n      defaults:\n        model: anthropic/claude-sonnet-4\n"
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let runs = env_or("CLUSTERCLAW_BENCH_CONSOLE_RUNS", 20) as usize;
    let changes = env_or("CLUSTERCLAW_BENCH_CONSOLE_CHANGES", 20);
    let server = TestServer::start()?;
    let r = server.http(
        "POST",
        "/api/v1/apply",
        Some(&format!(
            "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: {TENANT}\n"
        )),
        Some(server.admin_token()),
    );
    if r.status != 200 {
        bail!("apply of the tenant: {} {}", r.status, r.body);
    }
    for p in 0..STORED_INSTANCES / INSTANCES_PER_APPLY {
        let r = server.http(
            "POST",
            "/api/v1/apply",
            Some(&manifest(&format!("p{p}"))),
            Some(server.admin_token()),
        );
        if r.status != 200 {
            bail!("apply of project p{p}: {} {}", r.status, r.body);
        }
    }
    server.settled_index();
    let api = server.api_url().to_string();
    let admin = server.admin_token().to_string();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let http = console_http::client()?;
        // Log in as a browser does.
        let cookie = console_http::log_in(&http, &api, &admin).await?;

        let get = |path: String| {
            let (http, cookie) = (http.clone(), cookie.clone());
            async move {
                let started = Instant::now();
                let resp = http.get(path.clone()).header("Cookie", cookie).send().await?;
                let status = resp.status();
                let body = resp.bytes().await?;
                let took = started.elapsed();
                if !status.is_success() {
                    bail!("GET {path}: {status}");
                }
                anyhow::Ok((took, body.len()))
            }
        };
        let (_, css) = get(format!("{api}/ui/static/console.css")).await?;
        let (_, js) = get(format!("{api}/ui/static/console.js")).await?;
        println!("console with {STORED_INSTANCES} instances stored, {runs} loads per page");
        for (name, path) in [
            ("overview      /ui/", "/ui/".to_string()),
            ("instance list /ui/instances", "/ui/instances".to_string()),
            (
                "instance list, filtered by label and phase",
                "/ui/instances?label=team%3Dt3&phase=Pending".to_string(),
            ),
            (
                "instance page",
                format!("/ui/tenants/{TENANT}/projects/p0/instances/bot-1"),
            ),
        ] {
            let mut times = Vec::new();
            let mut size = 0;
            for _ in 0..runs {
                let (t, n) = get(format!("{api}{path}")).await?;
                times.push(t);
                size = n;
            }
            times.sort();
            println!(
                "{name:<44} p50 {:>7.1} ms  p90 {:>7.1} ms  page {:>6} B, with stylesheet and script {:>6} B",
                ms(percentile(&times, 0.5)),
                ms(percentile(&times, 0.9)),
                size,
                size + css + js
            );
        }

        // A status change on an open page: the page's watch, then its re-fetch.
        let index: u64 = http
            .get(format!("{api}/api/v1/instances?tenant={TENANT}&project=p0&labelSelector=team%3Dt0"))
            .bearer_auth(&admin)
            .send()
            .await?
            .json::<serde_json::Value>()
            .await?["index"]
            .as_u64()
            .unwrap_or_default();
        let stream = http
            .get(format!(
                "{api}/ui/watch/instances?tenant={TENANT}&project=p0&watch=true&resourceVersion={index}"
            ))
            .header("Cookie", cookie.clone())
            .header("Accept", "text/event-stream")
            .send()
            .await?;
        if !stream.status().is_success() {
            bail!("the watch answered {}", stream.status());
        }
        let mut stream = stream;
        let mut pending = String::new();
        let mut latencies = Vec::new();
        for seq in 1..=changes {
            let body = changed(seq);
            let acked = {
                let r = http
                    .post(format!("{api}/api/v1/apply"))
                    .bearer_auth(&admin)
                    .header("Content-Type", "application/yaml")
                    .body(body)
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("apply of change {seq}: {}", r.status());
                }
                Instant::now()
            };
            let needle = format!("\"change\":\"{seq}\"");
            let deadline = acked + Duration::from_secs(10);
            while !pending.contains(&needle) {
                let chunk = tokio::time::timeout_at(deadline.into(), stream.chunk())
                    .await
                    .context("the change did not come through the watch in 10 s")??
                    .context("the watch ended")?;
                pending.push_str(&String::from_utf8_lossy(&chunk));
            }
            pending.clear();
            let (_, _) = get(format!("{api}/ui/instances?tenant={TENANT}&project=p0")).await?;
            latencies.push(acked.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        latencies.sort();
        println!(
            "status change -> open page (watch + re-fetch)    p50 {:>7.1} ms  p90 {:>7.1} ms  max {:>7.1} ms over {changes} changes",
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.9)),
            ms(*latencies.last().unwrap_or(&Duration::ZERO)),
        );
        anyhow::Ok(())
    })?;
    Ok(())
}
