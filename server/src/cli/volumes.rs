//! `clusterclaw get volumes [--host H]`, `delete volume HOST/NAME`, and the volumes section of
//! `describe host`.

use std::time::SystemTime;

use reqwest::Method;
use serde_json::{Value, json};

use super::client::Client;
use super::output::{self, Format, age, str_at, text_at};
use super::{CliError, CliResult, print_out};

/// `/api/v1/volumes`, of one host or of all.
fn list_path(host: Option<&str>) -> String {
    match host {
        Some(h) => format!("/api/v1/volumes?host={h}"),
        None => "/api/v1/volumes".into(),
    }
}

fn items(list: Value) -> Vec<Value> {
    match list {
        Value::Object(mut m) => match m.remove("items") {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The table of `get volumes`: HOST, NAME, TENANT/PROJECT/INSTANCE, REPLICA, STATUS, AGE
/// (since the server first saw it); wide adds why it has that status.
pub fn rows(items: &[Value], wide: bool, now: SystemTime) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let mut header = vec![
        "HOST",
        "NAME",
        "TENANT/PROJECT/INSTANCE",
        "REPLICA",
        "STATUS",
        "AGE",
    ];
    if wide {
        header.push("MESSAGE");
    }
    let rows = items
        .iter()
        .map(|v| {
            let mut row = vec![
                text_at(v, "/host"),
                text_at(v, "/name"),
                format!(
                    "{}/{}/{}",
                    str_at(v, "/tenant"),
                    str_at(v, "/project"),
                    str_at(v, "/instance")
                ),
                text_at(v, "/replica"),
                if v.get("deleted") == Some(&Value::Bool(true)) {
                    "Removed".to_string()
                } else {
                    text_at(v, "/status")
                },
                age(v.get("firstSeen").and_then(Value::as_str), now),
            ];
            if wide {
                row.push(text_at(v, "/message"));
            }
            row
        })
        .collect();
    (header, rows)
}

/// `get volumes`, and with `watch` the changes as they come (a removed volume's row says
/// `Removed`).
pub async fn get_volumes(
    client: &Client,
    host: Option<&str>,
    format: Format,
    watch: bool,
) -> CliResult {
    if let Some(h) = host {
        crate::model::validate_dns_label(h)
            .map_err(|e| CliError::Failed(format!("--host: {e}")))?;
    }
    if watch {
        return super::events::follow(client, &list_path(host), true, |items, first| {
            Ok(super::events::watch_text(
                format,
                items,
                first,
                |items, wide| rows(items, wide, SystemTime::now()),
            ))
        })
        .await;
    }
    let list = client.get(&list_path(host)).await?;
    let items = items(list);
    match format {
        Format::Json => print_out(&output::to_json(&json!({ "items": items }))?),
        Format::Yaml => print_out(&output::to_yaml(&json!({ "items": items }))?),
        Format::Table | Format::Wide => {
            if items.is_empty() {
                match host {
                    Some(h) => eprintln!("No state volumes found on host {h}."),
                    None => eprintln!("No state volumes found."),
                }
                return Ok(());
            }
            let (header, rows) = rows(&items, format == Format::Wide, SystemTime::now());
            print_out(&output::table(&header, &rows))
        }
    }
}

/// `delete volume HOST/NAME`.
pub async fn delete_volume(client: &Client, target: &str, ignore_not_found: bool) -> CliResult {
    let Some((host, name)) = target
        .split_once('/')
        .filter(|(h, n)| !h.is_empty() && !n.is_empty())
    else {
        return Err(CliError::Failed(format!(
            "{target:?}: a volume is named HOST/NAME, as `clusterclaw get volumes` shows it"
        )));
    };
    let path = format!("/api/v1/hosts/{host}/volumes/{name}");
    match client.send(Method::DELETE, &path, None).await {
        Ok(_) => print_out(&format!(
            "volume {host}/{name} deleted (host {host} removes it)\n"
        )),
        Err(CliError::Api(e)) if e.status == 404 && ignore_not_found => Ok(()),
        Err(e) => Err(e),
    }
}

/// The `Volumes:` section of `describe host`.
pub fn describe_section(items: &[Value], now: SystemTime) -> String {
    if items.is_empty() {
        return "Volumes:                <none>\n".into();
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|v| {
            vec![
                text_at(v, "/name"),
                format!(
                    "{}/{}/{}",
                    str_at(v, "/tenant"),
                    str_at(v, "/project"),
                    str_at(v, "/instance")
                ),
                text_at(v, "/replica"),
                if v.get("deleted") == Some(&Value::Bool(true)) {
                    "Removed".to_string()
                } else {
                    text_at(v, "/status")
                },
                age(v.get("firstSeen").and_then(Value::as_str), now),
            ]
        })
        .collect();
    let table = output::table(
        &[
            "NAME",
            "TENANT/PROJECT/INSTANCE",
            "REPLICA",
            "STATUS",
            "AGE",
        ],
        &rows,
    );
    let mut out = String::from("Volumes:\n");
    for line in table.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The volumes of `host`, for `describe host` (none when the list cannot be read).
pub async fn of_host(client: &Client, host: &str) -> Vec<Value> {
    client
        .get(&list_path(Some(host)))
        .await
        .map(items)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-07-10T12:00:00Z").unwrap()
    }

    fn volume(status: &str) -> Value {
        json!({"host": "h1", "name": "cc-abc-acme-helpdesk-bot-0-state", "tenant": "acme",
               "project": "helpdesk", "instance": "bot", "replica": "bot-0", "status": status,
               "message": "instance acme/helpdesk/bot does not exist",
               "firstSeen": "2026-07-10T11:00:00Z"})
    }

    #[test]
    fn volume_rows_and_the_host_section() {
        let (header, rows) = rows(&[volume("Orphaned")], true, now());
        assert_eq!(header[4], "STATUS");
        assert_eq!(
            rows[0],
            [
                "h1",
                "cc-abc-acme-helpdesk-bot-0-state",
                "acme/helpdesk/bot",
                "bot-0",
                "Orphaned",
                "60m",
                "instance acme/helpdesk/bot does not exist"
            ]
        );
        let text = describe_section(&[volume("InUse")], now());
        assert!(text.starts_with("Volumes:\n  NAME"), "{text}");
        assert!(
            text.contains(
                "  cc-abc-acme-helpdesk-bot-0-state   acme/helpdesk/bot         bot-0     InUse"
            ),
            "{text}"
        );
        assert_eq!(
            describe_section(&[], now()),
            "Volumes:                <none>\n"
        );
    }
}
