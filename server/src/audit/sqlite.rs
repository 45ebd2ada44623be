//! The audit log in the server's SQLite database: the table, appending inside a caller's
//! transaction, listing, and verifying (also of a database file copied elsewhere).

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use super::{AuditFilter, AuditRecord, AuditVerification, ChainBreak, ChainProblem, ChainVerifier};
use crate::store::StoreError;

/// The schema of the audit log, one migration of the store. Released: never change it; add a
/// new migration instead.
pub const MIGRATION: &str = "
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        chain_version INTEGER NOT NULL,
        time TEXT NOT NULL,
        principal_id TEXT NOT NULL,
        principal_name TEXT NOT NULL,
        tenant TEXT,
        action TEXT NOT NULL,
        object_kind TEXT,
        object_tenant TEXT,
        object_project TEXT,
        object_name TEXT,
        outcome TEXT NOT NULL,
        status INTEGER NOT NULL,
        reason TEXT,
        request_id TEXT NOT NULL,
        source TEXT NOT NULL,
        generation_before INTEGER,
        generation_after INTEGER,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_tenant_time ON audit (tenant, time);
    CREATE INDEX audit_time ON audit (time);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: its records cannot be changed'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: its records cannot be deleted'); END;
    INSERT INTO meta (key, value) VALUES ('audit_written', 0);";

const COLUMNS: &str = "seq, chain_version, time, principal_id, principal_name, tenant, action, \
    object_kind, object_tenant, object_project, object_name, outcome, status, reason, \
    request_id, source, generation_before, generation_after, prev_hash, hash";

/// How many records the log has written (kept beside the table, so that rows cut off its end
/// are noticed).
fn written_in(conn: &Connection) -> Result<u64, StoreError> {
    let n: Option<i64> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'audit_written'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
}

/// The end of the log inside the caller's transaction: the last record's `seq` and hash, and
/// how many records were written ([`crate::store::backend::Tx::audit_head`]).
pub(crate) fn head_in(tx: &Connection) -> Result<(u64, Option<String>, u64), StoreError> {
    let last: Option<(i64, String)> = tx
        .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let written = written_in(tx)?;
    Ok(match last {
        Some((seq, hash)) => (u64::try_from(seq).unwrap_or(0), Some(hash), written),
        None => (0, None, written),
    })
}

/// Inserts records chained by [`crate::store::rules::append_audit`], inside the caller's
/// transaction.
pub(crate) fn insert_in(tx: &Connection, records: &[AuditRecord]) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO audit ({COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"
    ))?;
    for r in records {
        let entry = &r.entry;
        let o = entry.object.as_ref();
        stmt.execute(params![
            r.seq as i64,
            r.chain_version,
            entry.time,
            entry.principal.id,
            entry.principal.name,
            entry.tenant,
            entry.action,
            o.map(|o| &o.kind),
            o.and_then(|o| o.tenant.as_ref()),
            o.and_then(|o| o.project.as_ref()),
            o.map(|o| &o.name),
            entry.result.outcome.as_str(),
            entry.result.status,
            entry.result.reason,
            entry.request_id,
            entry.source,
            entry.generation_before,
            entry.generation_after,
            r.prev_hash,
            r.hash,
        ])?;
    }
    Ok(())
}

/// Records how many records the log has written, inside the caller's transaction.
pub(crate) fn set_written_in(tx: &Connection, written: u64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('audit_written', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute([written as i64])?;
    Ok(())
}

/// A SQLite audit row, read through the one decoder ([`super::row::decode`]).
struct SqliteColumns<'a, 'r>(&'a Row<'r>);

impl super::row::AuditColumns for SqliteColumns<'_, '_> {
    fn int(&self, i: usize, name: &str) -> Result<i64, String> {
        self.0.get(i).map_err(|e| format!("column {name}: {e}"))
    }
    fn opt_int(&self, i: usize, name: &str) -> Result<Option<i64>, String> {
        self.0.get(i).map_err(|e| format!("column {name}: {e}"))
    }
    fn text(&self, i: usize, name: &str) -> Result<String, String> {
        self.0.get(i).map_err(|e| format!("column {name}: {e}"))
    }
    fn opt_text(&self, i: usize, name: &str) -> Result<Option<String>, String> {
        self.0.get(i).map_err(|e| format!("column {name}: {e}"))
    }
}

/// A row as a record, or why it cannot be one.
fn decode(r: &Row<'_>) -> Result<AuditRecord, String> {
    super::row::decode(&SqliteColumns(r))
}

/// The records `filter` selects, oldest first.
pub(crate) fn list_audit_in(
    conn: &Connection,
    filter: &AuditFilter,
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut sql = format!("SELECT {COLUMNS} FROM audit WHERE 1 = 1");
    let after = filter
        .after_seq
        .map(|s| i64::try_from(s).unwrap_or(i64::MAX));
    let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
    let mut args: Vec<&dyn rusqlite::ToSql> = Vec::new();
    if let Some(t) = &filter.tenant {
        args.push(t);
        sql.push_str(&format!(" AND tenant = ?{}", args.len()));
    }
    if let Some(s) = &filter.since {
        args.push(s);
        sql.push_str(&format!(" AND time >= ?{}", args.len()));
    }
    if let Some(a) = &after {
        args.push(a);
        sql.push_str(&format!(" AND seq > ?{}", args.len()));
    }
    args.push(&limit);
    sql.push_str(&format!(
        " ORDER BY seq {} LIMIT ?{}",
        if filter.tail { "DESC" } else { "ASC" },
        args.len()
    ));
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(args.as_slice())?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let r = decode(row).map_err(|why| {
            let seq = row.get::<_, i64>(0).unwrap_or_default();
            StoreError::Corrupt(format!("audit record {seq}: {why}"))
        })?;
        out.push(r);
    }
    if filter.tail {
        out.reverse();
    }
    Ok(out)
}

/// Checks the whole chain in one read snapshot, one row at a time.
pub(crate) fn verify_audit_in(conn: &Connection) -> Result<AuditVerification, StoreError> {
    let tx = conn.unchecked_transaction()?;
    let written = written_in(&tx)?;
    let mut verifier = ChainVerifier::new();
    let mut broken = None;
    {
        let mut stmt = tx.prepare(&format!("SELECT {COLUMNS} FROM audit ORDER BY seq"))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let pushed = match decode(row) {
                Ok(r) => verifier.push(&r),
                Err(why) => Err(ChainBreak {
                    seq: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
                    what: ChainProblem::Unreadable(why),
                }),
            };
            if let Err(b) = pushed {
                broken = Some(b);
                break;
            }
        }
    }
    if broken.is_none() {
        broken = verifier.finish(written).err();
    }
    Ok(AuditVerification {
        records: verifier.records(),
        head: verifier.head().to_string(),
        broken,
    })
}

/// Verifies the audit log of a database file without a running server and without changing
/// the file (an operator checking a copy). The file is opened read-only; no schema migration
/// runs.
pub fn verify_database(path: &Path) -> Result<AuditVerification, StoreError> {
    let shown = path.display();
    if !path.is_file() {
        return Err(StoreError::Backend(format!(
            "{shown} does not exist or is not a file; give the path of a clusterclaw database (clusterclaw.db in the server's data directory)"
        )));
    }
    let fail = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => StoreError::Corrupt(format!(
            "{shown} is not a clusterclaw database (not an SQLite file)"
        )),
        _ => StoreError::Backend(format!("{shown}: {e}")),
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    let has_log: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit')",
            [],
            |r| r.get(0),
        )
        .map_err(fail)?;
    if !has_log {
        return Err(StoreError::Corrupt(format!(
            "{shown} has no audit log: it is not a clusterclaw database, or one written by a clusterclaw without an audit log"
        )));
    }
    verify_audit_in(&conn).map_err(|e| match e {
        StoreError::Backend(m) => StoreError::Backend(format!("{shown}: {m}")),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::fixtures::entry;
    use crate::audit::{AuditFilter, AuditResult, GENESIS_HASH, verify_chain};
    use crate::store::Store;
    use crate::store::sqlite::SqliteStore;

    fn open() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("clusterclaw.db")).unwrap();
        (dir, store)
    }

    fn raw(store: &SqliteStore) -> Connection {
        Connection::open(store.path()).unwrap()
    }

    fn all(store: &SqliteStore) -> Vec<AuditRecord> {
        store
            .list_audit(&AuditFilter {
                limit: usize::MAX,
                ..AuditFilter::default()
            })
            .unwrap()
    }

    fn intact(store: &SqliteStore) -> AuditVerification {
        let v = store.verify_audit().unwrap();
        assert_eq!(v.broken, None, "{v:?}");
        v
    }

    #[test]
    fn appends_chain_across_batches_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let first = {
            let store = SqliteStore::open(&path).unwrap();
            assert_eq!(store.append_audit(&[]).unwrap(), []);
            store.append_audit(&[entry(1), entry(2)]).unwrap()
        };
        assert_eq!(first.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(first[0].prev_hash, GENESIS_HASH);
        assert_eq!(first[1].prev_hash, first[0].hash);
        let store = SqliteStore::open(&path).unwrap();
        let more = store.append_audit(&[entry(3)]).unwrap();
        assert_eq!((more[0].seq, &more[0].prev_hash), (3, &first[1].hash));
        let records = all(&store);
        assert_eq!(records.len(), 3);
        assert_eq!(records[..2], first[..]);
        assert_eq!(verify_chain(&records), Ok(()));
        let v = intact(&store);
        assert_eq!((v.records, v.head.as_str()), (3, more[0].hash.as_str()));
        assert_eq!(
            store.index(),
            0,
            "the audit log does not move the object index"
        );
    }

    #[test]
    fn an_invalid_entry_writes_nothing() {
        let (_d, store) = open();
        let mut bad = entry(2);
        bad.action = "DROP TABLE".into();
        let err = store.append_audit(&[entry(1), bad]).unwrap_err();
        match &err {
            StoreError::Invalid(p) => assert_eq!(p[0].field, "entries[1].action"),
            other => panic!("{other}"),
        }
        assert!(all(&store).is_empty());
        assert_eq!(intact(&store).records, 0);
    }

    #[test]
    fn stored_text_is_normalized_and_hashed_as_stored() {
        let (_d, store) = open();
        let mut e = entry(1);
        e.result = AuditResult::denied(401, "token cca_0123456789abcdef is unknown");
        let r = store.append_audit(&[e]).unwrap();
        assert_eq!(
            r[0].entry.result.reason.as_deref(),
            Some("token cca_*** is unknown")
        );
        assert_eq!(all(&store), r);
        intact(&store);
    }

    #[test]
    fn the_table_refuses_updates_and_deletes() {
        let (_d, store) = open();
        store.append_audit(&[entry(1)]).unwrap();
        let conn = raw(&store);
        let e = conn
            .execute("UPDATE audit SET action = 'create' WHERE seq = 1", [])
            .unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        let e = conn.execute("DELETE FROM audit", []).unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        intact(&store);
    }

    fn tampered(edit: &str) -> (tempfile::TempDir, SqliteStore) {
        let (d, store) = open();
        store
            .append_audit(&(1..=5).map(entry).collect::<Vec<_>>())
            .unwrap();
        intact(&store);
        let conn = raw(&store);
        conn.execute_batch(&format!(
            "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete; {edit}"
        ))
        .unwrap();
        (d, store)
    }

    #[test]
    fn a_row_changed_with_raw_sql_is_found() {
        let (_d, store) = tampered("UPDATE audit SET outcome = 'denied' WHERE seq = 3");
        let v = store.verify_audit().unwrap();
        let b = v.broken.unwrap();
        assert_eq!((v.records, b.seq), (2, 3));
        assert!(matches!(b.what, ChainProblem::Changed { .. }), "{b}");
    }

    #[test]
    fn a_row_deleted_with_raw_sql_is_found() {
        let (_d, store) = tampered("DELETE FROM audit WHERE seq = 2");
        let b = store.verify_audit().unwrap().broken.unwrap();
        assert_eq!((b.seq, b.what), (3, ChainProblem::Sequence { expected: 2 }));
    }

    #[test]
    fn rows_cut_off_the_end_are_found_and_stay_visible() {
        let (_d, store) = tampered("DELETE FROM audit WHERE seq > 3");
        let b = store.verify_audit().unwrap().broken.unwrap();
        assert_eq!((b.seq, b.what), (4, ChainProblem::Truncated { written: 5 }));
        // Appending later does not hide the gap.
        let r = store.append_audit(&[entry(9)]).unwrap();
        assert_eq!(r[0].seq, 6);
        let b = store.verify_audit().unwrap().broken.unwrap();
        assert_eq!((b.seq, b.what), (6, ChainProblem::Sequence { expected: 4 }));
    }

    #[test]
    fn an_inserted_or_unreadable_row_is_found() {
        let (_d, store) = tampered(
            "INSERT INTO audit SELECT 99, chain_version, time, principal_id, principal_name, tenant,
                action, object_kind, object_tenant, object_project, object_name, outcome, status,
                reason, request_id, source, generation_before, generation_after, prev_hash, hash
             FROM audit WHERE seq = 5",
        );
        let b = store.verify_audit().unwrap().broken.unwrap();
        assert_eq!(b.seq, 99);
        assert!(matches!(b.what, ChainProblem::Changed { .. }), "{b}");

        let (_d, store) = tampered("UPDATE audit SET status = 'teapot' WHERE seq = 4");
        let b = store.verify_audit().unwrap().broken.unwrap();
        assert_eq!(b.seq, 4);
        assert!(matches!(b.what, ChainProblem::Unreadable(_)), "{b}");
        assert!(b.to_string().contains("status"), "{b}");
    }

    #[test]
    fn listing_filters_pages_and_tails() {
        let (_d, store) = open();
        let mut entries = Vec::new();
        for i in 1..=6u32 {
            let mut e = entry(i);
            e.tenant = Some(if i % 2 == 0 { "even" } else { "odd" }.into());
            entries.push(e);
        }
        store.append_audit(&entries).unwrap();
        let seqs = |f: AuditFilter| {
            store
                .list_audit(&f)
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>()
        };
        let f = |limit| AuditFilter {
            limit,
            ..AuditFilter::default()
        };
        assert_eq!(seqs(f(4)), [1, 2, 3, 4]);
        assert_eq!(seqs(AuditFilter { tail: true, ..f(4) }), [3, 4, 5, 6]);
        assert_eq!(
            seqs(AuditFilter {
                after_seq: Some(4),
                ..f(10)
            }),
            [5, 6]
        );
        assert_eq!(
            seqs(AuditFilter {
                tenant: Some("even".into()),
                ..f(10)
            }),
            [2, 4, 6]
        );
        assert_eq!(
            seqs(AuditFilter {
                tenant: Some("odd".into()),
                since: Some("2026-07-10T12:00:03.000Z".into()),
                ..f(10)
            }),
            [3, 5]
        );
        assert_eq!(seqs(f(0)), Vec::<u64>::new());
    }

    #[test]
    fn a_copied_database_is_verified_offline_without_changing_it() {
        let (dir, store) = open();
        store.append_audit(&[entry(1), entry(2)]).unwrap();
        let copy = dir.path().join("copy.db");
        // What an operator copies: the database after a checkpoint, without its WAL.
        raw(&store)
            .execute_batch(&format!("VACUUM INTO '{}'", copy.display()))
            .unwrap();
        let before = std::fs::read(&copy).unwrap();
        let v = verify_database(&copy).unwrap();
        assert_eq!((v.records, v.broken), (2, None));
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            before,
            "the file is unchanged"
        );

        // A live database, with its WAL, verifies too.
        let v = verify_database(store.path()).unwrap();
        assert_eq!((v.records, v.broken), (2, None));

        let missing = verify_database(&dir.path().join("nope.db")).unwrap_err();
        assert!(missing.to_string().contains("does not exist"), "{missing}");
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, vec![b'x'; 4096]).unwrap();
        let e = verify_database(&junk).unwrap_err();
        assert!(e.to_string().contains("not a clusterclaw database"), "{e}");
        let empty = dir.path().join("other.db");
        Connection::open(&empty)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let e = verify_database(&empty).unwrap_err();
        assert!(e.to_string().contains("has no audit log"), "{e}");
    }
}
