//! Derives an instance's summary (phase, ready replicas, observed generation) from its replicas.

use super::{InstancePhase, OpenClawInstance, ReplicaState};

/// Recomputes `status.phase`, `readyReplicas`, `replicas` and `observedGeneration` of an
/// instance from `status.replicaStatus` (written by the scheduler and by agent reports).
/// Keeps `status.message` when replicas are unplaced (the scheduler's reason).
pub fn summarize(instance: &mut OpenClawInstance) {
    let generation = instance.metadata.generation.unwrap_or(1);
    let desired = instance.spec.replicas;
    let status = instance.status.get_or_insert_with(Default::default);
    status.replicas = desired;
    let current = |g: Option<i64>| g == Some(generation);
    let ready = status
        .replica_status
        .iter()
        .filter(|r| r.host.is_some() && r.state == ReplicaState::Ready && current(r.generation))
        .count() as i64;
    status.ready_replicas = ready;
    let placed = status
        .replica_status
        .iter()
        .filter(|r| r.host.is_some())
        .count() as i64;
    let broken = |s: ReplicaState| {
        matches!(
            s,
            ReplicaState::Unhealthy | ReplicaState::CrashLoopBackOff | ReplicaState::Failed
        )
    };
    let failed = status
        .replica_status
        .iter()
        .filter(|r| r.state == ReplicaState::Failed)
        .count() as i64;
    let any_broken = status.replica_status.iter().any(|r| broken(r.state));
    if status
        .replica_status
        .iter()
        .all(|r| r.host.is_none() || current(r.generation))
    {
        status.observed_generation = generation;
    }
    status.phase = if desired > 0 && placed < desired && ready == 0 && !any_broken {
        InstancePhase::Pending
    } else if ready >= desired {
        InstancePhase::Running
    } else if desired > 0 && failed >= desired {
        InstancePhase::Failed
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
        assert_eq!(
            phase(&mut inst(
                2,
                &[(Some("h"), Ready, 1), (Some("h"), Ready, 2)]
            )),
            (InstancePhase::Progressing, 1),
            "a replica on an old generation is not ready"
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
}
