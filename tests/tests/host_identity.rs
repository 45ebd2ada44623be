//! End to end: whose containers an agent may touch, and what a removed host does. Real server and agent binaries, real mutual TLS, real Docker and the stand-in image.
//!
//! Two clusters (two servers, so two CAs) whose agents have one host name share the machine's
//! engine and run the same tenant, project and instance names without disturbing each other;
//! a container made before cluster labels is adopted without a restart; a host deleted with
//! the CLI stops its replicas, keeps their volumes, stays down, and enrolls again as a new
//! host with a new join token; and no secret value reaches a debug- or trace-level log.

use std::collections::BTreeMap;

use anyhow::{Context, bail, ensure};
use clusterclaw_agent::runtime::{Owner, labels, spec};
use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;
use serde_json::Value;

// ------------------------------------------------------------------ helpers

fn inspect(id: &str) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_str(&docker(&["inspect", id])?)?;
    Ok(v[0].clone())
}

fn exists(id: &str, kind: &str) -> bool {
    std::process::Command::new("docker")
        .args([kind, "inspect", id])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What must not change for a container left alone: id, start time, the engine's restart count.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    id: String,
    started_at: String,
    restarts: u64,
    running: bool,
    volume: String,
}

fn run_of(id: &str) -> anyhow::Result<Run> {
    let c = inspect(id)?;
    Ok(Run {
        id: c["Id"].as_str().unwrap_or_default().to_owned(),
        started_at: c["State"]["StartedAt"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        restarts: c["RestartCount"].as_u64().unwrap_or_default(),
        running: c["State"]["Running"] == Value::Bool(true),
        volume: c["Mounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["Destination"] == spec::STATE_DIR)
            .and_then(|m| m["Name"].as_str())
            .unwrap_or_default()
            .to_owned(),
    })
}

/// Waits until the server reports `n` Ready replicas of `name` and returns replica → container
/// id, as reported.
fn reported(
    server: &TestServer,
    scope: &Scope,
    name: &str,
    n: usize,
) -> anyhow::Result<BTreeMap<String, String>> {
    wait_for(
        &format!("{name}: {n} replicas reported Ready"),
        WAIT,
        || {
            let v = scope.instance(server, name);
            let replicas: BTreeMap<String, String> = v
                .pointer("/status/replicaStatus")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|r| r["state"] == "Ready")
                .filter_map(|r| {
                    Some((
                        r["name"].as_str()?.to_owned(),
                        r["containerId"].as_str()?.to_owned(),
                    ))
                })
                .collect();
            Ok((replicas.len() == n).then_some(replicas))
        },
    )
}

/// Status reports the server has taken from its agents (on either report call: agents send
/// `Heartbeat` deltas, and full `ReportStatus` reports to a server without it).
fn reports(server: &TestServer) -> u64 {
    let r = server.http("GET", "/metrics", None, Some(server.admin_token()));
    r.body
        .lines()
        .filter_map(|l| {
            ["ReportStatus", "Heartbeat"].iter().find_map(|m| {
                l.strip_prefix(&format!(
                    "clusterclaw_agent_rpc_requests_total{{method=\"{m}\",code=\"Ok\"}} "
                ))
            })
        })
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

/// Waits for `more` status reports (each after a second of the agent's reconcile passes).
fn wait_reports(server: &TestServer, more: u64) -> anyhow::Result<()> {
    let target = reports(server) + more;
    wait_for(&format!("{more} more status reports"), WAIT, || {
        Ok((reports(server) >= target).then_some(()))
    })
}

/// Writes `content` into `file` of a container's state volume (`docker cp`: the root file
/// system is read-only, the volume is not).
fn write_state(container: &str, file: &str, content: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let local = dir.path().join(file);
    std::fs::write(&local, content)?;
    docker(&[
        "cp",
        local.to_str().context("utf-8")?,
        &format!("{container}:{}/{file}", spec::STATE_DIR),
    ])?;
    Ok(())
}

fn read_state(container: &str, file: &str) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    docker(&[
        "cp",
        &format!("{container}:{}/{file}", spec::STATE_DIR),
        dir.path().to_str().context("utf-8")?,
    ])?;
    Ok(std::fs::read_to_string(dir.path().join(file))?)
}

fn owner_of(agent: &TestAgent) -> anyhow::Result<Owner> {
    agent.identity()?.owner().map_err(anyhow::Error::msg)
}

fn restart_with(agent: &mut TestAgent, args: Vec<String>) -> anyhow::Result<()> {
    agent.kill9();
    agent.args = args;
    agent.spawn()
}

// -------------------------------------------------------------------- tests

/// Two clusters, one engine, one host name, the same tenant/project/instance names: nothing
/// restarts, both state files stay, and deleting the instance on one cluster leaves the other's
/// container and volume alone.
#[test]
fn two_clusters_with_one_host_name_share_an_engine() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-twins");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let host = unique("twin");
    cleanup.host(&host);
    let (port_a, port_b) = (free_port(), free_port());
    let server_a = TestServer::start_on(&format!("127.0.0.1:{port_a}"), &[])?;
    let server_b = TestServer::start_on(&format!("127.0.0.1:{port_b}"), &[])?;
    let token_a = join_token(&server_a, 1, "10m");
    let token_b = join_token(&server_b, 1, "10m");
    let mut agent_a = TestAgent::enroll(&server_a, port_a, &token_a, &["--name", &host])?;
    let mut agent_b = TestAgent::enroll(&server_b, port_b, &token_b, &["--name", &host])?;
    assert_eq!(agent_a.wait_enrolled()?, host);
    assert_eq!(agent_b.wait_enrolled()?, host);
    let (owner_a, owner_b) = (owner_of(&agent_a)?, owner_of(&agent_b)?);
    assert_ne!(owner_a.cluster_id(), owner_b.cluster_id(), "two CAs");
    wait_host_ready(&server_a, &host)?;
    wait_host_ready(&server_b, &host)?;

    let name = "bot";
    for server in [&server_a, &server_b] {
        scope.apply(server, "base", &scope.base_manifest());
        scope.apply(
            server,
            name,
            &scope.instance_manifest(name, &image, 2, &BTreeMap::new()),
        );
    }
    let ids_a = reported(&server_a, &scope, name, 2)?;
    let ids_b = reported(&server_b, &scope, name, 2)?;
    let mut before = BTreeMap::new();
    for (side, ids, owner) in [("a", &ids_a, &owner_a), ("b", &ids_b, &owner_b)] {
        for (replica, id) in ids {
            let c = inspect(id)?;
            let label = |k: &str| {
                c["Config"]["Labels"][k]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            };
            assert_eq!(
                label(labels::CLUSTER),
                owner.cluster_id(),
                "{side} {replica}"
            );
            assert_eq!(
                label(labels::HOST_UID),
                owner.host_uid(),
                "{side} {replica}"
            );
            assert_eq!(label(labels::HOST), host);
            let run = run_of(id)?;
            assert!(run.running, "{side} {replica}: {run:?}");
            write_state(id, "marker", &format!("{side}/{replica}"))?;
            before.insert((side, replica.clone()), run);
        }
    }
    // Distinct containers and distinct state volumes for the same replica names.
    for replica in ids_a.keys() {
        let (a, b) = (
            &before[&("a", replica.clone())],
            &before[&("b", replica.clone())],
        );
        assert_ne!(a.id, b.id);
        assert_ne!(a.volume, b.volume);
    }

    // Both agents reconcile for a while (a dozen passes each, reported every second).
    wait_reports(&server_a, 6)?;
    wait_reports(&server_b, 6)?;
    for ((side, replica), run) in &before {
        assert_eq!(&run_of(&run.id)?, run, "{side} {replica} was not touched");
        assert_eq!(read_state(&run.id, "marker")?, format!("{side}/{replica}"));
    }
    assert_eq!(reported(&server_a, &scope, name, 2)?, ids_a);
    assert_eq!(reported(&server_b, &scope, name, 2)?, ids_b);

    // Deleting the instance on cluster A removes A's containers and volumes only.
    scope.delete(&server_a, name);
    wait_for("cluster A's containers and volumes to go", WAIT, || {
        Ok(before
            .iter()
            .filter(|((side, _), _)| *side == "a")
            .all(|(_, run)| !exists(&run.id, "container") && !exists(&run.volume, "volume"))
            .then_some(()))
    })?;
    wait_reports(&server_b, 3)?;
    for ((side, replica), run) in before.iter().filter(|((side, _), _)| *side == "b") {
        assert_eq!(&run_of(&run.id)?, run, "{side} {replica} was not touched");
        assert_eq!(read_state(&run.id, "marker")?, format!("{side}/{replica}"));
    }
    assert_eq!(reported(&server_b, &scope, name, 2)?, ids_b);
    for agent in [&agent_a, &agent_b] {
        assert!(!agent.log().contains("panicked"), "{}", agent.log());
    }
    Ok(())
}

/// A container, volume and network made by an agent before cluster labels (managed and host
/// labels only, the old names) are adopted on upgrade: no restart, the state stays.
#[test]
fn a_pre_upgrade_container_is_adopted_without_a_restart() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-legacy");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host = unique("legacy-host");
    cleanup.host(&host);
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host])?;
    assert_eq!(agent.wait_enrolled()?, host);
    wait_host_ready(&server, &host)?;
    let name = "bot";
    scope.apply(&server, "base", &scope.base_manifest());
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(name, &image, 1, &BTreeMap::from([("A", "b")])),
    );
    let replica = format!("{name}-0");
    let id = reported(&server, &scope, name, 1)?[&replica].clone();

    // Make what an older agent would have made from the same assignment: the same container
    // without the cluster and host-uid labels, under the old names.
    agent.kill9();
    let c = inspect(&id)?;
    let key = clusterclaw_agent::model::ReplicaKey::new(&scope.tenant, &scope.project, &replica);
    let legacy_name = spec::legacy_container_name(&host, &key);
    let legacy_volume = spec::legacy_volume_name(&host, &key);
    let legacy_network = spec::legacy_network_name(&host, &scope.tenant);
    let old_labels: Vec<String> = c["Config"]["Labels"]
        .as_object()
        .context("labels")?
        .iter()
        .filter(|(k, _)| *k != labels::CLUSTER && *k != labels::HOST_UID)
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    let label_args = |keep: &dyn Fn(&str) -> bool| -> Vec<String> {
        old_labels
            .iter()
            .filter(|l| keep(l.split_once('=').map_or("", |(k, _)| k)))
            .flat_map(|l| ["--label".to_owned(), l.clone()])
            .collect()
    };
    let config = c["Mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["Destination"] == spec::CONFIG_PATH)
        .and_then(|m| m["Source"].as_str())
        .context("config mount")?
        .to_owned();
    let host_port = c["HostConfig"]["PortBindings"]["18789/tcp"][0]["HostPort"]
        .as_str()
        .context("port")?
        .to_owned();
    docker(&["rm", "-f", &id])?;
    let volume_labels = label_args(&|k| {
        [
            labels::MANAGED,
            labels::HOST,
            labels::TENANT,
            labels::PROJECT,
            labels::REPLICA,
            labels::INSTANCE,
        ]
        .contains(&k)
    });
    let mut args: Vec<String> = vec!["volume".into(), "create".into()];
    args.extend(volume_labels);
    args.push(legacy_volume.clone());
    docker(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mut args: Vec<String> = vec!["network".into(), "create".into()];
    args.extend(label_args(&|k| {
        [labels::MANAGED, labels::HOST, labels::TENANT].contains(&k)
    }));
    args.push(legacy_network.clone());
    docker(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mut args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--name".into(),
        legacy_name.clone(),
        "--user".into(),
        spec::CONTAINER_USER.into(),
        "--read-only".into(),
        "--tmpfs".into(),
        "/tmp:rw,nosuid,nodev,mode=1777".into(),
        "--network".into(),
        legacy_network.clone(),
        "-v".into(),
        format!("{legacy_volume}:{}", spec::STATE_DIR),
        "-v".into(),
        format!("{config}:{}:ro", spec::CONFIG_PATH),
        "-p".into(),
        format!("127.0.0.1:{host_port}:18789"),
    ];
    args.extend(label_args(&|_| true));
    for e in c["Config"]["Env"].as_array().into_iter().flatten() {
        args.push("-e".into());
        args.push(e.as_str().unwrap_or_default().to_owned());
    }
    args.push(image.clone());
    let legacy_id = docker(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    write_state(&legacy_id, "marker", "from before the upgrade")?;
    let before = run_of(&legacy_id)?;
    assert!(before.running);
    // The data directory as the older agent left it: no ownership record yet.
    std::fs::remove_file(agent.data_dir().join("ownership.json"))?;

    agent.restart_plain()?;
    wait_for("the pre-upgrade container reported Ready", WAIT, || {
        let ids = reported(&server, &scope, name, 1)?;
        Ok((ids[&replica] == legacy_id).then_some(()))
    })?;
    wait_reports(&server, 5)?;
    assert_eq!(run_of(&legacy_id)?, before, "adopted without a restart");
    assert_eq!(read_state(&legacy_id, "marker")?, "from before the upgrade");
    let record = std::fs::read_to_string(agent.data_dir().join("ownership.json"))?;
    assert!(record.contains(&legacy_id), "{record}");
    assert!(
        agent
            .log()
            .contains("adopting the objects this host ran before cluster labels")
    );
    Ok(())
}

/// `clusterclaw delete host`: the agent stops its replicas (volumes kept), stays down across a
/// restart, and enrolls as a new host with a new join token without its data dir being wiped.
#[test]
fn a_removed_host_stops_its_replicas_and_enrolls_again_with_a_new_token() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-removed");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host = unique("removed-host");
    cleanup.host(&host);
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host])?;
    assert_eq!(agent.wait_enrolled()?, host);
    let first_owner = owner_of(&agent)?;
    wait_host_ready(&server, &host)?;
    let name = "bot";
    scope.apply(&server, "base", &scope.base_manifest());
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(name, &image, 1, &BTreeMap::new()),
    );
    let replica = format!("{name}-0");
    let id = reported(&server, &scope, name, 1)?[&replica].clone();
    write_state(&id, "marker", "kept")?;
    let started = run_of(&id)?;

    // Removed while running: the replica stops, its volume stays.
    server.cli(&["delete", "host", &host]).ok();
    let stopped = wait_for("the replica stopped", WAIT, || {
        let run = run_of(&id)?;
        Ok((!run.running).then_some(run))
    })?;
    assert_eq!(stopped.started_at, started.started_at);
    assert!(exists(&started.volume, "volume"));
    assert_eq!(read_state(&id, "marker")?, "kept");
    assert!(agent.data_dir().join("removed.json").exists());
    assert!(
        agent
            .log()
            .contains("the control plane has removed this host"),
        "{}",
        agent.log()
    );

    // Restarted without a new token: it stays down and starts nothing.
    agent.restart_plain()?;
    wait_for("the restarted agent to stay down", WAIT, || {
        Ok(agent
            .log()
            .contains("removed from the cluster earlier; staying down")
            .then_some(()))
    })?;
    let after = run_of(&id)?;
    assert_eq!(after, stopped, "not started again");

    // A new join token: a new host identity, the old one kept aside, the data dir not wiped.
    let token2 = join_token(&server, 1, "10m");
    let ca = server
        .endpoints()
        .ca_cert
        .clone()
        .context("CA path")?
        .display()
        .to_string();
    let mut args: Vec<String> = [
        "--server",
        &format!("https://127.0.0.1:{port}"),
        "--ca-cert",
        &ca,
        "--join-token",
        &token2,
        "--log-format",
        "json",
        "--name",
        &host,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(FAST.iter().map(|s| s.to_string()));
    restart_with(&mut agent, args)?;
    let second_owner = wait_for("a new enrollment", WAIT, || {
        Ok(owner_of(&agent)
            .ok()
            .filter(|o| o.host_uid() != first_owner.host_uid()))
    })?;
    let new_host = agent.identity()?.record.host_id;
    wait_host_ready(&server, &new_host)?;
    let aside: Vec<_> = std::fs::read_dir(agent.data_dir())?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("removed-"))
        .collect();
    ensure!(aside.len() == 1, "one identity set aside: {aside:?}");
    assert!(aside[0].path().join("host.key").exists());
    assert!(aside[0].path().join("removed.json").exists());
    assert!(!agent.data_dir().join("removed.json").exists());
    assert!(
        !agent.log().contains(&token2),
        "the token never reaches the log"
    );

    // The replica is placed on the new host: a new container; the old one stays stopped with
    // its volume.
    let new_id = reported(&server, &scope, name, 1)?[&replica].clone();
    assert_ne!(new_id, id);
    let c = inspect(&new_id)?;
    assert_eq!(
        c["Config"]["Labels"][labels::HOST_UID].as_str(),
        Some(second_owner.host_uid())
    );
    assert_eq!(run_of(&id)?, stopped, "the old container is left alone");
    assert_eq!(read_state(&id, "marker")?, "kept");
    Ok(())
}

/// No secret value in any log line of an agent at `RUST_LOG=trace` and a server at
/// `RUST_LOG=debug`, while a replica with a secret in its environment is created, inspected and
/// reported on.
#[test]
fn no_secret_value_in_debug_logs() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-nosecret");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server =
        TestServer::start_with_env(&format!("127.0.0.1:{port}"), &[], &[("RUST_LOG", "debug")])?;
    let token = join_token(&server, 1, "10m");
    let host = unique("nosecret-host");
    cleanup.host(&host);
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host])?;
    agent.kill9();
    agent.env = vec![("RUST_LOG".into(), "trace".into())];
    agent.spawn()?;
    assert_eq!(agent.wait_enrolled()?, host);
    wait_host_ready(&server, &host)?;
    scope.apply(&server, "base", &scope.base_manifest());
    let value = format!("sk-e2e-{}", unique("secret"));
    server.set_secret(&scope.tenant, "", "llm-keys", "anthropic", &value);
    let name = "bot";
    let manifest = format!(
        "{}  env:\n    ANTHROPIC_API_KEY:\n      secretRef: {{name: llm-keys, key: anthropic}}\n",
        scope.instance_manifest(name, &image, 1, &BTreeMap::new())
    );
    scope.apply(&server, name, &manifest);
    let id = reported(&server, &scope, name, 1)?[&format!("{name}-0")].clone();
    let env = inspect(&id)?["Config"]["Env"].to_string();
    ensure!(env.contains(&value), "the replica has the secret: {env}");
    // Let the agent inspect, measure and report a few times.
    wait_reports(&server, 4)?;
    let (agent_log, server_log) = (agent.log(), server.log());
    ensure!(
        agent_log.contains("\"level\":\"DEBUG\""),
        "the agent logs at debug"
    );
    ensure!(server_log.contains("DEBUG"), "the server logs at debug");
    for (who, log) in [("agent", &agent_log), ("server", &server_log)] {
        if let Some(line) = log.lines().find(|l| l.contains(&value)) {
            bail!("the {who} log holds the secret value: {line}");
        }
    }
    Ok(())
}
