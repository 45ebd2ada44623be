//! Handlers of events: lists (newest last) and watches, scoped like every list (a tenant sees
//! only its own events; host and cluster-wide events only cluster-wide callers).

use axum::extract::RawQuery;
use axum::http::StatusCode;
use axum::response::Response;

use super::objects::check_path_names;
use super::{ApiError, Ctx, P, json_response, query};
use crate::events::{EventFilter, parse_for};
use crate::model::ObjectKey;
use crate::store::StoreError;

/// Most events one list returns (the newest).
const MAX_LIST: usize = 10_000;

/// A list of events (JSON), as served.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EventList {
    /// The events' sequence the list was read at: watch from here.
    pub index: u64,
    /// Oldest first: `{apiVersion, kind: Event, metadata, involvedObject {kind, tenant,
    /// project, name, replica}, type, reason, message, count, firstTimestamp, lastTimestamp,
    /// source}`.
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<serde_json::Value>,
}

async fn answer(
    ctx: Ctx,
    raw: Option<String>,
    allowed: &[&str],
    mut filter: EventFilter,
    parent: Option<ObjectKey>,
) -> Result<Response, ApiError> {
    let mut allowed = allowed.to_vec();
    allowed.extend(["for", "limit", "watch", "resourceVersion"]);
    let params = query::parse(raw.as_deref(), &allowed)?;
    if let Some(t) = params.get("tenant") {
        check_path_names(&[("tenant", t)])?;
        filter.tenant = Some(t.to_string());
    }
    if let Some(p) = params.get("project") {
        check_path_names(&[("project", p)])?;
        filter.project = Some(p.to_string());
    }
    if let Some(f) = params.get("for") {
        filter.object = Some(parse_for(f).map_err(|e| ApiError::bad_request(format!("for: {e}")))?);
    }
    filter.limit = Some(
        params
            .u64("limit")?
            .map_or(MAX_LIST, |n| (n as usize).clamp(1, MAX_LIST)),
    );
    if let Some(parent) = parent.clone() {
        ctx.run(move |store| match store.get(&parent)? {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound(parent).into()),
        })
        .await?;
    }
    let scope = ctx.caller().scope.clone();
    if let Some(from) = super::watch::params(&params)? {
        return super::watch::watch(
            &ctx,
            scope,
            super::watch::Want::Events(filter),
            from,
            ctx.sse,
        )
        .await;
    }
    let (index, items) = ctx
        .state
        .run_unscoped(move |store| {
            let (index, records) = store.list_events(&filter)?;
            let items: Vec<serde_json::Value> = records
                .iter()
                .filter(|r| filter.matches(&scope, &r.event))
                .map(|r| r.to_json())
                .collect();
            Ok((index, items))
        })
        .await?;
    let text = serde_json::to_string(&serde_json::json!({"index": index, "items": items}))
        .map_err(ApiError::internal)?;
    Ok(json_response(StatusCode::OK, text, index))
}

/// Lists (or watches) events: every event the caller's scope sees.
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    params(("tenant" = Option<String>, Query), ("project" = Option<String>, Query),
        ("for" = Option<String>, Query, description = "One object's events: instance/NAME, host/NAME, rollout/NAME, tenant/NAME, project/NAME"),
        ("limit" = Option<u64>, Query, description = "The newest N (default and most 10000)"),
        ("watch" = Option<bool>, Query, description = "Stream changes as JSON lines (or server-sent events)"),
        ("resourceVersion" = Option<u64>, Query, description = "With watch: the changes after this version (410 Gone when older than the server can replay)")),
    responses((status = 200, description = "Events, oldest first", body = EventList),
        (status = 410, description = "resourceVersion too old; list again", body = super::ErrorBody)))]
pub async fn list_events(ctx: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    answer(
        ctx,
        raw,
        &["tenant", "project"],
        EventFilter::default(),
        None,
    )
    .await
}

/// Lists (or watches) a tenant's events.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/events", tag = "events",
    params(("tenant" = String, Path),
        ("for" = Option<String>, Query, description = "One object's events: instance/NAME, rollout/NAME, project/NAME"),
        ("limit" = Option<u64>, Query), ("watch" = Option<bool>, Query), ("resourceVersion" = Option<u64>, Query)),
    responses((status = 200, description = "Events, oldest first", body = EventList),
        (status = 404, description = "No such tenant", body = super::ErrorBody),
        (status = 410, description = "resourceVersion too old; list again", body = super::ErrorBody)))]
pub async fn list_tenant_events(
    ctx: Ctx,
    P(tenant): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant)])?;
    let filter = EventFilter {
        tenant: Some(tenant.clone()),
        ..EventFilter::default()
    };
    answer(
        ctx,
        raw,
        &[],
        filter,
        Some(ObjectKey::cluster(crate::model::Kind::Tenant, tenant)),
    )
    .await
}

/// Lists (or watches) a project's events.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/projects/{project}/events", tag = "events",
    params(("tenant" = String, Path), ("project" = String, Path),
        ("for" = Option<String>, Query, description = "One object's events: instance/NAME"),
        ("limit" = Option<u64>, Query), ("watch" = Option<bool>, Query), ("resourceVersion" = Option<u64>, Query)),
    responses((status = 200, description = "Events, oldest first", body = EventList),
        (status = 404, description = "No such project", body = super::ErrorBody),
        (status = 410, description = "resourceVersion too old; list again", body = super::ErrorBody)))]
pub async fn list_project_events(
    ctx: Ctx,
    P((tenant, project)): P<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("project", &project)])?;
    let filter = EventFilter {
        tenant: Some(tenant.clone()),
        project: Some(project.clone()),
        ..EventFilter::default()
    };
    answer(
        ctx,
        raw,
        &[],
        filter,
        Some(ObjectKey::project(tenant, project)),
    )
    .await
}
