//! The change log (every object write and delete, for watches, kept for the last
//! [`CHANGE_LOG_KEEP`] changes) and the events table (own sequence, folded, pruned), in SQLite.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{StoreError, StoredObject};
use crate::events::{Event, EventFilter, EventRecord, EventType, FOLD_WINDOW, Folded, Retention};
use crate::model::{Kind, ObjectKey};

/// Appended to the store's migrations: the change log and the events table (written to run
/// again harmlessly over a database that has them).
pub const MIGRATION: &str = "
    CREATE TABLE IF NOT EXISTS changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        rv INTEGER NOT NULL,
        type TEXT NOT NULL,
        kind TEXT NOT NULL,
        tenant TEXT NOT NULL,
        project TEXT NOT NULL,
        name TEXT NOT NULL,
        labels TEXT NOT NULL,
        body TEXT NOT NULL,
        UNIQUE (rv, kind, tenant, project, name)
    );
    INSERT OR IGNORE INTO meta (key, value) SELECT 'changes_from', value FROM meta WHERE key = 'index';
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        tenant TEXT NOT NULL,
        project TEXT NOT NULL,
        name TEXT NOT NULL,
        replica TEXT NOT NULL,
        type TEXT NOT NULL,
        reason TEXT NOT NULL,
        message TEXT NOT NULL,
        source TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_ms INTEGER NOT NULL,
        last_ms INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX IF NOT EXISTS events_seq ON events (seq);
    CREATE INDEX IF NOT EXISTS events_object ON events (kind, tenant, project, name, reason);
    CREATE INDEX IF NOT EXISTS events_tenant ON events (tenant, last_ms);
    INSERT OR IGNORE INTO meta (key, value) VALUES ('events_seq', 0), ('events_from', 0);";

/// Changes kept in the log: a watch may resume from any index within the last this many.
pub const CHANGE_LOG_KEEP: i64 = 10_000;
/// The log is trimmed on every this many-th commit.
pub const TRIM_EVERY: u64 = 64;

/// ADDED, MODIFIED or DELETED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "ADDED" => Ok(ChangeType::Added),
            "MODIFIED" => Ok(ChangeType::Modified),
            "DELETED" => Ok(ChangeType::Deleted),
            _ => Err(StoreError::Corrupt(format!("change type {s:?}"))),
        }
    }
}

/// One change of an object (or an event), as a watch sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The store index of the write (for events: the events' sequence).
    pub rv: u64,
    pub type_: ChangeType,
    /// The object (for events: the object the event is about).
    pub key: ObjectKey,
    pub labels: BTreeMap<String, String>,
    /// The object's JSON after the change (before it, for a delete).
    pub json: String,
}

/// Which sequence a watch follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    Objects,
    Events,
}

/// What [`super::Store::changes_since`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangesSince {
    /// The changes after the given version, oldest first, and the version they reach (the
    /// current one when the answer is complete).
    Changes { items: Vec<Change>, upto: u64 },
    /// The given version is older than the log keeps; `oldest` is the oldest that can be
    /// resumed from.
    Gone { oldest: u64 },
}

/// Logs the write of `o` (before it is written, to tell ADDED from MODIFIED).
pub fn log_upsert(conn: &Connection, o: &StoredObject, labels: &str) -> Result<(), StoreError> {
    let exists: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM objects WHERE kind = ?1 AND tenant = ?2 AND project = ?3 AND name = ?4)",
        )?
        .query_row(
            params![o.key.kind.as_str(), o.key.tenant, o.key.project, o.key.name],
            |r| r.get(0),
        )?;
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

/// Logs the delete of `o` in the transaction that deletes it (whose index is the stored one
/// plus one).
pub fn log_delete(tx: &Transaction<'_>, o: &StoredObject) -> Result<(), StoreError> {
    let labels =
        serde_json::to_string(&o.labels).map_err(|e| StoreError::Backend(e.to_string()))?;
    tx.prepare_cached(
        "INSERT INTO changes (rv, type, kind, tenant, project, name, labels, body)
         VALUES ((SELECT value + 1 FROM meta WHERE key = 'index'), 'DELETED', ?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (rv, kind, tenant, project, name) DO UPDATE SET type = 'DELETED', body = excluded.body",
    )?
    .execute(params![
        o.key.kind.as_str(),
        o.key.tenant,
        o.key.project,
        o.key.name,
        labels,
        o.json
    ])?;
    Ok(())
}

/// Logs the deletes of a tenant's Rollouts (deleted with the tenant).
pub fn log_delete_tenant_rollouts(tx: &Transaction<'_>, tenant: &str) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO changes (rv, type, kind, tenant, project, name, labels, body)
         SELECT (SELECT value + 1 FROM meta WHERE key = 'index'), 'DELETED', kind, tenant, project, name, labels, body
         FROM objects WHERE kind = 'Rollout' AND tenant = ?1",
    )?
    .execute([tenant])?;
    Ok(())
}

/// Keeps the newest [`CHANGE_LOG_KEEP`] changes (whole indexes), and records from which index
/// the log is complete.
pub fn trim(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let cut: Option<i64> = tx
        .prepare_cached("SELECT rv FROM changes ORDER BY seq DESC LIMIT 1 OFFSET ?1")?
        .query_row([CHANGE_LOG_KEEP], |r| r.get(0))
        .optional()?;
    if let Some(cut) = cut {
        tx.prepare_cached("DELETE FROM changes WHERE rv <= ?1")?
            .execute([cut])?;
        tx.prepare_cached("UPDATE meta SET value = MAX(value, ?1) WHERE key = 'changes_from'")?
            .execute([cut])?;
    }
    Ok(())
}

fn meta(conn: &Connection, key: &str) -> Result<u64, StoreError> {
    let v: Option<i64> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    Ok(v.unwrap_or(0) as u64)
}

fn kind_of(s: &str) -> Result<Kind, StoreError> {
    Kind::from_manifest(s).ok_or_else(|| StoreError::Corrupt(format!("unknown kind {s:?}")))
}

/// Object changes after index `after`, at most `limit` (whole indexes; more when one index
/// alone has more), read in one snapshot (`conn` in a transaction).
pub fn object_changes_since(
    conn: &Connection,
    after: u64,
    limit: usize,
) -> Result<ChangesSince, StoreError> {
    let from = meta(conn, "changes_from")?;
    let index = meta(conn, "index")?;
    if after < from {
        return Ok(ChangesSince::Gone { oldest: from });
    }
    if after >= index {
        return Ok(ChangesSince::Changes {
            items: Vec::new(),
            upto: index,
        });
    }
    let mut stmt = conn.prepare_cached(
        "SELECT rv, type, kind, tenant, project, name, labels, body FROM changes
         WHERE rv > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after as i64, limit as i64 + 1], |r| {
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
        let key = ObjectKey {
            kind: kind_of(&kind)?,
            tenant,
            project,
            name,
        };
        let labels = serde_json::from_str(&labels)
            .map_err(|e| StoreError::Corrupt(format!("labels of {key}: {e}")))?;
        items.push(Change {
            rv: rv as u64,
            type_: ChangeType::parse(&type_)?,
            key,
            labels,
            json: body,
        });
    }
    let upto = if items.len() > limit {
        // Cut before the last index, which may be incomplete.
        let last = items[limit].rv;
        items.retain(|c| c.rv < last);
        if items.is_empty() {
            // One index with more than `limit` changes: read it whole.
            return object_changes_since(conn, after, limit * 2);
        }
        last - 1
    } else {
        index
    };
    Ok(ChangesSince::Changes { items, upto })
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

struct EventRow {
    id: i64,
    seq: i64,
    kind: String,
    tenant: String,
    project: String,
    name: String,
    replica: String,
    type_: String,
    reason: String,
    message: String,
    source: String,
    count: i64,
    first_ms: i64,
    last_ms: i64,
}

impl EventRow {
    fn into_record(self) -> Result<EventRecord, StoreError> {
        Ok(EventRecord {
            id: self.id as u64,
            seq: self.seq as u64,
            event: Event {
                object: ObjectKey {
                    kind: kind_of(&self.kind)?,
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

/// Writes a folded batch: each event that matches a stored one seen within [`FOLD_WINDOW`]
/// adds to its count, the others are new. Every row written takes the next sequence number.
/// Returns the last sequence number.
pub fn write_events(tx: &Transaction<'_>, batch: &[Folded]) -> Result<u64, StoreError> {
    let mut seq = meta(tx, "events_seq")?;
    let window = FOLD_WINDOW.as_millis() as i64;
    for f in batch {
        let e = &f.event;
        let replica = e.replica.as_deref().unwrap_or("");
        seq += 1;
        let existing: Option<i64> = tx
            .prepare_cached(
                "SELECT id FROM events WHERE kind = ?1 AND tenant = ?2 AND project = ?3 AND name = ?4
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
                    replica,
                    e.type_.as_str(),
                    e.message,
                    e.source,
                    f.first_ms - window
                ],
                |r| r.get(0),
            )
            .optional()?;
        match existing {
            Some(id) => {
                tx.prepare_cached(
                    "UPDATE events SET count = count + ?1, last_ms = MAX(last_ms, ?2), seq = ?3 WHERE id = ?4",
                )?
                .execute(params![f.count as i64, f.last_ms, seq as i64, id])?;
            }
            None => {
                tx.prepare_cached(
                    "INSERT INTO events (seq, kind, tenant, project, name, replica, type, reason, message, source, count, first_ms, last_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                )?
                .execute(params![
                    seq as i64,
                    e.object.kind.as_str(),
                    e.object.tenant,
                    e.object.project,
                    e.object.name,
                    replica,
                    e.type_.as_str(),
                    e.reason,
                    e.message,
                    e.source,
                    f.count as i64,
                    f.first_ms,
                    f.last_ms
                ])?;
            }
        }
    }
    tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'events_seq'")?
        .execute([seq as i64])?;
    Ok(seq)
}

/// Deletes events last seen before `now - ttl`, and the oldest of every tenant beyond
/// `max_per_tenant`. Returns how many were deleted.
pub fn prune_events(
    tx: &Transaction<'_>,
    retention: &Retention,
    now_ms: i64,
) -> Result<usize, StoreError> {
    let cutoff = now_ms - retention.ttl.as_millis() as i64;
    let mut newest_gone: i64 = tx
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events WHERE last_ms < ?1")?
        .query_row([cutoff], |r| r.get(0))?;
    let mut deleted = tx
        .prepare_cached("DELETE FROM events WHERE last_ms < ?1")?
        .execute([cutoff])?;
    let over: Vec<(String, i64)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT tenant, COUNT(*) FROM events GROUP BY tenant HAVING COUNT(*) > ?1",
        )?;
        stmt.query_map([retention.max_per_tenant as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?
    };
    for (tenant, count) in over {
        let excess = count - retention.max_per_tenant as i64;
        let gone: i64 = tx
            .prepare_cached(
                "SELECT COALESCE(MAX(seq), 0) FROM (SELECT seq FROM events WHERE tenant = ?1 ORDER BY last_ms, id LIMIT ?2)",
            )?
            .query_row(params![tenant, excess], |r| r.get(0))?;
        newest_gone = newest_gone.max(gone);
        deleted += tx
            .prepare_cached(
                "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE tenant = ?1 ORDER BY last_ms, id LIMIT ?2)",
            )?
            .execute(params![tenant, excess])?;
    }
    if newest_gone > 0 {
        tx.prepare_cached("UPDATE meta SET value = MAX(value, ?1) WHERE key = 'events_from'")?
            .execute([newest_gone])?;
    }
    Ok(deleted)
}

/// Stored events matching `filter` (not yet scoped), oldest first, with the sequence read at.
pub fn list_events(
    conn: &Connection,
    filter: &EventFilter,
) -> Result<(u64, Vec<EventRecord>), StoreError> {
    let seq = meta(conn, "events_seq")?;
    let mut sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE 1 = 1");
    let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
    if let Some(t) = &filter.tenant {
        args.push(Box::new(t.clone()));
        sql.push_str(&format!(" AND tenant = ?{}", args.len()));
    }
    if let Some(p) = &filter.project {
        args.push(Box::new(p.clone()));
        sql.push_str(&format!(" AND project = ?{}", args.len()));
    }
    if let Some((kind, name)) = &filter.object {
        args.push(Box::new(kind.as_str()));
        sql.push_str(&format!(" AND kind = ?{}", args.len()));
        args.push(Box::new(name.clone()));
        sql.push_str(&format!(" AND name = ?{}", args.len()));
    }
    sql.push_str(" ORDER BY last_ms DESC, id DESC");
    if let Some(limit) = filter.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(
        rusqlite::params_from_iter(args.iter().map(|b| b.as_ref())),
        event_from_row,
    )?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row?.into_record()?);
    }
    out.reverse();
    Ok((seq, out))
}

/// Events written after sequence `after`, at most `limit`, oldest first.
pub fn event_changes_since(
    conn: &Connection,
    after: u64,
    limit: usize,
) -> Result<ChangesSince, StoreError> {
    let from = meta(conn, "events_from")?;
    let seq = meta(conn, "events_seq")?;
    if after < from {
        return Ok(ChangesSince::Gone { oldest: from });
    }
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![after as i64, limit as i64], event_from_row)?;
    let mut items = Vec::new();
    for row in rows {
        let r = row?.into_record()?;
        items.push(event_change(&r));
    }
    let upto = if items.len() >= limit {
        items.last().map_or(seq, |c| c.rv)
    } else {
        seq
    };
    Ok(ChangesSince::Changes { items, upto })
}

/// An event as a watch sends it: ADDED when first written, MODIFIED when folded into.
pub fn event_change(r: &EventRecord) -> Change {
    Change {
        rv: r.seq,
        type_: if r.count == 1 {
            ChangeType::Added
        } else {
            ChangeType::Modified
        },
        key: r.event.object.clone(),
        labels: BTreeMap::new(),
        json: r.to_json().to_string(),
    }
}

/// Queued events, bounded: beyond [`crate::events::MAX_QUEUED`] the oldest are dropped.
#[derive(Default)]
pub struct EventQueue {
    pub queued: Vec<Event>,
    pub dropped: u64,
}

impl EventQueue {
    pub fn push(&mut self, events: Vec<Event>) {
        self.queued.extend(events);
        let max = crate::events::MAX_QUEUED;
        if self.queued.len() > max {
            let excess = self.queued.len() - max;
            self.queued.drain(..excess);
            self.dropped += excess as u64;
        }
    }
}

/// Counts of events per tenant (for tests).
pub fn count_by_tenant(conn: &Connection) -> Result<HashMap<String, i64>, StoreError> {
    let mut stmt = conn.prepare("SELECT tenant, COUNT(*) FROM events GROUP BY tenant")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}
