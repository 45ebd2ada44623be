//! SQLite implementation of the store: WAL journal, `synchronous=FULL`, versioned migrations,
//! one writer connection and a small pool of readers.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};
use tokio::sync::watch;

use super::revisions::{self, ChangeNote, RevisionRecord, SealedValue};
use super::{
    DeleteAudit, DeleteSummary, JoinRefusal, ListFilter, Store, StoreError, StoredObject,
    TokenKind, TokenRecord, Usage, WriteMode, WriteResult, WriteSummary, admit,
};
use crate::audit::{AuditEntry, AuditFilter, AuditRecord, AuditVerification};
use crate::model::{
    FieldProblem, Kind, ObjectKey, Quota, Resource, format_cpu, format_memory, parse_cpu,
    parse_memory,
};
use crate::openclaw::schema::Schema;
use crate::util::now_rfc3339;

/// Schema migrations; migration `i` takes the database from version `i` to `i + 1`
/// (`PRAGMA user_version`). Append only: a released migration never changes.
const MIGRATIONS: &[&str] = &[
    // 1: objects, the global index, tokens.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
     INSERT INTO meta (key, value) VALUES ('index', 0);
     CREATE TABLE objects (
        kind TEXT NOT NULL,
        tenant TEXT NOT NULL,
        project TEXT NOT NULL,
        name TEXT NOT NULL,
        uid TEXT NOT NULL UNIQUE,
        generation INTEGER NOT NULL,
        resource_version INTEGER NOT NULL,
        labels TEXT NOT NULL,
        body TEXT NOT NULL,
        UNIQUE (kind, tenant, project, name)
     );
     CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        role TEXT NOT NULL,
        tenant TEXT,
        project TEXT,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        uses_remaining INTEGER,
        revoked INTEGER NOT NULL DEFAULT 0
     );",
    // 2: the audit log.
    crate::audit::MIGRATION,
    // 3: what each instance consumes, for quota checks by aggregate queries (filled in from
    // the stored bodies by `backfill_usage`).
    "ALTER TABLE objects ADD COLUMN use_replicas INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE objects ADD COLUMN use_cpu_millis INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE objects ADD COLUMN use_memory_bytes INTEGER NOT NULL DEFAULT 0;",
    // 4: config revisions and sealed secret values (revisions of existing instances are
    // filled in by `revisions::backfill`).
    super::revisions::MIGRATION,
    // 5: config revisions become instance revisions (image, env, resources, secret values,
    // own spec fields; filled in by `revisions::backfill_instance_revisions`), and the
    // volumes kept of deleted instances.
    super::revisions::INSTANCE_REVISIONS_MIGRATION,
];

/// The schema version whose migration added the usage columns.
const USAGE_COLUMNS_VERSION: usize = 3;
/// The schema version whose migration made config revisions instance revisions.
const INSTANCE_REVISIONS_VERSION: usize = 5;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;
const MAX_IDLE_READERS: usize = 8;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prepared statements kept per connection: every statement of the request paths, so none is
/// parsed again (the default of 16 is fewer than the writer uses).
const STATEMENT_CACHE: usize = 64;

const OBJECT_COLUMNS: &str =
    "kind, tenant, project, name, uid, generation, resource_version, labels, body";

/// Makes the audit entries of a write from its results.
type WriteAudit<'a> = dyn FnMut(&[WriteResult]) -> Vec<AuditEntry> + 'a;

/// The embedded store.
pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    index: AtomicU64,
    notify: watch::Sender<u64>,
    /// The schema every effective `openclaw.json` is checked against before it is stored.
    schema: std::sync::RwLock<std::sync::Arc<Schema>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("index", &self.index())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a connection half-way through a transaction
    // (rusqlite rolls back on drop), so the data behind a poisoned lock is still good.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    /// A database written by a newer clusterclaw is refused.
    /// The database file and its `-wal` and `-shm` companions are readable by the owner only
    /// (they hold token hashes and instance configuration): a new file is created with mode
    /// 0600 before SQLite opens it (SQLite gives the companions the database's mode), and
    /// files left more open are tightened.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        make_private(path)?;
        let mut conn = Connection::open(path).map_err(|e| open_error(path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Fails on a file that is not SQLite at all.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| open_error(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "{}: could not switch to WAL journal mode (got {mode})",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
        migrate(&mut conn, path)?;
        let index = index_in(&conn)?;
        let (notify, _) = watch::channel(index);
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            index: AtomicU64::new(index),
            notify,
            schema: std::sync::RwLock::new(std::sync::Arc::new(Schema::builtin())),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema effective configs are checked against from now on.
    pub fn set_schema(&self, schema: std::sync::Arc<Schema>) {
        *self.schema.write().unwrap_or_else(|e| e.into_inner()) = schema;
    }

    fn schema(&self) -> std::sync::Arc<Schema> {
        self.schema
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn open_reader(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.execute_batch("PRAGMA query_only = ON;")?;
        Ok(conn)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = lock(&self.readers).pop();
        let conn = match pooled {
            Some(c) => c,
            None => self.open_reader()?,
        };
        let out = f(&conn);
        let mut pool = lock(&self.readers);
        if pool.len() < MAX_IDLE_READERS {
            pool.push(conn);
        }
        out
    }

    /// [`Store::write`], with the audit entries `audit` makes of the results appended in the
    /// same transaction (only when something changed).
    fn write_inner(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
        note: &ChangeNote,
        audit: Option<&mut WriteAudit<'_>>,
    ) -> Result<(WriteSummary, Vec<AuditRecord>), StoreError> {
        let schema = self.schema();
        let keys: Vec<ObjectKey> = batch.iter().map(|(r, _)| r.key()).collect();
        let mut seen: HashMap<&ObjectKey, usize> = HashMap::new();
        let mut dupes = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if let Some(first) = seen.insert(k, i) {
                dupes.push(FieldProblem::new(
                    format!("items[{i}]"),
                    format!("names {k} again (as items[{first}] does)"),
                ));
            }
        }
        if !dupes.is_empty() {
            return Err(StoreError::Invalid(dupes));
        }
        // Parents before children, otherwise in request order.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| batch[i].0.kind().apply_order());
        let now = now_rfc3339();
        // The tenants and projects whose usage the batch may change, for the quota check.
        let mut owners: Vec<ObjectKey> = Vec::new();
        for k in keys.iter().filter(|k| k.kind == Kind::OpenClawInstance) {
            for owner in [
                ObjectKey::cluster(Kind::Tenant, &k.tenant),
                ObjectKey::project(&k.tenant, &k.project),
            ] {
                if !owners.contains(&owner) {
                    owners.push(owner);
                }
            }
        }
        let mut records = Vec::new();
        let (results, index) = self.write_tx(dry_run, |tx, next| {
            // Usage before the write, of the owners that have a quota (or may get one in
            // this batch): only those are checked.
            let mut before = Vec::with_capacity(owners.len());
            for owner in &owners {
                let limited = keys.contains(owner) || quota_in(tx, owner)?.is_some();
                let u = match owner.kind {
                    _ if !limited => None,
                    Kind::Project => Some(usage_in(tx, &owner.tenant, Some(&owner.name))?),
                    _ => Some(usage_in(tx, &owner.name, None)?),
                };
                before.push(u);
            }
            let mut results: Vec<Option<WriteResult>> = vec![None; batch.len()];
            let mut changed = false;
            for &i in &order {
                let (res, mode) = &batch[i];
                let key = &keys[i];
                if let Some(parent) = key.parent()
                    && !exists_in(tx, &parent)?
                {
                    return Err(in_batch(
                        i,
                        StoreError::ParentMissing {
                            key: key.clone(),
                            parent: Box::new(parent),
                        },
                    ));
                }
                let existing = get_in(tx, key)?;
                let previous_generation = existing.as_ref().map(|e| e.generation);
                // A secret's sealed values go to their own table; the object keeps the
                // fingerprints, which decide whether anything changed.
                let mut incoming_secret = None;
                let res = match res {
                    Resource::Secret(s) => {
                        let mut s = s.clone();
                        let data = std::mem::take(&mut s.spec.data);
                        incoming_secret = Some(data);
                        std::borrow::Cow::Owned(Resource::Secret(s))
                    }
                    other => std::borrow::Cow::Borrowed(other),
                };
                let mut admitted = admit(existing.as_ref(), &res, *mode, next, &now, || {
                    uuid::Uuid::new_v4().to_string()
                })
                .map_err(|e| in_batch(i, e))?;
                let object = match (admitted.outcome, existing) {
                    (super::Outcome::Unchanged, Some(existing)) => existing,
                    _ => {
                        if let (Resource::Secret(s), Some(data)) =
                            (&mut admitted.resource, incoming_secret.take())
                        {
                            s.spec.data = data;
                            revisions::store_secret_values(tx, s).map_err(|e| in_batch(i, e))?;
                        }
                        check_project_quota(tx, &admitted.resource).map_err(|e| in_batch(i, e))?;
                        let o = to_stored(&admitted.resource)?;
                        upsert_in(tx, &o, Usage::of(&admitted.resource))?;
                        changed = true;
                        o
                    }
                };
                results[i] = Some(WriteResult {
                    key: key.clone(),
                    outcome: admitted.outcome,
                    object,
                    previous_generation,
                });
            }
            if changed {
                let changed_keys: Vec<ObjectKey> = results
                    .iter()
                    .flatten()
                    .filter(|r| r.outcome != super::Outcome::Unchanged)
                    .map(|r| r.key.clone())
                    .collect();
                revisions::revise(tx, &changed_keys, note, &schema, next, &now, &|k, e| {
                    // Name the document whose change the problem comes from.
                    match keys.iter().position(|b| b == k) {
                        Some(at) if batch.len() > 1 => in_batch(at, e),
                        _ => e,
                    }
                })?;
                // The objects as stored (revisions write the instances' status).
                for r in results.iter_mut().flatten() {
                    if r.key.kind == Kind::OpenClawInstance
                        && let Some(o) = get_in(tx, &r.key)?
                    {
                        r.object = o;
                    }
                }
            }
            if changed
                && !dry_run
                && let Some(audit) = audit
            {
                let written: Vec<WriteResult> = results.iter().flatten().cloned().collect();
                records = crate::audit::append_audit_tx(tx, &audit(&written))?;
            }
            if changed {
                for (owner, before) in owners.iter().zip(&before) {
                    let Some(before) = before else { continue };
                    check_quota(tx, owner, *before).map_err(|e| {
                        // Name the first document that adds to this owner's usage.
                        let item = keys.iter().position(|k| {
                            k.kind == Kind::OpenClawInstance
                                && k.tenant == owner.tenant_name()
                                && (owner.kind == Kind::Tenant || k.project == owner.name)
                        });
                        match item {
                            Some(i) if batch.len() > 1 => in_batch(i, e),
                            _ => e,
                        }
                    })?;
                }
            }
            Ok((results, changed))
        })?;
        let results = results.into_iter().flatten().collect();
        Ok((WriteSummary { index, results }, records))
    }

    /// [`Store::delete`], with the audit entries `audit` makes (from the generation deleted)
    /// appended in the same transaction.
    fn delete_inner(
        &self,
        key: &ObjectKey,
        expected: Option<u64>,
        audit: Option<&mut dyn FnMut(Option<i64>) -> Vec<AuditEntry>>,
    ) -> Result<(u64, Vec<AuditRecord>), StoreError> {
        let mut records = Vec::new();
        let ((), index) = self.write_tx(false, |tx, _next| {
            let generation = delete_in(tx, key, expected)?;
            if let Some(audit) = audit {
                records = crate::audit::append_audit_tx(tx, &audit(Some(generation)))?;
            }
            Ok(((), true))
        })?;
        Ok((index, records))
    }

    /// Runs `f` in an immediate write transaction with the next index. `f` returns whether it
    /// changed anything; only then is the index bumped and the transaction committed.
    fn write_tx<T>(
        &self,
        dry_run: bool,
        f: impl FnOnce(&Transaction<'_>, u64) -> Result<(T, bool), StoreError>,
    ) -> Result<(T, u64), StoreError> {
        let mut conn = lock(&self.writer);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = index_in(&tx)?;
        let next = current + 1;
        let (out, changed) = f(&tx, next)?;
        if !changed || dry_run {
            tx.rollback()?;
            return Ok((out, current));
        }
        tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'index'")?
            .execute([next as i64])?;
        tx.commit()?;
        self.index.store(next, Ordering::SeqCst);
        self.notify.send_replace(next);
        Ok((out, next))
    }
}

/// Deletes one object inside `tx`; refuses while it has children (deletes earlier in the same
/// transaction count as done) or while it is in use. Returns the generation deleted.
fn delete_in(
    tx: &Transaction<'_>,
    key: &ObjectKey,
    expected: Option<u64>,
) -> Result<i64, StoreError> {
    let existing = get_in(tx, key)?.ok_or_else(|| StoreError::NotFound(key.clone()))?;
    let generation = existing.generation;
    if let Some(given) = expected.filter(|rv| *rv != 0)
        && given != existing.resource_version
    {
        return Err(StoreError::Conflict {
            key: key.clone(),
            given,
            current: existing.resource_version,
        });
    }
    let children = match key.kind {
        Kind::Tenant => Some((
            "projects",
            tx.query_row(
                "SELECT COUNT(*) FROM objects WHERE kind = 'Project' AND tenant = ?1",
                [&key.name],
                |r| r.get::<_, i64>(0),
            )?,
        )),
        Kind::Project => Some((
            "instances",
            tx.query_row(
                "SELECT COUNT(*) FROM objects WHERE kind = 'OpenClawInstance' AND tenant = ?1 AND project = ?2",
                [&key.tenant, &key.name],
                |r| r.get::<_, i64>(0),
            )?,
        )),
        Kind::OpenClawInstance
        | Kind::Host
        | Kind::ConfigTemplate
        | Kind::Secret
        | Kind::Rollout => None,
    };
    // Secrets live in a tenant or project as well: they go first too.
    let children = match (children, key.kind) {
        (Some((_, 0)), Kind::Tenant | Kind::Project) => Some((
            "secrets",
            tx.query_row(
                "SELECT COUNT(*) FROM objects WHERE kind = 'Secret' AND tenant = ?1 AND project = ?2",
                match key.kind {
                    Kind::Tenant => [key.name.as_str(), ""],
                    _ => [key.tenant.as_str(), key.name.as_str()],
                },
                |r| r.get::<_, i64>(0),
            )?,
        )),
        (c, _) => c,
    };
    if let Some((child, count)) = children.filter(|(_, n)| *n > 0) {
        return Err(StoreError::HasChildren {
            key: key.clone(),
            count: count as usize,
            child,
        });
    }
    revisions::before_delete(tx, key)?;
    tx.execute(
        "DELETE FROM objects WHERE kind = ?1 AND tenant = ?2 AND project = ?3 AND name = ?4",
        params![key.kind.as_str(), key.tenant, key.project, key.name],
    )?;
    Ok(generation)
}

/// Files SQLite keeps beside a database in WAL mode (and the rollback journal of older ones).
const COMPANION_SUFFIXES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Creates the database file with mode 0600 if it is missing, and takes group and other
/// permissions away from it and its companions if they have any.
fn make_private(path: &Path) -> Result<(), StoreError> {
    let io_error = |p: &Path, e: io::Error| {
        StoreError::Backend(format!(
            "cannot open {}: {e} (does the directory exist and is it writable?)",
            p.display()
        ))
    };
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error(path, e)),
    }
    let mut files = vec![path.to_path_buf()];
    files.extend(COMPANION_SUFFIXES.iter().map(|suffix| {
        let mut name = path.as_os_str().to_os_string();
        name.push(suffix);
        PathBuf::from(name)
    }));
    for file in files {
        let meta = match fs::metadata(&file) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&file, e)),
        };
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(&file, fs::Permissions::from_mode(mode & 0o700))
                .map_err(|e| io_error(&file, e))?;
            tracing::warn!(path = %file.display(), "the database file was readable by other users; made it private (mode 0600)");
        }
    }
    Ok(())
}

fn open_error(path: &Path, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => StoreError::Corrupt(format!(
            "{} is not a clusterclaw database (not an SQLite file)",
            path.display()
        )),
        Some(rusqlite::ErrorCode::CannotOpen) => StoreError::Backend(format!(
            "cannot open {}: {e} (does the directory exist and is it writable?)",
            path.display()
        )),
        _ => StoreError::Backend(format!("{}: {e}", path.display())),
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.display().to_string(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        tx.execute_batch(sql)?;
        if i + 1 == USAGE_COLUMNS_VERSION {
            backfill_usage(&tx)?;
        }
        // The first revisions of existing instances (the tables of version 4) are written in
        // this build's row format, so they are made once the columns of version 5 exist.
        if i + 1 == INSTANCE_REVISIONS_VERSION {
            super::revisions::backfill_instance_revisions(&tx)?;
            super::revisions::backfill(&tx, &Schema::builtin(), &now_rfc3339())?;
        }
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
        tracing::info!(path = %path.display(), version = i + 1, "applied store schema migration");
    }
    Ok(())
}

/// Fills the usage columns of instances written before they existed.
fn backfill_usage(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let rows: Vec<(i64, String)> = {
        let mut stmt =
            tx.prepare("SELECT rowid, body FROM objects WHERE kind = 'OpenClawInstance'")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    for (rowid, body) in rows {
        let r: Resource = serde_json::from_str(&body)
            .map_err(|e| StoreError::Corrupt(format!("instance row {rowid}: {e}")))?;
        let u = Usage::of(&r);
        tx.execute(
            "UPDATE objects SET use_replicas = ?1, use_cpu_millis = ?2, use_memory_bytes = ?3 WHERE rowid = ?4",
            params![u.replicas, u.cpu_millis, u.memory_bytes, rowid],
        )?;
    }
    Ok(())
}

/// Usage of one tenant, or of one project in it, read inside the caller's transaction.
fn usage_in(conn: &Connection, tenant: &str, project: Option<&str>) -> Result<Usage, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT COUNT(*), COALESCE(SUM(use_replicas), 0), COALESCE(SUM(use_cpu_millis), 0),
                COALESCE(SUM(use_memory_bytes), 0)
         FROM objects WHERE kind = 'OpenClawInstance' AND tenant = ?1 AND (?2 IS NULL OR project = ?2)",
    )?;
    Ok(stmt.query_row(params![tenant, project], |r| {
        Ok(Usage {
            instances: r.get(0)?,
            replicas: r.get(1)?,
            cpu_millis: r.get(2)?,
            memory_bytes: r.get(3)?,
        })
    })?)
}

/// The quota set on a tenant or project object, if any.
fn quota_in(conn: &Connection, key: &ObjectKey) -> Result<Option<Quota>, StoreError> {
    let Some(o) = get_in(conn, key)? else {
        return Ok(None);
    };
    Ok(match o.resource()? {
        Resource::Tenant(t) => t.spec.quota,
        Resource::Project(p) => p.spec.quota,
        _ => None,
    })
}

/// A quota as numbers: `None` where a dimension is unlimited.
fn quota_limits(q: &Quota) -> [(&'static str, Option<i64>); 4] {
    let cpu = q
        .cpu
        .as_ref()
        .and_then(|c| parse_cpu(c.as_str()).ok())
        .map(|v| v as i64);
    let mem = q
        .memory
        .as_ref()
        .and_then(|m| parse_memory(m.as_str()).ok())
        .map(|v| v as i64);
    [
        ("instances", q.instances),
        ("replicas", q.replicas),
        ("cpu", cpu),
        ("memory", mem),
    ]
}

fn usage_values(u: &Usage) -> [i64; 4] {
    [u.instances, u.replicas, u.cpu_millis, u.memory_bytes]
}

fn format_amount(resource: &str, v: i64) -> String {
    let v = v.max(0) as u64;
    match resource {
        "cpu" => format_cpu(v),
        "memory" => format_memory(v),
        _ => v.to_string(),
    }
}

/// Refuses a write that grows a tenant's or project's usage past its quota. `before` is the
/// usage read in the same transaction before the write; shrinking, or staying put, is always
/// allowed, so lowering a quota below what runs blocks only growth.
fn check_quota(tx: &Transaction<'_>, owner: &ObjectKey, before: Usage) -> Result<(), StoreError> {
    let Some(quota) = quota_in(tx, owner)? else {
        return Ok(());
    };
    let project = (owner.kind == Kind::Project).then_some(owner.name.as_str());
    let tenant = if owner.kind == Kind::Project {
        &owner.tenant
    } else {
        &owner.name
    };
    let after = usage_in(tx, tenant, project)?;
    let (b, a) = (usage_values(&before), usage_values(&after));
    for (i, (resource, limit)) in quota_limits(&quota).into_iter().enumerate() {
        let Some(limit) = limit else { continue };
        if a[i] > limit && a[i] > b[i] {
            let scope = match project {
                Some(p) => format!("project {tenant}/{p}"),
                None => format!("tenant {tenant}"),
            };
            return Err(StoreError::QuotaExceeded {
                scope,
                resource,
                requested: format_amount(resource, a[i] - b[i]),
                free: format_amount(resource, limit - b[i]),
                limit: format_amount(resource, limit),
            });
        }
    }
    Ok(())
}

/// Refuses a project quota larger than its tenant's in any dimension the tenant limits.
fn check_project_quota(tx: &Transaction<'_>, project: &Resource) -> Result<(), StoreError> {
    let Resource::Project(p) = project else {
        return Ok(());
    };
    let Some(own) = &p.spec.quota else {
        return Ok(());
    };
    let tenant_key =
        ObjectKey::cluster(Kind::Tenant, p.metadata.tenant.clone().unwrap_or_default());
    let Some(parent) = quota_in(tx, &tenant_key)? else {
        return Ok(());
    };
    for ((resource, mine), (_, theirs)) in quota_limits(own).into_iter().zip(quota_limits(&parent))
    {
        if let (Some(mine), Some(theirs)) = (mine, theirs)
            && mine > theirs
        {
            return Err(StoreError::QuotaAboveParent(format!(
                "{resource} {} is more than the {} of tenant {}'s quota",
                format_amount(resource, mine),
                format_amount(resource, theirs),
                tenant_key.name
            )));
        }
    }
    Ok(())
}

fn kind_from_db(s: &str) -> Result<Kind, StoreError> {
    Kind::from_manifest(s)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown kind {s:?} in the objects table")))
}

pub(super) fn row_to_object(
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<(String, ObjectKeyParts, StoredParts)> {
    Ok((
        r.get(0)?,
        (r.get(1)?, r.get(2)?, r.get(3)?),
        (r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?),
    ))
}

type ObjectKeyParts = (String, String, String);
type StoredParts = (String, i64, i64, String, String);

pub(super) fn assemble(
    kind: String,
    k: ObjectKeyParts,
    s: StoredParts,
) -> Result<StoredObject, StoreError> {
    let key = ObjectKey {
        kind: kind_from_db(&kind)?,
        tenant: k.0,
        project: k.1,
        name: k.2,
    };
    let labels: BTreeMap<String, String> = serde_json::from_str(&s.3)
        .map_err(|e| StoreError::Corrupt(format!("labels of {key}: {e}")))?;
    Ok(StoredObject {
        key,
        uid: s.0,
        generation: s.1,
        resource_version: s.2 as u64,
        labels,
        json: s.4,
    })
}

pub(super) fn get_in(
    conn: &Connection,
    key: &ObjectKey,
) -> Result<Option<StoredObject>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {OBJECT_COLUMNS} FROM objects WHERE kind = ?1 AND tenant = ?2 AND project = ?3 AND name = ?4"
    ))?;
    let row = stmt
        .query_row(
            params![key.kind.as_str(), key.tenant, key.project, key.name],
            row_to_object,
        )
        .optional()?;
    row.map(|(kind, k, s)| assemble(kind, k, s)).transpose()
}

pub(super) fn index_in(conn: &Connection) -> Result<u64, StoreError> {
    // Cached: it runs on every read that reports its index and on every write.
    let index: i64 = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'index'")?
        .query_row([], |r| r.get(0))?;
    Ok(index as u64)
}

fn list_in(conn: &Connection, filter: &ListFilter) -> Result<Vec<StoredObject>, StoreError> {
    let mut out = Vec::new();
    scan_in(conn, filter, &mut |o| {
        out.push(o);
        true
    })?;
    Ok(out)
}

/// Hands every object matching `filter` to `each` in list order, one at a time, until it
/// returns false.
fn scan_in(
    conn: &Connection,
    filter: &ListFilter,
    each: &mut dyn FnMut(StoredObject) -> bool,
) -> Result<(), StoreError> {
    let mut sql = format!("SELECT {OBJECT_COLUMNS} FROM objects WHERE kind = ?1");
    let kind = filter.kind.as_str();
    let mut args: Vec<&dyn rusqlite::ToSql> = vec![&kind];
    if let Some(t) = &filter.tenant {
        sql.push_str(&format!(" AND tenant = ?{}", args.len() + 1));
        args.push(t);
    }
    if let Some(p) = &filter.project {
        sql.push_str(&format!(" AND project = ?{}", args.len() + 1));
        args.push(p);
    }
    if let Some(n) = &filter.name {
        sql.push_str(&format!(" AND name = ?{}", args.len() + 1));
        args.push(n);
    }
    sql.push_str(" ORDER BY tenant, project, name");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(args.as_slice(), row_to_object)?;
    for row in rows {
        let (kind, k, s) = row?;
        let o = assemble(kind, k, s)?;
        if filter.labels.iter().all(|req| req.matches(&o.labels)) && !each(o) {
            break;
        }
    }
    Ok(())
}

/// Checks a join token and uses it up by one, inside the caller's transaction.
fn use_join_token(tx: &Transaction<'_>, hash: &str, now: i64) -> Result<TokenRecord, StoreError> {
    let found = {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"
        ))?;
        stmt.query_row([hash], token_from_row)
            .optional()?
            .map(finish_token)
            .transpose()?
    };
    let refuse = |r| Err(StoreError::JoinRefused(r));
    let Some(mut t) = found else {
        return refuse(JoinRefusal::Unknown);
    };
    if t.kind != TokenKind::Join {
        return refuse(JoinRefusal::NotAJoinToken);
    }
    if t.revoked {
        return refuse(JoinRefusal::Revoked);
    }
    if t.expires_at.is_some_and(|exp| exp <= now) {
        return refuse(JoinRefusal::Expired);
    }
    if let Some(uses) = t.uses_remaining {
        if uses <= 0 {
            return refuse(JoinRefusal::UsedUp);
        }
        t.uses_remaining = Some(uses - 1);
        tx.execute(
            "UPDATE tokens SET uses_remaining = ?1 WHERE id = ?2",
            params![uses - 1, t.id],
        )?;
    }
    Ok(t)
}

fn exists_in(conn: &Connection, key: &ObjectKey) -> Result<bool, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT 1 FROM objects WHERE kind = ?1 AND tenant = ?2 AND project = ?3 AND name = ?4",
    )?;
    Ok(stmt.exists(params![
        key.kind.as_str(),
        key.tenant,
        key.project,
        key.name
    ])?)
}

fn to_stored(r: &Resource) -> Result<StoredObject, StoreError> {
    let m = r.metadata();
    let json = serde_json::to_string(r)
        .map_err(|e| StoreError::Backend(format!("encoding {}: {e}", r.key())))?;
    Ok(StoredObject {
        key: r.key(),
        uid: m.uid.clone().unwrap_or_default(),
        generation: m.generation.unwrap_or(1),
        resource_version: m.resource_version.unwrap_or(0),
        labels: m.labels.clone(),
        json,
    })
}

/// Writes a whole object as it is (server-owned metadata already set).
pub(super) fn put_in(conn: &Connection, r: &Resource) -> Result<(), StoreError> {
    upsert_in(conn, &to_stored(r)?, Usage::of(r))
}

/// Writes one object; `usage` is what it consumes (nothing, but for instances).
fn upsert_in(conn: &Connection, o: &StoredObject, usage: Usage) -> Result<(), StoreError> {
    let labels =
        serde_json::to_string(&o.labels).map_err(|e| StoreError::Backend(e.to_string()))?;
    let mut stmt = conn.prepare_cached(
        "INSERT INTO objects (kind, tenant, project, name, uid, generation, resource_version, labels, body,
                              use_replicas, use_cpu_millis, use_memory_bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (kind, tenant, project, name) DO UPDATE SET
            uid = excluded.uid, generation = excluded.generation,
            resource_version = excluded.resource_version, labels = excluded.labels, body = excluded.body,
            use_replicas = excluded.use_replicas, use_cpu_millis = excluded.use_cpu_millis,
            use_memory_bytes = excluded.use_memory_bytes",
    )?;
    stmt.execute(params![
        o.key.kind.as_str(),
        o.key.tenant,
        o.key.project,
        o.key.name,
        o.uid,
        o.generation,
        o.resource_version as i64,
        labels,
        o.json,
        usage.replicas,
        usage.cpu_millis,
        usage.memory_bytes
    ])?;
    Ok(())
}

/// Applies `change` to one stored object and writes it if it changed; server-owned metadata is
/// kept and `resourceVersion` set to `next`.
fn update_in(
    tx: &Transaction<'_>,
    existing: StoredObject,
    next: u64,
    change: &mut dyn FnMut(&mut Resource) -> bool,
) -> Result<bool, StoreError> {
    let key = existing.key.clone();
    let before = existing.resource()?;
    let mut after = before.clone();
    if !change(&mut after) || after == before {
        return Ok(false);
    }
    if after.key() != key {
        return Err(StoreError::Backend(format!(
            "an update of {key} tried to rename it to {}",
            after.key()
        )));
    }
    let m = after.metadata_mut();
    m.resource_version = Some(next);
    let bm = before.metadata();
    m.uid.clone_from(&bm.uid);
    m.generation = bm.generation;
    m.created_at.clone_from(&bm.created_at);
    upsert_in(tx, &to_stored(&after)?, Usage::of(&after))?;
    Ok(true)
}

fn in_batch(index: usize, e: StoreError) -> StoreError {
    StoreError::InBatch {
        index,
        source: Box::new(e),
    }
}

fn token_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(TokenRecord, String)> {
    let kind: String = r.get(3)?;
    Ok((
        TokenRecord {
            id: r.get(0)?,
            hash: r.get(1)?,
            name: r.get(2)?,
            kind: TokenKind::Api,
            role: r.get(4)?,
            tenant: r.get(5)?,
            project: r.get(6)?,
            created_at: r.get(7)?,
            expires_at: r.get(8)?,
            uses_remaining: r.get(9)?,
            revoked: r.get::<_, i64>(10)? != 0,
        },
        kind,
    ))
}

fn finish_token((mut t, kind): (TokenRecord, String)) -> Result<TokenRecord, StoreError> {
    t.kind = match kind.as_str() {
        "api" => TokenKind::Api,
        "join" => TokenKind::Join,
        other => {
            return Err(StoreError::Corrupt(format!(
                "token {} has unknown kind {other:?}",
                t.id
            )));
        }
    };
    Ok(t)
}

const TOKEN_COLUMNS: &str =
    "id, hash, name, kind, role, tenant, project, created_at, expires_at, uses_remaining, revoked";

impl Store for SqliteStore {
    fn index(&self) -> u64 {
        self.index.load(Ordering::SeqCst)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
        self.read(|c| get_in(c, key))
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<StoredObject>, StoreError> {
        self.read(|c| list_in(c, filter))
    }

    fn get_at(&self, key: &ObjectKey) -> Result<(u64, Option<StoredObject>), StoreError> {
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let index = index_in(&tx)?;
            let object = get_in(&tx, key)?;
            tx.commit()?;
            Ok((index, object))
        })
    }

    fn list_at(&self, filter: &ListFilter) -> Result<(u64, Vec<StoredObject>), StoreError> {
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let index = index_in(&tx)?;
            let items = list_in(&tx, filter)?;
            tx.commit()?;
            Ok((index, items))
        })
    }

    fn usage(&self, tenant: Option<&str>) -> Result<super::UsageByTenant, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT tenant, project, COUNT(*), SUM(use_replicas), SUM(use_cpu_millis), SUM(use_memory_bytes)
                 FROM objects WHERE kind = 'OpenClawInstance' AND (?1 IS NULL OR tenant = ?1)
                 GROUP BY tenant, project",
            )?;
            let mut out = super::UsageByTenant::new();
            let rows = stmt.query_map([tenant], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    Usage {
                        instances: r.get(2)?,
                        replicas: r.get(3)?,
                        cpu_millis: r.get(4)?,
                        memory_bytes: r.get(5)?,
                    },
                ))
            })?;
            for row in rows {
                let (t, p, u) = row?;
                let entry = out.entry(t).or_default();
                entry.0.add(u);
                entry.1.insert(p, u);
            }
            Ok(out)
        })
    }

    fn scan(
        &self,
        filter: &ListFilter,
        start: &mut dyn FnMut(u64) -> bool,
        each: &mut dyn FnMut(&StoredObject) -> bool,
    ) -> Result<(), StoreError> {
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            if start(index_in(&tx)?) {
                scan_in(&tx, filter, &mut |o| each(&o))?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn write(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
    ) -> Result<WriteSummary, StoreError> {
        Ok(self
            .write_inner(batch, dry_run, &ChangeNote::default(), None)?
            .0)
    }

    fn write_audited(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
        note: &ChangeNote,
        audit: &mut dyn FnMut(&[WriteResult]) -> Vec<AuditEntry>,
    ) -> Result<(WriteSummary, Vec<AuditRecord>), StoreError> {
        self.write_inner(batch, dry_run, note, Some(audit))
    }

    fn delete(&self, key: &ObjectKey, expected: Option<u64>) -> Result<u64, StoreError> {
        Ok(self.delete_inner(key, expected, None)?.0)
    }

    fn delete_batch(
        &self,
        keys: &[ObjectKey],
        skip_missing: bool,
        dry_run: bool,
        mut audit: Option<DeleteAudit<'_>>,
    ) -> Result<(DeleteSummary, Vec<AuditRecord>), StoreError> {
        let mut records = Vec::new();
        let (deleted, index) = self.write_tx(dry_run, |tx, _next| {
            let mut deleted = Vec::with_capacity(keys.len());
            let mut entries = Vec::new();
            for (index, key) in keys.iter().enumerate() {
                if skip_missing && get_in(tx, key)?.is_none() {
                    deleted.push(false);
                    continue;
                }
                let generation = delete_in(tx, key, None).map_err(|e| StoreError::InBatch {
                    index,
                    source: Box::new(e),
                })?;
                if let Some(audit) = audit.as_mut() {
                    entries.extend(audit(key, Some(generation)));
                }
                deleted.push(true);
            }
            let changed = deleted.iter().any(|d| *d);
            if changed && !dry_run && !entries.is_empty() {
                records = crate::audit::append_audit_tx(tx, &entries)?;
            }
            Ok((deleted, changed))
        })?;
        Ok((DeleteSummary { index, deleted }, records))
    }

    fn write_noted(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
        note: &ChangeNote,
    ) -> Result<WriteSummary, StoreError> {
        Ok(self.write_inner(batch, dry_run, note, None)?.0)
    }

    fn config_revisions(&self, uid: &str) -> Result<Vec<RevisionRecord>, StoreError> {
        self.read(|c| revisions::revisions_of(c, uid))
    }

    fn config_revision(
        &self,
        uid: &str,
        revision: u64,
    ) -> Result<Option<RevisionRecord>, StoreError> {
        self.read(|c| revisions::revision_of(c, uid, revision))
    }

    fn current_configs(&self) -> Result<HashMap<String, (u64, String)>, StoreError> {
        self.read(revisions::current_configs)
    }

    fn newest_revisions(&self) -> Result<HashMap<String, u64>, StoreError> {
        self.read(revisions::newest_revisions)
    }

    fn revision_contents(
        &self,
        wanted: &[(String, u64)],
    ) -> Result<Vec<revisions::RevisionContent>, StoreError> {
        self.read(|c| revisions::revision_contents(c, wanted))
    }

    fn deleted_volumes(&self) -> Result<Vec<revisions::DeletedVolume>, StoreError> {
        self.read(revisions::deleted_volumes)
    }

    fn sealed_values(&self) -> Result<Vec<SealedValue>, StoreError> {
        self.read(revisions::sealed_values)
    }

    fn reseal(
        &self,
        reseal: &mut dyn FnMut(&SealedValue) -> Result<String, StoreError>,
    ) -> Result<usize, StoreError> {
        let (count, _) = self.write_tx(false, |tx, _next| {
            let mut values = revisions::sealed_values(tx)?;
            for v in &mut values {
                v.sealed = reseal(v)?;
            }
            revisions::replace_sealed(tx, &values)?;
            // Revisions keep the values their replicas run with, sealed: those too.
            let held = revisions::reseal_revisions(tx, reseal)?;
            tracing::info!(
                values = values.len(),
                held_by_revisions = held,
                "secret values re-sealed"
            );
            // The index moves, so that the assignment book reads the new envelopes.
            Ok((values.len(), true))
        })?;
        Ok(count)
    }

    fn delete_audited(
        &self,
        key: &ObjectKey,
        expected: Option<u64>,
        audit: &mut dyn FnMut(Option<i64>) -> Vec<AuditEntry>,
    ) -> Result<(u64, Vec<AuditRecord>), StoreError> {
        self.delete_inner(key, expected, Some(audit))
    }

    fn update(
        &self,
        key: &ObjectKey,
        change: &mut dyn FnMut(&mut Resource) -> bool,
    ) -> Result<Option<u64>, StoreError> {
        let (changed, index) = self.write_tx(false, |tx, next| {
            let existing = get_in(tx, key)?.ok_or_else(|| StoreError::NotFound(key.clone()))?;
            let changed = update_in(tx, existing, next, change)?;
            Ok((changed, changed))
        })?;
        Ok(changed.then_some(index))
    }

    fn update_many(
        &self,
        keys: &[ObjectKey],
        change: &mut dyn FnMut(&mut Resource) -> bool,
    ) -> Result<Option<u64>, StoreError> {
        let (changed, index) = self.write_tx(false, |tx, next| {
            let mut changed = false;
            for key in keys {
                if let Some(existing) = get_in(tx, key)? {
                    changed |= update_in(tx, existing, next, change)?;
                }
            }
            Ok((changed, changed))
        })?;
        Ok(changed.then_some(index))
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let conn = lock(&self.writer);
        conn.execute(
            &format!("INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
            params![
                t.id,
                t.hash,
                t.name,
                t.kind.as_str(),
                t.role,
                t.tenant,
                t.project,
                t.created_at,
                t.expires_at,
                t.uses_remaining,
                t.revoked as i64
            ],
        )?;
        Ok(())
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"
            ))?;
            stmt.query_row([hash], token_from_row)
                .optional()?
                .map(finish_token)
                .transpose()
        })
    }

    fn consume_join_token(&self, hash: &str, now: i64) -> Result<TokenRecord, StoreError> {
        let mut conn = lock(&self.writer);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let t = use_join_token(&tx, hash, now)?;
        tx.commit()?;
        Ok(t)
    }

    fn enroll_host(
        &self,
        join_token_hash: &str,
        now: i64,
        host: Resource,
    ) -> Result<StoredObject, StoreError> {
        let key = host.key();
        if key.kind != Kind::Host {
            return Err(StoreError::Backend(format!(
                "enrollment creates hosts, not {key}"
            )));
        }
        let created_at = now_rfc3339();
        let (object, _) = self.write_tx(false, |tx, next| {
            use_join_token(tx, join_token_hash, now)?;
            let existing = get_in(tx, &key)?;
            let admitted = admit(
                existing.as_ref(),
                &host,
                WriteMode::Create,
                next,
                &created_at,
                || uuid::Uuid::new_v4().to_string(),
            )?;
            let object = to_stored(&admitted.resource)?;
            upsert_in(tx, &object, Usage::default())?;
            Ok((object, true))
        })?;
        Ok(object)
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([], token_from_row)?;
            rows.map(|r| finish_token(r?)).collect()
        })
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let conn = lock(&self.writer);
        Ok(conn.execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", [id])? > 0)
    }

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<Vec<AuditRecord>, StoreError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = lock(&self.writer);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let records = crate::audit::append_audit_tx(&tx, entries)?;
        tx.commit()?;
        Ok(records)
    }

    fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        self.read(|c| crate::audit::list_audit_in(c, filter))
    }

    fn verify_audit(&self) -> Result<AuditVerification, StoreError> {
        self.read(crate::audit::verify_audit_in)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{LabelRequirement, Outcome};
    use serde_json::json;

    fn open() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("clusterclaw.db")).unwrap();
        (dir, store)
    }

    fn res(v: serde_json::Value) -> Resource {
        Resource::from_value(v).unwrap()
    }

    fn tenant(name: &str) -> Resource {
        res(
            json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": name}}),
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

    fn apply(store: &SqliteStore, items: Vec<Resource>) -> Result<WriteSummary, StoreError> {
        let batch: Vec<_> = items.into_iter().map(|r| (r, WriteMode::Apply)).collect();
        store.write(&batch, false)
    }

    #[test]
    fn batch_is_ordered_parents_first_and_bumps_the_index_once() {
        let (_d, store) = open();
        let mut rx = store.subscribe();
        let s = apply(
            &store,
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
            &store,
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

        let changed = apply(&store, vec![instance("acme", "web", "bot", 3, "eu")]).unwrap();
        assert_eq!(changed.results[0].outcome, Outcome::Configured);
        assert_eq!(changed.index, 2);
        let got = store
            .get(&ObjectKey::instance("acme", "web", "bot"))
            .unwrap()
            .unwrap();
        assert_eq!((got.generation, got.resource_version), (2, 2));
        assert_eq!(got.resource().unwrap().metadata().resource_version, Some(2));
    }

    #[test]
    fn a_failing_item_writes_nothing() {
        let (_d, store) = open();
        apply(&store, vec![tenant("acme"), project("acme", "web")]).unwrap();
        let err = apply(
            &store,
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
        let dup = apply(&store, vec![tenant("x"), tenant("x")]).unwrap_err();
        assert!(
            matches!(dup, StoreError::Invalid(ref p) if p[0].field == "items[1]"),
            "{dup}"
        );
    }

    #[test]
    fn dry_run_reports_without_writing() {
        let (_d, store) = open();
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

    #[test]
    fn stale_resource_version_conflicts() {
        let (_d, store) = open();
        apply(&store, vec![tenant("acme")]).unwrap();
        apply(&store, vec![tenant("other")]).unwrap();
        let mut stale = tenant("acme");
        stale.metadata_mut().labels.insert("a".into(), "b".into());
        stale.metadata_mut().resource_version = Some(7);
        assert!(matches!(
            apply(&store, vec![stale.clone()]),
            Err(StoreError::InBatch { .. })
        ));
        stale.metadata_mut().resource_version = Some(1);
        assert_eq!(
            apply(&store, vec![stale]).unwrap().results[0].outcome,
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

    #[test]
    fn a_batch_delete_is_all_or_nothing_children_first() {
        let (_d, store) = open();
        apply(
            &store,
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

    #[test]
    fn delete_refuses_parents_with_children() {
        let (_d, store) = open();
        apply(
            &store,
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

    #[test]
    fn list_filters_and_orders() {
        let (_d, store) = open();
        apply(
            &store,
            vec![
                tenant("b"),
                tenant("a"),
                project("a", "p"),
                project("b", "p"),
            ],
        )
        .unwrap();
        apply(
            &store,
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

    #[test]
    fn update_keeps_generation_and_bumps_the_index() {
        let (_d, store) = open();
        apply(
            &store,
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
        // A later apply of the same spec keeps the status.
        let s = apply(&store, vec![instance("acme", "web", "bot", 2, "eu")]).unwrap();
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

    #[test]
    fn the_database_files_are_private_even_in_an_open_directory() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("clusterclaw.db");
        let store = SqliteStore::open(&path).unwrap();
        apply(&store, vec![tenant("acme")]).unwrap();
        store
            .get(&ObjectKey::cluster(Kind::Tenant, "acme"))
            .unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{suffix}", path.display()));
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        drop(store);
        // A database left readable by others is tightened when opened.
        for suffix in ["", "-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{suffix}", path.display()));
            if p.exists() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        apply(&store, vec![tenant("beta")]).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{suffix}", path.display()));
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }

    #[test]
    fn reopening_keeps_data_and_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            apply(&store, vec![tenant("acme")]).unwrap();
            apply(&store, vec![tenant("beta")]).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.index(), 2);
        assert!(
            store
                .get(&ObjectKey::cluster(Kind::Tenant, "beta"))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn upgrading_to_revisions_gives_every_instance_its_first_revision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            apply(
                &store,
                vec![
                    tenant("acme"),
                    project("acme", "helpdesk"),
                    instance("acme", "helpdesk", "bot", 1, "eu"),
                ],
            )
            .unwrap();
        }
        {
            // The database as schema version 3 left it.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "DROP TABLE config_revisions; DROP TABLE secret_values; DROP TABLE retained_volumes; PRAGMA user_version = 3;",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let bot = store
            .get(&ObjectKey::instance("acme", "helpdesk", "bot"))
            .unwrap()
            .unwrap();
        let revisions = store.config_revisions(&bot.uid).unwrap();
        assert_eq!(revisions.len(), 1, "{revisions:?}");
        assert_eq!(revisions[0].author, "system");
        let configs = store.current_configs().unwrap();
        assert!(configs[&bot.uid].1.contains("18789"), "{configs:?}");
    }

    #[test]
    fn newer_schema_is_refused_and_garbage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        drop(SqliteStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::SchemaTooNew {
                    found: 99,
                    supported: SCHEMA_VERSION,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("newer"), "{err}");
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, vec![b'x'; 8192]).unwrap();
        let err = SqliteStore::open(&junk).unwrap_err();
        assert!(
            err.to_string().contains("not a clusterclaw database"),
            "{err}"
        );
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

    #[test]
    fn join_tokens_are_checked_and_used_up() {
        let (_d, store) = open();
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

    fn host(name: &str) -> Resource {
        res(
            json!({"apiVersion": "clusterclaw.io/v1", "kind": "Host", "metadata": {"name": name},
                   "spec": {"hostname": name, "capacity": {"cpu": "4", "memory": "8Gi"}}}),
        )
    }

    #[test]
    fn enrolling_uses_the_token_and_creates_the_host_together() {
        let (_d, store) = open();
        store
            .insert_token(&token("twice", TokenKind::Join, Some(1000), Some(2)))
            .unwrap();
        let uses = |store: &SqliteStore| {
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
        assert_eq!(uses(&store), Some(1));

        // The name is taken: nothing is created and the token keeps its use.
        let err = store
            .enroll_host("hash-twice", 200, host("h1"))
            .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists(_)), "{err}");
        assert_eq!((uses(&store), store.index()), (Some(1), 1));

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
        assert_eq!(uses(&store), Some(0));
        assert!(matches!(
            store.enroll_host("hash-twice", 200, host("h3")),
            Err(StoreError::JoinRefused(JoinRefusal::UsedUp))
        ));
        assert!(matches!(
            store.enroll_host("hash-twice", 200, tenant("t")),
            Err(StoreError::Backend(_))
        ));
    }

    #[test]
    fn reads_report_the_index_of_their_snapshot() {
        let (_d, store) = open();
        apply(&store, vec![tenant("a")]).unwrap();
        apply(&store, vec![tenant("b")]).unwrap();
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
}
