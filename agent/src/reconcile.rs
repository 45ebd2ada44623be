//! Desired assignments against the containers found by label: a pure [`plan`] and a thin [`Reconciler`] that executes it.
//!
//! The plan never touches anything its [`Owner`] does not own (see [`crate::runtime::Owner`]:
//! the cluster id and host uid labels, or a pre-upgrade object adopted once). It
//! creates missing replicas, replaces a container whose config hash or image changed (the
//! state volume stays), removes containers of replicas no longer assigned and then their
//! volumes, restarts exited or dead-by-liveness containers with exponential back-off counted
//! per replica, and leaves healthy running containers alone: a restarted agent adopts what runs.
//!
//! A change of generation alone does not replace a container: the config hash covers
//! everything that requires a new container.
//!
//! The executor works on replicas at once (up to [`ReconcilerSettings::max_parallel`]), each
//! replica's steps in order in its own task; a pass does not wait for a slow stop, and a
//! replica whose work is still in flight is left alone by later passes (see
//! [`Reconciler::execute`]). Every stop uses the replica's own grace period. Before a replica
//! changes image its state volume is snapshotted, and restored on a downgrade or rollback
//! (see [`crate::snapshot`]). The volume of a replica no longer assigned is removed only when
//! the control plane did not list it as retained.
//!
//! Every pass also measures each current, running container against its assignment's content
//! hash ([`crate::drift`]): the config file on the host is read (a few KB) and the container's
//! environment, which cannot change while the container exists, is taken once per container.
//! A container that drifted is replaced with a freshly written config file
//! ([`Step::RepairDrift`]) and a `ConfigDriftRepaired` event is queued. Repairs back off like
//! restarts, so that something rewriting the file in a loop cannot make the agent churn.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::drift::{self, Drift, EnvPart, Measurement};
use crate::events::{AgentEvent, EventQueue};
use crate::model::{Assignment, ReplicaKey, ReplicaState, ReplicaStatus, RetainedVolume};
use crate::ports::{self, PortRange};
use crate::probe::{Liveness, ProbeStatus, ProbeTarget};
use crate::runtime::{
    ContainerRuntime, ContainerSpec, ContainerStatus, Labelled, LegacyObjects, ObservedContainer,
    ObservedNetwork, ObservedVolume, Owner, RuntimeError, VolumeSpec, labels, spec,
};
use crate::snapshot::{self, SnapshotDir, SnapshotMeta};
use crate::state;

/// How many ports a create tries when the engine reports the chosen one as taken.
const PORT_ATTEMPTS: usize = 8;

/// The rendered config's file name in a replica's directory.
const CONFIG_FILE: &str = "openclaw.json";
/// The file in a replica's directory that keeps when this agent asked the engine to start the
/// replica's runs ([`SavedRuns`]), so that `logs --previous` still tells the runs apart after
/// the agent itself restarted.
const RUNS_FILE: &str = "runs.json";

/// Milliseconds since the Unix epoch (0 before it).
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// What [`RUNS_FILE`] holds: a replica's [`ReplicaRecord::last_start`] and
/// [`ReplicaRecord::previous_run`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedRuns {
    #[serde(default)]
    last_start_ms: Option<u64>,
    #[serde(default)]
    previous: Option<SavedRun>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedRun {
    container_id: String,
    #[serde(default)]
    from_ms: Option<u64>,
    #[serde(default)]
    started_at: Option<String>,
    until_ms: u64,
}

impl SavedRuns {
    fn of(r: &ReplicaRecord) -> SavedRuns {
        SavedRuns {
            last_start_ms: r.last_start.map(unix_ms),
            previous: r.previous_run.as_ref().map(|p| SavedRun {
                container_id: p.container_id.clone(),
                from_ms: p.from.map(unix_ms),
                started_at: p.started_at.clone(),
                until_ms: unix_ms(p.until),
            }),
        }
    }

    fn last_start(&self) -> Option<SystemTime> {
        self.last_start_ms.map(from_unix_ms)
    }

    fn previous_run(&self) -> Option<PreviousRun> {
        self.previous.as_ref().map(|p| PreviousRun {
            container_id: p.container_id.clone(),
            from: p.from_ms.map(from_unix_ms),
            started_at: p.started_at.clone(),
            until: from_unix_ms(p.until_ms),
        })
    }
}

/// A replica's directory under the data dir (its rendered config, its snapshots).
fn replica_dir(data_dir: &Path, key: &ReplicaKey) -> PathBuf {
    // Names are DNS labels, so a dot separates them unambiguously.
    data_dir
        .join("replicas")
        .join(format!("{}.{}.{}", key.tenant, key.project, key.replica))
}

/// What the engine holds for this host, as read at the start of a pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub containers: Vec<ObservedContainer>,
    pub volumes: Vec<ObservedVolume>,
    pub networks: Vec<ObservedNetwork>,
    /// Content measurements of current, running containers, by container id (empty when the
    /// pass did not measure, e.g. a plain [`Reconciler::observe`]).
    pub content: BTreeMap<String, Measurement>,
    /// State volumes of earlier identities of this host (set aside by a re-enrollment or
    /// after a removal; see [`ReconcilerSettings::predecessors`]): reported to the control
    /// plane and removed when it asks, never used or removed by [`plan`].
    pub inherited_volumes: Vec<ObservedVolume>,
}

/// Delays between restarts (and between failed attempts to create) of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Delay after the first failure; doubled after each further one.
    pub initial: Duration,
    pub max: Duration,
    /// A replica that has run this long since the last attempt starts counting from zero again.
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

impl BackoffPolicy {
    /// The wait before the next attempt after `consecutive` failures in a row (none after zero).
    pub fn delay(&self, consecutive: u32) -> Duration {
        if consecutive == 0 {
            return Duration::ZERO;
        }
        let factor = 2u32.saturating_pow(consecutive - 1);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Something the executor is doing for a replica right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Pulling,
    Creating,
    /// Its old container is being stopped (its grace period) to be replaced.
    Stopping,
    /// Its container is being stopped and started again.
    Restarting,
    /// Its state volume is being saved before its image changes.
    Snapshotting,
    /// Its state volume is being restored from a snapshot.
    Restoring,
}

/// The agent's memory of one replica across passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaRecord {
    /// Restarts made by the agent (reported to the server).
    pub restarts: u32,
    /// Failures (exits, failed probes, failed creates) in a row; drives the back-off.
    pub consecutive_failures: u32,
    /// No new attempt before this.
    pub not_before: Option<Instant>,
    pub last_attempt: Option<Instant>,
    /// Why the last attempt to create or start failed.
    pub last_error: Option<String>,
    pub activity: Option<Activity>,
    /// The last content measurement of its current container (`None` when none was made).
    pub measured: Option<Measurement>,
    /// A drift being repaired: its event is queued once a new container runs.
    pub repairing: Option<Drift>,
    /// The run before its container's last restart (the agent restarts a container in place,
    /// so one container holds every run): what `logs --previous` shows.
    pub previous_run: Option<PreviousRun>,
    /// When this agent last asked the engine to start the replica's current container (its
    /// creation or its last restart): every line of the run that began then was written after
    /// it, and every line of the run before it was written before it.
    pub last_start: Option<SystemTime>,
}

/// The run before a container's last restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousRun {
    pub container_id: String,
    /// When this agent asked the engine to start that run; `None` when it does not know (the
    /// container was started before this agent's own start).
    pub from: Option<SystemTime>,
    /// When that run started, as the engine said (it records the time once the process runs,
    /// so the run's first lines may be stamped before it): the fallback for `from`.
    pub started_at: Option<String>,
    /// When this agent asked the engine to start the run after it.
    pub until: SystemTime,
}

/// Per-replica records, shared between the reconciler and the status reporter.
#[derive(Debug, Clone, Default)]
pub struct ReplicaBook {
    records: Arc<Mutex<BTreeMap<ReplicaKey, ReplicaRecord>>>,
    policy: BackoffPolicy,
}

impl ReplicaBook {
    pub fn new(policy: BackoffPolicy) -> Self {
        ReplicaBook {
            records: Arc::default(),
            policy,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<ReplicaKey, ReplicaRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn policy(&self) -> BackoffPolicy {
        self.policy
    }

    pub fn get(&self, key: &ReplicaKey) -> ReplicaRecord {
        self.lock().get(key).cloned().unwrap_or_default()
    }

    pub fn snapshot(&self) -> BTreeMap<ReplicaKey, ReplicaRecord> {
        self.lock().clone()
    }

    /// A restart was made: counts it and sets the back-off for the next one.
    pub fn record_restart(&self, key: &ReplicaKey, now: Instant) {
        let mut records = self.lock();
        let r = records.entry(key.clone()).or_default();
        r.restarts += 1;
        r.consecutive_failures += 1;
        r.not_before = Some(now + self.policy.delay(r.consecutive_failures));
        r.last_attempt = Some(now);
        r.last_error = None;
        r.activity = None;
    }

    /// The container `container_id`, whose last run the engine says started at `started_at`,
    /// was asked at `asked` to start again: that run becomes its previous one.
    pub fn record_previous_run(
        &self,
        key: &ReplicaKey,
        container_id: &str,
        started_at: Option<String>,
        asked: SystemTime,
    ) {
        let mut records = self.lock();
        let r = records.entry(key.clone()).or_default();
        r.previous_run = Some(PreviousRun {
            container_id: container_id.to_owned(),
            from: r.last_start,
            started_at,
            until: asked,
        });
        r.last_start = Some(asked);
    }

    /// Takes the starts an earlier run of this agent recorded, unless this one knows its own.
    fn seed_runs(&self, key: &ReplicaKey, saved: &SavedRuns) {
        let mut records = self.lock();
        let r = records.entry(key.clone()).or_default();
        if r.last_start.is_none() && r.previous_run.is_none() {
            r.last_start = saved.last_start();
            r.previous_run = saved.previous_run();
        }
    }

    /// Reads what an earlier run of this agent recorded in `data_dir` of the replica's starts,
    /// unless the book already knows them.
    fn load_runs(&self, data_dir: &Path, key: &ReplicaKey) {
        let r = self.get(key);
        if r.last_start.is_some() || r.previous_run.is_some() {
            return;
        }
        let path = replica_dir(data_dir, key).join(RUNS_FILE);
        let saved = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the replica's recorded starts");
                return;
            }
        };
        match serde_json::from_slice::<SavedRuns>(&saved) {
            Ok(saved) => self.seed_runs(key, &saved),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring the replica's recorded starts");
            }
        }
    }

    /// Writes the replica's starts as the book knows them into its directory under `data_dir`
    /// (replacing the file whole).
    fn save_runs(&self, data_dir: &Path, key: &ReplicaKey) {
        let dir = replica_dir(data_dir, key);
        let saved = SavedRuns::of(&self.get(key));
        let written = state::create_private_dir(&dir).and_then(|()| {
            let text = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
            state::write_file_atomic(&dir.join(RUNS_FILE), &text, 0o600)
        });
        if let Err(e) = written {
            tracing::warn!(replica = %key, error = %e, "cannot record the replica's start; logs --previous may show more than its previous run after this agent restarts");
        }
    }

    /// A new container of the replica was asked at `asked` to start.
    pub fn record_start_asked(&self, key: &ReplicaKey, asked: SystemTime) {
        let mut records = self.lock();
        records.entry(key.clone()).or_default().last_start = Some(asked);
    }

    /// An attempt to create or start failed with `error`.
    pub fn record_failure(&self, key: &ReplicaKey, now: Instant, error: String) {
        let mut records = self.lock();
        let r = records.entry(key.clone()).or_default();
        r.consecutive_failures += 1;
        r.not_before = Some(now + self.policy.delay(r.consecutive_failures));
        r.last_attempt = Some(now);
        r.last_error = Some(error);
        r.activity = None;
    }

    /// A container was created and started.
    pub fn record_created(&self, key: &ReplicaKey, now: Instant) {
        let mut records = self.lock();
        let r = records.entry(key.clone()).or_default();
        r.last_attempt = Some(now);
        r.last_error = None;
        r.activity = None;
    }

    /// Keeps the last content measurement of the replica's current container.
    pub fn set_measured(&self, key: &ReplicaKey, measured: Option<Measurement>) {
        let mut records = self.lock();
        if measured.is_none() && !records.contains_key(key) {
            return;
        }
        records.entry(key.clone()).or_default().measured = measured;
    }

    /// A drift repair starts.
    pub fn begin_repair(&self, key: &ReplicaKey, drift: Drift) {
        self.lock().entry(key.clone()).or_default().repairing = Some(drift);
    }

    /// Ends a drift repair, returning it.
    pub fn take_repair(&self, key: &ReplicaKey) -> Option<Drift> {
        self.lock().get_mut(key).and_then(|r| r.repairing.take())
    }

    /// A drift was repaired: the next repair of this replica waits for the back-off, as a
    /// restart would.
    pub fn record_repaired(&self, key: &ReplicaKey, now: Instant) {
        let mut records = self.lock();
        let r = records.entry(key.clone()).or_default();
        r.consecutive_failures += 1;
        r.not_before = Some(now + self.policy.delay(r.consecutive_failures));
        r.last_attempt = Some(now);
    }

    pub fn set_activity(&self, key: &ReplicaKey, activity: Option<Activity>) {
        self.lock().entry(key.clone()).or_default().activity = activity;
    }

    /// The replica runs and is not failing: after `reset_after` since the last attempt, its
    /// failures in a row start from zero again.
    pub fn settle(&self, key: &ReplicaKey, now: Instant) {
        let reset_after = self.policy.reset_after;
        if let Some(r) = self.lock().get_mut(key)
            && r.last_attempt.is_none_or(|at| now >= at + reset_after)
        {
            r.consecutive_failures = 0;
            r.not_before = None;
        }
    }

    /// Forgets every replica `keep` rejects.
    pub fn retain(&self, keep: impl Fn(&ReplicaKey) -> bool) {
        self.lock().retain(|k, _| keep(k));
    }
}

/// Why a container is removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoveReason {
    /// Its replica is no longer assigned to this host.
    Unassigned,
    /// Another container runs the same replica.
    Duplicate,
    /// It carries this host's labels but not which replica it is.
    Unidentified,
}

/// Why a replica gets a new container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplaceReason {
    ConfigChanged {
        from: String,
        to: String,
    },
    ImageChanged {
        from: String,
        to: String,
    },
    /// The engine reports the container dead; it cannot be started again.
    Dead,
}

/// Why a container is restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartReason {
    /// It is not running (exited, or created and never started).
    NotRunning(ContainerStatus),
    LivenessFailed(String),
}

/// The events of a restart: why (out of memory, a failed liveness probe) and the restart
/// itself with the exit code.
pub fn restart_events(key: &ReplicaKey, reason: &RestartReason) -> Vec<AgentEvent> {
    use crate::events::{CONTAINER_RESTARTED, OOM_KILLED, PROBE_FAILED};
    match reason {
        RestartReason::NotRunning(ContainerStatus::Exited { code, oom_killed }) => {
            let mut out = Vec::new();
            if *oom_killed {
                out.push(
                    AgentEvent::of_replica(
                        key,
                        OOM_KILLED,
                        format!("the container of {} was killed for want of memory (exit code {code}); raise its memory limit", key.replica),
                    )
                    .warning()
                    .exit_code(*code),
                );
            }
            out.push(
                AgentEvent::of_replica(
                    key,
                    CONTAINER_RESTARTED,
                    format!(
                        "restarted the container of {} after it exited with code {code}",
                        key.replica
                    ),
                )
                .warning()
                .exit_code(*code),
            );
            out
        }
        RestartReason::NotRunning(status) => vec![
            AgentEvent::of_replica(
                key,
                CONTAINER_RESTARTED,
                format!(
                    "restarted the container of {}, which was {status}",
                    key.replica
                ),
            )
            .warning(),
        ],
        RestartReason::LivenessFailed(why) => vec![
            AgentEvent::of_replica(
                key,
                PROBE_FAILED,
                format!("liveness probe of {} failed: {why}", key.replica),
            )
            .warning(),
            AgentEvent::of_replica(
                key,
                CONTAINER_RESTARTED,
                format!(
                    "restarted the container of {} after its liveness probe failed",
                    key.replica
                ),
            )
            .warning(),
        ],
    }
}

/// One action of a reconcile pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    RemoveContainer {
        key: Option<ReplicaKey>,
        container_id: String,
        name: String,
        reason: RemoveReason,
    },
    RemoveVolume {
        key: ReplicaKey,
        volume: String,
    },
    RemoveNetwork {
        tenant: String,
        network: String,
    },
    Create {
        assignment: Box<Assignment>,
        /// A host port to reuse when it is free.
        preferred_port: Option<u16>,
    },
    /// Stop and remove `container_id`, then create the assignment's container (same volume).
    Replace {
        container_id: String,
        assignment: Box<Assignment>,
        preferred_port: Option<u16>,
        reason: ReplaceReason,
    },
    /// The current container does not have what the assignment says (config file or
    /// environment): stop and remove it, rewrite the config file, create the container again
    /// (same volume, its host port when free), then queue a `ConfigDriftRepaired` event.
    RepairDrift {
        container_id: String,
        assignment: Box<Assignment>,
        preferred_port: Option<u16>,
        drift: Drift,
    },
    /// Stop (when running) and start the same container again.
    Restart {
        key: ReplicaKey,
        container_id: String,
        running: bool,
        reason: RestartReason,
    },
    /// Nothing to do before `until` (back-off).
    Wait {
        key: ReplicaKey,
        until: Instant,
    },
}

impl Step {
    /// The replica the step acts on, if it is known.
    pub fn key(&self) -> Option<ReplicaKey> {
        match self {
            Step::RemoveContainer { key, .. } => key.clone(),
            Step::RemoveVolume { key, .. } | Step::Restart { key, .. } | Step::Wait { key, .. } => {
                Some(key.clone())
            }
            Step::Create { assignment, .. }
            | Step::Replace { assignment, .. }
            | Step::RepairDrift { assignment, .. } => Some(assignment.key()),
            Step::RemoveNetwork { .. } => None,
        }
    }
}

/// Everything [`plan`] decides from; plain values only.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// Whose objects may be acted on.
    pub owner: &'a Owner,
    pub desired: &'a [Assignment],
    pub observed: &'a Observed,
    /// The prober's view, per replica.
    pub probes: &'a BTreeMap<ReplicaKey, ProbeStatus>,
    /// The back-off records, per replica.
    pub records: &'a BTreeMap<ReplicaKey, ReplicaRecord>,
    /// Replicas whose state volume is kept although unassigned; `None` when not known, and
    /// then no volume is removed.
    pub retained: Option<&'a BTreeSet<ReplicaKey>>,
    pub now: Instant,
}

/// The container that runs (or should run) `a` among the replica's containers: one with the
/// desired config hash and image, and not of another placement epoch (a container without an
/// epoch label predates epochs and is adopted), running ones first, then the first by name.
pub fn current_container<'c>(
    a: &Assignment,
    containers: &[&'c ObservedContainer],
) -> Option<&'c ObservedContainer> {
    let mut matching: Vec<&ObservedContainer> = containers
        .iter()
        .copied()
        .filter(|c| c.config_hash() == Some(a.config_hash.as_str()) && c.image == a.image)
        .filter(|c| c.epoch().is_none_or(|e| e == a.epoch))
        .collect();
    matching.sort_by_key(|c| (!c.status.is_running(), c.name.clone(), c.id.clone()));
    matching.first().copied()
}

/// Whether the prober's verdict is about this very container run and says it is dead.
fn liveness_failure<'p>(c: &ObservedContainer, probe: Option<&'p ProbeStatus>) -> Option<&'p str> {
    let p = probe?;
    if p.container_id != c.id || p.started_at != c.started_at {
        return None;
    }
    match &p.liveness {
        Liveness::Failed { message } => Some(message),
        _ => None,
    }
}

/// What [`volumes_to_delete`] decides: the volumes that go (with their replica), and the
/// names that stay (with why).
pub type VolumeDeletions = (Vec<(ReplicaKey, String)>, Vec<(String, &'static str)>);

/// Which of the volumes the control plane asked to remove may go (pure): those among
/// `observed` (this agent's own) that no replica of `desired` or `retained` claims, with the
/// replica each belonged to; and the names that stay, with why.
pub fn volumes_to_delete(
    asked: &[String],
    observed: &[ObservedVolume],
    desired: &[Assignment],
    retained: &[RetainedVolume],
) -> VolumeDeletions {
    let claimed: BTreeSet<ReplicaKey> = desired
        .iter()
        .map(Assignment::key)
        .chain(retained.iter().map(RetainedVolume::key))
        .collect();
    let mut go = Vec::new();
    let mut kept = Vec::new();
    let asked: BTreeSet<&String> = asked.iter().collect();
    for name in asked {
        let Some(v) = observed.iter().find(|v| &v.name == name) else {
            kept.push((name.clone(), "no such volume of this host"));
            continue;
        };
        match v.replica_key() {
            None => kept.push((name.clone(), "it names no replica")),
            Some(key) if claimed.contains(&key) => {
                kept.push((name.clone(), "a replica of this host still claims it"))
            }
            Some(key) => go.push((key, name.clone())),
        }
    }
    (go, kept)
}

/// Decides what to do; performs no I/O.
pub fn plan(input: &PlanInput<'_>) -> Vec<Step> {
    let owner = input.owner;
    let mut removals = Vec::new();
    let mut volume_removals = Vec::new();
    let mut network_removals = Vec::new();
    let mut actions = Vec::new();

    // Desired replicas, first assignment of a key wins.
    let mut desired: BTreeMap<ReplicaKey, &Assignment> = BTreeMap::new();
    let mut order = Vec::new();
    for a in input.desired {
        if let std::collections::btree_map::Entry::Vacant(slot) = desired.entry(a.key()) {
            order.push(slot.key().clone());
            slot.insert(a);
        }
    }

    // This host's managed containers by replica; anything else is not ours to touch.
    let mut by_key: BTreeMap<ReplicaKey, Vec<&ObservedContainer>> = BTreeMap::new();
    for c in input.observed.containers.iter().filter(|c| owner.owns(*c)) {
        match c.replica_key() {
            Some(key) => by_key.entry(key).or_default().push(c),
            None => removals.push(Step::RemoveContainer {
                key: None,
                container_id: c.id.clone(),
                name: c.name.clone(),
                reason: RemoveReason::Unidentified,
            }),
        }
    }

    for (key, containers) in &by_key {
        if desired.contains_key(key) {
            continue;
        }
        for c in containers {
            removals.push(Step::RemoveContainer {
                key: Some(key.clone()),
                container_id: c.id.clone(),
                name: c.name.clone(),
                reason: RemoveReason::Unassigned,
            });
        }
    }

    for v in input.observed.volumes.iter().filter(|v| owner.owns(*v)) {
        if let Some(key) = v.replica_key()
            && !desired.contains_key(&key)
            && input.retained.is_some_and(|r| !r.contains(&key))
        {
            volume_removals.push(Step::RemoveVolume {
                key,
                volume: v.name.clone(),
            });
        }
    }

    let tenants_in_use: BTreeSet<&str> = desired.keys().map(|k| k.tenant.as_str()).collect();
    for n in input.observed.networks.iter().filter(|n| owner.owns(*n)) {
        if let Some(tenant) = n.label(labels::TENANT)
            && !tenants_in_use.contains(tenant)
        {
            network_removals.push(Step::RemoveNetwork {
                tenant: tenant.to_owned(),
                network: n.name.clone(),
            });
        }
    }

    let empty = Vec::new();
    for key in &order {
        let a = desired[key];
        let containers = by_key.get(key).unwrap_or(&empty);
        let record = input.records.get(key);
        let held_until = record
            .and_then(|r| r.not_before)
            .filter(|until| *until > input.now);
        let current = current_container(a, containers);

        // Every container of the replica other than the current one goes; the first stale one
        // is replaced (its host port reused) when there is no current one.
        let mut stale: Vec<&ObservedContainer> = containers
            .iter()
            .copied()
            .filter(|c| current.is_none_or(|cur| cur.id != c.id))
            .collect();
        stale.sort_by_key(|c| (c.host_port.is_none(), c.name.clone()));
        let replaced = if current.is_none() && !stale.is_empty() {
            Some(stale.remove(0))
        } else {
            None
        };
        for c in stale {
            removals.push(Step::RemoveContainer {
                key: Some(key.clone()),
                container_id: c.id.clone(),
                name: c.name.clone(),
                reason: RemoveReason::Duplicate,
            });
        }

        if let Some(old) = replaced {
            if old.image != a.image
                && let Some(until) = held_until
            {
                // A failed snapshot kept the old container: try again after the back-off.
                actions.push(Step::Wait {
                    key: key.clone(),
                    until,
                });
                continue;
            }
            let reason = if old.image != a.image {
                ReplaceReason::ImageChanged {
                    from: old.image.clone(),
                    to: a.image.clone(),
                }
            } else {
                ReplaceReason::ConfigChanged {
                    from: old.config_hash().unwrap_or_default().to_owned(),
                    to: a.config_hash.clone(),
                }
            };
            actions.push(Step::Replace {
                container_id: old.id.clone(),
                assignment: Box::new(a.clone()),
                preferred_port: old.host_port,
                reason,
            });
            continue;
        }

        let Some(c) = current else {
            match held_until {
                Some(until) => actions.push(Step::Wait {
                    key: key.clone(),
                    until,
                }),
                None => actions.push(Step::Create {
                    assignment: Box::new(a.clone()),
                    preferred_port: None,
                }),
            }
            continue;
        };

        // A running container that drifted is replaced (which also ends a failed liveness).
        let drift = input
            .observed
            .content
            .get(&c.id)
            .filter(|m| c.status.is_running() && m.container_id == c.id)
            .and_then(|m| m.drift(a));
        if let Some(drift) = drift {
            match held_until {
                Some(until) => actions.push(Step::Wait {
                    key: key.clone(),
                    until,
                }),
                None => actions.push(Step::RepairDrift {
                    container_id: c.id.clone(),
                    assignment: Box::new(a.clone()),
                    preferred_port: c.host_port,
                    drift,
                }),
            }
            continue;
        }

        let restart = match &c.status {
            ContainerStatus::Running => liveness_failure(c, input.probes.get(key))
                .map(|m| (true, RestartReason::LivenessFailed(m.to_owned()))),
            status @ (ContainerStatus::Created | ContainerStatus::Exited { .. }) => {
                Some((false, RestartReason::NotRunning(status.clone())))
            }
            ContainerStatus::Dead => {
                match held_until {
                    Some(until) => actions.push(Step::Wait {
                        key: key.clone(),
                        until,
                    }),
                    None => actions.push(Step::Replace {
                        container_id: c.id.clone(),
                        assignment: Box::new(a.clone()),
                        preferred_port: c.host_port,
                        reason: ReplaceReason::Dead,
                    }),
                }
                continue;
            }
            // Paused, restarting or being removed: someone else is acting on it; look again later.
            ContainerStatus::Paused
            | ContainerStatus::Restarting
            | ContainerStatus::Removing
            | ContainerStatus::Unknown(_) => None,
        };
        if let Some((running, reason)) = restart {
            match held_until {
                Some(until) => actions.push(Step::Wait {
                    key: key.clone(),
                    until,
                }),
                None => actions.push(Step::Restart {
                    key: key.clone(),
                    container_id: c.id.clone(),
                    running,
                    reason,
                }),
            }
        }
    }

    removals
        .into_iter()
        .chain(volume_removals)
        .chain(network_removals)
        .chain(actions)
        .collect()
}

/// What the reporter says about one replica; pure.
pub fn replica_status(
    a: &Assignment,
    container: Option<&ObservedContainer>,
    probe: Option<&ProbeStatus>,
    record: &ReplicaRecord,
    now: Instant,
) -> ReplicaStatus {
    let probe = probe.filter(|p| {
        container.is_some_and(|c| p.container_id == c.id && p.started_at == c.started_at)
    });
    let held = record.not_before.filter(|until| *until > now);
    let (state, message) = if record.activity == Some(Activity::Pulling) {
        (ReplicaState::Pulling, format!("pulling {}", a.image))
    } else if record.activity == Some(Activity::Stopping) {
        (
            ReplicaState::Pending,
            "stopping the old container to replace it".to_owned(),
        )
    } else if record.activity == Some(Activity::Snapshotting) {
        (
            ReplicaState::Pending,
            format!(
                "saving a snapshot of the state volume before switching to {}",
                a.image
            ),
        )
    } else if record.activity == Some(Activity::Restoring) {
        (
            ReplicaState::Pending,
            "restoring the state volume from a snapshot".to_owned(),
        )
    } else if record.activity == Some(Activity::Restarting) {
        (
            ReplicaState::Starting,
            "restarting the container".to_owned(),
        )
    } else if let Some(c) = container {
        match &c.status {
            ContainerStatus::Running => match probe.map(|p| (&p.liveness, p.ever_alive, p)) {
                None | Some((Liveness::Unknown, _, _)) => {
                    (ReplicaState::Starting, "waiting for the first probe".into())
                }
                Some((Liveness::Failed { message }, _, _)) => {
                    (ReplicaState::Unhealthy, message.clone())
                }
                Some((Liveness::Failing { message, .. }, true, _)) => {
                    (ReplicaState::Unhealthy, message.clone())
                }
                Some((Liveness::Failing { message, .. }, false, _)) => {
                    (ReplicaState::Starting, message.clone())
                }
                Some((Liveness::Alive, _, p)) if p.ready => (ReplicaState::Ready, String::new()),
                Some((Liveness::Alive, _, p)) => (
                    ReplicaState::Running,
                    p.readiness_message.clone().unwrap_or_default(),
                ),
            },
            ContainerStatus::Created | ContainerStatus::Restarting => {
                (ReplicaState::Starting, format!("container {}", c.status))
            }
            status @ (ContainerStatus::Exited { .. } | ContainerStatus::Dead) => match held {
                Some(until) => (
                    ReplicaState::CrashLoopBackOff,
                    format!(
                        "container {status}; next restart in {}s",
                        until.saturating_duration_since(now).as_secs()
                    ),
                ),
                None => (
                    ReplicaState::Starting,
                    format!("container {status}; restarting"),
                ),
            },
            ContainerStatus::Paused => (ReplicaState::Unhealthy, "container is paused".into()),
            ContainerStatus::Removing | ContainerStatus::Unknown(_) => {
                (ReplicaState::Pending, format!("container {}", c.status))
            }
        }
    } else if let Some(error) = &record.last_error {
        match (&record.repairing, held) {
            (Some(drift), Some(until)) => (
                ReplicaState::Failed,
                format!(
                    "repairing config drift ({}): {error}; retrying in {}s",
                    drift.kind.what(),
                    until.saturating_duration_since(now).as_secs()
                ),
            ),
            (Some(drift), None) => (
                ReplicaState::Failed,
                format!(
                    "repairing config drift ({}): {error}; retrying",
                    drift.kind.what()
                ),
            ),
            (None, _) => (ReplicaState::Failed, error.clone()),
        }
    } else if record.activity == Some(Activity::Creating) {
        (ReplicaState::Pending, "creating the container".into())
    } else {
        (ReplicaState::Pending, String::new())
    };
    let measured = record
        .measured
        .as_ref()
        .filter(|m| container.is_some_and(|c| c.id == m.container_id && c.status.is_running()));
    let drift_note = measured.and_then(|m| match m.drift(a) {
        Some(drift) => {
            let next = match (&record.last_error, held) {
                (Some(error), Some(until)) => format!(
                    "the repair failed: {error}; retrying in {}s",
                    until.saturating_duration_since(now).as_secs()
                ),
                (Some(error), None) => format!("the repair failed: {error}; retrying"),
                (None, Some(until)) => format!(
                    "repairing in {}s",
                    until.saturating_duration_since(now).as_secs()
                ),
                (None, None) => "repairing".to_owned(),
            };
            Some(format!("config drift: {}; {next}", drift.describe()))
        }
        None => m.disagreement(a),
    });
    let message = match drift_note {
        Some(note) if message.is_empty() => note,
        Some(note) => format!("{note}; {message}"),
        None => message,
    };
    // An old container that runs on because the switch to the new image failed (its
    // snapshot, say): the failure is what matters.
    let switch_failed = container
        .filter(|c| c.image != a.image)
        .and(record.last_error.as_ref());
    let message = match switch_failed {
        Some(error) if message.is_empty() => error.clone(),
        Some(error) => format!("{error}; {message}"),
        None => message,
    };
    let applied = container.filter(|c| c.config_hash() == Some(a.config_hash.as_str()));
    ReplicaStatus {
        tenant: a.tenant.clone(),
        project: a.project.clone(),
        instance: a.instance.clone(),
        replica: a.replica.clone(),
        ordinal: a.ordinal,
        generation: match (applied, container) {
            (Some(_), _) | (None, None) => a.generation,
            (None, Some(c)) => c.generation().unwrap_or_default(),
        },
        state,
        message,
        container_id: container.map(|c| c.id.clone()),
        restarts: record.restarts,
        host_port: container.and_then(|c| c.host_port),
        config_hash: container
            .and_then(|c| c.config_hash())
            .unwrap_or_default()
            .to_owned(),
        stats: None,
        config_revision: running_revision(a, container, measured),
        observed_content_hash: measured
            .and_then(|m| m.content_hash.clone())
            .unwrap_or_default(),
        snapshots: Vec::new(),
        epoch: container
            .and_then(ObservedContainer::epoch)
            .unwrap_or(a.epoch),
    }
}

/// The config revision `container` runs: its label, unless it is the current container of `a`
/// and provably has `a`'s exact content (its content-hash label or an in-sync measurement),
/// in which case it runs `a`'s revision whatever its label says (a new revision with the same
/// content does not replace the container). 0 without a container.
fn running_revision(
    a: &Assignment,
    container: Option<&ObservedContainer>,
    measured: Option<&Measurement>,
) -> u64 {
    let Some(c) = container else {
        return 0;
    };
    let current = c.config_hash() == Some(a.config_hash.as_str()) && c.image == a.image;
    let same_content = !a.content_hash.is_empty()
        && (c.label(labels::CONTENT_HASH) == Some(a.content_hash.as_str())
            || measured.and_then(|m| m.content_hash.as_deref()) == Some(a.content_hash.as_str()));
    if current && same_content {
        a.config_revision
    } else {
        c.config_revision().unwrap_or_default()
    }
}

/// Settings of a [`Reconciler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcilerSettings {
    /// This agent's identity on the engine (its adopted legacy objects are decided on the first
    /// pass, see [`Reconciler::observe`]).
    pub owner: Owner,
    /// Where rendered configs are written (`<data_dir>/replicas/...`).
    pub data_dir: PathBuf,
    pub ports: PortRange,
    /// The default grace period of a stop (a replica's own one wins).
    pub stop_grace: Duration,
    pub backoff: BackoffPolicy,
    /// How many replicas are worked on at once.
    pub max_parallel: usize,
    /// How long a pass waits for the work it started before it returns (the rest goes on).
    pub pass_wait: Duration,
    /// Snapshots of its state volume kept per replica.
    pub snapshots_keep: usize,
    /// Earlier identities of this host in the same cluster, whose state volumes stay on the
    /// engine: they are reported (so the control plane lists them, orphaned) and removed only
    /// when it asks.
    pub predecessors: Vec<Owner>,
}

/// Replicas worked on at once by default: enough that the engine gets every creation of a
/// one-host deployment of 10 Gateways at once, as 10 parallel `docker run` would (with 8, the
/// last two waited for a whole create and start of others, about a fifth of the time to all ready).
pub const DEFAULT_MAX_PARALLEL: usize = 16;

impl ReconcilerSettings {
    pub fn new(owner: impl Into<Owner>, data_dir: impl Into<PathBuf>) -> Self {
        ReconcilerSettings {
            owner: owner.into(),
            data_dir: data_dir.into(),
            ports: PortRange::DEFAULT,
            stop_grace: spec::DEFAULT_STOP_GRACE,
            backoff: BackoffPolicy::default(),
            max_parallel: DEFAULT_MAX_PARALLEL,
            pass_wait: Duration::from_secs(1),
            snapshots_keep: snapshot::DEFAULT_KEEP,
            predecessors: Vec::new(),
        }
    }
}

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("writing {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("no free host port in {first}..={last} (step {step})")]
    NoFreePort { first: u16, last: u16, step: u16 },
    #[error(
        "snapshot of the state volume before switching from {from} to {to} failed: {message}; the old container runs again"
    )]
    Snapshot {
        from: String,
        to: String,
        message: String,
    },
    #[error("state import (transfer {transfer}) failed: {message}")]
    Import { transfer: String, message: String },
}

/// The result of one executed step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutcome {
    pub step: Step,
    pub result: Result<(), StepError>,
}

/// What one reconcile pass saw and did.
#[derive(Debug, Clone)]
pub struct Pass {
    /// The engine's state before the steps ran.
    pub observed: Observed,
    pub outcomes: Vec<StepOutcome>,
    /// The earliest back-off deadline, when a pass should run again at the latest.
    pub next_wake: Option<Instant>,
}

impl Pass {
    pub fn failures(&self) -> impl Iterator<Item = &StepOutcome> {
        self.outcomes.iter().filter(|o| o.result.is_err())
    }
}

/// The environment part of a container's content hash, computed once per container.
#[derive(Debug, Clone)]
struct CachedEnv {
    /// The assignment's config hash it was computed for.
    config_hash: String,
    part: EnvPart,
}

/// Runs plans against a [`ContainerRuntime`].
pub struct Reconciler {
    runtime: Arc<dyn ContainerRuntime>,
    settings: Arc<ReconcilerSettings>,
    book: ReplicaBook,
    events: EventQueue,
    /// By container id; entries of containers that are gone are dropped every pass.
    env_parts: Mutex<HashMap<String, CachedEnv>>,
    port_is_free: fn(u16) -> bool,
    /// The owner with its adopted legacy objects, once they are decided.
    owner: Mutex<Option<Owner>>,
    /// See [`Reconciler::set_retained`].
    retained: Mutex<Option<BTreeSet<ReplicaKey>>>,
    /// Replicas (and unidentified containers) with work in flight.
    inflight: Arc<Mutex<BTreeSet<WorkKey>>>,
    /// When work ended, against the latest observation (see [`Finished`]).
    finished_work: Arc<Mutex<Finished>>,
    limit: Arc<tokio::sync::Semaphore>,
    finished: Arc<tokio::sync::Notify>,
    holds: Arc<Mutex<PortHolds>>,
    network_lock: Arc<tokio::sync::Mutex<()>>,
    /// Where the state of replicas moved here comes from (see [`Reconciler::set_state_source`]).
    state_source: StateSourceSlot,
    /// Transfers whose state was imported (their replica started from it).
    imported: Arc<Mutex<BTreeSet<String>>>,
}

type StateSourceSlot = Arc<Mutex<Option<Arc<dyn crate::transfer::StateSource>>>>;

impl Reconciler {
    pub fn new(runtime: Arc<dyn ContainerRuntime>, settings: ReconcilerSettings) -> Self {
        let book = ReplicaBook::new(settings.backoff);
        let limit = Arc::new(tokio::sync::Semaphore::new(settings.max_parallel.max(1)));
        Reconciler {
            runtime,
            settings: Arc::new(settings),
            book,
            events: EventQueue::default(),
            env_parts: Mutex::default(),
            port_is_free: ports::port_is_free,
            owner: Mutex::new(None),
            retained: Mutex::new(Some(BTreeSet::new())),
            inflight: Arc::default(),
            finished_work: Arc::default(),
            limit,
            finished: Arc::default(),
            holds: Arc::default(),
            network_lock: Arc::default(),
            state_source: Arc::default(),
            imported: Arc::default(),
        }
    }

    /// Sets where the state of replicas moved here is fetched from (the control plane).
    pub fn set_state_source(&self, source: Arc<dyn crate::transfer::StateSource>) {
        *self.state_source.lock().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// Replaces the check of whether a host port is free (tests).
    pub fn with_port_check(mut self, port_is_free: fn(u16) -> bool) -> Self {
        self.port_is_free = port_is_free;
        self
    }

    pub fn settings(&self) -> &ReconcilerSettings {
        &self.settings
    }

    pub fn runtime(&self) -> &Arc<dyn ContainerRuntime> {
        &self.runtime
    }

    /// The per-replica records (clone it to share with a reporter).
    pub fn book(&self) -> &ReplicaBook {
        &self.book
    }

    /// The run before the replica's container's last restart, as this agent (or an earlier run
    /// of it, from the replica's directory) recorded it.
    pub fn previous_run(&self, key: &ReplicaKey) -> Option<PreviousRun> {
        self.book.load_runs(&self.settings.data_dir, key);
        self.book.get(key).previous_run
    }

    /// The events it queued (clone it to share with a reporter).
    pub fn events(&self) -> &EventQueue {
        &self.events
    }

    /// Where the rendered config of `key` lives on the host.
    pub fn config_file(&self, key: &ReplicaKey) -> PathBuf {
        replica_dir(&self.settings.data_dir, key).join(CONFIG_FILE)
    }

    /// Sets the state volumes to keep although unassigned (`None`: not known, keep every one).
    pub fn set_retained(&self, retained: Option<&[RetainedVolume]>) {
        *self.retained.lock().unwrap_or_else(|e| e.into_inner()) =
            retained.map(|r| r.iter().map(RetainedVolume::key).collect());
    }

    fn retained(&self) -> Option<BTreeSet<ReplicaKey>> {
        self.retained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The owner as it acts now: with its adopted legacy objects once the first observation
    /// decided them, before that with none.
    pub fn owner(&self) -> Owner {
        self.owner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| self.settings.owner.clone())
    }

    /// Reads the containers, volumes and networks this agent owns. The first call decides the
    /// adopted legacy objects (see [`crate::runtime::Owner`]): read from `ownership.json`, or,
    /// at the first start after an upgrade, from what runs and the saved assignments, and then
    /// written there.
    pub async fn observe(&self) -> Result<Observed, RuntimeError> {
        let host = self.settings.owner.host_name();
        self.finished_lock().begin_observation();
        self.holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .begin_observation();
        let (mut containers, mut volumes, mut networks) = tokio::try_join!(
            self.runtime.list_managed_containers(host),
            self.runtime.list_managed_volumes(host),
            self.runtime.list_managed_networks(host),
        )?;
        self.holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .end_observation();
        let owner = {
            let mut current = self.owner.lock().unwrap_or_else(|e| e.into_inner());
            current
                .get_or_insert_with(|| {
                    let legacy = self.decide_legacy(&containers, &volumes, &networks);
                    self.settings.owner.clone().with_legacy(legacy)
                })
                .clone()
        };
        containers.retain(|c| owner.owns(c));
        volumes.retain(|v| owner.owns(v));
        networks.retain(|n| owner.owns(n));
        let mut inherited_volumes = Vec::new();
        for earlier in &self.settings.predecessors {
            let mut theirs = self
                .runtime
                .list_managed_volumes(earlier.host_name())
                .await?;
            theirs.retain(|v| earlier.owns(v) && !owner.owns(v));
            inherited_volumes.extend(theirs);
        }
        Ok(Observed {
            containers,
            volumes,
            networks,
            content: BTreeMap::new(),
            inherited_volumes,
        })
    }

    /// Removes the state volumes the control plane asked to remove (`asked`, by name), each
    /// only if this agent owns it and no replica of `desired` or `retained` claims it; the
    /// others are left alone and logged. Returns how many were removed. A `VolumeDeleted`
    /// event is queued for each.
    pub async fn delete_volumes_on_request(
        &self,
        asked: &[String],
        desired: &[Assignment],
        retained: &[RetainedVolume],
    ) -> Result<usize, RuntimeError> {
        if asked.is_empty() {
            return Ok(0);
        }
        let observed = self.observe().await?;
        let mine: Vec<ObservedVolume> = observed
            .volumes
            .into_iter()
            .chain(observed.inherited_volumes)
            .collect();
        let (go, kept) = volumes_to_delete(asked, &mine, desired, retained);
        for (name, why) in kept {
            tracing::warn!(volume = %name, "not removing the state volume the control plane asked to remove: {why}");
        }
        let mut removed = 0;
        for (key, name) in go {
            self.runtime.remove_volume(&name).await?;
            removed += 1;
            tracing::info!(volume = %name, replica = %key, "removed a state volume on the control plane's request");
            self.events.push(AgentEvent::of_replica(
                &key,
                "VolumeDeleted",
                format!("state volume {name} removed on the control plane's request"),
            ));
        }
        Ok(removed)
    }

    /// The adopted legacy objects: as recorded for this identity, or decided now and recorded.
    fn decide_legacy(
        &self,
        containers: &[ObservedContainer],
        volumes: &[ObservedVolume],
        networks: &[ObservedNetwork],
    ) -> LegacyObjects {
        let owner = &self.settings.owner;
        let dir = &self.settings.data_dir;
        match state::load_ownership(dir) {
            Ok(Some(record)) if record.is_for(owner) => return record.legacy,
            Ok(Some(_)) => {
                tracing::info!(path = %dir.join(state::OWNERSHIP_FILE).display(), "the ownership record is of an earlier identity of this host; adopting no pre-upgrade objects");
                let record = state::OwnershipRecord::new(owner, LegacyObjects::default());
                if let Err(err) = state::save_ownership(dir, &record) {
                    tracing::error!(error = %err, "cannot record which objects this agent owns");
                }
                return LegacyObjects::default();
            }
            Ok(None) => {}
            Err(err) => {
                // Fail closed: adopt nothing rather than guess, and leave the file for a person.
                tracing::error!(error = %err, "cannot read the ownership record; adopting no pre-upgrade objects");
                return LegacyObjects::default();
            }
        }
        let saved = match state::StateStore::new(dir).load() {
            Ok(saved) => saved,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the saved assignments; adopting no pre-upgrade objects");
                None
            }
        };
        let legacy = LegacyObjects::decide(
            owner.host_name(),
            saved.as_ref(),
            containers,
            volumes,
            networks,
        );
        if !legacy.is_empty() {
            tracing::info!(
                containers = legacy.containers.len(),
                volumes = legacy.volumes.len(),
                networks = legacy.networks.len(),
                "adopting the objects this host ran before cluster labels; they keep running"
            );
        }
        let record = state::OwnershipRecord::new(owner, legacy.clone());
        if let Err(err) = state::save_ownership(dir, &record) {
            tracing::error!(error = %err, "cannot record which objects this agent owns; deciding again at the next start");
        }
        legacy
    }

    /// Stops every running container this agent owns (volumes, networks and the stopped
    /// containers stay). Used when the control plane has removed this host.
    pub async fn stop_all(&self) -> Result<usize, RuntimeError> {
        let observed = self.observe().await?;
        let mut stopped = 0;
        for c in observed.containers.iter().filter(|c| {
            matches!(
                c.status,
                ContainerStatus::Running | ContainerStatus::Restarting | ContainerStatus::Paused
            )
        }) {
            self.runtime
                .stop_container(&c.id, c.stop_grace().unwrap_or(self.settings.stop_grace))
                .await?;
            tracing::info!(container = %c.id, name = %c.name, "replica container stopped");
            stopped += 1;
        }
        Ok(stopped)
    }

    /// Stops and removes every container this agent owns and its tenant networks; the state
    /// volumes stay on the host. Used before the host enrolls under a new identity: the
    /// containers belong to placements of the old host. The number of containers removed.
    pub async fn retire_all(&self) -> Result<usize, RuntimeError> {
        let observed = self.observe().await?;
        let mut removed = 0;
        for c in &observed.containers {
            if matches!(
                c.status,
                ContainerStatus::Running | ContainerStatus::Restarting | ContainerStatus::Paused
            ) {
                self.runtime
                    .stop_container(&c.id, c.stop_grace().unwrap_or(self.settings.stop_grace))
                    .await?;
            }
            self.runtime.remove_container(&c.id).await?;
            tracing::info!(container = %c.id, name = %c.name, "replica container of the old identity removed");
            removed += 1;
        }
        for n in &observed.networks {
            if let Err(err) = self.runtime.remove_network(&n.name).await {
                tracing::warn!(network = %n.name, error = %err, "cannot remove a network of the old identity");
            }
        }
        Ok(removed)
    }

    /// Measures the current, running container of every desired replica that has a content
    /// hash: its config file is read, its environment part comes from the cache (or from the
    /// observation, or an inspection, the first time the container is seen). By container id.
    pub async fn measure(
        &self,
        desired: &[Assignment],
        observed: &Observed,
    ) -> BTreeMap<String, Measurement> {
        let owner = self.owner();
        let by_replica = ReplicaContainers::of(&owner, observed);
        let mut out = BTreeMap::new();
        for a in desired.iter().filter(|a| !a.content_hash.is_empty()) {
            let key = a.key();
            let containers = by_replica.get(&key);
            let Some(c) = current_container(a, containers).filter(|c| c.status.is_running()) else {
                continue;
            };
            let Some(part) = self.env_part(a, c).await else {
                continue;
            };
            let file = drift::read_config_file(&self.config_file(&key), a.config_json.len());
            out.insert(c.id.clone(), Measurement::new(a, &c.id, file, &part));
        }
        let live: BTreeSet<&str> = observed.containers.iter().map(|c| c.id.as_str()).collect();
        self.env_parts_lock()
            .retain(|id, _| live.contains(id.as_str()));
        out
    }

    fn env_parts_lock(&self) -> MutexGuard<'_, HashMap<String, CachedEnv>> {
        self.env_parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The environment part of `c`'s content hash; `None` when its environment cannot be read.
    async fn env_part(&self, a: &Assignment, c: &ObservedContainer) -> Option<EnvPart> {
        if let Some(cached) = self.env_parts_lock().get(&c.id)
            && cached.config_hash == a.config_hash
        {
            return Some(cached.part.clone());
        }
        let env = match &c.env {
            Some(env) => env.clone(),
            None => match self.runtime.inspect_container(&c.id).await {
                Ok(Some(inspected)) => inspected.env?,
                Ok(None) => return None,
                Err(err) => {
                    tracing::debug!(container = %c.id, error = %err, "cannot read the container's environment; drift not checked this pass");
                    return None;
                }
            },
        };
        let part = EnvPart::measured(a, &env);
        self.env_parts_lock().insert(
            c.id.clone(),
            CachedEnv {
                config_hash: a.config_hash.clone(),
                part: part.clone(),
            },
        );
        Some(part)
    }

    /// Where to probe each desired replica's running container.
    pub fn probe_targets(&self, desired: &[Assignment], observed: &Observed) -> Vec<ProbeTarget> {
        let owner = self.owner();
        let by_replica = ReplicaContainers::of(&owner, observed);
        desired
            .iter()
            .filter_map(|a| {
                let c = current_container(a, by_replica.get(&a.key()))?;
                let port = c.host_port.filter(|_| c.status.is_running())?;
                Some(ProbeTarget {
                    key: a.key(),
                    container_id: c.id.clone(),
                    started_at: c.started_at.clone(),
                    addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
                })
            })
            .collect()
    }

    /// The status of every desired replica, from an observation and the prober's view.
    pub fn statuses(
        &self,
        desired: &[Assignment],
        observed: &Observed,
        probes: &BTreeMap<ReplicaKey, ProbeStatus>,
        now: Instant,
    ) -> Vec<ReplicaStatus> {
        let owner = self.owner();
        let records = self.book.snapshot();
        let by_replica = ReplicaContainers::of(&owner, observed);
        desired
            .iter()
            .map(|a| {
                let key = a.key();
                let containers = by_replica.get(&key);
                let container =
                    current_container(a, containers).or_else(|| containers.first().copied());
                let mut status = replica_status(
                    a,
                    container,
                    probes.get(&key),
                    &records.get(&key).cloned().unwrap_or_default(),
                    now,
                );
                status.snapshots =
                    SnapshotDir::new(&replica_dir(&self.settings.data_dir, &key)).list();
                status
            })
            .collect()
    }

    /// One pass: observe, plan, execute. Fails only when the engine cannot be read.
    pub async fn reconcile(
        &self,
        desired: &[Assignment],
        probes: &BTreeMap<ReplicaKey, ProbeStatus>,
        now: Instant,
    ) -> Result<Pass, RuntimeError> {
        let mut observed = self.observe().await?;
        observed.content = self.measure(desired, &observed).await;
        let wanted: BTreeSet<ReplicaKey> = desired.iter().map(Assignment::key).collect();
        self.book.retain(|k| wanted.contains(k));
        let owner = self.owner();
        let by_replica = ReplicaContainers::of(&owner, &observed);
        for a in desired {
            let key = a.key();
            let containers = by_replica.get(&key);
            let measured = current_container(a, containers)
                .and_then(|c| observed.content.get(&c.id))
                .cloned();
            if measured.as_ref().is_some_and(|m| m.drift(a).is_none()) {
                // In sync again without the agent's repair (someone fixed it): nothing to report.
                self.book.take_repair(&key);
            }
            self.book.set_measured(&key, measured);
        }
        for a in desired {
            let key = a.key();
            if let Some(c) = current_container(a, by_replica.get(&key))
                && c.status.is_running()
                && liveness_failure(c, probes.get(&key)).is_none()
            {
                self.book.settle(&key, now);
            }
        }
        let records = self.book.snapshot();
        let retained = self.retained();
        let steps = plan(&PlanInput {
            owner: &owner,
            desired,
            observed: &observed,
            probes,
            records: &records,
            retained: retained.as_ref(),
            now,
        });
        let outcomes = self.execute(steps, &observed, now).await;
        let next_wake = outcomes
            .iter()
            .filter_map(|o| match o.step {
                Step::Wait { until, .. } => Some(until),
                _ => None,
            })
            .min();
        Ok(Pass {
            observed,
            outcomes,
            next_wake,
        })
    }

    /// Starts `steps` and collects the outcomes of those that end within
    /// [`ReconcilerSettings::pass_wait`]; the rest go on in the background.
    ///
    /// The steps of one replica (or of one unidentified container) run in plan order in one
    /// task; tasks of different replicas run at once, at most
    /// [`ReconcilerSettings::max_parallel`] of them. A replica whose work from an earlier pass
    /// is still in flight is left alone this pass, and so is one whose work ended after the
    /// latest [`Reconciler::observe`] began: its steps were planned from a view that does not
    /// show the result (a creation planned again would only collide with the container just
    /// made), and the next pass, woken when the work ended, looks again. A network is removed
    /// only once no work of its tenant is in flight. Whenever a task ends, [`Reconciler::work_done`] is notified so
    /// that the next pass looks at the result.
    pub async fn execute(
        &self,
        steps: Vec<Step>,
        observed: &Observed,
        now: Instant,
    ) -> Vec<StepOutcome> {
        let observed_ports: Arc<BTreeSet<u16>> = Arc::new(
            observed
                .containers
                .iter()
                .filter_map(|c| c.host_port)
                .collect(),
        );
        let shared = Arc::new(observed.clone());
        let mut done: Vec<(usize, StepOutcome)> = Vec::new();
        let mut groups: Vec<(WorkKey, Vec<(usize, Step)>)> = Vec::new();
        let mut networks = Vec::new();
        for (i, step) in steps.into_iter().enumerate() {
            let key = match &step {
                Step::Wait { .. } => {
                    done.push((
                        i,
                        StepOutcome {
                            step,
                            result: Ok(()),
                        },
                    ));
                    continue;
                }
                Step::RemoveNetwork { .. } => {
                    networks.push((i, step));
                    continue;
                }
                Step::RemoveContainer {
                    key: None,
                    container_id,
                    ..
                } => WorkKey::Container(container_id.clone()),
                other => match other.key() {
                    Some(k) => WorkKey::Replica(k),
                    None => continue,
                },
            };
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, g)) => g.push((i, step)),
                None => groups.push((key, vec![(i, step)])),
            }
        }

        let worker = self.worker();
        let mut handles = Vec::new();
        for (key, group) in groups {
            if self.finished_lock().since_observed(&key) {
                tracing::debug!(
                    ?key,
                    "work of an earlier pass ended after this pass looked; the next pass looks again"
                );
                continue;
            }
            if !self.inflight_lock().insert(key.clone()) {
                tracing::debug!(
                    ?key,
                    "work of an earlier pass is still in flight; not started again"
                );
                continue;
            }
            let worker = worker.clone();
            let observed = Arc::clone(&shared);
            let ports = Arc::clone(&observed_ports);
            let limit = Arc::clone(&self.limit);
            let inflight = Arc::clone(&self.inflight);
            let finished_work = Arc::clone(&self.finished_work);
            let finished = Arc::clone(&self.finished);
            handles.push(tokio::spawn(async move {
                let permit = limit.acquire_owned().await;
                let mut out = Vec::with_capacity(group.len());
                for (i, step) in group {
                    let result = worker.execute_one(&step, &observed, &ports, now).await;
                    log_outcome(&step, &result);
                    out.push((i, StepOutcome { step, result }));
                }
                drop(permit);
                // Recorded as ended before it stops counting as in flight, so that a pass
                // always sees one or the other.
                finished_work
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .ended(key.clone());
                inflight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                finished.notify_one();
                out
            }));
        }

        let deadline = Instant::now() + self.settings.pass_wait;
        for mut handle in handles {
            match tokio::time::timeout_at(deadline, &mut handle).await {
                Ok(Ok(out)) => done.extend(out),
                Ok(Err(err)) => tracing::error!(error = %err, "a reconcile task failed"),
                // Still running: it goes on, and notifies when it ends.
                Err(_) => {}
            }
        }

        for (i, step) in networks {
            let busy = match &step {
                Step::RemoveNetwork { tenant, .. } => self
                    .inflight_lock()
                    .iter()
                    .any(|k| matches!(k, WorkKey::Replica(r) if r.tenant == *tenant)),
                _ => false,
            };
            if busy {
                continue;
            }
            let result = worker
                .execute_one(&step, &shared, &observed_ports, now)
                .await;
            log_outcome(&step, &result);
            done.push((i, StepOutcome { step, result }));
        }
        done.sort_by_key(|(i, _)| *i);
        done.into_iter().map(|(_, o)| o).collect()
    }

    /// Waits until no work is in flight (tests, and a clean shutdown).
    pub async fn wait_idle(&self) {
        loop {
            if self.inflight_lock().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many replicas have work in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight_lock().len()
    }

    /// Notified whenever a replica's work ends (a new pass should look at the result).
    pub fn work_done(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.finished)
    }

    fn inflight_lock(&self) -> MutexGuard<'_, BTreeSet<WorkKey>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn finished_lock(&self) -> MutexGuard<'_, Finished> {
        self.finished_work.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn worker(&self) -> Worker {
        Worker {
            runtime: Arc::clone(&self.runtime),
            settings: Arc::clone(&self.settings),
            book: self.book.clone(),
            events: self.events.clone(),
            port_is_free: self.port_is_free,
            owner: self.owner(),
            holds: Arc::clone(&self.holds),
            network_lock: Arc::clone(&self.network_lock),
            networks_made: Arc::default(),
            state_source: Arc::clone(&self.state_source),
            imported: Arc::clone(&self.imported),
        }
    }
}

/// What one task of the executor works on: a replica, or a container no replica claims.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum WorkKey {
    Replica(ReplicaKey),
    Container(String),
}

/// Which work ended after the latest observation began: every end gets the next number of a
/// counter, and an observation remembers the counter as it begins.
#[derive(Debug, Default)]
struct Finished {
    count: u64,
    observed_at: u64,
    /// The number of each end since the latest observation began.
    ends: BTreeMap<WorkKey, u64>,
}

impl Finished {
    fn begin_observation(&mut self) {
        self.observed_at = self.count;
        self.ends.clear();
    }

    fn ended(&mut self, key: WorkKey) {
        self.count += 1;
        self.ends.insert(key, self.count);
    }

    /// Whether the work of `key` ended after the latest observation began.
    fn since_observed(&self, key: &WorkKey) -> bool {
        self.ends.get(key).is_some_and(|n| *n > self.observed_at)
    }
}

/// Host ports handed to creations that have not shown up in an observation yet.
#[derive(Debug, Default)]
struct PortHolds {
    held: BTreeMap<u16, Hold>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// A creation is using it.
    Active,
    /// A container was created on it; kept until an observation that began later.
    Done,
    /// Done before the observation now running began: dropped when it ends.
    Seen,
}

impl PortHolds {
    fn begin_observation(&mut self) {
        for h in self.held.values_mut() {
            if *h == Hold::Done {
                *h = Hold::Seen;
            }
        }
    }

    fn end_observation(&mut self) {
        self.held.retain(|_, h| *h != Hold::Seen);
    }
}

/// The executor's view of the reconciler, cloned into every task.
#[derive(Clone)]
struct Worker {
    runtime: Arc<dyn ContainerRuntime>,
    settings: Arc<ReconcilerSettings>,
    book: ReplicaBook,
    events: EventQueue,
    port_is_free: fn(u16) -> bool,
    owner: Owner,
    holds: Arc<Mutex<PortHolds>>,
    /// Creating networks one at a time: two creations never race to make a tenant's network.
    network_lock: Arc<tokio::sync::Mutex<()>>,
    /// Networks this pass's work has made or found (the pass's view predates them): the other
    /// creations of the pass use them without asking the engine again.
    networks_made: Arc<Mutex<BTreeSet<String>>>,
    state_source: StateSourceSlot,
    imported: Arc<Mutex<BTreeSet<String>>>,
}

impl Worker {
    fn needs_import(&self, a: &Assignment) -> bool {
        !a.import_transfer.is_empty()
            && !self
                .imported
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&a.import_transfer)
    }

    /// Fetches the state of the transfer `a` was moved here with, then creates its container
    /// from it (the tar is extracted into the new volume before the container starts).
    async fn create_imported(
        &self,
        a: &Assignment,
        preferred_port: Option<u16>,
        observed: &Observed,
        ports: &mut BTreeSet<u16>,
        now: Instant,
    ) -> Result<(), StepError> {
        let key = a.key();
        let source = self
            .state_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let fail = |message: String| {
            let err = StepError::Import {
                transfer: a.import_transfer.clone(),
                message,
            };
            self.book.record_failure(&key, now, err.to_string());
            err
        };
        let Some(source) = source else {
            return Err(fail(
                "this agent has no control plane to fetch it from".into(),
            ));
        };
        self.book.set_activity(&key, Some(Activity::Restoring));
        let file =
            crate::transfer::TempFile(crate::transfer::import_file(&self.settings.data_dir, a));
        let started = std::time::Instant::now();
        let bytes = match source.fetch(a, &file.0).await {
            Ok(b) => b,
            Err(message) => return Err(fail(message)),
        };
        tracing::info!(replica = %key, transfer = %a.import_transfer, bytes, millis = started.elapsed().as_millis() as u64, "state imported; starting the replica from it");
        self.create_with(a, preferred_port, None, observed, ports, now, Some(&file.0))
            .await?;
        self.imported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(a.import_transfer.clone());
        self.events.push(AgentEvent::about(
            a,
            "StateImported",
            format!(
                "the state volume of {} arrived through the control plane ({bytes} bytes, SHA-256 checked) and the replica started from it",
                a.replica
            ),
        ));
        Ok(())
    }

    fn holds(&self) -> MutexGuard<'_, PortHolds> {
        self.holds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The grace period of a stop of `container_id`: the assignment's when known, else the
    /// container's label, else the agent's default.
    fn grace(&self, observed: &Observed, container_id: &str, a: Option<&Assignment>) -> Duration {
        let default = self.settings.stop_grace;
        if let Some(a) = a
            && a.termination_grace_seconds > 0
        {
            return a.stop_grace(default);
        }
        observed
            .containers
            .iter()
            .find(|c| c.id == container_id)
            .and_then(ObservedContainer::stop_grace)
            .unwrap_or(default)
    }

    fn replica_dir(&self, key: &ReplicaKey) -> PathBuf {
        replica_dir(&self.settings.data_dir, key)
    }

    async fn execute_one(
        &self,
        step: &Step,
        observed: &Observed,
        observed_ports: &BTreeSet<u16>,
        now: Instant,
    ) -> Result<(), StepError> {
        match step {
            Step::RemoveContainer { container_id, .. } => {
                let grace = self.grace(observed, container_id, None);
                self.runtime.stop_container(container_id, grace).await?;
                self.runtime.remove_container(container_id).await?;
                Ok(())
            }
            Step::RemoveVolume { key, volume } => {
                self.runtime.remove_volume(volume).await?;
                // The replica's config and its snapshots go with its volume.
                let dir = self.replica_dir(key);
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => Ok(()),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(err) => Err(StepError::Io {
                        path: dir,
                        message: err.to_string(),
                    }),
                }
            }
            Step::RemoveNetwork { network, .. } => {
                self.runtime.remove_network(network).await?;
                Ok(())
            }
            Step::Create {
                assignment,
                preferred_port,
            } => {
                let mut ports = observed_ports.clone();
                // A restore that did not finish (the volume may be empty) is done first.
                let pending =
                    SnapshotDir::new(&self.replica_dir(&assignment.key())).pending_restore();
                match pending {
                    Some(snap) => {
                        self.restore(
                            assignment,
                            &snap,
                            *preferred_port,
                            None,
                            observed,
                            &mut ports,
                            now,
                        )
                        .await
                    }
                    None if self.needs_import(assignment) => {
                        self.create_imported(assignment, *preferred_port, observed, &mut ports, now)
                            .await
                    }
                    None => {
                        self.create(assignment, *preferred_port, None, observed, &mut ports, now)
                            .await
                    }
                }
            }
            Step::Replace {
                container_id,
                assignment,
                preferred_port,
                reason,
            } => {
                let own = self.hold_own(*preferred_port);
                let mut ports = observed_ports.clone();
                let result = async {
                    let restore = match reason {
                        ReplaceReason::ImageChanged { from, to } => {
                            self.snapshot_before_switch(
                                assignment,
                                container_id,
                                from,
                                to,
                                observed,
                                now,
                            )
                            .await?
                        }
                        _ => None,
                    };
                    self.take_down(assignment, container_id, observed, &mut ports, now)
                        .await?;
                    let Some(snap) = restore else {
                        return self
                            .create(assignment, *preferred_port, own, observed, &mut ports, now)
                            .await;
                    };
                    self.restore(
                        assignment,
                        &snap,
                        *preferred_port,
                        own,
                        observed,
                        &mut ports,
                        now,
                    )
                    .await
                }
                .await;
                self.release_own(own);
                result
            }
            Step::RepairDrift {
                container_id,
                assignment,
                preferred_port,
                drift,
            } => {
                let key = assignment.key();
                tracing::warn!(
                    replica = %key,
                    container = %container_id,
                    revision = drift.revision,
                    what = drift.kind.what(),
                    "config drift: {}; rewriting the config file and replacing the container",
                    drift.describe()
                );
                self.book.begin_repair(&key, drift.clone());
                let own = self.hold_own(*preferred_port);
                let mut ports = observed_ports.clone();
                let result = async {
                    self.take_down(assignment, container_id, observed, &mut ports, now)
                        .await?;
                    let created = self
                        .create(assignment, *preferred_port, own, observed, &mut ports, now)
                        .await;
                    if created.is_ok() {
                        self.book.record_repaired(&key, now);
                    }
                    created
                }
                .await;
                self.release_own(own);
                result
            }
            Step::Restart {
                key,
                container_id,
                running,
                reason,
            } => {
                tracing::info!(replica = %key, ?reason, "restarting replica");
                self.book.set_activity(key, Some(Activity::Restarting));
                let grace = self.grace(observed, container_id, None);
                let restarted = async {
                    if *running {
                        self.runtime.stop_container(container_id, grace).await?;
                    }
                    let asked = SystemTime::now();
                    self.runtime
                        .start_container(container_id)
                        .await
                        .map(|()| asked)
                }
                .await;
                match restarted {
                    Ok(asked) => {
                        let started_at = observed
                            .containers
                            .iter()
                            .find(|c| c.id == *container_id)
                            .and_then(|c| c.started_at.clone());
                        self.book.load_runs(&self.settings.data_dir, key);
                        self.book
                            .record_previous_run(key, container_id, started_at, asked);
                        self.book.save_runs(&self.settings.data_dir, key);
                        self.book.record_restart(key, now);
                        for e in restart_events(key, reason) {
                            self.events.push(e);
                        }
                        Ok(())
                    }
                    Err(err) => {
                        self.book.record_failure(key, now, err.to_string());
                        if matches!(err, RuntimeError::PortInUse { .. }) {
                            // Its host port was taken while it was down: the next pass
                            // creates it again on a free port.
                            self.runtime.remove_container(container_id).await?;
                        }
                        Err(err.into())
                    }
                }
            }
            Step::Wait { .. } => Ok(()),
        }
    }

    /// Holds the replica's own host port while its old container goes, so that no other
    /// creation takes it meanwhile; `None` when someone else holds it already.
    fn hold_own(&self, port: Option<u16>) -> Option<u16> {
        let port = port?;
        let mut holds = self.holds();
        if holds.held.contains_key(&port) {
            return None;
        }
        holds.held.insert(port, Hold::Active);
        Some(port)
    }

    fn release_own(&self, own: Option<u16>) {
        if let Some(port) = own {
            let mut holds = self.holds();
            if holds.held.get(&port) == Some(&Hold::Active) {
                holds.held.remove(&port);
            }
        }
    }

    /// Stops and removes a replica's container before it is created again, freeing its
    /// host port for the new one; a failure is recorded against the replica.
    async fn take_down(
        &self,
        a: &Assignment,
        container_id: &str,
        observed: &Observed,
        ports: &mut BTreeSet<u16>,
        now: Instant,
    ) -> Result<(), StepError> {
        let key = a.key();
        let grace = self.grace(observed, container_id, Some(a));
        self.book.set_activity(&key, Some(Activity::Stopping));
        let removed = async {
            self.runtime.stop_container(container_id, grace).await?;
            self.runtime.remove_container(container_id).await
        }
        .await;
        if let Err(err) = removed {
            self.book.record_failure(&key, now, err.to_string());
            return Err(err.into());
        }
        if let Some(port) = port_of(observed, container_id) {
            ports.remove(&port);
        }
        Ok(())
    }

    async fn create(
        &self,
        a: &Assignment,
        preferred_port: Option<u16>,
        own: Option<u16>,
        observed: &Observed,
        ports: &mut BTreeSet<u16>,
        now: Instant,
    ) -> Result<(), StepError> {
        self.create_with(a, preferred_port, own, observed, ports, now, None)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_with(
        &self,
        a: &Assignment,
        preferred_port: Option<u16>,
        own: Option<u16>,
        observed: &Observed,
        ports: &mut BTreeSet<u16>,
        now: Instant,
        restore: Option<&Path>,
    ) -> Result<(), StepError> {
        let key = a.key();
        let asked = SystemTime::now();
        let result = self
            .try_create(a, preferred_port, own, observed, ports, restore)
            .await;
        match &result {
            Ok(()) => {
                self.book.record_created(&key, now);
                self.book.record_start_asked(&key, asked);
                self.book.save_runs(&self.settings.data_dir, &key);
                self.events.push(AgentEvent::about(
                    a,
                    crate::events::CONTAINER_STARTED,
                    format!("started the container of {} ({})", a.replica, a.image),
                ));
                if let Some(drift) = self.book.take_repair(&key) {
                    if drift.expected == a.content_hash {
                        self.events.push(AgentEvent::drift_repaired(a, &drift));
                    } else {
                        tracing::info!(replica = %key, "a drift repair ended with a new config revision; no event");
                    }
                }
            }
            Err(err) => self.book.record_failure(&key, now, err.to_string()),
        }
        result
    }

    /// Creates the container without starting it, extracts the snapshot `tar` into its (empty)
    /// state volume, then starts it; a container that fails is removed.
    async fn create_restored(
        &self,
        spec: &ContainerSpec,
        tar: &Path,
    ) -> Result<String, RuntimeError> {
        let id = self.runtime.create_container(spec).await?;
        // Into the volume itself: the engine refuses to extract anywhere else into a
        // container with a read-only root filesystem.
        let started = async {
            self.runtime
                .upload_archive(&id, spec::STATE_DIR, tar)
                .await?;
            self.runtime.start_container(&id).await
        }
        .await;
        match started {
            Ok(()) => Ok(id),
            Err(err) => {
                let _ = self.runtime.remove_container(&id).await;
                Err(err)
            }
        }
    }

    /// Before a replica changes image: stops the old container, streams its state directory
    /// into a new snapshot, prunes old ones, and says which snapshot (if any) the new image
    /// starts from. When the snapshot fails the old container is started again and the switch
    /// does not happen.
    async fn snapshot_before_switch(
        &self,
        a: &Assignment,
        container_id: &str,
        from: &str,
        to: &str,
        observed: &Observed,
        now: Instant,
    ) -> Result<Option<SnapshotMeta>, StepError> {
        let key = a.key();
        let snaps = SnapshotDir::new(&self.replica_dir(&key));
        let earlier = snaps.list();
        let grace = self.grace(observed, container_id, Some(a));
        self.book.set_activity(&key, Some(Activity::Stopping));
        if let Err(err) = self.runtime.stop_container(container_id, grace).await {
            self.book.record_failure(&key, now, err.to_string());
            return Err(err.into());
        }
        self.book.set_activity(&key, Some(Activity::Snapshotting));
        match self.take_snapshot(&snaps, container_id, from).await {
            Ok(meta) => {
                let pruned = snaps.prune(self.settings.snapshots_keep.max(1));
                tracing::info!(replica = %key, snapshot = %meta.id, image = %from, bytes = meta.bytes, pruned, "state volume snapshot taken");
                self.events.push(AgentEvent::about(
                    a,
                    snapshot::SNAPSHOT_TAKEN,
                    format!(
                        "snapshot {} of the state volume of {} taken before switching from {from} to {to} ({} bytes)",
                        meta.id, a.replica, meta.bytes
                    ),
                ));
            }
            Err(message) => {
                let err = StepError::Snapshot {
                    from: from.to_owned(),
                    to: to.to_owned(),
                    message,
                };
                if let Err(start) = self.runtime.start_container(container_id).await {
                    tracing::error!(replica = %key, error = %start, "cannot start the old container again after a failed snapshot");
                }
                self.book.record_failure(&key, now, err.to_string());
                return Err(err);
            }
        }
        Ok(snapshot::restore_choice(from, to, &earlier).cloned())
    }

    async fn take_snapshot(
        &self,
        snaps: &SnapshotDir,
        container_id: &str,
        image: &str,
    ) -> Result<SnapshotMeta, String> {
        let (id, part) = snaps
            .begin()
            .map_err(|err| format!("{}: {err}", snaps.path().display()))?;
        let downloaded = self
            .runtime
            .download_archive(container_id, &snapshot::archive_path(), &part)
            .await;
        let bytes = match downloaded {
            Ok(bytes) => bytes,
            Err(err) => {
                let _ = std::fs::remove_file(&part);
                return Err(err.to_string());
            }
        };
        let meta = SnapshotMeta {
            id,
            image: image.to_owned(),
            taken_unix_ms: snapshot::now_unix_ms(),
            bytes,
        };
        if let Err(err) = snaps.commit(&part, &meta) {
            let _ = std::fs::remove_file(&part);
            return Err(format!("{}: {err}", snaps.path().display()));
        }
        Ok(meta)
    }

    /// Empties the replica's state volume and creates its container from the snapshot `snap`.
    #[allow(clippy::too_many_arguments)]
    async fn restore(
        &self,
        a: &Assignment,
        snap: &SnapshotMeta,
        preferred_port: Option<u16>,
        own: Option<u16>,
        observed: &Observed,
        ports: &mut BTreeSet<u16>,
        now: Instant,
    ) -> Result<(), StepError> {
        let key = a.key();
        self.book.set_activity(&key, Some(Activity::Restoring));
        let volume = match replica_volume(&self.owner, observed, &key) {
            Some(v) => VolumeSpec {
                name: v.name.clone(),
                labels: v.labels.clone(),
            },
            None => spec::volume_spec(&self.owner, a),
        };
        let snaps = SnapshotDir::new(&self.replica_dir(&key));
        if let Err(err) = snaps.set_pending_restore(&snap.id) {
            let err = StepError::Io {
                path: snaps.path().to_path_buf(),
                message: err.to_string(),
            };
            self.book.record_failure(&key, now, err.to_string());
            return Err(err);
        }
        let emptied = async {
            self.runtime.remove_volume(&volume.name).await?;
            self.runtime.ensure_volume(&volume).await
        }
        .await;
        if let Err(err) = emptied {
            self.book.record_failure(&key, now, err.to_string());
            return Err(err.into());
        }
        let tar = snaps.tar(&snap.id);
        let created = self
            .create_with(a, preferred_port, own, observed, ports, now, Some(&tar))
            .await;
        if created.is_ok() {
            snaps.clear_pending_restore();
            tracing::info!(replica = %key, snapshot = %snap.id, image = %snap.image, "state volume restored from a snapshot");
            self.events.push(AgentEvent::about(
                a,
                snapshot::SNAPSHOT_RESTORED,
                format!(
                    "state volume of {} restored from snapshot {} taken from {}",
                    a.replica, snap.id, snap.image
                ),
            ));
        }
        created
    }

    /// Picks a host port and holds it: `preferred` when nobody has it, else the first free
    /// one of the range. Ports of the observation, ports held by other creations and ports
    /// this creation already found taken are skipped; `own` is this replica's own hold.
    fn reserve(
        &self,
        preferred: Option<u16>,
        own: Option<u16>,
        ports: &BTreeSet<u16>,
        tried: &BTreeSet<u16>,
    ) -> Option<u16> {
        let mut holds = self.holds();
        let mut taken: BTreeSet<u16> = ports.union(tried).copied().collect();
        taken.extend(holds.held.keys().copied().filter(|p| Some(*p) != own));
        let port_is_free = self.port_is_free;
        let port = preferred
            .filter(|p| !taken.contains(p) && port_is_free(*p))
            .or_else(|| ports::allocate(self.settings.ports, &taken, port_is_free))?;
        holds.held.insert(port, Hold::Active);
        Some(port)
    }

    async fn try_create(
        &self,
        a: &Assignment,
        preferred_port: Option<u16>,
        own: Option<u16>,
        observed: &Observed,
        ports: &mut BTreeSet<u16>,
        restore: Option<&Path>,
    ) -> Result<(), StepError> {
        let owner = &self.owner;
        let key = a.key();
        self.book.set_activity(&key, Some(Activity::Pulling));
        self.runtime.ensure_image(&a.image).await?;
        self.book.set_activity(&key, Some(Activity::Creating));
        // A replica keeps the volume and network it has (an adopted pre-upgrade one included);
        // new ones get this owner's names.
        let network = match tenant_network(owner, observed, &a.tenant) {
            Some(n) => n.name.clone(),
            None => {
                let spec = spec::network_spec(owner, &a.tenant);
                let _one_at_a_time = self.network_lock.lock().await;
                let made = self
                    .networks_made
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&spec.name);
                if !made {
                    self.runtime.ensure_network(&spec).await?;
                    self.networks_made
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(spec.name.clone());
                }
                spec.name
            }
        };
        let volume = match replica_volume(owner, observed, &key) {
            Some(v) => v.name.clone(),
            None => {
                let spec = spec::volume_spec(owner, a);
                self.runtime.ensure_volume(&spec).await?;
                spec.name
            }
        };
        let config_file = replica_dir(&self.settings.data_dir, &key).join(CONFIG_FILE);
        write_config(&config_file, a.config_json.as_bytes())?;

        let grace = a.stop_grace(self.settings.stop_grace);
        let mut tried = BTreeSet::new();
        for _ in 0..PORT_ATTEMPTS {
            let Some(host_port) = self.reserve(
                preferred_port.filter(|p| !tried.contains(p)),
                own,
                ports,
                &tried,
            ) else {
                break;
            };
            let placement = spec::Placement {
                config_file: &config_file,
                volume: &volume,
                network: &network,
            };
            let spec = spec::container_spec(owner, a, &placement, host_port, grace);
            let created = match restore {
                None => self.runtime.create_and_start(&spec).await,
                Some(tar) => self.create_restored(&spec, tar).await,
            };
            let mut holds = self.holds();
            match created {
                Ok(id) => {
                    holds.held.insert(host_port, Hold::Done);
                    drop(holds);
                    ports.insert(host_port);
                    tracing::info!(replica = %key, container = %id, host_port, "replica container started");
                    return Ok(());
                }
                Err(RuntimeError::PortInUse { .. }) => {
                    holds.held.remove(&host_port);
                    tried.insert(host_port);
                }
                Err(err) => {
                    holds.held.remove(&host_port);
                    return Err(err.into());
                }
            }
        }
        let range = self.settings.ports;
        Err(StepError::NoFreePort {
            first: range.first,
            last: range.iter().last().unwrap_or(range.first),
            step: range.step,
        })
    }
}

fn log_outcome(step: &Step, result: &Result<(), StepError>) {
    match result {
        Ok(()) => tracing::debug!(?step, "reconcile step done"),
        Err(err) => tracing::warn!(?step, error = %err, "reconcile step failed"),
    }
}

/// The containers of `owner` in `observed`, by replica, each replica's in the order observed:
/// built once per pass, so that looking up every desired replica's containers costs one walk
/// of the observation, not one per replica (a host of 100 replicas asked every owner label of
/// every container 100 times for each status report).
struct ReplicaContainers<'o> {
    by_key: HashMap<ReplicaKey, Vec<&'o ObservedContainer>>,
}

impl<'o> ReplicaContainers<'o> {
    fn of(owner: &Owner, observed: &'o Observed) -> Self {
        let mut by_key: HashMap<ReplicaKey, Vec<&'o ObservedContainer>> = HashMap::new();
        for c in observed.containers.iter().filter(|c| owner.owns(*c)) {
            if let Some(key) = c.replica_key() {
                by_key.entry(key).or_default().push(c);
            }
        }
        ReplicaContainers { by_key }
    }

    /// The containers of replica `key`.
    fn get(&self, key: &ReplicaKey) -> &[&'o ObservedContainer] {
        self.by_key.get(key).map(Vec::as_slice).unwrap_or_default()
    }
}

/// The replica's own state volume, if it has one (an adopted pre-upgrade one first).
fn replica_volume<'o>(
    owner: &Owner,
    observed: &'o Observed,
    key: &ReplicaKey,
) -> Option<&'o ObservedVolume> {
    let mut found: Vec<&ObservedVolume> = observed
        .volumes
        .iter()
        .filter(|v| owner.owns(*v) && v.replica_key().as_ref() == Some(key))
        .collect();
    found.sort_by_key(|v| (v.label(labels::CLUSTER).is_some(), v.name.clone()));
    found.first().copied()
}

/// The tenant's network on this host, if there is one (an adopted pre-upgrade one first).
fn tenant_network<'o>(
    owner: &Owner,
    observed: &'o Observed,
    tenant: &str,
) -> Option<&'o ObservedNetwork> {
    let mut found: Vec<&ObservedNetwork> = observed
        .networks
        .iter()
        .filter(|n| owner.owns(*n) && n.label(labels::TENANT) == Some(tenant))
        .collect();
    found.sort_by_key(|n| (n.label(labels::CLUSTER).is_some(), n.name.clone()));
    found.first().copied()
}

fn port_of(observed: &Observed, container_id: &str) -> Option<u16> {
    observed
        .containers
        .iter()
        .find(|c| c.id == container_id)
        .and_then(|c| c.host_port)
}

/// Writes a rendered config for the container user: mode 0600 owned by uid/gid 1000 when the
/// agent may change ownership, otherwise readable by all (0644).
fn write_config(path: &Path, contents: &[u8]) -> Result<(), StepError> {
    let io_err = |err: std::io::Error| StepError::Io {
        path: path.to_path_buf(),
        message: err.to_string(),
    };
    if let Some(dir) = path.parent() {
        state::create_private_dir(dir).map_err(io_err)?;
    }
    state::write_file_atomic(path, contents, 0o600).map_err(io_err)?;
    if std::os::unix::fs::chown(path, Some(spec::CONTAINER_UID), Some(spec::CONTAINER_GID)).is_err()
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(io_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
