//! Tests of the scheduler: the plan function, status application, and the loop against a store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::*;
use crate::controllers::fixtures::{
    HostBuilder, InstanceBuilder, PROJECT, TENANT, project, tenant,
};
use crate::model::{HostPhase, InstancePhase, InstanceStatus, ReplicaState};
use crate::store::sqlite::SqliteStore;
use crate::store::{ListFilter, StoredObject};
use crate::store::{TokenRecord, WriteMode, WriteSummary};

fn key(name: &str) -> ObjectKey {
    ObjectKey::instance(TENANT, PROJECT, name)
}

fn hosts_of<'a>(p: &'a Plan, name: &str) -> Vec<Option<&'a str>> {
    p.hosts_of(&key(name))
}

fn reason_of(p: &Plan, name: &str) -> Option<String> {
    p.instances[&key(name)].unschedulable().map(str::to_string)
}

fn allocated(p: &Plan, host: &str) -> (u64, u64, u64) {
    let a = &p.hosts[host];
    (a.cpu_millis, a.memory_bytes, a.replicas.unwrap_or(0))
}

const GI: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------------
// plan

#[test]
fn replicas_of_one_instance_spread_over_hosts() {
    let hosts = [
        HostBuilder::new("h1").build(),
        HostBuilder::new("h2").build(),
        HostBuilder::new("h3").build(),
    ];
    let p = plan(
        &[InstanceBuilder::new("bot")
            .replicas(3)
            .memory("1Gi")
            .build()],
        &hosts,
    );
    assert_eq!(hosts_of(&p, "bot"), [Some("h1"), Some("h2"), Some("h3")]);
}

#[test]
fn spreading_beats_least_allocated() {
    // h1 is far emptier, but the second replica still goes to h2 to spread the instance.
    let hosts = [
        HostBuilder::new("h1").cpu("64").memory("256Gi").build(),
        HostBuilder::new("h2").cpu("4").memory("8Gi").build(),
    ];
    let p = plan(&[InstanceBuilder::new("bot").replicas(2).build()], &hosts);
    assert_eq!(hosts_of(&p, "bot"), [Some("h1"), Some("h2")]);
}

#[test]
fn more_replicas_than_hosts_wrap_around_evenly() {
    let hosts = [
        HostBuilder::new("h1").build(),
        HostBuilder::new("h2").build(),
    ];
    let p = plan(
        &[InstanceBuilder::new("bot")
            .replicas(4)
            .cpu("500m")
            .memory("512Mi")
            .build()],
        &hosts,
    );
    assert_eq!(
        hosts_of(&p, "bot"),
        [Some("h1"), Some("h2"), Some("h1"), Some("h2")]
    );
}

#[test]
fn a_new_replica_goes_to_the_least_allocated_host() {
    let hosts = [
        HostBuilder::new("h1").cpu("8").memory("16Gi").build(),
        HostBuilder::new("h2").cpu("8").memory("16Gi").build(),
        HostBuilder::new("h3").cpu("8").memory("16Gi").build(),
    ];
    let instances = [
        InstanceBuilder::new("a")
            .replicas(2)
            .cpu("2")
            .memory("4Gi")
            .placed(0, "h1")
            .placed(1, "h3")
            .build(),
        InstanceBuilder::new("b")
            .cpu("4")
            .memory("8Gi")
            .placed(0, "h1")
            .build(),
        InstanceBuilder::new("c").cpu("1").memory("1Gi").build(),
    ];
    let p = plan(&instances, &hosts);
    assert_eq!(hosts_of(&p, "c"), [Some("h2")]);

    // Least allocated weighs both resources relative to capacity: h2 is bigger in absolute
    // terms but fuller in proportion.
    let hosts = [
        HostBuilder::new("big").cpu("16").memory("32Gi").build(),
        HostBuilder::new("small").cpu("4").memory("8Gi").build(),
    ];
    let instances = [
        InstanceBuilder::new("a")
            .cpu("12")
            .memory("24Gi")
            .placed(0, "big")
            .build(),
        InstanceBuilder::new("b").cpu("1").memory("1Gi").build(),
    ];
    assert_eq!(hosts_of(&plan(&instances, &hosts), "b"), [Some("small")]);
}

#[test]
fn ties_go_to_the_host_name_that_sorts_first() {
    let hosts = [
        HostBuilder::new("h3").build(),
        HostBuilder::new("h1").build(),
        HostBuilder::new("h2").build(),
    ];
    let p = plan(&[InstanceBuilder::new("bot").build()], &hosts);
    assert_eq!(hosts_of(&p, "bot"), [Some("h1")]);
    let p = plan(
        &[InstanceBuilder::new("bot")
            .replicas(3)
            .memory("1Gi")
            .build()],
        &hosts,
    );
    assert_eq!(hosts_of(&p, "bot"), [Some("h1"), Some("h2"), Some("h3")]);
}

#[test]
fn instances_fill_hosts_evenly() {
    let hosts = [
        HostBuilder::new("h1").build(),
        HostBuilder::new("h2").build(),
    ];
    let instances: Vec<_> = (0..4)
        .map(|i| InstanceBuilder::new(&format!("i{i}")).memory("1Gi").build())
        .collect();
    let p = plan(&instances, &hosts);
    let placed: Vec<_> = (0..4).map(|i| hosts_of(&p, &format!("i{i}"))[0]).collect();
    assert_eq!(placed, [Some("h1"), Some("h2"), Some("h1"), Some("h2")]);
    assert_eq!(allocated(&p, "h1"), (2000, 2 * GI, 2));
    assert_eq!(allocated(&p, "h2"), (2000, 2 * GI, 2));
}

#[test]
fn the_selector_must_match_every_label() {
    let hosts = [
        HostBuilder::new("eu1")
            .labels(&[("region", "eu"), ("disk", "ssd")])
            .build(),
        HostBuilder::new("eu2").labels(&[("region", "eu")]).build(),
        HostBuilder::new("us1")
            .labels(&[("region", "us"), ("disk", "ssd")])
            .build(),
    ];
    let instances = [
        InstanceBuilder::new("eu")
            .replicas(2)
            .memory("1Gi")
            .selector(&[("region", "eu")])
            .build(),
        InstanceBuilder::new("fast")
            .replicas(2)
            .memory("1Gi")
            .selector(&[("region", "eu"), ("disk", "ssd")])
            .build(),
        InstanceBuilder::new("ap")
            .selector(&[("region", "ap")])
            .build(),
    ];
    let p = plan(&instances, &hosts);
    assert_eq!(hosts_of(&p, "eu"), [Some("eu1"), Some("eu2")]);
    // Spreading is a preference: with one matching host both replicas share it.
    assert_eq!(hosts_of(&p, "fast"), [Some("eu1"), Some("eu1")]);
    assert_eq!(hosts_of(&p, "ap"), [None]);
    assert_eq!(
        reason_of(&p, "ap").as_deref(),
        Some("Unschedulable: 0/3 hosts fit (3 selector mismatch)")
    );
}

#[test]
fn insufficient_memory_and_cpu_are_reported_with_counts() {
    let hosts = [
        HostBuilder::new("h1")
            .memory("1Gi")
            .labels(&[("region", "eu")])
            .build(),
        HostBuilder::new("h2")
            .memory("1Gi")
            .labels(&[("region", "eu")])
            .build(),
        HostBuilder::new("h3").labels(&[("region", "us")]).build(),
    ];
    let bot = InstanceBuilder::new("bot")
        .memory("2Gi")
        .selector(&[])
        .build();
    let p = plan(std::slice::from_ref(&bot), &hosts);
    assert_eq!(hosts_of(&p, "bot"), [Some("h3")]);

    let bot = InstanceBuilder::new("bot")
        .memory("2Gi")
        .selector(&[("region", "eu")])
        .build();
    let p = plan(&[bot], &hosts);
    assert_eq!(
        reason_of(&p, "bot").as_deref(),
        Some("Unschedulable: 0/3 hosts fit (2 insufficient memory, 1 selector mismatch)")
    );

    let hosts = [
        HostBuilder::new("h1").cpu("1").build(),
        HostBuilder::new("h2").cpu("1500m").build(),
    ];
    let p = plan(&[InstanceBuilder::new("bot").cpu("2").build()], &hosts);
    assert_eq!(
        reason_of(&p, "bot").as_deref(),
        Some("Unschedulable: 0/2 hosts fit (2 insufficient cpu)")
    );
}

#[test]
fn each_host_counts_under_its_first_failing_reason() {
    let hosts = [
        // Not ready, cordoned, wrong labels and too small: counted as not ready only.
        HostBuilder::new("a")
            .not_ready()
            .unschedulable()
            .labels(&[("region", "us")])
            .cpu("1")
            .build(),
        HostBuilder::new("b").no_status().build(),
        HostBuilder::new("c").phase(HostPhase::Unknown).build(),
        HostBuilder::new("d")
            .unschedulable()
            .labels(&[("region", "us")])
            .build(),
        HostBuilder::new("e")
            .labels(&[("region", "us")])
            .cpu("1")
            .build(),
        HostBuilder::new("f")
            .labels(&[("region", "eu")])
            .cpu("1")
            .memory("1Gi")
            .build(),
        HostBuilder::new("g")
            .labels(&[("region", "eu")])
            .memory("1Gi")
            .build(),
    ];
    let p = plan(
        &[InstanceBuilder::new("bot")
            .cpu("2")
            .memory("2Gi")
            .selector(&[("region", "eu")])
            .build()],
        &hosts,
    );
    assert_eq!(
        reason_of(&p, "bot").as_deref(),
        Some(
            "Unschedulable: 0/7 hosts fit (3 not ready, 1 unschedulable, 1 selector mismatch, 1 insufficient cpu, 1 insufficient memory)"
        )
    );
}

#[test]
fn with_no_hosts_the_reason_says_how_to_add_one() {
    let p = plan(
        &[InstanceBuilder::new("bot").replicas(2).build()],
        &[] as &[Host],
    );
    assert_eq!(hosts_of(&p, "bot"), [None, None]);
    assert_eq!(
        reason_of(&p, "bot").as_deref(),
        Some(
            "Unschedulable: 0/0 hosts fit (no hosts have joined; enroll one with clusterclaw-agent)"
        )
    );
    assert!(p.hosts.is_empty());
}

#[test]
fn capacity_is_shared_by_all_instances() {
    let hosts = [HostBuilder::new("h1").cpu("4").memory("8Gi").build()];
    let instances = [
        InstanceBuilder::new("a")
            .replicas(3)
            .cpu("1")
            .memory("2Gi")
            .build(),
        InstanceBuilder::new("b")
            .replicas(2)
            .cpu("1")
            .memory("2Gi")
            .build(),
    ];
    let p = plan(&instances, &hosts);
    assert_eq!(hosts_of(&p, "a"), [Some("h1"); 3]);
    // The fourth replica fits exactly; the fifth does not.
    assert_eq!(hosts_of(&p, "b"), [Some("h1"), None]);
    assert_eq!(
        reason_of(&p, "b").as_deref(),
        Some("Unschedulable: 0/1 hosts fit (1 insufficient cpu)")
    );
    assert_eq!(allocated(&p, "h1"), (4000, 8 * GI, 4));
}

#[test]
fn placed_replicas_stay_where_they_are() {
    let hosts = [
        HostBuilder::new("h1").build(),
        HostBuilder::new("h2").build(),
        HostBuilder::new("h3").build(),
    ];
    // Both replicas share h2 (not what a fresh plan would do), and stay there; the new third
    // replica is placed by the rules.
    let bot = InstanceBuilder::new("bot")
        .replicas(3)
        .memory("1Gi")
        .placed(0, "h2")
        .placed(1, "h2")
        .build();
    let p = plan(&[bot], &hosts);
    assert_eq!(hosts_of(&p, "bot"), [Some("h2"), Some("h2"), Some("h1")]);
    assert_eq!(allocated(&p, "h2"), (2000, 2 * GI, 2));
}

#[test]
fn placed_replicas_stay_on_hosts_that_no_longer_fit() {
    let hosts = [
        HostBuilder::new("down").not_ready().build(),
        HostBuilder::new("cordoned").unschedulable().build(),
        HostBuilder::new("relabelled")
            .labels(&[("region", "us")])
            .build(),
        HostBuilder::new("shrunk").cpu("1").memory("1Gi").build(),
        HostBuilder::new("spare")
            .labels(&[("region", "eu")])
            .cpu("64")
            .memory("256Gi")
            .build(),
    ];
    let bot = InstanceBuilder::new("bot")
        .replicas(4)
        .cpu("2")
        .memory("4Gi")
        .selector(&[("region", "eu")])
        .placed(0, "down")
        .placed(1, "cordoned")
        .placed(2, "relabelled")
        .placed(3, "shrunk")
        .build();
    let p = plan(&[bot], &hosts);
    assert_eq!(
        hosts_of(&p, "bot"),
        [
            Some("down"),
            Some("cordoned"),
            Some("relabelled"),
            Some("shrunk")
        ]
    );
    // The overcommitted host is charged what runs there.
    assert_eq!(allocated(&p, "shrunk"), (2000, 4 * GI, 1));
    assert_eq!(allocated(&p, "spare"), (0, 0, 0));
}

#[test]
fn sticky_placements_are_charged_before_new_ones() {
    // "a" sorts first and is new; "z" already runs on h1 and takes most of it. "a" must not be
    // put on h1 as if it were empty.
    let hosts = [HostBuilder::new("h1").cpu("4").memory("8Gi").build()];
    let instances = [
        InstanceBuilder::new("a").cpu("1").memory("4Gi").build(),
        InstanceBuilder::new("z")
            .cpu("1")
            .memory("6Gi")
            .placed(0, "h1")
            .build(),
    ];
    let p = plan(&instances, &hosts);
    assert_eq!(hosts_of(&p, "z"), [Some("h1")]);
    assert_eq!(hosts_of(&p, "a"), [None]);
    assert_eq!(
        reason_of(&p, "a").as_deref(),
        Some("Unschedulable: 0/1 hosts fit (1 insufficient memory)")
    );
}

#[test]
fn scaling_down_removes_the_highest_ordinals() {
    let hosts = [
        HostBuilder::new("h1").build(),
        HostBuilder::new("h2").build(),
        HostBuilder::new("h3").build(),
    ];
    let bot = InstanceBuilder::new("bot")
        .replicas(1)
        .memory("1Gi")
        .placed(0, "h3")
        .placed(1, "h1")
        .placed(2, "h2")
        .build();
    let p = plan(&[bot], &hosts);
    assert_eq!(hosts_of(&p, "bot"), [Some("h3")]);
    assert_eq!(allocated(&p, "h1"), (0, 0, 0));
    assert_eq!(allocated(&p, "h2"), (0, 0, 0));
    assert_eq!(allocated(&p, "h3"), (1000, GI, 1));

    let p = plan(
        &[InstanceBuilder::new("bot")
            .replicas(0)
            .placed(0, "h1")
            .build()],
        &hosts,
    );
    assert_eq!(hosts_of(&p, "bot"), Vec::<Option<&str>>::new());
    assert_eq!(allocated(&p, "h1"), (0, 0, 0));
}

#[test]
fn a_replica_on_a_deleted_host_is_placed_again() {
    let hosts = [
        HostBuilder::new("h1").build(),
        HostBuilder::new("h2").build(),
    ];
    let bot = InstanceBuilder::new("bot")
        .replicas(2)
        .memory("1Gi")
        .placed(0, "gone")
        .placed(1, "h1")
        .build();
    let p = plan(&[bot], &hosts);
    // Ordinal 0 moves, and spreads away from ordinal 1.
    assert_eq!(hosts_of(&p, "bot"), [Some("h2"), Some("h1")]);
    assert!(!p.hosts.contains_key("gone"));
}

#[test]
fn the_plan_does_not_depend_on_input_order() {
    let hosts: Vec<Host> = (0..7)
        .map(|i| {
            HostBuilder::new(&format!("h{i}"))
                .cpu(&format!("{}", 2 + i % 3))
                .memory(&format!("{}Gi", 4 + 2 * (i % 4)))
                .labels(&[("zone", if i % 2 == 0 { "a" } else { "b" })])
                .build()
        })
        .collect();
    let mut instances: Vec<OpenClawInstance> = (0..25)
        .map(|i| {
            let b = InstanceBuilder::new(&format!("i{i:02}"))
                .replicas(1 + i % 3)
                .cpu("500m")
                .memory("1Gi");
            let b = if i % 5 == 0 {
                b.selector(&[("zone", "b")])
            } else {
                b
            };
            let b = if i % 7 == 0 {
                b.placed(0, &format!("h{}", i % 7))
            } else {
                b
            };
            b.build()
        })
        .collect();
    instances.push(
        InstanceBuilder::new("other")
            .tenant("zeta")
            .replicas(2)
            .build(),
    );
    let expected = plan(&instances, &hosts);
    assert!(
        expected.instances.values().any(|p| p.unplaced() > 0),
        "the fixture should exhaust capacity"
    );

    let mut shuffled_instances = instances.clone();
    let mut shuffled_hosts = hosts.clone();
    for round in 0..5 {
        shuffled_instances.reverse();
        shuffled_instances.rotate_left(round * 3 + 1);
        shuffled_hosts.reverse();
        shuffled_hosts.rotate_left(round + 1);
        assert_eq!(
            plan(&shuffled_instances, &shuffled_hosts),
            expected,
            "round {round}"
        );
    }
}

#[test]
fn odd_data_does_not_break_the_plan() {
    let mut status = InstanceStatus::default();
    let replica = |ordinal: u32, host: &str| ReplicaStatus {
        name: "whatever".into(),
        ordinal,
        host: Some(host.into()),
        ..ReplicaStatus::default()
    };
    // The same ordinal twice (the first entry wins), an ordinal far out of range.
    status.replica_status = vec![
        replica(0, "h2"),
        replica(0, "h1"),
        replica(4_000_000_000, "h1"),
    ];
    let instances = [
        InstanceBuilder::new("dup")
            .replicas(1)
            .status(status)
            .build(),
        InstanceBuilder::new("negative").replicas(-3).build(),
        InstanceBuilder::new("huge")
            .replicas(1_000_000)
            .cpu("1m")
            .memory("1Mi")
            .build(),
        InstanceBuilder::new("garbled")
            .cpu("lots")
            .memory("plenty")
            .build(),
    ];
    let hosts = [
        HostBuilder::new("h1").cpu("bogus").build(),
        HostBuilder::new("h2").cpu("64").memory("1Ti").build(),
        HostBuilder::new("h2").cpu("1").resource_version(3).build(),
    ];
    let p = plan(&instances, &hosts);
    assert_eq!(hosts_of(&p, "dup"), [Some("h2")]);
    assert!(hosts_of(&p, "negative").is_empty());
    assert_eq!(hosts_of(&p, "huge").len(), MAX_REPLICAS as usize);
    // Unparseable requests count as zero; an unparseable capacity offers nothing.
    assert!(hosts_of(&p, "garbled")[0].is_some());
    // The newest of two records of h2 counts (1 cpu, taken by "dup"), whatever the order.
    assert_eq!(p.hosts.len(), 2);
    assert_eq!(
        reason_of(&p, "huge").as_deref(),
        Some("Unschedulable: 0/2 hosts fit (2 insufficient cpu)")
    );
    let reversed: Vec<Host> = hosts.iter().rev().cloned().collect();
    assert_eq!(plan(&instances, &reversed), p);
}

#[test]
fn ten_thousand_instances_on_a_hundred_hosts() {
    let hosts: Vec<Host> = (0..100)
        .map(|i| {
            HostBuilder::new(&format!("host-{i:03}"))
                .cpu("64")
                .memory("256Gi")
                .labels(&[("region", if i % 4 == 0 { "us" } else { "eu" })])
                .build()
        })
        .collect();
    let instances: Vec<OpenClawInstance> = (0..10_000)
        .map(|i| {
            let b = InstanceBuilder::new(&format!("bot-{i:05}"))
                .project(&format!("p{}", i % 17))
                .replicas(1 + i % 3)
                .cpu("100m")
                .memory("256Mi");
            let b = if i % 10 == 0 {
                b.selector(&[("region", "us")])
            } else {
                b
            };
            let b = if i % 2 == 0 {
                b.placed(0, &format!("host-{:03}", i % 100))
            } else {
                b
            };
            b.build()
        })
        .collect();
    let started = std::time::Instant::now();
    let p = plan(&instances, &hosts);
    let elapsed = started.elapsed();
    let replicas: i64 = instances.iter().map(|i| i.spec.replicas).sum();
    let placed: u64 = p.hosts.values().map(|a| a.replicas.unwrap_or(0)).sum();
    assert_eq!(placed, replicas as u64);
    assert!(p.instances.values().all(|i| i.unplaced() == 0));
    // The load is even: no host carries much more than the average.
    let max = p
        .hosts
        .values()
        .map(|a| a.replicas.unwrap_or(0))
        .max()
        .unwrap_or(0);
    assert!(
        max <= placed / 100 * 2,
        "max {max} replicas on one host of {placed}"
    );
    if !cfg!(debug_assertions) {
        assert!(
            elapsed < Duration::from_millis(500),
            "planning took {elapsed:?}"
        );
    }
}

/// New replicas placed as by a scan of every host for each: the least
/// (replicas of the instance there, fullness after, name) among the hosts that fit.
fn placed_by_scan(instances: &[OpenClawInstance], hosts: &[Host]) -> Vec<Vec<Option<String>>> {
    let mut nodes: Vec<Node<'_>> = hosts.iter().map(Node::new).collect();
    nodes.sort_by(|a, b| a.name.cmp(b.name));
    let mut sorted: Vec<&OpenClawInstance> = instances.iter().collect();
    sorted.sort_by_key(|i| i.key());
    sorted
        .into_iter()
        .map(|inst| {
            let (cpu, memory) = (inst.spec.cpu_millis(), inst.spec.memory_bytes());
            let mut spread = vec![0u32; nodes.len()];
            (0..inst.spec.replicas)
                .map(|_| {
                    let best = (0..nodes.len())
                        .filter(|&i| {
                            nodes[i]
                                .static_misfit(&inst.spec.placement.host_selector)
                                .is_none()
                                && nodes[i].resource_misfit(cpu, memory).is_none()
                        })
                        .min_by_key(|&i| (spread[i], nodes[i].score_after(cpu, memory), i))?;
                    nodes[best].charge(cpu, memory);
                    spread[best] += 1;
                    Some(nodes[best].name.to_string())
                })
                .collect()
        })
        .collect()
}

#[test]
fn ranked_hosts_place_as_a_scan_of_every_host_would() {
    // A pseudo-random mix: hosts of many sizes and labels that fill up, instances of more
    // sizes than rankings are kept, some with selectors, some with more replicas than hosts.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..4 {
        let hosts: Vec<Host> = (0..40 + round * 20)
            .map(|i| {
                let b = HostBuilder::new(&format!("h{i:03}"))
                    .cpu(&format!("{}", 1 + next(8)))
                    .memory(&format!("{}Gi", 1 + next(16)))
                    .labels(&[("zone", ["a", "b", "c"][next(3) as usize])]);
                match next(10) {
                    0 => b.not_ready(),
                    1 => b.unschedulable(),
                    _ => b,
                }
                .build()
            })
            .collect();
        let instances: Vec<OpenClawInstance> = (0..120)
            .map(|i| {
                let b = InstanceBuilder::new(&format!("bot-{i:03}"))
                    .replicas(1 + next(6) as i64 + if i % 29 == 0 { 80 } else { 0 })
                    .cpu(&format!("{}m", 100 * (1 + next(12))))
                    .memory(&format!("{}Mi", 128 * (1 + next(3))));
                if next(4) == 0 {
                    b.selector(&[("zone", ["a", "b", "c"][next(3) as usize])])
                } else {
                    b
                }
                .build()
            })
            .collect();
        let p = plan(&instances, &hosts);
        let expected = placed_by_scan(&instances, &hosts);
        let mut sorted: Vec<&OpenClawInstance> = instances.iter().collect();
        sorted.sort_by_key(|i| i.key());
        for (inst, want) in sorted.into_iter().zip(expected) {
            let got: Vec<Option<String>> = p
                .hosts_of(&inst.key())
                .into_iter()
                .map(|h| h.map(str::to_string))
                .collect();
            assert_eq!(got, want, "round {round}, {}", inst.key());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// status

const NOW: &str = "2026-07-01T10:00:00Z";
const LATER: &str = "2026-07-01T11:00:00Z";

fn placed(hosts: &[&str]) -> InstancePlan {
    InstancePlan {
        generation: Some(1),
        replicas: hosts
            .iter()
            .map(|h| ReplicaPlacement::Placed {
                host: h.to_string(),
            })
            .collect(),
    }
}

fn scheduled(instance: &OpenClawInstance) -> &Condition {
    let status = instance.status.as_ref().expect("status");
    status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_SCHEDULED)
        .expect("Scheduled condition")
}

#[test]
fn a_new_instance_gets_replica_status_and_a_condition() {
    let mut bot = InstanceBuilder::new("bot")
        .replicas(2)
        .generation(4)
        .build();
    let mut p = placed(&["h1", "h2"]);
    p.generation = Some(4);
    assert!(apply_instance_plan(&mut bot, &p, NOW));
    let status = bot.status.clone().expect("status");
    assert_eq!(status.replicas, 2);
    assert_eq!(status.phase, InstancePhase::Progressing);
    let names: Vec<_> = status
        .replica_status
        .iter()
        .map(|r| (r.name.as_str(), r.ordinal, r.host.as_deref()))
        .collect();
    assert_eq!(names, [("bot-0", 0, Some("h1")), ("bot-1", 1, Some("h2"))]);
    assert!(
        status
            .replica_status
            .iter()
            .all(|r| r.state == ReplicaState::Pending)
    );
    let c = scheduled(&bot);
    assert_eq!(
        (c.status.as_str(), c.reason.as_deref()),
        ("True", Some(REASON_SCHEDULED))
    );
    assert_eq!(c.message.as_deref(), Some("2/2 replicas placed"));
    assert_eq!(c.last_transition_time.as_deref(), Some(NOW));

    // Applying the same plan again changes nothing, whatever the time.
    assert!(!apply_instance_plan(&mut bot, &p, LATER));
}

#[test]
fn agent_reports_survive_when_the_host_stays_and_reset_when_it_changes() {
    let mut bot = InstanceBuilder::new("bot")
        .replicas(2)
        .placed(0, "h1")
        .placed(1, "h2")
        .build();
    bot.status.as_mut().expect("status").phase = InstancePhase::Running;
    assert!(apply_instance_plan(&mut bot, &placed(&["h1", "h2"]), NOW));
    let status = bot.status.clone().expect("status");
    assert_eq!(
        status.phase,
        InstancePhase::Running,
        "placement did not change: the phase is not ours to touch"
    );
    let r0 = &status.replica_status[0];
    assert_eq!(
        (
            r0.state,
            r0.container_id.as_deref(),
            r0.restarts,
            r0.host_port
        ),
        (ReplicaState::Ready, Some("c0h1"), 2, Some(19100))
    );

    assert!(apply_instance_plan(&mut bot, &placed(&["h1", "h3"]), NOW));
    let status = bot.status.clone().expect("status");
    let r1 = &status.replica_status[1];
    assert_eq!(r1.host.as_deref(), Some("h3"));
    assert_eq!(
        (
            r1.state,
            r1.container_id.as_deref(),
            r1.restarts,
            r1.host_port
        ),
        (ReplicaState::Pending, None, 0, None)
    );
    assert_eq!(
        status.replica_status[0].container_id.as_deref(),
        Some("c0h1")
    );
    assert_eq!(status.phase, InstancePhase::Progressing);
}

#[test]
fn scaling_down_keeps_the_phase_and_drops_the_highest_ordinals() {
    let mut bot = InstanceBuilder::new("bot")
        .replicas(1)
        .placed(0, "h1")
        .placed(1, "h2")
        .placed(2, "h3")
        .build();
    bot.status.as_mut().expect("status").phase = InstancePhase::Running;
    assert!(apply_instance_plan(&mut bot, &placed(&["h1"]), NOW));
    let status = bot.status.clone().expect("status");
    assert_eq!(status.replica_status.len(), 1);
    assert_eq!(status.replica_status[0].host.as_deref(), Some("h1"));
    assert_eq!(status.replicas, 1);
    assert_eq!(status.phase, InstancePhase::Running);
}

#[test]
fn an_unplaced_replica_makes_the_instance_pending_with_the_reason() {
    let reason = "Unschedulable: 0/3 hosts fit (2 insufficient memory, 1 selector mismatch)";
    let mut bot = InstanceBuilder::new("bot")
        .replicas(2)
        .placed(0, "h1")
        .build();
    bot.status.as_mut().expect("status").phase = InstancePhase::Running;
    let p = InstancePlan {
        generation: Some(1),
        replicas: vec![
            ReplicaPlacement::Placed { host: "h1".into() },
            ReplicaPlacement::Unplaced {
                reason: reason.into(),
            },
        ],
    };
    assert!(apply_instance_plan(&mut bot, &p, NOW));
    let status = bot.status.clone().expect("status");
    // One replica serves, one cannot be placed: degraded (with none serving it is Pending).
    assert_eq!(status.phase, InstancePhase::Degraded);
    assert_eq!(status.message.as_deref(), Some(reason));
    assert_eq!(status.replica_status[1].host, None);
    assert_eq!(status.replica_status[1].message.as_deref(), Some(reason));
    assert_eq!(
        status.replica_status[0].container_id.as_deref(),
        Some("c0h1")
    );
    let c = scheduled(&bot);
    assert_eq!(
        (c.status.as_str(), c.reason.as_deref(), c.message.as_deref()),
        ("False", Some(REASON_UNSCHEDULABLE), Some(reason))
    );
    assert_eq!(c.last_transition_time.as_deref(), Some(NOW));
    assert!(!apply_instance_plan(&mut bot, &p, LATER));

    // Once it fits, the condition flips (with a new time), the message goes, the instance moves on.
    assert!(apply_instance_plan(&mut bot, &placed(&["h1", "h2"]), LATER));
    let status = bot.status.clone().expect("status");
    assert_eq!(status.phase, InstancePhase::Progressing);
    assert_eq!(status.message, None);
    assert_eq!(status.replica_status[1].message, None);
    let c = scheduled(&bot);
    assert_eq!(
        (c.status.as_str(), c.last_transition_time.as_deref()),
        ("True", Some(LATER))
    );
}

#[test]
fn messages_of_others_are_left_alone() {
    let mut bot = InstanceBuilder::new("bot").placed(0, "h1").build();
    let status = bot.status.as_mut().expect("status");
    status.phase = InstancePhase::Degraded;
    status.message = Some("bot-0 restarted 5 times".into());
    assert!(apply_instance_plan(&mut bot, &placed(&["h1"]), NOW));
    let status = bot.status.clone().expect("status");
    assert_eq!(status.message.as_deref(), Some("bot-0 restarted 5 times"));
    assert_eq!(status.phase, InstancePhase::Degraded);
}

#[test]
fn host_allocation_is_written_only_when_it_changes() {
    let a = HostResources {
        cpu_millis: 1500,
        memory_bytes: 3 * GI,
        replicas: Some(2),
    };
    let mut h = HostBuilder::new("h1").build();
    assert!(apply_host_allocation(&mut h, &a));
    assert_eq!(h.status.as_ref().map(|s| &s.allocated), Some(&a));
    assert_eq!(h.status.as_ref().map(|s| s.phase), Some(HostPhase::Ready));
    assert!(!apply_host_allocation(&mut h, &a));

    let mut h = HostBuilder::new("h2").no_status().build();
    assert!(apply_host_allocation(&mut h, &a));
    assert!(!apply_host_allocation(&mut h, &a));
}

#[test]
fn backoff_doubles_up_to_its_cap() {
    assert_eq!(backoff(1), BACKOFF_INITIAL);
    assert_eq!(backoff(2), BACKOFF_INITIAL * 2);
    assert_eq!(backoff(4), BACKOFF_INITIAL * 8);
    assert_eq!(backoff(20), BACKOFF_MAX);
    assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
}

// ---------------------------------------------------------------------------------------------
// the loop against SQLite

struct Cluster {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(&dir.path().join("state.db")).expect("open store"));
        store
            .write(
                &[
                    (Resource::Tenant(tenant(TENANT)), WriteMode::Apply),
                    (
                        Resource::Project(project(TENANT, PROJECT)),
                        WriteMode::Apply,
                    ),
                ],
                false,
            )
            .expect("seed tenant and project");
        Cluster { _dir: dir, store }
    }

    /// Writes a host as enrollment and heartbeats would: spec and labels, then its status.
    fn add_host(&self, host: Host) {
        let name = host.metadata.name.clone();
        let status = host.status.clone();
        self.store
            .write(&[(Resource::Host(host), WriteMode::Apply)], false)
            .expect("write host");
        self.store
            .update(&ObjectKey::cluster(Kind::Host, &name), &mut |r| match r {
                Resource::Host(h) => {
                    h.status.clone_from(&status);
                    true
                }
                _ => false,
            })
            .expect("host status");
    }

    fn apply(&self, instance: OpenClawInstance) {
        self.store
            .write(
                &[(Resource::OpenClawInstance(instance), WriteMode::Apply)],
                false,
            )
            .expect("write instance");
    }

    fn instance(&self, name: &str) -> OpenClawInstance {
        match self
            .store
            .get(&key(name))
            .expect("get")
            .expect("exists")
            .resource()
            .expect("decode")
        {
            Resource::OpenClawInstance(i) => i,
            other => panic!("not an instance: {other:?}"),
        }
    }

    fn host(&self, name: &str) -> Host {
        match self
            .store
            .get(&ObjectKey::cluster(Kind::Host, name))
            .expect("get")
            .expect("exists")
            .resource()
            .expect("decode")
        {
            Resource::Host(h) => h,
            other => panic!("not a host: {other:?}"),
        }
    }

    fn placement(&self, name: &str) -> Vec<Option<String>> {
        let i = self.instance(name);
        i.status
            .map(|s| s.replica_status.into_iter().map(|r| r.host).collect())
            .unwrap_or_default()
    }

    fn start(&self) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let store: Arc<dyn Store> = self.store.clone();
        (tx, tokio::spawn(run(store, rx, Duration::from_secs(3600))))
    }
}

/// Polls `cond` every few milliseconds for up to ten seconds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the store index has not moved for a while, and returns it.
async fn quiet_index(store: &SqliteStore) -> u64 {
    let mut last = store.index();
    let mut still = 0;
    for _ in 0..500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = store.index();
        if now == last {
            still += 1;
            if still >= 10 {
                return now;
            }
        } else {
            still = 0;
            last = now;
        }
    }
    panic!("the store index never settled (at {last})");
}

fn some(hosts: &[&str]) -> Vec<Option<String>> {
    hosts.iter().map(|h| Some(h.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_places_scales_down_and_goes_quiet() {
    let c = Cluster::new();
    c.add_host(HostBuilder::new("h1").build());
    c.add_host(HostBuilder::new("h2").build());
    c.apply(
        InstanceBuilder::new("bot")
            .replicas(3)
            .memory("1Gi")
            .build(),
    );
    let (stop, task) = c.start();

    eventually("three placed replicas", || {
        c.placement("bot") == some(&["h1", "h2", "h1"])
    })
    .await;
    eventually("host allocations", || {
        c.host("h1").status.map(|s| s.allocated.replicas) == Some(Some(2))
    })
    .await;
    let bot = c.instance("bot");
    let status = bot.status.expect("status");
    assert_eq!(status.replicas, 3);
    assert_eq!(status.phase, InstancePhase::Progressing);
    assert_eq!(
        c.host("h2").status.expect("status").allocated,
        HostResources {
            cpu_millis: 1000,
            memory_bytes: GI,
            replicas: Some(1)
        }
    );

    // Quiet: once converged, nothing is written any more.
    let settled = quiet_index(&c.store).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        c.store.index(),
        settled,
        "a converged scheduler must not write"
    );

    // An agent report on a placed replica is kept by later passes.
    c.store
        .update(&key("bot"), &mut |r| match r {
            Resource::OpenClawInstance(i) => {
                let s = i.status.as_mut().expect("status");
                s.replica_status[0].state = ReplicaState::Ready;
                s.replica_status[0].container_id = Some("abc123".into());
                s.phase = InstancePhase::Running;
                true
            }
            _ => false,
        })
        .expect("agent report");

    // Scale down: the highest ordinals go, and their hosts are freed.
    c.apply(
        InstanceBuilder::new("bot")
            .replicas(1)
            .memory("1Gi")
            .build(),
    );
    eventually("one replica", || c.placement("bot") == some(&["h1"])).await;
    eventually("h2 freed", || {
        c.host("h2").status.map(|s| s.allocated.replicas) == Some(Some(0))
    })
    .await;
    let status = c.instance("bot").status.expect("status");
    assert_eq!(
        status.replica_status[0].container_id.as_deref(),
        Some("abc123")
    );
    assert_eq!(status.replicas, 1);

    let settled = quiet_index(&c.store).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.store.index(), settled);

    stop.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops promptly")
        .expect("no panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_reports_unschedulable_and_places_once_a_host_joins() {
    let c = Cluster::new();
    c.apply(
        InstanceBuilder::new("bot")
            .replicas(2)
            .memory("1Gi")
            .selector(&[("region", "eu")])
            .build(),
    );
    let (stop, task) = c.start();

    let no_hosts =
        "Unschedulable: 0/0 hosts fit (no hosts have joined; enroll one with clusterclaw-agent)";
    eventually("the no-host reason", || {
        c.instance("bot").status.and_then(|s| s.message).as_deref() == Some(no_hosts)
    })
    .await;
    let status = c.instance("bot").status.expect("status");
    assert_eq!(status.phase, InstancePhase::Pending);
    let cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_SCHEDULED)
        .expect("condition");
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_deref()),
        ("False", Some(REASON_UNSCHEDULABLE))
    );

    c.add_host(HostBuilder::new("us1").labels(&[("region", "us")]).build());
    eventually("the selector reason", || {
        c.instance("bot").status.and_then(|s| s.message).as_deref()
            == Some("Unschedulable: 0/1 hosts fit (1 selector mismatch)")
    })
    .await;

    c.add_host(HostBuilder::new("eu1").labels(&[("region", "eu")]).build());
    eventually("both placed", || {
        c.placement("bot") == some(&["eu1", "eu1"])
    })
    .await;
    let status = c.instance("bot").status.expect("status");
    assert_eq!(status.message, None);
    assert_eq!(status.phase, InstancePhase::Progressing);

    // Deleting the host puts the replicas back to unplaced; a new host takes them.
    c.store
        .delete(&ObjectKey::cluster(Kind::Host, "eu1"), None)
        .expect("delete host");
    eventually("unplaced again", || c.placement("bot") == vec![None, None]).await;
    c.add_host(HostBuilder::new("eu2").labels(&[("region", "eu")]).build());
    eventually("placed on the new host", || {
        c.placement("bot") == some(&["eu2", "eu2"])
    })
    .await;
    let settled = quiet_index(&c.store).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.store.index(), settled);

    drop(stop);
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops when the sender goes")
        .expect("no panic");
}

#[test]
fn a_pass_writes_once_then_nothing() {
    let c = Cluster::new();
    c.add_host(HostBuilder::new("h1").build());
    c.apply(InstanceBuilder::new("bot").build());
    let report = reconcile_once(c.store.as_ref()).expect("pass");
    assert_eq!(
        (
            report.instances_written,
            report.hosts_written,
            report.skipped
        ),
        (1, 1, 0)
    );
    assert_eq!(report.index, Some(c.store.index()));
    let again = reconcile_once(c.store.as_ref()).expect("pass");
    assert_eq!(
        (again.instances_written, again.hosts_written, again.index),
        (0, 0, None)
    );
    assert_eq!(c.placement("bot"), some(&["h1"]));
}

#[test]
fn a_pass_skips_objects_it_cannot_read() {
    let c = Cluster::new();
    c.add_host(HostBuilder::new("h1").build());
    c.add_host(HostBuilder::new("h2").cpu("1").build());
    c.apply(InstanceBuilder::new("bot").placed(0, "h1").build());
    c.apply(InstanceBuilder::new("broken").build());
    // The store drops status on apply; put the placement back as an earlier pass would have.
    c.store
        .update(&key("bot"), &mut |r| match r {
            Resource::OpenClawInstance(i) => {
                i.status = InstanceBuilder::new("bot").placed(0, "h1").build().status;
                true
            }
            _ => false,
        })
        .expect("placement");
    let db = rusqlite::Connection::open(c.store.path()).expect("open the database file");
    db.execute(
        "UPDATE objects SET body = '{\"not\": \"an object\"}' WHERE name IN ('h1', 'broken')",
        [],
    )
    .expect("corrupt two records");
    // Written behind the store's back: its cache of decoded objects (which the updates above
    // filled) is forgotten, as when a server starts on such a file.
    c.store.decoded_cache().expect("a cache").clear();

    c.apply(InstanceBuilder::new("new").build());
    let report = reconcile_once(c.store.as_ref()).expect("a pass survives unreadable objects");
    assert_eq!(report.skipped, 2);
    // The replica on the unreadable host stays; the host takes nothing new and is not written.
    assert_eq!(c.placement("bot"), some(&["h1"]));
    assert_eq!(c.placement("new"), some(&["h2"]));
    assert_eq!(report.hosts_written, 1);
}

// ---------------------------------------------------------------------------------------------
// the loop's timing, against a store that records when it is read

struct ClockStore {
    index: AtomicU64,
    notify: watch::Sender<u64>,
    failing: AtomicBool,
    passes: Mutex<Vec<tokio::time::Instant>>,
}

impl ClockStore {
    fn new() -> Arc<ClockStore> {
        Arc::new(ClockStore {
            index: AtomicU64::new(1),
            notify: watch::channel(1).0,
            failing: AtomicBool::new(false),
            passes: Mutex::new(Vec::new()),
        })
    }

    fn bump(&self) {
        let i = self.index.fetch_add(1, Ordering::SeqCst) + 1;
        self.notify.send_replace(i);
    }

    /// Times of the passes so far, relative to `start`.
    fn passes(&self, start: tokio::time::Instant) -> Vec<Duration> {
        self.passes
            .lock()
            .expect("lock")
            .iter()
            .map(|t| t.duration_since(start))
            .collect()
    }
}

fn unsupported() -> StoreError {
    StoreError::Backend("not supported by this test store".into())
}

impl Store for ClockStore {
    fn index(&self) -> u64 {
        self.index.load(Ordering::SeqCst)
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }
    fn get(&self, _key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
        Ok(None)
    }
    fn list(&self, filter: &ListFilter) -> Result<Vec<StoredObject>, StoreError> {
        if filter.kind == Kind::OpenClawInstance {
            self.passes
                .lock()
                .expect("lock")
                .push(tokio::time::Instant::now());
        }
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError::Backend("disk on fire".into()))
        } else {
            Ok(Vec::new())
        }
    }
    fn write(
        &self,
        _batch: &[(Resource, WriteMode)],
        _dry_run: bool,
    ) -> Result<WriteSummary, StoreError> {
        Err(unsupported())
    }
    fn update(
        &self,
        _key: &ObjectKey,
        _change: &mut dyn FnMut(&mut Resource) -> bool,
    ) -> Result<Option<u64>, StoreError> {
        Err(unsupported())
    }
    fn update_many(
        &self,
        _keys: &[ObjectKey],
        _change: &mut dyn FnMut(&mut Resource) -> bool,
    ) -> Result<Option<u64>, StoreError> {
        Err(unsupported())
    }
    fn delete(&self, _key: &ObjectKey, _expected: Option<u64>) -> Result<u64, StoreError> {
        Err(unsupported())
    }
    fn insert_token(&self, _token: &TokenRecord) -> Result<(), StoreError> {
        Err(unsupported())
    }
    fn token_by_hash(&self, _hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        Err(unsupported())
    }
    fn consume_join_token(&self, _hash: &str, _now: i64) -> Result<TokenRecord, StoreError> {
        Err(unsupported())
    }
    fn enroll_host(
        &self,
        _join_token_hash: &str,
        _now: i64,
        _host: Resource,
    ) -> Result<StoredObject, StoreError> {
        Err(unsupported())
    }
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Err(unsupported())
    }
    fn revoke_token(&self, _id: &str) -> Result<bool, StoreError> {
        Err(unsupported())
    }
    fn append_audit(
        &self,
        _entries: &[crate::audit::AuditEntry],
    ) -> Result<Vec<crate::audit::AuditRecord>, StoreError> {
        Err(unsupported())
    }
    fn list_audit(
        &self,
        _filter: &crate::audit::AuditFilter,
    ) -> Result<Vec<crate::audit::AuditRecord>, StoreError> {
        Err(unsupported())
    }
    fn verify_audit(&self) -> Result<crate::audit::AuditVerification, StoreError> {
        Err(unsupported())
    }
}

fn start_clocked(
    store: &Arc<ClockStore>,
    resync: Duration,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let dyn_store: Arc<dyn Store> = store.clone();
    (tx, tokio::spawn(run(dyn_store, rx, resync)))
}

#[tokio::test(start_paused = true)]
async fn resync_runs_a_pass_without_changes() {
    let store = ClockStore::new();
    let start = tokio::time::Instant::now();
    let (stop, task) = start_clocked(&store, Duration::from_secs(30));
    tokio::time::sleep(Duration::from_secs(95)).await;
    let secs: Vec<u64> = store.passes(start).iter().map(Duration::as_secs).collect();
    assert_eq!(secs, [0, 30, 60, 90]);
    stop.send(true).expect("stop");
    task.await.expect("no panic");
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_is_one_pass_after_the_debounce() {
    let store = ClockStore::new();
    let start = tokio::time::Instant::now();
    let (stop, task) = start_clocked(&store, Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(store.passes(start).len(), 1, "the first pass runs at start");

    let burst = tokio::time::Instant::now();
    for _ in 0..5 {
        store.bump();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let passes = store.passes(burst);
    assert_eq!(passes.len(), 2, "one pass for the whole burst: {passes:?}");
    assert!(
        passes[1] >= DEBOUNCE && passes[1] <= DEBOUNCE + Duration::from_millis(5),
        "{passes:?}"
    );
    stop.send(true).expect("stop");
    task.await.expect("no panic");
}

#[tokio::test(start_paused = true)]
async fn failures_are_retried_with_capped_exponential_backoff() {
    let store = ClockStore::new();
    store.failing.store(true, Ordering::SeqCst);
    let start = tokio::time::Instant::now();
    let (stop, task) = start_clocked(&store, Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_secs(200)).await;
    let passes = store.passes(start);
    let gaps: Vec<Duration> = passes.windows(2).map(|w| w[1] - w[0]).collect();
    let expected: Vec<Duration> = (1..=gaps.len() as u32).map(backoff).collect();
    assert_eq!(gaps, expected);
    assert!(
        gaps.len() > 10 && gaps.last() == Some(&BACKOFF_MAX),
        "{gaps:?}"
    );

    // Recovery resets the backoff and the loop goes back to waiting for changes.
    store.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(BACKOFF_MAX * 2).await;
    let count = store.passes(start).len();
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        store.passes(start).len(),
        count,
        "a healthy loop with nothing to do stays idle"
    );
    stop.send(true).expect("stop");
    task.await.expect("no panic");
}

#[tokio::test(start_paused = true)]
async fn shutdown_interrupts_a_backoff_wait() {
    let store = ClockStore::new();
    store.failing.store(true, Ordering::SeqCst);
    let (stop, task) = start_clocked(&store, Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_secs(100)).await;
    let stopped_at = tokio::time::Instant::now();
    stop.send(true).expect("stop");
    task.await.expect("no panic");
    assert!(stopped_at.elapsed() < Duration::from_millis(1));
}

#[test]
fn plan_keys_match_resource_keys() {
    let bot = InstanceBuilder::new("bot").tenant("t").project("p").build();
    assert_eq!(bot.key(), Resource::OpenClawInstance(bot.clone()).key());
    let mut by_key = BTreeMap::new();
    by_key.insert(bot.key(), 1);
    assert!(by_key.contains_key(&ObjectKey::instance("t", "p", "bot")));
}

// ---------------------------------------------------------------------------------------------
// retained volumes

fn retained(ordinal: u32, host: &str) -> crate::model::RetainedVolume {
    crate::model::RetainedVolume {
        reason: None,
        replica: format!("bot-{ordinal}"),
        ordinal,
        host: host.into(),
        since: Some(NOW.into()),
    }
}

#[test]
fn scaling_down_lists_the_removed_volumes_unless_they_are_deleted() {
    let build = || {
        InstanceBuilder::new("bot")
            .replicas(1)
            .placed(0, "h1")
            .placed(1, "h2")
            .placed(2, "h3")
            .build()
    };
    let mut bot = build();
    assert!(apply_instance_plan(&mut bot, &placed(&["h1"]), NOW));
    let status = bot.status.clone().expect("status");
    assert_eq!(
        status.retained_volumes,
        [retained(1, "h2"), retained(2, "h3")]
    );
    // Nothing moves on the next pass.
    assert!(!apply_instance_plan(&mut bot, &placed(&["h1"]), LATER));

    let mut deleting = build();
    deleting.spec.volume_retention.when_scaled = crate::model::RetentionPolicy::Delete;
    apply_instance_plan(&mut deleting, &placed(&["h1"]), NOW);
    assert!(deleting.status.expect("status").retained_volumes.is_empty());
}

#[test]
fn scaling_up_returns_to_the_host_holding_the_volume() {
    let hosts = [
        HostBuilder::new("h1").build(),
        HostBuilder::new("h2").build(),
        HostBuilder::new("h3").build(),
    ];
    // A fresh plan would put ordinal 1 on h2; its volume is on h3.
    let mut bot = InstanceBuilder::new("bot")
        .replicas(2)
        .memory("1Gi")
        .placed(0, "h1")
        .build();
    bot.status.as_mut().expect("status").retained_volumes = vec![retained(1, "h3")];
    let p = plan(std::slice::from_ref(&bot), &hosts);
    assert_eq!(hosts_of(&p, "bot"), [Some("h1"), Some("h3")]);
    // Placed there: the entry goes.
    assert!(apply_instance_plan(
        &mut bot,
        &p.instances[&key("bot")],
        NOW
    ));
    assert!(
        bot.status
            .as_ref()
            .expect("status")
            .retained_volumes
            .is_empty()
    );

    // The host cannot take it: placed elsewhere, and the old volume stays listed.
    let small = [
        HostBuilder::new("h1").build(),
        HostBuilder::new("h2").build(),
        HostBuilder::new("h3").memory("512Mi").build(),
    ];
    let mut bot = InstanceBuilder::new("bot")
        .replicas(2)
        .memory("1Gi")
        .placed(0, "h1")
        .build();
    bot.status.as_mut().expect("status").retained_volumes = vec![retained(1, "h3")];
    let p = plan(std::slice::from_ref(&bot), &small);
    assert_eq!(hosts_of(&p, "bot"), [Some("h1"), Some("h2")]);
    apply_instance_plan(&mut bot, &p.instances[&key("bot")], NOW);
    assert_eq!(
        bot.status.expect("status").retained_volumes,
        [retained(1, "h3")]
    );
}

#[test]
fn a_pass_tries_plans_only_on_instances_written_since_their_last_try() {
    let c = Cluster::new();
    c.add_host(HostBuilder::new("h1").build());
    c.add_host(HostBuilder::new("h2").build());
    for name in ["a", "b", "c"] {
        c.apply(InstanceBuilder::new(name).replicas(2).memory("1Gi").build());
    }
    let mut settled = Settled::default();
    let first = reconcile_settled(c.store.as_ref(), &mut settled).unwrap();
    assert_eq!((first.tried, first.instances_written), (3, 3));
    // Its own writes moved every instance: tried once more, and found settled.
    let second = reconcile_settled(c.store.as_ref(), &mut settled).unwrap();
    assert_eq!((second.tried, second.instances_written), (3, 0));
    let third = reconcile_settled(c.store.as_ref(), &mut settled).unwrap();
    assert_eq!((third.tried, third.instances_written), (0, 0));

    // A change of one instance: that one is tried again.
    c.store
        .update(&key("b"), &mut |r| match r {
            Resource::OpenClawInstance(i) => {
                i.spec.replicas = 3;
                true
            }
            _ => false,
        })
        .unwrap();
    let fourth = reconcile_settled(c.store.as_ref(), &mut settled).unwrap();
    assert_eq!((fourth.tried, fourth.instances_written), (1, 1));
    assert_eq!(c.placement("b").len(), 3);
    assert!(c.placement("b").iter().all(Option::is_some));
    // A fresh pass (no memory) writes nothing either: the settled ones were settled.
    let fresh = reconcile_once(c.store.as_ref()).unwrap();
    assert_eq!(fresh.instances_written, 0);
    assert_eq!(fresh.tried, 3);
}

/// Passes until one writes nothing; returns how many it took.
fn settle(c: &Cluster, settled: &mut Settled) -> usize {
    for n in 1..=5 {
        let r = reconcile_settled(c.store.as_ref(), settled).unwrap();
        if r.instances_written + r.hosts_written == 0 {
            return n;
        }
    }
    panic!("the scheduler kept writing");
}

/// A host as enrollment writes it: Ready once it reports, with nothing placed recorded.
fn enrolled(name: &str) -> Host {
    let mut h = HostBuilder::new(name).build();
    h.status.as_mut().expect("status").allocated = HostResources::nothing_placed();
    h
}

fn update_host(c: &Cluster, name: &str, f: impl Fn(&mut Host)) {
    c.store
        .update(&ObjectKey::cluster(Kind::Host, name), &mut |r| match r {
            Resource::Host(h) => {
                f(h);
                true
            }
            _ => false,
        })
        .unwrap();
}

#[test]
fn hosts_that_change_no_placement_are_not_planned_again() {
    let c = Cluster::new();
    c.add_host(enrolled("h1"));
    c.add_host(enrolled("h2"));
    c.apply(InstanceBuilder::new("a").replicas(2).memory("1Gi").build());
    let mut settled = Settled::default();
    settle(&c, &mut settled);
    let quiet = reconcile_settled(c.store.as_ref(), &mut settled).unwrap();
    assert!(quiet.quiet, "nothing changed: {quiet:?}");
    assert_eq!((quiet.instances, quiet.hosts), (1, 2));

    // A host enrolls, another is cordoned and relabelled, a third's status is refreshed: no
    // placement can change, and a pass from scratch agrees.
    c.add_host(enrolled("h3"));
    update_host(&c, "h2", |h| {
        h.spec.unschedulable = true;
        h.metadata.labels.insert("zone".into(), "b".into());
    });
    update_host(&c, "h1", |h| {
        h.status.as_mut().expect("status").last_heartbeat = Some(NOW.into());
    });
    let r = reconcile_settled(c.store.as_ref(), &mut settled).unwrap();
    assert!(r.quiet, "{r:?}");
    assert_eq!(r.hosts, 3);
    let fresh = reconcile_once(c.store.as_ref()).unwrap();
    assert_eq!(
        (fresh.instances_written, fresh.hosts_written),
        (0, 0),
        "the quiet pass missed work"
    );

    // A host holding a replica turns NotReady: planned again (failover may come due).
    update_host(&c, "h1", |h| {
        let s = h.status.as_mut().expect("status");
        s.phase = HostPhase::NotReady;
        s.not_ready_since = Some(NOW.into());
    });
    let r = reconcile_settled(c.store.as_ref(), &mut settled).unwrap();
    assert!(!r.quiet, "{r:?}");
    update_host(&c, "h1", |h| {
        let s = h.status.as_mut().expect("status");
        s.phase = HostPhase::Ready;
        s.not_ready_since = None;
    });
    settle(&c, &mut settled);

    // A host's recorded allocation differs from what is placed there, on a host holding a
    // replica and on one holding none: planned again, and each is written back.
    for host in ["h1", "h3"] {
        update_host(&c, host, |h| {
            h.status.as_mut().expect("status").allocated = HostResources::default();
        });
        let r = reconcile_settled(c.store.as_ref(), &mut settled).unwrap();
        assert!(!r.quiet, "{host}: {r:?}");
        assert_eq!(r.hosts_written, 1, "{host}: {r:?}");
        settle(&c, &mut settled);
        assert!(
            reconcile_settled(c.store.as_ref(), &mut settled)
                .unwrap()
                .quiet
        );
    }

    // A host holding a replica is removed: planned again, and its replica goes to the only
    // host left without one (h3).
    assert_eq!(
        c.placement("a"),
        [Some("h1".to_string()), Some("h2".to_string())]
    );
    c.store
        .delete(&ObjectKey::cluster(Kind::Host, "h2"), None)
        .unwrap();
    let r = reconcile_settled(c.store.as_ref(), &mut settled).unwrap();
    assert!(!r.quiet, "{r:?}");
    assert_eq!(r.instances_written, 1, "{r:?}");
    assert_eq!(
        c.placement("a"),
        [Some("h1".to_string()), Some("h3".to_string())]
    );
    settle(&c, &mut settled);
    assert!(
        reconcile_settled(c.store.as_ref(), &mut settled)
            .unwrap()
            .quiet
    );

    // An instance written: planned again.
    c.apply(InstanceBuilder::new("b").replicas(1).memory("1Gi").build());
    let r = reconcile_settled(c.store.as_ref(), &mut settled).unwrap();
    assert!(!r.quiet, "{r:?}");
    assert_eq!(r.instances_written, 1);
}

#[test]
fn a_replica_waiting_for_a_host_keeps_every_pass_planning() {
    let c = Cluster::new();
    c.add_host(enrolled("h1"));
    c.apply(InstanceBuilder::new("a").replicas(2).memory("6Gi").build());
    let mut settled = Settled::default();
    settle(&c, &mut settled);
    let r = reconcile_settled(c.store.as_ref(), &mut settled).unwrap();
    assert!(!r.quiet, "a replica is unplaced: {r:?}");
    assert_eq!(r.unplaced_replicas, 1);

    // The host it waits for enrolls: the next pass places it.
    c.add_host(enrolled("h2"));
    let r = reconcile_settled(c.store.as_ref(), &mut settled).unwrap();
    assert_eq!((r.unplaced_replicas, r.instances_written), (0, 1), "{r:?}");
    assert_eq!(
        c.placement("a"),
        [Some("h1".to_string()), Some("h2".to_string())]
    );
}
