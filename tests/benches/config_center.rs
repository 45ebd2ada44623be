//! Config center figures against the real release server binary:
//!
//! 1. `fleet`: a change of the `default` ConfigTemplate that reaches 1,000 replicas (100
//!    instances × 10 replicas, spread one per host) on 10 hosts. Per run: the time from just
//!    before `PUT /api/v1/configtemplates/default` until each host's engine has created, for
//!    every one of its 100 replicas, a container labelled with the replica's new config
//!    revision; the slowest and the median host, and the PUT itself (it revises the 100
//!    instances in one transaction). Five runs, each a different change; the figure is the
//!    median of the slowest-host times, against a target of 2 s. The server moves the change
//!    in one wave (`--fleet-waves 100%`) and every instance updates all its replicas at once
//!    (`maxUnavailable: 100%`): this figure is the propagation, with no pacing.
//!
//!    The 10 agents run in this process as real agent code: each host enrolls with a join
//!    token over the server's real agent port (real mutual TLS from then on), runs the agent's
//!    own host loops (long poll, reconcile, probe, report) with the agent's default intervals
//!    and the real reconciler, each on its own two-worker runtime and data directory, as the
//!    agent process does. Only the container engine is the agent library's in-memory
//!    `FakeRuntime` instead of Docker: 1,000 containers cannot run on the two-core machine the
//!    benches run on. A small stub answers the health probes so that replicas become Ready.
//!    All 10 hosts share this machine's two cores and one disk with the server, where a real
//!    fleet has a machine (and a disk) per host: the figure is pessimistic.
//!
//!    Also shown: per run, when the hosts' long polls returned, when they had saved the new
//!    assignments, their first creates, when the server showed every replica Ready on the new
//!    revision, and the engine calls the change cost; then that the unchanged template sent
//!    again changes nothing, and what the quiet fleet costs in CPU.
//! 2. `render`: `clusterclaw config render instance NAME --explain` of an instance with four
//!    layers (template, tenant, project, instance; about 2.5 KB together), the real CLI binary
//!    end to end (20 runs, median and p95, target 50 ms), and the HTTP request it makes,
//!    `GET .../config?explain=true`, alone (100 requests, median and p95).
//!
//! Run with `cargo bench -p clusterclaw-tests --bench config_center`;
//! `CLUSTERCLAW_BENCH_PART=fleet` or `render` runs one part. With
//! `RUST_LOG=info,clusterclaw_server::api=debug` in the environment the server logs every
//! request with its time, and the fleet part also reports the server-side time of each PUT.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clusterclaw_agent::enroll;
use clusterclaw_agent::metrics::HostMetrics;
use clusterclaw_agent::runtime::FakeCall;
use clusterclaw_proto::agent as pb;
use clusterclaw_tests::agent::{cpu_time, join_token, percentile, wait_for};
use clusterclaw_tests::fleet::{Created, FleetHost, HealthStub};
use clusterclaw_tests::server::TestServer;
use serde_json::{Value, json};

const HOSTS: usize = 10;
const INSTANCES: usize = 100;
const REPLICAS: usize = 10;
const PER_HOST: usize = INSTANCES * REPLICAS / HOSTS;
/// Ports the health stub answers on: a host's replicas, with room to spare.
const STUB_PORTS: u16 = PER_HOST as u16 + 10;
const RUNS: usize = 5;
const TARGET: Duration = Duration::from_secs(2);
/// How long the fleet may take to come up (1,000 replicas created and Ready).
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one run may take before it counts as failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a run looks at the hosts' engines.
const POLL: Duration = Duration::from_millis(10);
/// Pause after a run has converged, so the next starts from a quiet fleet.
const SETTLE: Duration = Duration::from_secs(1);
/// How long the quiet fleet's CPU use is measured.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
const CLI_RUNS: usize = 20;
const HTTP_RUNS: usize = 100;
const RENDER_TARGET: Duration = Duration::from_millis(50);

const TENANT: &str = "acme";
const PROJECT: &str = "helpdesk";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    percentile(&s, 0.5)
}

// ------------------------------------------------------------------------------- layers

/// The platform's layer; `timeout` varies from one template change to the next.
fn template_layer(timeout: u64) -> Value {
    json!({
        "gateway": {"mode": "local", "auth": {"mode": "token"}, "reload": {"mode": "hybrid"},
            "controlUi": {"enabled": true, "allowedOrigins": ["https://ui.example.com"]},
            "trustedProxies": ["10.0.0.0/8", "172.16.0.0/12"]},
        "agents": {"defaults": {"workspace": "~/.openclaw/workspace",
            "model": {"primary": "anthropic/claude-opus-4-6", "fallbacks": ["openai/gpt-5.2", "anthropic/claude-sonnet-4-6"]},
            "heartbeat": {"every": "2h"}, "maxConcurrent": 4, "timeoutSeconds": timeout}},
        "models": {"mode": "merge", "providers": {"internal": {"baseUrl": "https://llm.internal.example.com/v1", "api": "openai-completions",
            "models": [{"id": "llama-70b", "name": "Llama 70B", "contextWindow": 128000, "maxTokens": 8192, "input": ["text"]}]}}},
        "tools": {"profile": "coding", "deny": ["browser", "canvas"], "exec": {"security": "allowlist", "ask": "on-miss"}, "web": {"search": {"enabled": true}}},
        "logging": {"level": "info", "consoleStyle": "json", "redactSensitive": "tools", "redactPatterns": ["sk-[A-Za-z0-9]+"]},
        "update": {"channel": "stable", "checkOnStart": false},
        "discovery": {"mdns": {"mode": "off"}},
        "diagnostics": {"enabled": true, "otel": {"enabled": true, "endpoint": "http://otel:4318", "serviceName": "openclaw", "sampleRate": 0.2}},
        "browser": {"enabled": false},
        "canvasHost": {"enabled": false}
    })
}

fn tenant_layer() -> Value {
    json!({
        "channels": {
            "telegram": {"enabled": true, "dmPolicy": "pairing", "allowFrom": ["tg:1", "tg:2"], "groups": {"*": {"requireMention": true}}, "historyLimit": 50},
            "slack": {"enabled": true, "dmPolicy": "allowlist", "allowFrom": ["U01", "U02", "U03"], "channels": {"#support": {"allow": true}}}
        },
        "auth": {"profiles": {"anthropic:default": {"provider": "anthropic", "mode": "api_key"},
                              "openai:work": {"provider": "openai", "mode": "oauth", "email": "ops@example.com"}},
                 "order": {"anthropic": ["anthropic:default"], "openai": ["openai:work"]}},
        "env": {"shellEnv": {"enabled": false}, "vars": {"TZ": "Europe/Berlin"}},
        "logging": {"level": "warn"}
    })
}

fn project_layer() -> Value {
    json!({
        "session": {"dmScope": "per-channel-peer", "reset": {"mode": "daily", "atHour": 4}},
        "messages": {"ackReaction": "eyes", "groupChat": {"mentionPatterns": ["@openclaw", "openclaw"], "historyLimit": 30}, "queue": {"mode": "collect"}},
        "cron": {"enabled": true, "maxConcurrentRuns": 2},
        "skills": {"allowBundled": ["github", "weather"], "load": {"watch": true, "watchDebounceMs": 250}},
        "memory": {"backend": "builtin", "citations": "auto"}
    })
}

fn instance_layer(name: &str) -> Value {
    json!({
        "ui": {"seamColor": "#FF4500", "assistant": {"name": name, "avatar": "H"}},
        "agents": {"defaults": {"maxConcurrent": 2}},
        "plugins": {"enabled": true, "allow": ["voice-call"], "entries": {"voice-call": {"enabled": true, "config": {"provider": "twilio"}}}},
        "web": {"enabled": true, "heartbeatSeconds": 60},
        "logging": {"level": "debug"}
    })
}

fn template_doc(timeout: u64) -> Value {
    json!({"apiVersion": "clusterclaw.io/v1", "kind": "ConfigTemplate",
        "metadata": {"name": "default"}, "spec": {"config": template_layer(timeout)}})
}

fn base_docs() -> Vec<Value> {
    vec![
        template_doc(600),
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": TENANT},
            "spec": {"config": tenant_layer()}}),
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project",
            "metadata": {"name": PROJECT, "tenant": TENANT}, "spec": {"config": project_layer()}}),
    ]
}

fn instance_doc(name: &str, replicas: usize) -> Value {
    json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
        "metadata": {"name": name, "tenant": TENANT, "project": PROJECT},
        "spec": {"version": "2026.7.1", "replicas": replicas,
            // Every replica at once: the figure is the change's propagation, not a paced update.
            "updateStrategy": {"maxUnavailable": "100%"},
            "resources": {"cpu": "10m", "memory": "32Mi"},
            "config": instance_layer(name)}})
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

// -------------------------------------------------------------------------------- fleet

/// Enrolls `host` as the agent does: a fresh key and CSR, the host's capacity, the join token
/// over the agent port (TLS, trusting the cluster CA), then the identity saved in its data dir.
fn enroll_host(host: &FleetHost, url: &str, ca_pem: &str, token: &str) -> anyhow::Result<()> {
    let (key, csr) = enroll::new_key_and_csr(host.name())?;
    let capacity = HostMetrics::new(host.data_dir())
        .map(|mut m| m.sample().capacity)
        .map_err(|e| anyhow::anyhow!("host figures: {e}"))?;
    let request = pb::EnrollRequest {
        join_token: token.to_string(),
        csr_pem: csr,
        hostname: host.name().to_string(),
        labels: HashMap::new(),
        capacity: Some(capacity.to_proto()),
        agent_version: clusterclaw_agent::sync::AGENT_VERSION.to_string(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
    };
    let response = host.block_on(async {
        let mut client = clusterclaw_agent::client::anonymous(url, ca_pem)?;
        let answer = client
            .enroll(request)
            .await
            .map_err(|s| anyhow::anyhow!("enroll {}: {}", host.name(), s.message()))?;
        Ok::<_, anyhow::Error>(answer.into_inner())
    })??;
    enroll::save(&host.identity_files(), &key, &response, url)?;
    Ok(())
}

/// The instances as listed by the API.
fn instances(server: &TestServer) -> Vec<Value> {
    server
        .get_json(&format!(
            "/api/v1/tenants/{TENANT}/projects/{PROJECT}/instances"
        ))
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Whether the server shows every replica Ready on its instance's current config revision.
fn converged(server: &TestServer) -> bool {
    let items = instances(server);
    items.len() == INSTANCES
        && items.iter().all(|i| {
            let rev = i.pointer("/status/configRevision");
            i.pointer("/status/readyReplicas") == Some(&json!(REPLICAS))
                && i.pointer("/status/replicaStatus")
                    .and_then(Value::as_array)
                    .is_some_and(|rs| {
                        rs.len() == REPLICAS && rs.iter().all(|r| r.get("configRevision") == rev)
                    })
        })
}

/// What one host did in one run, as offsets from just before the PUT.
struct HostRun {
    /// The long poll that brought the change returned.
    answered: Option<Duration>,
    /// The new assignments were saved and handed to the reconciler.
    received: Option<Duration>,
    first_create: Duration,
    /// The last of its replicas got its new container: the host has acted on the change.
    acted: Duration,
}

/// Per host: done when every replica of `before` has a later revision's container.
fn host_done(
    now: &HashMap<String, Created>,
    before: &HashMap<String, Created>,
) -> Option<Vec<Instant>> {
    before
        .iter()
        .map(|(k, b)| now.get(k).filter(|c| c.revision > b.revision).map(|c| c.at))
        .collect()
}

/// The PUTs' server-side times from the server's access log (debug level), oldest first.
fn put_times_in_log(log: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| {
            l.contains("request served")
                && l.contains("PUT")
                && l.contains("/api/v1/configtemplates/default")
        })
        .filter_map(|l| {
            let at = l.find("elapsed_us")?;
            let digits: String = l[at + "elapsed_us".len()..]
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok().map(Duration::from_micros)
        })
        .collect()
}

fn fleet() -> anyhow::Result<()> {
    // The change reaches every instance in one wave, without a bake time.
    let server = TestServer::start_with(&["--fleet-waves", "100%", "--fleet-bake-time", "0s"])?;
    let ca_path = server
        .endpoints()
        .ca_cert
        .clone()
        .context("endpoints.json names no CA certificate")?;
    let ca_pem =
        std::fs::read_to_string(&ca_path).with_context(|| format!("read {}", ca_path.display()))?;
    let url = format!("https://{}", server.endpoints().agent);
    let token = join_token(&server, HOSTS as u32, "10m");
    let stub = HealthStub::start(STUB_PORTS)?;

    let setup = Instant::now();
    let mut hosts = Vec::with_capacity(HOSTS);
    for i in 0..HOSTS {
        let mut host = FleetHost::new(&format!("fleet-{i:02}"))?;
        enroll_host(&host, &url, &ca_pem, &token)?;
        host.start(stub.ports())?;
        hosts.push(host);
    }
    wait_for("10 hosts Ready", SETUP_TIMEOUT, || {
        let list = server.get_json("/api/v1/hosts");
        let ready = list["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|h| h.pointer("/status/phase") == Some(&json!("Ready")))
                    .count()
            })
            .unwrap_or(0);
        Ok((ready == HOSTS).then_some(()))
    })?;
    let mut docs = base_docs();
    docs.extend((0..INSTANCES).map(|i| instance_doc(&format!("bot-{i:03}"), REPLICAS)));
    apply(&server, docs)?;
    wait_for("1,000 replicas created", SETUP_TIMEOUT, || {
        let created: usize = hosts.iter().map(|h| h.engine().running()).sum();
        Ok((created == INSTANCES * REPLICAS).then_some(()))
    })?;
    let spread: Vec<usize> = hosts.iter().map(|h| h.engine().running()).collect();
    ensure!(
        spread.iter().all(|n| *n == PER_HOST),
        "the scheduler did not place {PER_HOST} replicas on every host: {spread:?}"
    );
    wait_for("1,000 replicas Ready", SETUP_TIMEOUT, || {
        Ok(converged(&server).then_some(()))
    })?;
    let setup_took = setup.elapsed();
    std::thread::sleep(SETTLE);

    let mut slowest = Vec::new();
    let mut medians = Vec::new();
    let mut puts = Vec::new();
    let mut visible = Vec::new();
    let mut lines = Vec::new();
    for run in 1..=RUNS {
        let before: Vec<HashMap<String, Created>> =
            hosts.iter().map(|h| h.engine().created()).collect();
        let seen_before: Vec<usize> = hosts.iter().map(|h| h.received().len()).collect();
        for h in &hosts {
            h.engine().fake().clear_calls();
        }
        let body = template_doc(600 + run as u64 * 10).to_string();
        let t0 = Instant::now();
        let r = server.http(
            "PUT",
            "/api/v1/configtemplates/default",
            Some(&body),
            Some(server.admin_token()),
        );
        let put = t0.elapsed();
        ensure!(r.status == 200, "PUT the template: {} {}", r.status, r.body);

        let mut done: Vec<Option<HostRun>> = (0..HOSTS).map(|_| None).collect();
        let deadline = t0 + RUN_TIMEOUT;
        while done.iter().any(Option::is_none) {
            for (i, h) in hosts.iter().enumerate() {
                if done[i].is_some() {
                    continue;
                }
                let Some(ats) = h.engine().with_created(|now| host_done(now, &before[i])) else {
                    continue;
                };
                let first = ats.iter().min().copied().unwrap_or(t0);
                let last = ats.iter().max().copied().unwrap_or(t0);
                let received = h
                    .received()
                    .get(seen_before[i])
                    .map(|(_, at)| at.saturating_duration_since(t0));
                let answered = h
                    .answered()
                    .iter()
                    .find(|(_, at)| *at >= t0)
                    .map(|(_, at)| at.saturating_duration_since(t0));
                done[i] = Some(HostRun {
                    answered,
                    received,
                    first_create: first.saturating_duration_since(t0),
                    acted: last.saturating_duration_since(t0),
                });
            }
            if Instant::now() > deadline {
                let late: Vec<&str> = hosts
                    .iter()
                    .zip(&done)
                    .filter(|(_, d)| d.is_none())
                    .map(|(h, _)| h.name())
                    .collect();
                bail!("run {run}: hosts {late:?} did not act within {RUN_TIMEOUT:?}");
            }
            // The engine stamps each create itself: polling only has to notice.
            std::thread::sleep(POLL);
        }
        let runs: Vec<HostRun> = done.into_iter().flatten().collect();
        let acted: Vec<Duration> = runs.iter().map(|r| r.acted).collect();
        let answered: Vec<Duration> = runs.iter().filter_map(|r| r.answered).collect();
        let received: Vec<Duration> = runs.iter().filter_map(|r| r.received).collect();
        let first: Vec<Duration> = runs.iter().map(|r| r.first_create).collect();
        let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
        let min = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
        // The server's view, polled only once every host has acted (so as not to load it
        // during the measurement): a coarse figure.
        wait_for(
            "the server to show the new revision Ready",
            RUN_TIMEOUT,
            || Ok(converged(&server).then_some(())),
        )?;
        let seen = t0.elapsed();
        std::thread::sleep(SETTLE);
        // What the change cost each host in engine calls and assignment sets: one new
        // container per replica, no restarts, one set, unless something churns.
        let (mut creates, mut restarts, mut sets) = (0, 0, Vec::with_capacity(HOSTS));
        for (i, h) in hosts.iter().enumerate() {
            for call in h.engine().fake().mutations() {
                match call {
                    FakeCall::CreateAndStart(..) => creates += 1,
                    FakeCall::StartContainer(_) => restarts += 1,
                    _ => {}
                }
            }
            sets.push(h.received().len() - seen_before[i]);
        }
        lines.push(format!(
            "  run {run}: slowest {:.3} s  median {:.3} s  | PUT {:.0} ms | long polls answered {:.3}..{:.3} s | assignments saved {:.3}..{:.3} s | first create {:.3}..{:.3} s | server shows all Ready {:.2} s | {creates} creates, {restarts} restarts, {}..{} assignment sets per host",
            secs(max(&acted)),
            secs(median(&acted)),
            ms(put),
            secs(min(&answered)),
            secs(max(&answered)),
            secs(min(&received)),
            secs(max(&received)),
            secs(min(&first)),
            secs(max(&first)),
            secs(seen),
            sets.iter().min().copied().unwrap_or(0),
            sets.iter().max().copied().unwrap_or(0),
        ));
        slowest.push(max(&acted));
        medians.push(median(&acted));
        puts.push(put);
        visible.push(seen);
    }

    // The last template again, unchanged: no revision, and no host should touch a container.
    for h in &hosts {
        h.engine().fake().clear_calls();
    }
    let seen_before: Vec<usize> = hosts.iter().map(|h| h.received().len()).collect();
    let r = server.http(
        "PUT",
        "/api/v1/configtemplates/default",
        Some(&template_doc(600 + RUNS as u64 * 10).to_string()),
        Some(server.admin_token()),
    );
    ensure!(
        r.status == 200,
        "PUT the same template: {} {}",
        r.status,
        r.body
    );
    std::thread::sleep(SETTLE * 2);
    let mut unchanged_mutations = 0;
    let mut unchanged_sets = 0;
    for (i, h) in hosts.iter().enumerate() {
        unchanged_mutations += h.engine().fake().mutations().len();
        unchanged_sets += h.received().len() - seen_before[i];
    }

    let mut revisions: Vec<u64> = instances(&server)
        .iter()
        .filter_map(|i| i.pointer("/status/configRevision").and_then(Value::as_u64))
        .collect();
    revisions.sort_unstable();
    revisions.dedup();

    // What a quiet fleet of this size costs: the server answering reports and probes' results,
    // and the 10 agents (this process, less its idle main thread).
    let server_pid = server.pid().context("the server is not running")?;
    let (server_cpu, agents_cpu) = (cpu_time(server_pid)?, cpu_time(std::process::id())?);
    let idle = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let share = |d: Duration| d.as_secs_f64() / idle.elapsed().as_secs_f64() * 100.0;
    let server_cpu = share(cpu_time(server_pid)?.saturating_sub(server_cpu));
    let agents_cpu = share(cpu_time(std::process::id())?.saturating_sub(agents_cpu));

    let figure = median(&slowest);
    println!(
        "fleet: {HOSTS} in-process agents (real host loops, mTLS, FakeRuntime engine), {INSTANCES} instances x {REPLICAS} replicas, set up in {:.1} s",
        secs(setup_took)
    );
    for l in &lines {
        println!("{l}");
    }
    println!(
        "template change -> all {HOSTS} agents acted: median of slowest {:.2} s (runs: {})   target < {:.0} s: {}",
        secs(figure),
        slowest
            .iter()
            .map(|d| format!("{:.2}", secs(*d)))
            .collect::<Vec<_>>()
            .join(", "),
        secs(TARGET),
        if figure < TARGET { "PASS" } else { "FAIL" }
    );
    println!(
        "config revisions of the {INSTANCES} instances after {RUNS} changes: {revisions:?} (expected [{}])",
        RUNS + 1
    );
    println!(
        "template change -> median agent acted: median {:.2} s; PUT (revises {INSTANCES} instances): median {:.0} ms; server shows all Ready on the new revision: median {:.2} s",
        secs(median(&medians)),
        ms(median(&puts)),
        secs(median(&visible))
    );
    println!(
        "the same template PUT again: {unchanged_sets} assignment sets sent, {unchanged_mutations} engine changes (expected 0 and 0)"
    );
    println!(
        "idle fleet over {IDLE_WINDOW:?}: server {server_cpu:.1}% of one core, the {HOSTS} agents together {agents_cpu:.1}%"
    );
    // The runs' PUTs are the first to that path; the unchanged one comes after them.
    let server_side = put_times_in_log(&server.log());
    if let Some(timed) = server_side.get(..RUNS) {
        println!(
            "PUT server-side (access log): median {:.0} ms (runs: {}); unchanged: {:.1} ms",
            ms(median(timed)),
            timed
                .iter()
                .map(|d| format!("{:.0}", ms(*d)))
                .collect::<Vec<_>>()
                .join(", "),
            server_side.get(RUNS).map_or(f64::NAN, |d| ms(*d))
        );
    }
    drop(hosts);
    drop(stub);
    Ok(())
}

// ------------------------------------------------------------------------------- render

fn render() -> anyhow::Result<()> {
    let server = TestServer::start()?;
    let mut docs = base_docs();
    docs.push(instance_doc("bot", 1));
    apply(&server, docs)?;
    let layers_size: usize = [
        template_layer(600),
        tenant_layer(),
        project_layer(),
        instance_layer("bot"),
    ]
    .iter()
    .map(|l| l.to_string().len())
    .sum();

    let scoped = [
        "config",
        "render",
        "instance",
        "bot",
        "--explain",
        "-t",
        TENANT,
        "-p",
        PROJECT,
    ];
    let out = server.cli(&scoped);
    ensure!(
        out.code == 0,
        "config render failed ({}): {}",
        out.code,
        out.stderr
    );
    for layer in ["configtemplate/default", TENANT, PROJECT, "bot"] {
        ensure!(
            out.stdout.contains(layer),
            "the explained file names no layer {layer:?}:\n{}",
            out.stdout
        );
    }
    let time_cli = |args: &[&str]| -> anyhow::Result<Vec<Duration>> {
        for _ in 0..3 {
            server.cli(args);
        }
        let mut v = Vec::with_capacity(CLI_RUNS);
        for _ in 0..CLI_RUNS {
            let t = Instant::now();
            let out = server.cli(args);
            v.push(t.elapsed());
            ensure!(out.code == 0, "config render failed: {}", out.stderr);
        }
        v.sort();
        Ok(v)
    };
    let cli = time_cli(&scoped)?;
    let by_name = time_cli(&scoped[..5])?;

    let path =
        format!("/api/v1/tenants/{TENANT}/projects/{PROJECT}/instances/bot/config?explain=true");
    for _ in 0..5 {
        server.get_json(&path);
    }
    let mut http = Vec::with_capacity(HTTP_RUNS);
    for _ in 0..HTTP_RUNS {
        let t = Instant::now();
        let r = server.http("GET", &path, None, Some(server.admin_token()));
        http.push(t.elapsed());
        ensure!(r.status == 200, "GET {path}: {} {}", r.status, r.body);
    }
    http.sort();

    let p50 = percentile(&cli, 0.5);
    println!(
        "render: instance with four layers ({layers_size} bytes of layers, {} bytes explained)",
        out.stdout.len()
    );
    println!(
        "config render instance bot --explain -t -p (CLI)   median {:.1} ms  p95 {:.1} ms over {CLI_RUNS}   target < {:.0} ms: {}",
        ms(p50),
        ms(percentile(&cli, 0.95)),
        ms(RENDER_TARGET),
        if p50 < RENDER_TARGET { "PASS" } else { "FAIL" }
    );
    println!(
        "config render instance bot --explain (name only)   median {:.1} ms  p95 {:.1} ms over {CLI_RUNS}",
        ms(percentile(&by_name, 0.5)),
        ms(percentile(&by_name, 0.95))
    );
    println!(
        "GET .../config?explain=true (HTTP alone)          median {:.2} ms  p95 {:.2} ms over {HTTP_RUNS}",
        ms(percentile(&http, 0.5)),
        ms(percentile(&http, 0.95))
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let part = std::env::var("CLUSTERCLAW_BENCH_PART").unwrap_or_default();
    println!(
        "config center figures ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    if part.is_empty() || part == "render" {
        render()?;
    }
    if part.is_empty() || part == "fleet" {
        fleet()?;
    }
    Ok(())
}
