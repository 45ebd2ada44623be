//! The PostgreSQL server the tests use.
//!
//! `CLUSTERCLAW_TEST_POSTGRES_URL` when it is set, else the URL `tests/postgres-setup.sh` wrote
//! to `target/postgres-url`; when neither exists the script is run once (it installs Debian's
//! `postgresql` where it may, and starts a throwaway cluster), so `cargo test --workspace` on a
//! fresh machine needs no step of its own.
//!
//! [`PrivatePostgres`] is a server of one test's own, which it may stop and start.

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

/// A PostgreSQL server of a test's own: a cluster made with `initdb` in a temporary
/// directory, listening on 127.0.0.1 on an ephemeral port (trust authentication, `fsync=off`:
/// throwaway data), which the test may stop and start again (the shared test server is never
/// touched). When run as root the cluster belongs to the `postgres` user, as the server
/// refuses to run as root. Stopped and removed on drop.
pub struct PrivatePostgres {
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
}

impl PrivatePostgres {
    /// Makes and starts a cluster; `Err` says why it cannot (no server binaries, ...).
    pub fn start() -> anyhow::Result<PrivatePostgres> {
        use anyhow::Context;
        let bin = server_bindir().context("no PostgreSQL server binaries (initdb, pg_ctl)")?;
        // The process's own directory belongs to its effective user.
        let as_postgres = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
        };
        let dir = tempfile::Builder::new()
            .prefix("clusterclaw-private-postgres-")
            .tempdir()?;
        if as_postgres {
            let ok = Command::new("chown")
                .arg("postgres:")
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            anyhow::ensure!(
                ok,
                "cannot give {} to the postgres user",
                dir.path().display()
            );
        }
        let pg = PrivatePostgres {
            bin,
            port: crate::agent::free_port(),
            dir,
            as_postgres,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        )?;
        pg.start_again()?;
        Ok(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Runs one of the server's programs (as the cluster's owner).
    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).current_dir("/").output()?;
        anyhow::ensure!(
            out.status.success(),
            "{program} {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The URL of its `postgres` database as the `postgres` user.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server (again, on the same port and data), waiting until it accepts
    /// connections.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .map(drop)
    }

    /// Stops the server (`-m fast`: sessions are cut, as a restart cuts them).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"])
            .map(drop)
    }

    /// What the server wrote to its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}

/// Where `initdb` and `pg_ctl` are: the newest `/usr/lib/postgresql/*/bin`, else
/// `pg_config --bindir`.
fn server_bindir() -> Option<std::path::PathBuf> {
    let mut dirs: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, d)| d.join("initdb").exists())
        .collect();
    dirs.sort();
    if let Some((_, d)) = dirs.pop() {
        return Some(d);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let d = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    d.join("initdb").exists().then_some(d)
}
