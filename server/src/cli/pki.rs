//! `clusterclaw pki init`: creates the certificate authority of the agent port and the server
//! certificate it signs.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{CliError, CliResult, print_out};

#[derive(Args, Debug)]
pub struct PkiArgs {
    #[command(subcommand)]
    pub command: PkiCommand,
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a new CA and server certificate in a directory (refuses to replace an existing CA)
    Init {
        /// Directory to write the PEM files to (created with mode 0700)
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A DNS name or IP address agents use to reach the server (repeatable; localhost,
        /// 127.0.0.1 and this machine's host name are always included)
        #[arg(long = "server-name", value_name = "DNS")]
        server_names: Vec<String>,
    },
}

/// The names given, then `localhost`, `127.0.0.1` and the host name; each once.
fn certificate_names(given: Vec<String>, hostname: Option<String>) -> Vec<String> {
    let mut names = given;
    names.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
    names.extend(hostname.filter(|h| crate::pki::check_server_name(h).is_ok()));
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    names
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()?;
    Some(name.trim().to_ascii_lowercase()).filter(|n| !n.is_empty())
}

pub fn run(args: PkiArgs) -> CliResult {
    match args.command {
        PkiCommand::Init { dir, server_names } => {
            let names = certificate_names(server_names, hostname());
            let files =
                crate::pki::init_dir(&dir, &names).map_err(|e| CliError::Failed(e.to_string()))?;
            print_out(&format!(
                "PKI created in {}:\n  {}  CA certificate: agents and `clusterclaw --ca-cert` trust it\n  {}  CA private key: keep it secret\n  {}  server certificate of the agent port\n  {}  its private key\n",
                files.dir.display(),
                files.ca_cert.display(),
                files.ca_key.display(),
                files.server_cert.display(),
                files.server_key.display()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_always_include_local_names_once() {
        let names = certificate_names(
            vec!["cc.example.com".into(), "LOCALHOST".into()],
            Some("node-1".into()),
        );
        assert_eq!(
            names,
            ["cc.example.com", "LOCALHOST", "127.0.0.1", "node-1"]
        );
        assert_eq!(
            certificate_names(Vec::new(), Some("bad name!".into())),
            ["localhost", "127.0.0.1"]
        );
    }
}
