//! Several `clusterclaw server` processes on one PostgreSQL database (a schema of its own per
//! test), for the HA tests and benchmarks: the servers, their view of the leader lease, and
//! where the scheduler placed replicas.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::agent::{Scope, wait_for};
use crate::server::TestServer;

/// The lease of the servers under test (the leader renews every third of it).
pub const LEASE: Duration = Duration::from_secs(3);
/// The schema type of [`database`].
pub use crate::postgres::TestSchema as Schema;

/// The database URL of a fresh schema (the password in a file), or why there is none.
pub fn database(scratch: &std::path::Path) -> Result<(Schema, String, String), String> {
    crate::postgres::database(scratch, "ha")
}

/// One more server on the database, its agent port on `port`; `first` is the server that
/// made the admin token.
pub fn server(
    store: &str,
    password_file: &str,
    port: u16,
    first: Option<&TestServer>,
) -> TestServer {
    let lease = format!("{}s", LEASE.as_secs());
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "--store",
        store,
        "--store-password-file",
        password_file,
        "--lease-duration",
        &lease,
        "--heartbeat-timeout",
        "10s",
    ];
    match first {
        None => TestServer::start_on(&listen, &args),
        Some(first) => TestServer::start_joining(&listen, &args, first),
    }
    .unwrap()
}

/// `/readyz`'s view of the lease: (leading, holder, epoch, this server's id).
pub fn lease_view(server: &TestServer) -> Option<(bool, String, u64, String)> {
    let r = server.http("GET", "/readyz", None, None);
    let l = r.json().get("leader")?.clone();
    Some((
        l["leading"].as_bool()?,
        l["holder"].as_str()?.to_string(),
        l["epoch"].as_u64()?,
        l["server"].as_str()?.to_string(),
    ))
}

pub fn wait_leading(server: &TestServer, timeout: Duration) -> anyhow::Result<(u64, String)> {
    wait_for("the server to lead", timeout, || {
        Ok(lease_view(server)
            .filter(|(leading, ..)| *leading)
            .map(|(_, _, epoch, id)| (epoch, id)))
    })
}

/// The hosts the replicas of an instance are placed on (from its status), by replica.
pub fn placements(server: &TestServer, scope: &Scope, name: &str) -> BTreeMap<String, String> {
    let r = server.http(
        "GET",
        &scope.instance_path(name),
        None,
        Some(server.admin_token()),
    );
    if r.status != 200 {
        return BTreeMap::new();
    }
    r.json()
        .pointer("/status/replicaStatus")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| {
                    let host = r["host"].as_str().filter(|h| !h.is_empty())?;
                    Some((r["name"].as_str()?.to_string(), host.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn wait_placed(
    server: &TestServer,
    scope: &Scope,
    name: &str,
    host: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_for(&format!("{name} placed on {host}"), timeout, || {
        let p = placements(server, scope, name);
        Ok((p.len() == 1 && p.values().all(|h| h == host)).then_some(()))
    })
}

/// One round of leader failover: `kill -9` of `servers[leader]`, an instance (`name`, one
/// replica of `image`) applied through the other at once, and the wait until the new leader's
/// scheduler placed it on `host` (its first decision). Returns the time from the kill to that
/// placement. The killed server stays down.
pub fn failover_round(
    servers: &mut [TestServer],
    leader: usize,
    scope: &Scope,
    image: &str,
    host: &str,
    name: &str,
) -> anyhow::Result<Duration> {
    let follower = 1 - leader;
    let killed = std::time::Instant::now();
    servers[leader].kill();
    let m = scope.instance_manifest(name, image, 1, &BTreeMap::new());
    scope.apply_http(&servers[follower], &m);
    wait_placed(&servers[follower], scope, name, host, LEASE * 4)
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", servers[follower].log()))?;
    Ok(killed.elapsed())
}
