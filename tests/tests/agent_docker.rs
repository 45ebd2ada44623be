//! The agent's runtime, reconcile executor and probes against the real Docker engine and the stand-in OpenClaw image.
//!
//! Every test uses its own host id (and so its own container, volume and network names) and a
//! guard that removes whatever carries that host id, even when the test fails.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clusterclaw_agent::drift::{self, DriftKind};
use clusterclaw_agent::model::{Assignment, ReplicaState, Resources};
use clusterclaw_agent::ports::PortRange;
use clusterclaw_agent::probe::{self, ProbeKind, ProbeOutcome, ProbeSettings, Prober};
use clusterclaw_agent::reconcile::{
    BackoffPolicy, Pass, Reconciler, ReconcilerSettings, ReplaceReason, Step,
};
use clusterclaw_agent::runtime::{
    ContainerRuntime, ContainerStatus, DockerRuntime, Labelled, Owner, RuntimeError, RuntimeKind,
    labels, spec,
};
use clusterclaw_tests::{docker_available, ensure_standin_image};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Removes every container, volume and network labelled with the host id, on drop.
struct Cleanup {
    host_id: String,
}

impl Cleanup {
    fn new(test: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        Cleanup {
            host_id: format!("test-{test}-{}-{nanos:x}", std::process::id()),
        }
    }

    fn filter(&self) -> String {
        format!("label={}={}", labels::HOST, self.host_id)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let filter = self.filter();
        for (list, remove) in [
            (
                vec!["ps", "-aq", "--filter", &filter],
                vec!["rm", "-f", "-v"],
            ),
            (
                vec!["volume", "ls", "-q", "--filter", &filter],
                vec!["volume", "rm", "-f"],
            ),
            (
                vec!["network", "ls", "-q", "--filter", &filter],
                vec!["network", "rm"],
            ),
        ] {
            let Ok(out) = Command::new("docker").args(&list).output() else {
                continue;
            };
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                let _ = Command::new("docker").args(&remove).args(&ids).output();
            }
        }
    }
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("run docker")?;
    ensure!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn inspect(kind: &str, id: &str) -> anyhow::Result<Value> {
    let text = docker(&[kind, "inspect", id])?;
    let mut all: Vec<Value> = serde_json::from_str(&text)?;
    all.pop().context("empty inspect output")
}

fn exists(kind: &str, id: &str) -> bool {
    Command::new("docker")
        .args([kind, "inspect", id])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// GET `path` on 127.0.0.1:`port`, returning status and JSON body.
async fn get_json(port: u16, path: &str) -> anyhow::Result<(u16, Value)> {
    let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let (status, body) = probe::parse_response(&raw).map_err(anyhow::Error::msg)?;
    Ok((status, serde_json::from_slice(&body)?))
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match f().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last_error = Some(err),
        }
        if Instant::now() >= deadline {
            bail!("timed out waiting for {what} (last error: {last_error:?})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn runtime() -> anyhow::Result<Arc<dyn ContainerRuntime>> {
    Ok(Arc::new(
        DockerRuntime::connect(RuntimeKind::Docker, None).await?,
    ))
}

fn settings(cleanup: &Cleanup, data: &std::path::Path, first_port: u16) -> ReconcilerSettings {
    ReconcilerSettings {
        ports: PortRange {
            first: first_port,
            step: 20,
            count: 10,
        },
        stop_grace: Duration::from_secs(5),
        // These tests look at what one pass did: it waits for all its work.
        pass_wait: Duration::from_secs(120),
        ..ReconcilerSettings::new(&cleanup.host_id, data)
    }
}

fn assignment(image: &str, replica: &str, tenant: &str) -> Assignment {
    Assignment {
        tenant: tenant.into(),
        project: "helpdesk".into(),
        instance: replica.rsplit_once('-').map_or(replica, |(i, _)| i).into(),
        replica: replica.into(),
        ordinal: 0,
        generation: 1,
        image: image.into(),
        env: BTreeMap::from([
            ("OPENCLAW_GATEWAY_TOKEN".into(), "token-1".into()),
            ("NODE_OPTIONS".into(), "--enable-source-maps".into()),
        ]),
        config_json: r#"{"gateway":{"bind":"lan"},"standin":{"readyDelayMs":300}}"#.into(),
        config_hash: "a1".repeat(32),
        resources: Resources {
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            pids: 128,
        },
        instance_uid: "uid-1".into(),
        config_revision: 0,
        content_hash: String::new(),
        termination_grace_seconds: 0,
        epoch: 0,
        stop_after_seconds: 0,
        import_transfer: String::new(),
        redact: Vec::new(),
    }
}

async fn pass(r: &Reconciler, desired: &[Assignment]) -> anyhow::Result<Pass> {
    let pass = r
        .reconcile(desired, &BTreeMap::new(), Instant::now())
        .await?;
    let failures: Vec<_> = pass.failures().collect();
    ensure!(failures.is_empty(), "steps failed: {failures:#?}");
    Ok(pass)
}

/// The last lines a container wrote (for a failure's message: why it stopped).
fn container_output(id: &str) -> String {
    match Command::new("docker")
        .args(["logs", "--timestamps", "--tail", "40", id])
        .output()
    {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("(docker logs failed: {e})"),
    }
}

fn the_container(
    pass_observed: &[clusterclaw_agent::runtime::ObservedContainer],
) -> anyhow::Result<String> {
    ensure!(
        pass_observed.len() == 1,
        "expected one container, found {pass_observed:?}"
    );
    Ok(pass_observed[0].id.clone())
}

#[tokio::test]
async fn a_replica_is_created_adopted_replaced_and_removed() -> anyhow::Result<()> {
    if !docker_available()? {
        return Ok(());
    }
    let image = ensure_standin_image()?;
    let cleanup = Cleanup::new("lifecycle");
    let data = tempfile::tempdir()?;
    let runtime = runtime().await?;
    let info = runtime.info().await?;
    assert_eq!(info.runtime, "docker");

    let settings = settings(&cleanup, data.path(), 29100);
    let r = Reconciler::new(runtime.clone(), settings.clone());
    let a = assignment(&image, "bot-0", "tenant-life");
    let key = a.key();

    // Create.
    pass(&r, std::slice::from_ref(&a)).await?;
    let observed = r.observe().await?;
    let id = the_container(&observed.containers)?;
    let c = &observed.containers[0];
    assert_eq!(c.status, ContainerStatus::Running);
    let port = c.host_port.context("published port")?;
    assert!(settings.ports.contains(port), "port {port}");

    // What Docker says about it.
    let json = inspect("container", &id)?;
    let label = |name: &str| json["Config"]["Labels"][name].as_str().map(str::to_owned);
    assert_eq!(label(labels::MANAGED).as_deref(), Some("true"));
    assert_eq!(label(labels::HOST), Some(cleanup.host_id.clone()));
    assert_eq!(label(labels::TENANT).as_deref(), Some("tenant-life"));
    assert_eq!(label(labels::PROJECT).as_deref(), Some("helpdesk"));
    assert_eq!(label(labels::INSTANCE).as_deref(), Some("bot"));
    assert_eq!(label(labels::REPLICA).as_deref(), Some("bot-0"));
    assert_eq!(label(labels::GENERATION).as_deref(), Some("1"));
    assert_eq!(label(labels::CONFIG_HASH), Some(a.config_hash.clone()));
    let hc = &json["HostConfig"];
    assert_eq!(hc["Memory"], 256 << 20);
    assert_eq!(hc["NanoCpus"], 500_000_000);
    assert_eq!(hc["PidsLimit"], 128);
    assert_eq!(hc["ReadonlyRootfs"], true);
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    assert_eq!(
        hc["SecurityOpt"],
        serde_json::json!(["no-new-privileges:true"])
    );
    assert!(
        hc["Tmpfs"]["/tmp"]
            .as_str()
            .is_some_and(|o| o.contains("mode=1777")),
        "{}",
        hc["Tmpfs"]
    );
    assert_eq!(hc["RestartPolicy"]["Name"], "no");
    assert_eq!(
        hc["NetworkMode"],
        spec::network_name(&Owner::from(&cleanup.host_id), "tenant-life")
    );
    let binding = &hc["PortBindings"]["18789/tcp"][0];
    assert_eq!(binding["HostIp"], "127.0.0.1");
    assert_eq!(binding["HostPort"], port.to_string());
    assert_eq!(json["Config"]["User"], "1000:1000");
    let mounts = json["Mounts"].as_array().context("mounts")?;
    let state_mount = mounts
        .iter()
        .find(|m| m["Destination"] == spec::STATE_DIR)
        .context("state volume mount")?;
    assert_eq!(state_mount["Type"], "volume");
    assert_eq!(
        state_mount["Name"],
        spec::volume_name(&Owner::from(&cleanup.host_id), &key)
    );
    let config_mount = mounts
        .iter()
        .find(|m| m["Destination"] == spec::CONFIG_PATH)
        .context("config bind mount")?;
    assert_eq!(config_mount["Type"], "bind");
    assert_eq!(config_mount["RW"], false);

    // The Gateway answers through the published port, and saw what it should.
    let ready = wait_for("/readyz", Duration::from_secs(15), || async {
        let outcome = probe::check(
            ProbeKind::Readiness,
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Duration::from_secs(2),
        )
        .await;
        Ok((outcome == ProbeOutcome::Success).then_some(()))
    })
    .await;
    ready?;
    let (status, standin) = get_json(port, "/standin/info").await?;
    assert_eq!(status, 200);
    assert_eq!(standin["boots"], 1, "{standin}");
    assert_eq!(standin["uid"], "1000");
    assert_eq!(standin["rootfs_writable"], false);
    assert_eq!(standin["tmp_writable"], true);
    assert_eq!(standin["tmp_mode"], "1777");
    assert_eq!(standin["config"]["gateway"]["bind"], "lan");
    let env = &standin["env"];
    assert_eq!(env["OPENCLAW_CONFIG_PATH"], spec::CONFIG_PATH);
    assert_eq!(env["OPENCLAW_CONFIG_READONLY"], "1");
    assert_eq!(
        env["NODE_OPTIONS"],
        "--enable-source-maps --max-old-space-size=192"
    );

    // Probes and status report.
    let mut prober = Prober::new(ProbeSettings {
        initial_delay: Duration::ZERO,
        ..ProbeSettings::default()
    });
    prober.set_targets(
        &r.probe_targets(std::slice::from_ref(&a), &observed),
        Instant::now(),
    );
    assert_eq!(prober.probe_due(Instant::now()).await, 1);
    let statuses = r.statuses(
        std::slice::from_ref(&a),
        &observed,
        &prober.statuses(),
        Instant::now(),
    );
    assert_eq!(statuses[0].state, ReplicaState::Ready, "{statuses:?}");
    assert_eq!(statuses[0].host_port, Some(port));
    assert_eq!(statuses[0].container_id.as_deref(), Some(id.as_str()));

    let stats = runtime.container_stats(&id).await?;
    assert_eq!(stats.memory_limit_bytes, 256 << 20);
    assert!(stats.memory_bytes > 0, "{stats:?}");

    // A restarted agent (fresh reconciler) adopts the running container untouched.
    let restarted = Reconciler::new(runtime.clone(), settings.clone());
    let adopted = pass(&restarted, std::slice::from_ref(&a)).await?;
    assert!(adopted.outcomes.is_empty(), "{:?}", adopted.outcomes);
    let observed = restarted.observe().await?;
    assert_eq!(the_container(&observed.containers)?, id);
    assert_eq!(observed.containers[0].started_at, c.started_at);

    // A config change replaces the container; the state volume and the port stay.
    let mut b = a.clone();
    b.generation = 2;
    b.config_hash = "b2".repeat(32);
    b.config_json = r#"{"gateway":{"bind":"lan","mode":"changed"}}"#.into();
    let replaced = pass(&restarted, std::slice::from_ref(&b)).await?;
    assert!(
        matches!(
            replaced.outcomes.as_slice(),
            [o] if matches!(&o.step, Step::Replace { reason: ReplaceReason::ConfigChanged { .. }, .. })
        ),
        "{:?}",
        replaced.outcomes
    );
    let observed = restarted.observe().await?;
    let new_id = the_container(&observed.containers)?;
    assert_ne!(new_id, id);
    assert!(!exists("container", &id), "old container still there");
    assert_eq!(observed.containers[0].host_port, Some(port));
    assert_eq!(observed.containers[0].generation(), Some(2));
    let (_, standin) = wait_for("the new container", Duration::from_secs(15), || async {
        Ok(get_json(port, "/standin/info").await.ok())
    })
    .await?;
    assert_eq!(standin["boots"], 2, "state volume lost: {standin}");
    assert_eq!(standin["config"]["gateway"]["mode"], "changed");

    // Unassigned: container, volume, network and config go.
    let volume = spec::volume_name(&Owner::from(&cleanup.host_id), &key);
    let network = spec::network_name(&Owner::from(&cleanup.host_id), "tenant-life");
    assert!(exists("volume", &volume) && exists("network", &network));
    pass(&restarted, &[]).await?;
    assert!(restarted.observe().await?.containers.is_empty());
    assert!(!exists("container", &new_id));
    assert!(!exists("volume", &volume), "volume {volume} left behind");
    assert!(
        !exists("network", &network),
        "network {network} left behind"
    );
    assert!(!restarted.config_file(&key).exists());
    Ok(())
}

#[tokio::test]
async fn crashing_and_unhealthy_replicas_are_restarted_with_back_off() -> anyhow::Result<()> {
    if !docker_available()? {
        return Ok(());
    }
    let image = ensure_standin_image()?;
    let cleanup = Cleanup::new("restarts");
    let data = tempfile::tempdir()?;
    let runtime = runtime().await?;
    let mut settings = settings(&cleanup, data.path(), 29300);
    settings.backoff = BackoffPolicy {
        initial: Duration::from_secs(5),
        max: Duration::from_secs(10),
        reset_after: Duration::from_secs(600),
    };
    let r = Reconciler::new(runtime.clone(), settings);

    let mut crashing = assignment(&image, "crash-0", "tenant-restarts");
    crashing
        .env
        .insert("STANDIN_CRASH_AFTER_MS".into(), "300".into());
    let mut sick = assignment(&image, "sick-0", "tenant-restarts");
    sick.env.insert("STANDIN_UNHEALTHY".into(), "1".into());
    let desired = [crashing.clone(), sick.clone()];
    pass(&r, &desired).await?;

    // The crashing one exits; the next pass starts the same container again, once.
    let container_of = |key| {
        let r = &r;
        async move {
            let observed = r.observe().await?;
            anyhow::Ok(
                observed
                    .containers
                    .into_iter()
                    .find(|c| c.replica_key().as_ref() == Some(&key)),
            )
        }
    };
    let crashed = wait_for("the crash", Duration::from_secs(15), || async {
        Ok(container_of(crashing.key())
            .await?
            .filter(|c| matches!(c.status, ContainerStatus::Exited { code: 1, .. })))
    })
    .await?;
    let pass1 = pass(&r, &desired).await?;
    assert!(
        pass1.outcomes.iter().any(|o| matches!(&o.step, Step::Restart { container_id, running: false, .. } if *container_id == crashed.id)),
        "{:?}",
        pass1.outcomes
    );
    assert_eq!(r.book().get(&crashing.key()).restarts, 1);
    let again = wait_for("the second crash", Duration::from_secs(15), || async {
        Ok(container_of(crashing.key())
            .await?
            .filter(|c| !c.status.is_running() && c.started_at != crashed.started_at))
    })
    .await?;
    assert_eq!(again.id, crashed.id, "restarted, not recreated");
    // Within the back-off: wait, and say so.
    let held = pass(&r, &desired).await?;
    assert!(
        held.outcomes
            .iter()
            .any(|o| matches!(o.step, Step::Wait { .. })),
        "{:?}",
        held.outcomes
    );
    let statuses = r.statuses(&desired, &held.observed, &BTreeMap::new(), Instant::now());
    assert_eq!(
        statuses[0].state,
        ReplicaState::CrashLoopBackOff,
        "{statuses:?}"
    );
    assert_eq!(statuses[0].restarts, 1);

    // The unhealthy one: liveness fails on its JSON body, and it is restarted in place.
    let observed = r.observe().await?;
    let mut prober = Prober::new(ProbeSettings {
        interval: Duration::ZERO,
        timeout: Duration::from_secs(2),
        failure_threshold: 2,
        initial_delay: Duration::ZERO,
    });
    let targets = r.probe_targets(std::slice::from_ref(&sick), &observed);
    assert_eq!(targets.len(), 1);
    let before = targets[0].clone();
    prober.set_targets(&targets, Instant::now());
    for _ in 0..2 {
        prober.probe_due(Instant::now()).await;
    }
    let probes = prober.statuses();
    assert!(
        matches!(&probes[&sick.key()].liveness, probe::Liveness::Failed { message } if message.contains("\"ok\": false")),
        "{probes:?}"
    );
    let restart = r
        .reconcile(std::slice::from_ref(&sick), &probes, Instant::now())
        .await?;
    assert!(
        restart
            .outcomes
            .iter()
            .any(|o| o.result.is_ok() && matches!(&o.step, Step::Restart { running: true, .. })),
        "{:?}",
        restart.outcomes
    );
    let after = container_of(sick.key()).await?.context("sick container")?;
    assert_eq!(after.id, before.container_id);
    assert_ne!(after.started_at, before.started_at);
    Ok(())
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_is_reported() -> anyhow::Result<()> {
    if !docker_available()? {
        return Ok(());
    }
    let cleanup = Cleanup::new("pull");
    let data = tempfile::tempdir()?;
    let runtime = runtime().await?;

    // Nothing listens on port 1: the pull fails at once.
    let image = "127.0.0.1:1/clusterclaw-test/missing:1";
    let err = runtime.ensure_image(image).await.unwrap_err();
    assert!(
        matches!(&err, RuntimeError::ImagePull { image: i, .. } if i == image),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("ImagePullFailed: "), "{err}");

    let r = Reconciler::new(runtime, settings(&cleanup, data.path(), 29500));
    let a = assignment(image, "bot-0", "tenant-pull");
    let pass = r
        .reconcile(std::slice::from_ref(&a), &BTreeMap::new(), Instant::now())
        .await?;
    assert_eq!(pass.failures().count(), 1);
    let status = &r.statuses(
        std::slice::from_ref(&a),
        &pass.observed,
        &BTreeMap::new(),
        Instant::now(),
    )[0];
    assert_eq!(status.state, ReplicaState::Failed);
    assert!(
        status.message.starts_with("ImagePullFailed: "),
        "{status:?}"
    );
    Ok(())
}

#[tokio::test]
async fn containers_of_other_hosts_and_unmanaged_ones_are_left_alone() -> anyhow::Result<()> {
    if !docker_available()? {
        return Ok(());
    }
    let image = ensure_standin_image()?;
    let ours = Cleanup::new("ours");
    let theirs = Cleanup::new("theirs");
    let data = tempfile::tempdir()?;
    let runtime = runtime().await?;

    // Another host's replica, made by its own reconciler.
    let other = Reconciler::new(runtime.clone(), settings(&theirs, data.path(), 29700));
    pass(&other, &[assignment(&image, "bot-0", "tenant-shared")]).await?;
    let other_id = the_container(&other.observe().await?.containers)?;
    // A container that only looks like ours: right host label, no managed label.
    let unmanaged_name = format!("clusterclaw-unmanaged-{}", ours.host_id);
    let unmanaged = docker(&[
        "create",
        "--name",
        &unmanaged_name,
        "--label",
        &format!("{}={}", labels::HOST, ours.host_id),
        "--label",
        &format!("{}=bot-0", labels::REPLICA),
        &image,
    ])?;

    let r = Reconciler::new(runtime.clone(), settings(&ours, data.path(), 29900));
    let pass = pass(&r, &[]).await?;
    assert!(pass.outcomes.is_empty(), "{:?}", pass.outcomes);
    assert!(exists("container", &other_id));
    assert!(exists("container", &unmanaged));
    let ids: BTreeSet<String> = runtime
        .list_managed_containers(&ours.host_id)
        .await?
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert!(ids.is_empty(), "{ids:?}");
    Ok(())
}

#[tokio::test]
async fn a_hand_edited_config_file_is_rewritten_and_the_container_replaced() -> anyhow::Result<()> {
    if !docker_available()? {
        return Ok(());
    }
    let image = ensure_standin_image()?;
    let cleanup = Cleanup::new("drift");
    let data = tempfile::tempdir()?;
    let runtime = runtime().await?;
    let r = Reconciler::new(runtime.clone(), settings(&cleanup, data.path(), 30100));
    // Its NODE_OPTIONS gets the heap flag appended in the container: still in sync.
    let mut a = assignment(&image, "bot-0", "tenant-drift");
    a.config_revision = 3;
    a.content_hash = drift::content_hash(a.config_json.as_bytes(), &a.env);
    let desired = std::slice::from_ref(&a);
    pass(&r, desired).await?;
    let observed = r.observe().await?;
    let old_id = the_container(&observed.containers)?;
    let port = observed.containers[0].host_port.context("published port")?;

    // Measured in sync: nothing to do, and the status says so.
    let in_sync = pass(&r, desired).await?;
    assert!(in_sync.outcomes.is_empty(), "{:?}", in_sync.outcomes);
    let measured = in_sync
        .observed
        .content
        .get(&old_id)
        .context("the running container was measured")?;
    assert_eq!(
        measured.content_hash.as_deref(),
        Some(a.content_hash.as_str())
    );
    let status = &r.statuses(desired, &in_sync.observed, &BTreeMap::new(), Instant::now())[0];
    assert_eq!(status.observed_content_hash, a.content_hash);
    assert_eq!(status.config_revision, 3);

    // Someone edits the config file on the host.
    let config = r.config_file(&a.key());
    std::fs::write(&config, r#"{"gateway":{"bind":"loopback"}}"#)?;
    let repaired = pass(&r, desired).await?;
    assert!(
        matches!(
            repaired.outcomes.as_slice(),
            [o] if matches!(&o.step, Step::RepairDrift { drift, .. } if drift.kind == DriftKind::ConfigFile)
        ),
        "{:?}\nthe container's output:\n{}",
        repaired.outcomes,
        container_output(&old_id)
    );
    assert_eq!(std::fs::read(&config)?, a.config_json.as_bytes());

    let observed = r.observe().await?;
    let new_id = the_container(&observed.containers)?;
    assert_ne!(new_id, old_id);
    assert!(!exists("container", &old_id), "old container still there");
    assert_eq!(observed.containers[0].status, ContainerStatus::Running);
    assert_eq!(observed.containers[0].host_port, Some(port));
    let json = inspect("container", &new_id)?;
    let label = |name: &str| json["Config"]["Labels"][name].as_str().map(str::to_owned);
    assert_eq!(label(labels::CONFIG_REVISION).as_deref(), Some("3"));
    assert_eq!(label(labels::CONTENT_HASH), Some(a.content_hash.clone()));

    let events = clusterclaw_agent::events::notable(r.events().pending());
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].reason, "ConfigDriftRepaired");
    assert_eq!(events[0].replica, "bot-0");
    assert!(
        events[0]
            .message
            .contains("config file on the host did not match revision 3"),
        "{events:?}"
    );
    assert!(!events[0].message.contains("loopback"), "{events:?}");

    // The new container reads the assigned config, and the next pass finds it in sync.
    let (_, standin) = wait_for("the new container", Duration::from_secs(15), || async {
        Ok(get_json(port, "/standin/info").await.ok())
    })
    .await?;
    assert_eq!(standin["config"]["gateway"]["bind"], "lan", "{standin}");
    let after = pass(&r, desired).await?;
    assert!(after.outcomes.is_empty(), "{:?}", after.outcomes);
    assert_eq!(
        after
            .observed
            .content
            .get(&new_id)
            .and_then(|m| m.content_hash.clone()),
        Some(a.content_hash.clone())
    );
    assert_eq!(
        clusterclaw_agent::events::notable(r.events().pending()).len(),
        1
    );
    Ok(())
}

/// A tar of `.openclaw/marker` holding `text`, built with the host's `tar`.
fn marker_tar(dir: &std::path::Path, text: &str) -> anyhow::Result<std::path::PathBuf> {
    let src = dir.join(format!("src-{text}"));
    std::fs::create_dir_all(src.join(".openclaw"))?;
    std::fs::write(src.join(".openclaw/marker"), text)?;
    let tar = dir.join(format!("{text}.tar"));
    let out = Command::new("tar")
        .args(["--owner=1000", "--group=1000", "--numeric-owner", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(src.join(".openclaw"))
        .arg(".")
        .output()?;
    ensure!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(tar)
}

/// The marker inside a downloaded archive of the state directory, and its owner (`uid/gid`).
fn read_marker(tar: &std::path::Path) -> anyhow::Result<(String, String)> {
    let mut text = None;
    for name in ["./marker", "marker", ".openclaw/marker"] {
        let o = Command::new("tar")
            .arg("-xOf")
            .arg(tar)
            .arg(name)
            .output()?;
        if o.status.success() {
            text = Some(String::from_utf8_lossy(&o.stdout).into_owned());
            break;
        }
    }
    let text = text.context("no marker in the archive")?;
    let list = Command::new("tar")
        .args(["--numeric-owner", "-tvf"])
        .arg(tar)
        .output()?;
    let listing = String::from_utf8_lossy(&list.stdout).into_owned();
    let owner = listing
        .lines()
        .find(|l| l.contains("marker"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_owned();
    Ok((text, owner))
}

#[tokio::test]
async fn state_round_trips_through_a_stopped_container_and_a_downgrade_restores_it()
-> anyhow::Result<()> {
    if !docker_available()? {
        return Ok(());
    }
    let image = ensure_standin_image()?;
    // Two versions of the same image.
    let repo = "clusterclaw-test/openclaw-standin-snapshots";
    let (v1, v2) = (format!("{repo}:2026.1.1"), format!("{repo}:2026.2.1"));
    docker(&["tag", &image, &v1])?;
    docker(&["tag", &image, &v2])?;
    let cleanup = Cleanup::new("snapshots");
    let data = tempfile::tempdir()?;
    let scratch = tempfile::tempdir()?;
    let runtime = runtime().await?;
    let r = Reconciler::new(runtime.clone(), settings(&cleanup, data.path(), 29900));
    let a = assignment(&v1, "bot-0", "tenant-snap");

    pass(&r, std::slice::from_ref(&a)).await?;
    let id = the_container(&r.observe().await?.containers)?;
    // init: true
    assert_eq!(inspect("container", &id)?["HostConfig"]["Init"], true);
    // v1's state, put into the running container's volume.
    runtime
        .upload_archive(&id, spec::STATE_DIR, &marker_tar(scratch.path(), "v1")?)
        .await?;

    // Upgrade: a snapshot of v1's state is taken from the stopped container.
    let b = a.clone();
    let b = Assignment {
        image: v2.clone(),
        ..b
    };
    pass(&r, std::slice::from_ref(&b)).await?;
    let observed = r.observe().await?;
    let id2 = the_container(&observed.containers)?;
    assert_eq!(observed.containers[0].image, v2);
    let statuses = r.statuses(
        std::slice::from_ref(&b),
        &observed,
        &BTreeMap::new(),
        Instant::now(),
    );
    let snaps = &statuses[0].snapshots;
    ensure!(snaps.len() == 1, "snapshots: {snaps:?}");
    assert_eq!(snaps[0].image, v1);
    assert!(snaps[0].bytes > 0);
    // The upgrade keeps the volume as it is.
    let now = scratch.path().join("now.tar");
    runtime
        .download_archive(&id2, &format!("{}/.", spec::STATE_DIR), &now)
        .await?;
    assert_eq!(read_marker(&now)?.0, "v1");

    // v2 changes the state; a downgrade brings v1's back, owned by the container user.
    runtime
        .upload_archive(&id2, spec::STATE_DIR, &marker_tar(scratch.path(), "v2")?)
        .await?;
    pass(&r, std::slice::from_ref(&a)).await?;
    let observed = r.observe().await?;
    let id3 = the_container(&observed.containers)?;
    assert_eq!(observed.containers[0].image, v1);
    assert_eq!(observed.containers[0].status, ContainerStatus::Running);
    runtime.stop_container(&id3, Duration::from_secs(5)).await?;
    let restored = scratch.path().join("restored.tar");
    runtime
        .download_archive(&id3, &format!("{}/.", spec::STATE_DIR), &restored)
        .await?;
    let (text, owner) = read_marker(&restored)?;
    assert_eq!(text, "v1");
    assert_eq!(owner, "1000/1000");
    let statuses = r.statuses(
        std::slice::from_ref(&a),
        &observed,
        &BTreeMap::new(),
        Instant::now(),
    );
    let images: Vec<&str> = statuses[0]
        .snapshots
        .iter()
        .map(|s| s.image.as_str())
        .collect();
    assert_eq!(images, vec![v2.as_str(), v1.as_str()]);
    let reasons: Vec<String> = clusterclaw_agent::events::notable(r.events().pending())
        .into_iter()
        .map(|e| e.reason)
        .collect();
    assert_eq!(
        reasons,
        vec!["SnapshotTaken", "SnapshotTaken", "SnapshotRestored"]
    );
    let _ = docker(&["rmi", &v1, &v2]);
    Ok(())
}
