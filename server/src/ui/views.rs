//! What the console's pages show, made from the store's objects and the API's answers:
//! plain rows for the templates, with the small formatting they need.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::model::ObjectKey;
use crate::model::{format_cpu, format_memory, parse_cpu, parse_memory};
use crate::store::StoredObject;

/// Percent-encodes `s` for a URL's query or path segment.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The text at `path` (`"status.phase"`) of `v`, or `""`.
pub fn text(v: &Value, path: &str) -> String {
    let mut cur = v;
    for part in path.split('.') {
        cur = &cur[part];
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The number at `path` of `v`, or 0.
pub fn num(v: &Value, path: &str) -> i64 {
    let mut cur = v;
    for part in path.split('.') {
        cur = &cur[part];
    }
    cur.as_i64().unwrap_or_default()
}

/// One usage bar: `used` of `limit` (none: no limit).
#[derive(Clone, Debug)]
pub struct Bar {
    pub label: &'static str,
    pub used: String,
    pub limit: Option<String>,
    /// 0 to 100, for the bar's width and its `<meter>`.
    pub percent: u64,
}

impl Bar {
    fn new(
        label: &'static str,
        used: f64,
        limit: Option<f64>,
        show: impl Fn(f64) -> String,
    ) -> Bar {
        let percent = match limit {
            Some(l) if l > 0.0 => ((used / l) * 100.0).clamp(0.0, 100.0) as u64,
            Some(_) => 100,
            None => 0,
        };
        Bar {
            label,
            used: show(used),
            limit: limit.map(&show),
            percent,
        }
    }
}

/// The usage bars of a tenant or project: `status.usage` against `spec.quota`.
pub fn quota_bars(o: &Value) -> Vec<Bar> {
    let usage = &o["status"]["usage"];
    let quota = &o["spec"]["quota"];
    let cpu = |v: &Value| v.as_str().and_then(|s| parse_cpu(s).ok()).map(|m| m as f64);
    let mem = |v: &Value| {
        v.as_str()
            .and_then(|s| parse_memory(s).ok())
            .map(|m| m as f64)
    };
    let count = |v: &Value| v.as_i64().map(|n| n as f64);
    vec![
        Bar::new(
            "instances",
            count(&usage["instances"]).unwrap_or_default(),
            count(&quota["instances"]),
            |n| format!("{n:.0}"),
        ),
        Bar::new(
            "replicas",
            count(&usage["replicas"]).unwrap_or_default(),
            count(&quota["replicas"]),
            |n| format!("{n:.0}"),
        ),
        Bar::new(
            "CPU",
            cpu(&usage["cpu"]).unwrap_or_default(),
            cpu(&quota["cpu"]),
            |n| format_cpu(n as u64),
        ),
        Bar::new(
            "memory",
            mem(&usage["memory"]).unwrap_or_default(),
            mem(&quota["memory"]),
            |n| format_memory(n as u64),
        ),
    ]
}

/// An instance as the lists show it, read from its stored JSON without the rest of it.
#[derive(Clone, Debug)]
pub struct InstanceRow {
    pub tenant: String,
    pub project: String,
    pub name: String,
    pub phase: String,
    pub replicas: i64,
    pub ready: i64,
    pub version: String,
    pub labels: String,
    /// The update in progress: `(phase, revision)`.
    pub rollout: Option<(String, u64)>,
}

impl InstanceRow {
    /// `tenant/project/name`: the row's id on the page and in the watch's objects.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.tenant, self.project, self.name)
    }

    pub fn href(&self) -> String {
        instance_href(&self.tenant, &self.project, &self.name)
    }
}

/// The console path of an instance's page.
pub fn instance_href(tenant: &str, project: &str, name: &str) -> String {
    format!("/ui/tenants/{tenant}/projects/{project}/instances/{name}")
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LightSpec {
    #[serde(default)]
    replicas: i64,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    image: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LightRollout {
    #[serde(default)]
    phase: Option<String>,
    #[serde(default)]
    revision: u64,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LightStatus {
    #[serde(default)]
    phase: Option<String>,
    #[serde(default)]
    ready_replicas: i64,
    #[serde(default)]
    rollout: Option<LightRollout>,
}

#[derive(Deserialize)]
struct Light {
    #[serde(default)]
    spec: LightSpec,
    #[serde(default)]
    status: Option<LightStatus>,
}

/// The row of a stored instance; `None` when its JSON does not decode.
pub fn instance_row(o: &StoredObject) -> Option<InstanceRow> {
    instance_row_of(&o.key, &o.labels, &o.json)
}

/// The row of an instance from its key, labels and stored JSON; `None` when the JSON does not
/// decode.
pub fn instance_row_of(
    key: &ObjectKey,
    labels: &BTreeMap<String, String>,
    json: &str,
) -> Option<InstanceRow> {
    let l: Light = serde_json::from_str(json).ok()?;
    let status = l.status.unwrap_or_default();
    let rollout = status.rollout.and_then(|r| {
        let phase = r.phase.unwrap_or_else(|| "Progressing".into());
        matches!(phase.as_str(), "Progressing" | "Paused").then_some((phase, r.revision))
    });
    Some(InstanceRow {
        tenant: key.tenant.clone(),
        project: key.project.clone(),
        name: key.name.clone(),
        phase: status.phase.unwrap_or_else(|| "Pending".into()),
        replicas: l.spec.replicas,
        ready: status.ready_replicas,
        version: l.spec.version.or(l.spec.image).unwrap_or_default(),
        labels: labels_text(labels),
        rollout,
    })
}

/// `k=v, k=v`.
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An event as the pages show it.
#[derive(Clone, Debug)]
pub struct EventRow {
    pub time: String,
    pub type_: String,
    pub object: String,
    pub reason: String,
    pub message: String,
    pub count: i64,
}

impl EventRow {
    pub fn of(e: &Value) -> EventRow {
        let o = &e["involvedObject"];
        let object = [
            text(o, "kind"),
            text(o, "tenant"),
            text(o, "project"),
            text(o, "name"),
            text(o, "replica"),
        ]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/");
        EventRow {
            time: text(e, "lastTimestamp"),
            type_: text(e, "type"),
            object,
            reason: text(e, "reason"),
            message: text(e, "message"),
            count: num(e, "count"),
        }
    }
}

/// A host as the hosts page shows it.
#[derive(Clone, Debug)]
pub struct HostRow {
    pub name: String,
    pub phase: String,
    pub cordoned: bool,
    pub message: String,
    pub cpu: Bar,
    pub memory: Bar,
    pub replicas: i64,
    pub usage: String,
    pub drain: String,
}

impl HostRow {
    pub fn of(h: &Value) -> HostRow {
        let cap = &h["spec"]["capacity"];
        let alloc = &h["status"]["allocated"];
        let cpu_cap = cap["cpu"].as_str().and_then(|s| parse_cpu(s).ok());
        let mem_cap = cap["memory"].as_str().and_then(|s| parse_memory(s).ok());
        let usage = match &h["status"]["usage"] {
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::Number(n) if k.ends_with("Bytes") => {
                        format!("{k} {}", format_memory(n.as_u64().unwrap_or_default()))
                    }
                    Value::Number(n) if k.ends_with("Percent") => format!("{k} {n}%"),
                    Value::String(s) => format!("{k} {s}"),
                    other => format!("{k} {other}"),
                })
                .collect::<Vec<_>>()
                .join(", "),
            _ => String::new(),
        };
        let drain = &h["status"]["drain"];
        HostRow {
            name: text(h, "metadata.name"),
            phase: text(h, "status.phase"),
            cordoned: h["spec"]["unschedulable"].as_bool().unwrap_or(false),
            message: text(h, "status.message"),
            cpu: Bar::new(
                "CPU",
                alloc["cpuMillis"].as_u64().unwrap_or_default() as f64,
                cpu_cap.map(|c| c as f64),
                |n| format_cpu(n as u64),
            ),
            memory: Bar::new(
                "memory",
                alloc["memoryBytes"].as_u64().unwrap_or_default() as f64,
                mem_cap.map(|c| c as f64),
                |n| format_memory(n as u64),
            ),
            replicas: num(h, "status.allocated.replicas"),
            usage,
            drain: if drain.is_null() {
                String::new()
            } else {
                format!("{} {}", text(drain, "phase"), text(drain, "message"))
                    .trim()
                    .to_string()
            },
        }
    }
}

/// A replica as the instance page shows it.
#[derive(Clone, Debug)]
pub struct ReplicaRow {
    pub name: String,
    pub host: String,
    pub port: String,
    pub state: String,
    pub restarts: i64,
    pub revision: String,
    pub message: String,
}

impl ReplicaRow {
    pub fn of(r: &Value) -> ReplicaRow {
        ReplicaRow {
            name: text(r, "name"),
            host: text(r, "host"),
            port: text(r, "hostPort"),
            state: text(r, "state"),
            restarts: num(r, "restarts"),
            revision: text(r, "configRevision"),
            message: text(r, "message"),
        }
    }
}

/// An audit record as the audit page shows it.
#[derive(Clone, Debug)]
pub struct AuditRow {
    pub seq: String,
    pub time: String,
    pub who: String,
    pub action: String,
    pub object: String,
    pub result: String,
}

impl AuditRow {
    pub fn of(r: &Value) -> AuditRow {
        let o = &r["object"];
        let object = [
            text(o, "kind"),
            text(o, "tenant"),
            text(o, "project"),
            text(o, "name"),
        ]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/");
        let result = &r["result"];
        AuditRow {
            seq: text(r, "seq"),
            time: text(r, "time"),
            who: {
                let p = &r["principal"];
                let name = text(p, "name");
                if name.is_empty() { text(p, "id") } else { name }
            },
            action: text(r, "action"),
            object,
            result: format!(
                "{} {} {}",
                text(result, "outcome"),
                text(result, "status"),
                text(result, "reason")
            )
            .trim()
            .to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bars_follow_quotas() {
        let t = json!({"spec": {"quota": {"instances": 10, "cpu": "4"}},
            "status": {"usage": {"instances": 5, "replicas": 7, "cpu": "1", "memory": "1Gi"}}});
        let bars = quota_bars(&t);
        assert_eq!(bars[0].percent, 50);
        assert_eq!(bars[0].limit.as_deref(), Some("10"));
        assert_eq!(bars[1].limit, None);
        assert_eq!(bars[2].percent, 25);
        assert_eq!(bars[3].used, "1Gi");
    }

    #[test]
    fn urls_are_encoded() {
        assert_eq!(url_encode("/ui/x?a=b c"), "/ui/x%3Fa%3Db%20c");
    }
}
