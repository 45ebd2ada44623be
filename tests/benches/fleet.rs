//! Fleet scale, end to end against the real release server binary: 1,000, 3,000 and 10,000
//! simulated hosts (`clusterclaw_tests::simfleet`: each its own mutual-TLS client that enrolls
//! with a join token, long polls `WatchAssignments` and reports every 10 s as
//! `clusterclaw-agent` does), all in this process on one two-worker runtime, sharing the
//! machine's cores with the server.
//!
//! Per fleet size it measures:
//! - enrollment: the time until every host is enrolled (hosts/s) and until the server shows
//!   every one `Ready`;
//! - the server's CPU (share of one core) and resident memory, sampled from `/proc` over an idle
//!   window, once with nothing placed and once with every replica placed and running;
//! - placement: `POST /api/v1/apply` of 1,000 instances of 10 replicas (10,000 new replicas)
//!   until the hosts' long polls have brought all of them, and until the server shows every
//!   replica `Running` (the simulated hosts report `Running` at once);
//! - spec change: with the 1,000 instances stored, a change of one instance's environment,
//!   from the apply's answer until each of its hosts' long polls brought it (p50 / p99 over
//!   every replica of every change).
//!
//! Run with `cargo bench -p clusterclaw-tests --bench fleet`. Knobs (environment):
//! `CLUSTERCLAW_BENCH_FLEET_HOSTS` (sizes, default `1000,3000,10000`),
//! `CLUSTERCLAW_BENCH_FLEET_IDLE_SECS` (each idle window, default 60),
//! `CLUSTERCLAW_BENCH_FLEET_INSTANCES` (default 1000), `CLUSTERCLAW_BENCH_FLEET_REPLICAS`
//! (per instance, default 10) and `CLUSTERCLAW_BENCH_FLEET_CHANGES` (default 40).
//!
//! "All Ready" and "all Running" are seen through one watch of the list (`?watch=true`, a list
//! then the changes), never by reading the whole list again and again, so that the bench does
//! not load the server it measures.
//!
//! The bench raises its soft open-files limit to the hard limit (the server it starts inherits
//! it): each host holds one connection, so 10,000 hosts need 10,000 descriptors on each side.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clusterclaw_agent::rlimit::{NofileLimit, raise_nofile};
use clusterclaw_tests::agent::{cpu_time, join_token, rss_bytes};
use clusterclaw_tests::server::{TestServer, loop_passes_between};
use clusterclaw_tests::simfleet::{FleetTarget, MARKER, SimFleet, SimSettings};
use serde_json::{Value, json};

const TENANT: &str = "fleet";
const PROJECT: &str = "sim";
/// Settle time after a burst, before an idle window starts.
const SETTLE: Duration = Duration::from_secs(10);
/// Interval of the memory samples of an idle window.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How long one spec change may take to reach all its hosts before the bench gives up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between spec changes.
const CHANGE_PAUSE: Duration = Duration::from_millis(200);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sizes() -> Vec<usize> {
    std::env::var("CLUSTERCLAW_BENCH_FLEET_HOSTS")
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|s| s.trim().replace('_', "").parse().ok())
                .collect()
        })
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![1_000, 3_000, 10_000])
}

/// CPU share of one core and memory of a process over an idle window.
#[derive(Clone, Copy, Debug, Default)]
struct Idle {
    cpu_percent: f64,
    rss_median_mb: f64,
    rss_max_mb: f64,
}

#[derive(Clone, Debug, Default)]
struct Row {
    hosts: usize,
    enrolled_secs: f64,
    ready_secs: f64,
    idle_empty: Idle,
    idle_placed: Idle,
    replicas: usize,
    placed_secs: f64,
    running_secs: f64,
    change_p50_ms: f64,
    change_p99_ms: f64,
    change_max_ms: f64,
    change_samples: usize,
    errors: u64,
    last_error: Option<String>,
    sim_rss_mb: f64,
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn idle_window(pid: u32, window: Duration) -> anyhow::Result<Idle> {
    let started = Instant::now();
    let cpu0 = cpu_time(pid)?;
    let mut rss = Vec::new();
    while started.elapsed() < window {
        rss.push(mb(rss_bytes(pid)?));
        std::thread::sleep(SAMPLE_EVERY.min(window.saturating_sub(started.elapsed())));
    }
    let cpu1 = cpu_time(pid)?;
    let took = started.elapsed().as_secs_f64();
    let max = rss.iter().copied().fold(0.0, f64::max);
    Ok(Idle {
        cpu_percent: (cpu1 - cpu0).as_secs_f64() / took * 100.0,
        rss_median_mb: median(&mut rss),
        rss_max_mb: max,
    })
}

fn apply(server: &TestServer, docs: Vec<Value>) -> anyhow::Result<()> {
    let body = json!({ "items": docs }).to_string();
    let r = server.http(
        "POST",
        "/api/v1/apply",
        Some(&body),
        Some(server.admin_token()),
    );
    ensure!(r.status == 200, "apply: {} {}", r.status, r.body);
    Ok(())
}

fn instance_doc(i: usize, replicas: usize, seq: u64) -> Value {
    json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
        "metadata": {"name": format!("bot-{i}"), "tenant": TENANT, "project": PROJECT},
        "spec": {"version": "2026.7.1", "replicas": replicas,
            "resources": {"cpu": "10m", "memory": "32Mi"},
            "env": {MARKER: seq.to_string()},
            // Every replica takes a change at once: the simulated hosts report Running, never
            // Ready, so a one-at-a-time rollout would wait on each.
            "updateStrategy": {"type": "Rolling", "maxUnavailable": "100%"}}})
}

/// A key and a count for one object of a watched list.
type Counter = fn(&Value) -> Option<(String, usize)>;

/// A running tally over one list, kept by one watch (`?watch=true`) rather than by reading
/// the list again and again: it lists once, then applies each change's object, so that what
/// the bench measures is not its own polling. The sum is read with [`Tally::total`].
struct Tally {
    total: Arc<AtomicUsize>,
    stop: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tally {
    /// Starts a watch of `path` (a list) on its own thread; `count` gives an object's key and
    /// what it counts for (a `DELETED` object counts for nothing).
    fn start(server: &TestServer, path: &str, count: Counter) -> anyhow::Result<Tally> {
        let total = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(tokio::sync::Notify::new());
        let url = format!("{}{path}", server.api_url());
        let token = server.admin_token().to_string();
        let (t, s) = (total.clone(), stop.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("tally".into())
            .spawn(move || {
                rt.block_on(async move {
                    let client = reqwest::Client::new();
                    let watch = async {
                        loop {
                            if let Err(e) = tally(&client, &url, &token, count, &t).await {
                                eprintln!("  watch of {url}: {e:#}; listing again");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    };
                    tokio::select! {
                        () = watch => {}
                        () = s.notified() => {}
                    }
                })
            })?;
        Ok(Tally {
            total,
            stop,
            thread: Some(thread),
        })
    }

    fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One list and watch, until the watch ends: always an error (the caller lists again).
async fn tally(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    count: Counter,
    total: &AtomicUsize,
) -> anyhow::Result<()> {
    let list: Value = client
        .get(url)
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let index = list["index"].as_u64().context("a list without an index")?;
    let mut counts: HashMap<String, usize> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(count)
        .collect();
    total.store(counts.values().sum(), Ordering::Relaxed);
    let sep = if url.contains('?') { '&' } else { '?' };
    let mut resp = client
        .get(format!("{url}{sep}watch=true&resourceVersion={index}"))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?;
    let mut buf = Vec::new();
    loop {
        let Some(chunk) = resp.chunk().await? else {
            bail!("the watch ended");
        };
        buf.extend_from_slice(&chunk);
        let mut changed = false;
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let Ok(change) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            match change["type"].as_str() {
                Some("ADDED" | "MODIFIED") => {
                    if let Some((key, n)) = count(&change["object"]) {
                        counts.insert(key, n);
                        changed = true;
                    }
                }
                Some("DELETED") => {
                    if let Some((key, _)) = count(&change["object"]) {
                        counts.remove(&key);
                        changed = true;
                    }
                }
                Some("ERROR") => bail!("{}", change["object"]),
                _ => {}
            }
        }
        if changed {
            total.store(counts.values().sum(), Ordering::Relaxed);
        }
    }
}

/// A host counts 1 when `Ready`.
fn ready_host(h: &Value) -> Option<(String, usize)> {
    let name = h.pointer("/metadata/name")?.as_str()?.to_string();
    let ready = h.pointer("/status/phase") == Some(&json!("Ready"));
    Some((name, usize::from(ready)))
}

/// An instance counts its replicas that are `Running` on a host.
fn running_replicas(i: &Value) -> Option<(String, usize)> {
    let m = i.get("metadata")?;
    let key = format!(
        "{}/{}/{}",
        m["tenant"].as_str()?,
        m["project"].as_str()?,
        m["name"].as_str()?
    );
    let running = i
        .pointer("/status/replicaStatus")
        .and_then(Value::as_array)
        .map_or(0, |a| {
            a.iter()
                .filter(|r| r["state"] == "Running" && r["host"].is_string())
                .count()
        });
    Some((key, running))
}

fn run_size(hosts: usize, idle: Duration) -> anyhow::Result<Row> {
    let instances = env_or("CLUSTERCLAW_BENCH_FLEET_INSTANCES", 1_000) as usize;
    let per_instance = env_or("CLUSTERCLAW_BENCH_FLEET_REPLICAS", 10) as usize;
    let changes = env_or("CLUSTERCLAW_BENCH_FLEET_CHANGES", 40) as usize;
    let total = instances * per_instance;
    let mut row = Row {
        hosts,
        replicas: total,
        ..Row::default()
    };

    let server = TestServer::start()?;
    let pid = server.pid().context("the server is not running")?;
    let ca_path = server
        .endpoints()
        .ca_cert
        .clone()
        .context("endpoints.json names no CA certificate")?;
    let ca_pem =
        std::fs::read_to_string(&ca_path).with_context(|| format!("read {}", ca_path.display()))?;
    let target = FleetTarget {
        url: format!("https://{}", server.endpoints().agent),
        ca_pem,
        join_token: join_token(&server, hosts as u32, "60m"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("simfleet")
        .enable_all()
        .build()?;

    // 1. Enrollment: every host enrolls and starts its loops; then all Ready.
    let ready_tally = Tally::start(&server, "/api/v1/hosts", ready_host)?;
    let enroll_passes = server.loop_passes();
    let started = Instant::now();
    let fleet = {
        let _guard = rt.enter();
        SimFleet::start(target, "sim", hosts, SimSettings::default())
    };
    let enroll_limit = Duration::from_secs(60 + hosts as u64 / 20);
    while fleet.enrolled() < hosts {
        if started.elapsed() > enroll_limit {
            bail!(
                "{} of {hosts} hosts enrolled after {enroll_limit:?}; last error: {:?}",
                fleet.enrolled(),
                fleet.state().last_error()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    row.enrolled_secs = started.elapsed().as_secs_f64();
    loop {
        let ready = ready_tally.total();
        if ready == hosts {
            break;
        }
        if started.elapsed() > enroll_limit + Duration::from_secs(60) {
            bail!(
                "{ready} of {hosts} hosts Ready after {:?}",
                started.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    row.ready_secs = started.elapsed().as_secs_f64();
    println!(
        "  {hosts} hosts: enrolled in {:.2} s ({:.0}/s), all Ready after {:.2} s",
        row.enrolled_secs,
        hosts as f64 / row.enrolled_secs,
        row.ready_secs
    );
    println!(
        "  control loop passes while enrolling: {}",
        loop_passes_between(&enroll_passes, &server.loop_passes())
    );

    drop(ready_tally);

    // 2. Idle, nothing placed.
    std::thread::sleep(SETTLE);
    let passes = server.loop_passes();
    row.idle_empty = idle_window(pid, idle)?;
    println!(
        "  control loop passes while idle: {}",
        loop_passes_between(&passes, &server.loop_passes())
    );
    println!("  idle, nothing placed: {:?}", row.idle_empty);

    // 3. Placement of `total` new replicas.
    apply(
        &server,
        vec![
            json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": TENANT}}),
            json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project",
                "metadata": {"name": PROJECT, "tenant": TENANT}}),
        ],
    )?;
    let docs: Vec<Value> = (0..instances)
        .map(|i| instance_doc(i, per_instance, 0))
        .collect();
    let state = fleet.state().clone();
    let running_tally = Tally::start(
        &server,
        &format!("/api/v1/tenants/{TENANT}/projects/{PROJECT}/instances"),
        running_replicas,
    )?;
    let place_passes = server.loop_passes();
    let applied = Instant::now();
    apply(&server, docs)?;
    let answered = applied.elapsed();
    // Generous: on a loaded machine a burst of 10,000 can take minutes.
    let place_limit = Duration::from_secs(600);
    // When a quarter, half and three quarters of the replicas were first seen assigned.
    let mut quarters: Vec<f64> = Vec::new();
    loop {
        let assigned = state.assigned();
        while quarters.len() < 3 && assigned * 4 >= total * (quarters.len() + 1) {
            quarters.push(applied.elapsed().as_secs_f64());
        }
        if assigned >= total {
            break;
        }
        if applied.elapsed() > place_limit {
            bail!("{assigned} of {total} replicas assigned after {place_limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let placed = state.assigned_moved().unwrap_or_else(Instant::now);
    row.placed_secs = placed.duration_since(applied).as_secs_f64();
    println!(
        "  {total} replicas: all assigned after {:.2} s ({:.0}/s; the apply answered after {:.2} s)",
        row.placed_secs,
        total as f64 / row.placed_secs,
        answered.as_secs_f64()
    );
    let quarters: Vec<String> = quarters.iter().map(|q| format!("{q:.2} s")).collect();
    println!(
        "  a quarter, half, three quarters assigned after {}",
        quarters.join(", ")
    );
    loop {
        let running = running_tally.total();
        if running >= total {
            break;
        }
        if applied.elapsed() > place_limit {
            bail!("{running} of {total} replicas Running after {place_limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    row.running_secs = applied.elapsed().as_secs_f64();
    println!("  all Running after {:.2} s", row.running_secs);
    println!(
        "  control loop passes while placing: {}",
        loop_passes_between(&place_passes, &server.loop_passes())
    );
    drop(running_tally);

    // 4. Idle with every replica placed and running.
    std::thread::sleep(SETTLE);
    let passes = server.loop_passes();
    row.idle_placed = idle_window(pid, idle)?;
    println!(
        "  control loop passes while idle: {}",
        loop_passes_between(&passes, &server.loop_passes())
    );
    println!("  idle, {total} replicas placed: {:?}", row.idle_placed);

    // 5. Spec changes of one instance at a time, with `instances` stored.
    let _ = state.take_seen();
    let passes = server.loop_passes();
    let mut samples = Vec::new();
    let mut seen_later: HashMap<(String, u64), Vec<Instant>> = HashMap::new();
    for k in 0..changes {
        let i = (k * 37) % instances;
        let seq = k as u64 + 1;
        let name = format!("{TENANT}/{PROJECT}/bot-{i}");
        apply(&server, vec![instance_doc(i, per_instance, seq)])?;
        let acked = Instant::now();
        loop {
            for s in state.take_seen() {
                seen_later
                    .entry((s.instance, s.seq))
                    .or_default()
                    .push(s.at);
            }
            let got = seen_later.get(&(name.clone(), seq)).map_or(0, Vec::len);
            if got >= per_instance {
                break;
            }
            if acked.elapsed() > CHANGE_TIMEOUT {
                bail!("change {seq} of {name} reached {got} of {per_instance} replicas' hosts");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for at in seen_later.remove(&(name, seq)).unwrap_or_default() {
            samples.push(at.saturating_duration_since(acked).as_secs_f64() * 1000.0);
        }
        std::thread::sleep(CHANGE_PAUSE);
    }
    println!(
        "  control loop passes during the spec changes: {}",
        loop_passes_between(&passes, &server.loop_passes())
    );
    samples.sort_by(|a, b| a.total_cmp(b));
    row.change_p50_ms = pct(&samples, 0.50);
    row.change_p99_ms = pct(&samples, 0.99);
    row.change_max_ms = samples.last().copied().unwrap_or(0.0);
    row.change_samples = samples.len();
    row.errors = state.errors();
    row.last_error = state.last_error();
    row.sim_rss_mb = mb(rss_bytes(std::process::id())?);
    println!(
        "  spec change -> host: p50 {:.1} ms p99 {:.1} ms max {:.1} ms over {} ({} polls, {} reports, {} errors)",
        row.change_p50_ms,
        row.change_p99_ms,
        row.change_max_ms,
        row.change_samples,
        state.polls(),
        state.reports(),
        row.errors
    );
    fleet.stop();
    drop(fleet);
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(server);
    Ok(row)
}

fn main() -> anyhow::Result<()> {
    match raise_nofile() {
        Ok(NofileLimit::Raised { from, to }) => {
            println!("open-files soft limit raised from {from} to {to} (the server inherits it)")
        }
        Ok(NofileLimit::AtHard { limit }) => {
            println!("open-files soft limit already at the hard limit, {limit}")
        }
        Err(e) => println!("cannot raise the open-files soft limit: {e}"),
    }
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    let idle = Duration::from_secs(env_or("CLUSTERCLAW_BENCH_FLEET_IDLE_SECS", 60).max(1));
    let mut rows = Vec::new();
    for hosts in sizes() {
        // One connection per host on each side, plus the server's own files and the bench's.
        if hosts as u64 + 512 > soft {
            println!(
                "skipping {hosts} hosts: they need {hosts} connections on each side and the open-files limit is {soft}"
            );
            continue;
        }
        println!("fleet of {hosts} hosts");
        rows.push(run_size(hosts, idle)?);
    }
    println!(
        "\nfleet figures ({} cores, server and simulated hosts sharing them; idle windows of {} s)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        idle.as_secs()
    );
    println!(
        "| hosts | enroll | all Ready | idle CPU / RSS (nothing placed) | idle CPU / RSS (replicas placed) | replicas placed | all Running | spec change p50 / p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.2} s ({:.0}/s) | {:.2} s | {:.1}% / {:.0} MB (max {:.0}) | {:.1}% / {:.0} MB (max {:.0}) | {} in {:.2} s ({:.0}/s) | {:.2} s | {:.1} / {:.1} ms |",
            r.hosts,
            r.enrolled_secs,
            r.hosts as f64 / r.enrolled_secs,
            r.ready_secs,
            r.idle_empty.cpu_percent,
            r.idle_empty.rss_median_mb,
            r.idle_empty.rss_max_mb,
            r.idle_placed.cpu_percent,
            r.idle_placed.rss_median_mb,
            r.idle_placed.rss_max_mb,
            r.replicas,
            r.placed_secs,
            r.replicas as f64 / r.placed_secs,
            r.running_secs,
            r.change_p50_ms,
            r.change_p99_ms
        );
    }
    for r in &rows {
        println!(
            "{} hosts: {} failed calls{}; simulator RSS {:.0} MB; spec change max {:.1} ms over {} samples",
            r.hosts,
            r.errors,
            r.last_error
                .as_ref()
                .map(|e| format!(" (last: {e})"))
                .unwrap_or_default(),
            r.sim_rss_mb,
            r.change_max_ms,
            r.change_samples
        );
    }
    Ok(())
}
