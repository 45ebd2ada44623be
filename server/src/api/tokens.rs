//! Handlers for tokens: create (the secret is shown once), list records, revoke.

use std::time::Duration;

use axum::body::Body;
use axum::extract::RawQuery;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::body::{self, BODY_LIMIT};
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::openapi::TokenList;
use super::{AuditNote, Caller, Ctx, P, json_response, query};
use crate::audit::AuditObject;
use crate::auth::rbac::{self, Role};
use crate::auth::{Secret, generate_api_token, generate_join_token, generate_token_id, hash_token};
use crate::model::{FieldProblem, Kind, ObjectKey, decode_typed, validate_dns_label};
use crate::store::{TokenKind, TokenRecord};
use crate::util::{is_format_char, unix_now};

/// Lifetime of a join token created without `ttl`.
pub const DEFAULT_JOIN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest `ttl`: ten years (`10y`, a year counted as 365.25 days).
pub const MAX_TTL: Duration = Duration::from_secs(10 * 31_557_600);
/// Longest token name.
const MAX_NAME: usize = 128;

/// `POST /api/v1/tokens` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateToken {
    /// `join` (enrolls hosts) or `api` (calls the API).
    pub kind: TokenKind,
    /// Lifetime such as `1h` or `30d`; join tokens default to 24h, API tokens do not expire.
    #[serde(default)]
    pub ttl: Option<String>,
    /// How many hosts a join token may enroll; unlimited within its lifetime when absent.
    #[serde(default)]
    pub uses: Option<i64>,
    /// A label for people.
    #[serde(default)]
    pub name: Option<String>,
    /// Role of an API token: `platform-admin`, `tenant-admin`, `project-editor` or `viewer`.
    /// Defaults to the caller's own role. A caller grants only its own role or a lesser one.
    #[serde(default)]
    pub role: Option<String>,
    /// Tenant an API token is limited to (required for `tenant-admin` and `project-editor`;
    /// a tenant-admin's tokens are always for its own tenant).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Project (in `tenant`) an API token is limited to (required for `project-editor`).
    #[serde(default)]
    pub project: Option<String>,
}

/// `POST /api/v1/tokens` answer: the only time the secret is shown.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedToken {
    /// The secret (`ccj_...` or `cca_...`). Not stored; shown only here.
    #[schema(value_type = String)]
    pub token: Secret,
    pub id: String,
    pub kind: TokenKind,
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub role: String,
    /// Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uses_remaining: Option<i64>,
}

/// `DELETE /api/v1/tokens/{id}` answer.
#[derive(Serialize, ToSchema)]
pub struct Revoked {
    pub revoked: String,
}

fn parse_request(value: serde_json::Value) -> Result<CreateToken, ApiError> {
    decode_typed(value).map_err(|p| ApiError::invalid(vec![p]))
}

/// Checks what `caller` may grant: the role (its own or a lesser one), the tenant (its own,
/// when it is limited to one) and that the token's scope fits its role.
fn check_grant(
    req: &CreateToken,
    caller: &Caller,
    record: &mut TokenRecord,
) -> Result<(), ApiError> {
    let forbidden = |m: String| ApiError::new(ErrorCode::Forbidden, m);
    if record.kind == TokenKind::Join {
        if caller.role != Role::PlatformAdmin {
            return Err(forbidden(format!(
                "only platform-admin may create join tokens (they enroll hosts); the caller is {}",
                caller.role
            )));
        }
        if req.tenant.is_some() || req.project.is_some() {
            return Err(ApiError::invalid(vec![FieldProblem::new(
                "tenant",
                "join tokens belong to no tenant; hosts serve the whole cluster",
            )]));
        }
        return Ok(());
    }
    let role = Role::parse(&record.role).unwrap_or(Role::Viewer);
    if !caller.role.may_grant(role) {
        let grantable: Vec<&str> = Role::ALL
            .into_iter()
            .filter(|r| caller.role.may_grant(*r))
            .map(Role::as_str)
            .collect();
        return Err(forbidden(format!(
            "a {} may not create a {role} token; it may create {}",
            caller.role,
            grantable.join(", ")
        )));
    }
    let mut problems = Vec::new();
    for (field, value) in [("tenant", &req.tenant), ("project", &req.project)] {
        if let Some(v) = value
            && let Err(e) = validate_dns_label(v)
        {
            problems.push(FieldProblem::new(field, e));
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems));
    }
    record.tenant = req.tenant.clone();
    record.project = req.project.clone();
    if let Some(own) = caller.scope.tenant() {
        match &record.tenant {
            None => record.tenant = Some(own.to_string()),
            Some(t) if t == own => {}
            Some(_) => {
                return Err(forbidden(format!(
                    "a {} of tenant {own} may only create tokens for tenant {own}",
                    caller.role
                )));
            }
        }
    }
    if let Some(own) = caller.scope.project()
        && record.project.as_deref() != Some(own)
    {
        return Err(forbidden(format!(
            "a {} of project {own} may only create tokens for project {own}",
            caller.role
        )));
    }
    if role == Role::PlatformAdmin && (record.tenant.is_some() || record.project.is_some()) {
        return Err(ApiError::invalid(vec![FieldProblem::new(
            "tenant",
            "a platform-admin token is cluster-wide; leave tenant and project out",
        )]));
    }
    let principal = crate::auth::Principal {
        token_id: record.id.clone(),
        token_name: record.name.clone(),
        role: record.role.clone(),
        tenant: record.tenant.clone(),
        project: record.project.clone(),
    };
    rbac::scope_of(&principal, role).map_err(|_| {
        let need = match role {
            Role::TenantAdmin => "a tenant-admin token needs a tenant and no project",
            Role::ProjectEditor => "a project-editor token needs a tenant and a project",
            _ => "a viewer token names a tenant before a project",
        };
        ApiError::invalid(vec![FieldProblem::new("tenant", need)])
    })?;
    Ok(())
}

/// Checks a request and turns it into a record (without the hash).
fn plan(req: &CreateToken, now: i64, caller_role: Role) -> Result<TokenRecord, ApiError> {
    let mut problems = Vec::new();
    let ttl = match req.ttl.as_deref() {
        None => None,
        Some(t) => {
            match humantime::parse_duration(t) {
                Ok(d) if d > MAX_TTL => {
                    problems.push(FieldProblem::new(
                    "ttl",
                    format!("{t:?} is longer than the maximum of 10y; a token lives at most ten years"),
                ));
                    None
                }
                Ok(d) if d >= Duration::from_secs(60) => Some(d),
                Ok(_) => {
                    problems.push(FieldProblem::new(
                        "ttl",
                        format!("{t:?} is too short; a token lives at least 1m"),
                    ));
                    None
                }
                Err(e) => {
                    problems.push(FieldProblem::new(
                        "ttl",
                        format!("{t:?} is not a duration ({e}); use e.g. 1h, 7d"),
                    ));
                    None
                }
            }
        }
    };
    let name = req.name.clone().unwrap_or_default();
    if name.chars().count() > MAX_NAME || name.chars().any(|c| c.is_control() || is_format_char(c))
    {
        problems.push(FieldProblem::new(
            "name",
            format!(
                "at most {MAX_NAME} characters, no control or invisible formatting characters (such as U+202E)"
            ),
        ));
    }
    let role = match req.kind {
        TokenKind::Join => {
            if req.role.is_some() {
                problems.push(FieldProblem::new(
                    "role",
                    "join tokens have no role; roles are for API tokens",
                ));
            }
            String::new()
        }
        TokenKind::Api => {
            if req.uses.is_some() {
                problems.push(FieldProblem::new(
                    "uses",
                    "only join tokens are limited in uses",
                ));
            }
            let role = req
                .role
                .clone()
                .unwrap_or_else(|| caller_role.as_str().to_string());
            if Role::parse(&role).is_none() {
                problems.push(FieldProblem::new(
                    "role",
                    format!(
                        "{role:?} is not a role; the roles are {}",
                        rbac::role_names()
                    ),
                ));
            }
            role
        }
    };
    if let Some(u) = req.uses
        && u < 1
    {
        problems.push(FieldProblem::new(
            "uses",
            format!("{u} is not allowed; a join token has at least 1 use"),
        ));
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems));
    }
    let ttl = match (req.kind, ttl) {
        (_, Some(d)) => Some(d),
        (TokenKind::Join, None) => Some(DEFAULT_JOIN_TTL),
        (TokenKind::Api, None) => None,
    };
    let expires_at =
        ttl.map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
    Ok(TokenRecord {
        id: generate_token_id(),
        name,
        kind: req.kind,
        role,
        tenant: None,
        project: None,
        created_at: now,
        expires_at,
        uses_remaining: req.uses,
        revoked: false,
        hash: String::new(),
    })
}

/// Creates a token; the answer holds the secret, which is never shown again.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses(
        (status = 201, description = "Created; `token` is the secret", body = CreatedToken),
        (status = 422, description = "Invalid", body = ErrorBody),
    ))]
pub async fn create_token(
    state: Ctx,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    query::parse(raw.as_deref(), &[])?;
    let (bytes, format) = body::read(&headers, body, BODY_LIMIT).await?;
    let request = parse_request(body::one_document(&bytes, format)?)?;
    let mut record = plan(&request, unix_now(), state.caller().role)?;
    check_grant(&request, state.caller(), &mut record)?;
    let secret = match record.kind {
        TokenKind::Join => generate_join_token(),
        TokenKind::Api => generate_api_token(),
    };
    record.hash = hash_token(secret.expose());
    let created = CreatedToken {
        token: secret,
        id: record.id.clone(),
        kind: record.kind,
        name: record.name.clone(),
        role: record.role.clone(),
        expires_at: record.expires_at,
        uses_remaining: record.uses_remaining,
    };
    let tenant_of_token = record.tenant.clone();
    let index = state
        .run(move |store| {
            // The tenant and project a token is limited to must exist (and be visible).
            if let Some(t) = &record.tenant {
                let key = ObjectKey::cluster(Kind::Tenant, t);
                if store.get(&key)?.is_none() {
                    return Err(missing("tenant", &key));
                }
                if let Some(p) = &record.project {
                    let key = ObjectKey::project(t, p);
                    if store.get(&key)?.is_none() {
                        return Err(missing("project", &key));
                    }
                }
            }
            store.insert_token(&record)?;
            Ok(store.index())
        })
        .await?;
    tracing::info!(id = %created.id, kind = created.kind.as_str(), "token created");
    let note = AuditNote {
        action: "token.create",
        object: Some(AuditObject {
            tenant: tenant_of_token,
            ..AuditObject::token(created.id.clone())
        }),
        generation_before: None,
        generation_after: None,
    };
    let text = serde_json::to_string(&created).map_err(ApiError::internal)?;
    let mut resp = json_response(StatusCode::CREATED, text, index);
    resp.extensions_mut().insert(note);
    Ok(resp)
}

fn missing(field: &str, key: &ObjectKey) -> ApiError {
    let message = format!("{key} does not exist");
    ApiError::new(ErrorCode::NotFound, message.clone())
        .with_details(vec![FieldProblem::new(field, message)])
}

/// Lists token records (never secrets).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens",
    responses((status = 200, description = "Token records", body = TokenList)))]
pub async fn list_tokens(state: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let params = query::parse(raw.as_deref(), &["watch", "resourceVersion"])?;
    if let Some(from) = super::watch::params(&params)? {
        let reader = state.clone();
        return super::watch::watch_polled(&state, from, state.sse, move || {
            let ctx = reader.clone();
            async move {
                ctx.run(|store| {
                    store
                        .list_tokens()?
                        .iter()
                        .map(|t| {
                            let json = serde_json::to_string(t).map_err(ApiError::internal)?;
                            Ok((t.id.clone(), json))
                        })
                        .collect()
                })
                .await
            }
        })
        .await;
    }
    let (index, items) = state
        .run(|store| Ok((store.index(), store.list_tokens()?)))
        .await?;
    let text = serde_json::to_string(&TokenList { index, items }).map_err(ApiError::internal)?;
    Ok(json_response(StatusCode::OK, text, index))
}

/// Revokes a token at once.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "Revoked", body = Revoked),
        (status = 404, description = "No such token", body = ErrorBody),
    ))]
pub async fn revoke_token(
    state: Ctx,
    P(id): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    query::parse(raw.as_deref(), &[])?;
    let lookup = id.clone();
    let (index, found) = state
        .run(move |store| Ok((store.index(), store.revoke_token(&lookup)?)))
        .await?;
    if !found {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("token {id} not found; GET /api/v1/tokens lists them"),
        ));
    }
    state.inner.auth.forget_token(&id);
    tracing::info!(id = %id, "token revoked");
    let note = AuditNote {
        action: "token.revoke",
        object: Some(AuditObject::token(id.clone())),
        generation_before: None,
        generation_after: None,
    };
    let text = serde_json::to_string(&Revoked { revoked: id }).map_err(ApiError::internal)?;
    let mut resp = json_response(StatusCode::OK, text, index);
    resp.extensions_mut().insert(note);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: TokenKind) -> CreateToken {
        CreateToken {
            kind,
            ttl: None,
            uses: None,
            name: None,
            role: None,
            tenant: None,
            project: None,
        }
    }

    #[test]
    fn join_tokens_expire_by_default() {
        let r = plan(&req(TokenKind::Join), 1000, Role::PlatformAdmin).unwrap();
        assert_eq!(r.expires_at, Some(1000 + 86400));
        assert_eq!(r.role, "");
        let r = plan(
            &CreateToken {
                ttl: Some("1h".into()),
                uses: Some(3),
                ..req(TokenKind::Join)
            },
            0,
            Role::PlatformAdmin,
        )
        .unwrap();
        assert_eq!((r.expires_at, r.uses_remaining), (Some(3600), Some(3)));
        let r = plan(&req(TokenKind::Api), 0, Role::PlatformAdmin).unwrap();
        assert_eq!((r.expires_at, r.role.as_str()), (None, "platform-admin"));
        let r = plan(&req(TokenKind::Api), 0, Role::TenantAdmin).unwrap();
        assert_eq!(r.role, "tenant-admin", "the caller's own role by default");
    }

    #[test]
    fn created_tokens_do_not_show_their_secret_in_debug() {
        let created = CreatedToken {
            token: Secret::new("ccj_topsecret"),
            id: "id".into(),
            kind: TokenKind::Join,
            name: String::new(),
            role: String::new(),
            expires_at: None,
            uses_remaining: None,
        };
        assert!(!format!("{created:?}").contains("topsecret"));
        assert!(
            serde_json::to_string(&created)
                .unwrap()
                .contains("\"token\":\"ccj_topsecret\""),
            "the answer carries it"
        );
    }

    #[test]
    fn lifetimes_are_bounded() {
        let ttl = |t: &str| {
            plan(
                &CreateToken {
                    ttl: Some(t.into()),
                    ..req(TokenKind::Join)
                },
                0,
                Role::PlatformAdmin,
            )
        };
        assert_eq!(ttl("10y").unwrap().expires_at, Some(315_576_000));
        let e = ttl("10y 1s").unwrap_err();
        assert_eq!(e.details[0].field, "ttl");
        assert!(e.details[0].problem.contains("maximum of 10y"), "{e}");
    }

    #[test]
    fn bad_requests_list_every_problem() {
        let bad = CreateToken {
            kind: TokenKind::Api,
            ttl: Some("soon".into()),
            uses: Some(0),
            name: Some("x".repeat(200)),
            role: Some("root".into()),
            tenant: None,
            project: None,
        };
        let e = plan(&bad, 0, Role::PlatformAdmin).unwrap_err();
        let fields: Vec<_> = e.details.iter().map(|d| d.field.as_str()).collect();
        assert_eq!(fields, ["ttl", "name", "uses", "role", "uses"]);
        let e = parse_request(serde_json::json!({"kind": "join", "ttll": "1h"})).unwrap_err();
        assert_eq!(e.code, ErrorCode::Invalid);
        assert!(
            e.details[0].problem.contains("unknown field 'ttll'"),
            "{:?}",
            e.details
        );
    }
}
