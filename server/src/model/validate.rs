//! Rules on values: names, scopes, replicas, quantities, versions, env, labels, sizes.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
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
/// Largest value of one environment variable.
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// Most labels in one map (`metadata.labels`, a host selector, a host's labels). Each key is at
/// most 253 + 1 + 63 characters and each value at most 63, so a full map stays under 25 KiB.
pub const MAX_LABELS: usize = 64;
/// Longest host name (a DNS name is at most 253 characters).
pub const MAX_HOSTNAME_BYTES: usize = 253;
/// Longest agent version, operating system or architecture a host reports.
const MAX_HOST_FACT_BYTES: usize = 64;
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

/// Decodes a JSON value into a typed request or object; what does not fit is reported as one
/// [`FieldProblem`] in the project's words (see [`serde_problem`]).
pub fn decode_typed<T: DeserializeOwned>(value: Value) -> Result<T, FieldProblem> {
    serde_path_to_error::deserialize(value).map_err(serde_problem)
}

/// Turns a decoding error into the project's wording, the same for every endpoint and for the
/// CLI: `missing field 'name'` under `metadata` becomes `metadata.name: is required`;
/// `invalid type: floating point 1e23, expected i64` at `spec.replicas` becomes
/// `must be a whole number between 0 and 100, found 1e23`; no backticks.
pub fn serde_problem<E: fmt::Display>(e: serde_path_to_error::Error<E>) -> FieldProblem {
    let path = match e.path().to_string() {
        p if p == "." => String::new(),
        p => p,
    };
    let msg = e.into_inner().to_string();
    if let Some(name) = msg
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        let field = if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        };
        return FieldProblem::new(field, "is required");
    }
    let mismatch = msg
        .strip_prefix("invalid type: ")
        .or_else(|| msg.strip_prefix("invalid value: "))
        .and_then(|rest| rest.rsplit_once(", expected "));
    if let Some((found, expected)) = mismatch {
        let problem = format!(
            "must be {}, found {}",
            expected_words(&path, expected),
            found_words(found)
        );
        return FieldProblem::new(path, problem);
    }
    let problem = match msg.strip_prefix("unknown variant ") {
        Some(rest) => format!("unknown value {rest}"),
        None => msg,
    };
    FieldProblem::new(path, problem.replace('`', "'"))
}

/// The allowed range of a whole-number field, where the rules give one.
fn whole_number_range(path: &str) -> Option<(i64, i64)> {
    match path {
        "spec.replicas" | "replicas" => Some((0, MAX_REPLICAS)),
        "spec.resources.pids" => Some((MIN_PIDS, MAX_PIDS)),
        _ => None,
    }
}

/// serde's name of an expected type, in words.
fn expected_words(path: &str, expected: &str) -> String {
    let integer = [
        "i8", "i16", "i32", "i64", "i128", "isize", "u8", "u16", "u32", "u64", "u128", "usize",
    ];
    if integer.contains(&expected) {
        return match whole_number_range(path) {
            Some((lo, hi)) => format!("a whole number between {lo} and {hi}"),
            None if expected.starts_with('u') => "a whole number, 0 or more".to_string(),
            None => "a whole number".to_string(),
        };
    }
    match expected {
        "f32" | "f64" => "a number".into(),
        "a map" | "map" => "a mapping".into(),
        "a sequence" | "sequence" => "a list".into(),
        "a borrowed string" => "a string".into(),
        e if e.starts_with("struct ") => "a mapping".into(),
        e => e.replace('`', "'"),
    }
}

/// serde's description of a value found, in words.
fn found_words(found: &str) -> String {
    let quoted = |prefix: &str| {
        found
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('`'))
            .and_then(|r| r.strip_suffix('`'))
            .map(str::to_string)
    };
    if let Some(f) = quoted("floating point ") {
        return f.replace("e+", "e");
    }
    if let Some(v) = quoted("integer ").or_else(|| quoted("boolean ")) {
        return v;
    }
    match found {
        "map" => "a mapping".into(),
        "sequence" => "a list".into(),
        "unit value" | "null" => "null".into(),
        f => match f.strip_prefix("string ") {
            Some(s) => format!("the string {s}"),
            None => f.replace('`', "'"),
        },
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

fn validate_env_value(value: &str) -> Result<(), String> {
    if value.contains('\0') {
        return Err(
            "holds a NUL character, which an environment variable cannot carry".to_string(),
        );
    }
    if value.len() > MAX_ENV_VALUE_BYTES {
        return Err(format!(
            "the value is {} bytes; at most {} KiB are allowed",
            value.len(),
            MAX_ENV_VALUE_BYTES / 1024
        ));
    }
    Ok(())
}

/// A short, single-line text a host reports about itself.
fn check_host_text(field: &str, value: &str, max: usize, out: &mut Vec<FieldProblem>) {
    if value.len() > max {
        out.push(FieldProblem::new(
            field,
            format!("is {} bytes long; at most {max} are allowed", value.len()),
        ));
    } else if value.chars().any(char::is_control) {
        out.push(FieldProblem::new(
            field,
            "must not contain control characters",
        ));
    }
}

fn check_labels<'a>(
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
    path: &str,
    out: &mut Vec<FieldProblem>,
) {
    if labels.len() > MAX_LABELS {
        out.push(FieldProblem::new(
            path,
            format!(
                "has {} labels; at most {MAX_LABELS} are allowed",
                labels.len()
            ),
        ));
        return;
    }
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
    match (kind, &m.tenant) {
        // A Rollout belongs to a tenant, or (without one) to the whole cluster.
        (Kind::Rollout, None) => {}
        _ => scope_field("tenant", &m.tenant, scope != Scope::Cluster),
    }
    match (kind, &m.project) {
        // A secret belongs to a tenant, or to one of its projects.
        (Kind::Secret, Some(p)) => {
            if let Err(e) = validate_dns_label(p) {
                out.push(FieldProblem::new("metadata.project", e));
            }
        }
        _ => scope_field("project", &m.project, scope == Scope::Project),
    }
    check_labels(m.labels.iter(), "metadata.labels", out);
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
            super::rollout::check_update_strategy(
                &s.update_strategy,
                s.termination_grace_period.as_deref(),
                &mut out,
            );
            super::check_failover(&s.failover, &mut out);
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
            for (name, value) in &s.env {
                let checked = validate_env_name(name).and_then(|()| match value {
                    super::EnvValue::Plain(v) => validate_env_value(v),
                    super::EnvValue::SecretRef(r) => validate_dns_label(&r.name)
                        .and_then(|()| super::validate_secret_key(&r.key)),
                });
                if let Err(e) = checked {
                    out.push(FieldProblem::new(format!("spec.env.{name}"), e));
                }
            }
            if let Some(t) = &s.config_template
                && let Err(e) = validate_dns_label(t)
            {
                out.push(FieldProblem::new("spec.configTemplate", e));
            }
            check_labels(
                s.placement.host_selector.iter(),
                "spec.placement.hostSelector",
                &mut out,
            );
        }
        Resource::ConfigTemplate(t) => {
            if t.spec.description.as_ref().is_some_and(|d| d.len() > 1024) {
                out.push(FieldProblem::new(
                    "spec.description",
                    "at most 1024 characters",
                ));
            }
        }
        Resource::Rollout(r) => {
            super::waves::check_rollout(&r.spec, r.metadata.tenant.as_deref(), &mut out)
        }
        Resource::Secret(s) => {
            if s.spec.data.is_empty() {
                out.push(FieldProblem::new(
                    "spec.data",
                    "is required: the secret's keys and their values (every key, each time: the set replaces the stored one)",
                ));
            }
            if s.spec.data.len() > super::MAX_SECRET_KEYS {
                out.push(FieldProblem::new(
                    "spec.data",
                    format!(
                        "{} keys; at most {} are allowed",
                        s.spec.data.len(),
                        super::MAX_SECRET_KEYS
                    ),
                ));
            }
            for (k, v) in &s.spec.data {
                if let Err(e) = super::validate_secret_key(k) {
                    out.push(FieldProblem::new(format!("spec.data.{k}"), e));
                } else if v.0.len() > super::MAX_SECRET_VALUE_BYTES {
                    out.push(FieldProblem::new(
                        format!("spec.data.{k}"),
                        format!(
                            "the value is {} bytes; at most {} are allowed",
                            v.0.len(),
                            super::MAX_SECRET_VALUE_BYTES
                        ),
                    ));
                }
            }
        }
        Resource::Host(h) => {
            let s = &h.spec;
            check_host_text("spec.hostname", &s.hostname, MAX_HOSTNAME_BYTES, &mut out);
            for (field, value) in [
                ("spec.agentVersion", &s.agent_version),
                ("spec.os", &s.os),
                ("spec.arch", &s.arch),
            ] {
                if let Some(v) = value {
                    check_host_text(field, v, MAX_HOST_FACT_BYTES, &mut out);
                }
            }
            if let Err(e) = parse_cpu(s.capacity.cpu.as_str()) {
                out.push(FieldProblem::new("spec.capacity.cpu", e));
            }
            for (field, q) in [
                ("spec.capacity.memory", Some(&s.capacity.memory)),
                ("spec.capacity.disk", s.capacity.disk.as_ref()),
            ] {
                if let Some(Err(e)) = q.map(|q| parse_memory(q.as_str())) {
                    out.push(FieldProblem::new(field, e));
                }
            }
        }
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
    fn env_values_and_host_facts_are_bounded() {
        let p = problems(instance(json!({"version": "2026.7.1",
            "env": {"A": "a\u{0}b", "B": "x".repeat(MAX_ENV_VALUE_BYTES + 1),
                    "C": "x".repeat(MAX_ENV_VALUE_BYTES), "D": "two\nlines"}})));
        assert_eq!(
            p.iter().map(|p| p.field.as_str()).collect::<Vec<_>>(),
            ["spec.env.A", "spec.env.B"]
        );
        assert!(p[0].problem.contains("NUL"), "{}", p[0].problem);
        let host = |hostname: &str, os: &str| {
            json!({"apiVersion": "clusterclaw.io/v1", "kind": "Host", "metadata": {"name": "h1"},
                   "spec": {"hostname": hostname, "os": os, "capacity": {"cpu": "4", "memory": "8Gi"}}})
        };
        assert_eq!(
            fields(host("node-1.example.com", "linux")),
            Vec::<String>::new()
        );
        assert_eq!(
            fields(host(&"h".repeat(MAX_HOSTNAME_BYTES + 1), "linux\n")),
            ["spec.hostname", "spec.os"]
        );
    }

    #[test]
    fn serde_problems_are_in_words() {
        let p = problems(instance(json!({"version": "2026.7.1", "replicas": 1e23})));
        assert_eq!(
            p,
            [FieldProblem::new(
                "spec.replicas",
                "must be a whole number between 0 and 100, found 1e23"
            )]
        );
        let p = problems(instance(
            json!({"version": "2026.7.1", "resources": {"pids": "many"}}),
        ));
        assert_eq!(
            p[0].problem,
            "must be a whole number between 16 and 65536, found the string \"many\""
        );
        let p = problems(instance(json!({"version": "2026.7.1", "env": []})));
        assert_eq!(p[0].problem, "must be a mapping, found a list");
        let p =
            problems(json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {}}));
        assert_eq!(p, [FieldProblem::new("metadata.name", "is required")]);
        let p = problems(instance(json!({"version": "2026.7.1", "replicaz": 1})));
        assert!(!p[0].problem.contains('`'), "{}", p[0].problem);
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
    fn label_counts_are_bounded() {
        let labels: serde_json::Map<String, serde_json::Value> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), json!("v")))
            .collect();
        let mut v = instance(json!({"version": "2026.7.1"}));
        v["metadata"]["labels"] = serde_json::Value::Object(labels.clone());
        v["spec"]["placement"] = json!({"hostSelector": labels});
        let found = problems(v);
        let found: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            found,
            [
                "metadata.labels: has 65 labels; at most 64 are allowed",
                "spec.placement.hostSelector: has 65 labels; at most 64 are allowed"
            ]
        );
        let fits: serde_json::Map<String, serde_json::Value> = (0..MAX_LABELS)
            .map(|i| (format!("example.com/k{i}"), json!("v".repeat(63))))
            .collect();
        let mut v = instance(json!({"version": "2026.7.1"}));
        v["metadata"]["labels"] = serde_json::Value::Object(fits);
        assert_eq!(problems(v), vec![]);
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
