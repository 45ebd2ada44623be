//! Config center endpoints: config templates, secrets, and an instance's effective config,
//! revisions, diff and rollback.

use axum::body::Body;
use axum::extract::RawQuery;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::objects::Deleted;
use super::objects::{Target, check_path_names, create, delete_one, get_one, list, put_one};
use super::{AuditNote, Ctx, P, json_response, query};
use crate::configcenter::{self, LayerRef};
use crate::model::{
    ConfigFragment, ConfigTemplate, Kind, ObjectKey, Resource, Secret, decode_typed,
};
use crate::openclaw::{diff, layers, merge};
use crate::store::RevisionRecord;
use crate::store::{ListFilter, Scoped, StoreError, WriteMode};

/// A list of config templates.
#[derive(Serialize, ToSchema)]
pub struct TemplateList {
    pub index: u64,
    pub items: Vec<ConfigTemplate>,
}

/// A list of secrets (keys and fingerprints only).
#[derive(Serialize, ToSchema)]
pub struct SecretList {
    pub index: u64,
    pub items: Vec<Secret>,
}

fn template(name: Option<String>) -> Target {
    Target {
        kind: Kind::ConfigTemplate,
        tenant: None,
        project: None,
        name,
    }
}

fn secret(tenant: String, project: Option<String>, name: Option<String>) -> Target {
    Target {
        kind: Kind::Secret,
        tenant: Some(tenant),
        project,
        name,
    }
}

fn secret_key(tenant: String, project: Option<String>, name: String) -> ObjectKey {
    ObjectKey {
        kind: Kind::Secret,
        tenant,
        project: project.unwrap_or_default(),
        name,
    }
}

// ---- templates ------------------------------------------------------------------------

/// Lists config templates.
#[utoipa::path(get, path = "/api/v1/configtemplates", tag = "configtemplates",
    responses((status = 200, description = "Templates by name", body = TemplateList)))]
pub async fn list_templates(state: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    list(
        state,
        raw,
        &["labelSelector"],
        ListFilter::all(Kind::ConfigTemplate),
        None,
    )
    .await
}

/// Creates a config template.
#[utoipa::path(post, path = "/api/v1/configtemplates", tag = "configtemplates", request_body = ConfigTemplate,
    params(("X-Clusterclaw-Change-Message" = Option<String>, Header, description = "Recorded on the revisions the change makes")),
    responses((status = 201, description = "Created", body = ConfigTemplate), (status = 422, description = "Invalid, or an instance's effective config would be", body = ErrorBody)))]
pub async fn create_template(
    state: Ctx,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    create(state, raw, headers, body, template(None)).await
}

/// Reads a config template.
#[utoipa::path(get, path = "/api/v1/configtemplates/{name}", tag = "configtemplates", params(("name" = String, Path)),
    responses((status = 200, description = "The template", body = ConfigTemplate), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn get_template(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("name", &name)])?;
    get_one(state, raw, ObjectKey::cluster(Kind::ConfigTemplate, name)).await
}

/// Creates or updates a config template; every instance using it gets a new revision.
#[utoipa::path(put, path = "/api/v1/configtemplates/{name}", tag = "configtemplates", params(("name" = String, Path),
    ("X-Clusterclaw-Change-Message" = Option<String>, Header, description = "Recorded on the revisions the change makes")),
    request_body = ConfigTemplate,
    responses((status = 200, description = "Configured or unchanged", body = ConfigTemplate), (status = 201, description = "Created", body = ConfigTemplate),
        (status = 422, description = "Invalid, or an instance's effective config would be", body = ErrorBody)))]
pub async fn put_template(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    put_one(state, raw, headers, body, template(Some(name))).await
}

/// Deletes a config template that no instance uses.
#[utoipa::path(delete, path = "/api/v1/configtemplates/{name}", tag = "configtemplates", params(("name" = String, Path)),
    responses((status = 200, description = "Deleted", body = Deleted), (status = 409, description = "In use: the message names the instances", body = ErrorBody)))]
pub async fn delete_template(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("name", &name)])?;
    delete_one(state, raw, ObjectKey::cluster(Kind::ConfigTemplate, name)).await
}

// ---- secrets --------------------------------------------------------------------------

/// Lists secrets in the caller's scope (keys and fingerprints, never values).
#[utoipa::path(get, path = "/api/v1/secrets", tag = "secrets",
    params(("tenant" = Option<String>, Query), ("project" = Option<String>, Query)),
    responses((status = 200, description = "Secrets", body = SecretList)))]
pub async fn list_secrets(state: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    list(
        state,
        raw,
        &["labelSelector", "tenant", "project"],
        ListFilter::all(Kind::Secret),
        None,
    )
    .await
}

/// Lists a tenant's own secrets.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/secrets", tag = "secrets", params(("tenant" = String, Path)),
    responses((status = 200, description = "Secrets", body = SecretList)))]
pub async fn list_tenant_secrets(
    state: Ctx,
    P(tenant): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant)])?;
    let mut filter = ListFilter::all(Kind::Secret);
    filter.tenant = Some(tenant.clone());
    filter.project = Some(String::new());
    list(
        state,
        raw,
        &["labelSelector"],
        filter,
        Some(ObjectKey::cluster(Kind::Tenant, tenant)),
    )
    .await
}

/// Lists a project's secrets.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/projects/{project}/secrets", tag = "secrets", params(("tenant" = String, Path), ("project" = String, Path)),
    responses((status = 200, description = "Secrets", body = SecretList)))]
pub async fn list_project_secrets(
    state: Ctx,
    P((tenant, project)): P<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("project", &project)])?;
    let mut filter = ListFilter::all(Kind::Secret);
    filter.tenant = Some(tenant.clone());
    filter.project = Some(project.clone());
    list(
        state,
        raw,
        &["labelSelector"],
        filter,
        Some(ObjectKey::project(tenant, project)),
    )
    .await
}

/// Reads a tenant-level secret: its keys and their fingerprints.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/secrets/{name}", tag = "secrets", params(("tenant" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "The secret, without values", body = Secret), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn get_tenant_secret(
    state: Ctx,
    P((tenant, name)): P<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("name", &name)])?;
    get_one(state, raw, secret_key(tenant, None, name)).await
}

/// Reads a project-level secret: its keys and their fingerprints.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/projects/{project}/secrets/{name}", tag = "secrets", params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "The secret, without values", body = Secret), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn get_project_secret(
    state: Ctx,
    P((tenant, project, name)): P<(String, String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("project", &project), ("name", &name)])?;
    get_one(state, raw, secret_key(tenant, Some(project), name)).await
}

/// Stores a tenant-level secret (`spec.data`: every key with its value; the set replaces the stored one).
#[utoipa::path(put, path = "/api/v1/tenants/{tenant}/secrets/{name}", tag = "secrets", params(("tenant" = String, Path), ("name" = String, Path)), request_body = Secret,
    responses((status = 200, description = "Configured or unchanged", body = Secret), (status = 201, description = "Created", body = Secret), (status = 422, description = "Invalid", body = ErrorBody)))]
pub async fn put_tenant_secret(
    state: Ctx,
    P((tenant, name)): P<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    put_one(state, raw, headers, body, secret(tenant, None, Some(name))).await
}

/// Stores a project-level secret.
#[utoipa::path(put, path = "/api/v1/tenants/{tenant}/projects/{project}/secrets/{name}", tag = "secrets", params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path)), request_body = Secret,
    responses((status = 200, description = "Configured or unchanged", body = Secret), (status = 201, description = "Created", body = Secret), (status = 422, description = "Invalid", body = ErrorBody)))]
pub async fn put_project_secret(
    state: Ctx,
    P((tenant, project, name)): P<(String, String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    put_one(
        state,
        raw,
        headers,
        body,
        secret(tenant, Some(project), Some(name)),
    )
    .await
}

/// Deletes a tenant-level secret that no instance references.
#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}/secrets/{name}", tag = "secrets", params(("tenant" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "Deleted", body = Deleted), (status = 409, description = "In use", body = ErrorBody)))]
pub async fn delete_tenant_secret(
    state: Ctx,
    P((tenant, name)): P<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("name", &name)])?;
    delete_one(state, raw, secret_key(tenant, None, name)).await
}

/// Deletes a project-level secret that no instance references.
#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}/projects/{project}/secrets/{name}", tag = "secrets", params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "Deleted", body = Deleted), (status = 409, description = "In use", body = ErrorBody)))]
pub async fn delete_project_secret(
    state: Ctx,
    P((tenant, project, name)): P<(String, String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("project", &project), ("name", &name)])?;
    delete_one(state, raw, secret_key(tenant, Some(project), name)).await
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rotated {
    key_id: String,
    resealed: usize,
}

/// Makes a new data key, re-seals every secret value with it in one transaction and retires
/// the old key. At every step the key file opens every value in the database.
#[utoipa::path(post, path = "/api/v1/secrets/rotate-key", tag = "secrets",
    responses((status = 200, description = "Rotated", body = Rotated), (status = 403, description = "Not platform-admin", body = ErrorBody)))]
pub async fn rotate_key(state: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    query::parse(raw.as_deref(), &[])?;
    let (shared, path, lock) = state.shared_keyring();
    let Some(path) = path.map(std::path::Path::to_path_buf) else {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "this server has no secrets key file to rotate",
        ));
    };
    let _no_secret_writes = lock.write().await;
    let shared = shared.clone();
    let store = state.store().clone();
    let (key_id, resealed) = state
        .run_unscoped(move |_| {
            let fail = |e: &dyn std::fmt::Display| {
                ApiError::internal(format!("rotating the secrets key {}: {e}", path.display()))
            };
            let both =
                std::sync::Arc::new(crate::secrets::Keyring::add_key(&path).map_err(|e| fail(&e))?);
            *shared.write().unwrap_or_else(|e| e.into_inner()) = Some(both.clone());
            let resealed = store.reseal(&mut |v| {
                let value = both
                    .open(&v.aad(), &v.sealed)
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                both.seal(&v.aad(), &value)
                    .map_err(|e| StoreError::Backend(e.to_string()))
            })?;
            let retired =
                crate::secrets::Keyring::retire_inactive(&path, &both).map_err(|e| fail(&e))?;
            let id = retired.active_id().to_string();
            *shared.write().unwrap_or_else(|e| e.into_inner()) = Some(std::sync::Arc::new(retired));
            tracing::info!(key = %id, resealed, "secrets data key rotated");
            Ok((id, resealed))
        })
        .await?;
    let text = serde_json::to_string(&Rotated { key_id, resealed }).map_err(ApiError::internal)?;
    let index = state.store().index();
    let note = AuditNote {
        action: "secrets.rotate-key",
        object: None,
        generation_before: None,
        generation_after: None,
    };
    let mut resp = json_response(StatusCode::OK, text, index);
    resp.extensions_mut().insert(note);
    Ok(resp)
}

// ---- an instance's config ----------------------------------------------------------------

type InstancePath = P<(String, String, String)>;

fn instance_key((tenant, project, name): (String, String, String)) -> Result<ObjectKey, ApiError> {
    check_path_names(&[("tenant", &tenant), ("project", &project), ("name", &name)])?;
    Ok(ObjectKey::instance(tenant, project, name))
}

/// An instance in scope, the layers under it, and the objects those layers come from (as
/// stored, with their resourceVersion), read in the caller's scope.
fn layers_for(
    store: &Scoped<'_>,
    key: &ObjectKey,
) -> Result<
    (
        crate::model::OpenClawInstance,
        Vec<configcenter::OwnedLayer>,
        Vec<Resource>,
    ),
    ApiError,
> {
    let read = |k: ObjectKey| -> Result<Option<Resource>, ApiError> {
        Ok(store.get(&k)?.map(|o| o.resource()).transpose()?)
    };
    let Some(Resource::OpenClawInstance(i)) = read(key.clone())? else {
        return Err(StoreError::NotFound(key.clone()).into());
    };
    let template = match read(ObjectKey::cluster(
        Kind::ConfigTemplate,
        configcenter::template_name(&i),
    ))? {
        Some(Resource::ConfigTemplate(t)) => Some(t),
        _ => None,
    };
    let tenant = match read(ObjectKey::cluster(Kind::Tenant, &key.tenant))? {
        Some(Resource::Tenant(t)) => Some(t),
        _ => None,
    };
    let project = match read(ObjectKey::project(&key.tenant, &key.project))? {
        Some(Resource::Project(p)) => Some(p),
        _ => None,
    };
    let layers = configcenter::layers_of(&i, template.as_ref(), tenant.as_ref(), project.as_ref());
    let sources = template
        .map(Resource::ConfigTemplate)
        .into_iter()
        .chain(tenant.map(Resource::Tenant))
        .chain(project.map(Resource::Project))
        .collect();
    Ok((i, layers, sources))
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Effective {
    instance: String,
    revision: Option<u64>,
    hash: String,
    #[schema(value_type = Object)]
    config: Value,
    #[schema(value_type = Vec<Object>)]
    layers: Vec<LayerRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    origins: Option<Vec<layers::Origin>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

/// `GET .../config[?explain=true]`: the effective `openclaw.json` (secret references in
/// place), and with `explain` which layer set each key.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/config", tag = "config",
    params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path), ("explain" = Option<bool>, Query, description = "Also say which layer set each key")),
    responses((status = 200, description = "The effective openclaw.json", body = Effective), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn effective(
    state: Ctx,
    P(path): InstancePath,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = query::parse(raw.as_deref(), &["explain"])?;
    let explain = params.bool("explain")?;
    let key = instance_key(path)?;
    let (index, body) = state.read_point(move |store| {
        let index = store.index();
        let (i, owned, _) = layers_for(store, &key)?;
        let borrowed = configcenter::borrowed(&owned);
        let (config, origins) = if explain {
            let (v, o) = layers::explain(&borrowed);
            (v, Some(o))
        } else {
            (layers::render(&borrowed), None)
        };
        let text = origins.as_ref().map(|o| layers::explain_text(&config, o));
        let hash = configcenter::config_text_hash(
            &serde_json::to_string(&config).map_err(ApiError::internal)?,
        );
        let body = Effective {
            instance: format!("{}/{}/{}", key.tenant, key.project, key.name),
            revision: i.status.as_ref().and_then(|s| s.config_revision),
            hash,
            config,
            layers: configcenter::layer_refs(&owned),
            origins,
            text,
        };
        Ok((
            index,
            serde_json::to_string(&body).map_err(ApiError::internal)?,
        ))
    })?;
    Ok(json_response(StatusCode::OK, body, index))
}

#[derive(Serialize, ToSchema)]
pub struct History {
    items: Vec<crate::store::RevisionRecord>,
}

/// `GET .../config/revisions`: newest first. With `watch=true`, streams the changes of the
/// list (see [`super::watch::watch_polled`]).
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/config/revisions", tag = "config", params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "Revisions, newest first", body = History), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn history(
    state: Ctx,
    P(path): InstancePath,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = query::parse(raw.as_deref(), &["watch", "resourceVersion"])?;
    let key = instance_key(path)?;
    if let Some(from) = super::watch::params(&params)? {
        let reader = state.clone();
        return super::watch::watch_polled(&state, from, state.sse, move || {
            let (ctx, key) = (reader.clone(), key.clone());
            async move {
                ctx.run(move |store| {
                    let (_, items) = store.config_revisions(&key)?;
                    items
                        .iter()
                        .map(|r| {
                            let json = serde_json::to_string(r).map_err(ApiError::internal)?;
                            Ok((r.revision.to_string(), json))
                        })
                        .collect()
                })
                .await
            }
        })
        .await;
    }
    let (index, text) = state
        .run(move |store| {
            let index = store.index();
            let (_, items) = store.config_revisions(&key)?;
            Ok((
                index,
                serde_json::to_string(&History { items }).map_err(ApiError::internal)?,
            ))
        })
        .await?;
    Ok(json_response(StatusCode::OK, text, index))
}

fn one_revision(
    store: &Scoped<'_>,
    key: &ObjectKey,
    revision: u64,
) -> Result<crate::store::RevisionRecord, ApiError> {
    store.config_revision(key, revision)?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!(
                "{key} has no config revision {revision}; `clusterclaw config history instance {}` lists its revisions",
                key.name
            ),
        )
    })
}

fn parse_revision(field: &str, s: &str) -> Result<u64, ApiError> {
    s.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::bad_request(format!(
            "{field} must be a revision number (1, 2, ...), not {s:?}"
        ))
    })
}

/// `GET .../config/revisions/{revision}`: one revision, with its config.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/config/revisions/{revision}", tag = "config", params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path), ("revision" = u64, Path)),
    responses((status = 200, description = "The revision with its config", body = RevisionRecord), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn revision(
    state: Ctx,
    P((tenant, project, name, rev)): P<(String, String, String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    query::parse(raw.as_deref(), &[])?;
    let key = instance_key((tenant, project, name))?;
    let rev = parse_revision("the revision in the path", &rev)?;
    let (index, text) = state
        .run(move |store| {
            let r = one_revision(store, &key, rev)?;
            Ok((
                store.index(),
                serde_json::to_string(&r).map_err(ApiError::internal)?,
            ))
        })
        .await?;
    Ok(json_response(StatusCode::OK, text, index))
}

#[derive(Serialize, ToSchema)]
pub struct Diff {
    from: u64,
    to: u64,
    #[schema(value_type = Vec<Object>)]
    changes: Vec<diff::Change>,
    unified: String,
}

/// `GET .../config/diff?from=A&to=B`.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/config/diff", tag = "config", params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path), ("from" = u64, Query), ("to" = u64, Query)),
    responses((status = 200, description = "Key-level and unified diff", body = Diff), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn diff(
    state: Ctx,
    P(path): InstancePath,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = query::parse(raw.as_deref(), &["from", "to"])?;
    let from = parse_revision("from", params.get("from").unwrap_or_default())?;
    let to = parse_revision("to", params.get("to").unwrap_or_default())?;
    let key = instance_key(path)?;
    let (index, text) = state
        .run(move |store| {
            let a = one_revision(store, &key, from)?.config.unwrap_or_default();
            let b = one_revision(store, &key, to)?.config.unwrap_or_default();
            let body = Diff {
                from,
                to,
                changes: diff::key_diff(&a, &b),
                unified: diff::unified(
                    &a,
                    &b,
                    &format!("revision {from}"),
                    &format!("revision {to}"),
                    3,
                ),
            };
            Ok((
                store.index(),
                serde_json::to_string(&body).map_err(ApiError::internal)?,
            ))
        })
        .await?;
    Ok(json_response(StatusCode::OK, text, index))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    revision: u64,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolledBack {
    revision: Option<u64>,
    rolled_back_to: u64,
}

/// `POST .../config/rollback {"revision": N}`: makes the instance's own layer the merge patch
/// that turns the layers below it into revision N, so the effective config is N again (as a
/// new revision). Later changes of lower layers reach only the keys this layer leaves alone.
#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/config/rollback", tag = "config", params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path)), request_body = RollbackRequest,
    responses((status = 200, description = "Rolled back, as a new revision", body = RolledBack), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn rollback(
    state: Ctx,
    P(path): InstancePath,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    query::parse(raw.as_deref(), &[])?;
    let key = instance_key(path)?;
    let (bytes, format) = super::body::read(&headers, body, 64 * 1024).await?;
    let value = super::body::one_document(&bytes, format)?;
    let req: RollbackRequest = decode_typed(value).map_err(|p| ApiError::invalid(vec![p]))?;
    if req.revision == 0 {
        return Err(ApiError::invalid(vec![crate::model::FieldProblem::new(
            "revision",
            "must be a revision number (1, 2, ...)",
        )]));
    }
    let target_rev = req.revision;
    let message = req
        .message
        .unwrap_or_else(|| format!("rollback to revision {target_rev}"));
    let (index, revision, object) = state
        .run(move |store| {
            let target = one_revision(store, &key, target_rev)?.config.unwrap_or_default();
            let current = store.get(&key)?.ok_or_else(|| StoreError::NotFound(key.clone()))?;
            let (mut i, owned, sources) = layers_for(store, &key)?;
            let below: Vec<_> = owned
                .into_iter()
                .filter(|l| l.kind != layers::LayerKind::Instance)
                .collect();
            let lower = configcenter::render(&below);
            let patch = merge::diff_patch(&lower, &target).map_err(|e| {
                ApiError::invalid(vec![crate::model::FieldProblem::new(
                    "revision",
                    format!(
                        "revision {target_rev} sets {} to null, which the instance's layer cannot express (null deletes a key in a merge patch)",
                        e.path
                    ),
                )])
            })?;
            let Value::Object(map) = patch else {
                return Err(ApiError::internal("the rollback patch is not an object"));
            };
            i.spec.config = ConfigFragment(map);
            i.metadata.resource_version = Some(current.resource_version);
            let note = crate::store::ChangeNote {
                author: String::new(),
                message: Some(message),
            };
            // The layers below are written back unchanged with their resourceVersion as a
            // precondition: if one changed since it was read, the patch was worked out against
            // an old state and the whole rollback is refused with 409, nothing written.
            let mut batch = vec![(Resource::OpenClawInstance(i), WriteMode::Update)];
            batch.extend(sources.into_iter().map(|r| (r, WriteMode::Update)));
            let summary = store
                .write_with_message(&batch, note.message.as_deref())
                .map_err(|e| match e {
                    StoreError::InBatch { source, .. } => *source,
                    e => e,
                })?;
            let result = summary
                .results
                .into_iter()
                .find(|r| r.key == key)
                .ok_or_else(|| ApiError::internal("the rollback's write gave no result for the instance"))?;
            let revision = match result.object.resource()? {
                Resource::OpenClawInstance(i) => i.status.and_then(|s| s.config_revision),
                _ => None,
            };
            Ok((summary.index, revision, result.object))
        })
        .await?;
    let text = serde_json::to_string(&RolledBack {
        revision,
        rolled_back_to: target_rev,
    })
    .map_err(ApiError::internal)?;
    let note = AuditNote::object("config.rollback", &object.key);
    let mut resp = json_response(StatusCode::OK, text, index);
    resp.extensions_mut().insert(note);
    Ok(resp)
}
