//! Host liveness: a host whose agent stops reporting for the heartbeat timeout turns NotReady,
//! and every replica placed on it shows `Unknown` until the host reports again.
//!
//! When a host last reported lives in the store ([`Store::host_heartbeats`], written on every
//! status report without moving the global index), so any server replica can judge it. A host
//! that has not reported since this server started (or since it enrolled, whichever is later)
//! is given the timeout from then.
//!
//! The pass is [`plan`] (pure) plus a thin writer. It runs on the shared controller loop after
//! store changes and on its own timer: it asks to run again when the next Ready host could time
//! out, so a silent host turns NotReady within the timeout plus [`MIN_RECHECK`].
//!
//! A host's `status.message` is written once, when it turns NotReady; readers see it aged with
//! [`not_ready_message`] from the last report (see [`age_message`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::model::{Host, HostPhase, Kind, ObjectKey, ReplicaState, Resource, summarize};
use crate::store::{Store, StoreError, StoredObject};

/// Shortest wait between two timed passes, so that a large fleet whose hosts report at spread
/// times does not run a pass for every one of them.
pub const MIN_RECHECK: Duration = Duration::from_millis(250);

/// What the plan needs of one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostView {
    pub name: String,
    pub phase: HostPhase,
    pub has_not_ready_since: bool,
    /// The earliest time its silence counts from (Unix ms): when this server started, or when
    /// the host enrolled if later.
    pub floor_ms: i64,
}

/// One change the pass makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The host has been silent for the timeout: NotReady since now.
    MarkNotReady { host: String, last_seen_ms: i64 },
    /// A NotReady host that does not say since when (written by an older server): since now.
    RecordNotReadySince { host: String },
}

/// What one pass does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Hosts NotReady once the steps are written whose replicas must show `Unknown`.
    pub not_ready: BTreeSet<String>,
    /// When to look again even if nothing changes: when the next Ready host could time out.
    pub next: Option<Duration>,
    /// The earliest time (Unix ms) any host not timed out now could time out, whatever its
    /// phase: until then, with no host written, a pass finds what this one found.
    pub calm_until_ms: Option<i64>,
}

/// When `host` counts as last seen: its last report, but never before its floor.
pub fn last_seen_of(host: &HostView, last_seen: &HashMap<String, i64>) -> i64 {
    last_seen
        .get(&host.name)
        .copied()
        .unwrap_or(i64::MIN)
        .max(host.floor_ms)
}

/// Decides which hosts turn NotReady at `now_ms` (Unix ms) with heartbeat timeout `ttl`.
///
/// - a Ready (or not yet known) host silent for `ttl` or longer turns NotReady;
/// - a NotReady host stays as it is (its `notReadySince` is kept); it turns Ready when its
///   agent reports again (the report writes that), so it is left alone here once its last
///   report is fresh;
/// - `next`: the time until the earliest Ready host could time out (at least [`MIN_RECHECK`]).
pub fn plan(
    hosts: &[HostView],
    last_seen: &HashMap<String, i64>,
    now_ms: i64,
    ttl: Duration,
) -> Plan {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let mut out = Plan::default();
    let mut next_ms: Option<i64> = None;
    for h in hosts {
        let seen = last_seen_of(h, last_seen);
        let silent = now_ms.saturating_sub(seen);
        let timed_out = silent >= ttl_ms;
        if !timed_out {
            let at = seen.saturating_add(ttl_ms);
            out.calm_until_ms = Some(out.calm_until_ms.map_or(at, |c| c.min(at)));
        }
        match h.phase {
            HostPhase::NotReady => {
                if !h.has_not_ready_since {
                    out.steps.push(Step::RecordNotReadySince {
                        host: h.name.clone(),
                    });
                }
                if timed_out {
                    out.not_ready.insert(h.name.clone());
                }
            }
            HostPhase::Ready | HostPhase::Unknown => {
                if timed_out {
                    out.steps.push(Step::MarkNotReady {
                        host: h.name.clone(),
                        last_seen_ms: seen,
                    });
                    out.not_ready.insert(h.name.clone());
                } else {
                    let due = ttl_ms - silent;
                    next_ms = Some(next_ms.map_or(due, |n| n.min(due)));
                }
            }
        }
    }
    out.next =
        next_ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)).max(MIN_RECHECK));
    out
}

/// A silence as people read it: `31s`, `2m10s`, `3h05m`, `2d4h`.
pub fn format_silence(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{sec:02}s")
    } else {
        format!("{sec}s")
    }
}

/// The message of a host that has not reported for `silent_ms`.
pub fn not_ready_message(silent_ms: i64) -> String {
    format!(
        "no status report for {} (agent stopped or unreachable)",
        format_silence(silent_ms)
    )
}

/// Unix ms of an RFC 3339 time, if it reads.
fn millis(t: Option<&str>) -> Option<i64> {
    t.and_then(crate::model::unix_millis)
}

/// Rewrites a NotReady host's message as of `now_ms`, from its last report (`last_seen_ms`, or
/// when it enrolled if it never reported): what readers see instead of the message frozen when
/// the host turned NotReady; `lastHeartbeat` becomes that last report. Other hosts are left as
/// they are.
pub fn age_message(host: &mut Host, last_seen_ms: Option<i64>, now_ms: i64) {
    let created = millis(host.metadata.created_at.as_deref());
    let Some(status) = host.status.as_mut() else {
        return;
    };
    if status.phase != HostPhase::NotReady {
        return;
    }
    if let Some(seen) = last_seen_ms {
        status.last_heartbeat = Some(crate::util::rfc3339(seen.div_euclid(1000)));
    }
    let Some(since) = last_seen_ms.or(created) else {
        return;
    };
    status.message = Some(not_ready_message(now_ms.saturating_sub(since)));
}

/// [`age_message`] on a stored host: its JSON as readers see it now (anything that is not a
/// NotReady host is returned as stored).
pub fn aged_json(o: &StoredObject, last_seen: &HashMap<String, i64>, now_ms: i64) -> String {
    if o.key.kind != Kind::Host || !o.json.contains("\"NotReady\"") {
        return o.json.clone();
    }
    let Ok(Resource::Host(mut h)) = o.resource() else {
        return o.json.clone();
    };
    let seen = last_seen.get(&h.metadata.name).copied();
    age_message(&mut h, seen, now_ms);
    serde_json::to_string(&Resource::Host(h)).unwrap_or_else(|_| o.json.clone())
}

/// The message of a replica whose host stopped reporting.
pub fn unknown_replica_message(host: &str, last: ReplicaState) -> String {
    format!("host {host} is NotReady (its agent stopped reporting); last reported {last:?}")
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What one pass wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub hosts_marked: usize,
    pub instances_marked: usize,
    pub next: Option<Duration>,
    /// The pass read nothing: [`Quiet`] showed it would find what the last one found.
    pub skipped: bool,
}

/// What the liveness loop keeps between passes: the last pass that wrote nothing, with what
/// it read. A later pass would find the same, and is skipped, while
/// - no host was written (the hosts' fingerprint has not moved),
/// - the time has not reached the moment the first host it saw in time could time out (a
///   heartbeat only ever moves a host's last report later), and
/// - if that pass found NotReady hosts whose replicas it had to look at, no instance was
///   written either.
///
/// At 10,000 hosts a pass reads every host and heartbeat (several milliseconds); without
/// this, every instance change in a busy fleet would run one.
#[derive(Debug, Default)]
pub struct Quiet {
    last: Option<QuietPass>,
}

#[derive(Debug)]
struct QuietPass {
    hosts: (u64, u64),
    instances: Option<(u64, u64)>,
    until_ms: Option<i64>,
}

impl Quiet {
    /// The report of a pass at `now_ms` skipped (asking to be run when a host could time
    /// out), or `None` when the pass must run.
    fn skip(
        &self,
        store: &dyn Store,
        hosts: (u64, u64),
        now_ms: i64,
    ) -> Result<Option<PassReport>, StoreError> {
        let Some(last) = &self.last else {
            return Ok(None);
        };
        if last.hosts != hosts || last.until_ms.is_some_and(|until| now_ms >= until) {
            return Ok(None);
        }
        if let Some(instances) = last.instances
            && store.kind_fingerprint(Kind::OpenClawInstance)? != instances
        {
            return Ok(None);
        }
        let next = last.until_ms.map(|until| {
            Duration::from_millis(u64::try_from(until - now_ms).unwrap_or(0)).max(MIN_RECHECK)
        });
        Ok(Some(PassReport {
            next,
            skipped: true,
            ..Default::default()
        }))
    }
}

/// One pass at `now_ms`: reads hosts and heartbeats, writes the plan, then marks `Unknown`
/// the replicas of NotReady hosts. Blocking.
pub fn reconcile_at(
    store: &dyn Store,
    ttl: Duration,
    started_ms: i64,
    now_ms: i64,
) -> Result<PassReport, StoreError> {
    reconcile_quiet(store, ttl, started_ms, now_ms, &mut Quiet::default())
}

/// [`reconcile_at`], skipped while `quiet` shows it would find what the last pass found;
/// keeps `quiet`.
pub fn reconcile_quiet(
    store: &dyn Store,
    ttl: Duration,
    started_ms: i64,
    now_ms: i64,
    quiet: &mut Quiet,
) -> Result<PassReport, StoreError> {
    // Read before the hosts: a write landing between moves it, and the next pass runs.
    let hosts_seen = store.kind_fingerprint(Kind::Host)?;
    if let Some(skipped) = quiet.skip(store, hosts_seen, now_ms)? {
        return Ok(skipped);
    }
    quiet.last = None;
    let mut views = Vec::new();
    for o in crate::store::decoded::list_decoded(store, Kind::Host)?.iter() {
        let Ok(Resource::Host(h)) = &o.resource else {
            continue;
        };
        let created = millis(h.metadata.created_at.as_deref()).unwrap_or(i64::MIN);
        let status = h.status.as_ref();
        views.push(HostView {
            name: h.metadata.name.clone(),
            phase: status.map(|s| s.phase).unwrap_or_default(),
            has_not_ready_since: status.is_some_and(|s| s.not_ready_since.is_some()),
            floor_ms: started_ms.max(created),
        });
    }
    let last_seen = store.host_heartbeats()?;
    let p = plan(&views, &last_seen, now_ms, ttl);
    let mut report = PassReport {
        next: p.next,
        ..Default::default()
    };
    let stamp = crate::util::now_rfc3339_millis();
    for step in &p.steps {
        let (host, last) = match step {
            Step::MarkNotReady { host, last_seen_ms } => (host, Some(*last_seen_ms)),
            Step::RecordNotReadySince { host } => (host, None),
        };
        let written = store.update(&ObjectKey::cluster(Kind::Host, host), &mut |r| {
            let Resource::Host(h) = r else { return false };
            let s = h.status.get_or_insert_with(Default::default);
            match last {
                Some(last) => {
                    if s.phase == HostPhase::NotReady {
                        return false;
                    }
                    // A report written since the heartbeats were read: the host is back.
                    if millis(s.last_heartbeat.as_deref()).is_some_and(|at| at > last) {
                        return false;
                    }
                    s.phase = HostPhase::NotReady;
                    s.message = Some(not_ready_message(now_ms.saturating_sub(last)));
                    s.not_ready_since = Some(stamp.clone());
                    true
                }
                None => {
                    if s.phase != HostPhase::NotReady || s.not_ready_since.is_some() {
                        return false;
                    }
                    s.not_ready_since = Some(stamp.clone());
                    true
                }
            }
        });
        match written {
            Ok(Some(_)) if last.is_some() => {
                report.hosts_marked += 1;
                tracing::warn!(host = %host, "no status report for the heartbeat timeout; host marked NotReady");
                if let Some(last) = last {
                    crate::events::record(
                        store,
                        crate::agent_rpc::reports::host_not_ready_event(
                            host,
                            &not_ready_message(now_ms.saturating_sub(last)),
                        ),
                    );
                }
            }
            Ok(_) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let mut instances_seen = None;
    if !p.not_ready.is_empty() {
        instances_seen = Some(store.kind_fingerprint(Kind::OpenClawInstance)?);
        report.instances_marked = mark_unknown(store, &p.not_ready)?;
    }
    if p.steps.is_empty() && report.instances_marked == 0 {
        quiet.last = Some(QuietPass {
            hosts: hosts_seen,
            instances: instances_seen,
            until_ms: p.calm_until_ms,
        });
    }
    Ok(report)
}

/// Marks `Unknown` every replica placed on one of `hosts` that is not already, in one
/// transaction per pass that first checks each host is still NotReady (a host that reported
/// meanwhile keeps the states it reported). Returns how many instances changed.
fn mark_unknown(store: &dyn Store, hosts: &BTreeSet<String>) -> Result<usize, StoreError> {
    let mut keys: Vec<ObjectKey> = hosts
        .iter()
        .map(|h| ObjectKey::cluster(Kind::Host, h))
        .collect();
    let mut instances = Vec::new();
    for o in crate::store::decoded::list_decoded(store, Kind::OpenClawInstance)?.iter() {
        let Ok(Resource::OpenClawInstance(i)) = &o.resource else {
            continue;
        };
        let stale = i.status.as_ref().is_some_and(|s| {
            s.replica_status.iter().any(|r| {
                r.state != ReplicaState::Unknown
                    && r.host.as_ref().is_some_and(|h| hosts.contains(h))
            })
        });
        if stale {
            instances.push(o.key.clone());
        }
    }
    if instances.is_empty() {
        return Ok(0);
    }
    keys.extend(instances);
    let mut still_not_ready: BTreeSet<String> = BTreeSet::new();
    let mut changed = 0usize;
    store.update_many(&keys, &mut |r| match r {
        Resource::Host(h) => {
            if h.status.as_ref().map(|s| s.phase) == Some(HostPhase::NotReady) {
                still_not_ready.insert(h.metadata.name.clone());
            }
            false
        }
        Resource::OpenClawInstance(i) => {
            let Some(status) = i.status.as_mut() else {
                return false;
            };
            let mut any = false;
            for r in &mut status.replica_status {
                let Some(host) = r.host.as_deref() else {
                    continue;
                };
                if r.state == ReplicaState::Unknown || !still_not_ready.contains(host) {
                    continue;
                }
                r.message = Some(unknown_replica_message(host, r.state));
                r.state = ReplicaState::Unknown;
                r.ready_since = None;
                any = true;
            }
            if any {
                summarize(i);
                changed += 1;
            }
            any
        }
        _ => false,
    })?;
    Ok(changed)
}

/// Runs the liveness controller until shutdown.
pub async fn run(
    store: Arc<dyn Store>,
    shutdown: watch::Receiver<bool>,
    resync: Duration,
    ttl: Duration,
) {
    let started_ms = now_ms();
    let quiet = std::sync::Mutex::new(Quiet::default());
    super::runtime::run(
        "host liveness",
        store,
        shutdown,
        resync,
        move |store: &dyn Store| {
            let mut quiet = quiet.lock().unwrap_or_else(|e| e.into_inner());
            let report = reconcile_quiet(store, ttl, started_ms, now_ms(), &mut quiet)?;
            if report.hosts_marked + report.instances_marked > 0 {
                tracing::info!(
                    hosts = report.hosts_marked,
                    instances = report.instances_marked,
                    "host liveness: replicas of silent hosts marked Unknown"
                );
            }
            Ok::<_, StoreError>(report.next)
        },
    )
    .await;
}

#[cfg(test)]
mod tests;
