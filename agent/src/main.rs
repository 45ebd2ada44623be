//! `clusterclaw-agent`: the host agent. Loads and checks its configuration (exit 64 on
//! problems), sets up logging, and runs until SIGTERM/SIGINT (exit 0) or a failure (exit 1).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use clusterclaw_agent::config::{AgentArgs, AgentConfig, EX_USAGE, LogFormat};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// The host agent of openClusterClaw: enrolls this host, pulls its assignments, runs them in
/// Docker or Podman and reports their health.
#[derive(Debug, Parser)]
#[command(
    name = "clusterclaw-agent",
    version,
    after_help = "First start:  clusterclaw-agent --server https://HOST:7443 --ca-cert ca.crt --join-token ccj_...\n\
                  Later starts: clusterclaw-agent   (the identity is kept in the data directory)\n\n\
                  Exit codes: 0 stopped by SIGTERM/SIGINT (replicas keep running), 1 failure \
                  (e.g. the join token was refused), 64 bad configuration."
)]
struct Cli {
    #[command(flatten)]
    args: AgentArgs,
    /// Write the man page (section 8) and shell completions into DIR and exit (for packaging).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_docs: Option<PathBuf>,
}

/// Writes `man/clusterclaw-agent.8` and `completions/` (bash, zsh, fish) into `out`.
fn generate_docs(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::Man::new(Cli::command())
        .section("8")
        .generate_to(&man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(
            shell,
            &mut Cli::command(),
            "clusterclaw-agent",
            &completions,
        )?;
    }
    Ok(())
}

/// Crates whose debug and trace output carries request and response bodies, which hold the
/// replicas' secret environment values (`docker inspect`, container create): capped at info
/// whatever `RUST_LOG` says.
const BODY_LOGGING_CRATES: [&str; 2] = ["bollard", "hyperlocal"];

fn init_logging(format: LogFormat) -> anyhow::Result<()> {
    let mut filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::builder()
            .parse(&v)
            .with_context(|| format!("RUST_LOG={v:?} is not a valid filter; use e.g. info"))?,
        _ => EnvFilter::builder()
            .with_default_directive(LevelFilter::INFO.into())
            .parse_lossy(""),
    };
    for krate in BODY_LOGGING_CRATES {
        filter = filter.add_directive(
            format!("{krate}=info")
                .parse()
                .context("a built-in log directive")?,
        );
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

async fn termination_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

fn main() -> ExitCode {
    clusterclaw_agent::crypto::install_provider();
    let cli = Cli::parse();
    if let Some(out) = &cli.generate_docs {
        return match generate_docs(out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "clusterclaw-agent: cannot write into {}: {e}",
                    out.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    let config = match AgentConfig::load(&cli.args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clusterclaw-agent: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if let Err(e) = init_logging(config.log_format) {
        eprintln!("clusterclaw-agent: {e:#}");
        return ExitCode::from(EX_USAGE);
    }
    clusterclaw_agent::rlimit::raise_nofile_and_log();
    // Two workers are plenty for a handful of probes, one long poll and one stream.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .thread_name("clusterclaw-agent")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clusterclaw-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let signal = termination_signal();
        clusterclaw_agent::daemon::run(config, async {
            if let Err(e) = signal.await {
                tracing::error!("{e:#}");
                std::future::pending::<()>().await;
            }
        })
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clusterclaw-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn man_page_and_completions() {
        let dir = tempfile::tempdir().unwrap();
        generate_docs(dir.path()).unwrap();
        let page = std::fs::read_to_string(dir.path().join("man/clusterclaw-agent.8")).unwrap();
        assert!(page.contains(".TH clusterclaw-agent 8"), "{page}");
        assert!(page.contains("CLUSTERCLAW_AGENT_JOIN_TOKEN_FILE"), "{page}");
        assert!(!page.contains("generate"), "the hidden flag has no entry");
        for f in [
            "clusterclaw-agent.bash",
            "_clusterclaw-agent",
            "clusterclaw-agent.fish",
        ] {
            let script = std::fs::read_to_string(dir.path().join("completions").join(f)).unwrap();
            assert!(script.contains("join-token-file"), "{f}");
        }
    }
}
