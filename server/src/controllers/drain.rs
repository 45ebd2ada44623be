//! The drain controller: moves the replicas of a drained host (`status.drain`, started by
//! `clusterclaw drain host`) to other hosts, each with its state volume.
//!
//! Rules ([`plan`], pure): on its first pass over a drain the controller lists the replicas
//! placed on the host. Instances are drained one at a time (in key order); a replica of the
//! instance being drained moves when its instance stays within `updateStrategy.maxUnavailable`
//! (default 1) with it unavailable: replicas not Ready, those moving included, count. Its new
//! host is the one the scheduler would pick for it (the drained host is cordoned). A move
//! places the replica there under a new epoch with `stateFrom` (the transfer that carries its
//! state volume, none with `discardState`) and retains its volume on the drained host
//! (reason `Drain`), so the old host keeps it while it is read. Once the replica is Ready on
//! its new host the move is settled: `stateFrom` is cleared and the old volume let go (kept
//! with `discardState`). Past the deadline every replica not moved fails the drain, with the
//! reason. Nothing is undone: a replica placed on its new host stays there.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::model::{
    DrainPhase, DrainReplica, DrainReplicaPhase, DrainStatus, Host, IntOrPercent, Kind, ObjectKey,
    OpenClawInstance, RETAINED_BY_DRAIN, ReplicaState, ReplicaStatus, Resource, RetainedVolume,
    StateFrom,
};
use crate::store::{Store, StoreError};

/// How often a drain in progress is looked at without a store change (progress, deadline).
const POLL: Duration = Duration::from_secs(1);
/// How often the controller looks when no drain runs.
const RESYNC: Duration = Duration::from_secs(30);

/// What the executor does to an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Places replica `ordinal` on `to` (it was on `from`), carrying its state by `transfer`.
    Move {
        key: ObjectKey,
        ordinal: u32,
        from: String,
        to: String,
        transfer: Option<String>,
    },
    /// The replica is Ready on `to`: clears its `stateFrom`; with `release`, lets go of the
    /// volume it left on `from`.
    Settle {
        key: ObjectKey,
        ordinal: u32,
        from: String,
        to: String,
        release: bool,
    },
}

/// The decision for one drained host.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub drain: DrainStatus,
    pub steps: Vec<Step>,
}

fn key_of(r: &DrainReplica) -> ObjectKey {
    ObjectKey::instance(&r.tenant, &r.project, &r.instance)
}

fn replica_of(i: &OpenClawInstance, ordinal: u32) -> Option<&ReplicaStatus> {
    if i64::from(ordinal) >= i.spec.replicas {
        return None;
    }
    i.status
        .as_ref()?
        .replica_status
        .iter()
        .find(|r| r.ordinal == ordinal)
}

/// The instance's `maxUnavailable` for a drain: at least 1.
pub fn max_unavailable(i: &OpenClawInstance) -> i64 {
    i.spec
        .update_strategy
        .max_unavailable
        .as_ref()
        .unwrap_or(&IntOrPercent::Int(1))
        .resolve(i.spec.replicas.max(0))
        .unwrap_or(1)
        .max(1)
}

/// A transfer id: short, unique per drain, replica and time.
pub fn transfer_id(host: &str, r: &DrainReplica, now_ms: i64) -> String {
    let digest = Sha256::digest(
        format!("{host}/{}/{}/{}/{now_ms}", r.tenant, r.project, r.replica).as_bytes(),
    );
    format!("drain-{}", &crate::util::hex(&digest)[..20])
}

/// Where the scheduler would put replica `ordinal` of `key` if it had no host.
fn new_host(
    instances: &[OpenClawInstance],
    hosts: &[Host],
    key: &ObjectKey,
    ordinal: u32,
    now_ms: i64,
) -> Result<String, String> {
    let mut view: Vec<OpenClawInstance> = instances.to_vec();
    if let Some(i) = view.iter_mut().find(|i| &i.key() == key)
        && let Some(s) = i.status.as_mut()
    {
        s.replica_status.retain(|r| r.ordinal != ordinal);
        // Its old volume must not draw it back.
        s.retained_volumes.retain(|v| v.ordinal != ordinal);
    }
    let decided = super::scheduler::plan_at(&view, hosts, now_ms);
    let placement = decided
        .instances
        .get(key)
        .and_then(|p| p.replicas.get(ordinal as usize))
        .cloned();
    match placement {
        Some(super::scheduler::ReplicaPlacement::Placed { host }) => Ok(host),
        Some(super::scheduler::ReplicaPlacement::Unplaced { reason }) => Err(reason),
        None => Err("the replica is not placed".into()),
    }
}

/// Decides the next steps of the drain of `host` at `now_ms`. Pure.
pub fn plan(
    host: &str,
    drain: &DrainStatus,
    instances: &[OpenClawInstance],
    hosts: &[Host],
    now_ms: i64,
) -> Decision {
    let mut d = drain.clone();
    let mut steps = Vec::new();
    if d.is_finished() {
        return Decision { drain: d, steps };
    }
    let now = crate::events::rfc3339_ms(now_ms);
    let by_key: BTreeMap<ObjectKey, &OpenClawInstance> =
        instances.iter().map(|i| (i.key(), i)).collect();
    if !d.listed {
        for (key, i) in &by_key {
            let Some(status) = &i.status else { continue };
            let mut mine: Vec<&ReplicaStatus> = status
                .replica_status
                .iter()
                .filter(|r| {
                    r.host.as_deref() == Some(host) && i64::from(r.ordinal) < i.spec.replicas
                })
                .collect();
            mine.sort_by_key(|r| r.ordinal);
            for r in mine {
                d.replicas.push(DrainReplica {
                    tenant: key.tenant.clone(),
                    project: key.project.clone(),
                    instance: key.name.clone(),
                    replica: r.name.clone(),
                    ordinal: r.ordinal,
                    ..DrainReplica::default()
                });
            }
        }
        d.listed = true;
    }

    // Moves in flight.
    for dr in d.replicas.iter_mut() {
        if dr.phase != DrainReplicaPhase::Moving {
            continue;
        }
        let key = key_of(dr);
        let to = dr.to.clone().unwrap_or_default();
        match by_key.get(&key).and_then(|i| replica_of(i, dr.ordinal)) {
            None => {
                dr.phase = DrainReplicaPhase::Moved;
                dr.message = Some("the replica no longer exists".into());
                dr.finished_at = Some(now.clone());
            }
            Some(r) if r.host.as_deref() != Some(to.as_str()) => {
                dr.phase = DrainReplicaPhase::Failed;
                dr.message = Some(format!(
                    "placed on {} by something else while it moved",
                    r.host.as_deref().unwrap_or("no host")
                ));
                dr.finished_at = Some(now.clone());
            }
            Some(r) if r.state == ReplicaState::Ready => {
                dr.phase = DrainReplicaPhase::Moved;
                dr.message = Some(match &dr.sha256 {
                    Some(sha) => format!("Ready on {to} with its state (SHA-256 {sha})"),
                    None if dr.transfer.is_none() => format!("Ready on {to} with fresh state"),
                    None => format!("Ready on {to}"),
                });
                dr.finished_at = Some(now.clone());
                steps.push(Step::Settle {
                    key,
                    ordinal: dr.ordinal,
                    from: host.to_string(),
                    to,
                    release: !d.discard_state,
                });
            }
            Some(r) => {
                dr.message = r.message.clone();
            }
        }
    }

    // The instance being drained: the first one with a replica not yet moved.
    let active = d
        .replicas
        .iter()
        .find(|r| {
            matches!(
                r.phase,
                DrainReplicaPhase::Waiting | DrainReplicaPhase::Moving
            )
        })
        .map(key_of);
    let mut planned_unavailable: HashMap<ObjectKey, i64> = HashMap::new();
    for idx in 0..d.replicas.len() {
        let dr = &d.replicas[idx];
        if dr.phase != DrainReplicaPhase::Waiting || Some(key_of(dr)) != active {
            continue;
        }
        let key = key_of(dr);
        let ordinal = dr.ordinal;
        let Some(i) = by_key.get(&key) else {
            let dr = &mut d.replicas[idx];
            dr.phase = DrainReplicaPhase::Moved;
            dr.message = Some("the replica no longer exists".into());
            dr.finished_at = Some(now.clone());
            continue;
        };
        let Some(r) = replica_of(i, ordinal) else {
            let dr = &mut d.replicas[idx];
            dr.phase = DrainReplicaPhase::Moved;
            dr.message = Some("the replica no longer exists".into());
            dr.finished_at = Some(now.clone());
            continue;
        };
        if r.host.as_deref() != Some(host) {
            let dr = &mut d.replicas[idx];
            dr.phase = DrainReplicaPhase::Moved;
            dr.message = Some(format!(
                "already moved to {}",
                r.host.as_deref().unwrap_or("no host")
            ));
            dr.finished_at = Some(now.clone());
            continue;
        }
        let max = max_unavailable(i);
        let unavailable = i
            .status
            .iter()
            .flat_map(|s| s.replica_status.iter())
            .filter(|x| i64::from(x.ordinal) < i.spec.replicas && x.state != ReplicaState::Ready)
            .count() as i64
            + planned_unavailable.get(&key).copied().unwrap_or(0);
        let cost = i64::from(r.state == ReplicaState::Ready);
        if unavailable + cost > max {
            d.replicas[idx].message = Some(format!(
                "waiting: {unavailable} replica(s) of {} unavailable (maxUnavailable {max})",
                key.name
            ));
            continue;
        }
        match new_host(instances, hosts, &key, ordinal, now_ms) {
            Ok(to) if to != host => {
                let transfer =
                    (!d.discard_state).then(|| transfer_id(host, &d.replicas[idx], now_ms));
                steps.push(Step::Move {
                    key: key.clone(),
                    ordinal,
                    from: host.to_string(),
                    to: to.clone(),
                    transfer: transfer.clone(),
                });
                *planned_unavailable.entry(key).or_default() += cost;
                let dr = &mut d.replicas[idx];
                dr.phase = DrainReplicaPhase::Moving;
                dr.to = Some(to);
                dr.transfer = transfer;
                dr.started_at = Some(now.clone());
                dr.message = None;
            }
            Ok(_) => {
                d.replicas[idx].message = Some("no other host fits".into());
            }
            Err(reason) => {
                d.replicas[idx].message = Some(format!("no other host fits: {reason}"));
            }
        }
    }

    let past_deadline =
        crate::model::unix_millis(&d.deadline).is_some_and(|deadline| now_ms >= deadline);
    if past_deadline {
        for dr in d.replicas.iter_mut() {
            let why = match dr.phase {
                DrainReplicaPhase::Waiting => "not moved before the timeout",
                DrainReplicaPhase::Moving => "not Ready on its new host before the timeout",
                DrainReplicaPhase::Moved | DrainReplicaPhase::Failed => continue,
            };
            dr.message = Some(match dr.message.take() {
                Some(m) => format!("{why}: {m}"),
                None => why.to_string(),
            });
            dr.phase = DrainReplicaPhase::Failed;
            dr.finished_at = Some(now.clone());
        }
    }
    let open = d.replicas.iter().any(|r| {
        matches!(
            r.phase,
            DrainReplicaPhase::Waiting | DrainReplicaPhase::Moving
        )
    });
    if !open {
        let failed: Vec<&DrainReplica> = d
            .replicas
            .iter()
            .filter(|r| r.phase == DrainReplicaPhase::Failed)
            .collect();
        let moved = d.replicas.len() - failed.len();
        d.finished_at = Some(now.clone());
        if failed.is_empty() {
            d.phase = DrainPhase::Succeeded;
            d.message = Some(format!("{moved} replica(s) moved off host {host}"));
        } else {
            d.phase = DrainPhase::Failed;
            d.message = Some(format!(
                "{} replica(s) could not be moved off host {host}: {}",
                failed.len(),
                failed
                    .iter()
                    .map(|r| format!(
                        "{}/{}/{} ({})",
                        r.tenant,
                        r.project,
                        r.replica,
                        r.message.as_deref().unwrap_or("no reason known")
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
    }
    Decision { drain: d, steps }
}

/// Applies a move to the instance; false when the replica is no longer where the plan saw it.
pub fn apply_move(
    i: &mut OpenClawInstance,
    ordinal: u32,
    from: &str,
    to: &str,
    transfer: Option<&str>,
    now: &str,
) -> bool {
    let rv = i.metadata.resource_version;
    let Some(status) = i.status.as_mut() else {
        return false;
    };
    let Some(r) = status
        .replica_status
        .iter_mut()
        .find(|r| r.ordinal == ordinal)
    else {
        return false;
    };
    if r.host.as_deref() != Some(from) {
        return false;
    }
    let replica = r.name.clone();
    *r = ReplicaStatus {
        name: r.name.clone(),
        ordinal,
        host: Some(to.to_string()),
        state: ReplicaState::Pending,
        message: Some(match transfer {
            Some(_) => format!("moving from host {from} (drain), with its state"),
            None => format!("moving from host {from} (drain), starting with fresh state"),
        }),
        epoch: Some(super::scheduler::next_epoch(r.epoch, rv)),
        target_revision: r.target_revision,
        state_from: transfer.map(|t| StateFrom {
            host: from.to_string(),
            transfer: t.to_string(),
        }),
        ..ReplicaStatus::default()
    };
    if !status
        .retained_volumes
        .iter()
        .any(|v| v.ordinal == ordinal && v.host == from)
    {
        status.retained_volumes.push(RetainedVolume {
            replica,
            ordinal,
            host: from.to_string(),
            since: Some(now.to_string()),
            reason: Some(RETAINED_BY_DRAIN.to_string()),
        });
        status
            .retained_volumes
            .sort_by(|a, b| (a.ordinal, &a.host).cmp(&(b.ordinal, &b.host)));
    }
    crate::model::summarize(i);
    true
}

/// Settles a move; false when nothing changed.
pub fn apply_settle(
    i: &mut OpenClawInstance,
    ordinal: u32,
    from: &str,
    to: &str,
    release: bool,
) -> bool {
    let Some(status) = i.status.as_mut() else {
        return false;
    };
    let mut changed = false;
    if let Some(r) = status
        .replica_status
        .iter_mut()
        .find(|r| r.ordinal == ordinal && r.host.as_deref() == Some(to))
        && r.state_from.take().is_some()
    {
        changed = true;
    }
    if release {
        let before = status.retained_volumes.len();
        status
            .retained_volumes
            .retain(|v| !(v.ordinal == ordinal && v.host == from && v.from_drain()));
        changed |= status.retained_volumes.len() != before;
    }
    changed
}

/// `new` (the controller's decision) with the transfer progress `stored` holds: the server
/// relaying a transfer writes those fields, and may have since the controller read the record.
pub fn keep_progress(mut new: DrainStatus, stored: Option<&DrainStatus>) -> DrainStatus {
    let Some(stored) = stored else { return new };
    for r in new.replicas.iter_mut() {
        let Some(id) = r.transfer.as_deref() else {
            continue;
        };
        if let Some(s) = stored
            .replicas
            .iter()
            .find(|s| s.transfer.as_deref() == Some(id))
        {
            r.attempts = s.attempts;
            r.bytes = s.bytes;
            r.sha256 = s.sha256.clone();
            r.transfer_millis = s.transfer_millis;
        }
    }
    new
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Every readable object of `kind`, copied out of the store's decoded objects by `pick`.
fn decode_all<T>(
    store: &dyn Store,
    kind: Kind,
    pick: impl Fn(&Resource) -> Option<T>,
) -> Result<Vec<T>, StoreError> {
    Ok(crate::store::decoded::list_decoded(store, kind)?
        .iter()
        .filter_map(|o| o.resource.as_ref().ok())
        .filter_map(pick)
        .collect())
}

/// One pass over every drain in progress; returns when to look again.
pub fn reconcile_once(store: &dyn Store, now_ms: i64) -> Result<Option<Duration>, StoreError> {
    // Most passes find no drain: they copy nothing.
    let draining = decode_all(store, Kind::Host, |r| match r {
        Resource::Host(h) => {
            let d = h.status.as_ref()?.drain.as_ref()?;
            (!d.is_finished()).then(|| (h.metadata.name.clone(), d.clone()))
        }
        _ => None,
    })?;
    if draining.is_empty() {
        return Ok(None);
    }
    let hosts = decode_all(store, Kind::Host, |r| match r {
        Resource::Host(h) => Some(h.clone()),
        _ => None,
    })?;
    let instances = decode_all(store, Kind::OpenClawInstance, |r| match r {
        Resource::OpenClawInstance(i) => Some(i.clone()),
        _ => None,
    })?;
    let now = crate::events::rfc3339_ms(now_ms);
    for (name, drain) in draining {
        let mut decision = plan(&name, &drain, &instances, &hosts, now_ms);
        let mut events = Vec::new();
        for step in &decision.steps {
            match step {
                Step::Move {
                    key,
                    ordinal,
                    from,
                    to,
                    transfer,
                } => {
                    let mut applied = false;
                    store.update(key, &mut |r| {
                        let Resource::OpenClawInstance(i) = r else {
                            return false;
                        };
                        applied = apply_move(i, *ordinal, from, to, transfer.as_deref(), &now);
                        applied
                    })?;
                    let replica = format!("{}-{ordinal}", key.name);
                    if applied {
                        tracing::info!(host = %name, replica = %replica, to = %to, transfer = ?transfer, "drain: replica moving");
                        events.push(
                            crate::events::Event::normal(
                                key.clone(),
                                "Draining",
                                format!(
                                    "moving from host {from} to {to} ({})",
                                    if transfer.is_some() {
                                        "with its state"
                                    } else {
                                        "state discarded"
                                    }
                                ),
                            )
                            .replica(replica)
                            .source("drain"),
                        );
                    } else if let Some(dr) = decision
                        .drain
                        .replicas
                        .iter_mut()
                        .find(|r| key_of(r) == *key && r.ordinal == *ordinal)
                    {
                        // It moved under us: the next pass looks again.
                        dr.phase = DrainReplicaPhase::Waiting;
                        dr.to = None;
                        dr.transfer = None;
                        dr.started_at = None;
                        decision.drain.phase = DrainPhase::Draining;
                        decision.drain.finished_at = None;
                    }
                }
                Step::Settle {
                    key,
                    ordinal,
                    from,
                    to,
                    release,
                } => {
                    store.update(key, &mut |r| {
                        let Resource::OpenClawInstance(i) = r else {
                            return false;
                        };
                        apply_settle(i, *ordinal, from, to, *release)
                    })?;
                    events.push(
                        crate::events::Event::normal(
                            key.clone(),
                            "Drained",
                            format!("moved from host {from}, Ready on {to}"),
                        )
                        .replica(format!("{}-{ordinal}", key.name))
                        .source("drain"),
                    );
                }
            }
        }
        let started = drain.started_at.clone();
        let new = decision.drain;
        if new != drain {
            if new.is_finished() {
                tracing::info!(host = %name, phase = ?new.phase, message = ?new.message, "drain finished");
            }
            store.update(&ObjectKey::cluster(Kind::Host, name.clone()), &mut |r| {
                let Resource::Host(h) = r else { return false };
                let Some(s) = h.status.as_mut() else {
                    return false;
                };
                // A newer drain replaced this one: leave it.
                if s.drain.as_ref().map(|d| &d.started_at) != Some(&started) {
                    return false;
                }
                s.drain = Some(keep_progress(new.clone(), s.drain.as_ref()));
                true
            })?;
        }
        crate::events::record_all(store, events);
    }
    Ok(Some(POLL))
}

/// Runs the controller until shutdown.
pub async fn run(store: Arc<dyn Store>, shutdown: watch::Receiver<bool>) {
    super::runtime::run(
        "drain",
        store,
        shutdown,
        RESYNC,
        move |store: &dyn Store| reconcile_once(store, now_ms()),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::fixtures::{HostBuilder, InstanceBuilder};

    const NOW: i64 = 1_800_000_000_000;

    fn drain(discard: bool, timeout_ms: i64) -> DrainStatus {
        DrainStatus {
            phase: DrainPhase::Draining,
            discard_state: discard,
            started_at: crate::events::rfc3339_ms(NOW),
            deadline: crate::events::rfc3339_ms(NOW + timeout_ms),
            ..DrainStatus::default()
        }
    }

    fn hosts() -> Vec<Host> {
        vec![
            HostBuilder::new("a").unschedulable().build(),
            HostBuilder::new("b").cpu("64").memory("256Gi").build(),
        ]
    }

    fn instances() -> Vec<OpenClawInstance> {
        vec![
            InstanceBuilder::new("bot")
                .replicas(2)
                .placed(0, "a")
                .placed(1, "a")
                .build(),
            InstanceBuilder::new("aux")
                .replicas(1)
                .placed(0, "a")
                .build(),
        ]
    }

    fn moves(d: &Decision) -> Vec<(String, u32, String, bool)> {
        d.steps
            .iter()
            .filter_map(|s| match s {
                Step::Move {
                    key,
                    ordinal,
                    to,
                    transfer,
                    ..
                } => Some((key.name.clone(), *ordinal, to.clone(), transfer.is_some())),
                Step::Settle { .. } => None,
            })
            .collect()
    }

    #[test]
    fn one_instance_at_a_time_within_max_unavailable() {
        let d = plan("a", &drain(false, 60_000), &instances(), &hosts(), NOW);
        assert!(d.drain.listed);
        assert_eq!(d.drain.replicas.len(), 3);
        // `aux` sorts first; it alone moves (one instance at a time, maxUnavailable 1).
        assert_eq!(moves(&d), vec![("aux".into(), 0, "b".into(), true)]);
        let waiting: Vec<_> = d
            .drain
            .replicas
            .iter()
            .filter(|r| r.phase == DrainReplicaPhase::Waiting)
            .map(|r| r.replica.clone())
            .collect();
        assert_eq!(waiting, ["bot-0", "bot-1"]);
    }

    #[test]
    fn a_move_places_the_replica_with_its_transfer_and_retains_the_old_volume() {
        let mut i = instances().remove(0);
        let epoch = i.status.as_ref().unwrap().replica_status[0].epoch;
        assert!(apply_move(&mut i, 0, "a", "b", Some("drain-1"), "now"));
        let s = i.status.as_ref().unwrap();
        let r = &s.replica_status[0];
        assert_eq!(r.host.as_deref(), Some("b"));
        assert_eq!(r.state, ReplicaState::Pending);
        assert!(r.epoch > epoch);
        assert_eq!(
            r.state_from,
            Some(StateFrom {
                host: "a".into(),
                transfer: "drain-1".into()
            })
        );
        assert!(
            s.retained_volumes
                .iter()
                .any(|v| v.host == "a" && v.ordinal == 0 && v.from_drain())
        );
        // Not where the plan saw it: nothing happens.
        assert!(!apply_move(&mut i, 0, "a", "b", Some("drain-1"), "now"));
        // Ready there: the import is cleared and the old volume let go.
        assert!(apply_settle(&mut i, 0, "a", "b", true));
        let s = i.status.as_ref().unwrap();
        assert_eq!(s.replica_status[0].state_from, None);
        assert!(s.retained_volumes.is_empty());
    }

    #[test]
    fn a_moving_replica_is_moved_once_ready_on_its_new_host() {
        let d1 = plan("a", &drain(false, 60_000), &instances(), &hosts(), NOW);
        let mut moved = instances();
        let transfer = d1.drain.replicas[0].transfer.clone().unwrap();
        assert!(apply_move(
            &mut moved[1],
            0,
            "a",
            "b",
            Some(&transfer),
            "now"
        ));
        // Not Ready yet: still moving, nothing else starts for `aux`; `bot` waits its turn.
        let d2 = plan("a", &d1.drain, &moved, &hosts(), NOW + 1000);
        assert!(moves(&d2).is_empty());
        assert_eq!(d2.drain.replicas[0].phase, DrainReplicaPhase::Moving);
        moved[1].status.as_mut().unwrap().replica_status[0].state = ReplicaState::Ready;
        // What the relay wrote into the record meanwhile.
        let mut relayed = d2.drain.clone();
        relayed.replicas[0].attempts = Some(1);
        relayed.replicas[0].bytes = Some(2048);
        relayed.replicas[0].sha256 = Some("ab".repeat(32));
        relayed.replicas[0].transfer_millis = Some(10);
        let d3 = plan("a", &relayed, &moved, &hosts(), NOW + 2000);
        assert_eq!(d3.drain.replicas[0].phase, DrainReplicaPhase::Moved);
        assert!(
            d3.drain.replicas[0]
                .message
                .as_deref()
                .is_some_and(|m| m.contains(&"ab".repeat(32))),
            "{:?}",
            d3.drain.replicas[0].message
        );
        assert_eq!(d3.drain.replicas[0].bytes, Some(2048));
        assert!(
            d3.steps
                .iter()
                .any(|s| matches!(s, Step::Settle { release: true, .. }))
        );
        // Then `bot`, one replica at a time.
        assert_eq!(moves(&d3), vec![("bot".into(), 0, "b".into(), true)]);
    }

    #[test]
    fn the_controller_keeps_the_progress_the_relay_wrote_since_it_read() {
        let d1 = plan("a", &drain(false, 60_000), &instances(), &hosts(), NOW);
        let transfer = d1.drain.replicas[0].transfer.clone().unwrap();
        // The controller decided from a record read before the relay wrote 5 MiB of its
        // second attempt.
        let mut stored = d1.drain.clone();
        stored.replicas[0].attempts = Some(2);
        stored.replicas[0].bytes = Some(5 << 20);
        let mut decided = d1.drain.clone();
        decided.replicas[0].message = Some("starting".into());
        let kept = keep_progress(decided, Some(&stored));
        assert_eq!(
            kept.replicas[0].transfer.as_deref(),
            Some(transfer.as_str())
        );
        assert_eq!(kept.replicas[0].attempts, Some(2));
        assert_eq!(kept.replicas[0].bytes, Some(5 << 20));
        assert_eq!(kept.replicas[0].message.as_deref(), Some("starting"));
        // A replica with no transfer, or a record of another drain, takes nothing.
        let mut other = stored.clone();
        other.replicas[0].transfer = Some("drain-other".into());
        let kept = keep_progress(d1.drain.clone(), Some(&other));
        assert_eq!(kept.replicas[0].bytes, None);
        assert_eq!(kept.replicas[0].attempts, None);
    }

    #[test]
    fn past_the_deadline_the_drain_fails_naming_each_replica_and_why() {
        let only_a = vec![HostBuilder::new("a").unschedulable().build()];
        let d = plan("a", &drain(true, 1000), &instances(), &only_a, NOW);
        assert!(moves(&d).is_empty());
        assert_eq!(d.drain.phase, DrainPhase::Draining);
        let d = plan("a", &d.drain, &instances(), &only_a, NOW + 1000);
        assert_eq!(d.drain.phase, DrainPhase::Failed);
        let message = d.drain.message.unwrap();
        assert!(message.contains("aux-0"), "{message}");
        assert!(message.contains("no other host fits"), "{message}");
        assert!(
            d.drain
                .replicas
                .iter()
                .all(|r| r.phase == DrainReplicaPhase::Failed)
        );
    }

    #[test]
    fn discarded_state_moves_without_a_transfer_and_keeps_the_old_volume() {
        let d = plan("a", &drain(true, 60_000), &instances(), &hosts(), NOW);
        assert_eq!(moves(&d), vec![("aux".into(), 0, "b".into(), false)]);
    }

    #[test]
    fn an_empty_host_is_drained_at_once() {
        let d = plan("b", &drain(false, 60_000), &instances(), &hosts(), NOW);
        assert_eq!(d.drain.phase, DrainPhase::Succeeded);
        assert!(d.steps.is_empty());
    }
}
