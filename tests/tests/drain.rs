//! End to end: `clusterclaw drain host`. Real server, two real agents, real Docker and the
//! stand-in Gateway image. A host runs three replicas of two instances, each with a state file;
//! the drain moves each to the other host with its state file intact (the state volume goes
//! through the control plane, checksummed), never with more than `maxUnavailable` replicas of
//! an instance unavailable. Then a drain with `--discard-state`, and bad input.

use std::collections::BTreeMap;
use std::time::Duration;

use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;
use serde_json::Value;

struct Cluster {
    server: TestServer,
    scope: Scope,
    image: String,
    hosts: Vec<(String, TestAgent)>,
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
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, n as u32, "10m");
    let mut hosts = Vec::new();
    for i in 0..n {
        let name = unique(&format!("dr{i}"));
        let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &name])?;
        let host = agent.wait_enrolled()?;
        cleanup.host(&host);
        wait_host_ready(&server, &host)?;
        hosts.push((host, agent));
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
    fn apply_instance(&self, name: &str, replicas: u32) {
        let m = self
            .scope
            .instance_manifest(name, &self.image, replicas, &BTreeMap::new());
        self.scope.apply(&self.server, name, &m);
    }

    /// Replica name → (host, state).
    fn placements(&self, name: &str) -> BTreeMap<String, (String, String)> {
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
                            ),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Three replicas of two instances on one host, each with a state file, drained to the other
/// host: each arrives with its file; no instance ever has more than one replica unavailable.
/// Then the replicas go back with `--discard-state` (fresh state), and bad input is refused.
#[test]
fn a_drained_host_moves_its_replicas_with_their_state() -> anyhow::Result<()> {
    let Some(c) = cluster("e2e-drain", 2)? else {
        return Ok(());
    };
    let (a, b) = (c.hosts[0].0.clone(), c.hosts[1].0.clone());
    // Everything starts on host a.
    c.server.cli(&["cordon", "host", &b]).ok();
    let instances = [("bot", 2usize), ("aux", 1usize)];
    for (name, n) in instances {
        c.apply_instance(name, n as u32);
    }
    let mut files = BTreeMap::new();
    for (name, n) in instances {
        let (_, containers) = wait_ready(&c.server, &c.scope, name, n)?;
        for (replica, ct) in containers {
            assert_eq!(ct.host, a, "{replica} starts on host a");
            let content = format!("state of {replica} {}", unique("x"));
            standin_put_file(ct.port.expect("a published port"), "marker.txt", &content)?;
            files.insert(replica, content);
        }
    }
    c.server.cli(&["uncordon", "host", &b]).ok();

    // Bad input first: nothing changes.
    let out = c.server.cli(&["drain", "host", "no-such-host"]).code(1);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);
    let out = c
        .server
        .cli(&["drain", "host", &a, "--timeout", "ten"])
        .code(2);
    assert!(out.stderr.contains("--timeout"), "{}", out.stderr);
    let out = c.server.cli(&["drain", "instance", "bot"]).code(2);
    assert!(out.stderr.contains("only hosts"), "{}", out.stderr);

    // Drain a, sampling the instances' availability meanwhile.
    let mut worst: BTreeMap<&str, usize> = BTreeMap::new();
    let out = std::thread::scope(|s| {
        let drain = s.spawn(|| {
            c.server.cli_within(
                &["drain", "host", &a, "--timeout", "3m"],
                Duration::from_secs(240),
            )
        });
        while !drain.is_finished() {
            for (name, n) in instances {
                let p = c.placements(name);
                let ready = p.values().filter(|(_, st)| st == "Ready").count();
                let down = n.saturating_sub(ready);
                let w = worst.entry(name).or_default();
                *w = (*w).max(down);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        drain.join().expect("the drain thread")
    })
    .expect("the drain ended in time");
    println!("{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("drained"), "{}", out.stdout);
    assert!(out.stdout.contains("sha256"), "{}", out.stdout);
    for (name, w) in &worst {
        assert!(
            *w <= 1,
            "{name} had {w} replicas unavailable at once (maxUnavailable 1)"
        );
    }
    for (name, n) in instances {
        let (_, containers) = wait_ready(&c.server, &c.scope, name, n)?;
        for (replica, ct) in containers {
            assert_eq!(ct.host, b, "{replica} runs on host b after the drain");
            let got = standin_file(ct.port.expect("a published port"), "marker.txt")?;
            assert_eq!(got.as_deref(), Some(files[&replica].as_str()), "{replica}");
        }
    }
    let host_a = c.server.get_json(&format!("/api/v1/hosts/{a}"));
    assert_eq!(host_a["spec"]["unschedulable"], true, "{host_a}");
    assert_eq!(host_a["status"]["drain"]["phase"], "Succeeded", "{host_a}");
    // The old volumes are let go once their copies are checked.
    wait_for("host a's volumes removed", WAIT, || {
        let left = docker(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label=io.clusterclaw.tenant={}", c.scope.tenant),
            "--filter",
            &format!("label=io.clusterclaw.host={a}"),
        ])?;
        Ok(left.trim().is_empty().then_some(()))
    })?;

    // Back to a without the state: the replicas start fresh there.
    c.server.cli(&["uncordon", "host", &a]).ok();
    let out = c
        .server
        .cli_within(
            &["drain", "host", &b, "--discard-state", "--timeout", "3m"],
            Duration::from_secs(240),
        )
        .expect("the drain ended in time");
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("state discarded"), "{}", out.stdout);
    for (name, n) in instances {
        let (_, containers) = wait_ready(&c.server, &c.scope, name, n)?;
        for (replica, ct) in containers {
            assert_eq!(ct.host, a, "{replica} runs on host a again");
            let got = standin_file(ct.port.expect("a published port"), "marker.txt")?;
            assert_eq!(got, None, "{replica} starts with fresh state");
        }
    }
    // With nowhere to go (a is the only other host and is now being drained from b's view, b
    // is cordoned): a drain that cannot finish names the replicas and why.
    let out = c
        .server
        .cli_within(
            &["drain", "host", &a, "--timeout", "3s"],
            Duration::from_secs(60),
        )
        .expect("the drain ended in time");
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("could not be moved"), "{}", out.stderr);
    assert!(out.stderr.contains("bot-0"), "{}", out.stderr);
    assert!(out.stderr.contains("no other host fits"), "{}", out.stderr);
    Ok(())
}

/// SHA-256 of a file, in hex.
fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `mib` MiB of incompressible bytes in `path`.
fn random_file(path: &std::path::Path, mib: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D ^ u64::from(std::process::id());
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    Ok(f.flush()?)
}

/// The server is killed (SIGKILL) while a drain carries a replica's state, and started again on
/// the same data directory: the drain goes on from the store. The transfer cut off by the kill is
/// tried again (the new host's agent asks anew, the old host reads the volume out again), every
/// replica arrives with its state intact, no replica ever runs twice, and `drain host` run again
/// follows the drain in progress to its end.
#[test]
fn a_drain_resumes_after_the_server_restarts() -> anyhow::Result<()> {
    let Some(mut c) = cluster("e2e-drrs", 2)? else {
        return Ok(());
    };
    let (a, b) = (c.hosts[0].0.clone(), c.hosts[1].0.clone());
    c.server.cli(&["cordon", "host", &b]).ok();
    c.apply_instance("bot", 2);
    let (_, containers) = wait_ready(&c.server, &c.scope, "bot", 2)?;
    // Enough state that the kill lands while it is on its way (tens of MB/s on loopback).
    let scratch = tempfile::tempdir()?;
    let blob = scratch.path().join("blob.bin");
    random_file(&blob, 96)?;
    let want = sha256_file(&blob)?;
    for ct in containers.values() {
        assert_eq!(ct.host, a);
        docker(&[
            "cp",
            blob.to_str().expect("utf-8 path"),
            &format!("{}:/home/node/.openclaw/blob.bin", ct.id),
        ])?;
    }
    c.server.cli(&["uncordon", "host", &b]).ok();

    // Never two running copies of a replica, whatever the server does.
    let tenant = c.scope.tenant.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Vec<String> {
            let mut doubles = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(out) = docker(&[
                    "ps",
                    "--filter",
                    &format!("label=io.clusterclaw.tenant={tenant}"),
                    "--format",
                    "{{.Label \"io.clusterclaw.replica\"}}",
                ]) {
                    let mut seen = std::collections::BTreeSet::new();
                    for r in out.lines() {
                        if !seen.insert(r.to_string()) {
                            doubles.push(r.to_string());
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            doubles
        })
    };

    let path = format!("/api/v1/hosts/{a}/drain");
    let r = c.server.http(
        "POST",
        &path,
        Some(r#"{"timeout": "5m"}"#),
        Some(c.server.admin_token()),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    // Kill the server once a replica's state is on its way.
    let moving = wait_for("a replica's state on its way", WAIT, || {
        let d = c.server.get_json(&path);
        Ok(d["replicas"].as_array().and_then(|rs| {
            rs.iter()
                .find(|r| {
                    r["phase"] == "Moving"
                        && r["bytes"].as_u64().is_some_and(|b| b > 0)
                        && r["sha256"].is_null()
                })
                .cloned()
        }))
    })?;
    println!("killing the server while {moving} moves");
    c.server.kill();
    c.server.restart()?;

    let out = c
        .server
        .cli_within(
            &["drain", "host", &a, "--timeout", "5m"],
            Duration::from_secs(360),
        )
        .expect("the drain ended in time");
    println!("{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("a drain already in progress is followed"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("drained"), "{}", out.stdout);
    let d = c.server.get_json(&path);
    assert_eq!(d["phase"], "Succeeded", "{d}");
    for r in d["replicas"].as_array().expect("replicas") {
        assert_eq!(r["phase"], "Moved", "{d}");
        assert_eq!(r["to"], serde_json::json!(b), "{d}");
        // The record says how much was relayed, by which attempt: the transfer cut by the
        // restart started again from byte 0 and says so.
        assert!(
            r["bytes"].as_u64().is_some_and(|b| b > 96 << 20),
            "the whole state counted: {r}"
        );
        assert!(r["sha256"].is_string(), "{r}");
        let attempts = r["attempts"].as_u64().unwrap_or(0);
        if r["replica"] == moving["replica"] {
            assert!(attempts >= 2, "the cut transfer counts its attempts: {r}");
        } else {
            assert!(attempts >= 1, "{r}");
        }
    }
    let (_, moved) = wait_ready(&c.server, &c.scope, "bot", 2)?;
    for (replica, ct) in &moved {
        assert_eq!(ct.host, b, "{replica} runs on host b after the drain");
        let dest = scratch.path().join(format!("{replica}.bin"));
        docker(&[
            "cp",
            &format!("{}:/home/node/.openclaw/blob.bin", ct.id),
            dest.to_str().expect("utf-8 path"),
        ])?;
        assert_eq!(
            sha256_file(&dest)?,
            want,
            "{replica}'s state arrived changed"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let doubles = sampler.join().expect("the sampler");
    assert!(
        doubles.is_empty(),
        "replicas seen running twice: {doubles:?}"
    );
    Ok(())
}
