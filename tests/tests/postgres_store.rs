//! `clusterclaw server --store postgres://...` against a real PostgreSQL server
//! (`tests/postgres-setup.sh`): objects land in the database, survive a restart, and `/readyz`
//! turns false while the database cannot be reached and true again when it can; and a server on
//! PostgreSQL with a real agent on Docker runs an instance with a secret, makes revisions,
//! undoes one, keeps events and serves `get instances -w`.
//!
//! Without a PostgreSQL server the test skips with the reason printed, unless `CI=true`.

use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use clusterclaw_tests::proxy::TcpProxy;
use clusterclaw_tests::server::TestServer;
use serde_json::json;

fn skip(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the PostgreSQL store test cannot run: {why}");
    }
    eprintln!("skipped: {why} (run tests/postgres-setup.sh)");
}

/// A schema of its own in the test database, dropped at the end.
struct Schema {
    config: postgres::Config,
    name: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut c) = self.config.connect(postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

fn wait_ready(server: &TestServer, want: bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = server.http("GET", "/readyz", None, None);
        let body = r.json();
        if body["ready"] == json!(want) {
            assert_eq!(r.status, if want { 200 } else { 503 }, "{body}");
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz did not turn {want}: {body}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_server_on_postgres_keeps_its_objects_there_and_reports_an_unreachable_store() {
    let Some(url) = clusterclaw_tests::postgres::url() else {
        return skip(
            "no PostgreSQL test server: CLUSTERCLAW_TEST_POSTGRES_URL is unset and target/postgres-url is missing",
        );
    };
    let config: postgres::Config = url.parse().expect("a PostgreSQL URL");
    let mut admin = match config.connect(postgres::NoTls) {
        Ok(c) => c,
        Err(e) => {
            return skip(&format!(
                "cannot connect to the PostgreSQL test server: {e}"
            ));
        }
    };
    let schema = Schema {
        config: config.clone(),
        name: clusterclaw_tests::agent::unique("e2e").replace('-', "_"),
    };
    admin
        .batch_execute(&format!("CREATE SCHEMA {}", schema.name))
        .unwrap();

    // The server reaches the database through a proxy the test can cut.
    let host = match &config.get_hosts()[0] {
        postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("the test server is reached over TCP, not {other:?}"),
    };
    let target = (host.as_str(), config.get_ports()[0])
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap();
    let proxy = TcpProxy::start(target).unwrap();
    let password = String::from_utf8(config.get_password().unwrap().to_vec()).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let password_file = scratch.path().join("pgpass");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    // The password is in the file, not in the URL.
    let store_url = format!(
        "postgres://{}@127.0.0.1:{}/{}?options=-c%20search_path%3D{}",
        config.get_user().unwrap(),
        proxy.port(),
        config.get_dbname().unwrap(),
        schema.name
    );
    let password_arg = password_file.display().to_string();
    let mut server = TestServer::start_with(&[
        "--store",
        &store_url,
        "--store-password-file",
        &password_arg,
    ])
    .unwrap();
    wait_ready(&server, true);
    assert!(
        !server.data_dir().join("clusterclaw.db").exists(),
        "no SQLite database is made"
    );

    let body = json!({"items": [
        {"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": "acme"}},
        {"apiVersion": "clusterclaw.io/v1", "kind": "Project",
         "metadata": {"name": "web", "tenant": "acme"}},
    ]})
    .to_string();
    let r = server.http(
        "POST",
        "/api/v1/apply",
        Some(&body),
        Some(server.admin_token()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let index = server.index();
    assert!(index >= 1);
    // The objects are rows of the database, and the index is its index.
    let rows: Vec<(String, String)> = admin
        .query(
            &format!(
                "SELECT kind, name FROM {}.objects ORDER BY kind, name",
                schema.name
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        [
            ("Project".to_string(), "web".to_string()),
            ("Tenant".to_string(), "acme".to_string())
        ]
    );
    let stored: i64 = admin
        .query_one(
            &format!("SELECT value FROM {}.meta WHERE key = 'index'", schema.name),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored as u64, index);

    // The database goes away: not ready, with the reason; it comes back: ready again.
    proxy.cut();
    let down = wait_ready(&server, false);
    let reason = down["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("store"), "{down}");
    // The reason may repeat the URL the server was given (it holds no password, and the test
    // server's user and database may be spelled like its password); nothing else may.
    assert!(
        !reason.replace(&store_url, "").contains(&password),
        "{down}"
    );
    proxy.heal();
    wait_ready(&server, true);
    let tenant = json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant",
                        "metadata": {"name": "beta"}})
    .to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = server.http(
            "POST",
            "/api/v1/apply",
            Some(&tenant),
            Some(server.admin_token()),
        );
        if r.status == 200 {
            break;
        }
        // A pooled connection the cut broke fails once; the next one is new.
        assert!(Instant::now() < deadline, "{}: {}", r.status, r.body);
        std::thread::sleep(Duration::from_millis(100));
    }

    // A restarted server finds everything where it was.
    let before = server.index();
    server.restart().unwrap();
    wait_ready(&server, true);
    assert_eq!(server.index(), before);
    let tenants = server.get_json("/api/v1/tenants");
    let names: Vec<&str> = tenants["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme", "beta"]);
    drop(server);
    drop(proxy);
}

/// A schema of its own for one server, reached with the password in a file: the database,
/// the `--store` URL and the arguments that give it.
struct PgServerStore {
    schema: Schema,
    admin: postgres::Client,
    url: String,
    password_file: std::path::PathBuf,
    _scratch: tempfile::TempDir,
}

impl PgServerStore {
    fn new() -> Option<PgServerStore> {
        let Some(url) = clusterclaw_tests::postgres::url() else {
            skip(
                "no PostgreSQL test server: CLUSTERCLAW_TEST_POSTGRES_URL is unset and target/postgres-url is missing",
            );
            return None;
        };
        let config: postgres::Config = url.parse().expect("a PostgreSQL URL");
        let mut admin = match config.connect(postgres::NoTls) {
            Ok(c) => c,
            Err(e) => {
                skip(&format!(
                    "cannot connect to the PostgreSQL test server: {e}"
                ));
                return None;
            }
        };
        let schema = Schema {
            config: config.clone(),
            name: clusterclaw_tests::agent::unique("e2e").replace('-', "_"),
        };
        admin
            .batch_execute(&format!("CREATE SCHEMA {}", schema.name))
            .unwrap();
        let host = match &config.get_hosts()[0] {
            postgres::config::Host::Tcp(h) => h.clone(),
            other => panic!("the test server is reached over TCP, not {other:?}"),
        };
        let password = String::from_utf8(config.get_password().unwrap().to_vec()).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let password_file = scratch.path().join("pgpass");
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        let url = format!(
            "postgres://{}@{host}:{}/{}?options=-c%20search_path%3D{}",
            config.get_user().unwrap(),
            config.get_ports()[0],
            config.get_dbname().unwrap(),
            schema.name
        );
        Some(PgServerStore {
            schema,
            admin,
            url,
            password_file,
            _scratch: scratch,
        })
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--store".into(),
            self.url.clone(),
            "--store-password-file".into(),
            self.password_file.display().to_string(),
        ]
    }
}

mod with_an_agent {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use clusterclaw_tests::agent::*;
    use clusterclaw_tests::server::TestServer;
    use serde_json::Value;

    use super::PgServerStore;

    /// A replica's revision and whether its config is in sync.
    type ReplicaConfig = (Option<u64>, Option<String>);

    /// The instance's revision and, per replica, the revision it runs and whether in sync.
    fn revisions(
        server: &TestServer,
        scope: &Scope,
        name: &str,
    ) -> (Option<u64>, Vec<ReplicaConfig>) {
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

    fn wait_revision(
        server: &TestServer,
        scope: &Scope,
        name: &str,
        rev: u64,
    ) -> anyhow::Result<()> {
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

    /// Waits for a Ready container of `replica` other than `old`; what the stand-in saw.
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
            let reported = status["status"]["replicaStatus"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| {
                    r["name"] == replica
                        && r["containerId"] == c.id.as_str()
                        && r["state"] == "Ready"
                });
            let Some(port) = c.port.filter(|_| reported) else {
                return Ok(None);
            };
            Ok(gateway_get(port, "/standin/info")
                .ok()
                .map(|info| (c.clone(), info)))
        })
    }

    /// `clusterclaw get instances -w -o json` running in the background: its lines (one object
    /// each) as they come.
    /// `get instances -w -o json` of a scope, running in the background.
    struct Watch(clusterclaw_tests::cli_stream::StreamingCli);

    impl Watch {
        fn start(server: &TestServer, scope: &Scope) -> Watch {
            Watch(
                clusterclaw_tests::cli_stream::StreamingCli::start(
                    server,
                    &[
                        "get",
                        "instances",
                        "-w",
                        "-o",
                        "json",
                        "-t",
                        &scope.tenant,
                        "-p",
                        &scope.project,
                    ],
                )
                .unwrap(),
            )
        }

        /// Waits for a line that `want` accepts, up to `limit`.
        fn wait(&mut self, what: &str, limit: Duration, want: impl Fn(&Value) -> bool) -> Value {
            let line = self
                .0
                .wait_line_within(what, limit, |line| {
                    serde_json::from_str::<Value>(line).is_ok_and(|v| want(&v))
                })
                .unwrap_or_else(|e| panic!("`get instances -w` never showed {what}: {e}"));
            serde_json::from_str(&line).unwrap()
        }
    }

    #[test]
    fn instances_with_secrets_revisions_undo_events_and_watches_on_postgres() -> anyhow::Result<()>
    {
        let Some(image) = require_docker()? else {
            return Ok(());
        };
        let Some(mut pg) = PgServerStore::new() else {
            return Ok(());
        };
        let scope = Scope::new("e2e-pg");
        let cleanup = DockerCleanup::tenant(&scope.tenant);
        let port = free_port();
        let args = pg.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &args)?;
        assert!(
            !server.log().contains("kept only by the SQLite store"),
            "{}",
            server.log()
        );
        let token = join_token(&server, 1, "10m");
        let host_name = unique("pg-host");
        let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
        let host = agent.wait_enrolled()?;
        cleanup.host(&host);
        wait_host_ready(&server, &host)?;
        scope.apply(&server, "base", &scope.base_manifest());
        let t = &scope.tenant;
        let mut watch = Watch::start(&server, &scope);

        // A secret: its value is sealed in the database, never plain.
        let key_file = server.write_file("anthropic.key", "sk-ant-pg-e2e\n");
        let from = format!("anthropic={}", key_file.display());
        let out = server
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
            .ok();
        assert!(!out.stdout.contains("sk-ant-pg-e2e"), "{}", out.stdout);
        let sealed: Vec<String> = pg
            .admin
            .query(
                &format!("SELECT sealed FROM {}.secret_values", pg.schema.name),
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(sealed.len(), 1, "{sealed:?}");
        assert!(
            sealed[0].starts_with("ccs1:") && !sealed[0].contains("sk-ant"),
            "{sealed:?}"
        );

        // An instance that uses it runs Ready with the value in its environment.
        let name = "bot";
        let manifest = |level: &str| {
            format!(
                "{}  env:\n    OPENCLAW_GATEWAY_TOKEN:\n      secretRef: {{name: llm-keys, key: anthropic}}\n  config:\n    logging:\n      level: {level}\n",
                scope.instance_manifest(name, &image, 1, &BTreeMap::new())
            )
        };
        scope.apply(&server, name, &manifest("info"));
        let (_, first) = wait_ready(&server, &scope, name, 1)?;
        let replica = format!("{name}-0");
        let c1 = first[&replica].clone();
        let info = gateway_get(c1.port.unwrap(), "/standin/info")?;
        assert_eq!(
            info["env"]["OPENCLAW_GATEWAY_TOKEN"], "sk-ant-pg-e2e",
            "{info}"
        );
        assert_eq!(info["config"]["logging"]["level"], "info", "{info}");
        wait_revision(&server, &scope, name, 1)?;
        // The watch saw it come.
        // The watch began before the instance existed: it came as a change.
        watch.wait("the instance", Duration::from_secs(30), |v| {
            v["metadata"]["name"] == name
        });

        // A config change: a new revision, a new container with the new file.
        scope.apply(&server, name, &manifest("debug"));
        let (c2, info) = replaced(&server, &scope, name, &replica, &c1.id)?;
        assert_eq!(info["config"]["logging"]["level"], "debug", "{info}");
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
        assert_eq!(items[0]["message"], "config changed", "{history}");
        let stored: i64 = pg
            .admin
            .query_one(
                &format!("SELECT COUNT(*) FROM {}.config_revisions", pg.schema.name),
                &[],
            )?
            .get(0);
        assert_eq!(stored, 2, "the revisions are rows of the database");
        // The watch saw the change (the instance's revision 2 in its status).
        watch.wait("revision 2", Duration::from_secs(30), |v| {
            v["metadata"]["name"] == name && v["status"]["configRevision"] == 2
        });

        // Undo: a new revision with the first one's content, and the first config back.
        server
            .cli(&[
                "rollout",
                "undo",
                "instance",
                name,
                "-t",
                t,
                "-p",
                &scope.project,
            ])
            .ok();
        let (_, info) = replaced(&server, &scope, name, &replica, &c2.id)?;
        assert_eq!(info["config"]["logging"]["level"], "info", "{info}");
        assert_eq!(
            info["env"]["OPENCLAW_GATEWAY_TOKEN"], "sk-ant-pg-e2e",
            "{info}"
        );
        wait_revision(&server, &scope, name, 3)?;

        // Events are kept in the database and listed.
        let deadline = Instant::now() + Duration::from_secs(30);
        let events = loop {
            let out = server
                .cli(&[
                    "get",
                    "events",
                    "-t",
                    t,
                    "-p",
                    &scope.project,
                    "--for",
                    "instance/bot",
                ])
                .ok();
            if out.stdout.contains("ContainerStarted") || Instant::now() > deadline {
                break out.stdout;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(events.contains("Scheduled"), "{events}");
        assert!(events.contains("ContainerStarted"), "{events}");
        let stored: i64 = pg
            .admin
            .query_one(
                &format!("SELECT COUNT(*) FROM {}.events", pg.schema.name),
                &[],
            )?
            .get(0);
        assert!(stored > 0);
        drop(watch);
        drop(agent);
        drop(server);
        Ok(())
    }
}
