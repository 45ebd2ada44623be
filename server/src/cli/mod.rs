//! The admin command line `clusterclaw`: argument definitions, dispatch and exit codes; one
//! module per subcommand.

mod apply;
mod audit;
mod client;
mod completion;
mod config;
mod cordon;
mod delete;
mod describe;
mod dev;
mod docs;
mod drain;
mod events;
mod get;
mod login;
mod logs;
mod manifest;
mod output;
mod pki;
mod resolve;
mod rollout;
mod scale;
mod secret;
mod servers;
mod settings;
mod store;
mod token;
mod volumes;
mod waves;

use std::fmt;
use std::io::{self, Write};

use clap::{Parser, Subcommand};

pub use client::ApiError;

pub use manifest::Located;
pub use settings::{ClientOpts, Secret};

/// Printed at the end of `clusterclaw --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  the server refused the request, or the object does not exist
  2  usage error (bad arguments, missing token or server setting)
  3  the server cannot be reached
  4  an input file is malformed or invalid (nothing was written)";

/// Printed at the end of `clusterclaw --help`, before the exit codes.
pub const SETTINGS_HELP: &str = "\
Connection settings (given after the subcommand):
  --server URL       CLUSTERCLAW_SERVER     default http://127.0.0.1:7080
  --token TOKEN      CLUSTERCLAW_TOKEN      an API token (cca_...); the server writes an admin
                                            token to admin.token in its data directory
  --ca-cert FILE     CLUSTERCLAW_CA_CERT    CA of an https:// server
  -t, --tenant       CLUSTERCLAW_TENANT     -p, --project   CLUSTERCLAW_PROJECT
  --config FILE      CLUSTERCLAW_CONFIG     CLI config file, default
                                            $XDG_CONFIG_HOME/clusterclaw/config.toml
A flag beats the environment, which beats the CLI config file (`clusterclaw login` writes it).
";

/// The `clusterclaw` command line.
#[derive(Debug, Parser)]
#[command(
    name = "clusterclaw",
    version,
    about = "openClusterClaw: control plane for fleets of OpenClaw Gateways, and its admin CLI",
    after_help = top_level_help(),
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

fn top_level_help() -> String {
    format!("{SETTINGS_HELP}\n{EXIT_CODES_HELP}")
}

/// The end of the help of commands that take a KIND: the kinds and their aliases (from the
/// model, see [`crate::model::Kind::user_names`]), then the exit codes.
fn kinds_and_exit_codes_help() -> String {
    format!("{}\n{EXIT_CODES_HELP}", resolve::kinds_help())
}

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane (REST API and agent port).
    Server(Box<crate::config::ServerArgs>),
    /// Create or update objects from YAML or JSON manifests (all or nothing).
    #[command(after_help = EXIT_CODES_HELP)]
    Apply(apply::ApplyArgs),
    /// List objects, or show one.
    #[command(after_help = kinds_and_exit_codes_help())]
    Get(get::GetArgs),
    /// Show one object in detail: spec, status, replicas and conditions.
    #[command(after_help = kinds_and_exit_codes_help())]
    Describe(describe::DescribeArgs),
    /// Delete objects by kind and name, or those named in manifests.
    #[command(after_help = kinds_and_exit_codes_help())]
    Delete(delete::DeleteArgs),
    /// Change the number of replicas of an instance.
    #[command(after_help = EXIT_CODES_HELP)]
    Scale(scale::ScaleArgs),
    /// Stop placing new replicas on a host (those it runs stay).
    #[command(after_help = EXIT_CODES_HELP)]
    Cordon(cordon::CordonArgs),
    /// Let the scheduler place replicas on a cordoned host again.
    #[command(after_help = EXIT_CODES_HELP)]
    Uncordon(cordon::CordonArgs),
    /// Cordon a host and move its replicas elsewhere, each with its state volume (unless
    /// --discard-state), within each instance's maxUnavailable. The server carries the drain
    /// out; this command follows it and exits 1 naming each replica that could not be moved.
    #[command(after_help = EXIT_CODES_HELP)]
    Drain(drain::DrainArgs),
    /// Show and steer an instance's update: status (-w waits), history, pause, resume,
    /// promote, abort, undo.
    #[command(after_help = EXIT_CODES_HELP)]
    Rollout(rollout::RolloutArgs),
    /// Show a replica's container output (redacted), streamed from its host; -f follows it.
    #[command(after_help = EXIT_CODES_HELP)]
    Logs(logs::LogsArgs),
    /// Manage the certificate authority of the agent port.
    Pki(pki::PkiArgs),
    /// Create, list and revoke tokens.
    Token(token::TokenArgs),
    /// List audit records and verify the audit log's hash chain.
    #[command(after_help = EXIT_CODES_HELP)]
    Audit(audit::AuditArgs),
    /// Print a shell completion script.
    Completion(completion::CompletionArgs),
    /// Check a server URL and token, and save them in the CLI config file.
    #[command(after_help = EXIT_CODES_HELP)]
    Login(login::LoginArgs),
    /// Show the CLI settings in effect.
    Config(config::ConfigArgs),
    /// Store secret values (encrypted at rest, never shown again) and rotate the data key.
    #[command(after_help = EXIT_CODES_HELP)]
    Secret(secret::SecretArgs),
    /// Run a whole local cluster (server and an agent on the local Docker) in the foreground.
    Dev(dev::DevArgs),
    /// Move a single-machine cluster's store to PostgreSQL.
    Store(store::StoreArgs),
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateDocs(docs::DocsArgs),
}

/// Why a command failed; each kind has its own exit code (see [`EXIT_CODES_HELP`]).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server answered with an error (exit code 1).
    #[error("{0}")]
    Api(#[from] ApiError),
    /// A local operation failed, or an object does not exist (exit code 1).
    #[error("{0}")]
    Failed(String),
    /// Bad arguments or settings (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// No connection to the server (exit code 3).
    #[error("{0}")]
    Unreachable(String),
    /// One or more input documents are malformed or invalid (exit code 4).
    #[error("{}", Located::join(.0))]
    Input(Vec<Located>),
    /// Standard output was closed by the reader (`clusterclaw get instances | head`): not a
    /// failure, the command stops quietly.
    #[error("standard output was closed")]
    OutputClosed,
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::OutputClosed => 0,
            CliError::Api(_) | CliError::Failed(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Unreachable(_) => 3,
            CliError::Input(_) => 4,
        }
    }

    /// Writes the error for a person, one `error:` line per problem.
    pub fn report(&self, out: &mut dyn Write) {
        let _ = match self {
            CliError::Input(problems) => problems
                .iter()
                .try_for_each(|p| writeln!(out, "error: {p}")),
            CliError::OutputClosed => Ok(()),
            other => writeln!(out, "error: {other}"),
        };
    }

    fn io(context: impl fmt::Display, err: io::Error) -> CliError {
        CliError::Failed(format!("{context}: {err}"))
    }
}

/// Result of a subcommand.
pub type CliResult = Result<(), CliError>;

/// Runs a client subcommand (everything except `server`, which `main` runs itself).
pub fn run(command: Command) -> CliResult {
    let result = match command {
        Command::Server(_) => Err(CliError::Usage(
            "`clusterclaw server` runs the control plane itself, not a client command".into(),
        )),
        Command::Completion(args) => completion::run(args),
        Command::Pki(args) => pki::run(args),
        Command::Config(args) => config::run(args),
        Command::Dev(args) => dev::run(args),
        Command::Store(args) => store::run(args),
        Command::GenerateDocs(args) => docs::run(args),
        Command::Apply(args) => block_on(apply::run(args)),
        Command::Get(args) => block_on(get::run(args)),
        Command::Describe(args) => block_on(describe::run(args)),
        Command::Delete(args) => block_on(delete::run(args)),
        Command::Scale(args) => block_on(scale::run(args)),
        Command::Cordon(args) => block_on(cordon::run(args, true)),
        Command::Uncordon(args) => block_on(cordon::run(args, false)),
        Command::Drain(args) => block_on(drain::run(args)),
        Command::Rollout(args) => block_on(rollout::run(args)),
        Command::Logs(args) => block_on(logs::run(args)),
        Command::Token(args) => block_on(token::run(args)),
        Command::Audit(args) => block_on(audit::run(args)),
        Command::Login(args) => block_on(login::run(args)),
        Command::Secret(args) => block_on(secret::run(args)),
    };
    match result {
        Err(CliError::OutputClosed) => Ok(()),
        other => other,
    }
}

fn block_on(fut: impl Future<Output = CliResult>) -> CliResult {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the async runtime: {e}")))?
        .block_on(fut)
}

/// Maps a write error on standard output; a closed pipe stops the command quietly.
pub(crate) fn stdout_error(err: io::Error) -> CliError {
    if err.kind() == io::ErrorKind::BrokenPipe {
        CliError::OutputClosed
    } else {
        CliError::io("cannot write to standard output", err)
    }
}

/// Prints text to standard output.
pub(crate) fn print_out(text: &str) -> CliResult {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        for code in [
            "0  success",
            "3  the server cannot be reached",
            "4  an input file",
        ] {
            assert!(help.contains(code), "{help}");
        }
    }

    #[test]
    fn client_options_given_after_a_nested_subcommand_reach_it() {
        let cli = Cli::try_parse_from([
            "clusterclaw",
            "token",
            "create",
            "join",
            "--server",
            "http://h:1",
            "-t",
            "acme",
        ])
        .unwrap();
        let Command::Token(args) = cli.command else {
            panic!("not the token command")
        };
        assert_eq!(args.client.server.as_deref(), Some("http://h:1"));
        assert_eq!(args.client.tenant.as_deref(), Some("acme"));
        // `server --config` is the server's config file, not the CLI's.
        let cli = Cli::try_parse_from([
            "clusterclaw",
            "server",
            "--config",
            "/etc/clusterclaw/server.toml",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Server(_)));
    }

    #[test]
    fn exit_codes_by_error_kind() {
        assert_eq!(CliError::Failed("x".into()).exit_code(), 1);
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CliError::Unreachable("x".into()).exit_code(), 3);
        assert_eq!(CliError::Input(vec![]).exit_code(), 4);
    }

    #[test]
    fn global_options_work_after_nested_subcommands() {
        let cli = Cli::try_parse_from([
            "clusterclaw",
            "token",
            "create",
            "join",
            "--ttl",
            "2h",
            "--server",
            "http://h:1",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
        let cli = Cli::try_parse_from([
            "clusterclaw",
            "get",
            "inst",
            "-t",
            "acme",
            "-p",
            "helpdesk",
            "-o",
            "wide",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
        let cli = Cli::try_parse_from(["clusterclaw", "get", "pods"]);
        assert!(cli.is_err());
    }
}
