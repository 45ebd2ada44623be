//! Output of `get` and friends: aligned tables, ages, and JSON/YAML documents.

use std::time::{Duration, SystemTime};

use clap::ValueEnum;
use serde_json::Value;

use super::CliError;

/// `-o` of `get`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns
    #[default]
    Table,
    /// Aligned columns with more of them
    Wide,
    /// One JSON object, or {"items":[...]} for a list
    Json,
    /// One YAML document, or items: [...] for a list
    Yaml,
}

/// Aligns rows into columns separated by three spaces; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 < widths.len() {
                s.push_str(cell);
                s.extend(std::iter::repeat_n(
                    ' ',
                    widths[i] - cell.chars().count() + 3,
                ));
            } else {
                s.push_str(cell);
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Age as kubectl shows it: `45s`, `12m`, `5h`, `3d`, `2y`.
pub fn age(created: Option<&str>, now: SystemTime) -> String {
    let Some(created) = created.and_then(|c| humantime::parse_rfc3339_weak(c).ok()) else {
        return "<unknown>".into();
    };
    let secs = now
        .duration_since(created)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s if s < 2 * 365 * 86400 => format!("{}d", s / 86400),
        s => format!("{}y", s / (365 * 86400)),
    }
}

/// A string at a JSON pointer, or `""`.
pub fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// A scalar at a JSON pointer as text (`"-"` when absent).
pub fn text_at(v: &Value, pointer: &str) -> String {
    match v.pointer(pointer) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// `k=v,k2=v2`, or `<none>`.
/// The keys of the mapping at `pointer`, joined by `sep`; `-` when there is none.
pub fn keys_at(v: &Value, pointer: &str, sep: &str) -> String {
    v.pointer(pointer).and_then(Value::as_object).map_or_else(
        || "-".to_string(),
        |m| m.keys().cloned().collect::<Vec<_>>().join(sep),
    )
}

pub fn labels(v: Option<&Value>) -> String {
    match v.and_then(Value::as_object) {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(","),
        _ => "<none>".into(),
    }
}

/// Formats a JSON value as YAML.
pub fn to_yaml(v: &Value) -> Result<String, CliError> {
    serde_saphyr::to_string(v)
        .map_err(|e| CliError::Failed(format!("cannot format the answer as YAML: {e}")))
}

/// Formats a JSON value as indented JSON with a final newline.
pub fn to_json(v: &Value) -> Result<String, CliError> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| CliError::Failed(format!("cannot format the answer as JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_on_the_widest_cell() {
        let t = table(
            &["NAME", "PHASE", "AGE"],
            &[
                vec!["support-bot".into(), "Running".into(), "5m".into()],
                vec!["a".into(), "Pending".into(), "12d".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME          PHASE     AGE\nsupport-bot   Running   5m\na             Pending   12d\n"
        );
    }

    #[test]
    fn ages() {
        let now = humantime::parse_rfc3339("2026-07-10T12:00:00Z").unwrap();
        assert_eq!(age(Some("2026-07-10T11:59:15Z"), now), "45s");
        assert_eq!(age(Some("2026-07-10T11:00:00Z"), now), "60m");
        assert_eq!(age(Some("2026-07-10T06:00:00Z"), now), "6h");
        assert_eq!(age(Some("2026-07-01T12:00:00Z"), now), "9d");
        assert_eq!(age(Some("2023-07-01T12:00:00Z"), now), "3y");
        assert_eq!(age(Some("2026-07-10T12:00:05.5Z"), now), "0s");
        assert_eq!(age(None, now), "<unknown>");
        assert_eq!(age(Some("yesterday"), now), "<unknown>");
    }

    #[test]
    fn scalars_and_labels() {
        let v = json!({"spec": {"replicas": 3, "version": "2026.7.1", "empty": ""}, "metadata": {"labels": {"a": "b", "c": "d"}}});
        assert_eq!(text_at(&v, "/spec/replicas"), "3");
        assert_eq!(text_at(&v, "/spec/version"), "2026.7.1");
        assert_eq!(text_at(&v, "/spec/empty"), "-");
        assert_eq!(text_at(&v, "/spec/missing"), "-");
        assert_eq!(labels(v.pointer("/metadata/labels")), "a=b,c=d");
        assert_eq!(labels(None), "<none>");
    }

    #[test]
    fn yaml_output_round_trips() {
        let v = json!({"items": [{"kind": "Tenant", "metadata": {"name": "acme"}}]});
        let y = to_yaml(&v).unwrap();
        let back: Value = serde_saphyr::from_str(&y).unwrap();
        assert_eq!(back, v);
    }
}
