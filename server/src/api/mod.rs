//! The REST API (`/api/v1`, docs/api.md): router, authentication, handlers, OpenAPI, serving.

pub mod audit;
mod body;
pub(crate) mod configs;
pub(crate) mod drain;
mod error;
pub(crate) mod logs;

pub(crate) mod events;
pub(crate) mod objects;
mod openapi;
mod query;
pub(crate) mod rollout;
pub mod routes;
mod serve;
mod servers;
mod tokens;
mod volumes;
pub mod watch;
pub(crate) mod waves;

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
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::agent_rpc::Reports;
use crate::audit::{AuditEntry, AuditObject, AuditPrincipal, AuditResult, AuditWriter};
use crate::auth::oidc::OidcVerifier;
use crate::auth::rbac::{self, Role};
use crate::auth::{Authenticator, Principal};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::store::{Scope, Scoped, Store};
use routes::Need;

pub use body::{APPLY_BODY_LIMIT, BODY_LIMIT};
pub use error::{ApiError, ErrorBody, ErrorCode, ErrorSummary};
pub use openapi::{ApiDoc, openapi_json};
pub use serve::{HEADER_READ_TIMEOUT, SHUTDOWN_GRACE, serve, tls_server_config};

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
    limiter: Option<Arc<RateLimiter>>,
    audit: Option<AuditWriter>,
    index: tokio::sync::watch::Receiver<u64>,
    shutting_down: AtomicBool,
    /// The data key of secrets (swapped by a rotation).
    keyring: crate::configcenter::SharedKeyring,
    keyring_path: Option<PathBuf>,
    /// A rotation holds it for writing; a secret write, from sealing to commit, for reading,
    /// so that no value is sealed with a key a rotation is about to retire.
    rotating: tokio::sync::RwLock<()>,
    tasks: Arc<crate::agent_rpc::tasks::TaskHub>,

    /// The feeds of watches.
    hub: watch::Hub,
    /// The web console's sessions.
    sessions: crate::ui::session::Sessions,
    /// Single sign-on issuers (the console's sign-ins use them too).
    oidc: Option<Arc<OidcVerifier>>,
    /// The console's single sign-ins between their start and their callback.
    sso_pending: crate::ui::sso::PendingLogins,
    /// The console's index of instances.
    console_index: Arc<crate::ui::index::InstanceIndex>,
    /// The console's cookies are `Secure` (the API is served over TLS).
    secure_cookies: bool,
}

/// Request header with the reason of a change, recorded on the config revisions it makes.
pub const CHANGE_MESSAGE_HEADER: &str = "x-clusterclaw-change-message";
const MAX_CHANGE_MESSAGE: usize = 500;

/// What the API adds around authentication; everything off by default.
#[derive(Default)]
pub struct ApiOptions {
    /// Verifies single sign-on JWTs.
    pub oidc: Option<Arc<OidcVerifier>>,
    /// Per-token and per-tenant request limits.
    pub limiter: Option<Arc<RateLimiter>>,
    /// Records every mutating and every denied request.
    pub audit: Option<AuditWriter>,
    /// Seals secret values; without one, secrets cannot be written.
    pub keyring: crate::configcenter::SharedKeyring,
    /// Where the keyring lives (for rotation).
    pub keyring_path: Option<PathBuf>,
    /// The agent port's tasks (log streams from hosts).
    pub tasks: Arc<crate::agent_rpc::tasks::TaskHub>,
    /// The API is served over TLS: the console's cookies are `Secure`.
    pub secure_cookies: bool,
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
        Self::with_options(
            store,
            admin_token_path,
            reports,
            metrics,
            ApiOptions::default(),
        )
    }

    /// Like [`ApiState::with_agent_state`], with single sign-on, rate limits and the audit log.
    pub fn with_options(
        store: Arc<dyn Store>,
        admin_token_path: PathBuf,
        reports: Arc<Reports>,
        metrics: Arc<Metrics>,
        options: ApiOptions,
    ) -> Self {
        let index = store.subscribe();
        let oidc = options.oidc.clone();
        let auth = Authenticator::new(Arc::clone(&store), admin_token_path).with_oidc(options.oidc);
        let sessions = crate::ui::session::Sessions::new(Arc::clone(&store));
        ApiState {
            inner: Arc::new(Inner {
                store,
                reports,
                metrics,
                store_slots: Arc::new(tokio::sync::Semaphore::new(STORE_CONCURRENCY)),
                auth,
                limiter: options.limiter,
                audit: options.audit,
                index,
                shutting_down: AtomicBool::new(false),
                keyring: options.keyring,
                keyring_path: options.keyring_path,
                rotating: tokio::sync::RwLock::new(()),
                tasks: options.tasks,

                hub: watch::Hub::default(),
                sessions,
                oidc,
                sso_pending: crate::ui::sso::PendingLogins::default(),
                console_index: Arc::default(),
                secure_cookies: options.secure_cookies,
            }),
        }
    }

    /// The secrets' keyring, if the server has one.
    pub fn keyring(&self) -> Option<Arc<crate::secrets::Keyring>> {
        crate::configcenter::current_keyring(&self.inner.keyring)
    }

    /// Held by a secret write from sealing to commit: no key rotation runs meanwhile.
    pub(crate) async fn secret_write_guard(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.inner.rotating.read().await
    }

    pub(crate) fn shared_keyring(
        &self,
    ) -> (
        &crate::configcenter::SharedKeyring,
        Option<&std::path::Path>,
        &tokio::sync::RwLock<()>,
    ) {
        (
            &self.inner.keyring,
            self.inner.keyring_path.as_deref(),
            &self.inner.rotating,
        )
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// From now on `/readyz` answers 503 and API requests get 503 `Unavailable`.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// The server's counters (and its view of the leader lease).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The latest status report of every host.
    pub fn reports(&self) -> &Arc<Reports> {
        &self.inner.reports
    }

    /// The agent port's tasks (log streams from hosts).
    pub fn tasks(&self) -> &Arc<crate::agent_rpc::tasks::TaskHub> {
        &self.inner.tasks
    }

    /// The web console's sessions.
    pub(crate) fn sessions(&self) -> &crate::ui::session::Sessions {
        &self.inner.sessions
    }

    /// The single sign-on issuers, when configured.
    pub(crate) fn oidc(&self) -> Option<&Arc<OidcVerifier>> {
        self.inner.oidc.as_ref()
    }

    /// The console's pending single sign-ins.
    pub(crate) fn sso_pending(&self) -> &crate::ui::sso::PendingLogins {
        &self.inner.sso_pending
    }

    /// The audit log's writer, when the server keeps one.
    pub(crate) fn audit_writer(&self) -> Option<&AuditWriter> {
        self.inner.audit.as_ref()
    }

    /// The console's index of instances.
    pub(crate) fn console_index(&self) -> &Arc<crate::ui::index::InstanceIndex> {
        &self.inner.console_index
    }

    /// Whether the console's cookies are `Secure`.
    pub(crate) fn secure_cookies(&self) -> bool {
        self.inner.secure_cookies
    }

    /// Authenticates an `Authorization` header value as the API does.
    pub(crate) async fn authenticate(
        &self,
        header: Option<&[u8]>,
    ) -> Result<Arc<Principal>, crate::auth::AuthError> {
        self.inner.auth.authenticate(header).await
    }

    /// Authenticates the token a console session holds (see
    /// [`crate::auth::Authenticator::authenticate_session`]).
    pub(crate) async fn authenticate_session(
        &self,
        header: Option<&[u8]>,
    ) -> Result<Arc<Principal>, crate::auth::AuthError> {
        self.inner.auth.authenticate_session(header).await
    }

    /// The latest committed index, without touching the store.
    pub(crate) fn index(&self) -> u64 {
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

    /// Runs store work on the blocking pool, unscoped: only for what is not tenant data
    /// (metrics); handlers go through [`Ctx::run`].
    pub(crate) async fn run_unscoped<T, F>(&self, f: F) -> Result<T, ApiError>
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
}

/// The authenticated, authorized caller of one request, put in the request's extensions by
/// the authentication middleware.
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Arc<Principal>,
    pub role: Role,
    /// The tenant data this caller sees; every store call of its request goes through it.
    pub scope: Scope,
    /// For a mutating request: makes its audit record, stored with its change.
    pub audit: Option<Arc<AuditDraft>>,
}

/// The audit record of a mutating request, made inside the transaction of its change so that
/// an acknowledged change always has its record.
#[derive(Debug)]
pub struct AuditDraft {
    principal: AuditPrincipal,
    tenant: Option<String>,
    request_id: String,
    source: String,
    action: &'static str,
    /// `POST` of one object: answered 201.
    creates: bool,
    records: std::sync::Mutex<Vec<crate::audit::AuditRecord>>,
}

impl AuditDraft {
    fn entry(&self, status: u16, object: AuditObject) -> AuditEntry {
        let mut e = AuditEntry::now(self.principal.clone(), self.action, AuditResult::ok(status))
            .with_request(self.request_id.clone(), self.source.clone())
            .with_object(object);
        if e.tenant.is_none() {
            e = e.with_tenant(self.tenant.clone());
        }
        e
    }

    fn take_records(&self) -> Vec<crate::audit::AuditRecord> {
        std::mem::take(&mut *self.records.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The audit object of a batch write: how many documents it had and what each did.
fn batch_object(
    outcomes: impl Iterator<Item = crate::store::Outcome>,
    tenant: Option<String>,
) -> AuditObject {
    use crate::store::Outcome;
    let (mut created, mut configured, mut unchanged) = (0, 0, 0);
    for o in outcomes {
        match o {
            Outcome::Created => created += 1,
            Outcome::Configured => configured += 1,
            Outcome::Unchanged => unchanged += 1,
        }
    }
    AuditObject {
        kind: "Batch".into(),
        tenant,
        project: None,
        name: format!(
            "{} documents: {created} created, {configured} configured, {unchanged} unchanged",
            created + configured + unchanged
        ),
    }
}

impl crate::store::AuditHook for AuditDraft {
    fn write_entries(&self, results: &[crate::store::WriteResult]) -> Vec<AuditEntry> {
        let status = if self.creates { 201 } else { 200 };
        // A batch that changed one object (a rollback checks its layers by writing them
        // unchanged) is recorded as that object.
        let changed: Vec<&crate::store::WriteResult> = results
            .iter()
            .filter(|r| r.outcome != crate::store::Outcome::Unchanged)
            .collect();
        let one = match (results, changed.as_slice()) {
            ([one], _) => Some(one),
            (_, [one]) => Some(*one),
            _ => None,
        };
        match one {
            Some(one) => vec![
                self.entry(status, AuditObject::from(&one.key))
                    .with_generations(one.previous_generation, Some(one.object.generation)),
            ],
            None => vec![self.entry(
                status,
                batch_object(results.iter().map(|r| r.outcome), None),
            )],
        }
    }

    fn delete_entries(
        &self,
        key: &crate::model::ObjectKey,
        generation: Option<i64>,
    ) -> Vec<AuditEntry> {
        vec![
            self.entry(200, AuditObject::from(key))
                .with_generations(generation, None),
        ]
    }

    fn recorded(&self, records: Vec<crate::audit::AuditRecord>) {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(records);
    }
}

/// What a handler works with: the shared state and the caller. Store work through it sees only
/// the caller's scope ([`Scoped`]); there is no way from here to the unscoped store.
#[derive(Clone)]
pub struct Ctx {
    state: ApiState,
    caller: Arc<Caller>,
    /// Author and message of the changes of this request, for config revisions.
    note: crate::store::ChangeNote,
    /// The client accepts server-sent events (for a watch).
    sse: bool,
}

impl std::ops::Deref for Ctx {
    type Target = ApiState;
    fn deref(&self) -> &ApiState {
        &self.state
    }
}

impl FromRequestParts<ApiState> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let caller = parts
            .extensions
            .get::<Arc<Caller>>()
            .cloned()
            .ok_or_else(|| ApiError::internal("a handler ran without an authenticated caller"))?;
        let message = parts
            .headers
            .get(CHANGE_MESSAGE_HEADER)
            .map(|v| {
                std::str::from_utf8(v.as_bytes())
                    .map(|s| s.trim().to_string())
                    .map_err(|_| {
                        ApiError::bad_request(format!(
                            "header {CHANGE_MESSAGE_HEADER} must be printable text"
                        ))
                    })
            })
            .transpose()?
            .filter(|m| !m.is_empty());
        if let Some(m) = &message
            && (m.chars().count() > MAX_CHANGE_MESSAGE || m.chars().any(char::is_control))
        {
            return Err(ApiError::bad_request(format!(
                "header {CHANGE_MESSAGE_HEADER}: at most {MAX_CHANGE_MESSAGE} characters of text without control characters"
            )));
        }
        let note = crate::store::ChangeNote {
            author: caller.principal.token_name.clone(),
            message,
        };
        let sse = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"));
        Ok(Ctx {
            state: state.clone(),
            caller,
            note,
            sse,
        })
    }
}

impl Ctx {
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Runs store work on the blocking pool, within the caller's scope.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Scoped<'_>) -> Result<T, ApiError> + Send + 'static,
    {
        let scope = self.caller.scope.clone();
        let hook = self
            .caller
            .audit
            .clone()
            .map(|d| d as Arc<dyn crate::store::AuditHook>);
        let note = self.note.clone();
        self.state
            .run_unscoped(move |store| {
                f(&Scoped::new(store, scope).with_audit(hook).with_note(note))
            })
            .await
    }

    /// Runs a point read (one row by its key, tens of microseconds) on the calling task: a hop
    /// to the blocking pool and back would cost more than the read. Readers in WAL mode never
    /// wait for the writer, so this does not stall the runtime.
    fn read_point<T>(
        &self,
        f: impl FnOnce(&Scoped<'_>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        f(&Scoped::new(
            self.state.inner.store.as_ref(),
            self.caller.scope.clone(),
        ))
    }

    /// The store and the caller's scope, for work that runs on its own blocking task.
    fn scoped_parts(&self) -> (Arc<dyn Store>, Scope) {
        (
            Arc::clone(&self.state.inner.store),
            self.caller.scope.clone(),
        )
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

/// Decides whether `principal` may do what the route needs (one cell of the permission table
/// in [`rbac`]) and the scope it acts in.
fn authorize(principal: Arc<Principal>, need: Option<Need>) -> Result<Caller, ApiError> {
    let forbidden = |d: rbac::Denied| ApiError::new(ErrorCode::Forbidden, d.0);
    let role = rbac::role_of(&principal).map_err(forbidden)?;
    let scope = rbac::scope_of(&principal, role).map_err(forbidden)?;
    match need {
        // No route matched: the fallback answers 404, whoever asks.
        None | Some(Need::Open) => {}
        Some(Need::Perm(res, verb) | Need::Page(res, verb)) => {
            if !rbac::allowed(role, &scope, res, verb) {
                rbac::check(&principal, res, verb).map_err(forbidden)?;
            }
        }
    }
    Ok(Caller {
        principal,
        role,
        scope,
        audit: None,
    })
}

/// The state of the authorization middleware: the API's and the route table.
#[derive(Clone)]
struct Guard {
    api: ApiState,
    table: Arc<routes::RouteTable>,
}

/// Puts every request through the route table: open routes pass, undeclared methods get 405,
/// routes without a declared permission are refused, everything else (unknown `/api/`
/// paths too) is authenticated and authorized before its handler runs or its body is read.
/// Stamps the index header on responses that lack it.
async fn require_token(State(guard): State<Guard>, req: Request, next: Next) -> Response {
    let need = match req.extensions().get::<MatchedPath>() {
        Some(matched) => match guard.table.lookup(matched.as_str(), req.method()) {
            routes::Lookup::Declared(Need::Open) => return next.run(req).await,
            routes::Lookup::Declared(need) => Ok(Some(need)),
            routes::Lookup::MethodNotAllowed(allow) => {
                Err(method_not_allowed_response(&req, Some(allow.clone())))
            }
            routes::Lookup::Undeclared => {
                tracing::error!(route = matched.as_str(), method = %req.method(),
                    "a route without a declared permission was called; refused");
                Err(ApiError::new(
                    ErrorCode::Forbidden,
                    format!(
                        "{} {} declares no permission, so nobody may call it",
                        req.method(),
                        matched.as_str()
                    ),
                )
                .into_response())
            }
        },
        None if !client_path(&req).starts_with("/api/") => return next.run(req).await,
        None => Ok(None),
    };
    let state = &guard.api;
    let index = state.index();
    let mut resp = match need {
        Err(refused) => refused,
        Ok(_) if state.is_shutting_down() => {
            let mut r = ApiError::new(
                ErrorCode::Unavailable,
                "the server is shutting down; retry in a moment",
            )
            .into_response();
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
        Ok(need) => authenticated(state, req, next, need).await,
    };
    if !resp.headers().contains_key(INDEX_HEADER) {
        resp.headers_mut()
            .insert(INDEX_HEADER, HeaderValue::from(index));
    }
    resp
}

/// What a handler tells the audit log about the object it changed.
#[derive(Clone, Debug)]
pub struct AuditNote {
    pub action: &'static str,
    pub object: Option<AuditObject>,
    pub generation_before: Option<i64>,
    pub generation_after: Option<i64>,
}

impl AuditNote {
    pub fn object(action: &'static str, key: &crate::model::ObjectKey) -> Self {
        AuditNote {
            action,
            object: Some(AuditObject::from(key)),
            generation_before: None,
            generation_after: None,
        }
    }

    pub fn generations(mut self, before: Option<i64>, after: Option<i64>) -> Self {
        self.generation_before = before;
        self.generation_after = after;
        self
    }
}

/// What the audit log needs of a request, taken before the request is handed on.
struct Attempt {
    method: axum::http::Method,
    /// The URI as the client sent it (cheap to clone; formatted only for a record).
    uri: axum::http::Uri,
    request_id: Option<Arc<str>>,
    source: Option<std::net::SocketAddr>,
}

impl Attempt {
    /// Copies nothing but reference counts: most requests (allowed reads) never need it.
    fn of(req: &Request) -> Self {
        Attempt {
            method: req.method().clone(),
            uri: req
                .extensions()
                .get::<OriginalUri>()
                .map_or_else(|| req.uri().clone(), |u| u.0.clone()),
            request_id: req
                .extensions()
                .get::<RequestId>()
                .map(|r| Arc::clone(&r.0)),
            source: req
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0),
        }
    }

    fn path(&self) -> &str {
        self.uri.path()
    }

    fn request_id(&self) -> String {
        self.request_id.as_deref().unwrap_or_default().to_string()
    }

    fn source(&self) -> String {
        self.source
            .map_or_else(|| "local".to_string(), |a| a.to_string())
    }

    /// What a request does when no handler says: its method.
    fn action(&self) -> &'static str {
        match self.method.as_str() {
            "GET" | "HEAD" => "read",
            "DELETE" => "delete",
            "POST" if self.path().ends_with("/apply") => "apply",
            "POST" if self.path().contains("/rollout/") => {
                rollout::audit_action(self.path().rsplit('/').next().unwrap_or_default())
            }
            "POST" if self.path().ends_with("/cordon") => "host.cordon",
            "POST" if self.path().ends_with("/uncordon") => "host.uncordon",
            "POST" if self.path().ends_with("/drain") => "host.drain",
            "POST" if self.path().starts_with("/ui/") => crate::ui::audit_action(self.path()),
            "POST" => "create",
            "PUT" if self.path().ends_with("/scale") => "scale",
            _ => "update",
        }
    }

    fn mutating(&self) -> bool {
        !matches!(self.method.as_str(), "GET" | "HEAD" | "OPTIONS")
    }
}

/// Records one request in the audit log: every mutating request, and every request refused
/// for want of authentication or permission. A full audit queue waits (backpressure); the
/// log never drops a record silently.
async fn audit(
    state: &ApiState,
    attempt: &Attempt,
    who: Option<(&Principal, Option<&str>)>,
    resp: &mut Response,
) {
    let Some(writer) = &state.inner.audit else {
        return;
    };
    if let Some(entry) = audit_entry(attempt, who, resp)
        && let Err(e) = writer.record(entry).await
    {
        tracing::error!(error = %e, "an audit record could not be written");
    }
}

/// The record of a request that was not stored with a change: a refusal, a failure, or a
/// change that changed nothing. `None` for reads that were allowed.
fn audit_entry(
    attempt: &Attempt,
    who: Option<(&Principal, Option<&str>)>,
    resp: &mut Response,
) -> Option<AuditEntry> {
    let status = resp.status();
    let denied = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
    if !attempt.mutating() && !denied {
        return None;
    }
    let reason = resp
        .extensions()
        .get::<error::ErrorSummary>()
        .map(|e| e.0.clone());
    let result = if denied {
        AuditResult::denied(status.as_u16(), reason.unwrap_or_default())
    } else if status.is_success() || status.is_redirection() {
        // A console form answers its success with a redirect (logout, for one).
        AuditResult::ok(status.as_u16())
    } else {
        AuditResult::error(status.as_u16(), reason.unwrap_or_default())
    };
    let principal = who.map_or_else(AuditPrincipal::anonymous, |(p, _)| AuditPrincipal::from(p));
    let note = resp.extensions_mut().remove::<AuditNote>();
    let action = match (&note, denied) {
        (_, true) if !attempt.mutating() => "deny",
        (Some(n), _) => n.action,
        (None, _) => attempt.action(),
    };
    let mut entry = AuditEntry::now(principal, action, result)
        .with_request(attempt.request_id(), attempt.source());
    match note {
        Some(n) => {
            if let Some(o) = n.object {
                entry = entry.with_object(o);
            }
            entry = entry.with_generations(n.generation_before, n.generation_after);
        }
        None => {
            entry = entry.with_object(AuditObject {
                kind: "Request".into(),
                tenant: None,
                project: None,
                name: format!("{} {}", attempt.method, attempt.path()),
            });
        }
    }
    if entry.tenant.is_none() {
        entry =
            entry.with_tenant(who.and_then(|(p, t)| t.or(p.tenant.as_deref()).map(str::to_string)));
    }
    Some(entry)
}

async fn authenticated(
    state: &ApiState,
    mut req: Request,
    next: Next,
    need: Option<Need>,
) -> Response {
    let attempt = Attempt::of(&req);
    let page = matches!(need, Some(Need::Page(..)));
    let principal = if page {
        // A console page: the session's token, and for a form its CSRF token.
        match crate::ui::gate::session_principal(state, req).await {
            Ok((p, r)) => {
                req = r;
                p
            }
            Err(mut resp) => {
                audit(state, &attempt, None, &mut resp).await;
                return resp;
            }
        }
    } else {
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        match state.inner.auth.authenticate(header).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(reason = %e, path = %attempt.path(), "request not authenticated");
                let mut resp = ApiError::from_auth(e).into_response();
                audit(state, &attempt, None, &mut resp).await;
                return resp;
            }
        }
    };
    let resp = authorized(state, req, next, need, principal, attempt).await;
    if page {
        crate::ui::gate::html_errors(resp)
    } else {
        resp
    }
}

/// The rest of [`authenticated`], once the principal is known.
async fn authorized(
    state: &ApiState,
    mut req: Request,
    next: Next,
    need: Option<Need>,
    principal: Arc<Principal>,
    attempt: Attempt,
) -> Response {
    let caller = match authorize(Arc::clone(&principal), need) {
        Ok(c) => c,
        Err(e) => {
            let mut resp = e.into_response();
            audit(state, &attempt, Some((&principal, None)), &mut resp).await;
            return resp;
        }
    };
    if let Some(limiter) = &state.inner.limiter
        && let Err(denied) = limiter.check(&caller.principal.token_id, caller.scope.tenant())
    {
        // Not audited: a flood would flood the log; the limiter's refusals are counted in
        // the debug log instead.
        tracing::debug!(principal = %caller.principal.token_id, scope = %denied.scope, "request over its rate limit");
        return denied.into_response();
    }
    // A mutating request takes its place in the audit queue first: when the log cannot keep
    // up, the request waits or is refused, and a change is never left without its record.
    let mut caller = caller;
    let slot = match (&state.inner.audit, attempt.mutating()) {
        (Some(writer), true) => match writer.reserve().await {
            Ok(slot) => {
                caller.audit = Some(Arc::new(AuditDraft {
                    principal: AuditPrincipal::from(caller.principal.as_ref()),
                    tenant: caller.scope.tenant().map(str::to_string),
                    request_id: attempt.request_id(),
                    source: attempt.source(),
                    action: attempt.action(),
                    creates: attempt.method == axum::http::Method::POST
                        && attempt.action() == "create",
                    records: std::sync::Mutex::default(),
                }));
                Some(slot)
            }
            Err(e) => {
                return ApiError::new(ErrorCode::Unavailable, e.to_string()).into_response();
            }
        },
        _ => None,
    };
    let caller = Arc::new(caller);
    let span = tracing::Span::current();
    span.record("principal", caller.principal.token_id.as_str());
    if let Some(t) = caller.scope.tenant() {
        span.record("tenant", t);
    }
    // Access log at debug level; nothing is copied unless it is enabled.
    let logged = tracing::enabled!(tracing::Level::DEBUG).then(Instant::now);
    req.extensions_mut().insert(Arc::clone(&caller));
    let mut resp = next.run(req).await;
    if let Some(started) = logged {
        tracing::debug!(method = %attempt.method, path = %attempt.path(), status = resp.status().as_u16(),
            elapsed_us = started.elapsed().as_micros() as u64, "request served");
    }
    let stored = caller
        .audit
        .as_ref()
        .map(|d| d.take_records())
        .unwrap_or_default();
    match slot {
        // Stored with the change: only the sink is left to write, if there is one.
        Some(slot) if !stored.is_empty() => {
            if state
                .inner
                .audit
                .as_ref()
                .is_some_and(AuditWriter::has_sink)
            {
                slot.publish(stored);
            }
        }
        Some(slot) => {
            if let Some(entry) = audit_entry(
                &attempt,
                Some((&caller.principal, caller.scope.tenant())),
                &mut resp,
            ) && let Err(e) = slot.record(entry)
            {
                tracing::error!(error = %e, "an audit record could not be written");
            }
        }
        None => {
            audit(
                state,
                &attempt,
                Some((&caller.principal, caller.scope.tenant())),
                &mut resp,
            )
            .await
        }
    }
    resp
}

/// Header carrying the request id: taken from the client when it sends a sensible one, made
/// up otherwise, and sent back on every response.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The id of one request, in the request's extensions.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

/// A client's id is kept when it is 1 to 128 characters of letters, digits and `-_.:`.
fn usable_request_id(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then_some(s)
}

fn new_request_id() -> String {
    let n: u128 = rand::random();
    format!("{:032x}", n)
}

/// Gives every request an id and a tracing span (`request_id`, and once authenticated
/// `principal` and `tenant`), so every log line of the request carries them, and returns the id
/// in `X-Request-Id`.
async fn request_context(mut req: Request, next: Next) -> Response {
    let id: Arc<str> = match req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(usable_request_id)
    {
        Some(s) => Arc::from(s),
        None => Arc::from(new_request_id()),
    };
    req.extensions_mut().insert(RequestId(Arc::clone(&id)));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        principal = tracing::field::Empty,
        tenant = tracing::field::Empty
    );
    let mut resp = next.run(req).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
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

/// The 405 of a method a route does not answer, with its `Allow` when known.
fn method_not_allowed_response(req: &Request, allow: Option<HeaderValue>) -> Response {
    let path = client_path(req);
    let hint = match allow.as_ref().and_then(|a| a.to_str().ok()) {
        Some(methods) => format!("this path answers {methods}"),
        None => "see /api/v1/openapi.json".to_string(),
    };
    let mut resp = ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{} is not allowed on {path}; {hint}", req.method()),
    )
    .into_response();
    if let Some(methods) = allow {
        resp.headers_mut().insert(header::ALLOW, methods);
    }
    resp
}

/// The router's own 405 (the route table answers first, so this is a last resort).
async fn method_not_allowed(req: Request) -> Response {
    method_not_allowed_response(&req, None)
}

/// Prometheus text exposition (bearer token, like the API).
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text exposition: hosts and instances by phase; per instance replicas desired, ready, available and updated, restarts, OOM kills, probe failures, drift repairs and rollout progress; per host readiness, heartbeat age, capacity and allocation; replica CPU and memory; the Gateways' relayed figures (instances with spec.metrics.gateway); certificate expiry; agent RPC and API request counts and latencies", content_type = "text/plain")))]
pub(crate) async fn metrics_handler(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let (metrics, reports) = (state.inner.metrics.clone(), state.inner.reports.clone());
    let text = state
        .run_unscoped(move |store| Ok(metrics.render(store, &reports)?))
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

/// The whole HTTP surface: `/healthz`, `/readyz` (open), `/metrics` and `/api/v1` (bearer
/// token), every route with the permission it needs ([`routes`]).
pub fn router(state: ApiState) -> Router {
    let (routes, table) = api_routes().into_parts();
    guarded(routes, table, state)
}

/// `routes` behind the authorization middleware that checks every request against `table`.
fn guarded(routes: Router<ApiState>, table: routes::RouteTable, state: ApiState) -> Router {
    let guard = Guard {
        api: state.clone(),
        table: Arc::new(table),
    };
    let metrics = Arc::clone(&state.inner.metrics);
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(guard, require_token))
        .layer(middleware::from_fn(request_context))
        .layer(middleware::from_fn_with_state(metrics, observe_request))
        .with_state(state)
}

/// Counts every API request by the route template that matched (never the raw path), its
/// method and status code, with its latency (for a stream, until its head).
async fn observe_request(
    State(metrics): State<Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let method = req.method().clone();
    let resp = next.run(req).await;
    metrics.observe_http(
        route.as_deref(),
        &method,
        resp.status().as_u16(),
        started.elapsed(),
    );
    resp
}

/// Every route the API serves and what each needs.
pub fn route_table() -> routes::RouteTable {
    api_routes().into_parts().1
}

fn api_routes() -> routes::Routes {
    use crate::auth::rbac::Res::*;
    use routes::{delete, get, open, post, put};
    let v1 = |path: &str| format!("/api/v1{path}");
    let instance = v1("/tenants/{tenant}/projects/{project}/instances/{name}");
    routes::Routes::default()
        .route("/healthz", open(objects::healthz))
        .route("/readyz", open(objects::readyz))
        .route("/metrics", get(Metrics, metrics_handler))
        .route(&v1("/openapi.json"), get(Info, openapi::openapi_handler))
        .route(&v1("/info"), get(Info, objects::info))
        .route(&v1("/servers"), get(Servers, servers::list_servers))
        .route(
            &v1("/apply"),
            post(Apply, objects::apply).delete(Apply, objects::delete_batch),
        )
        .route(
            &v1("/tenants"),
            get(Tenants, objects::list_tenants).post(Tenants, objects::create_tenant),
        )
        .route(
            &v1("/tenants/{tenant}"),
            get(Tenants, objects::get_tenant)
                .put(Tenants, objects::put_tenant)
                .delete(Tenants, objects::delete_tenant),
        )
        .route(&v1("/projects"), get(Projects, objects::list_projects))
        .route(
            &v1("/tenants/{tenant}/projects"),
            get(Projects, objects::list_tenant_projects).post(Projects, objects::create_project),
        )
        .route(
            &v1("/tenants/{tenant}/projects/{project}"),
            get(Projects, objects::get_project)
                .put(Projects, objects::put_project)
                .delete(Projects, objects::delete_project),
        )
        .route(&v1("/instances"), get(Instances, objects::list_instances))
        .route(
            &v1("/tenants/{tenant}/projects/{project}/instances"),
            get(Instances, objects::list_project_instances)
                .post(Instances, objects::create_instance),
        )
        .route(
            &instance,
            get(Instances, objects::get_instance)
                .put(Instances, objects::put_instance)
                .delete(Instances, objects::delete_instance),
        )
        .route(
            &format!("{instance}/scale"),
            put(Instances, objects::scale_instance),
        )
        .route(
            &format!("{instance}/logs"),
            get(Instances, logs::instance_logs),
        )
        .route(
            &format!("{instance}/rollout/{{action}}"),
            post(Instances, rollout::rollout_action),
        )
        .route(
            &format!("{instance}/config"),
            get(Instances, configs::effective),
        )
        .route(
            &format!("{instance}/config/revisions"),
            get(Instances, configs::history),
        )
        .route(
            &format!("{instance}/config/revisions/{{revision}}"),
            get(Instances, configs::revision),
        )
        .route(
            &format!("{instance}/config/diff"),
            get(Instances, configs::diff),
        )
        .route(
            &format!("{instance}/config/rollback"),
            post(Instances, configs::rollback),
        )
        .route(
            &v1("/configtemplates"),
            get(Templates, configs::list_templates).post(Templates, configs::create_template),
        )
        .route(
            &v1("/configtemplates/{name}"),
            get(Templates, configs::get_template)
                .put(Templates, configs::put_template)
                .delete(Templates, configs::delete_template),
        )
        .route(&v1("/secrets"), get(Secrets, configs::list_secrets))
        .route(
            &v1("/secrets/rotate-key"),
            post(SecretKey, configs::rotate_key),
        )
        .route(
            &v1("/tenants/{tenant}/secrets"),
            get(Secrets, configs::list_tenant_secrets),
        )
        .route(
            &v1("/tenants/{tenant}/secrets/{name}"),
            get(Secrets, configs::get_tenant_secret)
                .put(TenantSecrets, configs::put_tenant_secret)
                .delete(TenantSecrets, configs::delete_tenant_secret),
        )
        .route(
            &v1("/tenants/{tenant}/projects/{project}/secrets"),
            get(Secrets, configs::list_project_secrets),
        )
        .route(
            &v1("/tenants/{tenant}/projects/{project}/secrets/{name}"),
            get(Secrets, configs::get_project_secret)
                .put(ProjectSecrets, configs::put_project_secret)
                .delete(ProjectSecrets, configs::delete_project_secret),
        )
        .route(
            &v1("/rollouts"),
            get(Rollouts, waves::list_rollouts).post(Rollouts, waves::create_rollout),
        )
        .route(
            &v1("/rollouts/{name}"),
            get(Rollouts, waves::get_rollout)
                .put(Rollouts, waves::put_rollout)
                .delete(Rollouts, waves::delete_rollout),
        )
        .route(
            &v1("/tenants/{tenant}/rollouts"),
            get(TenantRollouts, waves::list_tenant_rollouts)
                .post(TenantRollouts, waves::create_tenant_rollout),
        )
        .route(
            &v1("/tenants/{tenant}/rollouts/{name}"),
            get(TenantRollouts, waves::get_tenant_rollout)
                .put(TenantRollouts, waves::put_tenant_rollout)
                .delete(TenantRollouts, waves::delete_tenant_rollout),
        )
        .route(&v1("/hosts"), get(Hosts, objects::list_hosts))
        .route(
            &v1("/hosts/{host}"),
            get(Hosts, objects::get_host)
                .put(Hosts, objects::put_host)
                .delete(Hosts, objects::delete_host),
        )
        .route(
            &v1("/hosts/{host}/cordon"),
            post(HostScheduling, objects::cordon_host),
        )
        .route(
            &v1("/hosts/{host}/uncordon"),
            post(HostScheduling, objects::uncordon_host),
        )
        .route(&v1("/volumes"), get(Volumes, volumes::list_volumes))
        .route(
            &v1("/hosts/{host}/volumes/{name}"),
            delete(Volumes, volumes::delete_volume),
        )
        .route(
            &v1("/hosts/{host}/drain"),
            get(HostScheduling, drain::get_drain).post(HostScheduling, drain::start_drain),
        )
        .route(
            &v1("/tokens"),
            get(Tokens, tokens::list_tokens).post(Tokens, tokens::create_token),
        )
        .route(&v1("/tokens/{id}"), delete(Tokens, tokens::revoke_token))
        .route(&v1("/events"), get(Events, events::list_events))
        .route(
            &v1("/tenants/{tenant}/events"),
            get(Events, events::list_tenant_events),
        )
        .route(
            &v1("/tenants/{tenant}/projects/{project}/events"),
            get(Events, events::list_project_events),
        )
        .route(&v1("/audit"), get(Audit, audit::list_audit))
        .route(&v1("/audit/verify"), get(AuditChain, audit::verify_audit))
        // The web console: pages for browsers, in the same table (so they are authorized the
        // same way) but not in the OpenAPI document.
        .pipe(crate::ui::mount)
}
