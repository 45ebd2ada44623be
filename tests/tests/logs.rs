//! End to end: `clusterclaw logs` streams a replica's container output from its host through
//! the agent's own connection, redacted, merged across replicas, followed across a
//! replacement, in scope only.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::ensure;
use clusterclaw_tests::agent::*;
use clusterclaw_tests::cli_stream::StreamingCli;
use clusterclaw_tests::server::{CliOutput, TestServer};
use serde_json::Value;

const GATEWAY_TOKEN: &str = "gw-e2e-token-5f1d2c";
const OTHER_SECRET: &str = "sk-e2e-secret-9a7b3e";

fn manifest(scope: &Scope, name: &str, image: &str, rate: &str) -> String {
    format!(
        "{}  env:\n    OPENCLAW_GATEWAY_TOKEN:\n      secretRef: {{name: logkeys, key: token}}\n    \
         OPENCLAW_EXTRA_KEY:\n      secretRef: {{name: logkeys, key: extra}}\n    \
         STANDIN_LOG_ENV: \"1\"\n    STANDIN_LOG_LINES_PER_SEC: \"{rate}\"\n",
        scope.instance_manifest(name, image, 2, &BTreeMap::new())
    )
}

fn as_token(server: &TestServer, token: &str, args: &[&str]) -> CliOutput {
    server.cli_with(
        args,
        &[
            ("CLUSTERCLAW_SERVER", server.api_url()),
            ("CLUSTERCLAW_TOKEN", token),
        ],
        None,
    )
}

#[test]
fn logs_are_streamed_redacted_merged_followed_and_scoped() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("logs");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("logs-host");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;

    let (t, p) = (scope.tenant.as_str(), scope.project.as_str());
    scope.apply(&server, "base", &scope.base_manifest());
    server
        .cli(&[
            "secret",
            "set",
            "logkeys",
            "-t",
            t,
            "-p",
            p,
            "--from-literal",
            &format!("token={GATEWAY_TOKEN}"),
            "--from-literal",
            &format!("extra={OTHER_SECRET}"),
        ])
        .ok();
    let name = "bot";
    scope.apply(&server, name, &manifest(&scope, name, &image, "5"));
    wait_ready(&server, &scope, name, 2)?;

    // The lowest replica by default, redacted.
    let started = Instant::now();
    let out = server
        .cli(&["logs", "instance", name, "-t", t, "-p", p])
        .ok();
    eprintln!("logs answered in {:?}", started.elapsed());
    ensure!(
        out.stdout.contains("openclaw-standin: listening"),
        "{}",
        out.stdout
    );
    ensure!(
        out.stdout
            .contains("openclaw-standin: env OPENCLAW_GATEWAY_TOKEN=[REDACTED]")
            && out
                .stdout
                .contains("openclaw-standin: env OPENCLAW_EXTRA_KEY=[REDACTED]"),
        "the secret values must be replaced: {}",
        out.stdout
    );
    ensure!(
        out.stdout
            .contains("openclaw-standin: env STANDIN_LOG_ENV=1"),
        "{}",
        out.stdout
    );
    for secret in [GATEWAY_TOKEN, OTHER_SECRET] {
        ensure!(!out.stdout.contains(secret), "{secret} leaked");
    }

    // One replica, its last line.
    let out = server
        .cli(&[
            "logs",
            "instance",
            name,
            "-t",
            t,
            "-p",
            p,
            "--replica",
            "1",
            "--tail",
            "1",
        ])
        .ok();
    ensure!(out.stdout.lines().count() == 1, "{:?}", out.stdout);

    // Every replica, line by line with its prefix.
    let out = server
        .cli(&[
            "logs",
            "instance",
            name,
            "-t",
            t,
            "-p",
            p,
            "--all",
            "--timestamps",
        ])
        .ok();
    ensure!(
        out.stdout
            .lines()
            .all(|l| l.starts_with("bot-0 | ") || l.starts_with("bot-1 | ")),
        "{}",
        out.stdout
    );
    for prefix in ["bot-0 | ", "bot-1 | "] {
        ensure!(
            out.stdout
                .lines()
                .any(|l| l.starts_with(prefix) && l.contains("OPENCLAW_GATEWAY_TOKEN=[REDACTED]")),
            "{prefix}: {}",
            out.stdout
        );
    }
    for secret in [GATEWAY_TOKEN, OTHER_SECRET] {
        ensure!(!out.stdout.contains(secret), "{secret} leaked with --all");
    }

    // Bad input names the flag (usage: exit 2); the API answers 400 with the field.
    for (args, flag) in [
        (vec!["--replica", "1", "--all"], "--all"),
        (vec!["--tail", "-1"], "--tail"),
        (vec!["--since", "yesterday"], "--since"),
    ] {
        let mut all = vec!["logs", "instance", name, "-t", t, "-p", p];
        all.extend(args.iter().copied());
        let out = server.cli(&all).code(2);
        ensure!(out.stderr.contains(flag), "{args:?}: {}", out.stderr);
    }
    let out = server
        .cli(&["logs", "instance", name, "-t", t, "-p", p, "--replica", "7"])
        .code(1);
    ensure!(
        out.stderr.contains("--replica") && out.stderr.contains("no replica 7"),
        "{}",
        out.stderr
    );
    let logs_path = format!("{}/logs", scope.instance_path(name));
    for (query, field) in [
        ("tail=-1", "tail"),
        ("since=soon", "since"),
        ("replica=1&all=true", "replica"),
        ("replica=9", "replica"),
    ] {
        let r = server.http(
            "GET",
            &format!("{logs_path}?{query}"),
            None,
            Some(server.admin_token()),
        );
        ensure!(r.status == 400, "{query}: {} {}", r.status, r.body);
        let v: Value = serde_json::from_str(&r.body)?;
        ensure!(v["details"][0]["field"] == field, "{query}: {v}");
    }

    // Another tenant's token: the logs do not exist, exactly as the instance does not.
    let other = Scope::new("logs-other");
    other.apply(&server, "base", &other.base_manifest());
    let out = server
        .cli(&[
            "token",
            "create",
            "api",
            "--role",
            "tenant-admin",
            "-t",
            &other.tenant,
        ])
        .ok();
    let foreign = out.stdout.trim().to_string();
    let instance = server.http("GET", &scope.instance_path(name), None, Some(&foreign));
    let logs = server.http("GET", &logs_path, None, Some(&foreign));
    ensure!(
        instance.status == 404 && logs.status == 404,
        "{} {}",
        instance.status,
        logs.status
    );
    let (a, b): (Value, Value) = (
        serde_json::from_str(&instance.body)?,
        serde_json::from_str(&logs.body)?,
    );
    ensure!(a == b, "{a} vs {b}");
    let out = as_token(
        &server,
        &foreign,
        &["logs", "instance", name, "-t", t, "-p", p],
    );
    ensure!(out.code == 1, "{}", out.stderr);
    for secret in [GATEWAY_TOKEN, OTHER_SECRET] {
        ensure!(!out.stdout.contains(secret) && !out.stderr.contains(secret));
    }

    // Follow: new lines, then a spec change replaces the container and the stream goes on
    // into the new one with a marker; deleting the instance ends it cleanly.
    let mut follower = StreamingCli::start(
        &server,
        &[
            "logs", "instance", name, "-t", t, "-p", p, "-f", "--tail", "0",
        ],
    )?;
    let first = follower.wait_line("a new line", |l| l.contains("log line"))?;
    follower.wait_line("another new line", |l| l.contains("log line") && l != first)?;
    scope.apply(&server, name, &manifest(&scope, name, &image, "6"));
    let marker = follower.wait_line("the replacement marker", |l| {
        l.starts_with("--- replica bot-0 replaced: now container ")
    })?;
    ensure!(marker.contains("(revision "), "{marker}");
    let replaced_at = follower.seen.len();
    follower.wait_line_since(replaced_at, "the new container's start", |l| {
        l.contains("openclaw-standin: listening")
    })?;
    follower.wait_line_since(replaced_at, "the new container's env", |l| {
        l.contains("STANDIN_LOG_LINES_PER_SEC=6")
    })?;
    follower.wait_line("a line of the new container", |l| l.contains("log line"))?;
    scope.delete(&server, name);
    let status = follower.wait_exit()?;
    ensure!(status.success(), "logs -f ended with {status}");
    for secret in [GATEWAY_TOKEN, OTHER_SECRET] {
        ensure!(
            !follower.seen.iter().any(|l| l.contains(secret)),
            "{secret} leaked while following"
        );
    }
    drop(agent);
    Ok(())
}

/// The boot numbers of the stand-in's `listening on ... (boot N)` lines, in order.
fn boots(out: &str) -> Vec<u64> {
    out.lines()
        .filter(|l| l.contains("openclaw-standin: listening on"))
        .filter_map(|l| {
            l.rsplit_once("(boot ")
                .and_then(|(_, n)| n.trim_end_matches(')').parse().ok())
        })
        .collect()
}

/// `--previous`: a replica whose container crashed and was restarted shows what its previous
/// run wrote (up to the crash), and nothing of the runs before or of the current one; a
/// replica never restarted has no previous run.
#[test]
fn previous_shows_the_run_before_the_last_restart() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("logs-prev");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("logs-prev-host");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;
    let (t, p) = (scope.tenant.as_str(), scope.project.as_str());
    scope.apply(&server, "base", &scope.base_manifest());
    let crashing = BTreeMap::from([
        ("STANDIN_CRASH_AFTER_MS", "4000"),
        ("STANDIN_LOG_LINES_PER_SEC", "2"),
    ]);
    scope.apply(
        &server,
        "crashy",
        &scope.instance_manifest("crashy", &image, 1, &crashing),
    );
    scope.apply(
        &server,
        "steady",
        &scope.instance_manifest("steady", &image, 1, &BTreeMap::new()),
    );
    wait_ready(&server, &scope, "steady", 1)?;

    // The crashing replica restarted at least once: its container shows two boots.
    wait_for("a restart of crashy-0", WAIT, || {
        let out = server.cli(&["logs", "instance", "crashy", "-t", t, "-p", p]);
        Ok((boots(&out.stdout).len() >= 2).then_some(()))
    })?;
    let (previous, current) = previous_run(&server, t, p)?;
    let earlier = boots(&previous.stdout);
    ensure!(
        earlier.len() == 1,
        "one run, the one before the current: {}",
        previous.stdout
    );
    ensure!(
        earlier.iter().max().copied() < current,
        "the current run (boot {current:?}) is not in --previous: {earlier:?}"
    );
    let last_line = previous.stdout.lines().last().unwrap_or_default();
    ensure!(
        last_line.contains("crashing as told"),
        "the previous run ends with its crash: {}",
        previous.stdout
    );
    ensure!(previous.stdout.contains("log line"), "{}", previous.stdout);
    // With timestamps each line starts with the engine's time. (Asked again while the
    // current run has just started: the engine cuts at whole seconds, and lines the current
    // run writes within its first second while the answer is made can crowd out the tail.)
    let stamped = wait_for("the previous run's last lines", WAIT, || {
        let out = server.cli(&[
            "logs",
            "instance",
            "crashy",
            "-t",
            t,
            "-p",
            p,
            "--previous",
            "--timestamps",
            "--tail",
            "3",
        ]);
        Ok((out.code == 0).then_some(out))
    })?;
    ensure!(
        !stamped.stdout.is_empty()
            && stamped
                .stdout
                .lines()
                .all(|l| humantime::parse_rfc3339_weak(l.split(' ').next().unwrap_or("")).is_ok()),
        "{}",
        stamped.stdout
    );

    // Never restarted: no previous run, said plainly.
    let out = server
        .cli(&["logs", "instance", "steady", "-t", t, "-p", p, "--previous"])
        .code(1);
    ensure!(out.stderr.contains("no previous run"), "{}", out.stderr);

    // The agent restarts: it still tells the previous run from the ones before (it kept the
    // starts it asked for in the replica's directory), with three runs or more to tell apart.
    wait_for("three runs of crashy-0", WAIT, || {
        let out = server.cli(&["logs", "instance", "crashy", "-t", t, "-p", p]);
        Ok((boots(&out.stdout).len() >= 3).then_some(()))
    })?;
    agent.restart_plain()?;
    wait_host_ready(&server, &host)?;
    let (previous, current) = previous_run(&server, t, p)?;
    let earlier = boots(&previous.stdout);
    ensure!(
        earlier.len() == 1 && earlier.iter().max().copied() < current,
        "after the agent's restart, one run, the one before the current (boot {current:?}): {}",
        previous.stdout
    );
    drop(agent);
    Ok(())
}

/// `logs --previous` of crashy-0 read between two reads of its whole output that show the same
/// current run (a restart in between would blur which run is current: read again), with the
/// current run's boot number. A host not yet connected again is waited for.
fn previous_run(server: &TestServer, t: &str, p: &str) -> anyhow::Result<(CliOutput, Option<u64>)> {
    let all_boots = || -> anyhow::Result<Vec<u64>> {
        let out = wait_for("crashy-0's output", WAIT, || {
            let out = server.cli(&["logs", "instance", "crashy", "-t", t, "-p", p]);
            Ok((out.code == 0).then_some(out))
        })?;
        Ok(boots(&out.stdout))
    };
    let mut tries = 0;
    loop {
        let before = all_boots()?;
        let previous = wait_for("crashy-0's previous run", WAIT, || {
            let out = server.cli(&["logs", "instance", "crashy", "-t", t, "-p", p, "--previous"]);
            Ok((out.code == 0).then_some(out))
        })?;
        let after = all_boots()?;
        tries += 1;
        if before.iter().max() == after.iter().max() || tries == 5 {
            return Ok((previous, after.iter().max().copied()));
        }
    }
}

/// `logs -f` follows a replica that a drain moves to another host: a marker line names the
/// new host and the stream goes on with the new container's output; `get volumes -w` shows the
/// replica's volume arrive on the new host and leave the old one as it happens; deleting the
/// instance ends the follow cleanly.
#[test]
fn a_follow_goes_with_its_replica_to_another_host_and_volumes_are_watched() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("logs-move");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 2, "10m");
    let mut hosts = Vec::new();
    for i in 0..2 {
        let name = unique(&format!("lm{i}"));
        let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &name])?;
        let host = agent.wait_enrolled()?;
        cleanup.host(&host);
        wait_host_ready(&server, &host)?;
        hosts.push((host, agent));
    }
    let (a, b) = (hosts[0].0.clone(), hosts[1].0.clone());
    let (t, p) = (scope.tenant.as_str(), scope.project.as_str());
    scope.apply(&server, "base", &scope.base_manifest());
    server.cli(&["cordon", "host", &b]).ok();
    let env = BTreeMap::from([("STANDIN_LOG_LINES_PER_SEC", "5")]);
    scope.apply(
        &server,
        "bot",
        &scope.instance_manifest("bot", &image, 1, &env),
    );
    let (_, containers) = wait_ready(&server, &scope, "bot", 1)?;
    ensure!(
        containers.values().all(|c| c.host == a),
        "bot-0 starts on a"
    );

    let mut volumes = StreamingCli::start(&server, &["get", "volumes", "-w", "-o", "json"])?;
    let mine = |l: &str, host: &str| {
        serde_json::from_str::<Value>(l)
            .is_ok_and(|v| v["tenant"] == t && v["replica"] == "bot-0" && v["host"] == host)
    };
    volumes.wait_line("bot-0's volume on a", |l| mine(l, &a))?;
    let mut follower = StreamingCli::start(
        &server,
        &[
            "logs", "instance", "bot", "-t", t, "-p", p, "-f", "--tail", "0",
        ],
    )?;
    follower.wait_line("a line from host a", |l| l.contains("log line"))?;

    server.cli(&["uncordon", "host", &b]).ok();
    // The volumes' lines from here on: the old volume's removal and the new one's listing come
    // in either order (the new host lists its volumes with its next report).
    let drained_from = volumes.seen.len();
    let out = server
        .cli_within(
            &["drain", "host", &a, "--timeout", "3m"],
            std::time::Duration::from_secs(240),
        )
        .expect("the drain ended in time");
    ensure!(out.code == 0, "{}\n{}", out.stdout, out.stderr);
    let marker = format!("--- replica bot-0 moved to host {b} ---");
    follower.wait_line("the marker naming host b", |l| l == marker)?;
    let moved_at = follower.seen.len();
    follower.wait_line_since(moved_at, "the new container's start", |l| {
        l.contains("openclaw-standin: listening")
    })?;
    follower.wait_line_since(moved_at, "a line from host b", |l| l.contains("log line"))?;
    volumes.wait_line_since(drained_from, "bot-0's volume on b", |l| mine(l, &b))?;
    // The old volume goes once its copy is checked: its delete comes, as it was.
    volumes.wait_line_since(drained_from, "bot-0's volume removed from a", |l| {
        mine(l, &a) && l.contains("\"deleted\":true")
    })?;

    scope.delete(&server, "bot");
    let status = follower.wait_exit()?;
    ensure!(status.success(), "logs -f ended with {status}");
    let moves: Vec<_> = follower
        .seen
        .iter()
        .filter(|l| l.contains(" moved to host "))
        .collect();
    ensure!(moves.len() == 1, "one move: {moves:?}");
    drop(hosts);
    Ok(())
}
