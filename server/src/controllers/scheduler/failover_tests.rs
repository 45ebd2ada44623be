//! Tests of failover and placement epochs in the scheduler.

use super::*;
use crate::controllers::fixtures::{HostBuilder, InstanceBuilder, PROJECT, TENANT};
use crate::model::{Failover, FailoverPolicy, HostPhase};

const T0: &str = "2026-07-01T10:00:00Z";
/// Unix milliseconds of `T0`.
fn t0() -> i64 {
    crate::model::unix_millis(T0).unwrap()
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::instance(TENANT, PROJECT, name)
}

fn lost(name: &str, since: &str) -> Host {
    let mut h = HostBuilder::new(name).build();
    let s = h.status.as_mut().unwrap();
    s.phase = HostPhase::NotReady;
    s.not_ready_since = Some(since.into());
    h
}

fn reschedule(after: &str) -> Failover {
    Failover {
        policy: FailoverPolicy::Reschedule,
        after: Some(after.into()),
        stop_after: None,
    }
}

fn bot(failover: Failover) -> OpenClawInstance {
    let mut i = InstanceBuilder::new("bot")
        .replicas(2)
        .placed(0, "h1")
        .placed(1, "h2")
        .build();
    i.spec.failover = failover;
    i.metadata.resource_version = Some(40);
    for r in &mut i.status.as_mut().unwrap().replica_status {
        r.epoch = Some(7);
    }
    i
}

#[test]
fn reschedule_moves_a_replica_once_its_host_has_been_not_ready_for_after() {
    let i = bot(reschedule("20s"));
    let hosts = [
        lost("h1", T0),
        HostBuilder::new("h2").build(),
        HostBuilder::new("h3").build(),
    ];
    // Not yet: 19 s NotReady.
    let p = plan_at(std::slice::from_ref(&i), &hosts, t0() + 19_000);
    assert_eq!(p.hosts_of(&key("bot")), [Some("h1"), Some("h2")]);
    assert!(p.moves.is_empty());
    // The scheduler is told when to look again.
    assert_eq!(p.next_failover, Some(std::time::Duration::from_secs(1)));
    // 20 s: bot-0 goes to h3 (spread: h2 already holds bot-1).
    let p = plan_at(std::slice::from_ref(&i), &hosts, t0() + 20_000);
    assert_eq!(p.hosts_of(&key("bot")), [Some("h3"), Some("h2")]);
    let m = &p.moves[&key("bot")][&0];
    assert_eq!(m.from, "h1");
    assert_eq!(
        m.message(),
        "rescheduled from host h1 after 20s NotReady; started with fresh state"
    );

    let mut applied = i.clone();
    assert!(apply_instance_plan_moving(
        &mut applied,
        &p.instances[&key("bot")],
        &p.moves[&key("bot")],
        "2026-07-01T10:00:20Z",
    ));
    let st = applied.status.as_ref().unwrap();
    let r0 = &st.replica_status[0];
    assert_eq!(r0.host.as_deref(), Some("h3"));
    // Above both the old epoch and the resource version.
    assert_eq!(r0.epoch, Some(41));
    assert_eq!(r0.state, ReplicaState::Pending);
    assert_eq!(r0.container_id, None);
    assert!(
        r0.message
            .as_deref()
            .unwrap()
            .contains("started with fresh state")
    );
    // bot-1 did not move: same epoch.
    assert_eq!(st.replica_status[1].epoch, Some(7));
    // The volume left on h1 is kept there.
    assert_eq!(st.retained_volumes.len(), 1);
    let v = &st.retained_volumes[0];
    assert_eq!(
        (v.replica.as_str(), v.ordinal, v.host.as_str()),
        ("bot-0", 0, "h1")
    );
    assert!(v.from_failover());
}

#[test]
fn failover_volumes_are_kept_even_when_scaled_volumes_are_not() {
    let mut i = bot(reschedule("20s"));
    i.spec.volume_retention.when_scaled = RetentionPolicy::Delete;
    let hosts = [
        lost("h1", T0),
        HostBuilder::new("h2").build(),
        HostBuilder::new("h3").build(),
    ];
    let p = plan_at(std::slice::from_ref(&i), &hosts, t0() + 60_000);
    assert!(apply_instance_plan_moving(
        &mut i,
        &p.instances[&key("bot")],
        &p.moves[&key("bot")],
        T0
    ));
    assert_eq!(i.status.as_ref().unwrap().retained_volumes.len(), 1);
    // A later pass (h1 back) keeps it listed while bot-0 runs elsewhere.
    let hosts = [
        HostBuilder::new("h1").build(),
        HostBuilder::new("h2").build(),
        HostBuilder::new("h3").build(),
    ];
    let p = plan_at(std::slice::from_ref(&i), &hosts, t0() + 90_000);
    assert_eq!(p.hosts_of(&key("bot")), [Some("h3"), Some("h2")]);
    apply_instance_plan(&mut i, &p.instances[&key("bot")], T0);
    assert_eq!(i.status.as_ref().unwrap().retained_volumes.len(), 1);
}

#[test]
fn manual_never_moves() {
    let i = bot(Failover::default());
    let hosts = [
        lost("h1", T0),
        HostBuilder::new("h2").build(),
        HostBuilder::new("h3").build(),
    ];
    let p = plan_at(std::slice::from_ref(&i), &hosts, t0() + 3_600_000);
    assert_eq!(p.hosts_of(&key("bot")), [Some("h1"), Some("h2")]);
    assert!(p.moves.is_empty());
}

#[test]
fn with_nowhere_to_go_the_replica_waits_for_its_host() {
    let i = bot(reschedule("20s"));
    let hosts = [lost("h1", T0), lost("h2", T0)];
    let p = plan_at(std::slice::from_ref(&i), &hosts, t0() + 60_000);
    assert_eq!(p.hosts_of(&key("bot")), [Some("h1"), Some("h2")]);
    assert!(p.moves.is_empty());
    assert_eq!(p.instances[&key("bot")].unplaced(), 0);
}

#[test]
fn every_placement_raises_the_epoch() {
    let mut i = InstanceBuilder::new("bot").replicas(1).build();
    i.metadata.resource_version = Some(3);
    let hosts = [
        HostBuilder::new("h1").build(),
        HostBuilder::new("h2").build(),
    ];
    let p = plan_at(std::slice::from_ref(&i), &hosts, t0());
    apply_instance_plan(&mut i, &p.instances[&key("bot")], T0);
    let first = i.status.as_ref().unwrap().replica_status[0].epoch.unwrap();
    assert_eq!(first, 4);
    // Staying put keeps it.
    i.metadata.resource_version = Some(10);
    let p = plan_at(std::slice::from_ref(&i), &hosts, t0());
    apply_instance_plan(&mut i, &p.instances[&key("bot")], T0);
    assert_eq!(i.status.as_ref().unwrap().replica_status[0].epoch, Some(4));
    // A move raises it above everything the store has written for the instance.
    let other = if i.status.as_ref().unwrap().replica_status[0].host.as_deref() == Some("h1") {
        "h2"
    } else {
        "h1"
    };
    let p = InstancePlan {
        generation: i.metadata.generation,
        replicas: vec![ReplicaPlacement::Placed { host: other.into() }],
    };
    apply_instance_plan(&mut i, &p, T0);
    assert_eq!(i.status.as_ref().unwrap().replica_status[0].epoch, Some(11));
    // Unplaced keeps the epoch, so the next placement is still higher.
    let p = InstancePlan {
        generation: i.metadata.generation,
        replicas: vec![ReplicaPlacement::Unplaced { reason: "x".into() }],
    };
    apply_instance_plan(&mut i, &p, T0);
    assert_eq!(i.status.as_ref().unwrap().replica_status[0].epoch, Some(11));
    assert_eq!(next_epoch(Some(11), Some(5)), 12);
    assert_eq!(next_epoch(None, None), 1);
}
