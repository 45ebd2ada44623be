//! A light simulated fleet for scale benchmarks: thousands of hosts in one process, all on one
//! shared tokio runtime, each speaking the real agent protocol to a real server.
//!
//! Every [`SimHost`] enrolls as `clusterclaw-agent` does (a fresh key and CSR of its own, the
//! join token over TLS, trusting the cluster CA), then holds its own mutual-TLS connection on
//! which it long polls `WatchAssignments` and keeps one `Heartbeat` stream open, sending a
//! report when its assignments change and every report interval (10 s, the agent's default)
//! otherwise. The client, the proto types and the report stream (which sends only what changed
//! after its first report) are the agent library's own.
//!
//! What it does not do: run containers. Replicas are reported `Running` the moment they are
//! assigned, with the config and content hashes they were given. A host also opens no task
//! stream (the agent's second connection, for logs and volume transfers): at 10,000 hosts that
//! would be 20,000 connections on each side, the open-files hard limit of the machine this
//! was written on.
//!
//! What it measures: when each host first saw a given value of the [`MARKER`] environment
//! variable of an instance (a spec change arriving), how many replicas are assigned over the
//! whole fleet and when that number last moved, and the calls that failed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clusterclaw_agent::control::{POLL_GRACE, ReportStream, describe_status, heartbeat};
use clusterclaw_agent::enroll::{self, HostIdentity, HostRecord};
use clusterclaw_agent::events::EventQueue;
use clusterclaw_proto::agent as pb;
use clusterclaw_proto::agent::agent_service_client::AgentServiceClient;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::transport::Channel;

/// The environment variable of an assignment whose value numbers spec changes.
pub const MARKER: &str = "SIM_SEQ";
/// How long a long poll is held (the agent's default).
pub const POLL_WAIT: Duration = Duration::from_secs(300);
/// Pause after a failed call before the next.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Reports a host may queue on its stream.
const REPORT_QUEUE: usize = 16;

/// One spec change seen by one host: the instance (`tenant/project/name`), the marker's value
/// and when the long poll that brought it returned.
#[derive(Clone, Debug)]
pub struct Seen {
    pub instance: String,
    pub seq: u64,
    pub at: Instant,
}

/// What the whole fleet has seen, shared by its hosts.
#[derive(Default)]
pub struct FleetState {
    assigned: AtomicUsize,
    assigned_moved: Mutex<Option<Instant>>,
    seen: Mutex<Vec<Seen>>,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    polls: AtomicU64,
    reports: AtomicU64,
    /// Encoded bytes of the reports of streams that ended (see [`FleetState::report_bytes`]).
    report_bytes: AtomicU64,
}

impl FleetState {
    /// Replicas assigned over the fleet, as the hosts last saw their assignments.
    pub fn assigned(&self) -> usize {
        self.assigned.load(Ordering::SeqCst)
    }

    /// When [`FleetState::assigned`] last changed.
    pub fn assigned_moved(&self) -> Option<Instant> {
        *self
            .assigned_moved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Takes every spec change seen since the last call.
    pub fn take_seen(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Calls that failed (enrollment, long polls, report streams).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The last failure, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Long polls answered so far.
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    /// Reports handed to report streams so far.
    pub fn reports(&self) -> u64 {
        self.reports.load(Ordering::Relaxed)
    }

    /// Encoded bytes of the reports sent on the streams that ended so far.
    pub fn report_bytes(&self) -> u64 {
        self.report_bytes.load(Ordering::Relaxed)
    }

    fn failed(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
    }

    fn moved(&self, delta: isize, at: Instant) {
        if delta == 0 {
            return;
        }
        if delta > 0 {
            self.assigned
                .fetch_add(delta.unsigned_abs(), Ordering::SeqCst);
        } else {
            self.assigned
                .fetch_sub(delta.unsigned_abs(), Ordering::SeqCst);
        }
        let mut moved = self
            .assigned_moved
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if moved.is_none_or(|m| m < at) {
            *moved = Some(at);
        }
    }
}

/// How a simulated fleet reaches its server.
#[derive(Clone, Debug)]
pub struct FleetTarget {
    /// `https://127.0.0.1:PORT` of the agent port.
    pub url: String,
    /// The cluster CA certificate.
    pub ca_pem: String,
    /// A join token with a use for every host.
    pub join_token: String,
}

/// Settings of the simulated hosts.
#[derive(Clone, Debug)]
pub struct SimSettings {
    /// Time between periodic reports (the agent's default is 10 s).
    pub report_interval: Duration,
    /// Enrollments in flight at once.
    pub enroll_concurrency: usize,
}

impl Default for SimSettings {
    fn default() -> Self {
        SimSettings {
            report_interval: Duration::from_secs(10),
            enroll_concurrency: 64,
        }
    }
}

/// A simulated fleet: its hosts run on the runtime it was started on until it is dropped.
pub struct SimFleet {
    state: Arc<FleetState>,
    stop: watch::Sender<bool>,
    enrolled: Arc<AtomicUsize>,
}

impl SimFleet {
    /// Enrolls `count` hosts named `{prefix}-{i}` on the current runtime and starts each one's
    /// loops as soon as it is enrolled. Returns at once; see [`SimFleet::enrolled`].
    pub fn start(
        target: FleetTarget,
        prefix: &str,
        count: usize,
        settings: SimSettings,
    ) -> SimFleet {
        let state = Arc::new(FleetState::default());
        let stop = watch::Sender::new(false);
        let enrolled = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(settings.enroll_concurrency.max(1)));
        let target = Arc::new(target);
        for i in 0..count {
            let name = format!("{prefix}-{i}");
            let (target, state, gate) = (target.clone(), state.clone(), gate.clone());
            let (stop_rx, enrolled, settings) =
                (stop.subscribe(), enrolled.clone(), settings.clone());
            tokio::spawn(async move {
                let identity = loop {
                    let Ok(permit) = gate.acquire().await else {
                        return;
                    };
                    let r = enroll_one(&target, &name).await;
                    drop(permit);
                    match r {
                        Ok(identity) => break identity,
                        Err(e) => {
                            state.failed(format!("enroll {name}: {e:#}"));
                            tokio::time::sleep(RETRY_DELAY).await;
                        }
                    }
                };
                enrolled.fetch_add(1, Ordering::SeqCst);
                let host = match SimHost::new(identity, settings.report_interval) {
                    Ok(h) => Arc::new(h),
                    Err(e) => {
                        state.failed(format!("client of {name}: {e:#}"));
                        return;
                    }
                };
                host.run(state, stop_rx).await;
            });
        }
        SimFleet {
            state,
            stop,
            enrolled,
        }
    }

    /// Hosts enrolled so far.
    pub fn enrolled(&self) -> usize {
        self.enrolled.load(Ordering::SeqCst)
    }

    /// What the fleet has seen.
    pub fn state(&self) -> &Arc<FleetState> {
        &self.state
    }

    /// Stops every host's loops (their calls end with the runtime).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Enrolls one host as the agent does, keeping its identity in memory.
async fn enroll_one(target: &FleetTarget, name: &str) -> anyhow::Result<HostIdentity> {
    let (key, csr) = enroll::new_key_and_csr(name)?;
    let request = pb::EnrollRequest {
        join_token: target.join_token.clone(),
        csr_pem: csr,
        hostname: name.to_string(),
        labels: HashMap::new(),
        capacity: Some(capacity()),
        agent_version: clusterclaw_agent::sync::AGENT_VERSION.to_string(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
    };
    let mut client = clusterclaw_agent::client::anonymous(&target.url, &target.ca_pem)?;
    let answer = client
        .enroll(request)
        .await
        .map_err(|s| anyhow::anyhow!("{}", describe_status(&s)))?
        .into_inner();
    Ok(HostIdentity {
        record: HostRecord {
            host_id: answer.host_id,
            server: target.url.clone(),
        },
        key_pem: key.serialize_pem(),
        cert_pem: answer.certificate_pem,
        ca_pem: answer.ca_pem,
    })
}

/// What every simulated host says it has: enough for any bench's replicas.
fn capacity() -> pb::Capacity {
    pb::Capacity {
        cpu_millis: 64_000,
        memory_bytes: 256 << 30,
        disk_bytes: 1 << 40,
    }
}

/// One host's assignments as its long poll last brought them.
#[derive(Default)]
struct Assigned {
    index: u64,
    assignments: Vec<pb::Assignment>,
}

/// One simulated host: its identity and its one authenticated connection.
pub struct SimHost {
    name: String,
    client: AgentServiceClient<Channel>,
    report_interval: Duration,
    /// The marker value last seen per instance.
    markers: Mutex<HashMap<String, u64>>,
}

impl SimHost {
    fn new(identity: HostIdentity, report_interval: Duration) -> anyhow::Result<SimHost> {
        let client = clusterclaw_agent::client::authenticated(&identity)
            .with_context(|| format!("host {}", identity.record.host_id))?;
        Ok(SimHost {
            name: identity.record.host_id,
            client,
            report_interval,
            markers: Mutex::new(HashMap::new()),
        })
    }

    async fn run(self: Arc<Self>, state: Arc<FleetState>, stop: watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(Arc::new(Assigned::default()));
        let reporter = tokio::spawn(self.clone().report_loop(rx, state.clone(), stop.clone()));
        self.watch_loop(tx, state, stop).await;
        let _ = reporter.await;
    }

    async fn watch_loop(
        &self,
        tx: watch::Sender<Arc<Assigned>>,
        state: Arc<FleetState>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut known = 0;
        let mut replicas = 0usize;
        loop {
            let mut client = self.client.clone();
            let mut request = tonic::Request::new(pb::WatchAssignmentsRequest {
                known_index: known,
                wait_seconds: POLL_WAIT.as_secs() as u32,
            });
            request.set_timeout(POLL_WAIT + POLL_GRACE);
            let answer = tokio::select! {
                _ = stop.changed() => return,
                a = client.watch_assignments(request) => a,
            };
            let answer = match answer {
                Ok(a) => a.into_inner(),
                Err(s) => {
                    state.failed(format!(
                        "WatchAssignments of {}: {}",
                        self.name,
                        describe_status(&s)
                    ));
                    tokio::time::sleep(RETRY_DELAY).await;
                    continue;
                }
            };
            let at = Instant::now();
            state.polls.fetch_add(1, Ordering::Relaxed);
            if !answer.changed {
                continue;
            }
            known = answer.index;
            let count = answer.assignments.len();
            state.moved(count as isize - replicas as isize, at);
            replicas = count;
            self.note_markers(&answer.assignments, &state, at);
            tx.send_replace(Arc::new(Assigned {
                index: answer.index,
                assignments: answer.assignments,
            }));
        }
    }

    /// Notes every instance whose marker moved in these assignments (once per host).
    fn note_markers(&self, assignments: &[pb::Assignment], state: &FleetState, at: Instant) {
        let mut markers = self.markers.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = Vec::new();
        for a in assignments {
            let Some(seq) = a.env.get(MARKER).and_then(|v| v.parse::<u64>().ok()) else {
                continue;
            };
            let instance = format!("{}/{}/{}", a.tenant, a.project, a.instance);
            let before = markers.insert(instance.clone(), seq);
            if before != Some(seq) {
                seen.push(Seen { instance, seq, at });
            }
        }
        drop(markers);
        if !seen.is_empty() {
            state
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(seen);
        }
    }

    /// One `ReportStatus` stream at a time, as the agent keeps it: a report at its start, on
    /// every change of the assignments and every report interval.
    async fn report_loop(
        self: Arc<Self>,
        mut assigned: watch::Receiver<Arc<Assigned>>,
        state: Arc<FleetState>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut sent = 0u64;
        loop {
            let (tx, rx) = mpsc::channel(REPORT_QUEUE);
            let mut client = self.client.clone();
            let stream = ReportStream::new(rx, EventQueue::default());
            let exchange = stream.exchange();
            let call = heartbeat(&mut client, stream);
            tokio::pin!(call);
            let mut tick = tokio::time::interval(self.report_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let outcome = loop {
                tokio::select! {
                    _ = stop.changed() => {
                        state.report_bytes.fetch_add(exchange.bytes(), Ordering::Relaxed);
                        return;
                    }
                    r = &mut call => break r,
                    _ = tick.tick() => {}
                    () = exchange.full_asked() => {}
                    r = assigned.changed() => if r.is_err() { return },
                }
                let current = assigned.borrow_and_update().clone();
                sent += 1;
                if tx.try_send(report(&current, sent)).is_ok() {
                    state.reports.fetch_add(1, Ordering::Relaxed);
                }
            };
            state
                .report_bytes
                .fetch_add(exchange.bytes(), Ordering::Relaxed);
            if let Err(s) = outcome {
                state.failed(format!(
                    "Heartbeat of {}: {}",
                    self.name,
                    describe_status(&s)
                ));
            }
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(RETRY_DELAY) => {}
            }
        }
    }
}

/// A report of a host whose every assigned replica runs what it was given.
fn report(assigned: &Assigned, n: u64) -> pb::StatusReport {
    sample_report(&assigned.assignments, assigned.index, n)
}

/// A full report of a host running every one of `assignments` as it was given (at assignment
/// index `index`); `n` varies the host and container figures, as a real host's do from one
/// report to the next.
pub fn sample_report(assignments: &[pb::Assignment], index: u64, n: u64) -> pb::StatusReport {
    let replicas = assignments
        .iter()
        .map(|a| pb::ReplicaStatus {
            tenant: a.tenant.clone(),
            project: a.project.clone(),
            instance: a.instance.clone(),
            replica: a.replica.clone(),
            ordinal: a.ordinal,
            generation: a.generation,
            state: pb::ReplicaState::Running as i32,
            message: String::new(),
            container_id: format!("{:064x}", u64::from(a.ordinal) + 1),
            restarts: 0,
            host_port: 40_000 + a.ordinal,
            config_hash: a.config_hash.clone(),
            stats: Some(pb::ContainerStats {
                cpu_percent: (n % 7) as f64 * 0.5,
                memory_bytes: (200 << 20) + (n % 13) * 4096,
                memory_limit_bytes: 1 << 30,
                net_rx_bytes: n * 1_000,
                net_tx_bytes: n * 800,
                block_read_bytes: 0,
                block_write_bytes: n * 4096,
            }),
            config_revision: a.config_revision,
            observed_content_hash: a.content_hash.clone(),
            snapshots: Vec::new(),
            epoch: a.epoch,
            gateway_metrics: None,
        })
        .collect();
    pb::StatusReport {
        host: Some(pb::HostFigures {
            cpu_percent: 5.0 + (n % 10) as f64 * 0.7,
            memory_used_bytes: (8 << 30) + (n % 17) * (1 << 20),
            memory_total_bytes: 256 << 30,
            disk_used_bytes: 100 << 30,
            disk_total_bytes: 1 << 40,
            load1: 0.5 + (n % 5) as f64 * 0.1,
            load5: 0.5,
            load15: 0.5,
            capacity: Some(capacity()),
        }),
        runtime: Some(pb::RuntimeCondition {
            ready: true,
            runtime: "docker".into(),
            version: "27.0.0".into(),
            message: String::new(),
        }),
        replicas,
        applied_index: index,
        agent_version: clusterclaw_agent::sync::AGENT_VERSION.to_string(),
        events: Vec::new(),
        ..Default::default()
    }
}
