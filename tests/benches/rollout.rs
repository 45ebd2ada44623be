//! Rollout figures against the real release server binary, driven through its REST API:
//!
//! 1. `fleet`: a Rolling update of 1,000 replicas (10 instances × 100 replicas, spread over 10
//!    hosts) with `maxUnavailable: 10%` and `minReadySeconds: 1`. Every replica needs
//!    [`TIME_TO_READY`] after its container is created before its `/readyz` says ready, so one
//!    wave of 10 replicas per instance passes its gate no sooner than the gate time
//!    (`TIME_TO_READY + minReadySeconds`), and the update of an instance no sooner than
//!    10 waves × the gate time: the minimum its strategy allows (the 10 instances roll at the
//!    same time). Per run: the total time from just before the change is applied until the API
//!    shows every replica Ready on the new revision and the update `Succeeded`, and its ratio
//!    to the minimum (target within 1.5x; the minimum leaves out the agents' probe and report
//!    intervals, which every gate waits for too). And the control plane's own overhead per
//!    wave, p50 and p99 (target under 50 ms): a Rolling update slides, it has no discrete
//!    waves, so it is measured per replica moved because a gate passed. The server records
//!    with each `ReplicaTargetMoved` event its gate decision: how long after the gate that let
//!    it move passed (`readySince`, the time the report saying Ready was applied, plus
//!    `minReadySeconds`) the controller moved it (also the histogram
//!    `clusterclaw_rollout_gate_decision_seconds` on `/metrics`). The overhead adds the way to
//!    the host: from the event to the return of the long poll that brought the new assignment
//!    to its host (the controller's write, the assignment book and the long poll). The figures
//!    are medians over [`RUNS`] runs (`CLUSTERCLAW_BENCH_RUNS` overrides). Each run also prints
//!    where a wave's time goes, stage by stage (p50 and p99 over the replicas): a replica ready
//!    on its host → the report saying so taken by its agent's report stream → applied on the
//!    server (`readySince`) → its gate passed and the next targets moved → the long poll
//!    answered on their host → their new containers created.
//! 2. `gate`: gate decision latency. One instance of 10 replicas with `maxUnavailable: 1`: from
//!    the moment the API shows a replica Ready on the new revision to the creation of the next
//!    replica's new container on its host (target under 1 s + `minReadySeconds`), median and
//!    maximum over the 9 decisions of each run.
//!
//! The 10 agents run in this process as real agent code (as in the config-center bench): each
//! host enrolls with a join token over the server's real agent port (real mutual TLS), runs the
//! agent's own host loops and the real reconciler on its own two-worker runtime, and only the
//! engine is the agent library's in-memory `FakeRuntime`. Each host has its own health stub,
//! gated by a [`ReadyGate`]: a replica's `/readyz` answers ready [`TIME_TO_READY`] after the
//! fake created its container.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench rollout`; `CLUSTERCLAW_BENCH_PART=fleet`
//! or `gate` runs one part.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use clusterclaw_agent::enroll;
use clusterclaw_agent::metrics::HostMetrics;
use clusterclaw_agent::probe::ProbeSettings;
use clusterclaw_proto::agent as pb;
use clusterclaw_tests::agent::{join_token, percentile, wait_for};
use clusterclaw_tests::fleet::{FleetHost, HealthStub, Intervals, ReadyGate, TimedEngine};
use clusterclaw_tests::server::{TestServer, loop_passes_between};
use serde_json::{Value, json};

const HOSTS: usize = 10;
const INSTANCES: usize = 10;
const REPLICAS: usize = 100;
const MAX_UNAVAILABLE: &str = "10%";
/// Replicas per wave of one instance (10% of 100).
const PER_WAVE: usize = 10;
const WAVES: usize = REPLICAS.div_ceil(PER_WAVE);
const MIN_READY_SECONDS: u64 = 1;
/// The fake's time-to-ready: from a container's creation to its `/readyz` saying ready.
const TIME_TO_READY: Duration = Duration::from_millis(500);
const RUNS: usize = 3;
const RATIO_TARGET: f64 = 1.5;
/// A run this many times the minimum is slow: the server's log is saved for a look.
const SLOW_RUN_RATIO: f64 = 2.5;
const OVERHEAD_TARGET: Duration = Duration::from_millis(50);
/// The agents' report interval (short, so that it adds little to a gate).
const REPORT_INTERVAL: Duration = Duration::from_millis(250);
/// Ports each host's stub answers on: a host's replicas, with room to spare.
const STUB_PORTS: u16 = (INSTANCES * REPLICAS / HOSTS) as u16 + 40;
const SETUP_TIMEOUT: Duration = Duration::from_secs(180);
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a run looks at the API.
const POLL: Duration = Duration::from_millis(100);
/// How often the gate part looks at the API.
const GATE_POLL: Duration = Duration::from_millis(10);
const GATE_REPLICAS: usize = 10;
const GATE_RUNS: usize = 2;
/// Events shown when an update does not finish.
const DIAGNOSIS_EVENTS: usize = 40;

const TENANT: &str = "acme";
const PROJECT: &str = "rollout";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    if later >= earlier {
        ms(later - earlier)
    } else {
        -ms(earlier - later)
    }
}

fn median_f(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

fn runs() -> usize {
    std::env::var("CLUSTERCLAW_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(RUNS)
}

// ------------------------------------------------------------------------------ cluster

fn instance_doc(name: &str, replicas: usize, max_unavailable: Value, run: usize) -> Value {
    json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
        "metadata": {"name": name, "tenant": TENANT, "project": PROJECT},
        "spec": {"version": "2026.7.1", "replicas": replicas,
            "resources": {"cpu": "10m", "memory": "32Mi"},
            "env": {"BENCH_RUN": run.to_string()},
            "updateStrategy": {"type": "Rolling", "maxUnavailable": max_unavailable,
                "minReadySeconds": MIN_READY_SECONDS, "progressDeadline": "10m"}}})
}

fn base_docs() -> Vec<Value> {
    vec![
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": TENANT}}),
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project",
            "metadata": {"name": PROJECT, "tenant": TENANT}}),
    ]
}

fn fleet_names() -> Vec<String> {
    (0..INSTANCES).map(|i| format!("bot-{i:02}")).collect()
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

/// The agents' probes: the agent's defaults, as on a real host. A replica not ready yet is
/// probed every [`clusterclaw_agent::sync::STARTUP_PROBE_INTERVAL`] (100 ms) during its initial
/// delay (15 s) until it is first Ready, so its Ready is seen soon after its Gateway turns ready
/// (500 ms here) whatever the interval; a Ready one every probe interval (10 s), with 3 liveness
/// failures in a row tolerated (20-30 s). A readiness probe that fails once on a Ready replica
/// (a timeout on a loaded machine) holds it not Ready until the next one, 10 s later, which
/// would show as a slow run. Until 2026-12-06 this bench probed every replica every 500 ms
/// (with 60 failures tolerated), which added nothing to a gate, since starting replicas are
/// probed every 100 ms anyway, but 4,000 connections a second from its 10 agents to their
/// Gateways' stubs, on the two cores the server shares with them, which the server's figures
/// then measured.
fn probe_settings() -> ProbeSettings {
    ProbeSettings::default()
}

/// The machine's 1-minute load average, as the kernel gives it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// Restarts the agents made of the replicas of `names` (their `restarts`, summed).
fn restarts(server: &TestServer, names: &[String]) -> anyhow::Result<u64> {
    let mut total = 0;
    for name in names {
        let v = instance(server, name)?;
        total += v
            .pointer("/status/replicaStatus")
            .and_then(Value::as_array)
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| r["restarts"].as_u64())
                    .sum::<u64>()
            })
            .unwrap_or(0);
    }
    Ok(total)
}

/// The server, and 10 hosts each with its gated engine and health stub.
struct Fleet {
    hosts: Vec<FleetHost>,
    _stubs: Vec<HealthStub>,
    server: TestServer,
}

fn start_fleet() -> anyhow::Result<Fleet> {
    let server = TestServer::start()?;
    let ca_path = server
        .endpoints()
        .ca_cert
        .clone()
        .context("endpoints.json names no CA certificate")?;
    let ca_pem =
        std::fs::read_to_string(&ca_path).with_context(|| format!("read {}", ca_path.display()))?;
    let url = format!("https://{}", server.endpoints().agent);
    let token = join_token(&server, HOSTS as u32, "10m");
    let intervals = Intervals {
        report: Some(REPORT_INTERVAL),
        resync: None,
        probe: Some(probe_settings()),
    };
    let mut hosts = Vec::with_capacity(HOSTS);
    let mut stubs = Vec::with_capacity(HOSTS);
    for i in 0..HOSTS {
        let gate = ReadyGate::new(TIME_TO_READY);
        let stub = HealthStub::start_gated(STUB_PORTS, Some(Arc::clone(&gate)))?;
        let mut host = FleetHost::with_engine(&format!("roll-{i:02}"), TimedEngine::gated(gate))?;
        enroll_host(&host, &url, &ca_pem, &token)?;
        host.start_with(stub.ports(), &intervals)?;
        hosts.push(host);
        stubs.push(stub);
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
    apply(&server, base_docs())?;
    Ok(Fleet {
        hosts,
        _stubs: stubs,
        server,
    })
}

fn instance(server: &TestServer, name: &str) -> anyhow::Result<Value> {
    let path = format!("/api/v1/tenants/{TENANT}/projects/{PROJECT}/instances/{name}");
    let r = server.http("GET", &path, None, Some(server.admin_token()));
    ensure!(r.status == 200, "GET {path}: {} {}", r.status, r.body);
    Ok(serde_json::from_str(&r.body)?)
}

/// The revision an instance's update has finished on: `status.rollout.phase` Succeeded and
/// every replica Ready with target and running revision both equal to `status.rollout.revision`.
fn finished_revision(v: &Value, replicas: usize) -> Option<u64> {
    let revision = v.pointer("/status/rollout/revision")?.as_u64()?;
    let rs = v.pointer("/status/replicaStatus")?.as_array()?;
    let done = v.pointer("/status/rollout/phase") == Some(&json!("Succeeded"))
        && v.pointer("/status/readyReplicas") == Some(&json!(replicas))
        && rs.len() == replicas
        && rs.iter().all(|r| {
            r["state"] == "Ready"
                && r["targetRevision"].as_u64() == Some(revision)
                && r["configRevision"].as_u64() == Some(revision)
        });
    done.then_some(revision)
}

/// A new instance is up: every replica Ready; its revision (that of its update when it shows
/// one, else the replicas' target revision, else 0).
fn created_revision(v: &Value, replicas: usize) -> Option<u64> {
    let rs = v.pointer("/status/replicaStatus")?.as_array()?;
    let up = v.pointer("/status/readyReplicas") == Some(&json!(replicas))
        && rs.len() == replicas
        && rs.iter().all(|r| r["state"] == "Ready");
    let revision = v
        .pointer("/status/rollout/revision")
        .and_then(Value::as_u64)
        .or_else(|| rs.iter().filter_map(|r| r["targetRevision"].as_u64()).max())
        .unwrap_or(0);
    up.then_some(revision)
}

/// Waits until every instance of `names` has finished an update to a revision above `above`
/// (all of them when `above` is empty); their revisions.
fn wait_finished(
    server: &TestServer,
    names: &[String],
    replicas: usize,
    above: &BTreeMap<String, u64>,
    timeout: Duration,
    poll: Duration,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut done = BTreeMap::new();
        for name in names {
            let v = instance(server, name)?;
            let finished = if above.is_empty() {
                created_revision(&v, replicas)
            } else {
                finished_revision(&v, replicas)
            };
            match finished {
                Some(r) if above.get(name).is_none_or(|old| r > *old) => {
                    done.insert(name.clone(), r);
                }
                _ => break,
            }
        }
        if done.len() == names.len() {
            return Ok(done);
        }
        if Instant::now() > deadline {
            let first = names
                .iter()
                .find(|n| !done.contains_key(*n))
                .map(|n| instance(server, n))
                .transpose()?
                .unwrap_or_default();
            let replicas: Vec<String> = first
                .pointer("/status/replicaStatus")
                .and_then(Value::as_array)
                .map(|rs| {
                    rs.iter()
                        .map(|r| {
                            format!(
                                "{} {} target {} runs {}",
                                r["name"], r["state"], r["targetRevision"], r["configRevision"]
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let name = first
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            bail!(
                "after {timeout:?}, {} of {} instances had finished their update; the first \
                 not finished: rollout {} phase {}, replicas {replicas:?}\n{}",
                done.len(),
                names.len(),
                first
                    .pointer("/status/rollout")
                    .cloned()
                    .unwrap_or_default(),
                first.pointer("/status/phase").cloned().unwrap_or_default(),
                diagnosis(server, name),
            );
        }
        std::thread::sleep(poll);
    }
}

/// What tells why an update did not finish: the newest events of instance `name` (the agents'
/// restarts with their reasons among them), and where the server's log was saved.
fn diagnosis(server: &TestServer, name: &str) -> String {
    let path = format!("/api/v1/events?tenant={TENANT}&project={PROJECT}&for=instance/{name}");
    let r = server.http("GET", &path, None, Some(server.admin_token()));
    let events: Value = serde_json::from_str(&r.body).unwrap_or_default();
    let mut out: Vec<String> = events["items"]
        .as_array()
        .map(|items| {
            let skip = items.len().saturating_sub(DIAGNOSIS_EVENTS);
            items
                .iter()
                .skip(skip)
                .map(|e| {
                    format!(
                        "  {} {} {} x{}: {}",
                        e["lastTimestamp"].as_str().unwrap_or_default(),
                        e["involvedObject"]["replica"].as_str().unwrap_or_default(),
                        e["reason"].as_str().unwrap_or_default(),
                        e["count"],
                        e["message"].as_str().unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.insert(0, format!("the newest events of {name}:"));
    out.push(save_log(server, "clusterclaw-rollout-bench-server.log"));
    out.join("\n")
}

/// Saves the server's log as `file` in the temporary directory; says where, or why not.
fn save_log(server: &TestServer, file: &str) -> String {
    let saved = std::env::temp_dir().join(file);
    match std::fs::write(&saved, server.log()) {
        Ok(()) => format!("the server's log: {}", saved.display()),
        Err(e) => format!("the server's log could not be saved: {e}"),
    }
}

/// Server wall-clock times mapped onto this process's `Instant`s (same machine, same clock).
struct Clock {
    wall: SystemTime,
    at: Instant,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            wall: SystemTime::now(),
            at: Instant::now(),
        }
    }

    fn instant(&self, rfc3339: &str) -> Option<Instant> {
        let t = humantime::parse_rfc3339_weak(rfc3339).ok()?;
        match t.duration_since(self.wall) {
            Ok(after) => Some(self.at + after),
            Err(e) => self.at.checked_sub(e.duration()),
        }
    }
}

/// One replica's target moved to the new revision, as the server recorded it and its host saw it.
struct Move {
    /// The gate decision the server recorded with the move ([the module docs](self)), when a
    /// gate let it happen (not for the first wave of an update).
    decided_ms: Option<f64>,
    /// From the `ReplicaTargetMoved` event (server clock, taken right before the controller's
    /// write) to the return of the long poll that brought the new assignment to its host (the
    /// last one before its new container was created): the write, the assignment book and the
    /// long poll.
    to_host_ms: f64,
    /// From that long poll's return to the creation of the replica's new container: the
    /// agent saving the assignments and its reconciler acting on them.
    acted_ms: f64,
}

impl Move {
    /// The control plane's whole overhead for a move a gate let happen: its decision plus
    /// the way to the host.
    fn overhead_ms(&self) -> Option<f64> {
        self.decided_ms.map(|d| d + self.to_host_ms)
    }
}

/// "... (gate of bot-07 passed 12 ms before)" -> 12.
fn decided_ms(message: &str) -> Option<f64> {
    let rest = message.rsplit_once("(gate of ")?.1;
    let ms = rest.split_once(" passed ")?.1.strip_suffix(" ms before)")?;
    ms.parse().ok()
}

/// The stored events of instance `name` (the API's list; null when it cannot be read).
fn instance_events(fleet: &Fleet, name: &str) -> Value {
    let path =
        format!("/api/v1/events?tenant={TENANT}&project={PROJECT}&for=instance/{name}&limit=10000");
    let r = fleet
        .server
        .http("GET", &path, None, Some(fleet.server.admin_token()));
    serde_json::from_str(&r.body).unwrap_or_default()
}

/// The moves of the replicas of instance `name` to `revision` since `since` ([`Move`]).
fn moves(fleet: &Fleet, clock: &Clock, name: &str, revision: u64, since: Instant) -> Vec<Move> {
    let events = instance_events(fleet, name);
    let moved_to = format!(" moves to revision {revision}");
    let moved: HashMap<String, (Instant, Option<f64>)> = events["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|e| e["reason"] == "ReplicaTargetMoved")
                .filter_map(|e| {
                    let message = e["message"].as_str()?;
                    if !message.contains(&moved_to) {
                        return None;
                    }
                    let at = clock.instant(e["lastTimestamp"].as_str()?)?;
                    let replica = e["involvedObject"]["replica"].as_str()?;
                    (at >= since).then(|| (replica.to_owned(), (at, decided_ms(message))))
                })
                .collect()
        })
        .unwrap_or_default();
    let prefix = format!("{TENANT}/{PROJECT}/{name}-");
    let mut out = Vec::new();
    for h in &fleet.hosts {
        let answered: Vec<Instant> = h.answered().into_iter().map(|(_, at)| at).collect();
        h.engine().with_created(|created| {
            for (key, c) in created {
                if !key.starts_with(&prefix) || c.at < since || c.revision != revision {
                    continue;
                }
                let replica = key.rsplit('/').next().unwrap_or(key);
                let Some((at, decided)) = moved.get(replica) else {
                    continue;
                };
                if let Some(seen) = answered.iter().copied().filter(|a| *a <= c.at).max() {
                    out.push(Move {
                        decided_ms: *decided,
                        to_host_ms: signed_ms(seen, *at),
                        acted_ms: signed_ms(c.at, seen),
                    });
                }
            }
        });
    }
    out
}

/// Packets the kernel's connection tracking dropped so far (its table full, or an entry that
/// could not be inserted), summed over the CPUs; `None` without connection tracking. On a
/// machine whose firewall tracks loopback (Docker's does), the probes' thousands of short
/// connections a second can fill the table, and then packets of every connection are lost.
fn conntrack_drops() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/stat/nf_conntrack").ok()?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let columns: Vec<usize> = ["insert_failed", "drop", "early_drop"]
        .iter()
        .filter_map(|c| header.iter().position(|h| h == c))
        .collect();
    let mut total = 0u64;
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        for &c in &columns {
            total += fields
                .get(c)
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or(0);
        }
    }
    Some(total)
}

/// The events of instance `name` since `since`, counted by reason ("Reason xN, ...").
fn event_counts(fleet: &Fleet, clock: &Clock, name: &str, since: Instant) -> String {
    let events = instance_events(fleet, name);
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for e in events["items"].as_array().into_iter().flatten() {
        let recent = e["lastTimestamp"]
            .as_str()
            .and_then(|t| clock.instant(t))
            .is_some_and(|at| at >= since);
        if recent {
            *counts
                .entry(e["reason"].as_str().unwrap_or("?").to_string())
                .or_default() += e["count"].as_u64().unwrap_or(1);
        }
    }
    counts
        .iter()
        .map(|(r, n)| format!("{r} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The way of one replica's readiness on the new revision to the server, in milliseconds:
/// from its `/readyz` turning ready on its host (its container's creation + [`TIME_TO_READY`])
/// to the report saying Ready taken by the agent's report stream (the probe seeing it, the
/// report built and queued), and from there to the server having applied it (`readySince`,
/// server clock: the stream, the server's queue and the write).
struct Readiness {
    to_report_ms: f64,
    to_applied_ms: f64,
}

/// [`Readiness`] of every replica of instance `name` whose container on `revision` was
/// created since `since`.
fn readiness(
    fleet: &Fleet,
    clock: &Clock,
    name: &str,
    revision: u64,
    since: Instant,
) -> anyhow::Result<Vec<Readiness>> {
    let v = instance(&fleet.server, name)?;
    let applied: HashMap<String, Instant> = v
        .pointer("/status/replicaStatus")
        .and_then(Value::as_array)
        .map(|rs| {
            rs.iter()
                .filter(|r| r["configRevision"].as_u64() == Some(revision))
                .filter_map(|r| {
                    let at = clock.instant(r["readySince"].as_str()?)?;
                    Some((r["name"].as_str()?.to_owned(), at))
                })
                .collect()
        })
        .unwrap_or_default();
    let prefix = format!("{TENANT}/{PROJECT}/{name}-");
    let mut out = Vec::new();
    for h in &fleet.hosts {
        let made: Vec<(String, Instant)> = h.engine().with_created(|created| {
            created
                .iter()
                .filter(|(k, c)| k.starts_with(&prefix) && c.at >= since && c.revision == revision)
                .map(|(k, c)| (k.clone(), c.at))
                .collect()
        });
        for (key, created) in made {
            let replica = key.rsplit('/').next().unwrap_or(&key);
            let (Some(reported), Some(applied)) =
                (h.reported_ready(&key, revision), applied.get(replica))
            else {
                continue;
            };
            out.push(Readiness {
                to_report_ms: signed_ms(reported, created + TIME_TO_READY),
                to_applied_ms: signed_ms(*applied, reported),
            });
        }
    }
    Ok(out)
}

/// The server's gate-decision histogram on `/metrics`: (count, sum in seconds).
fn gate_histogram(server: &TestServer) -> anyhow::Result<(u64, f64)> {
    let r = server.http("GET", "/metrics", None, Some(server.admin_token()));
    ensure!(r.status == 200, "GET /metrics: {} {}", r.status, r.body);
    let value = |name: &str| {
        r.body
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
    };
    let count = value("clusterclaw_rollout_gate_decision_seconds_count")
        .context("/metrics has no clusterclaw_rollout_gate_decision_seconds")?;
    let sum = value("clusterclaw_rollout_gate_decision_seconds_sum").unwrap_or(0.0);
    Ok((count as u64, sum))
}

/// `q` (0..=1) of `v`, nearest rank.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() as f64 * q).ceil() as usize).clamp(1, s.len().max(1)) - 1;
    s.get(i).copied().unwrap_or(f64::NAN)
}

/// The creations since `since` of the replicas of `instance` (by replica name, in time order).
fn creations(fleet: &Fleet, instance: &str, since: Instant) -> Vec<(String, Instant)> {
    let prefix = format!("{TENANT}/{PROJECT}/{instance}-");
    let mut out: Vec<(String, Instant)> = fleet
        .hosts
        .iter()
        .flat_map(|h| {
            h.engine().with_created(|created| {
                created
                    .iter()
                    .filter(|(k, c)| k.starts_with(&prefix) && c.at >= since)
                    .map(|(k, c)| (k.rsplit('/').next().unwrap_or(k).to_owned(), c.at))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    out.sort_by_key(|(_, at)| *at);
    out
}

// -------------------------------------------------------------------------------- fleet

fn fleet_part() -> anyhow::Result<()> {
    let fleet = start_fleet()?;
    let names = fleet_names();
    let setup = Instant::now();
    apply(
        &fleet.server,
        names
            .iter()
            .map(|n| instance_doc(n, REPLICAS, json!(MAX_UNAVAILABLE), 0))
            .collect(),
    )?;
    let mut revisions = wait_finished(
        &fleet.server,
        &names,
        REPLICAS,
        &BTreeMap::new(),
        SETUP_TIMEOUT,
        POLL,
    )?;
    let spread: Vec<usize> = fleet.hosts.iter().map(|h| h.engine().running()).collect();
    println!(
        "fleet: 1,000 replicas Ready in {:.1} s, per host {spread:?}",
        setup.elapsed().as_secs_f64()
    );

    let gate_time = TIME_TO_READY + Duration::from_secs(MIN_READY_SECONDS);
    let minimum = gate_time * WAVES as u32;
    println!(
        "fleet: {INSTANCES} instances × {REPLICAS} replicas, maxUnavailable {MAX_UNAVAILABLE}: \
         {WAVES} waves × gate time {:.0} ms (time-to-ready {:.0} ms + minReadySeconds \
         {MIN_READY_SECONDS}) = minimum {:.1} s; agents probe a starting replica every {:.0} ms and \
         a Ready one every {:.0} ms, report every {:.0} ms",
        ms(gate_time),
        ms(TIME_TO_READY),
        minimum.as_secs_f64(),
        ms(clusterclaw_agent::sync::STARTUP_PROBE_INTERVAL),
        ms(probe_settings().interval),
        ms(REPORT_INTERVAL)
    );
    let mut totals = Vec::new();
    let mut ratios = Vec::new();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut move_p50s = Vec::new();
    let mut move_p99s = Vec::new();
    let mut decided_p50s = Vec::new();
    let mut decided_p99s = Vec::new();
    let mut clean_totals = Vec::new();
    let mut gates_before = gate_histogram(&fleet.server)?;
    let clock = Clock::now();
    for run in 1..=runs() {
        let restarted = restarts(&fleet.server, &names)?;
        let dropped_before = conntrack_drops();
        let passes = fleet.server.loop_passes();
        let writer_waits = fleet
            .server
            .histograms("clusterclaw_store_writer_wait_seconds");
        let writer_holds = fleet
            .server
            .histograms("clusterclaw_store_writer_held_seconds");
        let started = Instant::now();
        apply(
            &fleet.server,
            names
                .iter()
                .map(|n| instance_doc(n, REPLICAS, json!(MAX_UNAVAILABLE), run))
                .collect(),
        )?;
        let applied = started.elapsed();
        revisions = wait_finished(
            &fleet.server,
            &names,
            REPLICAS,
            &revisions,
            RUN_TIMEOUT,
            POLL,
        )?;
        let total = started.elapsed();
        let mut all = Vec::new();
        let mut ready = Vec::new();
        let mut created = 0;
        for name in &names {
            created += creations(&fleet, name, started).len();
            all.extend(moves(&fleet, &clock, name, revisions[name], started));
            ready.extend(readiness(&fleet, &clock, name, revisions[name], started)?);
        }
        ensure!(
            created == INSTANCES * REPLICAS,
            "run {run}: {created} replicas got a new container, not {}",
            INSTANCES * REPLICAS
        );
        let (gates, gate_secs) = gate_histogram(&fleet.server)?;
        let (gates, gate_secs) = (gates - gates_before.0, gate_secs - gates_before.1);
        gates_before = (gates_before.0 + gates, gates_before.1 + gate_secs);
        let restarted = restarts(&fleet.server, &names)?.saturating_sub(restarted);
        let ratio = total.as_secs_f64() / minimum.as_secs_f64();
        println!(
            "fleet run {run}:   control loop passes: {}",
            loop_passes_between(&passes, &fleet.server.loop_passes())
        );
        for (what, name, before) in [
            (
                "waits for",
                "clusterclaw_store_writer_wait_seconds",
                &writer_waits,
            ),
            (
                "holds",
                "clusterclaw_store_writer_held_seconds",
                &writer_holds,
            ),
        ] {
            for (labels, h) in fleet.server.histograms(name) {
                let h = h.since(&before.get(&labels).cloned().unwrap_or_default());
                println!(
                    "fleet run {run}:   the store's writer: {labels} {what} it {}",
                    h.summary()
                );
            }
        }
        let dropped = conntrack_drops()
            .zip(dropped_before)
            .map_or(0, |(after, before)| after.saturating_sub(before));
        if dropped > 0 {
            println!(
                "fleet run {run}: the kernel dropped {dropped} packets meanwhile (its connection \
                 tracking table was full: see /proc/net/stat/nf_conntrack); the probes' and the \
                 agents' connections lost packets, so this run measures the machine, not the \
                 control plane"
            );
        } else {
            clean_totals.push(total.as_secs_f64());
        }
        if ratio > SLOW_RUN_RATIO {
            println!(
                "fleet run {run}: slow ({ratio:.2}x the minimum); {}",
                save_log(
                    &fleet.server,
                    &format!("clusterclaw-rollout-bench-run{run}.log")
                )
            );
            println!(
                "fleet run {run}: events of {}: {}",
                names[0],
                event_counts(&fleet, &clock, &names[0], started)
            );
        }
        let decided: Vec<f64> = all.iter().filter_map(|m| m.decided_ms).collect();
        let run_overheads: Vec<f64> = all.iter().filter_map(Move::overhead_ms).collect();
        let moves: Vec<f64> = all.iter().map(|m| m.to_host_ms).collect();
        let acted: Vec<f64> = all.iter().map(|m| m.acted_ms).collect();
        let to_report: Vec<f64> = ready.iter().map(|r| r.to_report_ms).collect();
        let to_applied: Vec<f64> = ready.iter().map(|r| r.to_applied_ms).collect();
        // One wave's way, stage by stage (medians): what a wave takes beyond its gate time.
        let stages = [
            (
                "ready on its host → reported Ready (probe, agent)",
                &to_report,
            ),
            ("reported → applied on the server (readySince)", &to_applied),
            ("gate passed → next targets moved", &decided),
            ("target moved → long poll answered on its host", &moves),
            ("long poll answered → container created (agent)", &acted),
        ];
        let mut path = 0.0;
        for (stage, v) in stages {
            let (p50, p99) = (quantile(v, 0.5), quantile(v, 0.99));
            path += p50;
            println!(
                "fleet run {run}:   {stage}: p50 {p50:.0} ms, p99 {p99:.0} ms ({} samples)",
                v.len()
            );
        }
        println!(
            "fleet run {run}:   a wave: gate time {:.0} ms + the medians above {path:.0} ms = \
             {:.0} ms; measured {:.0} ms a wave ({WAVES} waves)",
            ms(gate_time),
            ms(gate_time) + path,
            total.as_secs_f64() * 1000.0 / WAVES as f64
        );
        let (p50, p99) = (
            quantile(&run_overheads, 0.5),
            quantile(&run_overheads, 0.99),
        );
        println!(
            "fleet run {run}: total {:.2} s ({ratio:.2}x the minimum; apply {:.0} ms); control \
             plane overhead per wave (gate passed → next replica's assignment on its host) \
             p50 {p50:.0} ms, p99 {p99:.0} ms over {} gated moves, of which the gate decision \
             p50 {:.0} ms, p99 {:.0} ms (/metrics: {gates} decisions, mean {:.0} ms) and \
             target moved → on its host p50 {:.0} ms, p99 {:.0} ms over {} moves; \
             {restarted} replica restarts; load average {}",
            total.as_secs_f64(),
            ms(applied),
            run_overheads.len(),
            quantile(&decided, 0.5),
            quantile(&decided, 0.99),
            if gates > 0 {
                gate_secs * 1000.0 / gates as f64
            } else {
                f64::NAN
            },
            quantile(&moves, 0.5),
            quantile(&moves, 0.99),
            moves.len(),
            load_average()
        );
        decided_p50s.push(quantile(&decided, 0.5));
        decided_p99s.push(quantile(&decided, 0.99));
        move_p50s.push(quantile(&moves, 0.5));
        move_p99s.push(quantile(&moves, 0.99));
        totals.push(total.as_secs_f64());
        ratios.push(ratio);
        p50s.push(p50);
        p99s.push(p99);
    }
    let ratio = median_f(&ratios);
    let (p50, p99) = (median_f(&p50s), median_f(&p99s));
    let dropped_runs = totals.len() - clean_totals.len();
    if dropped_runs > 0 {
        println!(
            "fleet: {dropped_runs} of {} runs lost packets to a full connection tracking table; \
             the median total of the others: {:.2} s ({:.2}x the minimum, over {} runs)",
            totals.len(),
            median_f(&clean_totals),
            median_f(&clean_totals) / minimum.as_secs_f64(),
            clean_totals.len()
        );
    }
    println!(
        "fleet: median total {:.2} s, {ratio:.2}x the minimum (target within {RATIO_TARGET}x: {}); \
         control plane overhead per wave p50 {p50:.0} ms, p99 {p99:.0} ms (target under {:.0} ms: \
         {}), of which the gate decision p50 {:.0} ms, p99 {:.0} ms and target moved → on its \
         host p50 {:.0} ms, p99 {:.0} ms",
        median_f(&totals),
        if ratio <= RATIO_TARGET {
            "met"
        } else {
            "MISSED"
        },
        ms(OVERHEAD_TARGET),
        if p99 < ms(OVERHEAD_TARGET) {
            "met"
        } else {
            "MISSED"
        },
        median_f(&decided_p50s),
        median_f(&decided_p99s),
        median_f(&move_p50s),
        median_f(&move_p99s),
    );
    Ok(())
}

// --------------------------------------------------------------------------------- gate

fn gate_part() -> anyhow::Result<()> {
    let fleet = start_fleet()?;
    let name = "gate".to_string();
    let names = vec![name.clone()];
    apply(
        &fleet.server,
        vec![instance_doc(&name, GATE_REPLICAS, json!(1), 0)],
    )?;
    let mut revisions = wait_finished(
        &fleet.server,
        &names,
        GATE_REPLICAS,
        &BTreeMap::new(),
        SETUP_TIMEOUT,
        POLL,
    )?;
    let target = Duration::from_secs(1 + MIN_READY_SECONDS);
    let mut all = Vec::new();
    for run in 1..=GATE_RUNS {
        let old = revisions[&name];
        let started = Instant::now();
        apply(
            &fleet.server,
            vec![instance_doc(&name, GATE_REPLICAS, json!(1), run)],
        )?;
        // When the API first shows each replica Ready on the new revision.
        let mut ready_seen: BTreeMap<String, Instant> = BTreeMap::new();
        let deadline = started + RUN_TIMEOUT;
        loop {
            let v = instance(&fleet.server, &name)?;
            let now = Instant::now();
            if let Some(rs) = v.pointer("/status/replicaStatus").and_then(Value::as_array) {
                for r in rs {
                    let on_new = r["configRevision"].as_u64().is_some_and(|c| c > old)
                        && r["targetRevision"] == r["configRevision"];
                    if on_new
                        && r["state"] == "Ready"
                        && let Some(replica) = r["name"].as_str()
                    {
                        ready_seen.entry(replica.to_owned()).or_insert(now);
                    }
                }
            }
            if let Some(r) = finished_revision(&v, GATE_REPLICAS).filter(|r| *r > old) {
                revisions.insert(name.clone(), r);
                break;
            }
            if now > deadline {
                bail!("gate run {run}: the update did not finish in {RUN_TIMEOUT:?}");
            }
            std::thread::sleep(GATE_POLL);
        }
        let made = creations(&fleet, &name, started);
        ensure!(
            made.len() == GATE_REPLICAS,
            "gate run {run}: {} replicas got a new container",
            made.len()
        );
        let mut decisions = Vec::new();
        let mut from_host_ready = Vec::new();
        for pair in made.windows(2) {
            let (replica, created) = &pair[0];
            let next = pair[1].1;
            if let Some(seen) = ready_seen.get(replica) {
                decisions.push(signed_ms(next, *seen));
            }
            from_host_ready.push(signed_ms(next, *created + TIME_TO_READY));
        }
        let mut sorted = decisions.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "gate run {run}: Ready shown by the API → next replica created: median {:.0} ms, \
             max {:.0} ms ({} decisions); ready on its host → next created: median {:.0} ms",
            median_f(&decisions),
            sorted.last().copied().unwrap_or(f64::NAN),
            decisions.len(),
            median_f(&from_host_ready)
        );
        all.extend(decisions);
    }
    let mut sorted = all.clone();
    sorted.sort_by(f64::total_cmp);
    let median = median_f(&all);
    let max = sorted.last().copied().unwrap_or(f64::NAN);
    println!(
        "gate: decision latency median {median:.0} ms, max {max:.0} ms (target under {:.0} ms = \
         1 s + minReadySeconds {MIN_READY_SECONDS}: {})",
        ms(target),
        if max < ms(target) { "met" } else { "MISSED" }
    );
    let durations: Vec<Duration> = sorted
        .iter()
        .filter(|v| **v >= 0.0)
        .map(|v| Duration::from_secs_f64(v / 1000.0))
        .collect();
    if !durations.is_empty() {
        println!("gate: p90 {:.0} ms", ms(percentile(&durations, 0.9)));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let part = std::env::var("CLUSTERCLAW_BENCH_PART").unwrap_or_default();
    println!(
        "rollout figures ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    if part.is_empty() || part == "gate" {
        gate_part()?;
    }
    if part.is_empty() || part == "fleet" {
        fleet_part()?;
    }
    Ok(())
}
