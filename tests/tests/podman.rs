//! End to end on Podman: the real server and agent (`--runtime podman`) against a real `podman system service` socket and the stand-in OpenClaw image.
//!
//! The tests skip when there is no `podman` command, unless `CI=true` (then they fail):
//! `tests/podman-setup.sh` installs and configures Podman. Every object the agents create
//! carries the test's own tenant label and is removed through `podman` (and `docker`) on drop.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use clusterclaw_tests::agent::*;
use clusterclaw_tests::ensure_standin_versions;
use clusterclaw_tests::podman::{
    PodmanService, copy_to_podman, ensure_standin_in_podman, podman, podman_available,
};
use clusterclaw_tests::server::TestServer;
use serde_json::Value;

fn inspect(id: &str) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_str(&podman(&["inspect", id])?)?;
    Ok(v[0].clone())
}

/// One replica on Podman: created hardened and Ready; a version upgrade snapshots the state
/// volume (archive download) and replaces the container; a downgrade restores the snapshot
/// (archive upload); delete removes the container, the volume and the tenant network.
#[test]
fn podman_lifecycle() -> anyhow::Result<()> {
    if !podman_available()? {
        return Ok(());
    }
    let versions = ensure_standin_versions()?;
    ensure_standin_in_podman()?;
    copy_to_podman(&versions.v1)?;
    copy_to_podman(&versions.v2)?;
    let service = PodmanService::start()?;

    let scope = Scope::podman("e2e-podman");
    let cleanup = DockerCleanup::tenant_on("podman", &scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("podman-host");
    let url = service.url();
    let agent = {
        let mut agent = TestAgent::enroll(
            &server,
            port,
            &token,
            &[
                "--name",
                &host_name,
                "--runtime",
                "podman",
                "--docker-host",
                &url,
            ],
        )?;
        let host = agent.wait_enrolled()?;
        cleanup.host(&host);
        agent
    };
    let result = (|| -> anyhow::Result<()> {
        wait_host_ready(&server, &host_name)?;
        wait_for("the host to report Podman ready", WAIT, || {
            let v = server.get_json(&format!("/api/v1/hosts/{host_name}"));
            let ready = v
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|c| c.iter().find(|c| c["type"] == "RuntimeReady"))
                .filter(|c| c["status"] == "True")
                .map(Value::to_string);
            Ok(ready.filter(|c| c.to_lowercase().contains("podman")))
        })?;

        let name = "bot";
        scope.apply(&server, "base", &scope.base_manifest());
        let manifest = |image: &str| {
            scope.instance_manifest(
                name,
                image,
                1,
                &BTreeMap::from([("OPENCLAW_E2E", "podman")]),
            ) + "  config:\n    gateway:\n      mode: local\n"
                + "  updateStrategy:\n    type: Rolling\n    maxUnavailable: 1\n    minReadySeconds: 0\n"
        };
        scope.apply(&server, name, &manifest(&versions.v1));
        let (status, first) = wait_ready(&server, &scope, name, 1)?;
        let replica = format!("{name}-0");
        let c = &first[&replica];
        let r = &status["status"]["replicaStatus"][0];
        assert_eq!(r["containerId"].as_str(), Some(c.id.as_str()), "{r}");
        assert_eq!(r["host"].as_str(), Some(host_name.as_str()), "{r}");

        // The container is as hardened as on Docker.
        let inspected = inspect(&c.id)?;
        let hc = &inspected["HostConfig"];
        assert_eq!(hc["ReadonlyRootfs"], true, "{hc}");
        assert_eq!(
            hc.pointer("/PortBindings/18789~1tcp/0/HostIp")
                .and_then(Value::as_str),
            Some("127.0.0.1"),
            "{hc}"
        );
        let caps = hc["CapDrop"].to_string().to_uppercase();
        assert!(caps.contains("ALL") || caps.contains("CAP_"), "{hc}");
        let port_of = |c: &Container| c.port.context("a published port");
        let gw = port_of(c)?;
        let info = gateway_get(gw, "/standin/info")?;
        assert_eq!(info["schema"], 1, "{info}");
        assert_eq!(info["env"]["OPENCLAW_E2E"], "podman", "{info}");
        standin_put_file(gw, "note.txt", "kept\n")?;

        // Status reports carry the container's figures (engine stats).
        wait_for("container stats in the status", WAIT, || {
            let v = scope.instance(&server, name);
            let r = &v["status"]["replicaStatus"][0];
            Ok(r.get("memoryBytes")
                .or_else(|| r.pointer("/stats/memoryBytes"))
                .and_then(Value::as_u64)
                .filter(|m| *m > 0)
                .map(drop))
        })
        .ok();

        // Upgrade: the state is snapshotted, the container replaced, the volume kept.
        scope.apply(&server, name, &manifest(&versions.v2));
        let upgraded = wait_for("the container replaced on 2026.2.1", WAIT, || {
            let (_, now) = wait_ready(&server, &scope, name, 1)?;
            let info = gateway_get(port_of(&now[&replica])?, "/standin/info")?;
            Ok((now[&replica].id != c.id && info["schema"] == 2).then_some(now))
        })?;
        assert_eq!(
            upgraded[&replica].volume, c.volume,
            "the state volume is kept"
        );
        let gw = port_of(&upgraded[&replica])?;
        assert_eq!(standin_file(gw, "note.txt")?.as_deref(), Some("kept\n"));
        let snapshots = wait_for("the snapshot in the status", WAIT, || {
            let v = scope.instance(&server, name);
            let s = v["status"]["replicaStatus"][0]["snapshots"].clone();
            Ok(s.as_array().is_some_and(|a| !a.is_empty()).then_some(s))
        })?;
        assert!(
            snapshots.to_string().contains("2026.1.1"),
            "a snapshot of the 2026.1.1 state: {snapshots}"
        );
        standin_put_file(gw, "later.txt", "on 2026.2.1\n")?;

        // Downgrade: the snapshot is restored into the same volume.
        scope.apply(&server, name, &manifest(&versions.v1));
        let restored = wait_for("the container back on 2026.1.1", WAIT, || {
            let (_, now) = wait_ready(&server, &scope, name, 1)?;
            let info = gateway_get(port_of(&now[&replica])?, "/standin/info")?;
            Ok((info["schema"] == 1).then_some(now))
        })?;
        let gw = port_of(&restored[&replica])?;
        assert_eq!(standin_file(gw, "note.txt")?.as_deref(), Some("kept\n"));
        assert_eq!(standin_file(gw, "later.txt")?, None, "the snapshot's state");
        assert_eq!(restored[&replica].volume, c.volume);

        // Delete: container, volume and network go.
        scope.delete(&server, name);
        wait_for("everything of the instance to go", WAIT, || {
            Ok((scope.containers(name)?.is_empty()
                && scope.volumes()?.is_empty()
                && scope.networks()?.is_empty())
            .then_some(()))
        })?;
        Ok(())
    })();
    if let Err(err) = &result {
        eprintln!(
            "{err:#}\n--- agent log:\n{}\n--- podman service log:\n{}",
            agent.log(),
            service.log()
        );
    }
    result?;
    assert!(
        !agent.log().contains("\"level\":\"ERROR\""),
        "no errors: {}",
        agent.log()
    );
    Ok(())
}

/// SHA-256 of a file, in hex.
fn sha256_file(path: &Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `mib` MiB of incompressible bytes in `path`.
fn random_file(path: &Path, mib: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut block = vec![0u8; 1 << 20];
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
    Ok(f.flush()?)
}

/// Where the stand-in keeps its state, inside the container.
const STATE_DIR: &str = "/home/node/.openclaw";

/// A replica's state volume carried by drains between a Docker host and a Podman host, both
/// ways, through the control plane: a Docker agent and a Podman agent (`--runtime podman`
/// against a real `podman system service`) on one server. The replica starts on the Docker
/// host with a state file and an 8 MiB blob; `drain host` of the Docker host moves it to the
/// Podman host (Docker reads the volume out, Podman's archive API writes it in), then `drain
/// host` of the Podman host moves it back (Podman reads it out). After each move the replica
/// is Ready on the other engine with its file and a blob of the same SHA-256, the drain says
/// the transfer was checksummed, and the volume it left is removed from the engine it left.
#[test]
fn a_drain_carries_state_between_docker_and_podman() -> anyhow::Result<()> {
    if !podman_available()? {
        return Ok(());
    }
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    ensure_standin_in_podman()?;
    let service = PodmanService::start()?;

    let on_docker = Scope::new("e2e-pdrain");
    let on_podman = Scope {
        cli: "podman",
        tenant: on_docker.tenant.clone(),
        project: on_docker.project.clone(),
    };
    let docker_cleanup = DockerCleanup::tenant(&on_docker.tenant);
    let podman_cleanup = DockerCleanup::tenant_on("podman", &on_docker.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 2, "10m");
    let d_name = unique("pdr-docker");
    let mut d_agent = TestAgent::enroll(&server, port, &token, &["--name", &d_name])?;
    let d = d_agent.wait_enrolled()?;
    docker_cleanup.host(&d);
    let p_name = unique("pdr-podman");
    let url = service.url();
    let mut p_agent = TestAgent::enroll(
        &server,
        port,
        &token,
        &[
            "--name",
            &p_name,
            "--runtime",
            "podman",
            "--docker-host",
            &url,
        ],
    )?;
    let p = p_agent.wait_enrolled()?;
    podman_cleanup.host(&p);

    let result = (|| -> anyhow::Result<()> {
        wait_host_ready(&server, &d)?;
        wait_host_ready(&server, &p)?;
        let name = "bot";
        let replica = format!("{name}-0");
        on_docker.apply(&server, "base", &on_docker.base_manifest());
        // It starts on the Docker host.
        server.cli(&["cordon", "host", &p]).ok();
        let manifest = on_docker.instance_manifest(
            name,
            &image,
            1,
            &BTreeMap::from([("OPENCLAW_E2E", "podman-drain")]),
        );
        on_docker.apply(&server, name, &manifest);
        let (_, first) = wait_ready(&server, &on_docker, name, 1)?;
        let ct = &first[&replica];
        assert_eq!(ct.host, d, "{replica} starts on the Docker host");
        let marker = format!("state of {replica} {}", unique("x"));
        standin_put_file(ct.port.expect("a published port"), "marker.txt", &marker)?;
        let scratch = tempfile::tempdir()?;
        let blob = scratch.path().join("blob.bin");
        random_file(&blob, 8)?;
        let want = sha256_file(&blob)?;
        docker(&[
            "cp",
            blob.to_str().expect("utf-8 path"),
            &format!("{}:{STATE_DIR}/blob.bin", ct.id),
        ])?;
        server.cli(&["uncordon", "host", &p]).ok();

        // Docker -> Podman, then Podman -> Docker.
        let legs = [
            (&d, &p, &on_docker, &on_podman),
            (&p, &d, &on_podman, &on_docker),
        ];
        for (from, to, from_scope, to_scope) in legs {
            let out = server
                .cli_within(
                    &["drain", "host", from, "--timeout", "3m"],
                    Duration::from_secs(240),
                )
                .expect("the drain ended in time");
            println!(
                "drain {from} ({}):\n{}\n{}",
                from_scope.cli, out.stdout, out.stderr
            );
            assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
            assert!(out.stdout.contains("drained"), "{}", out.stdout);
            assert!(out.stdout.contains("sha256"), "{}", out.stdout);
            let (_, now) = wait_ready(&server, to_scope, name, 1)?;
            let ct = &now[&replica];
            assert_eq!(&ct.host, to, "{replica} runs on {to} ({})", to_scope.cli);
            let gw = ct.port.expect("a published port");
            assert_eq!(
                standin_file(gw, "marker.txt")?.as_deref(),
                Some(marker.as_str()),
                "{replica}'s state file on {}",
                to_scope.cli
            );
            assert_eq!(
                gateway_get(gw, "/standin/info")?["env"]["OPENCLAW_E2E"],
                "podman-drain"
            );
            let copy = scratch.path().join(format!("from-{}.bin", from_scope.cli));
            engine_cli(
                to_scope.cli,
                &[
                    "cp",
                    &format!("{}:{STATE_DIR}/blob.bin", ct.id),
                    copy.to_str().expect("utf-8 path"),
                ],
            )?;
            assert_eq!(
                sha256_file(&copy)?,
                want,
                "{replica}'s blob arrived changed on {}",
                to_scope.cli
            );
            // The host it left keeps no copy: its container and volume are gone.
            wait_for(
                &format!("{replica}'s volume removed from {}", from_scope.cli),
                WAIT,
                || {
                    Ok((from_scope.containers(name)?.is_empty()
                        && from_scope.volumes()?.is_empty())
                    .then_some(()))
                },
            )?;
            server.cli(&["uncordon", "host", from]).ok();
        }
        Ok(())
    })();
    if let Err(err) = &result {
        eprintln!(
            "{err:#}\n--- docker agent log:\n{}\n--- podman agent log:\n{}\n--- podman service log:\n{}",
            d_agent.log(),
            p_agent.log(),
            service.log()
        );
    }
    result?;
    for (which, agent) in [("docker", &d_agent), ("podman", &p_agent)] {
        assert!(
            !agent.log().contains("\"level\":\"ERROR\""),
            "no errors from the {which} agent: {}",
            agent.log()
        );
    }
    drop(d_agent);
    drop(p_agent);
    drop(docker_cleanup);
    drop(podman_cleanup);
    Ok(())
}
