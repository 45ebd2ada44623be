//! `clusterclaw rollout status|history|pause|resume|promote|abort|undo instance NAME`: an
//! instance's update, and the commands that steer it.

use std::time::Duration;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::client::Client;
use super::output::{table, text_at};
use super::resolve::{self, object_path, parse_kind};
use super::settings::{ClientOpts, Settings};
use super::{CliError, CliResult, print_out};
use crate::model::Kind;

/// How often `rollout status -w` asks.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Args, Debug)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub command: RolloutCommand,
}

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Show the update: revision, phase, replicas updated/ready/available, step, message
    Status(StatusArgs),
    /// List the instance's revisions, marking the current and the stable one
    History(TargetArgs),
    /// Stop moving replicas until `rollout resume`
    Pause(TargetArgs),
    /// Continue a paused update, or restart one that Failed or was RolledBack
    Resume(TargetArgs),
    /// End a Canary's pause step
    Promote(TargetArgs),
    /// Return every updated replica to the stable revision (RolledBack)
    Abort(TargetArgs),
    /// Write the spec of an earlier revision back (a new revision, updated as usual)
    Undo(UndoArgs),
}

#[derive(Args, Debug)]
pub struct TargetArgs {
    /// instance (only instances have updates)
    #[arg(value_parser = parse_kind, value_name = "KIND")]
    pub kind: Kind,
    pub name: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Wait until the update ends; exit 1 if it Failed or was RolledBack
    #[arg(short = 'w', long = "watch")]
    pub watch: bool,
    /// With -w: give up after this long (30s, 10m), exit 1 [default: wait until the end]
    #[arg(long, value_name = "DURATION", requires = "watch", value_parser = parse_timeout)]
    pub timeout: Option<std::time::Duration>,
}

fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    crate::model::parse_duration(s)
}

#[derive(Args, Debug)]
pub struct UndoArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The revision whose spec to write back [default: the stable revision, or the previous]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub to_revision: Option<u64>,
}

fn check_kind(kind: Kind, what: &str) -> CliResult {
    if kind == Kind::OpenClawInstance {
        return Ok(());
    }
    Err(CliError::Usage(format!(
        "a {} has no updates; only instances do (clusterclaw rollout {what} instance NAME)",
        kind.lower()
    )))
}

fn num(v: &Value, pointer: &str) -> i64 {
    v.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

/// Whether the update to the instance's newest revision has ended, and how.
fn ended(o: &Value) -> Option<&str> {
    let newest = o
        .pointer("/status/configRevision")
        .and_then(Value::as_u64)?;
    let ro = o.pointer("/status/rollout")?;
    if ro.get("revision").and_then(Value::as_u64) != Some(newest) {
        return None;
    }
    match ro.get("phase").and_then(Value::as_str)? {
        p @ ("Succeeded" | "Failed" | "RolledBack") => Some(p),
        _ => None,
    }
}

/// The text of `rollout status`.
pub fn status_text(o: &Value) -> String {
    let name = text_at(o, "/metadata/name");
    let desired = num(o, "/spec/replicas");
    let counts = format!(
        "{} updated, {} ready, {} available of {desired}",
        num(o, "/status/updatedReplicas"),
        num(o, "/status/readyReplicas"),
        num(o, "/status/availableReplicas"),
    );
    let Some(ro) = o.pointer("/status/rollout").filter(|r| !r.is_null()) else {
        return format!(
            "instance/{name}: no update yet (revision {})\n  Replicas:  {counts}\n",
            text_at(o, "/status/configRevision")
        );
    };
    let mut out = format!(
        "instance/{name}: revision {} {}\n",
        text_at(ro, "/revision"),
        text_at(ro, "/phase")
    );
    let newest = o.pointer("/status/configRevision").and_then(Value::as_u64);
    if newest.is_some() && newest != ro.get("revision").and_then(Value::as_u64) {
        out.push_str(&format!(
            "  Waiting:   revision {} is not started yet{}\n",
            newest.unwrap_or_default(),
            ro.get("heldBy")
                .and_then(Value::as_str)
                .map(|h| format!(" (held by {h})"))
                .unwrap_or_default()
        ));
    }
    out.push_str(&format!(
        "  Stable:    {}\n",
        text_at(ro, "/stableRevision")
    ));
    out.push_str(&format!("  Replicas:  {counts}\n"));
    if let Some(step) = ro.get("step").and_then(Value::as_u64) {
        let steps = o
            .pointer("/spec/updateStrategy/steps")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if (step as usize) < steps {
            out.push_str(&format!("  Step:      {}/{steps}\n", step + 1));
        } else {
            out.push_str(&format!("  Step:      past the last of {steps}\n"));
        }
    }
    if let Some(m) = ro.get("message").and_then(Value::as_str) {
        out.push_str(&format!("  Message:   {m}\n"));
    }
    out
}

/// The table of `rollout history`, newest first; the current revision and the stable one are
/// marked.
pub fn history_table(revisions: &[Value], instance: &Value) -> String {
    let current = instance
        .pointer("/status/configRevision")
        .and_then(Value::as_u64);
    let stable = instance
        .pointer("/status/rollout/stableRevision")
        .and_then(Value::as_u64);
    let mut revisions: Vec<&Value> = revisions.iter().collect();
    revisions.sort_by_key(|r| std::cmp::Reverse(r.get("revision").and_then(Value::as_u64)));
    let rows: Vec<Vec<String>> = revisions
        .iter()
        .map(|r| {
            let n = r.get("revision").and_then(Value::as_u64);
            let marks: Vec<&str> = [(current, "current"), (stable, "stable")]
                .iter()
                .filter(|(m, _)| m.is_some() && *m == n)
                .map(|(_, w)| *w)
                .collect();
            let rev = match (n, marks.is_empty()) {
                (Some(n), true) => n.to_string(),
                (Some(n), false) => format!("{n} ({})", marks.join(", ")),
                (None, _) => "-".into(),
            };
            let message = text_at(r, "/message")
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            vec![
                rev,
                text_at(r, "/image"),
                text_at(r, "/createdAt"),
                text_at(r, "/author"),
                message,
            ]
        })
        .collect();
    table(
        &["REVISION", "IMAGE", "CREATED", "AUTHOR", "MESSAGE"],
        &rows,
    )
}

pub async fn run(args: RolloutArgs) -> CliResult {
    match args.command {
        RolloutCommand::Status(a) => status(a).await,
        RolloutCommand::History(a) => history(a).await,
        RolloutCommand::Pause(a) => action(a, "pause", None).await,
        RolloutCommand::Resume(a) => action(a, "resume", None).await,
        RolloutCommand::Promote(a) => action(a, "promote", None).await,
        RolloutCommand::Abort(a) => action(a, "abort", None).await,
        RolloutCommand::Undo(a) => action(a.target, "undo", a.to_revision).await,
    }
}

async fn status(args: StatusArgs) -> CliResult {
    check_kind(args.target.kind, "status")?;
    let settings = Settings::resolve(&args.target.client)?;
    let client = Client::new(&settings)?;
    let (key, mut obj) =
        resolve::find(&client, &settings, args.target.kind, &args.target.name).await?;
    let mut shown = status_text(&obj);
    print_out(&shown)?;
    if !args.watch {
        return Ok(());
    }
    let path = object_path(&key);
    let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    loop {
        if let Some(phase) = ended(&obj) {
            return match phase {
                "Succeeded" => Ok(()),
                other => Err(CliError::Failed(format!(
                    "the update of instance/{} to revision {} {}: {}",
                    key.name,
                    text_at(&obj, "/status/rollout/revision"),
                    if other == "Failed" {
                        "failed"
                    } else {
                        "was rolled back"
                    },
                    text_at(&obj, "/status/rollout/message")
                ))),
            };
        }
        if let (Some(deadline), Some(t)) = (deadline, args.timeout)
            && tokio::time::Instant::now() >= deadline
        {
            return Err(CliError::Failed(format!(
                "the update of instance/{} to revision {} had not ended after {}; it goes on",
                key.name,
                text_at(&obj, "/status/rollout/revision"),
                humantime::format_duration(t)
            )));
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
        obj = client.get(&path).await?;
        let text = status_text(&obj);
        if text != shown {
            print_out(&text)?;
            shown = text;
        }
    }
}

async fn history(args: TargetArgs) -> CliResult {
    check_kind(args.kind, "history")?;
    let settings = Settings::resolve(&args.client)?;
    let client = Client::new(&settings)?;
    let (key, obj) = resolve::find(&client, &settings, args.kind, &args.name).await?;
    let list = client
        .get(&format!("{}/config/revisions", object_path(&key)))
        .await?;
    let items = list
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if items.is_empty() {
        eprintln!("instance/{} has no revisions yet.", key.name);
        return Ok(());
    }
    print_out(&history_table(&items, &obj))
}

async fn action(args: TargetArgs, what: &str, to_revision: Option<u64>) -> CliResult {
    check_kind(args.kind, what)?;
    let settings = Settings::resolve(&args.client)?;
    let client = Client::new(&settings)?;
    let (key, _) = resolve::find(&client, &settings, args.kind, &args.name).await?;
    let body = match to_revision {
        Some(n) => json!({ "toRevision": n }),
        None => json!({}),
    };
    let answer: Value = client
        .json(
            Method::POST,
            &format!("{}/rollout/{what}", object_path(&key)),
            Some(&body),
        )
        .await?;
    print_out(&format!(
        "instance/{}: {}\n",
        key.name,
        answer
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("done")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bot() -> Value {
        json!({
            "metadata": {"name": "bot"},
            "spec": {"replicas": 3, "updateStrategy": {"type": "Canary", "steps": [{"replicas": 1}, {"pause": {}}]}},
            "status": {"configRevision": 5, "readyReplicas": 3, "updatedReplicas": 1, "availableReplicas": 2,
                "rollout": {"revision": 5, "phase": "Paused", "stableRevision": 4, "step": 1,
                    "message": "step 2/2: paused until `clusterclaw rollout promote`"}}
        })
    }

    #[test]
    fn status_says_revision_phase_counts_step_and_message() {
        assert_eq!(
            status_text(&bot()),
            "instance/bot: revision 5 Paused\n\
             \x20 Stable:    4\n\
             \x20 Replicas:  1 updated, 3 ready, 2 available of 3\n\
             \x20 Step:      2/2\n\
             \x20 Message:   step 2/2: paused until `clusterclaw rollout promote`\n"
        );
        assert_eq!(ended(&bot()), None);
        let mut done = bot();
        done["status"]["rollout"]["phase"] = json!("RolledBack");
        assert_eq!(ended(&done), Some("RolledBack"));
        // An ended update to an older revision is not the end of the newest one.
        done["status"]["configRevision"] = json!(6);
        assert_eq!(ended(&done), None);
        assert!(status_text(&done).contains("Waiting:   revision 6 is not started yet"));
        let fresh = json!({"metadata": {"name": "bot"}, "spec": {"replicas": 1}});
        assert!(status_text(&fresh).starts_with("instance/bot: no update yet"));
    }

    #[test]
    fn history_marks_the_current_and_the_stable_revision() {
        let revisions = [
            json!({"revision": 4, "image": "ghcr.io/openclaw/openclaw:2026.7.1", "createdAt": "2026-07-10T11:00:00Z", "author": "alice", "message": "created"}),
            json!({"revision": 5, "image": "ghcr.io/openclaw/openclaw:2026.8.1", "createdAt": "2026-07-10T12:00:00Z", "author": "bob", "message": "upgrade\nto 8.1"}),
        ];
        assert_eq!(
            history_table(&revisions, &bot()),
            "REVISION      IMAGE                                CREATED                AUTHOR   MESSAGE\n\
             5 (current)   ghcr.io/openclaw/openclaw:2026.8.1   2026-07-10T12:00:00Z   bob      upgrade to 8.1\n\
             4 (stable)    ghcr.io/openclaw/openclaw:2026.7.1   2026-07-10T11:00:00Z   alice    created\n"
        );
    }
}
