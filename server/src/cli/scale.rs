//! `clusterclaw scale instance NAME --replicas N`.

use clap::Args;
use reqwest::Method;
use serde_json::json;

use super::client::Client;
use super::resolve::{self, object_path, parse_kind};
use super::settings::{ClientOpts, Settings};
use super::{CliError, CliResult, print_out};
use crate::model::{Kind, MAX_REPLICAS};

fn parse_replicas(s: &str) -> Result<i64, String> {
    let n: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if (0..=MAX_REPLICAS).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n} is out of range; replicas must be between 0 and {MAX_REPLICAS}"
        ))
    }
}

#[derive(Args, Debug)]
pub struct ScaleArgs {
    /// instance (only instances have replicas)
    #[arg(value_parser = parse_kind, value_name = "KIND")]
    pub kind: Kind,
    pub name: String,
    /// The number of replicas wanted (0 stops every replica but keeps their state)
    #[arg(long, value_parser = parse_replicas, value_name = "N")]
    pub replicas: i64,
    #[command(flatten)]
    pub client: ClientOpts,
}

pub async fn run(args: ScaleArgs) -> CliResult {
    if args.kind != Kind::OpenClawInstance {
        return Err(CliError::Usage(format!(
            "a {} has no replicas; only instances can be scaled (clusterclaw scale instance NAME --replicas N)",
            args.kind.lower()
        )));
    }
    let settings = Settings::resolve(&args.client)?;
    let client = Client::new(&settings)?;
    let (key, _) = resolve::find(&client, &settings, args.kind, &args.name).await?;
    let path = format!("{}/scale", object_path(&key));
    client
        .send(
            Method::PUT,
            &path,
            Some(&json!({ "replicas": args.replicas })),
        )
        .await?;
    print_out(&format!(
        "{}/{} scaled to {} replicas\n",
        key.kind.lower(),
        key.name,
        args.replicas
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_range_checked() {
        assert_eq!(parse_replicas("3"), Ok(3));
        assert_eq!(parse_replicas("0"), Ok(0));
        assert!(
            parse_replicas("-1")
                .unwrap_err()
                .contains("between 0 and 100")
        );
        assert!(parse_replicas("100000").is_err());
        assert!(parse_replicas("three").is_err());
    }
}
