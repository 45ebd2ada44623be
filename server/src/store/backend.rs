//! The narrow interface a storage engine implements under the store's write path: plain
//! reads and writes of rows inside one transaction, and nothing that decides.
//!
//! The rules of a write (admission, parents and children, quotas, join tokens, the audit
//! chain, what a change moves) live above it, in [`super::rules`], once for every engine. An
//! engine opens a transaction that no other writer can interleave with (SQLite: its one
//! writer; PostgreSQL: the locked index row), hands it to the rules as a [`Tx`] with the next
//! index, and commits only what the rules say changed.

use std::collections::HashMap;

use crate::audit::AuditRecord;
use crate::events::{Event, EventFilter, EventRecord, Folded};
use crate::model::{Kind, ObjectKey};

use super::feed::Change;
use super::revisions::{DeletedVolume, SealedValue};
use super::volumes::{HostVolume, ReportedVolume};
use super::{StoreError, StoredObject, TokenRecord, Usage};

/// Tells which document of a batch a problem comes from.
pub type Blame<'a> = &'a dyn Fn(&ObjectKey, StoreError) -> StoreError;

/// One transaction of an engine (a write, or a read snapshot where only reads are called).
/// Every method reads or writes rows as they are; none checks a business rule. `put` and
/// `remove` also log the change (ADDED, MODIFIED, DELETED at the next index) for watches.
pub trait Tx {
    /// One object, or `None`.
    fn get(&mut self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError>;
    /// An object's uid and `resourceVersion` without its body, or `None`: what an update needs
    /// to find the object in the decoded cache (a large instance's body is tens of KiB).
    fn head(&mut self, key: &ObjectKey) -> Result<Option<(String, u64)>, StoreError> {
        Ok(self.get(key)?.map(|o| (o.uid, o.resource_version)))
    }
    /// Whether the object exists.
    fn exists(&mut self, key: &ObjectKey) -> Result<bool, StoreError> {
        Ok(self.get(key)?.is_some())
    }
    /// Writes one object whole (insert or replace); `usage` is what it consumes.
    fn put(&mut self, object: &StoredObject, usage: Usage) -> Result<(), StoreError>;
    /// Removes one object (it exists).
    fn remove(&mut self, object: &StoredObject) -> Result<(), StoreError>;
    /// How many objects of `kind` live in `tenant` (and `project`, when given).
    fn count(&mut self, kind: Kind, tenant: &str, project: Option<&str>)
    -> Result<u64, StoreError>;
    /// What the instances of `tenant` (or of one project in it) consume.
    fn usage(&mut self, tenant: &str, project: Option<&str>) -> Result<Usage, StoreError>;

    /// A token by the SHA-256 of its secret.
    fn token_by_hash(&mut self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Sets the uses left of a token.
    fn set_token_uses(&mut self, id: &str, uses: i64) -> Result<(), StoreError>;

    /// The end of the audit log: the last record's `seq` and hash (0 and `None` when empty)
    /// and how many records the log has written (kept apart, so that cut-off rows show).
    fn audit_head(&mut self) -> Result<(u64, Option<String>, u64), StoreError>;
    /// Appends records made by [`super::rules::append_audit`], in order.
    fn audit_insert(&mut self, records: &[AuditRecord]) -> Result<(), StoreError>;
    /// Records how many audit records were written.
    fn set_audit_written(&mut self, written: u64) -> Result<(), StoreError>;

    /// The index of the last committed write (the transaction's own write takes the next).
    fn index(&mut self) -> Result<u64, StoreError>;
    /// Objects of `kind` in `tenant`, by project and name.
    fn list_in_tenant(&mut self, kind: Kind, tenant: &str)
    -> Result<Vec<StoredObject>, StoreError>;
    /// The instances `reach` names, by tenant, project and name.
    fn instances(&mut self, reach: Reach<'_>) -> Result<Vec<StoredObject>, StoreError>;
    /// A counter kept beside the index (`changes_from`, `events_seq`, `events_from`); 0 when
    /// missing.
    fn meta(&mut self, key: &'static str) -> Result<u64, StoreError>;
    /// Raises a counter to `value` (never lowers it).
    fn raise_meta(&mut self, key: &'static str, value: u64) -> Result<(), StoreError>;

    // Sealed secret values, kept apart from the secret objects.
    /// Replaces the sealed values of secret `key` by `values` (key name, sealed text).
    fn put_secret_values(
        &mut self,
        key: &ObjectKey,
        values: &[(String, String)],
    ) -> Result<(), StoreError>;
    /// Drops every value of secret `key`.
    fn drop_secret_values(&mut self, key: &ObjectKey) -> Result<(), StoreError>;
    /// The sealed value of one key of secret `secret`.
    fn sealed_value(&mut self, secret: &ObjectKey, key: &str)
    -> Result<Option<String>, StoreError>;
    /// Every sealed value, by tenant, project, name and key.
    fn sealed_values(&mut self) -> Result<Vec<SealedValue>, StoreError>;
    /// Replaces the sealed text of one stored value.
    fn set_sealed(&mut self, value: &SealedValue) -> Result<(), StoreError>;

    // Instance revisions.
    /// The newest revision of an instance.
    fn latest_revision(&mut self, uid: &str) -> Result<Option<RevisionRow>, StoreError>;
    /// One revision of an instance.
    fn revision(&mut self, uid: &str, revision: u64) -> Result<Option<RevisionRow>, StoreError>;
    /// Every revision of an instance, newest first.
    fn revisions(&mut self, uid: &str) -> Result<Vec<RevisionRow>, StoreError>;
    /// Adds a revision.
    fn insert_revision(&mut self, row: &RevisionRow) -> Result<(), StoreError>;
    /// The revision numbers of an instance up to `upto`.
    fn revision_numbers(&mut self, uid: &str, upto: u64) -> Result<Vec<u64>, StoreError>;
    /// Drops one revision of an instance, or (`None`) all of them.
    fn drop_revisions(&mut self, uid: &str, revision: Option<u64>) -> Result<(), StoreError>;
    /// The newest revision number of every instance.
    fn newest_revisions(&mut self) -> Result<HashMap<String, u64>, StoreError>;
    /// The newest revision of every instance: uid → (revision, config text).
    fn current_configs(&mut self) -> Result<HashMap<String, (u64, String)>, StoreError>;
    /// (uid, revision, secrets text) of the revisions that hold secret values.
    fn revisions_holding_secrets(&mut self) -> Result<Vec<(String, u64, String)>, StoreError>;
    /// Replaces the secrets text of one revision.
    fn set_revision_secrets(
        &mut self,
        uid: &str,
        revision: u64,
        secrets: &str,
    ) -> Result<(), StoreError>;

    // Volumes kept of deleted instances.
    /// The volumes kept of deleted instances (of one instance by tenant, project and name, or
    /// all), by host, tenant, project, instance and ordinal.
    fn retained_volumes(
        &mut self,
        instance: Option<(&str, &str, &str)>,
    ) -> Result<Vec<DeletedVolume>, StoreError>;
    /// Keeps one volume of a deleted instance (replacing what was kept of that replica).
    fn keep_volume(&mut self, volume: &DeletedVolume) -> Result<(), StoreError>;
    /// Lets go of the kept volumes of an instance (all, or one replica's on one host).
    fn drop_retained_volumes(
        &mut self,
        instance: (&str, &str, &str),
        replica_on: Option<(&str, &str)>,
    ) -> Result<(), StoreError>;

    // The state volumes hosts report.
    /// The reported volumes of one host (or all), by host and name.
    fn host_volumes(&mut self, host: Option<&str>) -> Result<Vec<HostVolume>, StoreError>;
    /// (host, name) of every reported volume whose removal was asked for, by host and name:
    /// the few rows with `delete_requested` set, without reading the others' columns.
    fn requested_volume_deletions(&mut self) -> Result<Vec<(String, String)>, StoreError>;
    /// Adds or updates one reported volume (first seen `now` when new).
    fn put_host_volume(
        &mut self,
        host: &str,
        volume: &ReportedVolume,
        now: &str,
    ) -> Result<(), StoreError>;
    /// Drops one reported volume, or (`None`) every volume of the host.
    fn drop_host_volumes(&mut self, host: &str, name: Option<&str>) -> Result<(), StoreError>;
    /// Sets or clears since when a volume is orphaned.
    fn set_orphaned(
        &mut self,
        host: &str,
        name: &str,
        since: Option<&str>,
    ) -> Result<(), StoreError>;
    /// Records that a volume's removal was asked for (the first ask is kept).
    fn set_volume_deletion(
        &mut self,
        host: &str,
        name: &str,
        now: &str,
        reason: &str,
    ) -> Result<(), StoreError>;

    // The change log (written by `put` and `remove`).
    /// Object changes after index `after`, in order, at most `limit`: a read of the changes
    /// after `after` only, however long the log.
    fn change_rows(&mut self, after: u64, limit: usize) -> Result<Vec<Change>, StoreError>;
    /// The index of the change `offset` places from the newest.
    fn change_rv_from_newest(&mut self, offset: u64) -> Result<Option<u64>, StoreError>;
    /// Drops the changes of indexes up to `upto`.
    fn drop_changes(&mut self, upto: u64) -> Result<(), StoreError>;

    // Events.
    /// The newest stored event identical to `event` last seen at or after `since_ms`.
    fn find_event(&mut self, event: &Event, since_ms: i64) -> Result<Option<i64>, StoreError>;
    /// Adds `count` occurrences to stored event `id`, last seen `last_ms`, at sequence `seq`.
    fn fold_event(&mut self, id: i64, count: u64, last_ms: i64, seq: u64)
    -> Result<(), StoreError>;
    /// Stores a new event at sequence `seq`.
    fn insert_event(&mut self, seq: u64, event: &Folded) -> Result<(), StoreError>;
    /// Deletes events last seen before `cutoff_ms`: (newest sequence deleted, how many).
    fn drop_events_before(&mut self, cutoff_ms: i64) -> Result<(u64, usize), StoreError>;
    /// How many events each tenant has.
    fn event_counts(&mut self) -> Result<Vec<(String, u64)>, StoreError>;
    /// Deletes the `n` oldest events of `tenant`: (newest sequence deleted, how many).
    fn drop_oldest_events(&mut self, tenant: &str, n: u64) -> Result<(u64, usize), StoreError>;
    /// Stored events matching `filter` (not scoped), newest first, at most its limit.
    fn events(&mut self, filter: &EventFilter) -> Result<Vec<EventRecord>, StoreError>;
    /// Events written after sequence `after`, in sequence order, at most `limit`.
    fn events_after(&mut self, after: u64, limit: usize) -> Result<Vec<EventRecord>, StoreError>;
}

/// Which instances a change reaches.
#[derive(Clone, Copy, Debug)]
pub enum Reach<'a> {
    All,
    Tenant(&'a str),
    Project(&'a str, &'a str),
    /// Those rendered with the named template (none named: the default one).
    Template(&'a str),
}

/// One stored instance revision, as a row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RevisionRow {
    pub instance_uid: String,
    pub revision: u64,
    pub tenant: String,
    pub project: String,
    pub instance: String,
    pub config: String,
    pub hash: String,
    pub layers: String,
    pub author: String,
    pub message: String,
    pub created_at: String,
    pub image: Option<String>,
    pub env: Option<String>,
    pub resources: Option<String>,
    pub secrets: Option<String>,
    pub spec: Option<String>,
    pub content_hash: String,
}
