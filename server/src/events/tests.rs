use std::time::Duration;

use super::*;
use crate::store::sqlite::SqliteStore;
use crate::store::{ChangeType, ChangesSince, Feed};

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
fn a_crash_loop_is_one_stored_event_that_counts() {
    let (_d, store) = open();
    for round in 0..5 {
        for _ in 0..3 {
            record(
                &store,
                Event::warning(inst("acme", "bot"), "ContainerRestarted", "exit code 1")
                    .replica("bot-0")
                    .source("agent/h1"),
            );
        }
        record(
            &store,
            Event::normal(inst("acme", "bot"), "Scheduled", format!("round {round}")),
        );
        store.flush_events().unwrap();
    }
    let (seq, events) = store.list_events(&EventFilter::default()).unwrap();
    let restarts: Vec<_> = events
        .iter()
        .filter(|e| e.event.reason == "ContainerRestarted")
        .collect();
    assert_eq!(restarts.len(), 1, "{events:?}");
    assert_eq!(restarts[0].count, 15);
    assert_eq!(events.len(), 6);
    assert!(seq >= 10);
    // The global index never moved.
    assert_eq!(crate::store::Store::index(&store), 0);
}

#[test]
fn retention_prunes_by_age_and_by_count_per_tenant() {
    let (_d, store) = open();
    let now = now_ms();
    for i in 0..20 {
        record(
            &store,
            Event::normal(inst("acme", "bot"), "Scheduled", format!("n{i}")).at(now - 1000 + i),
        );
    }
    for i in 0..3 {
        record(
            &store,
            Event::normal(inst("other", "bot"), "Scheduled", format!("n{i}")).at(now),
        );
    }
    record(
        &store,
        Event::normal(inst("other", "old"), "Scheduled", "old").at(now - 7_200_000),
    );
    store.flush_events().unwrap();
    let retention = Retention {
        ttl: Duration::from_secs(3600),
        max_per_tenant: 5,
    };
    let pruned = store.prune_events(&retention, now).unwrap();
    assert_eq!(pruned, 16);
    let (_, events) = store.list_events(&EventFilter::default()).unwrap();
    let acme: Vec<_> = events
        .iter()
        .filter(|e| e.event.object.tenant == "acme")
        .map(|e| e.event.message.as_str())
        .collect();
    // The newest five stay.
    assert_eq!(acme, ["n15", "n16", "n17", "n18", "n19"]);
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event.object.tenant == "other")
            .count(),
        3
    );
    // A watch from before the pruned events is told to re-list.
    assert!(matches!(
        store.changes_since(Feed::Events, 0, 100).unwrap(),
        ChangesSince::Gone { .. }
    ));
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

#[test]
fn event_changes_follow_their_own_sequence() {
    let (_d, store) = open();
    record(&store, Event::normal(inst("acme", "bot"), "Scheduled", "a"));
    store.flush_events().unwrap();
    let ChangesSince::Changes { items, upto } = store.changes_since(Feed::Events, 0, 100).unwrap()
    else {
        panic!("gone")
    };
    assert_eq!((items.len(), upto), (1, 1));
    assert_eq!(items[0].type_, ChangeType::Added);
    record(&store, Event::normal(inst("acme", "bot"), "Scheduled", "a"));
    store.flush_events().unwrap();
    let ChangesSince::Changes { items, upto } = store.changes_since(Feed::Events, 1, 100).unwrap()
    else {
        panic!("gone")
    };
    assert_eq!((items.len(), upto), (1, 2));
    assert_eq!(items[0].type_, ChangeType::Modified);
    let v: serde_json::Value = serde_json::from_str(&items[0].json).unwrap();
    assert_eq!(v["count"], 2);
    assert_eq!(v["involvedObject"]["name"], "bot");
}
