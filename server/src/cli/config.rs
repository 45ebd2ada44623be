//! `clusterclaw config view`: the CLI settings in effect and where each comes from.

use clap::{Args, Subcommand};

use super::settings::{ClientOpts, Settings, Source};
use super::{CliResult, print_out};

#[derive(Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the settings in effect (the token redacted) and their sources
    View,
}

fn line(out: &mut String, key: &str, value: Option<String>, source: Source) {
    let value = value.map_or_else(|| "# not set".to_string(), |v| format!("{v:?}"));
    let assignment = if value.starts_with('#') {
        format!("# {key} {}", &value[2..])
    } else {
        format!("{key} = {value}")
    };
    out.push_str(&format!("{assignment:<48} # {source}\n"));
}

/// The text of `config view`.
pub fn render(s: &Settings) -> String {
    let exists = if s.config_path.exists() {
        ""
    } else {
        " (does not exist)"
    };
    let mut out = format!("# CLI config file: {}{exists}\n", s.config_path.display());
    line(&mut out, "server", Some(s.server.clone()), s.server_source);
    line(
        &mut out,
        "token",
        s.token.as_ref().map(|t| t.redacted()),
        s.token_source,
    );
    line(
        &mut out,
        "ca_cert",
        s.ca_cert.as_ref().map(|p| p.display().to_string()),
        s.ca_cert_source,
    );
    line(&mut out, "tenant", s.tenant.clone(), s.tenant_source);
    line(&mut out, "project", s.project.clone(), s.project_source);
    out
}

pub fn run(args: ConfigArgs) -> CliResult {
    match args.command {
        ConfigCommand::View => print_out(&render(&Settings::resolve(&args.client)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::settings::{ConfigFile, Secret};

    #[test]
    fn view_redacts_the_token_and_names_sources() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        ConfigFile {
            token: Some(Secret::new("cca_0123456789abcdef")),
            tenant: Some("acme".into()),
            ..Default::default()
        }
        .save(&path)
        .unwrap();
        let opts = ClientOpts {
            config: Some(path),
            project: Some("helpdesk".into()),
            ..Default::default()
        };
        let text = render(&Settings::resolve(&opts).unwrap());
        assert!(!text.contains("0123456789ab"), "{text}");
        assert!(text.contains("token = \"cca_***cdef\""), "{text}");
        assert!(text.contains("# config file"), "{text}");
        assert!(
            text.contains("server = \"http://127.0.0.1:7080\""),
            "{text}"
        );
        assert!(text.contains("# ca_cert not set"), "{text}");
    }
}
