//! `GET /api/v1/servers`: the server replicas of this store, each as it registered itself,
//! with which one leads (from the leader lease) and which are stale.

use axum::extract::RawQuery;
use axum::http::StatusCode;
use axum::response::Response;

use super::{ApiError, Ctx, json_response, query};
use crate::store::replicas::{ServerView, views};

/// The server replicas, as served.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ServerList {
    /// By id; stale replicas are listed until they are pruned.
    pub items: Vec<ServerView>,
    /// Set when the store could not be read: only the answering replica is listed, from
    /// what it knows of itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Lists the server replicas of the store: id, host name, API and agent addresses, version,
/// when each started and was last seen, whether it leads (the lease's holder) and in which
/// epoch, whether it reaches the store. A replica not seen for a few heartbeats is `Stale`;
/// one not seen for an hour is removed.
#[utoipa::path(get, path = "/api/v1/servers", tag = "servers",
    responses(
        (status = 200, description = "The server replicas, by id", body = ServerList),
        (status = 401, description = "No valid API token", body = super::ErrorBody),
        (status = 403, description = "Not a platform-admin or a cluster-wide viewer", body = super::ErrorBody),
    ))]
pub async fn list_servers(ctx: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let params = query::parse(raw.as_deref(), &["watch", "resourceVersion"])?;
    if let Some(from) = super::watch::params(&params)? {
        let reader = ctx.clone();
        return super::watch::watch_polled(&ctx, from, ctx.sse, move || {
            let ctx = reader.clone();
            async move {
                let (items, _) = read_servers(&ctx).await?;
                items
                    .iter()
                    .map(|s| {
                        let json = serde_json::to_string(s).map_err(ApiError::internal)?;
                        Ok((s.id.clone(), json))
                    })
                    .collect()
            }
        })
        .await;
    }
    let (items, message) = read_servers(&ctx).await?;
    let text = serde_json::to_string(&ServerList { items, message }).map_err(ApiError::internal)?;
    Ok(json_response(StatusCode::OK, text, ctx.index()))
}

/// The server replicas as listed, and why only this one is when the store cannot be read.
async fn read_servers(ctx: &Ctx) -> Result<(Vec<ServerView>, Option<String>), ApiError> {
    let read = ctx
        .state
        .run_unscoped(|store| Ok(store.server_replicas().map_err(|e| e.to_string())))
        .await?;
    let me = ctx.metrics().replica();
    let (items, message) = match read {
        Ok(replicas) => (views(Some(&replicas), me.as_ref()), None),
        Err(e) => (
            views(None, me.as_ref()),
            Some(format!(
                "the store cannot be reached ({e}); only this server is listed"
            )),
        ),
    };
    Ok((items, message))
}
