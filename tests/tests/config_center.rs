//! End to end: the config center with the real server and agent binaries, real mutual TLS,
//! real Docker and the stand-in Gateway: layered openclaw.json reaching containers,
//! revisions, rollback, secrets in the environment, and drift put back by the agent.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;
use serde_json::Value;

/// The config file the agent wrote for a replica (`<data dir>/replicas/<t>.<p>.<replica>/`).
fn config_file(agent_dir: &Path, scope: &Scope, replica: &str) -> PathBuf {
    agent_dir
        .join("replicas")
        .join(format!("{}.{}.{replica}", scope.tenant, scope.project))
        .join("openclaw.json")
}

/// A replica's config revision and sync state.
type ReplicaConfig = (Option<u64>, Option<String>);

/// The instance's config revision, and each replica's.
fn revisions(server: &TestServer, scope: &Scope, name: &str) -> (Option<u64>, Vec<ReplicaConfig>) {
    let v = scope.instance(server, name);
    let replicas = v
        .pointer("/status/replicaStatus")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["configRevision"].as_u64(),
                        r["configSync"].as_str().map(str::to_string),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (
        v.pointer("/status/configRevision").and_then(Value::as_u64),
        replicas,
    )
}

fn wait_revision(server: &TestServer, scope: &Scope, name: &str, rev: u64) -> anyhow::Result<()> {
    wait_for(
        &format!("{name} running revision {rev}, in sync"),
        WAIT,
        || {
            let (current, replicas) = revisions(server, scope, name);
            Ok((current == Some(rev)
                && !replicas.is_empty()
                && replicas
                    .iter()
                    .all(|(r, s)| *r == Some(rev) && s.as_deref() == Some("InSync")))
            .then_some(()))
        },
    )
}

/// Waits for a new container of `replica` (another id than `old`) that is Ready, and returns
/// what the stand-in saw.
fn replaced(
    server: &TestServer,
    scope: &Scope,
    name: &str,
    replica: &str,
    old: &str,
) -> anyhow::Result<(Container, Value)> {
    wait_for(&format!("{replica} replaced"), WAIT, || {
        let (status, now) = wait_ready(server, scope, name, 1)?;
        let Some(c) = now.get(replica).filter(|c| c.id != old) else {
            return Ok(None);
        };
        // The status must speak of the new container (not still of the old one), and the
        // Gateway in it must answer.
        let reported = status["status"]["replicaStatus"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| {
                r["name"] == replica && r["containerId"] == c.id.as_str() && r["state"] == "Ready"
            });
        let Some(port) = c.port.filter(|_| reported) else {
            return Ok(None);
        };
        Ok(gateway_get(port, "/standin/info")
            .ok()
            .map(|info| (c.clone(), info)))
    })
}

#[test]
fn layers_secrets_revisions_rollback_and_drift() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-cfg");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("cfg-host");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;
    scope.apply(&server, "base", &scope.base_manifest());

    // A template, a tenant layer in JSON5, and a secret.
    let t = &scope.tenant;
    let template = server.write_file("default.json5", "{\n  // every Gateway\n  logging: { level: 'info' },\n  session: { scope: 'per-sender' },\n}\n");
    server
        .cli(&[
            "config",
            "set",
            "template",
            "default",
            "-f",
            template.to_str().unwrap(),
            "-m",
            "platform defaults",
        ])
        .ok();
    let tenant_layer = server.write_file("tenant.json5", "{ logging: { level: 'debug' } }");
    server
        .cli(&[
            "config",
            "set",
            "tenant",
            t,
            "-f",
            tenant_layer.to_str().unwrap(),
        ])
        .ok();
    let key_file = server.write_file("anthropic.key", "sk-ant-e2e-first\n");
    let set_secret = || {
        let from = format!("anthropic={}", key_file.display());
        server
            .cli(&[
                "secret",
                "set",
                "llm-keys",
                "-t",
                t,
                "-p",
                "",
                "--from-file",
                &from,
            ])
            .ok()
    };
    let out = set_secret();
    assert!(!out.stdout.contains("sk-ant-e2e-first"), "{}", out.stdout);

    let name = "bot";
    let manifest = format!(
        "{}  env:\n    OPENCLAW_GATEWAY_TOKEN:\n      secretRef: {{name: llm-keys, key: anthropic}}\n  config:\n    gateway:\n      auth:\n        mode: token\n",
        scope.instance_manifest(name, &image, 1, &BTreeMap::new())
    );
    scope.apply(&server, name, &manifest);
    let (_, first) = wait_ready(&server, &scope, name, 1)?;
    let replica = format!("{name}-0");
    let c1 = first[&replica].clone();
    let info = gateway_get(c1.port.unwrap(), "/standin/info")?;
    assert_eq!(info["config"]["logging"]["level"], "debug", "{info}");
    assert_eq!(info["config"]["session"]["scope"], "per-sender", "{info}");
    assert_eq!(info["config"]["gateway"]["auth"]["mode"], "token", "{info}");
    assert_eq!(info["config"]["gateway"]["port"], 18789, "{info}");
    assert_eq!(info["env"]["OPENCLAW_GATEWAY_TOKEN"], "sk-ant-e2e-first");
    wait_revision(&server, &scope, name, 1)?;
    let listed = server
        .cli(&["get", "instances", "-t", t, "-p", &scope.project])
        .ok();
    assert!(listed.stdout.contains("rev 1 in-sync"), "{}", listed.stdout);

    // render --explain says where each key comes from.
    let explained = server
        .cli(&[
            "config",
            "render",
            "instance",
            name,
            "-t",
            t,
            "-p",
            &scope.project,
            "--explain",
        ])
        .ok();
    for source in ["configtemplate/default", &format!("tenant/{t}"), "builtin"] {
        assert!(explained.stdout.contains(source), "{}", explained.stdout);
    }

    // A template change reaches the replica: a new container with the new file.
    let template = server.write_file(
        "default.json5",
        "{ logging: { level: 'info' }, session: { scope: 'global' } }",
    );
    server
        .cli(&[
            "config",
            "set",
            "template",
            "default",
            "-f",
            template.to_str().unwrap(),
            "-m",
            "global sessions",
        ])
        .ok();
    let (c2, info) = replaced(&server, &scope, name, &replica, &c1.id)?;
    assert_eq!(info["config"]["session"]["scope"], "global", "{info}");
    wait_revision(&server, &scope, name, 2)?;
    let history = server
        .cli(&[
            "config",
            "history",
            "instance",
            name,
            "-t",
            t,
            "-p",
            &scope.project,
            "-o",
            "json",
        ])
        .ok()
        .json();
    let items = history["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{history}");
    assert_eq!(items[0]["message"], "global sessions");
    let diff = server
        .cli(&[
            "config",
            "diff",
            "instance",
            name,
            "1",
            "2",
            "-t",
            t,
            "-p",
            &scope.project,
            "--keys",
        ])
        .ok();
    assert!(diff.stdout.contains("session.scope"), "{}", diff.stdout);

    // A new secret value replaces the replica; the value never shows in the API or the log.
    fs::write(&key_file, "sk-ant-e2e-second\n")?;
    set_secret();
    let (c3, info) = replaced(&server, &scope, name, &replica, &c2.id)?;
    assert_eq!(info["env"]["OPENCLAW_GATEWAY_TOKEN"], "sk-ant-e2e-second");
    // The new value is a new revision of the instance.
    wait_revision(&server, &scope, name, 3)?;
    let secret = server.get_json(&format!("/api/v1/tenants/{t}/secrets/llm-keys"));
    assert!(!secret.to_string().contains("sk-ant-e2e"), "{secret}");
    assert!(
        !server.log().contains("sk-ant-e2e"),
        "the server log holds a secret"
    );
    assert!(
        !agent.log().contains("sk-ant-e2e"),
        "the agent log holds a secret"
    );

    // Drift: a hand-edited file is put back and the replica replaced, with an audit record.
    let file = config_file(agent.data_dir(), &scope, &replica);
    let good = fs::read(&file)?;
    fs::write(
        &file,
        br#"{"gateway":{"port":18789,"bind":"lan"},"logging":{"level":"trace"}}"#,
    )?;
    let (_, info) = replaced(&server, &scope, name, &replica, &c3.id)?;
    assert_eq!(fs::read(&file)?, good, "the file is put back");
    assert_eq!(info["config"]["logging"]["level"], "debug", "{info}");
    let audit = wait_for("the repair in the audit log", WAIT, || {
        let a = server.get_json("/api/v1/audit?limit=100");
        Ok(a.to_string().contains("ConfigDriftRepaired").then_some(a))
    })?;
    assert!(audit.to_string().contains(&host), "{audit}");

    // Rollback to revision 1: the effective config of revision 1, as revision 4.
    let (_, now) = wait_ready(&server, &scope, name, 1)?;
    let before = now[&replica].id.clone();
    let out = server
        .cli(&[
            "config",
            "rollback",
            "instance",
            name,
            "--to",
            "1",
            "-t",
            t,
            "-p",
            &scope.project,
        ])
        .ok();
    assert!(
        out.stdout.contains("rolled back to revision 1"),
        "{}",
        out.stdout
    );
    let (_, info) = replaced(&server, &scope, name, &replica, &before)?;
    assert_eq!(info["config"]["session"]["scope"], "per-sender", "{info}");
    wait_revision(&server, &scope, name, 4)?;

    // Bad input: a malformed file is refused with its line and column; nothing changes.
    let bad = server.write_file(
        "bad.json5",
        "{\n  logging: { level: 'x' \n  session: 1\n}\n",
    );
    let refused = server
        .cli(&["config", "set", "tenant", t, "-f", bad.to_str().unwrap()])
        .code(4);
    assert!(refused.stderr.contains("bad.json5:"), "{}", refused.stderr);
    assert_eq!(revisions(&server, &scope, name).0, Some(4));
    // The template is in use: not deleted, and the instance is named.
    let in_use = server.cli(&["delete", "configtemplate", "default"]).code(1);
    assert!(in_use.stderr.contains(name), "{}", in_use.stderr);
    Ok(())
}
