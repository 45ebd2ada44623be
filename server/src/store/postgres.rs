//! PostgreSQL implementation of the store, for several servers on one database: versioned
//! migrations of its own, a small pool of connections, and every write serialised on the
//! locked index row, so that the index moves by one per committed write and no reader ever
//! sees a later write without the earlier ones.
//!
//! Every committed write notifies (`NOTIFY`) the index and desired index; each server listens
//! and moves its own, and reads them every second as well, for notifications lost while its
//! listening connection was down: long polls and watches wake on writes made through any server.
//!
//! What it keeps is what the SQLite store keeps, through the same rules ([`super::rules`],
//! [`super::revisions`], [`super::feed`], [`super::volumes`]): objects, the global index,
//! tokens, the audit log, host heartbeats, instance revisions, sealed secret values, the change
//! log (watches), events (their sequence notified like the index) and host volumes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config, IsolationLevel, NoTls, Row, Statement, Transaction};
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;

use super::backend::{Reach, RevisionRow, Tx};
use super::feed::Change;
use super::lease::{self, LeaseRecord};
use super::revisions::{self, ChangeNote, DeletedVolume, RevisionRecord, SealedValue};
use super::rules::{self, Effect};
use super::volumes::{HostVolume, ReportedVolume};
use super::{
    DeleteAudit, DeleteSummary, ListFilter, Store, StoreError, StoredObject, TokenKind,
    TokenRecord, Usage, UsageByTenant, WriteMode, WriteSummary,
};
use crate::audit::{
    AuditEntry, AuditFilter, AuditRecord, AuditVerification, ChainBreak, ChainProblem,
    ChainVerifier,
};
use crate::events::{Event, EventFilter, EventRecord, Folded};
use crate::model::{Kind, ObjectKey, Resource};
use crate::openclaw::schema::Schema;
use crate::util::now_rfc3339;

/// Schema migrations; migration `i` takes the database from version `i` to `i + 1` (the one
/// row of `clusterclaw_schema`). Append only: a released migration never changes.
const MIGRATIONS: &[&str] = &[
    // 1: the global index, objects, tokens, the audit log, host heartbeats. Text that is
    // sorted or compared sorts by bytes (COLLATE "C"), as in SQLite.
    r#"CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('index', 0), ('desired', 0), ('audit_written', 0);
    CREATE TABLE objects (
        kind TEXT COLLATE "C" NOT NULL,
        tenant TEXT COLLATE "C" NOT NULL,
        project TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        uid TEXT NOT NULL UNIQUE,
        generation BIGINT NOT NULL,
        resource_version BIGINT NOT NULL,
        labels TEXT NOT NULL,
        body TEXT NOT NULL,
        use_replicas BIGINT NOT NULL DEFAULT 0,
        use_cpu_millis BIGINT NOT NULL DEFAULT 0,
        use_memory_bytes BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (kind, tenant, project, name)
    );
    CREATE TABLE tokens (
        id TEXT COLLATE "C" PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        role TEXT NOT NULL,
        tenant TEXT,
        project TEXT,
        created_at BIGINT NOT NULL,
        expires_at BIGINT,
        uses_remaining BIGINT,
        revoked BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE TABLE audit (
        seq BIGINT PRIMARY KEY,
        chain_version BIGINT NOT NULL,
        time TEXT COLLATE "C" NOT NULL,
        principal_id TEXT NOT NULL,
        principal_name TEXT NOT NULL,
        tenant TEXT,
        action TEXT NOT NULL,
        object_kind TEXT,
        object_tenant TEXT,
        object_project TEXT,
        object_name TEXT,
        outcome TEXT NOT NULL,
        status BIGINT NOT NULL,
        reason TEXT,
        request_id TEXT NOT NULL,
        source TEXT NOT NULL,
        generation_before BIGINT,
        generation_after BIGINT,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_tenant_time ON audit (tenant, time);
    CREATE INDEX audit_time ON audit (time);
    CREATE FUNCTION clusterclaw_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'the audit log is append-only: its records cannot be changed or deleted';
    END $$;
    CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
        FOR EACH ROW EXECUTE FUNCTION clusterclaw_audit_append_only();
    CREATE TABLE host_heartbeats (name TEXT PRIMARY KEY, last_seen_ms BIGINT NOT NULL);"#,
    // 2: instance revisions, sealed secret values, volumes kept of deleted instances, the
    // change log (complete from the index at this migration), events, the volumes hosts
    // report. Revisions of existing instances are made by `revisions::backfill`.
    r#"INSERT INTO meta (key, value) SELECT 'changes_from', value FROM meta WHERE key = 'index'
        ON CONFLICT (key) DO NOTHING;
    INSERT INTO meta (key, value) VALUES ('events_seq', 0), ('events_from', 0)
        ON CONFLICT (key) DO NOTHING;
    CREATE TABLE config_revisions (
        instance_uid TEXT COLLATE "C" NOT NULL,
        revision BIGINT NOT NULL,
        tenant TEXT COLLATE "C" NOT NULL,
        project TEXT COLLATE "C" NOT NULL,
        instance TEXT COLLATE "C" NOT NULL,
        config TEXT NOT NULL,
        hash TEXT NOT NULL,
        layers TEXT NOT NULL,
        author TEXT NOT NULL,
        message TEXT NOT NULL,
        created_at TEXT NOT NULL,
        image TEXT,
        env TEXT,
        resources TEXT,
        secrets TEXT,
        spec TEXT,
        content_hash TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (instance_uid, revision)
    );
    CREATE TABLE secret_values (
        tenant TEXT COLLATE "C" NOT NULL,
        project TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        sealed TEXT NOT NULL,
        PRIMARY KEY (tenant, project, name, key)
    );
    CREATE TABLE retained_volumes (
        instance_uid TEXT NOT NULL,
        tenant TEXT COLLATE "C" NOT NULL,
        project TEXT COLLATE "C" NOT NULL,
        instance TEXT COLLATE "C" NOT NULL,
        replica TEXT NOT NULL,
        ordinal BIGINT NOT NULL,
        host TEXT COLLATE "C" NOT NULL,
        since TEXT NOT NULL,
        PRIMARY KEY (instance_uid, ordinal, host)
    );
    CREATE INDEX retained_volumes_instance ON retained_volumes (tenant, project, instance);
    CREATE TABLE changes (
        seq BIGSERIAL PRIMARY KEY,
        rv BIGINT NOT NULL,
        type TEXT NOT NULL,
        kind TEXT NOT NULL,
        tenant TEXT NOT NULL,
        project TEXT NOT NULL,
        name TEXT NOT NULL,
        labels TEXT NOT NULL,
        body TEXT NOT NULL,
        UNIQUE (rv, kind, tenant, project, name)
    );
    CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        seq BIGINT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        tenant TEXT COLLATE "C" NOT NULL,
        project TEXT NOT NULL,
        name TEXT NOT NULL,
        replica TEXT NOT NULL,
        type TEXT NOT NULL,
        reason TEXT NOT NULL,
        message TEXT NOT NULL,
        source TEXT NOT NULL,
        count BIGINT NOT NULL,
        first_ms BIGINT NOT NULL,
        last_ms BIGINT NOT NULL
    );
    CREATE INDEX events_object ON events (kind, tenant, project, name, reason);
    CREATE INDEX events_tenant ON events (tenant, last_ms);
    CREATE TABLE host_volumes (
        host TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        tenant TEXT NOT NULL,
        project TEXT NOT NULL,
        instance TEXT NOT NULL,
        replica TEXT NOT NULL,
        first_seen TEXT NOT NULL,
        orphaned_since TEXT,
        delete_requested TEXT,
        delete_reason TEXT,
        PRIMARY KEY (host, name)
    );"#,
    // 3: the leader lease and the shared certificate authority.
    super::lease::PG_MIGRATION,
    // 4: the identity of the key the secret values are sealed with.
    super::SECRETS_KEY_MIGRATION,
    // 5: the server replicas (written outside the global index).
    super::replicas::MIGRATION,
    // 6: the web console's sessions (written outside the global index).
    super::sessions::MIGRATION,
    // 7: each object's identity and version in an index of their own, so that the control
    // loops' look at what changed (`versions`, `kind_fingerprint`) reads no object body.
    "CREATE INDEX IF NOT EXISTS objects_versions
     ON objects (kind, resource_version) INCLUDE (tenant, project, name, uid);",
    // 8: each kind's count, highest version and deletions, kept by a trigger, so that
    // `kind_fingerprint` (every control loop's first question on every pass) reads one row.
    // Every write already holds the global index's row, so the kind's row adds no wait.
    // Counted afresh, and each statement can run again: a database whose version was set
    // back keeps a true count.
    r#"CREATE TABLE IF NOT EXISTS kind_stats (
        kind TEXT COLLATE "C" PRIMARY KEY,
        count BIGINT NOT NULL,
        highest BIGINT NOT NULL,
        deleted BIGINT NOT NULL DEFAULT 0
    );
    DELETE FROM kind_stats;
    INSERT INTO kind_stats (kind, count, highest)
        SELECT kind, count(*), max(resource_version) FROM objects GROUP BY kind;
    CREATE OR REPLACE FUNCTION objects_kind_stats() RETURNS trigger LANGUAGE plpgsql AS $body$
    BEGIN
        -- An object written again under another uid (or kind) is deleted and created.
        IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE'
                AND (OLD.kind <> NEW.kind OR OLD.uid <> NEW.uid)) THEN
            UPDATE kind_stats SET count = count - 1, deleted = deleted + 1
                WHERE kind = OLD.kind;
            IF TG_OP = 'DELETE' THEN
                RETURN NULL;
            END IF;
        ELSIF TG_OP = 'UPDATE' THEN
            UPDATE kind_stats SET highest = GREATEST(highest, NEW.resource_version)
                WHERE kind = NEW.kind;
            RETURN NULL;
        END IF;
        INSERT INTO kind_stats AS s (kind, count, highest)
            VALUES (NEW.kind, 1, NEW.resource_version)
        ON CONFLICT (kind) DO UPDATE
            SET count = s.count + 1, highest = GREATEST(s.highest, excluded.highest);
        RETURN NULL;
    END
    $body$;
    DROP TRIGGER IF EXISTS objects_kind_stats ON objects;
    CREATE TRIGGER objects_kind_stats
        AFTER INSERT OR DELETE OR UPDATE OF kind, uid, resource_version ON objects
        FOR EACH ROW EXECUTE FUNCTION objects_kind_stats();"#,
];

/// The schema version whose migration added instance revisions.
const REVISIONS_VERSION: usize = 2;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;
/// Taken (per transaction) while migrating, so that servers starting together migrate once.
pub(super) const MIGRATION_LOCK: i64 = 0x0063_6c75_7374_6572;
const MAX_IDLE_CONNECTIONS: usize = 16;
/// The start of the channel every committed write notifies, with `"<index> <desired index>"`
/// (and every flush of events with `"events <sequence>"`); the rest names the schema, since
/// notifications reach every schema of a database ([`channel_of`]).
const CHANNEL: &str = "clusterclaw_index";

/// The notification channel of the store in `schema`: several stores may share a database in
/// schemas of their own, and one must not wake on another's writes. Channel names are
/// identifiers (at most 63 bytes): a long schema name is shortened to a hash of it.
/// A kind's (count, highest version, deletions) in `tx`: kept by the trigger of schema
/// version 8; no row before the kind's first object.
fn kind_stats_in(tx: &mut PgTx<'_, '_>, kind: Kind) -> Result<(u64, u64, u64), StoreError> {
    let row = tx.query_opt(
        "SELECT count, highest, deleted FROM kind_stats WHERE kind = $1",
        &[&kind.as_str()],
    )?;
    let (count, highest, deleted): (i64, i64, i64) =
        row.map_or((0, 0, 0), |r| (r.get(0), r.get(1), r.get(2)));
    Ok((count as u64, highest as u64, deleted as u64))
}

/// [`Store::kind_fingerprint`] in `tx`.
fn fingerprint_in(tx: &mut PgTx<'_, '_>, kind: Kind) -> Result<(u64, u64), StoreError> {
    kind_stats_in(tx, kind).map(|(count, highest, _)| (count, highest))
}

/// (key, uid, resourceVersion) of version rows (tenant, project, name, uid, resource_version).
fn version_rows(kind: Kind, rows: &[Row]) -> Vec<(ObjectKey, String, u64)> {
    rows.iter()
        .map(|r| {
            (
                ObjectKey {
                    kind,
                    tenant: r.get(0),
                    project: r.get(1),
                    name: r.get(2),
                },
                r.get::<_, String>(3),
                r.get::<_, i64>(4) as u64,
            )
        })
        .collect()
}

fn channel_of(schema: &str) -> String {
    let full = format!("{CHANNEL}:{schema}");
    if full.len() <= 63 {
        return full;
    }
    use sha2::{Digest, Sha256};
    let h = crate::util::hex(&Sha256::digest(schema.as_bytes()));
    format!("{CHANNEL}:{}", &h[..32])
}
/// How often the listener reads the index itself, for notifications lost while its connection
/// was down (and as a heartbeat of that connection).
const CATCH_UP_EVERY: Duration = Duration::from_secs(1);
/// The wait before the listener connects again after losing its connection.
const LISTEN_RETRY: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Backend(describe(&e))
    }
}

/// The error with its cause (the driver's own text often leaves the cause out).
fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("PostgreSQL: {}", db.message());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("PostgreSQL: {e}: {cause}"),
        None => format!("PostgreSQL: {e}"),
    }
}

/// How to reach the database: `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?sslmode=require]`,
/// a file holding the password (its first line), and the CA that signed the server's
/// certificate (else the system's roots) for `sslmode=require`.
#[derive(Clone, PartialEq, Eq)]
pub struct PgTarget {
    pub url: String,
    pub password_file: Option<std::path::PathBuf>,
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("url", &redact(&self.url))
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The URL without its password.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(parts) => parts,
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Whether `s` names a PostgreSQL database rather than SQLite.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

#[derive(Clone)]
enum Tls {
    None,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

/// One pooled connection and its prepared statements.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

/// The PostgreSQL store.
pub struct PgStore {
    shown: String,
    config: Config,
    tls: Tls,
    pool: Mutex<Vec<Conn>>,
    indexes: Arc<Indexes>,
    schema: RwLock<Arc<Schema>>,
    /// Tells the listener thread to stop.
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Events recorded and not yet written.
    events: Mutex<super::feed::EventQueue>,
    /// Where this store's writes are notified ([`channel_of`]).
    channel: String,
    /// Objects the control loops read, decoded ([`Store::decoded_cache`]).
    decoded: super::decoded::DecodedCache,
}

/// The indexes this server knows of, moved by its own writes and by every other server's
/// (through the listener); they only ever grow.
struct Indexes {
    index: AtomicU64,
    notify: watch::Sender<u64>,
    desired: watch::Sender<u64>,
    /// The events' sequence.
    events: watch::Sender<u64>,
}

impl Indexes {
    /// Moves the events' sequence to `seq` unless already past it.
    fn advance_events(&self, seq: u64) {
        self.events.send_if_modified(|s| {
            let moved = seq > *s;
            *s = (*s).max(seq);
            moved
        });
    }

    /// Moves to `index` (and the desired index to `desired`) unless already past them.
    fn advance(&self, index: u64, desired: u64) {
        // The desired index first: whoever wakes on the global one and then asks for it
        // already sees this write.
        self.desired.send_if_modified(|d| {
            let moved = desired > *d;
            *d = (*d).max(desired);
            moved
        });
        self.index.fetch_max(index, Ordering::SeqCst);
        self.notify.send_if_modified(|i| {
            let moved = index > *i;
            *i = (*i).max(index);
            moved
        });
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Closing a connection blocks on the driver's own runtime, which cannot start inside
        // another: on a thread of an async runtime (a server that stops on an error) the
        // pooled connections are closed on a thread of their own.
        let pool = std::mem::take(&mut *lock(&self.pool));
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::spawn(move || drop(pool)).join();
        } else {
            drop(pool);
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.shown)
            .field("index", &self.index())
            .finish()
    }
}

/// Connects with `tls`.
fn connect_with(config: &Config, tls: &Tls) -> Result<Client, postgres::Error> {
    match tls {
        Tls::None => config.connect(NoTls),
        Tls::Rustls(tls) => config.connect(tls.clone()),
    }
}

/// The index, desired index and events' sequence stored in the database.
fn read_indexes(client: &mut Client) -> Result<(u64, u64, u64), StoreError> {
    let r = client.query_one(
        "SELECT (SELECT value FROM meta WHERE key = 'index'),
                (SELECT value FROM meta WHERE key = 'desired'),
                COALESCE((SELECT value FROM meta WHERE key = 'events_seq'), 0)",
        &[],
    )?;
    Ok((
        r.try_get::<_, i64>(0)? as u64,
        r.try_get::<_, i64>(1)? as u64,
        r.try_get::<_, i64>(2)? as u64,
    ))
}

/// Follows the writes of every server: `LISTEN`s on `channel` and moves `indexes` on each
/// notification, reads the stored indexes every [`CATCH_UP_EVERY`] (a notification sent while
/// the connection was down is lost), and connects again when the connection drops. Stops soon
/// after `stop` is set.
fn listen(
    config: Config,
    tls: Tls,
    shown: String,
    channel: String,
    indexes: Arc<Indexes>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut failing = false;
    while !stop.load(Ordering::SeqCst) {
        let outcome = (|| -> Result<(), StoreError> {
            let mut client = connect_with(&config, &tls)?;
            client.batch_execute(&format!("LISTEN \"{channel}\""))?;
            if failing {
                tracing::info!(database = %shown, "following the writes of other servers again");
                failing = false;
            }
            loop {
                let (index, desired, events) = read_indexes(&mut client)?;
                indexes.advance(index, desired);
                indexes.advance_events(events);
                let mut notes = client.notifications();
                let mut iter = notes.timeout_iter(CATCH_UP_EVERY);
                while let Some(note) = iter.next()? {
                    // `<index> <desired index>`, or `events <sequence>`.
                    let payload = note.payload();
                    if let Some(seq) = payload.strip_prefix("events ") {
                        if let Ok(seq) = seq.parse::<u64>() {
                            indexes.advance_events(seq);
                        }
                    } else {
                        let mut parts = payload.split(' ').map(str::parse::<u64>);
                        if let (Some(Ok(index)), Some(Ok(desired))) = (parts.next(), parts.next()) {
                            indexes.advance(index, desired);
                        }
                    }
                    if stop.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                }
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
            }
        })();
        if let Err(e) = outcome {
            if !failing {
                tracing::warn!(database = %shown, error = %e, "lost the connection that follows other servers' writes; connecting again");
            }
            failing = true;
            std::thread::sleep(LISTEN_RETRY);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a call that blocks on the network: on a worker of a multi-threaded runtime it tells
/// the runtime first (the driver runs a small runtime of its own per connection).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl PgTarget {
    /// The URL without its password, the parsed connection settings (password file read,
    /// connect timeout set) and the TLS to use.
    fn settings(&self) -> Result<(String, Config, Tls), StoreError> {
        let target = self;
        let shown = redact(&target.url);
        let mut config = Config::from_str(&target.url).map_err(|e| {
            StoreError::Backend(format!(
                "{shown} is not a PostgreSQL URL: {e} (expected postgres://USER@HOST[:PORT]/DATABASE[?sslmode=require])"
            ))
        })?;
        if let Some(path) = &target.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                StoreError::Backend(format!(
                    "cannot read the PostgreSQL password file {}: {e}",
                    path.display()
                ))
            })?;
            let password = text.lines().next().unwrap_or_default();
            if password.is_empty() {
                return Err(StoreError::Backend(format!(
                    "the PostgreSQL password file {} is empty; its first line is the password",
                    path.display()
                )));
            }
            config.password(password);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // TLS when asked for (`sslmode=require`), and then the server's certificate is always
        // verified (against `ca_file`, else the system's roots) and must name the host.
        let tls = match config.get_ssl_mode() {
            postgres::config::SslMode::Require => {
                Tls::Rustls(tls_connector(target.ca_file.as_deref())?)
            }
            _ => Tls::None,
        };
        Ok((shown, config, tls))
    }

    /// One connection of its own (not pooled), for a command that works on the database
    /// directly; `Err` holds why it could not connect.
    pub fn connect(&self) -> Result<Client, StoreError> {
        let (shown, config, tls) = self.settings()?;
        connect_with(&config, &tls).map_err(|e| {
            StoreError::Backend(format!("cannot connect to {shown}: {}", describe(&e)))
        })
    }
}

impl PgStore {
    /// Connects, brings the schema up to date and reads the index. A database written by a
    /// newer clusterclaw is refused.
    pub fn open(target: &PgTarget) -> Result<PgStore, StoreError> {
        let (shown, config, tls) = target.settings()?;
        Self::open_with(shown, config, tls)
    }

    /// [`PgStore::open`] with a parsed configuration (tests set a schema of their own through
    /// `options`), without TLS.
    pub fn open_config(config: Config) -> Result<PgStore, StoreError> {
        Self::open_with("(test database)".into(), config, Tls::None)
    }

    fn open_with(shown: String, config: Config, tls: Tls) -> Result<PgStore, StoreError> {
        let mut store = PgStore {
            shown,
            config,
            tls,
            pool: Mutex::new(Vec::new()),
            indexes: Arc::new(Indexes {
                index: AtomicU64::new(0),
                notify: watch::channel(0).0,
                desired: watch::channel(0).0,
                events: watch::channel(0).0,
            }),
            events: Mutex::default(),
            channel: String::new(),
            schema: RwLock::new(Arc::new(Schema::builtin())),
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            decoded: super::decoded::DecodedCache::default(),
        };
        let (index, desired, events, channel) =
            blocking(|| -> Result<(u64, u64, u64, String), StoreError> {
                let mut conn = store.connect()?;
                migrate(&mut conn.client, &store.shown)?;
                let (index, desired, events) = read_indexes(&mut conn.client)?;
                let schema: String = conn
                    .client
                    .query_one("SELECT current_schema()", &[])?
                    .try_get(0)?;
                store.give_back(conn);
                Ok((index, desired, events, channel_of(&schema)))
            })?;
        store.channel = channel;
        store.indexes.advance(index, desired);
        store.indexes.advance_events(events);
        let (config, tls, shown, channel, indexes, stop) = (
            store.config.clone(),
            store.tls.clone(),
            store.shown.clone(),
            store.channel.clone(),
            Arc::clone(&store.indexes),
            Arc::clone(&store.stop),
        );
        std::thread::Builder::new()
            .name("store-listen".into())
            .spawn(move || listen(config, tls, shown, channel, indexes, stop))
            .map_err(|e| StoreError::Backend(format!("cannot start the store listener: {e}")))?;
        Ok(store)
    }

    /// The database, without its password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The schema effective configs are checked against from now on.
    pub fn set_schema(&self, schema: Arc<Schema>) {
        *self.schema.write().unwrap_or_else(|e| e.into_inner()) = schema;
    }

    fn schema(&self) -> Arc<Schema> {
        self.schema
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn connect(&self) -> Result<Conn, StoreError> {
        let client = connect_with(&self.config, &self.tls).map_err(|e| {
            StoreError::Backend(format!(
                "cannot connect to {}: {}",
                self.shown,
                describe(&e)
            ))
        })?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }

    fn give_back(&self, conn: Conn) {
        if conn.client.is_closed() {
            return;
        }
        let mut pool = lock(&self.pool);
        if pool.len() < MAX_IDLE_CONNECTIONS {
            pool.push(conn);
        }
    }

    /// Runs `f` on a pooled connection.
    fn with<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        blocking(|| {
            let pooled = lock(&self.pool).pop();
            let mut conn = match pooled {
                Some(c) => c,
                None => self.connect()?,
            };
            let out = f(&mut conn);
            self.give_back(conn);
            out
        })
    }

    /// Runs `f` in one read-only snapshot.
    fn read<T>(
        &self,
        f: impl FnOnce(&mut PgTx<'_, '_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with(|conn| {
            let mut tx = conn
                .client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let out = f(&mut PgTx {
                tx: &mut tx,
                statements: &mut conn.statements,
            })?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// An update transaction ([`rules::update_key`], [`rules::update_many`]): it reads
    /// through the decoded cache, and the cache takes what it wrote once it has committed.
    fn update_seeded(
        &self,
        f: impl FnOnce(&mut dyn Tx, u64, &mut rules::Seeds<'_>) -> Result<Effect, StoreError>,
    ) -> Result<Option<u64>, StoreError> {
        let ((changed, written), index) = self.write_tx(false, |tx, next| {
            let mut seeds = rules::Seeds::new(&self.decoded);
            let effect = f(tx, next, &mut seeds)?;
            Ok(((effect != Effect::Unchanged, seeds.into_written()), effect))
        })?;
        self.decoded.seed(written);
        Ok(changed.then_some(index))
    }

    /// Runs `f` in a write transaction holding the index row, with the next index. `f` returns
    /// what it changed; only when it changed anything is the index bumped and the transaction
    /// committed, and the desired index moves too when the change may reach hosts.
    fn write_tx<T>(
        &self,
        dry_run: bool,
        f: impl FnOnce(&mut PgTx<'_, '_>, u64) -> Result<(T, Effect), StoreError>,
    ) -> Result<(T, u64), StoreError> {
        let (out, effect, index) = self.with(|conn| {
            let mut tx = conn.client.transaction()?;
            let mut ptx = PgTx {
                tx: &mut tx,
                statements: &mut conn.statements,
            };
            let current: i64 = ptx
                .query_one("SELECT value FROM meta WHERE key = 'index' FOR UPDATE", &[])?
                .get(0);
            let current = current as u64;
            let next = current + 1;
            fence_check(&mut ptx)?;
            let (out, effect) = f(&mut ptx, next)?;
            if effect == Effect::Unchanged || dry_run {
                tx.rollback()?;
                return Ok((out, Effect::Unchanged, current));
            }
            ptx.execute(
                "UPDATE meta SET value = $1 WHERE key = 'index'",
                &[&(next as i64)],
            )?;
            if next.is_multiple_of(super::feed::TRIM_EVERY) {
                super::feed::trim(&mut ptx)?;
            }
            let desired: i64 = if effect == Effect::Desired {
                ptx.execute(
                    "UPDATE meta SET value = $1 WHERE key = 'desired'",
                    &[&(next as i64)],
                )?;
                next as i64
            } else {
                ptx.query_one("SELECT value FROM meta WHERE key = 'desired'", &[])?
                    .get(0)
            };
            // Delivered to every listening server when (and only if) this commits.
            ptx.execute(
                "SELECT pg_notify($1, $2)",
                &[&self.channel, &format!("{next} {desired}")],
            )?;
            tx.commit()?;
            Ok((out, effect, next))
        })?;
        match effect {
            Effect::Unchanged => {}
            Effect::Observed => self.indexes.advance(index, 0),
            Effect::Desired => self.indexes.advance(index, index),
        }
        Ok((out, index))
    }

    /// Runs `f` in a write transaction that moves no index (tokens, heartbeats).
    fn side_tx<T>(
        &self,
        f: impl FnOnce(&mut PgTx<'_, '_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with(|conn| {
            let mut tx = conn.client.transaction()?;
            let mut ptx = PgTx {
                tx: &mut tx,
                statements: &mut conn.statements,
            };
            fence_check(&mut ptx)?;
            let out = f(&mut ptx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    fn write_inner(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
        note: &ChangeNote,
        audit: Option<&mut rules::WriteAudit<'_>>,
    ) -> Result<(WriteSummary, Vec<AuditRecord>), StoreError> {
        let schema = self.schema();
        let now = now_rfc3339();
        let (written, index) = self.write_tx(dry_run, |tx, next| {
            let w = rules::write_batch(tx, batch, dry_run, note, &schema, next, &now, audit)?;
            let effect = w.effect;
            Ok((w, effect))
        })?;
        Ok((
            WriteSummary {
                index,
                results: written.results,
            },
            written.records,
        ))
    }

    fn delete_inner(
        &self,
        key: &ObjectKey,
        expected: Option<u64>,
        audit: Option<&mut dyn FnMut(Option<i64>) -> Vec<AuditEntry>>,
    ) -> Result<(u64, Vec<AuditRecord>), StoreError> {
        let (records, index) = self.write_tx(false, |tx, _next| {
            let generation = rules::delete_one(tx, key, expected)?;
            let records = match audit {
                Some(audit) => rules::append_audit(tx, &audit(Some(generation)))?,
                None => Vec::new(),
            };
            Ok((records, Effect::of_keys([key])))
        })?;
        Ok((index, records))
    }
}

/// Refuses the writes of a transaction fenced by an epoch older than the lease's
/// ([`super::lease`]). The lease row is read `FOR SHARE`: a takeover waits until this
/// transaction ends, so a write either lands before the new epoch exists or not at all.
fn fence_check(tx: &mut PgTx<'_, '_>) -> Result<(), StoreError> {
    let fence = lease::fence();
    if fence.is_none() {
        return Ok(());
    }
    let current: i64 = tx
        .query_one(
            "SELECT epoch FROM leader_lease WHERE name = 'controllers' FOR SHARE",
            &[],
        )?
        .try_get(0)?;
    lease::check_fence(fence, current as u64)
}

/// A lease row as the lease statements answer it: holder, epoch, expiry, now (ms).
fn lease_from_row(r: &Row) -> Result<LeaseRecord, StoreError> {
    Ok(LeaseRecord {
        holder: r.try_get(0)?,
        epoch: r.try_get::<_, i64>(1)? as u64,
        expires_at_ms: r.try_get(2)?,
        now_ms: r.try_get(3)?,
    })
}

/// A client TLS configuration trusting `ca_file` (PEM), or the system's roots.
fn tls_connector(
    ca_file: Option<&Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                StoreError::Backend(format!(
                    "cannot read the PostgreSQL CA file {}: {e}",
                    path.display()
                ))
            })?;
            let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    StoreError::Backend(format!(
                        "the PostgreSQL CA file {} is not PEM certificates: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(StoreError::Backend(format!(
                    "the PostgreSQL CA file {} holds no certificate",
                    path.display()
                )));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    StoreError::Backend(format!("the PostgreSQL CA file {}: {e}", path.display()))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(StoreError::Backend(
                    "TLS to PostgreSQL was asked for (sslmode) but this system has no trusted CA certificates; give the CA that signed the server's certificate (--store-ca-file)".into(),
                ));
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Backend(format!("TLS to PostgreSQL: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Creates the version table if missing, refuses a newer schema, applies what is missing; one
/// server at a time.
fn migrate(client: &mut Client, shown: &str) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    migrate_in(&mut tx, shown)?;
    tx.commit()?;
    Ok(())
}

/// [`migrate`] inside `tx` (which it leaves open): takes the migration lock for the rest of
/// the transaction.
pub(super) fn migrate_in(tx: &mut Transaction<'_>, shown: &str) -> Result<(), StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS clusterclaw_schema (version BIGINT NOT NULL);
         INSERT INTO clusterclaw_schema (version)
            SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM clusterclaw_schema);",
    )?;
    let version: i64 = tx
        .query_one("SELECT version FROM clusterclaw_schema", &[])?
        .get(0);
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: shown.to_string(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql)?;
        if i + 1 == REVISIONS_VERSION {
            // Instances written before revisions were kept get their first one.
            let mut statements = HashMap::new();
            revisions::backfill(
                &mut PgTx {
                    tx,
                    statements: &mut statements,
                },
                &Schema::builtin(),
                &now_rfc3339(),
            )?;
        }
        tx.execute(
            "UPDATE clusterclaw_schema SET version = $1",
            &[&(i as i64 + 1)],
        )?;
        tracing::info!(database = %shown, version = i + 1, "applied store schema migration");
    }
    Ok(())
}

/// One transaction of the PostgreSQL engine, with the connection's prepared statements.
struct PgTx<'a, 'c> {
    tx: &'a mut Transaction<'c>,
    statements: &'a mut HashMap<&'static str, Statement>,
}

impl PgTx<'_, '_> {
    fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn query(
        &mut self,
        sql: &'static str,
        args: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let s = self.statement(sql)?;
        Ok(self.tx.query(&s, args)?)
    }

    fn query_one(
        &mut self,
        sql: &'static str,
        args: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Row, StoreError> {
        let s = self.statement(sql)?;
        Ok(self.tx.query_one(&s, args)?)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        args: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let s = self.statement(sql)?;
        Ok(self.tx.query_opt(&s, args)?)
    }

    fn execute(
        &mut self,
        sql: &'static str,
        args: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let s = self.statement(sql)?;
        Ok(self.tx.execute(&s, args)?)
    }

    fn index(&mut self) -> Result<u64, StoreError> {
        let v: i64 = self
            .query_one("SELECT value FROM meta WHERE key = 'index'", &[])?
            .get(0);
        Ok(v as u64)
    }

    /// Hands every object matching `filter` to `each` in list order until it returns false.
    fn scan(
        &mut self,
        filter: &ListFilter,
        each: &mut dyn FnMut(StoredObject) -> bool,
    ) -> Result<(), StoreError> {
        let rows = self.query(
            "SELECT kind, tenant, project, name, uid, generation, resource_version, labels, body
             FROM objects
             WHERE kind = $1 AND ($2::TEXT IS NULL OR tenant = $2)
               AND ($3::TEXT IS NULL OR project = $3) AND ($4::TEXT IS NULL OR name = $4)
             ORDER BY tenant, project, name",
            &[
                &filter.kind.as_str(),
                &filter.tenant,
                &filter.project,
                &filter.name,
            ],
        )?;
        for row in rows {
            let o = object_from_row(&row)?;
            if filter.labels.iter().all(|req| req.matches(&o.labels)) && !each(o) {
                break;
            }
        }
        Ok(())
    }
}

fn object_from_row(r: &Row) -> Result<StoredObject, StoreError> {
    let kind: String = r.try_get(0)?;
    let key = ObjectKey {
        kind: Kind::from_manifest(&kind).ok_or_else(|| {
            StoreError::Corrupt(format!("unknown kind {kind:?} in the objects table"))
        })?,
        tenant: r.try_get(1)?,
        project: r.try_get(2)?,
        name: r.try_get(3)?,
    };
    let labels: String = r.try_get(7)?;
    let labels: BTreeMap<String, String> = serde_json::from_str(&labels)
        .map_err(|e| StoreError::Corrupt(format!("labels of {key}: {e}")))?;
    Ok(StoredObject {
        uid: r.try_get(4)?,
        generation: r.try_get(5)?,
        resource_version: r.try_get::<_, i64>(6)? as u64,
        labels,
        json: r.try_get(8)?,
        key,
    })
}

fn token_from_row(r: &Row) -> Result<TokenRecord, StoreError> {
    let id: String = r.try_get(0)?;
    let kind: String = r.try_get(3)?;
    let kind = match kind.as_str() {
        "api" => TokenKind::Api,
        "join" => TokenKind::Join,
        other => {
            return Err(StoreError::Corrupt(format!(
                "token {id} has unknown kind {other:?}"
            )));
        }
    };
    Ok(TokenRecord {
        hash: r.try_get(1)?,
        name: r.try_get(2)?,
        kind,
        role: r.try_get(4)?,
        tenant: r.try_get(5)?,
        project: r.try_get(6)?,
        created_at: r.try_get(7)?,
        expires_at: r.try_get(8)?,
        uses_remaining: r.try_get(9)?,
        revoked: r.try_get(10)?,
        id,
    })
}

/// A PostgreSQL audit row, read through the one decoder ([`crate::audit::row::decode`]).
struct PgColumns<'a>(&'a Row);

impl crate::audit::row::AuditColumns for PgColumns<'_> {
    fn int(&self, i: usize, name: &str) -> Result<i64, String> {
        self.0.try_get(i).map_err(|e| format!("column {name}: {e}"))
    }
    fn opt_int(&self, i: usize, name: &str) -> Result<Option<i64>, String> {
        self.0.try_get(i).map_err(|e| format!("column {name}: {e}"))
    }
    fn text(&self, i: usize, name: &str) -> Result<String, String> {
        self.0.try_get(i).map_err(|e| format!("column {name}: {e}"))
    }
    fn opt_text(&self, i: usize, name: &str) -> Result<Option<String>, String> {
        self.0.try_get(i).map_err(|e| format!("column {name}: {e}"))
    }
}

/// A row of the audit table as a record, or why it cannot be one.
fn audit_from_row(r: &Row) -> Result<AuditRecord, String> {
    crate::audit::row::decode(&PgColumns(r))
}

impl Tx for PgTx<'_, '_> {
    fn get(&mut self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
        self.query_opt(
            "SELECT kind, tenant, project, name, uid, generation, resource_version, labels, body
             FROM objects WHERE kind = $1 AND tenant = $2 AND project = $3 AND name = $4",
            &[&key.kind.as_str(), &key.tenant, &key.project, &key.name],
        )?
        .map(|r| object_from_row(&r))
        .transpose()
    }

    fn head(&mut self, key: &ObjectKey) -> Result<Option<(String, u64)>, StoreError> {
        self.query_opt(
            "SELECT uid, resource_version FROM objects
             WHERE kind = $1 AND tenant = $2 AND project = $3 AND name = $4",
            &[&key.kind.as_str(), &key.tenant, &key.project, &key.name],
        )?
        .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64)))
        .transpose()
    }

    fn exists(&mut self, key: &ObjectKey) -> Result<bool, StoreError> {
        Ok(self
            .query_opt(
                "SELECT 1 FROM objects WHERE kind = $1 AND tenant = $2 AND project = $3 AND name = $4",
                &[&key.kind.as_str(), &key.tenant, &key.project, &key.name],
            )?
            .is_some())
    }

    fn put(&mut self, o: &StoredObject, usage: Usage) -> Result<(), StoreError> {
        let labels =
            serde_json::to_string(&o.labels).map_err(|e| StoreError::Backend(e.to_string()))?;
        // The change log first, to tell ADDED from MODIFIED.
        let type_ = if self.exists(&o.key)? {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.execute(
            "INSERT INTO changes (rv, type, kind, tenant, project, name, labels, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (rv, kind, tenant, project, name)
                DO UPDATE SET labels = excluded.labels, body = excluded.body",
            &[
                &(o.resource_version as i64),
                &type_,
                &o.key.kind.as_str(),
                &o.key.tenant,
                &o.key.project,
                &o.key.name,
                &labels,
                &o.json,
            ],
        )?;
        self.execute(
            "INSERT INTO objects (kind, tenant, project, name, uid, generation, resource_version, labels, body,
                                  use_replicas, use_cpu_millis, use_memory_bytes)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (kind, tenant, project, name) DO UPDATE SET
                uid = excluded.uid, generation = excluded.generation,
                resource_version = excluded.resource_version, labels = excluded.labels,
                body = excluded.body, use_replicas = excluded.use_replicas,
                use_cpu_millis = excluded.use_cpu_millis, use_memory_bytes = excluded.use_memory_bytes",
            &[
                &o.key.kind.as_str(),
                &o.key.tenant,
                &o.key.project,
                &o.key.name,
                &o.uid,
                &o.generation,
                &(o.resource_version as i64),
                &labels,
                &o.json,
                &usage.replicas,
                &usage.cpu_millis,
                &usage.memory_bytes,
            ],
        )?;
        Ok(())
    }

    fn remove(&mut self, o: &StoredObject) -> Result<(), StoreError> {
        let key = &o.key;
        let labels =
            serde_json::to_string(&o.labels).map_err(|e| StoreError::Backend(e.to_string()))?;
        // Logged at the index this transaction commits at (the stored one plus one).
        self.execute(
            "INSERT INTO changes (rv, type, kind, tenant, project, name, labels, body)
             VALUES ((SELECT value + 1 FROM meta WHERE key = 'index'), 'DELETED', $1, $2, $3, $4, $5, $6)
             ON CONFLICT (rv, kind, tenant, project, name)
                DO UPDATE SET type = 'DELETED', body = excluded.body",
            &[
                &key.kind.as_str(),
                &key.tenant,
                &key.project,
                &key.name,
                &labels,
                &o.json,
            ],
        )?;
        self.execute(
            "DELETE FROM objects WHERE kind = $1 AND tenant = $2 AND project = $3 AND name = $4",
            &[&key.kind.as_str(), &key.tenant, &key.project, &key.name],
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
            .query_one(
                "SELECT COUNT(*) FROM objects
                 WHERE kind = $1 AND tenant = $2 AND ($3::TEXT IS NULL OR project = $3)",
                &[&kind.as_str(), &tenant, &project],
            )?
            .get(0);
        Ok(n as u64)
    }

    fn usage(&mut self, tenant: &str, project: Option<&str>) -> Result<Usage, StoreError> {
        let r = self.query_one(
            "SELECT COUNT(*), COALESCE(SUM(use_replicas), 0)::BIGINT,
                    COALESCE(SUM(use_cpu_millis), 0)::BIGINT, COALESCE(SUM(use_memory_bytes), 0)::BIGINT
             FROM objects WHERE kind = 'OpenClawInstance' AND tenant = $1
               AND ($2::TEXT IS NULL OR project = $2)",
            &[&tenant, &project],
        )?;
        Ok(Usage {
            instances: r.try_get(0)?,
            replicas: r.try_get(1)?,
            cpu_millis: r.try_get(2)?,
            memory_bytes: r.try_get(3)?,
        })
    }

    fn token_by_hash(&mut self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.query_opt(
            "SELECT id, hash, name, kind, role, tenant, project, created_at, expires_at,
                    uses_remaining, revoked
             FROM tokens WHERE hash = $1 FOR UPDATE",
            &[&hash],
        )?
        .map(|r| token_from_row(&r))
        .transpose()
    }

    fn set_token_uses(&mut self, id: &str, uses: i64) -> Result<(), StoreError> {
        self.execute(
            "UPDATE tokens SET uses_remaining = $1 WHERE id = $2",
            &[&uses, &id],
        )?;
        Ok(())
    }

    fn audit_head(&mut self) -> Result<(u64, Option<String>, u64), StoreError> {
        let last = self.query_opt("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])?;
        let written: i64 = self
            .query_one("SELECT value FROM meta WHERE key = 'audit_written'", &[])?
            .get(0);
        let written = u64::try_from(written).unwrap_or(0);
        Ok(match last {
            Some(r) => (
                u64::try_from(r.try_get::<_, i64>(0)?).unwrap_or(0),
                Some(r.try_get(1)?),
                written,
            ),
            None => (0, None, written),
        })
    }

    fn audit_insert(&mut self, records: &[AuditRecord]) -> Result<(), StoreError> {
        for r in records {
            let e = &r.entry;
            let o = e.object.as_ref();
            self.execute(
                "INSERT INTO audit (seq, chain_version, time, principal_id, principal_name, tenant,
                    action, object_kind, object_tenant, object_project, object_name, outcome,
                    status, reason, request_id, source, generation_before, generation_after,
                    prev_hash, hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                    $17, $18, $19, $20)",
                &[
                    &(r.seq as i64),
                    &i64::from(r.chain_version),
                    &e.time,
                    &e.principal.id,
                    &e.principal.name,
                    &e.tenant,
                    &e.action,
                    &o.map(|o| o.kind.as_str()),
                    &o.and_then(|o| o.tenant.as_deref()),
                    &o.and_then(|o| o.project.as_deref()),
                    &o.map(|o| o.name.as_str()),
                    &e.result.outcome.as_str(),
                    &i64::from(e.result.status),
                    &e.result.reason,
                    &e.request_id,
                    &e.source,
                    &e.generation_before,
                    &e.generation_after,
                    &r.prev_hash,
                    &r.hash,
                ],
            )?;
        }
        Ok(())
    }

    fn set_audit_written(&mut self, written: u64) -> Result<(), StoreError> {
        self.execute(
            "UPDATE meta SET value = $1 WHERE key = 'audit_written'",
            &[&(written as i64)],
        )?;
        Ok(())
    }

    fn index(&mut self) -> Result<u64, StoreError> {
        PgTx::index(self)
    }

    fn list_in_tenant(
        &mut self,
        kind: Kind,
        tenant: &str,
    ) -> Result<Vec<StoredObject>, StoreError> {
        let mut filter = ListFilter::all(kind);
        filter.tenant = Some(tenant.to_string());
        let mut out = Vec::new();
        self.scan(&filter, &mut |o| {
            out.push(o);
            true
        })?;
        Ok(out)
    }

    fn instances(&mut self, reach: Reach<'_>) -> Result<Vec<StoredObject>, StoreError> {
        let rows = match reach {
            Reach::All => self.query(
                "SELECT kind, tenant, project, name, uid, generation, resource_version, labels, body
                 FROM objects WHERE kind = 'OpenClawInstance' ORDER BY tenant, project, name",
                &[],
            )?,
            Reach::Tenant(t) => self.query(
                "SELECT kind, tenant, project, name, uid, generation, resource_version, labels, body
                 FROM objects WHERE kind = 'OpenClawInstance' AND tenant = $1
                 ORDER BY tenant, project, name",
                &[&t],
            )?,
            Reach::Project(t, p) => self.query(
                "SELECT kind, tenant, project, name, uid, generation, resource_version, labels, body
                 FROM objects WHERE kind = 'OpenClawInstance' AND tenant = $1 AND project = $2
                 ORDER BY tenant, project, name",
                &[&t, &p],
            )?,
            Reach::Template(name) => self.query(
                "SELECT kind, tenant, project, name, uid, generation, resource_version, labels, body
                 FROM objects WHERE kind = 'OpenClawInstance'
                   AND COALESCE(body::jsonb #>> '{spec,configTemplate}', $2) = $1
                 ORDER BY tenant, project, name",
                &[&name, &crate::configcenter::DEFAULT_TEMPLATE],
            )?,
        };
        rows.iter().map(object_from_row).collect()
    }

    fn meta(&mut self, key: &'static str) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .query_opt("SELECT value FROM meta WHERE key = $1", &[&key])?
            .map(|r| r.try_get(0))
            .transpose()?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    fn raise_meta(&mut self, key: &'static str, value: u64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value, excluded.value)",
            &[&key, &(value as i64)],
        )?;
        Ok(())
    }

    fn put_secret_values(
        &mut self,
        key: &ObjectKey,
        values: &[(String, String)],
    ) -> Result<(), StoreError> {
        self.drop_secret_values(key)?;
        for (k, v) in values {
            self.execute(
                "INSERT INTO secret_values (tenant, project, name, key, sealed) VALUES ($1, $2, $3, $4, $5)",
                &[&key.tenant, &key.project, &key.name, k, v],
            )?;
        }
        Ok(())
    }

    fn drop_secret_values(&mut self, key: &ObjectKey) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM secret_values WHERE tenant = $1 AND project = $2 AND name = $3",
            &[&key.tenant, &key.project, &key.name],
        )?;
        Ok(())
    }

    fn sealed_value(
        &mut self,
        secret: &ObjectKey,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        self.query_opt(
            "SELECT sealed FROM secret_values WHERE tenant = $1 AND project = $2 AND name = $3 AND key = $4",
            &[&secret.tenant, &secret.project, &secret.name, &key],
        )?
        .map(|r| Ok(r.try_get(0)?))
        .transpose()
    }

    fn sealed_values(&mut self) -> Result<Vec<SealedValue>, StoreError> {
        self.query(
            "SELECT tenant, project, name, key, sealed FROM secret_values ORDER BY tenant, project, name, key",
            &[],
        )?
        .iter()
        .map(|r| {
            Ok(SealedValue {
                tenant: r.try_get(0)?,
                project: r.try_get(1)?,
                name: r.try_get(2)?,
                key: r.try_get(3)?,
                sealed: r.try_get(4)?,
            })
        })
        .collect()
    }

    fn set_sealed(&mut self, v: &SealedValue) -> Result<(), StoreError> {
        self.execute(
            "UPDATE secret_values SET sealed = $5 WHERE tenant = $1 AND project = $2 AND name = $3 AND key = $4",
            &[&v.tenant, &v.project, &v.name, &v.key, &v.sealed],
        )?;
        Ok(())
    }

    fn latest_revision(&mut self, uid: &str) -> Result<Option<RevisionRow>, StoreError> {
        self.query_opt(
            "SELECT instance_uid, revision, tenant, project, instance, config, hash, layers, author,
                    message, created_at, image, env, resources, secrets, spec, content_hash
             FROM config_revisions WHERE instance_uid = $1 ORDER BY revision DESC LIMIT 1",
            &[&uid],
        )?
        .map(|r| revision_from_row(&r))
        .transpose()
    }

    fn revision(&mut self, uid: &str, revision: u64) -> Result<Option<RevisionRow>, StoreError> {
        self.query_opt(
            "SELECT instance_uid, revision, tenant, project, instance, config, hash, layers, author,
                    message, created_at, image, env, resources, secrets, spec, content_hash
             FROM config_revisions WHERE instance_uid = $1 AND revision = $2",
            &[&uid, &(revision as i64)],
        )?
        .map(|r| revision_from_row(&r))
        .transpose()
    }

    fn revisions(&mut self, uid: &str) -> Result<Vec<RevisionRow>, StoreError> {
        self.query(
            "SELECT instance_uid, revision, tenant, project, instance, config, hash, layers, author,
                    message, created_at, image, env, resources, secrets, spec, content_hash
             FROM config_revisions WHERE instance_uid = $1 ORDER BY revision DESC",
            &[&uid],
        )?
        .iter()
        .map(revision_from_row)
        .collect()
    }

    fn insert_revision(&mut self, r: &RevisionRow) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO config_revisions (instance_uid, revision, tenant, project, instance, config,
                hash, layers, author, message, created_at, image, env, resources, secrets, spec,
                content_hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
            &[
                &r.instance_uid,
                &(r.revision as i64),
                &r.tenant,
                &r.project,
                &r.instance,
                &r.config,
                &r.hash,
                &r.layers,
                &r.author,
                &r.message,
                &r.created_at,
                &r.image,
                &r.env,
                &r.resources,
                &r.secrets,
                &r.spec,
                &r.content_hash,
            ],
        )?;
        Ok(())
    }

    fn revision_numbers(&mut self, uid: &str, upto: u64) -> Result<Vec<u64>, StoreError> {
        self.query(
            "SELECT revision FROM config_revisions WHERE instance_uid = $1 AND revision <= $2
             ORDER BY revision",
            &[&uid, &(upto as i64)],
        )?
        .iter()
        .map(|r| Ok(r.try_get::<_, i64>(0)? as u64))
        .collect()
    }

    fn drop_revisions(&mut self, uid: &str, revision: Option<u64>) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM config_revisions WHERE instance_uid = $1
             AND ($2::BIGINT IS NULL OR revision = $2)",
            &[&uid, &revision.map(|n| n as i64)],
        )?;
        Ok(())
    }

    fn newest_revisions(&mut self) -> Result<HashMap<String, u64>, StoreError> {
        self.query(
            "SELECT instance_uid, MAX(revision) FROM config_revisions GROUP BY instance_uid",
            &[],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64)))
        .collect()
    }

    fn current_configs(&mut self) -> Result<HashMap<String, (u64, String)>, StoreError> {
        self.query(
            "SELECT DISTINCT ON (instance_uid) instance_uid, revision, config FROM config_revisions
             ORDER BY instance_uid, revision DESC",
            &[],
        )?
        .iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                (r.try_get::<_, i64>(1)? as u64, r.try_get(2)?),
            ))
        })
        .collect()
    }

    fn revisions_holding_secrets(&mut self) -> Result<Vec<(String, u64, String)>, StoreError> {
        self.query(
            "SELECT instance_uid, revision, secrets FROM config_revisions
             WHERE secrets IS NOT NULL AND secrets != '[]'",
            &[],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64, r.try_get(2)?)))
        .collect()
    }

    fn set_revision_secrets(
        &mut self,
        uid: &str,
        revision: u64,
        secrets: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE config_revisions SET secrets = $3 WHERE instance_uid = $1 AND revision = $2",
            &[&uid, &(revision as i64), &secrets],
        )?;
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
        self.query(
            "SELECT instance_uid, tenant, project, instance, replica, ordinal, host, since
             FROM retained_volumes
             WHERE ($1::TEXT IS NULL OR (tenant = $1 AND project = $2 AND instance = $3))
             ORDER BY host, tenant, project, instance, ordinal",
            &[&t, &p, &i],
        )?
        .iter()
        .map(|r| {
            Ok(DeletedVolume {
                instance_uid: r.try_get(0)?,
                tenant: r.try_get(1)?,
                project: r.try_get(2)?,
                instance: r.try_get(3)?,
                replica: r.try_get(4)?,
                ordinal: r.try_get::<_, i64>(5)? as u32,
                host: r.try_get(6)?,
                since: r.try_get(7)?,
            })
        })
        .collect()
    }

    fn keep_volume(&mut self, v: &DeletedVolume) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO retained_volumes (instance_uid, tenant, project, instance, replica, ordinal, host, since)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (instance_uid, ordinal, host) DO UPDATE SET tenant = excluded.tenant,
                project = excluded.project, instance = excluded.instance,
                replica = excluded.replica, since = excluded.since",
            &[
                &v.instance_uid,
                &v.tenant,
                &v.project,
                &v.instance,
                &v.replica,
                &i64::from(v.ordinal),
                &v.host,
                &v.since,
            ],
        )?;
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
        self.execute(
            "DELETE FROM retained_volumes WHERE tenant = $1 AND project = $2 AND instance = $3
             AND ($4::TEXT IS NULL OR (replica = $4 AND host = $5))",
            &[&t, &p, &i, &replica, &host],
        )?;
        Ok(())
    }

    fn requested_volume_deletions(&mut self) -> Result<Vec<(String, String)>, StoreError> {
        self.query(
            "SELECT host, name FROM host_volumes WHERE delete_requested IS NOT NULL
             ORDER BY host, name",
            &[],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
    }

    fn host_volumes(&mut self, host: Option<&str>) -> Result<Vec<HostVolume>, StoreError> {
        self.query(
            "SELECT host, name, tenant, project, instance, replica, first_seen, orphaned_since,
                    delete_requested, delete_reason
             FROM host_volumes WHERE $1::TEXT IS NULL OR host = $1 ORDER BY host, name",
            &[&host],
        )?
        .iter()
        .map(|r| {
            Ok(HostVolume {
                host: r.try_get(0)?,
                volume: ReportedVolume {
                    name: r.try_get(1)?,
                    tenant: r.try_get(2)?,
                    project: r.try_get(3)?,
                    instance: r.try_get(4)?,
                    replica: r.try_get(5)?,
                },
                first_seen: r.try_get(6)?,
                orphaned_since: r.try_get(7)?,
                delete_requested: r.try_get(8)?,
                delete_reason: r.try_get(9)?,
            })
        })
        .collect()
    }

    fn put_host_volume(
        &mut self,
        host: &str,
        v: &ReportedVolume,
        now: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO host_volumes (host, name, tenant, project, instance, replica, first_seen)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (host, name) DO UPDATE SET tenant = excluded.tenant,
                project = excluded.project, instance = excluded.instance, replica = excluded.replica",
            &[
                &host,
                &v.name,
                &v.tenant,
                &v.project,
                &v.instance,
                &v.replica,
                &now,
            ],
        )?;
        Ok(())
    }

    fn drop_host_volumes(&mut self, host: &str, name: Option<&str>) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM host_volumes WHERE host = $1 AND ($2::TEXT IS NULL OR name = $2)",
            &[&host, &name],
        )?;
        Ok(())
    }

    fn set_orphaned(
        &mut self,
        host: &str,
        name: &str,
        since: Option<&str>,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE host_volumes SET orphaned_since = $3 WHERE host = $1 AND name = $2",
            &[&host, &name, &since],
        )?;
        Ok(())
    }

    fn set_volume_deletion(
        &mut self,
        host: &str,
        name: &str,
        now: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE host_volumes SET delete_requested = COALESCE(delete_requested, $3),
                delete_reason = COALESCE(delete_reason, $4)
             WHERE host = $1 AND name = $2",
            &[&host, &name, &now, &reason],
        )?;
        Ok(())
    }

    fn change_rows(&mut self, after: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        self.query(
            // As the SQLite store's: the log's order, read through the (rv, ...) index.
            "SELECT rv, type, kind, tenant, project, name, labels, body FROM changes
             WHERE rv > $1 ORDER BY rv, seq LIMIT $2",
            &[&(after as i64), &(limit as i64)],
        )?
        .iter()
        .map(|r| {
            let type_: String = r.try_get(1)?;
            let kind: String = r.try_get(2)?;
            let labels: String = r.try_get(6)?;
            super::sqlite::change_of(
                r.try_get(0)?,
                &type_,
                &kind,
                r.try_get(3)?,
                r.try_get(4)?,
                r.try_get(5)?,
                &labels,
                r.try_get(7)?,
            )
        })
        .collect()
    }

    fn change_rv_from_newest(&mut self, offset: u64) -> Result<Option<u64>, StoreError> {
        self.query_opt(
            "SELECT rv FROM changes ORDER BY seq DESC LIMIT 1 OFFSET $1",
            &[&(offset as i64)],
        )?
        .map(|r| Ok(r.try_get::<_, i64>(0)? as u64))
        .transpose()
    }

    fn drop_changes(&mut self, upto: u64) -> Result<(), StoreError> {
        self.execute("DELETE FROM changes WHERE rv <= $1", &[&(upto as i64)])?;
        Ok(())
    }

    fn find_event(&mut self, e: &Event, since_ms: i64) -> Result<Option<i64>, StoreError> {
        self.query_opt(
            "SELECT id FROM events WHERE kind = $1 AND tenant = $2 AND project = $3 AND name = $4
             AND reason = $5 AND replica = $6 AND type = $7 AND message = $8 AND source = $9
             AND last_ms >= $10 ORDER BY last_ms DESC LIMIT 1",
            &[
                &e.object.kind.as_str(),
                &e.object.tenant,
                &e.object.project,
                &e.object.name,
                &e.reason,
                &e.replica.as_deref().unwrap_or(""),
                &e.type_.as_str(),
                &e.message,
                &e.source,
                &since_ms,
            ],
        )?
        .map(|r| Ok(r.try_get(0)?))
        .transpose()
    }

    fn fold_event(
        &mut self,
        id: i64,
        count: u64,
        last_ms: i64,
        seq: u64,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE events SET count = count + $1, last_ms = GREATEST(last_ms, $2), seq = $3
             WHERE id = $4",
            &[&(count as i64), &last_ms, &(seq as i64), &id],
        )?;
        Ok(())
    }

    fn insert_event(&mut self, seq: u64, f: &Folded) -> Result<(), StoreError> {
        let e = &f.event;
        self.execute(
            "INSERT INTO events (seq, kind, tenant, project, name, replica, type, reason, message,
                source, count, first_ms, last_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            &[
                &(seq as i64),
                &e.object.kind.as_str(),
                &e.object.tenant,
                &e.object.project,
                &e.object.name,
                &e.replica.as_deref().unwrap_or(""),
                &e.type_.as_str(),
                &e.reason,
                &e.message,
                &e.source,
                &(f.count as i64),
                &f.first_ms,
                &f.last_ms,
            ],
        )?;
        Ok(())
    }

    fn drop_events_before(&mut self, cutoff_ms: i64) -> Result<(u64, usize), StoreError> {
        let newest: i64 = self
            .query_one(
                "SELECT COALESCE(MAX(seq), 0)::BIGINT FROM events WHERE last_ms < $1",
                &[&cutoff_ms],
            )?
            .try_get(0)?;
        let n = self.execute("DELETE FROM events WHERE last_ms < $1", &[&cutoff_ms])?;
        Ok((newest as u64, n as usize))
    }

    fn event_counts(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        self.query(
            "SELECT tenant, COUNT(*) FROM events GROUP BY tenant ORDER BY tenant",
            &[],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64)))
        .collect()
    }

    fn drop_oldest_events(&mut self, tenant: &str, n: u64) -> Result<(u64, usize), StoreError> {
        let rows = self.query(
            "DELETE FROM events WHERE id IN
                (SELECT id FROM events WHERE tenant = $1 ORDER BY last_ms, id LIMIT $2)
             RETURNING seq",
            &[&tenant, &(n as i64)],
        )?;
        let mut newest = 0u64;
        for r in &rows {
            newest = newest.max(r.try_get::<_, i64>(0)? as u64);
        }
        Ok((newest, rows.len()))
    }

    fn events(&mut self, filter: &EventFilter) -> Result<Vec<EventRecord>, StoreError> {
        let (kind, name) = match &filter.object {
            Some((k, n)) => (Some(k.as_str()), Some(n.as_str())),
            None => (None, None),
        };
        let limit = filter.limit.map(|l| l as i64);
        self.query(
            "SELECT id, seq, kind, tenant, project, name, replica, type, reason, message, source,
                    count, first_ms, last_ms
             FROM events
             WHERE ($1::TEXT IS NULL OR tenant = $1) AND ($2::TEXT IS NULL OR project = $2)
               AND ($3::TEXT IS NULL OR (kind = $3 AND name = $4))
             ORDER BY last_ms DESC, id DESC LIMIT $5",
            &[&filter.tenant, &filter.project, &kind, &name, &limit],
        )?
        .iter()
        .map(event_from_row)
        .collect()
    }

    fn events_after(&mut self, after: u64, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        self.query(
            "SELECT id, seq, kind, tenant, project, name, replica, type, reason, message, source,
                    count, first_ms, last_ms
             FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&(after as i64), &(limit as i64)],
        )?
        .iter()
        .map(event_from_row)
        .collect()
    }
}

fn revision_from_row(r: &Row) -> Result<RevisionRow, StoreError> {
    Ok(RevisionRow {
        instance_uid: r.try_get(0)?,
        revision: r.try_get::<_, i64>(1)? as u64,
        tenant: r.try_get(2)?,
        project: r.try_get(3)?,
        instance: r.try_get(4)?,
        config: r.try_get(5)?,
        hash: r.try_get(6)?,
        layers: r.try_get(7)?,
        author: r.try_get(8)?,
        message: r.try_get(9)?,
        created_at: r.try_get(10)?,
        image: r.try_get(11)?,
        env: r.try_get(12)?,
        resources: r.try_get(13)?,
        secrets: r.try_get(14)?,
        spec: r.try_get(15)?,
        content_hash: r.try_get(16)?,
    })
}

fn event_from_row(r: &Row) -> Result<EventRecord, StoreError> {
    super::sqlite::EventRow {
        id: r.try_get(0)?,
        seq: r.try_get(1)?,
        kind: r.try_get(2)?,
        tenant: r.try_get(3)?,
        project: r.try_get(4)?,
        name: r.try_get(5)?,
        replica: r.try_get(6)?,
        type_: r.try_get(7)?,
        reason: r.try_get(8)?,
        message: r.try_get(9)?,
        source: r.try_get(10)?,
        count: r.try_get(11)?,
        first_ms: r.try_get(12)?,
        last_ms: r.try_get(13)?,
    }
    .into_record()
}

impl Store for PgStore {
    fn index(&self) -> u64 {
        self.indexes.index.load(Ordering::SeqCst)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.indexes.notify.subscribe()
    }

    fn desired_index(&self) -> u64 {
        *self.indexes.desired.borrow()
    }

    fn subscribe_desired(&self) -> watch::Receiver<u64> {
        self.indexes.desired.subscribe()
    }

    fn check(&self) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.client.simple_query("SELECT 1")?;
            Ok(())
        })
    }

    fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
        self.read(|tx| tx.get(key))
    }

    fn decoded_cache(&self) -> Option<&super::decoded::DecodedCache> {
        Some(&self.decoded)
    }

    fn kind_fingerprint(&self, kind: Kind) -> Result<(u64, u64), StoreError> {
        self.read(|tx| fingerprint_in(tx, kind))
    }

    fn kind_deletions(&self, kind: Kind) -> Result<Option<u64>, StoreError> {
        self.read(|tx| kind_stats_in(tx, kind).map(|(_, _, deleted)| Some(deleted)))
    }

    fn versions(&self, kind: Kind) -> Result<Vec<(ObjectKey, String, u64)>, StoreError> {
        self.read(|tx| {
            let rows = tx.query(
                "SELECT tenant, project, name, uid, resource_version FROM objects WHERE kind = $1",
                &[&kind.as_str()],
            )?;
            Ok(version_rows(kind, &rows))
        })
    }

    fn versions_after(&self, kind: Kind, after: u64) -> Result<super::VersionsAfter, StoreError> {
        // One repeatable-read transaction: the count and the rows of one snapshot.
        self.read(|tx| {
            let fingerprint = fingerprint_in(tx, kind)?;
            let rows = tx.query(
                "SELECT tenant, project, name, uid, resource_version FROM objects
                 WHERE kind = $1 AND resource_version > $2",
                &[&kind.as_str(), &(after as i64)],
            )?;
            Ok((fingerprint, version_rows(kind, &rows)))
        })
    }

    fn resource_version(&self, key: &ObjectKey) -> Result<Option<u64>, StoreError> {
        self.read(|tx| {
            let row = tx.query_opt(
                "SELECT resource_version FROM objects
                 WHERE kind = $1 AND tenant = $2 AND project = $3 AND name = $4",
                &[&key.kind.as_str(), &key.tenant, &key.project, &key.name],
            )?;
            Ok(row.map(|r| r.get::<_, i64>(0) as u64))
        })
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<StoredObject>, StoreError> {
        self.read(|tx| {
            let mut out = Vec::new();
            tx.scan(filter, &mut |o| {
                out.push(o);
                true
            })?;
            Ok(out)
        })
    }

    fn get_at(&self, key: &ObjectKey) -> Result<(u64, Option<StoredObject>), StoreError> {
        self.read(|tx| Ok((tx.index()?, tx.get(key)?)))
    }

    fn list_at(&self, filter: &ListFilter) -> Result<(u64, Vec<StoredObject>), StoreError> {
        self.read(|tx| {
            let index = tx.index()?;
            let mut out = Vec::new();
            tx.scan(filter, &mut |o| {
                out.push(o);
                true
            })?;
            Ok((index, out))
        })
    }

    fn scan(
        &self,
        filter: &ListFilter,
        start: &mut dyn FnMut(u64) -> bool,
        each: &mut dyn FnMut(&StoredObject) -> bool,
    ) -> Result<(), StoreError> {
        self.read(|tx| {
            if start(tx.index()?) {
                tx.scan(filter, &mut |o| each(&o))?;
            }
            Ok(())
        })
    }

    fn usage(&self, tenant: Option<&str>) -> Result<UsageByTenant, StoreError> {
        self.read(|tx| {
            let rows = tx.query(
                "SELECT tenant, project, COUNT(*), SUM(use_replicas)::BIGINT,
                        SUM(use_cpu_millis)::BIGINT, SUM(use_memory_bytes)::BIGINT
                 FROM objects WHERE kind = 'OpenClawInstance' AND ($1::TEXT IS NULL OR tenant = $1)
                 GROUP BY tenant, project",
                &[&tenant],
            )?;
            let mut out = UsageByTenant::new();
            for r in rows {
                let u = Usage {
                    instances: r.try_get(2)?,
                    replicas: r.try_get(3)?,
                    cpu_millis: r.try_get(4)?,
                    memory_bytes: r.try_get(5)?,
                };
                let entry = out.entry(r.try_get(0)?).or_default();
                entry.0.add(u);
                entry.1.insert(r.try_get(1)?, u);
            }
            Ok(out)
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

    fn write_noted(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
        note: &ChangeNote,
    ) -> Result<WriteSummary, StoreError> {
        Ok(self.write_inner(batch, dry_run, note, None)?.0)
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

    fn delete(&self, key: &ObjectKey, expected: Option<u64>) -> Result<u64, StoreError> {
        Ok(self.delete_inner(key, expected, None)?.0)
    }

    fn delete_audited(
        &self,
        key: &ObjectKey,
        expected: Option<u64>,
        audit: &mut dyn FnMut(Option<i64>) -> Vec<AuditEntry>,
    ) -> Result<(u64, Vec<AuditRecord>), StoreError> {
        self.delete_inner(key, expected, Some(audit))
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
                rules::delete_batch(tx, keys, skip_missing, dry_run, audit)?;
            Ok(((deleted, records), effect))
        })?;
        Ok((DeleteSummary { index, deleted }, records))
    }

    fn lease_acquire(
        &self,
        holder: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<LeaseRecord, StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let epoch = epoch as i64;
        lease::fenced(None, || {
            self.side_tx(|tx| {
                // Renewed when this holder holds it in this epoch and it has not expired;
                // taken with the next epoch when it has expired; else left as it is.
                let renewed = tx.query_opt(
                    "UPDATE leader_lease SET
                        epoch = CASE WHEN holder = $1 AND epoch = $2 AND expires_at > now()
                                     THEN epoch ELSE epoch + 1 END,
                        acquired_at = CASE WHEN holder = $1 AND epoch = $2 AND expires_at > now()
                                           THEN acquired_at ELSE now() END,
                        holder = $1,
                        renewed_at = now(),
                        expires_at = now() + $3::BIGINT * interval '1 millisecond'
                     WHERE name = 'controllers'
                       AND (expires_at <= now() OR (holder = $1 AND epoch = $2))
                     RETURNING holder, epoch,
                        (extract(epoch FROM expires_at) * 1000)::BIGINT,
                        (extract(epoch FROM now()) * 1000)::BIGINT",
                    &[&holder, &epoch, &ttl_ms],
                )?;
                let row = match renewed {
                    Some(r) => r,
                    None => tx.query_one(
                        "SELECT holder, epoch,
                            (extract(epoch FROM GREATEST(expires_at, '1970-01-01'::timestamptz)) * 1000)::BIGINT,
                            (extract(epoch FROM now()) * 1000)::BIGINT
                         FROM leader_lease WHERE name = 'controllers'",
                        &[],
                    )?,
                };
                lease_from_row(&row)
            })
        })
    }

    fn lease_release(&self, holder: &str, epoch: u64) -> Result<(), StoreError> {
        lease::fenced(None, || {
            self.side_tx(|tx| {
                tx.execute(
                    "UPDATE leader_lease SET expires_at = now()
                     WHERE name = 'controllers' AND holder = $1 AND epoch = $2",
                    &[&holder, &(epoch as i64)],
                )?;
                Ok(())
            })
        })
    }

    fn shared_ca(
        &self,
        offered: &(String, String),
    ) -> Result<Option<(String, String)>, StoreError> {
        lease::fenced(None, || {
            self.side_tx(|tx| {
                tx.execute(
                    "INSERT INTO cluster_ca (id, cert_pem, key_pem) VALUES (1, $1, $2)
                     ON CONFLICT (id) DO NOTHING",
                    &[&offered.0, &offered.1],
                )?;
                let r =
                    tx.query_one("SELECT cert_pem, key_pem FROM cluster_ca WHERE id = 1", &[])?;
                Ok(Some((r.try_get(0)?, r.try_get(1)?)))
            })
        })
    }

    fn secrets_key(&self, offered: Option<&str>) -> Result<Option<String>, StoreError> {
        lease::fenced(None, || {
            self.side_tx(|tx| {
                if let Some(identity) = offered {
                    tx.execute(
                        "INSERT INTO meta_keys (name, identity, recorded_at) VALUES ($1, $2, $3)
                         ON CONFLICT (name) DO NOTHING",
                        &[&super::SECRETS_KEY_ROW, &identity, &now_rfc3339()],
                    )?;
                }
                let r = tx.query_opt(
                    "SELECT identity FROM meta_keys WHERE name = $1",
                    &[&super::SECRETS_KEY_ROW],
                )?;
                Ok(match r {
                    Some(r) => Some(r.try_get(0)?),
                    None => None,
                })
            })
        })
    }

    fn server_heartbeat(
        &self,
        beat: &super::replicas::ReplicaBeat,
        prune_after: Duration,
    ) -> Result<(), StoreError> {
        use super::replicas::millis;
        lease::fenced(None, || {
            self.side_tx(|tx| {
                tx.execute(
                    "INSERT INTO server_replicas (id, hostname, api, agent, version, started_at_ms,
                        last_seen_ms, beat_every_ms, is_leader, epoch)
                     VALUES ($1, $2, $3, $4, $5, $6, (extract(epoch FROM now()) * 1000)::BIGINT,
                        $7, $8, $9)
                     ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname,
                        api = excluded.api, agent = excluded.agent, version = excluded.version,
                        started_at_ms = excluded.started_at_ms,
                        last_seen_ms = GREATEST(server_replicas.last_seen_ms, excluded.last_seen_ms),
                        beat_every_ms = excluded.beat_every_ms, is_leader = excluded.is_leader,
                        epoch = excluded.epoch",
                    &[
                        &beat.id,
                        &beat.hostname,
                        &beat.api,
                        &beat.agent,
                        &beat.version,
                        &beat.started_at_ms,
                        &millis(beat.beat_every),
                        &beat.leading,
                        &(beat.epoch as i64),
                    ],
                )?;
                tx.execute(
                    "DELETE FROM server_replicas
                     WHERE last_seen_ms < (extract(epoch FROM now()) * 1000)::BIGINT - $1",
                    &[&millis(prune_after)],
                )?;
                Ok(())
            })
        })
    }

    fn server_replicas(&self) -> Result<super::replicas::Replicas, StoreError> {
        self.read(|tx| {
            let rows = tx
                .query(
                    "SELECT id, hostname, api, agent, version, started_at_ms, beat_every_ms,
                        is_leader, epoch, last_seen_ms
                     FROM server_replicas ORDER BY id",
                    &[],
                )?
                .iter()
                .map(|r| {
                    Ok(super::replicas::ReplicaRow {
                        beat: super::replicas::ReplicaBeat {
                            id: r.try_get(0)?,
                            hostname: r.try_get(1)?,
                            api: r.try_get(2)?,
                            agent: r.try_get(3)?,
                            version: r.try_get(4)?,
                            started_at_ms: r.try_get(5)?,
                            beat_every: Duration::from_millis(
                                r.try_get::<_, i64>(6)?.max(0) as u64
                            ),
                            leading: r.try_get(7)?,
                            epoch: r.try_get::<_, i64>(8)?.max(0) as u64,
                        },
                        last_seen_ms: r.try_get(9)?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            let lease = tx.query_one(
                "SELECT holder, epoch,
                    (extract(epoch FROM GREATEST(expires_at, '1970-01-01'::timestamptz)) * 1000)::BIGINT,
                    (extract(epoch FROM now()) * 1000)::BIGINT
                 FROM leader_lease WHERE name = 'controllers'",
                &[],
            )?;
            let record = lease_from_row(&lease)?;
            Ok(super::replicas::Replicas {
                rows,
                now_ms: record.now_ms,
                lease: Some((record.holder, record.epoch, record.expires_at_ms)),
            })
        })
    }

    fn open_console_session(
        &self,
        row: &super::sessions::SessionRow,
        limits: &super::sessions::SessionLimits,
    ) -> Result<(), StoreError> {
        lease::fenced(None, || {
            self.side_tx(|tx| {
                tx.execute(
                    "DELETE FROM console_sessions WHERE expires_ms <= $1 OR last_used_ms <= $2",
                    &[&limits.now_ms, &limits.idle_before()],
                )?;
                let kept: i64 = tx
                    .query_one("SELECT count(*) FROM console_sessions", &[])?
                    .try_get(0)?;
                let over = kept.saturating_add(1) - limits.max_sessions as i64;
                if over > 0 {
                    tx.execute(
                        "DELETE FROM console_sessions WHERE id_hash IN (SELECT id_hash
                            FROM console_sessions ORDER BY last_used_ms, id_hash LIMIT $1)",
                        &[&over],
                    )?;
                }
                tx.execute(
                    "INSERT INTO console_sessions (id_hash, token_id, sealed_token, created_ms,
                        last_used_ms, expires_ms) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        &row.id_hash,
                        &row.token_id,
                        &row.sealed_token,
                        &row.created_ms,
                        &row.last_used_ms,
                        &row.expires_ms,
                    ],
                )?;
                Ok(())
            })
        })
    }

    fn console_session(
        &self,
        id_hash: &str,
    ) -> Result<Option<super::sessions::SessionRow>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT id_hash, token_id, sealed_token, created_ms, last_used_ms, expires_ms
                 FROM console_sessions WHERE id_hash = $1",
                &[&id_hash],
            )?
            .first()
            .map(|r| {
                Ok(super::sessions::SessionRow {
                    id_hash: r.try_get(0)?,
                    token_id: r.try_get(1)?,
                    sealed_token: r.try_get(2)?,
                    created_ms: r.try_get(3)?,
                    last_used_ms: r.try_get(4)?,
                    expires_ms: r.try_get(5)?,
                })
            })
            .transpose()
        })
    }

    fn touch_console_session(&self, id_hash: &str, at_ms: i64) -> Result<bool, StoreError> {
        lease::fenced(None, || {
            self.side_tx(|tx| {
                Ok(tx.execute(
                    "UPDATE console_sessions SET last_used_ms = GREATEST(last_used_ms, $2)
                     WHERE id_hash = $1",
                    &[&id_hash, &at_ms],
                )? > 0)
            })
        })
    }

    fn close_console_session(&self, id_hash: &str) -> Result<bool, StoreError> {
        lease::fenced(None, || {
            self.side_tx(|tx| {
                Ok(tx.execute(
                    "DELETE FROM console_sessions WHERE id_hash = $1",
                    &[&id_hash],
                )? > 0)
            })
        })
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.side_tx(|tx| {
            tx.execute(
                "INSERT INTO tokens (id, hash, name, kind, role, tenant, project, created_at,
                                     expires_at, uses_remaining, revoked)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                &[
                    &t.id,
                    &t.hash,
                    &t.name,
                    &t.kind.as_str(),
                    &t.role,
                    &t.tenant,
                    &t.project,
                    &t.created_at,
                    &t.expires_at,
                    &t.uses_remaining,
                    &t.revoked,
                ],
            )?;
            Ok(())
        })
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read(|tx| {
            tx.query_opt(
                "SELECT id, hash, name, kind, role, tenant, project, created_at, expires_at,
                        uses_remaining, revoked
                 FROM tokens WHERE hash = $1",
                &[&hash],
            )?
            .map(|r| token_from_row(&r))
            .transpose()
        })
    }

    fn consume_join_token(&self, hash: &str, now: i64) -> Result<TokenRecord, StoreError> {
        self.side_tx(|tx| rules::use_join_token(tx, hash, now))
    }

    fn enroll_host(
        &self,
        join_token_hash: &str,
        now: i64,
        host: Resource,
    ) -> Result<StoredObject, StoreError> {
        let created_at = now_rfc3339();
        let (object, _) = self.write_tx(false, |tx, next| {
            let object = rules::enroll_host(tx, join_token_hash, now, &host, next, &created_at)?;
            Ok((object, Effect::Observed))
        })?;
        Ok(object)
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT id, hash, name, kind, role, tenant, project, created_at, expires_at,
                        uses_remaining, revoked
                 FROM tokens ORDER BY created_at, id",
                &[],
            )?
            .iter()
            .map(token_from_row)
            .collect()
        })
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        self.side_tx(|tx| {
            Ok(tx.execute("UPDATE tokens SET revoked = TRUE WHERE id = $1", &[&id])? > 0)
        })
    }

    fn record_heartbeats(&self, beats: &[(&str, i64)]) -> Result<(), StoreError> {
        if beats.is_empty() {
            return Ok(());
        }
        self.side_tx(|tx| {
            for (name, at) in beats {
                tx.execute(
                    "INSERT INTO host_heartbeats (name, last_seen_ms) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE
                        SET last_seen_ms = GREATEST(host_heartbeats.last_seen_ms, excluded.last_seen_ms)",
                    &[name, at],
                )?;
            }
            Ok(())
        })
    }

    fn host_heartbeats(&self) -> Result<HashMap<String, i64>, StoreError> {
        self.read(|tx| {
            tx.query("SELECT name, last_seen_ms FROM host_heartbeats", &[])?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        })
    }

    fn forget_heartbeat(&self, host: &str) -> Result<(), StoreError> {
        self.side_tx(|tx| {
            tx.execute("DELETE FROM host_heartbeats WHERE name = $1", &[&host])?;
            Ok(())
        })
    }

    fn config_revisions(&self, uid: &str) -> Result<Vec<RevisionRecord>, StoreError> {
        self.read(|tx| revisions::revisions_of(tx, uid))
    }

    fn config_revision(
        &self,
        uid: &str,
        revision: u64,
    ) -> Result<Option<RevisionRecord>, StoreError> {
        self.read(|tx| revisions::revision_of(tx, uid, revision))
    }

    fn current_configs(&self) -> Result<HashMap<String, (u64, String)>, StoreError> {
        self.read(|tx| tx.current_configs())
    }

    fn newest_revisions(&self) -> Result<HashMap<String, u64>, StoreError> {
        self.read(|tx| tx.newest_revisions())
    }

    fn revision_contents(
        &self,
        wanted: &[(String, u64)],
    ) -> Result<Vec<revisions::RevisionContent>, StoreError> {
        self.read(|tx| revisions::revision_contents(tx, wanted))
    }

    fn deleted_volumes(&self) -> Result<Vec<DeletedVolume>, StoreError> {
        self.read(|tx| tx.retained_volumes(None))
    }

    fn sealed_values(&self) -> Result<Vec<SealedValue>, StoreError> {
        self.read(|tx| tx.sealed_values())
    }

    fn reseal(
        &self,
        reseal: &mut dyn FnMut(&SealedValue) -> Result<String, StoreError>,
    ) -> Result<usize, StoreError> {
        let (count, _) = self.write_tx(false, |tx, _next| {
            // Revisions keep the values their replicas run with, sealed: those too.
            let (values, held) = revisions::reseal_all(tx, reseal)?;
            tracing::info!(values, held_by_revisions = held, "secret values re-sealed");
            // The index moves, so that the assignment book reads the new envelopes.
            Ok((values, Effect::Desired))
        })?;
        Ok(count)
    }

    fn record_host_volumes(
        &self,
        host: &str,
        listed: &[ReportedVolume],
        now: &str,
    ) -> Result<bool, StoreError> {
        // A list that ends an asked-for removal moves the index (and commits here) ...
        let ((changed, finished), _) = self.write_tx(false, |tx, _next| {
            let (changed, finished) = super::volumes::replace_list(tx, host, listed, now)?;
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
        self.side_tx(|tx| super::volumes::replace_list(tx, host, listed, now))?;
        Ok(true)
    }

    fn host_volumes(&self, host: Option<&str>) -> Result<Vec<HostVolume>, StoreError> {
        self.read(|tx| tx.host_volumes(host))
    }

    fn volume_deletions(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(|tx| tx.requested_volume_deletions())
    }

    fn mark_orphaned_volumes(
        &self,
        marks: &[(String, String, Option<String>)],
    ) -> Result<(), StoreError> {
        if marks.is_empty() {
            return Ok(());
        }
        self.side_tx(|tx| super::volumes::mark_orphaned(tx, marks))
    }

    fn request_volume_deletion(
        &self,
        host: &str,
        name: &str,
        reason: &str,
        now: &str,
    ) -> Result<(Option<HostVolume>, u64), StoreError> {
        self.write_tx(false, |tx, _next| {
            let v = super::volumes::request_deletion(tx, host, name, reason, now)?;
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
        self.side_tx(|tx| tx.drop_host_volumes(host, None))
    }

    fn record_events(&self, events: Vec<Event>) {
        lock(&self.events).push(events);
    }

    fn flush_events(&self) -> Result<usize, StoreError> {
        let folded = lock(&self.events).take();
        if folded.is_empty() {
            return Ok(0);
        }
        let seq = self.side_tx(|tx| {
            // One writer of events at a time, on every server: the sequence row is locked.
            tx.query_one(
                "SELECT value FROM meta WHERE key = 'events_seq' FOR UPDATE",
                &[],
            )?;
            let seq = super::feed::write_events(tx, &folded)?;
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&self.channel, &format!("events {seq}")],
            )?;
            Ok(seq)
        })?;
        self.indexes.advance_events(seq);
        Ok(folded.len())
    }

    fn prune_events(
        &self,
        retention: &crate::events::Retention,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        self.side_tx(|tx| {
            tx.query_one(
                "SELECT value FROM meta WHERE key = 'events_seq' FOR UPDATE",
                &[],
            )?;
            super::feed::prune_events(tx, retention, now_ms)
        })
    }

    fn list_events(&self, filter: &EventFilter) -> Result<(u64, Vec<EventRecord>), StoreError> {
        self.read(|tx| super::feed::list_events(tx, filter))
    }

    fn subscribe_events(&self) -> Option<watch::Receiver<u64>> {
        Some(self.indexes.events.subscribe())
    }

    fn changes_since(
        &self,
        feed: super::Feed,
        after: u64,
        limit: usize,
    ) -> Result<super::ChangesSince, StoreError> {
        self.read(|tx| match feed {
            super::Feed::Objects => super::feed::object_changes_since(tx, after, limit),
            super::Feed::Events => super::feed::event_changes_since(tx, after, limit),
        })
    }

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<Vec<AuditRecord>, StoreError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // On the index row, as every write: the chain has one writer at a time.
        self.side_tx(|tx| {
            tx.query_one("SELECT value FROM meta WHERE key = 'index' FOR UPDATE", &[])?;
            rules::append_audit(tx, entries)
        })
    }

    fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        self.read(|tx| {
            let after = filter
                .after_seq
                .map(|s| i64::try_from(s).unwrap_or(i64::MAX));
            let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
            let sql = if filter.tail {
                "SELECT seq, chain_version, time, principal_id, principal_name, tenant, action,
                        object_kind, object_tenant, object_project, object_name, outcome, status,
                        reason, request_id, source, generation_before, generation_after, prev_hash, hash
                 FROM audit WHERE ($1::TEXT IS NULL OR tenant = $1) AND ($2::TEXT IS NULL OR time >= $2)
                   AND ($3::BIGINT IS NULL OR seq > $3)
                 ORDER BY seq DESC LIMIT $4"
            } else {
                "SELECT seq, chain_version, time, principal_id, principal_name, tenant, action,
                        object_kind, object_tenant, object_project, object_name, outcome, status,
                        reason, request_id, source, generation_before, generation_after, prev_hash, hash
                 FROM audit WHERE ($1::TEXT IS NULL OR tenant = $1) AND ($2::TEXT IS NULL OR time >= $2)
                   AND ($3::BIGINT IS NULL OR seq > $3)
                 ORDER BY seq ASC LIMIT $4"
            };
            let rows = tx.query(sql, &[&filter.tenant, &filter.since, &after, &limit])?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(audit_from_row(row).map_err(|why| {
                    let seq = row.try_get::<_, i64>(0).unwrap_or_default();
                    StoreError::Corrupt(format!("audit record {seq}: {why}"))
                })?);
            }
            if filter.tail {
                out.reverse();
            }
            Ok(out)
        })
    }

    fn verify_audit(&self) -> Result<AuditVerification, StoreError> {
        self.read(|tx| {
            let written: i64 = tx
                .query_one("SELECT value FROM meta WHERE key = 'audit_written'", &[])?
                .get(0);
            let mut verifier = ChainVerifier::new();
            let mut broken = None;
            let rows = tx.query(
                "SELECT seq, chain_version, time, principal_id, principal_name, tenant, action,
                        object_kind, object_tenant, object_project, object_name, outcome, status,
                        reason, request_id, source, generation_before, generation_after, prev_hash, hash
                 FROM audit ORDER BY seq",
                &[],
            )?;
            for row in &rows {
                let pushed = match audit_from_row(row) {
                    Ok(r) => verifier.push(&r),
                    Err(why) => Err(ChainBreak {
                        seq: u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0),
                        what: ChainProblem::Unreadable(why),
                    }),
                };
                if let Err(b) = pushed {
                    broken = Some(b);
                    break;
                }
            }
            if broken.is_none() {
                broken = verifier.finish(u64::try_from(written).unwrap_or(0)).err();
            }
            Ok(AuditVerification {
                records: verifier.records(),
                head: verifier.head().to_string(),
                broken,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{PgSchema, postgres_url};

    fn tenant(name: &str) -> Resource {
        Resource::from_value(serde_json::json!({"apiVersion": "clusterclaw.io/v1",
            "kind": "Tenant", "metadata": {"name": name}}))
        .unwrap()
    }

    #[test]
    fn upgrading_counts_each_kind_written_before() {
        let Some(schema) = PgSchema::new() else {
            return;
        };
        {
            let store = PgStore::open_config(schema.config.clone()).unwrap();
            for name in ["acme", "beta"] {
                store
                    .write(&[(tenant(name), WriteMode::Apply)], false)
                    .unwrap();
            }
        }
        // The database as schema version 7 left it.
        let mut c = schema.config.connect(NoTls).unwrap();
        c.batch_execute(
            "DROP TRIGGER objects_kind_stats ON objects; DROP FUNCTION objects_kind_stats();
             DROP TABLE kind_stats; UPDATE clusterclaw_schema SET version = 7;",
        )
        .unwrap();
        let store = PgStore::open_config(schema.config.clone()).unwrap();
        assert_eq!(store.kind_fingerprint(Kind::Tenant).unwrap(), (2, 2));
        assert_eq!(store.kind_fingerprint(Kind::Host).unwrap(), (0, 0));
        store
            .write(&[(tenant("gamma"), WriteMode::Apply)], false)
            .unwrap();
        assert_eq!(store.kind_fingerprint(Kind::Tenant).unwrap(), (3, 3));
    }

    #[test]
    fn reopening_keeps_data_and_index_and_a_newer_schema_is_refused() {
        let Some(schema) = PgSchema::new() else {
            return;
        };
        {
            let store = PgStore::open_config(schema.config.clone()).unwrap();
            store
                .write(&[(tenant("acme"), WriteMode::Apply)], false)
                .unwrap();
            store
                .write(&[(tenant("beta"), WriteMode::Apply)], false)
                .unwrap();
        }
        let store = PgStore::open_config(schema.config.clone()).unwrap();
        assert_eq!(store.index(), 2);
        assert!(
            store
                .get(&ObjectKey::cluster(Kind::Tenant, "beta"))
                .unwrap()
                .is_some()
        );
        drop(store);
        let mut c = schema.config.connect(NoTls).unwrap();
        c.batch_execute("UPDATE clusterclaw_schema SET version = 99")
            .unwrap();
        let err = PgStore::open_config(schema.config.clone()).unwrap_err();
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
    }

    /// Waits until `rx` reaches `want`, or fails after `limit`; returns how long it took.
    fn wait_for(rx: &mut watch::Receiver<u64>, want: u64, limit: Duration) -> Duration {
        let started = std::time::Instant::now();
        while *rx.borrow_and_update() < want {
            assert!(
                started.elapsed() < limit,
                "the index stayed at {} below {want}",
                *rx.borrow()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        started.elapsed()
    }

    #[test]
    fn every_server_learns_of_every_write_and_catches_up_on_lost_notifications() {
        let Some(schema) = PgSchema::new() else {
            return;
        };
        let a = PgStore::open_config(schema.config.clone()).unwrap();
        let b = PgStore::open_config(schema.config.clone()).unwrap();
        let mut index = b.subscribe();
        let mut desired = b.subscribe_desired();
        // B's listener is connected once it has read the stored indexes; a write through A
        // then reaches it by notification.
        std::thread::sleep(Duration::from_millis(200));
        let mut took = Vec::new();
        for i in 0..20 {
            let w = a
                .write(&[(tenant(&format!("t{i}")), WriteMode::Apply)], false)
                .unwrap();
            took.push(wait_for(&mut index, w.index, Duration::from_secs(10)));
            wait_for(&mut desired, w.index, Duration::from_secs(10));
        }
        took.sort();
        eprintln!(
            "a write through one server reached another in {:?} (median of {}), {:?} at most",
            took[took.len() / 2],
            took.len(),
            took[took.len() - 1]
        );
        // Well under the catch-up period: the notification, not the poll, brought them.
        assert!(
            took[took.len() / 2] < CATCH_UP_EVERY / 2,
            "median {:?}",
            took[took.len() / 2]
        );
        assert_eq!((b.index(), b.desired_index()), (20, 20));
        // An observed-state write moves the index, not the desired index.
        let host = Resource::from_value(serde_json::json!({"apiVersion": "clusterclaw.io/v1",
            "kind": "Host", "metadata": {"name": "h1"}, "spec": {}}))
        .unwrap();
        let w = a.write(&[(host, WriteMode::Apply)], false).unwrap();
        wait_for(&mut index, w.index, Duration::from_secs(10));
        assert_eq!(b.desired_index(), 20);
        // A change that notified no one (as when B's connection was down) is caught up by
        // the periodic read.
        let mut c = schema.config.connect(NoTls).unwrap();
        c.batch_execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'index';
             UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'index') WHERE key = 'desired';",
        )
        .unwrap();
        wait_for(&mut index, w.index + 1, CATCH_UP_EVERY * 10);
        wait_for(&mut desired, w.index + 1, CATCH_UP_EVERY * 10);
    }

    #[test]
    fn the_audit_log_refuses_changes_in_the_database_itself() {
        let Some(schema) = PgSchema::new() else {
            return;
        };
        let store = PgStore::open_config(schema.config.clone()).unwrap();
        let entry = crate::audit::AuditEntry::now(
            crate::audit::AuditPrincipal::new("u1", "tester"),
            "login",
            crate::audit::AuditResult::ok(200),
        );
        store.append_audit(&[entry]).unwrap();
        let mut c = schema.config.connect(NoTls).unwrap();
        for sql in ["UPDATE audit SET action = 'logout'", "DELETE FROM audit"] {
            let e = c.batch_execute(sql).unwrap_err();
            assert!(
                e.as_db_error().unwrap().message().contains("append-only"),
                "{e}"
            );
        }
        assert_eq!(store.verify_audit().unwrap().records, 1);
    }

    #[test]
    fn tls_with_a_password_file_and_a_private_ca() {
        let Some(schema) = PgSchema::new() else {
            return;
        };
        let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/postgres-ca.pem");
        if !ca.exists() {
            eprintln!(
                "skipped: {} is missing (run tests/postgres-setup.sh)",
                ca.display()
            );
            return;
        }
        let url = postgres_url().unwrap();
        let config: Config = url.parse().unwrap();
        let password = String::from_utf8(config.get_password().unwrap().to_vec()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        let host = match &config.get_hosts()[0] {
            postgres::config::Host::Tcp(h) => h.clone(),
            other => panic!("{other:?}"),
        };
        let base = format!(
            "postgres://{}@{host}:{}/{}?options=-c%20search_path%3D{}",
            config.get_user().unwrap(),
            config.get_ports()[0],
            config.get_dbname().unwrap(),
            schema.name,
        );
        let target = |url: String, ca_file: Option<std::path::PathBuf>| PgTarget {
            url,
            password_file: Some(password_file.clone()),
            ca_file,
        };
        let store =
            PgStore::open(&target(format!("{base}&sslmode=require"), Some(ca.clone()))).unwrap();
        store
            .write(&[(tenant("acme"), WriteMode::Apply)], false)
            .unwrap();
        let ssl: bool = store
            .with(|c| {
                Ok(c.client
                    .query_one(
                        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                        &[],
                    )?
                    .get(0))
            })
            .unwrap();
        assert!(ssl, "the connection is encrypted");
        // A server whose certificate no trusted CA signed is refused.
        let other_ca = dir.path().join("other.pem");
        let other = rcgen::generate_simple_self_signed(vec!["other".to_string()]).unwrap();
        std::fs::write(&other_ca, other.cert.pem()).unwrap();
        let err =
            PgStore::open(&target(format!("{base}&sslmode=require"), Some(other_ca))).unwrap_err();
        assert!(err.to_string().contains("cannot connect"), "{err}");
        // A wrong password is refused, and the error shows no password.
        std::fs::write(&password_file, "wrong\n").unwrap();
        let err = PgStore::open(&target(format!("{base}&sslmode=require"), Some(ca))).unwrap_err();
        assert!(err.to_string().contains("password"), "{err}");
        assert!(!err.to_string().contains("wrong"), "{err}");
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redact("postgres://cc:s3cret@db.example.com:5432/cc"),
            "postgres://cc:***@db.example.com:5432/cc"
        );
        assert_eq!(redact("postgres://cc@db/cc"), "postgres://cc@db/cc");
        let t = PgTarget {
            url: "postgres://cc:s3cret@db/cc".into(),
            password_file: None,
            ca_file: None,
        };
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
