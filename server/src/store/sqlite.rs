//! SQLite implementation of the store: WAL journal, `synchronous=FULL`, versioned migrations,
//! one writer connection and a small pool of readers.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};
use tokio::sync::watch;

use super::backend::{Reach, RevisionRow, Tx};
use super::feed::{Change, ChangeType};
use super::revisions::{self, ChangeNote, DeletedVolume, RevisionRecord, SealedValue};
use super::rules::{self, Effect, WriteAudit};
use super::volumes::{HostVolume, ReportedVolume};
use super::{
    DeleteAudit, DeleteSummary, ListFilter, Store, StoreError, StoredObject, TokenKind,
    TokenRecord, Usage, WriteMode, WriteSummary,
};
use crate::audit::{AuditEntry, AuditFilter, AuditRecord, AuditVerification};
use crate::events::{Event, EventFilter, EventRecord, EventType, Folded};
use crate::model::{Kind, ObjectKey, Resource};
use crate::openclaw::schema::Schema;
use crate::util::now_rfc3339;

use super::lease::{self, LeaseRecord};

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
    // 6: when each host last reported (written outside the global index: a heartbeat wakes no
    // controller). IF NOT EXISTS: a database whose version was set back by hand keeps it.
    "CREATE TABLE IF NOT EXISTS host_heartbeats (name TEXT PRIMARY KEY, last_seen_ms INTEGER NOT NULL);",
    // 7: the change log (watches) and events.
    super::feed::MIGRATION,
    // 8: the state volumes hosts report (written outside the global index).
    super::volumes::MIGRATION,
    // 9: the leader lease (one server is always its holder).
    super::lease::SQLITE_MIGRATION,
    // 10: the identity of the key the secret values are sealed with.
    super::SECRETS_KEY_MIGRATION,
    // 11: the server replicas (written outside the global index).
    super::replicas::MIGRATION,
    // 12: the web console's sessions (written outside the global index).
    super::sessions::MIGRATION,
    // 13: each object's identity and version in an index of their own, so that the control
    // loops' look at what changed (`versions`, `kind_fingerprint`) reads no object body.
    VERSIONS_INDEX_MIGRATION,
    // 14: each kind's count, highest version and deletions, kept by triggers, so that
    // `kind_fingerprint` (every control loop's first question on every pass) reads one row.
    KIND_STATS_MIGRATION,
];

/// Covers `versions` (a range of one kind) and `kind_fingerprint` (its count, and its highest
/// version from the end of the range). Without it both read every row of the kind, bodies
/// and all: at 10,000 hosts, megabytes copied out of the page cache on every pass.
const VERSIONS_INDEX_MIGRATION: &str = "CREATE INDEX IF NOT EXISTS objects_versions
     ON objects (kind, resource_version, tenant, project, name, uid);";
/// Each kind's count, the highest version any of its objects was ever written at, and how
/// many of its objects were deleted (an object written again under another uid counts as
/// deleted and created), kept by triggers on every write of `objects`, in the writing
/// transaction. Counting the kind instead reads its whole range of the versions index: 10,000
/// entries for the hosts, on each pass of each loop. The highest version stays where it was
/// when the object holding it is deleted; the count moves then, so the pair still changes with
/// every write of the kind.
///
/// Counted afresh and `IF NOT EXISTS`: a database whose version was set back by hand keeps its
/// triggers and gets a true count (its deletions count from 0 again, at a start, before any
/// reader has seen them).
const KIND_STATS_MIGRATION: &str = "CREATE TABLE IF NOT EXISTS kind_stats (
        kind TEXT PRIMARY KEY,
        count INTEGER NOT NULL,
        highest INTEGER NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0
     ) WITHOUT ROWID;
     DELETE FROM kind_stats;
     INSERT INTO kind_stats (kind, count, highest)
        SELECT kind, count(*), max(resource_version) FROM objects GROUP BY kind;
     CREATE TRIGGER IF NOT EXISTS objects_kind_stats_insert AFTER INSERT ON objects BEGIN
        INSERT INTO kind_stats (kind, count, highest) VALUES (NEW.kind, 1, NEW.resource_version)
        ON CONFLICT (kind) DO UPDATE
            SET count = count + 1, highest = max(highest, excluded.highest);
     END;
     CREATE TRIGGER IF NOT EXISTS objects_kind_stats_delete AFTER DELETE ON objects BEGIN
        UPDATE kind_stats SET count = count - 1, deleted = deleted + 1 WHERE kind = OLD.kind;
     END;
     CREATE TRIGGER IF NOT EXISTS objects_kind_stats_update
        AFTER UPDATE OF kind, uid, resource_version ON objects
     BEGIN
        UPDATE kind_stats SET count = count - 1, deleted = deleted + 1
            WHERE kind = OLD.kind AND (OLD.kind <> NEW.kind OR OLD.uid <> NEW.uid);
        INSERT INTO kind_stats (kind, count, highest)
            VALUES (NEW.kind, OLD.kind <> NEW.kind OR OLD.uid <> NEW.uid, NEW.resource_version)
        ON CONFLICT (kind) DO UPDATE
            SET count = count + excluded.count, highest = max(highest, excluded.highest);
     END;";
/// [`Store::kind_fingerprint`] and [`Store::kind_deletions`]: one row of
/// [`KIND_STATS_MIGRATION`]'s table (none before the kind's first object).
const KIND_STATS_SQL: &str = "SELECT count, highest, deleted FROM kind_stats WHERE kind = ?1";
/// [`Store::versions`]; served by the versions index alone.
const VERSIONS_SQL: &str =
    "SELECT tenant, project, name, uid, resource_version FROM objects WHERE kind = ?1";
/// [`Store::versions_after`]: the top of the kind's range in the versions index.
const VERSIONS_AFTER_SQL: &str = "SELECT tenant, project, name, uid, resource_version FROM objects
     WHERE kind = ?1 AND resource_version > ?2";
/// [`Tx::change_rows`]. `rv` first: a transaction's changes carry its index, which grows with
/// `seq`, so this is the log's order, and only the changes after `?1` are read, through the
/// (rv, ...) index. Ordered by `seq` alone, the planner walks the whole log from its oldest
/// change on every read (every index bump a watch follows).
const CHANGE_ROWS_SQL: &str = "SELECT rv, type, kind, tenant, project, name, labels, body
     FROM changes WHERE rv > ?1 ORDER BY rv, seq LIMIT ?2";

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

/// How often the checkpointer moves what the write-ahead log holds into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// Log pages (4 KiB each) after which a commit checkpoints by itself, on the writer's path:
/// only if the checkpointer falls this far behind (SQLite's default is 1,000).
const WRITER_CHECKPOINT_PAGES: i64 = 16_384;

/// The embedded store.
pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    index: AtomicU64,
    notify: watch::Sender<u64>,
    /// The index of the last write that may change what hosts run ([`Store::desired_index`]).
    desired: watch::Sender<u64>,
    /// Events recorded and not yet written.
    events: Mutex<super::feed::EventQueue>,
    /// The events' sequence after each flush.
    events_notify: watch::Sender<u64>,
    /// The schema every effective `openclaw.json` is checked against before it is stored.
    schema: std::sync::RwLock<std::sync::Arc<Schema>>,
    /// Objects the control loops read, decoded ([`Store::decoded_cache`]).
    decoded: super::decoded::DecodedCache,
    /// The checkpointer's thread ends once this is dropped (with the store).
    _checkpointer: Option<std::sync::mpsc::Sender<()>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("index", &self.index())
            .finish()
    }
}

/// Starts the thread that checkpoints the write-ahead log every [`CHECKPOINT_EVERY`], on a
/// connection of its own, until the returned sender is dropped. A commit that has to
/// checkpoint (SQLite's default after 1,000 log pages) copies those pages into the database
/// file and syncs it while it holds the writer: at a few megabytes of status a second, a stall
/// of every write several times a second. A passive checkpoint here runs beside the writer
/// instead: it copies what no reader still needs, without a lock that stops writes, and the
/// writer's own checkpoint stays as a backstop ([`WRITER_CHECKPOINT_PAGES`]).
/// Settings of every connection that runs the store's statements: the cached statements
/// keep their plans. Without the query planner stability guarantee, SQLite (since 3.46)
/// marks a statement for preparing again whenever a value bound to an equality it does not
/// answer from an index, or to a `LIMIT`, changes, and a statement put back in the cache has
/// its values cleared: every use of such a statement (the event folding, the change log,
/// paged lists) parsed and planned it anew.
fn settle_plans(conn: &Connection) -> Result<(), StoreError> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

fn start_checkpointer(path: &Path) -> Result<std::sync::mpsc::Sender<()>, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let shown = path.display().to_string();
    std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            let mut failing = false;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(CHECKPOINT_EVERY)
            {
                let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    r.get::<_, i64>(0)
                });
                match done {
                    Ok(_) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(database = %shown, error = %e, "checkpoint failed; retrying");
                    }
                    Err(_) => {}
                }
            }
        })
        .map_err(|e| StoreError::Backend(format!("cannot start the checkpointer: {e}")))?;
    Ok(stop)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a connection half-way through a transaction
    // (rusqlite rolls back on drop), so the data behind a poisoned lock is still good.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The writer connection, held. How long its thread waited for it and held it go to
/// `/metrics` ([`crate::metrics::observe_store_writer_wait`], [`crate::metrics::observe_store_writer_held`]), by who writes: the leader's
/// controllers (their writes are fenced) or anything else (status reports, the API).
struct Writer<'a> {
    conn: std::sync::MutexGuard<'a, Connection>,
    since: Instant,
    controllers: bool,
}

impl std::ops::Deref for Writer<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for Writer<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        crate::metrics::observe_store_writer_held(self.controllers, self.since.elapsed());
    }
}

impl SqliteStore {
    /// Takes the writer connection ([`Writer`]).
    fn writer(&self) -> Writer<'_> {
        let asked = Instant::now();
        let controllers = lease::fence().is_some();
        let conn = lock(&self.writer);
        let since = Instant::now();
        crate::metrics::observe_store_writer_wait(controllers, since - asked);
        Writer {
            conn,
            since,
            controllers,
        }
    }

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
        settle_plans(&conn)?;
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
        let checkpointer = start_checkpointer(path)
            .inspect_err(|e| {
                tracing::warn!(error = %e, "no background checkpointer; the writer checkpoints by itself")
            })
            .ok();
        // Without the checkpointer, SQLite's own default: the writer checkpoints every 1,000.
        let writer_pages = if checkpointer.is_some() {
            WRITER_CHECKPOINT_PAGES
        } else {
            1_000
        };
        conn.execute_batch(&format!("PRAGMA wal_autocheckpoint = {writer_pages};"))?;
        let index = index_in(&conn)?;
        let (notify, _) = watch::channel(index);
        let (desired, _) = watch::channel(index);
        let events_seq: i64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'events_seq'", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0);
        let (events_notify, _) = watch::channel(events_seq as u64);
        Ok(SqliteStore {
            events: Mutex::default(),
            events_notify,
            path: path.to_path_buf(),
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            index: AtomicU64::new(index),
            notify,
            desired,
            schema: std::sync::RwLock::new(std::sync::Arc::new(Schema::builtin())),
            decoded: super::decoded::DecodedCache::default(),
            _checkpointer: checkpointer,
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
        settle_plans(&conn)?;
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
        let now = now_rfc3339();
        let (written, index) = self.write_tx(dry_run, |tx, next| {
            let w = rules::write_batch(
                &mut SqliteTx(tx),
                batch,
                dry_run,
                note,
                &schema,
                next,
                &now,
                audit,
            )?;
            let effect = w.effect;
            Ok((w, effect))
        })?;
        let summary = WriteSummary {
            index,
            results: written.results,
        };
        Ok((summary, written.records))
    }

    /// [`Store::delete`], with the audit entries `audit` makes (from the generation deleted)
    /// appended in the same transaction.
    fn delete_inner(
        &self,
        key: &ObjectKey,
        expected: Option<u64>,
        audit: Option<&mut dyn FnMut(Option<i64>) -> Vec<AuditEntry>>,
    ) -> Result<(u64, Vec<AuditRecord>), StoreError> {
        let (records, index) = self.write_tx(false, |tx, _next| {
            let mut tx = SqliteTx(tx);
            let generation = rules::delete_one(&mut tx, key, expected)?;
            let records = match audit {
                Some(audit) => rules::append_audit(&mut tx, &audit(Some(generation)))?,
                None => Vec::new(),
            };
            Ok((records, Effect::of_keys([key])))
        })?;
        Ok((index, records))
    }

    /// An update transaction ([`rules::update_key`], [`rules::update_many`]): it reads
    /// through the decoded cache, and the cache takes what it wrote once it has committed.
    fn update_seeded(
        &self,
        f: impl FnOnce(&mut dyn Tx, u64, &mut rules::Seeds<'_>) -> Result<Effect, StoreError>,
    ) -> Result<Option<u64>, StoreError> {
        let ((changed, written), index) = self.write_tx(false, |tx, next| {
            let mut seeds = rules::Seeds::new(&self.decoded);
            let effect = f(&mut SqliteTx(tx), next, &mut seeds)?;
            Ok(((effect != Effect::Unchanged, seeds.into_written()), effect))
        })?;
        self.decoded.seed(written);
        Ok(changed.then_some(index))
    }

    /// Runs `f` in an immediate write transaction with the next index. `f` returns what it
    /// changed; only when it changed anything is the index bumped and the transaction
    /// committed, and the desired index moves too when the change may reach hosts.
    fn write_tx<T>(
        &self,
        dry_run: bool,
        f: impl FnOnce(&Transaction<'_>, u64) -> Result<(T, Effect), StoreError>,
    ) -> Result<(T, u64), StoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        fence_check(&tx)?;
        let current = index_in(&tx)?;
        let next = current + 1;
        let (out, effect) = f(&tx, next)?;
        if effect == Effect::Unchanged || dry_run {
            tx.rollback()?;
            return Ok((out, current));
        }
        tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'index'")?
            .execute([next as i64])?;
        if next.is_multiple_of(super::feed::TRIM_EVERY) {
            super::feed::trim(&mut SqliteTx(&tx))?;
        }
        tx.commit()?;
        self.index.store(next, Ordering::SeqCst);
        // The desired index first: whoever wakes on the global one and then asks for it
        // already sees this write.
        if effect == Effect::Desired {
            self.desired.send_replace(next);
        }
        self.notify.send_replace(next);
        Ok((out, next))
    }
}

/// Refuses the writes of a transaction fenced by an epoch older than the lease's
/// ([`super::lease`]); the writer's lock keeps the lease from moving meanwhile.
fn fence_check(conn: &Connection) -> Result<(), StoreError> {
    let fence = lease::fence();
    if fence.is_none() {
        return Ok(());
    }
    let current: i64 = conn.query_row(
        "SELECT epoch FROM leader_lease WHERE name = 'controllers'",
        [],
        |r| r.get(0),
    )?;
    lease::check_fence(fence, current as u64)
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
            super::revisions::backfill_instance_revisions(&mut SqliteTx(&tx))?;
            super::revisions::backfill(&mut SqliteTx(&tx), &Schema::builtin(), &now_rfc3339())?;
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

/// A kind's (count, highest version, deletions) on `c` ([`KIND_STATS_SQL`]).
fn kind_stats_in(c: &Connection, kind: Kind) -> Result<(u64, u64, u64), StoreError> {
    let row: Option<(i64, i64, i64)> = c
        .prepare_cached(KIND_STATS_SQL)?
        .query_row([kind.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let (count, highest, deleted) = row.unwrap_or((0, 0, 0));
    Ok((count as u64, highest as u64, deleted as u64))
}

/// [`Store::kind_fingerprint`] on `c`.
fn fingerprint_in(c: &Connection, kind: Kind) -> Result<(u64, u64), StoreError> {
    kind_stats_in(c, kind).map(|(count, highest, _)| (count, highest))
}

/// (key, uid, resourceVersion) of the objects of `kind` that `sql` (one of [`VERSIONS_SQL`],
/// [`VERSIONS_AFTER_SQL`]) selects.
fn versions_in(
    c: &Connection,
    sql: &str,
    kind: Kind,
    after: Option<u64>,
) -> Result<Vec<(ObjectKey, String, u64)>, StoreError> {
    let mut stmt = c.prepare_cached(sql)?;
    let row = |r: &rusqlite::Row<'_>| {
        Ok((
            ObjectKey {
                kind,
                tenant: r.get(0)?,
                project: r.get(1)?,
                name: r.get(2)?,
            },
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)? as u64,
        ))
    };
    let rows = match after {
        None => stmt
            .query_map([kind.as_str()], row)?
            .collect::<Result<_, _>>()?,
        Some(after) => stmt
            .query_map(params![kind.as_str(), after as i64], row)?
            .collect::<Result<_, _>>()?,
    };
    Ok(rows)
}

fn kind_from_db(s: &str) -> Result<Kind, StoreError> {
    Kind::from_manifest(s)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown kind {s:?} in the objects table")))
}

fn row_to_object(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, ObjectKeyParts, StoredParts)> {
    Ok((
        r.get(0)?,
        (r.get(1)?, r.get(2)?, r.get(3)?),
        (r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?),
    ))
}

type ObjectKeyParts = (String, String, String);
type StoredParts = (String, i64, i64, String, String);

fn assemble(kind: String, k: ObjectKeyParts, s: StoredParts) -> Result<StoredObject, StoreError> {
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

fn get_in(conn: &Connection, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
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

fn index_in(conn: &Connection) -> Result<u64, StoreError> {
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

/// Writes one object; `usage` is what it consumes (nothing, but for instances).
fn upsert_in(conn: &Connection, o: &StoredObject, usage: Usage) -> Result<(), StoreError> {
    let labels =
        serde_json::to_string(&o.labels).map_err(|e| StoreError::Backend(e.to_string()))?;
    log_upsert(conn, o, &labels)?;
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

/// A transaction (or read snapshot) of the SQLite engine, as the rules of a write see it.
pub(super) struct SqliteTx<'a>(pub(super) &'a Connection);

fn opt_u64(v: Option<i64>) -> u64 {
    v.unwrap_or(0).max(0) as u64
}

fn revision_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RevisionRow> {
    Ok(RevisionRow {
        instance_uid: r.get(0)?,
        revision: r.get::<_, i64>(1)? as u64,
        tenant: r.get(2)?,
        project: r.get(3)?,
        instance: r.get(4)?,
        config: r.get(5)?,
        hash: r.get(6)?,
        layers: r.get(7)?,
        author: r.get(8)?,
        message: r.get(9)?,
        created_at: r.get(10)?,
        image: r.get(11)?,
        env: r.get(12)?,
        resources: r.get(13)?,
        secrets: r.get(14)?,
        spec: r.get(15)?,
        content_hash: r.get(16)?,
    })
}

const REVISION_COLUMNS: &str = "instance_uid, revision, tenant, project, instance, config, hash, layers, author, message, created_at, image, env, resources, secrets, spec, content_hash";

fn host_volume_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HostVolume> {
    Ok(HostVolume {
        host: r.get(0)?,
        volume: ReportedVolume {
            name: r.get(1)?,
            tenant: r.get(2)?,
            project: r.get(3)?,
            instance: r.get(4)?,
            replica: r.get(5)?,
        },
        first_seen: r.get(6)?,
        orphaned_since: r.get(7)?,
        delete_requested: r.get(8)?,
        delete_reason: r.get(9)?,
    })
}

const EVENT_COLUMNS: &str = "id, seq, kind, tenant, project, name, replica, type, reason, message, source, count, first_ms, last_ms";

fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        id: r.get(0)?,
        seq: r.get(1)?,
        kind: r.get(2)?,
        tenant: r.get(3)?,
        project: r.get(4)?,
        name: r.get(5)?,
        replica: r.get(6)?,
        type_: r.get(7)?,
        reason: r.get(8)?,
        message: r.get(9)?,
        source: r.get(10)?,
        count: r.get(11)?,
        first_ms: r.get(12)?,
        last_ms: r.get(13)?,
    })
}

/// A stored event as its columns (shared by both engines).
pub(super) struct EventRow {
    pub id: i64,
    pub seq: i64,
    pub kind: String,
    pub tenant: String,
    pub project: String,
    pub name: String,
    pub replica: String,
    pub type_: String,
    pub reason: String,
    pub message: String,
    pub source: String,
    pub count: i64,
    pub first_ms: i64,
    pub last_ms: i64,
}

impl EventRow {
    pub(super) fn into_record(self) -> Result<EventRecord, StoreError> {
        Ok(EventRecord {
            id: self.id as u64,
            seq: self.seq as u64,
            event: Event {
                object: ObjectKey {
                    kind: kind_from_db(&self.kind)?,
                    tenant: self.tenant,
                    project: self.project,
                    name: self.name,
                },
                replica: Some(self.replica).filter(|r| !r.is_empty()),
                type_: EventType::parse(&self.type_).unwrap_or(EventType::Normal),
                reason: self.reason,
                message: self.message,
                source: self.source,
                at_ms: self.last_ms,
            },
            count: self.count as u64,
            first_ms: self.first_ms,
            last_ms: self.last_ms,
        })
    }
}

/// Logs the write of `o` (before it is written, to tell ADDED from MODIFIED).
fn log_upsert(conn: &Connection, o: &StoredObject, labels: &str) -> Result<(), StoreError> {
    let exists = exists_in(conn, &o.key)?;
    let type_ = if exists { "MODIFIED" } else { "ADDED" };
    conn.prepare_cached(
        "INSERT INTO changes (rv, type, kind, tenant, project, name, labels, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (rv, kind, tenant, project, name) DO UPDATE SET labels = excluded.labels, body = excluded.body",
    )?
    .execute(params![
        o.resource_version as i64,
        type_,
        o.key.kind.as_str(),
        o.key.tenant,
        o.key.project,
        o.key.name,
        labels,
        o.json
    ])?;
    Ok(())
}

impl Tx for SqliteTx<'_> {
    fn get(&mut self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
        get_in(self.0, key)
    }

    fn head(&mut self, key: &ObjectKey) -> Result<Option<(String, u64)>, StoreError> {
        // Only columns before the body are read: its overflow pages stay unread.
        let mut stmt = self.0.prepare_cached(
            "SELECT uid, resource_version FROM objects
             WHERE kind = ?1 AND tenant = ?2 AND project = ?3 AND name = ?4",
        )?;
        Ok(stmt
            .query_row(
                params![key.kind.as_str(), key.tenant, key.project, key.name],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)),
            )
            .optional()?)
    }

    fn exists(&mut self, key: &ObjectKey) -> Result<bool, StoreError> {
        exists_in(self.0, key)
    }

    fn put(&mut self, object: &StoredObject, usage: Usage) -> Result<(), StoreError> {
        upsert_in(self.0, object, usage)
    }

    fn remove(&mut self, o: &StoredObject) -> Result<(), StoreError> {
        let key = &o.key;
        // Logged at the index this transaction commits at (the stored one plus one).
        let labels =
            serde_json::to_string(&o.labels).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.0
            .prepare_cached(
                "INSERT INTO changes (rv, type, kind, tenant, project, name, labels, body)
                 VALUES ((SELECT value + 1 FROM meta WHERE key = 'index'), 'DELETED', ?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (rv, kind, tenant, project, name) DO UPDATE SET type = 'DELETED', body = excluded.body",
            )?
            .execute(params![
                key.kind.as_str(),
                key.tenant,
                key.project,
                key.name,
                labels,
                o.json
            ])?;
        self.0.execute(
            "DELETE FROM objects WHERE kind = ?1 AND tenant = ?2 AND project = ?3 AND name = ?4",
            params![key.kind.as_str(), key.tenant, key.project, key.name],
        )?;
        Ok(())
    }

    fn count(
        &mut self,
        kind: Kind,
        tenant: &str,
        project: Option<&str>,
    ) -> Result<u64, StoreError> {
        let n: i64 = self
            .0
            .prepare_cached(
                "SELECT COUNT(*) FROM objects WHERE kind = ?1 AND tenant = ?2 AND (?3 IS NULL OR project = ?3)",
            )?
            .query_row(params![kind.as_str(), tenant, project], |r| r.get(0))?;
        Ok(n as u64)
    }

    fn usage(&mut self, tenant: &str, project: Option<&str>) -> Result<Usage, StoreError> {
        usage_in(self.0, tenant, project)
    }

    fn token_by_hash(&mut self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let mut stmt = self.0.prepare_cached(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"
        ))?;
        stmt.query_row([hash], token_from_row)
            .optional()?
            .map(finish_token)
            .transpose()
    }

    fn set_token_uses(&mut self, id: &str, uses: i64) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE tokens SET uses_remaining = ?1 WHERE id = ?2",
            params![uses, id],
        )?;
        Ok(())
    }

    fn audit_head(&mut self) -> Result<(u64, Option<String>, u64), StoreError> {
        crate::audit::head_in(self.0)
    }

    fn audit_insert(&mut self, records: &[AuditRecord]) -> Result<(), StoreError> {
        crate::audit::insert_in(self.0, records)
    }

    fn set_audit_written(&mut self, written: u64) -> Result<(), StoreError> {
        crate::audit::set_written_in(self.0, written)
    }

    fn index(&mut self) -> Result<u64, StoreError> {
        index_in(self.0)
    }

    fn list_in_tenant(
        &mut self,
        kind: Kind,
        tenant: &str,
    ) -> Result<Vec<StoredObject>, StoreError> {
        let mut filter = ListFilter::all(kind);
        filter.tenant = Some(tenant.to_string());
        list_in(self.0, &filter)
    }

    fn instances(&mut self, reach: Reach<'_>) -> Result<Vec<StoredObject>, StoreError> {
        let template = crate::configcenter::DEFAULT_TEMPLATE;
        let (sql_where, args): (&str, Vec<&dyn rusqlite::ToSql>) = match &reach {
            Reach::All => ("1 = 1", vec![]),
            Reach::Tenant(t) => ("tenant = ?1", vec![t]),
            Reach::Project(t, p) => ("tenant = ?1 AND project = ?2", vec![t, p]),
            Reach::Template(name) => (
                "COALESCE(json_extract(body, '$.spec.configTemplate'), ?2) = ?1",
                vec![name, &template],
            ),
        };
        let sql = format!(
            "SELECT {OBJECT_COLUMNS} FROM objects WHERE kind = 'OpenClawInstance' AND {sql_where}
             ORDER BY tenant, project, name"
        );
        let mut stmt = self.0.prepare_cached(&sql)?;
        let rows = stmt.query_map(args.as_slice(), row_to_object)?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, k, s) = row?;
            out.push(assemble(kind, k, s)?);
        }
        Ok(out)
    }

    fn meta(&mut self, key: &'static str) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .0
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()?;
        Ok(opt_u64(v))
    }

    fn raise_meta(&mut self, key: &'static str, value: u64) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
            )?
            .execute(params![key, value as i64])?;
        Ok(())
    }

    fn put_secret_values(
        &mut self,
        key: &ObjectKey,
        values: &[(String, String)],
    ) -> Result<(), StoreError> {
        self.drop_secret_values(key)?;
        let mut insert = self.0.prepare_cached(
            "INSERT INTO secret_values (tenant, project, name, key, sealed) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (k, v) in values {
            insert.execute(params![key.tenant, key.project, key.name, k, v])?;
        }
        Ok(())
    }

    fn drop_secret_values(&mut self, key: &ObjectKey) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "DELETE FROM secret_values WHERE tenant = ?1 AND project = ?2 AND name = ?3",
            )?
            .execute(params![key.tenant, key.project, key.name])?;
        Ok(())
    }

    fn sealed_value(
        &mut self,
        secret: &ObjectKey,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .0
            .prepare_cached(
                "SELECT sealed FROM secret_values WHERE tenant = ?1 AND project = ?2 AND name = ?3 AND key = ?4",
            )?
            .query_row(
                params![secret.tenant, secret.project, secret.name, key],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn sealed_values(&mut self) -> Result<Vec<SealedValue>, StoreError> {
        let mut stmt = self.0.prepare_cached(
            "SELECT tenant, project, name, key, sealed FROM secret_values ORDER BY tenant, project, name, key",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(SealedValue {
                tenant: r.get(0)?,
                project: r.get(1)?,
                name: r.get(2)?,
                key: r.get(3)?,
                sealed: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_sealed(&mut self, v: &SealedValue) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "UPDATE secret_values SET sealed = ?5 WHERE tenant = ?1 AND project = ?2 AND name = ?3 AND key = ?4",
            )?
            .execute(params![v.tenant, v.project, v.name, v.key, v.sealed])?;
        Ok(())
    }

    fn latest_revision(&mut self, uid: &str) -> Result<Option<RevisionRow>, StoreError> {
        Ok(self
            .0
            .prepare_cached(&format!(
                "SELECT {REVISION_COLUMNS} FROM config_revisions WHERE instance_uid = ?1
                 ORDER BY revision DESC LIMIT 1"
            ))?
            .query_row([uid], revision_from_row)
            .optional()?)
    }

    fn revision(&mut self, uid: &str, revision: u64) -> Result<Option<RevisionRow>, StoreError> {
        Ok(self
            .0
            .prepare_cached(&format!(
                "SELECT {REVISION_COLUMNS} FROM config_revisions WHERE instance_uid = ?1 AND revision = ?2"
            ))?
            .query_row(params![uid, revision as i64], revision_from_row)
            .optional()?)
    }

    fn revisions(&mut self, uid: &str) -> Result<Vec<RevisionRow>, StoreError> {
        let mut stmt = self.0.prepare_cached(&format!(
            "SELECT {REVISION_COLUMNS} FROM config_revisions WHERE instance_uid = ?1 ORDER BY revision DESC"
        ))?;
        let rows = stmt.query_map([uid], revision_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn insert_revision(&mut self, r: &RevisionRow) -> Result<(), StoreError> {
        self.0
            .prepare_cached(&format!(
                "INSERT INTO config_revisions ({REVISION_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
            ))?
            .execute(params![
                r.instance_uid,
                r.revision as i64,
                r.tenant,
                r.project,
                r.instance,
                r.config,
                r.hash,
                r.layers,
                r.author,
                r.message,
                r.created_at,
                r.image,
                r.env,
                r.resources,
                r.secrets,
                r.spec,
                r.content_hash,
            ])?;
        Ok(())
    }

    fn revision_numbers(&mut self, uid: &str, upto: u64) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self.0.prepare_cached(
            "SELECT revision FROM config_revisions WHERE instance_uid = ?1 AND revision <= ?2 ORDER BY revision",
        )?;
        let rows = stmt.query_map(params![uid, upto as i64], |r| r.get::<_, i64>(0))?;
        Ok(rows
            .map(|r| r.map(|n| n as u64))
            .collect::<Result<_, _>>()?)
    }

    fn drop_revisions(&mut self, uid: &str, revision: Option<u64>) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "DELETE FROM config_revisions WHERE instance_uid = ?1 AND (?2 IS NULL OR revision = ?2)",
            )?
            .execute(params![uid, revision.map(|n| n as i64)])?;
        Ok(())
    }

    fn newest_revisions(&mut self) -> Result<HashMap<String, u64>, StoreError> {
        let mut stmt = self.0.prepare_cached(
            "SELECT instance_uid, MAX(revision) FROM config_revisions GROUP BY instance_uid",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn current_configs(&mut self) -> Result<HashMap<String, (u64, String)>, StoreError> {
        let mut stmt = self.0.prepare_cached(
            "SELECT r.instance_uid, r.revision, r.config FROM config_revisions r
             JOIN (SELECT instance_uid, MAX(revision) AS revision FROM config_revisions GROUP BY instance_uid) m
               ON r.instance_uid = m.instance_uid AND r.revision = m.revision",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                (r.get::<_, i64>(1)? as u64, r.get::<_, String>(2)?),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revisions_holding_secrets(&mut self) -> Result<Vec<(String, u64, String)>, StoreError> {
        let mut stmt = self.0.prepare_cached(
            "SELECT instance_uid, revision, secrets FROM config_revisions
             WHERE secrets IS NOT NULL AND secrets != '[]'",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_revision_secrets(
        &mut self,
        uid: &str,
        revision: u64,
        secrets: &str,
    ) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "UPDATE config_revisions SET secrets = ?3 WHERE instance_uid = ?1 AND revision = ?2",
            )?
            .execute(params![uid, revision as i64, secrets])?;
        Ok(())
    }

    fn retained_volumes(
        &mut self,
        instance: Option<(&str, &str, &str)>,
    ) -> Result<Vec<DeletedVolume>, StoreError> {
        let (t, p, i) = match instance {
            Some((t, p, i)) => (Some(t), Some(p), Some(i)),
            None => (None, None, None),
        };
        let mut stmt = self.0.prepare_cached(
            "SELECT instance_uid, tenant, project, instance, replica, ordinal, host, since
             FROM retained_volumes
             WHERE (?1 IS NULL OR (tenant = ?1 AND project = ?2 AND instance = ?3))
             ORDER BY host, tenant, project, instance, ordinal",
        )?;
        let rows = stmt.query_map(params![t, p, i], |r| {
            Ok(DeletedVolume {
                instance_uid: r.get(0)?,
                tenant: r.get(1)?,
                project: r.get(2)?,
                instance: r.get(3)?,
                replica: r.get(4)?,
                ordinal: r.get::<_, i64>(5)? as u32,
                host: r.get(6)?,
                since: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn keep_volume(&mut self, v: &DeletedVolume) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "INSERT OR REPLACE INTO retained_volumes (instance_uid, tenant, project, instance, replica, ordinal, host, since)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                v.instance_uid,
                v.tenant,
                v.project,
                v.instance,
                v.replica,
                v.ordinal as i64,
                v.host,
                v.since
            ])?;
        Ok(())
    }

    fn drop_retained_volumes(
        &mut self,
        (t, p, i): (&str, &str, &str),
        replica_on: Option<(&str, &str)>,
    ) -> Result<(), StoreError> {
        let (replica, host) = match replica_on {
            Some((r, h)) => (Some(r), Some(h)),
            None => (None, None),
        };
        self.0
            .prepare_cached(
                "DELETE FROM retained_volumes WHERE tenant = ?1 AND project = ?2 AND instance = ?3
                 AND (?4 IS NULL OR (replica = ?4 AND host = ?5))",
            )?
            .execute(params![t, p, i, replica, host])?;
        Ok(())
    }

    fn host_volumes(&mut self, host: Option<&str>) -> Result<Vec<HostVolume>, StoreError> {
        let mut stmt = self.0.prepare_cached(
            "SELECT host, name, tenant, project, instance, replica, first_seen, orphaned_since,
                    delete_requested, delete_reason
             FROM host_volumes WHERE ?1 IS NULL OR host = ?1 ORDER BY host, name",
        )?;
        let rows = stmt.query_map(params![host], host_volume_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn requested_volume_deletions(&mut self) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self.0.prepare_cached(
            "SELECT host, name FROM host_volumes WHERE delete_requested IS NOT NULL
             ORDER BY host, name",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn put_host_volume(
        &mut self,
        host: &str,
        v: &ReportedVolume,
        now: &str,
    ) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "INSERT INTO host_volumes (host, name, tenant, project, instance, replica, first_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (host, name) DO UPDATE SET tenant = excluded.tenant,
                    project = excluded.project, instance = excluded.instance, replica = excluded.replica",
            )?
            .execute(params![
                host, v.name, v.tenant, v.project, v.instance, v.replica, now
            ])?;
        Ok(())
    }

    fn drop_host_volumes(&mut self, host: &str, name: Option<&str>) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "DELETE FROM host_volumes WHERE host = ?1 AND (?2 IS NULL OR name = ?2)",
            )?
            .execute(params![host, name])?;
        Ok(())
    }

    fn set_orphaned(
        &mut self,
        host: &str,
        name: &str,
        since: Option<&str>,
    ) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "UPDATE host_volumes SET orphaned_since = ?3 WHERE host = ?1 AND name = ?2",
            )?
            .execute(params![host, name, since])?;
        Ok(())
    }

    fn set_volume_deletion(
        &mut self,
        host: &str,
        name: &str,
        now: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "UPDATE host_volumes SET delete_requested = coalesce(delete_requested, ?3),
                    delete_reason = coalesce(delete_reason, ?4)
                 WHERE host = ?1 AND name = ?2",
            )?
            .execute(params![host, name, now, reason])?;
        Ok(())
    }

    fn change_rows(&mut self, after: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let mut stmt = self.0.prepare_cached(CHANGE_ROWS_SQL)?;
        let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, String>(7)?,
            ))
        })?;
        let mut items = Vec::new();
        for row in rows {
            let (rv, type_, kind, tenant, project, name, labels, body) = row?;
            items.push(change_of(
                rv, &type_, &kind, tenant, project, name, &labels, body,
            )?);
        }
        Ok(items)
    }

    fn change_rv_from_newest(&mut self, offset: u64) -> Result<Option<u64>, StoreError> {
        let cut: Option<i64> = self
            .0
            .prepare_cached("SELECT rv FROM changes ORDER BY seq DESC LIMIT 1 OFFSET ?1")?
            .query_row([offset as i64], |r| r.get(0))
            .optional()?;
        Ok(cut.map(|c| c as u64))
    }

    fn drop_changes(&mut self, upto: u64) -> Result<(), StoreError> {
        self.0
            .prepare_cached("DELETE FROM changes WHERE rv <= ?1")?
            .execute([upto as i64])?;
        Ok(())
    }

    fn find_event(&mut self, e: &Event, since_ms: i64) -> Result<Option<i64>, StoreError> {
        Ok(self
            .0
            // Named, because the planner otherwise takes `events_tenant` for the `ORDER BY`
            // and walks every event of the tenant within the window: a placement burst of
            // thousands of events then spends most of its time here.
            .prepare_cached(
                "SELECT id FROM events INDEXED BY events_object WHERE kind = ?1 AND tenant = ?2 AND project = ?3 AND name = ?4
                 AND reason = ?5 AND replica = ?6 AND type = ?7 AND message = ?8 AND source = ?9
                 AND last_ms >= ?10 ORDER BY last_ms DESC LIMIT 1",
            )?
            .query_row(
                params![
                    e.object.kind.as_str(),
                    e.object.tenant,
                    e.object.project,
                    e.object.name,
                    e.reason,
                    e.replica.as_deref().unwrap_or(""),
                    e.type_.as_str(),
                    e.message,
                    e.source,
                    since_ms
                ],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn fold_event(
        &mut self,
        id: i64,
        count: u64,
        last_ms: i64,
        seq: u64,
    ) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "UPDATE events SET count = count + ?1, last_ms = MAX(last_ms, ?2), seq = ?3 WHERE id = ?4",
            )?
            .execute(params![count as i64, last_ms, seq as i64, id])?;
        Ok(())
    }

    fn insert_event(&mut self, seq: u64, f: &Folded) -> Result<(), StoreError> {
        let e = &f.event;
        self.0
            .prepare_cached(
                "INSERT INTO events (seq, kind, tenant, project, name, replica, type, reason, message, source, count, first_ms, last_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
                seq as i64,
                e.object.kind.as_str(),
                e.object.tenant,
                e.object.project,
                e.object.name,
                e.replica.as_deref().unwrap_or(""),
                e.type_.as_str(),
                e.reason,
                e.message,
                e.source,
                f.count as i64,
                f.first_ms,
                f.last_ms
            ])?;
        Ok(())
    }

    fn drop_events_before(&mut self, cutoff_ms: i64) -> Result<(u64, usize), StoreError> {
        let newest: i64 = self
            .0
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events WHERE last_ms < ?1")?
            .query_row([cutoff_ms], |r| r.get(0))?;
        let n = self
            .0
            .prepare_cached("DELETE FROM events WHERE last_ms < ?1")?
            .execute([cutoff_ms])?;
        Ok((newest as u64, n))
    }

    fn event_counts(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.0.prepare_cached(
            "SELECT tenant, COUNT(*) FROM events GROUP BY tenant ORDER BY tenant",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn drop_oldest_events(&mut self, tenant: &str, n: u64) -> Result<(u64, usize), StoreError> {
        let gone: i64 = self
            .0
            .prepare_cached(
                "SELECT COALESCE(MAX(seq), 0) FROM (SELECT seq FROM events WHERE tenant = ?1 ORDER BY last_ms, id LIMIT ?2)",
            )?
            .query_row(params![tenant, n as i64], |r| r.get(0))?;
        let deleted = self
            .0
            .prepare_cached(
                "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE tenant = ?1 ORDER BY last_ms, id LIMIT ?2)",
            )?
            .execute(params![tenant, n as i64])?;
        Ok((gone as u64, deleted))
    }

    fn events(&mut self, filter: &EventFilter) -> Result<Vec<EventRecord>, StoreError> {
        let (kind, name) = match &filter.object {
            Some((k, n)) => (Some(k.as_str()), Some(n.as_str())),
            None => (None, None),
        };
        let limit = filter.limit.map_or(-1, |l| l as i64);
        let mut stmt = self.0.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR project = ?2)
               AND (?3 IS NULL OR (kind = ?3 AND name = ?4))
             ORDER BY last_ms DESC, id DESC LIMIT ?5"
        ))?;
        let rows = stmt.query_map(
            params![filter.tenant, filter.project, kind, name, limit],
            event_from_row,
        )?;
        rows.map(|r| r?.into_record()).collect()
    }

    fn events_after(&mut self, after: u64, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        let mut stmt = self.0.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![after as i64, limit as i64], event_from_row)?;
        rows.map(|r| r?.into_record()).collect()
    }
}

/// A row of a change log as a change (shared by both engines).
#[allow(clippy::too_many_arguments)]
pub(super) fn change_of(
    rv: i64,
    type_: &str,
    kind: &str,
    tenant: String,
    project: String,
    name: String,
    labels: &str,
    body: String,
) -> Result<Change, StoreError> {
    let key = ObjectKey {
        kind: kind_from_db(kind)?,
        tenant,
        project,
        name,
    };
    let labels = serde_json::from_str(labels)
        .map_err(|e| StoreError::Corrupt(format!("labels of {key}: {e}")))?;
    Ok(Change {
        rv: rv as u64,
        type_: ChangeType::parse(type_)?,
        key,
        labels,
        json: body,
    })
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

    fn desired_index(&self) -> u64 {
        *self.desired.borrow()
    }

    fn subscribe_desired(&self) -> watch::Receiver<u64> {
        self.desired.subscribe()
    }

    fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
        self.read(|c| get_in(c, key))
    }

    fn resource_version(&self, key: &ObjectKey) -> Result<Option<u64>, StoreError> {
        self.read(|c| {
            let version: Option<i64> = c
                .prepare_cached(
                    "SELECT resource_version FROM objects
                     WHERE kind = ?1 AND tenant = ?2 AND project = ?3 AND name = ?4",
                )?
                .query_row(
                    params![key.kind.as_str(), key.tenant, key.project, key.name],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(version.map(|v| v as u64))
        })
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<StoredObject>, StoreError> {
        self.read(|c| list_in(c, filter))
    }

    fn decoded_cache(&self) -> Option<&super::decoded::DecodedCache> {
        Some(&self.decoded)
    }

    fn kind_fingerprint(&self, kind: Kind) -> Result<(u64, u64), StoreError> {
        self.read(|c| fingerprint_in(c, kind))
    }

    fn kind_deletions(&self, kind: Kind) -> Result<Option<u64>, StoreError> {
        self.read(|c| kind_stats_in(c, kind).map(|(_, _, deleted)| Some(deleted)))
    }

    fn versions(&self, kind: Kind) -> Result<Vec<(ObjectKey, String, u64)>, StoreError> {
        self.read(|c| versions_in(c, VERSIONS_SQL, kind, None))
    }

    fn versions_after(&self, kind: Kind, after: u64) -> Result<super::VersionsAfter, StoreError> {
        self.read(|c| {
            // One read transaction: the count and the rows of one snapshot.
            let tx = c.unchecked_transaction()?;
            let fingerprint = fingerprint_in(&tx, kind)?;
            let moved = versions_in(&tx, VERSIONS_AFTER_SQL, kind, Some(after))?;
            tx.commit()?;
            Ok((fingerprint, moved))
        })
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
        audit: &mut dyn FnMut(&[super::WriteResult]) -> Vec<AuditEntry>,
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
        audit: Option<DeleteAudit<'_>>,
    ) -> Result<(DeleteSummary, Vec<AuditRecord>), StoreError> {
        let ((deleted, records), index) = self.write_tx(dry_run, |tx, _next| {
            let (deleted, records, effect) =
                rules::delete_batch(&mut SqliteTx(tx), keys, skip_missing, dry_run, audit)?;
            Ok(((deleted, records), effect))
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
        self.read(|c| revisions::revisions_of(&mut SqliteTx(c), uid))
    }

    fn config_revision(
        &self,
        uid: &str,
        revision: u64,
    ) -> Result<Option<RevisionRecord>, StoreError> {
        self.read(|c| revisions::revision_of(&mut SqliteTx(c), uid, revision))
    }

    fn current_configs(&self) -> Result<HashMap<String, (u64, String)>, StoreError> {
        self.read(|c| SqliteTx(c).current_configs())
    }

    fn newest_revisions(&self) -> Result<HashMap<String, u64>, StoreError> {
        self.read(|c| SqliteTx(c).newest_revisions())
    }

    fn revision_contents(
        &self,
        wanted: &[(String, u64)],
    ) -> Result<Vec<revisions::RevisionContent>, StoreError> {
        self.read(|c| revisions::revision_contents(&mut SqliteTx(c), wanted))
    }

    fn deleted_volumes(&self) -> Result<Vec<revisions::DeletedVolume>, StoreError> {
        self.read(|c| SqliteTx(c).retained_volumes(None))
    }

    fn sealed_values(&self) -> Result<Vec<SealedValue>, StoreError> {
        self.read(|c| SqliteTx(c).sealed_values())
    }

    fn reseal(
        &self,
        reseal: &mut dyn FnMut(&SealedValue) -> Result<String, StoreError>,
    ) -> Result<usize, StoreError> {
        let (count, _) = self.write_tx(false, |tx, _next| {
            // Revisions keep the values their replicas run with, sealed: those too.
            let (values, held) = revisions::reseal_all(&mut SqliteTx(tx), reseal)?;
            tracing::info!(values, held_by_revisions = held, "secret values re-sealed");
            // The index moves, so that the assignment book reads the new envelopes.
            Ok((values, Effect::Desired))
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
        self.update_seeded(|tx, next, seeds| rules::update_key(tx, key, next, change, seeds))
    }

    fn update_many(
        &self,
        keys: &[ObjectKey],
        change: &mut dyn FnMut(&mut Resource) -> bool,
    ) -> Result<Option<u64>, StoreError> {
        self.update_seeded(|tx, next, seeds| rules::update_many(tx, keys, next, change, seeds))
    }

    fn lease_acquire(
        &self,
        holder: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<LeaseRecord, StoreError> {
        // One server per database: it takes the lease whatever its expiry (a server stopped
        // without giving it up left it behind), with the next epoch unless it renews.
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let conn = self.writer();
        let row = conn.query_row(
            "UPDATE leader_lease SET
                epoch = CASE WHEN holder = ?1 AND epoch = ?2 THEN epoch ELSE epoch + 1 END,
                acquired_at_ms = CASE WHEN holder = ?1 AND epoch = ?2 THEN acquired_at_ms ELSE ?4 END,
                holder = ?1,
                renewed_at_ms = ?4,
                expires_at_ms = ?4 + ?3
             WHERE name = 'controllers'
             RETURNING holder, epoch, expires_at_ms",
            rusqlite::params![holder, epoch as i64, ttl_ms, crate::events::now_ms()],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
        )?;
        Ok(LeaseRecord {
            holder: row.0,
            epoch: row.1 as u64,
            expires_at_ms: row.2,
            now_ms: crate::events::now_ms(),
        })
    }

    /// The data directory is locked: this server is the only one of its database.
    fn lease_exclusive(&self) -> bool {
        true
    }

    fn lease_release(&self, holder: &str, epoch: u64) -> Result<(), StoreError> {
        let conn = self.writer();
        conn.execute(
            "UPDATE leader_lease SET expires_at_ms = ?3
             WHERE name = 'controllers' AND holder = ?1 AND epoch = ?2",
            rusqlite::params![holder, epoch as i64, crate::events::now_ms()],
        )?;
        Ok(())
    }

    fn secrets_key(&self, offered: Option<&str>) -> Result<Option<String>, StoreError> {
        let conn = self.writer();
        if let Some(identity) = offered {
            conn.execute(
                "INSERT OR IGNORE INTO meta_keys (name, identity, recorded_at) VALUES (?1, ?2, ?3)",
                params![super::SECRETS_KEY_ROW, identity, now_rfc3339()],
            )?;
        }
        Ok(conn
            .query_row(
                "SELECT identity FROM meta_keys WHERE name = ?1",
                [super::SECRETS_KEY_ROW],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn server_heartbeat(
        &self,
        beat: &super::replicas::ReplicaBeat,
        prune_after: Duration,
    ) -> Result<(), StoreError> {
        use super::replicas::millis;
        let now = crate::events::now_ms();
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO server_replicas (id, hostname, api, agent, version, started_at_ms,
                last_seen_ms, beat_every_ms, is_leader, epoch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, api = excluded.api,
                agent = excluded.agent, version = excluded.version,
                started_at_ms = excluded.started_at_ms,
                last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),
                beat_every_ms = excluded.beat_every_ms, is_leader = excluded.is_leader,
                epoch = excluded.epoch",
            params![
                beat.id,
                beat.hostname,
                beat.api,
                beat.agent,
                beat.version,
                beat.started_at_ms,
                now,
                millis(beat.beat_every),
                beat.leading,
                beat.epoch as i64
            ],
        )?;
        tx.execute(
            "DELETE FROM server_replicas WHERE last_seen_ms < ?1",
            [now.saturating_sub(millis(prune_after))],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn server_replicas(&self) -> Result<super::replicas::Replicas, StoreError> {
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let rows = {
                let mut stmt = tx.prepare_cached(
                    "SELECT id, hostname, api, agent, version, started_at_ms, beat_every_ms,
                        is_leader, epoch, last_seen_ms
                     FROM server_replicas ORDER BY id",
                )?;
                let rows = stmt.query_map([], |r| {
                    Ok(super::replicas::ReplicaRow {
                        beat: super::replicas::ReplicaBeat {
                            id: r.get(0)?,
                            hostname: r.get(1)?,
                            api: r.get(2)?,
                            agent: r.get(3)?,
                            version: r.get(4)?,
                            started_at_ms: r.get(5)?,
                            beat_every: Duration::from_millis(r.get::<_, i64>(6)?.max(0) as u64),
                            leading: r.get(7)?,
                            epoch: r.get::<_, i64>(8)?.max(0) as u64,
                        },
                        last_seen_ms: r.get(9)?,
                    })
                })?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            let lease = tx
                .query_row(
                    "SELECT holder, epoch, expires_at_ms FROM leader_lease WHERE name = 'controllers'",
                    [],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?)),
                )
                .optional()?;
            Ok(super::replicas::Replicas {
                rows,
                now_ms: crate::events::now_ms(),
                lease,
            })
        })
    }

    fn open_console_session(
        &self,
        row: &super::sessions::SessionRow,
        limits: &super::sessions::SessionLimits,
    ) -> Result<(), StoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM console_sessions WHERE expires_ms <= ?1 OR last_used_ms <= ?2",
            params![limits.now_ms, limits.idle_before()],
        )?;
        let kept: i64 = tx.query_row("SELECT count(*) FROM console_sessions", [], |r| r.get(0))?;
        let over = kept.saturating_add(1) - limits.max_sessions as i64;
        if over > 0 {
            tx.execute(
                "DELETE FROM console_sessions WHERE id_hash IN (SELECT id_hash
                    FROM console_sessions ORDER BY last_used_ms, id_hash LIMIT ?1)",
                [over],
            )?;
        }
        tx.execute(
            "INSERT INTO console_sessions (id_hash, token_id, sealed_token, created_ms,
                last_used_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                row.id_hash,
                row.token_id,
                row.sealed_token,
                row.created_ms,
                row.last_used_ms,
                row.expires_ms
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn console_session(
        &self,
        id_hash: &str,
    ) -> Result<Option<super::sessions::SessionRow>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT id_hash, token_id, sealed_token, created_ms, last_used_ms, expires_ms
                 FROM console_sessions WHERE id_hash = ?1",
            )?
            .query_row([id_hash], |r| {
                Ok(super::sessions::SessionRow {
                    id_hash: r.get(0)?,
                    token_id: r.get(1)?,
                    sealed_token: r.get(2)?,
                    created_ms: r.get(3)?,
                    last_used_ms: r.get(4)?,
                    expires_ms: r.get(5)?,
                })
            })
            .optional()?)
        })
    }

    fn touch_console_session(&self, id_hash: &str, at_ms: i64) -> Result<bool, StoreError> {
        let conn = self.writer();
        Ok(conn.execute(
            "UPDATE console_sessions SET last_used_ms = max(last_used_ms, ?2) WHERE id_hash = ?1",
            params![id_hash, at_ms],
        )? > 0)
    }

    fn close_console_session(&self, id_hash: &str) -> Result<bool, StoreError> {
        let conn = self.writer();
        Ok(conn.execute("DELETE FROM console_sessions WHERE id_hash = ?1", [id_hash])? > 0)
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let conn = self.writer();
        fence_check(&conn)?;
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
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        fence_check(&tx)?;
        let t = rules::use_join_token(&mut SqliteTx(&tx), hash, now)?;
        tx.commit()?;
        Ok(t)
    }

    fn enroll_host(
        &self,
        join_token_hash: &str,
        now: i64,
        host: Resource,
    ) -> Result<StoredObject, StoreError> {
        let created_at = now_rfc3339();
        let (object, _) = self.write_tx(false, |tx, next| {
            let object = rules::enroll_host(
                &mut SqliteTx(tx),
                join_token_hash,
                now,
                &host,
                next,
                &created_at,
            )?;
            Ok((object, Effect::Observed))
        })?;
        Ok(object)
    }

    fn enroll_hosts(
        &self,
        batch: Vec<(String, i64, Resource)>,
    ) -> Vec<Result<StoredObject, StoreError>> {
        let created_at = now_rfc3339();
        let count = batch.len();
        let written = self.write_tx(false, |tx, next| {
            let mut out = Vec::with_capacity(batch.len());
            for (hash, now, host) in &batch {
                // Each enrollment in a savepoint of its own: one refused leaves the others.
                tx.execute_batch("SAVEPOINT enroll")?;
                let r = rules::enroll_host(&mut SqliteTx(tx), hash, *now, host, next, &created_at);
                if r.is_err() {
                    tx.execute_batch("ROLLBACK TO enroll")?;
                }
                tx.execute_batch("RELEASE enroll")?;
                out.push(r);
            }
            let effect = if out.iter().any(Result::is_ok) {
                Effect::Observed
            } else {
                Effect::Unchanged
            };
            Ok((out, effect))
        });
        match written {
            Ok((out, _)) => out,
            Err(e) => super::failed_together(e, count),
        }
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
        let conn = self.writer();
        fence_check(&conn)?;
        Ok(conn.execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", [id])? > 0)
    }

    fn record_heartbeats(&self, beats: &[(&str, i64)]) -> Result<(), StoreError> {
        if beats.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        fence_check(&tx)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO host_heartbeats (name, last_seen_ms) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
            )?;
            for (name, at) in beats {
                stmt.execute(params![name, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn host_heartbeats(&self) -> Result<HashMap<String, i64>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT name, last_seen_ms FROM host_heartbeats")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            Ok(rows.collect::<Result<HashMap<_, _>, _>>()?)
        })
    }

    fn forget_heartbeat(&self, host: &str) -> Result<(), StoreError> {
        let conn = self.writer();
        fence_check(&conn)?;
        conn.execute("DELETE FROM host_heartbeats WHERE name = ?1", [host])?;
        Ok(())
    }

    fn record_host_volumes(
        &self,
        host: &str,
        listed: &[super::volumes::ReportedVolume],
        now: &str,
    ) -> Result<bool, StoreError> {
        // A list that ends an asked-for removal moves the index (and commits here) ...
        let ((changed, finished), _) = self.write_tx(false, |tx, _next| {
            let (changed, finished) =
                super::volumes::replace_list(&mut SqliteTx(tx), host, listed, now)?;
            // The removal's end changes what the host is told: desired state.
            let effect = if finished {
                Effect::Desired
            } else {
                Effect::Unchanged
            };
            Ok(((changed, finished), effect))
        })?;
        if finished || !changed {
            return Ok(changed);
        }
        // ... any other change is written without moving it.
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        fence_check(&tx)?;
        super::volumes::replace_list(&mut SqliteTx(&tx), host, listed, now)?;
        tx.commit()?;
        Ok(true)
    }

    fn host_volumes(
        &self,
        host: Option<&str>,
    ) -> Result<Vec<super::volumes::HostVolume>, StoreError> {
        self.read(|c| SqliteTx(c).host_volumes(host))
    }

    fn volume_deletions(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(|c| SqliteTx(c).requested_volume_deletions())
    }

    fn mark_orphaned_volumes(
        &self,
        marks: &[(String, String, Option<String>)],
    ) -> Result<(), StoreError> {
        if marks.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        fence_check(&tx)?;
        super::volumes::mark_orphaned(&mut SqliteTx(&tx), marks)?;
        tx.commit()?;
        Ok(())
    }

    fn request_volume_deletion(
        &self,
        host: &str,
        name: &str,
        reason: &str,
        now: &str,
    ) -> Result<(Option<super::volumes::HostVolume>, u64), StoreError> {
        self.write_tx(false, |tx, _next| {
            let v = super::volumes::request_deletion(&mut SqliteTx(tx), host, name, reason, now)?;
            // What the host is told changes: desired state.
            let effect = if v.is_some() {
                Effect::Desired
            } else {
                Effect::Unchanged
            };
            Ok((v, effect))
        })
    }

    fn forget_host_volumes(&self, host: &str) -> Result<(), StoreError> {
        let conn = self.writer();
        fence_check(&conn)?;
        SqliteTx(&conn).drop_host_volumes(host, None)
    }

    fn record_events(&self, events: Vec<crate::events::Event>) {
        lock(&self.events).push(events);
    }

    fn flush_events(&self) -> Result<usize, StoreError> {
        let folded = lock(&self.events).take();
        if folded.is_empty() {
            return Ok(0);
        }
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        fence_check(&tx)?;
        let seq = super::feed::write_events(&mut SqliteTx(&tx), &folded)?;
        tx.commit()?;
        self.events_notify.send_replace(seq);
        Ok(folded.len())
    }

    fn prune_events(
        &self,
        retention: &crate::events::Retention,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        fence_check(&tx)?;
        let n = super::feed::prune_events(&mut SqliteTx(&tx), retention, now_ms)?;
        tx.commit()?;
        Ok(n)
    }

    fn list_events(
        &self,
        filter: &crate::events::EventFilter,
    ) -> Result<(u64, Vec<crate::events::EventRecord>), StoreError> {
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let out = super::feed::list_events(&mut SqliteTx(&tx), filter)?;
            tx.commit()?;
            Ok(out)
        })
    }

    fn subscribe_events(&self) -> Option<watch::Receiver<u64>> {
        Some(self.events_notify.subscribe())
    }

    fn changes_since(
        &self,
        feed: super::Feed,
        after: u64,
        limit: usize,
    ) -> Result<super::ChangesSince, StoreError> {
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let out = match feed {
                super::Feed::Objects => {
                    super::feed::object_changes_since(&mut SqliteTx(&tx), after, limit)?
                }
                super::Feed::Events => {
                    super::feed::event_changes_since(&mut SqliteTx(&tx), after, limit)?
                }
            };
            tx.commit()?;
            Ok(out)
        })
    }

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<Vec<AuditRecord>, StoreError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        fence_check(&tx)?;
        let records = rules::append_audit(&mut SqliteTx(&tx), entries)?;
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
    use serde_json::json;

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

    /// A store holding tenant `acme`, project `web` and instance `bot`, with the instances in
    /// the decoded cache (looked at once; tenants are not).
    fn store_with_cached_bot() -> (tempfile::TempDir, SqliteStore, ObjectKey) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db")).unwrap();
        apply(
            &store,
            vec![
                tenant("acme"),
                project("acme", "web"),
                instance("acme", "web", "bot", 1, "eu"),
            ],
        )
        .unwrap();
        crate::store::decoded::list_decoded(&store, Kind::OpenClawInstance).unwrap();
        (dir, store, ObjectKey::instance("acme", "web", "bot"))
    }

    #[test]
    fn an_update_reads_only_the_row_head_when_the_cache_holds_its_version() {
        let (_dir, store, bot) = store_with_cached_bot();
        let acme = ObjectKey::cluster(Kind::Tenant, "acme");
        // Bodies that cannot even be read as text, at the versions stored.
        lock(&store.writer)
            .execute(
                "UPDATE objects SET body = X'FF' WHERE name IN ('bot', 'acme')",
                [],
            )
            .unwrap();
        let relabel = |r: &mut Resource| {
            r.metadata_mut().labels.insert("tier".into(), "gold".into());
            true
        };
        // The instance starts from the cache's copy, and is written whole from it.
        store.update(&bot, &mut { relabel }).unwrap();
        let Resource::OpenClawInstance(i) = store.get(&bot).unwrap().unwrap().resource().unwrap()
        else {
            panic!("not an instance");
        };
        assert_eq!(
            i.metadata.labels.get("tier").map(String::as_str),
            Some("gold")
        );
        assert_eq!(i.spec.replicas, 1);
        // Without a cached copy the row itself is read, and fails.
        assert!(store.update(&acme, &mut { relabel }).is_err());
    }

    #[test]
    fn a_key_updated_twice_in_one_batch_is_cached_as_last_written() {
        let (_dir, store, bot) = store_with_cached_bot();
        // Both writes take the batch's one version; the row holds the second.
        let mut n = 0;
        store
            .update_many(&[bot.clone(), bot.clone()], &mut |r| {
                n += 1;
                r.metadata_mut().labels.insert("n".into(), n.to_string());
                true
            })
            .unwrap();
        store
            .update(&bot, &mut |r| {
                r.metadata_mut().labels.insert("tier".into(), "gold".into());
                true
            })
            .unwrap();
        let stored = store.get(&bot).unwrap().unwrap().resource().unwrap();
        let labels = &stored.metadata().labels;
        assert_eq!(labels.get("n").map(String::as_str), Some("2"), "{labels:?}");
        assert_eq!(labels.get("tier").map(String::as_str), Some("gold"));
    }

    #[test]
    fn what_changed_is_read_from_the_versions_index_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db")).unwrap();
        apply(&store, vec![tenant("acme"), project("acme", "web")]).unwrap();
        for sql in [KIND_STATS_SQL, VERSIONS_SQL] {
            // The fingerprint is one row of its own table.
            let index = if sql == KIND_STATS_SQL {
                "USING PRIMARY KEY (kind=?)"
            } else {
                "USING COVERING INDEX objects_versions ("
            };
            let plan: Vec<String> = store
                .read(|c| {
                    let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                    let rows = stmt.query_map(["Tenant"], |r| r.get::<_, String>(3))?;
                    Ok(rows.collect::<Result<_, _>>()?)
                })
                .unwrap();
            assert!(
                plan.iter().all(|step| step.contains(index)),
                "{sql}: {plan:?}"
            );
        }
    }

    #[test]
    fn the_log_is_checkpointed_beside_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = SqliteStore::open(&path).unwrap();
        let writer_pages: i64 = lock(&store.writer)
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(writer_pages, WRITER_CHECKPOINT_PAGES);
        // Megabytes of log, fewer pages than the writer checkpoints by itself after: only the
        // checkpointer moves them into the database file.
        let size = || std::fs::metadata(&path).unwrap().len();
        let before = size();
        let labels: serde_json::Map<String, serde_json::Value> = (0..16)
            .map(|i| (format!("pad{i}"), json!("x".repeat(60))))
            .collect();
        for batch in 0..20 {
            let hosts: Vec<(Resource, WriteMode)> = (0..100)
                .map(|i| {
                    let host = res(json!({
                        "apiVersion": "clusterclaw.io/v1", "kind": "Host",
                        "metadata": {"name": format!("h{batch}-{i}"), "labels": labels},
                        "spec": {}
                    }));
                    (host, WriteMode::Apply)
                })
                .collect();
            store.write(&hosts, false).unwrap();
        }
        let started = std::time::Instant::now();
        while size() < before + (2 << 20) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the database file holds {} bytes: the log was not checkpointed",
                size()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn the_change_log_is_read_from_the_asked_index_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db")).unwrap();
        apply(&store, vec![tenant("acme"), project("acme", "web")]).unwrap();
        let plan: Vec<String> = store
            .read(|c| {
                let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {CHANGE_ROWS_SQL}"))?;
                let rows = stmt.query_map([1, 10], |r| r.get::<_, String>(3))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .unwrap();
        assert!(
            plan.iter()
                .any(|step| step.starts_with("SEARCH changes USING INDEX")
                    && step.contains("(rv>?)")),
            "{plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step.starts_with("SCAN")),
            "{plan:?}"
        );
    }

    #[test]
    fn cached_statements_keep_their_plans_across_uses() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db")).unwrap();
        // An equality no index answers and a `LIMIT`, both bound: SQLite's planner looks at
        // such values, and without the stability guarantee prepares the statement again
        // after every change of them.
        let sql = "SELECT id FROM events INDEXED BY events_object WHERE kind = ?1 AND tenant = ?2
                   AND project = ?3 AND name = ?4 AND reason = ?5 AND message = ?6
                   ORDER BY last_ms DESC LIMIT ?7";
        let uses = |c: &Connection| -> Result<i32, StoreError> {
            let mut prepared_again = 0;
            for i in 0..5 {
                let mut stmt = c.prepare_cached(sql)?;
                stmt.query_row(
                    params!["Host", "", "", "h", "Ready", format!("m{i}"), i + 1],
                    |r| r.get::<_, i64>(0),
                )
                .optional()?;
                prepared_again = stmt.get_status(rusqlite::StatementStatus::RePrepare);
            }
            Ok(prepared_again)
        };
        let writer = uses(&lock(&store.writer)).unwrap();
        let reader = store.read(uses).unwrap();
        assert_eq!(
            (writer, reader),
            (0, 0),
            "prepared again on the writer, on a reader"
        );
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

    /// A database holding tenant `acme`, its project `helpdesk` and single-replica instances
    /// of the names given, then changed by `sql` (an older schema version, as it left it).
    fn written_then_set_back(instances: &[&str], sql: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            let mut items = vec![tenant("acme"), project("acme", "helpdesk")];
            items.extend(
                instances
                    .iter()
                    .map(|n| instance("acme", "helpdesk", n, 1, "eu")),
            );
            apply(&store, items).unwrap();
        }
        Connection::open(&path).unwrap().execute_batch(sql).unwrap();
        dir
    }

    #[test]
    fn upgrading_counts_each_kind_written_before() {
        let dir = written_then_set_back(
            &["a", "b"],
            "DROP TRIGGER objects_kind_stats_insert; DROP TRIGGER objects_kind_stats_delete;
             DROP TRIGGER objects_kind_stats_update; DROP TABLE kind_stats;
             PRAGMA user_version = 13;",
        );
        let store = SqliteStore::open(&dir.path().join("c.db")).unwrap();
        let b = store
            .get(&ObjectKey::instance("acme", "helpdesk", "b"))
            .unwrap()
            .unwrap();
        assert_eq!(
            store.kind_fingerprint(Kind::OpenClawInstance).unwrap(),
            (2, b.resource_version)
        );
        assert_eq!(store.kind_fingerprint(Kind::Tenant).unwrap().0, 1);
        // And the triggers count from there.
        apply(&store, vec![instance("acme", "helpdesk", "c", 1, "eu")]).unwrap();
        assert_eq!(
            store.kind_fingerprint(Kind::OpenClawInstance).unwrap(),
            (3, store.index())
        );
    }

    #[test]
    fn upgrading_to_revisions_gives_every_instance_its_first_revision() {
        // The database as schema version 3 left it.
        let dir = written_then_set_back(
            &["bot"],
            "DROP TABLE config_revisions; DROP TABLE secret_values; DROP TABLE retained_volumes; PRAGMA user_version = 3;",
        );
        let path = dir.path().join("c.db");
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
}
