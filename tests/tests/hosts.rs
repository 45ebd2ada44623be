//! Host liveness and cordon end to end: the real `clusterclaw` server and `clusterclaw-agent`
//! binaries, real mutual TLS, real Docker and the stand-in OpenClaw image.
//!
//! Every test uses its own tenant and host names, and a guard declared first (so dropped last)
//! that removes every container, volume and network carrying those names' labels.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;
use serde_json::{Value, json};

/// The server's heartbeat timeout in these tests.
const TTL: Duration = Duration::from_secs(5);

fn host(server: &TestServer, name: &str) -> Value {
    server.get_json(&format!("/api/v1/hosts/{name}"))
}

fn phase(v: &Value) -> &str {
    v.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The value of one `/metrics` series, by its full name and labels.
fn metric(server: &TestServer, series: &str) -> Option<f64> {
    let r = server.http("GET", "/metrics", None, Some(server.admin_token()));
    assert_eq!(r.status, 200, "{}", r.body);
    r.body.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Seconds in a host message `no status report for 1m05s (...)`.
fn silence_secs(message: &str) -> u64 {
    let text = message
        .strip_prefix("no status report for ")
        .and_then(|m| m.split(' ').next())
        .unwrap_or_else(|| panic!("unexpected host message {message:?}"));
    let mut total = 0u64;
    let mut n = 0u64;
    for c in text.chars() {
        match c {
            '0'..='9' => n = n * 10 + u64::from(c as u8 - b'0'),
            'd' => (total, n) = (total + n * 86_400, 0),
            'h' => (total, n) = (total + n * 3600, 0),
            'm' => (total, n) = (total + n * 60, 0),
            's' => (total, n) = (total + n, 0),
            _ => panic!("unexpected host message {message:?}"),
        }
    }
    total
}

/// How long after the timeout the host turned NotReady: its `notReadySince` against the last
/// heartbeat the server recorded (read with the `sqlite3` tool when there is one).
fn delay_after_ttl(server: &TestServer, host_name: &str, not_ready: &Value) -> Option<Duration> {
    let since = not_ready.pointer("/status/notReadySince")?.as_str()?;
    let since = humantime::parse_rfc3339_weak(since).ok()?;
    let since_ms = since
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis() as i64;
    let db = server.data_dir().join("clusterclaw.db");
    let out = std::process::Command::new("sqlite3")
        .arg("-readonly")
        .arg(&db)
        .arg(format!(
            "SELECT last_seen_ms FROM host_heartbeats WHERE name = '{host_name}'"
        ))
        .output()
        .ok()?;
    let last: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    let ttl_ms = TTL.as_millis() as i64;
    Some(Duration::from_millis(
        u64::try_from(since_ms - last - ttl_ms).unwrap_or(0),
    ))
}

/// Kills the agent and waits for its host to turn NotReady: the time from the kill, and how
/// long after the timeout (when it can be measured).
fn kill_and_detect(
    server: &TestServer,
    agent: &mut TestAgent,
    host_name: &str,
) -> anyhow::Result<(Value, Duration, Option<Duration>)> {
    agent.kill9();
    let killed = Instant::now();
    let not_ready = wait_for("the host NotReady", TTL + Duration::from_secs(30), || {
        let v = host(server, host_name);
        Ok((phase(&v) == "NotReady").then_some(v))
    })?;
    let detected = killed.elapsed();
    let after_ttl = delay_after_ttl(server, host_name, &not_ready);
    eprintln!(
        "host NotReady {detected:?} after the agent was killed, {after_ttl:?} after the timeout ({TTL:?})"
    );
    // The last report was at most one report interval (1 s) before the kill.
    assert!(
        detected <= TTL + Duration::from_millis(1500),
        "NotReady {detected:?} after the kill"
    );
    if let Some(d) = after_ttl {
        assert!(
            d <= Duration::from_secs(1),
            "NotReady {d:?} after the timeout"
        );
    }
    Ok((not_ready, detected, after_ttl))
}

/// A 2-replica instance on one host; the agent is killed (its containers keep running): the
/// host turns NotReady within the timeout and a second, its replicas Unknown, the instance
/// counts none ready and `/metrics` agrees; the host's message ages between reads. The agent
/// comes back: the host is Ready and the same containers Ready again.
#[test]
fn a_killed_agent_turns_its_host_not_ready_and_its_replicas_unknown() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-live");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server =
        TestServer::start_on(&format!("127.0.0.1:{port}"), &["--heartbeat-timeout", "5s"])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("live-host");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
    let h = agent.wait_enrolled()?;
    cleanup.host(&h);
    wait_host_ready(&server, &h)?;

    let name = "bot";
    scope.apply(&server, "base", &scope.base_manifest());
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(name, &image, 2, &BTreeMap::new()),
    );
    let (status, before) = wait_ready(&server, &scope, name, 2)?;
    assert_eq!(status.pointer("/status/phase"), Some(&json!("Running")));
    wait_for("/metrics to count the instance Running", WAIT, || {
        Ok(
            (metric(&server, "clusterclaw_instances{phase=\"Running\"}") == Some(1.0))
                .then_some(()),
        )
    })?;

    // The agent dies; its containers keep running.
    let (not_ready, _, first_delay) = kill_and_detect(&server, &mut agent, &h)?;
    assert!(
        not_ready.pointer("/status/notReadySince").is_some(),
        "{not_ready}"
    );
    let inst = wait_for("the replicas Unknown", WAIT, || {
        let v = scope.instance(&server, name);
        let states: Vec<&str> = v["status"]["replicaStatus"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["state"].as_str()).collect())
            .unwrap_or_default();
        Ok((states == ["Unknown", "Unknown"]).then_some(v))
    })?;
    assert_eq!(inst["status"]["readyReplicas"], 0, "{inst}");
    assert_eq!(inst["status"]["availableReplicas"], 0, "{inst}");
    assert_ne!(inst["status"]["phase"], "Running", "{inst}");
    for r in inst["status"]["replicaStatus"].as_array().unwrap() {
        let m = r["message"].as_str().unwrap_or_default();
        assert!(m.contains(&format!("host {h} is NotReady")), "{r}");
    }
    assert_eq!(
        metric(&server, "clusterclaw_instances{phase=\"Running\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(&server, "clusterclaw_hosts{phase=\"NotReady\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&server, "clusterclaw_replicas{state=\"Unknown\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&server, "clusterclaw_replicas{state=\"Ready\"}"),
        Some(0.0)
    );

    // The message ages between two reads, through the API and the CLI.
    let first = silence_secs(host(&server, &h)["status"]["message"].as_str().unwrap());
    std::thread::sleep(Duration::from_millis(2100));
    let second = silence_secs(host(&server, &h)["status"]["message"].as_str().unwrap());
    assert!(second >= first + 2, "{first}s then {second}s");
    let listed = server.cli(&["get", "hosts", "-o", "json"]).ok().json();
    let msg = listed["items"]
        .as_array()
        .and_then(|a| a.iter().find(|o| o["metadata"]["name"] == h.as_str()))
        .and_then(|o| o["status"]["message"].as_str())
        .map(str::to_string)
        .unwrap_or_default();
    assert!(silence_secs(&msg) >= second, "{msg}");
    let table = server.cli(&["get", "hosts"]).ok().stdout;
    assert!(table.contains("NotReady"), "{table}");
    let described = server.cli(&["describe", "host", &h]).ok().stdout;
    assert!(
        described.contains("no status report for") && described.contains("Not ready since"),
        "{described}"
    );

    // The agent comes back: the host is Ready and the same containers Ready again.
    agent.restart_plain()?;
    wait_host_ready(&server, &h)?;
    let (status, after) = wait_ready(&server, &scope, name, 2)?;
    assert_eq!(status.pointer("/status/phase"), Some(&json!("Running")));
    for (replica, c) in &before {
        assert_eq!(after[replica].id, c.id, "{replica} kept its container");
    }
    let back = host(&server, &h);
    assert!(back.pointer("/status/notReadySince").is_none(), "{back}");
    assert!(back.pointer("/status/message").is_none(), "{back}");

    // Two more kills, for the detection figure.
    let mut delays: Vec<Duration> = first_delay.into_iter().collect();
    for _ in 0..2 {
        let (_, _, d) = kill_and_detect(&server, &mut agent, &h)?;
        delays.extend(d);
        agent.restart_plain()?;
        wait_host_ready(&server, &h)?;
    }
    delays.sort();
    if let Some(median) = delays.get(delays.len() / 2) {
        eprintln!("timeout→NotReady delay: median {median:?} of {delays:?}");
    }
    Ok(())
}

/// Cordon a one-host cluster: a new replica stays unplaced with a reason; uncordon places it.
/// Both are audited and idempotent; reports do not clear the cordon.
#[test]
fn a_cordoned_host_takes_no_new_replicas() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-cordon");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server =
        TestServer::start_on(&format!("127.0.0.1:{port}"), &["--heartbeat-timeout", "5s"])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("cordon-host");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
    let h = agent.wait_enrolled()?;
    cleanup.host(&h);
    wait_host_ready(&server, &h)?;

    let name = "bot";
    scope.apply(&server, "base", &scope.base_manifest());
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(name, &image, 1, &BTreeMap::new()),
    );
    let (_, one) = wait_ready(&server, &scope, name, 1)?;

    let out = server.cli(&["cordon", "host", &h]).ok();
    assert!(out.stdout.contains("cordoned"), "{}", out.stdout);
    server.cli(&["cordon", "host", &h]).ok();
    assert_eq!(host(&server, &h)["spec"]["unschedulable"], true);
    let table = server.cli(&["get", "hosts"]).ok().stdout;
    assert!(table.contains("Ready,SchedulingDisabled"), "{table}");
    let missing = server.cli(&["cordon", "host", "no-such-host"]).code(1);
    assert!(missing.stderr.contains("not found"), "{}", missing.stderr);

    scope.scale(&server, name, 2);
    let pending = wait_for("bot-1 unplaced with a reason", WAIT, || {
        let v = scope.instance(&server, name);
        let r1 = v["status"]["replicaStatus"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == "bot-1").cloned());
        Ok(r1
            .filter(|r| r["host"].is_null() && r["state"] == "Pending")
            .map(|_| v))
    })?;
    let why = pending["status"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("unschedulable"), "{pending}");
    // Reports go on (the agent reports every second) and do not clear the cordon.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(host(&server, &h)["spec"]["unschedulable"], true);
    let still = scope.instance(&server, name);
    assert!(
        still["status"]["replicaStatus"][1]["host"].is_null(),
        "{still}"
    );
    // The replica it ran stays.
    assert_eq!(
        scope.containers(name)?[&format!("{name}-0")].id,
        one[&format!("{name}-0")].id
    );

    let out = server.cli(&["uncordon", "host", &h]).ok();
    assert!(out.stdout.contains("uncordoned"), "{}", out.stdout);
    server.cli(&["uncordon", "host", &h]).ok();
    assert!(host(&server, &h)["spec"].get("unschedulable").is_none());
    wait_ready(&server, &scope, name, 2)?;

    let audit = server
        .cli(&["audit", "list", "-A", "-o", "json"])
        .ok()
        .json();
    let actions: Vec<(String, String)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["object"]["name"] == h.as_str())
        .map(|r| {
            (
                r["action"].as_str().unwrap_or_default().to_string(),
                r["result"]["outcome"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    for action in ["host.cordon", "host.uncordon"] {
        assert!(
            actions.iter().any(|(a, o)| a == action && o == "ok"),
            "{action} in {actions:?}"
        );
    }
    drop(agent);
    Ok(())
}
