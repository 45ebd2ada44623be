//! `clusterclaw audit list | verify [--db PATH]`: the audit log.

use std::path::PathBuf;
use std::time::SystemTime;

use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::client::{Client, with_query};
use super::output::{self, table};
use super::settings::{ClientOpts, Settings};
use super::{CliError, CliResult, print_out};
use crate::audit::{AuditRecord, AuditVerification, parse_since, verify_database};
use crate::store::StoreError;

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit records, oldest first: the newest ones, or those from --since or --after
    /// on. -t TENANT (or the configured tenant) keeps one tenant's records.
    List(ListArgs),
    /// Check the hash chain of the audit log; exits with 1 when a record is not intact
    Verify(VerifyArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    /// Aligned columns
    Table,
    /// {"items":[...]}, every field of every record
    Json,
}

fn check_since(s: &str) -> Result<String, String> {
    parse_since(s, SystemTime::now())?;
    Ok(s.trim().to_string())
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only records at or after this time: a duration back from now (30m, 1h, 7d) or an RFC
    /// 3339 time (2026-07-10T12:00:00Z)
    #[arg(long, value_parser = check_since, value_name = "DURATION|RFC3339")]
    pub since: Option<String>,
    /// Only records after this sequence number (page on from the last SEQ shown)
    #[arg(long, value_name = "SEQ")]
    pub after: Option<u64>,
    /// At most this many records, 1 to 1000
    #[arg(long, value_name = "N", default_value_t = 100,
        value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub limit: u64,
    /// Records of every tenant, ignoring -t and the configured tenant
    #[arg(short = 'A', long)]
    pub all_tenants: bool,
    /// Output format
    #[arg(short = 'o', long, value_enum, default_value_t = ListFormat::Table)]
    pub output: ListFormat,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Verify this database file (clusterclaw.db, or a copy of it) directly, without a
    /// server; the file is opened read-only
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
}

#[derive(Deserialize)]
struct List {
    items: Vec<AuditRecord>,
}

/// `1→2`, `-→1`, `3→-`, or `-` when neither is known.
fn generations(r: &AuditRecord) -> String {
    let g = |n: Option<i64>| n.map_or("-".to_string(), |n| n.to_string());
    match (r.entry.generation_before, r.entry.generation_after) {
        (None, None) => "-".into(),
        (before, after) => format!("{}→{}", g(before), g(after)),
    }
}

/// Rows of `audit list`.
pub fn audit_rows(records: &[AuditRecord]) -> Vec<Vec<String>> {
    let dash = |s: Option<&str>| s.filter(|s| !s.is_empty()).unwrap_or("-").to_string();
    records
        .iter()
        .map(|r| {
            let e = &r.entry;
            let principal = if e.principal.name.is_empty() {
                e.principal.id.clone()
            } else {
                format!("{} ({})", e.principal.id, e.principal.name)
            };
            vec![
                r.seq.to_string(),
                e.time.clone(),
                principal,
                dash(e.tenant.as_deref()),
                e.action.clone(),
                e.object.as_ref().map_or("-".into(), |o| o.to_string()),
                format!("{} {}", e.result.outcome.as_str(), e.result.status),
                generations(r),
                dash(Some(&e.source)),
                dash(e.result.reason.as_deref()),
            ]
        })
        .collect()
}

/// The one-line summary of an intact log.
fn intact(v: &AuditVerification) -> String {
    format!(
        "audit log intact: {} record{}, head {}\n",
        v.records,
        if v.records == 1 { "" } else { "s" },
        v.head
    )
}

/// Verifies a database file without a server.
fn verify_offline(path: &std::path::Path) -> CliResult {
    let v = verify_database(path).map_err(|e| {
        CliError::Failed(match e {
            StoreError::Backend(m) | StoreError::Corrupt(m) => m,
            other => other.to_string(),
        })
    })?;
    match v.problem() {
        None => print_out(&intact(&v)),
        Some(problem) => Err(CliError::Failed(format!(
            "{}: the audit log is not intact: {problem}",
            path.display()
        ))),
    }
}

pub async fn run(args: AuditArgs) -> CliResult {
    if let AuditCommand::Verify(VerifyArgs { db: Some(path) }) = &args.command {
        return verify_offline(path);
    }
    let settings = Settings::resolve(&args.client)?;
    let client = Client::new(&settings)?;
    match args.command {
        AuditCommand::Verify(_) => {
            // A broken chain is a 409 whose body the client reports as an error (exit 1).
            let v: Value = client
                .json(Method::GET, "/api/v1/audit/verify", None)
                .await?;
            let records = v.get("records").and_then(Value::as_u64);
            let head = v.get("head").and_then(Value::as_str);
            match (v.get("ok").and_then(Value::as_bool), records, head) {
                (Some(true), Some(records), Some(head)) => print_out(&intact(&AuditVerification {
                    records,
                    head: head.to_string(),
                    broken: None,
                })),
                _ => Err(CliError::Failed(format!(
                    "the server at {} sent a verification this clusterclaw cannot read: {v}",
                    client.server()
                ))),
            }
        }
        AuditCommand::List(l) => {
            let tenant = if l.all_tenants {
                None
            } else {
                settings.tenant.as_deref()
            };
            let limit = l.limit.to_string();
            let after = l.after.map(|a| a.to_string());
            let path = with_query(
                "/api/v1/audit",
                &[
                    ("tenant", tenant),
                    ("since", l.since.as_deref()),
                    ("after", after.as_deref()),
                    ("limit", Some(&limit)),
                ],
            );
            match l.output {
                ListFormat::Json => {
                    let answer = client.get(&path).await?;
                    let items = answer.get("items").cloned().unwrap_or(json!([]));
                    print_out(&output::to_json(&json!({ "items": items }))?)
                }
                ListFormat::Table => {
                    let list: List = client.json(Method::GET, &path, None).await?;
                    if list.items.is_empty() {
                        let scope = tenant.map_or(String::new(), |t| format!(" for tenant {t}"));
                        eprintln!("No audit records found{scope}.");
                        return Ok(());
                    }
                    print_out(&table(
                        &[
                            "SEQ",
                            "TIME",
                            "PRINCIPAL",
                            "TENANT",
                            "ACTION",
                            "OBJECT",
                            "RESULT",
                            "GENERATION",
                            "SOURCE",
                            "REASON",
                        ],
                        &audit_rows(&list.items),
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::fixtures::entry;
    use crate::audit::{AuditObject, AuditResult, GENESIS_HASH};
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn record(seq: u64, entry: crate::audit::AuditEntry) -> AuditRecord {
        AuditRecord {
            seq,
            entry,
            chain_version: 1,
            prev_hash: GENESIS_HASH.into(),
            hash: "ab".repeat(32),
        }
    }

    #[test]
    fn rows_show_who_did_what_to_which_object() {
        let mut denied = entry(2);
        denied.principal = crate::audit::AuditPrincipal::anonymous();
        denied.tenant = None;
        denied.object = None;
        denied.result = AuditResult::denied(401, "no token");
        denied.generation_before = None;
        denied.generation_after = None;
        let mut created = entry(3);
        created.object = Some(AuditObject::token("tok_9"));
        created.generation_before = None;
        let rows = audit_rows(&[record(1, entry(1)), record(2, denied), record(3, created)]);
        assert_eq!(
            rows[0],
            [
                "1",
                "2026-07-10T12:00:01.001Z",
                "tok_admin (admin)",
                "acme",
                "apply",
                "openclawinstance/acme/helpdesk/bot-1",
                "ok 200",
                "1→2",
                "127.0.0.1:50000",
                "-"
            ]
        );
        assert_eq!(
            rows[1][2..8],
            ["anonymous", "-", "apply", "-", "denied 401", "-"]
        );
        assert_eq!(rows[1][9], "no token");
        assert_eq!(rows[2][5..8], ["token/tok_9", "ok 200", "-→4"]);
    }

    #[test]
    fn arguments_parse_and_bad_values_are_usage_errors() {
        let cli = Cli::try_parse_from([
            "clusterclaw",
            "audit",
            "list",
            "-t",
            "acme",
            "--since",
            "1h",
            "--limit",
            "20",
            "-o",
            "json",
        ])
        .unwrap();
        let Command::Audit(args) = cli.command else {
            panic!("not the audit command")
        };
        assert_eq!(args.client.tenant.as_deref(), Some("acme"));
        let AuditCommand::List(l) = args.command else {
            panic!("not list")
        };
        assert_eq!(
            (l.since.as_deref(), l.limit, l.output),
            (Some("1h"), 20, ListFormat::Json)
        );
        for bad in [
            vec!["clusterclaw", "audit", "list", "--since", "soon"],
            vec!["clusterclaw", "audit", "list", "--limit", "0"],
            vec!["clusterclaw", "audit", "list", "--limit", "1001"],
            vec!["clusterclaw", "audit", "list", "-o", "yaml"],
        ] {
            let e = Cli::try_parse_from(&bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        let cli =
            Cli::try_parse_from(["clusterclaw", "audit", "verify", "--db", "/tmp/c.db"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Audit(AuditArgs {
                command: AuditCommand::Verify(VerifyArgs { db: Some(_) }),
                ..
            })
        ));
    }

    #[tokio::test]
    async fn offline_verification_needs_no_server_and_fails_on_tampering() {
        use crate::store::Store;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clusterclaw.db");
        {
            let store = crate::store::sqlite::SqliteStore::open(&path).unwrap();
            store.append_audit(&[entry(1), entry(2), entry(3)]).unwrap();
        }
        let verify = || {
            run(AuditArgs {
                command: AuditCommand::Verify(VerifyArgs {
                    db: Some(path.clone()),
                }),
                // No server, no token: not needed.
                client: ClientOpts {
                    server: Some("http://127.0.0.1:9".into()),
                    ..ClientOpts::default()
                },
            })
        };
        verify().await.unwrap();
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TRIGGER audit_no_update; UPDATE audit SET source = '10.0.0.1:1' WHERE seq = 2")
            .unwrap();
        let e = verify().await.unwrap_err();
        assert_eq!(e.exit_code(), 1);
        let text = e.to_string();
        assert!(
            text.contains("record 2") && text.contains("the record before it is intact"),
            "{text}"
        );
        assert!(text.contains(&path.display().to_string()), "{text}");
    }
}
