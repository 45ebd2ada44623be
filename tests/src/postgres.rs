//! The PostgreSQL server the tests use.
//!
//! `CLUSTERCLAW_TEST_POSTGRES_URL` when it is set, else the URL `tests/postgres-setup.sh` wrote
//! to `target/postgres-url`; when neither exists the script is run once (it installs Debian's
//! `postgresql` where it may, and starts a throwaway cluster), so `cargo test --workspace` on a
//! fresh machine needs no step of its own.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// The test server's URL, running `tests/postgres-setup.sh` first when none is known yet.
/// `None` when the script could not make one.
pub fn url() -> Option<String> {
    static URL: OnceLock<Option<String>> = OnceLock::new();
    URL.get_or_init(|| {
        if let Some(url) = known_url() {
            return Some(url);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("postgres-setup.sh");
        eprintln!(
            "no PostgreSQL test server yet; running {}",
            script.display()
        );
        let ok = Command::new(&script)
            // Its `export ...` line is for a person's shell; the URL is read from the file.
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "{} could not make a PostgreSQL server ready",
                script.display()
            );
        }
        known_url()
    })
    .clone()
}

fn known_url() -> Option<String> {
    if let Ok(url) = std::env::var("CLUSTERCLAW_TEST_POSTGRES_URL")
        && !url.trim().is_empty()
    {
        return Some(url.trim().to_string());
    }
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/postgres-url");
    std::fs::read_to_string(file)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// A schema of its own in the test database, dropped (with everything in it) at the end.
pub struct TestSchema {
    pub config: postgres::Config,
    pub name: String,
}

impl TestSchema {
    /// Tables in the schema, by name.
    pub fn tables(&self) -> Vec<String> {
        let Ok(mut c) = self.config.connect(postgres::NoTls) else {
            return Vec::new();
        };
        c.query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1",
            &[&self.name],
        )
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default()
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        if let Ok(mut c) = self.config.connect(postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

/// A fresh schema named after `prefix` in the test database, a store URL that writes into it
/// (`postgres://USER@HOST:PORT/DB?options=...search_path...`, without the password) and a
/// password file for it in `scratch`; `Err` says why there is none.
pub fn database(scratch: &Path, prefix: &str) -> Result<(TestSchema, String, String), String> {
    let url = url().ok_or("no PostgreSQL test server (CLUSTERCLAW_TEST_POSTGRES_URL)")?;
    let config: postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
    let mut admin = config
        .connect(postgres::NoTls)
        .map_err(|e| format!("cannot connect to the PostgreSQL test server: {e}"))?;
    let schema = TestSchema {
        config: config.clone(),
        name: crate::agent::unique(prefix).replace('-', "_"),
    };
    admin
        .batch_execute(&format!("CREATE SCHEMA {}", schema.name))
        .map_err(|e| e.to_string())?;
    let host = match &config.get_hosts()[0] {
        postgres::config::Host::Tcp(h) => h.clone(),
        other => {
            return Err(format!(
                "the test server is not reached over TCP: {other:?}"
            ));
        }
    };
    let password = String::from_utf8(config.get_password().unwrap_or_default().to_vec())
        .map_err(|e| e.to_string())?;
    let password_file = scratch.join(format!("pgpass-{}", schema.name));
    std::fs::write(&password_file, format!("{password}\n")).map_err(|e| e.to_string())?;
    let store_url = format!(
        "postgres://{}@{}:{}/{}?options=-c%20search_path%3D{}",
        config.get_user().unwrap_or("postgres"),
        host,
        config.get_ports()[0],
        config.get_dbname().unwrap_or("postgres"),
        schema.name
    );
    Ok((schema, store_url, password_file.display().to_string()))
}
