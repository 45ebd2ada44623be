//! Instance revisions: what makes one, what it holds, what pruning keeps, the upgrade. The
//! tests that take a store run on every engine (in [`super::conformance`]).

use serde_json::json;

use super::sqlite::SqliteStore;
use super::{Store, WriteMode};
use crate::model::{ObjectKey, Resource};

fn res(v: serde_json::Value) -> Resource {
    Resource::from_value(v).unwrap()
}

fn apply(store: &dyn Store, items: Vec<serde_json::Value>) {
    let batch: Vec<_> = items
        .into_iter()
        .map(|v| (res(v), WriteMode::Apply))
        .collect();
    store.write(&batch, false).unwrap();
}

fn base() -> Vec<serde_json::Value> {
    vec![
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": "acme"}}),
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project", "metadata": {"name": "web", "tenant": "acme"}}),
    ]
}

fn secret(value: &str, fingerprint: &str) -> serde_json::Value {
    json!({"apiVersion": "clusterclaw.io/v1", "kind": "Secret",
        "metadata": {"name": "llm", "tenant": "acme"},
        "spec": {"data": {"anthropic": format!("ccs1:{value}")}, "keys": {"anthropic": fingerprint}}})
}

fn bot(name: &str, image: &str, with_secret: bool) -> serde_json::Value {
    let mut v = json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
        "metadata": {"name": name, "tenant": "acme", "project": "web"},
        "spec": {"image": image, "replicas": 2}});
    if with_secret {
        v["spec"]["env"] = json!({"KEY": {"secretRef": {"name": "llm", "key": "anthropic"}}});
    }
    v
}

fn uid(store: &dyn Store, name: &str) -> String {
    store
        .get(&ObjectKey::instance("acme", "web", name))
        .unwrap()
        .unwrap()
        .uid
}

fn messages(store: &dyn Store, name: &str) -> Vec<String> {
    store
        .config_revisions(&uid(store, name))
        .unwrap()
        .into_iter()
        .map(|r| r.message)
        .collect()
}

pub fn each_cause_makes_one_revision_per_reached_instance_and_the_same_content_none(
    store: &dyn Store,
) {
    let mut items = base();
    items.push(secret("v1", "hmac-sha256:one"));
    items.push(bot("user", "img:1", true));
    items.push(bot("plain", "img:1", false));
    apply(store, items);
    assert_eq!(messages(store, "user"), ["created"]);

    // The instance's own image.
    apply(store, vec![bot("user", "img:2", true)]);
    assert_eq!(
        messages(store, "user"),
        ["image changed to img:2", "created"]
    );
    // Same content again: no revision.
    apply(store, vec![bot("user", "img:2", true)]);
    assert_eq!(messages(store, "user").len(), 2);

    // A template reaches both.
    apply(
        store,
        vec![
            json!({"apiVersion": "clusterclaw.io/v1", "kind": "ConfigTemplate",
            "metadata": {"name": "default"},
            "spec": {"config": {"logging": {"level": "debug"}}}}),
        ],
    );
    assert_eq!(messages(store, "user")[0], "ConfigTemplate/default changed");
    assert_eq!(
        messages(store, "plain")[0],
        "ConfigTemplate/default changed"
    );
    assert_eq!(messages(store, "plain").len(), 2);

    // A secret's value revises its users only.
    apply(store, vec![secret("v2", "hmac-sha256:two")]);
    assert_eq!(messages(store, "user")[0], "secret acme/llm changed");
    assert_eq!(messages(store, "user").len(), 4);
    assert_eq!(messages(store, "plain").len(), 2);

    // The revision holds the value it was made with; status points at the newest.
    let u = uid(store, "user");
    let contents = store
        .revision_contents(&[(u.clone(), 3), (u.clone(), 4), (u.clone(), 99)])
        .unwrap();
    assert_eq!(contents.len(), 2);
    assert_eq!(contents[0].secrets[0].sealed, "ccs1:v1");
    assert_eq!(contents[0].secrets[0].fingerprint, "hmac-sha256:one");
    assert_eq!(contents[1].secrets[0].sealed, "ccs1:v2");
    assert_eq!(contents[1].image.as_deref(), Some("img:2"));
    assert_eq!(store.newest_revisions().unwrap()[&u], 4);
    let full = store.config_revision(&u, 1).unwrap().unwrap();
    assert_eq!(full.image.as_deref(), Some("img:1"));
    let spec = full.spec.unwrap();
    assert_eq!(spec["image"], "img:1");
    assert!(spec.get("replicas").is_none(), "{spec}");
    assert!(full.config.is_some());
    let o = store
        .get(&ObjectKey::instance("acme", "web", "user"))
        .unwrap()
        .unwrap();
    let Resource::OpenClawInstance(i) = o.resource().unwrap() else {
        panic!()
    };
    assert_eq!(i.status.unwrap().config_revision, Some(4));
    // Never a plaintext in a revision record.
    assert!(!format!("{:?}", store.config_revisions(&u).unwrap()).contains("v2\""));
}

pub fn pruning_keeps_the_revisions_replicas_and_the_rollout_need(store: &dyn Store) {
    let mut items = base();
    items.push(bot("bot", "img:0", false));
    apply(store, items);
    let key = ObjectKey::instance("acme", "web", "bot");
    store
        .update(&key, &mut |r| {
            if let Resource::OpenClawInstance(i) = r {
                let st = i.status.get_or_insert_with(Default::default);
                st.replica_status = vec![crate::model::ReplicaStatus {
                    name: "bot-0".into(),
                    target_revision: Some(2),
                    ..Default::default()
                }];
                st.rollout = Some(crate::model::RolloutStatus {
                    revision: 3,
                    stable_revision: Some(4),
                    ..Default::default()
                });
            }
            true
        })
        .unwrap();
    for n in 1..=super::revisions::KEEP_REVISIONS + 10 {
        apply(store, vec![bot("bot", &format!("img:{n}"), false)]);
    }
    let u = uid(store, "bot");
    let kept: Vec<u64> = store
        .config_revisions(&u)
        .unwrap()
        .iter()
        .map(|r| r.revision)
        .collect();
    let newest = super::revisions::KEEP_REVISIONS as u64 + 11;
    assert_eq!(kept[0], newest);
    for n in [2, 3, 4] {
        assert!(kept.contains(&n), "revision {n} is needed: {kept:?}");
    }
    assert!(!kept.contains(&1) && !kept.contains(&5));
    assert_eq!(kept.len(), super::revisions::KEEP_REVISIONS as usize + 3);
}

#[test]
fn upgrading_fills_in_the_newest_revision_and_makes_no_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        let store: &dyn Store = &store;
        let mut items = base();
        items.push(bot("bot", "img:1", false));
        apply(store, items);
        apply(store, vec![bot("bot", "img:2", false)]);
    }
    {
        // The database as schema version 4 left it.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "ALTER TABLE config_revisions DROP COLUMN image;
             ALTER TABLE config_revisions DROP COLUMN env;
             ALTER TABLE config_revisions DROP COLUMN resources;
             ALTER TABLE config_revisions DROP COLUMN secrets;
             ALTER TABLE config_revisions DROP COLUMN spec;
             ALTER TABLE config_revisions DROP COLUMN content_hash;
             DROP TABLE retained_volumes;
             PRAGMA user_version = 4;",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let store: &dyn Store = &store;
    let u = uid(store, "bot");
    let newest = store.config_revision(&u, 2).unwrap().unwrap();
    assert_eq!(newest.image.as_deref(), Some("img:2"));
    assert!(newest.spec.is_some());
    let older = store.config_revision(&u, 1).unwrap().unwrap();
    assert_eq!(older.image, None, "not known for revisions made before");
    apply(store, vec![bot("bot", "img:2", false)]);
    assert_eq!(store.config_revisions(&u).unwrap().len(), 2);
    assert!(store.deleted_volumes().unwrap().is_empty());
}

pub fn deleting_with_when_deleted_retain_keeps_the_volumes_listed(store: &dyn Store) {
    let mut items = base();
    let mut keep = bot("keep", "img:1", false);
    keep["spec"]["volumeRetention"] = json!({"whenDeleted": "Retain"});
    items.push(keep);
    items.push(bot("drop", "img:1", false));
    apply(store, items);
    for name in ["keep", "drop"] {
        let key = ObjectKey::instance("acme", "web", name);
        store
            .update(&key, &mut |r| {
                if let Resource::OpenClawInstance(i) = r {
                    let st = i.status.get_or_insert_with(Default::default);
                    st.replica_status = vec![crate::model::ReplicaStatus {
                        name: format!("{name}-0"),
                        host: Some("h1".into()),
                        ..Default::default()
                    }];
                    st.retained_volumes = vec![crate::model::RetainedVolume {
                        reason: None,
                        replica: format!("{name}-1"),
                        ordinal: 1,
                        host: "h2".into(),
                        since: None,
                    }];
                }
                true
            })
            .unwrap();
        store.delete(&key, None).unwrap();
    }
    let kept = store.deleted_volumes().unwrap();
    let names: Vec<(&str, &str)> = kept
        .iter()
        .map(|v| (v.replica.as_str(), v.host.as_str()))
        .collect();
    assert_eq!(names, [("keep-0", "h1"), ("keep-1", "h2")]);
    assert_eq!(kept[0].instance, "keep");

    // A new instance of the name takes them over as its own retained volumes.
    let mut again = bot("keep", "img:1", false);
    again["spec"]["replicas"] = json!(1);
    apply(store, vec![again]);
    assert!(store.deleted_volumes().unwrap().is_empty());
    let Resource::OpenClawInstance(i) = store
        .get(&ObjectKey::instance("acme", "web", "keep"))
        .unwrap()
        .unwrap()
        .resource()
        .unwrap()
    else {
        panic!()
    };
    let hosts: Vec<String> = i
        .status
        .unwrap()
        .retained_volumes
        .into_iter()
        .map(|v| v.host)
        .collect();
    assert_eq!(hosts, ["h1", "h2"]);
}

pub fn rotation_reseals_the_values_revisions_hold(store: &dyn Store) {
    let mut items = base();
    items.push(secret("v1", "hmac-sha256:one"));
    items.push(bot("user", "img:1", true));
    apply(store, items);
    apply(store, vec![secret("v2", "hmac-sha256:two")]);
    let count = store
        .reseal(&mut |v| Ok(format!("{}-again", v.sealed)))
        .unwrap();
    assert_eq!(count, 1, "counts the secrets' own values");
    let u = uid(store, "user");
    let held: Vec<String> = store
        .revision_contents(&[(u.clone(), 1), (u, 2)])
        .unwrap()
        .into_iter()
        .map(|c| c.secrets[0].sealed.clone())
        .collect();
    assert_eq!(held, ["ccs1:v1-again", "ccs1:v2-again"]);
    assert_eq!(store.sealed_values().unwrap()[0].sealed, "ccs1:v2-again");
}
