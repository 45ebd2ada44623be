//! Finding objects by kind and name: REST paths, and the tenant/project of a name given alone.

use serde_json::Value;

use super::CliError;
use super::client::{ApiError, Client, with_query};
use super::settings::Settings;
use crate::model::{Kind, ObjectKey, Scope, validate_dns_label};

/// Parses a kind as typed on the command line (`instances`, `inst`, `tn`, ...). An unknown
/// kind names the nearest known name, or else every kind.
pub fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::from_user(s).ok_or_else(|| match nearest_kind_name(s) {
        Some(name) => format!("unknown kind {s:?}; did you mean {name:?}?"),
        None => format!("unknown kind {s:?}; the kinds are {}", kind_list()),
    })
}

/// The known kind name closest to `typed` (edit distance, a swap of two letters counting as
/// one), if it is close enough to be a typo: at most 2 edits, and fewer than half its length.
pub fn nearest_kind_name(typed: &str) -> Option<&'static str> {
    let typed = typed.to_ascii_lowercase();
    Kind::ALL
        .iter()
        .flat_map(|k| k.user_names().iter().copied())
        .map(|name| (strsim::damerau_levenshtein(&typed, name), name))
        .filter(|(d, name)| *d <= 2 && 2 * d < name.len().min(typed.len().max(1)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, name)| name)
}

/// `tenants (tenant, tn), projects (...), ... and secrets (...)`.
fn kind_list() -> String {
    let all: Vec<String> = Kind::ALL
        .iter()
        .map(|k| {
            let names = k.user_names();
            format!("{} ({})", names[0], names[1..].join(", "))
        })
        .collect();
    let (last, rest) = all.split_last().expect("there are kinds");
    format!("{} and {last}", rest.join(", "))
}

/// Help of a KIND argument.
pub fn kind_arg_help() -> String {
    let plurals: Vec<&str> = Kind::ALL.iter().map(|k| k.user_names()[0]).collect();
    format!(
        "Kind of object: {} (or another name listed below)",
        plurals.join(", ")
    )
}

/// The table of kinds and the names each may be typed as, for the help of commands that take
/// a KIND.
pub fn kinds_help() -> String {
    let width = Kind::ALL
        .iter()
        .map(|k| k.user_names()[0].len())
        .max()
        .unwrap_or(0);
    let mut text = String::from("Kinds (any case; the other names are aliases):\n");
    for k in Kind::ALL {
        let names = k.user_names();
        text.push_str(&format!(
            "  {:width$}  {}\n",
            names[0],
            names[1..].join(", ")
        ));
    }
    text
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
        Kind::Rollout if key.tenant.is_empty() => format!("/api/v1/rollouts/{}", key.name),
        Kind::Rollout => format!("/api/v1/tenants/{}/rollouts/{}", key.tenant, key.name),
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
        // A tenant's Rollouts have their own path, which its tenant-admin may read.
        Scope::Tenant if kind == Kind::Rollout && tenant.is_some() => with_query(
            &format!("/api/v1/tenants/{}/rollouts", tenant.unwrap_or_default()),
            &[("labelSelector", selector)],
        ),
        Scope::Tenant if kind != Kind::Secret => {
            with_query(&base, &[("tenant", tenant), ("labelSelector", selector)])
        }
        // Secrets: a project's, when a project is given.
        Scope::Tenant | Scope::Project => with_query(
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
        // A secret may belong to a project of its tenant.
        project: if scope == Scope::Project || kind == Kind::Secret {
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

/// The object a name means when its tenant (and project) are known: a secret is the tenant's
/// without a project and the project's with one, as `secret set` decides.
fn exact_key(
    kind: Kind,
    tenant: Option<&str>,
    project: Option<&str>,
    name: &str,
) -> Option<ObjectKey> {
    match kind {
        Kind::Tenant | Kind::Host | Kind::ConfigTemplate => Some(ObjectKey::cluster(kind, name)),
        Kind::Project => tenant.map(|t| ObjectKey::project(t, name)),
        Kind::Secret => tenant.map(|t| ObjectKey {
            kind,
            tenant: t.to_string(),
            project: project.unwrap_or_default().to_string(),
            name: name.to_string(),
        }),
        Kind::OpenClawInstance => match (tenant, project) {
            (Some(t), Some(p)) => Some(ObjectKey::instance(t, p, name)),
            _ => None,
        },
        // Without a tenant: searched among every Rollout (cluster-wide ones have none).
        Kind::Rollout => tenant.map(|t| ObjectKey {
            kind,
            tenant: t.to_string(),
            project: String::new(),
            name: name.to_string(),
        }),
    }
}

/// Finds one object. A project, secret or instance named without its tenant (or project) is
/// looked up in every tenant (project) the settings leave open; several matches are an error
/// that lists them.
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
    let exact = exact_key(kind, tenant, project, name);
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
                // A project's secret only when a project is given (as `secret set` decides).
                .filter(|o| {
                    kind != Kind::Secret
                        || project.is_none_or(|p| {
                            o.pointer("/metadata/project").and_then(Value::as_str) == Some(p)
                        })
                })
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
            let flags = match kind {
                Kind::OpenClawInstance => "-t TENANT -p PROJECT",
                Kind::Secret => "-t TENANT (and -p PROJECT for a project's secret)",
                _ => "-t TENANT",
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
        assert_eq!(parse_kind("CT"), Ok(Kind::ConfigTemplate));
        assert_eq!(parse_kind("sec"), Ok(Kind::Secret));
        // Every listed name parses to its kind, and no name belongs to two kinds.
        for k in Kind::ALL {
            for name in k.user_names() {
                assert_eq!(parse_kind(name), Ok(k), "{name}");
            }
        }
        let e = parse_kind("pods").unwrap_err();
        assert!(
            e.starts_with("unknown kind \"pods\"; the kinds are tenants (tenant, tn), "),
            "{e}"
        );
        assert!(e.contains("instances (instance, inst, "), "{e}");
        assert!(e.ends_with(" and rollouts (rollout, ro)"), "{e}");
    }

    #[test]
    fn an_unknown_kind_suggests_the_nearest() {
        assert_eq!(
            parse_kind("hsots").unwrap_err(),
            "unknown kind \"hsots\"; did you mean \"hosts\"?"
        );
        for (typed, meant) in [
            ("hsots", "hosts"),
            ("Hsot", "host"),
            ("tennat", "tenant"),
            ("tenats", "tenants"),
            ("projcts", "projects"),
            ("instanses", "instances"),
            ("configtemplats", "configtemplates"),
            ("secrte", "secret"),
            ("tempalte", "template"),
        ] {
            assert_eq!(nearest_kind_name(typed), Some(meant), "{typed}");
        }
        // Too far from every name: no guess, the list of kinds instead.
        for typed in ["pods", "x", "deployments", "", "nodes"] {
            assert_eq!(nearest_kind_name(typed), None, "{typed}");
        }
    }

    #[test]
    fn help_lists_every_kind_with_its_aliases() {
        let help = kinds_help();
        for k in Kind::ALL {
            let names = k.user_names();
            let line = help
                .lines()
                .find(|l| l.split_whitespace().next() == Some(names[0]))
                .unwrap_or_else(|| panic!("{} missing from\n{help}", names[0]));
            assert!(line.ends_with(&names[1..].join(", ")), "{line}");
        }
        assert!(help.contains("  hosts            host, ho\n"), "{help}");
        assert!(kind_arg_help().contains("configtemplates, secrets"));
    }

    #[test]
    fn a_secret_is_the_tenants_without_a_project_and_the_projects_with_one() {
        assert_eq!(
            exact_key(Kind::Secret, Some("acme"), None, "llm-keys").map(|k| object_path(&k)),
            Some("/api/v1/tenants/acme/secrets/llm-keys".to_string())
        );
        assert_eq!(
            exact_key(Kind::Secret, Some("acme"), Some("helpdesk"), "llm-keys")
                .map(|k| object_path(&k)),
            Some("/api/v1/tenants/acme/projects/helpdesk/secrets/llm-keys".to_string())
        );
        assert_eq!(exact_key(Kind::Secret, None, Some("helpdesk"), "k"), None);
        assert_eq!(
            exact_key(Kind::Project, Some("acme"), Some("x"), "helpdesk"),
            Some(ObjectKey::project("acme", "helpdesk"))
        );
        assert_eq!(
            exact_key(Kind::OpenClawInstance, Some("acme"), None, "bot"),
            None
        );
        assert_eq!(
            list_path(Kind::Secret, Some("acme"), Some("helpdesk"), None),
            "/api/v1/secrets?tenant=acme&project=helpdesk"
        );
        assert_eq!(
            list_path(Kind::Secret, Some("acme"), None, None),
            "/api/v1/secrets?tenant=acme"
        );
    }

    #[test]
    fn keys_of_served_objects() {
        let obj = json!({"metadata": {"name": "bot", "tenant": "acme", "project": "helpdesk"}});
        assert_eq!(
            key_of(Kind::OpenClawInstance, &obj).to_string(),
            "openclawinstance/acme/helpdesk/bot"
        );
        assert_eq!(key_of(Kind::Project, &obj).to_string(), "project/acme/bot");
        // A found project secret keeps its project (its path is the project's).
        assert_eq!(
            key_of(Kind::Secret, &obj).to_string(),
            "secret/acme/helpdesk/bot"
        );
        let tenant_level = json!({"metadata": {"name": "k", "tenant": "acme"}});
        assert_eq!(
            object_path(&key_of(Kind::Secret, &tenant_level)),
            "/api/v1/tenants/acme/secrets/k"
        );
    }
}
