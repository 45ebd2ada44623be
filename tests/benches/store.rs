//! The two store engines side by side, end to end through the real server: `apply -f` of
//! 1,000 instances (ten times, so that 10,000 are stored) and `get instances -o json` over the
//! 10,000, first on SQLite, then on PostgreSQL (`tests/postgres-setup.sh`; the URL from
//! `CLUSTERCLAW_TEST_POSTGRES_URL` or `target/postgres-url`), in one run, with the ratios.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench store`.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context, bail};
use clusterclaw_tests::server::TestServer;

const FILES: usize = 10;
const INSTANCES_PER_FILE: usize = 1_000;
const GET_RUNS: usize = 7;

fn manifest(project: &str) -> String {
    let mut s = String::with_capacity(INSTANCES_PER_FILE * 300);
    let _ = write!(
        s,
        "apiVersion: clusterclaw.io/v1\nkind: Project\nmetadata:\n  name: {project}\n  tenant: bench\n"
    );
    for i in 0..INSTANCES_PER_FILE {
        let _ = write!(
            s,
            "---\napiVersion: clusterclaw.io/v1\nkind: OpenClawInstance\nmetadata:\n  name: bot-{i}\n  tenant: bench\n  project: {project}\n  labels:\n    team: t{}\nspec:\n  version: 2026.7.1\n  replicas: 2\n  resources:\n    cpu: 500m\n    memory: 1Gi\n  env:\n    LOG_LEVEL: info\n",
            i % 10
        );
    }
    s
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Medians of (apply of 1,000, get -o json of 10,000), in seconds.
fn measure(server: &TestServer) -> anyhow::Result<(f64, f64)> {
    let tenant = server.write_file(
        "tenant.yaml",
        "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: bench\n",
    );
    server
        .cli(&["apply", "-f", tenant.to_str().unwrap_or_default()])
        .ok();
    let mut apply = Vec::new();
    for run in 0..FILES {
        let path = server.write_file(&format!("p{run}.yaml"), &manifest(&format!("p{run}")));
        let started = Instant::now();
        let out = server.cli(&["apply", "-f", path.to_str().unwrap_or_default()]);
        apply.push(started.elapsed().as_secs_f64());
        let out = out.ok();
        let created = out
            .stdout
            .lines()
            .filter(|l| l.ends_with(" created"))
            .count();
        if created != INSTANCES_PER_FILE + 1 {
            bail!("apply {run} created {created} objects: {}", out.stdout);
        }
    }
    server.cli(&["get", "instances", "-A", "-o", "json"]).ok();
    let mut get = Vec::new();
    for _ in 0..GET_RUNS {
        let started = Instant::now();
        let out = server.cli(&["get", "instances", "-A", "-o", "json"]).ok();
        get.push(started.elapsed().as_secs_f64());
        let items: serde_json::Value = serde_json::from_str(&out.stdout)?;
        let n = items["items"].as_array().map_or(0, Vec::len);
        if n != FILES * INSTANCES_PER_FILE {
            bail!("get listed {n} instances");
        }
    }
    Ok((median(&mut apply), median(&mut get)))
}

fn main() -> anyhow::Result<()> {
    let url = clusterclaw_tests::postgres::url().context(
        "no PostgreSQL test server: run tests/postgres-setup.sh or set CLUSTERCLAW_TEST_POSTGRES_URL",
    )?;
    let config: postgres::Config = url.parse()?;
    let mut admin = config.connect(postgres::NoTls)?;
    let schema = format!("bench_{}", std::process::id());
    admin.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
    ))?;
    let store_url = format!("{url}?options=-c%20search_path%3D{schema}");

    let sqlite = {
        let server = TestServer::start()?;
        measure(&server)?
    };
    let pg = {
        let server = TestServer::start_with(&["--store", &store_url])?;
        measure(&server)?
    };
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;

    println!(
        "engine      apply 1,000 (median of {FILES})   get -o json of 10,000 (median of {GET_RUNS})"
    );
    println!(
        "sqlite      {:>8.3} s                  {:>8.3} s",
        sqlite.0, sqlite.1
    );
    println!(
        "postgresql  {:>8.3} s                  {:>8.3} s",
        pg.0, pg.1
    );
    println!(
        "ratio       {:>8.2}x                   {:>8.2}x   (target: within 2x)",
        pg.0 / sqlite.0,
        pg.1 / sqlite.1
    );
    Ok(())
}
