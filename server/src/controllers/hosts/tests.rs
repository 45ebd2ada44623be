use std::collections::HashMap;
use std::time::Duration;

use super::*;
use crate::model::{InstancePhase, InstanceStatus, ReplicaStatus};
use crate::store::WriteMode;
use crate::store::sqlite::SqliteStore;

const TTL: Duration = Duration::from_secs(30);
const T0: i64 = 1_800_000_000_000;

fn view(name: &str, phase: HostPhase) -> HostView {
    HostView {
        name: name.into(),
        phase,
        has_not_ready_since: phase == HostPhase::NotReady,
        floor_ms: T0,
    }
}

fn seen(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
    pairs.iter().map(|(n, t)| (n.to_string(), *t)).collect()
}

#[test]
fn a_fresh_host_stays_ready_and_sets_the_timer() {
    let hosts = [view("h1", HostPhase::Ready)];
    let p = plan(&hosts, &seen(&[("h1", T0 + 10_000)]), T0 + 12_000, TTL);
    assert!(p.steps.is_empty(), "{p:?}");
    assert!(p.not_ready.is_empty());
    assert_eq!(p.next, Some(Duration::from_millis(28_000)));
}

#[test]
fn a_silent_host_turns_not_ready_exactly_at_the_timeout() {
    let hosts = [view("h1", HostPhase::Ready)];
    let last = seen(&[("h1", T0 + 1_000)]);
    let before = plan(&hosts, &last, T0 + 1_000 + 29_999, TTL);
    assert!(before.steps.is_empty(), "{before:?}");
    assert_eq!(
        before.next,
        Some(MIN_RECHECK),
        "1 ms left: the shortest wait"
    );
    let at = plan(&hosts, &last, T0 + 1_000 + 30_000, TTL);
    assert_eq!(
        at.steps,
        vec![Step::MarkNotReady {
            host: "h1".into(),
            last_seen_ms: T0 + 1_000
        }]
    );
    assert!(at.not_ready.contains("h1"));
    assert_eq!(at.next, None, "no Ready host left to time out");
}

#[test]
fn a_host_never_seen_is_given_the_timeout_from_its_floor() {
    let hosts = [view("h1", HostPhase::Ready)];
    // A heartbeat older than the server's start counts from the start.
    let old = seen(&[("h1", T0 - 3_600_000)]);
    assert!(plan(&hosts, &old, T0 + 29_000, TTL).steps.is_empty());
    assert!(
        plan(&hosts, &HashMap::new(), T0 + 29_000, TTL)
            .steps
            .is_empty()
    );
    assert_eq!(
        plan(&hosts, &HashMap::new(), T0 + 30_000, TTL).steps.len(),
        1
    );
}

#[test]
fn a_not_ready_host_keeps_its_since_and_is_left_to_its_next_report() {
    let hosts = [view("h1", HostPhase::NotReady)];
    let silent = plan(&hosts, &seen(&[("h1", T0)]), T0 + 120_000, TTL);
    assert!(silent.steps.is_empty(), "not marked again: {silent:?}");
    assert!(silent.not_ready.contains("h1"), "its replicas stay Unknown");
    // Back: its report was recorded (the report itself turns it Ready).
    let back = plan(&hosts, &seen(&[("h1", T0 + 119_000)]), T0 + 120_000, TTL);
    assert!(
        back.steps.is_empty() && back.not_ready.is_empty(),
        "{back:?}"
    );
    // Written without notReadySince (an older server): since now.
    let mut bare = view("h1", HostPhase::NotReady);
    bare.has_not_ready_since = false;
    let p = plan(&[bare], &seen(&[("h1", T0)]), T0 + 120_000, TTL);
    assert_eq!(
        p.steps,
        vec![Step::RecordNotReadySince { host: "h1".into() }]
    );
}

#[test]
fn the_timer_is_the_earliest_ready_host() {
    let hosts = [
        view("a", HostPhase::Ready),
        view("b", HostPhase::Ready),
        view("c", HostPhase::NotReady),
    ];
    let p = plan(
        &hosts,
        &seen(&[("a", T0 + 20_000), ("b", T0 + 5_000), ("c", T0)]),
        T0 + 21_000,
        TTL,
    );
    assert_eq!(p.next, Some(Duration::from_millis(14_000)));
}

#[test]
fn silences_read_as_people_say_them() {
    assert_eq!(format_silence(31_400), "31s");
    assert_eq!(format_silence(130_000), "2m10s");
    assert_eq!(format_silence(3 * 3_600_000 + 5 * 60_000), "3h05m");
    assert_eq!(format_silence(2 * 86_400_000 + 4 * 3_600_000), "2d4h");
    assert_eq!(
        not_ready_message(130_000),
        "no status report for 2m10s (agent stopped or unreachable)"
    );
}

fn host(name: &str) -> Resource {
    Resource::from_value(serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Host",
        "metadata": {"name": name}, "spec": {"hostname": name, "capacity": {"cpu": "4", "memory": "8Gi"}}}))
    .unwrap()
}

/// A store with Ready host `h1` and instance `t/p/bot` with two Ready replicas on it.
fn setup() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db")).unwrap();
    let objects: Vec<(Resource, WriteMode)> = [
        serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": "t"}}),
        serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project", "metadata": {"name": "p", "tenant": "t"}}),
        serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
                           "metadata": {"name": "bot", "tenant": "t", "project": "p"}, "spec": {"version": "2026.7.1", "replicas": 2}}),
    ]
    .into_iter()
    .map(|v| (Resource::from_value(v).unwrap(), WriteMode::Apply))
    .chain([(host("h1"), WriteMode::Apply)])
    .collect();
    store.write(&objects, false).unwrap();
    store
        .update(&ObjectKey::cluster(Kind::Host, "h1"), &mut |r| {
            let Resource::Host(h) = r else { return false };
            h.status.get_or_insert_with(Default::default).phase = HostPhase::Ready;
            true
        })
        .unwrap();
    store
        .update(&ObjectKey::instance("t", "p", "bot"), &mut |r| {
            let Resource::OpenClawInstance(i) = r else {
                return false;
            };
            i.status = Some(InstanceStatus {
                replica_status: (0..2)
                    .map(|n| ReplicaStatus {
                        name: format!("bot-{n}"),
                        ordinal: n,
                        host: Some("h1".into()),
                        state: ReplicaState::Ready,
                        generation: Some(1),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            });
            summarize(i);
            true
        })
        .unwrap();
    (dir, store)
}

fn the_host(store: &SqliteStore) -> Host {
    let Resource::Host(h) = store
        .get(&ObjectKey::cluster(Kind::Host, "h1"))
        .unwrap()
        .unwrap()
        .resource()
        .unwrap()
    else {
        panic!()
    };
    h
}

fn the_instance(store: &SqliteStore) -> crate::model::OpenClawInstance {
    let Resource::OpenClawInstance(i) = store
        .get(&ObjectKey::instance("t", "p", "bot"))
        .unwrap()
        .unwrap()
        .resource()
        .unwrap()
    else {
        panic!()
    };
    i
}

#[test]
fn heartbeats_do_not_move_the_index() {
    let (_dir, store) = setup();
    let index = store.index();
    store.record_heartbeats(&[("h1", T0), ("h2", T0)]).unwrap();
    store.record_heartbeats(&[("h1", T0 + 5)]).unwrap();
    store.record_heartbeats(&[("h1", T0 + 1)]).unwrap();
    assert_eq!(store.index(), index);
    let beats = store.host_heartbeats().unwrap();
    assert_eq!(
        beats["h1"],
        T0 + 5,
        "an older time never replaces a newer one"
    );
    store.forget_heartbeat("h2").unwrap();
    assert!(!store.host_heartbeats().unwrap().contains_key("h2"));
}

#[test]
fn a_silent_host_turns_not_ready_and_its_replicas_unknown() {
    let (_dir, store) = setup();
    store.record_heartbeats(&[("h1", T0)]).unwrap();
    let fresh = reconcile_at(&store, TTL, T0 - 60_000, T0 + 10_000).unwrap();
    assert_eq!(fresh.hosts_marked, 0);
    assert_eq!(fresh.next, Some(Duration::from_secs(20)));
    assert_eq!(the_instance(&store).status.unwrap().ready_replicas, 2);

    let report = reconcile_at(&store, TTL, T0 - 60_000, T0 + 31_000).unwrap();
    assert_eq!((report.hosts_marked, report.instances_marked), (1, 1));
    let h = the_host(&store);
    let status = h.status.unwrap();
    assert_eq!(status.phase, HostPhase::NotReady);
    let since = status.not_ready_since.expect("notReadySince");
    assert_eq!(
        status.message.as_deref(),
        Some("no status report for 31s (agent stopped or unreachable)")
    );
    let s = the_instance(&store).status.unwrap();
    assert_eq!((s.ready_replicas, s.available_replicas), (0, 0));
    assert_eq!(s.phase, InstancePhase::Degraded);
    for r in &s.replica_status {
        assert_eq!(r.state, ReplicaState::Unknown);
        assert!(
            r.message
                .as_deref()
                .unwrap()
                .contains("host h1 is NotReady"),
            "{r:?}"
        );
    }
    assert!(s.message.unwrap().contains("host h1 is NotReady"));
    // The transition is an event of the host.
    store.flush_events().unwrap();
    let (_, events) = store
        .list_events(&crate::events::EventFilter::default())
        .unwrap();
    assert!(
        events.iter().any(|e| e.event.reason == "HostNotReady"
            && e.event.object == ObjectKey::cluster(Kind::Host, "h1")),
        "{events:?}"
    );

    // Later passes keep notReadySince and write nothing.
    let index = store.index();
    let again = reconcile_at(&store, TTL, T0 - 60_000, T0 + 90_000).unwrap();
    assert_eq!((again.hosts_marked, again.instances_marked), (0, 0));
    assert_eq!(store.index(), index);
    assert_eq!(
        the_host(&store).status.unwrap().not_ready_since,
        Some(since)
    );
}

#[test]
fn a_pass_that_would_find_what_the_last_one_found_is_skipped() {
    let (_dir, store) = setup();
    store.record_heartbeats(&[("h1", T0)]).unwrap();
    let started = T0 - 60_000;
    let mut quiet = Quiet::default();
    let mut pass = |now: i64| reconcile_quiet(&store, TTL, started, now, &mut quiet).unwrap();
    assert!(!pass(T0 + 10_000).skipped);
    // Before h1 could time out, with nothing written: skipped, asked back for when it could.
    let second = pass(T0 + 20_000);
    assert!(second.skipped);
    assert_eq!(second.next, Some(Duration::from_secs(10)));
    // A heartbeat moves nothing the skip depends on: h1 can only time out later.
    store.record_heartbeats(&[("h1", T0 + 5_000)]).unwrap();
    assert!(pass(T0 + 21_000).skipped);
    // A host written: read again.
    store
        .update(&ObjectKey::cluster(Kind::Host, "h1"), &mut |r| {
            let Resource::Host(h) = r else { return false };
            h.metadata.labels.insert("rack".into(), "a".into());
            true
        })
        .unwrap();
    assert!(!pass(T0 + 22_000).skipped);
    // Once h1 could time out, the pass runs and marks it, then once more (it wrote the host).
    let late = pass(T0 + 35_000);
    assert!(!late.skipped);
    assert_eq!((late.hosts_marked, late.instances_marked), (1, 1));
    assert!(!pass(T0 + 36_000).skipped);
    assert!(pass(T0 + 37_000).skipped, "NotReady, nothing left to mark");
    // A replica on the NotReady host written Ready (by anyone): the pass runs and marks it.
    store
        .update(&ObjectKey::instance("t", "p", "bot"), &mut |r| {
            let Resource::OpenClawInstance(i) = r else {
                return false;
            };
            i.status.as_mut().unwrap().replica_status[0].state = ReplicaState::Ready;
            true
        })
        .unwrap();
    let marked = pass(T0 + 38_000);
    assert!(!marked.skipped);
    assert_eq!(marked.instances_marked, 1);
    assert_eq!(
        the_instance(&store).status.unwrap().replica_status[0].state,
        ReplicaState::Unknown
    );
}

#[test]
fn a_host_that_reported_meanwhile_keeps_its_replicas_states() {
    let (_dir, store) = setup();
    store.record_heartbeats(&[("h1", T0)]).unwrap();
    reconcile_at(&store, TTL, T0, T0 + 31_000).unwrap();
    // Its report turns it Ready again (as `Reports::apply` does) with its replicas Ready.
    store
        .update(&ObjectKey::cluster(Kind::Host, "h1"), &mut |r| {
            let Resource::Host(h) = r else { return false };
            let s = h.status.get_or_insert_with(Default::default);
            s.phase = HostPhase::Ready;
            s.not_ready_since = None;
            true
        })
        .unwrap();
    store
        .update(&ObjectKey::instance("t", "p", "bot"), &mut |r| {
            let Resource::OpenClawInstance(i) = r else {
                return false;
            };
            for r in &mut i.status.as_mut().unwrap().replica_status {
                r.state = ReplicaState::Ready;
            }
            summarize(i);
            true
        })
        .unwrap();
    // A pass that still saw it NotReady marks nothing: the host is checked in the write.
    let marked = mark_unknown(&store, &["h1".to_string()].into_iter().collect()).unwrap();
    assert_eq!(marked, 0);
    assert_eq!(the_instance(&store).status.unwrap().ready_replicas, 2);
}

#[test]
fn the_message_ages_when_read() {
    let (_dir, store) = setup();
    store.record_heartbeats(&[("h1", T0)]).unwrap();
    reconcile_at(&store, TTL, T0, T0 + 31_000).unwrap();
    let o = store
        .get(&ObjectKey::cluster(Kind::Host, "h1"))
        .unwrap()
        .unwrap();
    let beats = store.host_heartbeats().unwrap();
    let read = |now: i64| -> serde_json::Value {
        serde_json::from_str(&aged_json(&o, &beats, now)).unwrap()
    };
    assert_eq!(
        read(T0 + 130_000)["status"]["message"],
        "no status report for 2m10s (agent stopped or unreachable)"
    );
    assert_eq!(
        read(T0 + 130_000)["status"]["lastHeartbeat"],
        crate::util::rfc3339(T0 / 1000)
    );
    assert_eq!(
        read(T0 + 3_700_000)["status"]["message"],
        "no status report for 1h01m (agent stopped or unreachable)"
    );
    // A Ready host reads as stored.
    let mut h = the_host(&store);
    h.status.as_mut().unwrap().phase = HostPhase::Ready;
    h.status.as_mut().unwrap().message = None;
    age_message(&mut h, Some(T0), T0 + 500_000);
    assert_eq!(h.status.unwrap().message, None);
}

#[test]
fn a_host_whose_report_was_written_after_the_heartbeats_were_read_is_not_marked() {
    let (_dir, store) = setup();
    store.record_heartbeats(&[("h1", T0)]).unwrap();
    // The heartbeats say silent for 31 s, but a report written since (its `lastHeartbeat`
    // later than the heartbeat read) says the host is back: the mark is not written.
    store
        .update(&ObjectKey::cluster(Kind::Host, "h1"), &mut |r| {
            let Resource::Host(h) = r else { return false };
            h.status.get_or_insert_with(Default::default).last_heartbeat =
                Some(crate::util::rfc3339((T0 + 30_000) / 1000));
            true
        })
        .unwrap();
    let report = reconcile_at(&store, TTL, T0, T0 + 31_000).unwrap();
    assert_eq!((report.hosts_marked, report.instances_marked), (0, 0));
    assert_eq!(the_host(&store).status.unwrap().phase, HostPhase::Ready);
    assert_eq!(the_instance(&store).status.unwrap().ready_replicas, 2);
}
