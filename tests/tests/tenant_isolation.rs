//! End to end: containers of different tenants on one host share no Docker network and cannot reach each other, while containers of one tenant can.
//!
//! The real server and agent binaries place two replicas of two tenants each on one host. The
//! test then reads what the engine says (`docker inspect` of containers and networks) and probes
//! reachability from inside the containers with `docker exec ... openclaw-standin connect`, the
//! stand-in image having no shell. Every refused probe is paired with one that must succeed over
//! the same path, so a broken probe cannot pass for isolation.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use clusterclaw_agent::runtime::spec;
use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;
use serde_json::Value;

/// The Gateway's port inside a container.
const GATEWAY_PORT: u16 = 18789;
/// How long one probe waits for a TCP connection before calling it unreachable.
const PROBE_TIMEOUT_MS: &str = "2000";
const STANDIN_BIN: &str = "/usr/local/bin/openclaw-standin";

/// What the engine says about one container's networking.
#[derive(Debug)]
struct Networking {
    id: String,
    replica: String,
    tenant: String,
    /// Network name → (container IP, network gateway IP).
    networks: BTreeMap<String, (String, String)>,
    network_mode: String,
    /// Host addresses the Gateway port is published on: (host IP, host port), as configured
    /// and as bound.
    published: Vec<(String, u16)>,
}

fn inspect_container(id: &str) -> anyhow::Result<Networking> {
    let v: Value = serde_json::from_str(&docker(&["inspect", id])?)?;
    let c = &v[0];
    let text = |p: &str| {
        c.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let networks = c
        .pointer("/NetworkSettings/Networks")
        .and_then(Value::as_object)
        .context("no NetworkSettings.Networks")?
        .iter()
        .map(|(name, n)| {
            let field = |k: &str| n[k].as_str().unwrap_or_default().to_owned();
            (name.clone(), (field("IPAddress"), field("Gateway")))
        })
        .collect();
    let mut published = Vec::new();
    for source in ["/HostConfig/PortBindings", "/NetworkSettings/Ports"] {
        let bindings = c
            .pointer(source)
            .and_then(Value::as_object)
            .with_context(|| format!("container {id}: no {source}"))?;
        for (port, list) in bindings {
            ensure!(
                port == &format!("{GATEWAY_PORT}/tcp"),
                "container {id}: {source} publishes {port}, only {GATEWAY_PORT}/tcp is expected"
            );
            for b in list.as_array().into_iter().flatten() {
                let host_port = b["HostPort"].as_str().unwrap_or_default();
                published.push((
                    b["HostIp"].as_str().unwrap_or_default().to_owned(),
                    host_port
                        .parse()
                        .with_context(|| format!("container {id}: HostPort {host_port:?}"))?,
                ));
            }
        }
    }
    published.sort();
    published.dedup();
    Ok(Networking {
        id: id.to_owned(),
        replica: text("/Config/Labels/io.clusterclaw.replica"),
        tenant: text("/Config/Labels/io.clusterclaw.tenant"),
        networks,
        network_mode: text("/HostConfig/NetworkMode"),
        published,
    })
}

/// The only network a container is on: its name, its IP there and that network's gateway.
fn only_network(c: &Networking) -> anyhow::Result<(&str, &str, &str)> {
    ensure!(
        c.networks.len() == 1,
        "{} ({}) is on {} networks: {:?}",
        c.replica,
        c.tenant,
        c.networks.len(),
        c.networks.keys()
    );
    let (name, (ip, gateway)) = c.networks.iter().next().context("no network")?;
    Ok((name, ip, gateway))
}

/// From inside `from`, tries to open a TCP connection to `to`. `Ok(true)` when it connects,
/// `Ok(false)` when it is refused or times out; an error when the probe itself did not run.
fn can_connect(from: &Networking, to: &str) -> anyhow::Result<bool> {
    let out = Command::new("docker")
        .args(["exec", &from.id, STANDIN_BIN, "connect", to])
        .args(["--timeout-ms", PROBE_TIMEOUT_MS])
        .output()
        .context("run docker exec")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "{} ({}) -> {to}: {}",
        from.replica,
        from.tenant,
        stdout.trim()
    );
    match out.status.code() {
        Some(0) if stdout.starts_with("connected to") => Ok(true),
        Some(1) if stdout.starts_with("cannot connect to") => Ok(false),
        other => bail!(
            "the probe from {} to {to} did not run (exit {other:?}): {stdout}{stderr}",
            from.replica
        ),
    }
}

fn ip_port(ip: &str, port: u16) -> String {
    format!("{ip}:{port}")
}

// -------------------------------------------------------------------- tests

/// Two tenants with two replicas each on one host: each tenant's containers sit on that tenant's
/// own bridge network and nothing else, publish the Gateway on 127.0.0.1 only, reach each other,
/// and reach neither the other tenant's containers nor the other tenant's published ports.
#[test]
fn tenants_share_no_network_and_cannot_reach_each_other() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let tenants = [Scope::new("iso-a"), Scope::new("iso-b")];
    let cleanup = DockerCleanup::tenant(&tenants[0].tenant);
    cleanup.add(&format!("io.clusterclaw.tenant={}", tenants[1].tenant));
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("iso-host");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;

    let name = "bot";
    for scope in &tenants {
        scope.apply(&server, "base", &scope.base_manifest());
        scope.apply(
            &server,
            name,
            &scope.instance_manifest(name, &image, 2, &BTreeMap::new()),
        );
    }
    // Tenant → its two containers, in replica order.
    let mut by_tenant: Vec<Vec<Networking>> = Vec::new();
    for scope in &tenants {
        let (_, containers) = wait_ready(&server, scope, name, 2)?;
        let mut inspected = Vec::new();
        for c in containers.values() {
            ensure!(c.host == host, "{c:?} is not on host {host}");
            let n = inspect_container(&c.id)?;
            ensure!(n.tenant == scope.tenant, "{n:?}");
            inspected.push(n);
        }
        by_tenant.push(inspected);
    }

    // What the engine says: one tenant network per tenant, each container on its tenant's
    // network only, the Gateway published on loopback only.
    let mut tenant_networks = Vec::new();
    let owner = agent.identity()?.owner().map_err(anyhow::Error::msg)?;
    for (scope, containers) in tenants.iter().zip(&by_tenant) {
        let expected = spec::network_name(&owner, &scope.tenant);
        for c in containers {
            let (network, ip, _) = only_network(c)?;
            ensure!(
                network == expected,
                "{} is on {network}, not its tenant's network {expected}",
                c.replica
            );
            ensure!(
                c.network_mode == expected,
                "{}: network mode {:?}",
                c.replica,
                c.network_mode
            );
            ensure!(!ip.is_empty(), "{} has no IP on {network}", c.replica);
            ensure!(
                !c.published.is_empty() && c.published.iter().all(|(ip, _)| ip == "127.0.0.1"),
                "{}: the Gateway must be published on 127.0.0.1 only, found {:?}",
                c.replica,
                c.published
            );
        }
        let v: Value = serde_json::from_str(&docker(&["network", "inspect", &expected])?)?;
        let net = &v[0];
        ensure!(net["Driver"] == "bridge", "{expected}: {net}");
        ensure!(
            net["Attachable"] == false && net["Ingress"] == false,
            "{expected} must not be attachable: {net}"
        );
        ensure!(
            net.pointer("/Labels/io.clusterclaw.tenant")
                .and_then(Value::as_str)
                == Some(scope.tenant.as_str()),
            "{expected} is not labelled with its tenant: {net}"
        );
        let members: BTreeSet<String> = net["Containers"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let own: BTreeSet<String> = containers.iter().map(|c| c.id.clone()).collect();
        ensure!(
            members == own,
            "{expected} holds {members:?}, expected exactly its tenant's containers {own:?}"
        );
        tenant_networks.push(expected);
    }
    ensure!(
        tenant_networks[0] != tenant_networks[1],
        "the two tenants share {}",
        tenant_networks[0]
    );
    let networks_of = |containers: &[Networking]| -> BTreeSet<String> {
        containers
            .iter()
            .flat_map(|c| c.networks.keys().cloned())
            .collect()
    };
    let shared: Vec<String> = networks_of(&by_tenant[0])
        .intersection(&networks_of(&by_tenant[1]))
        .cloned()
        .collect();
    ensure!(shared.is_empty(), "the tenants share networks {shared:?}");

    // From inside the containers. A host listener on all addresses shows that a container can
    // reach the host through its network's gateway at all.
    let host_listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    let host_port = host_listener.local_addr()?.port();
    for (t, own) in by_tenant.iter().enumerate() {
        let other = &by_tenant[1 - t];
        let (from, peer) = (&own[0], &own[1]);
        let (_, _, gateway) = only_network(from)?;
        let (_, peer_ip, _) = only_network(peer)?;
        ensure!(
            can_connect(from, &ip_port(peer_ip, GATEWAY_PORT))?,
            "{} cannot reach {} of its own tenant at {peer_ip}: the probe does not work",
            from.replica,
            peer.replica
        );
        ensure!(
            can_connect(from, &ip_port(gateway, host_port))?,
            "{} cannot reach the host at {gateway}:{host_port}: the probe does not work",
            from.replica
        );
        for target in other {
            for (network, (ip, _)) in &target.networks {
                ensure!(
                    !can_connect(from, &ip_port(ip, GATEWAY_PORT))?,
                    "{} of tenant {} reached {} of tenant {} at {ip} on {network}",
                    from.replica,
                    from.tenant,
                    target.replica,
                    target.tenant
                );
            }
            // A port published on the host's loopback is not reachable through the gateway.
            for (_, published) in &target.published {
                ensure!(
                    !can_connect(from, &ip_port(gateway, *published))?,
                    "{} of tenant {} reached the published port {published} of {} (tenant {}) \
                     through the gateway {gateway}",
                    from.replica,
                    from.tenant,
                    target.replica,
                    target.tenant
                );
            }
        }
    }
    drop(host_listener);

    // The Gateways still answer on their published ports.
    for c in by_tenant.iter().flatten() {
        let (_, port) = c.published[0];
        let ready = gateway_get(port, "/readyz")?;
        ensure!(ready["ready"] == true, "{}: {ready}", c.replica);
    }
    Ok(())
}
