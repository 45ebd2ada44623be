//! Persistence of objects and tokens behind the [`Store`] trait; SQLite is the embedded default.

mod admission;
pub mod backend;
#[cfg(test)]
mod conformance;
pub mod decoded;
pub mod feed;
#[cfg(test)]
mod feed_tests;
pub mod lease;
pub mod migrate;
pub mod postgres;
pub mod replicas;
#[cfg(test)]
mod revision_tests;
pub mod revisions;
pub mod rules;
mod scope;
pub mod sessions;
pub mod sqlite;
#[cfg(test)]
pub mod testing;
pub mod volumes;
pub mod waves;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::audit::{AuditEntry, AuditFilter, AuditRecord, AuditVerification};
use crate::model::{FieldProblem, Kind, ObjectKey, Resource};

pub use admission::{Admitted, admit};
pub use feed::{Change, ChangeType, ChangesSince, Feed};
pub use revisions::{ChangeNote, RevisionRecord, SealedValue};
pub use scope::{AuditHook, Scope, Scoped, UsageByTenant};

/// The table of the identity of the key file secret values are sealed with (both engines):
/// recorded by the first server that uses the store, checked by every later one.
pub const SECRETS_KEY_MIGRATION: &str = "CREATE TABLE IF NOT EXISTS meta_keys (
        name TEXT PRIMARY KEY,
        identity TEXT NOT NULL,
        recorded_at TEXT NOT NULL
    );";

/// The row of [`SECRETS_KEY_MIGRATION`] that names the secrets key.
pub const SECRETS_KEY_ROW: &str = "secrets.key";

/// One object as stored: its identity, concurrency fields and the whole object as JSON text
/// (metadata, spec and status), ready to be served without re-encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredObject {
    pub key: ObjectKey,
    pub uid: String,
    pub generation: i64,
    pub resource_version: u64,
    pub labels: BTreeMap<String, String>,
    pub json: String,
}

impl StoredObject {
    /// Decodes the stored JSON; it was validated when written, so failure means corruption.
    pub fn resource(&self) -> Result<Resource, StoreError> {
        serde_json::from_str(&self.json)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", self.key)))
    }
}

/// How a write treats an object that already exists (or does not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// `POST`: fails with [`StoreError::AlreadyExists`] if the object exists.
    Create,
    /// `apply` / `PUT`: create or update.
    Apply,
    /// Update only: fails with [`StoreError::NotFound`] if the object does not exist.
    Update,
}

/// What a write did to one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

#[derive(Clone, Debug)]
pub struct WriteResult {
    pub key: ObjectKey,
    pub outcome: Outcome,
    pub object: StoredObject,
    /// The object's generation before the write; `None` when it was created.
    pub previous_generation: Option<i64>,
}

/// The result of one all-or-nothing write.
#[derive(Clone, Debug)]
pub struct WriteSummary {
    /// The store index after the write (unchanged when every object was unchanged).
    pub index: u64,
    /// One result per request, in request order.
    pub results: Vec<WriteResult>,
}

/// Makes the audit entries of one object a batch delete removes, from its key and generation.
/// What [`Store::versions_after`] reads: the kind's fingerprint (count, highest
/// `resourceVersion`) and the (key, uid, `resourceVersion`) of each object written since.
pub type VersionsAfter = ((u64, u64), Vec<(ObjectKey, String, u64)>);
pub type DeleteAudit<'a> = &'a mut dyn FnMut(&ObjectKey, Option<i64>) -> Vec<AuditEntry>;

/// The result of one all-or-nothing batch delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteSummary {
    /// The store index after the delete (unchanged when nothing was deleted).
    pub index: u64,
    /// Per key, in the order given: whether it was deleted (`false`: it did not exist and
    /// missing keys were allowed).
    pub deleted: Vec<bool>,
}

/// A label requirement of a list: `key=value`, `key!=value`, `key` (exists), `!key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl LabelRequirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            LabelRequirement::Equals(k, v) => labels.get(k) == Some(v),
            LabelRequirement::NotEquals(k, v) => labels.get(k) != Some(v),
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::NotExists(k) => !labels.contains_key(k),
        }
    }

    /// Parses a selector such as `region=eu,tier!=gold,gpu,!legacy`.
    pub fn parse_selector(s: &str) -> Result<Vec<LabelRequirement>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let req = if let Some((k, v)) = part.split_once("!=") {
                LabelRequirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                LabelRequirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                LabelRequirement::NotExists(k.trim().into())
            } else {
                LabelRequirement::Exists(part.into())
            };
            let (key, value) = match &req {
                LabelRequirement::Equals(k, v) | LabelRequirement::NotEquals(k, v) => (k, Some(v)),
                LabelRequirement::Exists(k) | LabelRequirement::NotExists(k) => (k, None),
            };
            crate::model::validate_label_key(key)
                .and_then(|()| value.map_or(Ok(()), |v| crate::model::validate_label_value(v)))
                .map_err(|e| format!("label selector {s:?}: {e}"))?;
            out.push(req);
        }
        Ok(out)
    }
}

/// Which objects a list returns.
#[derive(Clone, Debug)]
pub struct ListFilter {
    pub kind: Kind,
    pub tenant: Option<String>,
    pub project: Option<String>,
    /// One object by name (how a tenant-scoped caller lists tenants).
    pub name: Option<String>,
    pub labels: Vec<LabelRequirement>,
}

impl ListFilter {
    pub fn all(kind: Kind) -> Self {
        ListFilter {
            kind,
            tenant: None,
            project: None,
            name: None,
            labels: Vec::new(),
        }
    }
}

/// What instances consume, counted against quotas: cpu and memory are per replica times
/// replicas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub instances: i64,
    pub replicas: i64,
    pub cpu_millis: i64,
    pub memory_bytes: i64,
}

impl Usage {
    /// One instance's demand.
    pub fn of(r: &Resource) -> Usage {
        match r {
            Resource::OpenClawInstance(i) => Usage {
                instances: 1,
                replicas: i.spec.replicas,
                cpu_millis: i.spec.replicas * i.spec.cpu_millis() as i64,
                memory_bytes: i.spec.replicas * i.spec.memory_bytes() as i64,
            },
            _ => Usage::default(),
        }
    }

    pub fn add(&mut self, o: Usage) {
        self.instances += o.instances;
        self.replicas += o.replicas;
        self.cpu_millis += o.cpu_millis;
        self.memory_bytes += o.memory_bytes;
    }
}

/// A bearer credential. The secret itself is never stored, only its SHA-256.
// `Debug` is written by hand so that it does not show the hash either.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    /// Public identifier (not secret), used to list and revoke.
    pub id: String,
    pub name: String,
    pub kind: TokenKind,
    /// Role of an API token (`platform-admin`, ...); empty for join tokens.
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Uses left for a join token limited in uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_remaining: Option<i64>,
    pub revoked: bool,
    #[serde(skip)]
    pub hash: String,
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("role", &self.role)
            .field("tenant", &self.tenant)
            .field("project", &self.project)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("uses_remaining", &self.uses_remaining)
            .field("revoked", &self.revoked)
            .field("hash", &"***")
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Authenticates API calls.
    Api,
    /// Lets an agent enroll a host; refused by the API.
    Join,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Api => "api",
            TokenKind::Join => "join",
        }
    }
}

/// Why a join token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinRefusal {
    Unknown,
    Expired,
    UsedUp,
    Revoked,
    NotAJoinToken,
}

/// The outcomes of `count` writes that failed together with `e`: the first gets `e`, the
/// others its text.
pub fn failed_together<T>(e: StoreError, count: usize) -> Vec<Result<T, StoreError>> {
    let text = e.to_string();
    let mut first = Some(e);
    (0..count)
        .map(|_| {
            Err(first
                .take()
                .unwrap_or_else(|| StoreError::Backend(text.clone())))
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(ObjectKey),
    /// A write would take a tenant or project over its quota.
    #[error("quota exceeded for {scope}: {resource} {requested} requested, {free} of {limit} free")]
    QuotaExceeded {
        /// `tenant enterprise-a`, `project enterprise-a/helpdesk`.
        scope: String,
        /// `instances`, `replicas`, `cpu`, `memory`.
        resource: &'static str,
        requested: String,
        free: String,
        limit: String,
    },
    /// A project's quota above its tenant's.
    #[error("{0}")]
    QuotaAboveParent(String),
    #[error("{0} already exists")]
    AlreadyExists(ObjectKey),
    #[error(
        "{key} has been modified: resourceVersion {given} was given but the object is at {current}; read it again and retry"
    )]
    Conflict {
        key: ObjectKey,
        given: u64,
        current: u64,
    },
    #[error(
        "{key} was deleted or never existed; a resourceVersion ({given}) was given, which only makes sense for an update"
    )]
    Gone { key: ObjectKey, given: u64 },
    #[error("{parent} does not exist; create it before {key}")]
    ParentMissing {
        key: ObjectKey,
        parent: Box<ObjectKey>,
    },
    /// A template or secret that instances still use.
    #[error("{message}")]
    InUse { key: ObjectKey, message: String },
    #[error("{key} still has {count} {}; delete {} first", noun(*.count, .child), if *.count == 1 { "it" } else { "them" })]
    HasChildren {
        key: ObjectKey,
        count: usize,
        child: &'static str,
    },
    #[error("item {index}: {source}")]
    InBatch {
        index: usize,
        #[source]
        source: Box<StoreError>,
    },
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldProblem>),
    #[error("join token refused: {0:?}")]
    JoinRefused(JoinRefusal),
    #[error(
        "the database {path} has schema version {found}, newer than this clusterclaw supports ({supported}); run a newer clusterclaw, or restore a backup made by this version"
    )]
    SchemaTooNew {
        path: String,
        found: i64,
        supported: i64,
    },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Backend(String),
    /// A controller write of a leader whose term has ended: another server took the lease.
    #[error(
        "refused: this server led in epoch {epoch}, but the leader lease is at epoch {current} (another server leads now)"
    )]
    Fenced { epoch: u64, current: u64 },
}

fn no_config_center() -> StoreError {
    StoreError::Backend("this store keeps no config revisions or secrets".into())
}

/// `1 project`, `2 projects`: `plural` is the plural noun.
fn noun(count: usize, plural: &str) -> &str {
    if count == 1 {
        plural.strip_suffix('s').unwrap_or(plural)
    } else {
        plural
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// Persistence of objects and tokens. Every method is blocking (call it from
/// `spawn_blocking` in async code). Every successful write that changes an object bumps one
/// global, monotonic index; the object's `metadata.resourceVersion` is the index of its last
/// write. A write that returns `Ok` is durable.
pub trait Store: Send + Sync + 'static {
    /// The current index.
    fn index(&self) -> u64;
    /// Receives the index after every committed change.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// The index of the last committed write that may change what hosts run: an instance's
    /// spec, placement, targets or kept volumes, a revision, a secret's value. Writes of
    /// observed state only (replica and host status) leave it where it was. Never above
    /// [`Store::index`]; a store that cannot tell answers the index.
    fn desired_index(&self) -> u64 {
        self.index()
    }
    /// Receives [`Store::desired_index`] after every such write (a store that cannot tell:
    /// after every write).
    fn subscribe_desired(&self) -> watch::Receiver<u64> {
        self.subscribe()
    }
    /// Whether the store can be reached now (what `/readyz` reports): an embedded store
    /// always can.
    fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError>;
    /// The cache of decoded objects [`decoded::list_decoded`] reads through, if this store
    /// keeps one (one per store, shared by every control loop of the process).
    fn decoded_cache(&self) -> Option<&decoded::DecodedCache> {
        None
    }
    /// The `resourceVersion` of the object at `key`, if it exists: what tells whether anyone
    /// wrote it since an earlier look, without reading its body.
    fn resource_version(&self, key: &ObjectKey) -> Result<Option<u64>, StoreError> {
        Ok(self.get(key)?.map(|o| o.resource_version))
    }
    /// Objects matching the filter, ordered by tenant, project, name.
    fn list(&self, filter: &ListFilter) -> Result<Vec<StoredObject>, StoreError>;
    /// [`Store::get`] with the index it was read at: never below the object's
    /// `resourceVersion`. A store that can should read both in one snapshot.
    fn get_at(&self, key: &ObjectKey) -> Result<(u64, Option<StoredObject>), StoreError> {
        let index = self.index();
        let object = self.get(key)?;
        let seen = object.as_ref().map_or(0, |o| o.resource_version);
        Ok((index.max(seen), object))
    }
    /// [`Store::list`] with the index it was read at: never below any returned object's
    /// `resourceVersion`. A store that can should read both in one snapshot.
    fn list_at(&self, filter: &ListFilter) -> Result<(u64, Vec<StoredObject>), StoreError> {
        let index = self.index();
        let items = self.list(filter)?;
        let seen = items.iter().map(|o| o.resource_version).max().unwrap_or(0);
        Ok((index.max(seen), items))
    }
    /// [`Store::list_at`] without holding the whole answer: `start` gets the index the
    /// snapshot was read at, then `each` every matching object in list order. Either returning
    /// `false` stops the scan (the reader went away). A store that can should read from one
    /// snapshot and hold only one object at a time.
    fn scan(
        &self,
        filter: &ListFilter,
        start: &mut dyn FnMut(u64) -> bool,
        each: &mut dyn FnMut(&StoredObject) -> bool,
    ) -> Result<(), StoreError> {
        let (index, items) = self.list_at(filter)?;
        if start(index) {
            for o in &items {
                if !each(o) {
                    break;
                }
            }
        }
        Ok(())
    }
    /// How many objects of `kind` there are and the highest `resourceVersion` among them (or
    /// ever written to one of them: the stores keep it in a row of their own, and it stays
    /// when the object holding it is deleted): every write of an object of the kind moves
    /// one or the other (a write gives its object the newest index; a delete lowers the count,
    /// and a delete and a create raise the highest version), so equal fingerprints mean
    /// nothing of the kind changed between them.
    fn kind_fingerprint(&self, kind: Kind) -> Result<(u64, u64), StoreError> {
        let versions = self.versions(kind)?;
        let highest = versions.iter().map(|(_, _, rv)| *rv).max().unwrap_or(0);
        Ok((versions.len() as u64, highest))
    }
    /// How many objects of `kind` have been deleted, by a count that only grows (none for a
    /// store that does not keep one): while it stays, every object seen since it was read is
    /// still there, under the same uid.
    fn kind_deletions(&self, _kind: Kind) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    /// Every object of `kind` as (key, uid, resourceVersion), without its body: enough to
    /// tell which objects changed since an earlier look.
    fn versions(&self, kind: Kind) -> Result<Vec<(ObjectKey, String, u64)>, StoreError> {
        Ok(self
            .list(&ListFilter::all(kind))?
            .into_iter()
            .map(|o| (o.key, o.uid, o.resource_version))
            .collect())
    }
    /// [`Store::kind_fingerprint`] and the [`Store::versions`] of the objects of `kind` whose
    /// `resourceVersion` is above `after`, both of one snapshot: what a caller that knows
    /// the kind as it was at a fingerprint whose highest version was `after` needs to learn
    /// what was written since (and, from the count, whether anything was deleted).
    fn versions_after(&self, kind: Kind, after: u64) -> Result<VersionsAfter, StoreError> {
        let versions = self.versions(kind)?;
        let highest = versions.iter().map(|(_, _, rv)| *rv).max().unwrap_or(0);
        let count = versions.len() as u64;
        let moved = versions.into_iter().filter(|v| v.2 > after).collect();
        Ok(((count, highest), moved))
    }
    /// Instance usage of each tenant (or only `tenant`), in total and per project.
    fn usage(&self, tenant: Option<&str>) -> Result<UsageByTenant, StoreError> {
        let mut filter = ListFilter::all(Kind::OpenClawInstance);
        filter.tenant = tenant.map(str::to_string);
        let mut out = UsageByTenant::new();
        for o in self.list(&filter)? {
            let u = Usage::of(&o.resource()?);
            let entry = out.entry(o.key.tenant.clone()).or_default();
            entry.0.add(u);
            entry.1.entry(o.key.project.clone()).or_default().add(u);
        }
        Ok(out)
    }
    /// Writes a batch in one transaction, parents before children, all or nothing. Objects must
    /// already be validated ([`crate::model::validate_object`]); references to tenants and
    /// projects are checked here, against the batch and the store. With `dry_run` nothing is
    /// written but the results are what a real write would give.
    fn write(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
    ) -> Result<WriteSummary, StoreError>;
    /// [`Store::write`], recording `note` (author, message) on the config revisions it makes.
    fn write_noted(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
        note: &ChangeNote,
    ) -> Result<WriteSummary, StoreError> {
        let _ = note;
        self.write(batch, dry_run)
    }
    /// Reads, changes and writes one object in one transaction. `change` edits the object in
    /// place (status, or a host's spec) and returns whether it changed anything; `generation`
    /// is not bumped. Returns the new resourceVersion, or `None` when nothing changed.
    fn update(
        &self,
        key: &ObjectKey,
        change: &mut dyn FnMut(&mut Resource) -> bool,
    ) -> Result<Option<u64>, StoreError>;
    /// [`Store::update`] over many objects in one transaction (one index bump, one sync to
    /// disk), calling `change` for the keys in the order given; keys that no longer exist are
    /// skipped. Returns the new index if anything changed.
    fn update_many(
        &self,
        keys: &[ObjectKey],
        change: &mut dyn FnMut(&mut Resource) -> bool,
    ) -> Result<Option<u64>, StoreError>;
    /// [`Store::write`] that also appends the audit entries `audit` makes of the results, in
    /// the same transaction when the store can (an acknowledged change is never without its
    /// record). Nothing is appended for a dry run or a write that changed nothing.
    fn write_audited(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
        note: &ChangeNote,
        audit: &mut dyn FnMut(&[WriteResult]) -> Vec<AuditEntry>,
    ) -> Result<(WriteSummary, Vec<AuditRecord>), StoreError> {
        let summary = self.write_noted(batch, dry_run, note)?;
        let changed = summary
            .results
            .iter()
            .any(|r| r.outcome != Outcome::Unchanged);
        if dry_run || !changed {
            return Ok((summary, Vec::new()));
        }
        let records = self.append_audit(&audit(&summary.results))?;
        Ok((summary, records))
    }
    /// [`Store::delete`] that also appends the audit entries `audit` makes of the deleted
    /// generation, in the same transaction when the store can.
    fn delete_audited(
        &self,
        key: &ObjectKey,
        expected: Option<u64>,
        audit: &mut dyn FnMut(Option<i64>) -> Vec<AuditEntry>,
    ) -> Result<(u64, Vec<AuditRecord>), StoreError> {
        let before = self.get(key)?.map(|o| o.generation);
        let index = self.delete(key, expected)?;
        let records = self.append_audit(&audit(before))?;
        Ok((index, records))
    }
    /// An instance's config revisions (by instance uid), newest first, without their configs.
    fn config_revisions(&self, uid: &str) -> Result<Vec<RevisionRecord>, StoreError> {
        let _ = uid;
        Err(no_config_center())
    }
    /// One config revision of an instance, with its config.
    fn config_revision(
        &self,
        uid: &str,
        revision: u64,
    ) -> Result<Option<RevisionRecord>, StoreError> {
        let _ = (uid, revision);
        Err(no_config_center())
    }
    /// The newest config revision of every instance: uid → (revision, effective config text).
    fn current_configs(
        &self,
    ) -> Result<std::collections::HashMap<String, (u64, String)>, StoreError> {
        Err(no_config_center())
    }
    /// The newest revision number of every instance (by uid).
    fn newest_revisions(&self) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        Err(no_config_center())
    }
    /// What replicas of the given `(instance uid, revision)` pairs run (image, config, env,
    /// resources, secret values sealed as they were); pairs without a revision are left out.
    fn revision_contents(
        &self,
        wanted: &[(String, u64)],
    ) -> Result<Vec<revisions::RevisionContent>, StoreError> {
        let _ = wanted;
        Err(no_config_center())
    }
    /// Volumes kept of deleted instances (`volumeRetention.whenDeleted: Retain`).
    fn deleted_volumes(&self) -> Result<Vec<revisions::DeletedVolume>, StoreError> {
        Err(no_config_center())
    }
    /// Every sealed secret value.
    fn sealed_values(&self) -> Result<Vec<SealedValue>, StoreError> {
        Err(no_config_center())
    }
    /// Replaces every sealed value by what `reseal` makes of it, in one transaction.
    fn reseal(
        &self,
        reseal: &mut dyn FnMut(&SealedValue) -> Result<String, StoreError>,
    ) -> Result<usize, StoreError> {
        let _ = reseal;
        Err(no_config_center())
    }
    /// Deletes one object; refuses while it has children. `expected` is an optional
    /// resourceVersion precondition. Returns the new index.
    fn delete(&self, key: &ObjectKey, expected: Option<u64>) -> Result<u64, StoreError>;
    /// Deletes `keys` in one transaction, in the order given (children before parents, or a
    /// parent is refused for them): all or nothing, with one index bump. A key that does not
    /// exist fails the batch ([`StoreError::InBatch`] with its position, as every refusal),
    /// unless `skip_missing`. `audit` makes the entries of each deleted object (from its key
    /// and generation), appended in the same transaction. A dry run checks everything and
    /// changes nothing.
    fn delete_batch(
        &self,
        keys: &[ObjectKey],
        skip_missing: bool,
        dry_run: bool,
        audit: Option<DeleteAudit<'_>>,
    ) -> Result<(DeleteSummary, Vec<AuditRecord>), StoreError> {
        let _ = (keys, skip_missing, dry_run, audit);
        Err(StoreError::Backend(
            "this store cannot delete a batch in one transaction".into(),
        ))
    }

    /// Takes the controllers' lease for `holder` when it has expired (bumping the epoch), or
    /// renews it when `holder` holds it in `epoch`, for `ttl` on the database's clock
    /// ([`lease`]). Answers the lease as it is afterwards (held by someone else: refused).
    fn lease_acquire(
        &self,
        holder: &str,
        epoch: u64,
        ttl: std::time::Duration,
    ) -> Result<lease::LeaseRecord, StoreError> {
        let _ = (holder, epoch, ttl);
        Err(StoreError::Backend(
            "this store keeps no leader lease".into(),
        ))
    }
    /// Whether no other server can ever take the lease of this store (one server per
    /// database): then a renewal that is late, because the database was busy, is no reason
    /// to step down ([`lease::run_election`]).
    fn lease_exclusive(&self) -> bool {
        false
    }
    /// Lets the lease expire now if `holder` holds it in `epoch` (a leader that stops).
    fn lease_release(&self, holder: &str, epoch: u64) -> Result<(), StoreError> {
        let _ = (holder, epoch);
        Ok(())
    }
    /// The cluster's certificate authority (PEM certificate and key) kept in the store for
    /// every server of it: stores `offered` if the store keeps none yet, and answers the one
    /// kept. A store of one server keeps none (`None`: the server's own files are the CA).
    fn shared_ca(
        &self,
        offered: &(String, String),
    ) -> Result<Option<(String, String)>, StoreError> {
        let _ = offered;
        Ok(None)
    }

    /// The identity of the key file the store's secret values are sealed with
    /// ([`crate::secrets::Keyring::identity`]): records `offered` when none is recorded yet,
    /// and answers the recorded one (`None`: none is, or the store keeps none).
    fn secrets_key(&self, offered: Option<&str>) -> Result<Option<String>, StoreError> {
        let _ = offered;
        Ok(None)
    }

    /// Registers or refreshes one server replica's row (last seen: now on the store's clock)
    /// and removes the rows of replicas not seen for `prune_after`. Moves no index.
    fn server_heartbeat(
        &self,
        beat: &replicas::ReplicaBeat,
        prune_after: std::time::Duration,
    ) -> Result<(), StoreError> {
        let _ = (beat, prune_after);
        Err(StoreError::Backend(
            "this store keeps no server replicas".into(),
        ))
    }
    /// The registered server replicas, with the store's clock and the leader lease, read
    /// together.
    fn server_replicas(&self) -> Result<replicas::Replicas, StoreError> {
        Ok(replicas::Replicas::default())
    }

    /// Stores a new console session, after removing the sessions that have ended (idle, or
    /// past their expiry) and, when `limits.max_sessions` are still kept, the least recently
    /// used. Moves no index.
    fn open_console_session(
        &self,
        row: &sessions::SessionRow,
        limits: &sessions::SessionLimits,
    ) -> Result<(), StoreError> {
        let _ = (row, limits);
        Err(StoreError::Backend(
            "this store keeps no console sessions".into(),
        ))
    }
    /// The console session whose id hashes to `id_hash`, ended or not.
    fn console_session(&self, id_hash: &str) -> Result<Option<sessions::SessionRow>, StoreError> {
        let _ = id_hash;
        Ok(None)
    }
    /// Records that the session was used at `at_ms` (a time never moves back); `false` when
    /// there is no such session. Moves no index.
    fn touch_console_session(&self, id_hash: &str, at_ms: i64) -> Result<bool, StoreError> {
        let _ = (id_hash, at_ms);
        Ok(false)
    }
    /// Removes the session (logout, or it ended); `false` when there was none.
    fn close_console_session(&self, id_hash: &str) -> Result<bool, StoreError> {
        let _ = id_hash;
        Ok(false)
    }

    fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Checks a join token and uses it up by one, atomically.
    fn consume_join_token(&self, hash: &str, now: i64) -> Result<TokenRecord, StoreError>;
    /// Enrolls a host in one transaction: checks the join token whose SHA-256 is
    /// `join_token_hash` and uses it up by one (as [`Store::consume_join_token`]), and creates
    /// `host` (validated, a [`Resource::Host`]) as [`WriteMode::Create`] does. Either both
    /// happen or neither: a refused token creates nothing, and a host that cannot be created
    /// (its name is taken: [`StoreError::AlreadyExists`]) uses up nothing, so the caller may
    /// retry with another name.
    fn enroll_host(
        &self,
        join_token_hash: &str,
        now: i64,
        host: Resource,
    ) -> Result<StoredObject, StoreError>;
    /// [`Store::enroll_host`] for several hosts, each `(join_token_hash, now, host)`; each
    /// enrollment succeeds or fails alone, as it would by itself, and the outcomes come in the
    /// order given. A store that can writes them in one transaction (one sync to disk for the
    /// lot); the default enrolls them one by one.
    fn enroll_hosts(
        &self,
        batch: Vec<(String, i64, Resource)>,
    ) -> Vec<Result<StoredObject, StoreError>> {
        batch
            .into_iter()
            .map(|(hash, now, host)| self.enroll_host(&hash, now, host))
            .collect()
    }
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Returns false if there is no such token.
    fn revoke_token(&self, id: &str) -> Result<bool, StoreError>;

    /// Records when hosts last reported (Unix milliseconds), one upsert each in one
    /// transaction; an older time never replaces a newer one. Heartbeats live outside the
    /// objects: they do not move the global index nor wake anything that watches the store.
    fn record_heartbeats(&self, beats: &[(&str, i64)]) -> Result<(), StoreError> {
        let _ = beats;
        Err(StoreError::Backend("this store keeps no heartbeats".into()))
    }
    /// When each host last reported (Unix milliseconds), by host name.
    fn host_heartbeats(&self) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        Ok(std::collections::HashMap::new())
    }
    /// Drops a host's heartbeat (when the host is deleted).
    fn forget_heartbeat(&self, host: &str) -> Result<(), StoreError> {
        let _ = host;
        Ok(())
    }
    /// Replaces the state volumes `host` reported (the list of a report that carries one;
    /// `now` is RFC 3339). An unchanged list writes nothing, a changed one moves no index,
    /// unless a volume whose removal was asked for is gone from it (then the index moves, so
    /// the assignment book stops asking). Returns whether the list changed.
    fn record_host_volumes(
        &self,
        host: &str,
        listed: &[volumes::ReportedVolume],
        now: &str,
    ) -> Result<bool, StoreError> {
        let _ = (host, listed, now);
        Err(StoreError::Backend(
            "this store keeps no host volumes".into(),
        ))
    }
    /// The state volumes hosts reported (one host's, or every host's), by host and name.
    fn host_volumes(&self, host: Option<&str>) -> Result<Vec<volumes::HostVolume>, StoreError> {
        let _ = host;
        Ok(Vec::new())
    }
    /// (host, name) of the volumes whose removal was asked for and that their host still
    /// reports, by host and name.
    fn volume_deletions(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(Vec::new())
    }
    /// Sets or clears since when volumes are orphaned: (host, name, since). Moves no index.
    fn mark_orphaned_volumes(
        &self,
        marks: &[(String, String, Option<String>)],
    ) -> Result<(), StoreError> {
        let _ = marks;
        Ok(())
    }
    /// Records that `host`'s volume `name` is to be removed (the assignment book tells the
    /// host) and drops what kept it for a deleted instance, moving the index. `reason` says
    /// who asked. Returns the volume (`None`: the host reports no such volume, nothing
    /// changed) and the index.
    fn request_volume_deletion(
        &self,
        host: &str,
        name: &str,
        reason: &str,
        now: &str,
    ) -> Result<(Option<volumes::HostVolume>, u64), StoreError> {
        let _ = (host, name, reason, now);
        Err(StoreError::Backend(
            "this store keeps no host volumes".into(),
        ))
    }
    /// Drops what is kept of a deleted host's volumes.
    fn forget_host_volumes(&self, host: &str) -> Result<(), StoreError> {
        let _ = host;
        Ok(())
    }
    /// Queues events to be written by the next [`Store::flush_events`]; never waits for the
    /// disk. A store that keeps no events drops them.
    fn record_events(&self, events: Vec<crate::events::Event>) {
        let _ = events;
    }
    /// Writes the queued events in one transaction (folding identical ones into what is
    /// stored), without touching the global index. Returns how many were written.
    fn flush_events(&self) -> Result<usize, StoreError> {
        Ok(0)
    }
    /// Deletes events older than the retention allows.
    fn prune_events(
        &self,
        retention: &crate::events::Retention,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let _ = (retention, now_ms);
        Ok(0)
    }
    /// Stored events matching `filter`, oldest first, with the events' sequence read at.
    /// Not scoped: callers apply the caller's scope.
    fn list_events(
        &self,
        filter: &crate::events::EventFilter,
    ) -> Result<(u64, Vec<crate::events::EventRecord>), StoreError> {
        let _ = filter;
        Ok((0, Vec::new()))
    }
    /// Receives the events' sequence after every flush that wrote some.
    fn subscribe_events(&self) -> Option<watch::Receiver<u64>> {
        None
    }
    /// The changes of `feed` after version `after` (a store index, or an events' sequence
    /// number), oldest first, at most about `limit`; [`ChangesSince::Gone`] when the log no
    /// longer reaches back that far. Not scoped.
    fn changes_since(
        &self,
        feed: Feed,
        after: u64,
        limit: usize,
    ) -> Result<ChangesSince, StoreError> {
        let _ = (feed, after, limit);
        Err(StoreError::Backend(
            "this store keeps no change log, so it cannot be watched".into(),
        ))
    }

    /// Appends entries to the audit log ([`crate::audit`]), in order, in one transaction (one
    /// sync to disk for the batch). An invalid entry is [`StoreError::Invalid`] and nothing is
    /// written. The log has no update or delete.
    fn append_audit(&self, entries: &[AuditEntry]) -> Result<Vec<AuditRecord>, StoreError>;
    /// Audit records matching the filter, oldest first.
    fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError>;
    /// Checks the audit log's hash chain from its first record, in one read snapshot.
    fn verify_audit(&self) -> Result<AuditVerification, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_check_keys_and_values() {
        let reqs =
            LabelRequirement::parse_selector("region=eu,tier!=gold,gpu,!legacy,team=").unwrap();
        assert_eq!(reqs.len(), 5);
        for bad in ["a=b=c", "team=!!!", "team!=x y", "Bad Key", "=v"] {
            let e = LabelRequirement::parse_selector(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn token_records_do_not_show_their_hash() {
        let t = TokenRecord {
            id: "id1".into(),
            name: "n".into(),
            kind: TokenKind::Join,
            role: String::new(),
            tenant: None,
            project: None,
            created_at: 0,
            expires_at: None,
            uses_remaining: None,
            revoked: false,
            hash: "0123456789abcdef".into(),
        };
        let shown = format!("{t:?}");
        assert!(
            !shown.contains("0123456789abcdef") && shown.contains("id1"),
            "{shown}"
        );
    }

    #[test]
    fn children_are_counted_in_words() {
        let e = |count| StoreError::HasChildren {
            key: ObjectKey::cluster(Kind::Tenant, "acme"),
            count,
            child: "projects",
        };
        assert_eq!(
            e(1).to_string(),
            "tenant/acme still has 1 project; delete it first"
        );
        assert_eq!(
            e(3).to_string(),
            "tenant/acme still has 3 projects; delete them first"
        );
    }
}
