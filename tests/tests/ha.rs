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
//! - `clusterclaw get servers` lists both with the leader of the lease; killed ones turn Stale.
//! - `kill -9` of the leader in the middle of an apply of 1,000 instances (a few with one
//!   replica on two real agents, the others with none), and again in the middle of their
//!   rolling update: a new leader within 10 s each time, every instance ends Running with its
//!   replica Ready on the newest revision, every acknowledged write reads back through both
//!   servers, and no replica was ever assigned to two hosts (every assignment each agent
//!   received, from its log) nor ran twice.
//! - PostgreSQL restarted under a stream of writes (a server of the test's own, never the
//!   shared one): both servers say not ready while it is away, reconnect, one leads again,
//!   and nothing acknowledged is lost.
//!
//! Without PostgreSQL or Docker the tests skip with the reason printed, unless `CI=true`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clusterclaw_tests::agent::*;
use clusterclaw_tests::ha::*;
use clusterclaw_tests::server::TestServer;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// Rounds of kill and takeover measured.
const ROUNDS: usize = 5;

fn skip(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the HA test cannot run: {why}");
    }
    eprintln!("skipped: {why}");
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
    // Both register themselves: `get servers` through either names the leader from the lease.
    let listed = wait_for("both servers listed as Ready", WAIT, || {
        let out = servers[1].cli(&["get", "servers", "-o", "json"]);
        if out.code != 0 {
            return Ok(None);
        }
        let items = out.json()["items"].as_array().cloned().unwrap_or_default();
        Ok((items.len() == 2 && items.iter().all(|i| i["status"] == "Ready")).then_some(items))
    })
    .unwrap();
    let leaders: Vec<&Value> = listed.iter().filter(|i| i["leading"] == true).collect();
    assert_eq!(leaders.len(), 1, "{listed:?}");
    assert_eq!(leaders[0]["id"], json!(first_id));
    assert_eq!(leaders[0]["epoch"], json!(epoch));
    let this: Vec<&Value> = listed.iter().filter(|i| i["self"] == true).collect();
    assert!(
        this.len() == 1 && this[0]["id"] != json!(first_id),
        "{listed:?}"
    );
    let table = servers[0].cli(&["get", "servers"]).ok().stdout;
    assert!(
        table.contains(&format!("{first_id} (this)")) && table.contains('*'),
        "{table}"
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
        let instance = format!("after-{round}");
        let t = failover_round(&mut servers, leader, &scope, &image, &host, &instance)
            .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
        took.push(t);
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
    // The killed processes are listed as stale, the live ones as Ready, one of them leading.
    let (_, leader_id) = wait_leading(&servers[leader], WAIT).unwrap();
    let listed = wait_for("the killed servers listed as stale", WAIT, || {
        let r = servers[leader].http(
            "GET",
            "/api/v1/servers",
            None,
            Some(servers[leader].admin_token()),
        );
        let items = r.json()["items"].as_array().cloned().unwrap_or_default();
        let stale = items.iter().filter(|i| i["status"] == "Stale").count();
        Ok((items.len() == ROUNDS + 2 && stale == ROUNDS).then_some(items))
    })
    .unwrap();
    let leading: Vec<&Value> = listed.iter().filter(|i| i["leading"] == true).collect();
    assert_eq!(leading.len(), 1, "{listed:?}");
    assert_eq!(leading[0]["id"], json!(leader_id));
    assert!(
        listed
            .iter()
            .filter(|i| i["status"] == "Stale")
            .all(|i| i["storeReachable"] == false && i["leading"] == false),
        "{listed:?}"
    );
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

// ------------------------------------------------- kill -9 amid a large apply and an update

/// Instances of the large apply.
const INSTANCES: usize = 1000;
/// Of those, how many run one replica (on real Docker); the others have none.
const RUNNING: usize = 12;
/// Instances per `POST /apply`.
const BATCH: usize = 50;
/// The batch before which the leader is killed.
const KILL_AT: usize = INSTANCES / BATCH / 2;
/// How long the survivor may take to lead (the figure).
const TAKEOVER: Duration = Duration::from_secs(10);

fn instance_name(i: usize) -> String {
    format!("i{i:04}")
}

fn replicas_of(i: usize) -> u32 {
    u32::from(i.is_multiple_of(INSTANCES / RUNNING) && i / (INSTANCES / RUNNING) < RUNNING)
}

/// What an acknowledged write of one instance said: the marker and the resourceVersion
/// answered.
type Acked = BTreeMap<String, (u32, u64)>;

/// Applies the instances `0..INSTANCES` with the marker `mark` in batches, each to one of the
/// servers whose API URLs `urls` holds at the time (round robin; a batch that fails is sent
/// again to the next, as a client behind a load balancer would), on a thread of its own.
/// Counts the batches acknowledged in `done`.
fn apply_all(
    scope: &Scope,
    image: &str,
    mark: u32,
    urls: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    token: String,
    done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> std::thread::JoinHandle<anyhow::Result<Acked>> {
    let (tenant, project, image) = (
        scope.tenant.clone(),
        scope.project.clone(),
        image.to_string(),
    );
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let mut acked = Acked::new();
        let mut turn = 0usize;
        for batch in 0..INSTANCES / BATCH {
            let items: Vec<Value> = (batch * BATCH..(batch + 1) * BATCH)
                .map(|i| {
                    json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
                        "metadata": {"name": instance_name(i), "tenant": tenant, "project": project},
                        "spec": {"image": image, "replicas": replicas_of(i),
                            "resources": {"cpu": "100m", "memory": "64Mi"},
                            "env": {"MARK": mark.to_string()}}})
                })
                .collect();
            let body = json!({ "items": items }).to_string();
            let started = Instant::now();
            let answer = loop {
                let url = {
                    let urls = urls.lock().unwrap();
                    turn += 1;
                    urls[turn % urls.len()].clone()
                };
                let sent = rt.block_on(clusterclaw_tests::server::send(
                    &client,
                    &format!("{url}/api/v1/apply"),
                    "POST",
                    Some(&body),
                    Some(&token),
                ));
                match sent {
                    Ok(r) if r.status == 200 => break r,
                    Ok(r) if r.status < 500 => {
                        anyhow::bail!("batch {batch} refused: {} {}", r.status, r.body)
                    }
                    // Not acknowledged: the server died or could not reach the store.
                    _ if started.elapsed() < Duration::from_secs(120) => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    other => anyhow::bail!("batch {batch} never acknowledged: {other:?}"),
                }
            };
            let v: Value = serde_json::from_str(&answer.body)?;
            for item in v["items"].as_array().cloned().unwrap_or_default() {
                let name = item["name"].as_str().unwrap_or_default().to_string();
                let rv = item["resourceVersion"].as_u64().unwrap_or_default();
                acked.insert(name, (mark, rv));
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(acked)
    })
}

/// Every instance of the tenant, by name.
fn all_instances(server: &TestServer, scope: &Scope) -> BTreeMap<String, Value> {
    let r = server.http(
        "GET",
        &format!("/api/v1/instances?tenant={}", scope.tenant),
        None,
        Some(server.admin_token()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|i| {
            (
                i["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                i,
            )
        })
        .collect()
}

/// Why an instance is not yet as `mark` wants it (Running; its one replica, if any, Ready on
/// the newest revision), or `None`.
fn not_settled(i: &Value, mark: u32) -> Option<String> {
    let name = i["metadata"]["name"].as_str().unwrap_or_default();
    if i.pointer("/spec/env/MARK") != Some(&json!(mark.to_string())) {
        return Some(format!("{name}: spec not at mark {mark}"));
    }
    if i.pointer("/status/phase") != Some(&json!("Running")) {
        return Some(format!("{name}: phase {}", i["status"]["phase"]));
    }
    let want = i["spec"]["replicas"].as_u64().unwrap_or_default();
    let newest = &i["status"]["configRevision"];
    let replicas = i["status"]["replicaStatus"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ready = replicas
        .iter()
        .filter(|r| r["state"] == "Ready" && r["configRevision"] == *newest)
        .count() as u64;
    (ready != want).then(|| format!("{name}: {ready} of {want} Ready on revision {newest}"))
}

/// Waits until every instance is settled at `mark`, through `server`.
fn wait_settled(server: &TestServer, scope: &Scope, mark: u32, timeout: Duration) {
    wait_for(
        &format!("every instance settled at mark {mark}"),
        timeout,
        || {
            let all = all_instances(server, scope);
            let pending: Vec<String> = all.values().filter_map(|i| not_settled(i, mark)).collect();
            if all.len() == INSTANCES && pending.is_empty() {
                return Ok(Some(()));
            }
            eprintln!(
                "{} of {INSTANCES} instances, {} not settled (first: {:?})",
                all.len(),
                pending.len(),
                pending.first()
            );
            std::thread::sleep(Duration::from_secs(2));
            Ok(None)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", server.log()));
}

/// The replicas (`tenant/project/replica`) each agent was ever assigned, from its log.
fn assigned_replicas(agent: &TestAgent) -> std::collections::BTreeSet<String> {
    log_events(&agent.log(), "replicas assigned to this host changed")
        .into_iter()
        .flat_map(|(_, f)| {
            f["added"]
                .as_str()
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Kills the leader among `servers` (by `/readyz`) once `done` reaches `at` batches, and waits
/// for another to lead: (which was killed, how long the takeover took).
fn kill_leader_at(
    servers: &mut [TestServer],
    done: &std::sync::atomic::AtomicUsize,
    at: usize,
) -> (usize, Duration) {
    wait_for(
        "the apply to reach the kill",
        Duration::from_secs(600),
        || Ok((done.load(std::sync::atomic::Ordering::SeqCst) >= at).then_some(())),
    )
    .unwrap();
    let leader = servers
        .iter()
        .position(|s| lease_view(s).is_some_and(|(leading, ..)| leading))
        .expect("a server leads");
    let killed = Instant::now();
    servers[leader].kill();
    let survivor = 1 - leader;
    wait_leading(&servers[survivor], TAKEOVER)
        .unwrap_or_else(|e| panic!("no new leader within {TAKEOVER:?}: {e:#}"));
    (leader, killed.elapsed())
}

#[test]
fn kill_9_of_the_leader_amid_a_thousand_instance_apply_and_a_rolling_update() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Mutex};
    let scratch = tempfile::tempdir().unwrap();
    let (_schema, store, password_file) = match database(scratch.path()) {
        Ok(d) => d,
        Err(why) => return skip(&why),
    };
    let Some(image) = require_docker().unwrap() else {
        return skip("Docker is not available");
    };
    let scope = Scope::new("hakill");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let ports = [free_port(), free_port()];
    let mut servers = vec![server(&store, &password_file, ports[0], None)];
    wait_leading(&servers[0], WAIT).unwrap();
    let second = server(&store, &password_file, ports[1], Some(&servers[0]));
    servers.push(second);
    let token = servers[0].admin_token().to_string();

    // Two hosts, each agent knowing both servers.
    let join = join_token(&servers[0], 2, "10m");
    let urls = [
        format!("https://127.0.0.1:{}", ports[0]),
        format!("https://127.0.0.1:{}", ports[1]),
    ];
    let mut agents = Vec::new();
    for n in 0..2 {
        let name = unique(&format!("hakill{n}"));
        let mut agent = TestAgent::enroll(
            &servers[0],
            ports[0],
            &join,
            &["--server", &urls[1], "--name", &name],
        )
        .unwrap();
        let host = agent.wait_enrolled().unwrap();
        cleanup.host(&host);
        wait_host_ready(&servers[1], &host).unwrap();
        agents.push((agent, host));
    }
    let sampler = DoubleSampler::start(&scope.tenant, Duration::from_millis(500));
    scope.apply_http(&servers[1], &scope.base_manifest());
    let api = Arc::new(Mutex::new(vec![
        servers[0].api_url().to_string(),
        servers[1].api_url().to_string(),
    ]));
    let mut takeovers = Vec::new();

    // 1. The apply of 1,000 instances, then 2. a rolling update of every instance (the running
    // replicas are replaced); each time the leader is killed halfway through.
    let (mut acked, mut survivor) = (Default::default(), 0);
    for mark in [1, 2] {
        let done = Arc::new(AtomicUsize::new(0));
        let applying = apply_all(
            &scope,
            &image,
            mark,
            Arc::clone(&api),
            token.clone(),
            Arc::clone(&done),
        );
        let (killed, took) = kill_leader_at(&mut servers, &done, KILL_AT);
        takeovers.push(took);
        acked = applying.join().unwrap().unwrap();
        assert_eq!(acked.len(), INSTANCES);
        survivor = 1 - killed;
        wait_settled(&servers[survivor], &scope, mark, Duration::from_secs(300));
        servers[killed].restart().unwrap();
        *api.lock().unwrap() = vec![
            servers[0].api_url().to_string(),
            servers[1].api_url().to_string(),
        ];
    }

    // No acknowledged write is lost: every instance holds what its last acknowledged write
    // said, at that write's resourceVersion or later; through either server.
    for s in &servers {
        let all = all_instances(s, &scope);
        for (name, (mark, rv)) in &acked {
            let i = &all[name];
            assert_eq!(i["spec"]["env"]["MARK"], json!(mark.to_string()), "{name}");
            let now = i["metadata"]["resourceVersion"]
                .as_u64()
                .unwrap_or_default();
            assert!(
                now >= *rv,
                "{name}: resourceVersion {now} < acknowledged {rv}"
            );
        }
    }
    // Every running replica of the update passed its rollout (the rollout ends a gate after
    // its replica turned Ready, so it may still be closing when the instances settled).
    wait_for("every rollout Succeeded", Duration::from_secs(60), || {
        let all = all_instances(&servers[survivor], &scope);
        let pending: Vec<&Value> = all
            .values()
            .filter(|i| i["spec"]["replicas"] == 1)
            .filter(|i| i.pointer("/status/rollout/phase") != Some(&json!("Succeeded")))
            .collect();
        if pending.is_empty() {
            return Ok(Some(()));
        }
        eprintln!(
            "{} rollouts not Succeeded (first: {})",
            pending.len(),
            pending[0]
        );
        std::thread::sleep(Duration::from_secs(1));
        Ok(None)
    })
    .unwrap();
    // No replica was ever assigned to two hosts: every assignment either agent received.
    let a = assigned_replicas(&agents[0].0);
    let b = assigned_replicas(&agents[1].0);
    let both: Vec<&String> = a.intersection(&b).collect();
    assert!(both.is_empty(), "assigned to both hosts: {both:?}");
    let expected: std::collections::BTreeSet<String> = (0..INSTANCES)
        .filter(|i| replicas_of(*i) == 1)
        .map(|i| format!("{}/{}/{}-0", scope.tenant, scope.project, instance_name(i)))
        .collect();
    let received: std::collections::BTreeSet<String> = a.union(&b).cloned().collect();
    assert_eq!(received, expected, "the replicas the hosts received");
    assert!(!a.is_empty() && !b.is_empty(), "both hosts run replicas");
    sampler.finish().unwrap();
    eprintln!(
        "kill -9 of the leader amid the apply of {INSTANCES} instances and their rolling update: new leader after {:?} and {:?} (debug build); load {}",
        takeovers[0],
        takeovers[1],
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for t in &takeovers {
        assert!(*t < TAKEOVER, "{takeovers:?}");
    }
    for (agent, _) in &mut agents {
        agent.kill9();
    }
}

// ------------------------------------------------------- PostgreSQL restarted under load

/// Writes one small object after another (a tenant each) to whichever of `urls` is next,
/// until `stop`; records every acknowledged (2xx) write with the server it went through and
/// when, and counts the refused ones.
struct Load {
    acked: Vec<(String, usize, Instant)>,
    failed: usize,
}

fn write_load(
    urls: Vec<String>,
    token: String,
    prefix: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<Load>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut load = Load {
            acked: Vec::new(),
            failed: 0,
        };
        let mut n = 0usize;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            n += 1;
            let via = n % urls.len();
            let name = format!("{prefix}-{n}");
            let body = json!({"items": [{"apiVersion": "clusterclaw.io/v1", "kind": "Tenant",
                "metadata": {"name": name}}]})
            .to_string();
            let sent = rt.block_on(clusterclaw_tests::server::send(
                &client,
                &format!("{}/api/v1/apply", urls[via]),
                "POST",
                Some(&body),
                Some(&token),
            ));
            match sent {
                Ok(r) if (200..300).contains(&r.status) => {
                    load.acked.push((name, via, Instant::now()))
                }
                _ => {
                    load.failed += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        Ok(load)
    })
}

fn ready(server: &TestServer) -> Option<bool> {
    server
        .try_http("GET", "/readyz", None, None)
        .ok()
        .map(|r| r.status == 200 && r.json()["ready"] == true)
}

#[test]
fn restart_of_postgresql_under_load_loses_no_acknowledged_write() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let pg = match clusterclaw_tests::postgres::PrivatePostgres::start() {
        Ok(pg) => pg,
        Err(e) => return skip(&format!("cannot run a PostgreSQL server of its own: {e:#}")),
    };
    let scratch = tempfile::tempdir().unwrap();
    // Trust authentication: the file's password is not asked for.
    let password_file = scratch.path().join("pgpass");
    std::fs::write(&password_file, "unused\n").unwrap();
    let password_file = password_file.display().to_string();
    let store = pg.url();
    let a = server(&store, &password_file, free_port(), None);
    let (epoch, _) = wait_leading(&a, WAIT).unwrap();
    let b = server(&store, &password_file, free_port(), Some(&a));
    let servers = [a, b];
    wait_for("both servers ready", WAIT, || {
        Ok(servers.iter().all(|s| ready(s) == Some(true)).then_some(()))
    })
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writing = write_load(
        servers.iter().map(|s| s.api_url().to_string()).collect(),
        servers[0].admin_token().to_string(),
        unique("pgload"),
        Arc::clone(&stop),
    );
    std::thread::sleep(Duration::from_secs(3));
    pg.stop().unwrap();
    let down = Instant::now();
    // Both servers say they are not ready while the database is away.
    wait_for("both servers not ready", Duration::from_secs(15), || {
        Ok(servers
            .iter()
            .all(|s| ready(s) == Some(false))
            .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", servers[0].log(), servers[1].log()));
    let not_ready_after = down.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    for s in &servers {
        assert_eq!(ready(s), Some(false), "ready without the database");
    }
    pg.start_again().unwrap();
    let up = Instant::now();
    wait_for("both servers ready again", Duration::from_secs(30), || {
        Ok(servers.iter().all(|s| ready(s) == Some(true)).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", servers[0].log(), servers[1].log()));
    let ready_after = up.elapsed();
    // Leadership resumes: exactly one leads (again or anew), in the epoch it had or a later one.
    let (leading_epoch, leader) = wait_for("a leader after the restart", WAIT, || {
        let views: Vec<_> = servers.iter().filter_map(lease_view).collect();
        let leaders: Vec<_> = views.iter().filter(|(l, ..)| *l).collect();
        Ok((leaders.len() == 1).then(|| (leaders[0].2, leaders[0].3.clone())))
    })
    .unwrap();
    assert!(leading_epoch >= epoch);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let load = writing.join().unwrap().unwrap();

    // Writes were acknowledged before and after, through each server after the restart.
    let before = load.acked.iter().filter(|(_, _, at)| *at < down).count();
    assert!(before > 0, "no write before the restart");
    for via in 0..servers.len() {
        assert!(
            load.acked.iter().any(|(_, v, at)| *v == via && *at > up),
            "server {via} wrote nothing after the restart (it did not reconnect)"
        );
    }
    assert!(
        load.failed > 0,
        "no write failed while the database was away"
    );
    // Nothing acknowledged is lost: every one reads back through both servers.
    for s in &servers {
        let r = s.http("GET", "/api/v1/tenants", None, Some(s.admin_token()));
        let names: std::collections::BTreeSet<String> = r.json()["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|t| t["metadata"]["name"].as_str().map(str::to_string))
            .collect();
        let lost: Vec<&String> = load
            .acked
            .iter()
            .map(|(n, ..)| n)
            .filter(|n| !names.contains(*n))
            .collect();
        assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    }
    eprintln!(
        "PostgreSQL restarted under load: {} writes acknowledged ({before} before the stop), {} refused while it was away; not ready {not_ready_after:?} after the stop, ready {ready_after:?} after the start; leader {leader} in epoch {leading_epoch} (was {epoch}); load {}",
        load.acked.len(),
        load.failed,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
