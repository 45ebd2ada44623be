//! `clusterclaw cordon host NAME` and `clusterclaw uncordon host NAME`.

use clap::Args;
use reqwest::Method;

use super::client::Client;
use super::resolve::{object_path, parse_kind};
use super::settings::{ClientOpts, Settings};
use super::{CliError, CliResult, print_out};
use crate::model::{Kind, ObjectKey};

#[derive(Args, Debug)]
pub struct CordonArgs {
    /// host (only hosts are cordoned)
    #[arg(value_parser = parse_kind, value_name = "KIND")]
    pub kind: Kind,
    pub name: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// Sets (`cordon`) or clears (`uncordon`) a host's `spec.unschedulable`.
pub async fn run(args: CordonArgs, cordon: bool) -> CliResult {
    let verb = if cordon { "cordon" } else { "uncordon" };
    if args.kind != Kind::Host {
        return Err(CliError::Usage(format!(
            "a {} cannot be {verb}ed; only hosts can (clusterclaw {verb} host NAME)",
            args.kind.lower()
        )));
    }
    let settings = Settings::resolve(&args.client)?;
    let client = Client::new(&settings)?;
    let key = ObjectKey::cluster(Kind::Host, &args.name);
    let path = format!("{}/{verb}", object_path(&key));
    client
        .send(Method::POST, &path, Some(&serde_json::json!({})))
        .await?;
    let what = if cordon {
        "cordoned: no new replicas are placed on it; those it runs stay"
    } else {
        "uncordoned: new replicas may be placed on it"
    };
    print_out(&format!("host/{} {what}\n", args.name))
}
