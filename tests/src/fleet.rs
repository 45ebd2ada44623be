//! An in-process fleet for benchmarks: hosts that run the real agent code (the host loops, the
//! reconciler, real mutual TLS to a real server) over the agent library's in-memory engine.
//!
//! Each [`FleetHost`] has its own data directory and its own two-worker tokio runtime, as the
//! `clusterclaw-agent` process has, so that one host's blocking file writes never hold up
//! another's. Its engine is a [`TimedEngine`]: the agent library's `FakeRuntime` that also
//! remembers when each replica's container was last created, and with which config revision;
//! its control plane is the agent's gRPC one, timing the long polls that bring a change.
//! A [`HealthStub`] answers the agents' health probes, so that replicas become Ready.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use clusterclaw_agent::config::AgentConfig;
use clusterclaw_agent::control::{
    CallError, ControlPlane, GrpcControlPlane, ReportStream, WatchAnswer,
};
use clusterclaw_agent::enroll::{self, IdentityFiles};
use clusterclaw_agent::model::ContainerStats;
use clusterclaw_agent::ports::PortRange;
use clusterclaw_agent::probe::ProbeSettings;
use clusterclaw_agent::reconcile::{BackoffPolicy, Reconciler, ReconcilerSettings};
use clusterclaw_agent::runtime::{
    ContainerRuntime, ContainerSpec, FakeRuntime, NetworkSpec, ObservedContainer, ObservedNetwork,
    ObservedVolume, RuntimeError, RuntimeInfo, VolumeSpec, labels,
};
use clusterclaw_agent::sync::{HostLoops, SyncSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// How long a host's loops get to stop before its runtime is torn down.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// What the health stub answers on every path: both probes' fields set.
const HEALTHY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 24\r\nConnection: close\r\n\r\n{\"ok\":true,\"ready\":true}";
/// What a gated health stub answers on `/readyz` before the replica's time-to-ready has passed.
const NOT_YET_READY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 25\r\nConnection: close\r\n\r\n{\"ok\":true,\"ready\":false}";
/// Where the health stub starts looking for a block of free ports: below Linux's ephemeral
/// range (32768 up), whose ports the machine's outgoing connections take at random, so that
/// a busy machine still has whole blocks free.
const STUB_FIRST_BASE: u16 = 20_000;
/// How many blocks it tries before giving up.
const STUB_ATTEMPTS: u16 = 80;

/// Store indexes with the instant something happened at them.
type Stamps = Arc<Mutex<Vec<(u64, Instant)>>>;

fn stamp(stamps: &Stamps, index: u64) {
    stamps
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((index, Instant::now()));
}

/// The fake's time-to-ready: a replica published on a port answers `/readyz` with ready only
/// `delay` after its container was (last) created there. Shared by one host's [`TimedEngine`]
/// (which notes the creations) and that host's own [`HealthStub`] (ports are per host).
#[derive(Debug)]
pub struct ReadyGate {
    delay: Duration,
    created: Mutex<HashMap<u16, Instant>>,
}

impl ReadyGate {
    pub fn new(delay: Duration) -> Arc<ReadyGate> {
        Arc::new(ReadyGate {
            delay,
            created: Mutex::new(HashMap::new()),
        })
    }

    /// The time-to-ready.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    fn created(&self, port: u16) {
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port, Instant::now());
    }

    /// Whether the replica on `port` is ready (a port nothing was created on is).
    pub fn ready(&self, port: u16) -> bool {
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&port)
            .is_none_or(|at| at.elapsed() >= self.delay)
    }
}

/// The last container created for one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    /// Its `io.clusterclaw.config-revision` label (0 when it has none).
    pub revision: u64,
    /// Its `io.clusterclaw.config-hash` label.
    pub config_hash: String,
    /// When the create call returned.
    pub at: Instant,
}

/// The agent library's `FakeRuntime`, which also records, per replica
/// (`tenant/project/replica`), the container it last created.
#[derive(Default)]
pub struct TimedEngine {
    inner: FakeRuntime,
    created: Mutex<HashMap<String, Created>>,
    gate: Option<Arc<ReadyGate>>,
}

impl TimedEngine {
    pub fn new() -> Self {
        TimedEngine::default()
    }

    /// An engine whose creations start `gate`'s time-to-ready on the published port.
    pub fn gated(gate: Arc<ReadyGate>) -> Self {
        TimedEngine {
            gate: Some(gate),
            ..TimedEngine::default()
        }
    }

    /// The engine underneath (its containers and recorded calls).
    pub fn fake(&self) -> &FakeRuntime {
        &self.inner
    }

    fn created_lock(&self) -> MutexGuard<'_, HashMap<String, Created>> {
        self.created.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last creation of every replica created so far, by `tenant/project/replica`.
    pub fn created(&self) -> HashMap<String, Created> {
        self.created_lock().clone()
    }

    /// Runs `f` over the last creation of every replica, without copying them (the engine
    /// waits meanwhile).
    pub fn with_created<R>(&self, f: impl FnOnce(&HashMap<String, Created>) -> R) -> R {
        f(&self.created_lock())
    }

    /// How many containers the engine holds that are running.
    pub fn running(&self) -> usize {
        self.inner
            .containers()
            .iter()
            .filter(|c| c.status.is_running())
            .count()
    }

    fn record(&self, spec: &ContainerSpec) {
        let label = |name: &str| spec.labels.get(name).map(String::as_str).unwrap_or("");
        let key = format!(
            "{}/{}/{}",
            label(labels::TENANT),
            label(labels::PROJECT),
            label(labels::REPLICA)
        );
        let created = Created {
            revision: label(labels::CONFIG_REVISION).parse().unwrap_or(0),
            config_hash: label(labels::CONFIG_HASH).to_string(),
            at: Instant::now(),
        };
        self.created_lock().insert(key, created);
    }
}

#[async_trait]
impl ContainerRuntime for TimedEngine {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.inner.ping().await
    }
    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.inner.create_container(spec).await
    }
    async fn download_archive(
        &self,
        id: &str,
        path: &str,
        dest: &std::path::Path,
    ) -> Result<u64, RuntimeError> {
        self.inner.download_archive(id, path, dest).await
    }
    async fn upload_archive(
        &self,
        id: &str,
        dir: &str,
        src: &std::path::Path,
    ) -> Result<(), RuntimeError> {
        self.inner.upload_archive(id, dir, src).await
    }
    async fn info(&self) -> Result<RuntimeInfo, RuntimeError> {
        self.inner.info().await
    }
    async fn list_managed_containers(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedContainer>, RuntimeError> {
        self.inner.list_managed_containers(host_id).await
    }
    async fn inspect_container(&self, id: &str) -> Result<Option<ObservedContainer>, RuntimeError> {
        self.inner.inspect_container(id).await
    }
    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError> {
        self.inner.ensure_image(image).await
    }
    /// The one call that is timed: what the bench waits for.
    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        if let (Some(gate), Some(publish)) = (&self.gate, &spec.publish) {
            gate.created(publish.host_port);
        }
        let id = self.inner.create_and_start(spec).await?;
        self.record(spec);
        Ok(id)
    }
    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.start_container(id).await
    }
    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        self.inner.stop_container(id, grace).await
    }
    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.remove_container(id).await
    }
    async fn ensure_volume(&self, spec: &VolumeSpec) -> Result<(), RuntimeError> {
        self.inner.ensure_volume(spec).await
    }
    async fn list_managed_volumes(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedVolume>, RuntimeError> {
        self.inner.list_managed_volumes(host_id).await
    }
    async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError> {
        self.inner.remove_volume(name).await
    }
    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<(), RuntimeError> {
        self.inner.ensure_network(spec).await
    }
    async fn list_managed_networks(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedNetwork>, RuntimeError> {
        self.inner.list_managed_networks(host_id).await
    }
    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        self.inner.remove_network(name).await
    }
    async fn container_stats(&self, id: &str) -> Result<ContainerStats, RuntimeError> {
        self.inner.container_stats(id).await
    }
}

/// When each replica (`tenant/project/replica`) was first reported Ready on each config
/// revision: when the report stream took the report saying so.
type ReadyReports = Arc<Mutex<HashMap<(String, u64), Instant>>>;

/// The agent's gRPC control plane, recording when each long poll that brought a change
/// returned, and when each replica was first reported Ready on a revision.
struct TimedControl {
    inner: GrpcControlPlane,
    answered: Stamps,
    reported_ready: ReadyReports,
}

#[async_trait]
impl ControlPlane for TimedControl {
    async fn watch_assignments(
        &self,
        known_index: u64,
        wait: Duration,
    ) -> Result<WatchAnswer, CallError> {
        let answer = self.inner.watch_assignments(known_index, wait).await?;
        if answer.changed {
            stamp(&self.answered, answer.index);
        }
        Ok(answer)
    }

    async fn report_status(&self, reports: ReportStream) -> Result<(), CallError> {
        let seen = self.reported_ready.clone();
        let ready = clusterclaw_proto::agent::ReplicaState::Ready as i32;
        let reports = reports.on_taken(move |report| {
            let at = Instant::now();
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            for r in report.replicas.iter().filter(|r| r.state == ready) {
                let key = format!("{}/{}/{}", r.tenant, r.project, r.replica);
                seen.entry((key, r.config_revision)).or_insert(at);
            }
        });
        self.inner.report_status(reports).await
    }
}

/// Answers every connection on a block of consecutive ports of 127.0.0.1 with a healthy,
/// ready Gateway's JSON (`{"ok":true,"ready":true}`), on its own one-worker runtime. Hosts
/// given its [`HealthStub::ports`] publish their replicas there, so their probes pass.
pub struct HealthStub {
    ports: PortRange,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HealthStub {
    /// Listens on `count` consecutive free ports.
    pub fn start(count: u16) -> anyhow::Result<HealthStub> {
        HealthStub::start_gated(count, None)
    }

    /// Listens on `count` consecutive free ports; with a `gate`, `/readyz` on a port answers
    /// not ready until the gate's time-to-ready has passed since a container was created there.
    pub fn start_gated(count: u16, gate: Option<Arc<ReadyGate>>) -> anyhow::Result<HealthStub> {
        let (first, listeners) = free_block(count)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("health-stub")
            .enable_all()
            .build()?;
        for listener in listeners {
            let port = listener.local_addr()?.port();
            let gate = gate.clone();
            listener.set_nonblocking(true)?;
            let listener = {
                let _guard = runtime.enter();
                tokio::net::TcpListener::from_std(listener)?
            };
            runtime.spawn(async move {
                loop {
                    let Ok((mut conn, _)) = listener.accept().await else {
                        continue;
                    };
                    let gate = gate.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        let mut seen = Vec::new();
                        // Reads the request head, then answers and closes.
                        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                            if seen.len() > 16 * 1024 {
                                return;
                            }
                        }
                        let readiness = seen.starts_with(b"GET /readyz");
                        let answer = match &gate {
                            Some(gate) if readiness && !gate.ready(port) => NOT_YET_READY,
                            _ => HEALTHY,
                        };
                        let _ = conn.write_all(answer).await;
                        let _ = conn.shutdown().await;
                    });
                }
            });
        }
        Ok(HealthStub {
            ports: PortRange {
                first,
                step: 1,
                count,
            },
            runtime: Some(runtime),
        })
    }

    /// The ports it answers on, as a host's port range.
    pub fn ports(&self) -> PortRange {
        self.ports
    }
}

impl Drop for HealthStub {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// `count` consecutive ports of 127.0.0.1, all bound.
fn free_block(count: u16) -> anyhow::Result<(u16, Vec<TcpListener>)> {
    for attempt in 0..STUB_ATTEMPTS {
        let Some(first) = attempt
            .checked_mul(count.saturating_add(7))
            .and_then(|o| STUB_FIRST_BASE.checked_add(o))
            .filter(|f| f.checked_add(count).is_some())
        else {
            break;
        };
        let bound: Result<Vec<TcpListener>, _> = (0..count)
            .map(|i| TcpListener::bind((Ipv4Addr::LOCALHOST, first + i)))
            .collect();
        if let Ok(listeners) = bound {
            return Ok((first, listeners));
        }
    }
    bail!("no block of {count} free consecutive ports from {STUB_FIRST_BASE} up")
}

/// Agent intervals a [`FleetHost`] runs with instead of the agent's defaults (`None` keeps the
/// default).
#[derive(Clone, Debug, Default)]
pub struct Intervals {
    pub report: Option<Duration>,
    pub resync: Option<Duration>,
    pub probe: Option<ProbeSettings>,
}

/// One simulated host: a data directory, a two-worker runtime and a [`TimedEngine`]; after
/// [`FleetHost::start`] the real host loops of the agent run on it until it is dropped.
pub struct FleetHost {
    name: String,
    engine: Arc<TimedEngine>,
    runtime: Option<tokio::runtime::Runtime>,
    stop: watch::Sender<bool>,
    answered: Stamps,
    received: Stamps,
    reported_ready: ReadyReports,
    host_id: Option<String>,
    // Dropped last, after the runtime.
    data: tempfile::TempDir,
}

impl FleetHost {
    /// A host named `name` (its enrollment host name) with an empty data directory.
    pub fn new(name: &str) -> anyhow::Result<FleetHost> {
        FleetHost::with_engine(name, TimedEngine::new())
    }

    /// As [`FleetHost::new`], with `engine` (e.g. [`TimedEngine::gated`]).
    pub fn with_engine(name: &str, engine: TimedEngine) -> anyhow::Result<FleetHost> {
        let data = tempfile::Builder::new()
            .prefix("clusterclaw-fleet-")
            .tempdir()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("host-{name}"))
            .enable_all()
            .build()?;
        Ok(FleetHost {
            name: name.to_string(),
            engine: Arc::new(engine),
            runtime: Some(runtime),
            stop: watch::Sender::new(false),
            answered: Stamps::default(),
            received: Stamps::default(),
            reported_ready: ReadyReports::default(),
            host_id: None,
            data,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Where the host's identity is saved (what an enrollment writes).
    pub fn identity_files(&self) -> IdentityFiles {
        IdentityFiles::in_dir(self.data.path())
    }

    /// The host id, once started.
    pub fn host_id(&self) -> Option<&str> {
        self.host_id.as_deref()
    }

    pub fn engine(&self) -> &Arc<TimedEngine> {
        &self.engine
    }

    /// Runs `f` to completion on the host's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> anyhow::Result<F::Output> {
        let rt = self.runtime.as_ref().context("the host is stopped")?;
        Ok(rt.block_on(f))
    }

    /// Starts the agent's host loops from the identity saved in the data directory, with the
    /// agent's default intervals, replicas published on `ports` (no port is checked on the
    /// machine: the engine is in memory).
    pub fn start(&mut self, ports: PortRange) -> anyhow::Result<()> {
        self.start_with(ports, &Intervals::default())
    }

    /// As [`FleetHost::start`], with some of the agent's intervals replaced.
    pub fn start_with(&mut self, ports: PortRange, intervals: &Intervals) -> anyhow::Result<()> {
        let rt = self.runtime.as_ref().context("the host is stopped")?;
        let identity = enroll::load(&self.identity_files())
            .with_context(|| format!("host {}: no saved identity", self.name))?;
        let host_id = identity.record.host_id.clone();
        let dir: PathBuf = self.data.path().to_path_buf();
        let defaults = AgentConfig::new(&dir, Some(identity.record.server.clone()));
        let mut settings = ReconcilerSettings::new(&host_id, &dir);
        settings.ports = ports;
        settings.backoff = BackoffPolicy {
            initial: defaults.restart_backoff,
            ..BackoffPolicy::default()
        };
        let engine: Arc<dyn ContainerRuntime> = self.engine.clone();
        let reconciler = Arc::new(Reconciler::new(engine, settings).with_port_check(|_| true));
        let control = {
            let _guard = rt.enter();
            Arc::new(TimedControl {
                inner: GrpcControlPlane::new(&identity, &[])?,
                answered: self.answered.clone(),
                reported_ready: self.reported_ready.clone(),
            })
        };
        let loops = HostLoops::new(
            SyncSettings {
                host_id: host_id.clone(),
                data_dir: dir,
                poll_wait: defaults.poll_wait,
                report_interval: intervals.report.unwrap_or(defaults.report_interval),
                resync_interval: intervals.resync.unwrap_or(defaults.resync_interval),
                probe: intervals.probe.unwrap_or(defaults.probe),
                runtime_name: "fake".into(),
            },
            reconciler,
            control,
        );
        let mut desired = loops.desired();
        let received = self.received.clone();
        let mut stop = self.stop.subscribe();
        rt.spawn(async move {
            loop {
                tokio::select! {
                    r = desired.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
                let index = desired.borrow_and_update().as_ref().map(|s| s.index);
                if let Some(index) = index {
                    stamp(&received, index);
                }
            }
        });
        rt.spawn(loops.run(self.stop.subscribe()));
        self.host_id = Some(host_id);
        Ok(())
    }

    /// Every long poll that brought new assignments: their index and when the call returned.
    pub fn answered(&self) -> Vec<(u64, Instant)> {
        self.answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// When the host first reported replica `key` (`tenant/project/replica`) Ready on config
    /// revision `revision`: when its report stream took that report.
    pub fn reported_ready(&self, key: &str, revision: u64) -> Option<Instant> {
        self.reported_ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(key.to_string(), revision))
            .copied()
    }

    /// Every assignment set the host's loops took up: its index and when it was published to
    /// the reconciler (after it was saved to disk).
    pub fn received(&self) -> Vec<(u64, Instant)> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for FleetHost {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(STOP_GRACE);
        }
    }
}
