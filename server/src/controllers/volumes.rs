//! State volumes on hosts: which replica claims each one (a pure [`classify`]), and the
//! controller that notes since when a volume is orphaned and removes orphans past
//! `[volumes] orphan_retention` (a pure [`plan`] plus a thin loop).
//!
//! Rules. A volume a host reports is
//! - `InUse` while a replica of an existing instance with the volume's tenant, project,
//!   instance and replica name is placed on that host;
//! - `Retained` while such an instance keeps it in `status.retainedVolumes` for that host
//!   (a scale-down with `whenScaled: Retain`, or a failover that left it behind);
//! - `Orphaned` otherwise: its instance is gone (also when it was deleted with
//!   `whenDeleted: Retain`: the volume is kept, and an instance created again under the same
//!   name takes it back, but no replica claims it now), or no replica of it is placed there;
//! - `Deleting` once its removal was asked for, until its host no longer reports it.
//!
//! A volume is removed only when a person asks (`clusterclaw delete volume`, refused while
//! it is InUse or Retained) or, when `orphan_retention` is set, once it has been Orphaned that
//! long (event `OrphanedVolumeExpired`). With no retention set (the default) orphans stay.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::model::{Kind, ObjectKey, OpenClawInstance, Resource, RetentionPolicy};
use crate::store::revisions::DeletedVolume;
use crate::store::volumes::HostVolume;
use crate::store::{Store, StoreError};

/// Who claims a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub enum VolumeStatus {
    InUse,
    Retained,
    Orphaned,
    Deleting,
}

impl VolumeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeStatus::InUse => "InUse",
            VolumeStatus::Retained => "Retained",
            VolumeStatus::Orphaned => "Orphaned",
            VolumeStatus::Deleting => "Deleting",
        }
    }
}

/// A state volume on a host, as `GET /api/v1/volumes` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeView {
    pub host: String,
    /// The volume's name in the host's container engine.
    pub name: String,
    pub tenant: String,
    pub project: String,
    pub instance: String,
    pub replica: String,
    pub status: VolumeStatus,
    /// Why it has that status.
    pub message: String,
    /// When the server first saw the host report it, RFC 3339.
    pub first_seen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orphaned_since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delete_requested: Option<String>,
    /// Who asked for the removal: `user:<token name>` or `retention`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delete_reason: Option<String>,
}

/// Classifies every reported volume (see the module documentation). Pure.
pub fn classify<I: std::borrow::Borrow<OpenClawInstance>>(
    volumes: &[HostVolume],
    instances: &[I],
    deleted: &[DeletedVolume],
) -> Vec<VolumeView> {
    let by_key: HashMap<(&str, &str, &str), &OpenClawInstance> = instances
        .iter()
        .map(|i| {
            let i: &OpenClawInstance = i.borrow();
            let m = &i.metadata;
            (
                (
                    m.tenant.as_deref().unwrap_or_default(),
                    m.project.as_deref().unwrap_or_default(),
                    m.name.as_str(),
                ),
                i,
            )
        })
        .collect();
    volumes
        .iter()
        .map(|hv| {
            let v = &hv.volume;
            let instance_name = format!("{}/{}/{}", v.tenant, v.project, v.instance);
            let (status, message) = match by_key.get(&(
                v.tenant.as_str(),
                v.project.as_str(),
                v.instance.as_str(),
            )) {
                _ if hv.delete_requested.is_some() => (
                    VolumeStatus::Deleting,
                    format!(
                        "removal asked by {}; waiting for host {} to remove it",
                        hv.delete_reason.as_deref().unwrap_or("someone"),
                        hv.host
                    ),
                ),
                Some(i) => claim(i, &hv.host, &v.replica, &instance_name),
                None if deleted.iter().any(|d| {
                    d.host == hv.host
                        && d.tenant == v.tenant
                        && d.project == v.project
                        && d.instance == v.instance
                        && d.replica == v.replica
                }) =>
                {
                    (
                        VolumeStatus::Orphaned,
                        format!(
                            "instance {instance_name} was deleted with whenDeleted: Retain; an instance created again under its name takes the volume back"
                        ),
                    )
                }
                None => (
                    VolumeStatus::Orphaned,
                    format!("instance {instance_name} does not exist"),
                ),
            };
            VolumeView {
                host: hv.host.clone(),
                name: v.name.clone(),
                tenant: v.tenant.clone(),
                project: v.project.clone(),
                instance: v.instance.clone(),
                replica: v.replica.clone(),
                status,
                message,
                first_seen: hv.first_seen.clone(),
                orphaned_since: hv.orphaned_since.clone(),
                delete_requested: hv.delete_requested.clone(),
                delete_reason: hv.delete_reason.clone(),
            }
        })
        .collect()
}

/// Whether a replica of the existing instance `i` claims its volume on `host`.
fn claim(
    i: &OpenClawInstance,
    host: &str,
    replica: &str,
    instance_name: &str,
) -> (VolumeStatus, String) {
    let Some(status) = &i.status else {
        return (
            VolumeStatus::Orphaned,
            format!("no replica of instance {instance_name} is placed on {host}"),
        );
    };
    if status
        .replica_status
        .iter()
        .any(|r| r.name == replica && r.host.as_deref() == Some(host))
    {
        return (
            VolumeStatus::InUse,
            format!("replica {replica} of instance {instance_name} is placed on {host}"),
        );
    }
    let retain_scaled = i.spec.volume_retention.when_scaled == RetentionPolicy::Retain;
    if let Some(kept) = status
        .retained_volumes
        .iter()
        .find(|k| k.replica == replica && k.host == host && (retain_scaled || k.from_failover()))
    {
        let why = if kept.from_failover() {
            "left behind by a failover"
        } else {
            "kept after a scale-down (whenScaled: Retain)"
        };
        return (
            VolumeStatus::Retained,
            format!("replica {replica} of instance {instance_name}: {why}"),
        );
    }
    (
        VolumeStatus::Orphaned,
        format!("no replica {replica} of instance {instance_name} is placed on {host} or keeps it"),
    )
}

/// What a controller pass does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VolumePlan {
    /// (host, name, since): set or clear since when a volume is orphaned.
    pub marks: Vec<(String, String, Option<String>)>,
    /// (host, name): orphans past the retention period, to remove.
    pub expire: Vec<(String, String)>,
    /// When the next orphan expires, if one will.
    pub next: Option<Duration>,
}

fn parse_ms(t: &str) -> Option<i64> {
    let at = humantime::parse_rfc3339_weak(t).ok()?;
    let d = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_millis()).ok()
}

/// Decides the marks and expiries of a pass at `now_ms` (Unix milliseconds; `now` is the same
/// time in RFC 3339). Pure.
pub fn plan(
    views: &[VolumeView],
    retention: Option<Duration>,
    now_ms: i64,
    now: &str,
) -> VolumePlan {
    let mut out = VolumePlan::default();
    for v in views {
        let key = || (v.host.clone(), v.name.clone());
        match v.status {
            VolumeStatus::Orphaned => {
                let since = match &v.orphaned_since {
                    Some(s) => s.clone(),
                    None => {
                        let (h, n) = key();
                        out.marks.push((h, n, Some(now.to_string())));
                        now.to_string()
                    }
                };
                let Some(retention) = retention else { continue };
                let since_ms = parse_ms(&since).unwrap_or(now_ms);
                let due = since_ms
                    .saturating_add(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
                if due <= now_ms {
                    out.expire.push(key());
                } else {
                    let left = Duration::from_millis(u64::try_from(due - now_ms).unwrap_or(0));
                    out.next = Some(out.next.map_or(left, |n: Duration| n.min(left)));
                }
            }
            VolumeStatus::InUse | VolumeStatus::Retained if v.orphaned_since.is_some() => {
                let (h, n) = key();
                out.marks.push((h, n, None));
            }
            VolumeStatus::InUse | VolumeStatus::Retained | VolumeStatus::Deleting => {}
        }
    }
    out
}

/// The classified volumes of one host, or of every host.
pub fn views(store: &dyn Store, host: Option<&str>) -> Result<Vec<VolumeView>, StoreError> {
    let volumes = store.host_volumes(host)?;
    if volumes.is_empty() {
        return Ok(Vec::new());
    }
    let objects = crate::store::decoded::list_decoded(store, Kind::OpenClawInstance)?;
    let instances: Vec<&OpenClawInstance> = objects
        .iter()
        .filter_map(|o| match &o.resource {
            Ok(Resource::OpenClawInstance(i)) => Some(i),
            _ => None,
        })
        .collect();
    Ok(classify(&volumes, &instances, &store.deleted_volumes()?))
}

/// The event of an orphan removed after the retention period.
fn expired_event(host: &str, name: &str, retention: Duration) -> crate::events::Event {
    crate::events::Event::normal(
        ObjectKey::cluster(Kind::Host, host),
        "OrphanedVolumeExpired",
        format!(
            "state volume {name} was orphaned for longer than the retention period ({}); its removal is asked of the host",
            humantime::format_duration(retention)
        ),
    )
    .source("volumes")
}

/// One pass: marks orphans, asks for the removal of expired ones. Returns when to look again.
pub fn reconcile_at(
    store: &dyn Store,
    retention: Option<Duration>,
    now_ms: i64,
) -> Result<Option<Duration>, StoreError> {
    let all = views(store, None)?;
    // To the millisecond: `orphanedSince` is what the retention period is measured from, and
    // a time cut to the second would end the period up to a second early.
    let now = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(now_ms).unwrap_or(0)),
    )
    .to_string();
    let p = plan(&all, retention, now_ms, &now);
    store.mark_orphaned_volumes(&p.marks)?;
    for (host, name) in &p.expire {
        let (done, _) = store.request_volume_deletion(host, name, "retention", &now)?;
        if done.is_some()
            && let Some(r) = retention
        {
            tracing::info!(host = %host, volume = %name, "an orphaned state volume passed the retention period; asking its host to remove it");
            crate::events::record(store, expired_event(host, name, r));
        }
    }
    Ok(p.next)
}

/// Runs the volume controller until `shutdown` flips.
pub async fn run(
    store: Arc<dyn Store>,
    shutdown: watch::Receiver<bool>,
    resync: Duration,
    retention: Option<Duration>,
) {
    super::runtime::run(
        "volumes",
        store,
        shutdown,
        resync,
        move |store: &dyn Store| reconcile_at(store, retention, super::hosts::now_ms()),
    )
    .await;
}

#[cfg(test)]
mod tests;
