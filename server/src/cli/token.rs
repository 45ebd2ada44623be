//! `clusterclaw token create join | list | revoke ID`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{Value, json};

use super::client::Client;
use super::output::{self, table, text_at};
use super::settings::{ClientOpts, Settings};
use super::{CliError, CliResult, print_out};
use crate::util::rfc3339_u64;

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; its secret is printed once and never again
    Create(CreateArgs),
    /// List tokens (never their secrets)
    List(ListArgs),
    /// Revoke a token by its ID
    Revoke {
        /// The token's ID, as `token list` shows it
        id: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NewTokenKind {
    /// A token with which clusterclaw-agent enrolls a host (ccj_...)
    Join,
    /// A token that calls the REST API with a role (cca_...)
    Api,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 30m, 1h or 7d: {e}"))?;
    if d < Duration::from_secs(60) {
        Err(format!("{s:?} is too short; a token must live at least 1m"))
    } else {
        Ok(d)
    }
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[arg(value_enum)]
    pub kind: NewTokenKind,
    /// How long the token stays valid, e.g. 30m, 1h, 7d [default: 24h for a join token, no
    /// expiry for an API token]
    #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
    pub ttl: Option<Duration>,
    /// How many hosts may enroll with it [default: unlimited within the TTL]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    pub uses: Option<u32>,
    /// A note to recognise the token by in `token list`
    #[arg(long)]
    pub name: Option<String>,
    /// Role of an API token: platform-admin, tenant-admin, project-editor or viewer
    /// [default: the caller's own role]; limit it with -t TENANT and -p PROJECT
    #[arg(long, value_parser = ["platform-admin", "tenant-admin", "project-editor", "viewer"])]
    pub role: Option<String>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[arg(short = 'o', long, value_enum, default_value_t = ListFormat::Table)]
    pub output: ListFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    Table,
    Json,
    Yaml,
}

/// A time the server sends as Unix seconds or RFC 3339 text. Seconds RFC 3339 cannot write
/// (past the year 9999) are shown as they are.
fn when(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Number(n) => n.as_u64().map(rfc3339_u64).or_else(|| Some(n.to_string())),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn expired(v: Option<&Value>, now: SystemTime) -> bool {
    let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    match v {
        Some(Value::Number(n)) => n.as_u64().is_some_and(|secs| secs <= now_secs),
        Some(Value::String(s)) => humantime::parse_rfc3339_weak(s).is_ok_and(|t| t <= now),
        _ => false,
    }
}

/// Rows of `token list`.
pub fn token_rows(items: &[Value], now: SystemTime) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|t| {
            let status = if t.get("revoked").and_then(Value::as_bool) == Some(true) {
                "revoked"
            } else if expired(t.get("expiresAt"), now) {
                "expired"
            } else if t.get("usesRemaining").and_then(Value::as_i64) == Some(0) {
                "used up"
            } else {
                "active"
            };
            vec![
                text_at(t, "/id"),
                text_at(t, "/name"),
                text_at(t, "/kind"),
                text_at(t, "/role"),
                match (
                    t.get("tenant").and_then(Value::as_str),
                    t.get("project").and_then(Value::as_str),
                ) {
                    (Some(tn), Some(p)) => format!("{tn}/{p}"),
                    (Some(tn), None) => tn.to_string(),
                    _ if t.get("kind").and_then(Value::as_str) == Some("api") => "cluster".into(),
                    _ => "-".into(),
                },
                when(t.get("expiresAt")).unwrap_or_else(|| "never".into()),
                t.get("usesRemaining")
                    .and_then(Value::as_i64)
                    .map_or("unlimited".into(), |n| n.to_string()),
                status.into(),
                when(t.get("createdAt")).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect()
}

fn check_id(id: &str) -> Result<(), CliError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "{id:?} is not a token ID; `clusterclaw token list` shows the IDs (letters, digits, '-' and '_')"
        )))
    }
}

pub async fn run(args: TokenArgs) -> CliResult {
    let settings = Settings::resolve(&args.client)?;
    let client = Client::new(&settings)?;
    match args.command {
        TokenCommand::Create(c) => {
            let kind = match c.kind {
                NewTokenKind::Join => "join",
                NewTokenKind::Api => "api",
            };
            let mut body = json!({ "kind": kind });
            if let Some(ttl) = c.ttl {
                body["ttl"] = json!(humantime::format_duration(ttl).to_string());
            }
            if let Some(uses) = c.uses {
                body["uses"] = json!(uses);
            }
            for (field, value) in [
                ("name", &c.name),
                ("role", &c.role),
                ("tenant", &args.client.tenant),
                ("project", &args.client.project),
            ] {
                if let Some(v) = value {
                    body[field] = json!(v);
                }
            }
            let answer: Value = client
                .json(Method::POST, "/api/v1/tokens", Some(&body))
                .await?;
            let secret = answer.get("token").and_then(Value::as_str).ok_or_else(|| {
                CliError::Failed(format!(
                    "the server at {} created a token but sent no secret",
                    client.server()
                ))
            })?;
            let expires = when(answer.get("expiresAt")).unwrap_or_else(|| "never".into());
            let uses = answer
                .get("usesRemaining")
                .and_then(Value::as_i64)
                .map_or("unlimited uses".into(), |n| format!("{n} use(s)"));
            let purpose = match c.kind {
                NewTokenKind::Join => "give it to clusterclaw-agent on the host that should enroll",
                NewTokenKind::Api => {
                    "use it with --token, CLUSTERCLAW_TOKEN or `clusterclaw login`"
                }
            };
            eprintln!(
                "{kind} token {} created: expires {expires}, {uses}. This is the only time its secret is shown; {purpose}.",
                text_at(&answer, "/id")
            );
            print_out(&format!("{secret}\n"))
        }
        TokenCommand::List(l) => {
            let answer = client.get("/api/v1/tokens").await?;
            let items = match answer {
                Value::Array(items) => items,
                Value::Object(mut m) => match m.remove("items") {
                    Some(Value::Array(items)) => items,
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            match l.output {
                ListFormat::Json => print_out(&output::to_json(&json!({ "items": items }))?),
                ListFormat::Yaml => print_out(&output::to_yaml(&json!({ "items": items }))?),
                ListFormat::Table => print_out(&table(
                    &[
                        "ID",
                        "NAME",
                        "KIND",
                        "ROLE",
                        "SCOPE",
                        "EXPIRES",
                        "USES LEFT",
                        "STATUS",
                        "CREATED",
                    ],
                    &token_rows(&items, SystemTime::now()),
                )),
            }
        }
        TokenCommand::Revoke { id } => {
            check_id(&id)?;
            client
                .send(Method::DELETE, &format!("/api/v1/tokens/{id}"), None)
                .await?;
            print_out(&format!("token {id} revoked\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_ttl("10s").unwrap_err().contains("at least 1m"));
        assert!(parse_ttl("soon").is_err());
    }

    #[test]
    fn token_rows_show_status_and_never_a_secret() {
        let now = humantime::parse_rfc3339("2026-07-10T12:00:00Z").unwrap();
        let items = vec![
            json!({"id": "t1", "name": "admin", "kind": "api", "role": "platform-admin", "createdAt": 1783684800u64, "revoked": false}),
            json!({"id": "t2", "name": "", "kind": "join", "role": "", "createdAt": 1783684800u64, "expiresAt": 1783688400u64, "usesRemaining": 2, "revoked": false}),
            json!({"id": "t3", "kind": "join", "expiresAt": "2026-07-10T11:00:00Z", "revoked": false}),
            json!({"id": "t4", "kind": "join", "usesRemaining": 0, "revoked": true}),
        ];
        let rows = token_rows(&items, now);
        assert_eq!(
            rows[0],
            [
                "t1",
                "admin",
                "api",
                "platform-admin",
                "cluster",
                "never",
                "unlimited",
                "active",
                "2026-07-10T12:00:00Z"
            ]
        );
        assert_eq!(rows[1][5..8], ["2026-07-10T13:00:00Z", "2", "active"]);
        assert_eq!(rows[2][7], "expired");
        assert_eq!(rows[3][7], "revoked");
        let scoped = json!({"id": "t5", "kind": "api", "role": "project-editor", "tenant": "acme", "project": "helpdesk"});
        assert_eq!(token_rows(&[scoped], now)[0][4], "acme/helpdesk");
    }

    #[test]
    fn dates_past_year_9999_print_as_seconds() {
        let far = 8000 * 31_557_600_u64 + 1_800_000_000;
        assert_eq!(
            when(Some(&json!(far))).unwrap(),
            format!("{far} (Unix seconds)")
        );
        assert_eq!(
            when(Some(&json!(u64::MAX))).unwrap(),
            format!("{} (Unix seconds)", u64::MAX)
        );
        let rows = token_rows(
            &[json!({"id": "t", "kind": "join", "expiresAt": far, "revoked": false})],
            SystemTime::now(),
        );
        assert_eq!(rows[0][7], "active");
    }

    #[test]
    fn token_ids_are_checked() {
        assert!(check_id("tok_01H8").is_ok());
        assert!(check_id("../x").is_err());
    }
}
