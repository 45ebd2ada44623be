//! The scheduler: places every replica of every `OpenClawInstance` on a host.
//!
//! [`plan`] decides (pure, no I/O); [`apply_instance_plan`] and [`apply_host_allocation`] turn
//! a decision into status; [`reconcile_once`] reads the store, plans and writes what changed;
//! [`run`] repeats that whenever the store changes, on a resync timer, and after errors with
//! backoff.
//!
//! Rules: a replica goes to a host that is `Ready`, not cordoned (`spec.unschedulable`),
//! carries every label of the instance's `spec.placement.hostSelector`, and has the cpu and
//! memory the replica requests left over after everything already placed there. Among those,
//! replicas of one instance spread over hosts first, then the least allocated host wins, and
//! ties go to the host whose name sorts first. Placements are sticky: a placed replica stays on
//! its host (its state volume lives there) until that host is deleted, even if the host goes
//! NotReady, is cordoned, stops matching the selector or is overcommitted. Scaling down removes
//! the highest ordinals; with `spec.volumeRetention.whenScaled: Retain` (the default) their
//! volumes are listed in `status.retainedVolumes`, and scaling back up places each such ordinal
//! on the host holding its volume when that host fits.
//!
//! Failover: with `spec.failover.policy: Reschedule`, a replica whose host has been NotReady
//! (`status.notReadySince`) for `failover.after` is no longer held there: it is placed like a
//! new replica on another eligible host (starting with fresh state) and the volume it leaves
//! behind is listed in `status.retainedVolumes` with reason `Failover`, so the lost host keeps
//! it when it comes back. When no other host fits, the replica stays where it is. With
//! `Manual` (the default) nothing moves.
//!
//! Epochs: every placement of a replica on a host (the first one and every move) gives it a new
//! `epoch`, higher than any it had and higher than the instance's `resourceVersion`; since the
//! store's index only grows, an epoch is never reused for a replica name, even after the
//! instance is deleted and created again.

use std::borrow::Borrow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::model::{
    Condition, Host, HostPhase, HostResources, HostStatus, InstanceStatus, Kind, MAX_REPLICAS,
    ObjectKey, OpenClawInstance, RETAINED_BY_FAILOVER, ReplicaState, ReplicaStatus, Resource,
    RetainedVolume, RetentionPolicy, parse_cpu, parse_memory, summarize,
};
use crate::store::decoded::Decoded;
use crate::store::{Store, StoreError};

#[cfg(test)]
mod failover_tests;
#[cfg(test)]
mod tests;

/// Condition type the scheduler owns on every instance.
pub const CONDITION_SCHEDULED: &str = "Scheduled";
/// Condition reason (and message prefix) while a replica cannot be placed.
pub const REASON_UNSCHEDULABLE: &str = "Unschedulable";
/// Condition reason once every replica has a host.
pub const REASON_SCHEDULED: &str = "Scheduled";

pub use super::runtime::{BACKOFF_INITIAL, BACKOFF_MAX, DEBOUNCE, backoff};
/// Objects written per store transaction.
pub const WRITE_BATCH: usize = 256;

/// Where one replica goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaPlacement {
    Placed {
        host: String,
    },
    /// No host fits; `reason` is the text shown to people (`Unschedulable: 0/3 hosts fit (...)`).
    Unplaced {
        reason: String,
    },
}

impl ReplicaPlacement {
    pub fn host(&self) -> Option<&str> {
        match self {
            ReplicaPlacement::Placed { host } => Some(host),
            ReplicaPlacement::Unplaced { .. } => None,
        }
    }
}

/// The decision for one instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstancePlan {
    /// `metadata.generation` of the spec this plan was made for.
    pub generation: Option<i64>,
    /// One entry per desired replica; the index is the ordinal.
    pub replicas: Vec<ReplicaPlacement>,
}

impl InstancePlan {
    /// The host of every replica, in ordinal order (`None` where unplaced).
    pub fn hosts(&self) -> Vec<Option<&str>> {
        self.replicas.iter().map(ReplicaPlacement::host).collect()
    }

    /// Why the first unplaced replica could not be placed, if any replica could not.
    pub fn unschedulable(&self) -> Option<&str> {
        self.replicas.iter().find_map(|r| match r {
            ReplicaPlacement::Unplaced { reason } => Some(reason.as_str()),
            ReplicaPlacement::Placed { .. } => None,
        })
    }

    pub fn unplaced(&self) -> usize {
        self.replicas.iter().filter(|r| r.host().is_none()).count()
    }
}

/// The scheduler's decision for a whole cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Every instance given to [`plan`], by key.
    pub instances: BTreeMap<ObjectKey, InstancePlan>,
    /// What is placed on every host given to [`plan`], by host name.
    pub hosts: BTreeMap<String, HostResources>,
    /// Replicas moved off a lost host by failover, by instance and ordinal.
    pub moves: BTreeMap<ObjectKey, Moves>,
    /// How soon a replica on a NotReady host comes due for failover, if one will (the time
    /// alone makes it due: no store change wakes the scheduler for it).
    pub next_failover: Option<Duration>,
}

/// A replica moved off a lost host by failover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moved {
    /// The host it leaves (its state volume stays there).
    pub from: String,
    /// How long that host had been NotReady.
    pub not_ready_for: Duration,
}

/// Failover moves of one instance, by ordinal.
pub type Moves = BTreeMap<u32, Moved>;

impl Moved {
    /// The replica's status message after the move.
    pub fn message(&self) -> String {
        format!(
            "rescheduled from host {} after {} NotReady; started with fresh state",
            self.from,
            humantime::format_duration(Duration::from_secs(self.not_ready_for.as_secs()))
        )
    }
}

impl Plan {
    /// The host of every replica of `key`, in ordinal order; empty for an unknown instance.
    pub fn hosts_of(&self, key: &ObjectKey) -> Vec<Option<&str>> {
        self.instances
            .get(key)
            .map(InstancePlan::hosts)
            .unwrap_or_default()
    }
}

/// Why a host cannot take a replica, in the order hosts are checked (a host is counted under
/// the first reason that applies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Misfit {
    NotReady = 0,
    Unschedulable = 1,
    SelectorMismatch = 2,
    InsufficientCpu = 3,
    InsufficientMemory = 4,
}

impl Misfit {
    const ALL: [Misfit; 5] = [
        Misfit::NotReady,
        Misfit::Unschedulable,
        Misfit::SelectorMismatch,
        Misfit::InsufficientCpu,
        Misfit::InsufficientMemory,
    ];

    fn text(self) -> &'static str {
        match self {
            Misfit::NotReady => "not ready",
            Misfit::Unschedulable => "unschedulable",
            Misfit::SelectorMismatch => "selector mismatch",
            Misfit::InsufficientCpu => "insufficient cpu",
            Misfit::InsufficientMemory => "insufficient memory",
        }
    }
}

/// `Unschedulable: 0/3 hosts fit (2 insufficient memory, 1 selector mismatch)`: reasons with
/// the most hosts first, equal counts in the order hosts are checked.
fn unschedulable_message(hosts: usize, misfits: &[usize; 5]) -> String {
    if hosts == 0 {
        return format!(
            "{REASON_UNSCHEDULABLE}: 0/0 hosts fit (no hosts have joined; enroll one with clusterclaw-agent)"
        );
    }
    let mut counted: Vec<(usize, Misfit)> = Misfit::ALL
        .iter()
        .map(|&m| (misfits[m as usize], m))
        .filter(|(n, _)| *n > 0)
        .collect();
    counted.sort_by(|a, b| b.0.cmp(&a.0).then((a.1 as u8).cmp(&(b.1 as u8))));
    let parts: Vec<String> = counted
        .iter()
        .map(|(n, m)| format!("{n} {}", m.text()))
        .collect();
    format!(
        "{REASON_UNSCHEDULABLE}: 0/{hosts} hosts fit ({})",
        parts.join(", ")
    )
}

/// A host as the planner sees it.
struct Node<'a> {
    name: &'a str,
    host: &'a Host,
    ready: bool,
    /// When the host turned NotReady (Unix milliseconds), while it is.
    not_ready_since: Option<i64>,
    cpu_capacity: u64,
    memory_capacity: u64,
    cpu_used: u64,
    memory_used: u64,
    replicas: u64,
}

impl<'a> Node<'a> {
    fn new(host: &'a Host) -> Self {
        Node {
            name: &host.metadata.name,
            host,
            ready: host
                .status
                .as_ref()
                .is_some_and(|s| s.phase == HostPhase::Ready),
            not_ready_since: host
                .status
                .as_ref()
                .filter(|s| s.phase == HostPhase::NotReady)
                .and_then(|s| s.not_ready_since.as_deref())
                .and_then(crate::model::unix_millis),
            // A capacity that does not parse offers nothing rather than failing the pass.
            cpu_capacity: parse_cpu(host.spec.capacity.cpu.as_str()).unwrap_or(0),
            memory_capacity: parse_memory(host.spec.capacity.memory.as_str()).unwrap_or(0),
            cpu_used: 0,
            memory_used: 0,
            replicas: 0,
        }
    }

    /// The first static reason this host cannot take replicas of an instance with `selector`.
    fn static_misfit(&self, selector: &BTreeMap<String, String>) -> Option<Misfit> {
        if !self.ready {
            Some(Misfit::NotReady)
        } else if self.host.spec.unschedulable {
            Some(Misfit::Unschedulable)
        } else if !selector
            .iter()
            .all(|(k, v)| self.host.metadata.labels.get(k) == Some(v))
        {
            Some(Misfit::SelectorMismatch)
        } else {
            None
        }
    }

    fn resource_misfit(&self, cpu: u64, memory: u64) -> Option<Misfit> {
        if cpu > self.cpu_capacity.saturating_sub(self.cpu_used) {
            Some(Misfit::InsufficientCpu)
        } else if memory > self.memory_capacity.saturating_sub(self.memory_used) {
            Some(Misfit::InsufficientMemory)
        } else {
            None
        }
    }

    /// How long the host has been NotReady at `now_ms`, if it is and says since when.
    fn not_ready_for(&self, now_ms: i64) -> Option<Duration> {
        let since = self.not_ready_since?;
        Some(Duration::from_millis(
            u64::try_from(now_ms.saturating_sub(since)).unwrap_or(0),
        ))
    }

    fn charge(&mut self, cpu: u64, memory: u64) {
        self.cpu_used = self.cpu_used.saturating_add(cpu);
        self.memory_used = self.memory_used.saturating_add(memory);
        self.replicas += 1;
    }

    /// How full the host would be with one more replica: the sum of the cpu and memory
    /// fractions in millionths (lower is better, as Kubernetes' LeastAllocated).
    fn score_after(&self, cpu: u64, memory: u64) -> u128 {
        fn fraction(used: u64, capacity: u64) -> u128 {
            if capacity == 0 {
                0
            } else {
                u128::from(used) * 1_000_000 / u128::from(capacity)
            }
        }
        fraction(self.cpu_used.saturating_add(cpu), self.cpu_capacity)
            + fraction(
                self.memory_used.saturating_add(memory),
                self.memory_capacity,
            )
    }
}

/// A host in a ranking: (score with one more replica of the ranking's size, host index, the
/// host's replica count when scored).
type Ranked = (u128, usize, u64);

/// What a ranking is for: replicas of this cpu and memory, on hosts matching this selector.
type Size<'a> = (u64, u64, &'a BTreeMap<String, String>);

/// Rankings kept at once; one more drops them all (each is rebuilt in one scan of the hosts).
const MAX_RANKINGS: usize = 8;

/// Hosts ranked by how full one more replica of a size would make them (a min-heap), so that
/// placing a replica costs a few heap steps instead of a scan of every host. An entry scored
/// before its host was charged again is scored anew when it comes up: scores only grow as a
/// pass charges hosts, so the first up-to-date entry is the least, as a full scan would find.
#[derive(Default)]
struct Rankings<'a> {
    by_size: HashMap<Size<'a>, std::collections::BinaryHeap<Reverse<Ranked>>>,
}

impl<'a> Rankings<'a> {
    /// The ranking of `size`, built from the hosts `eligible` for it if there is none.
    fn of(
        &mut self,
        size: Size<'a>,
        eligible: &[usize],
        nodes: &[Node<'_>],
    ) -> &mut std::collections::BinaryHeap<Reverse<Ranked>> {
        if !self.by_size.contains_key(&size) && self.by_size.len() >= MAX_RANKINGS {
            self.by_size.clear();
        }
        self.by_size.entry(size).or_insert_with(|| {
            eligible
                .iter()
                .map(|&i| Reverse((nodes[i].score_after(size.0, size.1), i, nodes[i].replicas)))
                .collect()
        })
    }
}

/// An instance being planned.
struct Work<'a> {
    key: ObjectKey,
    instance: &'a OpenClawInstance,
    cpu: u64,
    memory: u64,
    /// Host index per ordinal.
    slots: Vec<Option<usize>>,
    reasons: Vec<Option<String>>,
    /// Ordinals let go of their lost host by failover: (host index, NotReady for).
    lost: BTreeMap<usize, (usize, Duration)>,
}

/// [`plan_at`] now.
pub fn plan<I: Borrow<OpenClawInstance>, H: Borrow<Host>>(instances: &[I], hosts: &[H]) -> Plan {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    plan_at(instances, hosts, now_ms)
}

/// Decides where every replica of every instance goes, at `now_ms` (Unix milliseconds, which
/// only failover looks at). Pure and deterministic: the result does not depend on the order of
/// either input. Runs in O(replicas × hosts).
///
/// Existing placements (`status.replicaStatus[].host`) are kept while their host exists and the
/// ordinal is below `spec.replicas` (and failover does not let them go); they are charged to
/// their host first, then the remaining replicas are placed instance by instance (in key
/// order), ordinal by ordinal.
pub fn plan_at<I: Borrow<OpenClawInstance>, H: Borrow<Host>>(
    instances: &[I],
    hosts: &[H],
    now_ms: i64,
) -> Plan {
    let mut nodes: Vec<Node<'_>> = hosts.iter().map(|h| Node::new(h.borrow())).collect();
    let mut next_failover: Option<Duration> = None;
    // Names are unique in the store; should a name come twice, the newest record wins.
    nodes.sort_by(|a, b| {
        (a.name.cmp(b.name)).then(
            b.host
                .metadata
                .resource_version
                .cmp(&a.host.metadata.resource_version),
        )
    });
    nodes.dedup_by(|later, first| later.name == first.name);
    let by_name: HashMap<&str, usize> =
        nodes.iter().enumerate().map(|(i, n)| (n.name, i)).collect();

    let mut work: Vec<Work<'_>> = instances
        .iter()
        .map(|instance| {
            let instance: &OpenClawInstance = instance.borrow();
            let desired = instance.spec.replicas.clamp(0, MAX_REPLICAS) as usize;
            Work {
                key: instance.key(),
                instance,
                cpu: instance.spec.cpu_millis(),
                memory: instance.spec.memory_bytes(),
                slots: vec![None; desired],
                reasons: vec![None; desired],
                lost: BTreeMap::new(),
            }
        })
        .collect();
    work.sort_by(|a, b| {
        (a.key.cmp(&b.key)).then(
            b.instance
                .metadata
                .resource_version
                .cmp(&a.instance.metadata.resource_version),
        )
    });
    work.dedup_by(|later, first| later.key == first.key);

    // Sticky placements first, so new replicas see every host's real allocation.
    for w in &mut work {
        let Some(status) = &w.instance.status else {
            continue;
        };
        for r in &status.replica_status {
            let ordinal = r.ordinal as usize;
            let (Some(host), true) = (&r.host, ordinal < w.slots.len()) else {
                continue;
            };
            if w.slots[ordinal].is_some() {
                continue;
            }
            if let Some(&i) = by_name.get(host.as_str()) {
                let failover = &w.instance.spec.failover;
                if failover.reschedules()
                    && let Some(down) = nodes[i].not_ready_for(now_ms)
                    && down >= failover.after()
                {
                    w.lost.insert(ordinal, (i, down));
                    continue;
                }
                if failover.reschedules()
                    && let Some(down) = nodes[i].not_ready_for(now_ms)
                {
                    let due = failover.after().saturating_sub(down);
                    next_failover = Some(next_failover.map_or(due, |n| n.min(due)));
                }
                w.slots[ordinal] = Some(i);
                nodes[i].charge(w.cpu, w.memory);
            }
        }
    }

    // Replicas of the instance being placed, per host; reset after each instance.
    let mut spread = vec![0u32; nodes.len()];
    let mut eligible: Vec<usize> = Vec::with_capacity(nodes.len());
    let mut ranked = Rankings::default();
    // Hosts taken out of a ranking while an instance is placed (they hold one of its replicas).
    let mut aside: Vec<Reverse<Ranked>> = Vec::new();
    for w in &mut work {
        if w.slots.iter().all(Option::is_some) {
            continue;
        }
        for i in w.slots.iter().flatten() {
            spread[*i] += 1;
        }
        let mut static_misfits = [0usize; 5];
        eligible.clear();
        for (i, node) in nodes.iter().enumerate() {
            match node.static_misfit(&w.instance.spec.placement.host_selector) {
                Some(m) => static_misfits[m as usize] += 1,
                None => eligible.push(i),
            }
        }
        // Ordinals whose state volume was kept on a host (scale-down with whenScaled: Retain)
        // go back there when it fits.
        let retain_scaled = w.instance.spec.volume_retention.when_scaled == RetentionPolicy::Retain;
        let retained: Vec<(u32, usize)> = match &w.instance.status {
            Some(st) => st
                .retained_volumes
                .iter()
                .filter(|v| retain_scaled || v.from_failover())
                .filter_map(|v| Some((v.ordinal, *by_name.get(v.host.as_str())?)))
                .collect(),
            None => Vec::new(),
        };
        for ordinal in 0..w.slots.len() {
            if w.slots[ordinal].is_some() {
                continue;
            }
            let back = retained.iter().find(|(o, i)| {
                *o as usize == ordinal
                    && eligible.contains(i)
                    && nodes[*i].resource_misfit(w.cpu, w.memory).is_none()
            });
            if let Some(&(_, i)) = back {
                w.slots[ordinal] = Some(i);
                nodes[i].charge(w.cpu, w.memory);
                spread[i] += 1;
                continue;
            }
            // The emptiest fitting host without a replica of this instance, from the ranking
            // of its size; a full scan only when there is none (to say why, or to spread).
            let heap = ranked.of(
                (w.cpu, w.memory, &w.instance.spec.placement.host_selector),
                &eligible,
                &nodes,
            );
            let mut best: Option<(u32, u128, usize)> = None;
            while let Some(Reverse((score, i, charges))) = heap.pop() {
                let node = &nodes[i];
                if charges != node.replicas {
                    heap.push(Reverse((
                        node.score_after(w.cpu, w.memory),
                        i,
                        node.replicas,
                    )));
                } else if spread[i] > 0 {
                    aside.push(Reverse((score, i, charges)));
                } else if node.resource_misfit(w.cpu, w.memory).is_none() {
                    best = Some((0, score, i));
                    break;
                }
                // A host this size does not fit never fits it later in the pass (hosts are
                // only charged): it leaves the ranking.
            }
            let mut misfits = static_misfits;
            if best.is_none() {
                for &i in &eligible {
                    let node = &nodes[i];
                    if let Some(m) = node.resource_misfit(w.cpu, w.memory) {
                        misfits[m as usize] += 1;
                        continue;
                    }
                    // Hosts are in name order, so a strict improvement keeps the first name on
                    // ties.
                    let candidate = (spread[i], node.score_after(w.cpu, w.memory), i);
                    if best.is_none_or(|b| (candidate.0, candidate.1) < (b.0, b.1)) {
                        best = Some(candidate);
                    }
                }
            }
            match (best, w.lost.get(&ordinal)) {
                (Some((_, _, i)), _) => {
                    w.slots[ordinal] = Some(i);
                    nodes[i].charge(w.cpu, w.memory);
                    spread[i] += 1;
                    aside.push(Reverse((
                        nodes[i].score_after(w.cpu, w.memory),
                        i,
                        nodes[i].replicas,
                    )));
                }
                // Nowhere else to go: the replica keeps waiting for its host.
                (None, Some(&(i, _))) => {
                    w.lost.remove(&ordinal);
                    w.slots[ordinal] = Some(i);
                    nodes[i].charge(w.cpu, w.memory);
                    spread[i] += 1;
                }
                (None, None) => {
                    w.reasons[ordinal] = Some(unschedulable_message(nodes.len(), &misfits))
                }
            }
        }
        for i in w.slots.iter().flatten() {
            spread[*i] = 0;
        }
        ranked
            .of(
                (w.cpu, w.memory, &w.instance.spec.placement.host_selector),
                &eligible,
                &nodes,
            )
            .extend(aside.drain(..));
    }

    let mut moves = BTreeMap::new();
    for w in &work {
        let these: Moves = w
            .lost
            .iter()
            .filter(|(o, (from, _))| w.slots[**o].is_some_and(|to| to != *from))
            .map(|(o, (from, down))| {
                let m = Moved {
                    from: nodes[*from].name.to_string(),
                    not_ready_for: *down,
                };
                (*o as u32, m)
            })
            .collect();
        if !these.is_empty() {
            moves.insert(w.key.clone(), these);
        }
    }
    let instances = work
        .into_iter()
        .map(|w| {
            let replicas = w
                .slots
                .iter()
                .zip(w.reasons)
                .map(|(slot, reason)| match slot {
                    Some(i) => ReplicaPlacement::Placed {
                        host: nodes[*i].name.to_string(),
                    },
                    None => ReplicaPlacement::Unplaced {
                        reason: reason.unwrap_or_default(),
                    },
                })
                .collect();
            (
                w.key,
                InstancePlan {
                    generation: w.instance.metadata.generation,
                    replicas,
                },
            )
        })
        .collect();
    let hosts = nodes
        .iter()
        .map(|n| {
            let allocated = HostResources {
                cpu_millis: n.cpu_used,
                memory_bytes: n.memory_used,
                replicas: Some(n.replicas),
            };
            (n.name.to_string(), allocated)
        })
        .collect();
    Plan {
        instances,
        hosts,
        moves,
        next_failover,
    }
}

/// Writes `plan` into an instance's status; returns whether anything changed. `now` (RFC 3339)
/// stamps a condition whose status flips.
///
/// A replica that stays on its host keeps everything the agent reported about it; one that gets
/// a new host (or loses it) starts over as `Pending`. The `Scheduled` condition, and
/// `status.message` while a replica is unplaced, say why. When placement changed (or the
/// instance had no status yet) the summary (phase, ready replicas, observed generation) is
/// recomputed with [`summarize`], the same rule agent reports go through, so the two never
/// disagree; otherwise the phase is left alone.
pub fn apply_instance_plan(
    instance: &mut OpenClawInstance,
    plan: &InstancePlan,
    now: &str,
) -> bool {
    apply_instance_plan_moving(instance, plan, &Moves::new(), now)
}

/// The epoch of a new placement: above the replica's last one and above the instance's
/// `resourceVersion` (an index of the store, which only grows; the write that records this
/// epoch gets a higher one, so a later placement, or one of a re-created instance, is higher
/// still).
pub fn next_epoch(previous: Option<u64>, resource_version: Option<u64>) -> u64 {
    previous
        .unwrap_or(0)
        .max(resource_version.unwrap_or(0))
        .saturating_add(1)
}

/// [`apply_instance_plan`] where failover moved the replicas in `moved` off their lost host:
/// their message says so and the volumes they leave are retained there.
pub fn apply_instance_plan_moving(
    instance: &mut OpenClawInstance,
    plan: &InstancePlan,
    moved: &Moves,
    now: &str,
) -> bool {
    let before = instance.status.clone();
    let resource_version = instance.metadata.resource_version;
    let name = instance.metadata.name.clone();
    let initial_target = super::rollout::initial_target(instance);
    let status = instance.status.get_or_insert_with(InstanceStatus::default);

    let mut previous: BTreeMap<u32, ReplicaStatus> = BTreeMap::new();
    for r in std::mem::take(&mut status.replica_status) {
        previous.entry(r.ordinal).or_insert(r);
    }
    let old_hosts: Vec<(u32, Option<String>)> =
        previous.iter().map(|(o, r)| (*o, r.host.clone())).collect();
    let mut replicas = Vec::with_capacity(plan.replicas.len());
    let mut lost_volumes = Vec::new();
    for (ordinal, placement) in plan.replicas.iter().enumerate() {
        let ordinal = ordinal as u32;
        let replica_name = format!("{name}-{ordinal}");
        let entry = match (placement, previous.remove(&ordinal)) {
            (ReplicaPlacement::Placed { host }, Some(mut r))
                if r.host.as_deref() == Some(host.as_str()) =>
            {
                r.name = replica_name;
                if r.epoch.is_none() {
                    r.epoch = Some(next_epoch(None, resource_version));
                }
                r
            }
            (ReplicaPlacement::Placed { host }, prev) => {
                let message = moved
                    .get(&ordinal)
                    .filter(|m| prev.as_ref().and_then(|p| p.host.as_deref()) == Some(&m.from))
                    .map(Moved::message);
                if let (Some(p), Some(_)) = (&prev, &message)
                    && let Some(from) = &p.host
                {
                    lost_volumes.push(RetainedVolume {
                        replica: p.name.clone(),
                        ordinal,
                        host: from.clone(),
                        since: Some(now.to_string()),
                        reason: Some(RETAINED_BY_FAILOVER.to_string()),
                    });
                }
                ReplicaStatus {
                    name: replica_name,
                    ordinal,
                    host: Some(host.clone()),
                    message,
                    epoch: Some(next_epoch(
                        prev.as_ref().and_then(|p| p.epoch),
                        resource_version,
                    )),
                    target_revision: prev.and_then(|p| p.target_revision).or(initial_target),
                    ..ReplicaStatus::default()
                }
            }
            (ReplicaPlacement::Unplaced { reason }, prev) => ReplicaStatus {
                name: replica_name,
                ordinal,
                state: ReplicaState::Pending,
                message: Some(reason.clone()),
                // The epoch stays, so the next placement is above it.
                epoch: prev.as_ref().and_then(|p| p.epoch),
                target_revision: prev.and_then(|p| p.target_revision).or(initial_target),
                ..ReplicaStatus::default()
            },
        };
        replicas.push(entry);
    }
    let new_hosts: Vec<(u32, Option<String>)> = replicas
        .iter()
        .map(|r| (r.ordinal, r.host.clone()))
        .collect();
    let placement_changed = before.is_none() || old_hosts != new_hosts;
    let retain = instance_retains(&instance.spec);
    let status = instance.status.get_or_insert_with(InstanceStatus::default);
    status.retained_volumes = retained_after(
        &status.retained_volumes,
        retain,
        &previous,
        &lost_volumes,
        &replicas,
        now,
    );
    status.replica_status = replicas;
    status.replicas = plan.replicas.len() as i64;

    match plan.unschedulable() {
        Some(reason) => {
            set_condition(
                &mut status.conditions,
                CONDITION_SCHEDULED,
                "False",
                REASON_UNSCHEDULABLE,
                reason,
                now,
            );
            status.message = Some(reason.to_string());
        }
        None => {
            let desired = plan.replicas.len();
            let message = format!("{desired}/{desired} replicas placed");
            set_condition(
                &mut status.conditions,
                CONDITION_SCHEDULED,
                "True",
                REASON_SCHEDULED,
                &message,
                now,
            );
            if status
                .message
                .as_deref()
                .is_some_and(|m| m.starts_with(REASON_UNSCHEDULABLE))
            {
                status.message = None;
            }
        }
    }
    if placement_changed {
        summarize(instance);
    }
    instance.status != before
}

fn instance_retains(spec: &crate::model::InstanceSpec) -> bool {
    spec.volume_retention.when_scaled == RetentionPolicy::Retain
}

/// `status.retainedVolumes` after a placement: with `retain`, every replica removed by a
/// scale-down (`removed`, those that had a host) keeps its volume listed (replica, ordinal,
/// host, since `now`), and an entry is dropped once its ordinal is placed on its host again;
/// an ordinal placed elsewhere keeps its old volume listed. Without `retain`, none of those
/// is. Volumes left on a lost host by failover (`lost`) are listed whatever `retain` says.
pub fn retained_after(
    before: &[RetainedVolume],
    retain: bool,
    removed: &BTreeMap<u32, ReplicaStatus>,
    lost: &[RetainedVolume],
    placed: &[ReplicaStatus],
    now: &str,
) -> Vec<RetainedVolume> {
    let mut out: Vec<RetainedVolume> = before
        .iter()
        .filter(|v| retain || v.always_kept())
        .cloned()
        .collect();
    for v in lost {
        if !out
            .iter()
            .any(|o| o.ordinal == v.ordinal && o.host == v.host)
        {
            out.push(v.clone());
        }
    }
    let removed = removed.values().filter(|_| retain);
    for r in removed {
        let Some(host) = &r.host else { continue };
        if !out
            .iter()
            .any(|v| v.ordinal == r.ordinal && v.host == *host)
        {
            out.push(RetainedVolume {
                replica: r.name.clone(),
                ordinal: r.ordinal,
                host: host.clone(),
                since: Some(now.to_string()),
                reason: None,
            });
        }
    }
    out.retain(|v| {
        !placed
            .iter()
            .any(|r| r.ordinal == v.ordinal && r.host.as_deref() == Some(v.host.as_str()))
    });
    out.sort_by(|a, b| (a.ordinal, &a.host).cmp(&(b.ordinal, &b.host)));
    out
}

/// Sets a condition, stamping `now` only when it is new or its status flips.
fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &str,
) {
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.status = status.to_string();
                c.last_transition_time = Some(now.to_string());
            }
            c.reason = Some(reason.to_string());
            c.message = Some(message.to_string());
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            last_transition_time: Some(now.to_string()),
        }),
    }
}

/// Records what is placed on a host in `status.allocated`; returns whether anything changed.
pub fn apply_host_allocation(host: &mut Host, allocated: &HostResources) -> bool {
    match &mut host.status {
        Some(status) if status.allocated == *allocated => false,
        Some(status) => {
            status.allocated = allocated.clone();
            true
        }
        None => {
            host.status = Some(HostStatus {
                allocated: allocated.clone(),
                ..HostStatus::default()
            });
            true
        }
    }
}

/// Why a scheduling pass failed.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("listing {kind} objects: {source}")]
    List {
        kind: Kind,
        #[source]
        source: Box<StoreError>,
    },
    #[error("writing the placement of {objects} objects: {source}")]
    Write {
        objects: usize,
        #[source]
        source: Box<StoreError>,
    },
    #[error("the scheduling pass stopped unexpectedly: {0}")]
    Task(String),
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub instances: usize,
    pub hosts: usize,
    /// Objects skipped because they could not be decoded.
    pub skipped: usize,
    /// Instances whose plan was tried on them (the others were settled: see [`Settled`]).
    pub tried: usize,
    pub instances_written: usize,
    pub hosts_written: usize,
    pub unplaced_replicas: usize,
    /// Replicas moved off a lost host by failover.
    pub moved_replicas: usize,
    /// When to run again for a failover that comes due with time alone.
    pub requeue_after: Option<Duration>,
    /// The store index after the last write, if anything was written.
    pub index: Option<u64>,
    /// Whether the pass found nothing to do without planning (see [`Settled`]).
    pub quiet: bool,
}

/// Every replica's host, by ordinal.
fn placements(instance: &OpenClawInstance) -> Vec<(u32, Option<String>)> {
    instance
        .status
        .iter()
        .flat_map(|s| s.replica_status.iter())
        .map(|r| (r.ordinal, r.host.clone()))
        .collect()
}

fn decoded(o: &Decoded) -> Option<&Resource> {
    match &o.resource {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(object = %o.key, error = %e, "the scheduler skips an object it cannot read");
            None
        }
    }
}

/// One pass: reads every instance and host, plans, and writes only what changed (in batches of
/// [`WRITE_BATCH`], each one transaction). Blocking; call it from `spawn_blocking`.
pub fn reconcile_once(store: &dyn Store) -> Result<PassReport, SchedulerError> {
    reconcile_settled(store, &mut Settled::default())
}

/// What the scheduler keeps between passes: each instance whose plan, tried on it, changed
/// nothing, with the `resourceVersion` it was tried at and that plan. Trying a plan is a
/// function of the instance and the plan alone (the time only stamps what changes), so while
/// neither moved the instance needs no copy and no second try: a pass over a large fleet
/// after one instance changed tries that one.
#[derive(Debug, Default)]
pub struct Settled {
    by_key: HashMap<ObjectKey, (u64, InstancePlan)>,
    /// Set by a pass that found nothing to do; see [`Quiet`].
    quiet: Option<Quiet>,
}

/// How long a pass may lean on [`Quiet`] before it plans everything again regardless.
pub const QUIET_RECHECK: Duration = Duration::from_secs(30);

/// What a pass that found every replica placed and nothing to write leaves for the next: while
/// no instance is written, a change of hosts can only matter if it removes a host that holds
/// replicas (they must go elsewhere), turns such a host away from Ready (failover may come due)
/// or leaves a host's `status.allocated` different from what is placed there. Anything else (a
/// host enrolled, a heartbeat's refresh, a label, a cordon) changes no placement while nothing
/// waits for a host, so the next pass checks those three against the hosts alone instead of
/// planning every host again: enrolling 10,000 hosts no longer plans 10,000 hosts per pass.
#[derive(Debug)]
struct Quiet {
    /// The instance list the pass read: the decoded cache hands out the same list while no
    /// instance is written, and a new one as soon as one is.
    instances: crate::store::decoded::DecodedList,
    /// What is placed on each host holding replicas (the others hold nothing).
    allocated: HashMap<String, HostResources>,
    /// When the pass that planned ran.
    planned_at: std::time::Instant,
}

impl Quiet {
    /// Whether a pass reading `instances` and `hosts` would find nothing to do either.
    fn holds(
        &self,
        instances: &crate::store::decoded::DecodedList,
        hosts: &[Arc<Decoded>],
    ) -> bool {
        if !Arc::ptr_eq(&self.instances, instances) || self.planned_at.elapsed() >= QUIET_RECHECK {
            return false;
        }
        let nothing = HostResources::nothing_placed();
        let mut holding = 0;
        for o in hosts {
            let Ok(Resource::Host(host)) = &o.resource else {
                return false;
            };
            let Some(status) = host.status.as_ref() else {
                return false;
            };
            match self.allocated.get(host.metadata.name.as_str()) {
                Some(allocated) => {
                    holding += 1;
                    if status.phase != HostPhase::Ready || status.allocated != *allocated {
                        return false;
                    }
                }
                None if status.allocated != nothing => return false,
                None => {}
            }
        }
        holding == self.allocated.len()
    }
}

/// [`reconcile_once`], trying plans only on instances `settled` does not hold; keeps
/// `settled`.
pub fn reconcile_settled(
    store: &dyn Store,
    settled: &mut Settled,
) -> Result<PassReport, SchedulerError> {
    let list = |kind| {
        crate::store::decoded::list_decoded(store, kind).map_err(|e| SchedulerError::List {
            kind,
            source: Box::new(e),
        })
    };
    let instance_objects = list(Kind::OpenClawInstance)?;
    let host_objects = list(Kind::Host)?;
    let mut report = PassReport::default();
    if settled
        .quiet
        .as_ref()
        .is_some_and(|q| q.holds(&instance_objects, &host_objects))
    {
        report.instances = instance_objects.len();
        report.hosts = host_objects.len();
        report.quiet = true;
        return Ok(report);
    }
    settled.quiet = None;

    // Each readable instance with its key, as the store gave it (in key order).
    let mut keyed: Vec<(&ObjectKey, &OpenClawInstance)> =
        Vec::with_capacity(instance_objects.len());
    for o in instance_objects.iter() {
        match decoded(o) {
            Some(Resource::OpenClawInstance(i)) => keyed.push((&o.key, i)),
            _ => report.skipped += 1,
        }
    }
    let instances: Vec<&OpenClawInstance> = keyed.iter().map(|(_, i)| *i).collect();
    // A host that cannot be read still holds its replicas (they must not move because of a bad
    // record), but takes nothing new and is not written.
    let mut readable: Vec<&Host> = Vec::with_capacity(host_objects.len());
    let mut unreadable_hosts = Vec::new();
    for o in host_objects.iter() {
        match decoded(o) {
            Some(Resource::Host(h)) => readable.push(h),
            _ => {
                report.skipped += 1;
                unreadable_hosts.push(placeholder_host(&o.key.name));
            }
        }
    }
    let hosts: Vec<&Host> = readable
        .iter()
        .copied()
        .chain(unreadable_hosts.iter())
        .collect();
    report.instances = instances.len();
    report.hosts = hosts.len();

    let decided = plan(&instances, &hosts);
    let no_moves = Moves::new();
    let moves_of = |key: &ObjectKey| decided.moves.get(key).unwrap_or(&no_moves);
    report.unplaced_replicas = decided.instances.values().map(InstancePlan::unplaced).sum();
    report.requeue_after = decided.next_failover;

    let now = crate::util::now_rfc3339();
    let mut keys = Vec::new();
    let mut events = Vec::new();
    // The placements the pass read: another controller (a drain) may move a replica between
    // this read and the write, and a plan made before that move must not undo it.
    // Kept for the instances to be written only.
    let mut read_hosts: HashMap<ObjectKey, Vec<(u32, Option<String>)>> = HashMap::new();
    for &(key, read) in &keyed {
        let Some(p) = decided.instances.get(key) else {
            continue;
        };
        let version = read.metadata.resource_version.unwrap_or(0);
        let moves = moves_of(key);
        // Settled: its status already says what the plan says, so it has no placement event
        // either.
        if moves.is_empty()
            && settled
                .by_key
                .get(key)
                .is_some_and(|(v, tried)| *v == version && tried == p)
        {
            continue;
        }
        events.extend(placement_events(read, p));
        report.tried += 1;
        // The plan is tried on a copy: the decoded object is shared with other readers.
        if apply_instance_plan_moving(&mut read.clone(), p, moves, &now) {
            settled.by_key.remove(key);
            read_hosts.insert(key.clone(), placements(read));
            keys.push(key.clone());
            report.instances_written += 1;
        } else if moves.is_empty() {
            settled.by_key.insert(key.clone(), (version, p.clone()));
        }
    }
    // Instances gone from the store leave it.
    if !settled.by_key.is_empty() {
        let present: std::collections::HashSet<&ObjectKey> =
            keyed.iter().map(|(key, _)| *key).collect();
        settled.by_key.retain(|k, _| present.contains(k));
    }
    for host in readable {
        if let Some(allocated) = decided.hosts.get(&host.metadata.name)
            && host.status.as_ref().map(|s| &s.allocated) != Some(allocated)
        {
            keys.push(ObjectKey::cluster(Kind::Host, host.metadata.name.clone()));
            report.hosts_written += 1;
        }
    }

    let mut change = |r: &mut Resource| -> bool {
        match r {
            Resource::OpenClawInstance(instance) => {
                let key = instance.key();
                match decided.instances.get(&key) {
                    // A spec changed since the pass read it: the next pass (woken by that very
                    // change) plans it again.
                    Some(p)
                        if p.generation == instance.metadata.generation
                            && read_hosts.get(&key) == Some(&placements(instance)) =>
                    {
                        apply_instance_plan_moving(instance, p, moves_of(&key), &now)
                    }
                    _ => false,
                }
            }
            Resource::Host(host) => match decided.hosts.get(&host.metadata.name) {
                Some(allocated) => apply_host_allocation(host, allocated),
                None => false,
            },
            Resource::Tenant(_)
            | Resource::Project(_)
            | Resource::ConfigTemplate(_)
            | Resource::Secret(_)
            | Resource::Rollout(_) => false,
        }
    };
    for chunk in keys.chunks(WRITE_BATCH) {
        match store.update_many(chunk, &mut change) {
            Ok(Some(index)) => {
                report.index = Some(index);
                for key in chunk {
                    for (ordinal, m) in decided.moves.get(key).into_iter().flatten() {
                        events.push(record_failover(key, *ordinal, m));
                        report.moved_replicas += 1;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                return Err(SchedulerError::Write {
                    objects: chunk.len(),
                    source: Box::new(e),
                });
            }
        }
    }
    crate::events::record_all(store, events);
    // Without a decoded cache every list is a new one: no pass could be quiet.
    if keys.is_empty()
        && store.decoded_cache().is_some()
        && report.skipped == 0
        && report.unplaced_replicas == 0
        && decided.moves.is_empty()
        && decided.next_failover.is_none()
    {
        let nothing = HostResources::nothing_placed();
        settled.quiet = Some(Quiet {
            instances: Arc::clone(&instance_objects),
            allocated: decided
                .hosts
                .iter()
                .filter(|(_, a)| **a != nothing)
                .map(|(name, a)| (name.clone(), a.clone()))
                .collect(),
            planned_at: std::time::Instant::now(),
        });
    }
    Ok(report)
}

/// The one place a failover is recorded: a log line and a Warning event `Rescheduled`.
fn record_failover(key: &ObjectKey, ordinal: u32, m: &Moved) -> crate::events::Event {
    let replica = format!("{}-{ordinal}", key.name);
    tracing::warn!(
        target: "clusterclaw::events",
        reason = "Rescheduled",
        instance = %key,
        replica = %replica,
        from = %m.from,
        "{}",
        m.message()
    );
    crate::events::Event::warning(key.clone(), "Rescheduled", m.message())
        .replica(replica)
        .source("scheduler")
}

/// The events of a placement decision: `Scheduled` for every replica placed on a host it was
/// not on, `FailedScheduling` (Warning) for every replica that cannot be placed, unless its
/// status already says so for the same reason.
pub fn placement_events(
    instance: &OpenClawInstance,
    plan: &InstancePlan,
) -> Vec<crate::events::Event> {
    use crate::events::Event;
    let key = instance.key();
    let previous = instance
        .status
        .as_ref()
        .map(|s| s.replica_status.as_slice())
        .unwrap_or_default();
    let mut out = Vec::new();
    for (ordinal, placement) in plan.replicas.iter().enumerate() {
        let replica = || format!("{}-{ordinal}", instance.metadata.name);
        let before = previous.iter().find(|r| r.ordinal == ordinal as u32);
        match placement {
            ReplicaPlacement::Placed { host } => {
                if before.and_then(|r| r.host.as_deref()) != Some(host.as_str()) {
                    out.push(
                        Event::normal(
                            key.clone(),
                            REASON_SCHEDULED,
                            format!(
                                "Successfully assigned {}/{}/{} to host {host}",
                                key.tenant,
                                key.project,
                                replica()
                            ),
                        )
                        .replica(replica())
                        .source("scheduler"),
                    );
                }
            }
            ReplicaPlacement::Unplaced { reason } => {
                let same = before.is_some_and(|r| {
                    r.host.is_none() && r.message.as_deref() == Some(reason.as_str())
                });
                if !same {
                    out.push(
                        Event::warning(key.clone(), "FailedScheduling", reason.clone())
                            .replica(replica())
                            .source("scheduler"),
                    );
                }
            }
        }
    }
    out
}

/// A host with only a name: exists, is not ready, offers nothing.
fn placeholder_host(name: &str) -> Host {
    Host {
        api_version: crate::model::API_VERSION.to_string(),
        kind: Kind::Host,
        metadata: crate::model::Metadata {
            name: name.to_string(),
            ..Default::default()
        },
        spec: Default::default(),
        status: None,
    }
}

/// Runs the scheduler until `shutdown` turns true (or its sender is dropped): a pass at start,
/// then one after every burst of store changes (coalesced for [`DEBOUNCE`]), one every `resync`,
/// and retries after failures with [`backoff`] (see [`super::runtime`]).
pub async fn run(store: Arc<dyn Store>, shutdown: watch::Receiver<bool>, resync: Duration) {
    let settled = std::sync::Mutex::new(Settled::default());
    super::runtime::run(
        "scheduler",
        store,
        shutdown,
        resync,
        move |store: &dyn Store| {
            let report = reconcile_settled(
                store,
                &mut settled.lock().unwrap_or_else(|e| e.into_inner()),
            )?;
            if report.instances_written + report.hosts_written > 0 {
                tracing::info!(
                    instances = report.instances_written,
                    hosts = report.hosts_written,
                    unplaced_replicas = report.unplaced_replicas,
                    index = report.index,
                    "scheduler updated placements"
                );
            } else {
                tracing::debug!(
                    instances = report.instances,
                    hosts = report.hosts,
                    "scheduler pass changed nothing"
                );
            }
            Ok::<_, SchedulerError>(report.requeue_after)
        },
    )
    .await;
}
