//! `clusterclaw store migrate`: moves a single-machine cluster's store to PostgreSQL.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{CliError, CliResult, print_out};
use crate::store::migrate::{MigrateError, MigrateOptions, migrate};
use crate::store::postgres::{PgTarget, is_postgres_url, redact};

#[derive(Args, Debug)]
pub struct StoreArgs {
    #[command(subcommand)]
    pub command: StoreCommand,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy the store of a stopped single-machine server (its SQLite database) into an empty
    /// PostgreSQL database in one transaction, then verify the copy (row counts and content
    /// digests of every table, the counters, the audit chain on the target). Exits 1 on any
    /// mismatch or refusal (a server still running on the data directory, a target that is not
    /// empty), 2 for a data directory that is missing or not a server's, 3 when the target
    /// cannot be reached. Copy the data directory's pki/ and secrets.key to every server that
    /// will run on the target.
    Migrate(MigrateArgs),
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The data directory of the single-machine server (its --data-dir; the server is stopped)
    #[arg(long, value_name = "DATA_DIR")]
    pub from: PathBuf,
    /// The empty PostgreSQL database: postgres://USER@HOST[:PORT]/DATABASE[?sslmode=require]
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// A file whose first line is the database password
    #[arg(long, value_name = "FILE")]
    pub to_password_file: Option<PathBuf>,
    /// The CA that signed the database server's certificate (sslmode=require)
    #[arg(long, value_name = "FILE")]
    pub to_ca_file: Option<PathBuf>,
    /// The server's PKI directory when it ran with --pki-dir (default: DATA_DIR/pki)
    #[arg(long, value_name = "DIR")]
    pub pki_dir: Option<PathBuf>,
}

pub fn run(args: StoreArgs) -> CliResult {
    match args.command {
        StoreCommand::Migrate(args) => run_migrate(args),
    }
}

fn run_migrate(args: MigrateArgs) -> CliResult {
    let url = args.to.trim().to_string();
    if !is_postgres_url(&url) {
        return Err(CliError::Usage(format!(
            "--to {:?} is not a PostgreSQL URL (postgres://USER@HOST[:PORT]/DATABASE)",
            redact(&url)
        )));
    }
    let options = MigrateOptions {
        data_dir: args.from,
        pki_dir: args.pki_dir,
        target: PgTarget {
            url,
            password_file: args.to_password_file,
            ca_file: args.to_ca_file,
        },
    };
    let report = migrate(&options).map_err(|e| match e {
        MigrateError::DataDir(m) => CliError::Usage(m),
        MigrateError::Unreachable(m) => CliError::Unreachable(m),
        MigrateError::Refused(m) | MigrateError::Mismatch(m) => CliError::Failed(m),
    })?;
    print_out(&format!(
        "copied {} into {} and verified it:\n{}\nNext: copy {}/pki and {}/secrets.key to every server, then start them with --store {}\n",
        options.data_dir.display(),
        report.target,
        report.render(),
        options.data_dir.display(),
        options.data_dir.display(),
        report.target
    ))
}
