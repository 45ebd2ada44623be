//! The host's loops: long-poll the assignments (saved to disk before acting), reconcile the engine against them, probe the replicas, and stream status reports.
//!
//! Five tasks share their views through watch channels:
//!
//! - **watch**: `WatchAssignments` in a loop; every new set is saved to `state.json`, then
//!   published. While the server is away it retries with jittered, capped exponential backoff.
//! - **reconcile**: a pass whenever the set changes, a liveness probe fails, a back-off deadline
//!   comes due, or the resync interval passes. It starts from the saved set (static
//!   stability) and never acts before it has a set: an agent that has heard nothing yet leaves
//!   the engine alone.
//! - **probe**: liveness and readiness of every running replica; a starting replica is probed
//!   every [`STARTUP_PROBE_INTERVAL`] during its initial delay and, if not ready by then, for
//!   readiness every tenth of its age (liveness keeps the probe interval), so Ready is seen
//!   quickly. Each probe runs on its own task and its verdict is published as it returns: a
//!   slow or timing-out probe delays no other replica's probes or reports.
//! - **sample**: host figures, container stats and Gateway figures once a report interval.
//!   Container stats take the engine about a second, so they are sampled here, never on the
//!   report path.
//! - **report**: one `Heartbeat` stream (`ReportStatus` with a server that lacks it), whose
//!   reports after the first carry only what changed (see [`crate::heartbeat`]); a report
//!   every report interval with the latest samples, and at once after any change of a
//!   replica's state or a new event (nothing on that path waits for the engine). Queued
//!   events ride on the next report the stream takes (see [`ReportStream`]).
//!
//! The saved set is acted on once the first long poll has answered or failed, or after
//! [`START_GATE`] at the latest: a control plane that can be reached gets to say that this host
//! was removed before a saved replica is started again. When the control plane says the host
//! has been removed (at start or later), the loops stop, `removed.json` is written into the data
//! directory, every replica container is stopped (volumes kept) and [`HostLoops::run`] returns
//! [`LoopsEnd::Removed`]; the agent then stays down until it is enrolled again.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use clusterclaw_proto::agent as pb;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::control::{CallError, ControlPlane, ReportStream};
use crate::metrics::{HostFigures, HostMetrics};
use crate::model::{Assignment, ContainerStats, ReplicaKey, ReplicaStatus, RetainedVolume};
use crate::probe::{self, Liveness, ProbeKind, ProbeSettings, ProbeStatus, ProbeTarget, Prober};
use crate::reconcile::{Observed, Reconciler, Step};
use crate::runtime::ContainerRuntime;
use crate::state::{SavedState, StateStore};
use crate::volumes::VolumeReporter;

/// First delay before reconnecting to the control plane.
pub const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(250);
/// Longest delay between reconnection attempts (also capped by the report interval, so that
/// status is fresh within one report interval of the server coming back).
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(30);
/// First delay before asking an unavailable engine again.
pub const ENGINE_RETRY_MIN_DELAY: Duration = Duration::from_millis(500);
/// How often a replica that has not been ready yet is probed, during its initial delay.
pub const STARTUP_PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Past its initial delay, a replica not ready yet is probed for readiness every this fraction
/// of its run's age (between [`STARTUP_PROBE_INTERVAL`] and the probe interval), so a slow
/// start is seen Ready within about a tenth of its time rather than a whole probe interval late.
const STARTUP_PROBE_AGE_DIVISOR: u32 = 10;
/// Changes arriving this close together go out in one report.
const REPORT_COALESCE: Duration = Duration::from_millis(5);
/// How long one container stats sample may take (the engine samples over about a second).
const STATS_TIMEOUT: Duration = Duration::from_secs(5);
/// How many reports may wait for the stream before the oldest are dropped.
const REPORT_QUEUE: usize = 4;

/// The longest a reconnected report stream waits for the assignments of the control plane's
/// answer to be applied.
pub const REPORT_SYNC_WAIT: Duration = Duration::from_secs(30);

/// The longest the saved assignments wait for the first answer of the control plane.
pub const START_GATE: Duration = Duration::from_secs(3);

/// The agent's version, as reported.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Settings of the loops.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncSettings {
    pub host_id: String,
    pub data_dir: PathBuf,
    /// How long the server may hold a long poll.
    pub poll_wait: Duration,
    pub report_interval: Duration,
    pub resync_interval: Duration,
    pub probe: ProbeSettings,
    /// `docker` or `podman`, for the runtime condition.
    pub runtime_name: String,
}

/// The assignments the host acts on, and the index they are current at.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredSet {
    pub index: u64,
    pub assignments: Vec<Assignment>,
    /// State volumes to keep although unassigned; `None` when not known (then none is deleted).
    pub retained: Option<Vec<RetainedVolume>>,
}

/// The replicas (`tenant/project/replica`) of `now` that `before` did not have, and those of
/// `before` that `now` no longer has, each sorted.
fn assignment_changes(
    before: &std::collections::BTreeSet<String>,
    now: &[Assignment],
) -> (Vec<String>, Vec<String>) {
    let now: std::collections::BTreeSet<String> = now.iter().map(|a| a.key().to_string()).collect();
    (
        now.difference(before).cloned().collect(),
        before.difference(&now).cloned().collect(),
    )
}

/// Whether the container engine answers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EngineCondition {
    pub ready: bool,
    pub runtime: String,
    pub version: String,
    pub message: String,
}

impl EngineCondition {
    pub fn to_proto(&self) -> pb::RuntimeCondition {
        pb::RuntimeCondition {
            ready: self.ready,
            runtime: self.runtime.clone(),
            version: self.version.clone(),
            message: self.message.clone(),
        }
    }
}

type Probes = Arc<BTreeMap<ReplicaKey, ProbeStatus>>;

/// The views the loops share.
struct Hub {
    desired: watch::Sender<Option<Arc<DesiredSet>>>,
    observed: watch::Sender<Option<Arc<Observed>>>,
    targets: watch::Sender<Arc<Vec<ProbeTarget>>>,
    probes: watch::Sender<Probes>,
    engine: watch::Sender<EngineCondition>,
    /// Wakes the reconcile loop (a liveness verdict turned Failed).
    reconcile_now: Notify,
    /// The watch loop reached the server again: the reporter need not wait out its back-off.
    server_back: Notify,
    /// The first long poll has answered or failed.
    first_contact: watch::Sender<bool>,
    /// Why the control plane removed this host, once it said so.
    removed: watch::Sender<Option<String>>,
    /// When the control plane last answered a long poll (what `stop_after_seconds` counts
    /// from).
    last_contact: watch::Sender<Instant>,
    /// `None` while what the host runs follows the control plane's latest answer; after losing
    /// it, `Some(u64::MAX)`, then, once it answers with new assignments, `Some(index)` until a
    /// reconcile pass has applied that index. Reports wait for `None` (up to
    /// [`REPORT_SYNC_WAIT`]), so a returning host removes its stale copies before it reports.
    catching_up: watch::Sender<Option<u64>>,
    /// The newest placement epoch given per replica (saved with the assignments).
    epochs: std::sync::Mutex<crate::fencing::Epochs>,
    /// The latest figures of the sample loop; `None` until the host's first are known.
    samples: watch::Sender<Option<Arc<Samples>>>,
}

/// What the sample loop measures once a report interval, on its own task: sampling container
/// stats takes the engine about a second, and a change of a replica's state must not wait for
/// it (nor may a heartbeat).
#[derive(Debug, Clone, Default)]
struct Samples {
    figures: HostFigures,
    /// Last stats per container id.
    stats: HashMap<String, ContainerStats>,
    /// Last Gateway figures per replica (see [`crate::gateway`]).
    gateway: HashMap<ReplicaKey, pb::GatewayMetrics>,
}

/// Why [`HostLoops::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoopsEnd {
    /// The stop signal.
    Stopped,
    /// The control plane removed this host: its replicas are stopped (see the module docs).
    Removed(String),
}

/// The backoff of reconnection attempts: jittered, never longer than `cap` (jitter adds up to
/// the delay itself, so the delay before jitter stops at half of it).
pub fn reconnect_backoff(cap: Duration) -> ExponentialBackoff {
    let cap = cap.clamp(RECONNECT_MIN_DELAY * 2, RECONNECT_MAX_DELAY);
    ExponentialBuilder::default()
        .with_min_delay(RECONNECT_MIN_DELAY)
        .with_max_delay(cap / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Completes when `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// The host's loops.
pub struct HostLoops {
    settings: SyncSettings,
    reconciler: Arc<Reconciler>,
    control: Arc<dyn ControlPlane>,
    store: StateStore,
    hub: Arc<Hub>,
}

impl HostLoops {
    pub fn new(
        settings: SyncSettings,
        reconciler: Arc<Reconciler>,
        control: Arc<dyn ControlPlane>,
    ) -> Self {
        let store = StateStore::new(&settings.data_dir);
        let engine = EngineCondition {
            ready: false,
            runtime: settings.runtime_name.clone(),
            version: String::new(),
            message: "not checked yet".into(),
        };
        let hub = Hub {
            desired: watch::Sender::new(None),
            observed: watch::Sender::new(None),
            targets: watch::Sender::new(Arc::default()),
            probes: watch::Sender::new(Arc::default()),
            engine: watch::Sender::new(engine),
            reconcile_now: Notify::new(),
            server_back: Notify::new(),
            first_contact: watch::Sender::new(false),
            removed: watch::Sender::new(None),
            last_contact: watch::Sender::new(Instant::now()),
            catching_up: watch::Sender::new(None),
            epochs: std::sync::Mutex::new(crate::fencing::Epochs::new()),
            samples: watch::Sender::new(None),
        };
        HostLoops {
            settings,
            reconciler,
            control,
            store,
            hub: Arc::new(hub),
        }
    }

    /// The set the host acts on (`None` until one is loaded or received).
    pub fn desired(&self) -> watch::Receiver<Option<Arc<DesiredSet>>> {
        self.hub.desired.subscribe()
    }

    /// The engine's condition as last seen.
    pub fn engine_condition(&self) -> watch::Receiver<EngineCondition> {
        self.hub.engine.subscribe()
    }

    /// Loads the saved assignments, if they were made for this host; they are acted on at once.
    pub fn load_saved(&self) -> Option<u64> {
        match self.store.load() {
            Ok(Some(saved)) if saved.host_id == self.settings.host_id => {
                tracing::info!(
                    index = saved.index,
                    replicas = saved.assignments.len(),
                    path = %self.store.path().display(),
                    "running the saved assignments until the control plane answers"
                );
                let index = saved.index;
                *self.epochs() = saved.epochs;
                self.hub.desired.send_replace(Some(Arc::new(DesiredSet {
                    index,
                    assignments: saved.assignments,
                    retained: saved.retained,
                })));
                Some(index)
            }
            Ok(Some(saved)) => {
                tracing::warn!(
                    saved_for = %saved.host_id,
                    host = %self.settings.host_id,
                    path = %self.store.path().display(),
                    "ignoring saved assignments made for another host id"
                );
                None
            }
            Ok(None) => None,
            Err(err) => {
                tracing::error!(error = %err, "cannot read the saved assignments; waiting for the control plane");
                None
            }
        }
    }

    fn epochs(&self) -> std::sync::MutexGuard<'_, crate::fencing::Epochs> {
        self.hub.epochs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs every loop until `stop` turns true (containers keep running afterwards) or the
    /// control plane removes this host (containers are stopped).
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> LoopsEnd {
        let known = self.load_saved().unwrap_or(0);
        let this = Arc::new(self);
        let mut removed = this.hub.removed.subscribe();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(Arc::clone(&this).watch_loop(known, stop.clone()));
        tasks.spawn(Arc::clone(&this).reconcile_loop(stop.clone()));
        tasks.spawn(Arc::clone(&this).probe_loop(stop.clone()));
        tasks.spawn(Arc::clone(&this).sample_loop(stop.clone()));
        tasks.spawn(Arc::clone(&this).report_loop(stop.clone()));
        let reason = loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    None => return LoopsEnd::Stopped,
                    Some(Err(err)) if err.is_panic() => {
                        tracing::error!(error = %err, "an agent loop panicked; stopping");
                        tasks.abort_all();
                    }
                    Some(_) => {}
                },
                r = removed.wait_for(Option::is_some) => match r {
                    Ok(reason) => break reason.clone().unwrap_or_default(),
                    Err(_) => return LoopsEnd::Stopped,
                },
            }
        };
        // No loop may start, restart or replace anything from here on.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        this.stand_down(&reason, &mut stop).await;
        LoopsEnd::Removed(reason)
    }

    /// Records the removal (so that a restarted agent stays down), then stops every replica
    /// container, retrying while the engine is unavailable.
    async fn stand_down(&self, reason: &str, stop: &mut watch::Receiver<bool>) {
        tracing::error!(reason = %reason, "the control plane has removed this host; stopping its replicas (their state volumes are kept) until it is enrolled again");
        let record = crate::state::RemovedRecord::new(&self.settings.host_id, reason);
        let dir = self.settings.data_dir.clone();
        match tokio::task::spawn_blocking(move || crate::state::save_removed(&dir, &record)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::error!(error = %err, "cannot record the removal; a restarted agent will ask the control plane again")
            }
            Err(err) => tracing::error!(error = %err, "recording the removal failed"),
        }
        crate::notify::status(&removed_status(&self.settings.host_id));
        stop_replicas(&self.reconciler, stop).await;
    }

    // ---------------------------------------------------------------- watch

    async fn watch_loop(self: Arc<Self>, mut known: u64, mut stop: watch::Receiver<bool>) {
        let cap = self.settings.report_interval.min(RECONNECT_MAX_DELAY);
        let mut backoff = reconnect_backoff(cap);
        let mut failing = false;
        loop {
            // After a failure, a short poll: whether anything changed is known at once.
            let wait = if failing {
                crate::fencing::MIN_FENCED_POLL
            } else {
                let desired = self.hub.desired.borrow().clone();
                let assigned = desired.as_deref().map_or(&[][..], |d| &d.assignments[..]);
                jittered_wait(crate::fencing::poll_wait(self.settings.poll_wait, assigned))
            };
            let answer = tokio::select! {
                () = stopped(&mut stop) => return,
                a = self.control.watch_assignments(known, wait) => a,
            };
            match answer {
                Ok(answer) => {
                    self.hub.first_contact.send_replace(true);
                    self.hub.last_contact.send_replace(Instant::now());
                    let returning = failing;
                    if failing {
                        tracing::info!("control plane reachable again");
                        failing = false;
                    }
                    backoff = reconnect_backoff(cap);
                    if answer.changed {
                        known = answer.index;
                        if returning {
                            self.hub.catching_up.send_replace(Some(answer.index));
                        }
                        self.accept(answer.index, answer.assignments, answer.retained_volumes)
                            .await;
                        self.delete_volumes(answer.delete_volumes);
                    } else {
                        self.hub.catching_up.send_replace(None);
                    }
                    if returning {
                        // Replicas stopped for want of contact may run again.
                        self.hub.reconcile_now.notify_one();
                    }
                    self.hub.server_back.notify_one();
                }
                Err(CallError::Removed(reason)) => {
                    self.hub.removed.send_replace(Some(reason));
                    return;
                }
                Err(err) => {
                    self.hub.first_contact.send_replace(true);
                    self.hub.catching_up.send_replace(Some(u64::MAX));
                    let delay = backoff.next().unwrap_or(cap);
                    match &err {
                        CallError::Removed(_) | CallError::Refused(_) => {
                            tracing::error!(error = %err, retry_in = ?delay, "assignments refused; the replicas keep running from the saved assignments")
                        }
                        _ => {
                            tracing::warn!(error = %err, retry_in = ?delay, "cannot fetch assignments; the replicas keep running from the saved assignments")
                        }
                    }
                    failing = true;
                    tokio::select! {
                        () = stopped(&mut stop) => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Removes the state volumes the control plane asked to remove, in the background, checked
    /// against the assignments and retained volumes just accepted.
    fn delete_volumes(&self, asked: Vec<String>) {
        if asked.is_empty() {
            return;
        }
        let Some(set) = self.hub.desired.borrow().clone() else {
            return;
        };
        let reconciler = self.reconciler.clone();
        tokio::spawn(async move {
            let retained = set.retained.clone().unwrap_or_default();
            if let Err(err) = reconciler
                .delete_volumes_on_request(&asked, &set.assignments, &retained)
                .await
            {
                tracing::warn!(error = %err, "cannot remove the state volumes the control plane asked to remove; it asks again");
            }
        });
    }

    /// Converts, saves, then publishes a new assignment set.
    async fn accept(
        &self,
        index: u64,
        wire: Vec<pb::Assignment>,
        retained: Vec<pb::RetainedVolume>,
    ) {
        let mut retained: Vec<RetainedVolume> = retained.into_iter().map(Into::into).collect();
        let converted: Result<Vec<Assignment>, _> =
            wire.into_iter().map(Assignment::try_from).collect();
        let assignments = match converted {
            Ok(a) => a,
            Err(err) => {
                tracing::error!(index, error = %err, "the control plane sent an assignment this agent cannot run; keeping the previous assignments");
                return;
            }
        };
        let (assignments, epochs) = {
            let mut epochs = self.epochs();
            let (ok, refused) = crate::fencing::admit(&mut epochs, assignments);
            for r in &refused {
                let message = r.message();
                tracing::error!(replica = %r.assignment.key(), epoch = r.assignment.epoch, newest = r.newest, "{message}");
                self.reconciler
                    .events()
                    .push(crate::events::AgentEvent::about(
                        &r.assignment,
                        "StaleEpochRefused",
                        message,
                    ));
            }
            // A refused replica is not run, but its state volume is never given up for it.
            retained.extend(refused.iter().map(|r| RetainedVolume {
                tenant: r.assignment.tenant.clone(),
                project: r.assignment.project.clone(),
                instance: r.assignment.instance.clone(),
                replica: r.assignment.replica.clone(),
                instance_uid: r.assignment.instance_uid.clone(),
            }));
            (ok, epochs.clone())
        };
        let saved = SavedState::new(&self.settings.host_id, index, assignments.clone())
            .with_retained(retained.clone())
            .with_epochs(epochs);
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.save(&saved)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::error!(error = %err, "cannot save the assignments; acting on them anyway, but a restart without the control plane will not know them")
            }
            Err(err) => tracing::error!(error = %err, "saving the assignments failed"),
        }
        tracing::info!(
            index,
            replicas = assignments.len(),
            retained_volumes = retained.len(),
            "new assignments"
        );
        let (added, removed) = {
            let before = self.hub.desired.borrow();
            let before: std::collections::BTreeSet<String> = before
                .as_ref()
                .map(|s| s.assignments.iter().map(|a| a.key().to_string()).collect())
                .unwrap_or_default();
            assignment_changes(&before, &assignments)
        };
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(
                index,
                added = %added.join(","),
                removed = %removed.join(","),
                "replicas assigned to this host changed"
            );
        }
        self.hub.desired.send_replace(Some(Arc::new(DesiredSet {
            index,
            assignments,
            retained: Some(retained),
        })));
    }

    // ------------------------------------------------------------ reconcile

    async fn reconcile_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut first_contact = self.hub.first_contact.subscribe();
        tokio::select! {
            () = stopped(&mut stop) => return,
            _ = first_contact.wait_for(|c| *c) => {}
            () = tokio::time::sleep(START_GATE) => {
                tracing::info!("no answer from the control plane yet; acting on the saved assignments");
            }
        }
        let mut desired_rx = self.hub.desired.subscribe();
        let work_done = self.reconciler.work_done();
        let mut engine_backoff: Option<ExponentialBackoff> = None;
        let mut silenced_before = std::collections::BTreeSet::new();
        loop {
            let desired = desired_rx.borrow_and_update().clone();
            let mut next = Instant::now() + self.settings.resync_interval;
            match desired {
                None => {
                    // Nothing known yet: leave the engine alone, only watch its condition.
                    match self.reconciler.runtime().ping().await {
                        Ok(()) => self.engine_ready().await,
                        Err(err) => self.engine_down(&err.to_string()),
                    }
                }
                Some(set) => {
                    let probes = self.hub.probes.borrow().clone();
                    let now = Instant::now();
                    let last_contact = *self.hub.last_contact.borrow();
                    let cut = crate::fencing::silenced(last_contact, now, &set.assignments);
                    if cut != silenced_before {
                        for key in cut.difference(&silenced_before) {
                            tracing::warn!(replica = %key, silent_for = ?now.saturating_duration_since(last_contact), "no contact with the control plane for longer than the replica's failover.stopAfter; stopping it (its state volume is kept)");
                        }
                        silenced_before = cut.clone();
                    }
                    if let Some(at) = crate::fencing::next_stop(last_contact, now, &set.assignments)
                    {
                        next = next.min(at);
                    }
                    let (assignments, retained) = if cut.is_empty() {
                        (set.assignments.clone(), set.retained.clone())
                    } else {
                        let (stopped, running): (Vec<Assignment>, Vec<Assignment>) = set
                            .assignments
                            .iter()
                            .cloned()
                            .partition(|a| cut.contains(&a.key()));
                        // Stopped, not given up: their volumes stay.
                        let retained = set.retained.clone().map(|mut r| {
                            r.extend(stopped.iter().map(|a| RetainedVolume {
                                tenant: a.tenant.clone(),
                                project: a.project.clone(),
                                instance: a.instance.clone(),
                                replica: a.replica.clone(),
                                instance_uid: a.instance_uid.clone(),
                            }));
                            r
                        });
                        (running, retained)
                    };
                    self.reconciler.set_retained(retained.as_deref());
                    let pass = self.reconciler.reconcile(&assignments, &probes, now).await;
                    self.hub.catching_up.send_if_modified(|c| match c {
                        Some(i) if *i <= set.index => {
                            *c = None;
                            true
                        }
                        _ => false,
                    });
                    match pass {
                        Ok(pass) => {
                            engine_backoff = None;
                            self.engine_ready().await;
                            let acted = pass
                                .outcomes
                                .iter()
                                .any(|o| !matches!(o.step, Step::Wait { .. }));
                            let observed = if acted {
                                match self.reconciler.observe().await {
                                    Ok(o) => o,
                                    Err(_) => pass.observed,
                                }
                            } else {
                                pass.observed
                            };
                            let targets =
                                self.reconciler.probe_targets(&set.assignments, &observed);
                            self.hub.targets.send_if_modified(|t| {
                                if **t == targets {
                                    false
                                } else {
                                    *t = Arc::new(targets);
                                    true
                                }
                            });
                            self.hub.observed.send_if_modified(|o| {
                                if o.as_deref() == Some(&observed) {
                                    false
                                } else {
                                    *o = Some(Arc::new(observed));
                                    true
                                }
                            });
                            if let Some(wake) = pass.next_wake {
                                next = next.min(wake);
                            }
                        }
                        Err(err) => {
                            self.engine_down(&err.to_string());
                            let b = engine_backoff.get_or_insert_with(|| {
                                ExponentialBuilder::default()
                                    .with_min_delay(ENGINE_RETRY_MIN_DELAY)
                                    .with_max_delay(self.settings.resync_interval)
                                    .with_jitter()
                                    .without_max_times()
                                    .build()
                            });
                            let delay = b.next().unwrap_or(self.settings.resync_interval);
                            next = Instant::now() + delay;
                        }
                    }
                }
            }
            tokio::select! {
                () = stopped(&mut stop) => return,
                r = desired_rx.changed() => if r.is_err() { return },
                () = self.hub.reconcile_now.notified() => {}
                () = work_done.notified() => {}
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }

    async fn engine_ready(&self) {
        if self.hub.engine.borrow().ready {
            return;
        }
        let info = self.reconciler.runtime().info().await;
        let (runtime, version) = match info {
            Ok(i) => (i.runtime, i.version),
            Err(_) => (self.settings.runtime_name.clone(), String::new()),
        };
        tracing::info!(%runtime, %version, "container engine available");
        self.hub.engine.send_replace(EngineCondition {
            ready: true,
            runtime,
            version,
            message: String::new(),
        });
    }

    fn engine_down(&self, message: &str) {
        let changed = self.hub.engine.send_if_modified(|c| {
            if !c.ready && c.message == message {
                return false;
            }
            c.ready = false;
            c.message = message.to_string();
            true
        });
        if changed {
            tracing::warn!(error = %message, "container engine unavailable; replicas are left as they are and the agent keeps trying");
        }
    }

    // ---------------------------------------------------------------- probe

    async fn probe_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        run_probes(
            self.settings.probe,
            self.hub.targets.subscribe(),
            &self.hub.probes,
            &self.hub.reconcile_now,
            &mut stop,
        )
        .await;
    }

    // --------------------------------------------------------------- report

    /// Samples host figures, container stats and Gateway figures every report interval and
    /// publishes them for the reports (the first host figures at once).
    async fn sample_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let data_dir = self.settings.data_dir.clone();
        let mut metrics = match tokio::task::spawn_blocking(move || HostMetrics::new(data_dir))
            .await
        {
            Ok(Ok(m)) => Some(m),
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "host figures unavailable; reporting without them");
                None
            }
            Err(_) => None,
        };
        let mut current = Samples::default();
        loop {
            let round = async {
                current.figures = sample(&mut metrics).await;
                if self.hub.samples.borrow().is_none() {
                    self.hub
                        .samples
                        .send_replace(Some(Arc::new(current.clone())));
                }
                current.stats = self.sample_stats().await;
                current.gateway = self.sample_gateway().await;
                self.hub
                    .samples
                    .send_replace(Some(Arc::new(current.clone())));
            };
            tokio::select! {
                () = stopped(&mut stop) => return,
                () = round => {}
            }
            tokio::select! {
                () = stopped(&mut stop) => return,
                () = tokio::time::sleep(self.settings.report_interval) => {}
            }
        }
    }

    async fn report_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut reporter = Reporter {
            last_sent: None,
            volumes: VolumeReporter::default(),
        };
        // The first report carries the host's figures (its capacity places replicas).
        let mut samples = self.hub.samples.subscribe();
        tokio::select! {
            () = stopped(&mut stop) => return,
            r = samples.wait_for(Option::is_some) => if r.is_err() { return },
        }
        let cap = self.settings.report_interval.min(RECONNECT_MAX_DELAY);
        let mut backoff = reconnect_backoff(cap);
        let mut desired_rx = self.hub.desired.subscribe();
        let mut observed_rx = self.hub.observed.subscribe();
        let mut probes_rx = self.hub.probes.subscribe();
        let mut engine_rx = self.hub.engine.subscribe();
        let mut events_rx = self.reconciler.events().subscribe();
        let mut failing = false;
        loop {
            // A host back from a cut applies what the control plane now says before it reports
            // (and so turns Ready): its stale copies are gone first.
            let mut catching_up = self.hub.catching_up.subscribe();
            tokio::select! {
                () = stopped(&mut stop) => return,
                _ = catching_up.wait_for(Option::is_none) => {}
                () = tokio::time::sleep(REPORT_SYNC_WAIT) => {
                    tracing::debug!("reporting before the latest assignments are applied");
                }
            }
            let (tx, rx) = mpsc::channel(REPORT_QUEUE);
            let stream = ReportStream::new(rx, self.reconciler.events().clone());
            let exchange = stream.exchange();
            let call = self.control.report_status(stream);
            tokio::pin!(call);
            // A fresh report opens every stream.
            reporter.last_sent = None;
            reporter.volumes.forget();
            let first = self.build_report(&mut reporter, true);
            let _ = tx.try_send(first);
            let mut tick = tokio::time::interval_at(
                Instant::now() + self.settings.report_interval,
                self.settings.report_interval,
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let outcome = loop {
                tokio::select! {
                    () = stopped(&mut stop) => {
                        drop(tx);
                        let _ = tokio::time::timeout(Duration::from_secs(2), &mut call).await;
                        return;
                    }
                    r = &mut call => break r,
                    // The server asked for a full report (the stream makes the next one full).
                    () = exchange.full_asked() => {
                        let report = self.build_report(&mut reporter, true);
                        if tx.try_send(report).is_err() {
                            reporter.volumes.forget();
                        }
                    }
                    _ = tick.tick() => {
                        // Nothing here may wait (see [`Samples`]): the figures are the sample
                        // loop's latest.
                        let report = self.build_report(&mut reporter, true);
                        if tx.try_send(report).is_err() {
                            reporter.volumes.forget();
                            tracing::debug!("status stream is backed up; a report was dropped");
                        }
                    }
                    _ = changed(&mut desired_rx, &mut observed_rx, &mut probes_rx, &mut engine_rx, &mut events_rx) => {
                        tokio::time::sleep(REPORT_COALESCE).await;
                        desired_rx.borrow_and_update();
                        observed_rx.borrow_and_update();
                        probes_rx.borrow_and_update();
                        engine_rx.borrow_and_update();
                        events_rx.borrow_and_update();
                        let report = self.build_report(&mut reporter, false);
                        let sig = self.signature(&report);
                        if reporter.last_sent.as_ref() != Some(&sig) && tx.try_send(report).is_ok() {
                            reporter.last_sent = Some(sig);
                        }
                    }
                }
            };
            let delay = match outcome {
                Err(CallError::Removed(reason)) => {
                    self.hub.removed.send_replace(Some(reason));
                    return;
                }
                Ok(()) => {
                    backoff = reconnect_backoff(cap);
                    RECONNECT_MIN_DELAY
                }
                Err(err) => {
                    let delay = backoff.next().unwrap_or(cap);
                    if !failing {
                        tracing::warn!(error = %err, retry_in = ?delay, "status stream failed; reconnecting");
                    } else {
                        tracing::debug!(error = %err, retry_in = ?delay, "status stream failed again");
                    }
                    failing = true;
                    delay
                }
            };
            tokio::select! {
                () = stopped(&mut stop) => return,
                () = tokio::time::sleep(delay) => {}
                () = self.hub.server_back.notified() => {
                    backoff = reconnect_backoff(cap);
                }
            }
            if failing {
                failing = false;
            }
        }
    }

    /// Samples container stats of every running replica (concurrently).
    async fn sample_stats(&self) -> HashMap<String, ContainerStats> {
        let Some(observed) = self.hub.observed.borrow().clone() else {
            return HashMap::new();
        };
        let runtime: &Arc<dyn ContainerRuntime> = self.reconciler.runtime();
        let running: Vec<String> = observed
            .containers
            .iter()
            .filter(|c| c.status.is_running())
            .map(|c| c.id.clone())
            .collect();
        let samples = futures::future::join_all(running.iter().map(|id| async move {
            let s = tokio::time::timeout(STATS_TIMEOUT, runtime.container_stats(id)).await;
            (id.clone(), s)
        }))
        .await;
        let mut stats = HashMap::new();
        for (id, s) in samples {
            match s {
                Ok(Ok(s)) => {
                    stats.insert(id, s);
                }
                Ok(Err(err)) => tracing::debug!(container = %id, error = %err, "no stats"),
                Err(_) => tracing::debug!(container = %id, "stats timed out"),
            }
        }
        stats
    }

    /// Scrapes the Gateway figures of every running replica whose config enables them
    /// (concurrently, each bounded by [`crate::gateway::SCRAPE_TIMEOUT`]).
    async fn sample_gateway(&self) -> HashMap<ReplicaKey, pb::GatewayMetrics> {
        let desired = self.hub.desired.borrow().clone();
        let observed = self.hub.observed.borrow().clone();
        let probes = self.hub.probes.borrow().clone();
        scrape_gateways(&self.reconciler, desired, observed, &probes).await
    }

    fn build_report(&self, reporter: &mut Reporter, remember: bool) -> pb::StatusReport {
        let desired = self.hub.desired.borrow().clone();
        let observed = self.hub.observed.borrow().clone();
        let probes = self.hub.probes.borrow().clone();
        let engine = self.hub.engine.borrow().clone();
        let samples = self.hub.samples.borrow().clone().unwrap_or_default();
        let (index, replicas) = match (&desired, &observed) {
            (Some(set), Some(observed)) => {
                let statuses: Vec<ReplicaStatus> =
                    self.reconciler
                        .statuses(&set.assignments, observed, &probes, Instant::now());
                let replicas = statuses
                    .into_iter()
                    .map(|mut s| {
                        s.stats = s
                            .container_id
                            .as_ref()
                            .and_then(|id| samples.stats.get(id).copied());
                        let mut p = s.to_proto();
                        p.gateway_metrics = samples.gateway.get(&s.key()).cloned();
                        p
                    })
                    .collect();
                (set.index, replicas)
            }
            (Some(set), None) => {
                let empty = Observed::default();
                let statuses =
                    self.reconciler
                        .statuses(&set.assignments, &empty, &probes, Instant::now());
                (
                    set.index,
                    statuses.iter().map(ReplicaStatus::to_proto).collect(),
                )
            }
            (None, _) => (0, Vec::new()),
        };
        // The volume list rides on the reports that are sent whatever changed (the first of a
        // stream and the periodic ones), and only when it changed or has not been sent lately.
        let volumes = if remember {
            let all: Option<Vec<crate::runtime::ObservedVolume>> = observed.as_ref().map(|o| {
                o.volumes
                    .iter()
                    .chain(&o.inherited_volumes)
                    .cloned()
                    .collect()
            });
            reporter.volumes.next(all.as_deref(), Instant::now())
        } else {
            None
        };
        let volumes_listed = volumes.is_some();
        let (volumes, volumes_total) = volumes.unwrap_or_default();
        let report = pb::StatusReport {
            volumes,
            volumes_listed,
            volumes_total,
            host: Some(samples.figures.to_proto()),
            runtime: Some(engine.to_proto()),
            replicas,
            applied_index: index,
            agent_version: AGENT_VERSION.to_string(),
            // Attached by the stream as it takes the report.
            events: Vec::new(),
            // Numbered (and made a delta) by the stream as it takes the report.
            ..Default::default()
        };
        if remember {
            reporter.last_sent = Some(self.signature(&report));
        }
        report
    }

    /// What `report` says that warrants an immediate report, with the count of events queued
    /// so far: a new event is always worth a report (the stream attaches it).
    fn signature(&self, report: &pb::StatusReport) -> Signature {
        signature(report, self.reconciler.events().queued_total())
    }
}

/// One scrape of the Gateway figures of every running replica of `desired` whose config
/// enables them, by replica.
pub async fn scrape_gateways(
    reconciler: &Reconciler,
    desired: Option<Arc<DesiredSet>>,
    observed: Option<Arc<Observed>>,
    probes: &BTreeMap<ReplicaKey, ProbeStatus>,
) -> HashMap<ReplicaKey, pb::GatewayMetrics> {
    let (Some(set), Some(observed)) = (desired, observed) else {
        return HashMap::new();
    };
    let tokens: HashMap<ReplicaKey, String> = set
        .assignments
        .iter()
        .filter_map(|a| Some((a.key(), crate::gateway::scrape_token(a)?)))
        .collect();
    if tokens.is_empty() {
        return HashMap::new();
    }
    let statuses = reconciler.statuses(&set.assignments, &observed, probes, Instant::now());
    let targets: Vec<(ReplicaKey, u16, &String)> = statuses
        .iter()
        .filter(|s| {
            matches!(
                s.state,
                crate::model::ReplicaState::Running | crate::model::ReplicaState::Ready
            )
        })
        .filter_map(|s| {
            let key = s.key();
            let token = tokens.get(&key)?;
            Some((key, s.host_port?, token))
        })
        .collect();
    futures::future::join_all(targets.into_iter().map(|(key, port, token)| async move {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let m = crate::gateway::scrape(addr, token, crate::gateway::Caps::default()).await;
        if !m.error.is_empty() {
            tracing::debug!(replica = %key.replica, error = %m.error, "Gateway figures not scraped");
        }
        (key, m)
    }))
    .await
    .into_iter()
    .collect()
}

/// A container run: its id and start time.
type Run = (String, Option<String>);

/// What one probe of one replica's container run found (liveness only when it was due).
struct ProbeResult {
    key: ReplicaKey,
    run: Run,
    live: Option<probe::ProbeOutcome>,
    ready: probe::ProbeOutcome,
    at: Instant,
}

/// Probes every target on its own schedule until `stop`, publishing the verdicts on `probes`
/// as each probe returns and waking `liveness_failed` when a replica's liveness turns Failed.
///
/// Each probe runs as its own task: a slow or timing-out probe (up to the probe timeout)
/// delays neither another replica's probes nor the publication of their results. A replica
/// is probed again only once its previous probe has returned; the result of a probe of a
/// container run that has since been replaced or removed is dropped.
async fn run_probes(
    settings: ProbeSettings,
    mut targets_rx: watch::Receiver<Arc<Vec<ProbeTarget>>>,
    probes: &watch::Sender<Probes>,
    liveness_failed: &Notify,
    stop: &mut watch::Receiver<bool>,
) {
    let mut prober = Prober::new(settings);
    let mut schedule: HashMap<ReplicaKey, RunSchedule> = HashMap::new();
    let mut in_flight: tokio::task::JoinSet<ProbeResult> = tokio::task::JoinSet::new();
    // The replica and container run each probe task is for.
    let mut tasks: HashMap<tokio::task::Id, (ReplicaKey, Run)> = HashMap::new();
    let mut targets = targets_rx.borrow_and_update().clone();
    let mut targets_changed = true;
    let mut results: Vec<ProbeResult> = Vec::new();
    loop {
        let now = Instant::now();
        // The statuses are assembled and compared only when a target or a verdict changed:
        // most probes of a steady host confirm what is already published.
        let mut publish = targets_changed;
        if targets_changed {
            targets_changed = false;
            prober.set_targets(&targets, now);
            schedule.retain(|k, _| targets.iter().any(|t| &t.key == k));
            for t in targets.iter() {
                let run = (t.container_id.clone(), t.started_at.clone());
                let entry = schedule
                    .entry(t.key.clone())
                    .or_insert_with(|| RunSchedule::new(run.clone(), now));
                if entry.run != run {
                    *entry = RunSchedule::new(run, now);
                }
            }
        }

        for r in results.drain(..) {
            let Some(s) = schedule.get_mut(&r.key).filter(|s| s.run == r.run) else {
                // The run was replaced or the replica removed while it was probed.
                continue;
            };
            s.probing = false;
            s.last = Some(r.at);
            let before = prober.status(&r.key);
            if let Some(live) = r.live {
                s.last_live = Some(r.at);
                prober.record(&r.key, ProbeKind::Liveness, live, r.at);
            }
            prober.record(&r.key, ProbeKind::Readiness, r.ready, r.at);
            publish |= prober.status(&r.key) != before;
            if !s.ready_seen && prober.status(&r.key).is_some_and(|p| p.ready) {
                s.ready_seen = true;
                tracing::info!(replica = %r.key, after_ms = r.at.saturating_duration_since(s.since).as_millis() as u64, "replica ready");
            }
        }

        // Start the probes that are due, at most one at a time per container run.
        for t in targets.iter() {
            let Some(s) = schedule.get_mut(&t.key) else {
                continue;
            };
            if s.probing || s.next_due(&settings) > now {
                continue;
            }
            s.probing = true;
            let live_due = s.liveness_due(&settings, now);
            let (key, run, addr, timeout) =
                (t.key.clone(), s.run.clone(), t.addr, settings.timeout);
            let for_task = (key.clone(), run.clone());
            let task = in_flight.spawn(async move {
                let live = async {
                    if live_due {
                        Some(probe::check(ProbeKind::Liveness, addr, timeout).await)
                    } else {
                        None
                    }
                };
                let (live, ready) =
                    tokio::join!(live, probe::check(ProbeKind::Readiness, addr, timeout));
                ProbeResult {
                    key,
                    run,
                    live,
                    ready,
                    at: Instant::now(),
                }
            });
            tasks.insert(task.id(), for_task);
        }

        if publish {
            let statuses = prober.statuses();
            let newly_failed = {
                let old = probes.borrow();
                statuses.iter().any(|(k, p)| {
                    matches!(p.liveness, Liveness::Failed { .. })
                        && !old.get(k).is_some_and(|o| o.liveness == p.liveness)
                })
            };
            probes.send_if_modified(|p| {
                if **p == statuses {
                    false
                } else {
                    *p = Arc::new(statuses);
                    true
                }
            });
            if newly_failed {
                liveness_failed.notify_one();
            }
        }

        let next = schedule
            .values()
            .filter(|s| !s.probing)
            .map(|s| s.next_due(&settings))
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = stopped(stop) => {
                in_flight.abort_all();
                return;
            }
            r = targets_rx.changed() => {
                if r.is_err() {
                    in_flight.abort_all();
                    return;
                }
                targets = targets_rx.borrow_and_update().clone();
                targets_changed = true;
            }
            Some(joined) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                // Every probe that has returned meanwhile is recorded in this turn.
                let mut joined = Some(joined);
                while let Some(j) = joined {
                    match j {
                        Ok((id, r)) => {
                            tasks.remove(&id);
                            results.push(r);
                        }
                        Err(err) => {
                            // Short of a bug a probe task does not fail; its run is probed
                            // again when due.
                            tracing::warn!(error = %err, "a probe task ended abnormally");
                            if let Some((key, run)) = tasks.remove(&err.id())
                                && let Some(s) = schedule.get_mut(&key).filter(|s| s.run == run)
                            {
                                s.probing = false;
                                s.last = Some(Instant::now());
                            }
                        }
                    }
                    joined = in_flight.try_join_next_with_id();
                }
            }
            () = tokio::time::sleep_until(next) => {}
        }
    }
}

/// Per replica: when its current container run was first seen and last probed.
#[derive(Debug, Clone)]
struct RunSchedule {
    run: (String, Option<String>),
    since: Instant,
    /// The last probe (readiness, and liveness with it when due).
    last: Option<Instant>,
    /// The last liveness probe.
    last_live: Option<Instant>,
    ready_seen: bool,
    /// A probe of this run is under way.
    probing: bool,
}

impl RunSchedule {
    fn new(run: (String, Option<String>), since: Instant) -> Self {
        RunSchedule {
            run,
            since,
            last: None,
            last_live: None,
            ready_seen: false,
            probing: false,
        }
    }

    /// When the next probe is due: every [`STARTUP_PROBE_INTERVAL`] during the initial delay
    /// until the run is first ready; past it, while not yet ready, every tenth of the run's age
    /// (at least [`STARTUP_PROBE_INTERVAL`], at most the probe interval); once ready, every
    /// probe interval.
    fn next_due(&self, settings: &ProbeSettings) -> Instant {
        let Some(last) = self.last else {
            return self.since;
        };
        let fast = STARTUP_PROBE_INTERVAL.min(settings.interval);
        let interval = if self.ready_seen {
            settings.interval
        } else if last < self.since + settings.initial_delay.max(STARTUP_PROBE_INTERVAL) {
            fast
        } else {
            (last.saturating_duration_since(self.since) / STARTUP_PROBE_AGE_DIVISOR)
                .clamp(fast, settings.interval)
        };
        last + interval
    }

    /// Whether a probe at `now` also checks liveness: always during the initial delay (its
    /// failures do not count then), afterwards once a probe interval, whatever the readiness
    /// cadence, so failures count at the configured pace.
    fn liveness_due(&self, settings: &ProbeSettings, now: Instant) -> bool {
        now < self.since + settings.initial_delay
            || self.last_live.is_none_or(|l| now >= l + settings.interval)
    }
}

struct Reporter {
    /// What the last report said about the replicas and the engine.
    last_sent: Option<Signature>,
    /// What the last reports said about the state volumes.
    volumes: VolumeReporter,
}

/// The parts of a report whose change warrants an immediate report.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Signature {
    engine_ready: bool,
    applied_index: u64,
    replicas: Vec<ReplicaSignature>,
    /// Events queued since the agent started.
    events_queued: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ReplicaSignature {
    replica: String,
    state: i32,
    container_id: String,
    restarts: u32,
    host_port: u32,
    config_hash: String,
    generation: i64,
    config_revision: u64,
    observed_content_hash: String,
    snapshots: Vec<String>,
}

fn signature(r: &pb::StatusReport, events_queued: u64) -> Signature {
    Signature {
        engine_ready: r.runtime.as_ref().is_some_and(|c| c.ready),
        applied_index: r.applied_index,
        replicas: r
            .replicas
            .iter()
            .map(|s| ReplicaSignature {
                replica: format!("{}/{}/{}", s.tenant, s.project, s.replica),
                state: s.state,
                container_id: s.container_id.clone(),
                restarts: s.restarts,
                host_port: s.host_port,
                config_hash: s.config_hash.clone(),
                generation: s.generation,
                config_revision: s.config_revision,
                snapshots: s.snapshots.iter().map(|v| v.id.clone()).collect(),
                observed_content_hash: s.observed_content_hash.clone(),
            })
            .collect(),
        events_queued,
    }
}

async fn changed(
    a: &mut watch::Receiver<Option<Arc<DesiredSet>>>,
    b: &mut watch::Receiver<Option<Arc<Observed>>>,
    c: &mut watch::Receiver<Probes>,
    d: &mut watch::Receiver<EngineCondition>,
    e: &mut watch::Receiver<u64>,
) {
    // A closed channel means the loops are stopping; wait for the stop signal instead.
    tokio::select! {
        Ok(()) = a.changed() => {}
        Ok(()) = b.changed() => {}
        Ok(()) = c.changed() => {}
        Ok(()) = d.changed() => {}
        Ok(()) = e.changed() => {}
        else => std::future::pending::<()>().await,
    }
}

async fn sample(metrics: &mut Option<HostMetrics>) -> HostFigures {
    let Some(m) = metrics.take() else {
        return HostFigures::default();
    };
    match tokio::task::spawn_blocking(move || {
        let mut m = m;
        let f = m.sample();
        (m, f)
    })
    .await
    {
        Ok((m, f)) => {
            *metrics = Some(m);
            f
        }
        Err(_) => HostFigures::default(),
    }
}

/// The status line of a removed host (systemd `STATUS=`, and the log).
pub fn removed_status(host: &str) -> String {
    format!(
        "removed from the cluster: host {host}'s certificate is revoked and its replicas are stopped (state volumes kept); start the agent with a new --join-token to enroll again"
    )
}

/// Stops every replica container this agent owns; retries while the engine is unavailable,
/// until `stop`.
pub async fn stop_replicas(reconciler: &Reconciler, stop: &mut watch::Receiver<bool>) {
    let mut backoff: Option<ExponentialBackoff> = None;
    loop {
        match reconciler.stop_all().await {
            Ok(n) => {
                if n > 0 {
                    tracing::warn!(
                        stopped = n,
                        "replica containers stopped; their state volumes are kept"
                    );
                }
                return;
            }
            Err(err) => {
                let delay = backoff
                    .get_or_insert_with(|| reconnect_backoff(RECONNECT_MAX_DELAY))
                    .next()
                    .unwrap_or(RECONNECT_MAX_DELAY);
                tracing::error!(error = %err, retry_in = ?delay, "cannot stop the replicas of this removed host; retrying");
                tokio::select! {
                    () = stopped(stop) => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The wait asked of the server: `poll_wait` less up to a tenth, so that many agents started
/// together do not come back in step.
fn jittered_wait(poll_wait: Duration) -> Duration {
    let tenth = poll_wait.as_millis() as u64 / 10;
    let less = if tenth == 0 {
        0
    } else {
        rand::random_range(0..=tenth)
    };
    (poll_wait - Duration::from_millis(less)).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests;
