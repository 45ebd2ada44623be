//! `clusterclaw describe KIND NAME`: one object for people: spec, status, replicas, conditions.

use std::fmt::Write as _;
use std::time::SystemTime;

use clap::Args;
use serde_json::Value;

use super::client::Client;
use super::output::{age, keys_at, labels, str_at, table, text_at};
use super::resolve::{self, kind_arg_help, list_path, parse_kind};
use super::settings::{ClientOpts, Settings};
use super::{CliResult, print_out};
use crate::model::{DEFAULT_IMAGE_REPOSITORY, Kind, ObjectKey, format_cpu, format_memory};

#[derive(Args, Debug)]
pub struct DescribeArgs {
    #[arg(value_parser = parse_kind, help = kind_arg_help(), value_name = "KIND")]
    pub kind: Kind,
    pub name: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

const KEY_WIDTH: usize = 24;

struct Out {
    text: String,
}

impl Out {
    fn field(&mut self, indent: usize, key: &str, value: impl AsRef<str>) {
        let key = format!("{key}:");
        let pad = KEY_WIDTH.saturating_sub(indent).max(key.len() + 1);
        let _ = writeln!(self.text, "{:indent$}{key:<pad$}{}", "", value.as_ref());
    }

    fn heading(&mut self, indent: usize, title: &str) {
        let _ = writeln!(self.text, "{:indent$}{title}:", "");
    }

    fn block(&mut self, indent: usize, body: &str) {
        for line in body.lines() {
            let _ = writeln!(self.text, "{:indent$}{line}", "");
        }
    }
}

fn created(v: &Value, now: SystemTime) -> String {
    match v.pointer("/metadata/createdAt").and_then(Value::as_str) {
        Some(t) => format!("{t} ({} ago)", age(Some(t), now)),
        None => "-".into(),
    }
}

fn map_pairs(v: Option<&Value>, sep: &str) -> String {
    match v.and_then(Value::as_object) {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_string)
                )
            })
            .collect::<Vec<_>>()
            .join(sep),
        _ => "<none>".into(),
    }
}

fn conditions(out: &mut Out, v: &Value, now: SystemTime) {
    let Some(conds) = v
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
    else {
        out.field(0, "Conditions", "<none>");
        return;
    };
    out.heading(0, "Conditions");
    let rows: Vec<Vec<String>> = conds
        .iter()
        .map(|c| {
            let since = c
                .get("lastTransitionTime")
                .and_then(Value::as_str)
                .map_or("-".to_string(), |t| age(Some(t), now));
            vec![
                text_at(c, "/type"),
                text_at(c, "/status"),
                text_at(c, "/reason"),
                since,
                text_at(c, "/message"),
            ]
        })
        .collect();
    out.block(
        2,
        &table(&["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], &rows),
    );
}

fn header(out: &mut Out, v: &Value, now: SystemTime) {
    out.field(0, "Name", str_at(v, "/metadata/name"));
    out.field(0, "Kind", str_at(v, "/kind"));
    for (key, ptr) in [
        ("Tenant", "/metadata/tenant"),
        ("Project", "/metadata/project"),
    ] {
        if let Some(s) = v.pointer(ptr).and_then(Value::as_str) {
            out.field(0, key, s);
        }
    }
    out.field(0, "Labels", labels(v.pointer("/metadata/labels")));
    out.field(0, "UID", text_at(v, "/metadata/uid"));
    out.field(0, "Created", created(v, now));
    out.field(0, "Generation", text_at(v, "/metadata/generation"));
    out.field(
        0,
        "Resource version",
        text_at(v, "/metadata/resourceVersion"),
    );
}

fn scope_object(out: &mut Out, v: &Value) {
    out.heading(0, "Spec");
    out.field(2, "Display name", text_at(v, "/spec/displayName"));
    out.field(2, "Description", text_at(v, "/spec/description"));
    out.field(2, "Quota", map_pairs(v.pointer("/spec/quota"), ", "));
    out.heading(0, "Status");
    out.field(2, "Usage", map_pairs(v.pointer("/status/usage"), ", "));
}

fn template(out: &mut Out, v: &Value) {
    out.heading(0, "Spec");
    out.field(2, "Description", text_at(v, "/spec/description"));
    out.field(2, "Config keys", keys_at(v, "/spec/config", ", "));
}

fn secret(out: &mut Out, v: &Value) {
    out.heading(0, "Keys (values are never shown)");
    let keys = v.pointer("/spec/keys").and_then(Value::as_object);
    match keys {
        Some(keys) if !keys.is_empty() => {
            for (k, fp) in keys {
                out.field(2, k, fp.as_str().unwrap_or("-"));
            }
        }
        _ => out.field(2, "Keys", "-"),
    }
}

fn instance(out: &mut Out, v: &Value, now: SystemTime) {
    out.heading(0, "Spec");
    out.field(2, "Version", text_at(v, "/spec/version"));
    let image = match (
        v.pointer("/spec/image").and_then(Value::as_str),
        v.pointer("/spec/version").and_then(Value::as_str),
    ) {
        (Some(i), _) => i.to_string(),
        (None, Some(ver)) => format!("{DEFAULT_IMAGE_REPOSITORY}:{ver}"),
        (None, None) => "-".into(),
    };
    out.field(2, "Image", image);
    out.field(2, "Replicas", text_at(v, "/spec/replicas"));
    out.field(
        2,
        "Resources",
        format!(
            "cpu {}, memory {}, pids {}",
            text_at(v, "/spec/resources/cpu"),
            text_at(v, "/spec/resources/memory"),
            text_at(v, "/spec/resources/pids")
        ),
    );
    let placement = map_pairs(v.pointer("/spec/placement/hostSelector"), ", ");
    out.field(
        2,
        "Host selector",
        if placement == "<none>" {
            "<any host>".into()
        } else {
            placement
        },
    );
    out.field(2, "Env", map_pairs(v.pointer("/spec/env"), ", "));
    out.field(2, "Update strategy", strategy(v));
    out.field(
        2,
        "Volume retention",
        format!(
            "whenScaled {}, whenDeleted {}",
            v.pointer("/spec/volumeRetention/whenScaled")
                .and_then(Value::as_str)
                .unwrap_or("Retain"),
            v.pointer("/spec/volumeRetention/whenDeleted")
                .and_then(Value::as_str)
                .unwrap_or("Delete")
        ),
    );
    match v
        .pointer("/spec/config")
        .filter(|c| c.as_object().is_some_and(|m| !m.is_empty()))
    {
        Some(config) => {
            out.heading(2, "Config");
            out.block(4, &serde_json::to_string_pretty(config).unwrap_or_default());
        }
        None => out.field(2, "Config", "<none>"),
    }
    let Some(status) = v.get("status").filter(|s| !s.is_null()) else {
        out.field(0, "Status", "not reported yet");
        return;
    };
    out.heading(0, "Status");
    out.field(2, "Phase", text_at(status, "/phase"));
    out.field(
        2,
        "Ready",
        format!(
            "{}/{}",
            text_at(status, "/readyReplicas"),
            text_at(v, "/spec/replicas")
        ),
    );
    out.field(2, "Up-to-date", text_at(status, "/updatedReplicas"));
    out.field(2, "Available", text_at(status, "/availableReplicas"));
    out.field(2, "Revision", text_at(status, "/configRevision"));
    out.field(
        2,
        "Observed generation",
        text_at(status, "/observedGeneration"),
    );
    if let Some(m) = status.get("message").and_then(Value::as_str) {
        out.field(2, "Message", m);
    }
    rollout(out, status);
    match status
        .get("replicaStatus")
        .and_then(Value::as_array)
        .filter(|r| !r.is_empty())
    {
        Some(replicas) => {
            out.heading(0, "Replicas");
            let rows: Vec<Vec<String>> = replicas
                .iter()
                .map(|r| {
                    vec![
                        text_at(r, "/name"),
                        r.get("host")
                            .and_then(Value::as_str)
                            .unwrap_or("<unscheduled>")
                            .to_string(),
                        text_at(r, "/state"),
                        text_at(r, "/restarts"),
                        text_at(r, "/hostPort"),
                        text_at(r, "/targetRevision"),
                        text_at(r, "/configRevision"),
                        text_at(r, "/message"),
                    ]
                })
                .collect();
            out.block(
                2,
                &table(
                    &[
                        "NAME", "HOST", "STATE", "RESTARTS", "PORT", "TARGET", "RUNNING", "MESSAGE",
                    ],
                    &rows,
                ),
            );
        }
        None => out.field(0, "Replicas", "<none>"),
    }
    snapshots(out, status);
    retained(out, status);
    conditions(out, v, now);
}

/// `Rolling, maxUnavailable 1, minReadySeconds 0, progressDeadline 10m, autoRollback true`,
/// or a Canary's steps.
fn strategy(v: &Value) -> String {
    let s = v.pointer("/spec/updateStrategy");
    let get = |k: &str| s.and_then(|s| s.get(k)).filter(|x| !x.is_null());
    let shown = |x: Option<&Value>, default: &str| {
        x.map_or_else(
            || default.to_string(),
            |x| x.as_str().map_or_else(|| x.to_string(), str::to_string),
        )
    };
    let type_ = get("type").and_then(Value::as_str).unwrap_or("Rolling");
    let mut parts = vec![type_.to_string()];
    if type_ == "Canary" {
        let steps: Vec<String> = get("steps")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|st| {
                if let Some(n) = st.get("replicas") {
                    format!("{n} replica(s)")
                } else if let Some(p) = st.get("percent") {
                    format!("{p}%")
                } else if let Some(d) = st.pointer("/pause/duration").and_then(Value::as_str) {
                    format!("pause {d}")
                } else {
                    "pause until promoted".into()
                }
            })
            .collect();
        parts.push(format!("steps [{}]", steps.join(", ")));
    } else {
        parts.push(format!(
            "maxUnavailable {}",
            shown(get("maxUnavailable"), "1")
        ));
    }
    parts.push(format!(
        "minReadySeconds {}",
        shown(get("minReadySeconds"), "0")
    ));
    parts.push(format!(
        "progressDeadline {}",
        shown(get("progressDeadline"), "10m")
    ));
    parts.push(format!(
        "autoRollback {}",
        shown(get("autoRollback"), "true")
    ));
    parts.join(", ")
}

/// The `Rollout` section: the update in progress or the last one.
fn rollout(out: &mut Out, status: &Value) {
    let Some(ro) = status.get("rollout").filter(|r| r.is_object()) else {
        out.field(0, "Rollout", "<none>");
        return;
    };
    out.heading(0, "Rollout");
    out.field(2, "Revision", text_at(ro, "/revision"));
    let mut phase = text_at(ro, "/phase");
    if ro.get("paused").and_then(Value::as_bool) == Some(true) {
        phase.push_str(" (paused by `rollout pause`)");
    }
    out.field(2, "Phase", phase);
    out.field(2, "Stable revision", text_at(ro, "/stableRevision"));
    out.field(2, "Updated", text_at(ro, "/updatedReplicas"));
    if let Some(step) = ro.get("step").and_then(Value::as_u64) {
        out.field(2, "Step", (step + 1).to_string());
    }
    for (key, ptr) in [
        ("Started", "/startedAt"),
        ("Step started", "/stepStartedAt"),
        ("Finished", "/finishedAt"),
        ("Held by", "/heldBy"),
        ("Message", "/message"),
    ] {
        if let Some(x) = ro.pointer(ptr).and_then(Value::as_str) {
            out.field(2, key, x);
        }
    }
}

/// Every replica's state-volume snapshots.
fn snapshots(out: &mut Out, status: &Value) {
    let rows: Vec<Vec<String>> = status
        .get("replicaStatus")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|r| {
            let name = text_at(r, "/name");
            r.get("snapshots")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(move |snap| {
                    vec![
                        name.clone(),
                        text_at(snap, "/id"),
                        text_at(snap, "/image"),
                        text_at(snap, "/takenAt"),
                        snap.get("bytes")
                            .and_then(Value::as_u64)
                            .map_or("-".into(), format_memory),
                    ]
                })
        })
        .collect();
    if rows.is_empty() {
        out.field(0, "Snapshots", "<none>");
        return;
    }
    out.heading(0, "Snapshots");
    out.block(
        2,
        &table(&["REPLICA", "ID", "IMAGE", "TAKEN", "SIZE"], &rows),
    );
}

/// State volumes kept after scale-down.
fn retained(out: &mut Out, status: &Value) {
    let rows: Vec<Vec<String>> = status
        .get("retainedVolumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| {
            vec![
                text_at(r, "/replica"),
                text_at(r, "/host"),
                text_at(r, "/since"),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.field(0, "Retained volumes", "<none>");
        return;
    }
    out.heading(0, "Retained volumes");
    out.block(2, &table(&["REPLICA", "HOST", "SINCE"], &rows));
}

fn host(out: &mut Out, v: &Value, now: SystemTime, replicas: &[Vec<String>]) {
    out.heading(0, "Spec");
    out.field(2, "Hostname", text_at(v, "/spec/hostname"));
    out.field(
        2,
        "Capacity",
        format!(
            "cpu {}, memory {}, disk {}",
            text_at(v, "/spec/capacity/cpu"),
            text_at(v, "/spec/capacity/memory"),
            text_at(v, "/spec/capacity/disk")
        ),
    );
    let unschedulable = v
        .pointer("/spec/unschedulable")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    out.field(2, "Unschedulable", unschedulable.to_string());
    out.field(2, "Agent version", text_at(v, "/spec/agentVersion"));
    out.field(
        2,
        "OS/arch",
        format!("{}/{}", text_at(v, "/spec/os"), text_at(v, "/spec/arch")),
    );
    out.heading(0, "Status");
    let phase = str_at(v, "/status/phase");
    out.field(2, "Phase", if phase.is_empty() { "Unknown" } else { phase });
    out.field(
        2,
        "Last heartbeat",
        v.pointer("/status/lastHeartbeat")
            .and_then(Value::as_str)
            .map_or("never".into(), |t| {
                format!("{t} ({} ago)", age(Some(t), now))
            }),
    );
    if let Some(m) = v.pointer("/status/message").and_then(Value::as_str) {
        out.field(2, "Message", m);
    }
    if let Some(t) = v.pointer("/status/notReadySince").and_then(Value::as_str) {
        out.field(
            2,
            "Not ready since",
            format!("{t} ({} ago)", age(Some(t), now)),
        );
    }
    let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    out.field(
        2,
        "Allocated",
        format!(
            "cpu {}, memory {}, replicas {}",
            format_cpu(n("/status/allocated/cpuMillis")),
            format_memory(n("/status/allocated/memoryBytes")),
            n("/status/allocated/replicas")
        ),
    );
    out.field(2, "Usage", map_pairs(v.pointer("/status/usage"), ", "));
    if replicas.is_empty() {
        out.field(0, "Replicas", "<none>");
    } else {
        out.heading(0, "Replicas");
        out.block(
            2,
            &table(&["NAME", "INSTANCE", "STATE", "MESSAGE"], replicas),
        );
    }
    conditions(out, v, now);
}

/// The `Drain` section of `describe host`, from the host's drain as `GET .../drain` answers it
/// (with the bytes relayed so far): its phase and times, how many replicas moved of how many,
/// the replicas moving (where to, how much state so far), and each failure with its reason.
pub fn drain_section(d: &Value, now: SystemTime) -> String {
    let mut out = Out {
        text: String::new(),
    };
    out.heading(0, "Drain");
    let phase = str_at(d, "/phase");
    out.field(
        2,
        "Phase",
        if phase.is_empty() { "Draining" } else { phase },
    );
    if let Some(t) = d.get("startedAt").and_then(Value::as_str) {
        out.field(2, "Started", format!("{t} ({} ago)", age(Some(t), now)));
    }
    match d.get("finishedAt").and_then(Value::as_str) {
        Some(t) => out.field(2, "Finished", format!("{t} ({} ago)", age(Some(t), now))),
        None => {
            if let Some(t) = d.get("deadline").and_then(Value::as_str) {
                out.field(2, "Deadline", t);
            }
        }
    }
    out.field(
        2,
        "State",
        if d.get("discardState").and_then(Value::as_bool) == Some(true) {
            "discarded (replicas start fresh)"
        } else {
            "carried through the control plane"
        },
    );
    let replicas: &[Value] = d
        .get("replicas")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let count = |p: &str| replicas.iter().filter(|r| r["phase"] == p).count();
    let (moved, moving, failed) = (count("Moved"), count("Moving"), count("Failed"));
    out.field(
        2,
        "Progress",
        if d.get("listed").and_then(Value::as_bool) == Some(true) || !replicas.is_empty() {
            format!(
                "{moved}/{} moved, {moving} moving, {} waiting, {failed} failed",
                replicas.len(),
                replicas.len() - moved - moving - failed
            )
        } else {
            "listing the host's replicas".into()
        },
    );
    if let Some(m) = d.get("message").and_then(Value::as_str) {
        out.field(2, "Message", m);
    }
    if !replicas.is_empty() {
        let rows: Vec<Vec<String>> = replicas
            .iter()
            .map(|r| {
                let attempt = match r["attempts"].as_u64() {
                    Some(n) if n > 1 => format!(", attempt {n}"),
                    _ => String::new(),
                };
                let state = match (r["bytes"].as_u64(), r["sha256"].as_str()) {
                    (Some(b), Some(sha)) => format!(
                        "{:.1} MiB, sha256 {}{attempt}",
                        b as f64 / (1024.0 * 1024.0),
                        &sha[..sha.len().min(12)]
                    ),
                    (Some(b), None) => {
                        format!("{:.1} MiB so far{attempt}", b as f64 / (1024.0 * 1024.0))
                    }
                    (None, _)
                        if r.get("transfer").is_none()
                            && (r["phase"] == "Moving" || r["phase"] == "Moved") =>
                    {
                        "fresh".into()
                    }
                    (None, _) => "-".into(),
                };
                vec![
                    format!(
                        "{}/{}/{}",
                        str_at(r, "/tenant"),
                        str_at(r, "/project"),
                        str_at(r, "/replica")
                    ),
                    text_at(r, "/phase"),
                    text_at(r, "/to"),
                    state,
                    text_at(r, "/message"),
                ]
            })
            .collect();
        out.block(
            2,
            &table(&["REPLICA", "PHASE", "TO", "STATE", "MESSAGE"], &rows),
        );
    }
    out.text
}

/// The text of `describe` for one object; `host_replicas` lists replicas placed on a host.
pub fn render(kind: Kind, v: &Value, host_replicas: &[Vec<String>], now: SystemTime) -> String {
    let mut out = Out {
        text: String::new(),
    };
    header(&mut out, v, now);
    match kind {
        Kind::Tenant | Kind::Project => scope_object(&mut out, v),
        Kind::ConfigTemplate => template(&mut out, v),
        Kind::Secret => secret(&mut out, v),
        Kind::OpenClawInstance => instance(&mut out, v, now),
        Kind::Host => host(&mut out, v, now, host_replicas),
        Kind::Rollout => super::waves::describe(&mut out.text, v),
    }
    out.text
}

/// Replicas placed on `host`, from a list of instances.
fn replicas_on(host: &str, instances: &Value) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for inst in instances
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for r in inst
            .pointer("/status/replicaStatus")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if r.get("host").and_then(Value::as_str) == Some(host) {
                let owner = format!(
                    "{}/{}/{}",
                    str_at(inst, "/metadata/tenant"),
                    str_at(inst, "/metadata/project"),
                    str_at(inst, "/metadata/name")
                );
                rows.push(vec![
                    text_at(r, "/name"),
                    owner,
                    text_at(r, "/state"),
                    text_at(r, "/message"),
                ]);
            }
        }
    }
    rows
}

pub async fn run(args: DescribeArgs) -> CliResult {
    let settings = Settings::resolve(&args.client)?;
    let client = Client::new(&settings)?;
    let (_, obj) = resolve::find(&client, &settings, args.kind, &args.name).await?;
    let host_replicas = if args.kind == Kind::Host {
        let instances = client
            .get(&list_path(Kind::OpenClawInstance, None, None, None))
            .await?;
        replicas_on(&args.name, &instances)
    } else {
        Vec::new()
    };
    let mut text = render(args.kind, &obj, &host_replicas, SystemTime::now());
    if args.kind == Kind::Host && obj.pointer("/status/drain").is_some() {
        // The drain endpoint adds the bytes relayed so far; the stored one is the fallback.
        let path = format!(
            "{}/drain",
            resolve::object_path(&ObjectKey::cluster(Kind::Host, &args.name))
        );
        let drain = match client.get(&path).await {
            Ok(d) => d,
            Err(_) => obj.pointer("/status/drain").cloned().unwrap_or_default(),
        };
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&drain_section(&drain, SystemTime::now()));
    }
    if args.kind == Kind::Host {
        let volumes = super::volumes::of_host(&client, &args.name).await;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&super::volumes::describe_section(
            &volumes,
            SystemTime::now(),
        ));
    }
    // Config templates and secrets have no events of their own (their changes are in the
    // audit log and the instances' revisions).
    let for_ = match args.kind {
        Kind::OpenClawInstance => Some("instance"),
        Kind::Host => Some("host"),
        Kind::Rollout => Some("rollout"),
        Kind::Tenant => Some("tenant"),
        Kind::Project => Some("project"),
        Kind::ConfigTemplate | Kind::Secret => None,
    };
    if let Some(k) = for_ {
        let tenant = obj.pointer("/metadata/tenant").and_then(Value::as_str);
        let project = obj.pointer("/metadata/project").and_then(Value::as_str);
        let name = str_at(&obj, "/metadata/name");
        let events =
            super::events::of_object(&client, tenant, project, &format!("{k}/{name}")).await;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&super::events::describe_section(&events, SystemTime::now()));
    }
    print_out(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-07-10T12:00:00Z").unwrap()
    }

    #[test]
    fn instance_description_shows_spec_replicas_and_conditions() {
        let v = json!({
            "apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
            "metadata": {"name": "bot", "tenant": "acme", "project": "helpdesk", "generation": 2, "resourceVersion": 17, "createdAt": "2026-07-10T11:00:00Z"},
            "spec": {"version": "2026.7.1", "replicas": 2, "resources": {"cpu": "1", "memory": "2Gi", "pids": 512},
                     "env": {"LOG_LEVEL": "info"}, "config": {"gateway": {"bind": "lan"}}},
            "status": {"phase": "Degraded", "observedGeneration": 2, "replicas": 2, "readyReplicas": 1,
                "replicaStatus": [
                    {"name": "bot-0", "ordinal": 0, "host": "h1", "state": "Ready", "restarts": 0, "hostPort": 19100},
                    {"name": "bot-1", "ordinal": 1, "state": "Pending", "restarts": 0, "message": "no host has 2Gi free"}
                ],
                "conditions": [{"type": "Available", "status": "False", "reason": "NotEnoughReplicas", "lastTransitionTime": "2026-07-10T11:58:00Z"}]}
        });
        let text = render(Kind::OpenClawInstance, &v, &[], now());
        for needle in [
            "Name:                   bot\n",
            "Tenant:                 acme\n",
            "Created:                2026-07-10T11:00:00Z (60m ago)\n",
            "  Image:                ghcr.io/openclaw/openclaw:2026.7.1\n",
            "  Env:                  LOG_LEVEL=info\n",
            "      \"bind\": \"lan\"\n",
            "  Phase:                Degraded\n",
            "  Ready:                1/2\n",
            "  bot-0   h1              Ready     0          19100   -        -         -\n",
            "  Observed generation:  2\n",
            "  bot-1   <unscheduled>   Pending   0          -       -        -         no host has 2Gi free\n",
            "  Available   False    NotEnoughReplicas   2m    -\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn hosts_list_their_replicas() {
        let instances = json!({"items": [{"metadata": {"name": "bot", "tenant": "acme", "project": "helpdesk"},
            "status": {"replicaStatus": [{"name": "bot-0", "host": "h1", "state": "Ready"}, {"name": "bot-1", "host": "h2", "state": "Ready"}]}}]});
        let rows = replicas_on("h1", &instances);
        assert_eq!(
            rows,
            [vec![
                "bot-0".to_string(),
                "acme/helpdesk/bot".into(),
                "Ready".into(),
                "-".into()
            ]]
        );
        let host = json!({"kind": "Host", "metadata": {"name": "h1"}, "spec": {"capacity": {"cpu": "8", "memory": "16Gi"}}});
        let text = render(Kind::Host, &host, &rows, now());
        assert!(text.contains("  Last heartbeat:       never\n"), "{text}");
        assert!(
            text.contains("  bot-0   acme/helpdesk/bot   Ready"),
            "{text}"
        );
        let bare = json!({"kind": "Tenant", "metadata": {"name": "acme"}});
        let text = render(Kind::Tenant, &bare, &[], now());
        assert!(text.contains("  Quota:                <none>"), "{text}");
    }

    #[test]
    fn instance_description_shows_the_rollout_revisions_snapshots_and_retained_volumes() {
        let v = json!({
            "kind": "OpenClawInstance",
            "metadata": {"name": "bot"},
            "spec": {"version": "2026.8.1", "replicas": 2,
                "updateStrategy": {"type": "Canary", "steps": [{"replicas": 1}, {"pause": {"duration": "10m"}}, {"pause": {}}]}},
            "status": {"phase": "Progressing", "readyReplicas": 2, "updatedReplicas": 1, "availableReplicas": 2, "configRevision": 5,
                "rollout": {"revision": 5, "phase": "Paused", "stableRevision": 4, "updatedReplicas": 1, "step": 1,
                    "message": "step 2/3: paused until 2026-07-10T12:10:00Z"},
                "replicaStatus": [
                    {"name": "bot-0", "ordinal": 0, "host": "h1", "state": "Ready", "restarts": 0, "targetRevision": 4, "configRevision": 4},
                    {"name": "bot-1", "ordinal": 1, "host": "h2", "state": "Ready", "restarts": 0, "targetRevision": 5, "configRevision": 5,
                     "snapshots": [{"id": "s1", "image": "ghcr.io/openclaw/openclaw:2026.7.1", "takenAt": "2026-07-10T11:59:00Z", "bytes": 1048576}]}
                ],
                "retainedVolumes": [{"replica": "bot-2", "ordinal": 2, "host": "h3", "since": "2026-07-09T10:00:00Z"}]}
        });
        let text = render(Kind::OpenClawInstance, &v, &[], now());
        for needle in [
            "  Update strategy:      Canary, steps [1 replica(s), pause 10m, pause until promoted], minReadySeconds 0, progressDeadline 10m, autoRollback true\n",
            "  Volume retention:     whenScaled Retain, whenDeleted Delete\n",
            "  Up-to-date:           1\n",
            "  Available:            2\n",
            "Rollout:\n  Revision:             5\n  Phase:                Paused\n  Stable revision:      4\n",
            "  Step:                 2\n",
            "  Message:              step 2/3: paused until 2026-07-10T12:10:00Z\n",
            "  NAME    HOST   STATE   RESTARTS   PORT   TARGET   RUNNING   MESSAGE\n",
            "  bot-0   h1     Ready   0          -      4        4         -\n",
            "  bot-1     s1   ghcr.io/openclaw/openclaw:2026.7.1   2026-07-10T11:59:00Z   1Mi\n",
            "Retained volumes:\n  REPLICA   HOST   SINCE\n  bot-2     h3     2026-07-09T10:00:00Z\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn a_drain_in_progress_shows_progress_the_moving_replica_and_failures() {
        let d = json!({
            "phase": "Draining", "startedAt": "2026-07-10T11:59:00Z",
            "deadline": "2026-07-10T12:09:00Z", "listed": true,
            "replicas": [
                {"tenant": "acme", "project": "web", "instance": "bot", "replica": "bot-0",
                 "ordinal": 0, "phase": "Moved", "to": "h2", "transfer": "drain-1",
                 "bytes": 10485760u64, "sha256": "0123456789abcdef0123", "message": "Ready on h2"},
                {"tenant": "acme", "project": "web", "instance": "bot", "replica": "bot-1",
                 "ordinal": 1, "phase": "Moving", "to": "h2", "transfer": "drain-2",
                 "bytes": 3145728u64, "attempts": 2},
                {"tenant": "acme", "project": "web", "instance": "aux", "replica": "aux-0",
                 "ordinal": 0, "phase": "Failed",
                 "message": "no other host fits: Unschedulable: 0/1 hosts fit (1 unschedulable)"},
                {"tenant": "acme", "project": "web", "instance": "aux", "replica": "aux-1",
                 "ordinal": 1, "phase": "Waiting"}
            ]
        });
        let text = drain_section(&d, now());
        assert!(text.starts_with("Drain:\n"), "{text}");
        let flat = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
        let all = flat(&text);
        for needle in [
            "Phase: Draining",
            "Started: 2026-07-10T11:59:00Z (60s ago)",
            "Deadline: 2026-07-10T12:09:00Z",
            "Progress: 1/4 moved, 1 moving, 1 waiting, 1 failed",
            "acme/web/bot-0 Moved h2 10.0 MiB, sha256 0123456789ab Ready on h2",
            "acme/web/bot-1 Moving h2 3.0 MiB so far, attempt 2 -",
            "acme/web/aux-0 Failed - - no other host fits: Unschedulable",
            "acme/web/aux-1 Waiting - - -",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in\n{text}");
        }
        // Finished: the end time instead of the deadline.
        let done = json!({"phase": "Succeeded", "startedAt": "2026-07-10T11:59:00Z",
            "deadline": "2026-07-10T12:09:00Z", "finishedAt": "2026-07-10T11:59:30Z",
            "listed": true, "message": "0 replica(s) moved off host h1", "replicas": []});
        let text = drain_section(&done, now());
        assert!(
            flat(&text).contains("Finished: 2026-07-10T11:59:30Z (30s ago)"),
            "{text}"
        );
        assert!(!text.contains("Deadline"), "{text}");
        assert!(text.contains("0/0 moved"), "{text}");
    }
}
