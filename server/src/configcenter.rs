//! What the config center decides, without I/O: the layers under an instance, whether its
//! effective `openclaw.json` may be published, and the hashes that say what a replica runs.
//!
//! Layers, bottom to top: the built-in Gateway settings, the instance's `ConfigTemplate`
//! (`spec.configTemplate`, `default` when not named), its tenant's `spec.config`, its
//! project's `spec.config`, and its own `spec.config`, merged by JSON merge patch (RFC 7396).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::model::{
    ConfigTemplate, EnvValue, FieldProblem, Kind, ObjectKey, OpenClawInstance, Project, Tenant,
};
use crate::openclaw::layers::{self, Layer, LayerKind};
use crate::openclaw::schema::Schema;
use crate::openclaw::secretref::{self, SecretRef};
use crate::util::hex;

/// The secrets' keyring, shared by the API (which seals and rotates) and the assignment book
/// (which opens); `None` when the server has no key file.
pub type SharedKeyring =
    std::sync::Arc<std::sync::RwLock<Option<std::sync::Arc<crate::secrets::Keyring>>>>;

/// The keyring in effect.
pub fn current_keyring(k: &SharedKeyring) -> Option<std::sync::Arc<crate::secrets::Keyring>> {
    k.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The template an instance uses when it names none.
pub const DEFAULT_TEMPLATE: &str = "default";
/// Most problems reported for one change.
const MAX_PROBLEMS: usize = 20;

/// One layer, owned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OwnedLayer {
    pub kind: LayerKind,
    pub source: String,
    #[serde(skip)]
    pub patch: Value,
}

/// The name and source of a layer, as a revision records them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    pub kind: LayerKind,
    pub source: String,
}

/// The template an instance's layers start from.
pub fn template_name(instance: &OpenClawInstance) -> &str {
    instance
        .spec
        .config_template
        .as_deref()
        .unwrap_or(DEFAULT_TEMPLATE)
}

/// The layers of `instance`, bottom first: empty tenant, project and instance layers are left
/// out; the template layer is there when the template exists.
pub fn layers_of(
    instance: &OpenClawInstance,
    template: Option<&ConfigTemplate>,
    tenant: Option<&Tenant>,
    project: Option<&Project>,
) -> Vec<OwnedLayer> {
    let mut out = vec![OwnedLayer {
        kind: LayerKind::Builtin,
        source: "builtin".into(),
        patch: layers::builtin(),
    }];
    if let Some(t) = template {
        out.push(OwnedLayer {
            kind: LayerKind::Template,
            source: t.key().to_string(),
            patch: t.spec.config.as_value(),
        });
    }
    if let Some(t) = tenant.filter(|t| !t.spec.config.is_empty()) {
        out.push(OwnedLayer {
            kind: LayerKind::Tenant,
            source: t.key().to_string(),
            patch: t.spec.config.as_value(),
        });
    }
    if let Some(p) = project.filter(|p| !p.spec.config.is_empty()) {
        out.push(OwnedLayer {
            kind: LayerKind::Project,
            source: p.key().to_string(),
            patch: p.spec.config.as_value(),
        });
    }
    if !instance.spec.config.is_empty() {
        out.push(OwnedLayer {
            kind: LayerKind::Instance,
            source: instance.key().to_string(),
            patch: instance.spec.config.as_value(),
        });
    }
    if instance.spec.metrics.gateway {
        out.push(OwnedLayer {
            kind: LayerKind::Instance,
            source: format!("{}#spec.metrics.gateway", instance.key()),
            patch: gateway_metrics_patch(),
        });
    }
    out
}

/// What `spec.metrics.gateway: true` sets over every other layer: the Gateway's diagnostics
/// and its Prometheus plugin (the agent scrapes `/api/diagnostics/prometheus`).
pub fn gateway_metrics_patch() -> Value {
    serde_json::json!({
        "diagnostics": { "enabled": true },
        "plugins": { "entries": { "diagnostics-prometheus": { "enabled": true } } },
    })
}

/// Borrowed layers, for the merge functions.
pub fn borrowed(layers: &[OwnedLayer]) -> Vec<Layer<'_>> {
    layers
        .iter()
        .map(|l| Layer {
            kind: l.kind,
            source: l.source.clone(),
            patch: &l.patch,
        })
        .collect()
}

pub fn layer_refs(layers: &[OwnedLayer]) -> Vec<LayerRef> {
    layers
        .iter()
        .map(|l| LayerRef {
            kind: l.kind,
            source: l.source.clone(),
        })
        .collect()
}

/// The effective config of these layers (secret references left in place).
pub fn render(layers: &[OwnedLayer]) -> Value {
    layers::render(&borrowed(layers))
}

/// Hex SHA-256 of a config's canonical text (the text a revision stores).
pub fn config_text_hash(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// What a secret lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretLookup {
    /// The secret exists (in the project, or else in the tenant) with these keys.
    Found {
        keys: Vec<String>,
    },
    Missing,
}

/// Everything wrong with publishing `effective` for `instance`: schema problems and secret
/// references (in the config and in `env`) that do not resolve. `origins` says which layer
/// set a key, so a problem is named where it was written.
pub fn check(
    instance: &OpenClawInstance,
    layers: &[OwnedLayer],
    effective: &Value,
    schema: &Schema,
    lookup: &mut dyn FnMut(&SecretRef) -> SecretLookup,
) -> Vec<FieldProblem> {
    let mut out = Vec::new();
    let key = instance.key();
    // Which layer set a key: worked out only when there is a problem to name.
    let explained = std::cell::OnceCell::new();
    let source_of = |path: &str| -> Option<String> {
        let origins = explained.get_or_init(|| layers::explain(&borrowed(layers)).1);
        origins
            .iter()
            .filter(|o| path == o.path || path.starts_with(&format!("{}.", o.path)))
            .map(|o| o.source.clone())
            .next_back()
            .or_else(|| {
                origins
                    .iter()
                    .filter(|o| o.path.starts_with(&format!("{path}.")))
                    .map(|o| o.source.clone())
                    .next_back()
            })
    };
    if let Err(problems) = schema.validate(effective) {
        for p in problems {
            let at = if p.path.is_empty() {
                "the top level".to_string()
            } else {
                p.path.clone()
            };
            let by = source_of(&p.path)
                .map(|s| format!(" (set by {s})"))
                .unwrap_or_default();
            out.push(FieldProblem::new(
                format!("spec.config.{}", p.path).trim_end_matches('.'),
                format!("effective openclaw.json of {key}: {at}: {}{by}", p.reason),
            ));
        }
    }
    match secretref::find_refs(effective) {
        Err(p) => out.push(FieldProblem::new(
            format!("spec.config.{}", p.path),
            format!("effective openclaw.json of {key}: {}", p.reason),
        )),
        Ok(refs) => {
            for (path, r) in refs {
                if let Some(problem) = missing(&key, &r, lookup) {
                    let by = source_of(&path)
                        .map(|s| format!(" (set by {s})"))
                        .unwrap_or_default();
                    out.push(FieldProblem::new(
                        format!("spec.config.{path}"),
                        format!("{problem}{by}"),
                    ));
                }
            }
        }
    }
    for (name, v) in &instance.spec.env {
        if let EnvValue::SecretRef(r) = v
            && let Some(problem) = missing(&key, r, lookup)
        {
            out.push(FieldProblem::new(format!("spec.env.{name}"), problem));
        }
    }
    out.truncate(MAX_PROBLEMS);
    out
}

fn missing(
    instance: &ObjectKey,
    r: &SecretRef,
    lookup: &mut dyn FnMut(&SecretRef) -> SecretLookup,
) -> Option<String> {
    match lookup(r) {
        SecretLookup::Missing => Some(format!(
            "secret {:?} not found: {} looks for it in project {}/{} and then in tenant {}",
            r.name, instance, instance.tenant, instance.project, instance.tenant
        )),
        SecretLookup::Found { keys } if !keys.contains(&r.key) => Some(format!(
            "secret {:?} has no key {:?}; its keys are: {}",
            r.name,
            r.key,
            if keys.is_empty() {
                "(none)".to_string()
            } else {
                keys.join(", ")
            }
        )),
        SecretLookup::Found { .. } => None,
    }
}

/// The secrets an instance references, from its effective config and its env.
pub fn references(instance: &OpenClawInstance, effective: &Value) -> Vec<SecretRef> {
    let mut refs: Vec<SecretRef> = secretref::find_refs(effective)
        .map(|v| v.into_iter().map(|(_, r)| r).collect())
        .unwrap_or_default();
    refs.extend(
        instance
            .spec
            .env
            .values()
            .filter_map(|v| v.secret_ref().cloned()),
    );
    refs.sort();
    refs.dedup();
    refs
}

/// The key of the secret `r` names for an instance in `tenant`/`project`: the project's
/// secret of that name when there is one, else the tenant's.
pub fn secret_keys(tenant: &str, project: &str, r: &SecretRef) -> [ObjectKey; 2] {
    let mk = |project: &str| ObjectKey {
        kind: Kind::Secret,
        tenant: tenant.to_string(),
        project: project.to_string(),
        name: r.name.clone(),
    };
    [mk(project), mk("")]
}

/// Hex SHA-256 of what the container must really have: the config file's bytes and the value
/// of each variable of `env`. The agent measures the same over the file on the host and the
/// container's environment (a missing variable counts as `KEY\x01`).
pub fn content_hash(config_bytes: &[u8], env: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    h.update(b"openclaw.json\0");
    h.update(config_bytes);
    h.update(b"\0");
    for (k, v) in env {
        h.update(k.as_bytes());
        h.update(b"=");
        h.update(v.as_bytes());
        h.update(b"\0");
    }
    hex(&h.finalize())
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_gateway_metrics_switch_sets_the_diagnostics_keys_over_every_layer() {
        let mut instance: OpenClawInstance = serde_json::from_value(serde_json::json!({
            "apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
            "metadata": {"name": "bot", "tenant": "t", "project": "p"},
            "spec": {"config": {"diagnostics": {"enabled": false}}, "metrics": {"gateway": true}}
        }))
        .unwrap();
        let config = render(&layers_of(&instance, None, None, None));
        assert_eq!(config["diagnostics"]["enabled"], true);
        assert_eq!(
            config["plugins"]["entries"]["diagnostics-prometheus"]["enabled"],
            true
        );
        assert_eq!(
            crate::openclaw::schema::Schema::builtin().validate(&config),
            Ok(())
        );
        instance.spec.metrics.gateway = false;
        let config = render(&layers_of(&instance, None, None, None));
        assert_eq!(config["diagnostics"]["enabled"], false);
        let bad = serde_json::from_value::<OpenClawInstance>(serde_json::json!({
            "apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
            "metadata": {"name": "bot", "tenant": "t", "project": "p"},
            "spec": {"metrics": {"gateways": true}}
        }));
        assert!(bad.unwrap_err().to_string().contains("gateways"));
    }

    use super::*;
    use serde_json::json;

    fn instance(v: Value) -> OpenClawInstance {
        serde_json::from_value(v).unwrap()
    }

    fn base(spec: Value) -> OpenClawInstance {
        let mut spec = spec;
        spec["version"] = json!("2026.7.1");
        instance(json!({
            "apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
            "metadata": {"name": "bot", "tenant": "acme", "project": "helpdesk"},
            "spec": spec,
        }))
    }

    #[test]
    fn content_hash_matches_the_documented_vector() {
        let env = BTreeMap::from([("B".to_string(), "x".to_string()), ("A".into(), "1".into())]);
        assert_eq!(
            content_hash(br#"{"gateway":{"bind":"lan"}}"#, &env),
            "6f452c0c3f97cd7e28d64d3202f198dff3e0d6288d0ba55e9b8beec8d9b0fd92"
        );
    }

    #[test]
    fn layers_skip_what_is_empty_and_keep_the_order() {
        let i = base(json!({"config": {"logging": {"level": "debug"}}}));
        let t: Tenant = serde_json::from_value(json!({
            "apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": "acme"},
            "spec": {"config": {"logging": {"level": "info"}}}
        }))
        .unwrap();
        let p: Project = serde_json::from_value(json!({
            "apiVersion": "clusterclaw.io/v1", "kind": "Project",
            "metadata": {"name": "helpdesk", "tenant": "acme"}
        }))
        .unwrap();
        let l = layers_of(&i, None, Some(&t), Some(&p));
        let kinds: Vec<LayerKind> = l.iter().map(|l| l.kind).collect();
        assert_eq!(
            kinds,
            [LayerKind::Builtin, LayerKind::Tenant, LayerKind::Instance]
        );
        let eff = render(&l);
        assert_eq!(eff["logging"]["level"], "debug");
        assert_eq!(eff["gateway"]["port"], 18789);
    }

    #[test]
    fn missing_secrets_and_keys_are_named() {
        let i = base(json!({"env": {"K": {"secretRef": {"name": "llm", "key": "anthropic"}}}}));
        let l = layers_of(&i, None, None, None);
        let eff = render(&l);
        let schema = Schema::builtin();
        let p = check(&i, &l, &eff, &schema, &mut |_| SecretLookup::Missing);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].field, "spec.env.K");
        assert!(
            p[0].problem.contains("secret \"llm\" not found"),
            "{}",
            p[0]
        );
        let p = check(&i, &l, &eff, &schema, &mut |_| SecretLookup::Found {
            keys: vec!["openai".into()],
        });
        assert!(
            p[0].problem
                .contains("has no key \"anthropic\"; its keys are: openai"),
            "{}",
            p[0]
        );
        let p = check(&i, &l, &eff, &schema, &mut |_| SecretLookup::Found {
            keys: vec!["anthropic".into()],
        });
        assert!(p.is_empty(), "{p:?}");
    }
}
