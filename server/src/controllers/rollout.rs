//! The rollout controller: moves each replica's target revision to an instance's newest
//! revision, step by step, behind health gates, and back when a gate fails.
//!
//! [`plan`] decides (pure, no I/O); [`apply`] writes a decision into the instance's status;
//! [`command`] carries out `rollout pause|resume|promote|abort`; [`reconcile_once`] reads the
//! store, plans and writes what changed; [`run`] repeats that on store changes, on a timer for
//! `minReadySeconds`, pauses and deadlines, and after errors with backoff.
//!
//! Rules (U is `status.configRevision`, the newest revision):
//! - A new revision (U differs from `status.rollout.revision`) starts an update. Its stable
//!   revision is the last one whose replicas all passed: the previous update's revision if it
//!   Succeeded, else that update's stable revision. With no stable revision (the instance's
//!   first revision) every replica moves to U at once, and the update Succeeds once all pass.
//! - Gate: a replica passes when its target is U, it runs U (`configRevision`), is Ready, and
//!   has been Ready (`readySince`) for `minReadySeconds` without a restart. It fails when, running
//!   U, it is CrashLoopBackOff or Failed, or restarted since it first ran U (a liveness probe
//!   that keeps failing ends in a restart; one that failed once does not fail the gate); the
//!   update fails when replicas moved in a step have not passed within `progressDeadline`
//!   (10m) of the step's start.
//! - Rolling: targets move to U highest ordinal first, only while the placed replicas that are
//!   not serving, or not yet past their gate, stay within `maxUnavailable` (default 1).
//! - Canary: `{replicas: N}` / `{percent: P}` move the highest ordinals until N are on U and
//!   wait until they pass; `{pause: {}}` waits for `rollout promote`; `{pause: {duration}}`
//!   waits that long. After the last step the rest move as Rolling with `maxUnavailable: 1`.
//! - A failed gate or a missed deadline halts the update: with `autoRollback` (default true)
//!   every replica on U returns to the stable revision (RolledBack), otherwise nothing moves
//!   (Failed). Replicas not yet updated are never touched. Nothing restarts the update until
//!   a new revision or `rollout resume`.
//! - Replicas without a target (new ones) get [`initial_target`]: U during a healthy or
//!   successful update, the stable revision while it is paused, held or halted.
//! - `status.rollout.heldBy` (a fleet-wide change waiting for this instance's wave): no target
//!   moves toward U while it is set.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::model::{
    CanaryAction, DEFAULT_PROGRESS_DEADLINE, IntOrPercent, Kind, ObjectKey, OpenClawInstance,
    ReplicaState, ReplicaStatus, Resource, RolloutPhase, RolloutStatus, UpdateType, parse_duration,
    summarize_at,
};
use crate::store::{Store, StoreError};

/// Objects written per store transaction.
pub const WRITE_BATCH: usize = 256;
/// A pass runs at least this often, even when nothing changes and no timer is due.
pub const RESYNC: Duration = Duration::from_secs(30);

/// What [`plan`] decided for one instance.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// New target revisions: (ordinal, revision).
    pub targets: Vec<(u32, u64)>,
    /// Restart counts to record as the gate's baseline: (ordinal, restarts).
    pub baselines: Vec<(u32, u32)>,
    /// The new `status.rollout`; `None` leaves it as it is.
    pub rollout: Option<RolloutStatus>,
    /// When something is due without any change (a gate's `minReadySeconds`, a pause, a
    /// deadline, a replica becoming available), in milliseconds from now.
    pub wake_after_ms: Option<i64>,
    /// When this pass moves targets of an update because a replica passed its gate: which
    /// replica, and how long after its gate passed the targets move.
    pub gate: Option<GateDecision>,
}

/// How long the controller took to act on a gate: from the moment a replica on the new
/// revision passed it (its `readySince`, the time the server applied the report saying Ready,
/// plus `minReadySeconds`) to the pass that moves the next targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateDecision {
    /// The replica whose gate let the targets move (the latest to pass).
    pub replica: String,
    /// Milliseconds from its gate passing to the move.
    pub after_ms: i64,
}

impl Decision {
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty() && self.baselines.is_empty() && self.rollout.is_none()
    }
}

/// The strategy of an instance, resolved for its replica count.
struct Strategy {
    type_: UpdateType,
    max_unavailable: i64,
    min_ready_ms: i64,
    deadline_ms: i64,
    auto_rollback: bool,
    steps: Vec<CanaryAction>,
}

impl Strategy {
    fn of(instance: &OpenClawInstance) -> Strategy {
        let s = &instance.spec.update_strategy;
        let total = instance.spec.replicas.max(0);
        let deadline = s
            .progress_deadline
            .as_deref()
            .and_then(|d| parse_duration(d).ok())
            .unwrap_or(DEFAULT_PROGRESS_DEADLINE);
        Strategy {
            type_: s.type_,
            max_unavailable: s
                .max_unavailable
                .as_ref()
                .unwrap_or(&IntOrPercent::Int(1))
                .resolve(total)
                .unwrap_or(1)
                .max(1),
            min_ready_ms: (s.min_ready_seconds.unwrap_or(0).min(u64::MAX / 1000) * 1000) as i64,
            deadline_ms: i64::try_from(deadline.as_millis()).unwrap_or(i64::MAX),
            auto_rollback: s.auto_rollback.unwrap_or(true),
            steps: s.steps.iter().filter_map(|st| st.resolve(total)).collect(),
        }
    }
}

fn millis(t: Option<&str>) -> Option<i64> {
    t.and_then(crate::model::unix_millis)
}

fn stamp(now_ms: i64) -> String {
    crate::util::rfc3339(now_ms.div_euclid(1000))
}

/// A replica on the new revision in one of these states fails its gate. `Unhealthy` (liveness
/// failing, not yet as often as the agent's threshold) does not: it is not Ready, so it cannot
/// pass either, and if the failures go on the agent restarts it, which fails the gate; a probe
/// that timed out once under load must not roll back a good update.
fn broken(s: ReplicaState) -> bool {
    matches!(s, ReplicaState::CrashLoopBackOff | ReplicaState::Failed)
}

/// Where one replica on U stands with its gate.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Gate {
    Passed,
    /// Not yet; passes at this time if nothing changes.
    Waiting(Option<i64>),
    Failed(String),
}

fn gate(r: &ReplicaStatus, u: u64, min_ready_ms: i64, now_ms: i64) -> Gate {
    let running_u = r.config_revision == Some(u);
    if !running_u {
        return Gate::Waiting(None);
    }
    let why = |what: String| match &r.message {
        Some(m) if !m.is_empty() => format!("{} {what} ({m})", r.name),
        _ => format!("{} {what}", r.name),
    };
    if broken(r.state) {
        return Gate::Failed(why(format!("is {:?} on revision {u}", r.state)));
    }
    let baseline = r.restarts_at_update.unwrap_or(r.restarts);
    if r.restarts > baseline {
        return Gate::Failed(why(format!(
            "restarted {} time(s) on revision {u}",
            r.restarts - baseline
        )));
    }
    if r.state != ReplicaState::Ready {
        return Gate::Waiting(None);
    }
    if min_ready_ms == 0 {
        return Gate::Passed;
    }
    match millis(r.ready_since.as_deref()) {
        Some(since) if since.saturating_add(min_ready_ms) <= now_ms => Gate::Passed,
        Some(since) => Gate::Waiting(Some(since.saturating_add(min_ready_ms))),
        None => Gate::Waiting(None),
    }
}

/// The revision a replica without a target gets: U during a healthy or successful update
/// (and on the first revision), the stable revision while the update is paused, held by a
/// fleet-wide change, halted, or not yet started.
pub fn initial_target(instance: &OpenClawInstance) -> Option<u64> {
    let status = instance.status.as_ref()?;
    let u = status.config_revision?;
    let Some(ro) = &status.rollout else {
        return Some(u);
    };
    if ro.revision != u {
        // The update to U has not started: new replicas join the revision the others run.
        let stable = if ro.phase == RolloutPhase::Succeeded {
            Some(ro.revision)
        } else {
            ro.stable_revision
        };
        return Some(stable.unwrap_or(u));
    }
    Some(initial_for(ro, u))
}

fn initial_for(ro: &RolloutStatus, u: u64) -> u64 {
    let Some(stable) = ro.stable_revision else {
        return u;
    };
    let held = ro.paused || ro.held_by.is_some();
    match ro.phase {
        RolloutPhase::Succeeded => u,
        RolloutPhase::Progressing if !held => u,
        RolloutPhase::Progressing
        | RolloutPhase::Paused
        | RolloutPhase::Failed
        | RolloutPhase::RolledBack => stable,
    }
}

/// `revision`, when every placed replica targets it, runs it and is Ready.
fn all_ready_on(replicas: &[&ReplicaStatus], revision: u64) -> Option<u64> {
    let placed: Vec<&&ReplicaStatus> = replicas.iter().filter(|r| r.host.is_some()).collect();
    (revision != 0
        && !placed.is_empty()
        && placed.iter().all(|r| {
            r.target_revision == Some(revision)
                && r.config_revision == Some(revision)
                && r.state == ReplicaState::Ready
        }))
    .then_some(revision)
}

/// The revision most replicas target (ties to the lower one): the stable revision of an
/// instance whose update history was lost.
fn most_targeted(replicas: &[&ReplicaStatus]) -> Option<u64> {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for r in replicas {
        if let Some(t) = r.target_revision {
            *counts.entry(t).or_default() += 1;
        }
    }
    let mut best: Option<(usize, u64)> = None;
    for (rev, n) in counts {
        if best.is_none_or(|(bn, _)| n > bn) {
            best = Some((n, rev));
        }
    }
    best.map(|(_, rev)| rev)
}

/// Halts an update: with `rollback` and a stable revision, every replica on U returns to it.
fn halt(
    ro: &mut RolloutStatus,
    targets: &mut BTreeMap<u32, Option<u64>>,
    why: &str,
    rollback: bool,
    now_ms: i64,
) {
    let u = ro.revision;
    match (rollback, ro.stable_revision) {
        (true, Some(stable)) => {
            for t in targets.values_mut() {
                if *t == Some(u) {
                    *t = Some(stable);
                }
            }
            ro.phase = RolloutPhase::RolledBack;
            ro.message = Some(format!("{why}; rolled back to revision {stable}"));
        }
        (true, None) => {
            ro.phase = RolloutPhase::Failed;
            ro.message = Some(format!(
                "{why}; halted (revision {u} is the first, there is no earlier one to return to)"
            ));
        }
        (false, _) => {
            ro.phase = RolloutPhase::Failed;
            ro.message = Some(format!("{why}; halted (autoRollback is off)"));
        }
    }
    ro.finished_at = Some(stamp(now_ms));
}

/// Decides the targets and `status.rollout` of one instance at `now_ms` (Unix milliseconds).
/// Pure and deterministic.
pub fn plan(instance: &OpenClawInstance, now_ms: i64) -> Decision {
    let mut d = Decision::default();
    let Some(status) = &instance.status else {
        return d;
    };
    let s = Strategy::of(instance);
    d.wake_after_ms = availability_wake(instance, &s, now_ms);
    let Some(u) = status.config_revision else {
        return d;
    };
    let desired = instance.spec.replicas.max(0);
    let mut replicas: Vec<&ReplicaStatus> = status
        .replica_status
        .iter()
        .filter(|r| i64::from(r.ordinal) < desired)
        .collect();
    replicas.sort_by_key(|r| r.ordinal);
    replicas.dedup_by_key(|r| r.ordinal);
    let original: BTreeMap<u32, Option<u64>> = replicas
        .iter()
        .map(|r| (r.ordinal, r.target_revision))
        .collect();
    let mut targets = original.clone();
    let by_ordinal: BTreeMap<u32, &ReplicaStatus> =
        replicas.iter().map(|r| (r.ordinal, *r)).collect();
    let now = stamp(now_ms);

    let mut ro = match &status.rollout {
        Some(r) if r.revision == u => r.clone(),
        previous => {
            if let Some(p) = previous
                && p.held_by.is_some()
            {
                // Waiting for its wave: nothing moves toward U; new replicas join the others.
                let initial = initial_target(instance).unwrap_or(u);
                for t in targets.values_mut() {
                    t.get_or_insert(initial);
                }
                d.targets = changed(&original, &targets);
                return d;
            }
            let stable = match previous {
                Some(p) if p.phase == RolloutPhase::Succeeded && p.revision != 0 => {
                    Some(p.revision)
                }
                // An update not yet recorded as ended: its revision is stable when every
                // replica runs it Ready (the controller had not yet said so); a placeholder
                // (revision 0, written while a wave held an instance that had no update yet)
                // knows nothing, so the replicas say.
                Some(p) => p
                    .stable_revision
                    .or_else(|| all_ready_on(&replicas, p.revision))
                    .or_else(|| {
                        (p.revision == 0)
                            .then(|| most_targeted(&replicas))
                            .flatten()
                    }),
                None => most_targeted(&replicas),
            }
            .filter(|s| *s != u);
            RolloutStatus {
                revision: u,
                phase: RolloutPhase::Progressing,
                stable_revision: stable,
                step: (s.type_ == UpdateType::Canary && stable.is_some()).then_some(0),
                step_started_at: Some(now.clone()),
                started_at: Some(now.clone()),
                paused: previous.as_ref().is_some_and(|p| p.paused),
                message: Some(match stable {
                    Some(st) => format!("updating from revision {st} to {u}"),
                    None => format!("starting every replica on revision {u}"),
                }),
                ..RolloutStatus::default()
            }
        }
    };
    let before = status.rollout.as_ref().filter(|r| r.revision == u);

    // Replicas without a target join as the update stands.
    let initial = initial_for(&ro, u);
    for t in targets.values_mut() {
        t.get_or_insert(initial);
    }

    if !ro.phase.is_final() {
        progress(
            &mut ro,
            &mut targets,
            &by_ordinal,
            &s,
            desired,
            now_ms,
            &mut d,
        );
    }

    // Gate baselines: the restart count when a replica is first seen on its target.
    for r in &replicas {
        let target = targets.get(&r.ordinal).copied().flatten();
        if target == r.target_revision
            && target.is_some()
            && r.config_revision == target
            && r.restarts_at_update.is_none()
        {
            d.baselines.push((r.ordinal, r.restarts));
        }
    }
    d.targets = changed(&original, &targets);
    if before != Some(&ro) {
        d.rollout = Some(ro);
    }
    d
}

fn changed(
    original: &BTreeMap<u32, Option<u64>>,
    targets: &BTreeMap<u32, Option<u64>>,
) -> Vec<(u32, u64)> {
    targets
        .iter()
        .filter_map(|(o, t)| match (*t, original.get(o).copied().flatten()) {
            (Some(t), before) if before != Some(t) => Some((*o, t)),
            _ => None,
        })
        .collect()
}

fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// When the next Ready replica becomes available (Ready for `minReadySeconds`).
fn availability_wake(instance: &OpenClawInstance, s: &Strategy, now_ms: i64) -> Option<i64> {
    if s.min_ready_ms == 0 {
        return None;
    }
    instance
        .status
        .as_ref()?
        .replica_status
        .iter()
        .filter(|r| r.state == ReplicaState::Ready)
        .filter_map(|r| millis(r.ready_since.as_deref()))
        .map(|since| since.saturating_add(s.min_ready_ms))
        .filter(|at| *at > now_ms)
        .min()
        .map(|at| at - now_ms)
}

/// What let a pass move targets: the latest of the gates passed on U (`readySince` +
/// `minReadySeconds`) and of the other replicas turning Ready (`readySince`), when that latest
/// is a gate; `None` when no gate passed yet (the first step of an update) or a replica not
/// on U turning Ready came after it.
fn gate_decision(
    replicas: &BTreeMap<u32, &ReplicaStatus>,
    passed: &BTreeSet<u32>,
    u: u64,
    min_ready_ms: i64,
    now_ms: i64,
) -> Option<GateDecision> {
    let mut latest: Option<(i64, Option<&str>)> = None;
    for (o, r) in replicas {
        let Some(since) = millis(r.ready_since.as_deref()) else {
            continue;
        };
        let candidate = if passed.contains(o) {
            (since.saturating_add(min_ready_ms), Some(r.name.as_str()))
        } else if r.state == ReplicaState::Ready && r.target_revision != Some(u) {
            (since, None)
        } else {
            continue;
        };
        if candidate.0 <= now_ms && latest.is_none_or(|l| candidate.0 > l.0) {
            latest = Some(candidate);
        }
    }
    let (at, replica) = latest?;
    Some(GateDecision {
        replica: replica?.to_owned(),
        after_ms: now_ms - at,
    })
}

/// Moves an update on by one pass: gates, deadline, steps, completion.
fn progress(
    ro: &mut RolloutStatus,
    targets: &mut BTreeMap<u32, Option<u64>>,
    replicas: &BTreeMap<u32, &ReplicaStatus>,
    s: &Strategy,
    desired: i64,
    now_ms: i64,
    d: &mut Decision,
) {
    let u = ro.revision;
    let now = stamp(now_ms);
    let mut wake: Option<i64> = None;
    // Gates of the replicas on U.
    let mut passed: BTreeSet<u32> = BTreeSet::new();
    let mut pending: Vec<u32> = Vec::new();
    let mut failure: Option<String> = None;
    for (o, r) in replicas {
        if targets.get(o).copied().flatten() != Some(u) || r.host.is_none() {
            continue;
        }
        if r.target_revision != Some(u) {
            // Moved in this pass (it had no target): not yet on its way.
            pending.push(*o);
            continue;
        }
        match gate(r, u, s.min_ready_ms, now_ms) {
            Gate::Passed => {
                passed.insert(*o);
            }
            Gate::Waiting(at) => {
                pending.push(*o);
                wake = earliest(wake, at);
            }
            Gate::Failed(why) => {
                failure.get_or_insert(why);
            }
        }
    }
    if let Some(why) = failure {
        halt(ro, targets, &why, s.auto_rollback, now_ms);
        return;
    }
    if ro.paused {
        ro.phase = RolloutPhase::Paused;
        ro.message
            .get_or_insert_with(|| "paused; `clusterclaw rollout resume` continues".into());
        return;
    }
    let step_started = millis(ro.step_started_at.as_deref()).unwrap_or(now_ms);
    if !pending.is_empty() {
        let due = step_started.saturating_add(s.deadline_ms);
        if due <= now_ms {
            let who = pending
                .iter()
                .filter_map(|o| replicas.get(o))
                .map(|r| format!("{} ({:?})", r.name, r.state))
                .collect::<Vec<_>>()
                .join(", ");
            let why = format!(
                "{who} did not pass the gate within the progress deadline ({}s)",
                s.deadline_ms / 1000
            );
            halt(ro, targets, &why, s.auto_rollback, now_ms);
            return;
        }
        wake = earliest(wake, Some(due));
    }
    if ro.held_by.is_some() {
        ro.message = Some(format!(
            "held by {}: waiting for its wave",
            ro.held_by.as_deref().unwrap_or_default()
        ));
        d.wake_after_ms = earliest(d.wake_after_ms, wake.map(|w| w - now_ms));
        return;
    }
    ro.phase = RolloutPhase::Progressing;
    let placed_not_passed = |targets: &BTreeMap<u32, Option<u64>>, passed: &BTreeSet<u32>| {
        replicas
            .values()
            .filter(|r| r.host.is_some())
            .filter(|r| {
                r.state != ReplicaState::Ready
                    || (targets.get(&r.ordinal).copied().flatten() == Some(u)
                        && !passed.contains(&r.ordinal))
            })
            .count() as i64
    };
    // Moves the highest ordinals not on U, keeping the unavailable within `max`.
    let rolling = |targets: &mut BTreeMap<u32, Option<u64>>, max: i64| -> bool {
        let mut unavailable = placed_not_passed(targets, &passed);
        let mut moved = false;
        for (o, r) in replicas.iter().rev() {
            if targets.get(o).copied().flatten() == Some(u) {
                continue;
            }
            let costs = r.host.is_some() && r.state == ReplicaState::Ready;
            if costs && unavailable >= max {
                break;
            }
            if costs {
                unavailable += 1;
            }
            targets.insert(*o, Some(u));
            moved = true;
        }
        moved
    };
    let mut moved = false;
    let mut finished_steps = true;
    if ro.stable_revision.is_none() {
        for t in targets.values_mut() {
            if *t != Some(u) {
                *t = Some(u);
                moved = true;
            }
        }
    } else if s.type_ == UpdateType::Canary {
        let mut i = ro.step.unwrap_or(0) as usize;
        let mut started = step_started;
        finished_steps = false;
        loop {
            let Some(step) = s.steps.get(i) else {
                finished_steps = true;
                moved |= rolling(targets, 1);
                break;
            };
            match step {
                CanaryAction::Replicas(n) => {
                    let want = (*n).min(desired);
                    let mut on_u = targets.values().filter(|t| **t == Some(u)).count() as i64;
                    for t in targets.values_mut().rev() {
                        if on_u >= want {
                            break;
                        }
                        if *t != Some(u) {
                            *t = Some(u);
                            on_u += 1;
                            moved = true;
                        }
                    }
                    if moved || !pending.is_empty() {
                        ro.message = Some(format!(
                            "step {}/{}: {want} replica(s) on revision {u}, waiting for their gate",
                            i + 1,
                            s.steps.len()
                        ));
                        break;
                    }
                    i += 1;
                    started = now_ms;
                }
                CanaryAction::PauseUntilPromoted => {
                    if ro.promoted_step == Some(i as u32) {
                        i += 1;
                        started = now_ms;
                        continue;
                    }
                    ro.phase = RolloutPhase::Paused;
                    ro.message = Some(format!(
                        "step {}/{}: paused until `clusterclaw rollout promote`",
                        i + 1,
                        s.steps.len()
                    ));
                    break;
                }
                CanaryAction::PauseFor(pause) => {
                    let end = started
                        .saturating_add(i64::try_from(pause.as_millis()).unwrap_or(i64::MAX));
                    if end <= now_ms || ro.promoted_step == Some(i as u32) {
                        i += 1;
                        started = now_ms;
                        continue;
                    }
                    ro.phase = RolloutPhase::Paused;
                    ro.message = Some(format!(
                        "step {}/{}: paused until {}",
                        i + 1,
                        s.steps.len(),
                        stamp(end)
                    ));
                    wake = earliest(wake, Some(end));
                    break;
                }
            }
        }
        if ro.step != Some(i as u32) {
            ro.step = Some(i as u32);
            ro.step_started_at = Some(stamp(started));
        }
    } else {
        moved = rolling(targets, s.max_unavailable);
    }
    if moved {
        ro.step_started_at = Some(now.clone());
        wake = earliest(wake, Some(now_ms.saturating_add(s.deadline_ms)));
        if ro.stable_revision.is_some() {
            d.gate = gate_decision(replicas, &passed, u, s.min_ready_ms, now_ms);
        }
    }
    let all_passed = finished_steps
        && !moved
        && pending.is_empty()
        && replicas
            .iter()
            .filter(|(_, r)| r.host.is_some())
            .all(|(o, _)| passed.contains(o))
        && targets.values().all(|t| *t == Some(u));
    if all_passed && ro.phase == RolloutPhase::Progressing {
        ro.phase = RolloutPhase::Succeeded;
        ro.stable_revision = Some(u);
        ro.finished_at = Some(now);
        ro.message = Some(format!(
            "{} replica(s) passed on revision {u}",
            passed.len()
        ));
    } else if ro.phase == RolloutPhase::Progressing
        && (s.type_ == UpdateType::Rolling || finished_steps)
    {
        let on_u = targets.values().filter(|t| **t == Some(u)).count();
        ro.message = Some(format!(
            "{on_u}/{desired} replica(s) moved to revision {u}, {} passed",
            passed.len()
        ));
    }
    d.wake_after_ms = earliest(d.wake_after_ms, wake.map(|w| (w - now_ms).max(0)));
}

/// Writes a decision into the instance's status (targets, gate baselines, `status.rollout`)
/// and recomputes the summary at `now_ms`; returns whether anything changed.
pub fn apply(instance: &mut OpenClawInstance, d: &Decision, now_ms: i64) -> bool {
    let before = instance.status.clone();
    if let Some(status) = instance.status.as_mut() {
        let targets: BTreeMap<u32, u64> = d.targets.iter().copied().collect();
        let baselines: BTreeMap<u32, u32> = d.baselines.iter().copied().collect();
        for r in &mut status.replica_status {
            if let Some(t) = targets.get(&r.ordinal) {
                r.target_revision = Some(*t);
                r.restarts_at_update = None;
            }
            if let Some(n) = baselines.get(&r.ordinal) {
                r.restarts_at_update = Some(*n);
            }
        }
        if let Some(ro) = &d.rollout {
            status.rollout = Some(ro.clone());
        }
    }
    if instance.status.is_some() {
        summarize_at(instance, now_ms);
    }
    instance.status != before
}

/// A `rollout` command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Promote,
    Abort,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        match s {
            "pause" => Some(Command::Pause),
            "resume" => Some(Command::Resume),
            "promote" => Some(Command::Promote),
            "abort" => Some(Command::Abort),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Promote => "promote",
            Command::Abort => "abort",
        }
    }
}

/// Carries out a `rollout` command by `who` on an instance at `now_ms`; returns what was done,
/// or why the command does not apply (nothing changed then).
pub fn command(
    instance: &mut OpenClawInstance,
    cmd: Command,
    who: &str,
    now_ms: i64,
) -> Result<String, String> {
    let name = instance.metadata.name.clone();
    let desired = instance.spec.replicas.max(0);
    let type_ = instance.spec.update_strategy.type_;
    let Some(status) = instance.status.as_mut() else {
        return Err(format!("{name} has no update yet: it has no status"));
    };
    let Some(ro) = status.rollout.as_mut() else {
        return Err(format!(
            "{name} has no update to {}; an update starts with a new revision",
            cmd.as_str()
        ));
    };
    let u = ro.revision;
    let phase = ro.phase;
    let done = match cmd {
        Command::Pause => {
            if phase.is_final() {
                return Err(format!(
                    "the update of {name} to revision {u} has ended ({phase:?}); nothing to pause"
                ));
            }
            if ro.paused {
                return Ok(format!("the update to revision {u} was already paused"));
            }
            ro.paused = true;
            ro.phase = RolloutPhase::Paused;
            ro.message = Some(format!("paused by {who}"));
            format!("update to revision {u} paused")
        }
        Command::Resume => {
            if ro.paused {
                ro.paused = false;
                ro.phase = RolloutPhase::Progressing;
                ro.step_started_at = Some(stamp(now_ms));
                ro.message = Some(format!("resumed by {who}"));
                format!("update to revision {u} resumed")
            } else if matches!(phase, RolloutPhase::Failed | RolloutPhase::RolledBack) {
                ro.phase = RolloutPhase::Progressing;
                ro.step =
                    (type_ == UpdateType::Canary && ro.stable_revision.is_some()).then_some(0);
                ro.promoted_step = None;
                ro.started_at = Some(stamp(now_ms));
                ro.step_started_at = Some(stamp(now_ms));
                ro.finished_at = None;
                ro.message = Some(format!("restarted by {who} after it was {phase:?}"));
                format!("update to revision {u} restarted")
            } else {
                return Err(format!(
                    "the update of {name} to revision {u} is {phase:?}, not paused; nothing to resume"
                ));
            }
        }
        Command::Promote => {
            if ro.paused {
                return Err(format!(
                    "the update of {name} was paused by `rollout pause`; `rollout resume` continues it"
                ));
            }
            if phase != RolloutPhase::Paused {
                return Err(format!(
                    "the update of {name} to revision {u} is {phase:?}; promote ends a Canary's pause step"
                ));
            }
            let step = ro.step.unwrap_or(0);
            ro.promoted_step = Some(step);
            ro.phase = RolloutPhase::Progressing;
            ro.message = Some(format!("promoted by {who} at step {}", step + 1));
            format!("update to revision {u} promoted past step {}", step + 1)
        }
        Command::Abort => {
            if phase.is_final() {
                return Err(format!(
                    "the update of {name} to revision {u} has ended ({phase:?}); nothing to abort"
                ));
            }
            let Some(stable) = ro.stable_revision else {
                return Err(format!(
                    "revision {u} is the first of {name}; there is no earlier revision to return to"
                ));
            };
            let mut targets: BTreeMap<u32, Option<u64>> = status
                .replica_status
                .iter()
                .filter(|r| i64::from(r.ordinal) < desired)
                .map(|r| (r.ordinal, r.target_revision))
                .collect();
            halt(ro, &mut targets, &format!("aborted by {who}"), true, now_ms);
            ro.paused = false;
            for r in &mut status.replica_status {
                if let Some(t) = targets.get(&r.ordinal).copied().flatten()
                    && r.target_revision != Some(t)
                {
                    r.target_revision = Some(t);
                    r.restarts_at_update = None;
                }
            }
            format!("update to revision {u} aborted; replicas return to revision {stable}")
        }
    };
    summarize_at(instance, now_ms);
    Ok(done)
}

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("listing instances: {0}")]
    List(#[source] Box<StoreError>),
    #[error("writing the rollout of {objects} instances: {source}")]
    Write {
        objects: usize,
        #[source]
        source: Box<StoreError>,
    },
    #[error("the rollout pass stopped unexpectedly: {0}")]
    Task(String),
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub instances: usize,
    /// Instances planned (the others were settled: unchanged, no timer due).
    pub planned: usize,
    pub skipped: usize,
    pub written: usize,
    /// When the next pass is due without any change, from now.
    pub wake_after: Option<Duration>,
    /// The gate decisions of the targets this pass moved ([`GateDecision`]), one per instance.
    pub gate_decisions: Vec<Duration>,
}

/// One pass at `now_ms`: plans every instance and writes those whose status changes (each one
/// planned again on the object as the write transaction reads it). Blocking.
pub fn reconcile_once(store: &dyn Store, now_ms: i64) -> Result<PassReport, RolloutError> {
    reconcile_settled(store, now_ms, &mut Settled::default())
}

/// What the controller keeps between passes: each instance whose last plan changed nothing,
/// at the `resourceVersion` it was planned at, with the time its next timer is due (a gate, a
/// pause, a deadline). Planning is a function of the instance and the time alone, so such an
/// instance needs no plan until it is written or its timer is due: a pass after one instance
/// changed plans that one. Everything is planned again at least every [`RESYNC`].
#[derive(Debug, Default)]
pub struct Settled {
    by_key: HashMap<ObjectKey, (u64, Option<i64>)>,
    planned_all_at_ms: Option<i64>,
}

/// [`reconcile_once`], planning only the instances `settled` does not hold; keeps `settled`.
pub fn reconcile_settled(
    store: &dyn Store,
    now_ms: i64,
    settled: &mut Settled,
) -> Result<PassReport, RolloutError> {
    let resync_ms = RESYNC.as_millis() as i64;
    if settled
        .planned_all_at_ms
        .is_none_or(|at| now_ms.saturating_sub(at) >= resync_ms || now_ms < at)
    {
        settled.by_key.clear();
        settled.planned_all_at_ms = Some(now_ms);
    }
    let objects = crate::store::decoded::list_decoded(store, Kind::OpenClawInstance)
        .map_err(|e| RolloutError::List(Box::new(e)))?;
    let mut report = PassReport::default();
    let mut keys: Vec<ObjectKey> = Vec::new();
    let mut wake: Option<i64> = None;
    let mut events = Vec::new();
    let mut gates = Vec::new();
    for o in objects.iter() {
        let Ok(Resource::OpenClawInstance(read)) = &o.resource else {
            report.skipped += 1;
            continue;
        };
        report.instances += 1;
        if let Some((version, due)) = settled.by_key.get(&o.key)
            && *version == o.resource_version
            && due.is_none_or(|at| now_ms < at)
        {
            wake = earliest(wake, due.map(|at| at - now_ms));
            continue;
        }
        report.planned += 1;
        let d = plan(read, now_ms);
        wake = earliest(wake, d.wake_after_ms);
        let before = read.status.as_ref();
        let mut instance = read.clone();
        let changed = apply(&mut instance, &d, now_ms);
        if !changed {
            settled.by_key.insert(
                o.key.clone(),
                (o.resource_version, d.wake_after_ms.map(|w| now_ms + w)),
            );
        } else {
            settled.by_key.remove(&o.key);
        }
        if changed {
            keys.push(o.key.clone());
            events.extend(rollout_events(
                &o.key,
                before,
                instance.status.as_ref(),
                d.gate.as_ref(),
            ));
            if let Some(g) = &d.gate
                && !d.targets.is_empty()
            {
                gates.push(Duration::from_millis(g.after_ms.max(0) as u64));
            }
        }
    }
    let mut change = |r: &mut Resource| -> bool {
        match r {
            Resource::OpenClawInstance(instance) => {
                let d = plan(instance, now_ms);
                apply(instance, &d, now_ms)
            }
            Resource::Tenant(_)
            | Resource::Project(_)
            | Resource::ConfigTemplate(_)
            | Resource::Secret(_)
            | Resource::Host(_)
            | Resource::Rollout(_) => false,
        }
    };
    for chunk in keys.chunks(WRITE_BATCH) {
        store
            .update_many(chunk, &mut change)
            .map_err(|e| RolloutError::Write {
                objects: chunk.len(),
                source: Box::new(e),
            })?;
        report.written += chunk.len();
    }
    crate::events::record_all(store, events);
    report.wake_after = wake.map(|ms| Duration::from_millis(ms.max(0) as u64));
    report.gate_decisions = gates;
    Ok(report)
}

/// The events of one step of an update: the update's phase turning (`RolloutProgressing`,
/// `RolloutSucceeded`, `RolloutRolledBack`...), and every replica whose target revision moves
/// (`ReplicaTargetMoved`; when a gate let it move, its message ends with the gate decision:
/// `(gate of NAME passed N ms before)`).
pub fn rollout_events(
    key: &ObjectKey,
    before: Option<&crate::model::InstanceStatus>,
    after: Option<&crate::model::InstanceStatus>,
    gate: Option<&GateDecision>,
) -> Vec<crate::events::Event> {
    use crate::events::Event;
    use crate::model::RolloutPhase;
    let mut out = Vec::new();
    let Some(after) = after else { return out };
    let (b, a) = (
        before.and_then(|s| s.rollout.as_ref()),
        after.rollout.as_ref(),
    );
    if let Some(a) = a
        && b.is_none_or(|b| b.phase != a.phase || b.revision != a.revision)
    {
        let phase = format!("{:?}", a.phase);
        let message = match &a.message {
            Some(m) => format!("update to revision {}: {phase}: {m}", a.revision),
            None => format!("update to revision {}: {phase}", a.revision),
        };
        let reason = format!("Rollout{phase}");
        let e = match a.phase {
            RolloutPhase::Failed | RolloutPhase::RolledBack => {
                Event::warning(key.clone(), &reason, message)
            }
            _ => Event::normal(key.clone(), &reason, message),
        };
        out.push(e.source("rollout"));
    }
    let old: std::collections::HashMap<&str, Option<u64>> = before
        .map(|s| {
            s.replica_status
                .iter()
                .map(|r| (r.name.as_str(), r.target_revision))
                .collect()
        })
        .unwrap_or_default();
    for r in &after.replica_status {
        if let (Some(target), Some(prev)) = (r.target_revision, old.get(r.name.as_str()))
            && *prev != Some(target)
            && prev.is_some()
        {
            let message = match gate {
                Some(g) => format!(
                    "{} moves to revision {target} (gate of {} passed {} ms before)",
                    r.name, g.replica, g.after_ms
                ),
                None => format!("{} moves to revision {target}", r.name),
            };
            out.push(
                Event::normal(key.clone(), "ReplicaTargetMoved", message)
                    .replica(r.name.clone())
                    .source("rollout"),
            );
        }
    }
    out
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Runs the rollout controller until `shutdown` turns true: a pass at start, then one after
/// every burst of store changes, one when a gate, pause or deadline is due, at least one every
/// [`RESYNC`], and retries after failures (see [`super::runtime`]). Gate decisions go to
/// `metrics` (`clusterclaw_rollout_gate_decision_seconds`).
pub async fn run(
    store: Arc<dyn Store>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let settled = std::sync::Mutex::new(Settled::default());
    super::runtime::run(
        "rollout",
        store,
        shutdown,
        RESYNC,
        move |store: &dyn Store| {
            let report = reconcile_settled(
                store,
                now_ms(),
                &mut settled.lock().unwrap_or_else(|e| e.into_inner()),
            )?;
            for took in &report.gate_decisions {
                metrics.observe_gate_decision(*took);
            }
            if report.written > 0 {
                tracing::info!(
                    instances = report.written,
                    "rollout controller moved targets or status"
                );
            }
            Ok::<_, RolloutError>(report.wake_after)
        },
    )
    .await;
}

#[cfg(test)]
mod tests;
