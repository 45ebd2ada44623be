//! `clusterclaw logs instance NAME`: a replica's container output, streamed from its host.

use std::io::Write;

use clap::Args;

use super::client::{Client, transport_error, with_query};
use super::resolve::{self, object_path, parse_kind};
use super::settings::{ClientOpts, Settings};
use super::{CliError, CliResult, stdout_error};
use crate::model::Kind;

fn parse_tail(s: &str) -> Result<u64, String> {
    let n: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of lines"))?;
    u64::try_from(n).map_err(|_| format!("{n} is negative; give 0 or more lines"))
}

fn parse_since(s: &str) -> Result<String, String> {
    let s = s.trim();
    if humantime::parse_duration(s).is_ok() || humantime::parse_rfc3339_weak(s).is_ok() {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is neither a duration (10m, 2h) nor an RFC 3339 time (2026-01-02T15:04:05Z)"
        ))
    }
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// instance (only instances have logs)
    #[arg(value_parser = parse_kind, value_name = "KIND")]
    pub kind: Kind,
    pub name: String,
    /// The replica's ordinal (default: the lowest)
    #[arg(long, value_name = "N", conflicts_with = "all")]
    pub replica: Option<u32>,
    /// Every replica, merged line by line with a `replica-N | ` prefix
    #[arg(long)]
    pub all: bool,
    /// Keep streaming new output, into the replica's next container when it is replaced,
    /// until the replica is deleted
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Lines from the end to start with (default: all)
    #[arg(long, value_name = "N", value_parser = parse_tail, allow_hyphen_values = true)]
    pub tail: Option<u64>,
    /// Only output since this long ago (10m, 2h) or this RFC 3339 time
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    pub since: Option<String>,
    /// Start each line with its timestamp
    #[arg(long)]
    pub timestamps: bool,
    /// The output of the replica container's previous run (the one before its last restart),
    /// else an older container of the replica its host still has
    #[arg(long)]
    pub previous: bool,
    #[command(flatten)]
    pub client: ClientOpts,
}

pub async fn run(args: LogsArgs) -> CliResult {
    if args.kind != Kind::OpenClawInstance {
        return Err(CliError::Usage(format!(
            "a {} has no logs; only instances do (clusterclaw logs instance NAME)",
            args.kind.lower()
        )));
    }
    let settings = Settings::resolve(&args.client)?;
    let client = Client::new(&settings)?;
    let (key, _) = resolve::find(&client, &settings, args.kind, &args.name).await?;
    let replica = args.replica.map(|n| n.to_string());
    let tail = args.tail.map(|n| n.to_string());
    let flag = |b: bool| b.then_some("true");
    let path = with_query(
        &format!("{}/logs", object_path(&key)),
        &[
            ("follow", flag(args.follow)),
            ("replica", replica.as_deref()),
            ("all", flag(args.all)),
            ("tail", tail.as_deref()),
            ("since", args.since.as_deref()),
            ("timestamps", flag(args.timestamps)),
            ("previous", flag(args.previous)),
        ],
    );
    let mut resp = client.get_stream(&path).await.map_err(|e| match e {
        // A parameter the server refused is the flag of the same name.
        CliError::Api(e) if e.status == 400 && !e.details.is_empty() => {
            let flags: Vec<String> = e.details.iter().map(|d| format!("--{}", d.field)).collect();
            let problems: Vec<&str> = e.details.iter().map(|d| d.problem.as_str()).collect();
            CliError::Failed(format!("{}: {}", flags.join(", "), problems.join("; ")))
        }
        other => other,
    })?;
    let mut out = std::io::stdout().lock();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                out.write_all(&chunk)
                    .and_then(|()| out.flush())
                    .map_err(stdout_error)?;
            }
            Ok(None) => return Ok(()),
            Err(e) => {
                let _ = out.flush();
                let why = match transport_error(client.server(), &e) {
                    CliError::Unreachable(m) | CliError::Failed(m) => m,
                    other => other.to_string(),
                };
                return Err(CliError::Failed(format!(
                    "the log stream of instance {} broke off: {why}",
                    key.name
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_and_since_are_checked() {
        assert_eq!(parse_tail("100"), Ok(100));
        assert!(parse_tail("-1").unwrap_err().contains("negative"));
        assert!(parse_since("10m").is_ok());
        assert!(parse_since("2026-01-02T15:04:05Z").is_ok());
        assert!(parse_since("yesterday").is_err());
    }
}
