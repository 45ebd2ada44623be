//! The change log (every object write and delete, for watches, kept for the last
//! [`CHANGE_LOG_KEEP`] changes) and the events (own sequence, folded, pruned), over any
//! engine's [`super::backend::Tx`].

use std::collections::{BTreeMap, HashMap};

use super::StoreError;
use super::backend::Tx;
use crate::events::{Event, EventFilter, EventRecord, FOLD_WINDOW, Folded, Retention};
use crate::model::ObjectKey;

/// Appended to the SQLite store's migrations: the change log and the events table (written to run
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

    pub fn parse(s: &str) -> Result<Self, StoreError> {
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

/// Keeps the newest [`CHANGE_LOG_KEEP`] changes (whole indexes), and records from which index
/// the log is complete.
pub fn trim(tx: &mut dyn Tx) -> Result<(), StoreError> {
    if let Some(cut) = tx.change_rv_from_newest(CHANGE_LOG_KEEP as u64)? {
        tx.drop_changes(cut)?;
        tx.raise_meta("changes_from", cut)?;
    }
    Ok(())
}

/// Object changes after index `after`, at most `limit` (whole indexes; more when one index
/// alone has more), read in one snapshot.
pub fn object_changes_since(
    tx: &mut dyn Tx,
    after: u64,
    limit: usize,
) -> Result<ChangesSince, StoreError> {
    let from = tx.meta("changes_from")?;
    let index = tx.index()?;
    if after < from {
        return Ok(ChangesSince::Gone { oldest: from });
    }
    if after >= index {
        return Ok(ChangesSince::Changes {
            items: Vec::new(),
            upto: index,
        });
    }
    let mut items = tx.change_rows(after, limit + 1)?;
    let upto = if items.len() > limit {
        // Cut before the last index, which may be incomplete.
        let last = items[limit].rv;
        items.retain(|c| c.rv < last);
        if items.is_empty() {
            // One index with more than `limit` changes: read it whole.
            return object_changes_since(tx, after, limit * 2);
        }
        last - 1
    } else {
        index
    };
    Ok(ChangesSince::Changes { items, upto })
}

/// Writes a folded batch: each event that matches a stored one seen within [`FOLD_WINDOW`]
/// adds to its count, the others are new. Every row written takes the next sequence number.
/// Returns the last sequence number.
pub fn write_events(tx: &mut dyn Tx, batch: &[Folded]) -> Result<u64, StoreError> {
    let mut seq = tx.meta("events_seq")?;
    let window = FOLD_WINDOW.as_millis() as i64;
    for f in batch {
        seq += 1;
        match tx.find_event(&f.event, f.first_ms - window)? {
            Some(id) => tx.fold_event(id, f.count, f.last_ms, seq)?,
            None => tx.insert_event(seq, f)?,
        }
    }
    tx.raise_meta("events_seq", seq)?;
    Ok(seq)
}

/// Deletes events last seen before `now - ttl`, and the oldest of every tenant beyond
/// `max_per_tenant`. Returns how many were deleted.
pub fn prune_events(
    tx: &mut dyn Tx,
    retention: &Retention,
    now_ms: i64,
) -> Result<usize, StoreError> {
    let cutoff = now_ms - retention.ttl.as_millis() as i64;
    let (mut newest_gone, mut deleted) = tx.drop_events_before(cutoff)?;
    let max = retention.max_per_tenant as u64;
    for (tenant, count) in tx.event_counts()? {
        if count <= max {
            continue;
        }
        let (gone, n) = tx.drop_oldest_events(&tenant, count - max)?;
        newest_gone = newest_gone.max(gone);
        deleted += n;
    }
    if newest_gone > 0 {
        tx.raise_meta("events_from", newest_gone)?;
    }
    Ok(deleted)
}

/// Stored events matching `filter` (not yet scoped), oldest first, with the sequence read at.
pub fn list_events(
    tx: &mut dyn Tx,
    filter: &EventFilter,
) -> Result<(u64, Vec<EventRecord>), StoreError> {
    let seq = tx.meta("events_seq")?;
    let mut out = tx.events(filter)?;
    out.reverse();
    Ok((seq, out))
}

/// Events written after sequence `after`, at most `limit`, oldest first.
pub fn event_changes_since(
    tx: &mut dyn Tx,
    after: u64,
    limit: usize,
) -> Result<ChangesSince, StoreError> {
    let from = tx.meta("events_from")?;
    let seq = tx.meta("events_seq")?;
    if after < from {
        return Ok(ChangesSince::Gone { oldest: from });
    }
    let items: Vec<Change> = tx
        .events_after(after, limit)?
        .iter()
        .map(event_change)
        .collect();
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

    /// Takes what is queued, saying (once) how many were dropped; folded, ready to write.
    pub fn take(&mut self) -> Vec<Folded> {
        let queued = std::mem::take(&mut self.queued);
        let dropped = std::mem::take(&mut self.dropped);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "events came faster than they could be written; the oldest were dropped"
            );
        }
        if queued.is_empty() {
            return Vec::new();
        }
        crate::events::fold(queued)
    }
}

/// Counts of events per tenant (for tests).
pub fn count_by_tenant(tx: &mut dyn Tx) -> Result<HashMap<String, i64>, StoreError> {
    Ok(tx
        .event_counts()?
        .into_iter()
        .map(|(t, n)| (t, n as i64))
        .collect())
}
