//! A store for tests: the SQLite store, with hooks that reproduce what a busy server sees (an
//! index read before a write committed, another request acting while a token is looked up).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::watch;

use super::sqlite::SqliteStore;
use super::{ListFilter, Store, StoreError, StoredObject, TokenRecord, WriteMode, WriteSummary};
use crate::audit::{AuditEntry, AuditFilter, AuditRecord, AuditVerification};
use crate::model::{ObjectKey, Resource};

/// Work run by a hook.
pub type Hook = Box<dyn FnOnce() + Send>;

/// Wraps a [`SqliteStore`]; every call goes to it unless a hook says otherwise. The snapshot
/// reads (`get_at`, `list_at`) are the trait's defaults, built on `index`, `get` and `list`.
pub struct HookStore {
    pub inner: SqliteStore,
    /// When set, [`Store::index`] answers this, as if it had been read before later writes.
    pub stale_index: Mutex<Option<u64>>,
    /// Runs once, after the next token lookup has read its record and before it returns.
    pub after_token_lookup: Mutex<Option<Hook>>,
    /// Calls of [`Store::append_audit`] so far.
    pub audit_appends: AtomicU32,
    /// The next this many calls of [`Store::append_audit`] fail, as a full disk would.
    pub audit_failures: AtomicU32,
    /// When set, [`Store::changes_since`] answers this instead of reading the log:
    /// `Ok(oldest)` as a log pruned past the version asked for, `Err(message)` as a failing
    /// store.
    pub changes: Mutex<Option<Result<u64, String>>>,
    /// The next this many calls of [`Store::list`] (and of the reads built on it) fail.
    pub list_failures: AtomicU32,
}

impl HookStore {
    pub fn new(inner: SqliteStore) -> Self {
        HookStore {
            inner,
            stale_index: Mutex::new(None),
            after_token_lookup: Mutex::new(None),
            audit_appends: AtomicU32::new(0),
            audit_failures: AtomicU32::new(0),
            changes: Mutex::new(None),
            list_failures: AtomicU32::new(0),
        }
    }
}

impl Store for HookStore {
    fn server_heartbeat(
        &self,
        beat: &super::replicas::ReplicaBeat,
        prune_after: std::time::Duration,
    ) -> Result<(), StoreError> {
        self.inner.server_heartbeat(beat, prune_after)
    }
    fn server_replicas(&self) -> Result<super::replicas::Replicas, StoreError> {
        self.inner.server_replicas()
    }
    fn record_events(&self, events: Vec<crate::events::Event>) {
        self.inner.record_events(events)
    }
    fn flush_events(&self) -> Result<usize, StoreError> {
        self.inner.flush_events()
    }
    fn prune_events(
        &self,
        retention: &crate::events::Retention,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        self.inner.prune_events(retention, now_ms)
    }
    fn list_events(
        &self,
        filter: &crate::events::EventFilter,
    ) -> Result<(u64, Vec<crate::events::EventRecord>), StoreError> {
        self.inner.list_events(filter)
    }
    fn subscribe_events(&self) -> Option<watch::Receiver<u64>> {
        self.inner.subscribe_events()
    }
    fn changes_since(
        &self,
        feed: super::Feed,
        after: u64,
        limit: usize,
    ) -> Result<super::ChangesSince, StoreError> {
        match self
            .changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            Some(Ok(oldest)) => Ok(super::ChangesSince::Gone { oldest }),
            Some(Err(message)) => Err(StoreError::Backend(message)),
            None => self.inner.changes_since(feed, after, limit),
        }
    }
    fn index(&self) -> u64 {
        let stale = *self.stale_index.lock().unwrap_or_else(|e| e.into_inner());
        stale.unwrap_or_else(|| self.inner.index())
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.subscribe()
    }
    fn desired_index(&self) -> u64 {
        self.inner.desired_index()
    }
    fn subscribe_desired(&self) -> watch::Receiver<u64> {
        self.inner.subscribe_desired()
    }
    fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
        self.inner.get(key)
    }
    fn list(&self, filter: &ListFilter) -> Result<Vec<StoredObject>, StoreError> {
        let failing = self
            .list_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(StoreError::Backend("disk I/O error (a test's hook)".into()));
        }
        self.inner.list(filter)
    }
    fn write(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
    ) -> Result<WriteSummary, StoreError> {
        self.inner.write(batch, dry_run)
    }
    fn write_noted(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
        note: &super::ChangeNote,
    ) -> Result<WriteSummary, StoreError> {
        self.inner.write_noted(batch, dry_run, note)
    }
    fn config_revisions(&self, uid: &str) -> Result<Vec<super::RevisionRecord>, StoreError> {
        self.inner.config_revisions(uid)
    }
    fn config_revision(
        &self,
        uid: &str,
        revision: u64,
    ) -> Result<Option<super::RevisionRecord>, StoreError> {
        self.inner.config_revision(uid, revision)
    }
    fn current_configs(
        &self,
    ) -> Result<std::collections::HashMap<String, (u64, String)>, StoreError> {
        self.inner.current_configs()
    }
    fn newest_revisions(&self) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        self.inner.newest_revisions()
    }
    fn revision_contents(
        &self,
        wanted: &[(String, u64)],
    ) -> Result<Vec<super::revisions::RevisionContent>, StoreError> {
        self.inner.revision_contents(wanted)
    }
    fn deleted_volumes(&self) -> Result<Vec<super::revisions::DeletedVolume>, StoreError> {
        self.inner.deleted_volumes()
    }
    fn record_host_volumes(
        &self,
        host: &str,
        listed: &[super::volumes::ReportedVolume],
        now: &str,
    ) -> Result<bool, StoreError> {
        self.inner.record_host_volumes(host, listed, now)
    }
    fn host_volumes(
        &self,
        host: Option<&str>,
    ) -> Result<Vec<super::volumes::HostVolume>, StoreError> {
        self.inner.host_volumes(host)
    }
    fn volume_deletions(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.volume_deletions()
    }
    fn mark_orphaned_volumes(
        &self,
        marks: &[(String, String, Option<String>)],
    ) -> Result<(), StoreError> {
        self.inner.mark_orphaned_volumes(marks)
    }
    fn request_volume_deletion(
        &self,
        host: &str,
        name: &str,
        reason: &str,
        now: &str,
    ) -> Result<(Option<super::volumes::HostVolume>, u64), StoreError> {
        self.inner.request_volume_deletion(host, name, reason, now)
    }
    fn forget_host_volumes(&self, host: &str) -> Result<(), StoreError> {
        self.inner.forget_host_volumes(host)
    }
    fn sealed_values(&self) -> Result<Vec<super::SealedValue>, StoreError> {
        self.inner.sealed_values()
    }
    fn reseal(
        &self,
        reseal: &mut dyn FnMut(&super::SealedValue) -> Result<String, StoreError>,
    ) -> Result<usize, StoreError> {
        self.inner.reseal(reseal)
    }
    fn update(
        &self,
        key: &ObjectKey,
        change: &mut dyn FnMut(&mut Resource) -> bool,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.update(key, change)
    }
    fn update_many(
        &self,
        keys: &[ObjectKey],
        change: &mut dyn FnMut(&mut Resource) -> bool,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.update_many(keys, change)
    }
    fn delete(&self, key: &ObjectKey, expected: Option<u64>) -> Result<u64, StoreError> {
        self.inner.delete(key, expected)
    }
    fn delete_batch(
        &self,
        keys: &[ObjectKey],
        skip_missing: bool,
        dry_run: bool,
        audit: Option<super::DeleteAudit<'_>>,
    ) -> Result<(super::DeleteSummary, Vec<crate::audit::AuditRecord>), StoreError> {
        self.inner.delete_batch(keys, skip_missing, dry_run, audit)
    }
    fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.inner.insert_token(token)
    }
    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let found = self.inner.token_by_hash(hash);
        let hook = self
            .after_token_lookup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(hook) = hook {
            hook();
        }
        found
    }
    fn consume_join_token(&self, hash: &str, now: i64) -> Result<TokenRecord, StoreError> {
        self.inner.consume_join_token(hash, now)
    }
    fn enroll_host(
        &self,
        join_token_hash: &str,
        now: i64,
        host: Resource,
    ) -> Result<StoredObject, StoreError> {
        self.inner.enroll_host(join_token_hash, now, host)
    }
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.inner.list_tokens()
    }
    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.revoke_token(id)
    }
    fn open_console_session(
        &self,
        row: &super::sessions::SessionRow,
        limits: &super::sessions::SessionLimits,
    ) -> Result<(), StoreError> {
        self.inner.open_console_session(row, limits)
    }
    fn console_session(
        &self,
        id_hash: &str,
    ) -> Result<Option<super::sessions::SessionRow>, StoreError> {
        self.inner.console_session(id_hash)
    }
    fn touch_console_session(&self, id_hash: &str, at_ms: i64) -> Result<bool, StoreError> {
        self.inner.touch_console_session(id_hash, at_ms)
    }
    fn close_console_session(&self, id_hash: &str) -> Result<bool, StoreError> {
        self.inner.close_console_session(id_hash)
    }
    fn record_heartbeats(&self, beats: &[(&str, i64)]) -> Result<(), StoreError> {
        self.inner.record_heartbeats(beats)
    }
    fn host_heartbeats(&self) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        self.inner.host_heartbeats()
    }
    fn forget_heartbeat(&self, host: &str) -> Result<(), StoreError> {
        self.inner.forget_heartbeat(host)
    }
    fn append_audit(&self, entries: &[AuditEntry]) -> Result<Vec<AuditRecord>, StoreError> {
        self.audit_appends.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .audit_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(StoreError::Backend("disk I/O error (injected)".into()));
        }
        self.inner.append_audit(entries)
    }
    fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.list_audit(filter)
    }
    fn verify_audit(&self) -> Result<AuditVerification, StoreError> {
        self.inner.verify_audit()
    }
}
