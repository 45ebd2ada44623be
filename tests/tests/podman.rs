//! End to end on Podman: the real server and agent (`--runtime podman`) against a real `podman system service` socket and the stand-in OpenClaw image.
//!
//! The test skips when there is no `podman` command, unless `CI=true` (then it fails):
//! `tests/podman-setup.sh` installs and configures Podman. Every object the agent creates
//! carries the test's own tenant label and is removed through `podman` on drop.

use std::collections::BTreeMap;

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
