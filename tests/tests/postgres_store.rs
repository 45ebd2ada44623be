//! `clusterclaw server --store postgres://...` against a real PostgreSQL server
//! (`tests/postgres-setup.sh`): objects land in the database, survive a restart, and `/readyz`
//! turns false while the database cannot be reached and true again when it can.
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
    assert!(!reason.contains(&password), "{down}");
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
