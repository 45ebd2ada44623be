//! Handlers of state volumes on hosts: the list (scoped: a tenant's roles see their tenant's
//! volumes only) and the removal of one that no replica claims.

use axum::extract::RawQuery;
use axum::http::StatusCode;
use axum::response::Response;

use super::error::ErrorCode;
use super::objects::check_path_names;
use super::{ApiError, AuditNote, Ctx, P, json_response, query};
use crate::audit::AuditObject;
use crate::controllers::volumes::{VolumeStatus, VolumeView, views};
use crate::store::Scope;

/// A list of state volumes, as served.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct VolumeList {
    pub items: Vec<VolumeView>,
}

/// Whether a volume is in `scope`.
fn sees(scope: &Scope, v: &VolumeView) -> bool {
    match scope {
        Scope::Cluster => true,
        Scope::Tenant(t) => v.tenant == *t,
        Scope::Project { tenant, project } => v.tenant == *tenant && v.project == *project,
    }
}

/// A volume name as engines take them: 1 to 255 letters, digits, `_`, `.`, `-`, starting
/// with a letter or digit.
fn check_volume_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=255).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "volume: {name:?} is not a volume name (1 to 255 letters, digits, '_', '.', '-', starting with a letter or digit)"
        )))
    }
}

/// Lists the state volumes hosts report, with who claims each: `InUse` (a replica placed
/// there), `Retained` (kept for a replica by `volumeRetention` or a failover), `Orphaned`
/// (no replica claims it), `Deleting` (its removal was asked for). With `watch=true`, streams
/// the changes of the list (see [`super::watch::watch_polled`]).
#[utoipa::path(get, path = "/api/v1/volumes", tag = "volumes",
    params(("host" = Option<String>, Query, description = "Only this host's volumes")),
    responses((status = 200, description = "Volumes by host and name", body = VolumeList)))]
pub async fn list_volumes(ctx: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let params = query::parse(raw.as_deref(), &["host", "watch", "resourceVersion"])?;
    let host = params.get("host").map(str::to_string);
    if let Some(h) = &host {
        check_path_names(&[("host", h)])?;
    }
    if let Some(from) = super::watch::params(&params)? {
        let reader = ctx.clone();
        return super::watch::watch_polled(&ctx, from, ctx.sse, move || {
            let (ctx, host) = (reader.clone(), host.clone());
            async move {
                let (_, items) = read_volumes(&ctx, host).await?;
                items
                    .iter()
                    .map(|v| {
                        let json = serde_json::to_string(v).map_err(ApiError::internal)?;
                        Ok((format!("{}/{}", v.host, v.name), json))
                    })
                    .collect()
            }
        })
        .await;
    }
    let (index, items) = read_volumes(&ctx, host).await?;
    let text = serde_json::to_string(&VolumeList { items }).map_err(ApiError::internal)?;
    Ok(json_response(StatusCode::OK, text, index))
}

/// The volumes (of `host`, or every host's) the caller sees, with the index read at.
async fn read_volumes(ctx: &Ctx, host: Option<String>) -> Result<(u64, Vec<VolumeView>), ApiError> {
    let scope = ctx.caller().scope.clone();
    ctx.state
        .run_unscoped(move |store| {
            let index = store.index();
            let items: Vec<VolumeView> = views(store, host.as_deref())?
                .into_iter()
                .filter(|v| sees(&scope, v))
                .collect();
            Ok((index, items))
        })
        .await
}

/// Asks a host to remove one of its state volumes. Refused (409) while a replica claims it
/// (`InUse` or `Retained`); otherwise recorded (a volume kept of a deleted instance is let
/// go), and the host's agent removes it, if no replica it runs claims it either. Idempotent
/// while the removal is under way.
#[utoipa::path(delete, path = "/api/v1/hosts/{host}/volumes/{name}", tag = "volumes",
    params(("host" = String, Path), ("name" = String, Path, description = "The volume's name on the host")),
    responses((status = 200, description = "The volume, now Deleting", body = VolumeView),
        (status = 404, description = "The host reports no such volume (in the caller's scope)", body = super::ErrorBody),
        (status = 409, description = "A replica claims the volume", body = super::ErrorBody)))]
pub async fn delete_volume(
    ctx: Ctx,
    P((host, name)): P<(String, String)>,
) -> Result<Response, ApiError> {
    check_path_names(&[("host", &host)])?;
    check_volume_name(&name)?;
    let scope = ctx.caller().scope.clone();
    let reason = format!("user:{}", ctx.caller().principal.token_name);
    let (h, n) = (host.clone(), name.clone());
    let (index, view) = ctx
        .state
        .run_unscoped(move |store| {
            let found = views(store, Some(&h))?
                .into_iter()
                .find(|v| v.name == n && sees(&scope, v));
            let Some(v) = found else {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!(
                        "host {h:?} reports no volume {n:?}; `clusterclaw get volumes --host {h}` lists its volumes"
                    ),
                ));
            };
            match v.status {
                VolumeStatus::InUse | VolumeStatus::Retained => {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!(
                            "volume {n:?} on host {h:?} is {}: {}; it can be deleted once no replica claims it",
                            v.status.as_str(),
                            v.message
                        ),
                    ));
                }
                VolumeStatus::Orphaned | VolumeStatus::Deleting => {}
            }
            let now = crate::util::now_rfc3339();
            let (_, index) = store.request_volume_deletion(&h, &n, &reason, &now)?;
            let v = views(store, Some(&h))?
                .into_iter()
                .find(|v| v.name == n)
                .unwrap_or(v);
            Ok((index, v))
        })
        .await?;
    let text = serde_json::to_string(&view).map_err(ApiError::internal)?;
    let mut resp = json_response(StatusCode::OK, text, index);
    resp.extensions_mut().insert(AuditNote {
        action: "volume.delete",
        object: Some(AuditObject {
            kind: "Volume".into(),
            tenant: Some(view.tenant.clone()).filter(|t| !t.is_empty()),
            project: Some(view.project.clone()).filter(|p| !p.is_empty()),
            name: format!("{host}/{name}"),
        }),
        generation_before: None,
        generation_after: None,
    });
    Ok(resp)
}
