//! End to end: the real `clusterclaw` server and `clusterclaw-agent` binaries as processes, real mutual TLS, real Docker and the stand-in OpenClaw image.
//!
//! Every test uses its own tenant and host names, and a guard declared first (so dropped last)
//! that removes every container, volume and network carrying those names' labels, even when the
//! test fails. Intervals are shortened through the agent's flags so that the whole file stays
//! within a few minutes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use clusterclaw_agent::enroll::IdentityFiles;
use clusterclaw_proto::agent::WatchAssignmentsRequest;
use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;
use serde_json::{Value, json};

// -------------------------------------------------------------------- tests

/// One host: enroll; 3 replicas; scale 3 → 1 → 2; an env change replaces containers with the
/// state kept; `kill -9` of the agent disturbs nothing; the server goes away and comes back;
/// delete removes everything.
#[test]
fn one_host_lifecycle() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-life");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let mut server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("life-host");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    assert_eq!(host, host_name, "--name names the host");
    assert!(
        !agent.log().contains(&token),
        "the join token never reaches the log"
    );
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).map(|m| m.permissions().mode() & 0o777)
    };
    let files = IdentityFiles::in_dir(agent.data_dir());
    assert_eq!(mode(&files.key)?, 0o600);
    let host_obj = wait_host_ready(&server, &host)?;
    assert!(
        host_obj.pointer("/spec/capacity/cpu").is_some(),
        "{host_obj}"
    );

    // Three replicas.
    let name = "bot";
    scope.apply(&server, "base", &scope.base_manifest());
    // Scale-down here removes the state volumes (the default keeps them).
    let manifest = |replicas: u32, env: &BTreeMap<&str, &str>| {
        scope.instance_manifest(name, &image, replicas, env)
            + "  volumeRetention:\n    whenScaled: Delete\n"
    };
    scope.apply(&server, name, &manifest(3, &BTreeMap::new()));
    let (status, three) = wait_ready(&server, &scope, name, 3)?;
    assert_eq!(
        status.pointer("/status/phase"),
        Some(&json!("Running")),
        "{status}"
    );
    for r in status["status"]["replicaStatus"].as_array().unwrap() {
        let replica = r["name"].as_str().unwrap();
        let c = &three[replica];
        assert_eq!(r["containerId"].as_str(), Some(c.id.as_str()), "{r}");
        assert_eq!(r["hostPort"].as_u64(), c.port.map(u64::from), "{r}");
        assert_eq!(r["host"].as_str(), Some(host.as_str()));
        assert_eq!(c.host, host);
    }
    let info = gateway_get(three[&format!("{name}-0")].port.unwrap(), "/standin/info")?;
    assert_eq!(info["boots"], 1);

    // Scale 3 → 1: the highest ordinals go with their volumes; ordinal 0 is left alone.
    scope.scale(&server, name, 1);
    let (_, one) = wait_ready(&server, &scope, name, 1)?;
    assert_eq!(one[&format!("{name}-0")], three[&format!("{name}-0")]);
    wait_for("the volumes of removed replicas to go", WAIT, || {
        Ok((scope.volumes()?.len() == 1).then_some(()))
    })?;

    // 1 → 2.
    scope.scale(&server, name, 2);
    let (_, two) = wait_ready(&server, &scope, name, 2)?;
    assert_eq!(two[&format!("{name}-0")], three[&format!("{name}-0")]);

    // An env change replaces both containers; the state volume is kept (the boot counter
    // goes on).
    let boots_before: BTreeMap<String, u64> = two
        .iter()
        .map(|(r, c)| {
            let info = gateway_get(c.port.unwrap(), "/standin/info")?;
            Ok((r.clone(), info["boots"].as_u64().unwrap_or_default()))
        })
        .collect::<anyhow::Result<_>>()?;
    let env = BTreeMap::from([("OPENCLAW_E2E_COLOUR", "blue")]);
    scope.apply(&server, name, &manifest(2, &env));
    let replaced = wait_for("both containers replaced", WAIT, || {
        let (_, now) = wait_ready(&server, &scope, name, 2)?;
        Ok(now.iter().all(|(r, c)| two[r].id != c.id).then_some(now))
    })?;
    for (r, c) in &replaced {
        assert_eq!(c.volume, two[r].volume, "the state volume is kept");
        let info = gateway_get(c.port.unwrap(), "/standin/info")?;
        assert_eq!(info["env"]["OPENCLAW_E2E_COLOUR"], "blue", "{info}");
        assert_eq!(info["boots"].as_u64(), Some(boots_before[r] + 1), "{info}");
    }

    // kill -9 and restart the agent: same containers, not restarted.
    agent.restart_plain()?;
    wait_for("the restarted agent to report", WAIT, || {
        Ok(agent
            .log()
            .contains("loaded the host identity")
            .then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let after_kill = scope.containers(name)?;
    assert_eq!(after_kill, replaced, "the agent adopted its containers");
    let (_, _) = wait_ready(&server, &scope, name, 2)?;

    // The server goes away: containers keep running, and a killed one is restarted from the
    // saved assignments.
    server.terminate()?;
    let victim = format!("{name}-1");
    docker(&["kill", &replaced[&victim].id])?;
    let restarted = wait_for("the agent to restart the killed replica", WAIT, || {
        let c = scope.containers(name)?;
        Ok((c.len() == 2
            && c.values().all(|c| c.running)
            && c[&victim].started_at != replaced[&victim].started_at)
            .then_some(c))
    })?;
    assert_eq!(
        restarted[&victim].id, replaced[&victim].id,
        "restarted, not replaced"
    );
    assert_eq!(
        restarted[&format!("{name}-0")],
        replaced[&format!("{name}-0")]
    );
    assert!(
        agent.log().contains("cannot fetch assignments"),
        "{}",
        agent.log()
    );

    // The server comes back: status catches up (the restart is counted).
    server.restart()?;
    let caught_up = Instant::now();
    wait_for("status to catch up", WAIT, || {
        let v = scope.instance(&server, name);
        let restarts = v
            .pointer("/status/replicaStatus")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().find(|r| r["name"] == victim.as_str()))
            .and_then(|r| r["restarts"].as_u64())
            .unwrap_or_default();
        Ok((restarts >= 1 && v.pointer("/status/readyReplicas") == Some(&json!(2))).then_some(()))
    })?;
    eprintln!(
        "status caught up {:?} after the server came back",
        caught_up.elapsed()
    );
    wait_host_ready(&server, &host)?;

    // Delete: containers, volumes and the tenant network go.
    scope.delete(&server, name);
    wait_for("everything of the instance to go", WAIT, || {
        Ok((scope.containers(name)?.is_empty()
            && scope.volumes()?.is_empty()
            && scope.networks()?.is_empty())
        .then_some(()))
    })?;
    Ok(())
}

/// Two agents on one engine are two hosts: replicas spread over them. A missing image is
/// reported as ImagePullFailed; an unhealthy Gateway is restarted (counted) and the instance is
/// Degraded.
#[test]
fn two_hosts_and_failing_replicas() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-two");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 2, "10m");
    let (name_a, name_b) = (unique("two-a"), unique("two-b"));
    let mut a = TestAgent::enroll(
        &server,
        port,
        &token,
        &["--name", &name_a, "--label", "e2e=two"],
    )?;
    let mut b = TestAgent::enroll(
        &server,
        port,
        &token,
        &["--name", &name_b, "--label", "e2e=two"],
    )?;
    let host_a = a.wait_enrolled()?;
    let host_b = b.wait_enrolled()?;
    cleanup.host(&host_a);
    cleanup.host(&host_b);
    assert_ne!(a.identity()?.cert_pem, b.identity()?.cert_pem);
    wait_host_ready(&server, &host_a)?;
    let host = wait_host_ready(&server, &host_b)?;
    assert_eq!(host.pointer("/metadata/labels/e2e"), Some(&json!("two")));

    scope.apply(&server, "base", &scope.base_manifest());
    let name = "spread";
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(name, &image, 4, &BTreeMap::new()),
    );
    let (status, containers) = wait_ready(&server, &scope, name, 4)?;
    let hosts: BTreeSet<&str> = containers.values().map(|c| c.host.as_str()).collect();
    assert_eq!(
        hosts,
        BTreeSet::from([host_a.as_str(), host_b.as_str()]),
        "replicas spread over both hosts"
    );
    for r in status["status"]["replicaStatus"].as_array().unwrap() {
        let c = &containers[r["name"].as_str().unwrap()];
        assert_eq!(r["host"].as_str(), Some(c.host.as_str()), "{r}");
    }

    // A missing image.
    let missing = "missing";
    scope.apply(
        &server,
        missing,
        &scope.instance_manifest(
            missing,
            "clusterclaw-test/does-not-exist:never",
            1,
            &BTreeMap::new(),
        ),
    );
    let failed = wait_for("ImagePullFailed", WAIT, || {
        let v = scope.instance(&server, missing);
        let r = v.pointer("/status/replicaStatus/0").cloned();
        Ok(r.filter(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.contains("ImagePullFailed"))
        }))
    })?;
    assert_eq!(failed["state"], "Failed", "{failed}");

    // An unhealthy Gateway: restarted by the agent, counted, and the instance is Degraded.
    let sick = "sick";
    scope.apply(
        &server,
        sick,
        &scope.instance_manifest(
            sick,
            &image,
            1,
            &BTreeMap::from([("STANDIN_UNHEALTHY", "1")]),
        ),
    );
    let degraded = wait_for("restarts and a Degraded instance", WAIT, || {
        let v = scope.instance(&server, sick);
        let restarts = v
            .pointer("/status/replicaStatus/0/restarts")
            .and_then(Value::as_u64)
            .unwrap_or_default();
        Ok((restarts >= 1 && v.pointer("/status/phase") == Some(&json!("Degraded"))).then_some(v))
    })?;
    eprintln!("degraded: {}", degraded["status"]);
    for instance in [name, missing, sick] {
        scope.delete(&server, instance);
    }
    wait_for("the test's containers to go", WAIT, || {
        Ok(
            (scope.containers(name)?.is_empty() && scope.containers(sick)?.is_empty())
                .then_some(()),
        )
    })?;
    Ok(())
}

/// One `WatchAssignments` call through the client `make` builds (inside a runtime, as tonic
/// needs).
fn watch_with(
    make: impl FnOnce() -> Result<
        clusterclaw_proto::agent::agent_service_client::AgentServiceClient<
            tonic::transport::Channel,
        >,
        clusterclaw_agent::client::ClientError,
    >,
) -> anyhow::Result<Result<(), tonic::Status>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut client = make()?;
        Ok(client
            .watch_assignments(WatchAssignmentsRequest {
                known_index: 0,
                wait_seconds: 1,
            })
            .await
            .map(drop))
    })
}

/// Refusals: bad join tokens end the agent with a clear error; an unreachable server at
/// enrollment is retried and said so; bad settings exit 64; no certificate, a certificate of
/// another CA and a revoked host's certificate are refused on the agent port.
#[test]
fn refusals() -> anyhow::Result<()> {
    let Some(_image) = require_docker()? else {
        return Ok(());
    };
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let expiring = join_token(&server, 5, "1m");
    let expiring_since = Instant::now();
    let cleanup = DockerCleanup::default();

    // Bad settings: every problem at once, exit 64.
    let mut bad = TestAgent::start(&["--report-interval", "soon", "--label", "no-equals"])?;
    let status = bad.wait_exit(Duration::from_secs(20))?;
    assert_eq!(status.code(), Some(64), "{}", bad.log());
    for needle in ["--report-interval", "--label no-equals", "not enrolled yet"] {
        assert!(bad.log().contains(needle), "{needle}: {}", bad.log());
    }

    // A wrong token.
    let mut wrong = TestAgent::enroll(&server, port, "ccj_not-a-real-token", &[])?;
    let status = wrong.wait_exit(Duration::from_secs(30))?;
    assert_eq!(status.code(), Some(1), "{}", wrong.log());
    assert!(wrong.log().contains("refused to enroll"), "{}", wrong.log());
    assert!(
        !wrong.log().contains("ccj_not-a-real-token"),
        "{}",
        wrong.log()
    );

    // A used-up token.
    let once = join_token(&server, 1, "10m");
    let mut first = TestAgent::enroll(&server, port, &once, &["--name", &unique("ref-a")])?;
    let host = first.wait_enrolled()?;
    cleanup.host(&host);
    let mut second = TestAgent::enroll(&server, port, &once, &[])?;
    let status = second.wait_exit(Duration::from_secs(30))?;
    assert_eq!(status.code(), Some(1), "{}", second.log());
    assert!(second.log().contains("used up"), "{}", second.log());

    // The server cannot be reached at enrollment: retries, and says so each time.
    let nowhere = free_port();
    let ca = server.endpoints().ca_cert.clone().unwrap();
    let mut waiting = TestAgent::start(&[
        "--server",
        &format!("https://127.0.0.1:{nowhere}"),
        "--ca-cert",
        ca.to_str().unwrap(),
        "--join-token",
        &expiring,
    ])?;
    wait_for("two retries to be logged", Duration::from_secs(30), || {
        Ok((waiting.log().matches("retrying").count() >= 2).then_some(()))
    })?;
    assert!(
        waiting.log().contains("cannot reach the control plane"),
        "{}",
        waiting.log()
    );
    assert!(
        waiting.child.as_mut().unwrap().try_wait()?.is_none(),
        "it keeps trying"
    );
    waiting.kill9();

    // mTLS: no certificate.
    let url = format!("https://127.0.0.1:{port}");
    let ca_pem = fs::read_to_string(&ca)?;
    let refused = watch_with(|| clusterclaw_agent::client::anonymous(&url, &ca_pem))?
        .expect_err("no certificate is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    // The enrolled host itself is let in.
    let identity = first.identity()?;
    watch_with(|| clusterclaw_agent::client::authenticated(&identity))?
        .map_err(|s| anyhow::anyhow!("the enrolled host is refused: {s:?}"))?;

    // A certificate from another cluster's CA.
    let other_port = free_port();
    let other = TestServer::start_on(&format!("127.0.0.1:{other_port}"), &[])?;
    let other_token = join_token(&other, 1, "10m");
    let mut stranger = TestAgent::enroll(
        &other,
        other_port,
        &other_token,
        &["--name", &unique("ref-x")],
    )?;
    let stranger_host = stranger.wait_enrolled()?;
    cleanup.host(&stranger_host);
    let mut foreign = stranger.identity()?;
    stranger.kill9();
    foreign.record.server = url.clone();
    foreign.ca_pem = ca_pem.clone();
    let refused = watch_with(|| clusterclaw_agent::client::authenticated(&foreign))?
        .expect_err("a certificate of another CA is refused");
    assert_ne!(refused.code(), tonic::Code::Ok, "{refused:?}");

    // A revoked (deleted) host.
    let r = server.http(
        "DELETE",
        &format!("/api/v1/hosts/{host}"),
        None,
        Some(server.admin_token()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let refused = watch_with(|| clusterclaw_agent::client::authenticated(&identity))?
        .expect_err("a revoked host is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    // The agent logs its removal, then records it in removed.json: wait for both.
    wait_for("the agent to stand down as removed", WAIT, || {
        Ok((first
            .log()
            .contains("the control plane has removed this host")
            && first.data_dir().join("removed.json").exists())
        .then_some(()))
    })?;

    // An expired token.
    let left = Duration::from_secs(62).saturating_sub(expiring_since.elapsed());
    std::thread::sleep(left);
    let mut late = TestAgent::enroll(&server, port, &expiring, &[])?;
    let status = late.wait_exit(Duration::from_secs(30))?;
    assert_eq!(status.code(), Some(1), "{}", late.log());
    assert!(late.log().contains("expired"), "{}", late.log());
    Ok(())
}
