//! `clusterclaw get KIND [NAME]`: lists and single objects as tables, JSON or YAML.

use std::io::Write;
use std::time::SystemTime;

use clap::Args;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::client::Client;
use super::output::{self, Format, age, keys_at, labels, str_at, text_at};
use super::resolve::{self, kind_arg_help, list_path, parse_kind};
use super::settings::{ClientOpts, Settings};
use super::{CliResult, print_out, stdout_error};
use crate::model::{DEFAULT_IMAGE_REPOSITORY, Kind, Scope, format_cpu};

/// What `get` lists: objects of a kind, or events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GetKind {
    Object(Kind),
    Events,
    /// State volumes on hosts.
    Volumes,
    /// The control plane's server replicas.
    Servers,
}

fn parse_get_kind(s: &str) -> Result<GetKind, String> {
    match s.to_ascii_lowercase().as_str() {
        "events" | "event" | "ev" => Ok(GetKind::Events),
        "volumes" | "volume" | "vol" => Ok(GetKind::Volumes),
        "servers" | "server" => Ok(GetKind::Servers),
        _ => parse_kind(s).map(GetKind::Object),
    }
}

fn get_kind_help() -> String {
    format!("{}, events, volumes, or servers", kind_arg_help())
}

#[derive(Args, Debug)]
pub struct GetArgs {
    #[arg(value_parser = parse_get_kind, help = get_kind_help(), value_name = "KIND")]
    pub kind: GetKind,
    /// Show only this object
    pub name: Option<String>,
    /// Output format
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Only objects whose labels match, e.g. team=support,tier!=gold,gpu,!legacy
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// List across all tenants and projects, ignoring -t/-p and the configured ones
    #[arg(short = 'A', long)]
    pub all_tenants: bool,
    /// After the list, print changes as they happen (until interrupted)
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Events: only those of one object, e.g. instance/support-bot, host/h1, rollout/NAME
    #[arg(long = "for", value_name = "KIND/NAME")]
    pub for_object: Option<String>,
    /// Volumes: only those of this host
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// A list as tables need it: only the fields [`rows`] reads are kept while parsing, so that a
/// large `config` or `env` costs no allocation.
#[derive(Deserialize)]
struct BriefList {
    items: Vec<Brief>,
}

#[derive(Deserialize, Serialize)]
struct Brief {
    #[serde(default)]
    metadata: Map<String, Value>,
    #[serde(default)]
    spec: BriefSpec,
    #[serde(default)]
    status: BriefStatus,
}

#[derive(Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct BriefSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replicas: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resources: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    display_name: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quota: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    capacity: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unschedulable: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hostname: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_version: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    os: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    arch: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<Value>,
    /// Only a template's keys are shown; an instance's layer is read and dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keys: Option<Value>,
    /// A Rollout's change (a system Rollout's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    change: Option<Value>,
}

#[derive(Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct BriefStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    phase: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ready_replicas: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    updated_replicas: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    available_replicas: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rollout: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    replica_status: Vec<BriefReplica>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allocated: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_heartbeat: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config_revision: Option<Value>,
    /// A Rollout's wave in progress, how many there are, and its instances per state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wave: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    waves: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    counts: Option<Value>,
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct BriefReplica {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config_revision: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config_sync: Option<Value>,
}

impl Brief {
    fn into_value(self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// The image tag, for the VERSION column of instances that name an image.
/// `rev 7 in-sync`: the instance's config revision and whether its replicas run it as given
/// (`drift` when one was changed on its host, `updating` while one still runs another
/// revision).
fn config_state(o: &Value) -> String {
    let Some(rev) = o.pointer("/status/configRevision").and_then(Value::as_u64) else {
        return "-".into();
    };
    let replicas: Vec<&Value> = o
        .pointer("/status/replicaStatus")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter(|r| r.get("host").is_some()).collect())
        .unwrap_or_default();
    let state = if replicas
        .iter()
        .any(|r| r.get("configSync").and_then(Value::as_str) == Some("Drift"))
    {
        "drift"
    } else if replicas
        .iter()
        .any(|r| r.get("configRevision").and_then(Value::as_u64) != Some(rev))
    {
        "updating"
    } else {
        "in-sync"
    };
    format!("rev {rev} {state}")
}

/// The ROLLOUT column: the phase of the update to the newest revision (`Waiting` while a
/// newer revision has not started, `-` before any update).
fn rollout_state(o: &Value) -> String {
    let Some(ro) = o.pointer("/status/rollout").filter(|r| r.is_object()) else {
        return "-".into();
    };
    let newest = o.pointer("/status/configRevision").and_then(Value::as_u64);
    if newest.is_some() && newest != ro.get("revision").and_then(Value::as_u64) {
        return "Waiting".into();
    }
    text_at(ro, "/phase")
}

fn image_tag(image: &str) -> &str {
    let last = image.rsplit('/').next().unwrap_or(image);
    let last = last.split('@').next().unwrap_or(last);
    last.split_once(':').map_or("latest", |(_, tag)| tag)
}

fn version(o: &Value) -> String {
    match (
        o.pointer("/spec/version").and_then(Value::as_str),
        o.pointer("/spec/image").and_then(Value::as_str),
    ) {
        (_, Some(image)) => image_tag(image).to_string(),
        (Some(v), None) => v.to_string(),
        (None, None) => "-".into(),
    }
}

fn image(o: &Value) -> String {
    match (
        o.pointer("/spec/image").and_then(Value::as_str),
        o.pointer("/spec/version").and_then(Value::as_str),
    ) {
        (Some(image), _) => image.to_string(),
        (None, Some(v)) => format!("{DEFAULT_IMAGE_REPOSITORY}:{v}"),
        (None, None) => "-".into(),
    }
}

fn num(o: &Value, pointer: &str) -> i64 {
    o.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn hosts_of(o: &Value) -> String {
    let mut hosts: Vec<&str> = o
        .pointer("/status/replicaStatus")
        .and_then(Value::as_array)
        .map(|rs| {
            rs.iter()
                .filter_map(|r| r.get("host").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    hosts.sort_unstable();
    hosts.dedup();
    if hosts.is_empty() {
        "<none>".into()
    } else {
        hosts.join(",")
    }
}

/// `used/quota` for instances, replicas, cpu and memory (`used` where the quota sets no
/// limit), from the server's `status.usage`.
fn usage_columns(o: &Value) -> [String; 4] {
    ["instances", "replicas", "cpu", "memory"].map(|k| {
        let shown = |v: Option<&Value>| {
            v.filter(|v| !v.is_null())
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
        };
        let used = shown(o.pointer(&format!("/status/usage/{k}"))).unwrap_or_else(|| "0".into());
        match shown(o.pointer(&format!("/spec/quota/{k}"))) {
            Some(limit) => format!("{used}/{limit}"),
            None => used,
        }
    })
}

fn quota(o: &Value) -> String {
    let Some(q) = o.pointer("/spec/quota").and_then(Value::as_object) else {
        return "<none>".into();
    };
    let parts: Vec<String> = ["instances", "replicas", "cpu", "memory"]
        .iter()
        .filter_map(|k| {
            q.get(*k).filter(|v| !v.is_null()).map(|v| {
                format!(
                    "{k}={}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_string)
                )
            })
        })
        .collect();
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

fn phase(o: &Value, default: &str) -> String {
    let p = str_at(o, "/status/phase");
    if p.is_empty() {
        default.into()
    } else {
        p.into()
    }
}

/// Header and rows of a table of objects of one kind.
pub fn rows(
    kind: Kind,
    items: &[Value],
    wide: bool,
    now: SystemTime,
) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let created = |o: &Value| {
        age(
            o.pointer("/metadata/createdAt").and_then(Value::as_str),
            now,
        )
    };
    let name = |o: &Value| str_at(o, "/metadata/name").to_string();
    match kind {
        Kind::Tenant => {
            let mut header = vec![
                "NAME",
                "DISPLAY NAME",
                "INSTANCES",
                "REPLICAS",
                "CPU",
                "MEMORY",
                "AGE",
            ];
            if wide {
                header.extend(["QUOTA", "LABELS"]);
            }
            let rows = items
                .iter()
                .map(|o| {
                    let mut r = vec![name(o), text_at(o, "/spec/displayName")];
                    r.extend(usage_columns(o));
                    r.push(created(o));
                    if wide {
                        r.extend([quota(o), labels(o.pointer("/metadata/labels"))]);
                    }
                    r
                })
                .collect();
            (header, rows)
        }
        Kind::Project => {
            let mut header = vec![
                "NAME",
                "TENANT",
                "DISPLAY NAME",
                "INSTANCES",
                "REPLICAS",
                "CPU",
                "MEMORY",
                "AGE",
            ];
            if wide {
                header.extend(["QUOTA", "LABELS"]);
            }
            let rows = items
                .iter()
                .map(|o| {
                    let mut r = vec![
                        name(o),
                        text_at(o, "/metadata/tenant"),
                        text_at(o, "/spec/displayName"),
                    ];
                    r.extend(usage_columns(o));
                    r.push(created(o));
                    if wide {
                        r.extend([quota(o), labels(o.pointer("/metadata/labels"))]);
                    }
                    r
                })
                .collect();
            (header, rows)
        }
        Kind::OpenClawInstance => {
            let mut header = vec![
                "NAME",
                "TENANT",
                "PROJECT",
                "VERSION",
                "READY",
                "UP-TO-DATE",
                "AVAILABLE",
                "PHASE",
                "ROLLOUT",
                "CONFIG",
                "AGE",
            ];
            if wide {
                header.extend(["IMAGE", "CPU", "MEMORY", "HOSTS"]);
            }
            let rows = items
                .iter()
                .map(|o| {
                    let replicas = format!(
                        "{}/{}",
                        num(o, "/status/readyReplicas"),
                        num(o, "/spec/replicas")
                    );
                    let mut r = vec![
                        name(o),
                        text_at(o, "/metadata/tenant"),
                        text_at(o, "/metadata/project"),
                        version(o),
                        replicas,
                        num(o, "/status/updatedReplicas").to_string(),
                        num(o, "/status/availableReplicas").to_string(),
                        phase(o, "Pending"),
                        rollout_state(o),
                        config_state(o),
                        created(o),
                    ];
                    if wide {
                        r.extend([
                            image(o),
                            text_at(o, "/spec/resources/cpu"),
                            text_at(o, "/spec/resources/memory"),
                            hosts_of(o),
                        ]);
                    }
                    r
                })
                .collect();
            (header, rows)
        }
        Kind::ConfigTemplate => {
            let header = vec!["NAME", "DESCRIPTION", "KEYS", "AGE"];
            let rows = items
                .iter()
                .map(|o| {
                    vec![
                        name(o),
                        text_at(o, "/spec/description"),
                        keys_at(o, "/spec/config", ","),
                        created(o),
                    ]
                })
                .collect();
            (header, rows)
        }
        Kind::Rollout => super::waves::table(items, now),
        Kind::Secret => {
            let header = vec!["NAME", "TENANT", "PROJECT", "KEYS", "AGE"];
            let rows = items
                .iter()
                .map(|o| {
                    vec![
                        name(o),
                        text_at(o, "/metadata/tenant"),
                        text_at(o, "/metadata/project"),
                        keys_at(o, "/spec/keys", ","),
                        created(o),
                    ]
                })
                .collect();
            (header, rows)
        }
        Kind::Host => {
            let mut header = vec!["NAME", "STATUS", "CPU", "MEMORY", "REPLICAS", "AGE"];
            if wide {
                header.extend(["HOSTNAME", "AGENT", "OS/ARCH", "LAST HEARTBEAT", "LABELS"]);
            }
            let rows = items
                .iter()
                .map(|o| {
                    let mut status = phase(o, "Unknown");
                    if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
                        status.push_str(",SchedulingDisabled");
                    }
                    let alloc = |p: &str| o.pointer(p).and_then(Value::as_u64).unwrap_or(0);
                    let cpu = format!(
                        "{}/{}",
                        format_cpu(alloc("/status/allocated/cpuMillis")),
                        text_at(o, "/spec/capacity/cpu")
                    );
                    let capacity = text_at(o, "/spec/capacity/memory");
                    let mem = format!(
                        "{}/{}",
                        human_memory(alloc("/status/allocated/memoryBytes")),
                        crate::model::parse_memory(&capacity).map_or(capacity, human_memory)
                    );
                    let mut r = vec![
                        name(o),
                        status,
                        cpu,
                        mem,
                        alloc("/status/allocated/replicas").to_string(),
                        created(o),
                    ];
                    if wide {
                        let os = format!("{}/{}", text_at(o, "/spec/os"), text_at(o, "/spec/arch"));
                        let beat = o
                            .pointer("/status/lastHeartbeat")
                            .and_then(Value::as_str)
                            .map_or("-".into(), |t| format!("{} ago", age(Some(t), now)));
                        r.extend([
                            text_at(o, "/spec/hostname"),
                            text_at(o, "/spec/agentVersion"),
                            os,
                            beat,
                            labels(o.pointer("/metadata/labels")),
                        ]);
                    }
                    r
                })
                .collect();
            (header, rows)
        }
    }
}

pub async fn run(args: GetArgs) -> CliResult {
    let settings = Settings::resolve(&args.client)?;
    let client = Client::new(&settings)?;
    let (tenant, project) = if args.all_tenants {
        (None, None)
    } else {
        (settings.tenant.as_deref(), settings.project.as_deref())
    };
    let kind = match args.kind {
        GetKind::Events => {
            if let Some(f) = &args.for_object {
                crate::events::parse_for(f).map_err(super::CliError::Failed)?;
            }
            return super::events::get_events(
                &client,
                tenant,
                project,
                args.for_object.as_deref(),
                args.output,
                args.watch,
            )
            .await;
        }
        GetKind::Volumes => {
            if args.for_object.is_some() || args.name.is_some() {
                return Err(super::CliError::Failed(
                    "get volumes takes only --host, -w and -o".into(),
                ));
            }
            return super::volumes::get_volumes(
                &client,
                args.host.as_deref(),
                args.output,
                args.watch,
            )
            .await;
        }
        GetKind::Servers => {
            if args.for_object.is_some()
                || args.name.is_some()
                || args.watch
                || args.host.is_some()
                || args.selector.is_some()
            {
                return Err(super::CliError::Failed("get servers takes only -o".into()));
            }
            return super::servers::get_servers(&client, args.output).await;
        }
        GetKind::Object(k) => k,
    };
    if args.host.is_some() {
        return Err(super::CliError::Failed(
            "--host goes with get volumes".into(),
        ));
    }
    if args.for_object.is_some() {
        return Err(super::CliError::Failed("--for goes with get events".into()));
    }
    if let Some(name) = &args.name {
        let (_, obj) = resolve::find(&client, &settings, kind, name).await?;
        return print_one(kind, &obj, args.output);
    }
    let path = list_path(kind, tenant, project, args.selector.as_deref());
    if args.watch {
        let format = args.output;
        return super::events::follow(&client, &path, true, |items, first| {
            Ok(super::events::watch_text(
                format,
                items,
                first,
                |items, wide| rows(kind, items, wide, SystemTime::now()),
            ))
        })
        .await;
    }
    let items = |list: Value| match list {
        Value::Object(mut m) => match m.remove("items") {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    match args.output {
        Format::Json => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
            client.stream_items(&path, &mut out).await?;
            out.flush().map_err(stdout_error)
        }
        Format::Yaml => {
            let items = items(client.get(&path).await?);
            print_out(&output::to_yaml(&json!({ "items": items }))?)
        }
        Format::Table | Format::Wide => {
            let list: BriefList = client.json(Method::GET, &path, None).await?;
            let items: Vec<Value> = list.items.into_iter().map(Brief::into_value).collect();
            if items.is_empty() {
                let scope = match (kind.scope(), tenant, project) {
                    (Scope::Cluster, _, _) | (_, None, _) => String::new(),
                    (Scope::Project, Some(t), Some(p)) => format!(" in project {t}/{p}"),
                    (_, Some(t), _) => format!(" in tenant {t}"),
                };
                eprintln!("No {} found{scope}.", kind.plural());
                return Ok(());
            }
            let (header, rows) = rows(kind, &items, args.output == Format::Wide, SystemTime::now());
            print_out(&output::table(&header, &rows))
        }
    }
}

fn print_one(kind: Kind, obj: &Value, format: Format) -> CliResult {
    match format {
        Format::Json => print_out(&output::to_json(obj)?),
        Format::Yaml => print_out(&output::to_yaml(obj)?),
        Format::Table | Format::Wide => {
            let (header, rows) = rows(
                kind,
                std::slice::from_ref(obj),
                format == Format::Wide,
                SystemTime::now(),
            );
            print_out(&output::table(&header, &rows))
        }
    }
}

/// Bytes in the largest binary unit that keeps at least one whole unit, with one decimal when
/// the amount is not whole (`16Gi`, `23.5Gi`, `300Mi`).
fn human_memory(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            let v = bytes as f64 / size as f64;
            return if bytes.is_multiple_of(size) {
                format!("{}{unit}", bytes / size)
            } else {
                format!("{v:.1}{unit}")
            };
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-07-10T12:00:00Z").unwrap()
    }

    fn instance() -> Value {
        json!({
            "apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
            "metadata": {"name": "support-bot", "tenant": "acme", "project": "helpdesk", "createdAt": "2026-07-10T11:55:00Z"},
            "spec": {"version": "2026.7.1", "replicas": 3, "resources": {"cpu": "2", "memory": "4Gi", "pids": 512}},
            "status": {"phase": "Running", "readyReplicas": 2, "replicas": 3, "replicaStatus": [
                {"name": "support-bot-0", "ordinal": 0, "host": "h2", "state": "Ready"},
                {"name": "support-bot-1", "ordinal": 1, "host": "h1", "state": "Ready"},
                {"name": "support-bot-2", "ordinal": 2, "host": "h2", "state": "Starting"}
            ]}
        })
    }

    #[test]
    fn the_config_column_survives_the_brief_parse() {
        let mut o = instance();
        o["status"]["configRevision"] = json!(4);
        for r in o["status"]["replicaStatus"].as_array_mut().unwrap() {
            r["configRevision"] = json!(4);
            r["configSync"] = json!("InSync");
        }
        let brief = |o: &Value| -> Value {
            let list: BriefList = serde_json::from_value(json!({"items": [o]})).unwrap();
            list.items.into_iter().next().unwrap().into_value()
        };
        let (_, r) = rows(Kind::OpenClawInstance, &[brief(&o)], false, now());
        assert_eq!(r[0][9], "rev 4 in-sync");
        o["status"]["replicaStatus"][1]["configSync"] = json!("Drift");
        let (_, r) = rows(Kind::OpenClawInstance, &[brief(&o)], false, now());
        assert_eq!(r[0][9], "rev 4 drift");
        o["status"]["replicaStatus"][1]["configSync"] = json!("InSync");
        o["status"]["replicaStatus"][2]["configRevision"] = json!(3);
        let (_, r) = rows(Kind::OpenClawInstance, &[brief(&o)], false, now());
        assert_eq!(r[0][9], "rev 4 updating");
    }

    #[test]
    fn instance_table_and_wide() {
        let (h, r) = rows(Kind::OpenClawInstance, &[instance()], false, now());
        let t = output::table(&h, &r);
        assert_eq!(
            t,
            "NAME          TENANT   PROJECT    VERSION    READY   UP-TO-DATE   AVAILABLE   PHASE     ROLLOUT   CONFIG   AGE\n\
             support-bot   acme     helpdesk   2026.7.1   2/3     0            0           Running   -         -        5m\n"
        );
        let (h, r) = rows(Kind::OpenClawInstance, &[instance()], true, now());
        assert_eq!(&h[11..], ["IMAGE", "CPU", "MEMORY", "HOSTS"]);
        assert_eq!(
            &r[0][11..],
            ["ghcr.io/openclaw/openclaw:2026.7.1", "2", "4Gi", "h1,h2"]
        );
    }

    #[test]
    fn instances_without_status_are_pending() {
        let mut o = instance();
        o.as_object_mut().unwrap().remove("status");
        o["spec"]["image"] = json!("registry.example.com:5000/openclaw:2026.7.2");
        let (_, r) = rows(Kind::OpenClawInstance, &[o], true, now());
        assert_eq!(r[0][3..5], ["2026.7.2", "0/3"]);
        assert_eq!(r[0][7..9], ["Pending", "-"]);
        assert_eq!(r[0][14], "<none>");
    }

    #[test]
    fn rollout_columns_show_the_update_at_a_glance() {
        let mut o = instance();
        o["status"]["configRevision"] = json!(5);
        o["status"]["updatedReplicas"] = json!(1);
        o["status"]["availableReplicas"] = json!(2);
        o["status"]["phase"] = json!("Progressing");
        o["status"]["rollout"] =
            json!({"revision": 5, "phase": "Progressing", "updatedReplicas": 1});
        let brief: BriefList = serde_json::from_value(json!({"items": [o]})).unwrap();
        let items: Vec<Value> = brief.items.into_iter().map(Brief::into_value).collect();
        let (_, r) = rows(Kind::OpenClawInstance, &items, false, now());
        assert_eq!(r[0][4..9], ["2/3", "1", "2", "Progressing", "Progressing"]);
        let mut o = items[0].clone();
        o["status"]["configRevision"] = json!(6);
        let (_, r) = rows(Kind::OpenClawInstance, &[o], false, now());
        assert_eq!(r[0][8], "Waiting");
    }

    #[test]
    fn memory_reads_like_a_person_writes_it() {
        assert_eq!(human_memory(0), "0");
        assert_eq!(human_memory(16 << 30), "16Gi");
        assert_eq!(human_memory(24_684_084 * 1024), "23.5Gi");
        assert_eq!(human_memory(1536 << 20), "1.5Gi");
        assert_eq!(human_memory(300 << 20), "300Mi");
    }

    #[test]
    fn host_rows() {
        let h = json!({
            "metadata": {"name": "h1", "createdAt": "2026-07-08T12:00:00Z", "labels": {"region": "eu"}},
            "spec": {"hostname": "h1.example.com", "capacity": {"cpu": "8", "memory": "16Gi"}, "unschedulable": true, "os": "linux", "arch": "x86_64"},
            "status": {"phase": "Ready", "lastHeartbeat": "2026-07-10T11:59:50Z", "allocated": {"cpuMillis": 2500, "memoryBytes": 4294967296u64, "replicas": 2}}
        });
        let (hd, r) = rows(Kind::Host, &[h], true, now());
        assert_eq!(
            hd[..6],
            ["NAME", "STATUS", "CPU", "MEMORY", "REPLICAS", "AGE"]
        );
        assert_eq!(
            r[0][..6],
            [
                "h1",
                "Ready,SchedulingDisabled",
                "2500m/8",
                "4Gi/16Gi",
                "2",
                "2d"
            ]
        );
        assert_eq!(
            r[0][6..],
            [
                "h1.example.com",
                "-",
                "linux/x86_64",
                "10s ago",
                "region=eu"
            ]
        );
    }

    #[test]
    fn tenant_and_project_rows() {
        let t = json!({"metadata": {"name": "acme", "createdAt": "2026-07-10T10:00:00Z"}, "spec": {"displayName": "ACME Corp", "quota": {"instances": 10, "memory": "64Gi"}},
            "status": {"usage": {"instances": 3, "replicas": 5, "cpu": "2500m", "memory": "12Gi"}}});
        let (_, r) = rows(Kind::Tenant, std::slice::from_ref(&t), true, now());
        assert_eq!(
            r[0],
            [
                "acme",
                "ACME Corp",
                "3/10",
                "5",
                "2500m",
                "12Gi/64Gi",
                "2h",
                "instances=10,memory=64Gi",
                "<none>"
            ]
        );
        let p = json!({"metadata": {"name": "helpdesk", "tenant": "acme"}, "spec": {}});
        let (_, r) = rows(Kind::Project, &[p], false, now());
        assert_eq!(
            r[0],
            ["helpdesk", "acme", "-", "0", "0", "0", "0", "<unknown>"]
        );
    }

    #[test]
    fn brief_parsing_keeps_every_column() {
        let full = instance();
        let list = json!({"index": 7, "items": [full.clone()]}).to_string();
        let brief: BriefList = serde_json::from_str(&list).unwrap();
        let slim: Vec<Value> = brief.items.into_iter().map(Brief::into_value).collect();
        assert_eq!(
            rows(Kind::OpenClawInstance, &slim, true, now()),
            rows(Kind::OpenClawInstance, &[full], true, now())
        );
    }

    #[test]
    fn image_tags() {
        assert_eq!(image_tag("ghcr.io/openclaw/openclaw:2026.7.1"), "2026.7.1");
        assert_eq!(image_tag("localhost:5000/openclaw"), "latest");
        assert_eq!(image_tag("openclaw:1@sha256:abc"), "1");
    }
}
