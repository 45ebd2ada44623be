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
