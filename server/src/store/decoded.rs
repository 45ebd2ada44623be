//! Decoded objects, kept between passes: a control loop that reads every host and instance
//! on each pass decodes only the objects written since its last look, not the whole list.
//!
//! [`DecodedCache::list`] reads each object's identity and `resourceVersion`
//! ([`Store::versions`], no bodies), keeps the decoded objects whose version did not move,
//! and reads and decodes only the others (one by one, or the whole list when most moved). The
//! cache holds one decoded copy per object, shared by every caller as an `Arc`; objects gone
//! from the store leave it on the next look at their kind.
//!
//! What a caller gets is the objects as each was at some moment of its call, not one snapshot
//! of the store: the same guarantee two separate lists give, which is what every control loop
//! already assumes (each writes with a check of what it read).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{ListFilter, Store, StoreError, StoredObject};
use crate::model::{Kind, ObjectKey, Resource};

/// One stored object, decoded, without spare capacity ([`Resource::compact`]: it is kept for
/// long). An object whose JSON does not decode (corruption: it was validated when written) is
/// kept with the error, so a caller can still see it is there.
#[derive(Debug)]
pub struct Decoded {
    pub key: ObjectKey,
    pub uid: String,
    pub resource_version: u64,
    pub resource: Result<Resource, String>,
}

impl Decoded {
    /// An object as its writer holds it after a write: `resource` carries its stored
    /// metadata (uid, `resourceVersion`).
    pub fn written(resource: Resource) -> Decoded {
        let m = resource.metadata();
        Decoded {
            key: resource.key(),
            uid: m.uid.clone().unwrap_or_default(),
            resource_version: m.resource_version.unwrap_or(0),
            resource: Ok(resource),
        }
    }

    fn of(o: &StoredObject) -> Decoded {
        Decoded {
            key: o.key.clone(),
            uid: o.uid.clone(),
            resource_version: o.resource_version,
            resource: o
                .resource()
                .map(|mut r| {
                    r.compact();
                    r
                })
                .map_err(|e| e.to_string()),
        }
    }
}

/// When more than this share of a kind's objects moved, the whole list is read in one query
/// rather than each object on its own.
const LIST_WHEN_MOVED: f64 = 0.25;

/// What the cache holds of one kind: the decoded objects by key, and the list as last
/// returned with the kind's fingerprint ([`Store::kind_fingerprint`]) read before it.
#[derive(Default)]
struct OfKind {
    by_key: HashMap<ObjectKey, Arc<Decoded>>,
    last: Option<(Fingerprint, DecodedList)>,
}

/// A kind's decoded objects in key order, shared: a look at a kind nothing was written to
/// since is a reference count, not a copy of the list.
pub type DecodedList = Arc<Vec<Arc<Decoded>>>;

/// A kind's count and highest `resourceVersion` ([`Store::kind_fingerprint`]).
type Fingerprint = (u64, u64);

/// The decoded objects of every kind looked at, by key.
#[derive(Default)]
pub struct DecodedCache {
    kinds: Mutex<HashMap<Kind, OfKind>>,
}

/// A list and what was done to make it.
type Listed = (DecodedList, Looked);

/// What one [`DecodedCache::list`] call did, for tests and figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Looked {
    pub kept: usize,
    pub decoded: usize,
}

impl DecodedCache {
    /// Every object of `kind` in `store`, decoded, ordered by tenant, project and name (as
    /// [`Store::list`]).
    pub fn list(&self, store: &dyn Store, kind: Kind) -> Result<DecodedList, StoreError> {
        self.list_counted(store, kind).map(|(objects, _)| objects)
    }

    /// [`DecodedCache::list`], saying how many objects were kept and how many decoded.
    pub fn list_counted(&self, store: &dyn Store, kind: Kind) -> Result<Listed, StoreError> {
        // Nothing of the kind written since the last look: the same list, without reading a
        // row of it.
        let fingerprint = store.kind_fingerprint(kind)?;
        {
            let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((seen, list)) = kinds.get(&kind).and_then(|k| k.last.as_ref())
                && *seen == fingerprint
            {
                let looked = Looked {
                    kept: list.len(),
                    decoded: 0,
                };
                return Ok((Arc::clone(list), looked));
            }
        }
        let previous = {
            let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
            kinds
                .get(&kind)
                .and_then(|k| k.last.as_ref())
                .map(|(seen, list)| (seen.1, Arc::clone(list)))
        };
        if let Some((watermark, previous)) = previous
            && let Some(done) = self.list_since(store, kind, watermark, previous)?
        {
            return Ok(done);
        }
        let mut versions = store.versions(kind)?;
        versions.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<Option<Arc<Decoded>>> = {
            let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
            let known = kinds.get(&kind);
            versions
                .iter()
                .map(|(key, uid, rv)| {
                    known
                        .and_then(|m| m.by_key.get(key))
                        .filter(|d| d.resource_version == *rv && &d.uid == uid)
                        .cloned()
                })
                .collect()
        };
        let missing: Vec<usize> = (0..out.len()).filter(|i| out[*i].is_none()).collect();
        let looked = Looked {
            kept: out.len() - missing.len(),
            decoded: missing.len(),
        };
        if !missing.is_empty() {
            if missing.len() as f64 > versions.len() as f64 * LIST_WHEN_MOVED {
                let mut read: HashMap<ObjectKey, StoredObject> = store
                    .list(&ListFilter::all(kind))?
                    .into_iter()
                    .map(|o| (o.key.clone(), o))
                    .collect();
                for i in &missing {
                    if let Some(o) = read.remove(&versions[*i].0) {
                        out[*i] = Some(Arc::new(Decoded::of(&o)));
                    }
                }
            } else {
                for i in &missing {
                    // Gone since the versions were read: left out, as a later list would.
                    if let Some(o) = store.get(&versions[*i].0)? {
                        out[*i] = Some(Arc::new(Decoded::of(&o)));
                    }
                }
            }
        }
        let out: DecodedList = Arc::new(out.into_iter().flatten().collect());
        let mut by_key: HashMap<ObjectKey, Arc<Decoded>> =
            out.iter().map(|d| (d.key.clone(), Arc::clone(d))).collect();
        // The list is at least as new as `fingerprint` (read before it), so a later look with
        // the same fingerprint may return it. A concurrent caller may have stored a newer look
        // meanwhile; the next look then reads again, which costs time, never correctness.
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let of_kind = kinds.entry(kind).or_default();
        // A writer may have seeded a newer version of a listed object meanwhile: kept.
        for (key, seeded) in of_kind.by_key.drain() {
            if let Some(listed) = by_key.get_mut(&key)
                && listed.uid == seeded.uid
                && listed.resource_version < seeded.resource_version
            {
                *listed = seeded;
            }
        }
        *of_kind = OfKind {
            by_key,
            last: Some((fingerprint, Arc::clone(&out))),
        };
        drop(kinds);
        Ok((out, looked))
    }

    /// The list of `kind` from the list last returned (`previous`, whose fingerprint's highest
    /// version was `watermark`) and the objects written since, read through the versions
    /// index from `watermark` on: no row of an object that did not move is read, and the list
    /// is not sorted again. Every object with a version up to `watermark` now is one the
    /// previous list holds at that version (a write gives its object a newer one), so the
    /// previous list with the moved objects put in is the kind, unless something was deleted:
    /// then the count read with the moved ones tells, and `None` sends the caller to a whole
    /// look. Also `None` when too much moved to be read one by one.
    fn list_since(
        &self,
        store: &dyn Store,
        kind: Kind,
        watermark: u64,
        previous: DecodedList,
    ) -> Result<Option<Listed>, StoreError> {
        let (fingerprint, mut moved) = store.versions_after(kind, watermark)?;
        moved.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // Where each moved object is in the previous list (found) or goes (not found).
        let places: Vec<Result<usize, usize>> = moved
            .iter()
            .map(|(key, _, _)| previous.binary_search_by(|d| d.key.cmp(key)))
            .collect();
        let replaced = places.iter().filter(|p| p.is_ok()).count();
        if previous.len() - replaced + moved.len() != fingerprint.0 as usize
            || moved.len() as f64 > previous.len().max(1) as f64 * LIST_WHEN_MOVED
        {
            return Ok(None);
        }
        // The moved objects, decoded (from the cache when a writer seeded them).
        let mut fresh: Vec<Option<Arc<Decoded>>> = {
            let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
            let known = kinds.get(&kind);
            moved
                .iter()
                .map(|(key, uid, rv)| {
                    known
                        .and_then(|m| m.by_key.get(key))
                        .filter(|d| d.resource_version == *rv && &d.uid == uid)
                        .cloned()
                })
                .collect()
        };
        let mut looked = Looked {
            kept: previous.len() - replaced,
            decoded: 0,
        };
        for (slot, (key, _, _)) in fresh.iter_mut().zip(&moved) {
            if slot.is_none() {
                looked.decoded += 1;
                // Gone since the versions were read: left out, as a later list would.
                *slot = store.get(key)?.map(|o| Arc::new(Decoded::of(&o)));
            } else {
                looked.kept += 1;
            }
        }
        // Both in key order: each moved object is put in at its place, and the runs of
        // unmoved ones between are copied whole.
        let mut out: Vec<Arc<Decoded>> = Vec::with_capacity(previous.len() + moved.len());
        let mut copied = 0;
        for (place, d) in places.iter().zip(&fresh) {
            let (before, after) = match *place {
                Ok(i) => (i, i + 1),
                Err(i) => (i, i),
            };
            out.extend_from_slice(&previous[copied..before]);
            out.extend(d.iter().cloned());
            copied = after;
        }
        out.extend_from_slice(&previous[copied..]);
        let out = Arc::new(out);
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let of_kind = kinds.entry(kind).or_default();
        for d in fresh.into_iter().flatten() {
            // A writer may have seeded a newer version meanwhile (or this one): kept.
            match of_kind.by_key.get(&d.key) {
                Some(have) if have.uid == d.uid && have.resource_version >= d.resource_version => {}
                _ => {
                    of_kind.by_key.insert(d.key.clone(), d);
                }
            }
        }
        of_kind.last = Some((fingerprint, Arc::clone(&out)));
        drop(kinds);
        Ok(Some((out, looked)))
    }

    /// The decoded object at `key` if the cache holds it at exactly `resource_version` (and
    /// `uid`): a writer that read the row can take a copy of it instead of decoding the row.
    pub fn get(&self, key: &ObjectKey, uid: &str, resource_version: u64) -> Option<Arc<Decoded>> {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds
            .get(&key.kind)?
            .by_key
            .get(key)
            .filter(|d| d.resource_version == resource_version && d.uid == uid)
            .cloned()
    }

    /// Takes objects just committed, as the writer holds them decoded, so that the next look
    /// at their kind finds them at their new version instead of reading and decoding their
    /// rows again. An entry is only ever used at the exact version and uid it holds, so a seed
    /// that arrives after a newer write costs memory until the next look, never a stale read.
    /// Objects of a kind not looked at yet are left out.
    pub fn seed(&self, mut written: Vec<Decoded>) {
        if written.is_empty() {
            return;
        }
        // Only kinds the loops look at: an entry of a kind never listed would never be
        // dropped once its object is deleted (a look at the kind drops those).
        {
            let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
            written.retain(|d| kinds.contains_key(&d.key.kind));
        }
        // Here, after the commit, rather than in the writer's transaction (the writer is held
        // for no work the cache alone needs), and outside the cache's lock.
        for d in &mut written {
            if let Ok(r) = &mut d.resource {
                r.compact();
            }
        }
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        for d in written {
            let Some(of_kind) = kinds.get_mut(&d.key.kind) else {
                continue;
            };
            // At an equal version the later one wins: one transaction that wrote a key twice
            // gave both writes its version, and the row holds the last.
            match of_kind.by_key.get(&d.key) {
                Some(have) if have.uid == d.uid && have.resource_version > d.resource_version => {}
                _ => {
                    of_kind.by_key.insert(d.key.clone(), Arc::new(d));
                }
            }
        }
    }

    /// Forgets every decoded object (for tests, and a store restored under a running server).
    pub fn clear(&self) {
        self.kinds.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Every object of `kind`, decoded: through the store's [`DecodedCache`] when it keeps one,
/// else read and decoded now.
pub fn list_decoded(store: &dyn Store, kind: Kind) -> Result<DecodedList, StoreError> {
    match store.decoded_cache() {
        Some(cache) => cache.list(store, kind),
        None => Ok(Arc::new(
            store
                .list(&ListFilter::all(kind))?
                .iter()
                .map(|o| Arc::new(Decoded::of(o)))
                .collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WriteMode;
    use crate::store::sqlite::SqliteStore;

    fn host(name: &str, label: &str) -> Resource {
        Resource::from_value(
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Host",
            "metadata": {"name": name, "labels": {"l": label}}, "spec": {}}),
        )
        .unwrap()
    }

    fn label(d: &Decoded) -> String {
        match d.resource.as_ref().unwrap() {
            Resource::Host(h) => h.metadata.labels.get("l").cloned().unwrap_or_default(),
            _ => panic!("not a host"),
        }
    }

    /// A new store holding a host of each of `names`, labelled `a`.
    fn store_with_hosts(names: impl Iterator<Item = String>) -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let writes: Vec<(Resource, WriteMode)> =
            names.map(|n| (host(&n, "a"), WriteMode::Apply)).collect();
        store.write(&writes, false).unwrap();
        (dir, store)
    }

    #[test]
    fn only_objects_written_since_the_last_look_are_decoded_again() {
        let (_dir, store) = store_with_hosts((0..20).map(|i| format!("h{i:02}")));
        let cache = DecodedCache::default();

        let (first, looked) = cache.list_counted(&store, Kind::Host).unwrap();
        assert_eq!(
            looked,
            Looked {
                kept: 0,
                decoded: 20
            }
        );
        assert_eq!(first.len(), 20);
        let names: Vec<&str> = first.iter().map(|d| d.key.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "ordered by name, as a list");

        store
            .write(&[(host("h03", "b"), WriteMode::Apply)], false)
            .unwrap();
        store
            .delete(&ObjectKey::cluster(Kind::Host, "h07"), None)
            .unwrap();
        store
            .write(&[(host("h20", "c"), WriteMode::Apply)], false)
            .unwrap();
        let (second, looked) = cache.list_counted(&store, Kind::Host).unwrap();
        assert_eq!(
            looked,
            Looked {
                kept: 18,
                decoded: 2
            }
        );
        assert_eq!(second.len(), 20);
        let by_name: HashMap<&str, &Arc<Decoded>> =
            second.iter().map(|d| (d.key.name.as_str(), d)).collect();
        assert_eq!(label(by_name["h03"]), "b");
        assert_eq!(label(by_name["h20"]), "c");
        assert!(!by_name.contains_key("h07"));
        // An untouched object is the very same decoded copy.
        let before = first.iter().find(|d| d.key.name == "h05").unwrap();
        assert!(Arc::ptr_eq(before, by_name["h05"]));
    }

    #[test]
    fn a_look_at_an_unchanged_kind_shares_the_last_list() {
        let (_dir, store) = store_with_hosts((0..5).map(|i| format!("h{i}")));
        let cache = DecodedCache::default();
        let first = cache.list(&store, Kind::Host).unwrap();
        let again = cache.list(&store, Kind::Host).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the same list, not a copy");
        store
            .write(&[(host("h2", "b"), WriteMode::Apply)], false)
            .unwrap();
        let moved = cache.list(&store, Kind::Host).unwrap();
        assert!(!Arc::ptr_eq(&first, &moved));
        assert_eq!(label(&moved[2]), "b");
        assert_eq!(
            label(&first[2]),
            "a",
            "a list handed out earlier does not change"
        );
    }

    #[test]
    fn a_delete_alone_is_seen() {
        let (_dir, store) = store_with_hosts((0..3).map(|i| format!("h{i}")));
        let cache = DecodedCache::default();
        assert_eq!(cache.list(&store, Kind::Host).unwrap().len(), 3);
        let (again, looked) = cache.list_counted(&store, Kind::Host).unwrap();
        assert_eq!(
            (again.len(), looked),
            (
                3,
                Looked {
                    kept: 3,
                    decoded: 0
                }
            )
        );
        // Deleting the newest object lowers both the count and the highest version.
        store
            .delete(&ObjectKey::cluster(Kind::Host, "h0"), None)
            .unwrap();
        let names: Vec<String> = cache
            .list(&store, Kind::Host)
            .unwrap()
            .iter()
            .map(|d| d.key.name.clone())
            .collect();
        assert_eq!(names, ["h1", "h2"]);
    }

    #[test]
    fn an_object_deleted_and_created_again_under_its_name_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let cache = DecodedCache::default();
        store
            .write(&[(host("h1", "a"), WriteMode::Apply)], false)
            .unwrap();
        let first = cache.list(&store, Kind::Host).unwrap();
        store
            .delete(&ObjectKey::cluster(Kind::Host, "h1"), None)
            .unwrap();
        store
            .write(&[(host("h1", "b"), WriteMode::Apply)], false)
            .unwrap();
        let second = cache.list(&store, Kind::Host).unwrap();
        assert_ne!(first[0].uid, second[0].uid);
        assert_eq!(label(&second[0]), "b");
    }

    /// (name, uid, resourceVersion, label) of each object of a list, in its order.
    fn seen(list: &[Arc<Decoded>]) -> Vec<(String, String, u64, String)> {
        list.iter()
            .map(|d| {
                let name = d.key.name.clone();
                (name, d.uid.clone(), d.resource_version, label(d))
            })
            .collect()
    }

    #[test]
    fn objects_written_since_are_put_into_the_last_list_in_order() {
        let (_dir, store) = store_with_hosts((0..20).map(|i| format!("h{i:02}")));
        let cache = DecodedCache::default();
        let first = cache.list(&store, Kind::Host).unwrap();
        // Changed, created before, between and after the others, and deleted and created
        // again under its name: nothing gone, so the last list takes what moved.
        store
            .write(&[(host("h03", "b"), WriteMode::Apply)], false)
            .unwrap();
        for name in ["a00", "h05x", "z"] {
            store
                .write(&[(host(name, "c"), WriteMode::Apply)], false)
                .unwrap();
        }
        store
            .delete(&ObjectKey::cluster(Kind::Host, "h10"), None)
            .unwrap();
        store
            .write(&[(host("h10", "d"), WriteMode::Apply)], false)
            .unwrap();
        let (second, looked) = cache.list_counted(&store, Kind::Host).unwrap();
        assert_eq!(
            looked,
            Looked {
                kept: 18,
                decoded: 5
            }
        );
        let fresh = DecodedCache::default().list(&store, Kind::Host).unwrap();
        assert_eq!(seen(&second), seen(&fresh));
        assert_eq!(second[0].key.name, "a00");
        assert_eq!(second.last().unwrap().key.name, "z");
        let before = first.iter().find(|d| d.key.name == "h05").unwrap();
        let after = second.iter().find(|d| d.key.name == "h05").unwrap();
        assert!(Arc::ptr_eq(before, after));
        let h10 = |l: &[Arc<Decoded>]| {
            l.iter()
                .find(|d| d.key.name == "h10")
                .map(|d| d.uid.clone())
                .unwrap()
        };
        assert_ne!(h10(&first), h10(&second));
    }

    #[test]
    fn every_look_after_any_writes_is_the_whole_kind_in_order() {
        let (_dir, store) = store_with_hosts((0..40).map(|i| format!("h{i:02}")));
        let cache = DecodedCache::default();
        cache.list(&store, Kind::Host).unwrap();
        // A fixed pseudo-random walk of writes, creates, deletes and recreates.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..60 {
            for _ in 0..=next(4) {
                let name = format!("h{:02}", next(50));
                let key = ObjectKey::cluster(Kind::Host, &name);
                if next(5) == 0 {
                    let _ = store.delete(&key, None);
                } else {
                    store
                        .write(
                            &[(host(&name, &format!("r{round}")), WriteMode::Apply)],
                            false,
                        )
                        .unwrap();
                }
            }
            let listed = cache.list(&store, Kind::Host).unwrap();
            let fresh = DecodedCache::default().list(&store, Kind::Host).unwrap();
            assert_eq!(seen(&listed), seen(&fresh), "round {round}");
        }
    }

    #[test]
    fn most_objects_moved_are_read_in_one_list() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let cache = DecodedCache::default();
        let writes = |label: &str| -> Vec<(Resource, WriteMode)> {
            (0..8)
                .map(|i| (host(&format!("h{i}"), label), WriteMode::Apply))
                .collect()
        };
        store.write(&writes("a"), false).unwrap();
        cache.list(&store, Kind::Host).unwrap();
        store.write(&writes("b"), false).unwrap();
        let (all, looked) = cache.list_counted(&store, Kind::Host).unwrap();
        assert_eq!(
            looked,
            Looked {
                kept: 0,
                decoded: 8
            }
        );
        assert!(all.iter().all(|d| label(d) == "b"));
    }
}
