//! Finding objects by kind and name: REST paths, and the tenant/project of a name given alone.

use serde_json::Value;

use super::CliError;
use super::client::{ApiError, Client, with_query};
use super::settings::Settings;
use crate::model::{Kind, ObjectKey, Scope, validate_dns_label};

/// Parses a kind as typed on the command line (`instances`, `inst`, `tn`, ...).
pub fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::from_user(s).ok_or_else(|| {
        format!("unknown kind {s:?}; the kinds are tenants (tn), projects (pj), instances (inst), hosts (ho), configtemplates (ct) and secrets (sec)")
    })
}

/// The REST path of one object.
pub fn object_path(key: &ObjectKey) -> String {
    match key.kind {
        Kind::Tenant => format!("/api/v1/tenants/{}", key.name),
        Kind::Host => format!("/api/v1/hosts/{}", key.name),
        Kind::ConfigTemplate => format!("/api/v1/configtemplates/{}", key.name),
        Kind::Secret if key.project.is_empty() => {
            format!("/api/v1/tenants/{}/secrets/{}", key.tenant, key.name)
        }
        Kind::Secret => format!(
            "/api/v1/tenants/{}/projects/{}/secrets/{}",
            key.tenant, key.project, key.name
        ),
        Kind::Project => format!("/api/v1/tenants/{}/projects/{}", key.tenant, key.name),
        Kind::OpenClawInstance => {
            format!(
                "/api/v1/tenants/{}/projects/{}/instances/{}",
                key.tenant, key.project, key.name
            )
        }
    }
}

/// The REST path of a list, scoped by tenant and project where the kind has them.
pub fn list_path(
    kind: Kind,
    tenant: Option<&str>,
    project: Option<&str>,
    selector: Option<&str>,
) -> String {
    let base = format!("/api/v1/{}", kind.plural());
    match kind.scope() {
        Scope::Cluster => with_query(&base, &[("labelSelector", selector)]),
        Scope::Tenant => with_query(&base, &[("tenant", tenant), ("labelSelector", selector)]),
        Scope::Project => with_query(
            &base,
            &[
                ("tenant", tenant),
                ("project", project),
                ("labelSelector", selector),
            ],
        ),
    }
}

/// `openclawinstance/acme/helpdesk/bot`-style identity from an object as the server sends it.
pub fn key_of(kind: Kind, obj: &Value) -> ObjectKey {
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let scope = kind.scope();
    ObjectKey {
        kind,
        tenant: if scope == Scope::Cluster {
            String::new()
        } else {
            s("/metadata/tenant")
        },
        project: if scope == Scope::Project {
            s("/metadata/project")
        } else {
            String::new()
        },
        name: s("/metadata/name"),
    }
}

fn check_name(what: &str, name: &str) -> Result<(), CliError> {
    validate_dns_label(name).map_err(|e| CliError::Usage(format!("{what} {name:?}: {e}")))
}

fn not_found(message: String) -> CliError {
    CliError::Api(ApiError {
        status: 404,
        code: "NotFound".into(),
        message,
        details: Vec::new(),
    })
}

/// Finds one object. A project or instance named without its tenant (or project) is looked up
/// in every tenant (project) the settings leave open; several matches are an error that lists
/// them.
pub async fn find(
    client: &Client,
    settings: &Settings,
    kind: Kind,
    name: &str,
) -> Result<(ObjectKey, Value), CliError> {
    check_name(kind.lower(), name)?;
    let tenant = settings.tenant.as_deref();
    let project = settings.project.as_deref();
    for (what, v) in [("tenant", tenant), ("project", project)] {
        if let Some(v) = v {
            check_name(what, v)?;
        }
    }
    let exact = match kind.scope() {
        Scope::Cluster => Some(ObjectKey::cluster(kind, name)),
        Scope::Tenant => tenant.map(|t| ObjectKey::project(t, name)),
        Scope::Project => match (tenant, project) {
            (Some(t), Some(p)) => Some(ObjectKey::instance(t, p, name)),
            _ => None,
        },
    };
    if let Some(key) = exact {
        return match client.get_opt(&object_path(&key)).await? {
            Some(obj) => Ok((key, obj)),
            None => Err(not_found(format!("{key} not found"))),
        };
    }
    let list = client.get(&list_path(kind, tenant, project, None)).await?;
    let mut hits: Vec<Value> = list
        .get("items")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter(|o| o.pointer("/metadata/name").and_then(Value::as_str) == Some(name))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let searched = match (tenant, kind.scope()) {
        (Some(t), _) => format!("in tenant {t}"),
        (None, Scope::Tenant) => "in any tenant".to_string(),
        (None, _) => "in any tenant or project".to_string(),
    };
    match hits.len() {
        0 => Err(not_found(format!(
            "no {} named {name} {searched}",
            kind.lower()
        ))),
        1 => {
            let obj = hits.remove(0);
            Ok((key_of(kind, &obj), obj))
        }
        _ => {
            let places: Vec<String> = hits.iter().map(|o| key_of(kind, o).to_string()).collect();
            let flags = if kind.scope() == Scope::Project {
                "-t TENANT -p PROJECT"
            } else {
                "-t TENANT"
            };
            Err(CliError::Usage(format!(
                "{} {name} exists in several places: {}; choose one with {flags}",
                kind.lower(),
                places.join(", ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths() {
        assert_eq!(
            object_path(&ObjectKey::instance("acme", "helpdesk", "bot")),
            "/api/v1/tenants/acme/projects/helpdesk/instances/bot"
        );
        assert_eq!(
            object_path(&ObjectKey::cluster(Kind::Host, "h1")),
            "/api/v1/hosts/h1"
        );
        assert_eq!(
            list_path(Kind::OpenClawInstance, Some("acme"), None, Some("team=a")),
            "/api/v1/instances?tenant=acme&labelSelector=team%3Da"
        );
        assert_eq!(
            list_path(Kind::Tenant, Some("acme"), Some("x"), None),
            "/api/v1/tenants"
        );
        assert_eq!(
            list_path(Kind::Project, Some("acme"), Some("x"), None),
            "/api/v1/projects?tenant=acme"
        );
    }

    #[test]
    fn kinds_by_alias() {
        assert_eq!(parse_kind("inst"), Ok(Kind::OpenClawInstance));
        assert_eq!(parse_kind("Tenants"), Ok(Kind::Tenant));
        assert!(parse_kind("pods").unwrap_err().contains("instances (inst)"));
    }

    #[test]
    fn keys_of_served_objects() {
        let obj = json!({"metadata": {"name": "bot", "tenant": "acme", "project": "helpdesk"}});
        assert_eq!(
            key_of(Kind::OpenClawInstance, &obj).to_string(),
            "openclawinstance/acme/helpdesk/bot"
        );
        assert_eq!(key_of(Kind::Project, &obj).to_string(), "project/acme/bot");
    }
}
