//! The state volumes each host reports (`StatusReport.volumes`), kept outside the objects: an
//! unchanged list writes nothing and a changed one moves no index, except where it ends a
//! deletion the control plane asked for (the assignment book then stops asking).

use super::StoreError;
use super::backend::Tx;

/// SQLite migration 8: the volumes hosts report, when each was first seen, since when no replica
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
    tx: &mut dyn Tx,
    host: &str,
    listed: &[ReportedVolume],
    now: &str,
) -> Result<(bool, bool), StoreError> {
    let before = tx.host_volumes(Some(host))?;
    let mut changed = false;
    let mut finished = false;
    for old in &before {
        if !listed.iter().any(|v| v.name == old.volume.name) {
            tx.drop_host_volumes(host, Some(&old.volume.name))?;
            changed = true;
            finished |= old.delete_requested.is_some();
        }
    }
    for v in listed {
        let same = before.iter().find(|o| o.volume.name == v.name);
        if same.is_some_and(|o| o.volume == *v) {
            continue;
        }
        tx.put_host_volume(host, v, now)?;
        changed = true;
    }
    Ok((changed, finished))
}

/// Sets or clears when each named volume turned orphaned.
pub fn mark_orphaned(
    tx: &mut dyn Tx,
    marks: &[(String, String, Option<String>)],
) -> Result<(), StoreError> {
    for (host, name, since) in marks {
        tx.set_orphaned(host, name, since.as_deref())?;
    }
    Ok(())
}

/// Records that `host`'s volume `name` is to be removed (kept as first asked when asked
/// again), and lets go of what kept it for a deleted instance. Returns the volume, or `None`
/// when the host reports no such volume.
pub fn request_deletion(
    tx: &mut dyn Tx,
    host: &str,
    name: &str,
    reason: &str,
    now: &str,
) -> Result<Option<HostVolume>, StoreError> {
    let Some(v) = tx
        .host_volumes(Some(host))?
        .into_iter()
        .find(|h| h.volume.name == name)
    else {
        return Ok(None);
    };
    tx.set_volume_deletion(host, name, now, reason)?;
    let v = v.volume;
    tx.drop_retained_volumes(
        (&v.tenant, &v.project, &v.instance),
        Some((&v.replica, host)),
    )?;
    Ok(tx
        .host_volumes(Some(host))?
        .into_iter()
        .find(|h| h.volume.name == name))
}
