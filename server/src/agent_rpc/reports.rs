//! Turns agent status reports into `OpenClawInstance.status` and `Host.status`, and keeps the
//! latest figures in memory for metrics; records when each host last reported in the store
//! (read by the host liveness controller).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clusterclaw_proto::agent as pb;
use serde_json::json;

use crate::batch::Batcher;
use crate::model::{
    Condition, ConfigSync, Host, HostCapacity, HostPhase, Kind, ObjectKey, Quantity, ReplicaState,
    Resource, format_cpu, format_memory, summarize,
};
use crate::store::volumes::ReportedVolume;
use crate::store::{Store, StoreError};
use crate::util::now_rfc3339;

use super::identity::HostIdentity;

/// `Host.status` is rewritten at least this often while reports arrive, even when nothing a
/// person reads in it changed (to refresh its usage figures and `lastHeartbeat`; when a host
/// last reported is kept apart, in the store's heartbeats, which host liveness reads).
pub const HOST_STATUS_REFRESH: Duration = Duration::from_secs(300);

/// A report that says what the host's previous one said is applied without touching the
/// objects only while it follows that one within this time: longer gaps (a host that was
/// silent, perhaps marked NotReady meanwhile) write everything again. Half the default
/// heartbeat timeout.
pub const UNCHANGED_REPORT_GAP: Duration = Duration::from_secs(15);

/// Heartbeats of unchanged reports are kept in memory and written together at most this often.
pub const HEARTBEAT_FLUSH: Duration = Duration::from_secs(1);

/// At most this many of the state volumes a report lists are kept (the agent sends at most
/// 256, sorted by name).
pub const MAX_VOLUMES_KEPT: usize = 1024;

/// The latest report of one host, kept in memory.
#[derive(Clone, Debug)]
pub struct HostReport {
    pub received: Instant,
    pub report: pb::StatusReport,
    status_written: Instant,
    /// What the host part of the report says that `Host.status` shows (see [`host_said`]).
    host_said: u64,
    /// What its replica entries say that the instances' status shows, with the host's
    /// assignments (see [`replicas_said`]).
    replicas_said: u64,
    /// Whether it was written in full: the host was current and no replica entry refused.
    clean: bool,
    /// Whether every replica entry of it was taken (none refused, none of a replica the store
    /// does not have): what is kept is what the host sent, so a delta can be applied onto it.
    whole: bool,
    /// The `resourceVersion` of the host object as this report's write left it: a report that
    /// finds another (the liveness controller marked the host NotReady, a person cordoned it)
    /// is written in full, whatever it says.
    host_version: Option<u64>,
    /// The store's index when the host object was last known to be at `host_version`: while
    /// the index stays there, nobody wrote anything since, so an unchanged report needs no
    /// look at the store (see [`Reports::take_unchanged`]).
    checked_index: Option<u64>,
}

/// Heartbeats waiting to be written, and when they last were.
#[derive(Default)]
struct PendingBeats {
    beats: HashMap<String, i64>,
    flushed: Option<Instant>,
}

/// Latest reports by host name.
#[derive(Default)]
pub struct Reports {
    hosts: Mutex<HashMap<String, HostReport>>,
    pending: Mutex<PendingBeats>,
    /// Reports applied without a write to the objects (nothing a person reads changed).
    unchanged: AtomicU64,
    /// Replica entries refused: from a host the replica is not placed on, or of an epoch older
    /// than the replica's current one.
    refused: AtomicU64,
    /// What each replica used lately, for the console's charts.
    history: Mutex<super::history::History>,
    /// Reports waiting for the next group write (started by the first [`Reports::submit`];
    /// none if its thread could not be started).
    queue: OnceLock<Option<Batcher<QueuedReport, Result<(), StoreError>>>>,
}

/// Most reports written in one group.
const MAX_REPORT_GROUP: usize = 512;
/// Most reports waiting for a group write (each host has at most one in flight per stream).
const REPORT_QUEUE: usize = 16_384;

/// A report handed to [`Reports::submit`].
pub struct QueuedReport {
    store: Arc<dyn Store>,
    host: HostIdentity,
    report: pb::StatusReport,
    assigned: Arc<super::book::HostAssignments>,
}

/// Why a replica entry of a report is not taken, if it is not: the reporting host is not the
/// one the replica is placed on, or the epoch it runs under is older than the placement's.
/// A placement without an epoch (made before epochs existed) takes any.
pub fn refuse_replica_report(
    placed: &crate::model::ReplicaStatus,
    host: &str,
    reported_epoch: u64,
) -> Option<String> {
    if placed.host.as_deref() != Some(host) {
        return Some(format!(
            "the replica is placed on {}, not on this host",
            placed.host.as_deref().unwrap_or("no host")
        ));
    }
    match placed.epoch {
        Some(current) if reported_epoch < current => Some(format!(
            "epoch {reported_epoch} is older than the replica's current epoch {current}"
        )),
        _ => None,
    }
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
    /// Applies `report` of `host` (whose current assignments are `assigned`) together with
    /// the reports of other hosts that arrive meanwhile: what must be written is written by one
    /// thread in groups, one transaction for a whole group ([`Reports::apply_many`]), so that
    /// a burst of reports from thousands of hosts costs a few syncs to disk, not one each.
    pub async fn submit(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        host: HostIdentity,
        report: pb::StatusReport,
        assigned: Arc<super::book::HostAssignments>,
    ) -> Result<(), StoreError> {
        // Most reports of an idle fleet: taken here, without a hand-off to the writer's thread.
        let Some(report) =
            self.take_unchanged(store.as_ref(), &host.name, report, &assigned.assignments)
        else {
            return Ok(());
        };
        let queue = self.queue.get_or_init(|| {
            let reports = Arc::downgrade(self);
            Batcher::start(
                "report-writer",
                MAX_REPORT_GROUP,
                REPORT_QUEUE,
                move |jobs: Vec<QueuedReport>| match reports.upgrade() {
                    Some(r) => r.apply_queued(jobs),
                    None => jobs
                        .iter()
                        .map(|_| Err(StoreError::Backend("the server is stopping".into())))
                        .collect(),
                },
            )
            .inspect_err(|e| {
                tracing::error!(error = %e, "cannot start the report writer; reports are written one by one")
            })
            .ok()
        });
        let job = QueuedReport {
            store,
            host,
            report,
            assigned,
        };
        match queue {
            Some(q) => q.submit(job).await.unwrap_or_else(|| {
                Err(StoreError::Backend(
                    "the report writer failed on this report's group".into(),
                ))
            }),
            None => {
                let this = self.clone();
                crate::util::blocking("ReportStatus", move || this.apply_queued(vec![job]))
                    .await
                    .map_err(|e| StoreError::Backend(e.to_string()))?
                    .pop()
                    .unwrap_or(Ok(()))
            }
        }
    }

    /// [`Reports::apply_many`] of queued reports, each with its store (one group per store).
    fn apply_queued(&self, jobs: Vec<QueuedReport>) -> Vec<Result<(), StoreError>> {
        let mut outcomes: Vec<Option<Result<(), StoreError>>> =
            std::iter::repeat_with(|| None).take(jobs.len()).collect();
        let mut stores = Vec::with_capacity(jobs.len());
        let mut assigned = Vec::with_capacity(jobs.len());
        let mut reports = Vec::with_capacity(jobs.len());
        for j in jobs {
            stores.push(j.store);
            assigned.push(j.assigned);
            reports.push(Some((j.host, j.report)));
        }
        let mut left: Vec<usize> = (0..stores.len()).collect();
        while let Some(&first) = left.first() {
            let store = stores[first].clone();
            let (same, other): (Vec<usize>, Vec<usize>) = left
                .into_iter()
                .partition(|&i| Arc::ptr_eq(&stores[i], &store));
            left = other;
            let items = same
                .iter()
                .filter_map(|&i| {
                    let (host, report) = reports[i].take()?;
                    Some(ReportItem {
                        host,
                        report,
                        assigned: &assigned[i].assignments,
                    })
                })
                .collect();
            for (i, r) in same.into_iter().zip(self.apply_many(store.as_ref(), items)) {
                outcomes[i] = Some(r);
            }
        }
        outcomes.into_iter().map(|o| o.unwrap_or(Ok(()))).collect()
    }

    /// The full report a report of `host` stands for: a full one as it is; a delta (see
    /// `StatusReport.base_seq`) applied onto the report held for `host`, when that is the one
    /// it was made against and was held whole (every entry accepted). Otherwise why not, and
    /// nothing is applied: the agent is asked for a full report.
    pub fn expand(
        &self,
        host: &str,
        mut report: pb::StatusReport,
    ) -> Result<pb::StatusReport, String> {
        if report.base_seq == 0 {
            report.removed.clear();
            report.figures.clear();
            return Ok(report);
        }
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(prev) = hosts.get(host) else {
            return Err(format!(
                "report {} is a delta onto report {}, and this server holds no report of the host",
                report.seq, report.base_seq
            ));
        };
        if prev.report.seq != report.base_seq {
            return Err(format!(
                "report {} is a delta onto report {}, and this server holds report {}",
                report.seq, report.base_seq, prev.report.seq
            ));
        }
        if !prev.whole {
            return Err(format!(
                "report {} is a delta onto report {}, some of whose entries were refused",
                report.seq, report.base_seq
            ));
        }
        let prev = prev.report.clone();
        drop(hosts);
        Ok(Self::expand_onto(prev, report))
    }

    /// The full report a delta `report` stands for, applied onto the full report `prev` it
    /// was made against.
    pub fn expand_onto(prev: pb::StatusReport, mut report: pb::StatusReport) -> pb::StatusReport {
        type Key<'k> = (&'k str, &'k str, &'k str, &'k str);
        let key = |r: &pb::ReplicaStatus| {
            (
                r.tenant.clone(),
                r.project.clone(),
                r.instance.clone(),
                r.replica.clone(),
            )
        };
        let removed: std::collections::HashSet<Key<'_>> = report
            .removed
            .iter()
            .map(|r| {
                (
                    r.tenant.as_str(),
                    r.project.as_str(),
                    r.instance.as_str(),
                    r.replica.as_str(),
                )
            })
            .collect();
        let mut replicas: Vec<pb::ReplicaStatus> = prev
            .replicas
            .into_iter()
            .filter(|r| {
                !removed.contains(&(
                    r.tenant.as_str(),
                    r.project.as_str(),
                    r.instance.as_str(),
                    r.replica.as_str(),
                ))
            })
            .collect();
        let mut at: HashMap<(String, String, String, String), usize> = replicas
            .iter()
            .enumerate()
            .map(|(i, r)| (key(r), i))
            .collect();
        for f in std::mem::take(&mut report.figures) {
            let Some(r) = f.replica else { continue };
            if let Some(&i) = at.get(&(r.tenant, r.project, r.instance, r.replica)) {
                replicas[i].stats = f.stats;
                replicas[i].gateway_metrics = f.gateway_metrics;
            }
        }
        for r in std::mem::take(&mut report.replicas) {
            match at.get(&key(&r)) {
                Some(&i) => replicas[i] = r,
                None => {
                    at.insert(key(&r), replicas.len());
                    replicas.push(r);
                }
            }
        }
        report.replicas = replicas;
        report.removed.clear();
        report.base_seq = 0;
        report
    }

    /// Whether the report held for `host` is report `seq`, every entry of it accepted (a delta
    /// onto it can be applied).
    pub fn holds(&self, host: &str, seq: u64) -> bool {
        seq != 0
            && self
                .hosts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(host)
                .is_some_and(|h| h.whole && h.report.seq == seq)
    }

    /// A snapshot of every host's latest report.
    pub fn snapshot(&self) -> HashMap<String, HostReport> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replica entries refused so far (see [`refuse_replica_report`]).
    pub fn refused_replica_reports(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The last hour of CPU and memory samples of an instance's replicas.
    pub fn usage_history(
        &self,
        tenant: &str,
        project: &str,
        instance: &str,
    ) -> Vec<super::history::ReplicaHistory> {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .of_instance(tenant, project, instance, Instant::now())
    }

    pub fn forget(&self, host: &str) {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget_host(host);
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(host);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .beats
            .remove(host);
    }

    /// Reports applied so far without a write to the objects.
    pub fn unchanged_reports(&self) -> u64 {
        self.unchanged.load(Ordering::Relaxed)
    }

    /// Notes that a report of `host` arrived now, before it is applied: a host whose reports
    /// wait behind the store's writer (a burst of placements) is alive all the same, and host
    /// liveness must not take the server's own backlog for the host's silence. Written by the
    /// next flush ([`Reports::flush_heartbeats`] or a report's).
    pub fn heard_from(&self, host: &str) {
        let at = crate::controllers::hosts::now_ms();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let beat = pending.beats.entry(host.to_string()).or_insert(at);
        *beat = (*beat).max(at);
    }

    /// Writes the heartbeats noted and not yet written, unless a report wrote them less than
    /// [`HEARTBEAT_FLUSH`] ago (blocking). Heartbeats whose write fails are kept for the next.
    /// Returns how many were written.
    pub fn flush_heartbeats(&self, store: &dyn Store) -> Result<usize, StoreError> {
        let now = Instant::now();
        let batch = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.beats.is_empty()
                || pending
                    .flushed
                    .is_some_and(|at| now.duration_since(at) < HEARTBEAT_FLUSH)
            {
                return Ok(0);
            }
            pending.flushed = Some(now);
            std::mem::take(&mut pending.beats)
        };
        let beats: Vec<(&str, i64)> = batch.iter().map(|(h, at)| (h.as_str(), *at)).collect();
        match store.record_heartbeats(&beats) {
            Ok(()) => Ok(beats.len()),
            Err(e) => {
                drop(beats);
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                for (host, at) in batch {
                    let beat = pending.beats.entry(host).or_insert(at);
                    *beat = (*beat).max(at);
                }
                Err(e)
            }
        }
    }

    /// Notes that `host` reported now; the heartbeats noted are written in one transaction
    /// once [`HEARTBEAT_FLUSH`] has passed since the last write (by the report that finds it
    /// so). An older time never replaces a newer one in the store.
    fn heartbeat_later(&self, store: &dyn Store, host: &str) -> Result<(), StoreError> {
        self.heard_from(host);
        self.flush_heartbeats(store).map(drop)
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
        report: pb::StatusReport,
        assigned: &[pb::Assignment],
    ) -> Result<(), StoreError> {
        self.apply_many(
            store,
            vec![ReportItem {
                host: host.clone(),
                report,
                assigned,
            }],
        )
        .pop()
        .unwrap_or(Ok(()))
    }

    /// [`Reports::apply_with`] for several reports at once (blocking): those that change what a
    /// person reads are written together, their heartbeats in one transaction and their hosts'
    /// and instances' status in one more (one sync to disk for the lot, however many hosts
    /// reported). Each report's outcome, in the order given: a report of a host that is gone
    /// fails alone; a failed write fails every report that needed it.
    pub fn apply_many(
        &self,
        store: &dyn Store,
        items: Vec<ReportItem<'_>>,
    ) -> Vec<Result<(), StoreError>> {
        let mut outcomes: Vec<Option<Result<(), StoreError>>> =
            std::iter::repeat_with(|| None).take(items.len()).collect();
        let mut waiting: Vec<(usize, Pending<'_>)> = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            match self.begin(store, item) {
                Ok(Some(p)) => waiting.push((i, p)),
                Ok(None) => outcomes[i] = Some(Ok(())),
                Err(e) => outcomes[i] = Some(Err(e)),
            }
        }
        // One report per host in a write: a second one of the same host (a stream opened
        // again) goes in the next, after the first.
        while !waiting.is_empty() {
            let mut names = std::collections::HashSet::new();
            let (mut now, later): (Vec<_>, Vec<_>) = waiting
                .into_iter()
                .partition(|(_, p)| names.insert(p.host.name.clone()));
            waiting = later;
            let mut batch: Vec<Pending<'_>> = Vec::with_capacity(now.len());
            let mut at: Vec<usize> = Vec::with_capacity(now.len());
            for (i, p) in now.drain(..) {
                at.push(i);
                batch.push(p);
            }
            match write_pending(store, &self.pending, &mut batch) {
                Ok(()) => {
                    for (i, p) in at.into_iter().zip(batch) {
                        outcomes[i] = Some(self.finish(store, p));
                    }
                }
                Err(e) => {
                    let failed = crate::store::failed_together(e, at.len());
                    for (i, r) in at.into_iter().zip(failed) {
                        outcomes[i] = Some(r);
                    }
                }
            }
        }
        outcomes.into_iter().map(|o| o.unwrap_or(Ok(()))).collect()
    }

    /// How `report` compares with the host's report before it, read in memory only.
    fn compare(
        &self,
        host: &str,
        report: &pb::StatusReport,
        host_now: u64,
        replicas_now: u64,
        now: Instant,
    ) -> Compared {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        match hosts.get(host) {
            None => Compared {
                refresh_host: true,
                unchanged: false,
                host_version: None,
                checked_index: None,
            },
            Some(prev) => Compared {
                refresh_host: now.duration_since(prev.status_written) >= HOST_STATUS_REFRESH
                    || prev.host_said != host_now,
                unchanged: prev.clean
                    && prev.replicas_said == replicas_now
                    && !report.volumes_listed
                    && now.duration_since(prev.received) < UNCHANGED_REPORT_GAP,
                host_version: prev.host_version,
                checked_index: prev.checked_index,
            },
        }
    }

    /// Keeps `report` as the host's newest without a write (it says what the one before said).
    fn note_unchanged(
        &self,
        host: &str,
        now: Instant,
        report: pb::StatusReport,
        checked_index: Option<u64>,
    ) {
        self.unchanged.fetch_add(1, Ordering::Relaxed);
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(host, now, &report.replicas);
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(prev) = hosts.get_mut(host) {
            prev.received = now;
            prev.report = report;
            if checked_index.is_some() {
                prev.checked_index = checked_index;
            }
        }
    }

    /// Takes a report that says what the host's report before it said, when nothing was
    /// written to the store since that one was checked against the host object, without any
    /// look at the store: no read, no wait for the report writer's thread. Non-blocking. Gives
    /// the report back when it needs [`Reports::apply_many`] (`None`: taken). Its heartbeat is
    /// noted (the caller took it off the stream) and written with the next batch.
    pub fn take_unchanged(
        &self,
        store: &dyn Store,
        host: &str,
        report: pb::StatusReport,
        assigned: &[pb::Assignment],
    ) -> Option<pb::StatusReport> {
        let now = Instant::now();
        let host_now = host_said(&report);
        let replicas_now = replicas_said(&report.replicas, assigned);
        let seen = self.compare(host, &report, host_now, replicas_now, now);
        // The host object is where it was when checked, as long as nothing at all was written
        // since: the index moves with every write (on PostgreSQL, with every server's write once
        // its notice arrives, so a report taken before another server's notice is checked by
        // the next one).
        let untouched = seen.host_version.is_some() && seen.checked_index == Some(store.index());
        if !(seen.unchanged && !seen.refresh_host && untouched) {
            return Some(report);
        }
        self.heard_from(host);
        self.note_unchanged(host, now, report, None);
        None
    }

    /// Applies at once what needs no write (a report that says what the previous one said);
    /// else what the write needs.
    fn begin<'a>(
        &self,
        store: &dyn Store,
        item: ReportItem<'a>,
    ) -> Result<Option<Pending<'a>>, StoreError> {
        let ReportItem {
            host,
            report,
            assigned,
        } = item;
        let now = Instant::now();
        let host_now = host_said(&report);
        let replicas_now = replicas_said(&report.replicas, assigned);
        let seen = self.compare(&host.name, &report, host_now, replicas_now, now);
        // The index first: a write to the host after it moves the index, so the next report
        // looks again.
        let index = store.index();
        // Nobody else wrote the host since (one column of one row: no body is read).
        let host_untouched = || -> Result<bool, StoreError> {
            Ok(seen.host_version.is_some()
                && store.resource_version(&ObjectKey::cluster(Kind::Host, &host.name))?
                    == seen.host_version)
        };
        if seen.unchanged && !seen.refresh_host && host_untouched()? {
            // Nothing a person reads changed: no object is read or written, the heartbeat
            // waits for the next batch.
            self.heartbeat_later(store, &host.name)?;
            self.note_unchanged(&host.name, now, report, Some(index));
            return Ok(None);
        }
        let refresh_host = seen.refresh_host;
        let expected_content: HashMap<(&str, &str, &str), (&str, &str)> = assigned
            .iter()
            .map(|a| {
                (
                    (a.tenant.as_str(), a.project.as_str(), a.replica.as_str()),
                    (a.config_hash.as_str(), a.content_hash.as_str()),
                )
            })
            .collect();
        let mut by_instance: HashMap<ObjectKey, Vec<usize>> = HashMap::new();
        for (i, r) in report.replicas.iter().enumerate() {
            by_instance
                .entry(ObjectKey::instance(&r.tenant, &r.project, &r.instance))
                .or_default()
                .push(i);
        }
        let n = report.replicas.len();
        Ok(Some(Pending {
            host,
            report,
            expected_content,
            now,
            host_now,
            replicas_now,
            refresh_host,
            by_instance,
            host_is_current: false,
            wrote_host: false,
            host_version: None,
            turned_ready: false,
            accepted: vec![false; n],
            refused: vec![None; n],
        }))
    }

    /// What follows a report's write: its volumes, its refusals, its event and what is kept
    /// in memory.
    fn finish(&self, store: &dyn Store, p: Pending<'_>) -> Result<(), StoreError> {
        let Pending {
            host,
            mut report,
            now,
            host_now,
            replicas_now,
            host_is_current,
            wrote_host,
            turned_ready,
            accepted,
            refused,
            host_version,
            ..
        } = p;
        if !host_is_current {
            return Err(StoreError::NotFound(ObjectKey::cluster(
                Kind::Host,
                &host.name,
            )));
        }
        if report.volumes_listed {
            let listed: Vec<ReportedVolume> = report
                .volumes
                .iter()
                .take(MAX_VOLUMES_KEPT)
                .map(|v| ReportedVolume {
                    name: v.name.clone(),
                    tenant: v.tenant.clone(),
                    project: v.project.clone(),
                    instance: v.instance.clone(),
                    replica: v.replica.clone(),
                })
                .collect();
            store.record_host_volumes(&host.name, &listed, &now_rfc3339())?;
            // The store holds the list; what is kept in memory for metrics does not need it.
            report.volumes = Vec::new();
        }
        for (r, why) in report.replicas.iter().zip(&refused) {
            if let Some(why) = why {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    host = %host.name,
                    replica = %r.replica,
                    epoch = r.epoch,
                    container = %r.container_id,
                    "refusing a replica report: {why}"
                );
            }
        }
        if turned_ready {
            crate::events::record(
                store,
                host_ready_event(&host.name, "the host reports again and is Ready"),
            );
        }
        let clean = refused.iter().all(Option::is_none);
        let whole = accepted.iter().all(|a| *a);
        let mut accepted = accepted.into_iter();
        report.replicas.retain(|_| accepted.next().unwrap_or(false));
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(&host.name, now, &report.replicas);
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
                host_said: host_now,
                replicas_said: replicas_now,
                clean,
                whole,
                host_version,
                // Conservative: the index was at least there when the host was.
                checked_index: host_version,
            },
        );
        Ok(())
    }
}

/// One report to apply: the host that sent it (from its certificate) and its assignments.
pub struct ReportItem<'a> {
    pub host: HostIdentity,
    pub report: pb::StatusReport,
    pub assigned: &'a [pb::Assignment],
}

/// How a report compares with the host's report before it ([`Reports::compare`]).
struct Compared {
    /// `Host.status` is due: what it shows changed, or its slow refresh is.
    refresh_host: bool,
    /// Its replica entries say what the clean report before said, recently enough.
    unchanged: bool,
    host_version: Option<u64>,
    checked_index: Option<u64>,
}

/// A report whose write is due, and what the write found.
struct Pending<'a> {
    host: HostIdentity,
    report: pb::StatusReport,
    /// (tenant, project, replica) → (config hash, content hash) assigned.
    expected_content: HashMap<(&'a str, &'a str, &'a str), (&'a str, &'a str)>,
    now: Instant,
    host_now: u64,
    replicas_now: u64,
    refresh_host: bool,
    /// The report's replica entries by instance.
    by_instance: HashMap<ObjectKey, Vec<usize>>,
    host_is_current: bool,
    wrote_host: bool,
    /// The host's `resourceVersion` once the write is done.
    host_version: Option<u64>,
    turned_ready: bool,
    accepted: Vec<bool>,
    refused: Vec<Option<String>>,
}

/// Writes the reports of `batch` (one per host): their heartbeats in one transaction, then
/// each host's status and its replicas' states in one more, a host's replicas only while the
/// host still exists with the uid of its certificate.
fn write_pending(
    store: &dyn Store,
    beats: &Mutex<PendingBeats>,
    batch: &mut [Pending<'_>],
) -> Result<(), StoreError> {
    // The heartbeats first: a liveness pass that reads them after this sees the hosts alive,
    // even before the reports' writes commit. One upsert each, outside the global index.
    {
        let mut pending = beats.lock().unwrap_or_else(|e| e.into_inner());
        for p in batch.iter() {
            pending.beats.remove(&p.host.name);
        }
    }
    let at = crate::controllers::hosts::now_ms();
    let heartbeats: Vec<(&str, i64)> = batch.iter().map(|p| (p.host.name.as_str(), at)).collect();
    store.record_heartbeats(&heartbeats)?;
    drop(heartbeats);
    let by_host: HashMap<String, usize> = batch
        .iter()
        .enumerate()
        .map(|(i, p)| (p.host.name.clone(), i))
        .collect();
    let mut by_instance: std::collections::BTreeMap<ObjectKey, Vec<usize>> =
        std::collections::BTreeMap::new();
    for (i, p) in batch.iter().enumerate() {
        for key in p.by_instance.keys() {
            by_instance.entry(key.clone()).or_default().push(i);
        }
    }
    let mut host_keys: Vec<ObjectKey> = batch
        .iter()
        .map(|p| ObjectKey::cluster(Kind::Host, &p.host.name))
        .collect();
    host_keys.sort();
    // The hosts first: a host's replicas are only written once it is known to be this one.
    let keys: Vec<ObjectKey> = host_keys
        .into_iter()
        .chain(by_instance.keys().cloned())
        .collect();
    let now_ready = crate::util::now_rfc3339_millis();
    let written = store.update_many(&keys, &mut |res| match res {
        Resource::Host(h) => {
            let Some(p) = by_host.get(&h.metadata.name).map(|&i| &mut batch[i]) else {
                return false;
            };
            if h.metadata.uid.as_deref() != Some(p.host.uid.as_str()) {
                return false;
            }
            p.host_is_current = true;
            p.host_version = h.metadata.resource_version;
            let phase_changed = h.status.as_ref().map(|s| s.phase) != Some(HostPhase::Ready);
            if !(p.refresh_host || phase_changed) {
                return false;
            }
            p.turned_ready = phase_changed;
            p.wrote_host = true;
            write_host_status(h, &p.report);
            true
        }
        Resource::OpenClawInstance(inst) => {
            let key = inst.key();
            let Some(from) = by_instance.get(&key) else {
                return false;
            };
            let Some(status) = inst.status.as_mut() else {
                return false;
            };
            // Written only when what it shows changed: a host's report that changed one
            // replica does not rewrite every other instance the host runs.
            let before = status.clone();
            let mut reported_here = false;
            for &b in from {
                let p = &mut batch[b];
                if !p.host_is_current {
                    continue;
                }
                let Some(reported) = p.by_instance.get(&key) else {
                    continue;
                };
                reported_here = true;
                for &i in reported {
                    let rep = &p.report.replicas[i];
                    let Some(entry) = status
                        .replica_status
                        .iter_mut()
                        .find(|e| e.name == rep.replica)
                    else {
                        continue;
                    };
                    if let Some(why) = refuse_replica_report(entry, &p.host.name, rep.epoch) {
                        // Counted once per report, not per store retry of this closure.
                        p.refused[i] = Some(why);
                        continue;
                    }
                    p.accepted[i] = true;
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
                    entry.config_sync = config_sync(&p.expected_content, rep);
                }
            }
            if !reported_here {
                return false;
            }
            summarize(inst);
            inst.status.as_ref() != Some(&before)
        }
        Resource::Tenant(_)
        | Resource::Project(_)
        | Resource::ConfigTemplate(_)
        | Resource::Secret(_)
        | Resource::Rollout(_) => false,
    })?;
    // A host written here now carries the transaction's index as its version.
    if let Some(index) = written {
        for p in batch.iter_mut().filter(|p| p.wrote_host) {
            p.host_version = Some(index);
        }
    }
    Ok(())
}

/// A digest of what a report says about its host that `Host.status` shows and that is not a
/// figure refreshed at [`HOST_STATUS_REFRESH`]: the runtime condition, capacity and agent
/// version.
fn host_said(report: &pb::StatusReport) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    if let Some(r) = &report.runtime {
        (r.ready, &r.runtime, &r.version, &r.message).hash(&mut h);
    }
    if let Some(c) = report.host.as_ref().and_then(|f| f.capacity.as_ref()) {
        (c.cpu_millis, c.memory_bytes, c.disk_bytes).hash(&mut h);
    }
    report.agent_version.hash(&mut h);
    h.finish()
}

/// A digest of everything of a report's replica entries that the instances' status shows
/// (not their figures, which are kept in memory only), with what the host is assigned (which
/// `configSync` compares them with).
fn replicas_said(replicas: &[pb::ReplicaStatus], assigned: &[pb::Assignment]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    replicas.len().hash(&mut h);
    for r in replicas {
        (&r.tenant, &r.project, &r.instance, &r.replica, r.ordinal).hash(&mut h);
        (
            r.generation,
            r.state,
            &r.message,
            &r.container_id,
            r.restarts,
        )
            .hash(&mut h);
        (r.host_port, &r.config_hash, r.config_revision).hash(&mut h);
        (&r.observed_content_hash, r.epoch).hash(&mut h);
        for s in &r.snapshots {
            (&s.id, &s.image, s.taken_unix_ms, s.bytes).hash(&mut h);
        }
    }
    assigned.len().hash(&mut h);
    for a in assigned {
        (
            &a.tenant,
            &a.project,
            &a.replica,
            &a.config_hash,
            &a.content_hash,
        )
            .hash(&mut h);
    }
    h.finish()
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
    status.not_ready_since = None;
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

/// The event of a host turning NotReady (for whichever check decides it).
pub fn host_not_ready_event(host: &str, message: &str) -> crate::events::Event {
    crate::events::Event::warning(
        crate::model::ObjectKey::cluster(crate::model::Kind::Host, host),
        "HostNotReady",
        message,
    )
    .source("hosts")
}

/// The event of a host turning Ready (after enrollment or after being NotReady).
pub fn host_ready_event(host: &str, message: &str) -> crate::events::Event {
    crate::events::Event::normal(
        crate::model::ObjectKey::cluster(crate::model::Kind::Host, host),
        "HostReady",
        message,
    )
    .source("hosts")
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

    /// A report of `bot-0` of `t/p/bot`, placed on `h1` by [`setup`].
    fn bot_report() -> pb::StatusReport {
        pb::StatusReport {
            replicas: vec![replica("t", "p", "bot", "bot-0")],
            ..Default::default()
        }
    }

    /// What host liveness writes for a host it found silent.
    fn mark_not_ready(store: &SqliteStore, host: &ObjectKey) {
        store
            .update(host, &mut |r| {
                let Resource::Host(h) = r else { return false };
                h.status.get_or_insert_with(Default::default).phase = HostPhase::NotReady;
                true
            })
            .unwrap()
            .unwrap();
    }

    fn state_of(store: &SqliteStore, key: &ObjectKey) -> ReplicaState {
        let Resource::OpenClawInstance(i) = store.get(key).unwrap().unwrap().resource().unwrap()
        else {
            panic!("{key} is not an instance")
        };
        i.status.unwrap().replica_status[0].state
    }

    #[test]
    fn deltas_apply_onto_the_held_report_and_a_gap_or_refusal_applies_nothing() {
        let (_dir, store, id) = setup();
        let key = ObjectKey::instance("t", "p", "bot");
        store
            .update(&key, &mut |r| {
                let Resource::OpenClawInstance(i) = r else {
                    return false;
                };
                i.status.as_mut().unwrap().replica_status[0].epoch = Some(5);
                true
            })
            .unwrap();
        let reports = Reports::default();
        let mut bot0 = replica("t", "p", "bot", "bot-0");
        bot0.epoch = 5;
        bot0.state = pb::ReplicaState::Running as i32;
        let bot0_ref = pb::ReplicaRef {
            tenant: "t".into(),
            project: "p".into(),
            instance: "bot".into(),
            replica: "bot-0".into(),
        };
        let apply = |r: pb::StatusReport| {
            let full = reports.expand("h1", r).unwrap();
            reports.apply(&store, &id, full).unwrap();
        };
        apply(pb::StatusReport {
            seq: 10,
            replicas: vec![bot0.clone()],
            ..Default::default()
        });
        assert!(reports.holds("h1", 10));
        assert_eq!(state_of(&store, &key), ReplicaState::Running);

        // Newer figures only: kept in memory, nothing written.
        let index = store.index();
        let figures = pb::StatusReport {
            seq: 11,
            base_seq: 10,
            figures: vec![pb::ReplicaFigures {
                replica: Some(bot0_ref.clone()),
                stats: Some(pb::ContainerStats {
                    cpu_percent: 99.0,
                    ..Default::default()
                }),
                gateway_metrics: None,
            }],
            ..Default::default()
        };
        let merged = reports.expand("h1", figures.clone()).unwrap();
        assert_eq!(merged.base_seq, 0);
        assert_eq!(merged.replicas.len(), 1);
        assert_eq!(merged.replicas[0].state, pb::ReplicaState::Running as i32);
        apply(figures);
        assert_eq!(store.index(), index, "nothing a person reads changed");
        assert!(reports.holds("h1", 11));
        assert_eq!(
            reports.snapshot()["h1"].report.replicas[0]
                .stats
                .unwrap()
                .cpu_percent,
            99.0
        );

        // A changed entry is written.
        let mut ready = bot0.clone();
        ready.state = pb::ReplicaState::Ready as i32;
        apply(pb::StatusReport {
            seq: 12,
            base_seq: 11,
            replicas: vec![ready],
            ..Default::default()
        });
        assert_eq!(state_of(&store, &key), ReplicaState::Ready);

        // A delta onto a report the server does not hold applies nothing.
        let mut failed = bot0.clone();
        failed.state = pb::ReplicaState::Failed as i32;
        let gap = pb::StatusReport {
            seq: 13,
            base_seq: 11,
            replicas: vec![failed.clone()],
            ..Default::default()
        };
        let why = reports.expand("h1", gap.clone()).unwrap_err();
        assert!(why.contains("holds report 12"), "{why}");
        let why = reports.expand("h2", gap).unwrap_err();
        assert!(why.contains("holds no report"), "{why}");
        assert_eq!(state_of(&store, &key), ReplicaState::Ready);

        // An entry of a delta is checked like one of a full report: a stale epoch is refused,
        // and no delta applies onto what was held then.
        let mut stale = failed;
        stale.epoch = 4;
        apply(pb::StatusReport {
            seq: 14,
            base_seq: 12,
            replicas: vec![stale],
            ..Default::default()
        });
        assert_eq!(state_of(&store, &key), ReplicaState::Ready);
        assert_eq!(reports.refused_replica_reports(), 1);
        assert!(!reports.holds("h1", 14));
        let why = reports
            .expand(
                "h1",
                pb::StatusReport {
                    seq: 15,
                    base_seq: 14,
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(why.contains("refused"), "{why}");

        // A full report starts again; a removed replica leaves what is held.
        apply(pb::StatusReport {
            seq: 16,
            replicas: vec![bot0],
            ..Default::default()
        });
        assert!(reports.holds("h1", 16));
        let gone = reports
            .expand(
                "h1",
                pb::StatusReport {
                    seq: 17,
                    base_seq: 16,
                    removed: vec![bot0_ref],
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(gone.replicas.is_empty() && gone.removed.is_empty());
    }

    #[test]
    fn reports_of_many_hosts_are_written_in_one_transaction_and_fail_alone() {
        let (_dir, store, h1) = setup();
        let h2 = Resource::from_value(serde_json::json!({"apiVersion": "clusterclaw.io/v1",
            "kind": "Host", "metadata": {"name": "h2"},
            "spec": {"hostname": "h2", "capacity": {"cpu": "4", "memory": "8Gi"}}}))
        .unwrap();
        let written = store.write(&[(h2, WriteMode::Apply)], false).unwrap();
        let h2 = HostIdentity {
            name: "h2".into(),
            uid: written.results[0].object.uid.clone(),
        };
        let gone = HostIdentity {
            name: "h3".into(),
            uid: "not-a-host".into(),
        };
        let reports = Reports::default();
        let report = |r: pb::ReplicaStatus| pb::StatusReport {
            replicas: vec![r],
            ..Default::default()
        };
        let before = store.index();
        let outcomes = reports.apply_many(
            &store,
            vec![
                ReportItem {
                    host: h1,
                    report: report(replica("t", "p", "bot", "bot-0")),
                    assigned: &[],
                },
                ReportItem {
                    host: gone,
                    report: report(replica("t", "p", "bot", "bot-0")),
                    assigned: &[],
                },
                ReportItem {
                    host: h2,
                    report: report(replica("other", "q", "secret", "secret-0")),
                    assigned: &[],
                },
            ],
        );
        assert!(outcomes[0].is_ok(), "{outcomes:?}");
        assert!(
            matches!(&outcomes[1], Err(StoreError::NotFound(k)) if k.name == "h3"),
            "{outcomes:?}"
        );
        assert!(outcomes[2].is_ok(), "{outcomes:?}");
        assert_eq!(
            store.index(),
            before + 1,
            "both hosts, both instances: one write"
        );
        for key in [
            ObjectKey::instance("t", "p", "bot"),
            ObjectKey::instance("other", "q", "secret"),
        ] {
            assert_eq!(state_of(&store, &key), ReplicaState::Ready, "{key}");
        }
        for host in ["h1", "h2"] {
            let phase = match store.get(&ObjectKey::cluster(Kind::Host, host)) {
                Ok(Some(o)) => match o.resource() {
                    Ok(Resource::Host(h)) => h.status.map(|s| s.phase),
                    _ => None,
                },
                _ => None,
            };
            assert_eq!(phase, Some(HostPhase::Ready), "{host}");
        }
        let beats = store.host_heartbeats().unwrap();
        assert!(
            beats.contains_key("h1") && beats.contains_key("h2"),
            "{beats:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn submitted_reports_are_applied() {
        let (_dir, store, h1) = setup();
        let store = Arc::new(store);
        let reports = Arc::new(Reports::default());
        reports
            .submit(
                store.clone(),
                h1,
                pb::StatusReport {
                    replicas: vec![replica("t", "p", "bot", "bot-0")],
                    ..Default::default()
                },
                Arc::default(),
            )
            .await
            .unwrap();
        assert_eq!(
            state_of(&store, &ObjectKey::instance("t", "p", "bot")),
            ReplicaState::Ready
        );
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
        let replica_series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("clusterclaw_replica_"))
            .collect();
        assert!(
            replica_series
                .iter()
                .all(|l| !l.contains("secret") && !l.contains("ghost")),
            "a host publishes series only for its own replicas:\n{text}"
        );
    }

    #[test]
    fn reports_keep_the_cordon_and_record_the_heartbeat_outside_the_index() {
        let (_dir, store, id) = setup();
        let key = ObjectKey::cluster(Kind::Host, "h1");
        store
            .update(&key, &mut |r| {
                let Resource::Host(h) = r else { return false };
                h.spec.unschedulable = true;
                let s = h.status.get_or_insert_with(Default::default);
                s.phase = HostPhase::NotReady;
                s.not_ready_since = Some("2026-01-01T00:00:00.000Z".into());
                true
            })
            .unwrap();
        let reports = Reports::default();
        let report = pb::StatusReport {
            replicas: vec![replica("t", "p", "bot", "bot-0")],
            ..Default::default()
        };
        reports.apply(&store, &id, report.clone()).unwrap();
        let Resource::Host(h) = store.get(&key).unwrap().unwrap().resource().unwrap() else {
            panic!()
        };
        assert!(h.spec.unschedulable, "a report never clears the cordon");
        let s = h.status.unwrap();
        assert_eq!(s.phase, HostPhase::Ready);
        assert_eq!(s.not_ready_since, None);
        let first = store.host_heartbeats().unwrap()["h1"];
        // A report that changes nothing else moves no index, but the heartbeat.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let instance = ObjectKey::instance("t", "p", "bot");
        let before = store.get(&instance).unwrap().unwrap().resource_version;
        reports.apply(&store, &id, report).unwrap();
        assert_eq!(
            store.get(&instance).unwrap().unwrap().resource_version,
            before
        );
        assert!(store.host_heartbeats().unwrap()["h1"] > first);
    }

    #[test]
    fn unchanged_reports_write_no_object_and_batch_their_heartbeats() {
        let (_dir, store, id) = setup();
        let reports = Reports::default();
        let report = bot_report();
        reports.apply(&store, &id, report.clone()).unwrap();
        let index = store.index();
        // The first unchanged report writes the heartbeats noted so far (none were yet).
        reports.apply(&store, &id, report.clone()).unwrap();
        let first = store.host_heartbeats().unwrap()["h1"];
        std::thread::sleep(Duration::from_millis(5));
        // Its figures change, nothing a person reads does: no object is written and the
        // heartbeat waits for the next batch.
        let mut figures = report.clone();
        figures.replicas[0].stats.as_mut().unwrap().cpu_percent = 50.0;
        reports.apply(&store, &id, figures).unwrap();
        assert_eq!(store.index(), index);
        assert_eq!(reports.unchanged_reports(), 2);
        assert_eq!(store.host_heartbeats().unwrap()["h1"], first);
        let kept = &reports.snapshot()["h1"].report;
        assert_eq!(
            kept.replicas[0].stats.unwrap().cpu_percent,
            50.0,
            "the figures kept for metrics are the latest"
        );
        std::thread::sleep(HEARTBEAT_FLUSH);
        reports.apply(&store, &id, report.clone()).unwrap();
        assert!(store.host_heartbeats().unwrap()["h1"] > first);
        assert_eq!(store.index(), index);
        // A change of state is written at once.
        let mut failed = report;
        failed.replicas[0].state = pb::ReplicaState::Failed as i32;
        reports.apply(&store, &id, failed).unwrap();
        assert!(store.index() > index);
        assert_eq!(
            state_of(&store, &ObjectKey::instance("t", "p", "bot")),
            ReplicaState::Failed
        );
    }

    #[test]
    fn a_host_marked_not_ready_meanwhile_is_written_ready_by_a_report_that_says_the_same() {
        let (_dir, store, id) = setup();
        let reports = Reports::default();
        let report = bot_report();
        reports.apply(&store, &id, report.clone()).unwrap();
        let host = ObjectKey::cluster(Kind::Host, "h1");
        let instance = ObjectKey::instance("t", "p", "bot");
        // What host liveness writes for a host it found silent (here while its reports were
        // still arriving: a late mark, as when the heartbeats waited behind a busy store).
        mark_not_ready(&store, &host);
        store
            .update(&instance, &mut |r| {
                let Resource::OpenClawInstance(i) = r else {
                    return false;
                };
                i.status.as_mut().unwrap().replica_status[0].state = ReplicaState::Unknown;
                true
            })
            .unwrap()
            .unwrap();
        // The next report says what the last one said, within the unchanged gap.
        reports.apply(&store, &id, report.clone()).unwrap();
        let Resource::Host(h) = store.get(&host).unwrap().unwrap().resource().unwrap() else {
            panic!("h1 is not a host")
        };
        assert_eq!(h.status.unwrap().phase, HostPhase::Ready);
        assert_eq!(state_of(&store, &instance), ReplicaState::Ready);
        // Once written, the same report again writes nothing.
        let index = store.index();
        reports.apply(&store, &id, report).unwrap();
        assert_eq!(store.index(), index);
    }

    #[test]
    fn an_unchanged_report_is_taken_without_the_store_until_anything_is_written() {
        let (_dir, store, id) = setup();
        let reports = Reports::default();
        let report = bot_report();
        // Never seen: the report needs the writer.
        assert!(
            reports
                .take_unchanged(&store, "h1", report.clone(), &[])
                .is_some()
        );
        reports.apply(&store, &id, report.clone()).unwrap();
        // The first like report is checked against the host object once (the index moved with
        // the report's own write since it was taken)...
        let first = reports.take_unchanged(&store, "h1", report.clone(), &[]);
        if let Some(r) = first {
            reports.apply(&store, &id, r).unwrap();
        }
        // ... and from then on like reports are taken in memory, without a write.
        let index = store.index();
        let unchanged = reports.unchanged.load(Ordering::Relaxed);
        for _ in 0..3 {
            assert!(
                reports
                    .take_unchanged(&store, "h1", report.clone(), &[])
                    .is_none(),
                "an unchanged report of an idle store is taken in memory"
            );
        }
        assert_eq!(store.index(), index);
        assert_eq!(reports.unchanged.load(Ordering::Relaxed), unchanged + 3);
        // A different report is not.
        let mut other = report.clone();
        other.replicas[0].restarts += 1;
        assert!(reports.take_unchanged(&store, "h1", other, &[]).is_some());
        // Any write to the store (here host liveness marking the host) sends the next like
        // report through the writer, which finds the host changed and writes it Ready.
        let host = ObjectKey::cluster(Kind::Host, "h1");
        mark_not_ready(&store, &host);
        let back = reports
            .take_unchanged(&store, "h1", report.clone(), &[])
            .expect("a like report after a write is checked against the store");
        reports.apply(&store, &id, back).unwrap();
        let Resource::Host(h) = store.get(&host).unwrap().unwrap().resource().unwrap() else {
            panic!("h1 is not a host")
        };
        assert_eq!(h.status.unwrap().phase, HostPhase::Ready);
    }

    #[test]
    fn a_report_taken_counts_as_a_heartbeat_before_it_is_applied() {
        let (_dir, store, _id) = setup();
        let reports = Reports::default();
        let before = crate::controllers::hosts::now_ms();
        reports.heard_from("h1");
        assert_eq!(reports.flush_heartbeats(&store).unwrap(), 1);
        assert!(store.host_heartbeats().unwrap()["h1"] >= before);
        // Nothing new: nothing written.
        std::thread::sleep(HEARTBEAT_FLUSH);
        assert_eq!(reports.flush_heartbeats(&store).unwrap(), 0);
    }

    #[test]
    fn listed_volumes_are_stored_without_moving_the_index() {
        let (_dir, store, id) = setup();
        let reports = Reports::default();
        let volume = |name: &str, replica: &str| pb::StateVolume {
            name: name.into(),
            tenant: "t".into(),
            project: "p".into(),
            instance: "bot".into(),
            replica: replica.into(),
        };
        let listed = pb::StatusReport {
            volumes: vec![volume("v0", "bot-0"), volume("v9", "bot-9")],
            volumes_listed: true,
            volumes_total: 2,
            ..Default::default()
        };
        reports.apply(&store, &id, listed.clone()).unwrap();
        let index = store.index();
        let names = |store: &SqliteStore| -> Vec<String> {
            store
                .host_volumes(Some("h1"))
                .unwrap()
                .into_iter()
                .map(|v| v.volume.name)
                .collect()
        };
        assert_eq!(names(&store), ["v0", "v9"]);
        // A report without the list keeps it; a new list replaces it.
        reports
            .apply(&store, &id, pb::StatusReport::default())
            .unwrap();
        assert_eq!(names(&store), ["v0", "v9"]);
        let fewer = pb::StatusReport {
            volumes: vec![volume("v0", "bot-0")],
            volumes_listed: true,
            volumes_total: 1,
            ..Default::default()
        };
        reports.apply(&store, &id, fewer).unwrap();
        assert_eq!(names(&store), ["v0"]);
        assert_eq!(store.index(), index, "volume lists move no index");
        let views = crate::controllers::volumes::views(&store, None).unwrap();
        assert_eq!(
            views[0].status,
            crate::controllers::volumes::VolumeStatus::InUse,
            "bot-0 is placed on h1"
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
        assert!(!reports.snapshot().contains_key("h1"));

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

#[cfg(test)]
mod fencing_tests {
    use super::refuse_replica_report;
    use crate::model::ReplicaStatus;

    #[test]
    fn reports_of_stale_epochs_or_other_hosts_are_refused() {
        let placed = ReplicaStatus {
            name: "bot-0".into(),
            host: Some("h2".into()),
            epoch: Some(12),
            ..ReplicaStatus::default()
        };
        assert_eq!(refuse_replica_report(&placed, "h2", 12), None);
        assert_eq!(refuse_replica_report(&placed, "h2", 13), None);
        let why = refuse_replica_report(&placed, "h2", 11).unwrap();
        assert_eq!(why, "epoch 11 is older than the replica's current epoch 12");
        assert!(refuse_replica_report(&placed, "h2", 0).is_some());
        let why = refuse_replica_report(&placed, "h1", 12).unwrap();
        assert_eq!(why, "the replica is placed on h2, not on this host");
        // A placement made before epochs takes any.
        let legacy = ReplicaStatus {
            epoch: None,
            ..placed
        };
        assert_eq!(refuse_replica_report(&legacy, "h2", 0), None);
    }
}
