//! The state volumes each host reports (`StatusReport.volumes`), kept outside the objects: an
//! unchanged list writes nothing and a changed one moves no index, except where it ends a
//! deletion the control plane asked for (the assignment book then stops asking).

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::StoreError;

/// Migration 8: the volumes hosts report, when each was first seen, since when no replica
/// claims it, and whether its removal was asked for.
pub const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS host_volumes (
    host TEXT NOT NULL,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    project TEXT NOT NULL,
    instance TEXT NOT NULL,
    replica TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    orphaned_since TEXT,
    delete_requested TEXT,
    delete_reason TEXT,
    PRIMARY KEY (host, name)
);
CREATE INDEX IF NOT EXISTS host_volumes_deleting ON host_volumes (host, name)
    WHERE delete_requested IS NOT NULL;";

/// A volume as its host reports it (from the volume's labels).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportedVolume {
    pub name: String,
    pub tenant: String,
    pub project: String,
    pub instance: String,
    pub replica: String,
}

/// A reported volume as the store keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostVolume {
    pub host: String,
    pub volume: ReportedVolume,
    /// When the server first saw it listed, RFC 3339.
    pub first_seen: String,
    /// Since when no replica claims it (set by the volume controller), RFC 3339.
    pub orphaned_since: Option<String>,
    /// When its removal was asked for, RFC 3339; the host is told until it is gone.
    pub delete_requested: Option<String>,
    /// Who or what asked: `user:<token name>` or `retention`.
    pub delete_reason: Option<String>,
}

/// Replaces `host`'s list with `listed` inside `tx`: new names are added (first seen `now`),
/// names no longer listed are dropped. Returns whether anything changed and whether a dropped
/// one had its removal asked for (a finished deletion).
pub fn replace_list(
    tx: &Transaction<'_>,
    host: &str,
    listed: &[ReportedVolume],
    now: &str,
) -> Result<(bool, bool), StoreError> {
    let before = list(tx, Some(host))?;
    let mut changed = false;
    let mut finished = false;
    let mut drop = tx.prepare_cached("DELETE FROM host_volumes WHERE host = ?1 AND name = ?2")?;
    for old in &before {
        if !listed.iter().any(|v| v.name == old.volume.name) {
            drop.execute(params![host, old.volume.name])?;
            changed = true;
            finished |= old.delete_requested.is_some();
        }
    }
    let mut insert = tx.prepare_cached(
        "INSERT INTO host_volumes (host, name, tenant, project, instance, replica, first_seen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (host, name) DO UPDATE SET tenant = excluded.tenant,
            project = excluded.project, instance = excluded.instance, replica = excluded.replica",
    )?;
    for v in listed {
        let same = before.iter().find(|o| o.volume.name == v.name);
        if same.is_some_and(|o| o.volume == *v) {
            continue;
        }
        insert.execute(params![
            host, v.name, v.tenant, v.project, v.instance, v.replica, now
        ])?;
        changed = true;
    }
    Ok((changed, finished))
}

/// Every kept volume (of one host, or of all), by host and name.
pub fn list(conn: &Connection, host: Option<&str>) -> Result<Vec<HostVolume>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT host, name, tenant, project, instance, replica, first_seen, orphaned_since,
                delete_requested, delete_reason
         FROM host_volumes WHERE ?1 IS NULL OR host = ?1 ORDER BY host, name",
    )?;
    let rows = stmt.query_map(params![host], |r| {
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
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// (host, name) of every volume whose removal was asked for, by host and name.
pub fn deletions(conn: &Connection) -> Result<Vec<(String, String)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT host, name FROM host_volumes WHERE delete_requested IS NOT NULL ORDER BY host, name",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Sets or clears when each named volume turned orphaned.
pub fn mark_orphaned(
    tx: &Transaction<'_>,
    marks: &[(String, String, Option<String>)],
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(
        "UPDATE host_volumes SET orphaned_since = ?3 WHERE host = ?1 AND name = ?2",
    )?;
    for (host, name, since) in marks {
        stmt.execute(params![host, name, since])?;
    }
    Ok(())
}

/// Records that `host`'s volume `name` is to be removed (kept as first asked when asked
/// again), and lets go of what kept it for a deleted instance. Returns the volume, or `None`
/// when the host reports no such volume.
pub fn request_deletion(
    tx: &Transaction<'_>,
    host: &str,
    name: &str,
    reason: &str,
    now: &str,
) -> Result<Option<HostVolume>, StoreError> {
    let Some(v) = tx
        .prepare_cached(
            "SELECT tenant, project, instance, replica FROM host_volumes WHERE host = ?1 AND name = ?2",
        )?
        .query_row(params![host, name], |r| {
            Ok(ReportedVolume {
                name: name.to_string(),
                tenant: r.get(0)?,
                project: r.get(1)?,
                instance: r.get(2)?,
                replica: r.get(3)?,
            })
        })
        .optional()?
    else {
        return Ok(None);
    };
    tx.prepare_cached(
        "UPDATE host_volumes SET delete_requested = coalesce(delete_requested, ?3),
            delete_reason = coalesce(delete_reason, ?4)
         WHERE host = ?1 AND name = ?2",
    )?
    .execute(params![host, name, now, reason])?;
    tx.prepare_cached(
        "DELETE FROM retained_volumes
         WHERE host = ?1 AND tenant = ?2 AND project = ?3 AND instance = ?4 AND replica = ?5",
    )?
    .execute(params![host, v.tenant, v.project, v.instance, v.replica])?;
    Ok(list(tx, Some(host))?
        .into_iter()
        .find(|h| h.volume.name == name))
}

/// Drops everything kept of `host`'s volumes (the host was deleted).
pub fn forget_host(conn: &Connection, host: &str) -> Result<(), StoreError> {
    conn.execute("DELETE FROM host_volumes WHERE host = ?1", [host])?;
    Ok(())
}
