//! Configuration of `clusterclaw server`: flags over environment variables over a TOML file over
//! defaults, validated whole before anything binds.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::telemetry::LogFormat;

/// Exit code for a bad command line or configuration (sysexits `EX_USAGE`).
pub const EX_USAGE: u8 = 64;
pub const DEFAULT_API_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7080);
pub const DEFAULT_AGENT_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 7443);
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// How long a host may go without a status report before it is NotReady.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
/// Data directory of a server running as root.
pub const SYSTEM_DATA_DIR: &str = "/var/lib/clusterclaw";
/// Every environment variable of `clusterclaw server` starts with this.
pub const ENV_PREFIX: &str = "CLUSTERCLAW_SERVER_";

/// Each flag of `clusterclaw server` and the environment variable that gives the same setting
/// (used when the flag is absent; the flag wins). `CLUSTERCLAW_SERVER_NAMES` takes a
/// comma-separated list.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("--config", "CLUSTERCLAW_SERVER_CONFIG"),
    ("--data-dir", "CLUSTERCLAW_SERVER_DATA_DIR"),
    ("--store", "CLUSTERCLAW_SERVER_STORE"),
    (
        "--store-password-file",
        "CLUSTERCLAW_SERVER_STORE_PASSWORD_FILE",
    ),
    ("--store-ca-file", "CLUSTERCLAW_SERVER_STORE_CA_FILE"),
    ("--api-listen", "CLUSTERCLAW_SERVER_API_LISTEN"),
    ("--agent-listen", "CLUSTERCLAW_SERVER_AGENT_LISTEN"),
    ("--log-format", "CLUSTERCLAW_SERVER_LOG_FORMAT"),
    ("--api-tls-cert", "CLUSTERCLAW_SERVER_API_TLS_CERT"),
    ("--api-tls-key", "CLUSTERCLAW_SERVER_API_TLS_KEY"),
    ("--server-name", "CLUSTERCLAW_SERVER_NAMES"),
    ("--pki-dir", "CLUSTERCLAW_SERVER_PKI_DIR"),
    ("--openclaw-schema", "CLUSTERCLAW_SERVER_OPENCLAW_SCHEMA"),
    ("--resync-interval", "CLUSTERCLAW_SERVER_RESYNC_INTERVAL"),
    ("--fleet-waves", "CLUSTERCLAW_SERVER_FLEET_WAVES"),
    ("--fleet-bake-time", "CLUSTERCLAW_SERVER_FLEET_BAKE_TIME"),
    (
        "--heartbeat-timeout",
        "CLUSTERCLAW_SERVER_HEARTBEAT_TIMEOUT",
    ),
    ("--events-ttl", "CLUSTERCLAW_SERVER_EVENTS_TTL"),
    ("--orphan-retention", "CLUSTERCLAW_SERVER_ORPHAN_RETENTION"),
    ("--lease-duration", "CLUSTERCLAW_SERVER_LEASE_DURATION"),
    (
        "--events-max-per-tenant",
        "CLUSTERCLAW_SERVER_EVENTS_MAX_PER_TENANT",
    ),
];

/// The environment variable of a flag in [`ENV_VARS`].
fn env_var(flag: &str) -> &'static str {
    ENV_VARS
        .iter()
        .find(|(f, _)| *f == flag)
        .map_or("", |(_, v)| v)
}

/// Flags of `clusterclaw server`. Each one overrides its environment variable, which overrides
/// the same setting of the config file.
#[derive(clap::Args, Clone, Debug, Default)]
#[command(
    after_help = "Precedence: a flag beats its environment variable, which beats the config file, which beats the default. An empty variable counts as unset."
)]
pub struct ServerArgs {
    /// TOML configuration file; flags and environment variables override its settings
    /// [env: CLUSTERCLAW_SERVER_CONFIG].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of the database, the admin token and the PKI [default: /var/lib/clusterclaw
    /// as root, else $XDG_DATA_HOME/clusterclaw or ~/.local/share/clusterclaw]
    /// [env: CLUSTERCLAW_SERVER_DATA_DIR].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where objects, tokens and the audit log are kept: `sqlite` (clusterclaw.db in the data
    /// directory) or a PostgreSQL database, postgres://USER@HOST[:PORT]/DATABASE, with
    /// `?sslmode=require` for TLS [default: sqlite] [env: CLUSTERCLAW_SERVER_STORE].
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// File whose first line is the PostgreSQL password (instead of one in the URL)
    /// [env: CLUSTERCLAW_SERVER_STORE_PASSWORD_FILE].
    #[arg(long, value_name = "FILE")]
    pub store_password_file: Option<PathBuf>,
    /// PEM CA certificate(s) that signed the PostgreSQL server's certificate, for
    /// `sslmode=require` [default: the system's trusted CAs]
    /// [env: CLUSTERCLAW_SERVER_STORE_CA_FILE].
    #[arg(long, value_name = "FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// Address of the REST API, IP:PORT [default: 127.0.0.1:7080]
    /// [env: CLUSTERCLAW_SERVER_API_LISTEN].
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<String>,
    /// Address of the agent port (gRPC over mutual TLS), IP:PORT [default: 0.0.0.0:7443]
    /// [env: CLUSTERCLAW_SERVER_AGENT_LISTEN].
    #[arg(long, value_name = "ADDR")]
    pub agent_listen: Option<String>,
    /// Log format: text or json [default: text]. The filter comes from RUST_LOG (default info)
    /// [env: CLUSTERCLAW_SERVER_LOG_FORMAT].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// PEM certificate chain for HTTPS on the API port (needs --api-tls-key)
    /// [env: CLUSTERCLAW_SERVER_API_TLS_CERT].
    #[arg(long, value_name = "FILE")]
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS on the API port (needs --api-tls-cert)
    /// [env: CLUSTERCLAW_SERVER_API_TLS_KEY].
    #[arg(long, value_name = "FILE")]
    pub api_tls_key: Option<PathBuf>,
    /// A DNS name or IP address agents use to reach this server, put in the agent-port server
    /// certificate (repeatable; localhost, 127.0.0.1 and the hostname are always included)
    /// [env: CLUSTERCLAW_SERVER_NAMES, comma-separated].
    #[arg(long = "server-name", value_name = "DNS")]
    pub server_names: Vec<String>,
    /// Directory of the certificate authority and the agent-port certificate [default:
    /// <data dir>/pki] [env: CLUSTERCLAW_SERVER_PKI_DIR].
    #[arg(long, value_name = "DIR")]
    pub pki_dir: Option<PathBuf>,
    /// How often the scheduler looks at every instance when nothing else wakes it, at least 1s
    /// [default: 30s] [env: CLUSTERCLAW_SERVER_RESYNC_INTERVAL].
    #[arg(long, value_name = "DURATION")]
    pub resync_interval: Option<String>,
    /// How long a host may go without a status report before it turns NotReady and its
    /// replicas Unknown, from 2s to 1h [default: 30s] [env: CLUSTERCLAW_SERVER_HEARTBEAT_TIMEOUT].
    #[arg(long, value_name = "DURATION")]
    pub heartbeat_timeout: Option<String>,
    /// How long the leader lease lasts: the leader renews it every third of that, and another
    /// server takes over at most this long after the leader stopped renewing, from 1s to 5m
    /// [default: 6s] [env: CLUSTERCLAW_SERVER_LEASE_DURATION].
    #[arg(long, value_name = "DURATION")]
    pub lease_duration: Option<String>,
    /// How long events are kept after they last happened, from 1m to 30d [default: 1h] [env:
    /// CLUSTERCLAW_SERVER_EVENTS_TTL].
    #[arg(long, value_name = "DURATION")]
    pub events_ttl: Option<String>,
    /// Events kept per tenant (host and cluster-wide events count as one more tenant), the
    /// oldest go first, from 100 to 1000000 [default: 10000] [env:
    /// CLUSTERCLAW_SERVER_EVENTS_MAX_PER_TENANT].
    #[arg(long, value_name = "N")]
    pub events_max_per_tenant: Option<String>,
    /// How long a state volume no replica claims is kept before the server asks its host to
    /// remove it, from 10s to 10y, or `off` to keep orphans until `clusterclaw delete volume`
    /// [default: off] [env: CLUSTERCLAW_SERVER_ORPHAN_RETENTION].
    #[arg(long, value_name = "DURATION")]
    pub orphan_retention: Option<String>,
    /// Waves in which a change to a shared layer (a config template, a tenant's or project's
    /// config, a secret's value) moves across the instances it reaches, counts or percents
    /// [default: 1,10%,50%,100%] [env: CLUSTERCLAW_SERVER_FLEET_WAVES].
    #[arg(long, value_name = "WAVES")]
    pub fleet_waves: Option<String>,
    /// Wait between such waves once a wave's instances all succeeded, at most 24h [default:
    /// 1m] [env: CLUSTERCLAW_SERVER_FLEET_BAKE_TIME].
    #[arg(long, value_name = "DURATION")]
    pub fleet_bake_time: Option<String>,
    /// JSON Schema every effective openclaw.json is checked against before it is stored
    /// [default: the schema built in] [env: CLUSTERCLAW_SERVER_OPENCLAW_SCHEMA].
    #[arg(long, value_name = "FILE")]
    pub openclaw_schema: Option<PathBuf>,
}

/// Where the store lives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreChoice {
    /// `clusterclaw.db` in the data directory.
    #[default]
    Sqlite,
    /// A PostgreSQL database (files absolute).
    Postgres(crate::store::postgres::PgTarget),
}

/// Certificate and key of the API port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The whole, validated configuration of a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// The config file the settings came from, if any.
    pub config_file: Option<PathBuf>,
    /// Absolute.
    pub data_dir: PathBuf,
    /// `[store]`: SQLite in the data directory, or a PostgreSQL database.
    pub store: StoreChoice,
    pub log_format: LogFormat,
    pub api_listen: SocketAddr,
    /// HTTPS on the API port when set.
    pub api_tls: Option<TlsFiles>,
    pub agent_listen: SocketAddr,
    /// Directory of the CA and the agent-port certificate; `<data_dir>/pki` by default.
    pub pki_dir: PathBuf,
    /// The openclaw.json schema file; the built-in schema when `None`.
    pub openclaw_schema: Option<PathBuf>,
    /// Names for the agent-port server certificate, as configured (the defaults are added
    /// when the certificate is made).
    pub server_names: Vec<String>,
    pub resync_interval: Duration,
    /// `[hosts] heartbeat_timeout`: a host silent this long is NotReady.
    pub heartbeat_timeout: Duration,
    /// `[store] lease_duration`: the length of the leader lease.
    pub lease_duration: Duration,
    /// `[volumes] orphan_retention`: how long an orphaned state volume is kept before its
    /// removal is asked of its host; `None` (the default, `off`) keeps orphans until a person
    /// deletes them.
    pub orphan_retention: Option<Duration>,
    /// `[events] ttl, max_per_tenant`: how long and how many events are kept.
    pub events: crate::events::Retention,
    /// `[rollouts]`: the waves and bake time of changes to shared layers.
    pub fleet: crate::model::FleetDefaults,
    /// Single sign-on issuers (`[oidc]`); `None` when none are configured.
    pub oidc: Option<crate::auth::oidc::OidcSettings>,
    /// `[rate_limit]`.
    pub rate_limits: crate::ratelimit::RateLimits,
    /// `[audit]`.
    pub audit: crate::audit::AuditConfig,
}

impl ServerConfig {
    /// A configuration with every default, around `data_dir`, except that the API and agent
    /// ports are ephemeral ports of 127.0.0.1. Meant for tests and embedding.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        ServerConfig {
            config_file: None,
            pki_dir: data_dir.join("pki"),
            data_dir,
            store: StoreChoice::Sqlite,
            log_format: LogFormat::Text,
            api_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            api_tls: None,
            agent_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            server_names: Vec::new(),
            resync_interval: DEFAULT_RESYNC_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            lease_duration: crate::store::lease::DEFAULT_LEASE,
            orphan_retention: None,
            events: crate::events::Retention::default(),
            fleet: crate::model::FleetDefaults::default(),
            openclaw_schema: None,
            oidc: None,
            rate_limits: crate::ratelimit::RateLimits::default(),
            audit: crate::audit::AuditConfig::default(),
        }
    }

    /// Loads the file named by `--config` (if any), applies the environment variables, the
    /// flags and the defaults, and checks everything, reporting every problem at once.
    pub fn load(args: &ServerArgs) -> Result<ServerConfig, ConfigError> {
        load_with(args, &Environment::current())
    }
}

/// One thing wrong with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Where: `--api-listen`, or `/etc/clusterclaw/server.toml, line 3 (api.listen)`.
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
            "the server configuration has {n} problem{}:",
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
    /// The `CLUSTERCLAW_SERVER_*` variables that are set and not empty.
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

    /// `/var/lib/clusterclaw` for root, else `$XDG_DATA_HOME/clusterclaw` or
    /// `~/.local/share/clusterclaw`.
    pub fn default_data_dir(&self) -> Option<PathBuf> {
        if self.root {
            return Some(PathBuf::from(SYSTEM_DATA_DIR));
        }
        if let Some(x) = self.xdg_data_home.as_ref().filter(|x| x.is_absolute()) {
            return Some(x.join("clusterclaw"));
        }
        self.home
            .as_ref()
            .filter(|h| h.is_absolute())
            .map(|h| h.join(".local/share/clusterclaw"))
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
    data_dir: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    api: ApiSection,
    #[serde(default)]
    agent: AgentSection,
    #[serde(default)]
    pki: PkiSection,
    #[serde(default)]
    scheduler: SchedulerSection,
    #[serde(default)]
    hosts: HostsSection,
    #[serde(default)]
    rollouts: RolloutsSection,
    #[serde(default)]
    events: EventsSection,
    #[serde(default)]
    volumes: VolumesSection,
    #[serde(default)]
    oidc: crate::auth::oidc::OidcConfig,
    #[serde(default)]
    rate_limit: crate::ratelimit::RateLimitConfig,
    #[serde(default)]
    audit: crate::audit::AuditConfig,
    #[serde(default)]
    config: ConfigSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigSection {
    /// The openclaw.json schema file.
    schema: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    url: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    lease_duration: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiSection {
    listen: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentSection {
    listen: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PkiSection {
    dir: Option<Spanned<String>>,
    server_names: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutsSection {
    waves: Option<Spanned<String>>,
    bake_time: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsSection {
    ttl: Option<Spanned<String>>,
    max_per_tenant: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumesSection {
    orphan_retention: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostsSection {
    heartbeat_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchedulerSection {
    resync_interval: Option<Spanned<String>>,
}

/// The config file: its path, its text, and its parsed settings.
struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    fn location(&self, span: Range<usize>, key: &str) -> String {
        crate::util::file_location(&self.path, &self.text, Some(span.start), key)
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
fn pick<F, T>(
    given: Option<Setting<T>>,
    file: Option<&Spanned<String>>,
    key: &str,
    source: Option<&Source>,
    from_file: F,
) -> Option<Setting<T>>
where
    F: Fn(&Source, &str) -> T,
{
    if given.is_some() {
        return given;
    }
    let (file, source) = (file?, source?);
    Some(Setting {
        value: from_file(source, file.get_ref()),
        location: source.location(file.span(), key),
    })
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err(format!(
        "{s:?} is not an address; expected IP:PORT such as 127.0.0.1:7080, 0.0.0.0:7443 or [::]:7443"
    ))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// [`ServerConfig::load`] with the environment given (for tests).
pub fn load_with(args: &ServerArgs, env: &Environment) -> Result<ServerConfig, ConfigError> {
    let mut c = Collector {
        problems: Vec::new(),
    };
    for var in env.vars.keys() {
        if !ENV_VARS.iter().any(|(_, v)| v == var) {
            let known: Vec<&str> = ENV_VARS.iter().map(|(_, v)| *v).collect();
            c.push(
                format!("{var} (environment)"),
                format!(
                    "is not a setting of clusterclaw server; the variables are {}",
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
                        let key = "the file";
                        let loc = match e.span() {
                            Some(span) => src.location(span, key),
                            None => src.path.display().to_string(),
                        };
                        c.push(loc, e.message().trim().replace('`', "'"));
                    }
                }
                source = Some(src);
            }
        }
    }
    let src = source.as_ref();
    let string = |v: String| v;

    let data_dir = pick(
        given(args.data_dir.clone(), "--data-dir", env, PathBuf::from),
        file.data_dir.as_ref(),
        "data_dir",
        src,
        |s, v| s.path_value(v),
    );
    let data_dir = match data_dir {
        Some(Setting { value, location }) => {
            if value.as_os_str().is_empty() {
                c.push(
                    location,
                    "must not be empty; give the directory for the database, tokens and PKI",
                );
            } else if value.exists() && !value.is_dir() {
                c.push(
                    location,
                    format!("{} exists and is not a directory", value.display()),
                );
            }
            absolute(&value)
        }
        None => match env.default_data_dir() {
            Some(d) => d,
            None => {
                c.push("data directory", "cannot pick a default (HOME is not set); pass --data-dir or set data_dir in the config file");
                PathBuf::new()
            }
        },
    };

    let log_format = match pick(
        given(args.log_format.clone(), "--log-format", env, string),
        file.log_format.as_ref(),
        "log_format",
        src,
        |_, v| v.to_string(),
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

    let mut listen = |flag: &Option<String>,
                      flag_name: &str,
                      file: Option<&Spanned<String>>,
                      key: &str,
                      default: SocketAddr| {
        match pick(
            given(flag.clone(), flag_name, env, string),
            file,
            key,
            src,
            |_, v| v.to_string(),
        ) {
            None => default,
            Some(s) => parse_listen(&s.value).unwrap_or_else(|e| {
                c.push(s.location, e);
                default
            }),
        }
    };
    let api_listen = listen(
        &args.api_listen,
        "--api-listen",
        file.api.listen.as_ref(),
        "api.listen",
        DEFAULT_API_LISTEN,
    );
    let agent_listen = listen(
        &args.agent_listen,
        "--agent-listen",
        file.agent.listen.as_ref(),
        "agent.listen",
        DEFAULT_AGENT_LISTEN,
    );
    if api_listen.port() != 0 && api_listen == agent_listen {
        c.push(
            "--api-listen / --agent-listen",
            format!("the API and the agent port cannot both be {api_listen}"),
        );
    }

    let tls_cert = pick(
        given(
            args.api_tls_cert.clone(),
            "--api-tls-cert",
            env,
            PathBuf::from,
        ),
        file.api.tls_cert.as_ref(),
        "api.tls_cert",
        src,
        |s, v| s.path_value(v),
    );
    let tls_key = pick(
        given(
            args.api_tls_key.clone(),
            "--api-tls-key",
            env,
            PathBuf::from,
        ),
        file.api.tls_key.as_ref(),
        "api.tls_key",
        src,
        |s, v| s.path_value(v),
    );
    let api_tls = match (tls_cert, tls_key) {
        (None, None) => None,
        (Some(cert), None) => {
            c.push(
                cert.location,
                "a certificate needs its key: set --api-tls-key (or api.tls_key) too",
            );
            None
        }
        (None, Some(key)) => {
            c.push(
                key.location,
                "a key needs its certificate: set --api-tls-cert (or api.tls_cert) too",
            );
            None
        }
        (Some(cert), Some(key)) => match crate::api::tls_server_config(&cert.value, &key.value) {
            Ok(_) => Some(TlsFiles {
                cert: absolute(&cert.value),
                key: absolute(&key.value),
            }),
            Err(e) => {
                c.push(format!("{} / {}", cert.location, key.location), e);
                None
            }
        },
    };

    let pki_dir = match pick(
        given(args.pki_dir.clone(), "--pki-dir", env, PathBuf::from),
        file.pki.dir.as_ref(),
        "pki.dir",
        src,
        |s, v| s.path_value(v),
    ) {
        Some(Setting { value, location }) => {
            if value.as_os_str().is_empty() {
                c.push(
                    location,
                    "must not be empty; give the directory of the CA, or leave it out for <data dir>/pki",
                );
            } else if value.exists() && !value.is_dir() {
                c.push(
                    location,
                    format!("{} exists and is not a directory", value.display()),
                );
            }
            absolute(&value)
        }
        None => data_dir.join("pki"),
    };

    let mut server_names = Vec::new();
    let mut check_name = |n: &str, location: String, names: &mut Vec<String>| {
        if let Err(e) = crate::pki::check_server_name(n) {
            c.push(location, e.to_string());
        }
        names.push(n.to_string());
    };
    if !args.server_names.is_empty() {
        for n in &args.server_names {
            check_name(n, "--server-name".into(), &mut server_names);
        }
    } else if let Some(s) = env.setting("--server-name") {
        for n in s.value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            check_name(n, s.location.clone(), &mut server_names);
        }
    } else if let (Some(names), Some(s)) = (&file.pki.server_names, src) {
        for n in names {
            check_name(
                n.get_ref(),
                s.location(n.span(), "pki.server_names"),
                &mut server_names,
            );
        }
    }

    let openclaw_schema = match pick(
        given(
            args.openclaw_schema.clone(),
            "--openclaw-schema",
            env,
            PathBuf::from,
        ),
        file.config.schema.as_ref(),
        "config.schema",
        src,
        |s, v| s.path_value(v),
    ) {
        Some(Setting { value, location }) => match crate::openclaw::schema::Schema::load(&value) {
            Ok(_) => Some(absolute(&value)),
            Err(e) => {
                c.push(location, e.to_string());
                None
            }
        },
        None => None,
    };

    let resync_interval = match pick(
        given(
            args.resync_interval.clone(),
            "--resync-interval",
            env,
            string,
        ),
        file.scheduler.resync_interval.as_ref(),
        "scheduler.resync_interval",
        src,
        |_, v| v.to_string(),
    ) {
        None => DEFAULT_RESYNC_INTERVAL,
        Some(s) => match humantime::parse_duration(s.value.trim()) {
            Ok(d) if d >= Duration::from_secs(1) => d,
            Ok(_) => {
                c.push(
                    s.location,
                    format!(
                        "{:?} is too short; the resync interval is at least 1s",
                        s.value
                    ),
                );
                DEFAULT_RESYNC_INTERVAL
            }
            Err(e) => {
                c.push(
                    s.location,
                    format!("{:?} is not a duration ({e}); use e.g. 30s, 5m", s.value),
                );
                DEFAULT_RESYNC_INTERVAL
            }
        },
    };

    let base_dir = src
        .and_then(|s| s.path.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/"));
    let oidc = match file.oidc.validate(&base_dir) {
        Ok(settings) if settings.issuers.is_empty() => None,
        Ok(settings) => Some(settings),
        Err(problems) => {
            for p in problems {
                let loc = match src {
                    Some(s) => p.location(&s.path, &s.text),
                    None => p.key.clone(),
                };
                c.push(loc, p.problem);
            }
            None
        }
    };
    let heartbeat_timeout = match pick(
        given(
            args.heartbeat_timeout.clone(),
            "--heartbeat-timeout",
            env,
            string,
        ),
        file.hosts.heartbeat_timeout.as_ref(),
        "hosts.heartbeat_timeout",
        src,
        |_, v| v.to_string(),
    ) {
        None => DEFAULT_HEARTBEAT_TIMEOUT,
        Some(s) => match humantime::parse_duration(s.value.trim()) {
            Ok(d) if (Duration::from_secs(2)..=Duration::from_secs(3600)).contains(&d) => d,
            Ok(_) => {
                c.push(
                    s.location,
                    format!(
                        "{:?} is out of range; the heartbeat timeout is from 2s to 1h",
                        s.value
                    ),
                );
                DEFAULT_HEARTBEAT_TIMEOUT
            }
            Err(e) => {
                c.push(s.location, format!("{:?} is not a duration: {e}", s.value));
                DEFAULT_HEARTBEAT_TIMEOUT
            }
        },
    };
    let lease_duration = {
        use crate::store::lease::{DEFAULT_LEASE, MAX_LEASE, MIN_LEASE};
        match pick(
            given(args.lease_duration.clone(), "--lease-duration", env, string),
            file.store.lease_duration.as_ref(),
            "store.lease_duration",
            src,
            |_, v| v.to_string(),
        ) {
            None => DEFAULT_LEASE,
            Some(s) => match humantime::parse_duration(s.value.trim()) {
                Ok(d) if (MIN_LEASE..=MAX_LEASE).contains(&d) => d,
                Ok(_) => {
                    c.push(
                        s.location,
                        format!(
                            "{:?} is out of range; the lease duration is from 1s to 5m",
                            s.value
                        ),
                    );
                    DEFAULT_LEASE
                }
                Err(e) => {
                    c.push(
                        s.location,
                        format!("{:?} is not a duration such as 8s: {e}", s.value),
                    );
                    DEFAULT_LEASE
                }
            },
        }
    };
    let orphan_retention = match pick(
        given(
            args.orphan_retention.clone(),
            "--orphan-retention",
            env,
            string,
        ),
        file.volumes.orphan_retention.as_ref(),
        "volumes.orphan_retention",
        src,
        |_, v| v.to_string(),
    ) {
        None => None,
        Some(s) if s.value.trim().eq_ignore_ascii_case("off") => None,
        Some(s) => match humantime::parse_duration(s.value.trim()) {
            Ok(d)
                if (Duration::from_secs(10)..=Duration::from_secs(10 * 365 * 86_400))
                    .contains(&d) =>
            {
                Some(d)
            }
            Ok(_) => {
                c.push(
                    s.location,
                    format!(
                        "{:?} is out of range; the orphan retention is from 10s to 10y, or off",
                        s.value
                    ),
                );
                None
            }
            Err(e) => {
                c.push(
                    s.location,
                    format!("{:?} is neither a duration nor off: {e}", s.value),
                );
                None
            }
        },
    };
    let store = store_choice(args, env, &file, src, &mut c);
    let mut events = crate::events::Retention::default();
    if let Some(t) = pick(
        given(args.events_ttl.clone(), "--events-ttl", env, string),
        file.events.ttl.as_ref(),
        "events.ttl",
        src,
        |_, v| v.to_string(),
    ) {
        match humantime::parse_duration(t.value.trim()) {
            Ok(d) if (Duration::from_secs(60)..=Duration::from_secs(30 * 86_400)).contains(&d) => {
                events.ttl = d
            }
            Ok(_) => c.push(
                t.location,
                format!(
                    "{:?} is out of range; events are kept from 1m to 30d",
                    t.value
                ),
            ),
            Err(e) => c.push(t.location, format!("{:?} is not a duration: {e}", t.value)),
        }
    }
    let max_events = match given(
        args.events_max_per_tenant.clone(),
        "--events-max-per-tenant",
        env,
        string,
    ) {
        Some(s) => Some((s.value.trim().parse::<i64>().ok(), s.value, s.location)),
        None => match (&file.events.max_per_tenant, src) {
            (Some(v), Some(source)) => Some((
                Some(*v.get_ref()),
                v.get_ref().to_string(),
                source.location(v.span(), "events.max_per_tenant"),
            )),
            _ => None,
        },
    };
    if let Some((n, text, location)) = max_events {
        match n {
            Some(n) if (100..=1_000_000).contains(&n) => events.max_per_tenant = n as usize,
            _ => c.push(
                location,
                format!("{text:?}: events kept per tenant is a number from 100 to 1000000"),
            ),
        }
    }
    let mut fleet = crate::model::FleetDefaults::default();
    if let Some(w) = pick(
        given(args.fleet_waves.clone(), "--fleet-waves", env, string),
        file.rollouts.waves.as_ref(),
        "rollouts.waves",
        src,
        |_, v| v.to_string(),
    ) {
        match crate::model::parse_waves(&w.value) {
            Ok(waves) => fleet.waves = waves,
            Err(e) => c.push(w.location, e),
        }
    }
    if let Some(b) = pick(
        given(
            args.fleet_bake_time.clone(),
            "--fleet-bake-time",
            env,
            string,
        ),
        file.rollouts.bake_time.as_ref(),
        "rollouts.bake_time",
        src,
        |_, v| v.to_string(),
    ) {
        match crate::model::parse_bake_time(&b.value) {
            Ok(_) => fleet.bake_time = b.value.trim().to_string(),
            Err(e) => c.push(b.location, e),
        }
    }
    let rate_limits = match file.rate_limit.validate() {
        Ok(l) => l,
        Err(problems) => {
            for p in problems {
                let loc = match (src, &p.span) {
                    (Some(s), Some(span)) => s.location(span.clone(), &p.key),
                    _ => p.key.clone(),
                };
                c.push(loc, p.problem);
            }
            crate::ratelimit::RateLimits::default()
        }
    };
    if !c.problems.is_empty() {
        return Err(ConfigError {
            problems: c.problems,
        });
    }
    Ok(ServerConfig {
        oidc,
        rate_limits,
        audit: file.audit,
        config_file: source.map(|s| s.path),
        data_dir,
        store,
        log_format,
        api_listen,
        api_tls,
        agent_listen,
        pki_dir,
        server_names,
        resync_interval,
        heartbeat_timeout,
        lease_duration,
        orphan_retention,
        events,
        fleet,
        openclaw_schema,
    })
}

/// `[store]`: `sqlite`, or a PostgreSQL URL with its optional password and CA files (which
/// must be readable files).
fn store_choice(
    args: &ServerArgs,
    env: &Environment,
    file: &FileConfig,
    src: Option<&Source>,
    c: &mut Collector,
) -> StoreChoice {
    let url = pick(
        given(args.store.clone(), "--store", env, |v: String| v),
        file.store.url.as_ref(),
        "store.url",
        src,
        |_, v| v.to_string(),
    );
    let password_file = pick(
        given(
            args.store_password_file.clone(),
            "--store-password-file",
            env,
            PathBuf::from,
        ),
        file.store.password_file.as_ref(),
        "store.password_file",
        src,
        |s, v| s.path_value(v),
    );
    let ca_file = pick(
        given(
            args.store_ca_file.clone(),
            "--store-ca-file",
            env,
            PathBuf::from,
        ),
        file.store.ca_file.as_ref(),
        "store.ca_file",
        src,
        |s, v| s.path_value(v),
    );
    let mut readable = |setting: Option<Setting<PathBuf>>, what: &str| {
        let s = setting?;
        match std::fs::File::open(&s.value) {
            Ok(_) => Some(absolute(&s.value)),
            Err(e) => {
                c.push(
                    s.location,
                    format!("cannot read the {what} {}: {e}", s.value.display()),
                );
                None
            }
        }
    };
    let password_file_given = password_file.as_ref().map(|s| s.location.clone());
    let ca_file_given = ca_file.as_ref().map(|s| s.location.clone());
    let password_file = readable(password_file, "PostgreSQL password file");
    let ca_file = readable(ca_file, "PostgreSQL CA file");
    let Some(url) = url else {
        for location in [password_file_given, ca_file_given].into_iter().flatten() {
            c.push(
                location,
                "only a PostgreSQL store takes this; set the store to a postgres:// URL",
            );
        }
        return StoreChoice::Sqlite;
    };
    let value = url.value.trim();
    if value.eq_ignore_ascii_case("sqlite") {
        for location in [password_file_given, ca_file_given].into_iter().flatten() {
            c.push(
                location,
                "only a PostgreSQL store takes this; the store is sqlite",
            );
        }
        return StoreChoice::Sqlite;
    }
    let shown = crate::store::postgres::redact(value);
    if !crate::store::postgres::is_postgres_url(value) {
        c.push(
            url.location,
            format!(
                "{shown:?} is neither sqlite nor a PostgreSQL URL (postgres://USER@HOST[:PORT]/DATABASE)"
            ),
        );
        return StoreChoice::Sqlite;
    }
    match value.parse::<postgres::Config>() {
        Ok(config) if config.get_dbname().is_none() => c.push(
            url.location,
            format!("{shown:?} names no database (postgres://USER@HOST[:PORT]/DATABASE)"),
        ),
        Ok(config) if config.get_user().is_none() => c.push(
            url.location,
            format!("{shown:?} names no user (postgres://USER@HOST[:PORT]/DATABASE)"),
        ),
        Ok(_) => {}
        Err(e) => c.push(
            url.location,
            format!("{shown:?} is not a valid PostgreSQL URL: {e}"),
        ),
    }
    StoreChoice::Postgres(crate::store::postgres::PgTarget {
        url: value.to_string(),
        password_file,
        ca_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_is_sqlite_or_a_postgres_url_with_its_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load_with(&ServerArgs::default(), &env()).unwrap().store,
            StoreChoice::Sqlite
        );
        std::fs::write(dir.path().join("pw"), "secret\n").unwrap();
        let p = write(
            dir.path(),
            "[store]\nurl = \"postgres://cc@db.example.com/cc?sslmode=require\"\npassword_file = \"pw\"\n",
        );
        let c = load_with(
            &ServerArgs {
                config: Some(p.clone()),
                ..Default::default()
            },
            &env(),
        )
        .unwrap();
        let StoreChoice::Postgres(t) = c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(t.url, "postgres://cc@db.example.com/cc?sslmode=require");
        assert_eq!(t.password_file, Some(dir.path().join("pw")));
        // The flag beats the environment, which beats the file.
        let mut e = env();
        e.vars
            .insert("CLUSTERCLAW_SERVER_STORE".into(), "sqlite".into());
        let from_env = load_with(
            &ServerArgs {
                config: Some(p.clone()),
                ..Default::default()
            },
            &e,
        );
        let err = from_env.unwrap_err().to_string();
        assert!(err.contains("only a PostgreSQL store takes this"), "{err}");
        // Every problem at once, with the password hidden.
        let err = load_with(
            &ServerArgs {
                store: Some("mysql://root:hunter2@db/x".into()),
                store_ca_file: Some(dir.path().join("missing.pem")),
                ..Default::default()
            },
            &env(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 2, "{text}");
        assert!(
            text.contains("neither sqlite nor a PostgreSQL URL"),
            "{text}"
        );
        assert!(text.contains("--store-ca-file"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        let err = load_with(
            &ServerArgs {
                store: Some("postgres://db.example.com".into()),
                ..Default::default()
            },
            &env(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("names no database"), "{err}");
    }

    fn env() -> Environment {
        Environment {
            root: false,
            home: Some("/home/ada".into()),
            xdg_data_home: None,
            vars: BTreeMap::new(),
        }
    }

    #[test]
    fn the_packaged_config_loads_with_limits_on() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/server.toml");
        let args = ServerArgs {
            config: Some(path),
            ..Default::default()
        };
        let c = load_with(&args, &env()).unwrap();
        assert!(c.rate_limits.enabled);
        assert_eq!(c.oidc, None);
        assert_eq!(
            c.orphan_retention, None,
            "orphans stay unless a person deletes them"
        );
        assert_eq!(c.data_dir, Path::new("/var/lib/clusterclaw"));
    }

    #[test]
    fn bad_tenancy_sections_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "[rate_limit]\nper_token = { rate = -5 }\n\n[[oidc.issuers]]\nissuer = \"http://idp.example.com\"\naudience = \"x\"\n",
        );
        let args = ServerArgs {
            config: Some(p),
            ..Default::default()
        };
        let e = load_with(&args, &env()).unwrap_err().to_string();
        assert!(
            e.contains("line 2") && e.contains("rate_limit.per_token.rate"),
            "{e}"
        );
        assert!(e.contains("oidc.issuers[0]"), "{e}");
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("server.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults() {
        let c = load_with(&ServerArgs::default(), &env()).unwrap();
        assert_eq!(
            c.data_dir,
            PathBuf::from("/home/ada/.local/share/clusterclaw")
        );
        assert_eq!(
            c.pki_dir,
            PathBuf::from("/home/ada/.local/share/clusterclaw/pki")
        );
        assert_eq!(c.api_listen, DEFAULT_API_LISTEN);
        assert_eq!(c.agent_listen.to_string(), "0.0.0.0:7443");
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.api_tls, None);
        assert_eq!(c.resync_interval, Duration::from_secs(30));
    }

    #[test]
    fn default_data_dirs() {
        let root = Environment {
            root: true,
            ..env()
        };
        assert_eq!(
            root.default_data_dir().unwrap(),
            PathBuf::from("/var/lib/clusterclaw")
        );
        let xdg = Environment {
            xdg_data_home: Some("/xdg".into()),
            ..env()
        };
        assert_eq!(
            xdg.default_data_dir().unwrap(),
            PathBuf::from("/xdg/clusterclaw")
        );
        let relative_xdg = Environment {
            xdg_data_home: Some("rel".into()),
            ..env()
        };
        assert_eq!(
            relative_xdg.default_data_dir().unwrap(),
            PathBuf::from("/home/ada/.local/share/clusterclaw")
        );
        let nothing = Environment::default();
        let e = load_with(&ServerArgs::default(), &nothing).unwrap_err();
        assert!(e.to_string().contains("pass --data-dir"), "{e}");
    }

    #[test]
    fn file_then_flags_override() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            r#"
data_dir = "state"
log_format = "json"
[api]
listen = "127.0.0.1:9000"
[agent]
listen = "[::]:9443"
[pki]
server_names = ["cp.example.com"]
[scheduler]
resync_interval = "1m"
"#,
        );
        let args = ServerArgs {
            config: Some(p.clone()),
            ..Default::default()
        };
        let c = load_with(&args, &env()).unwrap();
        assert_eq!(c.data_dir, dir.path().join("state"), "relative to the file");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.agent_listen.to_string(), "[::]:9443");
        assert_eq!(c.server_names, ["cp.example.com"]);
        assert_eq!(c.resync_interval, Duration::from_secs(60));
        assert_eq!(c.config_file.as_deref(), Some(p.as_path()));

        let args = ServerArgs {
            config: Some(p),
            api_listen: Some("localhost:9100".into()),
            log_format: Some("text".into()),
            server_names: vec!["other.example.com".into()],
            data_dir: Some(dir.path().join("flag")),
            ..Default::default()
        };
        let c = load_with(&args, &env()).unwrap();
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:9100");
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.server_names, ["other.example.com"]);
        assert_eq!(c.data_dir, dir.path().join("flag"));
        assert_eq!(c.pki_dir, dir.path().join("flag/pki"));
    }

    #[test]
    fn orphan_retention_is_off_by_default_and_comes_from_the_file_or_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load_with(&ServerArgs::default(), &env())
                .unwrap()
                .orphan_retention,
            None
        );
        let p = write(dir.path(), "[volumes]\norphan_retention = \"7d\"\n");
        let args = ServerArgs {
            config: Some(p.clone()),
            ..Default::default()
        };
        let c = load_with(&args, &env()).unwrap();
        assert_eq!(c.orphan_retention, Some(Duration::from_secs(7 * 86_400)));
        let args = ServerArgs {
            config: Some(p.clone()),
            orphan_retention: Some("off".into()),
            ..Default::default()
        };
        assert_eq!(
            load_with(&args, &env()).unwrap().orphan_retention,
            None,
            "the flag wins"
        );
        let args = ServerArgs {
            config: Some(p),
            orphan_retention: Some("1s".into()),
            ..Default::default()
        };
        let e = load_with(&args, &env()).unwrap_err().to_string();
        assert!(e.contains("--orphan-retention"), "{e}");
        assert!(e.contains("from 10s to 10y"), "{e}");
    }

    #[test]
    fn lease_duration_comes_from_the_file_or_the_flag_within_its_range() {
        use crate::store::lease::DEFAULT_LEASE;
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "[store]\nlease_duration = \"3s\"\n");
        let args = ServerArgs {
            config: Some(p.clone()),
            ..Default::default()
        };
        assert_eq!(
            load_with(&args, &env()).unwrap().lease_duration,
            Duration::from_secs(3)
        );
        assert_eq!(
            load_with(&ServerArgs::default(), &env())
                .unwrap()
                .lease_duration,
            DEFAULT_LEASE
        );
        for (bad, why) in [("500ms", "from 1s to 5m"), ("soon", "not a duration")] {
            let args = ServerArgs {
                config: Some(p.clone()),
                lease_duration: Some(bad.into()),
                ..Default::default()
            };
            let e = load_with(&args, &env()).unwrap_err().to_string();
            assert!(e.contains("--lease-duration") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn heartbeat_timeout_comes_from_the_file_or_the_flag_within_its_range() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "[hosts]\nheartbeat_timeout = \"10s\"\n");
        let args = ServerArgs {
            config: Some(p.clone()),
            ..Default::default()
        };
        let c = load_with(&args, &env()).unwrap();
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(10));
        assert_eq!(
            load_with(&ServerArgs::default(), &env())
                .unwrap()
                .heartbeat_timeout,
            DEFAULT_HEARTBEAT_TIMEOUT
        );
        let args = ServerArgs {
            config: Some(p),
            heartbeat_timeout: Some("1s".into()),
            ..Default::default()
        };
        let e = load_with(&args, &env()).unwrap_err().to_string();
        assert!(e.contains("--heartbeat-timeout"), "{e}");
        assert!(e.contains("from 2s to 1h"), "{e}");
    }

    #[test]
    fn event_retention_is_an_hour_and_10000_per_tenant_unless_set() {
        let c = load_with(&ServerArgs::default(), &env()).unwrap();
        assert_eq!(c.events, crate::events::Retention::default());
        assert_eq!(
            (c.events.ttl, c.events.max_per_tenant),
            (Duration::from_secs(3600), 10_000)
        );
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "[events]\nttl = \"2h\"\nmax_per_tenant = 500\n");
        let args = ServerArgs {
            config: Some(p.clone()),
            ..Default::default()
        };
        let c = load_with(&args, &env()).unwrap();
        assert_eq!(
            (c.events.ttl, c.events.max_per_tenant),
            (Duration::from_secs(7200), 500)
        );
        let args = ServerArgs {
            config: Some(p),
            events_ttl: Some("10s".into()),
            events_max_per_tenant: Some("-1".into()),
            ..Default::default()
        };
        let e = load_with(&args, &env()).unwrap_err().to_string();
        assert!(
            e.contains("--events-ttl") && e.contains("from 1m to 30d"),
            "{e}"
        );
        assert!(
            e.contains("--events-max-per-tenant") && e.contains("from 100 to 1000000"),
            "{e}"
        );
    }

    #[test]
    fn fleet_waves_and_bake_time_come_from_the_file_or_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "[rollouts]\nwaves = \"2, 100%\"\nbake_time = \"30s\"\n",
        );
        let args = ServerArgs {
            config: Some(p.clone()),
            ..Default::default()
        };
        let c = load_with(&args, &env()).unwrap();
        assert_eq!(c.fleet.waves, crate::model::parse_waves("2,100%").unwrap());
        assert_eq!(c.fleet.bake_time, "30s");
        let args = ServerArgs {
            config: Some(p),
            fleet_waves: Some("100%".into()),
            fleet_bake_time: Some("2d".into()),
            ..Default::default()
        };
        let e = load_with(&args, &env()).unwrap_err().to_string();
        assert!(e.contains("--fleet-bake-time"), "{e}");
        assert!(e.contains("at most 24h"), "{e}");
        let bad = ServerArgs {
            fleet_waves: Some("0%".into()),
            ..Default::default()
        };
        let e = load_with(&bad, &env()).unwrap_err().to_string();
        assert!(e.contains("--fleet-waves"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "log_format = \"xml\"\n[api]\nlisten = \"nowhere\"\ntls_cert = \"a.crt\"\n[pki]\nserver_names = [\"ok.example\", \"bad name\"]\n[scheduler]\nresync_interval = \"soon\"\n",
        );
        let args = ServerArgs {
            config: Some(p.clone()),
            agent_listen: Some("7443".into()),
            ..Default::default()
        };
        let e = load_with(&args, &env()).unwrap_err();
        let text = e.to_string();
        assert_eq!(e.problems.len(), 6, "{text}");
        let file = p.display().to_string();
        assert!(text.contains(&format!("{file}, line 1, column 14 (log_format): \"xml\" is not a log format; use text or json")), "{text}");
        assert!(
            text.contains(&format!(
                "{file}, line 3, column 10 (api.listen): \"nowhere\" is not an address"
            )),
            "{text}"
        );
        assert!(
            text.contains("--agent-listen: \"7443\" is not an address"),
            "{text}"
        );
        assert!(
            text.contains("(api.tls_cert): a certificate needs its key"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "{file}, line 6, column 31 (pki.server_names): \"bad name\""
            )),
            "{text}"
        );
        assert!(
            text.contains("(scheduler.resync_interval): \"soon\" is not a duration"),
            "{text}"
        );
    }

    #[test]
    fn unknown_keys_and_syntax_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "[api]\nlisten = \"127.0.0.1:1\"\nlistne = \"x\"\n",
        );
        let e = load_with(
            &ServerArgs {
                config: Some(p),
                ..Default::default()
            },
            &env(),
        )
        .unwrap_err();
        assert_eq!(e.problems.len(), 1);
        assert!(e.problems[0].location.contains("line 3, column 1"), "{e}");
        assert!(
            e.problems[0].problem.contains("unknown field 'listne'"),
            "{e}"
        );
        assert!(e.problems[0].problem.contains("expected one of"), "{e}");

        let p = write(dir.path(), "data_dir = \n");
        let e = load_with(
            &ServerArgs {
                config: Some(p),
                ..Default::default()
            },
            &env(),
        )
        .unwrap_err();
        assert!(e.problems[0].location.contains("line 1"), "{e}");

        let e = load_with(
            &ServerArgs {
                config: Some(dir.path().join("missing.toml")),
                ..Default::default()
            },
            &env(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cannot read the file"), "{e}");
    }

    #[test]
    fn tls_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let args = ServerArgs {
            api_tls_cert: Some(dir.path().join("missing.crt")),
            api_tls_key: Some(dir.path().join("missing.key")),
            ..Default::default()
        };
        let e = load_with(&args, &env()).unwrap_err();
        assert!(e.to_string().contains("missing.crt"), "{e}");

        let files = crate::pki::init_dir(&dir.path().join("pki"), &["localhost".into()]).unwrap();
        let args = ServerArgs {
            api_tls_cert: Some(files.server_cert.clone()),
            api_tls_key: Some(files.server_key.clone()),
            ..Default::default()
        };
        let c = load_with(&args, &env()).unwrap();
        assert_eq!(
            c.api_tls,
            Some(TlsFiles {
                cert: files.server_cert,
                key: files.server_key
            })
        );
    }

    #[test]
    fn same_port_twice_is_refused() {
        let args = ServerArgs {
            api_listen: Some("0.0.0.0:7443".into()),
            data_dir: Some("/tmp/x".into()),
            ..Default::default()
        };
        let e = load_with(&args, &env()).unwrap_err();
        assert!(e.to_string().contains("cannot both be 0.0.0.0:7443"), "{e}");
    }

    fn with_vars(vars: &[(&str, &str)]) -> Environment {
        Environment {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..env()
        }
    }

    #[test]
    fn precedence_is_file_then_environment_then_flag() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "data_dir = \"from-file\"\nlog_format = \"json\"\n[api]\nlisten = \"127.0.0.1:9001\"\n[agent]\nlisten = \"127.0.0.1:9002\"\n[pki]\ndir = \"pki-file\"\nserver_names = [\"file.example\"]\n[scheduler]\nresync_interval = \"10s\"\n",
        );
        let file_only = ServerArgs {
            config: Some(p.clone()),
            ..Default::default()
        };
        // The file alone.
        let c = load_with(&file_only, &env()).unwrap();
        assert_eq!(c.data_dir, dir.path().join("from-file"));
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:9001");
        assert_eq!(c.pki_dir, dir.path().join("pki-file"));
        assert_eq!(c.resync_interval, Duration::from_secs(10));

        // The environment beats the file, setting by setting; the file keeps the rest.
        let vars = with_vars(&[
            ("CLUSTERCLAW_SERVER_API_LISTEN", "127.0.0.1:9101"),
            ("CLUSTERCLAW_SERVER_LOG_FORMAT", "text"),
            ("CLUSTERCLAW_SERVER_NAMES", "env-a.example, env-b.example"),
            ("CLUSTERCLAW_SERVER_PKI_DIR", "/srv/pki"),
            ("CLUSTERCLAW_SERVER_RESYNC_INTERVAL", "2m"),
            ("CLUSTERCLAW_SERVER_DATA_DIR", "/srv/clusterclaw"),
        ]);
        let c = load_with(&file_only, &vars).unwrap();
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:9101");
        assert_eq!(
            c.agent_listen.to_string(),
            "127.0.0.1:9002",
            "from the file"
        );
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.server_names, ["env-a.example", "env-b.example"]);
        assert_eq!(c.pki_dir, PathBuf::from("/srv/pki"));
        assert_eq!(c.resync_interval, Duration::from_secs(120));
        assert_eq!(c.data_dir, PathBuf::from("/srv/clusterclaw"));

        // A flag beats both.
        let flags = ServerArgs {
            config: Some(p),
            api_listen: Some("127.0.0.1:9201".into()),
            server_names: vec!["flag.example".into()],
            pki_dir: Some("/opt/pki".into()),
            resync_interval: Some("5s".into()),
            ..Default::default()
        };
        let c = load_with(&flags, &vars).unwrap();
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:9201");
        assert_eq!(c.server_names, ["flag.example"]);
        assert_eq!(c.pki_dir, PathBuf::from("/opt/pki"));
        assert_eq!(c.resync_interval, Duration::from_secs(5));
        assert_eq!(c.log_format, LogFormat::Text, "still from the environment");
    }

    #[test]
    fn the_config_file_can_come_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "[api]\nlisten = \"127.0.0.1:9301\"\n");
        let vars = with_vars(&[("CLUSTERCLAW_SERVER_CONFIG", p.to_str().unwrap())]);
        let c = load_with(&ServerArgs::default(), &vars).unwrap();
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:9301");
        assert_eq!(c.config_file.as_deref(), Some(p.as_path()));

        let vars = with_vars(&[("CLUSTERCLAW_SERVER_CONFIG", "/nonexistent/server.toml")]);
        let e = load_with(&ServerArgs::default(), &vars).unwrap_err();
        assert!(
            e.to_string().contains(
                "CLUSTERCLAW_SERVER_CONFIG (environment) /nonexistent/server.toml: cannot read the file"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        let vars = with_vars(&[
            ("CLUSTERCLAW_SERVER_API_LISTEN", "nowhere"),
            ("CLUSTERCLAW_SERVER_RESYNC_INTERVAL", "100ms"),
            ("CLUSTERCLAW_SERVER_NAMES", "ok.example,bad name"),
            ("CLUSTERCLAW_SERVER_APILISTEN", "127.0.0.1:1"),
        ]);
        let e = load_with(&ServerArgs::default(), &vars).unwrap_err();
        let text = e.to_string();
        assert_eq!(e.problems.len(), 4, "{text}");
        for needle in [
            "CLUSTERCLAW_SERVER_API_LISTEN (environment): \"nowhere\" is not an address",
            "CLUSTERCLAW_SERVER_RESYNC_INTERVAL (environment): \"100ms\" is too short",
            "CLUSTERCLAW_SERVER_NAMES (environment): \"bad name\"",
            "CLUSTERCLAW_SERVER_APILISTEN (environment): is not a setting of clusterclaw server; the variables are CLUSTERCLAW_SERVER_CONFIG,",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        // A flag given on the command line hides a bad variable of the same setting.
        let args = ServerArgs {
            api_listen: Some("127.0.0.1:9401".into()),
            resync_interval: Some("1s".into()),
            server_names: vec!["ok.example".into()],
            ..Default::default()
        };
        let e = load_with(&args, &vars).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
    }

    #[test]
    fn every_flag_has_an_environment_variable_named_in_its_help() {
        use clap::{Args, Command};
        let cmd = ServerArgs::augment_args(Command::new("server"));
        let mut flags = 0;
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let flag = format!("--{long}");
            let var = env_var(&flag);
            assert!(!var.is_empty(), "{flag} has no environment variable");
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(help.contains(&format!("[env: {var}")), "{flag}: {help}");
            flags += 1;
        }
        assert_eq!(flags, ENV_VARS.len(), "a variable without its flag");
    }
}
