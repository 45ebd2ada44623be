//! Persistence of objects and tokens behind the [`Store`] trait; SQLite is the embedded default.

mod admission;
pub mod sqlite;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::{FieldProblem, Kind, ObjectKey, Resource};

pub use admission::{Admitted, admit};

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
}

/// The result of one all-or-nothing write.
#[derive(Clone, Debug)]
pub struct WriteSummary {
    /// The store index after the write (unchanged when every object was unchanged).
    pub index: u64,
    /// One result per request, in request order.
    pub results: Vec<WriteResult>,
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
            let key = match &req {
                LabelRequirement::Equals(k, _)
                | LabelRequirement::NotEquals(k, _)
                | LabelRequirement::Exists(k)
                | LabelRequirement::NotExists(k) => k,
            };
            crate::model::validate_label_key(key)
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
    pub labels: Vec<LabelRequirement>,
}

impl ListFilter {
    pub fn all(kind: Kind) -> Self {
        ListFilter {
            kind,
            tenant: None,
            project: None,
            labels: Vec::new(),
        }
    }
}

/// A bearer credential. The secret itself is never stored, only its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(ObjectKey),
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
    #[error("{key} still has {count} {child}; delete them first")]
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
    fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError>;
    /// Objects matching the filter, ordered by tenant, project, name.
    fn list(&self, filter: &ListFilter) -> Result<Vec<StoredObject>, StoreError>;
    /// Writes a batch in one transaction, parents before children, all or nothing. Objects must
    /// already be validated ([`crate::model::validate_object`]); references to tenants and
    /// projects are checked here, against the batch and the store. With `dry_run` nothing is
    /// written but the results are what a real write would give.
    fn write(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
    ) -> Result<WriteSummary, StoreError>;
    /// Reads, changes and writes one object in one transaction. `change` edits the object in
    /// place (status, or a host's spec) and returns whether it changed anything; `generation`
    /// is not bumped. Returns the new resourceVersion, or `None` when nothing changed.
    fn update(
        &self,
        key: &ObjectKey,
        change: &mut dyn FnMut(&mut Resource) -> bool,
    ) -> Result<Option<u64>, StoreError>;
    /// [`Store::update`] over many objects in one transaction (one index bump, one sync to
    /// disk); keys that no longer exist are skipped. Returns the new index if anything changed.
    fn update_many(
        &self,
        keys: &[ObjectKey],
        change: &mut dyn FnMut(&mut Resource) -> bool,
    ) -> Result<Option<u64>, StoreError>;
    /// Deletes one object; refuses while it has children. `expected` is an optional
    /// resourceVersion precondition. Returns the new index.
    fn delete(&self, key: &ObjectKey, expected: Option<u64>) -> Result<u64, StoreError>;

    fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Checks a join token and uses it up by one, atomically.
    fn consume_join_token(&self, hash: &str, now: i64) -> Result<TokenRecord, StoreError>;
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Returns false if there is no such token.
    fn revoke_token(&self, id: &str) -> Result<bool, StoreError>;
}
