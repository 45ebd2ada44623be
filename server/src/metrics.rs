//! Prometheus text exposition: hosts and instances by phase, per-instance replica counts,
//! restarts, OOM kills, probe failures, drift repairs and rollout progress, per-host
//! heartbeat age, capacity and allocation, replica CPU and memory, the Gateways' own relayed
//! figures, certificate expiry, and agent RPC and API request counts and latencies.
//!
//! Label cardinality is bounded by the objects in the store: labels name a tenant, project,
//! instance, replica or host, a route template (never a raw path), a method, a status code or
//! a fixed reason, never a request or a container id. Counters of instances that no longer
//! exist are dropped; relayed Gateway figures are capped per replica ([`MAX_RELAYED_SERIES`]).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::agent_rpc::Reports;
use crate::model::{HostPhase, Kind, Resource, parse_cpu, parse_memory};
use crate::store::{Store, StoreError};

/// Upper bounds (seconds) of the RPC latency histogram.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Default, Clone, Copy)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    const EMPTY: Histogram = Histogram {
        counts: [0; BUCKETS.len()],
        sum: 0.0,
        count: 0,
    };
}

#[derive(Default)]
struct RpcFigures {
    requests: BTreeMap<(&'static str, String), u64>,
    latency: BTreeMap<&'static str, Histogram>,
}

#[derive(Default)]
struct HttpFigures {
    /// By route template, method and status code.
    requests: BTreeMap<(String, &'static str, u16), u64>,
    /// By route template, method and status code.
    latency: BTreeMap<(String, &'static str, u16), Histogram>,
}

/// What agents reported happening to an instance's containers, as counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum InstanceEvent {
    ContainerRestarted,
    OomKilled,
    ProbeFailed,
    ConfigDriftRepaired,
}

impl InstanceEvent {
    pub const ALL: [InstanceEvent; 4] = [
        InstanceEvent::ContainerRestarted,
        InstanceEvent::OomKilled,
        InstanceEvent::ProbeFailed,
        InstanceEvent::ConfigDriftRepaired,
    ];

    /// The event an agent's `reason` counts as, if any.
    pub fn of_reason(reason: &str) -> Option<InstanceEvent> {
        match reason {
            "ContainerRestarted" => Some(InstanceEvent::ContainerRestarted),
            "OOMKilled" => Some(InstanceEvent::OomKilled),
            "ProbeFailed" => Some(InstanceEvent::ProbeFailed),
            "ConfigDriftRepaired" => Some(InstanceEvent::ConfigDriftRepaired),
            _ => None,
        }
    }

    fn metric(self) -> (&'static str, &'static str) {
        match self {
            InstanceEvent::ContainerRestarted => (
                "clusterclaw_container_restarts_total",
                "Container restarts of an instance's replicas, as its agents reported them.",
            ),
            InstanceEvent::OomKilled => (
                "clusterclaw_oom_kills_total",
                "Containers of an instance killed for running out of memory.",
            ),
            InstanceEvent::ProbeFailed => (
                "clusterclaw_probe_failures_total",
                "Failed liveness probes of an instance's replicas (each restarts the container).",
            ),
            InstanceEvent::ConfigDriftRepaired => (
                "clusterclaw_config_drift_repairs_total",
                "Replicas of an instance whose config drift an agent repaired.",
            ),
        }
    }
}

type InstanceLabels = (String, String, String);

/// Most relayed Gateway series served per replica (the agent caps them first).
pub const MAX_RELAYED_SERIES: usize = 500;
/// Most bytes of relayed names and labels served per replica.
pub const MAX_RELAYED_BYTES: usize = 64 * 1024;
/// Labels the control plane sets on relayed series; a Gateway's own label of one of these names
/// is kept as `exported_<name>`.
const RELAY_LABELS: [&str; 5] = ["tenant", "project", "instance", "replica", "host"];

/// Counters kept by the server process.
#[derive(Default)]
pub struct Metrics {
    rpc: Mutex<RpcFigures>,
    http: Mutex<HttpFigures>,
    events: Mutex<BTreeMap<(InstanceLabels, InstanceEvent), u64>>,
    /// Expiry (Unix seconds) of the server's certificates, by name.
    certificates: Mutex<BTreeMap<String, i64>>,
    /// What this server knows of the leader lease.
    leader: Mutex<Option<crate::store::lease::LeaderStatus>>,
    /// What this server registers of itself among the server replicas, and whether the store
    /// took its last heartbeat.
    replica: Mutex<Option<crate::store::replicas::SelfView>>,
    /// The rollout controller's gate decisions (see [`Metrics::observe_gate_decision`]).
    gate_decisions: Mutex<Histogram>,
}

/// Prometheus' text for a sample value.
fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

fn valid_metric_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        })
}

fn valid_label_name(name: &str) -> bool {
    valid_metric_name(name) && !name.contains(':') && !name.starts_with("__")
}

fn http_method(m: &axum::http::Method) -> &'static str {
    match m.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

fn observe(h: &mut Histogram, took: Duration) {
    let secs = took.as_secs_f64();
    for (i, le) in BUCKETS.iter().enumerate() {
        if secs <= *le {
            h.counts[i] += 1;
        }
    }
    h.sum += secs;
    h.count += 1;
}

fn write_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let (inner, outer) = if labels.is_empty() {
        (String::new(), String::new())
    } else {
        (format!("{labels},"), format!("{{{labels}}}"))
    };
    for (i, le) in BUCKETS.iter().enumerate() {
        let _ = writeln!(out, "{name}_bucket{{{inner}le=\"{le}\"}} {}", h.counts[i]);
    }
    let _ = writeln!(out, "{name}_bucket{{{inner}le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{outer} {}", h.sum);
    let _ = writeln!(out, "{name}_count{outer} {}", h.count);
}

/// How long the control loops' passes took, by loop (a controller, or the assignment book).
/// Kept for the whole process, as the loops start and stop with leadership terms.
static LOOP_PASSES: Mutex<BTreeMap<&'static str, Histogram>> = Mutex::new(BTreeMap::new());

/// Records one pass of the control loop `name` (`scheduler`, `rollout`, `assignment book`...).
pub fn observe_loop_pass(name: &'static str, took: Duration) {
    let mut passes = LOOP_PASSES.lock().unwrap_or_else(|e| e.into_inner());
    observe(passes.entry(name).or_default(), took);
}

/// How long writes waited for the SQLite store's one writer connection, and held it: index 0
/// for the leader's controllers, 1 for anything else (status reports, the API, enrollment).
static STORE_WRITER: Mutex<[(Histogram, Histogram); 2]> = Mutex::new([
    (Histogram::EMPTY, Histogram::EMPTY),
    (Histogram::EMPTY, Histogram::EMPTY),
]);

const STORE_WRITERS: [&str; 2] = ["controllers", "other"];

/// Records a wait for the SQLite store's writer connection.
pub fn observe_store_writer_wait(controllers: bool, took: Duration) {
    let mut w = STORE_WRITER.lock().unwrap_or_else(|e| e.into_inner());
    observe(&mut w[usize::from(!controllers)].0, took);
}

/// Records how long the SQLite store's writer connection was held.
pub fn observe_store_writer_held(controllers: bool, took: Duration) {
    let mut w = STORE_WRITER.lock().unwrap_or_else(|e| e.into_inner());
    observe(&mut w[usize::from(!controllers)].1, took);
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn instance_labels(tenant: &str, project: &str, instance: &str) -> String {
    format!(
        "tenant=\"{}\",project=\"{}\",instance=\"{}\"",
        escape(tenant),
        escape(project),
        escape(instance)
    )
}

/// Now, in Unix milliseconds.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Records one agent RPC (for the long poll, the whole hold counts as latency).
    pub fn observe_rpc(&self, method: &'static str, code: tonic::Code, took: Duration) {
        let mut f = self.rpc.lock().unwrap_or_else(|e| e.into_inner());
        *f.requests.entry((method, format!("{code:?}"))).or_default() += 1;
        observe(f.latency.entry(method).or_default(), took);
    }

    /// Records one API request: `route` is the route template that matched (`None` for a
    /// path no route matches), never the raw path. For a stream, the time to its head.
    pub fn observe_http(
        &self,
        route: Option<&str>,
        method: &axum::http::Method,
        status: u16,
        took: Duration,
    ) {
        let route = route.unwrap_or("unmatched").to_string();
        let method = http_method(method);
        let mut f = self.http.lock().unwrap_or_else(|e| e.into_inner());
        *f.requests
            .entry((route.clone(), method, status))
            .or_default() += 1;
        observe(f.latency.entry((route, method, status)).or_default(), took);
    }

    /// Counts what an agent reported happening to a replica of an instance.
    pub fn count_event(&self, tenant: &str, project: &str, instance: &str, event: InstanceEvent) {
        let mut f = self.events.lock().unwrap_or_else(|e| e.into_inner());
        *f.entry((
            (
                tenant.to_string(),
                project.to_string(),
                instance.to_string(),
            ),
            event,
        ))
        .or_default() += 1;
    }

    /// Records one gate decision of the rollout controller: from a replica passing its gate
    /// (its Ready report applied, plus `minReadySeconds`) to the targets that gate let move.
    pub fn observe_gate_decision(&self, took: Duration) {
        observe(
            &mut self
                .gate_decisions
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
            took,
        );
    }

    /// Records when one of the server's certificates expires (Unix seconds).
    pub fn set_certificate_expiry(&self, name: &str, not_after_unix: i64) {
        self.certificates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), not_after_unix);
    }

    /// Records what this server knows of the leader lease.
    pub fn set_leader(&self, status: crate::store::lease::LeaderStatus) {
        *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
    }

    /// What this server knows of the leader lease (`None` before the election started).
    pub fn leader(&self) -> Option<crate::store::lease::LeaderStatus> {
        self.leader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records what this server registers of itself.
    pub fn set_replica(&self, view: crate::store::replicas::SelfView) {
        *self.replica.lock().unwrap_or_else(|e| e.into_inner()) = Some(view);
    }

    /// What this server registers of itself (`None` before its first heartbeat).
    pub fn replica(&self) -> Option<crate::store::replicas::SelfView> {
        self.replica
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The exposition text (blocking: reads the store).
    pub fn render(&self, store: &dyn Store, reports: &Reports) -> Result<String, StoreError> {
        let mut out = String::with_capacity(16 * 1024);
        let now = now_ms();
        let heartbeats = store.host_heartbeats()?;
        let mut hosts: BTreeMap<&str, u64> = [("Ready", 0), ("NotReady", 0), ("Unknown", 0)].into();
        // Hosts whose agent stopped reporting: their last figures are not current.
        let mut silent: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut per_host = String::new();
        let mut ready_lines = String::new();
        let mut age_lines = String::new();
        let mut cap_lines = String::new();
        let mut alloc_lines = String::new();
        // Through the decoded cache: a scrape decodes only what was written since the last
        // look (at 10,000 hosts, decoding every host and instance took about two thirds of a
        // scrape's 220 ms of CPU).
        let no_status = Default::default();
        for d in crate::store::decoded::list_decoded(store, Kind::Host)?.iter() {
            let Ok(Resource::Host(h)) = &d.resource else {
                continue;
            };
            let name = h.metadata.name.clone();
            let status = h.status.as_ref().unwrap_or(&no_status);
            let phase = match status.phase {
                HostPhase::Ready => "Ready",
                HostPhase::NotReady => {
                    silent.insert(name.clone());
                    "NotReady"
                }
                HostPhase::Unknown => "Unknown",
            };
            *hosts.entry(phase).or_default() += 1;
            let l = format!("host=\"{}\"", escape(&name));
            let _ = writeln!(
                ready_lines,
                "clusterclaw_host_ready{{{l}}} {}",
                u8::from(status.phase == HostPhase::Ready)
            );
            if let Some(at) = heartbeats.get(&name) {
                let _ = writeln!(
                    age_lines,
                    "clusterclaw_host_heartbeat_age_seconds{{{l}}} {}",
                    (now - at).max(0) as f64 / 1000.0
                );
            }
            let cpu = parse_cpu(&h.spec.capacity.cpu.0).unwrap_or(0) as f64 / 1000.0;
            let memory = parse_memory(&h.spec.capacity.memory.0).unwrap_or(0);
            let _ = writeln!(
                cap_lines,
                "clusterclaw_host_capacity{{{l},resource=\"cpu\"}} {cpu}\nclusterclaw_host_capacity{{{l},resource=\"memory\"}} {memory}"
            );
            let a = &status.allocated;
            let _ = writeln!(
                alloc_lines,
                "clusterclaw_host_allocated{{{l},resource=\"cpu\"}} {}\nclusterclaw_host_allocated{{{l},resource=\"memory\"}} {}\nclusterclaw_host_allocated{{{l},resource=\"replicas\"}} {}",
                a.cpu_millis as f64 / 1000.0,
                a.memory_bytes,
                a.replicas.unwrap_or(0)
            );
        }
        header(&mut out, "clusterclaw_hosts", "gauge", "Hosts by phase.");
        for (phase, n) in hosts {
            let _ = writeln!(out, "clusterclaw_hosts{{phase=\"{phase}\"}} {n}");
        }
        header(
            &mut per_host,
            "clusterclaw_host_ready",
            "gauge",
            "1 while a host is Ready, 0 while it is NotReady or Unknown.",
        );
        per_host.push_str(&ready_lines);
        header(
            &mut per_host,
            "clusterclaw_host_heartbeat_age_seconds",
            "gauge",
            "Seconds since a host's agent last reported.",
        );
        per_host.push_str(&age_lines);
        header(
            &mut per_host,
            "clusterclaw_host_capacity",
            "gauge",
            "What a host offers the scheduler: cpu in cores, memory in bytes.",
        );
        per_host.push_str(&cap_lines);
        header(
            &mut per_host,
            "clusterclaw_host_allocated",
            "gauge",
            "What the scheduler placed on a host: cpu in cores, memory in bytes, replicas.",
        );
        per_host.push_str(&alloc_lines);
        out.push_str(&per_host);

        let mut instances: BTreeMap<String, u64> =
            ["Pending", "Progressing", "Running", "Degraded", "Failed"]
                .iter()
                .map(|p| (p.to_string(), 0))
                .collect();
        let mut replicas: BTreeMap<String, u64> = [
            "Pending",
            "Pulling",
            "Starting",
            "Running",
            "Ready",
            "Unhealthy",
            "CrashLoopBackOff",
            "Failed",
            "Unknown",
        ]
        .iter()
        .map(|s| (s.to_string(), 0))
        .collect();
        let mut existing: std::collections::HashSet<InstanceLabels> =
            std::collections::HashSet::new();
        // name -> lines, for the per-instance families.
        let mut fam: BTreeMap<&'static str, String> = BTreeMap::new();
        let no_status = Default::default();
        for d in crate::store::decoded::list_decoded(store, Kind::OpenClawInstance)?.iter() {
            let Ok(Resource::OpenClawInstance(i)) = &d.resource else {
                continue;
            };
            let m = &i.metadata;
            let (t, p) = (
                m.tenant.clone().unwrap_or_default(),
                m.project.clone().unwrap_or_default(),
            );
            let l = instance_labels(&t, &p, &m.name);
            existing.insert((t, p, m.name.clone()));
            let status = i.status.as_ref().unwrap_or(&no_status);
            *instances.entry(format!("{:?}", status.phase)).or_default() += 1;
            let mut restarts = 0u64;
            for r in &status.replica_status {
                *replicas.entry(format!("{:?}", r.state)).or_default() += 1;
                restarts += u64::from(r.restarts);
            }
            let mut line = |name: &'static str, extra: &str, v: String| {
                let _ = writeln!(fam.entry(name).or_default(), "{name}{{{l}{extra}}} {v}");
            };
            line(
                "clusterclaw_instance_replicas_desired",
                "",
                i.spec.replicas.to_string(),
            );
            line(
                "clusterclaw_instance_replicas_ready",
                "",
                status.ready_replicas.to_string(),
            );
            line(
                "clusterclaw_instance_replicas_available",
                "",
                status.available_replicas.to_string(),
            );
            line(
                "clusterclaw_instance_replicas_updated",
                "",
                status.updated_replicas.to_string(),
            );
            line(
                "clusterclaw_instance_container_restarts",
                "",
                restarts.to_string(),
            );
            line(
                "clusterclaw_instance_phase",
                &format!(",phase=\"{:?}\"", status.phase),
                "1".into(),
            );
            if let Some(r) = &status.rollout {
                line(
                    "clusterclaw_instance_rollout_phase",
                    &format!(",phase=\"{:?}\"", r.phase),
                    "1".into(),
                );
                line(
                    "clusterclaw_instance_rollout_revision",
                    "",
                    r.revision.to_string(),
                );
                let desired = i.spec.replicas.max(0) as f64;
                let progress = if desired > 0.0 {
                    (r.updated_replicas.max(0) as f64 / desired).min(1.0)
                } else {
                    1.0
                };
                line("clusterclaw_instance_rollout_progress", "", value(progress));
            }
        }
        header(
            &mut out,
            "clusterclaw_instances",
            "gauge",
            "OpenClaw instances by phase.",
        );
        for (phase, n) in instances {
            let _ = writeln!(out, "clusterclaw_instances{{phase=\"{phase}\"}} {n}");
        }
        header(
            &mut out,
            "clusterclaw_replicas",
            "gauge",
            "Replicas by state (Unknown: the host stopped reporting).",
        );
        for (state, n) in replicas {
            let _ = writeln!(out, "clusterclaw_replicas{{state=\"{state}\"}} {n}");
        }
        for (name, help) in [
            (
                "clusterclaw_instance_replicas_desired",
                "Replicas an instance asks for (spec.replicas).",
            ),
            (
                "clusterclaw_instance_replicas_ready",
                "Replicas of an instance that are Ready.",
            ),
            (
                "clusterclaw_instance_replicas_available",
                "Replicas of an instance Ready long enough to count as available.",
            ),
            (
                "clusterclaw_instance_replicas_updated",
                "Replicas of an instance on its newest revision.",
            ),
            (
                "clusterclaw_instance_container_restarts",
                "Restarts of the current containers of an instance's replicas, as last reported.",
            ),
            (
                "clusterclaw_instance_phase",
                "1 for an instance's current phase.",
            ),
            (
                "clusterclaw_instance_rollout_phase",
                "1 for the phase of an instance's current or last rollout.",
            ),
            (
                "clusterclaw_instance_rollout_revision",
                "The revision an instance's rollout moves to.",
            ),
            (
                "clusterclaw_instance_rollout_progress",
                "Share of an instance's desired replicas its rollout has updated, 0 to 1.",
            ),
        ] {
            header(&mut out, name, "gauge", help);
            if let Some(lines) = fam.get(name) {
                out.push_str(lines);
            }
        }
        {
            let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
            events.retain(|(k, _), _| existing.contains(k));
            for kind in InstanceEvent::ALL {
                let (name, help) = kind.metric();
                header(&mut out, name, "counter", help);
                for ((k, e), n) in events.iter() {
                    if *e == kind {
                        let _ =
                            writeln!(out, "{name}{{{}}} {n}", instance_labels(&k.0, &k.1, &k.2));
                    }
                }
            }
        }
        header(
            &mut out,
            "clusterclaw_store_index",
            "counter",
            "The store's global index.",
        );
        let _ = writeln!(out, "clusterclaw_store_index {}", store.index());

        header(
            &mut out,
            "clusterclaw_replica_reports_refused_total",
            "counter",
            "Replica reports refused: from a host the replica is not placed on, or of an older placement epoch.",
        );
        let _ = writeln!(
            out,
            "clusterclaw_replica_reports_refused_total {}",
            reports.refused_replica_reports()
        );

        let snapshot = reports.snapshot();
        let mut hosts_sorted: Vec<_> = snapshot.iter().collect();
        hosts_sorted.sort_by(|a, b| a.0.cmp(b.0));
        header(
            &mut out,
            "clusterclaw_replica_cpu_percent",
            "gauge",
            "CPU use of a replica's container, percent of one core.",
        );
        let mut mem = String::new();
        let mut relay = Relay::default();
        for (host, r) in &hosts_sorted {
            if silent.contains(*host) {
                continue;
            }
            for rep in &r.report.replicas {
                let labels = format!(
                    "tenant=\"{}\",project=\"{}\",instance=\"{}\",replica=\"{}\",host=\"{}\"",
                    escape(&rep.tenant),
                    escape(&rep.project),
                    escape(&rep.instance),
                    escape(&rep.replica),
                    escape(host)
                );
                if let Some(g) = &rep.gateway_metrics {
                    relay.add(&labels, g);
                }
                let Some(s) = &rep.stats else { continue };
                let _ = writeln!(
                    out,
                    "clusterclaw_replica_cpu_percent{{{labels}}} {}",
                    s.cpu_percent
                );
                let _ = writeln!(
                    mem,
                    "clusterclaw_replica_memory_bytes{{{labels}}} {}",
                    s.memory_bytes
                );
            }
        }
        header(
            &mut out,
            "clusterclaw_replica_memory_bytes",
            "gauge",
            "Memory use of a replica's container.",
        );
        out.push_str(&mem);
        relay.write(&mut out);

        if let Some(l) = self.leader() {
            header(
                &mut out,
                "clusterclaw_leader",
                "gauge",
                "1 when this server holds the leader lease (runs the controllers), else 0.",
            );
            let _ = writeln!(
                out,
                "clusterclaw_leader{{server=\"{}\"}} {}",
                escape(&l.server),
                u8::from(l.leading)
            );
            header(
                &mut out,
                "clusterclaw_leader_epoch",
                "gauge",
                "The epoch of the leader lease as this server last read it.",
            );
            let _ = writeln!(out, "clusterclaw_leader_epoch {}", l.epoch);
        }
        header(
            &mut out,
            "clusterclaw_certificate_expiry_timestamp_seconds",
            "gauge",
            "When one of the server's certificates expires (Unix seconds).",
        );
        for (name, at) in self
            .certificates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "clusterclaw_certificate_expiry_timestamp_seconds{{certificate=\"{}\"}} {at}",
                escape(name)
            );
        }

        {
            let f = self.rpc.lock().unwrap_or_else(|e| e.into_inner());
            header(
                &mut out,
                "clusterclaw_agent_rpc_requests_total",
                "counter",
                "Agent RPCs served.",
            );
            for ((method, code), n) in &f.requests {
                let _ = writeln!(
                    out,
                    "clusterclaw_agent_rpc_requests_total{{method=\"{method}\",code=\"{code}\"}} {n}"
                );
            }
            header(
                &mut out,
                "clusterclaw_agent_rpc_duration_seconds",
                "histogram",
                "Agent RPC latency (a long poll counts its hold).",
            );
            for (method, h) in &f.latency {
                write_histogram(
                    &mut out,
                    "clusterclaw_agent_rpc_duration_seconds",
                    &format!("method=\"{method}\""),
                    h,
                );
            }
        }
        {
            let h = self
                .gate_decisions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            header(
                &mut out,
                "clusterclaw_rollout_gate_decision_seconds",
                "histogram",
                "From a replica passing its update gate (its Ready report applied, plus minReadySeconds) to the rollout controller moving the next targets.",
            );
            write_histogram(
                &mut out,
                "clusterclaw_rollout_gate_decision_seconds",
                "",
                &h,
            );
        }
        {
            let passes = LOOP_PASSES.lock().unwrap_or_else(|e| e.into_inner());
            header(
                &mut out,
                "clusterclaw_control_loop_pass_seconds",
                "histogram",
                "How long each pass of a control loop (a controller on the leader, or this server's assignment book) took.",
            );
            for (name, h) in passes.iter() {
                write_histogram(
                    &mut out,
                    "clusterclaw_control_loop_pass_seconds",
                    &format!("loop=\"{}\"", escape(name)),
                    h,
                );
            }
        }
        {
            let w = *STORE_WRITER.lock().unwrap_or_else(|e| e.into_inner());
            if w.iter().any(|(wait, _)| wait.count > 0) {
                for (name, help, held) in [
                    (
                        "clusterclaw_store_writer_wait_seconds",
                        "How long writes waited for the SQLite store's writer connection, by who writes (the leader's controllers, or other: status reports, the API, enrollment).",
                        false,
                    ),
                    (
                        "clusterclaw_store_writer_held_seconds",
                        "How long writes held the SQLite store's writer connection, by who writes.",
                        true,
                    ),
                ] {
                    header(&mut out, name, "histogram", help);
                    for (who, (wait, hold)) in STORE_WRITERS.iter().zip(&w) {
                        let h = if held { hold } else { wait };
                        write_histogram(&mut out, name, &format!("writer=\"{who}\""), h);
                    }
                }
            }
        }
        {
            let f = self.http.lock().unwrap_or_else(|e| e.into_inner());
            header(
                &mut out,
                "clusterclaw_http_requests_total",
                "counter",
                "API requests by route template, method and status code.",
            );
            for ((route, method, code), n) in &f.requests {
                let _ = writeln!(
                    out,
                    "clusterclaw_http_requests_total{{route=\"{}\",method=\"{method}\",code=\"{code}\"}} {n}",
                    escape(route)
                );
            }
            header(
                &mut out,
                "clusterclaw_http_request_duration_seconds",
                "histogram",
                "API request latency by route template, method and status code (a stream counts until its head).",
            );
            for ((route, method, code), h) in &f.latency {
                write_histogram(
                    &mut out,
                    "clusterclaw_http_request_duration_seconds",
                    &format!(
                        "route=\"{}\",method=\"{method}\",code=\"{code}\"",
                        escape(route)
                    ),
                    h,
                );
            }
        }
        Ok(out)
    }
}

/// The Gateways' relayed figures, grouped by family across replicas (each family's series
/// must be served together).
#[derive(Default)]
struct Relay {
    /// Family name -> (type, help, sample lines).
    families: BTreeMap<String, (String, String, String)>,
    /// Per replica: whether the last scrape worked, whether it was cut, series relayed.
    status: String,
}

impl Relay {
    fn add(&mut self, replica_labels: &str, g: &clusterclaw_proto::agent::GatewayMetrics) {
        let mut series = 0usize;
        let mut bytes = 0usize;
        let mut cut = g.truncated;
        'families: for f in &g.families {
            if !f.name.starts_with("openclaw_") || !valid_metric_name(&f.name) {
                continue;
            }
            let kind = match f.r#type.as_str() {
                "counter" | "gauge" | "histogram" | "summary" => f.r#type.as_str(),
                _ => "untyped",
            };
            let entry = self.families.entry(f.name.clone()).or_insert_with(|| {
                (
                    kind.to_string(),
                    f.help
                        .replace('\\', "\\\\")
                        .replace('\n', " ")
                        .chars()
                        .take(200)
                        .collect(),
                    String::new(),
                )
            });
            for s in &f.samples {
                if !s.name.starts_with(&f.name) || !valid_metric_name(&s.name) {
                    continue;
                }
                let size = s.name.len()
                    + s.labels
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 4)
                        .sum::<usize>()
                    + 8;
                if series >= MAX_RELAYED_SERIES || bytes + size > MAX_RELAYED_BYTES {
                    cut = true;
                    break 'families;
                }
                series += 1;
                bytes += size;
                let mut labels: Vec<(String, &str)> = s
                    .labels
                    .iter()
                    .filter(|(k, _)| valid_label_name(k))
                    .map(|(k, v)| {
                        let k = if RELAY_LABELS.contains(&k.as_str()) {
                            format!("exported_{k}")
                        } else {
                            k.clone()
                        };
                        (k, v.as_str())
                    })
                    .collect();
                labels.sort();
                let mut line = format!("{}{{{replica_labels}", s.name);
                for (k, v) in labels {
                    let _ = write!(line, ",{k}=\"{}\"", escape(v));
                }
                let _ = writeln!(line, "}} {}", value(s.value));
                entry.2.push_str(&line);
            }
        }
        let _ = writeln!(
            self.status,
            "clusterclaw_gateway_scrape_ok{{{replica_labels}}} {}\nclusterclaw_gateway_series_truncated{{{replica_labels}}} {}\nclusterclaw_gateway_series_relayed{{{replica_labels}}} {series}",
            u8::from(g.error.is_empty()),
            u8::from(cut),
        );
    }

    fn write(self, out: &mut String) {
        header(
            out,
            "clusterclaw_gateway_scrape_ok",
            "gauge",
            "1 when an agent's last scrape of a replica's Gateway figures worked.",
        );
        // The three status families are interleaved per replica above; split them.
        let mut ok = String::new();
        let mut cut = String::new();
        let mut relayed = String::new();
        for line in self.status.lines() {
            let target = if line.starts_with("clusterclaw_gateway_scrape_ok") {
                &mut ok
            } else if line.starts_with("clusterclaw_gateway_series_truncated") {
                &mut cut
            } else {
                &mut relayed
            };
            target.push_str(line);
            target.push('\n');
        }
        out.push_str(&ok);
        header(
            out,
            "clusterclaw_gateway_series_truncated",
            "gauge",
            "1 when a replica's Gateway figures were cut to the relay's bounds.",
        );
        out.push_str(&cut);
        header(
            out,
            "clusterclaw_gateway_series_relayed",
            "gauge",
            "Gateway series relayed for a replica.",
        );
        out.push_str(&relayed);
        for (name, (kind, help, lines)) in self.families {
            if !help.is_empty() {
                let _ = writeln!(out, "# HELP {name} {help}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
            out.push_str(&lines);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe_rpc("Enroll", tonic::Code::Ok, Duration::from_millis(3));
        m.observe_rpc(
            "Enroll",
            tonic::Code::Unauthenticated,
            Duration::from_millis(200),
        );
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap();
        let text = m.render(&store, &Reports::default()).unwrap();
        assert!(
            text.contains("clusterclaw_agent_rpc_requests_total{method=\"Enroll\",code=\"Ok\"} 1"),
            "{text}"
        );
        assert!(text.contains(
            "clusterclaw_agent_rpc_requests_total{method=\"Enroll\",code=\"Unauthenticated\"} 1"
        ));
        assert!(text.contains(
            "clusterclaw_agent_rpc_duration_seconds_bucket{method=\"Enroll\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "clusterclaw_agent_rpc_duration_seconds_bucket{method=\"Enroll\",le=\"0.25\"} 2"
        ));
        assert!(text.contains("clusterclaw_hosts{phase=\"Ready\"} 0"));
        assert!(text.contains("clusterclaw_instances{phase=\"Running\"} 0"));
    }

    #[test]
    fn api_requests_are_counted_by_route_template() {
        let m = Metrics::default();
        let route = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}";
        m.observe_http(
            Some(route),
            &axum::http::Method::GET,
            200,
            Duration::from_millis(2),
        );
        m.observe_http(
            Some(route),
            &axum::http::Method::GET,
            404,
            Duration::from_millis(2),
        );
        m.observe_http(
            None,
            &axum::http::Method::from_bytes(b"BREW").unwrap(),
            404,
            Duration::from_millis(1),
        );
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap();
        let text = m.render(&store, &Reports::default()).unwrap();
        assert!(
            text.contains(&format!(
                "clusterclaw_http_requests_total{{route=\"{route}\",method=\"GET\",code=\"404\"}} 1"
            )),
            "{text}"
        );
        assert!(text.contains(
            "clusterclaw_http_requests_total{route=\"unmatched\",method=\"other\",code=\"404\"} 1"
        ));
        // Latency by route and code too: the 404s apart from the 200.
        for code in ["200", "404"] {
            assert!(
                text.contains(&format!(
                    "clusterclaw_http_request_duration_seconds_count{{route=\"{route}\",method=\"GET\",code=\"{code}\"}} 1"
                )),
                "{text}"
            );
        }
    }

    #[test]
    fn relayed_gateway_series_get_the_replica_labels_and_nothing_else_passes() {
        use clusterclaw_proto::agent as pb;
        let g = pb::GatewayMetrics {
            families: vec![
                pb::GatewayFamily {
                    name: "openclaw_model_cost_usd_total".into(),
                    r#type: "counter".into(),
                    help: "Cost.".into(),
                    samples: vec![pb::GatewaySample {
                        name: "openclaw_model_cost_usd_total".into(),
                        labels: [
                            ("model".to_string(), "m\"1".to_string()),
                            ("tenant".to_string(), "someone-else".to_string()),
                        ]
                        .into(),
                        value: 0.5,
                    }],
                },
                pb::GatewayFamily {
                    name: "clusterclaw_hosts".into(),
                    r#type: "gauge".into(),
                    help: String::new(),
                    samples: vec![pb::GatewaySample {
                        name: "clusterclaw_hosts".into(),
                        labels: Default::default(),
                        value: 99.0,
                    }],
                },
            ],
            ..Default::default()
        };
        let mut relay = Relay::default();
        relay.add(
            "tenant=\"t\",project=\"p\",instance=\"bot\",replica=\"bot-0\",host=\"h1\"",
            &g,
        );
        let mut text = String::new();
        relay.write(&mut text);
        assert!(
            text.contains("# TYPE openclaw_model_cost_usd_total counter"),
            "{text}"
        );
        assert!(text.contains(
            "openclaw_model_cost_usd_total{tenant=\"t\",project=\"p\",instance=\"bot\",replica=\"bot-0\",host=\"h1\",exported_tenant=\"someone-else\",model=\"m\\\"1\"} 0.5"
        ), "{text}");
        assert!(
            !text.contains("99"),
            "a Gateway cannot speak for the control plane:\n{text}"
        );
        assert!(text.contains("clusterclaw_gateway_scrape_ok{tenant=\"t\",project=\"p\",instance=\"bot\",replica=\"bot-0\",host=\"h1\"} 1"));
        assert!(text.contains("clusterclaw_gateway_series_relayed{tenant=\"t\",project=\"p\",instance=\"bot\",replica=\"bot-0\",host=\"h1\"} 1"));

        // Over the cap: cut, and said so.
        let many = pb::GatewayMetrics {
            families: vec![pb::GatewayFamily {
                name: "openclaw_x".into(),
                r#type: "gauge".into(),
                help: String::new(),
                samples: (0..MAX_RELAYED_SERIES + 10)
                    .map(|n| pb::GatewaySample {
                        name: "openclaw_x".into(),
                        labels: [("n".to_string(), n.to_string())].into(),
                        value: 1.0,
                    })
                    .collect(),
            }],
            ..Default::default()
        };
        let mut relay = Relay::default();
        relay.add("replica=\"r\"", &many);
        let mut text = String::new();
        relay.write(&mut text);
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("openclaw_x{"))
                .count(),
            MAX_RELAYED_SERIES
        );
        assert!(text.contains("clusterclaw_gateway_series_truncated{replica=\"r\"} 1"));
    }

    /// The count of the series `name{labels}` in `text`.
    fn count_of(text: &str, name: &str, labels: &str) -> u64 {
        let prefix = format!("{name}_count{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn the_sqlite_writer_s_waits_and_holds_by_who_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap();
        let tenant = |name: &str| {
            let v = serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": name}});
            vec![(
                Resource::from_value(v).unwrap(),
                crate::store::WriteMode::Apply,
            )]
        };
        let m = Metrics::default();
        let before = m.render(&store, &Reports::default()).unwrap();
        store.write(&tenant("a"), false).unwrap();
        // A controller's write is fenced by its leader epoch.
        let epoch = store
            .lease_acquire("me", 0, std::time::Duration::from_secs(10))
            .unwrap()
            .epoch;
        crate::store::lease::fenced(Some(epoch), || store.write(&tenant("b"), false)).unwrap();
        let after = m.render(&store, &Reports::default()).unwrap();
        for name in [
            "clusterclaw_store_writer_wait_seconds",
            "clusterclaw_store_writer_held_seconds",
        ] {
            assert!(
                after.contains(&format!("# TYPE {name} histogram")),
                "{after}"
            );
            for who in ["controllers", "other"] {
                let labels = format!("writer=\"{who}\"");
                assert!(
                    count_of(&after, name, &labels) > count_of(&before, name, &labels),
                    "{name}{{{labels}}}: {after}"
                );
            }
        }
    }

    #[test]
    fn instance_and_host_figures_and_agent_event_counters() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap();
        let objects: Vec<(Resource, crate::store::WriteMode)> = [
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Host", "metadata": {"name": "h1"},
                               "spec": {"hostname": "h1", "capacity": {"cpu": "4", "memory": "8Gi"}}}),
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": "t"}}),
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project", "metadata": {"name": "p", "tenant": "t"}}),
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
                               "metadata": {"name": "bot", "tenant": "t", "project": "p"}, "spec": {"version": "2026.7.1", "replicas": 3}}),
        ]
        .into_iter()
        .map(|v| (Resource::from_value(v).unwrap(), crate::store::WriteMode::Apply))
        .collect();
        store.write(&objects, false).unwrap();
        let m = Metrics::default();
        m.count_event("t", "p", "bot", InstanceEvent::OomKilled);
        m.count_event("t", "p", "bot", InstanceEvent::OomKilled);
        m.count_event("t", "p", "gone", InstanceEvent::ProbeFailed);
        m.set_certificate_expiry("ca", 2_000_000_000);
        let text = m.render(&store, &Reports::default()).unwrap();
        let l = "tenant=\"t\",project=\"p\",instance=\"bot\"";
        for want in [
            format!("clusterclaw_instance_replicas_desired{{{l}}} 3"),
            format!("clusterclaw_instance_replicas_ready{{{l}}} 0"),
            format!("clusterclaw_oom_kills_total{{{l}}} 2"),
            "clusterclaw_host_capacity{host=\"h1\",resource=\"cpu\"} 4".to_string(),
            "clusterclaw_host_capacity{host=\"h1\",resource=\"memory\"} 8589934592".to_string(),
            "clusterclaw_certificate_expiry_timestamp_seconds{certificate=\"ca\"} 2000000000"
                .to_string(),
        ] {
            assert!(text.contains(&want), "{want} missing from:\n{text}");
        }
        assert!(
            !text.contains("instance=\"gone\""),
            "counters of deleted instances go:\n{text}"
        );
        // Every family is declared once and its series follow its declaration.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(declared.insert(name.to_string()), "{name} declared twice");
            }
        }
    }
}
