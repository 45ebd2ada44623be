//! `clusterclaw get events [-t T -p P] [--for instance/NAME] [-w]`, the events at the end of
//! `describe`, and `get KIND -w` (a list, then its changes as they come, through the API's
//! watch; a watch the server can no longer resume lists again).

use std::io::Write;
use std::time::SystemTime;

use serde_json::{Value, json};

use super::client::Client;
use super::output::{self, Format, age, str_at, text_at};
use super::{CliError, CliResult, print_out, stdout_error};

/// The API path of events in a scope, for one object when `for_` is given.
pub fn events_path(tenant: Option<&str>, project: Option<&str>, for_: Option<&str>) -> String {
    let base = match (tenant, project) {
        (Some(t), Some(p)) => format!("/api/v1/tenants/{t}/projects/{p}/events"),
        (Some(t), None) => format!("/api/v1/tenants/{t}/events"),
        _ => "/api/v1/events".to_string(),
    };
    match for_ {
        Some(f) => format!("{base}?for={f}"),
        None => base,
    }
}

/// `instance/bot-0`, `host/h1`: the object an event is about (its replica when it has one).
fn object(e: &Value) -> String {
    let kind = match str_at(e, "/involvedObject/kind") {
        "OpenClawInstance" => "instance",
        "Host" => "host",
        "Rollout" => "rollout",
        "Tenant" => "tenant",
        "Project" => "project",
        other => other,
    };
    let name = e
        .pointer("/involvedObject/replica")
        .and_then(Value::as_str)
        .unwrap_or_else(|| str_at(e, "/involvedObject/name"));
    format!("{kind}/{name}")
}

/// `5m`, or `5m (x3 over 20m)` for a folded event.
fn last_seen(e: &Value, now: SystemTime) -> String {
    let last = age(e.pointer("/lastTimestamp").and_then(Value::as_str), now);
    match e.get("count").and_then(Value::as_u64) {
        Some(n) if n > 1 => format!(
            "{last} (x{n} over {})",
            age(e.pointer("/firstTimestamp").and_then(Value::as_str), now)
        ),
        _ => last,
    }
}

/// The table of events: LAST SEEN, TYPE, REASON, OBJECT, SOURCE, MESSAGE.
pub fn rows(items: &[Value], now: SystemTime) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let header = vec!["LAST SEEN", "TYPE", "REASON", "OBJECT", "SOURCE", "MESSAGE"];
    let rows = items
        .iter()
        .map(|e| {
            vec![
                last_seen(e, now),
                text_at(e, "/type"),
                text_at(e, "/reason"),
                object(e),
                text_at(e, "/source"),
                str_at(e, "/message").to_string(),
            ]
        })
        .collect();
    (header, rows)
}

/// The `Events:` section `describe` ends with (the newest 20, oldest first).
pub fn describe_section(items: &[Value], now: SystemTime) -> String {
    if items.is_empty() {
        return "Events:  <none>\n".into();
    }
    let start = items.len().saturating_sub(20);
    let (header, rows) = rows(&items[start..], now);
    let table = output::table(&header, &rows);
    let mut out = String::from("Events:\n");
    for line in table.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The events of one object, for `describe` (none when the server keeps none).
pub async fn of_object(
    client: &Client,
    tenant: Option<&str>,
    project: Option<&str>,
    for_: &str,
) -> Vec<Value> {
    let path = format!("{}&limit=20", events_path(tenant, project, Some(for_)));
    match client.get(&path).await {
        Ok(mut list) => match list.get_mut("items").map(Value::take) {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        },
        Err(_) => Vec::new(),
    }
}

/// `get events`: the list, and with `watch` the events as they are written.
pub async fn get_events(
    client: &Client,
    tenant: Option<&str>,
    project: Option<&str>,
    for_: Option<&str>,
    format: Format,
    watch: bool,
) -> CliResult {
    let path = events_path(tenant, project, for_);
    let table = |items: &[Value], header: bool| {
        let (h, r) = rows(items, SystemTime::now());
        let text = output::table(&h, &r);
        if header {
            text
        } else {
            text.lines().skip(1).map(|l| format!("{l}\n")).collect()
        }
    };
    follow(client, &path, watch, |items, first| {
        if items.is_empty() {
            if first && !watch {
                eprintln!("No events found.");
            }
            return Ok(String::new());
        }
        Ok(match format {
            Format::Json if first && !watch => output::to_json(&json!({ "items": items }))?,
            Format::Yaml if first && !watch => output::to_yaml(&json!({ "items": items }))?,
            Format::Json | Format::Yaml => {
                items.iter().map(|i| format!("{i}\n")).collect::<String>()
            }
            Format::Table | Format::Wide => table(items, first),
        })
    })
    .await
}

/// What `get KIND -w` prints of `items`: one JSON line each (`-o json|yaml`), else the table
/// `rows` makes of them, with its header only the `first` time.
pub fn watch_text(
    format: Format,
    items: &[Value],
    first: bool,
    rows: impl FnOnce(&[Value], bool) -> (Vec<&'static str>, Vec<Vec<String>>),
) -> String {
    match format {
        Format::Json | Format::Yaml => items.iter().map(|i| format!("{i}\n")).collect(),
        Format::Table | Format::Wide => {
            let (header, rows) = rows(items, format == Format::Wide);
            let text = output::table(&header, &rows);
            if first {
                text
            } else {
                text.lines().skip(1).map(|l| format!("{l}\n")).collect()
            }
        }
    }
}

/// Lists `path`, prints it with `show(items, true)`, and with `watch` follows its changes,
/// printing each changed object with `show(&[object], false)`. A watch the server cannot
/// resume (410, or an `ERROR` line) lists again and prints that list with `show(items, false)`.
/// A list without a change log starts its watch with its current items (up to a bookmark
/// with `initialEventsEnd`): those the list already printed as they are are not printed again.
pub async fn follow(
    client: &Client,
    path: &str,
    watch: bool,
    mut show: impl FnMut(&[Value], bool) -> Result<String, CliError>,
) -> CliResult {
    let mut first = true;
    loop {
        let list = client.get(path).await?;
        let index = list.get("index").and_then(Value::as_u64).unwrap_or(0);
        let items = match list.get("items") {
            Some(Value::Array(items)) => items.clone(),
            _ => Vec::new(),
        };
        if first {
            print_out(&show(&items, true)?)?;
            first = false;
        } else {
            // Listed again after the server could not resume the watch: what changed
            // meanwhile is in this list, so print it rather than miss it.
            print_out(&show(&items, false)?)?;
        }
        if !watch {
            return Ok(());
        }
        let sep = if path.contains('?') { '&' } else { '?' };
        let watch_path = format!("{path}{sep}watch=true&resourceVersion={index}");
        let mut resp = match client.watch(&watch_path).await {
            Ok(r) => r,
            Err(CliError::Api(e)) if e.status == 410 => continue,
            Err(e) => return Err(e),
        };
        let mut buf: Vec<u8> = Vec::new();
        let mut relist = false;
        let mut listed = Some(items);
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| CliError::Failed(format!("the watch ended: {e}")))?
        {
            buf.extend_from_slice(&chunk);
            while let Some(n) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=n).collect();
                let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                match v.get("type").and_then(Value::as_str) {
                    Some("BOOKMARK") if v.get("initialEventsEnd").is_some() => listed = None,
                    Some("ADDED" | "MODIFIED" | "DELETED") => {
                        let mut obj = v.get("object").cloned().unwrap_or(Value::Null);
                        if v.get("type").and_then(Value::as_str) == Some("ADDED")
                            && listed.as_ref().is_some_and(|l| l.contains(&obj))
                        {
                            continue;
                        }
                        if v.get("type").and_then(Value::as_str) == Some("DELETED")
                            && let Value::Object(m) = &mut obj
                        {
                            m.insert("deleted".into(), Value::Bool(true));
                        }
                        let text = show(std::slice::from_ref(&obj), false)?;
                        let mut out = std::io::stdout().lock();
                        out.write_all(text.as_bytes()).map_err(stdout_error)?;
                        out.flush().map_err(stdout_error)?;
                    }
                    Some("ERROR") => {
                        relist = true;
                        break;
                    }
                    _ => {}
                }
            }
            if relist {
                break;
            }
        }
        if !relist {
            return Err(CliError::Failed(
                "the server ended the watch (it is shutting down?)".into(),
            ));
        }
    }
}
