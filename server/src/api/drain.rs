//! `POST /api/v1/hosts/{host}/drain` starts a drain (the drain controller moves the host's
//! replicas; see [`crate::controllers::drain`]); `GET` shows its progress.

use axum::body::Body;
use axum::extract::RawQuery;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use utoipa::ToSchema;

use super::body::{self, BODY_LIMIT};
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::objects::{check_path_names, not_found_host};
use super::{AuditNote, Ctx, P, json_response, query};
use crate::model::{
    DrainPhase, DrainStatus, FieldProblem, Kind, MAX_DRAIN_TIMEOUT_SECS, ObjectKey, Resource,
    decode_typed, parse_duration,
};

/// The default `timeout` of a drain.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "10m";

/// `POST .../drain` body.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DrainRequest {
    /// How long the drain may take, e.g. `10m` (the default), `90s`, `1h`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Replicas start fresh on their new host; their old volumes stay retained on this one.
    #[serde(default)]
    pub discard_state: bool,
}

fn invalid(field: &str, message: String) -> ApiError {
    ApiError::invalid(vec![FieldProblem::new(field, message)])
}

/// Starts draining a host: cordons it and records a drain the drain controller carries out
/// (moving each replica with its state volume). A drain already in progress is answered as
/// it is (409 when asked with other settings).
#[utoipa::path(post, path = "/api/v1/hosts/{host}/drain", tag = "hosts",
    params(("host" = String, Path)), request_body = DrainRequest,
    responses((status = 202, description = "The drain, started", body = DrainStatus),
        (status = 200, description = "The drain already in progress", body = DrainStatus),
        (status = 404, description = "No such host", body = ErrorBody),
        (status = 422, description = "A bad timeout", body = ErrorBody)))]
pub async fn start_drain(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_path_names(&[("host", &name)])?;
    query::parse(raw.as_deref(), &[])?;
    let (bytes, format) = body::read(&headers, body, BODY_LIMIT).await?;
    let request: DrainRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        DrainRequest::default()
    } else {
        let value = body::one_document(&bytes, format)?;
        decode_typed(value).map_err(|p| ApiError::invalid(vec![p]))?
    };
    let text = request
        .timeout
        .clone()
        .unwrap_or_else(|| DEFAULT_DRAIN_TIMEOUT.to_string());
    let timeout = parse_duration(&text).map_err(|e| {
        invalid(
            "timeout",
            format!("{text:?} is not a duration ({e}); e.g. 10m, 90s, 1h"),
        )
    })?;
    if timeout.is_zero() || timeout.as_secs() > MAX_DRAIN_TIMEOUT_SECS {
        return Err(invalid(
            "timeout",
            format!("{text:?} is out of range; a drain's timeout is between 1s and 7d"),
        ));
    }
    let key = ObjectKey::cluster(Kind::Host, name.clone());
    let note = AuditNote::object("host.drain", &key);
    let discard = request.discard_state;
    let (index, started, drain) = state
        .run(move |store| {
            let Some(cluster) = store.cluster_store() else {
                return Err(not_found_host(&name));
            };
            let now_ms = crate::controllers::hosts::now_ms();
            let mut found = false;
            let mut started = false;
            let mut result: Option<DrainStatus> = None;
            let mut conflict = None;
            cluster.update(&key, &mut |r| {
                let Resource::Host(h) = r else { return false };
                found = true;
                let status = h.status.get_or_insert_with(Default::default);
                if let Some(d) = &status.drain
                    && d.phase == DrainPhase::Draining
                {
                    if d.discard_state != discard {
                        conflict = Some(format!(
                            "host {} is already being drained ({}); wait for it to finish",
                            h.metadata.name,
                            if d.discard_state {
                                "with --discard-state"
                            } else {
                                "with its state"
                            }
                        ));
                    }
                    result = Some(d.clone());
                    // The cordon goes with it, whatever happened to it since.
                    let changed = !h.spec.unschedulable;
                    h.spec.unschedulable = true;
                    return changed;
                }
                let deadline_ms =
                    now_ms.saturating_add(i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX));
                let drain = DrainStatus {
                    phase: DrainPhase::Draining,
                    discard_state: discard,
                    started_at: crate::events::rfc3339_ms(now_ms),
                    deadline: crate::events::rfc3339_ms(deadline_ms),
                    ..DrainStatus::default()
                };
                status.drain = Some(drain.clone());
                h.spec.unschedulable = true;
                result = Some(drain);
                started = true;
                true
            })?;
            if !found {
                return Err(not_found_host(&name));
            }
            if let Some(c) = conflict {
                return Err(ApiError::new(ErrorCode::Conflict, c));
            }
            let index = cluster.index();
            Ok((index, started, result.unwrap_or_default()))
        })
        .await?;
    let text = serde_json::to_string(&drain).map_err(|e| ApiError::internal(e.to_string()))?;
    let code = if started {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let mut resp = json_response(code, text, index);
    resp.extensions_mut().insert(note);
    Ok(resp)
}

/// The host's last drain, with the bytes of state moved so far.
#[utoipa::path(get, path = "/api/v1/hosts/{host}/drain", tag = "hosts",
    params(("host" = String, Path)),
    responses((status = 200, description = "The last drain of the host", body = DrainStatus),
        (status = 404, description = "No such host, or it was never drained", body = ErrorBody)))]
pub async fn get_drain(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("host", &name)])?;
    query::parse(raw.as_deref(), &[])?;
    let key = ObjectKey::cluster(Kind::Host, name.clone());
    let (index, drain) = state
        .run(move |store| {
            let Some(cluster) = store.cluster_store() else {
                return Err(not_found_host(&name));
            };
            let (index, object) = match cluster.get_at(&key)? {
                (index, Some(o)) => (index, o),
                (_, None) => return Err(not_found_host(&name)),
            };
            let Resource::Host(h) = object.resource()? else {
                return Err(not_found_host(&name));
            };
            let drain = h.status.and_then(|s| s.drain).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("host {name:?} was never drained; `clusterclaw drain host {name}` starts one"),
                )
            })?;
            Ok((index, drain))
        })
        .await?;
    let text = serde_json::to_string(&drain).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(StatusCode::OK, text, index))
}
