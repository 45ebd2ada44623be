//! `clusterclaw get servers`: the control plane's server replicas and which one leads.

use std::time::SystemTime;

use serde_json::{Value, json};

use super::client::Client;
use super::output::{self, Format, age, text_at};
use super::{CliResult, print_out};

/// The table of `get servers`: ID, STATUS, LEADER (`*` for the leader), EPOCH, API, AGENT,
/// VERSION, AGE (since it started), LAST SEEN; wide adds the host name and whether it reaches
/// the store. The replica that answered is marked `(this)`.
pub fn rows(items: &[Value], wide: bool, now: SystemTime) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let mut header = vec![
        "ID",
        "STATUS",
        "LEADER",
        "EPOCH",
        "API",
        "AGENT",
        "VERSION",
        "AGE",
        "LAST SEEN",
    ];
    if wide {
        header.extend(["HOSTNAME", "STORE"]);
    }
    let rows = items
        .iter()
        .map(|v| {
            let this = v.get("self").and_then(Value::as_bool) == Some(true);
            let id = text_at(v, "/id");
            let mut row = vec![
                if this { format!("{id} (this)") } else { id },
                text_at(v, "/status"),
                if v.get("leading").and_then(Value::as_bool) == Some(true) {
                    "*".into()
                } else {
                    String::new()
                },
                text_at(v, "/epoch"),
                text_at(v, "/api"),
                text_at(v, "/agent"),
                text_at(v, "/version"),
                age(v.get("startedAt").and_then(Value::as_str), now),
                match v.get("lastSeen").and_then(Value::as_str) {
                    Some(t) => format!("{} ago", age(Some(t), now)),
                    None => "never".into(),
                },
            ];
            if wide {
                row.push(text_at(v, "/hostname"));
                row.push(
                    match v.get("storeReachable").and_then(Value::as_bool) {
                        Some(true) => "reachable",
                        _ => "unreachable",
                    }
                    .into(),
                );
            }
            row
        })
        .collect();
    (header, rows)
}

/// `get servers`.
pub async fn get_servers(client: &Client, format: Format) -> CliResult {
    let mut list = client.get("/api/v1/servers").await?;
    let message = list
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string);
    let items = match list.get_mut("items").map(Value::take) {
        Some(Value::Array(items)) => items,
        _ => Vec::new(),
    };
    if let Some(m) = &message {
        eprintln!("warning: {m}");
    }
    match format {
        Format::Json => print_out(&output::to_json(&json!({ "items": items }))?),
        Format::Yaml => print_out(&output::to_yaml(&json!({ "items": items }))?),
        Format::Table | Format::Wide => {
            if items.is_empty() {
                eprintln!("No server replicas found.");
                return Ok(());
            }
            let (header, rows) = rows(&items, format == Format::Wide, SystemTime::now());
            print_out(&output::table(&header, &rows))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_the_answering_replica_and_stale_ones_show() {
        let now = humantime::parse_rfc3339("2026-12-04T10:00:00Z").unwrap();
        let items = vec![
            json!({"id": "a-1", "status": "Ready", "leading": true, "epoch": 4,
                "api": "http://10.0.0.1:7080", "agent": "10.0.0.1:7443", "version": "0.1.0",
                "startedAt": "2026-12-04T09:00:00Z", "lastSeen": "2026-12-04T09:59:58Z",
                "hostname": "cp1", "storeReachable": true, "self": true}),
            json!({"id": "b-2", "status": "Stale", "leading": false, "epoch": 3,
                "api": "http://10.0.0.2:7080", "agent": "10.0.0.2:7443", "version": "0.1.0",
                "startedAt": "2026-12-04T08:00:00Z", "lastSeen": "2026-12-04T09:58:00Z",
                "hostname": "cp2", "storeReachable": false, "self": false}),
        ];
        let (header, rows) = rows(&items, true, now);
        let text = output::table(&header, &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID"), "{text}");
        assert!(
            lines[1].contains("a-1 (this)") && lines[1].contains(" * "),
            "{text}"
        );
        assert!(
            lines[1].contains("2s ago") && lines[1].contains("reachable"),
            "{text}"
        );
        assert!(
            lines[2].contains("Stale") && lines[2].contains("unreachable"),
            "{text}"
        );
        assert!(lines[2].contains("2m ago"), "{text}");
    }
}
