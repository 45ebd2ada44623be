//! End to end: `clusterclaw store migrate` moves a single-machine cluster (SQLite) to a real
//! PostgreSQL database (a schema of its own per test), and two servers on it take over.
//!
//! - A cluster with an agent on Docker, an instance whose env takes a secret, and audit
//!   records; the server stops, the store is migrated, two servers start on PostgreSQL with
//!   copies of its pki/ and secrets.key. The agent (which knew both addresses from the start)
//!   keeps its container (same id, never restarted), the instance stays Ready, the audit chain
//!   verifies on the target with the same head, and a new replica placed by the new servers
//!   gets the secret's value (the new servers open what the old one sealed).
//! - Bad input changes nothing: a missing or foreign data directory, a server still running,
//!   an unreachable target, a target that is not empty; a server on the target with another
//!   secrets key, or none, is refused.
//!
//! Without PostgreSQL or Docker the tests skip with the reason printed, unless `CI=true`.

use std::collections::BTreeMap;
use std::path::Path;

use clusterclaw_tests::agent::*;
use clusterclaw_tests::postgres::{TestSchema, database};
use clusterclaw_tests::server::{CliOutput, TestServer, clusterclaw_bin, copy_tree, run_cli};
use serde_json::Value;

/// What a server on PostgreSQL needs from the migrated data directory.
const SEED: [&str; 3] = ["pki", "secrets.key", "admin.token"];

fn skip(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the migration test cannot run: {why}");
    }
    eprintln!("skipped: {why}");
}

/// `clusterclaw store migrate --from DIR --to URL --to-password-file FILE`.
fn migrate(scratch: &Path, from: &Path, to: &str, password_file: &str) -> CliOutput {
    let from = from.display().to_string();
    run_cli(
        &clusterclaw_bin().unwrap(),
        scratch,
        &[
            "store",
            "migrate",
            "--from",
            &from,
            "--to",
            to,
            "--to-password-file",
            password_file,
        ],
        &[],
        None,
    )
}

/// A server on the migrated store, its agent port on `port`.
fn pg_server(
    store: &str,
    password_file: &str,
    port: u16,
    from: &Path,
) -> anyhow::Result<TestServer> {
    TestServer::start_seeded(
        &format!("127.0.0.1:{port}"),
        &[
            "--store",
            store,
            "--store-password-file",
            password_file,
            "--lease-duration",
            "3s",
        ],
        from,
        &SEED,
    )
}

/// The `Env` of a container.
fn container_env(id: &str) -> String {
    let v: Value = serde_json::from_str(&docker(&["inspect", id]).unwrap()).unwrap();
    v[0]["Config"]["Env"].to_string()
}

/// `(records, head)` of `clusterclaw audit verify` through `server`.
fn audit_verified(server: &TestServer) -> (String, String) {
    let out = server.cli(&["audit", "verify"]).ok();
    let line = out.stdout.trim().to_string();
    // audit log intact: N records, head H
    let records = line
        .split("intact: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_default()
        .to_string();
    let head = line.rsplit(' ').next().unwrap_or_default().to_string();
    assert!(!records.is_empty() && head.len() == 64, "{line}");
    (records, head)
}

#[test]
fn a_single_machine_cluster_moves_to_postgres_and_its_agent_keeps_its_containers() {
    let scratch = tempfile::tempdir().unwrap();
    let (_schema, store, password_file) = match database(scratch.path(), "migrate") {
        Ok(d) => d,
        Err(why) => return skip(&why),
    };
    let Some(image) = require_docker().unwrap() else {
        return skip("Docker is not available");
    };
    let scope = Scope::new("migrate");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let ports = [free_port(), free_port()];

    // The single-machine cluster: SQLite, an agent that also knows the second address.
    let mut single = TestServer::start_on(&format!("127.0.0.1:{}", ports[0]), &[]).unwrap();
    let token = join_token(&single, 1, "10m");
    let second = format!("https://127.0.0.1:{}", ports[1]);
    let host = unique("migrate");
    cleanup.host(&host);
    let mut agent = TestAgent::enroll(
        &single,
        ports[0],
        &token,
        &["--server", &second, "--name", &host],
    )
    .unwrap();
    assert_eq!(agent.wait_enrolled().unwrap(), host);
    wait_host_ready(&single, &host).unwrap();
    scope.apply(&single, "base", &scope.base_manifest());
    let value = format!("sk-migrate-{}", unique("secret"));
    single.set_secret(
        &scope.tenant,
        &scope.project,
        "llm-keys",
        "anthropic",
        &value,
    );
    let manifest = format!(
        "{}  env:\n    ANTHROPIC_API_KEY:\n      secretRef: {{name: llm-keys, key: anthropic}}\n",
        scope.instance_manifest("bot", &image, 1, &BTreeMap::new())
    );
    scope.apply(&single, "bot", &manifest);
    let (_, before) = wait_ready(&single, &scope, "bot", 1).unwrap();
    let before = before["bot-0"].clone();
    assert!(container_env(&before.id).contains(&value));
    let (records, head) = audit_verified(&single);
    assert!(records.parse::<u64>().unwrap() >= 4, "{records}");
    single.terminate().unwrap();

    // The migration, with its verification.
    let out = migrate(scratch.path(), single.data_dir(), &store, &password_file).ok();
    for line in [
        "table objects",
        "table audit",
        "table secret_values",
        "counter index",
        "certificate authority",
        "secrets key identity",
        "audit chain",
    ] {
        let row = out
            .stdout
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no {line:?} check:\n{}", out.stdout));
        assert!(row.ends_with(" ok"), "{row}");
    }
    assert!(!out.stdout.contains("MISMATCH"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&format!("{} records verified", records)),
        "{}",
        out.stdout
    );

    // Two servers on PostgreSQL, the first on the old agent port.
    let a = pg_server(&store, &password_file, ports[0], single.data_dir()).unwrap();
    let b = pg_server(&store, &password_file, ports[1], single.data_dir()).unwrap();
    wait_host_ready(&a, &host).unwrap();
    let (status, after) = wait_ready(&b, &scope, "bot", 1).unwrap();
    assert_eq!(
        (&after["bot-0"].id, &after["bot-0"].started_at),
        (&before.id, &before.started_at),
        "the agent kept its container"
    );
    assert_eq!(
        status.pointer("/status/phase"),
        Some(&Value::String("Running".into())),
        "{status}"
    );
    for server in [&a, &b] {
        let (n, h) = audit_verified(server);
        assert!(n.parse::<u64>().unwrap() >= records.parse().unwrap());
        if n == records {
            assert_eq!(h, head);
        }
    }
    // The new servers open what the old one sealed: a new replica gets the value.
    scope.scale(&b, "bot", 2);
    let (_, scaled) = wait_ready(&a, &scope, "bot", 2).unwrap();
    assert_eq!(scaled["bot-0"].id, before.id);
    assert!(
        container_env(&scaled["bot-1"].id).contains(&value),
        "the new replica has the secret's value"
    );
    assert_eq!(scaled["bot-1"].host, host);
    agent.kill9();
}

/// A single-machine data directory with one tenant and a secret, its server stopped.
fn stopped_cluster() -> TestServer {
    let single = TestServer::start().unwrap();
    let t = unique("mig");
    let manifest = single.write_file(
        "t.yaml",
        &format!("apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: {t}\n"),
    );
    single
        .cli(&["apply", "-f", manifest.to_str().unwrap()])
        .ok();
    single.set_secret(&t, "", "s", "k", "value");
    single
}

#[test]
fn a_migration_refuses_bad_input_and_changes_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let (schema, store, password_file) = match database(scratch.path(), "migbad") {
        Ok(d) => d,
        Err(why) => return skip(&why),
    };
    let dir = scratch.path();
    let empty = |s: &TestSchema| assert_eq!(s.tables(), Vec::<String>::new());

    // A data directory that does not exist, or is not a server's.
    let out = migrate(dir, &dir.join("missing"), &store, &password_file).code(2);
    assert!(
        out.stderr.contains("missing") && out.stderr.contains("data directory"),
        "{}",
        out.stderr
    );
    let out = migrate(dir, dir, &store, &password_file).code(2);
    assert!(
        out.stderr.contains("holds no clusterclaw.db"),
        "{}",
        out.stderr
    );
    empty(&schema);

    // A server still running on it.
    let mut single = stopped_cluster();
    let out = migrate(dir, single.data_dir(), &store, &password_file).code(1);
    assert!(
        out.stderr.contains("still runs")
            && out
                .stderr
                .contains(&format!("pid {}", single.pid().unwrap())),
        "{}",
        out.stderr
    );
    empty(&schema);
    single.terminate().unwrap();

    // An unreachable target.
    let nowhere = format!("postgres://clusterclaw@127.0.0.1:{}/nowhere", free_port());
    let out = migrate(dir, single.data_dir(), &nowhere, &password_file).code(3);
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);

    // A target that is not empty.
    let mut c = schema.config.connect(postgres::NoTls).unwrap();
    c.batch_execute(&format!("CREATE TABLE {}.unrelated (x INT)", schema.name))
        .unwrap();
    let out = migrate(dir, single.data_dir(), &store, &password_file).code(1);
    assert!(
        out.stderr.contains("is not empty") && out.stderr.contains("unrelated"),
        "{}",
        out.stderr
    );
    assert_eq!(schema.tables(), ["unrelated"]);
    c.batch_execute(&format!("DROP TABLE {}.unrelated", schema.name))
        .unwrap();

    // Into the empty target, once; a second time is refused.
    migrate(dir, single.data_dir(), &store, &password_file).ok();
    let tables = schema.tables();
    assert!(tables.contains(&"objects".to_string()), "{tables:?}");
    let out = migrate(dir, single.data_dir(), &store, &password_file).code(1);
    assert!(out.stderr.contains("is not empty"), "{}", out.stderr);
    assert_eq!(schema.tables(), tables);

    // A server on the target with another secrets key, or none, is refused and names the file.
    let other = TestServer::start().unwrap();
    let foreign = tempfile::tempdir().unwrap();
    for name in SEED {
        copy_tree(&single.data_dir().join(name), &foreign.path().join(name)).unwrap();
    }
    std::fs::copy(
        other.data_dir().join("secrets.key"),
        foreign.path().join("secrets.key"),
    )
    .unwrap();
    let args = [
        "--store",
        store.as_str(),
        "--store-password-file",
        password_file.as_str(),
    ];
    let e = TestServer::start_seeded("127.0.0.1:0", &args, foreign.path(), &SEED)
        .err()
        .expect("a server with another secrets key starts");
    let e = format!("{e:#}");
    assert!(
        e.contains("secrets.key") && e.contains("is not the one the secret values"),
        "{e}"
    );
    let e = TestServer::start_seeded(
        "127.0.0.1:0",
        &args,
        single.data_dir(),
        &["pki", "admin.token"],
    )
    .err()
    .expect("a server without the secrets key starts");
    let e = format!("{e:#}");
    assert!(e.contains("secrets.key is missing"), "{e}");
    // With the right key it starts, and the secret is there.
    let pg = pg_server(&store, &password_file, free_port(), single.data_dir()).unwrap();
    let listed = pg.cli(&["get", "secrets", "-A", "-o", "json"]).ok();
    assert!(listed.stdout.contains("\"s\""), "{}", listed.stdout);
}
