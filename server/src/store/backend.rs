//! The narrow interface a storage engine implements under the store's write path: plain
//! reads and writes of rows inside one transaction, and nothing that decides.
//!
//! The rules of a write (admission, parents and children, quotas, join tokens, the audit
//! chain, what a change moves) live above it, in [`super::rules`], once for every engine. An
//! engine opens a transaction that no other writer can interleave with (SQLite: its one
//! writer; PostgreSQL: the locked index row), hands it to the rules as a [`Tx`] with the next
//! index, and commits only what the rules say changed.

use crate::audit::AuditRecord;
use crate::model::{Kind, ObjectKey, Secret};
use crate::openclaw::schema::Schema;

use super::revisions::ChangeNote;
use super::{StoreError, StoredObject, TokenRecord, Usage};

/// Tells which document of a batch a problem comes from.
pub type Blame<'a> = &'a dyn Fn(&ObjectKey, StoreError) -> StoreError;

/// One write transaction of an engine. Every method reads or writes rows as they are; none
/// checks a business rule.
pub trait Tx {
    /// One object, or `None`.
    fn get(&mut self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError>;
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

    /// Keeps a secret's sealed values (its `data`, taken out of the object) apart from the
    /// object.
    fn seal_secret(&mut self, secret: &mut Secret) -> Result<(), StoreError>;
    /// Makes the instance revisions a change of `changed` calls for (at index `index`).
    fn revise(
        &mut self,
        changed: &[ObjectKey],
        note: &ChangeNote,
        schema: &Schema,
        index: u64,
        now: &str,
        blame: Blame<'_>,
    ) -> Result<(), StoreError>;
    /// What deleting `key` takes along or is refused for beyond its children (a template or
    /// secret still in use, volumes kept of a deleted instance).
    fn before_delete(&mut self, key: &ObjectKey) -> Result<(), StoreError>;
}
