//! `clusterclaw login`: checks a server URL and token against `/api/v1/info` and saves them in
//! the CLI config file.

use clap::Args;

use super::client::Client;
use super::output::text_at;
use super::settings::{ClientOpts, Settings};
use super::{CliError, CliResult, print_out};

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  clusterclaw login --server https://clusterclaw.example.com:7080 --token \"$(sudo cat /var/lib/clusterclaw/admin.token)\" --ca-cert ca.pem"
)]
pub struct LoginArgs {
    #[command(flatten)]
    pub client: ClientOpts,
}

pub async fn run(args: LoginArgs) -> CliResult {
    if args.client.token.is_none() {
        return Err(CliError::Usage(
            "login needs the token to save: pass --token TOKEN (or set CLUSTERCLAW_TOKEN); \
             the server writes an admin token to admin.token in its data directory on first start"
                .into(),
        ));
    }
    let settings = Settings::resolve(&args.client)?;
    let ca_cert = match &settings.ca_cert {
        Some(path) => Some(std::fs::canonicalize(path).map_err(|e| {
            CliError::Usage(format!(
                "cannot read the CA certificate {}: {e}",
                path.display()
            ))
        })?),
        None => None,
    };
    let client = Client::new(&settings)?;
    let info = client.get("/api/v1/info").await?;
    let mut file = settings.file.clone();
    file.server = Some(settings.server.clone());
    file.token = settings.token.clone();
    file.ca_cert = ca_cert;
    if let Some(t) = args.client.tenant {
        file.tenant = Some(t);
    }
    if let Some(p) = args.client.project {
        file.project = Some(p);
    }
    file.save(&settings.config_path)?;
    print_out(&format!(
        "Logged in to {} (clusterclaw {}, store index {}); settings saved to {}\n",
        settings.server,
        text_at(&info, "/version"),
        text_at(&info, "/index"),
        settings.config_path.display()
    ))
}
