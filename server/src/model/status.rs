//! Derives an instance's summary (phase, ready, updated and available replicas, observed
//! generation) from its replicas.

use super::{InstancePhase, OpenClawInstance, ReplicaState, RolloutPhase};

/// Milliseconds since the Unix epoch of an RFC 3339 time; `None` when it does not parse.
pub fn unix_millis(t: &str) -> Option<i64> {
    let at = humantime::parse_rfc3339_weak(t).ok()?;
    let d = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_millis()).ok()
}

/// [`summarize_at`] now.
pub fn summarize(instance: &mut OpenClawInstance) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    summarize_at(instance, now);
}

/// Recomputes `status.phase`, `readyReplicas`, `updatedReplicas`, `availableReplicas`,
/// `replicas`, `rollout.updatedReplicas` and `observedGeneration` of an instance from
/// `status.replicaStatus` (written by the scheduler, the rollout controller and agent reports),
/// at `now_ms` (Unix milliseconds). Keeps `status.message` when replicas are unplaced (the
/// scheduler's reason).
///
/// - ready: placed replicas that are Ready, whatever revision they run (old and new replicas
///   both serve during an update);
/// - updated: replicas whose target is the newest revision (no target means the newest);
/// - available: ready replicas that have been Ready for `minReadySeconds`;
/// - phase: `Progressing` while an update runs (`status.rollout` Progressing or Paused),
///   `Running` once every replica is Ready on one revision, `Degraded` when a replica is broken
///   (including `Unknown`: its host stopped reporting) or unplaced.
pub fn summarize_at(instance: &mut OpenClawInstance, now_ms: i64) {
    let generation = instance.metadata.generation.unwrap_or(1);
    let desired = instance.spec.replicas;
    let min_ready_ms = instance
        .spec
        .update_strategy
        .min_ready_seconds
        .unwrap_or(0)
        .saturating_mul(1000) as i64;
    let status = instance.status.get_or_insert_with(Default::default);
    status.replicas = desired;
    let current = |g: Option<i64>| g == Some(generation);
    let serving = |r: &&super::ReplicaStatus| r.host.is_some() && r.state == ReplicaState::Ready;
    let ready = status.replica_status.iter().filter(serving).count() as i64;
    status.ready_replicas = ready;
    let available = status
        .replica_status
        .iter()
        .filter(serving)
        .filter(|r| {
            min_ready_ms == 0
                || r.ready_since
                    .as_deref()
                    .and_then(unix_millis)
                    .is_some_and(|t| t.saturating_add(min_ready_ms) <= now_ms)
        })
        .count() as i64;
    status.available_replicas = available;
    let newest = status.config_revision;
    let updated = status
        .replica_status
        .iter()
        .filter(|r| r.target_revision.is_none() || r.target_revision == newest)
        .count() as i64;
    status.updated_replicas = updated;
    let rollout_phase = match &mut status.rollout {
        Some(ro) => {
            ro.updated_replicas = updated;
            (Some(ro.revision) == newest).then_some(ro.phase)
        }
        None => None,
    };
    let placed = status
        .replica_status
        .iter()
        .filter(|r| r.host.is_some())
        .count() as i64;
    let broken = |s: ReplicaState| {
        matches!(
            s,
            ReplicaState::Unhealthy
                | ReplicaState::CrashLoopBackOff
                | ReplicaState::Failed
                | ReplicaState::Unknown
        )
    };
    let failed = status
        .replica_status
        .iter()
        .filter(|r| r.state == ReplicaState::Failed)
        .count() as i64;
    let any_broken = status.replica_status.iter().any(|r| broken(r.state));
    let mut running: Vec<Option<u64>> = status
        .replica_status
        .iter()
        .filter(|r| r.host.is_some())
        .map(|r| r.config_revision)
        .collect();
    running.sort_unstable();
    running.dedup();
    let one_revision = running.len() <= 1;
    // An update whose replicas all run its revision and are available has passed every gate:
    // the instance is Running from that report on, even before the rollout controller records
    // the update as Succeeded.
    let done = ready >= desired
        && available >= desired
        && updated >= desired
        && running.as_slice() == [newest];
    let updating = match rollout_phase {
        Some(RolloutPhase::Paused) => true,
        Some(RolloutPhase::Progressing) => !done,
        _ => false,
    };
    if status
        .replica_status
        .iter()
        .all(|r| r.host.is_none() || current(r.generation))
    {
        status.observed_generation = generation;
    }
    status.phase = if desired > 0 && placed < desired && ready == 0 && !any_broken {
        InstancePhase::Pending
    } else if desired > 0 && failed >= desired {
        InstancePhase::Failed
    } else if updating {
        InstancePhase::Progressing
    } else if ready >= desired && one_revision {
        InstancePhase::Running
    } else if any_broken || placed < desired {
        InstancePhase::Degraded
    } else {
        InstancePhase::Progressing
    };
    if status.phase == InstancePhase::Running {
        status.message = None;
    } else if placed == desired {
        status.message = status
            .replica_status
            .iter()
            .find(|r| broken(r.state))
            .and_then(|r| r.message.as_ref().map(|m| format!("{}: {m}", r.name)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{InstanceStatus, Metadata, ReplicaStatus};

    fn inst(replicas: i64, states: &[(Option<&str>, ReplicaState, i64)]) -> OpenClawInstance {
        OpenClawInstance {
            api_version: crate::model::API_VERSION.into(),
            kind: crate::model::Kind::OpenClawInstance,
            metadata: Metadata {
                name: "bot".into(),
                generation: Some(2),
                ..Default::default()
            },
            spec: crate::model::InstanceSpec {
                replicas,
                ..Default::default()
            },
            status: Some(InstanceStatus {
                replica_status: states
                    .iter()
                    .enumerate()
                    .map(|(i, (host, state, g))| ReplicaStatus {
                        name: format!("bot-{i}"),
                        ordinal: i as u32,
                        host: host.map(Into::into),
                        state: *state,
                        generation: Some(*g),
                        message: Some("boom".into()),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
        }
    }

    fn phase(i: &mut OpenClawInstance) -> (InstancePhase, i64) {
        summarize(i);
        let s = i.status.as_ref().unwrap();
        (s.phase, s.ready_replicas)
    }

    #[test]
    fn unknown_replicas_are_neither_ready_nor_available() {
        use ReplicaState::*;
        let mut i = inst(2, &[(Some("h"), Unknown, 2), (Some("h"), Ready, 2)]);
        summarize(&mut i);
        let s = i.status.as_ref().unwrap();
        assert_eq!((s.ready_replicas, s.available_replicas), (1, 1));
        assert_eq!(s.phase, InstancePhase::Degraded);
        assert_eq!(s.message.as_deref(), Some("bot-0: boom"));
        let mut all = inst(2, &[(Some("h"), Unknown, 2), (Some("h"), Unknown, 2)]);
        assert_eq!(phase(&mut all), (InstancePhase::Degraded, 0));
    }

    #[test]
    fn phases() {
        use ReplicaState::*;
        assert_eq!(
            phase(&mut inst(2, &[(None, Pending, 2), (None, Pending, 2)])),
            (InstancePhase::Pending, 0)
        );
        assert_eq!(
            phase(&mut inst(
                2,
                &[(Some("h"), Ready, 2), (Some("h"), Ready, 2)]
            )),
            (InstancePhase::Running, 2)
        );
        assert_eq!(
            phase(&mut inst(
                2,
                &[(Some("h"), Ready, 2), (Some("h"), Starting, 2)]
            )),
            (InstancePhase::Progressing, 1)
        );
        let mut mixed = inst(2, &[(Some("h"), Ready, 1), (Some("h"), Ready, 2)]);
        let st = mixed.status.as_mut().unwrap();
        st.replica_status[0].config_revision = Some(1);
        st.replica_status[1].config_revision = Some(2);
        assert_eq!(
            phase(&mut mixed),
            (InstancePhase::Progressing, 2),
            "a replica on an old revision serves, but the instance is not on one revision yet"
        );
        let mut d = inst(
            2,
            &[(Some("h"), Ready, 2), (Some("h"), CrashLoopBackOff, 2)],
        );
        assert_eq!(phase(&mut d), (InstancePhase::Degraded, 1));
        assert_eq!(d.status.unwrap().message.as_deref(), Some("bot-1: boom"));
        assert_eq!(
            phase(&mut inst(1, &[(Some("h"), Failed, 2)])),
            (InstancePhase::Failed, 0)
        );
        assert_eq!(phase(&mut inst(0, &[])), (InstancePhase::Running, 0));
        let mut o = inst(1, &[(Some("h"), Ready, 1)]);
        summarize(&mut o);
        assert_eq!(o.status.unwrap().observed_generation, 0);
    }

    #[test]
    fn ready_updated_and_available_during_an_update() {
        use crate::model::{RolloutPhase, RolloutStatus};
        use ReplicaState::*;
        let mut i = inst(
            3,
            &[
                (Some("h"), Ready, 2),
                (Some("h"), Ready, 2),
                (Some("h"), Starting, 2),
            ],
        );
        i.spec.update_strategy.min_ready_seconds = Some(10);
        let st = i.status.as_mut().unwrap();
        st.config_revision = Some(5);
        st.rollout = Some(RolloutStatus {
            revision: 5,
            phase: RolloutPhase::Progressing,
            stable_revision: Some(4),
            ..Default::default()
        });
        for (r, (target, since)) in st.replica_status.iter_mut().zip([
            (4, Some("2026-07-10T11:00:00Z")),
            (4, Some("2026-07-10T11:59:55Z")),
            (5, None),
        ]) {
            r.target_revision = Some(target);
            r.config_revision = Some(target);
            r.ready_since = since.map(Into::into);
        }
        let now = unix_millis("2026-07-10T12:00:00Z").unwrap();
        summarize_at(&mut i, now);
        let s = i.status.as_ref().unwrap();
        assert_eq!(s.phase, InstancePhase::Progressing);
        assert_eq!(
            (s.ready_replicas, s.updated_replicas, s.available_replicas),
            (2, 1, 1),
            "two old replicas serve; one is Ready for less than minReadySeconds"
        );
        assert_eq!(s.rollout.as_ref().unwrap().updated_replicas, 1);
        summarize_at(&mut i, now + 5_000);
        assert_eq!(i.status.as_ref().unwrap().available_replicas, 2);
        // Every replica on the new revision and available: Running at once, before the
        // controller records the update as Succeeded; not while one is still inside
        // minReadySeconds.
        let st = i.status.as_mut().unwrap();
        for r in &mut st.replica_status {
            r.state = Ready;
            r.config_revision = Some(5);
            r.target_revision = Some(5);
            r.ready_since = Some("2026-07-10T11:59:55Z".into());
        }
        summarize_at(&mut i, now);
        assert_eq!(i.status.as_ref().unwrap().phase, InstancePhase::Progressing);
        summarize_at(&mut i, now + 5_000);
        assert_eq!(i.status.as_ref().unwrap().phase, InstancePhase::Running);
        // The update ended: every replica Ready on one revision is Running.
        let st = i.status.as_mut().unwrap();
        st.rollout.as_mut().unwrap().phase = RolloutPhase::Succeeded;
        for r in &mut st.replica_status {
            r.state = Ready;
            r.config_revision = Some(5);
            r.target_revision = Some(5);
        }
        summarize_at(&mut i, now);
        let s = i.status.as_ref().unwrap();
        assert_eq!(
            (s.phase, s.ready_replicas, s.updated_replicas),
            (InstancePhase::Running, 3, 3)
        );
    }
}
