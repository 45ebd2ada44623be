//! The change log, events, sealed secret values and host volumes, on every engine (run by
//! [`super::conformance`]).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;

use super::volumes::ReportedVolume;
use super::{ChangeType, ChangesSince, Feed, Store, StoreError, WriteMode};
use crate::events::{Event, EventFilter, Retention, now_ms, record};
use crate::model::{Kind, ObjectKey, Resource};

fn res(v: serde_json::Value) -> Resource {
    Resource::from_value(v).unwrap()
}

fn apply(store: &dyn Store, items: Vec<serde_json::Value>) -> Result<u64, StoreError> {
    let batch: Vec<_> = items
        .into_iter()
        .map(|v| (res(v), WriteMode::Apply))
        .collect();
    Ok(store.write(&batch, false)?.index)
}

fn tenant(name: &str) -> serde_json::Value {
    json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": name}})
}

fn inst(tenant: &str, name: &str) -> ObjectKey {
    ObjectKey {
        kind: Kind::OpenClawInstance,
        tenant: tenant.into(),
        project: "p".into(),
        name: name.into(),
    }
}

fn changes(store: &dyn Store, feed: Feed, after: u64) -> (Vec<super::Change>, u64) {
    match store.changes_since(feed, after, 1000).unwrap() {
        ChangesSince::Changes { items, upto } => (items, upto),
        ChangesSince::Gone { oldest } => panic!("gone (oldest {oldest})"),
    }
}

pub fn object_changes_are_logged_with_their_type(store: &dyn Store) {
    let start = store.index();
    let created = apply(store, vec![tenant("acme")]).unwrap();
    let mut labelled = tenant("acme");
    labelled["metadata"]["labels"] = json!({"tier": "gold"});
    let modified = apply(store, vec![labelled]).unwrap();
    let deleted = store
        .delete(&ObjectKey::cluster(Kind::Tenant, "acme"), None)
        .unwrap();
    let (items, upto) = changes(store, Feed::Objects, start);
    assert_eq!(upto, deleted);
    let seen: Vec<(u64, ChangeType)> = items.iter().map(|c| (c.rv, c.type_)).collect();
    assert_eq!(
        seen,
        [
            (created, ChangeType::Added),
            (modified, ChangeType::Modified),
            (deleted, ChangeType::Deleted)
        ]
    );
    assert_eq!(items[1].labels["tier"], "gold");
    assert!(items[2].json.contains("\"acme\""), "{}", items[2].json);
    // From the newest index: nothing yet.
    let (items, upto) = changes(store, Feed::Objects, deleted);
    assert!(items.is_empty());
    assert_eq!(upto, deleted);
}

pub fn watchers_see_every_change_of_racing_writers_in_order(store: &dyn Store) {
    const WRITERS: usize = 4;
    const EACH: usize = 15;
    let start = store.index();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let mut seen: Vec<u64> = Vec::new();
    let mut names = BTreeSet::new();
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let done = &done;
            s.spawn(move || {
                for i in 0..EACH {
                    apply(store, vec![tenant(&format!("w{w}-{i}"))]).unwrap();
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        // A watcher that resumes from where each answer reached, as the watch API does.
        let mut after = start;
        loop {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst) == WRITERS;
            let (items, upto) = changes(store, Feed::Objects, after);
            for c in &items {
                assert!(
                    c.rv > after && c.rv <= upto,
                    "{} outside ({after}, {upto}]",
                    c.rv
                );
                seen.push(c.rv);
                names.insert(c.key.name.clone());
            }
            after = upto;
            if finished && after == store.index() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let total = (WRITERS * EACH) as u64;
    let expected: Vec<u64> = (start + 1..=start + total).collect();
    assert_eq!(seen, expected, "every index once, in order, none missing");
    assert_eq!(names.len(), WRITERS * EACH);
}

pub fn a_crash_loop_is_one_stored_event_that_counts(store: &dyn Store) {
    let index = store.index();
    for round in 0..5 {
        for _ in 0..3 {
            record(
                store,
                Event::warning(inst("acme", "bot"), "ContainerRestarted", "exit code 1")
                    .replica("bot-0")
                    .source("agent/h1"),
            );
        }
        record(
            store,
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
    assert_eq!(store.index(), index);
    // One object's events, newest limited.
    let one = EventFilter {
        object: Some((Kind::OpenClawInstance, "bot".into())),
        tenant: Some("acme".into()),
        limit: Some(2),
        ..EventFilter::default()
    };
    let (_, last) = store.list_events(&one).unwrap();
    assert_eq!(last.len(), 2);
    assert!(last[0].last_ms <= last[1].last_ms, "oldest first");
}

pub fn retention_prunes_by_age_and_by_count_per_tenant(store: &dyn Store) {
    let now = now_ms();
    for i in 0..20 {
        record(
            store,
            Event::normal(inst("acme", "bot"), "Scheduled", format!("n{i}")).at(now - 1000 + i),
        );
    }
    for i in 0..3 {
        record(
            store,
            Event::normal(inst("other", "bot"), "Scheduled", format!("n{i}")).at(now),
        );
    }
    record(
        store,
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

pub fn event_changes_follow_their_own_sequence(store: &dyn Store) {
    let mut seq = store.subscribe_events().expect("events are kept");
    record(store, Event::normal(inst("acme", "bot"), "Scheduled", "a"));
    store.flush_events().unwrap();
    assert_eq!(*seq.borrow_and_update(), 1, "the flush moved the sequence");
    let (items, upto) = changes(store, Feed::Events, 0);
    assert_eq!((items.len(), upto), (1, 1));
    assert_eq!(items[0].type_, ChangeType::Added);
    record(store, Event::normal(inst("acme", "bot"), "Scheduled", "a"));
    store.flush_events().unwrap();
    let (items, upto) = changes(store, Feed::Events, 1);
    assert_eq!((items.len(), upto), (1, 2));
    assert_eq!(items[0].type_, ChangeType::Modified);
    let v: serde_json::Value = serde_json::from_str(&items[0].json).unwrap();
    assert_eq!(v["count"], 2);
    assert_eq!(v["involvedObject"]["name"], "bot");
}

fn secret(values: serde_json::Value) -> serde_json::Value {
    let keys: serde_json::Map<String, serde_json::Value> = values
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (k.clone(), json!(format!("hmac-sha256:{k}"))))
        .collect();
    json!({"apiVersion": "clusterclaw.io/v1", "kind": "Secret",
        "metadata": {"name": "llm", "tenant": "acme"},
        "spec": {"data": values, "keys": keys}})
}

pub fn secret_values_are_kept_sealed_apart_and_go_with_their_secret(store: &dyn Store) {
    apply(store, vec![tenant("acme")]).unwrap();
    apply(
        store,
        vec![secret(json!({"a": "ccs1:one", "b": "ccs1:two"}))],
    )
    .unwrap();
    let key = ObjectKey {
        kind: Kind::Secret,
        tenant: "acme".into(),
        project: String::new(),
        name: "llm".into(),
    };
    let stored = store.get(&key).unwrap().unwrap();
    assert!(!stored.json.contains("ccs1:"), "{}", stored.json);
    let values: Vec<(String, String)> = store
        .sealed_values()
        .unwrap()
        .into_iter()
        .map(|v| (v.key, v.sealed))
        .collect();
    assert_eq!(
        values,
        [
            ("a".to_string(), "ccs1:one".to_string()),
            ("b".to_string(), "ccs1:two".to_string())
        ]
    );
    // A new set replaces the old one whole.
    apply(store, vec![secret(json!({"b": "ccs1:three"}))]).unwrap();
    let values: Vec<String> = store
        .sealed_values()
        .unwrap()
        .into_iter()
        .map(|v| format!("{}={}", v.key, v.sealed))
        .collect();
    assert_eq!(values, ["b=ccs1:three"]);
    // Plaintext never reaches the database, and the refused write changes nothing.
    let index = store.index();
    let err = apply(store, vec![secret(json!({"c": "plain"}))]).unwrap_err();
    assert!(err.to_string().contains("unsealed"), "{err}");
    assert_eq!(store.index(), index);
    assert_eq!(store.sealed_values().unwrap()[0].sealed, "ccs1:three");
    // Deleted with the secret.
    store.delete(&key, None).unwrap();
    assert!(store.sealed_values().unwrap().is_empty());
}

pub fn racing_writers_make_one_revision_each_without_gaps(store: &dyn Store) {
    const WRITERS: usize = 3;
    const EACH: usize = 6;
    apply(
        store,
        vec![
            tenant("acme"),
            json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project", "metadata": {"name": "web", "tenant": "acme"}}),
        ],
    )
    .unwrap();
    let bot = |image: &str| {
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
            "metadata": {"name": "bot", "tenant": "acme", "project": "web"},
            "spec": {"image": image, "replicas": 1}})
    };
    apply(store, vec![bot("img:start")]).unwrap();
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            s.spawn(move || {
                for i in 0..EACH {
                    apply(store, vec![bot(&format!("img:{w}-{i}"))]).unwrap();
                }
            });
        }
    });
    let o = store
        .get(&ObjectKey::instance("acme", "web", "bot"))
        .unwrap()
        .unwrap();
    let revisions: Vec<u64> = store
        .config_revisions(&o.uid)
        .unwrap()
        .iter()
        .map(|r| r.revision)
        .collect();
    let total = (WRITERS * EACH + 1) as u64;
    let expected: Vec<u64> = (1..=total).rev().collect();
    assert_eq!(revisions, expected);
    assert_eq!(store.newest_revisions().unwrap()[&o.uid], total);
    let (newest, config) = &store.current_configs().unwrap()[&o.uid];
    assert_eq!(*newest, total);
    assert!(config.contains("18789"), "{config}");
    let Resource::OpenClawInstance(i) = o.resource().unwrap() else {
        panic!()
    };
    assert_eq!(i.status.unwrap().config_revision, Some(total));
}

fn volume(instance: &str, replica: &str) -> ReportedVolume {
    ReportedVolume {
        name: format!("cc-acme-web-{replica}"),
        tenant: "acme".into(),
        project: "web".into(),
        instance: instance.into(),
        replica: replica.into(),
    }
}

pub fn host_volumes_are_kept_and_their_removal_asked_for(store: &dyn Store) {
    let index = store.index();
    let listed = vec![volume("bot", "bot-0"), volume("old", "old-0")];
    assert!(
        store
            .record_host_volumes("h1", &listed, "2026-01-01T00:00:00Z")
            .unwrap()
    );
    assert!(
        !store
            .record_host_volumes("h1", &listed, "2026-01-01T00:00:09Z")
            .unwrap(),
        "the same list changes nothing"
    );
    store
        .record_host_volumes("h2", &[volume("bot", "bot-1")], "2026-01-01T00:00:01Z")
        .unwrap();
    assert_eq!(store.index(), index, "a reported list moves no index");
    let all = store.host_volumes(None).unwrap();
    let names: Vec<(&str, &str)> = all
        .iter()
        .map(|v| (v.host.as_str(), v.volume.name.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("h1", "cc-acme-web-bot-0"),
            ("h1", "cc-acme-web-old-0"),
            ("h2", "cc-acme-web-bot-1")
        ]
    );
    assert_eq!(all[0].first_seen, "2026-01-01T00:00:00Z");

    store
        .mark_orphaned_volumes(&[(
            "h1".into(),
            "cc-acme-web-old-0".into(),
            Some("2026-01-01T00:01:00Z".into()),
        )])
        .unwrap();
    let old = store.host_volumes(Some("h1")).unwrap()[1].clone();
    assert_eq!(old.orphaned_since.as_deref(), Some("2026-01-01T00:01:00Z"));

    // Asking for a removal moves the index; asking again keeps the first ask.
    let (v, asked) = store
        .request_volume_deletion(
            "h1",
            "cc-acme-web-old-0",
            "user:ops",
            "2026-01-01T00:02:00Z",
        )
        .unwrap();
    assert_eq!(v.unwrap().delete_reason.as_deref(), Some("user:ops"));
    assert!(asked > index);
    let (v, _) = store
        .request_volume_deletion(
            "h1",
            "cc-acme-web-old-0",
            "retention",
            "2026-01-01T00:03:00Z",
        )
        .unwrap();
    let v = v.unwrap();
    assert_eq!(
        (v.delete_reason.as_deref(), v.delete_requested.as_deref()),
        (Some("user:ops"), Some("2026-01-01T00:02:00Z"))
    );
    let (none, _) = store
        .request_volume_deletion("h1", "no-such", "user:ops", "2026-01-01T00:02:00Z")
        .unwrap();
    assert!(none.is_none());
    assert_eq!(
        store.volume_deletions().unwrap(),
        [("h1".to_string(), "cc-acme-web-old-0".to_string())]
    );

    // The host no longer lists it: gone, and the index moves (the host is no longer asked).
    let before = store.index();
    assert!(
        store
            .record_host_volumes("h1", &[volume("bot", "bot-0")], "2026-01-01T00:04:00Z")
            .unwrap()
    );
    assert!(store.index() > before);
    assert!(store.volume_deletions().unwrap().is_empty());
    store.forget_host_volumes("h2").unwrap();
    assert_eq!(store.host_volumes(None).unwrap().len(), 1);
}
