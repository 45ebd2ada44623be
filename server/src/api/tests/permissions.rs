//! Every operation of the served OpenAPI document, called by every kind of caller, in and out
//! of its scope, answers as README.md's permission table says; and that table is the code's.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::json;

use super::{Fixture, Reply, fixture, instance, project, tenant};
use crate::api::routes::{Lookup, Need};
use crate::auth::rbac::{PERMISSIONS, Res, Role, Verb};
use crate::store::{Store, TokenKind};

/// One cell of README.md's permission table.
#[derive(Debug, PartialEq, Eq)]
struct Cell {
    roles: BTreeSet<Role>,
    /// "without a tenant": only the cluster-wide holders of those roles.
    cluster_only: bool,
}

impl Cell {
    fn parse(text: &str) -> Cell {
        let roles = if text.contains("every role") {
            Role::ALL.into_iter().collect()
        } else {
            text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .filter_map(Role::parse)
                .collect()
        };
        Cell {
            roles,
            cluster_only: text.contains("without a tenant"),
        }
    }

    fn of_code(res: Res, verb: Verb) -> Cell {
        let rows: Vec<_> = PERMISSIONS
            .iter()
            .filter(|p| p.res == res && p.verb == verb)
            .collect();
        assert!(rows.len() <= 1, "{res:?} {verb:?} has {} rows", rows.len());
        Cell {
            roles: rows.iter().flat_map(|p| p.roles.iter().copied()).collect(),
            cluster_only: rows.iter().any(|p| p.cluster_only),
        }
    }

    fn allows(&self, role: Role, cluster_wide: bool) -> bool {
        self.roles.contains(&role) && (!self.cluster_only || cluster_wide)
    }
}

/// README.md's permission table: (row name, [read, write, delete]).
fn readme_table() -> Vec<(String, [Cell; 3])> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with("| resource | read | write | delete |"))
        .skip(2);
    let mut rows = Vec::new();
    for line in lines.by_ref().take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 4, "README permission row: {line}");
        rows.push((
            cells[0].to_string(),
            [
                Cell::parse(cells[1]),
                Cell::parse(cells[2]),
                Cell::parse(cells[3]),
            ],
        ));
    }
    assert!(!rows.is_empty(), "README.md has no permission table");
    rows
}

fn readme_cell(table: &[(String, [Cell; 3])], res: Res, verb: Verb) -> &Cell {
    let (_, cells) = table
        .iter()
        .find(|(name, _)| name == res.row_name())
        .unwrap_or_else(|| panic!("README.md has no row {:?}", res.row_name()));
    &cells[Verb::ALL.iter().position(|v| *v == verb).unwrap()]
}

#[test]
fn the_readme_table_is_the_code_table() {
    let table = readme_table();
    let names: BTreeSet<&str> = table.iter().map(|(n, _)| n.as_str()).collect();
    let expected: BTreeSet<&str> = Res::ALL.iter().map(|r| r.row_name()).collect();
    assert_eq!(names, expected, "README rows vs rbac::Res");
    assert_eq!(names.len(), table.len(), "a README row is listed twice");
    for res in Res::ALL {
        for verb in Verb::ALL {
            assert_eq!(
                readme_cell(&table, res, verb),
                &Cell::of_code(res, verb),
                "{} / {}",
                res.row_name(),
                verb.as_str()
            );
        }
    }
}

/// The row an operation of the OpenAPI document belongs to, worked out here from its tag and
/// path, apart from the declaration in the router: a route declared with the wrong resource
/// disagrees with this.
fn expected_need(tag: &str, path: &str, method: &Method) -> Need {
    let res = match tag {
        "health" => return Need::Open,
        "info" => Res::Info,
        "metrics" => Res::Metrics,
        "objects" => Res::Apply,
        "tenants" => Res::Tenants,
        "projects" => Res::Projects,
        "instances" | "config" | "rollout" => Res::Instances,
        "hosts"
            if path.ends_with("/cordon")
                || path.ends_with("/uncordon")
                || path.ends_with("/drain") =>
        {
            Res::HostScheduling
        }
        "hosts" => Res::Hosts,
        "tokens" => Res::Tokens,
        "audit" if path.ends_with("/verify") => Res::AuditChain,
        "audit" => Res::Audit,
        "configtemplates" => Res::Templates,
        "secrets" if path.ends_with("/rotate-key") => Res::SecretKey,
        "secrets" if *method == Method::GET => Res::Secrets,
        "secrets" if path.contains("/projects/{project}/secrets") => Res::ProjectSecrets,
        "secrets" => Res::TenantSecrets,
        "rollouts" if path.starts_with("/api/v1/tenants/") => Res::TenantRollouts,
        "rollouts" => Res::Rollouts,
        "events" => Res::Events,
        "volumes" => Res::Volumes,
        "servers" => Res::Servers,
        other => panic!("{method} {path}: no permission row known for the tag {other:?}"),
    };
    Need::Perm(res, Verb::of_method(method))
}

/// Who calls.
#[derive(Clone, Debug)]
enum Who {
    /// Without a usable API token: 401 everywhere but the probes.
    Nobody,
    Role {
        role: Role,
        tenant: Option<&'static str>,
        project: Option<&'static str>,
    },
}

struct Caller {
    label: &'static str,
    token: Option<String>,
    who: Who,
}

fn callers(f: &Fixture) -> Vec<Caller> {
    let role =
        |label, role: Role, tenant: Option<&'static str>, project: Option<&'static str>| Caller {
            label,
            token: Some(f.token_record(TokenKind::Api, role.as_str(), |r| {
                r.tenant = tenant.map(Into::into);
                r.project = project.map(Into::into);
            })),
            who: Who::Role {
                role,
                tenant,
                project,
            },
        };
    let nobody = |label, token| Caller {
        label,
        token,
        who: Who::Nobody,
    };
    vec![
        nobody("no token", None),
        nobody(
            "a join token",
            Some(f.token_record(TokenKind::Join, "", |_| {})),
        ),
        nobody(
            "an expired token",
            Some(f.token_record(TokenKind::Api, "platform-admin", |r| r.expires_at = Some(1))),
        ),
        nobody(
            "a revoked token",
            Some(f.token_record(TokenKind::Api, "platform-admin", |r| r.revoked = true)),
        ),
        nobody("a made-up token", Some(format!("cca_{}", "x".repeat(40)))),
        role("platform-admin", Role::PlatformAdmin, None, None),
        role(
            "tenant-admin of acme",
            Role::TenantAdmin,
            Some("acme"),
            None,
        ),
        role(
            "project-editor of acme/helpdesk",
            Role::ProjectEditor,
            Some("acme"),
            Some("helpdesk"),
        ),
        role("cluster-wide viewer", Role::Viewer, None, None),
        role("viewer of acme", Role::Viewer, Some("acme"), None),
        role(
            "viewer of acme/helpdesk",
            Role::Viewer,
            Some("acme"),
            Some("helpdesk"),
        ),
    ]
}

/// The concrete path of `template`, in the callers' scope (`acme/helpdesk`) or out of it
/// (`other/ops`).
fn concrete(template: &str, inside: bool) -> String {
    let (t, p) = if inside {
        ("acme", "helpdesk")
    } else {
        ("other", "ops")
    };
    template
        .replace("{tenant}", t)
        .replace("{project}", p)
        .replace("{name}", "bot")
        .replace("{host}", "no-such-host")
        .replace("{id}", "no-such-token")
        .replace("{revision}", "1")
        .replace("{action}", "pause")
        + if template.ends_with("/config/diff") {
            "?from=1&to=1"
        } else {
            ""
        }
}

/// A body that would be accepted, for the objects at `template` in the placement's tenant and
/// project, so that what decides the answer is the caller, not the body.
fn body_for(template: &str, inside: bool) -> serde_json::Value {
    let (t, p) = if inside {
        ("acme", "helpdesk")
    } else {
        ("other", "ops")
    };
    let last = template.rsplit('/').next().unwrap_or_default();
    let secret = |project: Option<&str>| {
        let mut v = json!({"apiVersion": "clusterclaw.io/v1", "kind": "Secret",
            "metadata": {"name": "bot", "tenant": t}, "spec": {"data": {"k": "v"}}});
        if let Some(p) = project {
            v["metadata"]["project"] = json!(p);
        }
        v
    };
    let template_doc = |name: &str| {
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "ConfigTemplate",
            "metadata": {"name": name}, "spec": {"config": {}}})
    };
    let rollout_doc = |name: &str| {
        let mut v = json!({"apiVersion": "clusterclaw.io/v1", "kind": "Rollout",
            "metadata": {"name": name}, "spec": {"selector": {"labels": {"app": "bot"}}, "version": "2026.8.1"}});
        if template.starts_with("/api/v1/tenants/") {
            v["metadata"]["tenant"] = json!(t);
        }
        v
    };
    match last {
        "rollouts" => rollout_doc("new"),
        _ if template.ends_with("/rollouts/{name}") => rollout_doc("bot"),
        "scale" => json!({"replicas": 1}),
        "rollback" => json!({"revision": 1}),
        "apply" => json!({"items": [instance(t, p, "applied", 1)]}),
        "tenants" => tenant("new"),
        "{tenant}" => tenant(t),
        "projects" => project(t, "new"),
        "{project}" => project(t, p),
        "instances" => instance(t, p, "new", 1),
        "configtemplates" => template_doc("new"),
        _ if template.ends_with("/configtemplates/{name}") => template_doc("bot"),
        _ if template.ends_with("/projects/{project}/secrets/{name}") => secret(Some(p)),
        _ if template.ends_with("/secrets/{name}") => secret(None),
        _ if template.ends_with("/instances/{name}") => instance(t, p, "bot", 1),
        _ => json!({}),
    }
}

async fn call(
    f: &Fixture,
    method: &Method,
    template: &str,
    inside: bool,
    token: Option<&str>,
) -> Reply {
    let path = concrete(template, inside);
    let (ct, body) = match *method {
        Method::POST | Method::PUT => (
            Some("application/json"),
            Body::from(body_for(template, inside).to_string()),
        ),
        _ => (None, Body::empty()),
    };
    f.send(method.clone(), &path, token, ct, body).await
}

#[tokio::test]
async fn every_operation_answers_every_caller_as_the_table_says() {
    let f = super::config_center::fixture_with_keyring();
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [
                tenant("acme"), tenant("other"),
                project("acme", "helpdesk"), project("other", "ops"),
                instance("acme", "helpdesk", "bot", 1), instance("other", "ops", "bot", 1),
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let readme = readme_table();
    let routes = crate::api::route_table();
    let doc = f.get("/api/v1/openapi.json").await.body;
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let need = match routes.lookup(path, &method) {
                Lookup::Declared(need) => need,
                other => panic!("{method} {path} is in the OpenAPI document but {other:?}"),
            };
            let tag = operation["tags"][0].as_str().unwrap_or_default();
            assert_eq!(
                need,
                expected_need(tag, path, &method),
                "{method} {path} is mounted with another permission than its tag says"
            );
            operations.push((path.clone(), method, need));
        }
    }
    // Both ways: nothing is served that the document does not describe.
    for (path, method, _) in routes.entries() {
        // The web console's pages are for browsers, not operations of the API; their
        // permissions are checked by `console::every_console_route_answers_every_caller_as_the_table_says`.
        if path == "/" || path == "/ui" || path.starts_with("/ui/") {
            continue;
        }
        assert!(
            operations.iter().any(|(p, m, _)| p == path && m == method),
            "{method} {path} is served but not in the OpenAPI document"
        );
    }
    let callers = callers(&f);
    let mut checked = 0;
    for (template, method, need) in &operations {
        let placements: &[bool] = if template.contains("{tenant}") {
            &[true, false]
        } else {
            &[true]
        };
        for &inside in placements {
            let path = concrete(template, inside);
            for caller in &callers {
                let before = f.store.index();
                let r = call(&f, method, template, inside, caller.token.as_deref()).await;
                let what = format!(
                    "{method} {path} by {}: {} {}",
                    caller.label, r.status, r.body
                );
                checked += 1;
                let (res, verb) = match need {
                    Need::Open => {
                        assert_eq!(r.status, StatusCode::OK, "{what}");
                        continue;
                    }
                    Need::Perm(res, verb) => (*res, *verb),
                    Need::Page(..) => panic!("{method} {path}: a console page in the API document"),
                };
                let Who::Role {
                    role,
                    tenant,
                    project,
                } = &caller.who
                else {
                    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
                    assert_eq!(f.store.index(), before, "{what}: the index moved");
                    continue;
                };
                let cell = readme_cell(&readme, res, verb);
                if !cell.allows(*role, tenant.is_none()) {
                    assert_eq!(r.status, StatusCode::FORBIDDEN, "{what}");
                    assert!(
                        r.message().contains(role.as_str()) && r.message().contains("may not"),
                        "{what}"
                    );
                    assert_eq!(f.store.index(), before, "{what}: the index moved");
                    continue;
                }
                assert!(
                    r.status != StatusCode::UNAUTHORIZED && r.status != StatusCode::FORBIDDEN,
                    "{what}: the table allows it"
                );
                let out_of_scope = !inside && tenant.is_some();
                if out_of_scope {
                    // Another tenant's (or project's) objects are answered as absent, and
                    // nothing of theirs changes.
                    let _ = project;
                    assert!(
                        r.status == StatusCode::NOT_FOUND
                            || (r.status == StatusCode::OK && *method == Method::GET),
                        "{what}: out of scope"
                    );
                    assert_eq!(f.store.index(), before, "{what}: the index moved");
                }
            }
        }
    }
    assert!(checked > 500, "only {checked} calls");
}

/// The holes found in the config center's routes: a viewer wrote the cluster-wide template,
/// a tenant secret, rotated the data key and rolled an instance back; a tenant-admin rewrote
/// and deleted the `default` template. Each is now a 403 that names who may, recorded in the
/// audit log as a refusal, and changes nothing.
#[tokio::test]
async fn config_center_writes_are_refused_and_audited_as_refusals() {
    let f = fixture();
    let (audited, writer) = f.audited();
    let r = audited
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [
                tenant("acme"), project("acme", "helpdesk"), instance("acme", "helpdesk", "bot", 1),
                {"apiVersion": "clusterclaw.io/v1", "kind": "ConfigTemplate",
                 "metadata": {"name": "default"}, "spec": {"config": {"gateway": {"port": 18789}}}},
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let viewer = audited.scoped_token("viewer", Some("acme"), None);
    let ta = audited.scoped_token("tenant-admin", Some("acme"), None);
    let pe = audited.scoped_token("project-editor", Some("acme"), Some("helpdesk"));
    let template = json!({"apiVersion": "clusterclaw.io/v1", "kind": "ConfigTemplate",
        "metadata": {"name": "default"}, "spec": {"config": {"gateway": {"port": 1}}}});
    let secret = json!({"apiVersion": "clusterclaw.io/v1", "kind": "Secret",
        "metadata": {"name": "k", "tenant": "acme"}, "spec": {"data": {"a": "b"}}});
    let before = f.store.index();
    let attempts = [
        (
            &viewer,
            Method::PUT,
            "/api/v1/configtemplates/default",
            Some(template.clone()),
            "platform-admin may",
        ),
        (
            &ta,
            Method::PUT,
            "/api/v1/configtemplates/default",
            Some(template.clone()),
            "platform-admin may",
        ),
        (
            &ta,
            Method::DELETE,
            "/api/v1/configtemplates/default",
            None,
            "platform-admin may",
        ),
        (
            &viewer,
            Method::PUT,
            "/api/v1/tenants/acme/secrets/k",
            Some(secret.clone()),
            "tenant-admin may",
        ),
        (
            &pe,
            Method::PUT,
            "/api/v1/tenants/acme/secrets/k",
            Some(secret.clone()),
            "tenant-admin may",
        ),
        (
            &viewer,
            Method::POST,
            "/api/v1/secrets/rotate-key",
            Some(json!({})),
            "platform-admin may",
        ),
        (
            &ta,
            Method::POST,
            "/api/v1/secrets/rotate-key",
            Some(json!({})),
            "platform-admin may",
        ),
        (
            &viewer,
            Method::POST,
            "/api/v1/tenants/acme/projects/helpdesk/instances/bot/config/rollback",
            Some(json!({"revision": 1})),
            "project-editor may",
        ),
        (
            &viewer,
            Method::POST,
            "/api/v1/apply",
            Some(json!({"items": [secret.clone()]})),
            "project-editor may",
        ),
        (
            &pe,
            Method::POST,
            "/api/v1/apply",
            Some(json!({"items": [secret.clone()]})),
            "tenant-admin may",
        ),
        (
            &ta,
            Method::POST,
            "/api/v1/apply",
            Some(json!({"items": [template.clone()]})),
            "platform-admin may",
        ),
    ];
    for (token, method, path, body, who) in &attempts {
        let r = audited.as_(token, method.clone(), path, body.clone()).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {}",
            r.body
        );
        assert!(
            r.message().contains(who),
            "{method} {path}: {}",
            r.message()
        );
    }
    assert_eq!(
        f.store.index(),
        before,
        "a refused request changed the store"
    );
    writer.flush().await.unwrap();
    let records = f.audit_records();
    let refusals: Vec<_> = records
        .iter()
        .filter(|r| r.entry.result.outcome.as_str() == "denied")
        .collect();
    assert_eq!(refusals.len(), attempts.len(), "{records:#?}");
    assert!(refusals.iter().all(|r| r.entry.result.status == 403));
    // The one a tenant-admin may do: its own tenant's secrets; a project-editor its project's.
    let r = audited
        .as_(
            &ta,
            Method::PUT,
            "/api/v1/tenants/acme/secrets/k",
            Some(secret.clone()),
        )
        .await;
    assert_ne!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let mut project_secret = secret.clone();
    project_secret["metadata"]["project"] = json!("helpdesk");
    let r = audited
        .as_(
            &pe,
            Method::PUT,
            "/api/v1/tenants/acme/projects/helpdesk/secrets/k",
            Some(project_secret),
        )
        .await;
    assert_ne!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
}

/// A route mounted around the route table (with axum's own `route`) has no declared
/// permission: it is refused to everyone, a platform-admin included, and its handler never runs.
#[tokio::test]
async fn a_route_without_a_declared_permission_is_refused() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let f = fixture();
    let ran = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&ran);
    let (routes, table) = crate::api::api_routes().into_parts();
    let routes = routes.route(
        "/api/v1/sneaky",
        axum::routing::get(move || async move {
            seen.store(true, Ordering::SeqCst);
            "ran"
        }),
    );
    let state = crate::api::ApiState::new(
        f.store.clone() as std::sync::Arc<dyn Store>,
        f.dir.path().join("admin.token"),
    );
    let app = crate::api::guarded(routes, table, state);
    let f = Fixture { app, ..f };
    let r = f.get("/api/v1/sneaky").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(
        r.message().contains("declares no permission"),
        "{}",
        r.message()
    );
    assert!(!ran.load(Ordering::SeqCst), "the handler ran");
}
