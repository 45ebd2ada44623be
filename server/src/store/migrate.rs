//! `clusterclaw store migrate`: copies the store of a single-machine cluster (the SQLite
//! database in its data directory) into an empty PostgreSQL database, in one transaction, and
//! checks the copy.
//!
//! Every table of the SQLite store is copied row for row, with the columns it has, into the
//! table of the same name that the PostgreSQL migrations make (so a table added to both
//! engines is copied without a change here, and one PostgreSQL lacks is refused, never left
//! behind). Two rows differ between the engines and are carried by rule: the `meta` counters
//! (the global index, the events' sequence, what the logs reach back to; the desired index
//! starts at the index) and the leader lease (its epoch is kept, nobody holds it). The data
//! directory's certificate authority is stored for the servers to share (the agents trust it,
//! and their cluster id is its hash), and the identity of its secrets key is recorded.
//!
//! Before the commit, and again from a new connection after it, every table is compared with
//! its source: row count and a digest of the rows' contents. After the commit the audit chain
//! is verified through the PostgreSQL store, and its head must be the source's.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use postgres::GenericClient;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use sha2::{Digest, Sha256};

use super::postgres::{PgStore, PgTarget, redact};
use super::{SECRETS_KEY_ROW, Store, StoreError};
use crate::secrets::Keyring;

/// The counters table: upserted key by key (the PostgreSQL migrations write some of its rows).
const META: &str = "meta";
/// The leader lease: its columns differ between the engines; only the epoch is carried.
const LEASE: &str = "leader_lease";
/// The tables of the engine itself, never copied.
const INTERNAL_PREFIX: &str = "sqlite_";
/// Each kind's count, highest version and deletions: kept by the target's own trigger as the objects are
/// copied, so never copied (a copied row would be counted twice).
const KIND_STATS: &str = "kind_stats";
/// How many target tables an error about a non-empty target names.
const TABLES_SHOWN: usize = 5;

/// What to copy, and where.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// The data directory of the single-machine server (`--data-dir`).
    pub data_dir: PathBuf,
    /// Its PKI directory; `<data_dir>/pki` when `None`.
    pub pki_dir: Option<PathBuf>,
    pub target: PgTarget,
}

/// Why nothing (or, for [`MigrateError::Mismatch`] after the commit, a copy that must not be
/// used) was written.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The data directory is missing, or is not a server's.
    #[error("{0}")]
    DataDir(String),
    /// A server still runs on the data directory, the target is not empty, or the source
    /// cannot be copied as it is.
    #[error("{0}")]
    Refused(String),
    /// The target cannot be reached.
    #[error("{0}")]
    Unreachable(String),
    /// The copy differs from its source.
    #[error("{0}")]
    Mismatch(String),
}

/// One line of the verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub what: String,
    pub source: String,
    pub target: String,
    pub ok: bool,
}

/// What the verification compared.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The target, without its password.
    pub target: String,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// A table for people: what, source, target, ok or MISMATCH.
    pub fn render(&self) -> String {
        let w0 = self.checks.iter().map(|c| c.what.len()).max().unwrap_or(0);
        let w1 = self
            .checks
            .iter()
            .map(|c| c.source.len())
            .max()
            .unwrap_or(0);
        let w2 = self
            .checks
            .iter()
            .map(|c| c.target.len())
            .max()
            .unwrap_or(0);
        let mut out = format!(
            "{:w0$}  {:w1$}  {:w2$}  RESULT\n",
            "CHECKED", "SOURCE", "TARGET"
        );
        for c in &self.checks {
            let _ = writeln!(
                out,
                "{:w0$}  {:w1$}  {:w2$}  {}",
                c.what,
                c.source,
                c.target,
                if c.ok { "ok" } else { "MISMATCH" }
            );
        }
        out
    }

    fn push(&mut self, what: impl Into<String>, source: String, target: String) {
        let ok = source == target;
        self.checks.push(Check {
            what: what.into(),
            source,
            target,
            ok,
        });
    }
}

/// A column type both engines can carry, named as the target declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ColumnType {
    Int8,
    Int4,
    Bool,
    Text,
    Float8,
    Bytea,
}

impl ColumnType {
    /// The type of a column as `information_schema.columns.data_type` names it.
    fn of(data_type: &str) -> Option<ColumnType> {
        Some(match data_type {
            "bigint" => ColumnType::Int8,
            "integer" => ColumnType::Int4,
            "boolean" => ColumnType::Bool,
            "text" | "character varying" => ColumnType::Text,
            "double precision" => ColumnType::Float8,
            "bytea" => ColumnType::Bytea,
            _ => return None,
        })
    }

    fn pg(self) -> Type {
        match self {
            ColumnType::Int8 => Type::INT8,
            ColumnType::Int4 => Type::INT4,
            ColumnType::Bool => Type::BOOL,
            ColumnType::Text => Type::TEXT,
            ColumnType::Float8 => Type::FLOAT8,
            ColumnType::Bytea => Type::BYTEA,
        }
    }
}

/// One value as both engines hold it, for the copy and the digests.
#[derive(Clone, Debug, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Bool(bool),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Cell {
    /// A SQLite value as the target column holds it.
    fn from_sqlite(v: SqlValue, ty: ColumnType) -> Result<Cell, String> {
        Ok(match (v, ty) {
            (SqlValue::Null, _) => Cell::Null,
            (SqlValue::Integer(i), ColumnType::Int8) => Cell::Int(i),
            (SqlValue::Integer(i), ColumnType::Int4) => {
                i32::try_from(i).map_err(|_| format!("{i} does not fit a 32-bit integer"))?;
                Cell::Int(i)
            }
            (SqlValue::Integer(i), ColumnType::Bool) => match i {
                0 => Cell::Bool(false),
                1 => Cell::Bool(true),
                other => return Err(format!("{other} is not a truth value (0 or 1)")),
            },
            (SqlValue::Integer(i), ColumnType::Float8) => Cell::Real(i as f64),
            (SqlValue::Real(f), ColumnType::Float8) => Cell::Real(f),
            (SqlValue::Text(s), ColumnType::Text) => {
                if s.contains('\0') {
                    return Err(
                        "the text holds a NUL character, which PostgreSQL text cannot".into(),
                    );
                }
                Cell::Text(s)
            }
            (SqlValue::Blob(b), ColumnType::Bytea) => Cell::Blob(b),
            (v, ty) => {
                return Err(format!(
                    "a {} value where the target column is {ty:?}",
                    match v {
                        SqlValue::Integer(_) => "integer",
                        SqlValue::Real(_) => "real",
                        SqlValue::Text(_) => "text",
                        SqlValue::Blob(_) => "blob",
                        SqlValue::Null => "null",
                    }
                ));
            }
        })
    }

    /// Column `i` of a PostgreSQL row of type `ty`.
    fn from_pg(row: &postgres::Row, i: usize, ty: ColumnType) -> Result<Cell, postgres::Error> {
        Ok(match ty {
            ColumnType::Int8 => row
                .try_get::<_, Option<i64>>(i)?
                .map_or(Cell::Null, Cell::Int),
            ColumnType::Int4 => row
                .try_get::<_, Option<i32>>(i)?
                .map_or(Cell::Null, |v| Cell::Int(v.into())),
            ColumnType::Bool => row
                .try_get::<_, Option<bool>>(i)?
                .map_or(Cell::Null, Cell::Bool),
            ColumnType::Text => row
                .try_get::<_, Option<String>>(i)?
                .map_or(Cell::Null, Cell::Text),
            ColumnType::Float8 => row
                .try_get::<_, Option<f64>>(i)?
                .map_or(Cell::Null, Cell::Real),
            ColumnType::Bytea => row
                .try_get::<_, Option<Vec<u8>>>(i)?
                .map_or(Cell::Null, Cell::Blob),
        })
    }

    /// The value to send for a column of type `ty`.
    fn to_pg(&self, ty: ColumnType) -> Box<dyn ToSql + Sync> {
        match (self, ty) {
            (Cell::Int(i), ColumnType::Int4) => Box::new(*i as i32),
            (Cell::Int(i), _) => Box::new(*i),
            (Cell::Bool(b), _) => Box::new(*b),
            (Cell::Real(f), _) => Box::new(*f),
            (Cell::Text(s), _) => Box::new(s.clone()),
            (Cell::Blob(b), _) => Box::new(b.clone()),
            (Cell::Null, ColumnType::Int8) => Box::new(None::<i64>),
            (Cell::Null, ColumnType::Int4) => Box::new(None::<i32>),
            (Cell::Null, ColumnType::Bool) => Box::new(None::<bool>),
            (Cell::Null, ColumnType::Text) => Box::new(None::<String>),
            (Cell::Null, ColumnType::Float8) => Box::new(None::<f64>),
            (Cell::Null, ColumnType::Bytea) => Box::new(None::<Vec<u8>>),
        }
    }

    fn hash_into(&self, h: &mut Sha256) {
        match self {
            Cell::Null => h.update([0]),
            Cell::Int(i) => {
                h.update([1]);
                h.update(i.to_be_bytes());
            }
            Cell::Bool(b) => h.update([2, u8::from(*b)]),
            Cell::Real(f) => {
                h.update([3]);
                h.update(f.to_bits().to_be_bytes());
            }
            Cell::Text(s) => {
                h.update([4]);
                h.update((s.len() as u64).to_be_bytes());
                h.update(s.as_bytes());
            }
            Cell::Blob(b) => {
                h.update([5]);
                h.update((b.len() as u64).to_be_bytes());
                h.update(b);
            }
        }
    }
}

/// The rows of a table, independent of their order: how many, and a digest of the sorted
/// digests of each row.
#[derive(Default)]
struct TableDigest {
    rows: Vec<[u8; 32]>,
}

impl TableDigest {
    fn add(&mut self, row: &[Cell]) {
        let mut h = Sha256::new();
        for c in row {
            c.hash_into(&mut h);
        }
        self.rows.push(h.finalize().into());
    }

    /// `<rows> rows, sha256 <first 16 hex>`.
    fn shown(mut self) -> String {
        self.rows.sort_unstable();
        let mut h = Sha256::new();
        for r in &self.rows {
            h.update(r);
        }
        let hex = crate::util::hex(&h.finalize());
        format!("{} rows, sha256 {}", self.rows.len(), &hex[..16])
    }
}

/// A table of the source with the target type of each of its columns.
struct Table {
    name: String,
    columns: Vec<(String, ColumnType)>,
}

impl Table {
    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|(c, _)| quote(c))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// An identifier, quoted for either engine.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn source_error(db: &Path) -> impl Fn(rusqlite::Error) -> MigrateError + '_ {
    move |e| MigrateError::Refused(format!("reading {}: {e}", db.display()))
}

fn target_error(shown: &str) -> impl Fn(postgres::Error) -> MigrateError + '_ {
    move |e| MigrateError::Refused(format!("writing {shown}: {}", StoreError::from(e)))
}

/// Copies the store of `options.data_dir` into the empty database `options.target` and
/// verifies the copy; see the module's documentation. `Ok` holds what was compared (every
/// check passed); nothing is written unless every check before the commit passed.
pub fn migrate(options: &MigrateOptions) -> Result<Report, MigrateError> {
    let dir = &options.data_dir;
    match fs::metadata(dir) {
        Err(e) => {
            return Err(MigrateError::DataDir(format!(
                "the data directory {}: {e}",
                dir.display()
            )));
        }
        Ok(m) if !m.is_dir() => {
            return Err(MigrateError::DataDir(format!(
                "{} is not a directory; give the --data-dir of the server to migrate",
                dir.display()
            )));
        }
        Ok(_) => {}
    }
    let db = dir.join(crate::server::DB_FILE);
    if !db.is_file() {
        return Err(MigrateError::DataDir(format!(
            "{} holds no {}: it is not the data directory of a clusterclaw server on SQLite",
            dir.display(),
            crate::server::DB_FILE
        )));
    }
    // Held until the end: no server starts on the data directory while it is copied.
    let _lock = match crate::server::lock_idle_data_dir(dir)
        .map_err(|e| MigrateError::Refused(format!("{e:#}")))?
    {
        Ok(file) => file,
        Err(who) => {
            return Err(MigrateError::Refused(format!(
                "a clusterclaw server{who} still runs on the data directory {}; stop it first, so that the copy is the store as it stays",
                dir.display()
            )));
        }
    };
    let src = open_source(&db)?;
    let secrets = check_secrets(dir, &src, &db)?;
    let ca = read_ca(&options.pki_dir.clone().unwrap_or_else(|| dir.join("pki")))?;
    let source_audit = crate::audit::verify_audit_in(&src).map_err(|e| {
        MigrateError::Refused(format!("verifying the audit log of {}: {e}", db.display()))
    })?;
    if let Some(problem) = source_audit.problem() {
        return Err(MigrateError::Refused(format!(
            "the audit log of {} is broken ({problem}); it would not verify on the target either (see `clusterclaw audit verify --db`)",
            db.display()
        )));
    }

    let shown = redact(&options.target.url);
    let mut client = options
        .target
        .connect()
        .map_err(|e| MigrateError::Unreachable(e.to_string()))?;
    let terr = target_error(&shown);
    let serr = source_error(&db);
    let mut tx = client.transaction().map_err(&terr)?;
    // Servers starting on the target, and other migrations, wait for this one to end.
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&super::postgres::MIGRATION_LOCK],
    )
    .map_err(&terr)?;
    refuse_non_empty(&mut tx, &shown)?;
    super::postgres::migrate_in(&mut tx, &shown)
        .map_err(|e| MigrateError::Refused(format!("{shown}: {e}")))?;
    let tables = source_tables(&src, &mut tx, &db)?;
    for table in &tables {
        copy_table(&src, &mut tx, table, &db, &shown)?;
    }
    let meta = copy_meta(&src, &mut tx, &db, &shown)?;
    let epoch = copy_lease(&src, &mut tx, &db, &shown)?;
    tx.execute(
        "INSERT INTO cluster_ca (id, cert_pem, key_pem) VALUES (1, $1, $2)",
        &[&ca.0, &ca.1],
    )
    .map_err(&terr)?;
    if let Some((identity, _)) = &secrets {
        tx.execute(
            "INSERT INTO meta_keys (name, identity, recorded_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO NOTHING",
            &[&SECRETS_KEY_ROW, identity, &crate::util::now_rfc3339()],
        )
        .map_err(&terr)?;
    }

    // Compared before the commit: a copy that differs is never committed.
    let mut report = Report {
        target: shown.clone(),
        checks: Vec::new(),
    };
    let source_digests = tables
        .iter()
        .map(|t| Ok((t.name.clone(), digest_sqlite(&src, t).map_err(&serr)?)))
        .collect::<Result<BTreeMap<_, _>, MigrateError>>()?;
    compare(
        &mut report,
        &tables,
        &source_digests,
        &mut tx,
        &meta,
        epoch,
        &ca,
        &secrets,
    )
    .map_err(&terr)?;
    if !report.ok() {
        return Err(MigrateError::Mismatch(format!(
            "the copy differs from its source, so nothing was committed:\n{}",
            report.render()
        )));
    }
    tx.commit().map_err(&terr)?;

    // Again after the commit, from a new connection and through the store itself.
    let after = |e: String| {
        MigrateError::Mismatch(format!(
            "the copy was committed, but checking it failed: {e}; drop what the migration wrote in {shown} before using it or migrating again"
        ))
    };
    let mut report = Report {
        target: shown.clone(),
        checks: Vec::new(),
    };
    let mut check_client = options.target.connect().map_err(|e| after(e.to_string()))?;
    let mut read = check_client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(|e| after(StoreError::from(e).to_string()))?;
    compare(
        &mut report,
        &tables,
        &source_digests,
        &mut read,
        &meta,
        epoch,
        &ca,
        &secrets,
    )
    .map_err(|e| after(StoreError::from(e).to_string()))?;
    read.commit()
        .map_err(|e| after(StoreError::from(e).to_string()))?;
    let store = PgStore::open(&options.target).map_err(|e| after(e.to_string()))?;
    let index = meta.get("index").copied().unwrap_or(0);
    report.push("store index", index.to_string(), store.index().to_string());
    let target_audit = store.verify_audit().map_err(|e| after(e.to_string()))?;
    report.push(
        "audit chain",
        format!(
            "{} records verified, head {}",
            source_audit.records,
            short(&source_audit.head)
        ),
        match target_audit.problem() {
            Some(problem) => format!("broken: {problem}"),
            None => format!(
                "{} records verified, head {}",
                target_audit.records,
                short(&target_audit.head)
            ),
        },
    );
    if let Some((_, opened)) = &secrets {
        report.checks.push(Check {
            what: "sealed secret values".into(),
            source: format!(
                "{opened} open with {}",
                dir.join(crate::server::SECRETS_KEY_FILE).display()
            ),
            target: "the same rows (table secret_values)".into(),
            ok: true,
        });
    }
    if !report.ok() {
        return Err(MigrateError::Mismatch(format!(
            "the copy was committed but differs from its source; drop what the migration wrote in {shown} before using it or migrating again:\n{}",
            report.render()
        )));
    }
    Ok(report)
}

/// The first 16 characters of a hash.
fn short(hash: &str) -> &str {
    hash.get(..16).unwrap_or(hash)
}

/// The source database, for reading only; its schema must be the one this build writes.
fn open_source(db: &Path) -> Result<Connection, MigrateError> {
    let not_ours = |e: rusqlite::Error| {
        MigrateError::DataDir(format!(
            "{} is not a clusterclaw database: {e}",
            db.display()
        ))
    };
    let src = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(not_ours)?;
    src.execute_batch("PRAGMA query_only = ON;")
        .map_err(not_ours)?;
    let version: i64 = src
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(not_ours)?;
    let supported = super::sqlite::SCHEMA_VERSION;
    if version > supported {
        return Err(MigrateError::Refused(format!(
            "{} has schema version {version}, newer than this clusterclaw supports ({supported}); migrate with the clusterclaw that wrote it",
            db.display()
        )));
    }
    if version < supported {
        return Err(MigrateError::Refused(format!(
            "{} has schema version {version}, older than this clusterclaw writes ({supported}); start this version's `clusterclaw server` on the data directory once (it brings the schema up to date), stop it, then migrate",
            db.display()
        )));
    }
    Ok(src)
}

/// The secrets key of the data directory: its identity and how many sealed values it opens
/// (`None`: there is no key file and no sealed value). Refuses a key that is not the one
/// recorded, a missing key when values are sealed, and any value that does not open.
fn check_secrets(
    dir: &Path,
    src: &Connection,
    db: &Path,
) -> Result<Option<(String, usize)>, MigrateError> {
    let serr = source_error(db);
    let path = dir.join(crate::server::SECRETS_KEY_FILE);
    let keyring = Keyring::load(&path)
        .map_err(|e| MigrateError::Refused(format!("the secrets key file: {e}")))?;
    let recorded: Option<String> = src
        .query_row(
            "SELECT identity FROM meta_keys WHERE name = ?1",
            [SECRETS_KEY_ROW],
            |r| r.get(0),
        )
        .optional()
        .map_err(&serr)?;
    let mut stmt = src
        .prepare("SELECT tenant, project, name, key, sealed FROM secret_values")
        .map_err(&serr)?;
    let sealed = stmt
        .query_map([], |r| {
            Ok(super::SealedValue {
                tenant: r.get(0)?,
                project: r.get(1)?,
                name: r.get(2)?,
                key: r.get(3)?,
                sealed: r.get(4)?,
            })
        })
        .map_err(&serr)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(&serr)?;
    let Some(keyring) = keyring else {
        if let Some(recorded) = recorded {
            return Err(MigrateError::Refused(format!(
                "the secrets key file {} is missing, but the store's secret values are sealed with the key file whose identity is {recorded}; restore it from a backup first",
                path.display()
            )));
        }
        if !sealed.is_empty() {
            return Err(MigrateError::Refused(format!(
                "the secrets key file {} is missing, but the store holds {} sealed secret values; restore it from a backup first",
                path.display(),
                sealed.len()
            )));
        }
        return Ok(None);
    };
    let identity = keyring.identity();
    if let Some(recorded) = recorded
        && recorded != identity
    {
        return Err(MigrateError::Refused(format!(
            "the secrets key file {} (identity {identity}) is not the one the store's secret values are sealed with (identity {recorded})",
            path.display()
        )));
    }
    for v in &sealed {
        keyring.open(&v.aad(), &v.sealed).map_err(|e| {
            MigrateError::Refused(format!(
                "the value of key {} of secret {}/{}/{} does not open with {}: {e}",
                v.key,
                v.tenant,
                v.project,
                v.name,
                path.display()
            ))
        })?;
    }
    Ok(Some((identity, sealed.len())))
}

/// The PEM certificate and key of the certificate authority in `pki`.
fn read_ca(pki: &Path) -> Result<(String, String), MigrateError> {
    let read = |name: &str| {
        let path = pki.join(name);
        fs::read_to_string(&path).map_err(|e| {
            MigrateError::Refused(format!(
                "cannot read the certificate authority's {}: {e}; the agents trust this CA, so the servers on PostgreSQL need it (give --pki-dir when the server ran with one)",
                path.display()
            ))
        })
    };
    Ok((
        read(crate::pki::CA_CERT_FILE)?,
        read(crate::pki::CA_KEY_FILE)?,
    ))
}

/// Refuses a target whose schema holds any table (or that has no schema to write to).
fn refuse_non_empty(tx: &mut postgres::Transaction<'_>, shown: &str) -> Result<(), MigrateError> {
    let terr = target_error(shown);
    let schema: Option<String> = tx
        .query_one("SELECT current_schema()", &[])
        .and_then(|r| r.try_get(0))
        .map_err(&terr)?;
    let Some(schema) = schema else {
        return Err(MigrateError::Refused(format!(
            "{shown} has no schema to write to (its search_path names none that exists); create it first"
        )));
    };
    let tables: Vec<String> = tx
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename",
            &[],
        )
        .map_err(&terr)?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(&terr)?;
    if tables.is_empty() {
        return Ok(());
    }
    let mut named = tables
        .iter()
        .take(TABLES_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if tables.len() > TABLES_SHOWN {
        named.push_str(", ...");
    }
    Err(MigrateError::Refused(format!(
        "{shown} is not empty: its schema {schema} holds {} tables ({named}); migrate into an empty database or schema, nothing was written",
        tables.len()
    )))
}

/// The source's tables copied row for row, each column with its type in the target.
fn source_tables(
    src: &Connection,
    tx: &mut postgres::Transaction<'_>,
    db: &Path,
) -> Result<Vec<Table>, MigrateError> {
    let serr = source_error(db);
    let names: Vec<String> = src
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .and_then(|mut s| {
            s.query_map([], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()
        })
        .map_err(&serr)?;
    let mut tables = Vec::new();
    for name in names {
        if name.starts_with(INTERNAL_PREFIX) || name == META || name == LEASE || name == KIND_STATS
        {
            continue;
        }
        let columns: Vec<String> = src
            .prepare(&format!(
                "SELECT name FROM pragma_table_info({})",
                sql_text(&name)
            ))
            .and_then(|mut s| {
                s.query_map([], |r| r.get(0))?
                    .collect::<Result<Vec<String>, _>>()
            })
            .map_err(&serr)?;
        let target: BTreeMap<String, String> = tx
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1",
                &[&name],
            )
            .map_err(|e| MigrateError::Refused(StoreError::from(e).to_string()))?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, postgres::Error>>()
            .map_err(|e| MigrateError::Refused(StoreError::from(e).to_string()))?;
        if target.is_empty() {
            return Err(MigrateError::Refused(format!(
                "the table {name} of the SQLite store has no counterpart in the PostgreSQL store of this clusterclaw; nothing was written"
            )));
        }
        let mut typed = Vec::new();
        for column in columns {
            let Some(data_type) = target.get(&column) else {
                return Err(MigrateError::Refused(format!(
                    "the column {name}.{column} of the SQLite store has no counterpart in the PostgreSQL store of this clusterclaw; nothing was written"
                )));
            };
            let Some(ty) = ColumnType::of(data_type) else {
                return Err(MigrateError::Refused(format!(
                    "the column {name}.{column} is {data_type} in PostgreSQL, which a copy cannot fill; nothing was written"
                )));
            };
            typed.push((column, ty));
        }
        tables.push(Table {
            name,
            columns: typed,
        });
    }
    Ok(tables)
}

/// A string literal for SQLite.
fn sql_text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Copies every row of `table` (binary COPY), then moves the table's serial counters past
/// the copied values.
fn copy_table(
    src: &Connection,
    tx: &mut postgres::Transaction<'_>,
    table: &Table,
    db: &Path,
    shown: &str,
) -> Result<(), MigrateError> {
    let serr = source_error(db);
    let terr = target_error(shown);
    let types: Vec<Type> = table.columns.iter().map(|(_, t)| t.pg()).collect();
    let columns = table.column_list();
    let mut stmt = src
        .prepare(&format!("SELECT {columns} FROM {}", quote(&table.name)))
        .map_err(&serr)?;
    let mut rows = stmt.query([]).map_err(&serr)?;
    let writer = tx
        .copy_in(
            format!(
                "COPY {} ({columns}) FROM STDIN (FORMAT binary)",
                quote(&table.name)
            )
            .as_str(),
        )
        .map_err(&terr)?;
    let mut writer = BinaryCopyInWriter::new(writer, &types);
    let mut n = 0u64;
    while let Some(row) = rows.next().map_err(&serr)? {
        n += 1;
        let mut values: Vec<Box<dyn ToSql + Sync>> = Vec::with_capacity(types.len());
        for (i, (column, ty)) in table.columns.iter().enumerate() {
            let v: SqlValue = row.get(i).map_err(&serr)?;
            let cell = Cell::from_sqlite(v, *ty).map_err(|why| {
                MigrateError::Refused(format!(
                    "{}: row {n} of {}, column {column}: {why}; nothing was written",
                    db.display(),
                    table.name
                ))
            })?;
            values.push(cell.to_pg(*ty));
        }
        let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|b| b.as_ref()).collect();
        writer.write(&refs).map_err(&terr)?;
    }
    writer.finish().map_err(&terr)?;
    let serials: Vec<String> = tx
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1
               AND column_default LIKE 'nextval(%'",
            &[&table.name],
        )
        .map_err(&terr)?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(&terr)?;
    for column in serials {
        tx.execute(
            format!(
                "SELECT setval(pg_get_serial_sequence($1, $2),
                               COALESCE((SELECT MAX({}) FROM {}), 0) + 1, false)",
                quote(&column),
                quote(&table.name)
            )
            .as_str(),
            &[&quote(&table.name), &column],
        )
        .map_err(&terr)?;
    }
    Ok(())
}

/// Sets every counter of the source's `meta` in the target (the desired index starts at the
/// index: every host asks again); answers the source's counters.
fn copy_meta(
    src: &Connection,
    tx: &mut postgres::Transaction<'_>,
    db: &Path,
    shown: &str,
) -> Result<BTreeMap<String, i64>, MigrateError> {
    let serr = source_error(db);
    let terr = target_error(shown);
    let meta: BTreeMap<String, i64> = src
        .prepare("SELECT key, value FROM meta")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()
        })
        .map_err(&serr)?;
    for (key, value) in &meta {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[key, value],
        )
        .map_err(&terr)?;
    }
    tx.execute(
        "UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'index') WHERE key = 'desired'",
        &[],
    )
    .map_err(&terr)?;
    Ok(meta)
}

/// Carries the lease's epoch (nobody holds the lease: the first server takes it at the next
/// epoch, so no epoch is ever used twice); answers it.
fn copy_lease(
    src: &Connection,
    tx: &mut postgres::Transaction<'_>,
    db: &Path,
    shown: &str,
) -> Result<i64, MigrateError> {
    let epoch: i64 = src
        .query_row(
            "SELECT epoch FROM leader_lease WHERE name = 'controllers'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(source_error(db))?
        .unwrap_or(0);
    tx.execute(
        "UPDATE leader_lease SET epoch = $1, holder = '', expires_at = '-infinity' WHERE name = 'controllers'",
        &[&epoch],
    )
    .map_err(target_error(shown))?;
    Ok(epoch)
}

fn digest_sqlite(src: &Connection, table: &Table) -> Result<String, rusqlite::Error> {
    let mut stmt = src.prepare(&format!(
        "SELECT {} FROM {}",
        table.column_list(),
        quote(&table.name)
    ))?;
    let mut rows = stmt.query([])?;
    let mut digest = TableDigest::default();
    let mut cells = Vec::with_capacity(table.columns.len());
    while let Some(row) = rows.next()? {
        cells.clear();
        for (i, (_, ty)) in table.columns.iter().enumerate() {
            let v: SqlValue = row.get(i)?;
            // A value that cannot be carried was refused by the copy already.
            cells.push(Cell::from_sqlite(v, *ty).unwrap_or(Cell::Null));
        }
        digest.add(&cells);
    }
    Ok(digest.shown())
}

fn digest_pg(client: &mut impl GenericClient, table: &Table) -> Result<String, postgres::Error> {
    use postgres::fallible_iterator::FallibleIterator;
    let sql = format!("SELECT {} FROM {}", table.column_list(), quote(&table.name));
    let mut rows = client.query_raw(sql.as_str(), std::iter::empty::<&(dyn ToSql + Sync)>())?;
    let mut digest = TableDigest::default();
    let mut cells = Vec::with_capacity(table.columns.len());
    while let Some(row) = rows.next()? {
        cells.clear();
        for (i, (_, ty)) in table.columns.iter().enumerate() {
            cells.push(Cell::from_pg(&row, i, *ty)?);
        }
        digest.add(&cells);
    }
    Ok(digest.shown())
}

/// Compares the target (read through `client`) with the source: every copied table, the
/// counters, the lease epoch, the certificate authority and the secrets key's identity.
#[allow(clippy::too_many_arguments)]
fn compare(
    report: &mut Report,
    tables: &[Table],
    source: &BTreeMap<String, String>,
    client: &mut impl GenericClient,
    meta: &BTreeMap<String, i64>,
    epoch: i64,
    ca: &(String, String),
    secrets: &Option<(String, usize)>,
) -> Result<(), postgres::Error> {
    for table in tables {
        let target = digest_pg(client, table)?;
        report.push(
            format!("table {}", table.name),
            source.get(&table.name).cloned().unwrap_or_default(),
            target,
        );
    }
    for (key, value) in meta {
        let target: Option<i64> = client
            .query_opt("SELECT value FROM meta WHERE key = $1", &[key])?
            .map(|r| r.try_get(0))
            .transpose()?;
        report.push(
            format!("counter {key}"),
            value.to_string(),
            target.map_or_else(|| "missing".into(), |v| v.to_string()),
        );
    }
    let target_epoch: i64 = client
        .query_one(
            "SELECT epoch FROM leader_lease WHERE name = 'controllers'",
            &[],
        )?
        .try_get(0)?;
    report.push(
        "leader lease epoch",
        epoch.to_string(),
        target_epoch.to_string(),
    );
    let stored: Option<(String, String)> = client
        .query_opt("SELECT cert_pem, key_pem FROM cluster_ca WHERE id = 1", &[])?
        .map(|r| Ok::<_, postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
        .transpose()?;
    let fingerprint = |pem: &str| {
        let hex = crate::util::hex(&Sha256::digest(pem.as_bytes()));
        format!("sha256 {}", &hex[..16])
    };
    report.push(
        "certificate authority",
        fingerprint(&ca.0),
        stored.as_ref().map_or_else(
            || "missing".into(),
            |(cert, key)| {
                if *key == ca.1 {
                    fingerprint(cert)
                } else {
                    "another key".into()
                }
            },
        ),
    );
    if let Some((identity, _)) = secrets {
        let target: Option<String> = client
            .query_opt(
                "SELECT identity FROM meta_keys WHERE name = $1",
                &[&SECRETS_KEY_ROW],
            )?
            .map(|r| r.try_get(0))
            .transpose()?;
        report.push(
            "secrets key identity",
            identity.clone(),
            target.unwrap_or_else(|| "missing".into()),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, ObjectKey, Resource};
    use crate::store::WriteMode;
    use crate::store::conformance::PgSchema;
    use crate::store::sqlite::SqliteStore;

    /// A stopped single-machine data directory: a tenant, a CA and a secrets key.
    fn data_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join(crate::server::DB_FILE)).unwrap();
        let tenant = Resource::from_value(serde_json::json!({"apiVersion": "clusterclaw.io/v1",
            "kind": "Tenant", "metadata": {"name": "acme"}}))
        .unwrap();
        store.write(&[(tenant, WriteMode::Apply)], false).unwrap();
        store
            .open_console_session(&console_session(), &console_limits())
            .unwrap();
        let keyring =
            Keyring::load_or_create(&dir.path().join(crate::server::SECRETS_KEY_FILE)).unwrap();
        assert_eq!(
            store.secrets_key(Some(&keyring.identity())).unwrap(),
            Some(keyring.identity())
        );
        crate::pki::init_dir(&dir.path().join("pki"), &["localhost".into()]).unwrap();
        dir
    }

    /// A console session of the data directory: copied, so that it outlives the move.
    fn console_session() -> crate::store::sessions::SessionRow {
        crate::store::sessions::SessionRow {
            id_hash: "5e55".repeat(16),
            token_id: "tok1".into(),
            sealed_token: "c2VhbGVk".into(),
            created_ms: 1_000,
            last_used_ms: 2_000,
            expires_ms: i64::MAX,
        }
    }

    fn console_limits() -> crate::store::sessions::SessionLimits {
        crate::store::sessions::SessionLimits {
            now_ms: 2_000,
            idle_ms: 1_000,
            max_sessions: 10,
        }
    }

    /// The PostgreSQL URL of a test schema (its options put the schema first).
    fn target(schema: &PgSchema) -> PgTarget {
        let c = &schema.config;
        let host = match &c.get_hosts()[0] {
            postgres::config::Host::Tcp(h) => h.clone(),
            other => panic!("{other:?}"),
        };
        let password = String::from_utf8(c.get_password().unwrap_or_default().to_vec()).unwrap();
        PgTarget {
            url: format!(
                "postgres://{}:{password}@{host}:{}/{}?options=-c%20search_path%3D{}",
                c.get_user().unwrap(),
                c.get_ports()[0],
                c.get_dbname().unwrap(),
                schema.name
            ),
            password_file: None,
            ca_file: None,
        }
    }

    fn tables(schema: &PgSchema) -> Vec<String> {
        let mut c = schema.config.connect(postgres::NoTls).unwrap();
        c.query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1",
            &[&schema.name],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    #[test]
    fn every_table_is_copied_and_checked_and_the_store_opens_on_the_copy() {
        let Some(schema) = PgSchema::new() else {
            return;
        };
        let dir = data_dir();
        let options = MigrateOptions {
            data_dir: dir.path().to_path_buf(),
            pki_dir: None,
            target: target(&schema),
        };
        let report = migrate(&options).unwrap();
        assert!(report.ok(), "{}", report.render());
        // Every table of the SQLite store has its check.
        let src = Connection::open(dir.path().join(crate::server::DB_FILE)).unwrap();
        let names: Vec<String> = src
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for name in names {
            let what = match name.as_str() {
                KIND_STATS => continue,
                META => "counter index".to_string(),
                LEASE => "leader lease epoch".to_string(),
                other => format!("table {other}"),
            };
            assert!(
                report.checks.iter().any(|c| c.what == what && c.ok),
                "{name}:\n{}",
                report.render()
            );
        }
        let store = PgStore::open_config(schema.config.clone()).unwrap();
        assert_eq!(store.index(), 1);
        // The copy's own trigger counted the objects copied.
        assert_eq!(store.kind_fingerprint(Kind::Tenant).unwrap(), (1, 1));
        assert!(
            store
                .get(&ObjectKey::cluster(Kind::Tenant, "acme"))
                .unwrap()
                .is_some()
        );
        let keyring = Keyring::load(&dir.path().join(crate::server::SECRETS_KEY_FILE))
            .unwrap()
            .unwrap();
        assert_eq!(store.secrets_key(None).unwrap(), Some(keyring.identity()));
        // Console sessions are copied: a browser logged in stays logged in.
        assert_eq!(
            store.console_session(&console_session().id_hash).unwrap(),
            Some(console_session())
        );
        // The serial counters moved past the copied rows: the next write logs its change.
        let tenant = Resource::from_value(serde_json::json!({"apiVersion": "clusterclaw.io/v1",
            "kind": "Tenant", "metadata": {"name": "beta"}}))
        .unwrap();
        store.write(&[(tenant, WriteMode::Apply)], false).unwrap();
        assert_eq!(store.index(), 2);
    }

    #[test]
    fn a_table_postgres_lacks_an_old_schema_and_a_wrong_key_are_refused_and_nothing_is_written() {
        let Some(schema) = PgSchema::new() else {
            return;
        };
        let refused = |dir: &Path, pki: Option<PathBuf>| {
            let options = MigrateOptions {
                data_dir: dir.to_path_buf(),
                pki_dir: pki,
                target: target(&schema),
            };
            match migrate(&options) {
                Err(MigrateError::Refused(why)) => why,
                other => panic!("{other:?}"),
            }
        };
        let dir = data_dir();
        let db = dir.path().join(crate::server::DB_FILE);
        let src = Connection::open(&db).unwrap();
        src.execute_batch("CREATE TABLE extra_things (x INTEGER)")
            .unwrap();
        let why = refused(dir.path(), None);
        assert!(
            why.contains("extra_things") && why.contains("no counterpart"),
            "{why}"
        );
        assert_eq!(tables(&schema), Vec::<String>::new());
        src.execute_batch("DROP TABLE extra_things").unwrap();

        let why = refused(dir.path(), Some(dir.path().join("elsewhere")));
        assert!(why.contains("elsewhere/ca.crt"), "{why}");

        let other = tempfile::tempdir().unwrap();
        let foreign = Keyring::load_or_create(&other.path().join("k")).unwrap();
        src.execute("UPDATE meta_keys SET identity = ?1", [foreign.identity()])
            .unwrap();
        let why = refused(dir.path(), None);
        assert!(
            why.contains("secrets.key") && why.contains("is not the one"),
            "{why}"
        );

        src.execute_batch("PRAGMA user_version = 1").unwrap();
        let why = refused(dir.path(), None);
        assert!(why.contains("older than this clusterclaw writes"), "{why}");
        assert_eq!(tables(&schema), Vec::<String>::new());
    }
}
