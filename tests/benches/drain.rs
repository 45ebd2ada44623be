//! Drain figure, end to end with the real release binaries, mutual TLS, real Docker and the
//! stand-in Gateway image: a host runs 10 replicas of one instance, each with
//! `CLUSTERCLAW_BENCH_DRAIN_MIB` MiB (default 100) of random state; `clusterclaw drain host`
//! moves them all to a second host, each state volume relayed through the control plane and
//! checked by SHA-256. Prints the drain's wall time, the state bytes moved, the aggregate rate
//! over the whole drain and the median and slowest per-replica transfer rate; then checks
//! every replica's state file arrived intact.
//!
//! Both agents run on this machine against one engine, so the transfer crosses loopback TLS
//! twice (host to server, server to host) and the engine's archive API on both ends.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench drain`.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;
use sha2::{Digest, Sha256};

const REPLICAS: usize = 10;

fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn main() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        bail!("no Docker engine: the drain benchmark needs one");
    };
    let mib: u64 = std::env::var("CLUSTERCLAW_BENCH_DRAIN_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let scope = Scope::new("bench-drain");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 2, "10m");
    let mut agents = Vec::new();
    let mut hosts = Vec::new();
    for i in 0..2 {
        let name = unique(&format!("bd{i}"));
        let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &name])?;
        let host = agent.wait_enrolled()?;
        cleanup.host(&host);
        wait_host_ready(&server, &host)?;
        hosts.push(host);
        agents.push(agent);
    }
    let (a, b) = (hosts[0].clone(), hosts[1].clone());
    scope.apply(&server, "base", &scope.base_manifest());
    server.cli(&["cordon", "host", &b]).ok();
    let manifest = scope.instance_manifest("big", &image, REPLICAS as u32, &BTreeMap::new());
    scope.apply(&server, "big", &manifest);
    let (_, containers) = wait_ready(&server, &scope, "big", REPLICAS)?;

    // One random file, copied into every replica's state volume.
    let scratch = tempfile::tempdir()?;
    let blob = scratch.path().join("blob.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&blob)?);
        let mut block = vec![0u8; 1 << 20];
        // xorshift64: incompressible enough, no dependency.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
        for _ in 0..mib {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block)?;
        }
        f.flush()?;
    }
    let want = sha256_file(&blob)?;
    for ct in containers.values() {
        docker(&[
            "cp",
            blob.to_str().context("utf-8 path")?,
            &format!("{}:/home/node/.openclaw/blob.bin", ct.id),
        ])?;
    }
    server.cli(&["uncordon", "host", &b]).ok();

    let started = Instant::now();
    let out = server
        .cli_within(
            &["drain", "host", &a, "--timeout", "30m"],
            Duration::from_secs(40 * 60),
        )
        .context("the drain did not end")?;
    let took = started.elapsed();
    ensure!(
        out.code == 0,
        "drain failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    let drain = server.get_json(&format!("/api/v1/hosts/{a}/drain"));
    let replicas = drain["replicas"].as_array().context("no replicas")?;
    let mut bytes = 0u64;
    let mut rates = Vec::new();
    for r in replicas {
        let (Some(b), Some(ms)) = (r["bytes"].as_u64(), r["transferMillis"].as_u64()) else {
            bail!("a replica without transfer figures: {r}");
        };
        bytes += b;
        rates.push(b as f64 / 1e6 / (ms.max(1) as f64 / 1000.0));
    }
    rates.sort_by(|x, y| x.total_cmp(y));

    // Every replica's file arrived intact on b.
    let (_, moved) = wait_ready(&server, &scope, "big", REPLICAS)?;
    for (replica, ct) in &moved {
        ensure!(ct.host == b, "{replica} is on {} after the drain", ct.host);
        let dest = scratch.path().join(format!("{replica}.bin"));
        docker(&[
            "cp",
            &format!("{}:/home/node/.openclaw/blob.bin", ct.id),
            dest.to_str().context("utf-8 path")?,
        ])?;
        ensure!(
            sha256_file(&dest)? == want,
            "{replica}'s state arrived changed"
        );
        std::fs::remove_file(&dest)?;
    }
    println!(
        "drain of a host with {REPLICAS} replicas x {mib} MiB of state (real Docker, maxUnavailable 1): {:.1}s, {:.0} MiB moved, {:.1} MB/s over the whole drain; per-replica transfer median {:.1} MB/s, slowest {:.1} MB/s",
        took.as_secs_f64(),
        bytes as f64 / (1024.0 * 1024.0),
        bytes as f64 / 1e6 / took.as_secs_f64(),
        rates[rates.len() / 2],
        rates[0]
    );
    drop(agents);
    drop(cleanup);
    Ok(())
}
