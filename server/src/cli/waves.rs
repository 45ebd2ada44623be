//! How `get rollouts` and `describe rollout` show fleet-wide Rollouts.

use std::fmt::Write as _;
use std::time::SystemTime;

use serde_json::Value;

use super::output::{age, str_at, text_at};

const KEY_WIDTH: usize = 24;

fn count(o: &Value, state: &str) -> u64 {
    o.pointer(&format!("/status/counts/{state}"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// What a Rollout changes: `configtemplate/default`, `version 2026.8.1`, `image ...`.
fn change(o: &Value) -> String {
    if let Some(c) = o.pointer("/spec/change").and_then(Value::as_str) {
        return c.to_string();
    }
    match (
        o.pointer("/spec/version").and_then(Value::as_str),
        o.pointer("/spec/image").and_then(Value::as_str),
    ) {
        (_, Some(i)) => format!("image {i}"),
        (Some(v), None) => format!("version {v}"),
        (None, None) => "-".into(),
    }
}

/// The wave column: `2/3` (the wave in progress, of how many).
fn wave(o: &Value) -> String {
    let waves = o
        .pointer("/status/waves")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let current = o
        .pointer("/status/wave")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if waves == 0 {
        return "-".into();
    }
    format!("{}/{waves}", (current + 1).min(waves))
}

/// The columns of `get rollouts`.
pub fn table(items: &[Value], now: SystemTime) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let header = vec![
        "NAME",
        "TENANT",
        "CHANGE",
        "PHASE",
        "WAVE",
        "SUCCEEDED",
        "HELD",
        "FAILED",
        "AGE",
    ];
    let rows = items
        .iter()
        .map(|o| {
            let total: u64 = o
                .pointer("/status/counts")
                .and_then(Value::as_object)
                .map_or(0, |c| c.values().filter_map(Value::as_u64).sum());
            let phase = o
                .pointer("/status/phase")
                .and_then(Value::as_str)
                .unwrap_or("Pending");
            vec![
                str_at(o, "/metadata/name").to_string(),
                text_at(o, "/metadata/tenant"),
                change(o),
                phase.to_string(),
                wave(o),
                format!("{}/{total}", count(o, "succeeded")),
                count(o, "held").to_string(),
                count(o, "failed").to_string(),
                age(
                    o.pointer("/metadata/createdAt").and_then(Value::as_str),
                    now,
                ),
            ]
        })
        .collect();
    (header, rows)
}

fn field(out: &mut String, indent: usize, key: &str, value: impl AsRef<str>) {
    let key = format!("{key}:");
    let pad = KEY_WIDTH.saturating_sub(indent).max(key.len() + 1);
    let _ = writeln!(out, "{:indent$}{key:<pad$}{}", "", value.as_ref());
}

/// The body of `describe rollout NAME` (after the common header).
pub fn describe(out: &mut String, v: &Value) {
    field(out, 0, "Change", change(v));
    if let Some(sel) = v.pointer("/spec/selector") {
        field(out, 0, "Selector", sel.to_string());
    }
    let waves = v
        .pointer("/spec/waves")
        .map_or_else(|| "[1, 10%, 50%, 100%] (default)".into(), Value::to_string);
    field(out, 0, "Waves", waves);
    field(
        out,
        0,
        "Bake time",
        v.pointer("/spec/bakeTime")
            .and_then(Value::as_str)
            .unwrap_or("1m (default)"),
    );
    if v.pointer("/spec/paused").and_then(Value::as_bool) == Some(true) {
        field(out, 0, "Paused", "yes (no further wave starts)");
    }
    let phase = v
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending");
    field(out, 0, "Phase", phase);
    field(out, 0, "Wave", wave(v));
    if let Some(m) = v.pointer("/status/message").and_then(Value::as_str) {
        field(out, 0, "Message", m);
    }
    if let Some(f) = v.pointer("/status/failedInstance").and_then(Value::as_str) {
        field(out, 0, "Failed instance", f);
    }
    let counts = [
        "held",
        "progressing",
        "succeeded",
        "failed",
        "superseded",
        "gone",
    ]
    .iter()
    .filter_map(|s| {
        let n = count(v, s);
        (n > 0).then(|| format!("{n} {s}"))
    })
    .collect::<Vec<_>>();
    field(
        out,
        0,
        "Instances",
        if counts.is_empty() {
            "-".into()
        } else {
            counts.join(", ")
        },
    );
    let Some(items) = v.pointer("/status/instances").and_then(Value::as_array) else {
        return;
    };
    let _ = writeln!(
        out,
        "  {:<5} {:<48} {:<12} {:<9} MESSAGE",
        "WAVE", "INSTANCE", "STATE", "REVISION"
    );
    for i in items {
        let name = format!(
            "{}/{}/{}",
            str_at(i, "/tenant"),
            str_at(i, "/project"),
            str_at(i, "/name")
        );
        let wave = i.pointer("/wave").and_then(Value::as_u64).unwrap_or(0) + 1;
        let rev = i
            .pointer("/revision")
            .and_then(Value::as_u64)
            .map_or("-".into(), |r| r.to_string());
        let _ = writeln!(
            out,
            "  {wave:<5} {name:<48} {:<12} {rev:<9} {}",
            str_at(i, "/state"),
            str_at(i, "/message")
        );
    }
}
