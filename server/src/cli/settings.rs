//! Connection settings of the CLI: flags, environment, the CLI config file, and their precedence.

use std::fmt;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use super::CliError;
use crate::auth::write_private_file;

/// Server used when neither a flag, the environment nor the config file names one.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7080";

/// A credential: its `Debug` and `Display` never show the value.
pub use crate::auth::Secret;

/// Options shared by every command that talks to a server. They may be given after any
/// subcommand.
#[derive(Args, Clone, Debug, Default)]
pub struct ClientOpts {
    /// URL of the clusterclaw server's REST API [default: http://127.0.0.1:7080]
    #[arg(long, env = "CLUSTERCLAW_SERVER", global = true, value_name = "URL")]
    pub server: Option<String>,
    /// API token (cca_...); see `clusterclaw login`
    #[arg(
        long,
        env = "CLUSTERCLAW_TOKEN",
        global = true,
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<Secret>,
    /// PEM file of the CA that signed the server's certificate (for https:// servers)
    #[arg(
        long = "ca-cert",
        env = "CLUSTERCLAW_CA_CERT",
        global = true,
        value_name = "FILE"
    )]
    pub ca_cert: Option<PathBuf>,
    /// Tenant for names and manifests that do not say one
    #[arg(
        short = 't',
        long,
        env = "CLUSTERCLAW_TENANT",
        global = true,
        value_name = "TENANT"
    )]
    pub tenant: Option<String>,
    /// Project for names and manifests that do not say one
    #[arg(
        short = 'p',
        long,
        env = "CLUSTERCLAW_PROJECT",
        global = true,
        value_name = "PROJECT"
    )]
    pub project: Option<String>,
    /// CLI config file [default: $XDG_CONFIG_HOME/clusterclaw/config.toml]
    #[arg(
        long = "config",
        env = "CLUSTERCLAW_CONFIG",
        global = true,
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
}

/// The CLI config file (TOML, mode 0600).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

impl ConfigFile {
    /// Reads the file; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<ConfigFile, CliError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
            Err(e) => {
                return Err(CliError::Usage(format!(
                    "cannot read the CLI config file {}: {e}",
                    path.display()
                )));
            }
        };
        let config: ConfigFile = toml::from_str(&text).map_err(|e| {
            CliError::Usage(format!(
                "the CLI config file {} is invalid: {}; the keys are server, token, ca_cert, tenant and project",
                path.display(),
                e.to_string().trim_end()
            ))
        })?;
        if config.token.is_some()
            && let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            eprintln!(
                "warning: {} holds a token and can be read by other users; run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
        Ok(config)
    }

    /// Writes the file with mode 0600 (its directory 0700), replacing it atomically.
    pub fn save(&self, path: &Path) -> Result<(), CliError> {
        let fail = |what: &str, e: std::io::Error| {
            CliError::Failed(format!("cannot {what} {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| fail("create the directory of", e))?;
        }
        let text = toml::to_string(self)
            .map_err(|e| CliError::Failed(format!("cannot encode the CLI config: {e}")))?;
        write_private_file(path, text.as_bytes()).map_err(|e| fail("write", e))
    }
}

/// Where a setting came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env(&'static str),
    File,
    Default,
    Unset,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => f.write_str("command line"),
            Source::Env(var) => write!(f, "environment ({var})"),
            Source::File => f.write_str("config file"),
            Source::Default => f.write_str("default"),
            Source::Unset => f.write_str("not set"),
        }
    }
}

/// The settings in effect after precedence: flag > environment > config file > default.
#[derive(Clone, Debug)]
pub struct Settings {
    pub server: String,
    pub server_source: Source,
    pub token: Option<Secret>,
    pub token_source: Source,
    pub ca_cert: Option<PathBuf>,
    pub ca_cert_source: Source,
    pub tenant: Option<String>,
    pub tenant_source: Source,
    pub project: Option<String>,
    pub project_source: Source,
    pub config_path: PathBuf,
    pub file: ConfigFile,
}

/// The CLI config file's path: `--config`, `CLUSTERCLAW_CONFIG`, `$XDG_CONFIG_HOME/clusterclaw/config.toml`
/// or `~/.config/clusterclaw/config.toml`.
pub fn config_path(opts: &ClientOpts) -> PathBuf {
    if let Some(p) = &opts.config {
        return p.clone();
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("clusterclaw").join("config.toml")
}

fn source_of<T: PartialEq + ?Sized>(
    flag: Option<&T>,
    env: &'static str,
    file: Option<&T>,
    env_matches: impl Fn(&str) -> bool,
) -> Source {
    match (flag, file) {
        (Some(_), _) => match std::env::var(env) {
            Ok(v) if env_matches(&v) => Source::Env(env),
            _ => Source::Flag,
        },
        (None, Some(_)) => Source::File,
        (None, None) => Source::Unset,
    }
}

/// Normalises and checks a server URL.
pub fn check_server_url(url: &str) -> Result<String, CliError> {
    let url = url.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => {
            Ok(url.to_string())
        }
        _ => Err(CliError::Usage(format!(
            "{url:?} is not a server URL; use http://HOST:PORT or https://HOST:PORT, e.g. {DEFAULT_SERVER}"
        ))),
    }
}

impl Settings {
    /// Applies the precedence rules.
    pub fn resolve(opts: &ClientOpts) -> Result<Settings, CliError> {
        let config_path = config_path(opts);
        let file = ConfigFile::load(&config_path)?;
        let same = |a: &str, b: &str| a.trim() == b.trim();
        let server_source = match source_of(
            opts.server.as_deref(),
            "CLUSTERCLAW_SERVER",
            file.server.as_deref(),
            |v| opts.server.as_deref().is_some_and(|s| same(s, v)),
        ) {
            Source::Unset => Source::Default,
            s => s,
        };
        let server = opts
            .server
            .clone()
            .or_else(|| file.server.clone())
            .unwrap_or_else(|| DEFAULT_SERVER.into());
        let server = check_server_url(&server)?;
        let token_source = source_of(
            opts.token.as_ref(),
            "CLUSTERCLAW_TOKEN",
            file.token.as_ref(),
            |v| opts.token.as_ref().is_some_and(|t| same(t.expose(), v)),
        );
        let ca_cert_source = source_of(
            opts.ca_cert.as_deref(),
            "CLUSTERCLAW_CA_CERT",
            file.ca_cert.as_deref(),
            |v| opts.ca_cert.as_deref().is_some_and(|c| c == Path::new(v)),
        );
        let tenant_source = source_of(
            opts.tenant.as_deref(),
            "CLUSTERCLAW_TENANT",
            file.tenant.as_deref(),
            |v| opts.tenant.as_deref() == Some(v),
        );
        let project_source = source_of(
            opts.project.as_deref(),
            "CLUSTERCLAW_PROJECT",
            file.project.as_deref(),
            |v| opts.project.as_deref() == Some(v),
        );
        let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        Ok(Settings {
            server,
            server_source,
            token: opts.token.clone().or_else(|| file.token.clone()),
            token_source,
            ca_cert: opts.ca_cert.clone().or_else(|| file.ca_cert.clone()),
            ca_cert_source,
            tenant: nonempty(opts.tenant.clone().or_else(|| file.tenant.clone())),
            tenant_source,
            project: nonempty(opts.project.clone().or_else(|| file.project.clone())),
            project_source,
            config_path,
            file,
        })
    }

    /// The token, or an error that says how to get one.
    pub fn require_token(&self) -> Result<&Secret, CliError> {
        self.token.as_ref().ok_or_else(|| {
            CliError::Usage(format!(
                "no API token for {server}: pass --token TOKEN or set CLUSTERCLAW_TOKEN. \
                 The server writes an admin token to admin.token in its data directory on first start \
                 (e.g. `sudo cat /var/lib/clusterclaw/admin.token`); \
                 `clusterclaw login --server {server} --token TOKEN` saves it in {config} so you do not retype it",
                server = self.server,
                config = self.config_path.display()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let opts = ClientOpts {
            token: Some(Secret::new("cca_supersecretvalue1234")),
            ..Default::default()
        };
        let debug = format!("{opts:?}");
        assert!(!debug.contains("supersecret"), "{debug}");
        assert_eq!(
            Secret::new("cca_supersecretvalue1234").redacted(),
            "cca_***1234"
        );
        assert_eq!(Secret::new("short").redacted(), "***");
    }

    #[test]
    fn server_urls_are_checked() {
        assert_eq!(
            check_server_url("https://cc.example.com:7080/").unwrap(),
            "https://cc.example.com:7080"
        );
        assert_eq!(
            check_server_url("http://127.0.0.1:7080").unwrap(),
            "http://127.0.0.1:7080"
        );
        let err = check_server_url("127.0.0.1:7080").unwrap_err().to_string();
        assert!(err.contains("http://HOST:PORT"), "{err}");
        assert!(check_server_url("https://").is_err());
    }

    #[test]
    fn config_file_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        let config = ConfigFile {
            server: Some("https://cc.example.com:7080".into()),
            token: Some(Secret::new("cca_abcdefghijklmnop")),
            ca_cert: Some(PathBuf::from("/etc/clusterclaw/ca.pem")),
            tenant: Some("acme".into()),
            project: None,
        };
        config.save(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(ConfigFile::load(&path).unwrap(), config);
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("ca_cert = \"/etc/clusterclaw/ca.pem\""),
            "{text}"
        );
        assert_eq!(
            ConfigFile::load(&dir.path().join("missing.toml")).unwrap(),
            ConfigFile::default()
        );
    }

    #[test]
    fn unknown_config_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        fs::write(&path, "sever = \"http://x:1\"\n").unwrap();
        let err = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("sever") && err.contains("config.toml"),
            "{err}"
        );
    }

    #[test]
    fn precedence_flag_then_file_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        ConfigFile {
            server: Some("http://from-file:1".into()),
            tenant: Some("filetenant".into()),
            ..Default::default()
        }
        .save(&path)
        .unwrap();
        let opts = ClientOpts {
            config: Some(path.clone()),
            ..Default::default()
        };
        let s = Settings::resolve(&opts).unwrap();
        assert_eq!(s.server, "http://from-file:1");
        assert_eq!(s.server_source, Source::File);
        assert_eq!(s.tenant.as_deref(), Some("filetenant"));
        let opts = ClientOpts {
            config: Some(path),
            server: Some("http://from-flag:2".into()),
            ..Default::default()
        };
        let s = Settings::resolve(&opts).unwrap();
        assert_eq!(s.server, "http://from-flag:2");
        let opts = ClientOpts {
            config: Some(dir.path().join("none.toml")),
            ..Default::default()
        };
        let s = Settings::resolve(&opts).unwrap();
        assert_eq!(s.server, DEFAULT_SERVER);
        assert_eq!(s.server_source, Source::Default);
        let err = s.require_token().unwrap_err().to_string();
        assert!(
            err.contains("admin.token") && err.contains("clusterclaw login"),
            "{err}"
        );
    }
}
