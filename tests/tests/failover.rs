//! End to end: failover with placement epochs. Real server, real agents (each reaching the
//! server through its own cuttable TCP proxy), real Docker and the stand-in Gateway image.
//!
//! A sampler thread lists this test's running containers every 500 ms for the whole test and
//! fails it if it ever sees two running containers of one replica.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clusterclaw_tests::agent::*;
use clusterclaw_tests::proxy::TcpProxy;
use clusterclaw_tests::server::TestServer;
use serde_json::{Value, json};

const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
const AFTER: Duration = Duration::from_secs(20);
const STOP_AFTER: Duration = Duration::from_secs(10);
/// What a timing may take beyond its setting on a loaded test machine (the engine stopping or
/// starting a container, a probe, a report).
const MARGIN: Duration = Duration::from_secs(5);

struct Cluster {
    server: TestServer,
    scope: Scope,
    image: String,
    hosts: Vec<(String, TestAgent, TcpProxy)>,
    // Declared last: dropped after the agents are gone.
    _cleanup: DockerCleanup,
}

fn cluster(prefix: &str, n: usize) -> anyhow::Result<Option<Cluster>> {
    let Some(image) = require_docker()? else {
        return Ok(None);
    };
    let scope = Scope::new(prefix);
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let timeout = format!("{}s", HEARTBEAT_TIMEOUT.as_secs());
    let server = TestServer::start_on(
        &format!("127.0.0.1:{port}"),
        &["--heartbeat-timeout", &timeout],
    )?;
    let target: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let token = join_token(&server, n as u32, "10m");
    let mut hosts = Vec::new();
    for i in 0..n {
        let proxy = TcpProxy::start(target)?;
        let name = unique(&format!("fo{i}"));
        let mut agent = TestAgent::enroll(&server, proxy.port(), &token, &["--name", &name])?;
        let host = agent.wait_enrolled()?;
        cleanup.host(&host);
        wait_host_ready(&server, &host)?;
        hosts.push((host, agent, proxy));
    }
    scope.apply(&server, "base", &scope.base_manifest());
    Ok(Some(Cluster {
        server,
        scope,
        image,
        hosts,
        _cleanup: cleanup,
    }))
}

impl Cluster {
    fn apply_instance(&self, name: &str, replicas: u32, failover: &str) {
        let m = self
            .scope
            .instance_manifest(name, &self.image, replicas, &BTreeMap::new())
            + failover;
        self.scope.apply(&self.server, name, &m);
    }

    fn host_phase(&self, host: &str) -> Option<String> {
        let r = self.server.http(
            "GET",
            &format!("/api/v1/hosts/{host}"),
            None,
            Some(self.server.admin_token()),
        );
        r.json()
            .pointer("/status/phase")
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// Replica name → (host, state) from the instance status.
    fn placements(&self, name: &str) -> BTreeMap<String, (String, String, Value)> {
        let v = self.scope.instance(&self.server, name);
        v.pointer("/status/replicaStatus")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|r| {
                        (
                            r["name"].as_str().unwrap_or_default().to_string(),
                            (
                                r["host"].as_str().unwrap_or_default().to_string(),
                                r["state"].as_str().unwrap_or_default().to_string(),
                                r.clone(),
                            ),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn wait_all_ready(&self, name: &str, n: usize) -> anyhow::Result<()> {
        wait_for(&format!("{name}: {n} Ready replicas"), WAIT, || {
            let p = self.placements(name);
            let run = running_replicas(&self.scope.tenant)?;
            Ok(
                (p.len() == n && p.values().all(|(_, s, _)| s == "Ready") && run.len() == n)
                    .then_some(()),
            )
        })
    }

    fn volumes_on(&self, host: &str) -> anyhow::Result<Vec<String>> {
        Ok(docker(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label=io.clusterclaw.tenant={}", self.scope.tenant),
            "--filter",
            &format!("label=io.clusterclaw.host={host}"),
        ])?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
    }
}

fn reschedule_manifest() -> String {
    format!(
        "  failover:\n    policy: Reschedule\n    after: {}s\n    stopAfter: {}s\n",
        AFTER.as_secs(),
        STOP_AFTER.as_secs()
    )
}

/// Cut one of two hosts: its copy stops there by about stopAfter, the replica runs on the other
/// host after about heartbeat timeout + after, and the healed host keeps the old volume but runs
/// no stale copy when it is Ready again. Never two running copies of a replica.
///
/// "About" has a margin for a loaded machine: the stop within stopAfter + [`MARGIN`], the
/// replacement within heartbeat timeout + after + [`MARGIN`].
#[test]
fn a_cut_host_loses_its_replica_to_another_host() -> anyhow::Result<()> {
    let Some(c) = cluster("e2e-fo", 2)? else {
        return Ok(());
    };
    let sampler = DoubleSampler::start(&c.scope.tenant, Duration::from_millis(500));
    let name = "bot";
    c.apply_instance(name, 2, &reschedule_manifest());
    c.wait_all_ready(name, 2)?;
    let before = c.placements(name);
    let (lost_host, _, proxy) = &c.hosts[0];
    let other = c.hosts[1].0.clone();
    let (moved, (_, _, old)) = before
        .iter()
        .find(|(_, (h, _, _))| h == lost_host)
        .map(|(r, v)| (r.clone(), v.clone()))
        .expect("one replica on each host");
    let old_epoch = old["epoch"].as_u64().expect("an epoch");

    let cut = Instant::now();
    proxy.cut();
    // Once its host is NotReady the replica shows Unknown, still placed there, and the
    // instance no longer counts it Ready: before it is rescheduled.
    wait_for("the cut-off replica Unknown", WAIT, || {
        Ok(c.placements(name)
            .get(&moved)
            .filter(|(h, s, _)| h == lost_host && s == "Unknown")
            .map(drop))
    })?;
    let unknown_after = cut.elapsed();
    let v = c.scope.instance(&c.server, name);
    assert_eq!(
        v.pointer("/status/readyReplicas").and_then(Value::as_u64),
        Some(1),
        "an Unknown replica is not counted Ready: {v}"
    );
    assert!(
        unknown_after < AFTER,
        "Unknown only {unknown_after:?} after the cut"
    );
    // The cut-off host stops its copy on its own.
    wait_for("the cut-off copy to stop", WAIT, || {
        Ok((!running_replicas(&c.scope.tenant)?
            .iter()
            .any(|(r, h, _)| *r == moved && h == lost_host))
        .then_some(()))
    })?;
    let cut_to_stop = cut.elapsed();
    // It runs on the other host.
    let moved_status = wait_for(
        "the replica to run on the other host",
        Duration::from_secs(120),
        || {
            let p = c.placements(name);
            Ok(p.get(&moved)
                .filter(|(h, s, _)| *h == other && s == "Ready")
                .map(|(_, _, v)| v.clone()))
        },
    )?;
    let replaced = cut.elapsed();
    assert!(
        moved_status["epoch"].as_u64().unwrap() > old_epoch,
        "{moved_status}"
    );
    let v = c.scope.instance(&c.server, name);
    let retained = v
        .pointer("/status/retainedVolumes")
        .cloned()
        .unwrap_or(json!([]));
    assert!(
        retained
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["host"] == json!(lost_host) && r["reason"] == json!("Failover")),
        "{v}"
    );
    println!(
        "figure: cut-to-stop {:.1}s; replacement Ready {:.1}s after the cut, {:.1}s after heartbeat timeout + after",
        cut_to_stop.as_secs_f64(),
        replaced.as_secs_f64(),
        replaced.as_secs_f64() - (HEARTBEAT_TIMEOUT + AFTER).as_secs_f64()
    );
    assert!(
        cut_to_stop < STOP_AFTER + MARGIN,
        "the copy stopped {cut_to_stop:?} after the cut (stopAfter {STOP_AFTER:?})"
    );
    assert!(
        replaced >= AFTER,
        "replaced after {replaced:?}, before failover.after"
    );
    assert!(
        replaced < HEARTBEAT_TIMEOUT + AFTER + MARGIN,
        "replaced {replaced:?} after the cut (heartbeat timeout {HEARTBEAT_TIMEOUT:?} + after {AFTER:?})"
    );

    // Heal: when the host is Ready again, it runs no copy of the moved replica; its volume stays.
    proxy.heal();
    wait_for("the healed host Ready", WAIT, || {
        if c.host_phase(lost_host).as_deref() != Some("Ready") {
            return Ok(None);
        }
        let stale: Vec<_> = running_replicas(&c.scope.tenant)?
            .into_iter()
            .filter(|(r, h, _)| *r == moved && h == lost_host)
            .collect();
        assert!(
            stale.is_empty(),
            "a stale copy runs on a Ready host: {stale:?}"
        );
        Ok(Some(()))
    })?;
    assert!(
        !c.volumes_on(lost_host)?.is_empty(),
        "the lost host's volume is kept"
    );
    std::thread::sleep(Duration::from_secs(3));
    let copies = running_replicas(&c.scope.tenant)?
        .into_iter()
        .filter(|(r, _, _)| *r == moved)
        .count();
    assert_eq!(copies, 1);
    sampler.finish()
}

/// `Manual`: nothing moves and nothing stops while a host is cut off; after healing the same
/// containers (same ids, same start times, no restarts counted) run on and are Ready.
#[test]
fn manual_failover_waits_for_the_host() -> anyhow::Result<()> {
    let Some(c) = cluster("e2e-fm", 2)? else {
        return Ok(());
    };
    let sampler = DoubleSampler::start(&c.scope.tenant, Duration::from_millis(500));
    let name = "bot";
    c.apply_instance(name, 2, "");
    c.wait_all_ready(name, 2)?;
    let before = running_replicas(&c.scope.tenant)?;
    let started = |rs: &[(String, String, String)]| -> anyhow::Result<BTreeMap<String, String>> {
        rs.iter()
            .map(|(_, _, id)| {
                Ok((
                    id.clone(),
                    docker(&["inspect", "-f", "{{.State.StartedAt}}", id])?
                        .trim()
                        .to_string(),
                ))
            })
            .collect()
    };
    let started_before = started(&before)?;
    let placed = c.placements(name);
    let (host, _, proxy) = &c.hosts[0];
    proxy.cut();
    wait_for("the cut host NotReady", WAIT, || {
        Ok((c.host_phase(host).as_deref() == Some("NotReady")).then_some(()))
    })?;
    // Its replicas show Unknown, still placed there.
    wait_for("the cut host's replicas Unknown", WAIT, || {
        let p = c.placements(name);
        let on_host: Vec<&String> = p
            .values()
            .filter(|(h, _, _)| h == host)
            .map(|(_, s, _)| s)
            .collect();
        Ok((!on_host.is_empty() && on_host.iter().all(|s| *s == "Unknown")).then_some(()))
    })?;
    std::thread::sleep(AFTER + STOP_AFTER);
    let mut during = running_replicas(&c.scope.tenant)?;
    let mut expected = before.clone();
    during.sort();
    expected.sort();
    assert_eq!(during, expected, "nothing stops while cut off");
    let now: BTreeMap<_, _> = c
        .placements(name)
        .into_iter()
        .map(|(r, (h, _, _))| (r, h))
        .collect();
    let then: BTreeMap<_, _> = placed.into_iter().map(|(r, (h, _, _))| (r, h)).collect();
    assert_eq!(now, then, "nothing moves");
    proxy.heal();
    wait_host_ready(&c.server, host)?;
    c.wait_all_ready(name, 2)?;
    let mut after = running_replicas(&c.scope.tenant)?;
    after.sort();
    assert_eq!(after, expected, "the same containers run on");
    assert_eq!(
        started(&after)?,
        started_before,
        "no container was restarted"
    );
    for (replica, (_, state, status)) in c.placements(name) {
        assert_eq!(state, "Ready", "{replica}: {status}");
        assert_eq!(status["restarts"].as_u64().unwrap_or(0), 0, "{status}");
    }
    sampler.finish()
}

/// An agent killed (SIGKILL) with its containers removed: with `Reschedule` its replica runs
/// elsewhere within heartbeat timeout + after + 10 s of the kill.
#[test]
fn a_dead_host_is_replaced_within_after() -> anyhow::Result<()> {
    let Some(mut c) = cluster("e2e-fk", 2)? else {
        return Ok(());
    };
    let sampler = DoubleSampler::start(&c.scope.tenant, Duration::from_millis(500));
    let name = "bot";
    c.apply_instance(name, 1, &reschedule_manifest());
    c.wait_all_ready(name, 1)?;
    let (replica, (host, _, _)) = c.placements(name).into_iter().next().unwrap();
    let dead = c
        .hosts
        .iter_mut()
        .find(|(h, _, _)| *h == host)
        .expect("its host");
    dead.1.kill9();
    let killed = Instant::now();
    for (_, _, id) in running_replicas(&c.scope.tenant)?
        .into_iter()
        .filter(|(r, h, _)| *r == replica && *h == host)
    {
        docker(&["rm", "-f", &id])?;
    }
    let limit = HEARTBEAT_TIMEOUT + AFTER + Duration::from_secs(10);
    wait_for(
        "the replica on another host",
        limit + Duration::from_secs(60),
        || {
            let p = c.placements(name);
            Ok(p.get(&replica)
                .filter(|(h, s, _)| *h != host && s == "Ready")
                .map(|_| ()))
        },
    )?;
    let took = killed.elapsed();
    println!("figure: replaced {:.1}s after the kill", took.as_secs_f64());
    assert!(
        took <= limit,
        "replaced {took:?} after the kill (limit {limit:?})"
    );
    sampler.finish()
}
