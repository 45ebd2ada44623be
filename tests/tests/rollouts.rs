//! End to end: safe rollouts with the real `clusterclaw` server and `clusterclaw-agent` binaries,
//! real mutual TLS, real SQLite, real Docker and the stand-in OpenClaw image with its "version"
//! tags (`clusterclaw_tests::standin`): rolling and canary updates with health gates and
//! automatic rollback, state snapshots across versions, fleet-wide waves, parallel stops with a
//! grace period, and state volumes that outlive a scale-down.
//!
//! Every test runs its own server and agent, uses its own tenant and host names, and holds a
//! guard (dropped last) that removes every container, volume and network carrying those names'
//! labels, even when the test fails. What the tests look at is what a user sees: the
//! instance's status through the API (`status.rollout`, `status.readyReplicas`, per replica
//! `targetRevision` and `configRevision`), the CLI's output and exit codes, and the containers
//! and volumes the engine holds. While an update runs, a sampler looks at the instance and the
//! engine about every 100 ms.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::{CliOutput, TestServer};
use clusterclaw_tests::standin::StandinVersions;
use clusterclaw_tests::{docker_available, ensure_standin_versions};
use serde_json::{Value, json};

/// How long an update may take in these tests before it counts as stuck.
const ROLL_WAIT: Duration = Duration::from_secs(75);
/// How often the sampler looks.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

// ------------------------------------------------------------------------------ cluster

/// A server, one enrolled agent (fast intervals) on the local engine, a tenant with a project,
/// and the stand-in images. Fields drop in order: the agent first (so that nothing is recreated),
/// the guard last.
struct Cluster {
    _agent: TestAgent,
    server: TestServer,
    host: String,
    scope: Scope,
    images: StandinVersions,
    _cleanup: DockerCleanup,
}

fn cluster(prefix: &str) -> anyhow::Result<Option<Cluster>> {
    if !docker_available()? {
        return Ok(None);
    }
    let images = ensure_standin_versions()?;
    let scope = Scope::new(prefix);
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &unique(prefix)])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;
    scope.apply(&server, "base", &scope.base_manifest());
    Ok(Some(Cluster {
        _agent: agent,
        server,
        host,
        scope,
        images,
        _cleanup: cleanup,
    }))
}

impl Cluster {
    /// An `OpenClawInstance` of this cluster's tenant and project; `extra` is merged into its
    /// spec.
    fn instance_doc(&self, name: &str, image: &str, replicas: u32, extra: Value) -> Value {
        let mut spec = json!({
            "image": image,
            "replicas": replicas,
            "resources": {"cpu": "100m", "memory": "64Mi"},
        });
        if let (Some(spec), Value::Object(extra)) = (spec.as_object_mut(), extra) {
            spec.extend(extra);
        }
        json!({
            "apiVersion": "clusterclaw.io/v1",
            "kind": "OpenClawInstance",
            "metadata": {"name": name, "tenant": self.scope.tenant, "project": self.scope.project},
            "spec": spec,
        })
    }

    /// `clusterclaw apply -f` of the documents (a list document; JSON is YAML too).
    fn apply(&self, docs: &[Value]) {
        let file = self.server.write_file(
            &format!("{}-{}.yaml", self.scope.tenant, unique("docs")),
            &json!({ "items": docs }).to_string(),
        );
        self.server
            .cli(&["apply", "-f", file.to_str().expect("utf-8 path")])
            .ok();
    }

    /// `clusterclaw rollout VERB instance NAME -t T -p P [extra]`.
    fn rollout(&self, verb: &str, name: &str, extra: &[&str]) -> CliOutput {
        let mut args = vec![
            "rollout",
            verb,
            "instance",
            name,
            "-t",
            &self.scope.tenant,
            "-p",
            &self.scope.project,
        ];
        args.extend(extra);
        let out = self.server.cli(&args);
        eprintln!(
            "$ clusterclaw {}\n{}{}(exit {})",
            args.join(" "),
            out.stdout,
            out.stderr,
            out.code
        );
        out
    }

    /// `clusterclaw rollout status instance NAME -w`: waits for the update to end; fails the
    /// test when it is still waiting after [`ROLL_WAIT`].
    fn rollout_status_wait(&self, name: &str) -> CliOutput {
        let args = [
            "rollout",
            "status",
            "instance",
            name,
            "-t",
            &self.scope.tenant,
            "-p",
            &self.scope.project,
            "-w",
        ];
        let out = self
            .server
            .cli_within(&args, ROLL_WAIT)
            .unwrap_or_else(|| panic!("`rollout status -w` still waited after {ROLL_WAIT:?}"));
        eprintln!(
            "$ clusterclaw {}\n{}{}(exit {})",
            args.join(" "),
            out.stdout,
            out.stderr,
            out.code
        );
        out
    }

    /// `clusterclaw describe instance NAME`.
    fn describe(&self, name: &str) -> String {
        let out = self
            .server
            .cli(&[
                "describe",
                "instance",
                name,
                "-t",
                &self.scope.tenant,
                "-p",
                &self.scope.project,
            ])
            .ok();
        eprintln!("$ clusterclaw describe instance {name}\n{}", out.stdout);
        out.stdout
    }

    /// The instance as the API shows it (an error, not a panic, when it cannot be read).
    fn look(&self, name: &str) -> anyhow::Result<View> {
        let r = self.server.http(
            "GET",
            &self.scope.instance_path(name),
            None,
            Some(self.server.admin_token()),
        );
        ensure!(
            r.status == 200,
            "GET instance {name}: {} {}",
            r.status,
            r.body
        );
        Ok(View::of(serde_json::from_str(&r.body)?))
    }

    /// Waits until every replica has a target revision and they all agree; that revision.
    fn settled_revision(&self, name: &str, replicas: usize) -> anyhow::Result<u64> {
        wait_for(&format!("{name}'s replicas on one revision"), WAIT, || {
            let v = self.look(name)?;
            Ok(v.uniform_revision(replicas))
        })
    }

    /// Waits until `status.rollout.revision` is above `old`: the server took the change.
    fn new_revision(&self, name: &str, old: u64) -> anyhow::Result<u64> {
        wait_for(
            &format!("{name}'s rollout of a revision after {old}"),
            WAIT,
            || Ok(self.look(name)?.revision.filter(|r| *r > old)),
        )
    }

    /// Waits until the update has ended with `phase` and all `replicas` replicas are Ready,
    /// with their running containers, on `revision` (target and what runs).
    fn wait_final(
        &self,
        name: &str,
        phase: &str,
        replicas: usize,
        revision: u64,
    ) -> anyhow::Result<(View, BTreeMap<String, Container>)> {
        wait_for(
            &format!("{name}: {phase} with {replicas} Ready on revision {revision}"),
            ROLL_WAIT,
            || {
                let v = self.look(name)?;
                if v.phase.as_deref() != Some(phase)
                    || v.ready != replicas as u64
                    || v.uniform_revision(replicas) != Some(revision)
                    || v.replicas.values().any(|r| r.state != "Ready")
                {
                    return Ok(None);
                }
                let containers = self.scope.containers(name)?;
                let matches = containers.len() == replicas
                    && containers.iter().all(|(replica, c)| {
                        c.running
                            && v.replicas.get(replica).and_then(|r| r.container.as_deref())
                                == Some(c.id.as_str())
                    });
                Ok(matches.then_some((v, containers)))
            },
        )
    }

    /// Runs `f` while a sampler looks at `instances` (API and engine) every ~100 ms.
    fn sampled<T>(
        &self,
        instances: &[&str],
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, Samples)> {
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut samples = Samples::default();
                while !stop.load(Ordering::Relaxed) {
                    let took = Instant::now();
                    samples.take(self, instances);
                    std::thread::sleep(SAMPLE_EVERY.saturating_sub(took.elapsed()));
                }
                samples.take(self, instances);
                samples
            });
            let result = f();
            stop.store(true, Ordering::Relaxed);
            let samples = sampler
                .join()
                .map_err(|_| anyhow::anyhow!("the sampler panicked"))?;
            eprintln!(
                "{} samples over {:?}",
                samples.count,
                samples.started.map(|s| s.elapsed())
            );
            Ok((result?, samples))
        })
    }
}

/// One replica as `status.replicaStatus[]` shows it.
#[derive(Clone, Debug, Default)]
struct ReplicaView {
    state: String,
    /// `targetRevision`: what the rollout wants it to run.
    target: Option<u64>,
    /// `configRevision`: what its container runs.
    running: Option<u64>,
    container: Option<String>,
}

/// What the API shows of an instance.
#[derive(Clone, Debug, Default)]
struct View {
    ready: u64,
    updated: Option<u64>,
    phase: Option<String>,
    revision: Option<u64>,
    held_by: Option<String>,
    replicas: BTreeMap<String, ReplicaView>,
    raw: Value,
}

impl View {
    fn of(v: Value) -> View {
        let u = |p: &str| v.pointer(p).and_then(Value::as_u64);
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
        let replicas = v
            .pointer("/status/replicaStatus")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|r| {
                        Some((
                            r["name"].as_str()?.to_owned(),
                            ReplicaView {
                                state: r["state"].as_str().unwrap_or_default().to_owned(),
                                target: r["targetRevision"].as_u64(),
                                running: r["configRevision"].as_u64(),
                                container: r["containerId"].as_str().map(str::to_owned),
                            },
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        View {
            ready: u("/status/readyReplicas").unwrap_or_default(),
            updated: u("/status/updatedReplicas"),
            phase: s("/status/rollout/phase"),
            revision: u("/status/rollout/revision"),
            held_by: s("/status/rollout/heldBy"),
            replicas,
            raw: v,
        }
    }

    /// The revision every one of `n` replicas targets and runs, when they all agree.
    fn uniform_revision(&self, n: usize) -> Option<u64> {
        if self.replicas.len() != n {
            return None;
        }
        let revisions: BTreeSet<Option<u64>> = self
            .replicas
            .values()
            .flat_map(|r| [r.target, r.running])
            .collect();
        match revisions.into_iter().collect::<Vec<_>>()[..] {
            [Some(r)] => Some(r),
            _ => None,
        }
    }

    /// Replicas whose target is `revision`.
    fn targeting(&self, revision: u64) -> Vec<String> {
        self.replicas
            .iter()
            .filter(|(_, r)| r.target == Some(revision))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// What the sampler saw, per instance and per `instance/replica`.
#[derive(Default, Debug)]
struct Samples {
    count: usize,
    started: Option<Instant>,
    /// The lowest `status.readyReplicas` seen, per instance.
    min_ready: BTreeMap<String, u64>,
    /// Every container (by id) the engine held, per `instance/replica`.
    containers: BTreeMap<String, BTreeSet<String>>,
    /// Every `targetRevision` the API showed, per `instance/replica`.
    targets: BTreeMap<String, BTreeSet<u64>>,
    /// Every `configRevision` (what runs) the API showed, per `instance/replica`.
    running: BTreeMap<String, BTreeSet<u64>>,
    /// Every rollout phase the API showed, per instance, in order (repeats dropped).
    phases: BTreeMap<String, Vec<String>>,
}

impl Samples {
    fn take(&mut self, c: &Cluster, instances: &[&str]) {
        self.started.get_or_insert_with(Instant::now);
        self.count += 1;
        for name in instances {
            let Ok(v) = c.look(name) else { continue };
            let min = self.min_ready.entry(name.to_string()).or_insert(v.ready);
            *min = (*min).min(v.ready);
            if let Some(phase) = &v.phase {
                let seen = self.phases.entry(name.to_string()).or_default();
                if seen.last() != Some(phase) {
                    seen.push(phase.clone());
                }
            }
            for (replica, r) in &v.replicas {
                let key = format!("{name}/{replica}");
                if let Some(t) = r.target {
                    self.targets.entry(key.clone()).or_default().insert(t);
                }
                if let Some(t) = r.running {
                    self.running.entry(key).or_default().insert(t);
                }
            }
        }
        let Ok(out) = docker(&[
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &format!("label=io.clusterclaw.tenant={}", c.scope.tenant),
            "--format",
            "{{.ID}}\t{{.Label \"io.clusterclaw.instance\"}}\t{{.Label \"io.clusterclaw.replica\"}}",
        ]) else {
            return;
        };
        for line in out.lines() {
            let mut parts = line.split('\t');
            let (Some(id), Some(instance), Some(replica)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if instances.contains(&instance) {
                self.containers
                    .entry(format!("{instance}/{replica}"))
                    .or_default()
                    .insert(id.to_owned());
            }
        }
    }

    /// The replicas of `instance` that ever had more than one container.
    fn replaced(&self, instance: &str) -> Vec<String> {
        let prefix = format!("{instance}/");
        self.containers
            .iter()
            .filter(|(k, ids)| k.starts_with(&prefix) && ids.len() > 1)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The replicas of `instance` that were ever told to run something other than `revision`.
    fn retargeted(&self, instance: &str, revision: u64) -> Vec<String> {
        let prefix = format!("{instance}/");
        self.targets
            .iter()
            .filter(|(k, revs)| k.starts_with(&prefix) && revs.iter().any(|r| *r != revision))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

fn rolling(max_unavailable: Value, min_ready_seconds: u64, deadline: &str) -> Value {
    json!({"updateStrategy": {
        "type": "Rolling",
        "maxUnavailable": max_unavailable,
        "minReadySeconds": min_ready_seconds,
        "progressDeadline": deadline,
    }})
}

fn with_env(mut extra: Value, env: &[(&str, &str)]) -> Value {
    let vars: serde_json::Map<String, Value> =
        env.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    extra["env"] = Value::Object(vars);
    extra
}

/// The stand-in's `/standin/info` of every replica, by replica name.
fn infos(containers: &BTreeMap<String, Container>) -> anyhow::Result<BTreeMap<String, Value>> {
    containers
        .iter()
        .map(|(r, c)| {
            let port = c.port.with_context(|| format!("{r} publishes no port"))?;
            Ok((r.clone(), gateway_get(port, "/standin/info")?))
        })
        .collect()
}

// -------------------------------------------------------------------------------- tests

/// The stand-in's own machinery, without the control plane: the version tags carry their
/// schema, a newer state is refused by an older version, files of the state directory can be
/// written and read, and a stand-in told to ignore SIGTERM needs the grace period and SIGKILL.
#[test]
fn standin_versions_behave() -> anyhow::Result<()> {
    if !docker_available()? {
        return Ok(());
    }
    let images = ensure_standin_versions()?;
    let tag = unique("standin-ver");
    let cleanup = DockerCleanup::default();
    cleanup.add(&format!("io.clusterclaw.test={tag}"));
    let volume = docker(&[
        "volume",
        "create",
        "--label",
        &format!("io.clusterclaw.test={tag}"),
    ])?;
    let run = |image: &str, env: &[&str]| -> anyhow::Result<(String, u16)> {
        let port = free_port();
        let mut args = vec![
            "run".to_owned(),
            "-d".into(),
            "--init".into(),
            "--label".into(),
            format!("io.clusterclaw.test={tag}"),
            "-p".into(),
            format!("127.0.0.1:{port}:18789"),
            "-v".into(),
            format!("{volume}:/home/node/.openclaw"),
        ];
        for e in env {
            args.extend(["-e".to_owned(), e.to_string()]);
        }
        args.push(image.to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok((docker(&args)?, port))
    };
    let ready = |port: u16| {
        wait_for("the stand-in to answer", Duration::from_secs(20), || {
            Ok(gateway_get(port, "/standin/info").ok())
        })
    };

    // 2026.1.1 marks the state with schema 1; a file can be written and read back.
    let (v1, port) = run(&images.v1, &[])?;
    let info = ready(port)?;
    assert_eq!(info["schema"], 1, "{info}");
    assert_eq!(info["state_schema_at_start"], Value::Null, "{info}");
    assert_eq!(
        standin_file(port, "schema.json")?.as_deref(),
        Some("{\"schema\":1}\n")
    );
    standin_put_file(port, "note.txt", "kept\n")?;
    assert_eq!(standin_file(port, "note.txt")?.as_deref(), Some("kept\n"));
    assert_eq!(standin_file(port, "missing.txt")?, None);
    let (status, _) = gateway_request(port, "GET", "/standin/file?name=../etc/passwd", None)?;
    assert_eq!(status, 400, "a path is refused");
    docker(&["rm", "-f", &v1])?;

    // 2026.2.1 migrates it to 2.
    let (v2, port) = run(&images.v2, &[])?;
    let info = ready(port)?;
    assert_eq!(info["schema"], 2, "{info}");
    assert_eq!(info["state_schema_at_start"], 1, "{info}");
    assert_eq!(standin_file(port, "note.txt")?.as_deref(), Some("kept\n"));
    docker(&["rm", "-f", &v2])?;

    // 2026.1.1 refuses the migrated state.
    let (old, _) = run(&images.v1, &[])?;
    let exited = wait_for(
        "2026.1.1 to refuse the state",
        Duration::from_secs(20),
        || {
            let state = docker(&[
                "inspect",
                "--format",
                "{{.State.Status}} {{.State.ExitCode}}",
                &old,
            ])?;
            Ok((state.starts_with("exited")).then_some(state))
        },
    )?;
    assert_eq!(exited, "exited 1");
    let logs = std::process::Command::new("docker")
        .args(["logs", &old])
        .output()?;
    let logs = String::from_utf8_lossy(&logs.stderr);
    assert!(
        logs.contains("newer than this version's schema 1"),
        "{logs}"
    );

    // The broken version never turns ready.
    let (broken, port) = run(&images.broken, &[])?;
    ready(port)?;
    let (status, _) = gateway_request(port, "GET", "/readyz", None)?;
    assert_eq!(status, 503);
    docker(&["rm", "-f", &broken])?;

    // SIGTERM ignored (with an init process as PID 1, as the agent runs it): a stop takes the
    // grace period.
    let (stubborn, port) = run(&images.default, &["STANDIN_IGNORE_SIGTERM=1"])?;
    ready(port)?;
    let started = Instant::now();
    docker(&["stop", "-t", "2", &stubborn])?;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1800), "stopped in {took:?}");
    let (plain, port) = run(&images.default, &[])?;
    ready(port)?;
    let started = Instant::now();
    docker(&["stop", "-t", "10", &plain])?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(cleanup);
    let _ = docker(&["volume", "rm", "-f", &volume]);
    Ok(())
}

/// A 3-replica Rolling update to an image that never turns ready: exactly one replica is ever
/// replaced, the update is rolled back (`rollout status -w` exits non-zero), the instance ends
/// `RolledBack` with 3 Ready on the old revision, and `readyReplicas` never fell below 2.
#[test]
fn rolling_update_to_broken_image_rolls_back() -> anyhow::Result<()> {
    let Some(c) = cluster("ro-bad")? else {
        return Ok(());
    };
    let name = "bot";
    let strategy = rolling(json!(1), 2, "20s");
    c.apply(&[c.instance_doc(name, &c.images.v1, 3, strategy.clone())]);
    let (_, before) = wait_ready(&c.server, &c.scope, name, 3)?;
    let old = c.settled_revision(name, 3)?;

    let (status, samples) = c.sampled(&[name], || {
        c.apply(&[c.instance_doc(name, &c.images.broken, 3, strategy.clone())]);
        let new = c.new_revision(name, old)?;
        let status = c.rollout_status_wait(name);
        let (view, after) = c.wait_final(name, "RolledBack", 3, old)?;
        Ok((new, status, view, after))
    })?;
    let (new, status, view, after) = status;
    eprintln!("samples: {samples:#?}");

    assert_ne!(
        status.code, 0,
        "`rollout status -w` of a failed update exits non-zero"
    );
    let said = format!("{}{}", status.stdout, status.stderr);
    assert!(said.contains("RolledBack"), "{said}");
    assert!(new > old);
    let replaced = samples.replaced(name);
    assert_eq!(
        replaced.len(),
        1,
        "exactly one replica is replaced: {samples:#?}"
    );
    assert_eq!(
        samples.retargeted(name, old),
        replaced,
        "only the replaced replica was ever given the new revision"
    );
    let min = samples.min_ready[name];
    assert!(min >= 2, "readyReplicas fell to {min}");
    assert_eq!(view.ready, 3, "{}", view.raw["status"]);
    // The two replicas never touched keep their containers.
    let same = after
        .iter()
        .filter(|(r, c)| before.get(*r).is_some_and(|b| b.id == c.id))
        .count();
    assert_eq!(same, 2, "before: {before:?}\nafter: {after:?}");
    let get = c
        .server
        .cli(&[
            "get",
            "instances",
            "-t",
            &c.scope.tenant,
            "-p",
            &c.scope.project,
        ])
        .ok();
    eprintln!("{}", get.stdout);
    assert!(get.stdout.contains("RolledBack"), "{}", get.stdout);
    Ok(())
}

/// A good update with `maxUnavailable: 1`: every replica ends on the new revision, never fewer
/// than 2 serving, and what each replica wrote in its state volume before is there after.
#[test]
fn rolling_update_keeps_two_serving_and_the_state() -> anyhow::Result<()> {
    let Some(c) = cluster("ro-good")? else {
        return Ok(());
    };
    let name = "bot";
    let strategy = rolling(json!(1), 1, "60s");
    c.apply(&[c.instance_doc(name, &c.images.default, 3, strategy.clone())]);
    let (_, before) = wait_ready(&c.server, &c.scope, name, 3)?;
    let old = c.settled_revision(name, 3)?;
    for (replica, container) in &before {
        standin_put_file(
            container.port.context("a port")?,
            "note.txt",
            &format!("written by {replica}\n"),
        )?;
    }

    let changed = with_env(strategy, &[("OPENCLAW_E2E_COLOUR", "blue")]);
    let ((new, status, after), samples) = c.sampled(&[name], || {
        c.apply(&[c.instance_doc(name, &c.images.default, 3, changed.clone())]);
        let new = c.new_revision(name, old)?;
        let status = c.rollout_status_wait(name);
        let (_, after) = c.wait_final(name, "Succeeded", 3, new)?;
        Ok((new, status, after))
    })?;
    eprintln!("samples: {samples:#?}");
    assert_eq!(status.code, 0, "{}{}", status.stdout, status.stderr);
    assert!(new > old);
    let min = samples.min_ready[name];
    assert!(min >= 2, "readyReplicas fell to {min}");
    for (replica, container) in &after {
        assert_ne!(container.id, before[replica].id, "{replica} was replaced");
        assert_eq!(
            container.volume, before[replica].volume,
            "{replica} kept its volume"
        );
        let port = container.port.context("a port")?;
        assert_eq!(
            standin_file(port, "note.txt")?,
            Some(format!("written by {replica}\n")),
            "{replica}'s state is kept"
        );
        let info = gateway_get(port, "/standin/info")?;
        assert_eq!(info["env"]["OPENCLAW_E2E_COLOUR"], "blue", "{info}");
    }
    Ok(())
}

/// A Canary with a pause: `promote` takes the rest of the replicas to the new revision, `undo`
/// makes a new revision equal to the previous one and rolls to it, and `abort` returns the canary
/// to the old revision with phase `RolledBack`.
#[test]
fn canary_promote_undo_and_abort() -> anyhow::Result<()> {
    let Some(c) = cluster("ro-canary")? else {
        return Ok(());
    };
    let name = "bot";
    let strategy = json!({"updateStrategy": {
        "type": "Canary",
        "steps": [{"replicas": 1}, {"pause": {}}],
        "minReadySeconds": 1,
        "progressDeadline": "60s",
    }});
    let doc = |env: &[(&str, &str)]| {
        c.instance_doc(name, &c.images.default, 3, with_env(strategy.clone(), env))
    };
    c.apply(&[doc(&[])]);
    wait_ready(&c.server, &c.scope, name, 3)?;
    let first = c.settled_revision(name, 3)?;

    // Paused after one replica: the canary runs the new revision, the other two the old.
    let paused_on = |revision: u64| {
        wait_for(
            &format!("{name} Paused with one replica on {revision}"),
            ROLL_WAIT,
            || {
                let v = c.look(name)?;
                let canary = v.targeting(revision);
                let ok = v.phase.as_deref() == Some("Paused")
                    && canary.len() == 1
                    && v.replicas[&canary[0]].running == Some(revision)
                    && v.replicas[&canary[0]].state == "Ready"
                    && v.ready == 3;
                Ok(ok.then_some(v))
            },
        )
    };

    // 1. promote.
    c.apply(&[doc(&[("OPENCLAW_E2E_STEP", "a")])]);
    let a = c.new_revision(name, first)?;
    let v = paused_on(a)?;
    assert_eq!(v.updated, Some(1), "{}", v.raw["status"]);
    let shown = c.rollout("status", name, &[]).ok();
    assert!(shown.stdout.contains("Paused"), "{}", shown.stdout);
    c.rollout("promote", name, &[]).ok();
    let (_, containers) = c.wait_final(name, "Succeeded", 3, a)?;
    for (replica, info) in infos(&containers)? {
        assert_eq!(info["env"]["OPENCLAW_E2E_STEP"], "a", "{replica}: {info}");
    }

    // 2. undo: a new revision with the content of the first; it rolls like any other (through
    //    the canary's pause, which is promoted).
    c.rollout("undo", name, &[]).ok();
    let undone = c.new_revision(name, a)?;
    assert!(undone > a, "undo makes a new revision");
    let phase = wait_for("the undo to pause or end", ROLL_WAIT, || {
        let v = c.look(name)?;
        Ok(v.phase.filter(|p| p == "Paused" || p == "Succeeded"))
    })?;
    if phase == "Paused" {
        c.rollout("promote", name, &[]).ok();
    }
    let (_, containers) = c.wait_final(name, "Succeeded", 3, undone)?;
    for (replica, info) in infos(&containers)? {
        assert_eq!(
            info["env"].get("OPENCLAW_E2E_STEP"),
            None,
            "{replica} runs what the first revision ran: {info}"
        );
    }
    let history = c.rollout("history", name, &[]).ok();
    for revision in [first, a, undone] {
        assert!(
            history.stdout.contains(&revision.to_string()),
            "history lists {revision}: {}",
            history.stdout
        );
    }

    // 3. abort: the canary goes back to the revision it came from.
    let before = c.scope.containers(name)?;
    c.apply(&[doc(&[("OPENCLAW_E2E_STEP", "c")])]);
    let cc = c.new_revision(name, undone)?;
    let v = paused_on(cc)?;
    let canary = v.targeting(cc)[0].clone();
    c.rollout("abort", name, &[]).ok();
    let (_, containers) = c.wait_final(name, "RolledBack", 3, undone)?;
    for (replica, info) in infos(&containers)? {
        assert_eq!(
            info["env"].get("OPENCLAW_E2E_STEP"),
            None,
            "{replica}: {info}"
        );
    }
    for (replica, container) in &containers {
        if *replica != canary {
            assert_eq!(
                container.id, before[replica].id,
                "{replica} was never touched"
            );
        }
    }
    Ok(())
}

/// A version upgrade (2026.1.1 → 2026.2.1, which migrates the state's schema) and a rollback:
/// the agent's snapshot taken before the upgrade is restored, so 2026.1.1 finds schema 1 and
/// runs, with the file written before the upgrade; `describe` lists the snapshot.
#[test]
fn version_rollback_restores_the_snapshot() -> anyhow::Result<()> {
    let Some(c) = cluster("ro-snap")? else {
        return Ok(());
    };
    let name = "bot";
    let strategy = rolling(json!(1), 1, "60s");
    c.apply(&[c.instance_doc(name, &c.images.v1, 1, strategy.clone())]);
    let (_, before) = wait_ready(&c.server, &c.scope, name, 1)?;
    let v1_revision = c.settled_revision(name, 1)?;
    let replica = format!("{name}-0");
    let port = before[&replica].port.context("a port")?;
    assert_eq!(gateway_get(port, "/standin/info")?["schema"], 1);
    standin_put_file(port, "before-upgrade.txt", "from 2026.1.1\n")?;

    // Upgrade.
    c.apply(&[c.instance_doc(name, &c.images.v2, 1, strategy.clone())]);
    let v2_revision = c.new_revision(name, v1_revision)?;
    assert_eq!(c.rollout_status_wait(name).code, 0);
    let (view, upgraded) = c.wait_final(name, "Succeeded", 1, v2_revision)?;
    let port = upgraded[&replica].port.context("a port")?;
    let info = gateway_get(port, "/standin/info")?;
    assert_eq!(info["schema"], 2, "{info}");
    assert_eq!(info["state_schema_at_start"], 1, "{info}");
    standin_put_file(port, "on-2026.2.1.txt", "from 2026.2.1\n")?;
    let snapshots = view.raw["status"]["replicaStatus"][0]["snapshots"].clone();
    eprintln!("snapshots after the upgrade: {snapshots}");
    assert!(
        snapshots
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["image"]
                .as_str()
                .is_some_and(|i| i.ends_with(":2026.1.1")))),
        "a snapshot of the 2026.1.1 state: {snapshots}"
    );

    // Roll back.
    c.rollout("undo", name, &[]).ok();
    let back = c.new_revision(name, v2_revision)?;
    assert_eq!(c.rollout_status_wait(name).code, 0);
    let (_, restored) = c.wait_final(name, "Succeeded", 1, back)?;
    let port = restored[&replica].port.context("a port")?;
    let info = gateway_get(port, "/standin/info")?;
    assert_eq!(info["schema"], 1, "2026.1.1 runs: {info}");
    assert_eq!(
        info["state_schema_at_start"], 1,
        "it found the restored schema-1 state: {info}"
    );
    assert_eq!(
        standin_file(port, "schema.json")?.as_deref(),
        Some("{\"schema\":1}\n")
    );
    assert_eq!(
        standin_file(port, "before-upgrade.txt")?.as_deref(),
        Some("from 2026.1.1\n")
    );
    assert_eq!(
        standin_file(port, "on-2026.2.1.txt")?,
        None,
        "the state is the snapshot's"
    );
    assert_eq!(
        restored[&replica].volume, before[&replica].volume,
        "restored into the same volume"
    );
    let described = c.describe(name);
    assert!(
        described.to_lowercase().contains("snapshot"),
        "describe lists snapshots:\n{described}"
    );
    assert!(described.contains("2026.1.1"), "{described}");
    Ok(())
}

/// A template change that reaches 6 instances moves in waves: the first wave's instance fails
/// its gate (the template makes the stand-in never ready), the change halts there and is rolled
/// back, and the other 5 instances are untouched (same containers, same revision, held).
#[test]
fn template_change_halts_after_the_first_wave() -> anyhow::Result<()> {
    let Some(c) = cluster("ro-waves")? else {
        return Ok(());
    };
    let template = unique("wave-tpl");
    let template_doc = |vars: Value| {
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "ConfigTemplate",
            "metadata": {"name": template},
            "spec": {"config": {"env": {"vars": vars}}}})
    };
    let names: Vec<String> = (0..6).map(|i| format!("w{i}")).collect();
    let strategy = rolling(json!(1), 1, "15s");
    let mut docs = vec![template_doc(json!({"E2E_WAVE": "1"}))];
    for n in &names {
        let mut extra = strategy.clone();
        extra["configTemplate"] = json!(template);
        docs.push(c.instance_doc(n, &c.images.default, 1, extra));
    }
    c.apply(&docs);
    let mut old = BTreeMap::new();
    let mut before = BTreeMap::new();
    for n in &names {
        before.insert(n.clone(), wait_ready(&c.server, &c.scope, n, 1)?.1);
        old.insert(n.clone(), c.settled_revision(n, 1)?);
    }

    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (first, samples) = c.sampled(&refs, || {
        c.apply(&[template_doc(
            json!({"E2E_WAVE": "2", "STANDIN_NOT_READY": "1"}),
        )]);
        // The first wave's instance fails and is rolled back; the others are held.
        wait_for(
            "the first wave to fail and the rest to be held",
            ROLL_WAIT,
            || {
                let views: BTreeMap<&String, View> = names
                    .iter()
                    .map(|n| Ok((n, c.look(n)?)))
                    .collect::<anyhow::Result<_>>()?;
                let failed: Vec<&String> = views
                    .iter()
                    .filter(|(_, v)| {
                        v.held_by.is_none()
                            && matches!(v.phase.as_deref(), Some("RolledBack" | "Failed"))
                    })
                    .map(|(n, _)| *n)
                    .collect();
                let held = views.values().filter(|v| v.held_by.is_some()).count();
                Ok((failed.len() == 1 && held == names.len() - 1).then(|| failed[0].clone()))
            },
        )
    })?;
    eprintln!("samples: {samples:#?}");
    // The failed instance is back on its old revision, all Ready.
    c.wait_final(&first, "RolledBack", 1, old[&first])?;
    assert!(
        samples
            .targets
            .get(&format!("{first}/{first}-0"))
            .is_some_and(|t| t.iter().any(|r| *r > old[&first])),
        "{first}, the first wave, was given the new revision: {samples:#?}"
    );
    for n in names.iter().filter(|n| **n != first) {
        let key = format!("{n}/{n}-0");
        assert_eq!(
            samples.containers.get(&key).map(BTreeSet::len),
            Some(1),
            "{n} kept its one container: {samples:#?}"
        );
        assert_eq!(
            samples.targets.get(&key),
            Some(&BTreeSet::from([old[n]])),
            "{n} was never given the new revision"
        );
        let now = c.scope.containers(n)?;
        assert_eq!(now, before[n], "{n}'s container is the one from before");
        let v = c.look(n)?;
        assert!(
            v.held_by.is_some(),
            "{n} shows what holds it: {}",
            v.raw["status"]
        );
        let info = gateway_get(
            now[&format!("{n}-0")].port.context("a port")?,
            "/standin/info",
        )?;
        assert_eq!(info["config"]["env"]["vars"]["E2E_WAVE"], "1", "{info}");
    }
    Ok(())
}

/// Deleting 3 replicas that ignore SIGTERM with `terminationGracePeriod: 5s` takes one grace
/// period (the stops run in parallel), not three; meanwhile a replica of another instance is
/// created on the same host and turns Ready before the deletion has ended.
#[test]
fn slow_stops_run_in_parallel() -> anyhow::Result<()> {
    let Some(c) = cluster("ro-grace")? else {
        return Ok(());
    };
    let slow = "slow";
    let grace = Duration::from_secs(5);
    let extra = json!({"terminationGracePeriod": "5s", "env": {"STANDIN_IGNORE_SIGTERM": "1"}});
    c.apply(&[c.instance_doc(slow, &c.images.default, 3, extra)]);
    let (_, containers) = wait_ready(&c.server, &c.scope, slow, 3)?;
    for container in containers.values() {
        let init = docker(&["inspect", "--format", "{{.HostConfig.Init}}", &container.id])?;
        assert_eq!(init, "true", "the container runs an init process as PID 1");
        assert_eq!(container.host, c.host);
    }

    let quick = "quick";
    let started = Instant::now();
    c.server
        .cli(&[
            "delete",
            "instance",
            slow,
            "-t",
            &c.scope.tenant,
            "-p",
            &c.scope.project,
        ])
        .ok();
    c.apply(&[c.instance_doc(quick, &c.images.default, 1, json!({}))]);
    let mut quick_ready = None;
    let gone = wait_for(
        "the slow instance's containers to go",
        Duration::from_secs(40),
        || {
            if quick_ready.is_none() {
                let v = c.look(quick)?;
                let running = c.scope.containers(quick)?;
                if v.ready == 1 && running.values().all(|c| c.running) && running.len() == 1 {
                    quick_ready = Some(started.elapsed());
                }
            }
            Ok(c.scope
                .containers(slow)?
                .is_empty()
                .then(|| started.elapsed()))
        },
    )?;
    eprintln!("deleted in {gone:?}; the other replica was Ready after {quick_ready:?}");
    assert!(
        gone >= grace - Duration::from_millis(500),
        "SIGTERM was ignored, so the stop waited for the grace period: {gone:?}"
    );
    assert!(
        gone <= grace + Duration::from_secs(4),
        "one grace period plus a little, not three: {gone:?}"
    );
    let quick_ready = quick_ready.context("the other instance's replica was not Ready in time")?;
    assert!(quick_ready < gone, "{quick_ready:?} vs {gone:?}");
    wait_ready(&c.server, &c.scope, quick, 1)?;
    Ok(())
}

/// Scaling 3 → 1 keeps the removed replicas' state volumes (the default `whenScaled: Retain`);
/// `describe` lists them; scaling back to 3 reuses them, with what was written in them.
#[test]
fn scale_down_retains_volumes() -> anyhow::Result<()> {
    let Some(c) = cluster("ro-keep")? else {
        return Ok(());
    };
    let name = "bot";
    c.apply(&[c.instance_doc(name, &c.images.default, 3, json!({}))]);
    let (_, three) = wait_ready(&c.server, &c.scope, name, 3)?;
    for (replica, container) in &three {
        standin_put_file(
            container.port.context("a port")?,
            "note.txt",
            &format!("written by {replica}\n"),
        )?;
    }
    let volumes = || -> anyhow::Result<BTreeSet<String>> {
        Ok(docker(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label=io.clusterclaw.tenant={}", c.scope.tenant),
            "--filter",
            &format!("label=io.clusterclaw.instance={name}"),
        ])?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
    };
    let all: BTreeSet<String> = three.values().map(|c| c.volume.clone()).collect();
    assert_eq!(volumes()?, all);

    c.scope.scale(&c.server, name, 1);
    let (_, one) = wait_ready(&c.server, &c.scope, name, 1)?;
    assert_eq!(one[&format!("{name}-0")], three[&format!("{name}-0")]);
    let retained = wait_for("two retained volumes in the status", WAIT, || {
        let v = c.look(name)?;
        let retained = v.raw["status"]["retainedVolumes"].clone();
        Ok((retained.as_array().map(Vec::len) == Some(2)).then_some(retained))
    })?;
    eprintln!("retained: {retained}");
    assert_eq!(volumes()?, all, "the removed replicas' volumes are kept");
    let described = c.describe(name);
    for replica in [format!("{name}-1"), format!("{name}-2")] {
        assert!(
            described.contains(&replica),
            "describe lists {replica}:\n{described}"
        );
    }

    c.scope.scale(&c.server, name, 3);
    let (_, again) = wait_ready(&c.server, &c.scope, name, 3)?;
    assert_eq!(volumes()?, all, "no new volume");
    for (replica, container) in &again {
        assert_eq!(
            container.volume, three[replica].volume,
            "{replica} reuses its volume"
        );
        assert_eq!(
            standin_file(container.port.context("a port")?, "note.txt")?,
            Some(format!("written by {replica}\n")),
        );
    }
    wait_for("no retained volume left in the status", WAIT, || {
        let v = c.look(name)?;
        Ok(v.raw["status"]["retainedVolumes"]
            .as_array()
            .is_none_or(Vec::is_empty)
            .then_some(()))
    })?;
    Ok(())
}
