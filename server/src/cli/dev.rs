//! `clusterclaw dev`: a whole cluster on this machine in one process: the server (embedded SQLite) and an enrolled agent on the local Docker, with the CLI configured to use it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use clusterclaw_agent::config::AgentConfig;
use clusterclaw_agent::enroll::IdentityFiles;
use clusterclaw_agent::runtime::RuntimeKind;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use super::settings::{ClientOpts, ConfigFile, Secret, config_path};
use super::{CliError, CliResult};
use crate::config::ServerConfig;
use crate::telemetry::{self, LogFormat};

/// Data directory when none is given: next to where the command runs, like a build directory.
pub const DEFAULT_DEV_DIR: &str = ".clusterclaw-dev";
const DEFAULT_API_LISTEN: &str = "127.0.0.1:7080";
const DEFAULT_AGENT_LISTEN: &str = "127.0.0.1:7443";
/// How long start-up (server, enrollment, first heartbeat) may take before the command gives up
/// waiting and says so.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the server and the agent get to stop after Ctrl-C.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Flags of `clusterclaw dev`.
#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Everything lives in the data directory: <DIR>/server (database, admin token, CA) and <DIR>/agent
(host identity, saved assignments). Running `clusterclaw dev` again on the same directory resumes
the same cluster; delete the directory (after deleting your instances) to start afresh.

The CLI config file ($XDG_CONFIG_HOME/clusterclaw/config.toml, or CLUSTERCLAW_CONFIG) is
rewritten to point at this cluster with its admin token.

Ctrl-C stops the server and the agent; the Gateway containers keep running and are adopted by
the next `clusterclaw dev`. `clusterclaw delete instance NAME` removes them.")]
pub struct DevArgs {
    /// Directory for the server's and the agent's data [default: ./.clusterclaw-dev]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the REST API, IP:PORT [default: 127.0.0.1:7080]
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<String>,
    /// Address of the agent port, IP:PORT [default: 127.0.0.1:7443]
    #[arg(long, value_name = "ADDR")]
    pub agent_listen: Option<String>,
    /// Container engine: docker or podman [default: docker]
    #[arg(long, value_name = "RUNTIME")]
    pub runtime: Option<String>,
    /// The engine's API address [default: the runtime's local socket]
    #[arg(long, value_name = "ADDR")]
    pub docker_host: Option<String>,
}

fn parse_addr(flag: &str, value: &str) -> Result<SocketAddr, CliError> {
    value.parse().map_err(|_| {
        CliError::Usage(format!(
            "{flag} {value:?} is not an address; expected IP:PORT such as {DEFAULT_API_LISTEN}"
        ))
    })
}

/// Runs `clusterclaw dev` until Ctrl-C or SIGTERM.
pub fn run(args: DevArgs) -> CliResult {
    let api_listen = parse_addr(
        "--api-listen",
        args.api_listen.as_deref().unwrap_or(DEFAULT_API_LISTEN),
    )?;
    let agent_listen = parse_addr(
        "--agent-listen",
        args.agent_listen.as_deref().unwrap_or(DEFAULT_AGENT_LISTEN),
    )?;
    let runtime: RuntimeKind = args
        .runtime
        .as_deref()
        .unwrap_or("docker")
        .parse()
        .map_err(|e: String| CliError::Usage(format!("--runtime: {e}")))?;
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DEV_DIR));
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    if dir.exists() && !dir.is_dir() {
        return Err(CliError::Usage(format!(
            "--data-dir {} exists and is not a directory",
            dir.display()
        )));
    }
    telemetry::init(LogFormat::Text).map_err(|e| CliError::Usage(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("clusterclaw-dev")
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the async runtime: {e}")))?;
    let result = rt.block_on(dev(
        dir,
        api_listen,
        agent_listen,
        runtime,
        args.docker_host.clone(),
    ));
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn dev(
    dir: PathBuf,
    api_listen: SocketAddr,
    agent_listen: SocketAddr,
    runtime: RuntimeKind,
    docker_host: Option<String>,
) -> CliResult {
    let server_dir = dir.join("server");
    let agent_dir = dir.join("agent");
    // Ctrl-C is listened to from here on: at any moment after this, it stops the agent and the
    // server in order (the banner invites it as soon as it is printed).
    let mut stop = Termination::listen();

    // The server.
    let mut server_config = ServerConfig::with_data_dir(&server_dir);
    server_config.api_listen = api_listen;
    server_config.agent_listen = agent_listen;
    let (stop_server, server_stop) = oneshot::channel::<()>();
    let mut server = tokio::spawn(crate::server::run(server_config, async {
        let _ = server_stop.await;
    }));
    let endpoints = tokio::select! {
        e = wait_for_endpoints(&server_dir) => e?,
        r = &mut server => {
            return Err(CliError::Failed(match r {
                Ok(Err(e)) => format!("the server did not start: {e:#}"),
                Ok(Ok(())) => "the server stopped during start-up".into(),
                Err(e) => format!("the server failed: {e}"),
            }));
        }
    };
    let admin_token = std::fs::read_to_string(crate::server::admin_token_path(&server_dir))
        .map_err(|e| CliError::io("cannot read the admin token", e))?
        .trim()
        .to_string();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| CliError::Failed(format!("cannot build an HTTP client: {e}")))?;

    // The CLI's config.
    let cli_config = config_path(&ClientOpts {
        config: std::env::var_os("CLUSTERCLAW_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
        ..ClientOpts::default()
    });
    ConfigFile {
        server: Some(endpoints.api.clone()),
        token: Some(Secret::new(admin_token.clone())),
        ..ConfigFile::default()
    }
    .save(&cli_config)?;

    // The agent, enrolled with a fresh single-use token the first time.
    let agent_port = agent_listen.port();
    let agent_host = if agent_listen.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        agent_listen.ip().to_string()
    };
    let server_url = match agent_listen.ip() {
        std::net::IpAddr::V6(ip) if !ip.is_unspecified() => format!("https://[{ip}]:{agent_port}"),
        _ => format!("https://{agent_host}:{agent_port}"),
    };
    let mut agent_config = AgentConfig::new(&agent_dir, Some(server_url.clone()));
    agent_config.runtime = runtime;
    agent_config.docker_host = docker_host;
    agent_config.report_interval = Duration::from_secs(5);
    if !IdentityFiles::in_dir(&agent_dir).exist() {
        agent_config.ca_pem = Some(
            std::fs::read_to_string(&endpoints.ca_cert)
                .map_err(|e| CliError::io(format!("cannot read {}", endpoints.ca_cert), e))?,
        );
        let token = create_join_token(&http, &endpoints.api, &admin_token).await?;
        agent_config.join_token = Some(clusterclaw_agent::config::JoinToken::new(token));
    }
    let (stop_agent, agent_stop) = watch::channel(false);
    let mut agent = tokio::spawn(clusterclaw_agent::daemon::run_until(
        agent_config,
        agent_stop,
    ));

    // Wait for the host to be Ready.
    let ready = tokio::select! {
        r = wait_for_ready_host(&http, &endpoints.api, &admin_token, &agent_dir) => r,
        () = stop.recv() => Err("interrupted before the host was Ready".to_string()),
        r = &mut agent => Err(match r {
            Ok(Err(e)) => format!("the agent stopped: {e}"),
            Ok(Ok(())) => "the agent stopped".into(),
            Err(e) => format!("the agent failed: {e}"),
        }),
        r = &mut server => Err(match r {
            Ok(Err(e)) => format!("the server stopped: {e:#}"),
            _ => "the server stopped".into(),
        }),
    };
    match &ready {
        Ok(host) => println!("{}", banner(&dir, &endpoints.api, &cli_config, host)),
        Err(e) => {
            let _ = stop_agent.send(true);
            let _ = stop_server.send(());
            let _ = tokio::time::timeout(STOP_TIMEOUT, async {
                if !agent.is_finished() {
                    let _ = (&mut agent).await;
                }
                if !server.is_finished() {
                    let _ = (&mut server).await;
                }
            })
            .await;
            return Err(CliError::Failed(format!(
                "the local cluster did not come up: {e}"
            )));
        }
    }

    let failure = tokio::select! {
        () = stop.recv() => None,
        r = &mut agent => Some(format!("the agent stopped unexpectedly: {}", match r {
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(())) => "no error".into(),
            Err(e) => e.to_string(),
        })),
        r = &mut server => Some(format!("the server stopped unexpectedly: {}", match r {
            Ok(Err(e)) => format!("{e:#}"),
            Ok(Ok(())) => "no error".into(),
            Err(e) => e.to_string(),
        })),
    };
    eprintln!("stopping the agent and the server; the Gateway containers keep running");
    let _ = stop_agent.send(true);
    if !agent.is_finished() {
        let _ = tokio::time::timeout(STOP_TIMEOUT, &mut agent).await;
    }
    let _ = stop_server.send(());
    if !server.is_finished() {
        let _ = tokio::time::timeout(STOP_TIMEOUT, &mut server).await;
    }
    match failure {
        None => {
            println!(
                "stopped. `clusterclaw dev{}` resumes this cluster and adopts its containers.",
                dir_flag(&dir)
            );
            Ok(())
        }
        Some(e) => Err(CliError::Failed(e)),
    }
}

fn dir_flag(dir: &Path) -> String {
    let default = std::path::absolute(DEFAULT_DEV_DIR).unwrap_or_default();
    if dir == default {
        String::new()
    } else {
        format!(" --data-dir {}", dir.display())
    }
}

fn banner(dir: &Path, api: &str, cli_config: &Path, host: &str) -> String {
    format!(
        "\nclusterclaw dev: a local cluster is running.\n\
         \n  API        {api}\
         \n  host       {host} (Ready, containers on the local engine)\
         \n  data       {}\
         \n  CLI config {} (server and admin token)\
         \n\nNext:\
         \n  clusterclaw get hosts\
         \n  clusterclaw apply -f examples/quickstart.yaml\
         \n  clusterclaw get instances -A\
         \n  clusterclaw describe instance support-bot -t acme -p helpdesk\
         \n\nCtrl-C stops the server and the agent (the Gateway containers keep running).\n",
        dir.display(),
        cli_config.display()
    )
}

async fn wait_for_endpoints(server_dir: &Path) -> Result<crate::server::Endpoints, CliError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(e) = crate::server::read_endpoints(server_dir)
            && e.pid == std::process::id()
        {
            return Ok(e);
        }
        if Instant::now() > deadline {
            return Err(CliError::Failed(format!(
                "the server wrote no endpoints.json in {} within {START_TIMEOUT:?}",
                server_dir.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn create_join_token(
    http: &reqwest::Client,
    api: &str,
    admin_token: &str,
) -> Result<String, CliError> {
    let url = format!("{api}/api/v1/tokens");
    let resp = http
        .post(&url)
        .bearer_auth(admin_token)
        .json(&json!({"kind": "join", "ttl": "10m", "uses": 1, "name": "clusterclaw dev"}))
        .send()
        .await
        .map_err(|e| CliError::Unreachable(format!("POST {url}: {e}")))?;
    let status = resp.status();
    let body: Value = resp
        .json()
        .await
        .map_err(|e| CliError::Failed(format!("POST {url}: unreadable answer: {e}")))?;
    match body.get("token").and_then(Value::as_str) {
        Some(t) if status.is_success() => Ok(t.to_string()),
        _ => Err(CliError::Failed(format!(
            "the server did not create a join token (HTTP {status}): {}",
            body.get("message").and_then(Value::as_str).unwrap_or("")
        ))),
    }
}

/// Waits until the agent has enrolled and its host reports Ready; returns the host's name.
async fn wait_for_ready_host(
    http: &reqwest::Client,
    api: &str,
    admin_token: &str,
    agent_dir: &Path,
) -> Result<String, String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let files = IdentityFiles::in_dir(agent_dir);
    let mut host = None;
    let mut last = String::from("the agent has not enrolled yet");
    loop {
        if host.is_none() && files.exist() {
            host = clusterclaw_agent::enroll::load(&files)
                .ok()
                .map(|id| id.record.host_id);
        }
        if let Some(name) = &host {
            let url = format!("{api}/api/v1/hosts/{name}");
            match http.get(&url).bearer_auth(admin_token).send().await {
                Ok(r) if r.status().is_success() => {
                    let v: Value = r.json().await.unwrap_or_default();
                    let phase = v
                        .pointer("/status/phase")
                        .and_then(Value::as_str)
                        .unwrap_or("Unknown");
                    if phase == "Ready" {
                        return Ok(name.clone());
                    }
                    last = format!("host {name} is {phase}");
                }
                Ok(r) => last = format!("GET {url}: HTTP {}", r.status()),
                Err(e) => last = format!("GET {url}: {e}"),
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no Ready host within {START_TIMEOUT:?} ({last}); see the log above"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM and SIGINT, each listened to from the moment this is made (a signal that arrives
/// before [`Termination::recv`] is awaited is kept, not lost to the default action).
struct Termination(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl Termination {
    fn listen() -> Termination {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Termination(Some((term, int))),
            _ => Termination(None),
        }
    }

    /// Waits for SIGTERM or SIGINT.
    async fn recv(&mut self) {
        match &mut self.0 {
            Some((term, int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_banner_says_what_to_do_next() {
        let b = banner(
            Path::new("/tmp/d"),
            "http://127.0.0.1:7080",
            Path::new("/home/u/.config/clusterclaw/config.toml"),
            "laptop",
        );
        assert!(b.contains("clusterclaw apply -f examples/quickstart.yaml"));
        assert!(b.contains("clusterclaw get instances -A"));
        assert!(b.contains("laptop (Ready"));
        assert!(b.contains("containers keep running"));
    }

    #[test]
    fn bad_addresses_are_usage_errors() {
        let err = parse_addr("--api-listen", "localhost").unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--api-listen"));
    }
}
