//! Configuration of `clusterclaw-agent`: flags over environment variables over a TOML file over defaults, validated whole before anything starts.
//!
//! Every problem is collected and reported at once, each with where it came from (the flag, or
//! the file with line and column) and what would be right; `main` then exits with [`EX_USAGE`].

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::enroll::IdentityFiles;
use crate::model::is_dns_label;
use crate::probe::ProbeSettings;
use crate::runtime::RuntimeKind;

/// Exit code for a bad command line or configuration (sysexits `EX_USAGE`).
pub const EX_USAGE: u8 = 64;
/// Data directory of an agent running as root.
pub const SYSTEM_DATA_DIR: &str = "/var/lib/clusterclaw-agent";
/// Environment variable that may carry the join token.
pub const JOIN_TOKEN_ENV: &str = "CLUSTERCLAW_JOIN_TOKEN";
/// Every other environment variable of `clusterclaw-agent` starts with this.
pub const ENV_PREFIX: &str = "CLUSTERCLAW_AGENT_";
/// Each flag of `clusterclaw-agent` and the environment variable that gives the same setting
/// (used when the flag is absent; the flag wins). `CLUSTERCLAW_AGENT_LABELS` takes
/// comma-separated `KEY=VALUE` pairs.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("--config", "CLUSTERCLAW_AGENT_CONFIG"),
    ("--server", "CLUSTERCLAW_AGENT_SERVER"),
    ("--ca-cert", "CLUSTERCLAW_AGENT_CA_CERT"),
    ("--join-token", JOIN_TOKEN_ENV),
    ("--join-token-file", "CLUSTERCLAW_AGENT_JOIN_TOKEN_FILE"),
    ("--data-dir", "CLUSTERCLAW_AGENT_DATA_DIR"),
    ("--label", "CLUSTERCLAW_AGENT_LABELS"),
    ("--name", "CLUSTERCLAW_AGENT_NAME"),
    ("--runtime", "CLUSTERCLAW_AGENT_RUNTIME"),
    ("--docker-host", "CLUSTERCLAW_AGENT_DOCKER_HOST"),
    ("--log-format", "CLUSTERCLAW_AGENT_LOG_FORMAT"),
    ("--report-interval", "CLUSTERCLAW_AGENT_REPORT_INTERVAL"),
    ("--poll-wait", "CLUSTERCLAW_AGENT_POLL_WAIT"),
    ("--resync-interval", "CLUSTERCLAW_AGENT_RESYNC_INTERVAL"),
    ("--probe-interval", "CLUSTERCLAW_AGENT_PROBE_INTERVAL"),
    ("--probe-timeout", "CLUSTERCLAW_AGENT_PROBE_TIMEOUT"),
    (
        "--probe-failure-threshold",
        "CLUSTERCLAW_AGENT_PROBE_FAILURE_THRESHOLD",
    ),
    (
        "--probe-initial-delay",
        "CLUSTERCLAW_AGENT_PROBE_INITIAL_DELAY",
    ),
    ("--restart-backoff", "CLUSTERCLAW_AGENT_RESTART_BACKOFF"),
    (
        "--parallel-operations",
        "CLUSTERCLAW_AGENT_PARALLEL_OPERATIONS",
    ),
    ("--re-enroll", "CLUSTERCLAW_AGENT_RE_ENROLL"),
    ("--snapshots-keep", "CLUSTERCLAW_AGENT_SNAPSHOTS_KEEP"),
];

/// The environment variable of a flag in [`ENV_VARS`].
fn env_var(flag: &str) -> &'static str {
    ENV_VARS
        .iter()
        .find(|(f, _)| *f == flag)
        .map_or("", |(_, v)| v)
}
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_POLL_WAIT: Duration = Duration::from_secs(300);
/// How often the agent compares the engine with its assignments when nothing else wakes it.
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(5);
/// The longest hold of a long poll the server grants.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(600);
const MIN_INTERVAL: Duration = Duration::from_secs(1);
const MAX_REPORT_INTERVAL: Duration = Duration::from_secs(600);

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub const ALLOWED: &'static str = "text or json";

    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// A join token. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(String);

impl JoinToken {
    pub fn new(token: impl Into<String>) -> Self {
        JoinToken(token.into())
    }

    /// The token itself, for the `Enroll` request only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Flags of `clusterclaw-agent`. Each one overrides its environment variable, which overrides
/// the same setting of the config file.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AgentArgs {
    /// TOML configuration file; flags and environment variables override its settings
    /// [env: CLUSTERCLAW_AGENT_CONFIG].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The control plane's agent port, https://HOST:PORT (needed to enroll; later starts use
    /// the server the host enrolled with unless this is given). Repeat it, or give a
    /// comma-separated list, for several servers of one cluster: the agent uses the first that
    /// answers and moves to the next when its server fails [env: CLUSTERCLAW_AGENT_SERVER].
    #[arg(long, value_name = "URL")]
    pub server: Vec<String>,
    /// PEM file of the cluster CA (needed only to enroll; `clusterclaw server` prints its path)
    /// [env: CLUSTERCLAW_AGENT_CA_CERT].
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Join token for the first start (`clusterclaw token create join`), or to enroll again as a
    /// new host after the control plane removed this one; other starts need none.
    #[arg(
        long,
        env = JOIN_TOKEN_ENV,
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub join_token: Option<String>,
    /// File holding the join token (instead of --join-token), for unattended enrollment; it is
    /// deleted once the host is enrolled, and not needed after that
    /// [env: CLUSTERCLAW_AGENT_JOIN_TOKEN_FILE].
    #[arg(long, value_name = "FILE")]
    pub join_token_file: Option<PathBuf>,
    /// Directory of the host identity, saved assignments and rendered configs [default:
    /// /var/lib/clusterclaw-agent as root, else $XDG_DATA_HOME/clusterclaw-agent or
    /// ~/.local/share/clusterclaw-agent] [env: CLUSTERCLAW_AGENT_DATA_DIR].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A label of this host, KEY=VALUE, for placement (repeatable; sent when enrolling)
    /// [env: CLUSTERCLAW_AGENT_LABELS, comma-separated].
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// The host's name in the cluster [default: the machine's hostname]
    /// [env: CLUSTERCLAW_AGENT_NAME].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Container engine: docker or podman (through its Docker-compatible socket) [default:
    /// docker] [env: CLUSTERCLAW_AGENT_RUNTIME].
    #[arg(long, value_name = "RUNTIME")]
    pub runtime: Option<String>,
    /// The engine's API address: unix:///path, /path, tcp://HOST:PORT [default: the runtime's
    /// local socket] [env: CLUSTERCLAW_AGENT_DOCKER_HOST].
    #[arg(long, value_name = "ADDR")]
    pub docker_host: Option<String>,
    /// Log format: text or json [default: text]. The filter comes from RUST_LOG (default info)
    /// [env: CLUSTERCLAW_AGENT_LOG_FORMAT].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// How often status is reported (it is also reported at once after a change) [default: 10s]
    /// [env: CLUSTERCLAW_AGENT_REPORT_INTERVAL].
    #[arg(long, value_name = "DURATION")]
    pub report_interval: Option<String>,
    /// How long one assignment long poll may be held by the server [default: 5m, at most 10m]
    /// [env: CLUSTERCLAW_AGENT_POLL_WAIT].
    #[arg(long, value_name = "DURATION")]
    pub poll_wait: Option<String>,
    /// How often the engine is compared with the assignments when nothing else changes
    /// [default: 5s] [env: CLUSTERCLAW_AGENT_RESYNC_INTERVAL].
    #[arg(long, value_name = "DURATION")]
    pub resync_interval: Option<String>,
    /// Interval between health probes of a running replica [default: 10s]
    /// [env: CLUSTERCLAW_AGENT_PROBE_INTERVAL].
    #[arg(long, value_name = "DURATION")]
    pub probe_interval: Option<String>,
    /// How long a health probe may take [default: 3s] [env: CLUSTERCLAW_AGENT_PROBE_TIMEOUT].
    #[arg(long, value_name = "DURATION")]
    pub probe_timeout: Option<String>,
    /// Liveness failures in a row after which a replica is restarted [default: 3]
    /// [env: CLUSTERCLAW_AGENT_PROBE_FAILURE_THRESHOLD].
    #[arg(long, value_name = "N")]
    pub probe_failure_threshold: Option<u32>,
    /// Liveness failures this soon after a container starts are not counted [default: 15s]
    /// [env: CLUSTERCLAW_AGENT_PROBE_INITIAL_DELAY].
    #[arg(long, value_name = "DURATION")]
    pub probe_initial_delay: Option<String>,
    /// Delay before the first restart of a failing replica, doubled after each further failure
    /// [default: 10s] [env: CLUSTERCLAW_AGENT_RESTART_BACKOFF].
    #[arg(long, value_name = "DURATION")]
    pub restart_backoff: Option<String>,
    /// How many replicas the agent works on at once (creating, stopping, replacing,
    /// restarting, removing); a slow stop never holds up the others [default: 16]
    /// [env: CLUSTERCLAW_AGENT_PARALLEL_OPERATIONS].
    #[arg(long, value_name = "N")]
    pub parallel_operations: Option<u32>,
    /// Snapshots of a replica's state volume kept on the host (one is taken before every
    /// change of image) [default: 3] [env: CLUSTERCLAW_AGENT_SNAPSHOTS_KEEP].
    #[arg(long, value_name = "N")]
    pub snapshots_keep: Option<u32>,
    /// Enroll again under a new identity with the join token given, although this host is
    /// enrolled: the containers of the old identity are stopped and removed, its state volumes
    /// kept (the old host object stays NotReady until an admin deletes it), the data directory
    /// kept [env: CLUSTERCLAW_AGENT_RE_ENROLL=true].
    #[arg(long)]
    pub re_enroll: bool,
}

/// The whole, validated configuration of an agent.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    /// The config file the settings came from, if any.
    pub config_file: Option<PathBuf>,
    /// `https://HOST:PORT`, the first of [`AgentConfig::servers`]; `None` only when the data
    /// dir holds an identity naming its server.
    pub server: Option<String>,
    /// Every server given, in the order to try them (empty: the one the host enrolled with).
    pub servers: Vec<String>,
    /// PEM text of the cluster CA, read from `--ca-cert`.
    pub ca_pem: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub join_token: Option<JoinToken>,
    /// The file the join token was read from; deleted once the host is enrolled.
    pub join_token_file: Option<PathBuf>,
    /// Absolute.
    pub data_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub name: Option<String>,
    pub runtime: RuntimeKind,
    pub docker_host: Option<String>,
    pub log_format: LogFormat,
    pub report_interval: Duration,
    pub poll_wait: Duration,
    pub resync_interval: Duration,
    pub probe: ProbeSettings,
    pub restart_backoff: Duration,
    /// Replicas worked on at once.
    pub parallel_operations: usize,
    /// Snapshots kept per replica.
    pub snapshots_keep: usize,
    /// Enroll under a new identity although one is saved (`--re-enroll`).
    pub re_enroll: bool,
}

impl AgentConfig {
    /// Defaults around `data_dir` and `server`, for embedding (`clusterclaw dev`) and tests.
    pub fn new(data_dir: impl Into<PathBuf>, server: Option<String>) -> Self {
        AgentConfig {
            config_file: None,
            servers: server.iter().cloned().collect(),
            server,
            ca_pem: None,
            ca_cert: None,
            join_token: None,
            join_token_file: None,
            data_dir: data_dir.into(),
            labels: BTreeMap::new(),
            name: None,
            runtime: RuntimeKind::Docker,
            docker_host: None,
            log_format: LogFormat::Text,
            report_interval: DEFAULT_REPORT_INTERVAL,
            poll_wait: DEFAULT_POLL_WAIT,
            resync_interval: DEFAULT_RESYNC_INTERVAL,
            probe: ProbeSettings::default(),
            restart_backoff: crate::reconcile::BackoffPolicy::default().initial,
            parallel_operations: crate::reconcile::DEFAULT_MAX_PARALLEL,
            snapshots_keep: crate::snapshot::DEFAULT_KEEP,
            re_enroll: false,
        }
    }

    /// Loads the file named by `--config` (if any), applies the flags, the environment and the
    /// defaults, and checks everything, reporting every problem at once.
    pub fn load(args: &AgentArgs) -> Result<AgentConfig, ConfigError> {
        load_with(args, &Environment::current())
    }
}

/// One thing wrong with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Where: `--report-interval`, or `/etc/clusterclaw/agent.toml, line 3, column 1 (poll_wait)`.
    pub location: String,
    /// What is wrong and what is allowed.
    pub problem: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.problem)
    }
}

/// Every problem found in a configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "the agent configuration has {n} problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// What the defaults depend on, and the settings given as environment variables.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    pub root: bool,
    pub home: Option<PathBuf>,
    pub xdg_data_home: Option<PathBuf>,
    /// The `CLUSTERCLAW_AGENT_*` variables that are set and not empty.
    pub vars: BTreeMap<String, String>,
}

impl Environment {
    pub fn current() -> Self {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Environment {
            root: running_as_root(),
            home: var("HOME"),
            xdg_data_home: var("XDG_DATA_HOME"),
            vars: std::env::vars_os()
                .filter_map(|(k, v)| {
                    let k = k.into_string().ok()?;
                    let v = v.to_string_lossy().into_owned();
                    (k.starts_with(ENV_PREFIX) && !v.is_empty()).then_some((k, v))
                })
                .collect(),
        }
    }

    /// The value of a variable of [`ENV_VARS`], with where it came from.
    fn setting(&self, flag: &str) -> Option<Setting<String>> {
        let var = env_var(flag);
        self.vars.get(var).map(|v| Setting {
            value: v.clone(),
            location: format!("{var} (environment)"),
        })
    }

    /// `/var/lib/clusterclaw-agent` for root, else `$XDG_DATA_HOME/clusterclaw-agent` or
    /// `~/.local/share/clusterclaw-agent`.
    pub fn default_data_dir(&self) -> Option<PathBuf> {
        if self.root {
            return Some(PathBuf::from(SYSTEM_DATA_DIR));
        }
        if let Some(x) = self.xdg_data_home.as_ref().filter(|x| x.is_absolute()) {
            return Some(x.join("clusterclaw-agent"));
        }
        self.home
            .as_ref()
            .filter(|h| h.is_absolute())
            .map(|h| h.join(".local/share/clusterclaw-agent"))
    }
}

/// Whether the process runs with effective uid 0 (read from /proc, Linux).
fn running_as_root() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server: Option<Spanned<ServerList>>,
    ca_cert: Option<Spanned<String>>,
    join_token_file: Option<Spanned<String>>,
    data_dir: Option<Spanned<String>>,
    #[serde(default)]
    labels: BTreeMap<String, Spanned<String>>,
    name: Option<Spanned<String>>,
    runtime: Option<Spanned<String>>,
    docker_host: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
    report_interval: Option<Spanned<String>>,
    poll_wait: Option<Spanned<String>>,
    resync_interval: Option<Spanned<String>>,
    restart_backoff: Option<Spanned<String>>,
    parallel_operations: Option<Spanned<u32>>,
    snapshots_keep: Option<Spanned<u32>>,
    #[serde(default)]
    probe: ProbeSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeSection {
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    failure_threshold: Option<Spanned<u32>>,
    initial_delay: Option<Spanned<String>>,
}

/// The config file: its path and its text.
struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    fn location(&self, span: Range<usize>, key: &str) -> String {
        let upto = &self.text[..span.start.min(self.text.len())];
        let line = upto.matches('\n').count() + 1;
        let column = upto.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!(
            "{}, line {line}, column {column} ({key})",
            self.path.display()
        )
    }

    /// A path from the file, relative to the file's directory.
    fn path_value(&self, value: &str) -> PathBuf {
        let p = Path::new(value);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

/// A setting and where it came from, for messages.
struct Setting<T> {
    value: T,
    location: String,
}

#[derive(Default)]
struct Collector {
    problems: Vec<ConfigProblem>,
}

impl Collector {
    fn push(&mut self, location: impl Into<String>, problem: impl Into<String>) {
        self.problems.push(ConfigProblem {
            location: location.into(),
            problem: problem.into(),
        });
    }
}

/// The flag if given, else its environment variable, each with where it came from.
fn given<T>(
    flag: Option<T>,
    flag_name: &str,
    env: &Environment,
    from_env: impl FnOnce(String) -> T,
) -> Option<Setting<T>> {
    match flag {
        Some(value) => Some(Setting {
            value,
            location: flag_name.to_string(),
        }),
        None => env.setting(flag_name).map(|s| Setting {
            value: from_env(s.value),
            location: s.location,
        }),
    }
}

/// Picks the flag or environment setting if given, else the file's value (with its location),
/// else nothing.
fn pick<T, V>(
    given: Option<Setting<T>>,
    file: Option<&Spanned<V>>,
    key: &str,
    source: Option<&Source>,
    from_file: impl Fn(&Source, &V) -> T,
) -> Option<Setting<T>> {
    if given.is_some() {
        return given;
    }
    let (file, source) = (file?, source?);
    Some(Setting {
        value: from_file(source, file.get_ref()),
        location: source.location(file.span(), key),
    })
}

/// A whole number from a flag, its environment variable or the file, within `range`.
fn count_setting(
    c: &mut Collector,
    env: &Environment,
    (flag_value, flag): (Option<u32>, &str),
    (file_value, key, src): (Option<&Spanned<u32>>, &str, Option<&Source>),
    (min, max): (u32, u32),
    default: usize,
) -> usize {
    let given = match flag_value {
        Some(value) => Some(Setting {
            value,
            location: flag.to_string(),
        }),
        None => env
            .setting(flag)
            .and_then(|s| match s.value.trim().parse::<u32>() {
                Ok(value) => Some(Setting {
                    value,
                    location: s.location,
                }),
                Err(_) => {
                    c.push(
                        s.location,
                        format!("{:?} is not a whole number from {min} to {max}", s.value),
                    );
                    None
                }
            }),
    };
    match pick(given, file_value, key, src, |_, v| *v) {
        None => default,
        Some(Setting { value, .. }) if (min..=max).contains(&value) => value as usize,
        Some(Setting { value, location }) => {
            c.push(
                location,
                format!("{value} is out of range; allowed is {min} to {max}"),
            );
            default
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `server` in the config file: one URL or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ServerList {
    One(String),
    Many(Vec<String>),
}

impl ServerList {
    fn joined(&self) -> String {
        match self {
            ServerList::One(s) => s.clone(),
            ServerList::Many(v) => v.join(","),
        }
    }
}

/// Checks a list of agent-port URLs (comma-separated): each as [`check_server_url`], at least
/// one, duplicates dropped, order kept.
pub fn check_server_list(list: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let url = check_server_url(part)?;
        if !out.contains(&url) {
            out.push(url);
        }
    }
    if out.is_empty() {
        return Err(format!(
            "{list:?} names no server; expected https://HOST:PORT, or several separated by commas"
        ));
    }
    Ok(out)
}

/// Checks a server URL of the agent port: `https://HOST[:PORT]`, nothing after the authority.
pub fn check_server_url(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(format!(
            "{url:?} is not an agent-port URL: it must start with https:// (the agent port always uses TLS), e.g. https://cp.example.com:7443"
        ));
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "{url:?} is not an agent-port URL: expected https://HOST:PORT with no path, e.g. https://cp.example.com:7443"
        ));
    }
    let uri: http_uri::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} names no host"));
    }
    Ok(url.to_string())
}

mod http_uri {
    pub use tonic::codegen::http::Uri;
}

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then 1-63 of letters, digits,
/// `-`, `_`, `.`, starting and ending with a letter or digit.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && (p.is_empty() || p.len() > 253 || !p.split('.').all(is_dns_label))
    {
        return Err(format!(
            "label key {key:?} has an invalid prefix {p:?}; the prefix must be a DNS subdomain such as example.com"
        ));
    }
    if !label_segment(name) {
        return Err(format!(
            "label key {key:?} is invalid: the name part must be 1-63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Checks a label value: empty, or like the name part of a key.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || label_segment(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} is invalid: at most 63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

fn label_segment(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_duration(
    c: &mut Collector,
    setting: Option<Setting<String>>,
    default: Duration,
    range: (Duration, Duration),
) -> Duration {
    let Some(Setting { value, location }) = setting else {
        return default;
    };
    let fmt = |d: Duration| humantime::format_duration(d).to_string();
    match humantime::parse_duration(value.trim()) {
        Err(e) => {
            c.push(
                location,
                format!("{value:?} is not a duration such as 500ms, 10s or 5m: {e}"),
            );
            default
        }
        Ok(d) if d < range.0 || d > range.1 => {
            c.push(
                location,
                format!(
                    "{value:?} is out of range; allowed is {} to {}",
                    fmt(range.0),
                    fmt(range.1)
                ),
            );
            default
        }
        Ok(d) => d,
    }
}

/// [`AgentConfig::load`] with the environment given (for tests).
pub fn load_with(args: &AgentArgs, env: &Environment) -> Result<AgentConfig, ConfigError> {
    let mut c = Collector::default();
    for var in env.vars.keys() {
        if !ENV_VARS.iter().any(|(_, v)| v == var) {
            let known: Vec<&str> = ENV_VARS
                .iter()
                .map(|(_, v)| *v)
                .filter(|v| v.starts_with(ENV_PREFIX))
                .collect();
            c.push(
                format!("{var} (environment)"),
                format!(
                    "is not a setting of clusterclaw-agent; the variables are {}",
                    known.join(", ")
                ),
            );
        }
    }
    let mut file = FileConfig::default();
    let mut source = None;
    if let Some(config) = given(args.config.clone(), "--config", env, PathBuf::from) {
        let path = &config.value;
        match std::fs::read_to_string(path) {
            Err(e) => c.push(
                format!("{} {}", config.location, path.display()),
                format!("cannot read the file: {e}"),
            ),
            Ok(text) => {
                let src = Source {
                    path: absolute(path),
                    text,
                };
                match toml::from_str::<FileConfig>(&src.text) {
                    Ok(f) => file = f,
                    Err(e) => {
                        let loc = match e.span() {
                            Some(span) => src.location(span, "the file"),
                            None => src.path.display().to_string(),
                        };
                        c.push(
                            loc,
                            format!(
                                "{} (the keys are server, ca_cert, join_token_file, data_dir, labels, name, runtime, docker_host, log_format, report_interval, poll_wait, resync_interval, restart_backoff, parallel_operations, snapshots_keep and [probe] interval, timeout, failure_threshold, initial_delay)",
                                e.message().trim().replace('`', "'")
                            ),
                        );
                    }
                }
                source = Some(src);
            }
        }
    }
    let src = source.as_ref();
    let string = |_: &Source, v: &String| v.clone();
    let same = |v: String| v;

    // Data directory.
    let data_dir = match pick(
        given(args.data_dir.clone(), "--data-dir", env, PathBuf::from),
        file.data_dir.as_ref(),
        "data_dir",
        src,
        |s, v| s.path_value(v),
    ) {
        Some(Setting { value, location }) => {
            if value.as_os_str().is_empty() {
                c.push(
                    location,
                    "must not be empty; give the directory for the host identity and state",
                );
            } else if value.exists() && !value.is_dir() {
                c.push(
                    location,
                    format!("{} exists and is not a directory", value.display()),
                );
            }
            absolute(&value)
        }
        None => env.default_data_dir().unwrap_or_else(|| {
            c.push(
                "data directory",
                "cannot pick a default (HOME is not set); pass --data-dir or set data_dir in the config file",
            );
            PathBuf::new()
        }),
    };
    let enrolled = !data_dir.as_os_str().is_empty() && IdentityFiles::in_dir(&data_dir).exist();

    // Server.
    let server_flags = (!args.server.is_empty()).then(|| args.server.join(","));
    let server_setting = pick(
        given(server_flags, "--server", env, same),
        file.server.as_ref(),
        "server",
        src,
        |_, v: &ServerList| v.joined(),
    );
    let server_given = server_setting.is_some();
    let servers = server_setting.map_or_else(Vec::new, |s| match check_server_list(&s.value) {
        Ok(urls) => urls,
        Err(problem) => {
            c.push(s.location, problem);
            Vec::new()
        }
    });
    let server = servers.first().cloned();

    // Join token: the flag or its environment variable, or a file. A token given directly beats
    // a token file named in the config file; both given directly is ambiguous. Once the host
    // is enrolled, a token file that is gone (deleted after use) is fine.
    let token_file_flag = given(
        args.join_token_file.clone(),
        "--join-token-file",
        env,
        PathBuf::from,
    );
    let token_file = if args.join_token.is_some() && token_file_flag.is_none() {
        None
    } else {
        pick(
            token_file_flag,
            file.join_token_file.as_ref(),
            "join_token_file",
            src,
            |s, v| s.path_value(v),
        )
    };
    let token_given = args.join_token.is_some() || token_file.is_some();
    let mut join_token_file = None;
    let join_token = match (&args.join_token, token_file) {
        (Some(_), Some(f)) => {
            c.push(
                f.location,
                format!("give the join token once: either --join-token (or {JOIN_TOKEN_ENV}) or a token file"),
            );
            None
        }
        (Some(t), None) if t.trim().is_empty() => {
            c.push(
                format!("--join-token (or {JOIN_TOKEN_ENV})"),
                "is empty; pass the token `clusterclaw token create join` printed",
            );
            None
        }
        (Some(t), None) => Some(JoinToken::new(t.trim())),
        (None, Some(Setting { value, location })) => match std::fs::read_to_string(&value) {
            Err(e) if enrolled && e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                c.push(
                    location,
                    format!(
                        "cannot read the join token file {}: {e}; write the token `clusterclaw token create join` printed there",
                        value.display()
                    ),
                );
                None
            }
            Ok(t) if t.trim().is_empty() => {
                c.push(
                    location,
                    format!("the join token file {} is empty", value.display()),
                );
                None
            }
            Ok(t) => {
                join_token_file = Some(absolute(&value));
                Some(JoinToken::new(t.trim()))
            }
        },
        (None, None) => None,
    };

    // CA certificate: needed only to enroll, so a missing file is fine once enrolled.
    let ca_cert = pick(
        given(args.ca_cert.clone(), "--ca-cert", env, PathBuf::from),
        file.ca_cert.as_ref(),
        "ca_cert",
        src,
        |s, v| s.path_value(v),
    );
    let ca_given = ca_cert.is_some();
    let mut ca_pem = None;
    let mut ca_path = None;
    if let Some(Setting { value, location }) = ca_cert {
        match std::fs::read_to_string(&value) {
            Err(e) if enrolled && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => c.push(
                location,
                format!("cannot read the CA certificate {}: {e}", value.display()),
            ),
            Ok(pem) if !pem.contains("-----BEGIN CERTIFICATE-----") => c.push(
                location,
                format!(
                    "{} is not a PEM certificate (no BEGIN CERTIFICATE line); pass the cluster CA, e.g. <server data dir>/pki/ca.crt",
                    value.display()
                ),
            ),
            Ok(pem) => {
                ca_pem = Some(pem);
                ca_path = Some(absolute(&value));
            }
        }
    }

    // What enrollment needs. Report only what is absent, not what was given but invalid
    // (reported above).
    if !enrolled && !data_dir.as_os_str().is_empty() {
        let absent: Vec<&str> = [
            (server_given, "--server"),
            (ca_given, "--ca-cert"),
            (token_given, "--join-token"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| (!given).then_some(flag))
        .collect();
        if !absent.is_empty() {
            c.push(
                "enrollment",
                format!(
                    "this host is not enrolled yet (no identity in {}), so {} {} needed: create a token with `clusterclaw token create join` and pass --server https://HOST:7443 --ca-cert FILE --join-token TOKEN (or the environment variables or config file settings of the same names)",
                    data_dir.display(),
                    absent.join(", "),
                    if absent.len() == 1 { "is" } else { "are" }
                ),
            );
        }
    }

    // Labels: the file's, then the environment's over them, then the flags'.
    let mut labels = BTreeMap::new();
    if let Some(s) = src {
        for (k, v) in &file.labels {
            let location = s.location(v.span(), &format!("labels.{k}"));
            match check_label_key(k).and_then(|()| check_label_value(v.get_ref())) {
                Ok(()) => {
                    labels.insert(k.clone(), v.get_ref().clone());
                }
                Err(problem) => c.push(location, problem),
            }
        }
    }
    let env_labels = env.setting("--label");
    let env_labels = env_labels.iter().flat_map(|s| {
        s.value
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| (l.to_string(), format!("{}: {l}", s.location)))
    });
    let flag_labels = args
        .labels
        .iter()
        .map(|l| (l.clone(), format!("--label {l}")));
    for (l, location) in env_labels.chain(flag_labels) {
        let Some((k, v)) = l.split_once('=') else {
            c.push(location, "expected KEY=VALUE, e.g. --label region=eu");
            continue;
        };
        match check_label_key(k).and_then(|()| check_label_value(v)) {
            Ok(()) => {
                labels.insert(k.to_string(), v.to_string());
            }
            Err(problem) => c.push(location, problem),
        }
    }

    let name = pick(
        given(args.name.clone(), "--name", env, same),
        file.name.as_ref(),
        "name",
        src,
        string,
    )
    .and_then(|s| {
        if is_dns_label(&s.value) {
            Some(s.value)
        } else {
            c.push(
                s.location,
                format!(
                    "{:?} is not a valid host name: 1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
                    s.value
                ),
            );
            None
        }
    });

    let runtime = match pick(
        given(args.runtime.clone(), "--runtime", env, same),
        file.runtime.as_ref(),
        "runtime",
        src,
        string,
    ) {
        None => RuntimeKind::Docker,
        Some(s) => s.value.parse().unwrap_or_else(|e: String| {
            c.push(s.location, e);
            RuntimeKind::Docker
        }),
    };

    let docker_host = pick(
        given(args.docker_host.clone(), "--docker-host", env, same),
        file.docker_host.as_ref(),
        "docker_host",
        src,
        string,
    )
    .and_then(|s| {
        let v = s.value.trim();
        let ok = v.starts_with("unix:///")
            || v.starts_with('/')
            || v.starts_with("tcp://")
            || v.starts_with("http://");
        if ok {
            Some(v.to_string())
        } else {
            c.push(
                s.location,
                format!(
                    "{v:?} is not an engine address; expected unix:///path, /path, tcp://HOST:PORT or http://HOST:PORT"
                ),
            );
            None
        }
    });

    let log_format = match pick(
        given(args.log_format.clone(), "--log-format", env, same),
        file.log_format.as_ref(),
        "log_format",
        src,
        string,
    ) {
        None => LogFormat::Text,
        Some(s) => LogFormat::parse(&s.value).unwrap_or_else(|| {
            c.push(
                s.location,
                format!(
                    "{:?} is not a log format; use {}",
                    s.value,
                    LogFormat::ALLOWED
                ),
            );
            LogFormat::Text
        }),
    };

    let dur = |flag: &Option<String>, name: &str, f: Option<&Spanned<String>>, key: &str| {
        pick(given(flag.clone(), name, env, same), f, key, src, string)
    };
    let report_interval = {
        let s = dur(
            &args.report_interval,
            "--report-interval",
            file.report_interval.as_ref(),
            "report_interval",
        );
        parse_duration(
            &mut c,
            s,
            DEFAULT_REPORT_INTERVAL,
            (MIN_INTERVAL, MAX_REPORT_INTERVAL),
        )
    };
    let poll_wait = {
        let s = dur(
            &args.poll_wait,
            "--poll-wait",
            file.poll_wait.as_ref(),
            "poll_wait",
        );
        parse_duration(&mut c, s, DEFAULT_POLL_WAIT, (MIN_INTERVAL, MAX_POLL_WAIT))
    };
    let resync_interval = {
        let s = dur(
            &args.resync_interval,
            "--resync-interval",
            file.resync_interval.as_ref(),
            "resync_interval",
        );
        parse_duration(
            &mut c,
            s,
            DEFAULT_RESYNC_INTERVAL,
            (Duration::from_millis(500), Duration::from_secs(600)),
        )
    };
    let restart_backoff = {
        let s = dur(
            &args.restart_backoff,
            "--restart-backoff",
            file.restart_backoff.as_ref(),
            "restart_backoff",
        );
        parse_duration(
            &mut c,
            s,
            crate::reconcile::BackoffPolicy::default().initial,
            (Duration::from_millis(100), Duration::from_secs(300)),
        )
    };
    let defaults = ProbeSettings::default();
    let probe_interval = {
        let s = dur(
            &args.probe_interval,
            "--probe-interval",
            file.probe.interval.as_ref(),
            "probe.interval",
        );
        parse_duration(
            &mut c,
            s,
            defaults.interval,
            (Duration::from_millis(200), Duration::from_secs(600)),
        )
    };
    let timeout_given = args.probe_timeout.is_some()
        || env.setting("--probe-timeout").is_some()
        || file.probe.timeout.is_some();
    let probe_timeout = {
        let s = dur(
            &args.probe_timeout,
            "--probe-timeout",
            file.probe.timeout.as_ref(),
            "probe.timeout",
        );
        parse_duration(
            &mut c,
            s,
            defaults.timeout,
            (Duration::from_millis(50), Duration::from_secs(60)),
        )
    };
    let initial_delay = {
        let s = dur(
            &args.probe_initial_delay,
            "--probe-initial-delay",
            file.probe.initial_delay.as_ref(),
            "probe.initial_delay",
        );
        parse_duration(
            &mut c,
            s,
            defaults.initial_delay,
            (Duration::ZERO, Duration::from_secs(3600)),
        )
    };
    let threshold_given = match args.probe_failure_threshold {
        Some(value) => Some(Setting {
            value,
            location: "--probe-failure-threshold".to_string(),
        }),
        None => env.setting("--probe-failure-threshold").and_then(|s| {
            match s.value.trim().parse::<u32>() {
                Ok(value) => Some(Setting {
                    value,
                    location: s.location,
                }),
                Err(_) => {
                    c.push(
                        s.location,
                        format!("{:?} is not a whole number from 1 to 100", s.value),
                    );
                    None
                }
            }
        }),
    };
    let failure_threshold = match pick(
        threshold_given,
        file.probe.failure_threshold.as_ref(),
        "probe.failure_threshold",
        src,
        |_, v| *v,
    ) {
        None => defaults.failure_threshold,
        Some(Setting { value, location }) => {
            if (1..=100).contains(&value) {
                value
            } else {
                c.push(
                    location,
                    format!("{value} is out of range; allowed is 1 to 100"),
                );
                defaults.failure_threshold
            }
        }
    };
    let parallel_given = match args.parallel_operations {
        Some(value) => Some(Setting {
            value,
            location: "--parallel-operations".to_string(),
        }),
        None => {
            env.setting("--parallel-operations")
                .and_then(|s| match s.value.trim().parse::<u32>() {
                    Ok(value) => Some(Setting {
                        value,
                        location: s.location,
                    }),
                    Err(_) => {
                        c.push(
                            s.location,
                            format!("{:?} is not a whole number from 1 to 64", s.value),
                        );
                        None
                    }
                })
        }
    };
    let parallel_operations = match pick(
        parallel_given,
        file.parallel_operations.as_ref(),
        "parallel_operations",
        src,
        |_, v| *v,
    ) {
        None => crate::reconcile::DEFAULT_MAX_PARALLEL,
        Some(Setting { value, location }) => {
            if (1..=64).contains(&value) {
                value as usize
            } else {
                c.push(
                    location,
                    format!("{value} is out of range; allowed is 1 to 64"),
                );
                crate::reconcile::DEFAULT_MAX_PARALLEL
            }
        }
    };
    let snapshots_keep = count_setting(
        &mut c,
        env,
        (args.snapshots_keep, "--snapshots-keep"),
        (file.snapshots_keep.as_ref(), "snapshots_keep", src),
        (1, 100),
        crate::snapshot::DEFAULT_KEEP,
    );
    // The default timeout shrinks to a shorter interval; a given one must fit in it.
    let probe_timeout = if timeout_given {
        probe_timeout
    } else {
        probe_timeout.min(probe_interval)
    };
    if probe_timeout > probe_interval {
        c.push(
            "--probe-timeout",
            format!(
                "the probe timeout ({}) must not be longer than the probe interval ({})",
                humantime::format_duration(probe_timeout),
                humantime::format_duration(probe_interval)
            ),
        );
    }

    let re_enroll = match given(args.re_enroll.then_some(true), "--re-enroll", env, |v| {
        matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes")
    }) {
        Some(setting) => setting.value,
        None => false,
    };
    if re_enroll && join_token.is_none() {
        c.push(
            "--re-enroll",
            "needs a join token (--join-token or --join-token-file) for the new identity",
        );
    }
    if !c.problems.is_empty() {
        return Err(ConfigError {
            problems: c.problems,
        });
    }
    Ok(AgentConfig {
        config_file: source.map(|s| s.path),
        server,
        servers,
        ca_pem,
        ca_cert: ca_path,
        join_token,
        join_token_file,
        data_dir,
        labels,
        name,
        runtime,
        docker_host,
        log_format,
        report_interval,
        poll_wait,
        resync_interval,
        probe: ProbeSettings {
            interval: probe_interval,
            timeout: probe_timeout,
            failure_threshold,
            initial_delay,
        },
        restart_backoff,
        parallel_operations,
        snapshots_keep,
        re_enroll,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn env(home: &Path) -> Environment {
        Environment {
            root: false,
            home: Some(home.to_path_buf()),
            xdg_data_home: None,
            vars: BTreeMap::new(),
        }
    }

    fn enrolling(dir: &Path) -> AgentArgs {
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, CA).unwrap();
        AgentArgs {
            server: vec!["https://cp.example.com:7443".into()],
            ca_cert: Some(ca),
            join_token: Some("ccj_secret".into()),
            data_dir: Some(dir.join("data")),
            ..AgentArgs::default()
        }
    }

    #[test]
    fn re_enroll_needs_a_join_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = enrolling(dir.path());
        args.re_enroll = true;
        assert!(load_with(&args, &env(dir.path())).unwrap().re_enroll);
        args.join_token = None;
        let err = load_with(&args, &env(dir.path())).unwrap_err();
        let problem = err
            .problems
            .iter()
            .find(|p| p.location == "--re-enroll")
            .unwrap_or_else(|| panic!("a --re-enroll problem: {err}"));
        assert!(problem.problem.contains("join token"), "{err}");
        let mut vars = env(dir.path());
        vars.vars
            .insert("CLUSTERCLAW_AGENT_RE_ENROLL".into(), "true".into());
        let cfg = load_with(&enrolling(dir.path()), &vars).unwrap();
        assert!(cfg.re_enroll, "from the environment");
        assert!(
            !load_with(&enrolling(dir.path()), &env(dir.path()))
                .unwrap()
                .re_enroll
        );
    }

    #[test]
    fn defaults_for_a_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = load_with(&enrolling(dir.path()), &env(dir.path())).unwrap();
        assert_eq!(cfg.server.as_deref(), Some("https://cp.example.com:7443"));
        assert_eq!(cfg.report_interval, DEFAULT_REPORT_INTERVAL);
        assert_eq!(cfg.poll_wait, DEFAULT_POLL_WAIT);
        assert_eq!(cfg.runtime, RuntimeKind::Docker);
        assert_eq!(cfg.data_dir, dir.path().join("data"));
        assert_eq!(cfg.join_token.as_ref().unwrap().expose(), "ccj_secret");
        assert!(
            !format!("{cfg:?}").contains("ccj_secret"),
            "the token never reaches Debug output"
        );
    }

    #[test]
    fn default_data_dirs() {
        let root = Environment {
            root: true,
            ..Environment::default()
        };
        assert_eq!(
            root.default_data_dir(),
            Some(PathBuf::from(SYSTEM_DATA_DIR))
        );
        let user = Environment {
            root: false,
            home: Some("/home/u".into()),
            xdg_data_home: None,
            vars: BTreeMap::new(),
        };
        assert_eq!(
            user.default_data_dir(),
            Some(PathBuf::from("/home/u/.local/share/clusterclaw-agent"))
        );
        let xdg = Environment {
            xdg_data_home: Some("/x".into()),
            ..user
        };
        assert_eq!(
            xdg.default_data_dir(),
            Some(PathBuf::from("/x/clusterclaw-agent"))
        );
    }

    #[test]
    fn reports_every_problem_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let args = AgentArgs {
            server: vec!["http://cp:7443".into()],
            labels: vec!["region".into(), "-bad=x".into(), "zone=eu west".into()],
            runtime: Some("containerd".into()),
            report_interval: Some("fast".into()),
            poll_wait: Some("20m".into()),
            log_format: Some("xml".into()),
            name: Some("Node_1".into()),
            data_dir: Some(dir.path().join("d")),
            ..AgentArgs::default()
        };
        let err = load_with(&args, &env(dir.path())).unwrap_err();
        let text = err.to_string();
        for needle in [
            "--server: \"http://cp:7443\" is not an agent-port URL",
            "--label region: expected KEY=VALUE",
            "--label -bad=x: label key",
            "--label zone=eu west: label value",
            "--runtime: unknown runtime \"containerd\"",
            "--report-interval: \"fast\" is not a duration",
            "--poll-wait: \"20m\" is out of range",
            "--log-format: \"xml\" is not a log format",
            "--name: \"Node_1\" is not a valid host name",
            "enrollment: this host is not enrolled yet",
            "--ca-cert, --join-token are needed",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(err.problems.len(), 10, "{text}");
    }

    #[test]
    fn file_settings_with_locations_and_flag_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "report_interval = \"3s\"\npoll_wait = \"1h\"\n[labels]\nregion = \"eu\"\ndisk = \"ssd\"\n[probe]\ninterval = \"2s\"\nfailure_threshold = 0\n",
        )
        .unwrap();
        let mut args = enrolling(dir.path());
        args.config = Some(file.clone());
        let err = load_with(&args, &env(dir.path())).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(
            err.problems[0]
                .location
                .ends_with("agent.toml, line 2, column 13 (poll_wait)"),
            "{err}"
        );
        assert!(
            err.problems[1]
                .location
                .contains("line 8, column 21 (probe.failure_threshold)"),
            "{err}"
        );

        args.poll_wait = Some("30s".into());
        args.probe_failure_threshold = Some(2);
        args.labels = vec!["region=us".into()];
        let cfg = load_with(&args, &env(dir.path())).unwrap();
        assert_eq!(cfg.report_interval, Duration::from_secs(3));
        assert_eq!(cfg.poll_wait, Duration::from_secs(30));
        assert_eq!(cfg.probe.interval, Duration::from_secs(2));
        assert_eq!(cfg.probe.failure_threshold, 2);
        assert_eq!(cfg.labels["region"], "us");
        assert_eq!(cfg.labels["disk"], "ssd");
        assert_eq!(cfg.config_file.as_deref(), Some(file.as_path()));
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "servr = \"https://x:1\"\n").unwrap();
        let mut args = enrolling(dir.path());
        args.config = Some(file);
        let err = load_with(&args, &env(dir.path())).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 1, column 1"), "{text}");
        assert!(text.contains("servr"), "{text}");
    }

    #[test]
    fn join_token_sources() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "ccj_from_file\n").unwrap();
        let mut args = enrolling(dir.path());
        args.join_token = None;
        args.join_token_file = Some(token_file.clone());
        let cfg = load_with(&args, &env(dir.path())).unwrap();
        assert_eq!(cfg.join_token.unwrap().expose(), "ccj_from_file");

        args.join_token = Some("ccj_flag".into());
        let err = load_with(&args, &env(dir.path())).unwrap_err();
        assert!(
            err.to_string().contains("give the join token once"),
            "{err}"
        );

        args.join_token = None;
        std::fs::write(&token_file, "  \n").unwrap();
        let err = load_with(&args, &env(dir.path())).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
    }

    #[test]
    fn an_enrolled_host_needs_no_token_or_server() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let files = IdentityFiles::in_dir(&data);
        for p in [&files.key, &files.cert, &files.ca, &files.host] {
            std::fs::write(p, "x").unwrap();
        }
        let args = AgentArgs {
            data_dir: Some(data),
            ..AgentArgs::default()
        };
        let cfg = load_with(&args, &env(dir.path())).unwrap();
        assert_eq!(cfg.server, None);
        assert_eq!(cfg.join_token, None);
    }

    #[test]
    fn label_rules() {
        assert!(check_label_key("region").is_ok());
        assert!(check_label_key("topology.example.com/zone").is_ok());
        assert!(check_label_key("Example.com/zone").is_err());
        assert!(check_label_key("").is_err());
        assert!(check_label_key(&"a".repeat(64)).is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("eu-west_1.a").is_ok());
        assert!(check_label_value("eu/west").is_err());
    }

    #[test]
    fn several_servers_from_flags_the_environment_or_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = enrolling(dir.path());
        args.server = vec![
            "https://a.example:7443".into(),
            "https://b.example:7443, https://a.example:7443".into(),
        ];
        let cfg = load_with(&args, &env(dir.path())).unwrap();
        assert_eq!(
            cfg.servers,
            ["https://a.example:7443", "https://b.example:7443"]
        );
        assert_eq!(cfg.server.as_deref(), Some("https://a.example:7443"));

        args.server = Vec::new();
        let vars = with_vars(
            dir.path(),
            &[(
                "CLUSTERCLAW_AGENT_SERVER",
                "https://c.example:7443,https://d.example:7443",
            )],
        );
        let cfg = load_with(&args, &vars).unwrap();
        assert_eq!(
            cfg.servers,
            ["https://c.example:7443", "https://d.example:7443"]
        );

        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "server = [\"https://e.example:7443\", \"https://f.example:7443\"]\n",
        )
        .unwrap();
        args.config = Some(file);
        let cfg = load_with(&args, &env(dir.path())).unwrap();
        assert_eq!(
            cfg.servers,
            ["https://e.example:7443", "https://f.example:7443"]
        );

        args.config = None;
        args.server = vec!["https://a.example:7443,http://b.example:7443".into()];
        let err = load_with(&args, &env(dir.path())).unwrap_err();
        assert!(
            err.to_string().contains("--server")
                && err.to_string().contains("http://b.example:7443"),
            "{err}"
        );
        args.server = vec![" , ".into()];
        let err = load_with(&args, &env(dir.path())).unwrap_err();
        assert!(err.to_string().contains("names no server"), "{err}");
    }

    #[test]
    fn server_urls() {
        assert_eq!(
            check_server_url("https://cp.example.com:7443/").unwrap(),
            "https://cp.example.com:7443"
        );
        assert!(check_server_url("https://[::1]:7443").is_ok());
        assert!(check_server_url("cp:7443").is_err());
        assert!(check_server_url("https://cp:7443/api").is_err());
        assert!(check_server_url("https://").is_err());
    }

    fn with_vars(home: &Path, vars: &[(&str, &str)]) -> Environment {
        Environment {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..env(home)
        }
    }

    #[test]
    fn parallel_operations_and_snapshots_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "parallel_operations = 4\nsnapshots_keep = 5\n").unwrap();
        let mut args = enrolling(dir.path());
        let cfg = load_with(&args, &env(dir.path())).unwrap();
        assert_eq!(cfg.parallel_operations, 16);
        assert_eq!(cfg.snapshots_keep, 3);
        args.config = Some(file);
        let cfg = load_with(&args, &env(dir.path())).unwrap();
        assert_eq!((cfg.parallel_operations, cfg.snapshots_keep), (4, 5));
        let vars = with_vars(
            dir.path(),
            &[
                ("CLUSTERCLAW_AGENT_PARALLEL_OPERATIONS", "12"),
                ("CLUSTERCLAW_AGENT_SNAPSHOTS_KEEP", "1"),
            ],
        );
        let cfg = load_with(&args, &vars).unwrap();
        assert_eq!((cfg.parallel_operations, cfg.snapshots_keep), (12, 1));
        args.parallel_operations = Some(2);
        let cfg = load_with(&args, &vars).unwrap();
        assert_eq!(cfg.parallel_operations, 2, "the flag wins");

        let bad = with_vars(
            dir.path(),
            &[
                ("CLUSTERCLAW_AGENT_PARALLEL_OPERATIONS", "many"),
                ("CLUSTERCLAW_AGENT_SNAPSHOTS_KEEP", "0"),
            ],
        );
        args.parallel_operations = None;
        let err = load_with(&args, &bad).unwrap_err().to_string();
        assert!(
            err.contains("CLUSTERCLAW_AGENT_PARALLEL_OPERATIONS"),
            "{err}"
        );
        assert!(err.contains("not a whole number from 1 to 64"), "{err}");
        assert!(
            err.contains("0 is out of range; allowed is 1 to 100"),
            "{err}"
        );
    }

    fn enrolled_data_dir(dir: &Path) -> PathBuf {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let files = IdentityFiles::in_dir(&data);
        for p in [&files.key, &files.cert, &files.ca, &files.host] {
            std::fs::write(p, "x").unwrap();
        }
        data
    }

    #[test]
    fn precedence_is_file_then_environment_then_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "server = \"https://file.example:7443\"\nreport_interval = \"3s\"\npoll_wait = \"1m\"\nname = \"from-file\"\n[labels]\nregion = \"eu\"\ndisk = \"ssd\"\n[probe]\nfailure_threshold = 4\ninterval = \"20s\"\n",
        )
        .unwrap();
        let mut args = enrolling(dir.path());
        args.server = Vec::new();
        args.config = Some(file);
        let cfg = load_with(&args, &env(dir.path())).unwrap();
        assert_eq!(cfg.server.as_deref(), Some("https://file.example:7443"));
        assert_eq!(cfg.name.as_deref(), Some("from-file"));

        let vars = with_vars(
            dir.path(),
            &[
                ("CLUSTERCLAW_AGENT_SERVER", "https://env.example:7443"),
                ("CLUSTERCLAW_AGENT_REPORT_INTERVAL", "4s"),
                ("CLUSTERCLAW_AGENT_LABELS", "region=us, zone=a"),
                ("CLUSTERCLAW_AGENT_PROBE_FAILURE_THRESHOLD", "7"),
                ("CLUSTERCLAW_AGENT_PROBE_TIMEOUT", "15s"),
                ("CLUSTERCLAW_AGENT_RUNTIME", "podman"),
            ],
        );
        let cfg = load_with(&args, &vars).unwrap();
        assert_eq!(cfg.server.as_deref(), Some("https://env.example:7443"));
        assert_eq!(cfg.report_interval, Duration::from_secs(4));
        assert_eq!(cfg.poll_wait, Duration::from_secs(60), "from the file");
        assert_eq!(cfg.probe.failure_threshold, 7);
        assert_eq!(cfg.probe.timeout, Duration::from_secs(15));
        assert_eq!(cfg.runtime, RuntimeKind::Podman);
        assert_eq!(cfg.labels["region"], "us");
        assert_eq!(cfg.labels["zone"], "a");
        assert_eq!(cfg.labels["disk"], "ssd");

        args.server = vec!["https://flag.example:7443".into()];
        args.report_interval = Some("5s".into());
        args.labels = vec!["zone=b".into()];
        args.probe_failure_threshold = Some(2);
        args.runtime = Some("docker".into());
        let cfg = load_with(&args, &vars).unwrap();
        assert_eq!(cfg.server.as_deref(), Some("https://flag.example:7443"));
        assert_eq!(cfg.report_interval, Duration::from_secs(5));
        assert_eq!(cfg.probe.failure_threshold, 2);
        assert_eq!(cfg.runtime, RuntimeKind::Docker);
        assert_eq!(cfg.labels["region"], "us", "from the environment");
        assert_eq!(cfg.labels["zone"], "b");
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let vars = with_vars(
            dir.path(),
            &[
                ("CLUSTERCLAW_AGENT_POLL_WAIT", "forever"),
                ("CLUSTERCLAW_AGENT_PROBE_FAILURE_THRESHOLD", "many"),
                ("CLUSTERCLAW_AGENT_LABELS", "region=eu,nolabel"),
                ("CLUSTERCLAW_AGENT_SERVR", "https://x:1"),
            ],
        );
        let err = load_with(&enrolling(dir.path()), &vars).unwrap_err();
        let text = err.to_string();
        for needle in [
            "CLUSTERCLAW_AGENT_POLL_WAIT (environment): \"forever\" is not a duration",
            "CLUSTERCLAW_AGENT_PROBE_FAILURE_THRESHOLD (environment): \"many\" is not a whole number",
            "CLUSTERCLAW_AGENT_LABELS (environment): nolabel: expected KEY=VALUE",
            "CLUSTERCLAW_AGENT_SERVR (environment): is not a setting of clusterclaw-agent; the variables are CLUSTERCLAW_AGENT_CONFIG,",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(err.problems.len(), 4, "{text}");
    }

    #[test]
    fn unattended_enrollment_from_a_token_file_named_in_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, CA).unwrap();
        let token = dir.path().join("join-token");
        std::fs::write(&token, "ccj_provisioned\n").unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "ca_cert = \"ca.crt\"\njoin_token_file = \"join-token\"\ndata_dir = \"data\"\n",
        )
        .unwrap();
        let vars = with_vars(
            dir.path(),
            &[("CLUSTERCLAW_AGENT_SERVER", "https://cp.example:7443")],
        );
        let args = AgentArgs {
            config: Some(file.clone()),
            ..AgentArgs::default()
        };
        let cfg = load_with(&args, &vars).unwrap();
        assert_eq!(cfg.join_token.unwrap().expose(), "ccj_provisioned");
        assert_eq!(cfg.join_token_file.as_deref(), Some(token.as_path()));
        assert_eq!(cfg.data_dir, dir.path().join("data"));

        // A token given directly beats the file's token file.
        let direct = AgentArgs {
            config: Some(file.clone()),
            join_token: Some("ccj_direct".into()),
            ..AgentArgs::default()
        };
        let cfg = load_with(&direct, &vars).unwrap();
        assert_eq!(cfg.join_token.unwrap().expose(), "ccj_direct");
        assert_eq!(cfg.join_token_file, None, "not deleted: it was not used");

        // Not enrolled and the token file is missing: the problem names the file and the key.
        std::fs::remove_file(&token).unwrap();
        let err = load_with(&args, &vars).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(
            err.problems[0]
                .location
                .ends_with("agent.toml, line 2, column 19 (join_token_file)"),
            "{err}"
        );
        assert!(
            err.problems[0]
                .problem
                .contains("cannot read the join token file"),
            "{err}"
        );

        // Once enrolled, the deleted token file and a missing CA file are fine.
        enrolled_data_dir(dir.path());
        std::fs::remove_file(&ca).unwrap();
        let cfg = load_with(&args, &vars).unwrap();
        assert_eq!(cfg.join_token, None);
        assert_eq!(cfg.join_token_file, None);
        assert_eq!(cfg.ca_pem, None);
    }

    #[test]
    fn the_config_file_can_come_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "poll_wait = \"2m\"\n").unwrap();
        let vars = with_vars(
            dir.path(),
            &[("CLUSTERCLAW_AGENT_CONFIG", file.to_str().unwrap())],
        );
        let cfg = load_with(&enrolling(dir.path()), &vars).unwrap();
        assert_eq!(cfg.poll_wait, Duration::from_secs(120));
        assert_eq!(cfg.config_file.as_deref(), Some(file.as_path()));
    }

    #[test]
    fn every_flag_has_an_environment_variable_named_in_its_help() {
        use clap::{Args, Command};
        let cmd = AgentArgs::augment_args(Command::new("clusterclaw-agent"));
        let mut flags = 0;
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let flag = format!("--{long}");
            let var = env_var(&flag);
            assert!(!var.is_empty(), "{flag} has no environment variable");
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let clap_env = arg.get_env().and_then(|e| e.to_str());
            assert!(
                help.contains(&format!("[env: {var}")) || clap_env == Some(var),
                "the help of {flag} does not name {var}: {help}"
            );
            flags += 1;
        }
        assert_eq!(flags, ENV_VARS.len(), "a variable without its flag");
    }
}
