//! Handlers for the audit log: list records, verify the hash chain.

use std::time::{Duration, SystemTime};

use axum::extract::RawQuery;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::{ApiState, Caller, Ctx, json_response, query};
use crate::audit::{AuditFilter, AuditRecord, AuditVerification, parse_since};
use crate::model::validate_dns_label;
use crate::store::Scope;

/// Records a list answers when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest `limit`.
pub const MAX_LIMIT: usize = 1000;
/// How long a listing waits for the records this server has queued before it to be stored.
pub const QUEUED_WAIT: Duration = Duration::from_secs(5);

/// `GET /api/v1/audit` answer: records, oldest first.
#[derive(Serialize, ToSchema)]
pub struct AuditList {
    pub items: Vec<AuditRecord>,
}

/// `GET /api/v1/audit/verify` answer. When the chain is broken (409) it also carries the
/// API's error fields `code`, `message` and `details`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditVerifyReport {
    /// Whether every record is intact.
    pub ok: bool,
    /// Records found intact, from the first one on.
    pub records: u64,
    /// Hash of the last intact record (64 zeros when there is none).
    pub head: String,
    /// The first record that is not intact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken_seq: Option<u64>,
    /// What is wrong with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<crate::model::FieldProblem>>,
}

impl AuditVerifyReport {
    fn from_verification(v: AuditVerification) -> (StatusCode, Self) {
        let mut report = AuditVerifyReport {
            ok: v.broken.is_none(),
            records: v.records,
            head: v.head.clone(),
            broken_seq: None,
            problem: None,
            code: None,
            message: None,
            details: None,
        };
        let (Some(b), Some(problem)) = (&v.broken, v.problem()) else {
            return (StatusCode::OK, report);
        };
        let code = ErrorCode::Conflict;
        report.message = Some(format!("the audit log is not intact: {problem}"));
        report.broken_seq = Some(b.seq);
        report.problem = Some(b.what.to_string());
        report.code = Some(code);
        report.details = Some(Vec::new());
        (code.status(), report)
    }
}

/// The caller's scope applied to the requested tenant: a tenant-scoped caller reads only its
/// own tenant's records.
fn scoped_tenant(caller: &Caller, asked: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(limit) = caller.scope.tenant() else {
        return Ok(asked);
    };
    match asked {
        None => Ok(Some(limit.to_string())),
        Some(asked) if asked == limit => Ok(Some(asked)),
        Some(asked) => Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "the token {} is limited to tenant {limit} and may not read the audit log of tenant {asked}",
                caller.principal.token_id
            ),
        )),
    }
}

/// Reads the query of a list, and of a watch: `Some(from)` with `watch=true` (the `seq` to
/// follow on from; `None`: from the newest record).
fn filter(
    raw: Option<&str>,
    now: SystemTime,
) -> Result<(AuditFilter, Option<Option<u64>>), ApiError> {
    let params = query::parse(
        raw,
        &[
            "tenant",
            "since",
            "after",
            "limit",
            "watch",
            "resourceVersion",
        ],
    )?;
    let watch = super::watch::params(&params)?;
    if watch.is_some()
        && let Some(p) = ["since", "after", "limit"]
            .into_iter()
            .find(|p| params.get(p).is_some())
    {
        return Err(ApiError::bad_request(format!(
            "{p} does not go with watch=true; a watch of the audit log sends the records after resourceVersion (a record's seq)"
        )));
    }
    let tenant = params
        .get("tenant")
        .map(|t| {
            validate_dns_label(t)
                .map(|()| t.to_string())
                .map_err(|e| ApiError::bad_request(format!("tenant={t:?}: {e}")))
        })
        .transpose()?;
    let since = params
        .get("since")
        .map(|s| parse_since(s, now).map_err(|e| ApiError::bad_request(format!("since: {e}"))))
        .transpose()?;
    let after_seq = params.u64("after")?;
    let limit = match params.u64("limit")? {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=MAX_LIMIT as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "limit={n} is not allowed; use 1 to {MAX_LIMIT}, and page with after=<the last seq seen>"
            )));
        }
    };
    Ok((
        AuditFilter {
            tail: since.is_none() && after_seq.is_none(),
            tenant,
            since,
            after_seq,
            limit,
        },
        watch,
    ))
}

/// Lists audit records, oldest first. With `since` or `after`, the first `limit` records
/// from there; with neither, the newest `limit` records.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    params(
        ("tenant" = Option<String>, Query, description = "Only records of this tenant"),
        ("since" = Option<String>, Query, description = "Only records at or after this time: RFC 3339 (2026-07-10T12:00:00Z) or a duration back from now (1h, 7d)"),
        ("after" = Option<u64>, Query, description = "Only records with a greater seq (paging)"),
        ("limit" = Option<u64>, Query, description = "At most this many records, 1 to 1000 (default 100)"),
    ),
    responses(
        (status = 200, description = "Audit records, oldest first", body = AuditList),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 403, description = "The token may not read this tenant's records", body = ErrorBody),
    ))]
pub async fn list_audit(ctx: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let (mut filter, watch) = filter(raw.as_deref(), SystemTime::now())?;
    filter.tenant = scoped_tenant(ctx.caller(), filter.tenant.take())?;
    stored_so_far(&ctx).await;
    if let Some(from) = watch {
        return watch_audit(&ctx, filter.tenant, from).await;
    }
    let items = ctx
        .run_unscoped(move |store| Ok(store.list_audit(&filter)?))
        .await?;
    let text = serde_json::to_string(&AuditList { items }).map_err(ApiError::internal)?;
    Ok(json_response(StatusCode::OK, text, ctx.index()))
}

/// A watch of the audit log: the records (of `tenant`) after `from`, or after the newest one.
async fn watch_audit(
    ctx: &Ctx,
    tenant: Option<String>,
    from: Option<u64>,
) -> Result<Response, ApiError> {
    let from = match from {
        Some(seq) => seq,
        None => {
            let newest = AuditFilter {
                tail: true,
                limit: 1,
                ..AuditFilter::default()
            };
            ctx.run_unscoped(move |store| Ok(store.list_audit(&newest)?))
                .await?
                .last()
                .map_or(0, |r| r.seq)
        }
    };
    let state: ApiState = (**ctx).clone();
    let reader = state.clone();
    super::watch::watch_appended(&state, from, ctx.sse, move |after| {
        let (state, tenant) = (reader.clone(), tenant.clone());
        async move {
            let page = AuditFilter {
                tenant,
                after_seq: Some(after),
                limit: MAX_LIMIT,
                ..AuditFilter::default()
            };
            let records = state
                .run_unscoped(move |store| Ok(store.list_audit(&page)?))
                .await?;
            let full = records.len() >= MAX_LIMIT;
            let lines = records
                .iter()
                .map(|r| Ok((r.seq, serde_json::to_string(r).map_err(ApiError::internal)?)))
                .collect::<Result<Vec<_>, ApiError>>()?;
            Ok((lines, full))
        }
    })
    .await
}

/// Waits until the records this server queued before now are stored: a change answered
/// before the listing began (a cordon, a login, a refusal, whose records are queued rather
/// than stored with a change) is in the listing. A log that stays behind for longer than
/// [`QUEUED_WAIT`] (its store failing) is listed as it is, with a warning.
async fn stored_so_far(state: &ApiState) {
    let Some(writer) = state.audit_writer() else {
        return;
    };
    match tokio::time::timeout(QUEUED_WAIT, writer.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the audit log is listed without its queued records")
        }
        Err(_) => tracing::warn!(
            waited = ?QUEUED_WAIT,
            "the audit log is behind: listed without the records still queued"
        ),
    }
}

/// Recomputes the audit log's hash chain from its first record.
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit",
    responses(
        (status = 200, description = "Every record is intact; `head` is the hash of the last", body = AuditVerifyReport),
        (status = 409, description = "A record is not intact: `brokenSeq` and `problem` say which and why", body = AuditVerifyReport),
    ))]
pub async fn verify_audit(ctx: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    query::parse(raw.as_deref(), &[])?;
    // The chain spans every tenant's records: checking it is the platform's.
    if ctx.caller().scope != Scope::Cluster {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "the audit chain covers every tenant; only a cluster-wide platform-admin may verify it",
        ));
    }
    let state: &ApiState = &ctx;
    let verification = state
        .run_unscoped(|store| Ok(store.verify_audit()?))
        .await?;
    let (status, report) = AuditVerifyReport::from_verification(verification);
    if let (Some(seq), Some(problem)) = (report.broken_seq, &report.problem) {
        tracing::error!(seq, problem = %problem, "the audit log is not intact");
    }
    let text = serde_json::to_string(&report).map_err(ApiError::internal)?;
    Ok(json_response(status, text, state.index()))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use axum::Router;
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;
    use crate::audit::fixtures::entry;
    use crate::auth::Principal;
    use crate::auth::rbac::Role;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{Scope, Store};

    fn app(store: Arc<SqliteStore>, caller: Caller) -> Router {
        let caller = Arc::new(caller);
        let state = ApiState::new(store as Arc<dyn Store>, PathBuf::from("admin.token"));
        Router::new()
            .route("/api/v1/audit", get(list_audit))
            .route("/api/v1/audit/verify", get(verify_audit))
            .layer(axum::middleware::from_fn(
                move |mut req: axum::extract::Request, next: axum::middleware::Next| {
                    req.extensions_mut().insert(Arc::clone(&caller));
                    next.run(req)
                },
            ))
            .with_state(state)
    }

    fn admin(tenant: Option<&str>) -> Caller {
        Caller {
            principal: Arc::new(Principal {
                token_id: "tok_1".into(),
                token_name: "admin".into(),
                role: crate::auth::PLATFORM_ADMIN.into(),
                tenant: tenant.map(str::to_string),
                project: None,
            }),
            role: if tenant.is_some() {
                Role::TenantAdmin
            } else {
                Role::PlatformAdmin
            },
            scope: tenant.map_or(Scope::Cluster, |t| Scope::Tenant(t.into())),
            audit: None,
        }
    }

    async fn get_json(app: &Router, uri: &str) -> (StatusCode, Value) {
        let resp = app
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn seqs(body: &Value) -> Vec<u64> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect()
    }

    fn seeded() -> (tempfile::TempDir, Arc<SqliteStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
        let entries: Vec<_> = (1..=150u32)
            .map(|i| {
                let mut e = entry(i);
                e.tenant = Some(if i % 3 == 0 { "beta" } else { "acme" }.into());
                e
            })
            .collect();
        store.append_audit(&entries).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn lists_the_newest_by_default_and_pages_forward() {
        let (_d, store) = seeded();
        let app = app(store, admin(None));
        let (status, body) = get_json(&app, "/api/v1/audit").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(seqs(&body), (51..=150).collect::<Vec<_>>());
        let first = &body["items"][0];
        assert_eq!(first["principal"]["id"], "tok_admin");
        assert_eq!(first["hash"].as_str().unwrap().len(), 64);

        let (_, body) = get_json(&app, "/api/v1/audit?after=10&limit=3").await;
        assert_eq!(seqs(&body), [11, 12, 13]);
        let (_, body) = get_json(&app, "/api/v1/audit?tenant=beta&after=140").await;
        assert_eq!(seqs(&body), [141, 144, 147, 150]);
        let (_, body) = get_json(&app, "/api/v1/audit?since=2026-07-10T12:00:58Z&limit=1000").await;
        assert!(
            body["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["time"].as_str().unwrap() >= "2026-07-10T12:00:58.000Z")
        );
        assert_eq!(seqs(&body)[0], 58);
    }

    #[tokio::test]
    async fn bad_parameters_are_named() {
        let (_d, store) = seeded();
        let app = app(store, admin(None));
        for (uri, says) in [
            ("/api/v1/audit?limit=0", "limit=0"),
            ("/api/v1/audit?limit=5000", "1 to 1000"),
            ("/api/v1/audit?since=soon", "since"),
            ("/api/v1/audit?tenant=Not_A_Name", "tenant="),
            ("/api/v1/audit?after=x", "after"),
            ("/api/v1/audit?tenants=acme", "unknown query parameter"),
            ("/api/v1/audit/verify?x=1", "no query parameters"),
        ] {
            let (status, body) = get_json(&app, uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            let message = body["message"].as_str().unwrap();
            assert!(message.contains(says), "{uri}: {message}");
        }
    }

    #[tokio::test]
    async fn a_tenant_limited_token_sees_only_its_tenant() {
        let (_d, store) = seeded();
        let app = app(store, admin(Some("beta")));
        let (status, body) = get_json(&app, "/api/v1/audit?after=0&limit=1000").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(seqs(&body).len(), 50);
        assert!(seqs(&body).iter().all(|s| s % 3 == 0));
        let (status, body) = get_json(&app, "/api/v1/audit?tenant=acme").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("limited to tenant beta")
        );
    }

    #[tokio::test]
    async fn verify_answers_200_when_intact_and_409_naming_the_broken_record() {
        let (_d, store) = seeded();
        let app = app(store.clone(), admin(None));
        let (status, body) = get_json(&app, "/api/v1/audit/verify").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["ok"], true);
        assert_eq!(body["records"], 150);
        let head = store
            .list_audit(&AuditFilter {
                limit: 1,
                tail: true,
                ..AuditFilter::default()
            })
            .unwrap();
        assert_eq!(body["head"], head[0].hash);
        assert!(body.get("brokenSeq").is_none() && body.get("code").is_none());

        rusqlite::Connection::open(store.path())
            .unwrap()
            .execute_batch(
                "DROP TRIGGER audit_no_update; UPDATE audit SET principal_name = 'someone else' WHERE seq = 77",
            )
            .unwrap();
        let (status, body) = get_json(&app, "/api/v1/audit/verify").await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body["ok"], false);
        assert_eq!(
            (body["records"].as_u64(), body["brokenSeq"].as_u64()),
            (Some(76), Some(77))
        );
        assert_eq!(body["code"], "Conflict");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("record 77") && message.contains("changed"),
            "{message}"
        );
    }
}
