//! End to end: several `clusterclaw server` processes on one real PostgreSQL database (a schema
//! of its own per test), exactly one of them leading, and a real agent on Docker that knows
//! every server.
//!
//! - Two servers share the certificate authority and the objects; the first leads, the other
//!   follows and says so in `/readyz`. A change applied through the follower is decided by
//!   the leader (the scheduler places the replica on the host).
//! - `kill -9` of the leader: the follower takes the lease within the lease time, the agent
//!   moves to it, and a new change is decided by the new leader. The time from the kill to
//!   the new leader's first decision is measured over several rounds (median printed).
//! - `SIGSTOP` of the leader past its lease: the other takes over (a newer epoch) and acts;
//!   after `SIGCONT` the old leader steps down.
//!
//! Without PostgreSQL or Docker the tests skip with the reason printed, unless `CI=true`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// The lease of the servers under test (the leader renews every third of it).
const LEASE: Duration = Duration::from_secs(3);
/// Rounds of kill and takeover measured.
const ROUNDS: usize = 5;

fn skip(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the HA test cannot run: {why}");
    }
    eprintln!("skipped: {why}");
}

/// The database URL of a fresh schema (the password in a file), or why there is none.
fn database(
    scratch: &std::path::Path,
) -> Result<(clusterclaw_tests::postgres::TestSchema, String, String), String> {
    clusterclaw_tests::postgres::database(scratch, "ha")
}

/// One more server on the database, its agent port on `port`; `first` is the server that
/// made the admin token.
fn server(store: &str, password_file: &str, port: u16, first: Option<&TestServer>) -> TestServer {
    let lease = format!("{}s", LEASE.as_secs());
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "--store",
        store,
        "--store-password-file",
        password_file,
        "--lease-duration",
        &lease,
        "--heartbeat-timeout",
        "10s",
    ];
    match first {
        None => TestServer::start_on(&listen, &args),
        Some(first) => TestServer::start_joining(&listen, &args, first),
    }
    .unwrap()
}

/// `/readyz`'s view of the lease: (leading, holder, epoch, this server's id).
fn lease_view(server: &TestServer) -> Option<(bool, String, u64, String)> {
    let r = server.http("GET", "/readyz", None, None);
    let l = r.json().get("leader")?.clone();
    Some((
        l["leading"].as_bool()?,
        l["holder"].as_str()?.to_string(),
        l["epoch"].as_u64()?,
        l["server"].as_str()?.to_string(),
    ))
}

fn wait_leading(server: &TestServer, timeout: Duration) -> anyhow::Result<(u64, String)> {
    wait_for("the server to lead", timeout, || {
        Ok(lease_view(server)
            .filter(|(leading, ..)| *leading)
            .map(|(_, _, epoch, id)| (epoch, id)))
    })
}

/// The hosts the replicas of an instance are placed on (from its status), by replica.
fn placements(server: &TestServer, scope: &Scope, name: &str) -> BTreeMap<String, String> {
    let r = server.http(
        "GET",
        &scope.instance_path(name),
        None,
        Some(server.admin_token()),
    );
    if r.status != 200 {
        return BTreeMap::new();
    }
    r.json()
        .pointer("/status/replicaStatus")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| {
                    let host = r["host"].as_str().filter(|h| !h.is_empty())?;
                    Some((r["name"].as_str()?.to_string(), host.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn wait_placed(
    server: &TestServer,
    scope: &Scope,
    name: &str,
    host: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_for(&format!("{name} placed on {host}"), timeout, || {
        let p = placements(server, scope, name);
        Ok((p.len() == 1 && p.values().all(|h| h == host)).then_some(()))
    })
}

fn metric(server: &TestServer, name: &str) -> Option<String> {
    let r = server.http("GET", "/metrics", None, Some(server.admin_token()));
    r.body
        .lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .map(str::to_string)
}

#[test]
fn one_leader_among_servers_on_postgres_and_the_agent_fails_over_with_it() {
    let scratch = tempfile::tempdir().unwrap();
    let (_schema, store, password_file) = match database(scratch.path()) {
        Ok(d) => d,
        Err(why) => return skip(&why),
    };
    let Some(image) = require_docker().unwrap() else {
        return skip("Docker is not available");
    };
    let scope = Scope::new("ha");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let ports = [free_port(), free_port()];
    let mut servers = vec![server(&store, &password_file, ports[0], None)];
    let (epoch, first_id) = wait_leading(&servers[0], WAIT).unwrap();
    let second_server = server(&store, &password_file, ports[1], Some(&servers[0]));
    servers.push(second_server);
    // The second follows: it names the first as the holder.
    let (leading, holder, seen_epoch, _) =
        wait_for("the second server to read the lease", WAIT, || {
            Ok(lease_view(&servers[1]).filter(|(_, holder, ..)| !holder.is_empty()))
        })
        .unwrap();
    assert!(!leading, "two leaders:\n{}", servers[1].log());
    assert_eq!((holder.as_str(), seen_epoch), (first_id.as_str(), epoch));
    assert_eq!(
        metric(&servers[0], "clusterclaw_leader{").map(|l| l.ends_with(" 1")),
        Some(true)
    );
    assert_eq!(
        metric(&servers[1], "clusterclaw_leader{").map(|l| l.ends_with(" 0")),
        Some(true)
    );
    // One CA for both: the second took the first's.
    let ca =
        |s: &TestServer| std::fs::read_to_string(s.endpoints().ca_cert.as_ref().unwrap()).unwrap();
    assert_eq!(ca(&servers[0]), ca(&servers[1]));

    // One agent, enrolled through the first, knowing both.
    let token = join_token(&servers[0], 1, "10m");
    let second = format!("https://127.0.0.1:{}", ports[1]);
    let name = unique("ha");
    let mut agent = TestAgent::enroll(
        &servers[0],
        ports[0],
        &token,
        &["--server", &second, "--name", &name],
    )
    .unwrap();
    let host = agent.wait_enrolled().unwrap();
    cleanup.host(&host);
    wait_host_ready(&servers[1], &host).unwrap();
    let sampler = DoubleSampler::start(&scope.tenant, Duration::from_millis(500));

    // A change through the follower is decided by the leader.
    scope.apply_http(&servers[1], &scope.base_manifest());
    let m = scope.instance_manifest("one", &image, 1, &BTreeMap::new());
    scope.apply_http(&servers[1], &m);
    wait_placed(&servers[1], &scope, "one", &host, WAIT).unwrap();

    // kill -9 of the leader, round after round: the other takes over and decides.
    let mut leader = 0;
    let mut took: Vec<Duration> = Vec::new();
    let mut epoch = epoch;
    for round in 0..ROUNDS {
        let follower = 1 - leader;
        let killed = Instant::now();
        servers[leader].kill();
        let instance = format!("after-{round}");
        let m = scope.instance_manifest(&instance, &image, 1, &BTreeMap::new());
        scope.apply_http(&servers[follower], &m);
        wait_placed(&servers[follower], &scope, &instance, &host, LEASE * 4)
            .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{}", servers[follower].log()));
        took.push(killed.elapsed());
        let (now_epoch, _) = wait_leading(&servers[follower], Duration::from_secs(1)).unwrap();
        assert!(now_epoch > epoch, "the epoch moves on a takeover");
        epoch = now_epoch;
        // The host stays Ready through the survivor: the agent moved to it.
        wait_host_ready(&servers[follower], &host).unwrap();
        servers[leader].restart().unwrap();
        // The restarted server follows.
        let restarted = &servers[leader];
        wait_for("the restarted server to read the lease", WAIT, || {
            Ok(lease_view(restarted).filter(|(_, holder, ..)| !holder.is_empty()))
        })
        .unwrap();
        let (leading, ..) = lease_view(restarted).unwrap();
        assert!(
            !leading,
            "the restarted server leads too:\n{}",
            restarted.log()
        );
        leader = follower;
    }
    assert!(
        agent
            .log()
            .contains("the control plane server is unreachable; moving to the next one"),
        "the agent moved between servers:\n{}",
        agent.log()
    );
    // The agent kept reporting through whichever server was up.
    let r = servers[leader].http(
        "GET",
        &format!("/api/v1/hosts/{host}"),
        None,
        Some(servers[leader].admin_token()),
    );
    assert_eq!(r.json().pointer("/status/phase"), Some(&json!("Ready")));
    // Never two copies of a replica, and never one replica on two hosts.
    sampler.finish().unwrap();
    for i in 0..ROUNDS {
        assert_eq!(
            placements(&servers[leader], &scope, &format!("after-{i}")).len(),
            1
        );
    }
    took.sort();
    eprintln!(
        "leader failover, kill -9 to the new leader's first decision (lease {LEASE:?}, debug build, {ROUNDS} rounds): median {:?}, min {:?}, max {:?}; load {}",
        took[took.len() / 2],
        took[0],
        took[took.len() - 1],
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    assert!(
        took[took.len() / 2] < Duration::from_secs(10),
        "a new leader decides within 10 s: {took:?}"
    );
    agent.kill9();
}

#[test]
fn a_paused_leader_is_fenced_and_steps_down() {
    let scratch = tempfile::tempdir().unwrap();
    let (_schema, store, password_file) = match database(scratch.path()) {
        Ok(d) => d,
        Err(why) => return skip(&why),
    };
    let a = server(&store, &password_file, free_port(), None);
    let (epoch, a_id) = wait_leading(&a, WAIT).unwrap();
    let b = server(&store, &password_file, free_port(), Some(&a));
    let scope = Scope::new("hapause");
    scope.apply_http(&b, &scope.base_manifest());

    let pid = Pid::from_raw(a.pid().unwrap() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let took_over = wait_leading(&b, LEASE * 3);
    // Changes through the new leader while the old one is paused.
    let host = json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant",
        "metadata": {"name": unique("hapause2")}})
    .to_string();
    let wrote = b.http(
        "POST",
        "/api/v1/apply",
        Some(&format!("{{\"items\": [{host}]}}")),
        Some(b.admin_token()),
    );
    kill(pid, Signal::SIGCONT).unwrap();
    let (b_epoch, b_id) = took_over.unwrap();
    assert_eq!(wrote.status, 200, "{}", wrote.body);
    assert!(b_epoch > epoch && b_id != a_id);
    // Resumed, the old leader finds a newer epoch and steps down; it never leads again
    // while the new one renews.
    wait_for("the old leader to step down", LEASE * 2, || {
        Ok(lease_view(&a)
            .filter(|(leading, holder, e, _)| !leading && *holder == b_id && *e == b_epoch)
            .map(drop))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", a.log()));
    let log = a.log();
    assert!(
        log.contains("stepping down")
            && log.contains("no longer leading: stopping the controllers"),
        "{log}"
    );
    let (leading, ..) = lease_view(&b).unwrap();
    assert!(leading);
}
