//! Turns agent status reports into `OpenClawInstance.status` and `Host.status`, and keeps the
//! latest figures in memory for metrics and heartbeat checks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clusterclaw_proto::agent as pb;
use serde_json::json;

use crate::model::{
    Condition, ConfigSync, Host, HostCapacity, HostPhase, Kind, ObjectKey, Quantity, ReplicaState,
    Resource, format_cpu, format_memory, summarize,
};
use crate::store::{Store, StoreError};
use crate::util::now_rfc3339;

use super::identity::HostIdentity;

/// A host whose last report is older than this is marked NotReady.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
/// `Host.status` is rewritten at least this often while reports arrive, even when its phase
/// and conditions did not change (to refresh usage and lastHeartbeat).
pub const HOST_STATUS_REFRESH: Duration = Duration::from_secs(30);

/// The latest report of one host, kept in memory.
#[derive(Clone, Debug)]
pub struct HostReport {
    pub received: Instant,
    pub report: pb::StatusReport,
    status_written: Instant,
}

/// Latest reports by host name.
#[derive(Default)]
pub struct Reports {
    hosts: Mutex<HashMap<String, HostReport>>,
}

fn replica_state(s: i32) -> ReplicaState {
    match pb::ReplicaState::try_from(s).unwrap_or(pb::ReplicaState::Unspecified) {
        pb::ReplicaState::Unspecified | pb::ReplicaState::Pending => ReplicaState::Pending,
        pb::ReplicaState::Pulling => ReplicaState::Pulling,
        pb::ReplicaState::Starting => ReplicaState::Starting,
        pb::ReplicaState::Running => ReplicaState::Running,
        pb::ReplicaState::Ready => ReplicaState::Ready,
        pb::ReplicaState::Unhealthy => ReplicaState::Unhealthy,
        pb::ReplicaState::CrashLoopBackOff => ReplicaState::CrashLoopBackOff,
        pb::ReplicaState::Failed => ReplicaState::Failed,
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl Reports {
    /// A snapshot of every host's latest report.
    pub fn snapshot(&self) -> HashMap<String, HostReport> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// When the host last reported, if it has since this server started.
    pub fn last_seen(&self, host: &str) -> Option<Instant> {
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .map(|r| r.received)
    }

    pub fn forget(&self, host: &str) {
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(host);
    }

    /// Records one report and writes what it changes (blocking; call from `spawn_blocking`).
    ///
    /// The host's status and its replicas' states are written in one transaction, and only
    /// while the host still exists with the uid of the caller's certificate: a report that
    /// arrives after the host was deleted (or enrolled again under the same name) changes
    /// nothing and fails with [`StoreError::NotFound`]. A replica entry counts only where the
    /// scheduler placed that replica on this host; the others are dropped, also from what is
    /// kept in memory for `/metrics`.
    pub fn apply(
        &self,
        store: &dyn Store,
        host: &HostIdentity,
        report: pb::StatusReport,
    ) -> Result<(), StoreError> {
        self.apply_with(store, host, report, &[])
    }

    /// [`Reports::apply`], comparing what each replica's container really has with what the
    /// host was assigned (`assigned`: the host's current assignments), for `configSync`.
    pub fn apply_with(
        &self,
        store: &dyn Store,
        host: &HostIdentity,
        mut report: pb::StatusReport,
        assigned: &[pb::Assignment],
    ) -> Result<(), StoreError> {
        let expected_content: HashMap<(&str, &str, &str), (&str, &str)> = assigned
            .iter()
            .map(|a| {
                (
                    (a.tenant.as_str(), a.project.as_str(), a.replica.as_str()),
                    (a.config_hash.as_str(), a.content_hash.as_str()),
                )
            })
            .collect();
        let now = Instant::now();
        let refresh_host = {
            let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            match hosts.get(&host.name) {
                None => true,
                Some(prev) => {
                    now.duration_since(prev.status_written) >= HOST_STATUS_REFRESH
                        || prev.report.runtime.as_ref().map(|r| r.ready)
                            != report.runtime.as_ref().map(|r| r.ready)
                }
            }
        };
        let mut by_instance: HashMap<ObjectKey, Vec<usize>> = HashMap::new();
        for (i, r) in report.replicas.iter().enumerate() {
            by_instance
                .entry(ObjectKey::instance(&r.tenant, &r.project, &r.instance))
                .or_default()
                .push(i);
        }
        let host_key = ObjectKey::cluster(Kind::Host, &host.name);
        let mut instance_keys: Vec<ObjectKey> = by_instance.keys().cloned().collect();
        instance_keys.sort();
        // The host first: the replicas are only written once it is known to be this one.
        let keys: Vec<ObjectKey> = std::iter::once(host_key.clone())
            .chain(instance_keys)
            .collect();
        let mut host_is_current = false;
        let mut wrote_host = false;
        let mut accepted = vec![false; report.replicas.len()];
        let now_ready = crate::util::now_rfc3339_millis();
        store.update_many(&keys, &mut |res| match res {
            Resource::Host(h) => {
                if h.metadata.uid.as_deref() != Some(host.uid.as_str()) {
                    return false;
                }
                host_is_current = true;
                let phase_changed = h.status.as_ref().map(|s| s.phase) != Some(HostPhase::Ready);
                if !(refresh_host || phase_changed) {
                    return false;
                }
                wrote_host = true;
                write_host_status(h, &report);
                true
            }
            Resource::OpenClawInstance(inst) => {
                if !host_is_current {
                    return false;
                }
                let Some(reported) = by_instance.get(&inst.key()) else {
                    return false;
                };
                let Some(status) = inst.status.as_mut() else {
                    return false;
                };
                for &i in reported {
                    let rep = &report.replicas[i];
                    let Some(entry) = status.replica_status.iter_mut().find(|e| {
                        e.name == rep.replica && e.host.as_deref() == Some(host.name.as_str())
                    }) else {
                        continue;
                    };
                    accepted[i] = true;
                    let state = replica_state(rep.state);
                    let revision = (rep.config_revision > 0).then_some(rep.config_revision);
                    entry.ready_since =
                        ready_since(entry, state, revision, rep.restarts, &now_ready);
                    entry.snapshots = snapshots(&rep.snapshots);
                    entry.state = state;
                    entry.message = non_empty(&rep.message);
                    entry.container_id = non_empty(&rep.container_id);
                    entry.restarts = rep.restarts;
                    entry.host_port = u16::try_from(rep.host_port).ok().filter(|p| *p != 0);
                    entry.config_hash = non_empty(&rep.config_hash);
                    entry.generation = (rep.generation > 0).then_some(rep.generation);
                    entry.config_revision =
                        (rep.config_revision > 0).then_some(rep.config_revision);
                    entry.config_sync = config_sync(&expected_content, rep);
                }
                summarize(inst);
                true
            }
            Resource::Tenant(_)
            | Resource::Project(_)
            | Resource::ConfigTemplate(_)
            | Resource::Secret(_)
            | Resource::Rollout(_) => false,
        })?;
        if !host_is_current {
            return Err(StoreError::NotFound(host_key));
        }
        let mut accepted = accepted.into_iter();
        report.replicas.retain(|_| accepted.next().unwrap_or(false));
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let status_written = match hosts.get(&host.name) {
            Some(prev) if !wrote_host => prev.status_written,
            _ => now,
        };
        hosts.insert(
            host.name.clone(),
            HostReport {
                received: now,
                report,
                status_written,
            },
        );
        Ok(())
    }
}

/// Writes what a report says about its host: Ready, the heartbeat, usage figures, the runtime
/// condition, and the capacity and agent version it reports.
/// Most snapshots shown per replica.
pub const MAX_SNAPSHOTS_SHOWN: usize = 10;

/// `readySince` after a report: kept while the replica stays Ready on the same revision
/// without a restart, `now` when it turns Ready (or its revision or restart count changed
/// while Ready), none while it is not Ready.
pub fn ready_since(
    before: &crate::model::ReplicaStatus,
    state: ReplicaState,
    revision: Option<u64>,
    restarts: u32,
    now: &str,
) -> Option<String> {
    if state != ReplicaState::Ready {
        return None;
    }
    let same = before.state == ReplicaState::Ready
        && before.config_revision == revision
        && before.restarts == restarts;
    match &before.ready_since {
        Some(since) if same => Some(since.clone()),
        _ => Some(now.to_string()),
    }
}

/// The snapshots a replica reports, newest first, at most [`MAX_SNAPSHOTS_SHOWN`].
pub fn snapshots(reported: &[pb::VolumeSnapshot]) -> Vec<crate::model::SnapshotInfo> {
    let mut list: Vec<&pb::VolumeSnapshot> = reported.iter().collect();
    list.sort_by(|a, b| {
        b.taken_unix_ms
            .cmp(&a.taken_unix_ms)
            .then_with(|| a.id.cmp(&b.id))
    });
    list.into_iter()
        .take(MAX_SNAPSHOTS_SHOWN)
        .map(|s| crate::model::SnapshotInfo {
            id: s.id.clone(),
            image: s.image.clone(),
            taken_at: crate::util::rfc3339(s.taken_unix_ms.div_euclid(1000)),
            bytes: s.bytes,
        })
        .collect()
}

fn write_host_status(h: &mut Host, report: &pb::StatusReport) {
    let runtime = report.runtime.clone().unwrap_or_default();
    let figures = report.host.unwrap_or_default();
    let now = now_rfc3339();
    let status = h.status.get_or_insert_with(Default::default);
    status.phase = HostPhase::Ready;
    status.message = None;
    status.last_heartbeat = Some(now.clone());
    status.usage = Some(json!({
        "cpuPercent": (figures.cpu_percent * 10.0).round() / 10.0,
        "memoryUsedBytes": figures.memory_used_bytes,
        "memoryTotalBytes": figures.memory_total_bytes,
        "diskUsedBytes": figures.disk_used_bytes,
        "diskTotalBytes": figures.disk_total_bytes,
        "load1": figures.load1, "load5": figures.load5, "load15": figures.load15,
    }));
    let ready = if runtime.ready { "True" } else { "False" };
    let message = if runtime.ready {
        format!("{} {}", runtime.runtime, runtime.version)
            .trim()
            .to_string()
    } else {
        runtime.message.clone()
    };
    let previous = status
        .conditions
        .iter()
        .find(|c| c.type_ == "RuntimeReady")
        .cloned();
    let since = match previous {
        Some(p) if p.status == ready => p.last_transition_time,
        _ => Some(now),
    };
    status.conditions.retain(|c| c.type_ != "RuntimeReady");
    status.conditions.push(Condition {
        type_: "RuntimeReady".into(),
        status: ready.into(),
        reason: Some(
            if runtime.ready {
                "EngineAnswering"
            } else {
                "EngineUnavailable"
            }
            .into(),
        ),
        message: non_empty(&message),
        last_transition_time: since,
    });
    if let Some(c) = &figures.capacity {
        h.spec.capacity = HostCapacity {
            cpu: Quantity(format_cpu(c.cpu_millis)),
            memory: Quantity(format_memory(c.memory_bytes)),
            disk: (c.disk_bytes > 0).then(|| Quantity(format_memory(c.disk_bytes))),
        };
    }
    if !report.agent_version.is_empty() {
        h.spec.agent_version = Some(report.agent_version.clone());
    }
}

/// Marks hosts NotReady when their reports stop (blocking; run periodically). A host that has
/// Whether a replica's container really has what it was given: the agent's measured content
/// hash against the one of the assignment it runs (unknown while it runs another one).
fn config_sync(
    expected: &HashMap<(&str, &str, &str), (&str, &str)>,
    rep: &pb::ReplicaStatus,
) -> Option<ConfigSync> {
    if rep.observed_content_hash.is_empty() {
        return None;
    }
    let (config_hash, content_hash) = expected.get(&(
        rep.tenant.as_str(),
        rep.project.as_str(),
        rep.replica.as_str(),
    ))?;
    if *config_hash != rep.config_hash || content_hash.is_empty() {
        return None;
    }
    Some(if *content_hash == rep.observed_content_hash {
        ConfigSync::InSync
    } else {
        ConfigSync::Drift
    })
}

/// not reported since this server started is given `HEARTBEAT_TIMEOUT` from `started`.
pub fn check_heartbeats(
    store: &dyn Store,
    reports: &Reports,
    started: Instant,
) -> Result<(), StoreError> {
    let hosts = store.list(&crate::store::ListFilter::all(crate::model::Kind::Host))?;
    let now = Instant::now();
    for o in hosts {
        let Ok(Resource::Host(h)) = o.resource() else {
            continue;
        };
        let phase = h.status.as_ref().map(|s| s.phase).unwrap_or_default();
        if phase == HostPhase::NotReady {
            continue;
        }
        let last = reports.last_seen(&h.metadata.name).unwrap_or(started);
        let silent = now.duration_since(last);
        if silent < HEARTBEAT_TIMEOUT {
            continue;
        }
        let msg = format!(
            "no status report for {}s (agent stopped or unreachable)",
            silent.as_secs()
        );
        tracing::warn!(host = %h.metadata.name, "{msg}; marking NotReady");
        store.update(&o.key, &mut |r| {
            let Resource::Host(h) = r else { return false };
            let s = h.status.get_or_insert_with(Default::default);
            s.phase = HostPhase::NotReady;
            s.message = Some(msg.clone());
            true
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::model::{InstanceStatus, ReplicaStatus};
    use crate::store::WriteMode;
    use crate::store::sqlite::SqliteStore;

    /// A store with host `h1` and two instances: `t/p/bot` with `bot-0` placed on `h1`, and
    /// `other/q/secret` with `secret-0` placed on `h2`.
    fn setup() -> (tempfile::TempDir, SqliteStore, HostIdentity) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let objects: Vec<(Resource, WriteMode)> = [
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Host", "metadata": {"name": "h1"},
                               "spec": {"hostname": "h1", "capacity": {"cpu": "4", "memory": "8Gi"}}}),
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": "t"}}),
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": "other"}}),
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project", "metadata": {"name": "p", "tenant": "t"}}),
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project", "metadata": {"name": "q", "tenant": "other"}}),
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
                               "metadata": {"name": "bot", "tenant": "t", "project": "p"}, "spec": {"version": "2026.7.1"}}),
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
                               "metadata": {"name": "secret", "tenant": "other", "project": "q"}, "spec": {"version": "2026.7.1"}}),
        ]
        .into_iter()
        .map(|v| (Resource::from_value(v).unwrap(), WriteMode::Apply))
        .collect();
        let written = store.write(&objects, false).unwrap();
        for (key, replica, on) in [
            (ObjectKey::instance("t", "p", "bot"), "bot-0", "h1"),
            (
                ObjectKey::instance("other", "q", "secret"),
                "secret-0",
                "h2",
            ),
        ] {
            store
                .update(&key, &mut |r| {
                    let Resource::OpenClawInstance(i) = r else {
                        return false;
                    };
                    i.status = Some(InstanceStatus {
                        replica_status: vec![ReplicaStatus {
                            name: replica.into(),
                            host: Some(on.into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    });
                    true
                })
                .unwrap();
        }
        let id = HostIdentity {
            name: "h1".into(),
            uid: written.results[0].object.uid.clone(),
        };
        (dir, store, id)
    }

    fn replica(tenant: &str, project: &str, instance: &str, name: &str) -> pb::ReplicaStatus {
        pb::ReplicaStatus {
            tenant: tenant.into(),
            project: project.into(),
            instance: instance.into(),
            replica: name.into(),
            state: pb::ReplicaState::Ready as i32,
            stats: Some(pb::ContainerStats {
                cpu_percent: 12.5,
                memory_bytes: 1 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn state_of(store: &SqliteStore, key: &ObjectKey) -> ReplicaState {
        let Resource::OpenClawInstance(i) = store.get(key).unwrap().unwrap().resource().unwrap()
        else {
            panic!("{key} is not an instance")
        };
        i.status.unwrap().replica_status[0].state
    }

    #[test]
    fn only_replicas_placed_on_the_host_are_kept_and_published() {
        let (_dir, store, id) = setup();
        let reports = Reports::default();
        let report = pb::StatusReport {
            replicas: vec![
                replica("t", "p", "bot", "bot-0"),
                replica("other", "q", "secret", "secret-0"),
                replica("ghost", "g", "made-up", "made-up-0"),
            ],
            ..Default::default()
        };
        reports.apply(&store, &id, report).unwrap();
        assert_eq!(
            state_of(&store, &ObjectKey::instance("t", "p", "bot")),
            ReplicaState::Ready
        );
        assert_eq!(
            state_of(&store, &ObjectKey::instance("other", "q", "secret")),
            ReplicaState::Pending,
            "another host's replica is not written"
        );
        let kept: Vec<String> = reports.snapshot()["h1"]
            .report
            .replicas
            .iter()
            .map(|r| r.replica.clone())
            .collect();
        assert_eq!(kept, ["bot-0"]);
        let text = Metrics::default().render(&store, &reports).unwrap();
        assert!(text.contains("instance=\"bot\""), "{text}");
        assert!(
            !text.contains("secret") && !text.contains("ghost"),
            "a host publishes series only for its own replicas:\n{text}"
        );
    }

    #[test]
    fn a_report_after_the_host_was_deleted_changes_nothing() {
        let (_dir, store, id) = setup();
        let reports = Reports::default();
        let report = pb::StatusReport {
            replicas: vec![replica("t", "p", "bot", "bot-0")],
            ..Default::default()
        };
        store
            .delete(&ObjectKey::cluster(Kind::Host, "h1"), None)
            .unwrap();
        let index = store.index();
        let err = reports.apply(&store, &id, report.clone()).unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err}");
        assert_eq!(
            state_of(&store, &ObjectKey::instance("t", "p", "bot")),
            ReplicaState::Pending
        );
        assert_eq!(store.index(), index, "nothing was written");
        assert!(reports.last_seen("h1").is_none());

        // A new host enrolled under the same name is not the caller.
        let again = Resource::from_value(serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Host",
            "metadata": {"name": "h1"}, "spec": {"hostname": "h1", "capacity": {"cpu": "4", "memory": "8Gi"}}}))
        .unwrap();
        store.write(&[(again, WriteMode::Create)], false).unwrap();
        let err = reports.apply(&store, &id, report).unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err}");
        assert_eq!(
            state_of(&store, &ObjectKey::instance("t", "p", "bot")),
            ReplicaState::Pending
        );
    }

    #[test]
    fn ready_since_starts_when_ready_and_restarts_on_a_new_revision_or_restart() {
        let t1 = "2026-01-01T00:00:01Z";
        let t2 = "2026-01-01T00:00:02Z";
        let mut r = ReplicaStatus::default();
        assert_eq!(ready_since(&r, ReplicaState::Running, Some(1), 0, t1), None);
        assert_eq!(
            ready_since(&r, ReplicaState::Ready, Some(1), 0, t1).as_deref(),
            Some(t1)
        );
        r.state = ReplicaState::Ready;
        r.config_revision = Some(1);
        r.ready_since = Some(t1.into());
        assert_eq!(
            ready_since(&r, ReplicaState::Ready, Some(1), 0, t2).as_deref(),
            Some(t1)
        );
        assert_eq!(
            ready_since(&r, ReplicaState::Ready, Some(2), 0, t2).as_deref(),
            Some(t2)
        );
        assert_eq!(
            ready_since(&r, ReplicaState::Ready, Some(1), 1, t2).as_deref(),
            Some(t2)
        );
        assert_eq!(
            ready_since(&r, ReplicaState::Unhealthy, Some(1), 0, t2),
            None
        );
    }

    #[test]
    fn reports_set_ready_since_and_copy_snapshots() {
        let (_dir, store, id) = setup();
        let reports = Reports::default();
        let key = ObjectKey::instance("t", "p", "bot");
        let mut rep = replica("t", "p", "bot", "bot-0");
        rep.config_revision = 1;
        rep.snapshots = (0..12)
            .map(|n| pb::VolumeSnapshot {
                id: format!("s{n}"),
                image: "img:1".into(),
                taken_unix_ms: 1_700_000_000_000 + n * 1000,
                bytes: 10,
            })
            .collect();
        let report = pb::StatusReport {
            replicas: vec![rep.clone()],
            ..Default::default()
        };
        reports.apply(&store, &id, report.clone()).unwrap();
        let read = |store: &SqliteStore| {
            let Resource::OpenClawInstance(i) =
                store.get(&key).unwrap().unwrap().resource().unwrap()
            else {
                panic!()
            };
            i.status.unwrap().replica_status[0].clone()
        };
        let r = read(&store);
        let since = r.ready_since.clone().expect("ready since");
        assert_eq!(r.snapshots.len(), MAX_SNAPSHOTS_SHOWN);
        assert_eq!(r.snapshots[0].id, "s11", "newest first");
        assert_eq!(r.snapshots[0].taken_at, "2023-11-14T22:13:31Z");
        // Still Ready: kept.
        reports.apply(&store, &id, report).unwrap();
        assert_eq!(read(&store).ready_since, Some(since));
        // Not Ready: cleared.
        rep.state = pb::ReplicaState::Unhealthy as i32;
        let report = pb::StatusReport {
            replicas: vec![rep],
            ..Default::default()
        };
        reports.apply(&store, &id, report).unwrap();
        assert_eq!(read(&store).ready_since, None);
    }
}
