//! Rules on values: names, scopes, replicas, quantities, versions, env, labels, sizes.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::names::{validate_dns_label, validate_label_key, validate_label_value};
use super::quantity::{parse_cpu, parse_memory};
use super::resources::{Kind, Metadata, Quota, Resource, Scope};

/// Largest accepted manifest (one object, as JSON or YAML text).
pub const MAX_OBJECT_BYTES: usize = 256 * 1024;
/// Upper bound of `spec.replicas`.
pub const MAX_REPLICAS: i64 = 100;
const MIN_MEMORY: u64 = 32 << 20;
const MAX_PIDS: i64 = 65_536;
const MIN_PIDS: i64 = 16;
/// Variables the agent sets itself; a spec may not override them.
const RESERVED_ENV: [&str; 2] = ["OPENCLAW_CONFIG_PATH", "OPENCLAW_CONFIG_READONLY"];

/// One thing wrong with one field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldProblem {
    /// Dotted path of the field, e.g. `spec.resources.memory`; empty for the whole document.
    pub field: String,
    /// What is wrong and what is allowed.
    pub problem: String,
}

impl FieldProblem {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        FieldProblem {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The same problem, with its path put under `prefix` (`items[3]`).
    pub fn under(mut self, prefix: &str) -> Self {
        self.field = if self.field.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.problem)
        } else {
            write!(f, "{}: {}", self.field, self.problem)
        }
    }
}

/// Checks an OpenClaw release: `YYYY.M.D`, optionally `-N` or `-beta.N`.
pub fn validate_version(v: &str) -> Result<(), String> {
    let err = || {
        format!(
            "{v:?} is not an OpenClaw version; versions look like 2026.7.1, 2026.7.1-2 or 2026.8.0-beta.1"
        )
    };
    let (core, pre) = match v.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (v, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    let digits = |s: &str, min: usize, max: usize| {
        s.len() >= min && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    if parts.len() != 3
        || !digits(parts[0], 4, 4)
        || !digits(parts[1], 1, 2)
        || !digits(parts[2], 1, 2)
    {
        return Err(err());
    }
    let month: u32 = parts[1].parse().map_err(|_| err())?;
    if !(1..=12).contains(&month) {
        return Err(err());
    }
    match pre {
        None => Ok(()),
        Some(p) if digits(p, 1, 6) => Ok(()),
        Some(p) if p.strip_prefix("beta.").is_some_and(|n| digits(n, 1, 6)) => Ok(()),
        Some(_) => Err(err()),
    }
}

fn validate_image(image: &str) -> Result<(), String> {
    let ok = !image.is_empty()
        && image.len() <= 512
        && !image.starts_with(['-', '/', ':', '@'])
        && image
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{image:?} is not an image reference such as registry.example.com/openclaw:2026.7.1"
        ))
    }
}

fn validate_env_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && !b[0].is_ascii_digit()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
    if !ok {
        return Err(format!(
            "{name:?} is not an environment variable name: letters, digits and '_', not starting with a digit"
        ));
    }
    if RESERVED_ENV.contains(&name) {
        return Err(format!(
            "{name} is set by clusterclaw itself and cannot be overridden"
        ));
    }
    Ok(())
}

fn check_labels(
    labels: &std::collections::BTreeMap<String, String>,
    path: &str,
    out: &mut Vec<FieldProblem>,
) {
    for (k, v) in labels {
        if let Err(e) = validate_label_key(k) {
            out.push(FieldProblem::new(format!("{path}.{k}"), e));
        }
        if let Err(e) = validate_label_value(v) {
            out.push(FieldProblem::new(format!("{path}.{k}"), e));
        }
    }
}

fn check_metadata(kind: Kind, m: &Metadata, out: &mut Vec<FieldProblem>) {
    if let Err(e) = validate_dns_label(&m.name) {
        out.push(FieldProblem::new("metadata.name", e));
    }
    let scope = kind.scope();
    let mut scope_field = |field: &str, value: &Option<String>, needed: bool| {
        match (value, needed) {
        (Some(v), true) => {
            if let Err(e) = validate_dns_label(v) {
                out.push(FieldProblem::new(format!("metadata.{field}"), e));
            }
        }
        (None, true) => out.push(FieldProblem::new(
            format!("metadata.{field}"),
            format!("is required: a {kind} belongs to a {field} (set it in the manifest, or pass --{field})"),
        )),
        (Some(_), false) => out.push(FieldProblem::new(
            format!("metadata.{field}"),
            format!("a {kind} does not belong to a {field}; remove this field"),
        )),
        (None, false) => {}
    }
    };
    scope_field("tenant", &m.tenant, scope != Scope::Cluster);
    scope_field("project", &m.project, scope == Scope::Project);
    check_labels(&m.labels, "metadata.labels", out);
}

fn check_quota(q: &Option<Quota>, out: &mut Vec<FieldProblem>) {
    let Some(q) = q else { return };
    for (field, v) in [("instances", q.instances), ("replicas", q.replicas)] {
        if v.is_some_and(|n| n < 0) {
            out.push(FieldProblem::new(
                format!("spec.quota.{field}"),
                "must not be negative",
            ));
        }
    }
    if let Some(cpu) = &q.cpu
        && let Err(e) = parse_cpu(cpu.as_str())
    {
        out.push(FieldProblem::new("spec.quota.cpu", e));
    }
    if let Some(mem) = &q.memory
        && let Err(e) = parse_memory(mem.as_str())
    {
        out.push(FieldProblem::new("spec.quota.memory", e));
    }
}

/// Every rule on a structurally valid object; an empty result means it may be written.
/// References to other objects (does the tenant exist?) are checked by the store, in the
/// transaction that writes.
pub fn validate_object(r: &Resource) -> Vec<FieldProblem> {
    let mut out = Vec::new();
    let kind = r.kind();
    check_metadata(kind, r.metadata(), &mut out);
    match r {
        Resource::Tenant(t) => {
            if t.spec.display_name.as_ref().is_some_and(|d| d.len() > 256) {
                out.push(FieldProblem::new(
                    "spec.displayName",
                    "at most 256 characters",
                ));
            }
            check_quota(&t.spec.quota, &mut out)
        }
        Resource::Project(p) => {
            if p.spec.display_name.as_ref().is_some_and(|d| d.len() > 256) {
                out.push(FieldProblem::new(
                    "spec.displayName",
                    "at most 256 characters",
                ));
            }
            check_quota(&p.spec.quota, &mut out)
        }
        Resource::OpenClawInstance(i) => {
            let s = &i.spec;
            match (&s.version, &s.image) {
                (None, None) => out.push(FieldProblem::new(
                    "spec.version",
                    "is required (an OpenClaw release such as 2026.7.1), unless spec.image names the image",
                )),
                (v, image) => {
                    if let Some(Err(e)) = v.as_deref().map(validate_version) {
                        out.push(FieldProblem::new("spec.version", e));
                    }
                    if let Some(Err(e)) = image.as_deref().map(validate_image) {
                        out.push(FieldProblem::new("spec.image", e));
                    }
                }
            }
            if !(0..=MAX_REPLICAS).contains(&s.replicas) {
                out.push(FieldProblem::new(
                    "spec.replicas",
                    format!(
                        "{} is out of range; replicas must be between 0 and {MAX_REPLICAS}",
                        s.replicas
                    ),
                ));
            }
            if let Some(cpu) = &s.resources.cpu {
                match parse_cpu(cpu.as_str()) {
                    Ok(0) => out.push(FieldProblem::new(
                        "spec.resources.cpu",
                        "must be more than 0",
                    )),
                    Ok(_) => {}
                    Err(e) => out.push(FieldProblem::new("spec.resources.cpu", e)),
                }
            }
            if let Some(mem) = &s.resources.memory {
                match parse_memory(mem.as_str()) {
                    Ok(b) if b < MIN_MEMORY => out.push(FieldProblem::new(
                        "spec.resources.memory",
                        format!("{:?} is below the minimum of 32Mi", mem.as_str()),
                    )),
                    Ok(_) => {}
                    Err(e) => out.push(FieldProblem::new("spec.resources.memory", e)),
                }
            }
            if let Some(p) = s.resources.pids
                && !(MIN_PIDS..=MAX_PIDS).contains(&p)
            {
                out.push(FieldProblem::new(
                    "spec.resources.pids",
                    format!("{p} is out of range; pids must be between {MIN_PIDS} and {MAX_PIDS}"),
                ));
            }
            for name in s.env.keys() {
                if let Err(e) = validate_env_name(name) {
                    out.push(FieldProblem::new(format!("spec.env.{name}"), e));
                }
            }
            check_labels(
                &s.placement.host_selector,
                "spec.placement.hostSelector",
                &mut out,
            );
        }
        Resource::Host(_) => {}
    }
    let size = serde_json::to_vec(&r.to_value())
        .map(|v| v.len())
        .unwrap_or(0);
    if size > MAX_OBJECT_BYTES {
        out.push(FieldProblem::new(
            "",
            format!(
                "the object is {size} bytes; at most {MAX_OBJECT_BYTES} bytes ({} KiB) are allowed",
                MAX_OBJECT_BYTES / 1024
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn instance(spec: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "clusterclaw.io/v1",
            "kind": "OpenClawInstance",
            "metadata": {"name": "support-bot", "tenant": "acme", "project": "helpdesk"},
            "spec": spec,
        })
    }

    fn problems(v: serde_json::Value) -> Vec<FieldProblem> {
        match Resource::from_value(v) {
            Ok(r) => validate_object(&r),
            Err(p) => p,
        }
    }

    fn fields(v: serde_json::Value) -> Vec<String> {
        problems(v).into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn a_good_instance_passes() {
        let v = instance(json!({
            "version": "2026.7.1", "replicas": 3,
            "resources": {"cpu": 2, "memory": "4Gi", "pids": 1024},
            "config": {"gateway": {"bind": "lan"}}, "env": {"LOG_LEVEL": "info"},
            "placement": {"hostSelector": {"region": "eu"}}
        }));
        assert_eq!(problems(v), vec![]);
    }

    #[test]
    fn versions() {
        for ok in ["2026.7.1", "2026.12.31", "2026.7.1-2", "2026.8.0-beta.1"] {
            assert!(validate_version(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "latest",
            "2026.7",
            "26.7.1",
            "2026.13.1",
            "2026.7.1-rc.1",
            "2026.7.1-",
            "v2026.7.1",
        ] {
            assert!(validate_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_are_reported_with_their_path() {
        let p = problems(instance(json!({"version": "2026.7.1", "replicaz": 3})));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].field, "spec.replicaz");
        assert!(p[0].problem.contains("unknown field"), "{}", p[0].problem);
        let p = problems(instance(
            json!({"version": "2026.7.1", "resources": {"memroy": "1Gi"}}),
        ));
        assert_eq!(p[0].field, "spec.resources.memroy");
    }

    #[test]
    fn wrong_kind_and_api_version() {
        let p = problems(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}));
        assert_eq!(
            p.iter().map(|p| p.field.as_str()).collect::<Vec<_>>(),
            ["apiVersion", "kind"]
        );
        assert!(p[1].problem.contains("OpenClawInstance"));
        assert_eq!(problems(json!("just a string"))[0].field, "");
    }

    #[test]
    fn bad_values() {
        assert_eq!(
            fields(instance(json!({"version": "2026.7.1", "replicas": -1}))),
            ["spec.replicas"]
        );
        assert_eq!(
            fields(instance(json!({"version": "2026.7.1", "replicas": 100000}))),
            ["spec.replicas"]
        );
        let p = problems(instance(
            json!({"version": "2026.7.1", "resources": {"memory": "4GB"}}),
        ));
        assert_eq!(p[0].field, "spec.resources.memory");
        assert!(p[0].problem.contains("4Gi"));
        assert_eq!(fields(instance(json!({"version": "7"}))), ["spec.version"]);
        assert_eq!(fields(instance(json!({}))), ["spec.version"]);
        assert_eq!(
            fields(instance(json!({"image": "bad image"}))),
            ["spec.image"]
        );
        assert_eq!(
            fields(instance(json!({"version": "2026.7.1", "env": {"1X": "a"}}))),
            ["spec.env.1X"]
        );
        assert_eq!(
            fields(instance(
                json!({"version": "2026.7.1", "env": {"OPENCLAW_CONFIG_PATH": "/x"}})
            )),
            ["spec.env.OPENCLAW_CONFIG_PATH"]
        );
        assert_eq!(
            fields(instance(json!({"version": "2026.7.1", "config": "x"}))),
            ["spec.config"]
        );
        assert_eq!(
            fields(instance(
                json!({"version": "2026.7.1", "resources": {"cpu": "lots", "pids": 2}})
            )),
            ["spec.resources.cpu", "spec.resources.pids"]
        );
    }

    #[test]
    fn names_and_scopes() {
        let mut v = instance(json!({"version": "2026.7.1"}));
        v["metadata"]["name"] = json!("Support_Bot");
        assert_eq!(fields(v), ["metadata.name"]);
        let mut v = instance(json!({"version": "2026.7.1"}));
        v["metadata"].as_object_mut().unwrap().remove("project");
        assert_eq!(fields(v), ["metadata.project"]);
        let t = json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": "acme", "tenant": "x"}});
        assert_eq!(fields(t), ["metadata.tenant"]);
    }

    #[test]
    fn size_limit() {
        let big = "x".repeat(MAX_OBJECT_BYTES);
        let p = problems(instance(
            json!({"version": "2026.7.1", "config": {"blob": big}}),
        ));
        assert_eq!(p.len(), 1);
        assert!(p[0].problem.contains("at most"), "{}", p[0].problem);
    }
}
