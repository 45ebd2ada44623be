//! The OpenAPI 3 document of the API, generated from the handlers and the model types.

use std::sync::OnceLock;

use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::audit::{self, AuditList, AuditVerifyReport};
use super::configs;
use super::error::{ErrorBody, ErrorCode};
use super::objects::{
    self, AppliedItem, ApplyRequest, ApplyResponse, DeleteBatchResponse, Deleted, DeletedItem,
    Health, Info, Ready, ScaleRequest,
};
use super::tokens::{self, CreateToken, CreatedToken, Revoked};
use super::{ApiState, json_response};
use crate::audit::{
    AuditEntry, AuditObject, AuditOutcome, AuditPrincipal, AuditRecord, AuditResult,
};
use crate::auth::rbac;
use crate::model::{FieldProblem, Host, OpenClawInstance, Project, Tenant};
use crate::store::{Outcome, TokenKind, TokenRecord};

/// A list of tenants.
#[derive(Serialize, ToSchema)]
pub struct TenantList {
    /// Store index the list was read at.
    pub index: u64,
    pub items: Vec<Tenant>,
}

/// A list of projects.
#[derive(Serialize, ToSchema)]
pub struct ProjectList {
    pub index: u64,
    pub items: Vec<Project>,
}

/// A list of instances.
#[derive(Serialize, ToSchema)]
pub struct InstanceList {
    pub index: u64,
    pub items: Vec<OpenClawInstance>,
}

/// A list of hosts.
#[derive(Serialize, ToSchema)]
pub struct HostList {
    pub index: u64,
    pub items: Vec<Host>,
}

/// A list of token records.
#[derive(Serialize, ToSchema)]
pub struct TokenList {
    pub index: u64,
    pub items: Vec<TokenRecord>,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.description = Some(
            "An API token (cca_...). The first one is created at first start and written to <data-dir>/admin.token."
                .into(),
        );
        components.add_security_scheme("bearer", SecurityScheme::Http(http));
    }
}

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "openClusterClaw API",
        description = "Control plane for fleets of OpenClaw Gateway instances. Every /api/v1 response carries X-Clusterclaw-Index, the store index it was served at.",
        license(name = "Apache-2.0"),
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    paths(
        objects::healthz,
        objects::readyz,
        openapi_handler,
        super::metrics_handler,
        objects::info,
        objects::apply,
        objects::delete_batch,
        objects::list_tenants,
        objects::create_tenant,
        objects::get_tenant,
        objects::put_tenant,
        objects::delete_tenant,
        objects::list_projects,
        objects::list_tenant_projects,
        objects::create_project,
        objects::get_project,
        objects::put_project,
        objects::delete_project,
        objects::list_instances,
        objects::list_project_instances,
        objects::create_instance,
        objects::get_instance,
        objects::put_instance,
        objects::delete_instance,
        objects::scale_instance,
        objects::list_hosts,
        objects::get_host,
        objects::put_host,
        objects::delete_host,
        objects::cordon_host,
        objects::uncordon_host,
        super::drain::start_drain,
        super::drain::get_drain,
        tokens::create_token,
        tokens::list_tokens,
        tokens::revoke_token,
        audit::list_audit,
        audit::verify_audit,
        configs::list_templates,
        configs::create_template,
        configs::get_template,
        configs::put_template,
        configs::delete_template,
        configs::list_secrets,
        configs::list_tenant_secrets,
        configs::list_project_secrets,
        configs::get_tenant_secret,
        configs::get_project_secret,
        configs::put_tenant_secret,
        configs::put_project_secret,
        configs::delete_tenant_secret,
        configs::delete_project_secret,
        configs::rotate_key,
        configs::effective,
        configs::history,
        configs::revision,
        configs::diff,
        configs::rollback,
        super::rollout::rollout_action,
        super::logs::instance_logs,
        super::waves::list_rollouts,
        super::waves::create_rollout,
        super::waves::get_rollout,
        super::waves::put_rollout,
        super::waves::delete_rollout,
        super::waves::list_tenant_rollouts,
        super::waves::create_tenant_rollout,
        super::waves::get_tenant_rollout,
        super::waves::put_tenant_rollout,
        super::waves::delete_tenant_rollout,
        super::events::list_events,
        super::events::list_tenant_events,
        super::events::list_project_events,
        super::volumes::list_volumes,
        super::volumes::delete_volume,
        super::servers::list_servers,
    ),
    components(schemas(
        ErrorBody, ErrorCode, FieldProblem, Health, Ready, Info, ApplyRequest, ApplyResponse, AppliedItem, DeleteBatchResponse, DeletedItem, Outcome,
        Deleted, ScaleRequest, TenantList, ProjectList, InstanceList, HostList, TokenList, TokenRecord, TokenKind,
        CreateToken, CreatedToken, Revoked, AuditList, AuditVerifyReport, AuditRecord, AuditEntry,
        AuditPrincipal, AuditObject, AuditResult, AuditOutcome,
        configs::TemplateList, configs::SecretList, configs::Effective, configs::History, configs::Diff,
        configs::RollbackRequest, configs::RolledBack, configs::Rotated, crate::store::RevisionRecord,
        super::rollout::RolloutRequest, super::rollout::RolloutAnswer,
        super::waves::RolloutList, super::events::EventList,
        super::volumes::VolumeList, crate::controllers::volumes::VolumeView,
        crate::controllers::volumes::VolumeStatus, super::drain::DrainRequest,
        super::servers::ServerList, crate::store::replicas::ServerView,
        crate::store::replicas::ServerStatus, super::objects::ServerSelf,
    )),
    tags(
        (name = "health", description = "Liveness and readiness, without authentication"),
        (name = "info", description = "About this server"),
        (name = "metrics", description = "Prometheus figures for platform-admins and cluster-wide viewers"),
        (name = "objects", description = "Batches of objects of any kind"),
        (name = "tenants"), (name = "projects"), (name = "instances"),
        (name = "hosts", description = "Written by clusterclaw-agent; users only cordon and uncordon them"),
        (name = "tokens", description = "API and join tokens"),
        (name = "audit", description = "The hash-chained audit log"),
        (name = "configtemplates", description = "Platform-wide bottom layers of openclaw.json"),
        (name = "secrets", description = "Encrypted values, referenced from instances; values are write-only"),
        (name = "config", description = "An instance's effective openclaw.json, its revisions, diff and rollback"),
        (name = "rollout", description = "Pause, resume, promote, abort or undo an instance's update"),
        (name = "rollouts", description = "Fleet-wide changes moved across instances in waves"),
        (name = "events", description = "What happened to instances, hosts and rollouts, kept for a while"),
        (name = "volumes", description = "Replicas' state volumes on hosts, who claims them, and the removal of unclaimed ones"),
        (name = "servers", description = "The control plane's server replicas and which one leads"),
    ),
)]
pub struct ApiDoc;

/// The document as pretty JSON text (built once).
pub fn openapi_json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        with_permissions(&mut doc, &super::route_table());
        with_watch(&mut doc);
        doc.to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    })
}

/// Marks every operation with who may call it (`x-clusterclaw-permission`), from the route
/// table the server authorizes with.
fn with_permissions(doc: &mut utoipa::openapi::OpenApi, table: &super::routes::RouteTable) {
    use super::routes::{Lookup, Need};
    use axum::http::Method;
    for (path, item) in doc.paths.paths.iter_mut() {
        for (method, op) in [
            (Method::GET, &mut item.get),
            (Method::PUT, &mut item.put),
            (Method::POST, &mut item.post),
            (Method::DELETE, &mut item.delete),
        ] {
            let Some(op) = op else { continue };
            let text = match table.lookup(path, &method) {
                Lookup::Declared(Need::Open) => "open: no token needed".to_string(),
                // A console page is never an operation of the document.
                Lookup::Declared(Need::Perm(res, verb) | Need::Page(res, verb)) => format!(
                    "{} {}: {}",
                    verb.as_str(),
                    res.noun(),
                    rbac::who_may(res, verb).unwrap_or_else(|| "nobody".into())
                ),
                Lookup::MethodNotAllowed(_) | Lookup::Undeclared => "undeclared: refused".into(),
            };
            op.extensions = Some(
                utoipa::openapi::extensions::ExtensionsBuilder::new()
                    .add("x-clusterclaw-permission", text)
                    .build(),
            );
        }
    }
}

/// The lists that can be watched: every list the API serves.
pub const WATCHABLE_LISTS: &[&str] = &[
    "/api/v1/tenants",
    "/api/v1/projects",
    "/api/v1/tenants/{tenant}/projects",
    "/api/v1/instances",
    "/api/v1/tenants/{tenant}/projects/{project}/instances",
    "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/config/revisions",
    "/api/v1/hosts",
    "/api/v1/configtemplates",
    "/api/v1/secrets",
    "/api/v1/tenants/{tenant}/secrets",
    "/api/v1/tenants/{tenant}/projects/{project}/secrets",
    "/api/v1/rollouts",
    "/api/v1/tenants/{tenant}/rollouts",
    "/api/v1/volumes",
    "/api/v1/tokens",
    "/api/v1/events",
    "/api/v1/tenants/{tenant}/events",
    "/api/v1/tenants/{tenant}/projects/{project}/events",
    "/api/v1/audit",
    "/api/v1/servers",
];

/// Adds `watch` and `resourceVersion` to the lists that can be watched.
fn with_watch(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    for (path, item) in doc.paths.paths.iter_mut() {
        if !WATCHABLE_LISTS.contains(&path.as_str()) {
            continue;
        }
        let Some(op) = &mut item.get else { continue };
        let params = op.parameters.get_or_insert_with(Vec::new);
        params.push(
            ParameterBuilder::new()
                .name("watch")
                .parameter_in(ParameterIn::Query)
                .description(Some("true: stream the changes after resourceVersion as JSON lines {\"type\":\"ADDED|MODIFIED|DELETED\",\"object\":{...}} with periodic {\"type\":\"BOOKMARK\",\"resourceVersion\":N}; server-sent events with Accept: text/event-stream. Lists without a change log (volumes, tokens, config revisions, servers) start with their current items as ADDED and a BOOKMARK with \"initialEventsEnd\":true"))
                .schema(Some(ObjectBuilder::new().schema_type(Type::Boolean)))
                .build(),
        );
        params.push(
            ParameterBuilder::new()
                .name("resourceVersion")
                .parameter_in(ParameterIn::Query)
                .description(Some("With watch: the index of the list the watch follows on from (for the audit log: a record's seq; default: now); older than the server can replay is 410 Gone"))
                .schema(Some(ObjectBuilder::new().schema_type(Type::Integer)))
                .build(),
        );
    }
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "info",
    responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json", body = serde_json::Value)))]
pub async fn openapi_handler(
    axum::extract::State(state): axum::extract::State<ApiState>,
) -> Response {
    json_response(StatusCode::OK, openapi_json(), state.index())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_document_snapshot() {
        let doc: serde_json::Value = serde_json::from_str(openapi_json()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        insta::assert_json_snapshot!("openapi", doc);
    }

    #[test]
    fn every_route_is_documented_with_bearer_security() {
        let doc: serde_json::Value = serde_json::from_str(openapi_json()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/healthz",
            "/readyz",
            "/api/v1/openapi.json",
            "/api/v1/info",
            "/api/v1/apply",
            "/api/v1/tenants",
            "/api/v1/tenants/{tenant}",
            "/api/v1/projects",
            "/api/v1/tenants/{tenant}/projects",
            "/api/v1/tenants/{tenant}/projects/{project}",
            "/api/v1/instances",
            "/api/v1/tenants/{tenant}/projects/{project}/instances",
            "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}",
            "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/scale",
            "/api/v1/hosts",
            "/api/v1/hosts/{host}",
            "/api/v1/hosts/{host}/cordon",
            "/api/v1/hosts/{host}/uncordon",
            "/api/v1/hosts/{host}/drain",
            "/api/v1/tokens",
            "/api/v1/tokens/{id}",
            "/api/v1/configtemplates/{name}",
            "/api/v1/tenants/{tenant}/secrets/{name}",
            "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/config",
            "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/config/rollback",
        ] {
            assert!(paths.contains_key(p), "{p} is missing from the document");
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        assert_eq!(doc["security"], serde_json::json!([{"bearer": []}]));
        assert_eq!(
            doc["paths"]["/healthz"]["get"]["security"],
            serde_json::json!([{}])
        );
    }
}
