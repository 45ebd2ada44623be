//! Turns agent status reports into `OpenClawInstance.status` and `Host.status`, and keeps the
//! latest figures in memory for metrics and heartbeat checks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use clusterclaw_proto::agent as pb;
use serde_json::json;

use crate::model::{
    Condition, HostCapacity, HostPhase, ObjectKey, Quantity, ReplicaState, Resource, format_cpu,
    format_memory, summarize,
};
use crate::store::{Store, StoreError};

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

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
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
    pub fn apply(
        &self,
        store: &dyn Store,
        host: &HostIdentity,
        report: pb::StatusReport,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let write_host = {
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
        self.apply_replicas(store, host, &report)?;
        let host_key = ObjectKey::cluster(crate::model::Kind::Host, &host.name);
        let mut wrote = false;
        let runtime = report.runtime.clone().unwrap_or_default();
        let figures = report.host.unwrap_or_default();
        store.update(&host_key, &mut |r| {
            let Resource::Host(h) = r else { return false };
            let status = h.status.get_or_insert_with(Default::default);
            let phase_changed = status.phase != HostPhase::Ready;
            if !(write_host || phase_changed) {
                return false;
            }
            wrote = true;
            status.phase = HostPhase::Ready;
            status.message = None;
            status.last_heartbeat = Some(now_rfc3339());
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
                _ => Some(now_rfc3339()),
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
            true
        })?;
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let status_written = match hosts.get(&host.name) {
            Some(prev) if !wrote => prev.status_written,
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

    fn apply_replicas(
        &self,
        store: &dyn Store,
        host: &HostIdentity,
        report: &pb::StatusReport,
    ) -> Result<(), StoreError> {
        let mut by_instance: HashMap<ObjectKey, Vec<&pb::ReplicaStatus>> = HashMap::new();
        for r in &report.replicas {
            by_instance
                .entry(ObjectKey::instance(&r.tenant, &r.project, &r.instance))
                .or_default()
                .push(r);
        }
        if by_instance.is_empty() {
            return Ok(());
        }
        let mut keys: Vec<ObjectKey> = by_instance.keys().cloned().collect();
        keys.sort();
        store.update_many(&keys, &mut |res| {
            let Resource::OpenClawInstance(inst) = res else {
                return false;
            };
            let Some(reported) = by_instance.get(&res_key(inst)) else {
                return false;
            };
            let Some(status) = inst.status.as_mut() else {
                return false;
            };
            for rep in reported {
                let Some(entry) = status.replica_status.iter_mut().find(|e| {
                    e.name == rep.replica && e.host.as_deref() == Some(host.name.as_str())
                }) else {
                    continue;
                };
                entry.state = replica_state(rep.state);
                entry.message = non_empty(&rep.message);
                entry.container_id = non_empty(&rep.container_id);
                entry.restarts = rep.restarts;
                entry.host_port = u16::try_from(rep.host_port).ok().filter(|p| *p != 0);
                entry.config_hash = non_empty(&rep.config_hash);
                entry.generation = (rep.generation > 0).then_some(rep.generation);
            }
            summarize(inst);
            true
        })?;
        Ok(())
    }
}

fn res_key(i: &crate::model::OpenClawInstance) -> ObjectKey {
    ObjectKey::instance(
        i.metadata.tenant.clone().unwrap_or_default(),
        i.metadata.project.clone().unwrap_or_default(),
        &i.metadata.name,
    )
}

/// Marks hosts NotReady when their reports stop (blocking; run periodically). A host that has
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
