//! `POST .../instances/{name}/rollout/{action}`: pause, resume, promote, abort and undo an
//! instance's update.

use axum::body::Body;
use axum::extract::RawQuery;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::body::{self, BODY_LIMIT};
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::objects::check_path_names;
use super::{AuditNote, Ctx, P, json_response, query};
use crate::controllers::rollout::{self, Command};
use crate::model::{
    FieldProblem, InstanceSpec, ObjectKey, OpenClawInstance, Resource, RolloutStatus, decode_typed,
    validate_object,
};
use crate::store::{Outcome, StoreError, WriteMode};

/// The spec fields `rollout undo` writes back from a revision's record.
pub const UNDO_FIELDS: [&str; 6] = [
    "version",
    "image",
    "env",
    "resources",
    "config",
    "configTemplate",
];

/// `POST .../rollout/{action}` body (optional: an empty body is `{}`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutRequest {
    /// `undo` only: the revision whose spec to write back. Default: the update's stable
    /// revision, or the one before the newest when the newest is stable.
    #[serde(default)]
    pub to_revision: Option<u64>,
}

/// What a `rollout` action did.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutAnswer {
    /// `tenant/project/name`.
    pub instance: String,
    pub action: String,
    /// What happened, for people.
    pub message: String,
    /// The instance's newest revision after the action (for `undo`, the one it made).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// The audit log's action for a `rollout` action.
pub(super) fn audit_action(action: &str) -> &'static str {
    match action {
        "pause" => "rollout.pause",
        "resume" => "rollout.resume",
        "promote" => "rollout.promote",
        "abort" => "rollout.abort",
        "undo" => "rollout.undo",
        _ => "rollout",
    }
}

/// `current` with the [`UNDO_FIELDS`] of a revision's recorded spec (`old`): each one set as
/// recorded, or removed when the record leaves it out. Everything else (replicas, placement,
/// the update strategy) stays as it is.
pub fn spec_from_record(
    current: &InstanceSpec,
    old: &serde_json::Map<String, Value>,
) -> Result<InstanceSpec, String> {
    let mut spec = serde_json::to_value(current).map_err(|e| e.to_string())?;
    if let Value::Object(m) = &mut spec {
        for f in UNDO_FIELDS {
            match old.get(f) {
                Some(v) if !v.is_null() => {
                    m.insert(f.to_string(), v.clone());
                }
                _ => {
                    m.remove(f);
                }
            }
        }
    }
    serde_json::from_value(spec).map_err(|e| e.to_string())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Pauses, resumes, promotes, aborts or undoes an instance's update.
///
/// - `pause`: no replica moves until `resume`.
/// - `resume`: continues a paused update, or restarts one that Failed or was RolledBack.
/// - `promote`: ends a Canary's pause step.
/// - `abort`: every replica on the new revision returns to the stable one (RolledBack).
/// - `undo` (`{"toRevision": N}` optional): writes the instance's own spec fields (`version`,
///   `image`, `env`, `resources`, `config`, `configTemplate`) back from revision N's record,
///   which makes a new revision and a normal update. Default N: the update's stable revision,
///   or the one before the newest.
#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/rollout/{action}", tag = "rollout",
    params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path),
        ("action" = String, Path, description = "pause, resume, promote, abort or undo")),
    request_body(content = Option<RolloutRequest>, description = "Optional; `toRevision` for undo"),
    responses(
        (status = 200, description = "Done", body = RolloutAnswer),
        (status = 400, description = "Unknown action or malformed body", body = ErrorBody),
        (status = 404, description = "NotFound", body = ErrorBody),
        (status = 409, description = "The action does not apply to the update as it stands", body = ErrorBody),
        (status = 422, description = "Invalid request, or the revision's spec is no longer valid", body = ErrorBody),
    ))]
pub async fn rollout_action(
    state: Ctx,
    P((tenant, project, name, action)): P<(String, String, String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    query::parse(raw.as_deref(), &[])?;
    check_path_names(&[("tenant", &tenant), ("project", &project), ("name", &name)])?;
    let command = match action.as_str() {
        "undo" => None,
        other => Some(Command::parse(other).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown rollout action {other:?}; one of pause, resume, promote, abort, undo"
            ))
        })?),
    };
    let (bytes, format) = body::read(&headers, body, BODY_LIMIT).await?;
    let request: RolloutRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        RolloutRequest::default()
    } else {
        let value = body::one_document(&bytes, format)?;
        decode_typed(value).map_err(|p| ApiError::invalid(vec![p]))?
    };
    if command.is_some() && request.to_revision.is_some() {
        return Err(ApiError::invalid(vec![FieldProblem::new(
            "toRevision",
            format!("applies to undo only, not {action}"),
        )]));
    }
    let key = ObjectKey::instance(tenant, project, name);
    let who = state.note.author.clone();
    let note = AuditNote::object(audit_action(&action), &key);
    let answer = match command {
        Some(cmd) => {
            let scope = state.caller.scope.clone();
            let key = key.clone();
            state
                .run_unscoped(move |store| {
                    if !scope.sees(&key) {
                        return Err(StoreError::NotFound(key.clone()).into());
                    }
                    let mut outcome: Option<Result<String, String>> = None;
                    let mut after: Option<OpenClawInstance> = None;
                    let now = now_ms();
                    store.update(&key, &mut |r| match r {
                        Resource::OpenClawInstance(i) => {
                            let result = rollout::command(i, cmd, &who, now);
                            let changed = result.is_ok();
                            outcome = Some(result);
                            after = Some(i.clone());
                            changed
                        }
                        _ => false,
                    })?;
                    match outcome {
                        None => Err(StoreError::NotFound(key.clone()).into()),
                        Some(Err(why)) => Err(ApiError::new(ErrorCode::Conflict, why)),
                        Some(Ok(message)) => {
                            let status = after.and_then(|i| i.status);
                            Ok(RolloutAnswer {
                                instance: format!("{}/{}/{}", key.tenant, key.project, key.name),
                                action: cmd.as_str().to_string(),
                                message,
                                revision: status.as_ref().and_then(|s| s.config_revision),
                                rollout: status.and_then(|s| s.rollout),
                            })
                        }
                    }
                })
                .await?
        }
        None => {
            let key = key.clone();
            state
                .run(move |store| {
                    let current = store
                        .get(&key)?
                        .ok_or_else(|| StoreError::NotFound(key.clone()))?;
                    let Resource::OpenClawInstance(mut i) = current.resource()? else {
                        return Err(ApiError::internal(format!("{key} decoded as another kind")));
                    };
                    let status = i.status.clone().unwrap_or_default();
                    let newest = status.config_revision;
                    let to = match request.to_revision {
                        Some(n) => n,
                        None => {
                            let stable = status
                                .rollout
                                .as_ref()
                                .and_then(|r| r.stable_revision)
                                .filter(|s| Some(*s) != newest);
                            match stable {
                                Some(s) => s,
                                None => {
                                    let (_, history) = store.config_revisions(&key)?;
                                    history
                                        .iter()
                                        .map(|r| r.revision)
                                        .filter(|r| newest.is_none_or(|n| *r < n))
                                        .max()
                                        .ok_or_else(|| {
                                            ApiError::new(
                                                ErrorCode::Conflict,
                                                format!(
                                                    "{} has no earlier revision to undo to",
                                                    key.name
                                                ),
                                            )
                                        })?
                                }
                            }
                        }
                    };
                    if Some(to) == newest {
                        return Err(ApiError::new(
                            ErrorCode::Conflict,
                            format!("revision {to} is already the newest of {}", key.name),
                        ));
                    }
                    let record = store.config_revision(&key, to)?.ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::NotFound,
                            format!(
                                "{key} has no revision {to}; `clusterclaw rollout history instance {}` lists them",
                                key.name
                            ),
                        )
                    })?;
                    let Some(Value::Object(old)) = record.spec else {
                        return Err(ApiError::new(
                            ErrorCode::Conflict,
                            format!(
                                "revision {to} of {} does not record its spec; `clusterclaw config rollback` restores its config",
                                key.name
                            ),
                        ));
                    };
                    i.spec = spec_from_record(&i.spec, &old).map_err(|e| {
                        ApiError::invalid(vec![FieldProblem::new(
                            "toRevision",
                            format!("the spec recorded in revision {to} no longer reads: {e}"),
                        )])
                    })?;
                    i.metadata.resource_version = Some(current.resource_version);
                    let resource = Resource::OpenClawInstance(i);
                    let problems = validate_object(&resource);
                    if !problems.is_empty() {
                        return Err(ApiError::invalid(problems));
                    }
                    let summary = store
                        .write_with_message(
                            &[(resource, WriteMode::Update)],
                            Some(&format!("rollout undo to revision {to}")),
                        )
                        .map_err(|e| match e {
                            StoreError::InBatch { source, .. } => *source,
                            e => e,
                        })?;
                    let result = summary.results.into_iter().next().ok_or_else(|| {
                        ApiError::internal("the undo's write gave no result")
                    })?;
                    let (revision, rollout) = match result.object.resource()? {
                        Resource::OpenClawInstance(i) => {
                            let s = i.status.unwrap_or_default();
                            (s.config_revision, s.rollout)
                        }
                        _ => (None, None),
                    };
                    let message = match (result.outcome, revision) {
                        (Outcome::Unchanged, _) => format!(
                            "the spec already is that of revision {to}; nothing changed"
                        ),
                        (_, Some(r)) if Some(r) != newest => {
                            format!("spec of revision {to} written back as revision {r}")
                        }
                        _ => format!(
                            "spec of revision {to} written back; it makes no new revision"
                        ),
                    };
                    Ok(RolloutAnswer {
                        instance: format!("{}/{}/{}", key.tenant, key.project, key.name),
                        action: "undo".into(),
                        message,
                        revision,
                        rollout,
                    })
                })
                .await?
        }
    };
    let text = serde_json::to_string(&answer).map_err(ApiError::internal)?;
    let index = state.inner.store.index();
    let mut resp = json_response(StatusCode::OK, text, index);
    resp.extensions_mut().insert(note);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn undo_writes_back_only_the_instances_own_fields() {
        let current: InstanceSpec = serde_json::from_value(json!({
            "image": "registry.example.com/openclaw:bad", "replicas": 5,
            "env": {"A": "2"}, "placement": {"hostSelector": {"region": "eu"}},
        }))
        .unwrap();
        let old = json!({"version": "2026.7.1", "env": {"A": "1"}, "config": {"gateway": {"bind": "lan"}}});
        let spec = spec_from_record(&current, old.as_object().unwrap()).unwrap();
        assert_eq!(spec.image, None, "the record had no image");
        assert_eq!(spec.version.as_deref(), Some("2026.7.1"));
        assert_eq!(spec.replicas, 5, "replicas are not part of a revision");
        assert_eq!(spec.placement, current.placement);
        assert_eq!(serde_json::to_value(&spec.env).unwrap(), json!({"A": "1"}));
        let bad = json!({"env": "not a map"});
        assert!(spec_from_record(&current, bad.as_object().unwrap()).is_err());
    }
}
