//! Folding and scoping; what the store keeps of events is tested on every engine in
//! `store::feed_tests`.

use super::*;
use crate::store::sqlite::SqliteStore;

fn inst(tenant: &str, name: &str) -> ObjectKey {
    ObjectKey {
        kind: Kind::OpenClawInstance,
        tenant: tenant.into(),
        project: "p".into(),
        name: name.into(),
    }
}

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db")).unwrap();
    (dir, store)
}

#[test]
fn identical_events_fold_into_one_with_a_count() {
    let e = |at, msg: &str| {
        Event::warning(inst("acme", "bot"), "ContainerRestarted", msg)
            .replica("bot-0")
            .source("agent/h1")
            .at(at)
    };
    let folded = fold(vec![
        e(1_000, "exit code 1"),
        e(2_000, "exit code 1"),
        e(3_000, "exit code 137"),
        e(4_000, "exit code 1"),
    ]);
    assert_eq!(folded.len(), 2);
    assert_eq!(
        (folded[0].count, folded[0].first_ms, folded[0].last_ms),
        (3, 1_000, 4_000)
    );
    assert_eq!(folded[1].count, 1);
    // Beyond the window, a new event.
    let late = FOLD_WINDOW.as_millis() as i64 + 10_000;
    assert_eq!(fold(vec![e(1_000, "x"), e(late, "x")]).len(), 2);
}

#[test]
fn a_tenant_sees_only_its_own_events_and_no_host_events() {
    let host = ObjectKey::cluster(Kind::Host, "h1");
    let filter = EventFilter::default();
    let acme = Scope::Tenant("acme".into());
    assert!(filter.matches(&acme, &Event::normal(inst("acme", "bot"), "X", "")));
    assert!(!filter.matches(&acme, &Event::normal(inst("other", "bot"), "X", "")));
    assert!(!filter.matches(&acme, &Event::normal(host.clone(), "NodeNotReady", "")));
    assert!(filter.matches(&Scope::Cluster, &Event::normal(host, "NodeNotReady", "")));
    let one = EventFilter {
        object: Some(parse_for("instance/bot").unwrap()),
        ..EventFilter::default()
    };
    assert!(one.matches(
        &Scope::Cluster,
        &Event::normal(inst("acme", "bot"), "X", "")
    ));
    assert!(!one.matches(
        &Scope::Cluster,
        &Event::normal(inst("acme", "bot2"), "X", "")
    ));
    assert!(parse_for("pod/x").is_err());
    assert!(parse_for("instance").is_err());
}

fn reasons(events: &[Event]) -> Vec<(&str, EventType, Option<&str>)> {
    events
        .iter()
        .map(|e| (e.reason.as_str(), e.type_, e.replica.as_deref()))
        .collect()
}

/// Scheduling: a replica placed on a new host is `Scheduled`, one no host fits is
/// `FailedScheduling` (a Warning with the scheduler's reason), said once per reason.
#[test]
fn placement_records_scheduled_and_failed_scheduling() {
    use crate::controllers::scheduler::{InstancePlan, ReplicaPlacement, placement_events};
    let mut instance: crate::model::OpenClawInstance = serde_json::from_value(
        serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
            "metadata": {"name": "bot", "tenant": "acme", "project": "p"},
            "spec": {"version": "2026.7.1", "replicas": 2}}),
    )
    .unwrap();
    let why = "Unschedulable: 0/1 hosts fit (h1: 1Gi memory free, 2Gi asked)";
    let plan = InstancePlan {
        generation: Some(1),
        replicas: vec![
            ReplicaPlacement::Placed { host: "h1".into() },
            ReplicaPlacement::Unplaced { reason: why.into() },
        ],
    };
    let events = placement_events(&instance, &plan);
    assert_eq!(
        reasons(&events),
        [
            ("Scheduled", EventType::Normal, Some("bot-0")),
            ("FailedScheduling", EventType::Warning, Some("bot-1")),
        ]
    );
    assert!(events[0].message.contains("to host h1"), "{events:?}");
    assert_eq!(events[1].message, why);
    assert!(events.iter().all(|e| e.source == "scheduler"));
    // Once recorded in the status, the same placement says nothing again.
    instance.status = Some(crate::model::InstanceStatus {
        replica_status: vec![
            crate::model::ReplicaStatus {
                name: "bot-0".into(),
                ordinal: 0,
                host: Some("h1".into()),
                ..Default::default()
            },
            crate::model::ReplicaStatus {
                name: "bot-1".into(),
                ordinal: 1,
                message: Some(why.into()),
                ..Default::default()
            },
        ],
        ..Default::default()
    });
    assert!(placement_events(&instance, &plan).is_empty());
}

/// Rollout steps: the update's phase turning (a failure as a Warning) and each replica moved
/// to the new revision.
#[test]
fn rollout_steps_are_events() {
    use crate::controllers::rollout::rollout_events;
    use crate::model::{InstanceStatus, ReplicaStatus, RolloutPhase, RolloutStatus};
    let key = inst("acme", "bot");
    let status = |phase, target: Option<u64>| InstanceStatus {
        rollout: Some(RolloutStatus {
            revision: 2,
            phase,
            ..Default::default()
        }),
        replica_status: vec![ReplicaStatus {
            name: "bot-0".into(),
            target_revision: target,
            ..Default::default()
        }],
        ..Default::default()
    };
    let progressing = status(RolloutPhase::Progressing, Some(1));
    let events = rollout_events(&key, None, Some(&progressing), None);
    assert_eq!(
        reasons(&events),
        [("RolloutProgressing", EventType::Normal, None)]
    );
    let moved = status(RolloutPhase::Progressing, Some(2));
    assert_eq!(
        reasons(&rollout_events(
            &key,
            Some(&progressing),
            Some(&moved),
            None
        )),
        [("ReplicaTargetMoved", EventType::Normal, Some("bot-0"))]
    );
    // A move a gate let happen says how long after the gate it was decided.
    let gate = crate::controllers::rollout::GateDecision {
        replica: "bot-1".into(),
        after_ms: 12,
    };
    let events = rollout_events(&key, Some(&progressing), Some(&moved), Some(&gate));
    assert_eq!(
        events[0].message,
        "bot-0 moves to revision 2 (gate of bot-1 passed 12 ms before)"
    );
    let failed = status(RolloutPhase::Failed, Some(2));
    let events = rollout_events(&key, Some(&moved), Some(&failed), None);
    assert_eq!(
        reasons(&events),
        [("RolloutFailed", EventType::Warning, None)]
    );
    assert!(events[0].message.contains("revision 2"), "{events:?}");
    assert_eq!(
        reasons(&rollout_events(
            &key,
            Some(&failed),
            Some(&status(RolloutPhase::Succeeded, Some(2))),
            None
        )),
        [("RolloutSucceeded", EventType::Normal, None)]
    );
}

/// Fleet-wide changes: each wave, and a halt as a Warning.
#[test]
fn waves_are_events() {
    use crate::controllers::waves::wave_events;
    use crate::model::{WavePhase, WaveStatus};
    let key = ObjectKey::cluster(Kind::Rollout, "fleet-update");
    let at = |phase, wave| WaveStatus {
        phase,
        wave,
        waves: 3,
        ..Default::default()
    };
    assert_eq!(
        reasons(&wave_events(
            &key,
            Some(&at(WavePhase::Progressing, 0)),
            &at(WavePhase::Progressing, 1)
        )),
        [("WaveStarted", EventType::Normal, None)]
    );
    assert_eq!(
        reasons(&wave_events(
            &key,
            Some(&at(WavePhase::Progressing, 1)),
            &at(WavePhase::Halted, 1)
        )),
        [("RolloutHalted", EventType::Warning, None)]
    );
}

/// Host transitions: NotReady (Warning) and Ready again, kept as events of the host.
#[test]
fn host_transitions_are_events() {
    use crate::agent_rpc::reports::{host_not_ready_event, host_ready_event};
    let (_d, store) = open();
    record(
        &store,
        host_not_ready_event("h1", "no status report for 31s"),
    );
    record(&store, host_ready_event("h1", "the host reports again"));
    store.flush_events().unwrap();
    let filter = EventFilter {
        object: Some(parse_for("host/h1").unwrap()),
        ..Default::default()
    };
    let (_, events) = store.list_events(&filter).unwrap();
    let got: Vec<_> = events
        .iter()
        .map(|e| (e.event.reason.as_str(), e.event.type_))
        .collect();
    assert_eq!(
        got,
        [
            ("HostNotReady", EventType::Warning),
            ("HostReady", EventType::Normal)
        ]
    );
}
