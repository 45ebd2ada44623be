//! `clusterclaw drain host NAME [--timeout 10m] [--discard-state]`: starts a drain on the
//! server (which carries it out whether or not this command stays) and follows it, printing
//! each replica's progress; exits non-zero naming every replica that could not be moved.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use reqwest::Method;

use super::client::Client;
use super::resolve::{object_path, parse_kind};
use super::settings::{ClientOpts, Settings};
use super::{CliError, CliResult, print_out};
use crate::model::{
    DrainPhase, DrainReplica, DrainReplicaPhase, DrainStatus, Kind, MAX_DRAIN_TIMEOUT_SECS,
    ObjectKey, parse_duration,
};

/// How often the drain is read while it runs.
const POLL: Duration = Duration::from_millis(500);
/// How long past the drain's own deadline the command waits for the server to end it.
const GRACE: Duration = Duration::from_secs(30);

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// host (only hosts are drained)
    #[arg(value_parser = parse_kind, value_name = "KIND")]
    pub kind: Kind,
    pub name: String,
    /// How long the drain may take (e.g. 10m, 90s, 1h); replicas not moved by then fail it.
    #[arg(long, default_value = "10m")]
    pub timeout: String,
    /// Do not carry state volumes: replicas start fresh on their new host (their old volumes
    /// stay retained on the drained host).
    #[arg(long)]
    pub discard_state: bool,
    #[command(flatten)]
    pub client: ClientOpts,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn rate(bytes: u64, millis: u64) -> String {
    if millis == 0 {
        return "-".into();
    }
    format!("{:.1} MB/s", bytes as f64 / 1e6 / (millis as f64 / 1000.0))
}

fn name_of(r: &DrainReplica) -> String {
    format!("{}/{}/{}", r.tenant, r.project, r.replica)
}

/// `, attempt N` when the state transfer had to start again (its bytes count that attempt).
fn attempt(r: &DrainReplica) -> String {
    match r.attempts {
        Some(n) if n > 1 => format!(", attempt {n}"),
        _ => String::new(),
    }
}

/// One progress line of a replica, `None` while there is nothing to say.
fn line(r: &DrainReplica, elapsed: &BTreeMap<String, std::time::Instant>) -> Option<String> {
    let to = r.to.as_deref().unwrap_or("?");
    Some(match r.phase {
        DrainReplicaPhase::Waiting => format!(
            "{} waiting: {}",
            name_of(r),
            r.message.as_deref().unwrap_or("its turn has not come")
        ),
        DrainReplicaPhase::Moving => {
            let bytes = r.bytes.unwrap_or(0);
            let since = elapsed
                .get(&name_of(r))
                .map_or(0, |t| t.elapsed().as_millis() as u64);
            match (&r.transfer, r.sha256.as_ref()) {
                (None, _) => format!("{} -> {to}: moving (state discarded)", name_of(r)),
                (Some(_), Some(_)) => format!(
                    "{} -> {to}: state copied ({}), starting",
                    name_of(r),
                    mib(bytes)
                ),
                (Some(_), None) => format!(
                    "{} -> {to}: moving, {} of state ({}){}",
                    name_of(r),
                    mib(bytes),
                    rate(bytes, since),
                    attempt(r)
                ),
            }
        }
        DrainReplicaPhase::Moved => match (r.bytes, r.transfer_millis, &r.sha256) {
            (Some(b), Some(ms), Some(sha)) => format!(
                "{} -> {to}: moved, state {} in {:.1}s ({}), sha256 {}{}",
                name_of(r),
                mib(b),
                ms as f64 / 1000.0,
                rate(b, ms),
                &sha[..sha.len().min(12)],
                attempt(r)
            ),
            _ => format!(
                "{} -> {to}: moved ({})",
                name_of(r),
                r.message.as_deref().unwrap_or("Ready")
            ),
        },
        DrainReplicaPhase::Failed => format!(
            "{} failed: {}",
            name_of(r),
            r.message.as_deref().unwrap_or("no reason known")
        ),
    })
}

/// Starts the drain and follows it until it ends.
pub async fn run(args: DrainArgs) -> CliResult {
    if args.kind != Kind::Host {
        return Err(CliError::Usage(format!(
            "a {} cannot be drained; only hosts can (clusterclaw drain host NAME)",
            args.kind.lower()
        )));
    }
    let timeout = parse_duration(&args.timeout).map_err(|e| {
        CliError::Usage(format!(
            "--timeout {:?} is not a duration ({e}); e.g. 10m, 90s, 1h",
            args.timeout
        ))
    })?;
    if timeout.is_zero() || timeout.as_secs() > MAX_DRAIN_TIMEOUT_SECS {
        return Err(CliError::Usage(format!(
            "--timeout {:?} is out of range; a drain's timeout is between 1s and 7d",
            args.timeout
        )));
    }
    let settings = Settings::resolve(&args.client)?;
    let client = Client::new(&settings)?;
    let key = ObjectKey::cluster(Kind::Host, &args.name);
    let path = format!("{}/drain", object_path(&key));
    let body = serde_json::json!({ "timeout": args.timeout, "discardState": args.discard_state });
    let resp = client.send(Method::POST, &path, Some(&body)).await?;
    let started = resp.status() == reqwest::StatusCode::ACCEPTED;
    print_out(&format!(
        "host/{} cordoned; {} ({}, timeout {})\n",
        args.name,
        if started {
            "drain started"
        } else {
            "a drain already in progress is followed"
        },
        if args.discard_state {
            "state discarded"
        } else {
            "state carried through the control plane"
        },
        args.timeout
    ))?;
    let give_up = std::time::Instant::now() + timeout + GRACE;
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    let mut moving_since: BTreeMap<String, std::time::Instant> = BTreeMap::new();
    let mut last_progress = std::time::Instant::now();
    loop {
        let drain: DrainStatus = client.json(Method::GET, &path, None).await?;
        let mut out = String::new();
        for r in &drain.replicas {
            if r.phase == DrainReplicaPhase::Moving {
                moving_since
                    .entry(name_of(r))
                    .or_insert_with(std::time::Instant::now);
            }
            let Some(text) = line(r, &moving_since) else {
                continue;
            };
            let moving = r.phase == DrainReplicaPhase::Moving;
            let changed_phase = shown
                .get(&name_of(r))
                .is_none_or(|old| old.split(':').next() != text.split(':').next() || !moving);
            let differs = shown.get(&name_of(r)) != Some(&text);
            // A moving replica's figures are shown once a second at most.
            if differs && (changed_phase || last_progress.elapsed() >= Duration::from_secs(1)) {
                out.push_str(&text);
                out.push('\n');
                shown.insert(name_of(r), text);
            }
        }
        if !out.is_empty() {
            last_progress = std::time::Instant::now();
            print_out(&out)?;
        }
        match drain.phase {
            DrainPhase::Succeeded => {
                return print_out(&format!(
                    "host/{} drained: {}\n",
                    args.name,
                    drain.message.as_deref().unwrap_or("every replica moved")
                ));
            }
            DrainPhase::Failed => {
                let failed: Vec<String> = drain
                    .replicas
                    .iter()
                    .filter(|r| r.phase == DrainReplicaPhase::Failed)
                    .map(|r| {
                        format!(
                            "  {}: {}",
                            name_of(r),
                            r.message.as_deref().unwrap_or("no reason known")
                        )
                    })
                    .collect();
                return Err(CliError::Failed(format!(
                    "drain of host/{} failed: {} replica(s) could not be moved:\n{}",
                    args.name,
                    failed.len(),
                    failed.join("\n")
                )));
            }
            DrainPhase::Draining => {}
        }
        if std::time::Instant::now() >= give_up {
            return Err(CliError::Failed(format!(
                "drain of host/{} has not ended {}s past its timeout; `clusterclaw describe host {}` shows it",
                args.name,
                GRACE.as_secs(),
                args.name
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}
