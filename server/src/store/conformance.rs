//! One suite of store behaviour, run unchanged against every engine: SQLite always, PostgreSQL
//! where a server is found (`tests/postgres-setup.sh`; `CLUSTERCLAW_TEST_POSTGRES_URL`, else
//! the URL that script writes to `target/postgres-url`). Without one the PostgreSQL half skips
//! with the reason printed, unless `CI=true`, where it fails.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::json;

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::{
    JoinRefusal, LabelRequirement, ListFilter, Outcome, Store, StoreError, TokenKind, TokenRecord,
    WriteMode, WriteSummary,
};
use crate::audit::AuditEntry;
use crate::model::{Kind, ObjectKey, Resource};

/// A store under test, and what must live as long as it (a directory, a schema to drop).
pub struct Subject {
    pub store: Arc<dyn Store>,
    _keep: Box<dyn std::any::Any>,
}

/// A new SQLite store in a temporary directory.
pub fn sqlite() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("clusterclaw.db")).unwrap();
    Subject {
        store: Arc::new(store),
        _keep: Box::new(dir),
    }
}

/// The URL of the test server: `CLUSTERCLAW_TEST_POSTGRES_URL`, else what
/// `tests/postgres-setup.sh` wrote to `target/postgres-url`. When neither exists the script is
/// run once (it installs and starts a throwaway cluster where it may), so a plain
/// `cargo test --workspace` on a fresh machine needs no step of its own.
pub fn postgres_url() -> Option<String> {
    static URL: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        if let Some(url) = known_postgres_url() {
            return Some(url);
        }
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/postgres-setup.sh");
        eprintln!(
            "no PostgreSQL test server yet; running {}",
            script.display()
        );
        let ok = std::process::Command::new(&script)
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "{} could not make a PostgreSQL server ready",
                script.display()
            );
        }
        known_postgres_url()
    })
    .clone()
}

fn known_postgres_url() -> Option<String> {
    if let Ok(url) = std::env::var("CLUSTERCLAW_TEST_POSTGRES_URL")
        && !url.trim().is_empty()
    {
        return Some(url.trim().to_string());
    }
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/postgres-url");
    std::fs::read_to_string(file)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Skips (prints why and returns `None`) or, under `CI=true`, fails.
fn no_postgres(why: String) -> Option<PgSchema> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("PostgreSQL tests cannot run: {why}");
    }
    eprintln!("skipped: {why} (run tests/postgres-setup.sh)");
    None
}

/// A schema of its own in the test database, dropped at the end.
pub struct PgSchema {
    pub config: postgres::Config,
    pub name: String,
}

impl PgSchema {
    /// A new empty schema; `None` (skipped) when no server answers.
    pub fn new() -> Option<PgSchema> {
        let Some(url) = postgres_url() else {
            return no_postgres(
                "no PostgreSQL test server: CLUSTERCLAW_TEST_POSTGRES_URL is unset and target/postgres-url is missing".into(),
            );
        };
        let config: postgres::Config = match url.parse() {
            Ok(c) => c,
            Err(e) => return no_postgres(format!("{url} is not a PostgreSQL URL: {e}")),
        };
        let mut admin = match config.connect(postgres::NoTls) {
            Ok(c) => c,
            Err(e) => {
                return no_postgres(format!(
                    "cannot connect to {}: {e}",
                    super::postgres::redact(&url)
                ));
            }
        };
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .unwrap();
        let mut config = config;
        config.options(&format!("-c search_path={name}"));
        Some(PgSchema { config, name })
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let mut config = self.config.clone();
        config.options("");
        if let Ok(mut c) = config.connect(postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

/// A new PostgreSQL store in a schema of its own, or `None` (skipped).
pub fn postgres() -> Option<Subject> {
    let schema = PgSchema::new()?;
    let store = PgStore::open_config(schema.config.clone()).unwrap();
    Some(Subject {
        store: Arc::new(store),
        _keep: Box::new(schema),
    })
}

use super::feed_tests::*;
use super::revision_tests::*;

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[test]
                fn $name() {
                    let s = super::sqlite();
                    super::$name(&*s.store);
                }
            )*
        }
        mod on_postgres {
            $(
                #[test]
                fn $name() {
                    let Some(s) = super::postgres() else { return };
                    super::$name(&*s.store);
                }
            )*
        }
    };
}

suite!(
    batch_is_ordered_parents_first_and_bumps_the_index_once,
    status_only_writes_move_the_index_but_not_the_desired_index,
    a_failing_item_writes_nothing,
    dry_run_reports_without_writing,
    stale_resource_version_conflicts,
    a_batch_delete_is_all_or_nothing_children_first,
    delete_refuses_parents_with_children,
    list_filters_and_orders,
    update_keeps_generation_and_bumps_the_index,
    decoded_lists_follow_every_write,
    kind_fingerprints_count_the_kind_and_move_with_each_of_its_writes,
    join_tokens_are_checked_and_used_up,
    enrolling_uses_the_token_and_creates_the_host_together,
    enrolling_many_hosts_at_once_refuses_each_alone,
    reads_report_the_index_of_their_snapshot,
    quotas_are_checked_against_the_whole_batch,
    audit_records_chain_and_commit_with_their_change,
    heartbeats_keep_the_newest_time,
    server_replicas_register_refresh_and_are_pruned,
    console_sessions_are_kept_touched_closed_and_pruned,
    racing_writers_get_one_index_each,
    readers_never_see_a_gap_in_the_index,
    racing_writers_never_overrun_a_quota,
    one_of_racing_conditional_updates_wins,
    racing_enrollments_use_a_token_no_more_than_allowed,
    the_audit_chain_stays_intact_under_concurrent_writes,
    each_cause_makes_one_revision_per_reached_instance_and_the_same_content_none,
    pruning_keeps_the_revisions_replicas_and_the_rollout_need,
    deleting_with_when_deleted_retain_keeps_the_volumes_listed,
    rotation_reseals_the_values_revisions_hold,
    racing_writers_make_one_revision_each_without_gaps,
    secret_values_are_kept_sealed_apart_and_go_with_their_secret,
    object_changes_are_logged_with_their_type,
    watchers_see_every_change_of_racing_writers_in_order,
    a_crash_loop_is_one_stored_event_that_counts,
    retention_prunes_by_age_and_by_count_per_tenant,
    event_changes_follow_their_own_sequence,
    host_volumes_are_kept_and_their_removal_asked_for,
);

fn res(v: serde_json::Value) -> Resource {
    Resource::from_value(v).unwrap()
}

fn tenant(name: &str) -> Resource {
    res(json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": name}}))
}

fn tenant_with_quota(name: &str, instances: i64) -> Resource {
    res(
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": name},
               "spec": {"quota": {"instances": instances}}}),
    )
}

fn project(t: &str, name: &str) -> Resource {
    res(
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project", "metadata": {"name": name, "tenant": t}}),
    )
}

fn instance(t: &str, p: &str, name: &str, replicas: i64, region: &str) -> Resource {
    res(json!({
        "apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
        "metadata": {"name": name, "tenant": t, "project": p, "labels": {"region": region}},
        "spec": {"version": "2026.7.1", "replicas": replicas}
    }))
}

fn host(name: &str) -> Resource {
    res(
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Host", "metadata": {"name": name},
               "spec": {"hostname": name, "capacity": {"cpu": "4", "memory": "8Gi"}}}),
    )
}

/// Tenant `acme`, its project `web` and one single-replica instance per name, in one apply.
fn acme_web_with(store: &dyn Store, instances: &[&str]) {
    let mut items = vec![tenant("acme"), project("acme", "web")];
    items.extend(
        instances
            .iter()
            .map(|n| instance("acme", "web", n, 1, "eu")),
    );
    apply(store, items).unwrap();
}

fn apply(store: &dyn Store, items: Vec<Resource>) -> Result<WriteSummary, StoreError> {
    let batch: Vec<_> = items.into_iter().map(|r| (r, WriteMode::Apply)).collect();
    store.write(&batch, false)
}

fn token(id: &str, kind: TokenKind, expires_at: Option<i64>, uses: Option<i64>) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        name: id.into(),
        kind,
        role: String::new(),
        tenant: None,
        project: None,
        created_at: 100,
        expires_at,
        uses_remaining: uses,
        revoked: false,
        hash: format!("hash-{id}"),
    }
}

fn entry(action: &str) -> AuditEntry {
    AuditEntry::now(
        crate::audit::AuditPrincipal::new("u1", "tester"),
        action,
        crate::audit::AuditResult::ok(200),
    )
}

pub fn batch_is_ordered_parents_first_and_bumps_the_index_once(store: &dyn Store) {
    let mut rx = store.subscribe();
    let s = apply(
        store,
        vec![
            instance("acme", "web", "bot", 2, "eu"),
            project("acme", "web"),
            tenant("acme"),
        ],
    )
    .unwrap();
    assert_eq!(s.index, 1);
    assert_eq!(store.index(), 1);
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 1);
    assert!(s.results.iter().all(|r| r.outcome == Outcome::Created));
    assert_eq!(
        s.results[0].key,
        ObjectKey::instance("acme", "web", "bot"),
        "results follow request order"
    );
    assert!(s.results.iter().all(|r| r.object.resource_version == 1));

    let again = apply(
        store,
        vec![
            tenant("acme"),
            project("acme", "web"),
            instance("acme", "web", "bot", 2, "eu"),
        ],
    )
    .unwrap();
    assert!(
        again
            .results
            .iter()
            .all(|r| r.outcome == Outcome::Unchanged)
    );
    assert_eq!(again.index, 1, "an unchanged apply does not move the index");

    let changed = apply(store, vec![instance("acme", "web", "bot", 3, "eu")]).unwrap();
    assert_eq!(changed.results[0].outcome, Outcome::Configured);
    assert_eq!(changed.index, 2);
    let got = store
        .get(&ObjectKey::instance("acme", "web", "bot"))
        .unwrap()
        .unwrap();
    assert_eq!((got.generation, got.resource_version), (2, 2));
    assert_eq!(got.resource().unwrap().metadata().resource_version, Some(2));
}

pub fn status_only_writes_move_the_index_but_not_the_desired_index(store: &dyn Store) {
    apply(
        store,
        vec![
            tenant("acme"),
            project("acme", "web"),
            instance("acme", "web", "bot", 1, "eu"),
        ],
    )
    .unwrap();
    let host = res(json!({"apiVersion": "clusterclaw.io/v1", "kind": "Host",
        "metadata": {"name": "h1"}, "spec": {}}));
    apply(store, vec![host]).unwrap();
    let desired = store.desired_index();
    assert_eq!(desired, 1, "a host's write reaches no assignments");
    let mut rx = store.subscribe_desired();
    let key = ObjectKey::instance("acme", "web", "bot");
    let set = |store: &dyn Store, f: &dyn Fn(&mut crate::model::ReplicaStatus)| {
        store
            .update(&key, &mut |r| {
                let Resource::OpenClawInstance(i) = r else {
                    return false;
                };
                let st = i.status.get_or_insert_with(Default::default);
                if st.replica_status.is_empty() {
                    st.replica_status.push(crate::model::ReplicaStatus {
                        name: "bot-0".into(),
                        ..Default::default()
                    });
                }
                f(&mut st.replica_status[0]);
                true
            })
            .unwrap()
    };
    // Placement is desired state.
    let placed = set(store, &|r| r.host = Some("h1".into())).unwrap();
    assert_eq!(store.desired_index(), placed);
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();
    // Observed state: the index moves, the desired index does not, nothing wakes.
    let observed = set(store, &|r| {
        r.state = crate::model::ReplicaState::Ready;
        r.restarts = 2;
        r.ready_since = Some("2026-01-01T00:00:00.000Z".into());
    })
    .unwrap();
    assert!(observed > placed);
    assert_eq!(store.desired_index(), placed);
    assert!(!rx.has_changed().unwrap());
    let h1 = ObjectKey::cluster(Kind::Host, "h1");
    store
        .update(&h1, &mut |r| {
            let Resource::Host(h) = r else { return false };
            h.status.get_or_insert_with(Default::default).message = Some("busy".into());
            true
        })
        .unwrap()
        .unwrap();
    assert_eq!(store.desired_index(), placed);
    assert!(!rx.has_changed().unwrap());
    // A new target is desired again; so is a spec change through a write.
    let targeted = set(store, &|r| r.target_revision = Some(2)).unwrap();
    assert_eq!(store.desired_index(), targeted);
    assert!(rx.has_changed().unwrap());
    let scaled = apply(store, vec![instance("acme", "web", "bot", 2, "eu")]).unwrap();
    assert_eq!(store.desired_index(), scaled.index);
    assert_eq!(store.index(), scaled.index);
}

pub fn a_failing_item_writes_nothing(store: &dyn Store) {
    apply(store, vec![tenant("acme"), project("acme", "web")]).unwrap();
    let err = apply(
        store,
        vec![
            instance("acme", "web", "a", 1, "eu"),
            instance("acme", "nope", "b", 1, "eu"),
        ],
    )
    .unwrap_err();
    match err {
        StoreError::InBatch { index: 1, source } => {
            assert!(
                matches!(*source, StoreError::ParentMissing { .. }),
                "{source}"
            )
        }
        other => panic!("{other}"),
    }
    assert_eq!(store.index(), 1);
    assert!(
        store
            .get(&ObjectKey::instance("acme", "web", "a"))
            .unwrap()
            .is_none()
    );
    let dup = apply(store, vec![tenant("x"), tenant("x")]).unwrap_err();
    assert!(
        matches!(dup, StoreError::Invalid(ref p) if p[0].field == "items[1]"),
        "{dup}"
    );
}

pub fn dry_run_reports_without_writing(store: &dyn Store) {
    let s = store
        .write(&[(tenant("acme"), WriteMode::Apply)], true)
        .unwrap();
    assert_eq!(s.results[0].outcome, Outcome::Created);
    assert_eq!((s.index, store.index()), (0, 0));
    assert!(
        store
            .get(&ObjectKey::cluster(Kind::Tenant, "acme"))
            .unwrap()
            .is_none()
    );
}

pub fn stale_resource_version_conflicts(store: &dyn Store) {
    apply(store, vec![tenant("acme")]).unwrap();
    apply(store, vec![tenant("other")]).unwrap();
    let mut stale = tenant("acme");
    stale.metadata_mut().labels.insert("a".into(), "b".into());
    stale.metadata_mut().resource_version = Some(7);
    assert!(matches!(
        apply(store, vec![stale.clone()]),
        Err(StoreError::InBatch { .. })
    ));
    stale.metadata_mut().resource_version = Some(1);
    assert_eq!(
        apply(store, vec![stale]).unwrap().results[0].outcome,
        Outcome::Configured
    );
    assert!(matches!(
        store.delete(&ObjectKey::cluster(Kind::Tenant, "other"), Some(1)),
        Err(StoreError::Conflict {
            given: 1,
            current: 2,
            ..
        })
    ));
}

pub fn a_batch_delete_is_all_or_nothing_children_first(store: &dyn Store) {
    apply(
        store,
        vec![
            tenant("acme"),
            project("acme", "web"),
            project("acme", "ops"),
            instance("acme", "web", "a", 1, "eu"),
            instance("acme", "web", "b", 1, "eu"),
            instance("acme", "ops", "c", 1, "eu"),
        ],
    )
    .unwrap();
    let exists = |k: &ObjectKey| store.get(k).unwrap().is_some();
    let (a, b, c) = (
        ObjectKey::instance("acme", "web", "a"),
        ObjectKey::instance("acme", "web", "b"),
        ObjectKey::instance("acme", "ops", "c"),
    );
    let (web, ops) = (
        ObjectKey::project("acme", "web"),
        ObjectKey::project("acme", "ops"),
    );
    let acme = ObjectKey::cluster(Kind::Tenant, "acme");
    let before = store.index();
    // The tenant still has project ops: nothing is deleted, the refusal names position 4.
    let refused = store.delete_batch(
        &[a.clone(), b.clone(), web.clone(), acme.clone()],
        false,
        false,
        None,
    );
    match refused {
        Err(StoreError::InBatch { index: 3, source }) => assert!(
            matches!(
                *source,
                StoreError::HasChildren {
                    child: "projects",
                    count: 1,
                    ..
                }
            ),
            "{source}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(exists(&a) && exists(&b) && exists(&web));
    assert_eq!(store.index(), before);
    // A missing object refuses the batch unless missing ones are skipped.
    let ghost = ObjectKey::instance("acme", "web", "ghost");
    assert!(matches!(
        store.delete_batch(&[a.clone(), ghost.clone()], false, false, None),
        Err(StoreError::InBatch { index: 1, .. })
    ));
    assert!(exists(&a));
    // A dry run checks and changes nothing.
    let all = [
        a.clone(),
        b.clone(),
        c.clone(),
        ghost,
        web.clone(),
        ops.clone(),
        acme.clone(),
    ];
    let (dry, _) = store.delete_batch(&all, true, true, None).unwrap();
    assert_eq!(dry.index, before);
    assert_eq!(dry.deleted, [true, true, true, false, true, true, true]);
    assert!(exists(&a) && exists(&acme));
    // The whole family at once, children first: one index bump.
    let (done, _) = store.delete_batch(&all, true, false, None).unwrap();
    assert_eq!(done.index, before + 1);
    assert_eq!(done.deleted, [true, true, true, false, true, true, true]);
    assert!(all.iter().all(|k| !exists(k)));
}

pub fn delete_refuses_parents_with_children(store: &dyn Store) {
    apply(
        store,
        vec![
            tenant("acme"),
            project("acme", "web"),
            instance("acme", "web", "bot", 1, "eu"),
        ],
    )
    .unwrap();
    let t = ObjectKey::cluster(Kind::Tenant, "acme");
    assert!(matches!(
        store.delete(&t, None),
        Err(StoreError::HasChildren {
            count: 1,
            child: "projects",
            ..
        })
    ));
    assert!(matches!(
        store.delete(&ObjectKey::project("acme", "web"), None),
        Err(StoreError::HasChildren {
            child: "instances",
            ..
        })
    ));
    let before = store.index();
    assert_eq!(
        store
            .delete(&ObjectKey::instance("acme", "web", "bot"), None)
            .unwrap(),
        before + 1
    );
    store
        .delete(&ObjectKey::project("acme", "web"), None)
        .unwrap();
    store.delete(&t, None).unwrap();
    assert!(matches!(
        store.delete(&t, None),
        Err(StoreError::NotFound(_))
    ));
}

pub fn list_filters_and_orders(store: &dyn Store) {
    apply(
        store,
        vec![
            tenant("b"),
            tenant("a"),
            project("a", "p"),
            project("b", "p"),
        ],
    )
    .unwrap();
    apply(
        store,
        vec![
            instance("b", "p", "x", 1, "eu"),
            instance("a", "p", "z", 1, "us"),
            instance("a", "p", "y", 1, "eu"),
        ],
    )
    .unwrap();
    let names = |f: &ListFilter| {
        store
            .list(f)
            .unwrap()
            .into_iter()
            .map(|o| o.key.to_string())
            .collect::<Vec<_>>()
    };
    let mut f = ListFilter::all(Kind::OpenClawInstance);
    assert_eq!(
        names(&f),
        [
            "openclawinstance/a/p/y",
            "openclawinstance/a/p/z",
            "openclawinstance/b/p/x"
        ]
    );
    f.labels = vec![LabelRequirement::Equals("region".into(), "eu".into())];
    assert_eq!(
        names(&f),
        ["openclawinstance/a/p/y", "openclawinstance/b/p/x"]
    );
    f.tenant = Some("a".into());
    f.project = Some("p".into());
    assert_eq!(names(&f), ["openclawinstance/a/p/y"]);
    assert_eq!(
        names(&ListFilter::all(Kind::Tenant)),
        ["tenant/a", "tenant/b"]
    );
}

pub fn update_keeps_generation_and_bumps_the_index(store: &dyn Store) {
    apply(
        store,
        vec![
            tenant("acme"),
            project("acme", "web"),
            instance("acme", "web", "bot", 1, "eu"),
        ],
    )
    .unwrap();
    let key = ObjectKey::instance("acme", "web", "bot");
    let rv = store
        .update(&key, &mut |r| {
            if let Resource::OpenClawInstance(i) = r {
                i.status.get_or_insert_with(Default::default).replicas = 1;
            }
            true
        })
        .unwrap();
    assert_eq!(rv, Some(2));
    let noop = store.update(&key, &mut |_| true).unwrap();
    assert_eq!(noop, None, "an update that changes nothing writes nothing");
    let o = store.get(&key).unwrap().unwrap();
    assert_eq!((o.generation, o.resource_version), (1, 2));
    assert_eq!(store.resource_version(&key).unwrap(), Some(2));
    assert_eq!(
        store
            .resource_version(&ObjectKey::instance("acme", "web", "gone"))
            .unwrap(),
        None
    );
    // A later apply of the same spec keeps the status.
    let s = apply(store, vec![instance("acme", "web", "bot", 2, "eu")]).unwrap();
    let Resource::OpenClawInstance(i) = s.results[0].object.resource().unwrap() else {
        panic!()
    };
    assert_eq!(i.status.map(|s| s.replicas), Some(1));
    let many = store
        .update_many(
            &[key.clone(), ObjectKey::instance("acme", "web", "gone")],
            &mut |_| false,
        )
        .unwrap();
    assert_eq!(many, None);
}

pub fn kind_fingerprints_count_the_kind_and_move_with_each_of_its_writes(store: &dyn Store) {
    let of = |kind| store.kind_fingerprint(kind).unwrap();
    let deletions = |kind| store.kind_deletions(kind).unwrap().expect("kept");
    assert_eq!(deletions(Kind::OpenClawInstance), 0);
    let highest = |kind| {
        store
            .versions(kind)
            .unwrap()
            .iter()
            .map(|(_, _, rv)| *rv)
            .max()
            .unwrap_or(0)
    };
    assert_eq!(
        of(Kind::OpenClawInstance),
        (0, 0),
        "nothing of the kind yet"
    );
    acme_web_with(store, &["a", "b", "c"]);
    let created = of(Kind::OpenClawInstance);
    assert_eq!(created, (3, highest(Kind::OpenClawInstance)));
    assert_eq!(of(Kind::Tenant), (1, highest(Kind::Tenant)));

    // Another kind's write leaves it where it was.
    apply(store, vec![tenant("beta")]).unwrap();
    assert_eq!(of(Kind::OpenClawInstance), created);
    assert_eq!(of(Kind::Tenant).0, 2);

    // A status-only update moves the highest version, not the count.
    let a = ObjectKey::instance("acme", "web", "a");
    store
        .update(&a, &mut |r| {
            if let Resource::OpenClawInstance(i) = r {
                i.status.get_or_insert_with(Default::default).replicas = 1;
            }
            true
        })
        .unwrap()
        .expect("written");
    let updated = of(Kind::OpenClawInstance);
    assert_eq!(updated, (3, store.resource_version(&a).unwrap().unwrap()));
    assert!(updated.1 > created.1);

    // Deleting the newest object moves the count, even though the highest version ever
    // written stays.
    assert_eq!(
        deletions(Kind::OpenClawInstance),
        0,
        "writes are not deletions"
    );
    store.delete(&a, None).unwrap();
    assert_eq!(deletions(Kind::OpenClawInstance), 1);
    assert_eq!(deletions(Kind::Tenant), 0);
    let deleted = of(Kind::OpenClawInstance);
    assert_eq!(deleted.0, 2);
    assert_ne!(deleted, updated);
    // A delete and a create together move the highest version.
    store
        .delete(&ObjectKey::instance("acme", "web", "b"), None)
        .unwrap();
    apply(store, vec![instance("acme", "web", "d", 1, "eu")]).unwrap();
    let replaced = of(Kind::OpenClawInstance);
    assert_eq!(deletions(Kind::OpenClawInstance), 2);
    assert_eq!(replaced, (2, highest(Kind::OpenClawInstance)));
    assert!(replaced.1 > deleted.1);
    assert_eq!(
        store.versions(Kind::OpenClawInstance).unwrap().len() as u64,
        replaced.0
    );
}

pub fn decoded_lists_follow_every_write(store: &dyn Store) {
    acme_web_with(store, &["b", "a"]);
    let mut versions = store.versions(Kind::OpenClawInstance).unwrap();
    versions.sort();
    let names: Vec<&str> = versions.iter().map(|(k, _, _)| k.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let listed = store
        .list(&ListFilter::all(Kind::OpenClawInstance))
        .unwrap();
    for (o, (k, uid, rv)) in listed.iter().zip(&versions) {
        assert_eq!((&o.key, &o.uid, o.resource_version), (k, uid, *rv));
    }
    let replicas = |store: &dyn Store| -> Vec<(String, i64)> {
        super::decoded::list_decoded(store, Kind::OpenClawInstance)
            .unwrap()
            .iter()
            .map(|d| match d.resource.as_ref().unwrap() {
                Resource::OpenClawInstance(i) => (d.key.name.clone(), i.spec.replicas),
                _ => panic!("not an instance"),
            })
            .collect()
    };
    assert_eq!(replicas(store), [("a".into(), 1), ("b".into(), 1)]);
    apply(store, vec![instance("acme", "web", "b", 3, "eu")]).unwrap();
    store
        .delete(&ObjectKey::instance("acme", "web", "a"), None)
        .unwrap();
    apply(store, vec![instance("acme", "web", "c", 2, "eu")]).unwrap();
    assert_eq!(replicas(store), [("b".into(), 3), ("c".into(), 2)]);

    // An update hands the objects it wrote to the cache: the next look decodes nothing, and
    // what it gets is what a read of the rows decodes to.
    let Some(cache) = store.decoded_cache() else {
        return;
    };
    let keys = [
        ObjectKey::instance("acme", "web", "b"),
        ObjectKey::instance("acme", "web", "c"),
    ];
    fn add_replicas(r: &mut Resource, n: i64) -> bool {
        match r {
            Resource::OpenClawInstance(i) => {
                i.spec.replicas += n;
                true
            }
            _ => false,
        }
    }
    store
        .update_many(&keys, &mut |r| add_replicas(r, 1))
        .unwrap()
        .expect("both changed");
    store
        .update(&keys[0], &mut |r| add_replicas(r, 10))
        .unwrap()
        .expect("changed");
    let (listed, looked) = cache.list_counted(store, Kind::OpenClawInstance).unwrap();
    assert_eq!(looked.decoded, 0, "written objects are not decoded again");
    assert_eq!(replicas(store), [("b".into(), 14), ("c".into(), 3)]);
    for d in listed.iter() {
        let row = store.get(&d.key).unwrap().unwrap();
        assert_eq!(d.resource_version, row.resource_version);
        assert_eq!(d.resource.as_ref().unwrap(), &row.resource().unwrap());
    }
}

pub fn join_tokens_are_checked_and_used_up(store: &dyn Store) {
    store
        .insert_token(&token("once", TokenKind::Join, Some(1000), Some(1)))
        .unwrap();
    store
        .insert_token(&token("api", TokenKind::Api, None, None))
        .unwrap();
    store
        .insert_token(&token("old", TokenKind::Join, Some(50), None))
        .unwrap();
    let refused = |h: &str, now| match store.consume_join_token(h, now) {
        Err(StoreError::JoinRefused(r)) => Some(r),
        _ => None,
    };
    assert_eq!(refused("hash-nope", 200), Some(JoinRefusal::Unknown));
    assert_eq!(refused("hash-api", 200), Some(JoinRefusal::NotAJoinToken));
    assert_eq!(refused("hash-old", 200), Some(JoinRefusal::Expired));
    assert_eq!(
        store
            .consume_join_token("hash-once", 200)
            .unwrap()
            .uses_remaining,
        Some(0)
    );
    assert_eq!(refused("hash-once", 200), Some(JoinRefusal::UsedUp));
    assert!(store.revoke_token("api").unwrap());
    assert!(!store.revoke_token("missing").unwrap());
    assert!(store.token_by_hash("hash-api").unwrap().unwrap().revoked);
    assert_eq!(store.list_tokens().unwrap().len(), 3);
    assert_eq!(
        store.index(),
        0,
        "tokens are not objects and do not move the index"
    );
}

pub fn enrolling_uses_the_token_and_creates_the_host_together(store: &dyn Store) {
    store
        .insert_token(&token("twice", TokenKind::Join, Some(1000), Some(2)))
        .unwrap();
    let uses = |store: &dyn Store| {
        store
            .token_by_hash("hash-twice")
            .unwrap()
            .unwrap()
            .uses_remaining
    };
    let created = store.enroll_host("hash-twice", 200, host("h1")).unwrap();
    assert_eq!(created.key, ObjectKey::cluster(Kind::Host, "h1"));
    assert!(!created.uid.is_empty());
    assert_eq!((created.resource_version, store.index()), (1, 1));
    assert_eq!(uses(store), Some(1));

    // The name is taken: nothing is created and the token keeps its use.
    let err = store
        .enroll_host("hash-twice", 200, host("h1"))
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err}");
    assert_eq!((uses(store), store.index()), (Some(1), 1));

    // A refused token creates nothing.
    for (hash, now, refusal) in [
        ("hash-nope", 200, JoinRefusal::Unknown),
        ("hash-twice", 5000, JoinRefusal::Expired),
    ] {
        let err = store.enroll_host(hash, now, host("h2")).unwrap_err();
        assert!(
            matches!(err, StoreError::JoinRefused(r) if r == refusal),
            "{err}"
        );
    }
    assert!(
        store
            .get(&ObjectKey::cluster(Kind::Host, "h2"))
            .unwrap()
            .is_none()
    );
    store.enroll_host("hash-twice", 200, host("h2")).unwrap();
    assert_eq!(uses(store), Some(0));
    assert!(matches!(
        store.enroll_host("hash-twice", 200, host("h3")),
        Err(StoreError::JoinRefused(JoinRefusal::UsedUp))
    ));
    assert!(matches!(
        store.enroll_host("hash-twice", 200, tenant("t")),
        Err(StoreError::Backend(_))
    ));
}

pub fn enrolling_many_hosts_at_once_refuses_each_alone(store: &dyn Store) {
    store
        .insert_token(&token("thrice", TokenKind::Join, Some(1000), Some(3)))
        .unwrap();
    store
        .enroll_host("hash-thrice", 200, host("taken"))
        .unwrap();
    let before = store.index();
    let out = store.enroll_hosts(vec![
        ("hash-thrice".into(), 200, host("a")),
        ("hash-thrice".into(), 200, host("taken")),
        ("hash-nope".into(), 200, host("b")),
        ("hash-thrice".into(), 200, host("c")),
        ("hash-thrice".into(), 200, host("d")),
    ]);
    assert_eq!(out.len(), 5);
    assert_eq!(out[0].as_ref().unwrap().key.name, "a");
    assert!(
        matches!(&out[1], Err(StoreError::AlreadyExists(_))),
        "{:?}",
        out[1]
    );
    assert!(
        matches!(&out[2], Err(StoreError::JoinRefused(JoinRefusal::Unknown))),
        "{:?}",
        out[2]
    );
    assert_eq!(out[3].as_ref().unwrap().key.name, "c");
    assert!(
        matches!(&out[4], Err(StoreError::JoinRefused(JoinRefusal::UsedUp))),
        "the name taken used nothing up; a and c used the last two: {:?}",
        out[4]
    );
    for (name, exists) in [("a", true), ("b", false), ("c", true), ("d", false)] {
        assert_eq!(
            store
                .get(&ObjectKey::cluster(Kind::Host, name))
                .unwrap()
                .is_some(),
            exists,
            "{name}"
        );
    }
    assert!(store.index() > before);
    assert_eq!(
        store
            .token_by_hash("hash-thrice")
            .unwrap()
            .unwrap()
            .uses_remaining,
        Some(0)
    );
}

pub fn reads_report_the_index_of_their_snapshot(store: &dyn Store) {
    apply(store, vec![tenant("a")]).unwrap();
    apply(store, vec![tenant("b")]).unwrap();
    let (index, items) = store.list_at(&ListFilter::all(Kind::Tenant)).unwrap();
    assert_eq!((index, items.len()), (2, 2));
    let (index, found) = store
        .get_at(&ObjectKey::cluster(Kind::Tenant, "a"))
        .unwrap();
    assert_eq!((index, found.map(|o| o.resource_version)), (2, Some(1)));
    let (index, found) = store
        .get_at(&ObjectKey::cluster(Kind::Tenant, "zz"))
        .unwrap();
    assert_eq!((index, found), (2, None));
}

pub fn quotas_are_checked_against_the_whole_batch(store: &dyn Store) {
    apply(
        store,
        vec![tenant_with_quota("acme", 2), project("acme", "web")],
    )
    .unwrap();
    let before = store.index();
    let err = apply(
        store,
        vec![
            instance("acme", "web", "a", 1, "eu"),
            instance("acme", "web", "b", 1, "eu"),
            instance("acme", "web", "c", 1, "eu"),
        ],
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("quota exceeded for tenant acme"),
        "{err}"
    );
    assert_eq!(store.index(), before, "a refused batch writes nothing");
    apply(
        store,
        vec![
            instance("acme", "web", "a", 1, "eu"),
            instance("acme", "web", "b", 1, "eu"),
        ],
    )
    .unwrap();
    let usage = store.usage(Some("acme")).unwrap();
    assert_eq!(usage["acme"].0.instances, 2);
    assert_eq!(usage["acme"].1["web"].replicas, 2);
}

pub fn audit_records_chain_and_commit_with_their_change(store: &dyn Store) {
    let (summary, records) = store
        .write_audited(
            &[(tenant("acme"), WriteMode::Apply)],
            false,
            &Default::default(),
            &mut |results| results.iter().map(|_| entry("apply")).collect(),
        )
        .unwrap();
    assert_eq!(summary.index, 1);
    assert_eq!(records.len(), 1);
    // Nothing changed: nothing recorded.
    let (_, none) = store
        .write_audited(
            &[(tenant("acme"), WriteMode::Apply)],
            false,
            &Default::default(),
            &mut |results| results.iter().map(|_| entry("apply")).collect(),
        )
        .unwrap();
    assert!(none.is_empty());
    let more = store
        .append_audit(&[entry("login"), entry("logout")])
        .unwrap();
    assert_eq!(
        more.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [2, 3],
        "one chain, numbered on"
    );
    assert_eq!(more[0].prev_hash, records[0].hash);
    let (_, deleted) = store
        .delete_audited(&ObjectKey::cluster(Kind::Tenant, "acme"), None, &mut |g| {
            vec![entry("delete").with_generations(g, None)]
        })
        .unwrap();
    assert_eq!(deleted[0].seq, 4);
    // An invalid entry writes nothing.
    let mut bad = entry("login");
    bad.action = "Not An Action!".into();
    assert!(matches!(
        store.append_audit(&[entry("login"), bad]),
        Err(StoreError::Invalid(_))
    ));
    let all = store
        .list_audit(&crate::audit::AuditFilter {
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(all.len(), 4);
    let tail = store
        .list_audit(&crate::audit::AuditFilter {
            limit: 2,
            tail: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(tail.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4]);
    let v = store.verify_audit().unwrap();
    assert_eq!((v.records, v.broken), (4, None));
    assert_eq!(v.head, all[3].hash);
}

pub fn heartbeats_keep_the_newest_time(store: &dyn Store) {
    store
        .record_heartbeats(&[("h1", 200), ("h2", 100)])
        .unwrap();
    store.record_heartbeats(&[("h1", 150)]).unwrap();
    let beats = store.host_heartbeats().unwrap();
    assert_eq!((beats["h1"], beats["h2"]), (200, 100));
    store.forget_heartbeat("h2").unwrap();
    assert!(!store.host_heartbeats().unwrap().contains_key("h2"));
    assert_eq!(store.index(), 0, "heartbeats move no index");
}

pub fn server_replicas_register_refresh_and_are_pruned(store: &dyn Store) {
    use super::replicas::ReplicaBeat;
    use std::time::Duration;
    let beat = |id: &str, leading: bool| ReplicaBeat {
        id: id.into(),
        hostname: "machine-1".into(),
        api: format!("http://127.0.0.1:70{}", id.len()),
        agent: "127.0.0.1:7443".into(),
        version: "0.1.0".into(),
        started_at_ms: 1_000,
        beat_every: Duration::from_secs(2),
        leading,
        epoch: 7,
    };
    let keep = Duration::from_secs(3600);
    store.server_heartbeat(&beat("a", false), keep).unwrap();
    store.server_heartbeat(&beat("bb", true), keep).unwrap();
    let first = store.server_replicas().unwrap();
    assert_eq!(
        first
            .rows
            .iter()
            .map(|r| r.beat.id.as_str())
            .collect::<Vec<_>>(),
        ["a", "bb"]
    );
    assert_eq!(first.rows[1].beat, beat("bb", true));
    assert!(
        first.rows.iter().all(|r| r.last_seen_ms <= first.now_ms),
        "{first:?}"
    );
    assert!(first.lease.is_some(), "the lease is read with the replicas");
    // A refresh updates the row; it never moves last seen back.
    std::thread::sleep(Duration::from_millis(20));
    store.server_heartbeat(&beat("a", true), keep).unwrap();
    let second = store.server_replicas().unwrap();
    assert!(second.rows[0].beat.leading);
    assert!(second.rows[0].last_seen_ms > first.rows[0].last_seen_ms);
    assert_eq!(store.index(), 0, "heartbeats move no index");
    // Not seen for longer than allowed: removed by the next heartbeat of anyone.
    std::thread::sleep(Duration::from_millis(30));
    store
        .server_heartbeat(&beat("a", true), Duration::from_millis(10))
        .unwrap();
    let third = store.server_replicas().unwrap();
    assert_eq!(
        third
            .rows
            .iter()
            .map(|r| r.beat.id.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
}

pub fn console_sessions_are_kept_touched_closed_and_pruned(store: &dyn Store) {
    use super::sessions::{SessionLimits, SessionRow};
    let row = |id: &str, used: i64, expires: i64| SessionRow {
        id_hash: id.into(),
        token_id: format!("tok-{id}"),
        sealed_token: format!("sealed-{id}"),
        created_ms: 1_000,
        last_used_ms: used,
        expires_ms: expires,
    };
    let limits = |now_ms: i64, max_sessions: usize| SessionLimits {
        now_ms,
        idle_ms: 500,
        max_sessions,
    };
    assert_eq!(store.console_session("a").unwrap(), None);
    store
        .open_console_session(&row("a", 1_000, 9_000), &limits(1_000, 10))
        .unwrap();
    store
        .open_console_session(&row("b", 1_100, 1_400), &limits(1_100, 10))
        .unwrap();
    assert_eq!(
        store.console_session("a").unwrap(),
        Some(row("a", 1_000, 9_000))
    );
    // A touch moves last use forward, never back.
    assert!(store.touch_console_session("a", 1_300).unwrap());
    assert!(store.touch_console_session("a", 1_200).unwrap());
    assert_eq!(
        store.console_session("a").unwrap().unwrap().last_used_ms,
        1_300
    );
    assert!(!store.touch_console_session("nobody", 1_300).unwrap());
    // The next session removes those that ended: b is past its expiry at 1,400.
    store
        .open_console_session(&row("c", 1_400, 9_000), &limits(1_400, 10))
        .unwrap();
    assert_eq!(store.console_session("b").unwrap(), None);
    assert!(store.console_session("a").unwrap().is_some());
    // Idle for 500 ms: a (last used at 1,300) ends at 1,800.
    store
        .open_console_session(&row("d", 1_800, 9_000), &limits(1_800, 10))
        .unwrap();
    assert_eq!(store.console_session("a").unwrap(), None);
    assert!(
        store.console_session("c").unwrap().is_some(),
        "c was idle 400 ms"
    );
    // At the limit, the least recently used goes.
    store
        .open_console_session(&row("e", 1_900, 9_000), &limits(1_900, 2))
        .unwrap();
    store
        .open_console_session(&row("f", 2_000, 9_000), &limits(2_000, 2))
        .unwrap();
    assert_eq!(store.console_session("c").unwrap(), None);
    assert_eq!(store.console_session("d").unwrap(), None);
    assert!(store.console_session("e").unwrap().is_some());
    assert!(store.console_session("f").unwrap().is_some());
    // Logout.
    assert!(store.close_console_session("e").unwrap());
    assert!(!store.close_console_session("e").unwrap());
    assert_eq!(store.console_session("e").unwrap(), None);
    // An id is one session.
    assert!(
        store
            .open_console_session(&row("f", 2_000, 9_000), &limits(2_000, 10))
            .is_err()
    );
    assert_eq!(store.index(), 0, "sessions move no index");
}

/// Two servers on one PostgreSQL database: a console session opened through one is accepted
/// by the other, and a logout through either ends it for both.
#[test]
fn console_sessions_are_shared_by_the_servers_of_one_database() {
    use crate::ui::session::{SessionToken, close_in, open_in, touch_in};
    let Some(schema) = PgSchema::new() else {
        return;
    };
    let one = PgStore::open_config(schema.config.clone()).unwrap();
    let two = PgStore::open_config(schema.config.clone()).unwrap();
    let now = crate::events::now_ms();
    let token = SessionToken::new(format!("cca_{}", "b".repeat(40)));
    let info = open_in(&one, token.clone(), "tok1", now, None).unwrap();
    let seen = touch_in(&two, &info.id, now + 1_000).unwrap().unwrap();
    assert_eq!(seen.csrf, info.csrf);
    assert_eq!(seen.token.bearer(), token.bearer());
    // A touch through the second is seen by the first.
    touch_in(&two, &info.id, now + 61_000).unwrap().unwrap();
    assert!(
        touch_in(&one, &info.id, now + 61_000 + 29 * 60_000)
            .unwrap()
            .is_some()
    );
    close_in(&two, &info.id).unwrap();
    assert!(touch_in(&one, &info.id, now + 62_000).unwrap().is_none());
    assert!(touch_in(&two, &info.id, now + 62_000).unwrap().is_none());
}

const WRITERS: usize = 4;
const WRITES: usize = 15;

pub fn racing_writers_get_one_index_each(store: &dyn Store) {
    let indexes: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                s.spawn(move || {
                    (0..WRITES)
                        .map(|i| {
                            apply(store, vec![tenant(&format!("t{w}-{i}"))])
                                .unwrap()
                                .index
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let total = (WRITERS * WRITES) as u64;
    let distinct: BTreeSet<u64> = indexes.iter().copied().collect();
    assert_eq!(
        distinct,
        (1..=total).collect(),
        "one index per write, none skipped"
    );
    assert_eq!(store.index(), total);
    let (index, tenants) = store.list_at(&ListFilter::all(Kind::Tenant)).unwrap();
    assert_eq!((index, tenants.len() as u64), (total, total));
    let versions: BTreeSet<u64> = tenants.iter().map(|o| o.resource_version).collect();
    assert_eq!(
        versions, distinct,
        "every object carries the index of its write"
    );
}

pub fn readers_never_see_a_gap_in_the_index(store: &dyn Store) {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                s.spawn(move || {
                    for i in 0..WRITES {
                        apply(store, vec![tenant(&format!("t{w}-{i}"))]).unwrap();
                    }
                })
            })
            .collect();
        let done = &done;
        let reader = s.spawn(move || {
            let mut last = 0;
            let mut reads = 0;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let (index, tenants) = store.list_at(&ListFilter::all(Kind::Tenant)).unwrap();
                // Every write made one tenant at its index: a snapshot at index i holds exactly
                // the tenants of writes 1..=i.
                let versions: BTreeSet<u64> = tenants.iter().map(|o| o.resource_version).collect();
                assert_eq!(
                    versions,
                    (1..=index).collect(),
                    "a snapshot at index {index} misses a write before it"
                );
                assert!(index >= last, "the index went back from {last} to {index}");
                last = index;
                reads += 1;
                if finished {
                    return reads;
                }
            }
        });
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(reader.join().unwrap() > 1);
    });
    assert_eq!(store.index(), (WRITERS * WRITES) as u64);
}

pub fn racing_writers_never_overrun_a_quota(store: &dyn Store) {
    apply(
        store,
        vec![tenant_with_quota("acme", 5), project("acme", "web")],
    )
    .unwrap();
    let outcomes: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                s.spawn(move || {
                    apply(
                        store,
                        vec![instance("acme", "web", &format!("i{i}"), 1, "eu")],
                    )
                    .map(|_| ())
                    .map_err(|e| e.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(won, 5, "{outcomes:?}");
    for e in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert!(e.contains("quota exceeded"), "{e}");
    }
    let usage = store.usage(Some("acme")).unwrap();
    assert_eq!(usage["acme"].0.instances, 5);
}

pub fn one_of_racing_conditional_updates_wins(store: &dyn Store) {
    let created = apply(store, vec![tenant("acme")]).unwrap();
    let rv = created.results[0].object.resource_version;
    let outcomes: Vec<Result<Outcome, StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                s.spawn(move || {
                    let mut t = tenant("acme");
                    t.metadata_mut()
                        .labels
                        .insert("writer".into(), i.to_string());
                    t.metadata_mut().resource_version = Some(rv);
                    apply(store, vec![t]).map(|s| s.results[0].outcome)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won: Vec<_> = outcomes.iter().filter(|o| o.is_ok()).collect();
    assert_eq!(won.len(), 1, "{outcomes:?}");
    assert!(matches!(won[0], Ok(Outcome::Configured)));
    for o in &outcomes {
        if let Err(e) = o {
            let StoreError::InBatch { source, .. } = e else {
                panic!("{e}")
            };
            assert!(matches!(**source, StoreError::Conflict { .. }), "{source}");
        }
    }
    assert_eq!(store.index(), rv + 1);
}

pub fn racing_enrollments_use_a_token_no_more_than_allowed(store: &dyn Store) {
    store
        .insert_token(&token("three", TokenKind::Join, None, Some(3)))
        .unwrap();
    let outcomes: Vec<Result<(), StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                s.spawn(move || {
                    store
                        .enroll_host("hash-three", 200, host(&format!("h{i}")))
                        .map(|_| ())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        outcomes.iter().filter(|o| o.is_ok()).count(),
        3,
        "{outcomes:?}"
    );
    assert!(outcomes.iter().all(|o| matches!(
        o,
        Ok(()) | Err(StoreError::JoinRefused(JoinRefusal::UsedUp))
    )));
    assert_eq!(store.list(&ListFilter::all(Kind::Host)).unwrap().len(), 3);
}

pub fn the_audit_chain_stays_intact_under_concurrent_writes(store: &dyn Store) {
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            s.spawn(move || {
                for i in 0..WRITES {
                    if i % 2 == 0 {
                        store
                            .write_audited(
                                &[(tenant(&format!("t{w}-{i}")), WriteMode::Create)],
                                false,
                                &Default::default(),
                                &mut |results| results.iter().map(|_| entry("create")).collect(),
                            )
                            .unwrap();
                    } else {
                        store
                            .append_audit(&[entry("login"), entry("logout")])
                            .unwrap();
                    }
                }
            });
        }
    });
    let expected = (WRITERS * (WRITES.div_ceil(2) + (WRITES / 2) * 2)) as u64;
    let v = store.verify_audit().unwrap();
    assert_eq!(v.broken, None);
    assert_eq!(v.records, expected);
    let all = store
        .list_audit(&crate::audit::AuditFilter {
            limit: 10_000,
            ..Default::default()
        })
        .unwrap();
    let seqs: Vec<u64> = all.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=expected).collect::<Vec<_>>());
}
