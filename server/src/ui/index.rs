//! The console's in-memory index of instances: one small row per stored instance (what the
//! lists show, its labels, its resourceVersion), ordered as the store lists them, kept up to
//! date from the store's change log. The overview and the instance list read it instead of
//! decoding every stored instance on each load: a load costs the changes since the last one
//! plus a walk over the rows in the caller's scope, and only the shown page is copied out.
//!
//! Every read names the caller's [`Scope`] and narrows its filter with [`Scope::narrow`], the
//! rule the store's own scoped lists follow, so the console never sees more than the API.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Mutex;

use super::views::{self, InstanceRow};
use crate::model::{Kind, ObjectKey};
use crate::store::{ChangeType, ChangesSince, Feed, ListFilter, Scope, Store, StoreError};

/// Changes read from the log per round trip while catching up.
const CATCH_UP_BATCH: usize = 5_000;

/// (tenant, project, name): the store's list order.
type Key = (String, String, String);

#[derive(Clone, Debug)]
struct Entry {
    row: InstanceRow,
    labels: BTreeMap<String, String>,
    resource_version: u64,
}

#[derive(Default)]
struct State {
    /// The store index the rows reflect; `None` before the first load.
    applied: Option<u64>,
    rows: BTreeMap<Key, Entry>,
}

/// See the module documentation.
#[derive(Default)]
pub struct InstanceIndex {
    state: Mutex<State>,
}

/// One page of a filtered list.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    /// The store index the answer reflects (where a watch of it resumes).
    pub index: u64,
    /// At most `limit` rows after the first `skip` matches, in list order.
    pub rows: Vec<InstanceRow>,
    /// How many rows match in all.
    pub matched: usize,
}

/// The instances of a scope at a glance.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub index: u64,
    pub total: usize,
    /// Instances by phase.
    pub phases: BTreeMap<String, usize>,
    /// How many instances have an update in progress.
    pub rolling: usize,
    /// The first `limit` of them, in list order.
    pub rollouts: Vec<InstanceRow>,
}

fn entry_of(
    key: &ObjectKey,
    labels: &BTreeMap<String, String>,
    json: &str,
    resource_version: u64,
) -> Option<Entry> {
    Some(Entry {
        row: views::instance_row_of(key, labels, json)?,
        labels: labels.clone(),
        resource_version,
    })
}

fn key_of(k: &ObjectKey) -> Key {
    (k.tenant.clone(), k.project.clone(), k.name.clone())
}

impl State {
    /// Reads every instance again.
    fn reload(&mut self, store: &dyn Store) -> Result<(), StoreError> {
        let mut rows = BTreeMap::new();
        let mut index = 0;
        store.scan(
            &ListFilter::all(Kind::OpenClawInstance),
            &mut |i| {
                index = i;
                true
            },
            &mut |o| {
                if let Some(e) = entry_of(&o.key, &o.labels, &o.json, o.resource_version) {
                    rows.insert(key_of(&o.key), e);
                }
                true
            },
        )?;
        self.rows = rows;
        self.applied = Some(index);
        Ok(())
    }

    /// For a store without a change log: compares every instance's resourceVersion (no body
    /// read) with the rows and reads only those that changed.
    fn refresh_by_versions(&mut self, store: &dyn Store, current: u64) -> Result<(), StoreError> {
        let versions = store.versions(Kind::OpenClawInstance)?;
        let mut seen: HashMap<Key, ()> = HashMap::with_capacity(versions.len());
        let mut max_seen = 0;
        for (key, _uid, rv) in versions {
            let k = key_of(&key);
            max_seen = max_seen.max(rv);
            if self.rows.get(&k).map(|e| e.resource_version) != Some(rv) {
                match store.get(&key)? {
                    Some(o) => match entry_of(&o.key, &o.labels, &o.json, o.resource_version) {
                        Some(e) => {
                            self.rows.insert(k.clone(), e);
                        }
                        None => {
                            self.rows.remove(&k);
                        }
                    },
                    None => {
                        self.rows.remove(&k);
                    }
                }
            }
            seen.insert(k, ());
        }
        self.rows.retain(|k, _| seen.contains_key(k));
        self.applied = Some(current.max(max_seen));
        Ok(())
    }

    /// Applies the changes after the rows' index, up to the store's index at the start.
    fn catch_up(&mut self, store: &dyn Store) -> Result<(), StoreError> {
        let current = store.index();
        let Some(mut applied) = self.applied else {
            return self.reload(store);
        };
        while applied < current {
            match store.changes_since(Feed::Objects, applied, CATCH_UP_BATCH) {
                Ok(ChangesSince::Changes { items, upto }) => {
                    for c in items {
                        if c.key.kind != Kind::OpenClawInstance {
                            continue;
                        }
                        let k = key_of(&c.key);
                        let entry = match c.type_ {
                            ChangeType::Deleted => None,
                            ChangeType::Added | ChangeType::Modified => {
                                entry_of(&c.key, &c.labels, &c.json, c.rv)
                            }
                        };
                        match entry {
                            Some(e) => {
                                self.rows.insert(k, e);
                            }
                            None => {
                                self.rows.remove(&k);
                            }
                        }
                    }
                    if upto <= applied {
                        // Nothing more can be read now; the next load tries again.
                        break;
                    }
                    applied = upto;
                    self.applied = Some(applied);
                }
                // The log no longer reaches back to the rows' index.
                Ok(ChangesSince::Gone { .. }) => return self.reload(store),
                // A store that keeps no change log.
                Err(_) => return self.refresh_by_versions(store, current),
            }
        }
        Ok(())
    }

    /// The rows `filter` (already narrowed to a scope) can match, in list order.
    fn candidates<'a>(&'a self, filter: &'a ListFilter) -> impl Iterator<Item = &'a Entry> + 'a {
        let start: Bound<Key> = match (&filter.tenant, &filter.project) {
            (Some(t), Some(p)) => Bound::Included((t.clone(), p.clone(), String::new())),
            (Some(t), None) => Bound::Included((t.clone(), String::new(), String::new())),
            _ => Bound::Unbounded,
        };
        self.rows
            .range((start, Bound::Unbounded))
            .take_while(move |((t, p, _), _)| {
                filter.tenant.as_ref().is_none_or(|want| want == t)
                    && (filter.tenant.is_none() || filter.project.as_ref().is_none_or(|w| w == p))
            })
            .filter(move |((_, p, n), e)| {
                filter.project.as_ref().is_none_or(|w| w == p)
                    && filter.name.as_ref().is_none_or(|w| w == n)
                    && filter.labels.iter().all(|r| r.matches(&e.labels))
            })
            .map(|(_, e)| e)
    }
}

impl InstanceIndex {
    fn caught_up(&self, store: &dyn Store) -> Result<std::sync::MutexGuard<'_, State>, StoreError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = state.catch_up(store) {
            // Start again from the store at the next load.
            state.applied = None;
            state.rows.clear();
            return Err(e);
        }
        Ok(state)
    }

    /// The instances `scope` sees that match `filter` and `phase` (empty: any): the page of
    /// `limit` rows after the first `skip` matches, and how many match in all. Blocking.
    pub fn list(
        &self,
        store: &dyn Store,
        scope: &Scope,
        filter: &ListFilter,
        phase: &str,
        skip: usize,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        let state = self.caught_up(store)?;
        let mut out = ListPage {
            index: state.applied.unwrap_or_default(),
            ..ListPage::default()
        };
        let mut filter = filter.clone();
        filter.kind = Kind::OpenClawInstance;
        if !scope.narrow(&mut filter) {
            return Ok(out);
        }
        for e in state
            .candidates(&filter)
            .filter(|e| phase.is_empty() || e.row.phase == phase)
        {
            if out.matched >= skip && out.rows.len() < limit {
                out.rows.push(e.row.clone());
            }
            out.matched += 1;
        }
        Ok(out)
    }

    /// Counts by phase and the updates in progress of the instances `scope` sees (at most
    /// `limit` of the latter listed). Blocking.
    pub fn summary(
        &self,
        store: &dyn Store,
        scope: &Scope,
        limit: usize,
    ) -> Result<Summary, StoreError> {
        let state = self.caught_up(store)?;
        let mut out = Summary {
            index: state.applied.unwrap_or_default(),
            ..Summary::default()
        };
        let mut filter = ListFilter::all(Kind::OpenClawInstance);
        if !scope.narrow(&mut filter) {
            return Ok(out);
        }
        for e in state.candidates(&filter) {
            out.total += 1;
            *out.phases.entry(e.row.phase.clone()).or_default() += 1;
            if e.row.rollout.is_some() {
                out.rolling += 1;
                if out.rollouts.len() < limit {
                    out.rollouts.push(e.row.clone());
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{InstancePhase, Resource};
    use crate::store::sqlite::SqliteStore;
    use crate::store::{LabelRequirement, WriteMode};

    fn res(v: serde_json::Value) -> Resource {
        Resource::from_value(v).unwrap()
    }

    fn instance(t: &str, p: &str, name: &str, team: &str) -> Resource {
        res(json!({
            "apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
            "metadata": {"name": name, "tenant": t, "project": p, "labels": {"team": team}},
            "spec": {"version": "2026.7.1", "replicas": 0}
        }))
    }

    fn seed(store: &dyn Store) {
        let mut batch = vec![];
        for t in ["a", "b"] {
            batch.push(res(
                json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": t}}),
            ));
            for p in ["p1", "p2"] {
                batch.push(res(
                    json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project",
                    "metadata": {"name": p, "tenant": t}}),
                ));
                for i in 0..5 {
                    batch.push(instance(t, p, &format!("bot-{i}"), &format!("t{}", i % 2)));
                }
            }
        }
        let batch: Vec<_> = batch.into_iter().map(|r| (r, WriteMode::Apply)).collect();
        store.write(&batch, false).unwrap();
    }

    fn set_phase(store: &dyn Store, t: &str, p: &str, name: &str, phase: InstancePhase) {
        store
            .update(&ObjectKey::instance(t, p, name), &mut |r| match r {
                Resource::OpenClawInstance(i) => {
                    i.status.get_or_insert_with(Default::default).phase = phase;
                    true
                }
                _ => false,
            })
            .unwrap();
    }

    fn names(page: &ListPage) -> Vec<String> {
        page.rows.iter().map(|r| r.key()).collect()
    }

    /// What the store's own scoped scan answers, for comparison.
    fn scanned(store: &dyn Store, scope: &Scope, filter: &ListFilter, phase: &str) -> Vec<String> {
        let scoped = crate::store::Scoped::new(store, scope.clone());
        let mut out = vec![];
        scoped
            .scan(filter, &mut |_| true, &mut |o| {
                let row = views::instance_row(o).unwrap();
                if phase.is_empty() || row.phase == phase {
                    out.push(row.key());
                }
                true
            })
            .unwrap();
        out
    }

    #[test]
    fn follows_writes_and_answers_as_the_scoped_store_does() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let index = InstanceIndex::default();
        // The first read loads everything.
        let all = index
            .list(
                &store,
                &Scope::Cluster,
                &ListFilter::all(Kind::OpenClawInstance),
                "",
                0,
                100,
            )
            .unwrap();
        assert_eq!(all.matched, 0);
        seed(&store);
        // Then writes come in through the change log: status, a new instance, a delete.
        set_phase(&store, "a", "p1", "bot-1", InstancePhase::Running);
        set_phase(&store, "b", "p2", "bot-3", InstancePhase::Failed);
        let more = vec![(instance("a", "p2", "extra", "t9"), WriteMode::Apply)];
        store.write(&more, false).unwrap();
        store
            .delete(&ObjectKey::instance("b", "p1", "bot-0"), None)
            .unwrap();

        let scopes = [
            Scope::Cluster,
            Scope::Tenant("a".into()),
            Scope::Project {
                tenant: "b".into(),
                project: "p2".into(),
            },
        ];
        let mut filters = vec![ListFilter::all(Kind::OpenClawInstance)];
        let mut f = ListFilter::all(Kind::OpenClawInstance);
        f.tenant = Some("b".into());
        filters.push(f.clone());
        f.project = Some("p2".into());
        filters.push(f);
        let mut f = ListFilter::all(Kind::OpenClawInstance);
        f.labels = vec![LabelRequirement::Equals("team".into(), "t1".into())];
        filters.push(f);
        let mut f = ListFilter::all(Kind::OpenClawInstance);
        f.project = Some("p2".into());
        filters.push(f);
        for scope in &scopes {
            for filter in &filters {
                for phase in ["", "Pending", "Running", "Failed"] {
                    let page = index.list(&store, scope, filter, phase, 0, 1000).unwrap();
                    assert_eq!(
                        names(&page),
                        scanned(&store, scope, filter, phase),
                        "{scope:?} {filter:?} {phase:?}"
                    );
                    assert_eq!(page.matched, page.rows.len());
                    assert_eq!(page.index, store.index());
                }
            }
        }
        // Pages: skip and limit over the matches, the count of all of them.
        let page = index
            .list(
                &store,
                &Scope::Cluster,
                &ListFilter::all(Kind::OpenClawInstance),
                "",
                3,
                2,
            )
            .unwrap();
        assert_eq!(page.matched, 20);
        assert_eq!(names(&page), ["a/p1/bot-3", "a/p1/bot-4"]);
        // A tenant's summary counts its own instances only.
        let s = index
            .summary(&store, &Scope::Tenant("a".into()), 10)
            .unwrap();
        assert_eq!(s.total, 11);
        assert_eq!(s.phases.get("Running"), Some(&1));
        assert_eq!(s.phases.get("Failed"), None);
        let s = index.summary(&store, &Scope::Cluster, 10).unwrap();
        assert_eq!(s.total, 20);
        assert_eq!(s.phases.get("Failed"), Some(&1));
        assert_eq!(s.phases.get("Pending"), Some(&18));
    }

    #[test]
    fn a_scope_never_widens_to_another_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        seed(&store);
        let index = InstanceIndex::default();
        let mut f = ListFilter::all(Kind::OpenClawInstance);
        f.tenant = Some("b".into());
        let page = index
            .list(&store, &Scope::Tenant("a".into()), &f, "", 0, 100)
            .unwrap();
        assert_eq!(page.matched, 0);
        assert!(page.rows.is_empty());
        let scope = Scope::Project {
            tenant: "a".into(),
            project: "p1".into(),
        };
        let all = ListFilter::all(Kind::OpenClawInstance);
        let page = index.list(&store, &scope, &all, "", 0, 100).unwrap();
        assert!(
            page.rows
                .iter()
                .all(|r| r.tenant == "a" && r.project == "p1")
        );
        assert_eq!(page.matched, 5);
        assert_eq!(index.summary(&store, &scope, 10).unwrap().total, 5);
    }

    #[test]
    fn a_load_that_cannot_catch_up_from_the_change_log_reads_the_store_again() {
        use std::sync::atomic::Ordering;

        use crate::store::testing::HookStore;
        let dir = tempfile::tempdir().unwrap();
        let store = HookStore::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        seed(&store);
        let index = InstanceIndex::default();
        let all = ListFilter::all(Kind::OpenClawInstance);
        let same = |what: &str| {
            for scope in [Scope::Cluster, Scope::Tenant("b".into())] {
                for phase in ["", "Running", "Failed"] {
                    let page = index.list(&store, &scope, &all, phase, 0, 1000).unwrap();
                    assert_eq!(
                        names(&page),
                        scanned(&store.inner, &scope, &all, phase),
                        "{what}: {scope:?} {phase:?}"
                    );
                    assert_eq!(page.index, store.index(), "{what}");
                }
            }
            let s = index.summary(&store, &Scope::Cluster, 10).unwrap();
            assert_eq!(
                s.total,
                scanned(&store.inner, &Scope::Cluster, &all, "").len()
            );
        };
        same("the first load");
        // Changes the log no longer holds (pruned, or compacted past the rows' index): the
        // whole index is read again.
        set_phase(&store, "a", "p1", "bot-1", InstancePhase::Running);
        store
            .delete(&ObjectKey::instance("b", "p1", "bot-0"), None)
            .unwrap();
        store
            .write(
                &[(instance("b", "p2", "new", "t1"), WriteMode::Apply)],
                false,
            )
            .unwrap();
        *store.changes.lock().unwrap() = Some(Ok(store.index()));
        same("a pruned log");
        // The log cannot be read: every instance's version is compared instead.
        set_phase(&store, "b", "p2", "new", InstancePhase::Failed);
        store
            .delete(&ObjectKey::instance("a", "p2", "bot-4"), None)
            .unwrap();
        *store.changes.lock().unwrap() = Some(Err("disk I/O error".into()));
        same("a log that cannot be read");
        // Nor can the instances: the load fails (a page says so; it never shows a stale
        // list), and the next one starts again from a full read.
        set_phase(&store, "b", "p2", "new", InstancePhase::Running);
        store.list_failures.store(1, Ordering::SeqCst);
        assert!(
            index
                .list(&store, &Scope::Cluster, &all, "", 0, 1000)
                .is_err()
        );
        store
            .write(
                &[(instance("a", "p1", "later", "t0"), WriteMode::Apply)],
                false,
            )
            .unwrap();
        *store.changes.lock().unwrap() = None;
        same("after a failed load");
        // And the change log is followed again from there.
        set_phase(&store, "a", "p1", "later", InstancePhase::Failed);
        same("the log followed again");
    }
}
