//! The REST API (`/api/v1`, docs/api.md): router, authentication, handlers, OpenAPI, serving.

mod body;
mod error;
mod objects;
mod openapi;
mod query;
mod serve;
mod tokens;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, OriginalUri, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::agent_rpc::Reports;
use crate::auth::{Authenticator, Principal};
use crate::metrics::Metrics;
use crate::store::Store;

pub use body::{APPLY_BODY_LIMIT, BODY_LIMIT};
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use openapi::{ApiDoc, openapi_json};
pub use serve::{SHUTDOWN_GRACE, serve, tls_server_config};

/// Header carrying the store index a response was served at.
pub const INDEX_HEADER: HeaderName = HeaderName::from_static("x-clusterclaw-index");
/// Header carrying what a `PUT` did: `created`, `configured` or `unchanged`.
pub const OUTCOME_HEADER: HeaderName = HeaderName::from_static("x-clusterclaw-outcome");

/// Store calls running at once. More would not go faster (the machine has few cores and the
/// store a small pool of read connections) but would add threads and connection churn; extra
/// requests wait their turn without holding a thread.
const STORE_CONCURRENCY: usize = 8;

struct Inner {
    store: Arc<dyn Store>,
    reports: Arc<Reports>,
    metrics: Arc<Metrics>,
    store_slots: Arc<tokio::sync::Semaphore>,
    auth: Authenticator,
    index: watch::Receiver<u64>,
    shutting_down: AtomicBool,
}

/// What every handler shares: the store, the authenticator, the shutdown flag.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

impl ApiState {
    /// `admin_token_path` is named in authentication errors.
    pub fn new(store: Arc<dyn Store>, admin_token_path: PathBuf) -> Self {
        Self::with_agent_state(store, admin_token_path, Arc::default(), Arc::default())
    }

    /// Like [`ApiState::new`], sharing the agent port's reports and counters (for `/metrics`
    /// and host removal).
    pub fn with_agent_state(
        store: Arc<dyn Store>,
        admin_token_path: PathBuf,
        reports: Arc<Reports>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let index = store.subscribe();
        let auth = Authenticator::new(Arc::clone(&store), admin_token_path);
        ApiState {
            inner: Arc::new(Inner {
                store,
                reports,
                metrics,
                store_slots: Arc::new(tokio::sync::Semaphore::new(STORE_CONCURRENCY)),
                auth,
                index,
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    /// From now on `/readyz` answers 503 and API requests get 503 `Unavailable`.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The latest status report of every host.
    pub fn reports(&self) -> &Arc<Reports> {
        &self.inner.reports
    }

    /// The latest committed index, without touching the store.
    fn index(&self) -> u64 {
        *self.inner.index.borrow()
    }

    /// A store slot, held for as long as the store work runs.
    async fn store_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.inner.store_slots)
            .acquire_owned()
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::Unavailable,
                    "the server is shutting down; retry in a moment",
                )
            })
    }

    /// Runs store work on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, ApiError> + Send + 'static,
    {
        let _slot = self.store_slot().await?;
        let store = Arc::clone(&self.inner.store);
        match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
            Ok(result) => result,
            Err(e) => Err(ApiError::internal(format!("a store task failed: {e}"))),
        }
    }

    /// Runs a point read (one row by its key, tens of microseconds) on the calling task: a hop
    /// to the blocking pool and back would cost more than the read. Readers in WAL mode never
    /// wait for the writer, so this does not stall the runtime.
    fn read_point<T>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        f(self.inner.store.as_ref())
    }
}

/// Path parameters, with a JSON 400 when they do not decode.
pub struct P<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for P<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(t)) => Ok(P(t)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// A JSON response with the index header.
fn json_response(status: StatusCode, body: impl Into<Body>, index: u64) -> Response {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(INDEX_HEADER, HeaderValue::from(index));
    resp
}

/// What a principal may do. Today only `platform-admin` tokens exist with API access; finer
/// roles are decided here.
fn authorize(p: &Principal) -> Result<(), ApiError> {
    if p.is_platform_admin() {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::Forbidden,
        format!(
            "the token {} has role {:?}, which may not use this endpoint; use a platform-admin token",
            p.token_id, p.role
        ),
    ))
}

/// Authenticates every `/api/v1` request and stamps the index header on responses that lack it.
async fn require_token(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    let index = state.index();
    let mut resp = if state.is_shutting_down() {
        let mut r = ApiError::new(
            ErrorCode::Unavailable,
            "the server is shutting down; retry in a moment",
        )
        .into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    } else {
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        match state.inner.auth.authenticate(header).await {
            Err(e) => {
                tracing::debug!(reason = %e, path = %req.uri().path(), "request not authenticated");
                ApiError::from_auth(e, state.inner.auth.admin_token_path()).into_response()
            }
            Ok(principal) => match authorize(&principal) {
                Err(e) => e.into_response(),
                Ok(()) => {
                    // Access log at debug level; nothing is copied unless it is enabled.
                    let logged = tracing::enabled!(tracing::Level::DEBUG)
                        .then(|| (req.method().clone(), req.uri().clone(), Instant::now()));
                    let token_id = logged.as_ref().map(|_| principal.token_id.clone());
                    req.extensions_mut().insert(principal);
                    let resp = next.run(req).await;
                    if let (Some((method, uri, started)), Some(token)) = (logged, token_id) {
                        tracing::debug!(%method, %uri, status = resp.status().as_u16(), token = %token,
                            elapsed_us = started.elapsed().as_micros() as u64, "request served");
                    }
                    resp
                }
            },
        }
    };
    if !resp.headers().contains_key(INDEX_HEADER) {
        resp.headers_mut()
            .insert(INDEX_HEADER, HeaderValue::from(index));
    }
    resp
}

/// The path as the client sent it (a nested router sees it without `/api/v1`).
fn client_path(req: &Request) -> String {
    req.extensions()
        .get::<OriginalUri>()
        .map_or_else(|| req.uri().path(), |u| u.0.path())
        .to_string()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!(
            "no such endpoint: {}; the API is described at /api/v1/openapi.json",
            client_path(&req)
        ),
    )
}

/// The methods each route of the API answers, for `Allow` (checked against the router by a
/// test).
const ROUTE_METHODS: &[(&str, &str)] = &[
    ("/metrics", "GET"),
    ("/healthz", "GET"),
    ("/readyz", "GET"),
    ("/api/v1/openapi.json", "GET"),
    ("/api/v1/info", "GET"),
    ("/api/v1/apply", "POST"),
    ("/api/v1/tenants", "GET, POST"),
    ("/api/v1/tenants/{tenant}", "GET, PUT, DELETE"),
    ("/api/v1/projects", "GET"),
    ("/api/v1/tenants/{tenant}/projects", "GET, POST"),
    (
        "/api/v1/tenants/{tenant}/projects/{project}",
        "GET, PUT, DELETE",
    ),
    ("/api/v1/instances", "GET"),
    (
        "/api/v1/tenants/{tenant}/projects/{project}/instances",
        "GET, POST",
    ),
    (
        "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}",
        "GET, PUT, DELETE",
    ),
    (
        "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/scale",
        "PUT",
    ),
    ("/api/v1/hosts", "GET"),
    ("/api/v1/hosts/{host}", "GET, PUT, DELETE"),
    ("/api/v1/tokens", "GET, POST"),
    ("/api/v1/tokens/{id}", "DELETE"),
];

async fn method_not_allowed(matched: Option<MatchedPath>, req: Request) -> Response {
    let path = client_path(&req);
    let allowed = matched.and_then(|m| {
        ROUTE_METHODS
            .iter()
            .find(|(route, _)| *route == m.as_str())
            .map(|(_, methods)| *methods)
    });
    let hint = match allowed {
        Some(methods) => format!("this path answers {methods}"),
        None => "see /api/v1/openapi.json".to_string(),
    };
    let mut resp = ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{} is not allowed on {path}; {hint}", req.method()),
    )
    .into_response();
    if let Some(methods) = allowed {
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(methods));
    }
    resp
}

/// Prometheus text exposition (bearer token, like the API).
async fn metrics_handler(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let (metrics, reports) = (state.inner.metrics.clone(), state.inner.reports.clone());
    let text = state
        .run(move |store| Ok(metrics.render(store, &reports)?))
        .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// The whole HTTP surface: `/healthz`, `/readyz` (open) and `/api/v1` (bearer token).
/// More top-level routes (such as `/metrics`) can be merged into the returned router.
pub fn router(state: ApiState) -> Router {
    let instance = "/tenants/{tenant}/projects/{project}/instances/{name}";
    let v1 = Router::new()
        .route("/openapi.json", get(openapi::openapi_handler))
        .route("/info", get(objects::info))
        .route("/apply", post(objects::apply))
        .route(
            "/tenants",
            get(objects::list_tenants).post(objects::create_tenant),
        )
        .route(
            "/tenants/{tenant}",
            get(objects::get_tenant)
                .put(objects::put_tenant)
                .delete(objects::delete_tenant),
        )
        .route("/projects", get(objects::list_projects))
        .route(
            "/tenants/{tenant}/projects",
            get(objects::list_tenant_projects).post(objects::create_project),
        )
        .route(
            "/tenants/{tenant}/projects/{project}",
            get(objects::get_project)
                .put(objects::put_project)
                .delete(objects::delete_project),
        )
        .route("/instances", get(objects::list_instances))
        .route(
            "/tenants/{tenant}/projects/{project}/instances",
            get(objects::list_project_instances).post(objects::create_instance),
        )
        .route(
            instance,
            get(objects::get_instance)
                .put(objects::put_instance)
                .delete(objects::delete_instance),
        )
        .route(&format!("{instance}/scale"), put(objects::scale_instance))
        .route("/hosts", get(objects::list_hosts))
        .route(
            "/hosts/{host}",
            get(objects::get_host)
                .put(objects::put_host)
                .delete(objects::delete_host),
        )
        .route(
            "/tokens",
            get(tokens::list_tokens).post(tokens::create_token),
        )
        .route("/tokens/{id}", delete(tokens::revoke_token))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route(
            "/metrics",
            get(metrics_handler)
                .layer(middleware::from_fn_with_state(state.clone(), require_token)),
        )
        .route("/healthz", get(objects::healthz))
        .route("/readyz", get(objects::readyz))
        .nest("/api/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}
