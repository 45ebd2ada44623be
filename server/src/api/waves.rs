//! Endpoints of fleet-wide `Rollout`s: cluster-wide ones under `/api/v1/rollouts` (a
//! platform-admin's), a tenant's under `/api/v1/tenants/{tenant}/rollouts` (its tenant-admin's
//! too). Which one a document is follows from `metadata.tenant` (see [`crate::model::waves`]).

use axum::body::Body;
use axum::extract::RawQuery;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::objects::Deleted;
use super::objects::{Target, check_path_names, create, delete_one, get_one, list, put_one};
use super::{Ctx, P};
use crate::model::{Kind, ObjectKey, Rollout};
use crate::store::ListFilter;

/// A list of Rollouts.
#[derive(Serialize, ToSchema)]
pub struct RolloutList {
    pub index: u64,
    pub items: Vec<Rollout>,
}

fn target(tenant: Option<String>, name: Option<String>) -> Target {
    Target {
        kind: Kind::Rollout,
        tenant,
        project: None,
        name,
    }
}

fn key(tenant: Option<String>, name: String) -> ObjectKey {
    ObjectKey {
        kind: Kind::Rollout,
        tenant: tenant.unwrap_or_default(),
        project: String::new(),
        name,
    }
}

/// Lists every Rollout, cluster-wide and of every tenant (`?tenant=` narrows).
#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts",
    responses((status = 200, description = "Rollouts by tenant and name", body = RolloutList)))]
pub async fn list_rollouts(state: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    list(
        state,
        raw,
        &["labelSelector", "tenant"],
        ListFilter::all(Kind::Rollout),
        None,
    )
    .await
}

/// Creates a cluster-wide Rollout (its selector may reach every tenant).
#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts", request_body = Rollout,
    responses((status = 201, description = "Created", body = Rollout), (status = 422, description = "Invalid", body = ErrorBody)))]
pub async fn create_rollout(
    state: Ctx,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    create(state, raw, headers, body, target(None, None)).await
}

/// Reads a cluster-wide Rollout.
#[utoipa::path(get, path = "/api/v1/rollouts/{name}", tag = "rollouts", params(("name" = String, Path)),
    responses((status = 200, description = "The Rollout", body = Rollout), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn get_rollout(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("name", &name)])?;
    get_one(state, raw, key(None, name)).await
}

/// Creates or updates a cluster-wide Rollout (`spec.paused` pauses and resumes it).
#[utoipa::path(put, path = "/api/v1/rollouts/{name}", tag = "rollouts", params(("name" = String, Path)),
    request_body = Rollout,
    responses((status = 200, description = "Configured or unchanged", body = Rollout), (status = 201, description = "Created", body = Rollout),
        (status = 422, description = "Invalid", body = ErrorBody)))]
pub async fn put_rollout(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    put_one(state, raw, headers, body, target(None, Some(name))).await
}

/// Deletes a cluster-wide Rollout; the instances it still holds are let go.
#[utoipa::path(delete, path = "/api/v1/rollouts/{name}", tag = "rollouts", params(("name" = String, Path)),
    responses((status = 200, description = "Deleted", body = Deleted), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn delete_rollout(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("name", &name)])?;
    delete_one(state, raw, key(None, name)).await
}

/// Lists a tenant's Rollouts.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/rollouts", tag = "rollouts", params(("tenant" = String, Path)),
    responses((status = 200, description = "The tenant's Rollouts by name", body = RolloutList), (status = 404, description = "No such tenant", body = ErrorBody)))]
pub async fn list_tenant_rollouts(
    state: Ctx,
    P(tenant): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant)])?;
    list(
        state,
        raw,
        &["labelSelector"],
        ListFilter {
            tenant: Some(tenant.clone()),
            ..ListFilter::all(Kind::Rollout)
        },
        Some(ObjectKey::cluster(Kind::Tenant, tenant)),
    )
    .await
}

/// Creates a tenant's Rollout (its selector reaches that tenant's instances only).
#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/rollouts", tag = "rollouts", params(("tenant" = String, Path)),
    request_body = Rollout,
    responses((status = 201, description = "Created", body = Rollout), (status = 422, description = "Invalid", body = ErrorBody)))]
pub async fn create_tenant_rollout(
    state: Ctx,
    P(tenant): P<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant)])?;
    create(state, raw, headers, body, target(Some(tenant), None)).await
}

/// Reads a tenant's Rollout.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/rollouts/{name}", tag = "rollouts",
    params(("tenant" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "The Rollout", body = Rollout), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn get_tenant_rollout(
    state: Ctx,
    P((tenant, name)): P<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("name", &name)])?;
    get_one(state, raw, key(Some(tenant), name)).await
}

/// Creates or updates a tenant's Rollout (`spec.paused` pauses and resumes it).
#[utoipa::path(put, path = "/api/v1/tenants/{tenant}/rollouts/{name}", tag = "rollouts",
    params(("tenant" = String, Path), ("name" = String, Path)), request_body = Rollout,
    responses((status = 200, description = "Configured or unchanged", body = Rollout), (status = 201, description = "Created", body = Rollout),
        (status = 422, description = "Invalid", body = ErrorBody)))]
pub async fn put_tenant_rollout(
    state: Ctx,
    P((tenant, name)): P<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    put_one(state, raw, headers, body, target(Some(tenant), Some(name))).await
}

/// Deletes a tenant's Rollout; the instances it still holds are let go.
#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}/rollouts/{name}", tag = "rollouts",
    params(("tenant" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "Deleted", body = Deleted), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn delete_tenant_rollout(
    state: Ctx,
    P((tenant, name)): P<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("name", &name)])?;
    delete_one(state, raw, key(Some(tenant), name)).await
}
