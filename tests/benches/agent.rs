//! Agent figures, measured end to end with the real release binaries, real mutual TLS, real
//! Docker and the stand-in Gateway image, with the agent's default intervals: spec change to
//! agent acting (p50/p99); apply to 3 Ready replicas against plain `docker run` plus the first
//! passing `/readyz` (medians and their ratio); the agent's resident memory and CPU while it
//! manages 10 running replicas.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench agent`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;
use serde_json::json;

/// Rounds of apply → 3 Ready (and of the plain-Docker baseline).
const READY_ROUNDS: usize = 5;
/// Spec changes timed for the latency figure.
const CHANGES: usize = 50;
/// How long the agent is watched with 10 replicas running.
const IDLE_WINDOW: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        anyhow::bail!("no Docker engine: the agent benchmark needs one");
    };
    // Built (if needed) before anything is timed or started.
    agent_bin()?;
    let scope = Scope::new("bench");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let baseline_tag = unique("bench-plain");
    cleanup.add(&format!("io.clusterclaw.test={baseline_tag}"));
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let mut agent =
        TestAgent::enroll_with_defaults(&server, port, &token, &["--name", &unique("bench")])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;
    scope.apply(&server, "base", &scope.base_manifest());
    // The tenant's network exists from here on, as it does for every tenant after its first
    // instance; the first round below is a warm-up and is not counted.

    // 1. From apply to 3 Ready replicas, against plain `docker run` ×3 + first passing /readyz.
    let mut agent_runs = Vec::new();
    let mut plain_runs = Vec::new();
    for round in 0..=READY_ROUNDS {
        let plain = plain_docker_ready(&image, 3, &format!("{baseline_tag}-{round}"))?;
        let name = format!("ready-{round}");
        let manifest = scope.instance_manifest(&name, &image, 3, &BTreeMap::new());
        let started = Instant::now();
        scope.apply_http(&server, &manifest);
        wait_for("3 Ready replicas", WAIT, || {
            let v = scope.instance(&server, &name);
            Ok((v.pointer("/status/readyReplicas") == Some(&json!(3))).then_some(()))
        })?;
        let took = started.elapsed();
        if round > 0 {
            agent_runs.push(took);
            plain_runs.push(plain);
        }
        scope.delete(&server, &name);
        wait_for("the round's containers to go", WAIT, || {
            Ok(scope.containers(&name)?.is_empty().then_some(()))
        })?;
    }
    agent_runs.sort();
    plain_runs.sort();
    let (agent_median, plain_median) = (percentile(&agent_runs, 0.5), percentile(&plain_runs, 0.5));
    let ratio = agent_median.as_secs_f64() / plain_median.as_secs_f64();

    // 2. Spec change (apply sent) → the agent has the new assignments, saved and acting.
    let name = "latency";
    let env = |i: usize| BTreeMap::from([("OPENCLAW_SEQ", i.to_string())]);
    let manifest = |i: usize| {
        let e = env(i);
        let e: BTreeMap<&str, &str> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        scope.instance_manifest(name, &image, 1, &e)
    };
    scope.apply(&server, name, &manifest(0));
    wait_ready(&server, &scope, name, 1)?;
    let mut latencies = Vec::new();
    for i in 1..=CHANGES {
        let before = log_events(&agent.log(), "new assignments").len();
        let sent = SystemTime::now();
        scope.apply_http(&server, &manifest(i));
        let got = wait_for("the agent to receive the change", WAIT, || {
            Ok(log_events(&agent.log(), "new assignments")
                .get(before)
                .map(|(t, _)| *t))
        })?;
        latencies.push(got.duration_since(sent).unwrap_or_default());
        wait_for("the replaced replica to be Ready", WAIT, || {
            let v = scope.instance(&server, name);
            let ok = v.pointer("/status/readyReplicas") == Some(&json!(1))
                && v.pointer("/status/replicaStatus/0/generation")
                    == v.pointer("/metadata/generation");
            Ok(ok.then_some(()))
        })?;
    }
    latencies.sort();
    scope.delete(&server, name);

    // 3. Resident memory and CPU while managing 10 running replicas, default intervals.
    let name = "ten";
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(name, &image, 10, &BTreeMap::new()),
    );
    wait_ready(&server, &scope, name, 10)?;
    std::thread::sleep(Duration::from_secs(15));
    let pid = agent.pid().context("the agent is not running")?;
    let cpu_before = cpu_time(pid)?;
    let t0 = Instant::now();
    let mut rss = Vec::new();
    while t0.elapsed() < IDLE_WINDOW {
        rss.push(rss_bytes(pid)?);
        std::thread::sleep(Duration::from_secs(1));
    }
    let cpu = (cpu_time(pid)? - cpu_before).as_secs_f64() / t0.elapsed().as_secs_f64() * 100.0;
    rss.sort();
    scope.delete(&server, name);
    wait_for("the ten containers to go", WAIT, || {
        Ok(scope.containers(name)?.is_empty().then_some(()))
    })?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "agent figures ({} cores, release build, default intervals)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "spec change -> agent acting         p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms over {} changes   target p99 < 100 ms",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies[latencies.len() - 1]),
        latencies.len()
    );
    println!(
        "apply -> 3 Ready                    median {:.0} ms (runs {:?})",
        ms(agent_median),
        agent_runs
            .iter()
            .map(|d| ms(*d).round())
            .collect::<Vec<_>>()
    );
    println!(
        "docker run x3 + first /readyz       median {:.0} ms (runs {:?})",
        ms(plain_median),
        plain_runs
            .iter()
            .map(|d| ms(*d).round())
            .collect::<Vec<_>>()
    );
    println!(
        "ratio of the medians                {ratio:.2}x                                      target < 1.3x"
    );
    println!(
        "agent with 10 replicas              RSS median {:.1} MB  max {:.1} MB; CPU {cpu:.2}% of one core over {:?}   target < 20 MB, < 1%",
        rss[rss.len() / 2] as f64 / 1e6,
        rss[rss.len() - 1] as f64 / 1e6,
        IDLE_WINDOW
    );
    drop(agent);
    Ok(())
}
