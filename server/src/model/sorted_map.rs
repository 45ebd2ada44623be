//! [`SortedMap`]: a small map kept as a vector sorted by key.
//!
//! An object's labels and its environment hold a handful of entries, and the decoded objects
//! the control loops share ([`crate::store::decoded`]) keep one of each per stored instance.
//! A `BTreeMap` with one entry allocates a whole node of eleven slots (about 550 bytes for
//! labels, 800 for an environment); a sorted vector holds what it has. Lookups are a binary
//! search, which is as fast as a tree at these sizes. The map reads, writes and compares as a
//! `BTreeMap` does: entries in key order, a later duplicate key replacing the earlier one.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// See the module documentation.
#[derive(Clone, PartialEq, Eq)]
pub struct SortedMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SortedMap<K, V> {
    fn default() -> Self {
        SortedMap(Vec::new())
    }
}

impl<K: Ord, V> SortedMap<K, V> {
    pub fn new() -> Self {
        SortedMap(Vec::new())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn find<Q>(&self, key: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.0.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value`, returning the value it replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    /// The entries in key order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        Iter(self.0.iter())
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + ExactSizeIterator {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.0.iter().map(|(_, v)| v)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.0.retain_mut(|(k, v)| keep(k, v));
    }

    /// Entries in any order: sorted once (not inserted one by one, which would cost a move of
    /// the tail per entry); of entries with the same key the last one stays, as with `BTreeMap`.
    fn from_unsorted(mut entries: Vec<(K, V)>) -> Self {
        // A stable sort keeps the entries of one key in their given order.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        // In place: a later entry of a kept key hands its value over and is dropped.
        entries.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(&mut later.1, &mut kept.1);
            }
            same
        });
        SortedMap(entries)
    }

    /// Gives back spare room (see [`crate::model::Resource::compact`]).
    pub fn shrink_to_fit(&mut self) {
        self.0.shrink_to_fit();
    }
}

/// [`SortedMap::iter`]: `(&K, &V)` pairs in key order, as a `BTreeMap` gives them.
pub struct Iter<'a, K, V>(std::slice::Iter<'a, (K, V)>);

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k, v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl<K, V> ExactSizeIterator for Iter<'_, K, V> {}

impl<'a, K: Ord, V> IntoIterator for &'a SortedMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<K, V> IntoIterator for SortedMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for SortedMap<K, V> {
    /// As `BTreeMap`: a later entry of the same key replaces an earlier one.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Self {
        SortedMap::from_unsorted(entries.into_iter().collect())
    }
}

impl<K: Ord, V> Extend<(K, V)> for SortedMap<K, V> {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, entries: I) {
        for (k, v) in entries {
            self.insert(k, v);
        }
    }
}

impl<K: Ord, V, const N: usize> From<[(K, V); N]> for SortedMap<K, V> {
    fn from(entries: [(K, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl<K: Ord, V> From<BTreeMap<K, V>> for SortedMap<K, V> {
    fn from(map: BTreeMap<K, V>) -> Self {
        // Already in key order, each key once.
        SortedMap(map.into_iter().collect())
    }
}

impl<K: Ord + Clone, V: Clone> From<&SortedMap<K, V>> for BTreeMap<K, V> {
    fn from(map: &SortedMap<K, V>) -> Self {
        map.0.iter().cloned().collect()
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for SortedMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl<K: Serialize, V: Serialize> Serialize for SortedMap<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, K, V> Deserialize<'de> for SortedMap<K, V>
where
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<K, V>(PhantomData<(K, V)>);

        impl<'de, K, V> Visitor<'de> for MapVisitor<K, V>
        where
            K: Deserialize<'de> + Ord,
            V: Deserialize<'de>,
        {
            type Value = SortedMap<K, V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                // Room for what the input says it holds, but never more than a few entries on
                // its word alone.
                let mut entries = Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
                while let Some(entry) = access.next_entry()? {
                    entries.push(entry);
                }
                Ok(SortedMap::from_unsorted(entries))
            }
        }

        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_reads_writes_and_orders_as_a_btree_map_does() {
        let text = r#"{"b": "2", "a": "1", "c": "3", "a": "last"}"#;
        let sorted: SortedMap<String, String> = serde_json::from_str(text).unwrap();
        let tree: BTreeMap<String, String> = serde_json::from_str(text).unwrap();
        assert_eq!(
            serde_json::to_string(&sorted).unwrap(),
            serde_json::to_string(&tree).unwrap()
        );
        assert_eq!(BTreeMap::from(&sorted), tree);
        assert_eq!(SortedMap::from(tree.clone()), sorted);
        assert_eq!(sorted.get("a").map(String::as_str), Some("last"));
        assert_eq!(sorted.len(), 3);
        let keys: Vec<&String> = sorted.keys().collect();
        assert_eq!(keys, tree.keys().collect::<Vec<_>>());
        assert_eq!(format!("{sorted:?}"), format!("{tree:?}"));
    }

    #[test]
    fn inserts_and_removals_keep_the_keys_in_order() {
        let mut m: SortedMap<String, u32> = [("m".to_string(), 1), ("a".to_string(), 2)].into();
        assert_eq!(m.insert("z".into(), 3), None);
        assert_eq!(m.insert("a".into(), 4), Some(2));
        assert!(m.contains_key("m"));
        assert_eq!(m.remove("m"), Some(1));
        assert_eq!(m.remove("m"), None);
        let entries: Vec<(&String, &u32)> = m.iter().collect();
        assert_eq!(
            entries,
            vec![(&"a".to_string(), &4), (&"z".to_string(), &3)]
        );
        m.retain(|k, _| k != "a");
        assert_eq!(
            m.into_iter().collect::<Vec<_>>(),
            vec![("z".to_string(), 3)]
        );
    }

    #[test]
    fn a_bad_value_is_refused_with_its_key_in_the_path() {
        let text = r#"{"ok": "1", "bad": 2}"#;
        let de = &mut serde_json::Deserializer::from_str(text);
        let e = serde_path_to_error::deserialize::<_, SortedMap<String, String>>(de).unwrap_err();
        assert_eq!(e.path().to_string(), "bad");
    }
}
