//! Handlers for objects: tenants, projects, instances, hosts, `/apply`, info and health.

use std::cell::Cell;
use std::fmt::Write as _;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use utoipa::ToSchema;

use super::body::{self, APPLY_BODY_LIMIT, BODY_LIMIT};
use super::error::{ApiError, ErrorBody, ErrorCode, single};
use super::openapi::{HostList, InstanceList, ProjectList, TenantList};
use super::{ApiState, AuditNote, Ctx, OUTCOME_HEADER, P, json_response, query};
use crate::auth::rbac;
use crate::model::{
    API_VERSION, FieldProblem, HOST_READ_ONLY, Host, Kind, MAX_REPLICAS, ObjectKey,
    OpenClawInstance, Project, Resource, Tenant, decode_typed, format_cpu, format_memory,
    validate_dns_label, validate_object,
};
use crate::store::{
    ListFilter, Outcome, Scoped, StoreError, StoredObject, Usage, UsageByTenant, WriteMode,
    WriteSummary,
};
/// Attempts of a scale before giving up on concurrent writers.
const SCALE_ATTEMPTS: usize = 5;

/// `GET /healthz` answer.
#[derive(Serialize, ToSchema)]
pub struct Health {
    pub ok: bool,
}

/// `GET /readyz` answer.
#[derive(Serialize, ToSchema)]
pub struct Ready {
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// This server's view of the leader lease: whether it leads, who does, the epoch and
    /// when the lease expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<crate::store::lease::LeaderStatus>,
}

/// `GET /api/v1/info` answer.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Info {
    /// Version of the server.
    #[schema(example = "0.1.0")]
    pub version: String,
    #[schema(example = "clusterclaw.io/v1")]
    pub api_version: String,
    /// Current store index.
    pub index: u64,
    /// The replica that answered and what it knows of the leader lease; shown to callers
    /// who may list the server replicas (platform-admins, cluster-wide viewers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerSelf>,
}

/// The answering server replica in `GET /api/v1/info`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerSelf {
    /// Its id (as `GET /api/v1/servers` lists it).
    pub id: String,
    /// Whether it leads (runs the controllers).
    pub leading: bool,
    /// The id of the leader as it last read the lease (empty: unknown).
    pub leader: String,
    /// The lease's epoch as it last read it.
    pub epoch: u64,
}

/// `POST /api/v1/apply` JSON body.
#[derive(Serialize, ToSchema)]
pub struct ApplyRequest {
    /// Objects of any user-writable kind, written all or nothing, parents first.
    pub items: Vec<Resource>,
}

/// What `/apply` did to one object.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppliedItem {
    #[schema(value_type = String, example = "OpenClawInstance")]
    pub kind: Kind,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    pub outcome: Outcome,
    pub resource_version: u64,
}

/// `POST /api/v1/apply` answer, items in request order.
#[derive(Serialize, ToSchema)]
pub struct ApplyResponse {
    pub index: u64,
    pub items: Vec<AppliedItem>,
}

/// `PUT .../scale` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    pub replicas: i64,
}

/// `DELETE` answer.
#[derive(Serialize, ToSchema)]
pub struct Deleted {
    /// The deleted object, e.g. `openclawinstance/acme/helpdesk/bot`.
    #[schema(example = "openclawinstance/acme/helpdesk/bot")]
    pub deleted: String,
    pub index: u64,
}

// ---- shared implementation -------------------------------------------------------------

/// The object a request path names (or, for a `POST`, the scope it creates in).
pub(super) struct Target {
    pub(super) kind: Kind,
    pub(super) tenant: Option<String>,
    pub(super) project: Option<String>,
    pub(super) name: Option<String>,
}

/// Checks the names a request path gives (`("tenant", "acme")`): each is a DNS-1123 label, or
/// the request is malformed (400), whatever the store holds.
pub(super) fn check_path_names(names: &[(&str, &str)]) -> Result<(), ApiError> {
    for (param, value) in names {
        if let Err(e) = validate_dns_label(value) {
            let rule = if e.contains("DNS-1123") {
                String::new()
            } else {
                "; names are DNS-1123 labels: 1 to 63 lower-case letters, digits and '-'".into()
            };
            return Err(ApiError::bad_request(format!(
                "path parameter {param:?}: {e}{rule}"
            )));
        }
    }
    Ok(())
}

/// Lists `filter.kind`, narrowed by the query; `parent` must exist when given.
pub(super) async fn list(
    state: Ctx,
    raw: Option<String>,
    allowed: &[&str],
    mut filter: ListFilter,
    parent: Option<ObjectKey>,
) -> Result<Response, ApiError> {
    let mut allowed = allowed.to_vec();
    allowed.extend(["watch", "resourceVersion"]);
    let params = query::parse(raw.as_deref(), &allowed)?;
    filter.labels = params.selector()?;
    if let Some(t) = params.get("tenant") {
        filter.tenant = Some(t.to_string());
    }
    if let Some(p) = params.get("project") {
        filter.project = Some(p.to_string());
    }
    if let Some(from) = super::watch::params(&params)? {
        if let Some(parent) = parent {
            state
                .run(move |store| match store.get(&parent)? {
                    Some(_) => Ok(()),
                    None => Err(StoreError::NotFound(parent).into()),
                })
                .await?;
        }
        let scope = state.caller().scope.clone();
        if !scope.narrow(&mut filter) {
            // Nothing it could match is visible: a watch that only bookmarks.
            filter.name = Some(String::new());
        }
        return super::watch::watch(
            &state,
            scope,
            super::watch::Want::Objects(filter),
            from,
            state.sse,
        )
        .await;
    }
    if matches!(filter.kind, Kind::Tenant | Kind::Project) {
        return list_with_usage(state, filter, parent).await;
    }
    if filter.kind == Kind::Host {
        return list_hosts_aged(state, filter).await;
    }
    stream_list(state, filter, parent).await
}

/// `status.usage` of a tenant or project: what its instances consume, as quotas count it.
fn usage_value(u: &Usage) -> Value {
    serde_json::json!({
        "instances": u.instances,
        "replicas": u.replicas,
        "cpu": format_cpu(u.cpu_millis.max(0) as u64),
        "memory": format_memory(u.memory_bytes.max(0) as u64),
    })
}

/// The stored JSON of a tenant or project with its current usage in `status.usage`.
fn with_usage(o: &StoredObject, usage: &UsageByTenant) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_str(&o.json).map_err(ApiError::internal)?;
    let u = match o.key.kind {
        Kind::Tenant => usage.get(&o.key.name).map(|(t, _)| *t),
        Kind::Project => usage
            .get(&o.key.tenant)
            .and_then(|(_, projects)| projects.get(&o.key.name).copied()),
        _ => return Ok(v),
    }
    .unwrap_or_default();
    if let Value::Object(map) = &mut v {
        let status = map
            .entry("status")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(status) = status {
            status.insert("usage".into(), usage_value(&u));
        }
    }
    Ok(v)
}

/// Lists tenants or projects (few, small) with their usage against their quotas.
async fn list_with_usage(
    state: Ctx,
    filter: ListFilter,
    parent: Option<ObjectKey>,
) -> Result<Response, ApiError> {
    let (index, items) = state
        .run(move |store| {
            if let Some(parent) = parent
                && store.get(&parent)?.is_none()
            {
                return Err(StoreError::NotFound(parent).into());
            }
            let (index, items) = store.list_at(&filter)?;
            let usage = store.usage()?;
            let items = items
                .iter()
                .map(|o| with_usage(o, &usage))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((index, items))
        })
        .await?;
    let text = serde_json::to_string(&serde_json::json!({"index": index, "items": items}))
        .map_err(ApiError::internal)?;
    Ok(json_response(StatusCode::OK, text, index))
}

/// Lists hosts as readers see them now: a NotReady host's message says how long it has been
/// silent at the time of the read ([`crate::controllers::hosts::aged_json`]).
async fn list_hosts_aged(state: Ctx, filter: ListFilter) -> Result<Response, ApiError> {
    let (index, text) = state
        .run(move |store| {
            let (index, items) = store.list_at(&filter)?;
            let seen = store.host_heartbeats()?;
            let now = crate::controllers::hosts::now_ms();
            let mut out: Vec<u8> = Vec::new();
            let _ = write!(ByteText(&mut out), "{{\"index\":{index},\"items\":[");
            for (i, o) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let json = crate::controllers::hosts::aged_json(o, &seen, now);
                out.extend_from_slice(json.as_bytes());
            }
            out.extend_from_slice(b"]}");
            Ok((index, out))
        })
        .await?;
    Ok(json_response(StatusCode::OK, Body::from(text), index))
}

/// Bytes of list body gathered before they are handed to the connection.
const LIST_CHUNK: usize = 64 * 1024;

/// Answers a list as a stream of chunks read from one store snapshot on the blocking pool, so
/// a list of 10,000 objects never holds more than a few chunks in memory. Errors found before
/// the first byte (a missing parent, a store failure) are answered as usual.
async fn stream_list(
    state: Ctx,
    filter: ListFilter,
    parent: Option<ObjectKey>,
) -> Result<Response, ApiError> {
    let slot = state.store_slot().await?;
    let (store, scope) = state.scoped_parts();
    let (started_tx, started_rx) = oneshot::channel::<Result<u64, ApiError>>();
    let (chunks_tx, chunks_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let store = Scoped::new(store.as_ref(), scope);
        // Shared by the two scan callbacks.
        let started_tx = Cell::new(Some(started_tx));
        let at = Cell::new(0u64);
        let fail = |e: ApiError| {
            if let Some(tx) = started_tx.take() {
                let _ = tx.send(Err(e));
            }
        };
        if let Some(parent) = parent {
            match store.get(&parent) {
                Ok(Some(_)) => {}
                Ok(None) => return fail(StoreError::NotFound(parent).into()),
                Err(e) => return fail(e.into()),
            }
        }
        let mut out = ChunkWriter::new(chunks_tx);
        let mut start = |index: u64| {
            at.set(index);
            started_tx
                .take()
                .is_some_and(|tx| tx.send(Ok(index)).is_ok())
        };
        let mut each = |o: &StoredObject| out.item(at.get(), o.json.as_bytes());
        match store.scan(&filter, &mut start, &mut each) {
            Ok(()) => out.finish(at.get()),
            // Before the first byte the caller gets the error; after it, the body is cut so
            // the client sees a broken answer, never a valid-looking short list.
            Err(e) => match started_tx.take() {
                Some(tx) => {
                    let _ = tx.send(Err(e.into()));
                }
                None => out.abort(e.to_string()),
            },
        }
    });
    let index = match started_rx.await {
        Ok(result) => result?,
        Err(_) => return Err(ApiError::internal("the list task ended without an answer")),
    };
    let body = Body::from_stream(ReceiverStream::new(chunks_rx));
    Ok(json_response(StatusCode::OK, body, index))
}

/// Gathers a list body into chunks of about [`LIST_CHUNK`] bytes and hands them to the
/// response stream.
struct ChunkWriter {
    buf: Vec<u8>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    items: usize,
    /// False once the client went away.
    open: bool,
}

impl ChunkWriter {
    fn new(tx: mpsc::Sender<Result<Bytes, std::io::Error>>) -> Self {
        ChunkWriter {
            buf: Vec::with_capacity(LIST_CHUNK + 4096),
            tx,
            items: 0,
            open: true,
        }
    }

    fn head(&mut self, index: u64) {
        let _ = write!(ByteText(&mut self.buf), "{{\"index\":{index},\"items\":[");
    }

    /// Adds one object's JSON; false once the client is gone.
    fn item(&mut self, index: u64, json: &[u8]) -> bool {
        if self.items == 0 {
            self.head(index);
        } else {
            self.buf.push(b',');
        }
        self.items += 1;
        self.buf.extend_from_slice(json);
        if self.buf.len() >= LIST_CHUNK {
            self.flush();
        }
        self.open
    }

    fn flush(&mut self) {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(LIST_CHUNK + 4096));
        self.open = self.open && self.tx.blocking_send(Ok(Bytes::from(chunk))).is_ok();
    }

    fn finish(mut self, index: u64) {
        if !self.open {
            return;
        }
        if self.items == 0 {
            self.head(index);
        }
        self.buf.extend_from_slice(b"]}");
        self.flush();
    }

    fn abort(self, why: String) {
        let _ = self.tx.blocking_send(Err(std::io::Error::other(why)));
    }
}

/// Lets `write!` append UTF-8 text to a byte buffer.
struct ByteText<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for ByteText<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

pub(super) async fn get_one(
    state: Ctx,
    raw: Option<String>,
    key: ObjectKey,
) -> Result<Response, ApiError> {
    if raw.is_some() {
        query::parse(raw.as_deref(), &[])?;
    }
    if matches!(key.kind, Kind::Tenant | Kind::Project) {
        let (index, value) = state
            .run(move |store| match store.get_at(&key)? {
                (index, Some(o)) => {
                    let usage = store.usage_of(Some(o.key.tenant_name()))?;
                    Ok((index, with_usage(&o, &usage)?))
                }
                (_, None) => Err(StoreError::NotFound(key).into()),
            })
            .await?;
        let text = serde_json::to_string(&value).map_err(ApiError::internal)?;
        return Ok(json_response(StatusCode::OK, text, index));
    }
    let (index, object) = state.read_point(move |store| match store.get_at(&key)? {
        (index, Some(o)) => Ok((index, o)),
        (_, None) => Err(StoreError::NotFound(key).into()),
    })?;
    if object.key.kind == Kind::Host {
        let seen = state.read_point(|store| Ok(store.host_heartbeats()?))?;
        let text = crate::controllers::hosts::aged_json(
            &object,
            &seen,
            crate::controllers::hosts::now_ms(),
        );
        return Ok(json_response(StatusCode::OK, text, index));
    }
    Ok(json_response(StatusCode::OK, object.json, index))
}

/// Fills in what the path says (apiVersion, kind, scope, name) where the body leaves it out,
/// and reports where the body contradicts the path.
fn bind_to_path(value: &mut Value, target: &Target) -> Result<(), ApiError> {
    let Value::Object(map) = value else {
        return Ok(());
    };
    let mut problems = Vec::new();
    map.entry("apiVersion")
        .or_insert_with(|| Value::String(API_VERSION.into()));
    match map.get("kind") {
        None | Some(Value::Null) => {
            map.insert("kind".into(), Value::String(target.kind.as_str().into()));
        }
        Some(Value::String(k)) if k == target.kind.as_str() => {}
        Some(Value::String(k)) if k == Kind::Host.as_str() => {
            return Err(ApiError::new(ErrorCode::Forbidden, HOST_READ_ONLY)
                .with_details(vec![FieldProblem::new("kind", HOST_READ_ONLY)]));
        }
        Some(other) => problems.push(FieldProblem::new(
            "kind",
            format!(
                "this endpoint takes {} objects, not {other}; send other kinds to their own endpoints or to /api/v1/apply",
                target.kind
            ),
        )),
    }
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(meta) = meta {
        // A tenant-level secret's path names no project: the body may not name one either.
        if target.kind == Kind::Secret
            && target.project.is_none()
            && meta.get("project").is_some_and(|p| !p.is_null())
        {
            problems.push(FieldProblem::new(
                "metadata.project",
                "this path takes tenant-level secrets; send a project's secret to /api/v1/tenants/{tenant}/projects/{project}/secrets/{name}",
            ));
        }
        for (field, expected) in [
            ("name", &target.name),
            ("tenant", &target.tenant),
            ("project", &target.project),
        ] {
            let Some(expected) = expected else { continue };
            match meta.get(field) {
                None | Some(Value::Null) => {
                    meta.insert(field.into(), Value::String(expected.clone()));
                }
                Some(Value::String(s)) if s == expected => {}
                Some(other) => problems.push(FieldProblem::new(
                    format!("metadata.{field}"),
                    format!("{other} does not match {expected:?} in the request path"),
                )),
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(problems))
    }
}

/// Decodes and validates one manifest.
fn decode(value: Value) -> Result<Resource, Vec<FieldProblem>> {
    let r = Resource::from_value(value)?;
    let problems = validate_object(&r);
    if problems.is_empty() {
        Ok(r)
    } else {
        Err(problems)
    }
}

/// Reads, binds, checks and decodes the body of a `POST` or `PUT`.
async fn object_from_body(
    headers: &HeaderMap,
    body: Body,
    target: &Target,
) -> Result<Resource, ApiError> {
    let (bytes, format) = body::read(headers, body, BODY_LIMIT).await?;
    let mut value = body::one_document(&bytes, format)?;
    if let Some(problem) = body::object_too_large(&value) {
        return Err(ApiError::new(ErrorCode::PayloadTooLarge, problem));
    }
    bind_to_path(&mut value, target)?;
    let resource = decode(value).map_err(ApiError::invalid)?;
    if !resource.kind().user_writable() {
        return Err(ApiError::new(ErrorCode::Forbidden, HOST_READ_ONLY));
    }
    Ok(resource)
}

/// Seals the values of a secret before anything else sees them: each becomes an envelope
/// bound to its place, and `spec.keys` gets its fingerprint.
pub(super) fn seal_secret(state: &Ctx, r: &mut Resource) -> Result<(), ApiError> {
    let Resource::Secret(s) = r else {
        return Ok(());
    };
    let keyring = state.keyring().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unavailable,
            "secrets cannot be stored: this server has no secrets key file (see the README's configuration)",
        )
    })?;
    let key = s.key();
    let mut keys = std::collections::BTreeMap::new();
    for (k, v) in s.spec.data.iter_mut() {
        let value = crate::secrets::SecretValue::new(std::mem::take(&mut v.0));
        keys.insert(k.clone(), keyring.fingerprint(&value));
        let aad = crate::store::revisions::aad(&key.tenant, &key.project, &key.name, k);
        v.0 = keyring
            .seal(&aad, &value)
            .map_err(|e| ApiError::internal(format!("sealing a secret value: {e}")))?;
    }
    s.spec.keys = keys;
    Ok(())
}

/// One object's write: the index, what happened, the object, its generation before.
type Written = (u64, Outcome, StoredObject, Option<i64>);

fn written(summary: WriteSummary) -> Result<Written, ApiError> {
    let index = summary.index;
    match summary.results.into_iter().next() {
        Some(r) => Ok((index, r.outcome, r.object, r.previous_generation)),
        None => Err(ApiError::internal(
            "the store answered a write of one object with no result",
        )),
    }
}

pub(super) async fn create(
    state: Ctx,
    raw: Option<String>,
    headers: HeaderMap,
    body: Body,
    target: Target,
) -> Result<Response, ApiError> {
    query::parse(raw.as_deref(), &[])?;
    let mut resource = object_from_body(&headers, body, &target).await?;
    let _sealing = match resource.kind() {
        Kind::Secret => Some(state.secret_write_guard().await),
        _ => None,
    };
    seal_secret(&state, &mut resource)?;
    let (index, _, object, before) = state
        .run(move |store| {
            written(
                store
                    .write(&[(resource, WriteMode::Create)], false)
                    .map_err(single)?,
            )
        })
        .await?;
    let note =
        AuditNote::object("create", &object.key).generations(before, Some(object.generation));
    Ok(noted(
        json_response(StatusCode::CREATED, object.json, index),
        note,
    ))
}

fn noted(mut resp: Response, note: AuditNote) -> Response {
    resp.extensions_mut().insert(note);
    resp
}

fn with_outcome(mut resp: Response, outcome: Outcome) -> Response {
    resp.headers_mut()
        .insert(OUTCOME_HEADER, HeaderValue::from_static(outcome.as_str()));
    resp
}

pub(super) async fn put_one(
    state: Ctx,
    raw: Option<String>,
    headers: HeaderMap,
    body: Body,
    target: Target,
) -> Result<Response, ApiError> {
    query::parse(raw.as_deref(), &[])?;
    let mut resource = object_from_body(&headers, body, &target).await?;
    let _sealing = match resource.kind() {
        Kind::Secret => Some(state.secret_write_guard().await),
        _ => None,
    };
    seal_secret(&state, &mut resource)?;
    let (index, outcome, object, before) = state
        .run(move |store| {
            written(
                store
                    .write(&[(resource, WriteMode::Apply)], false)
                    .map_err(single)?,
            )
        })
        .await?;
    let status = match outcome {
        Outcome::Created => StatusCode::CREATED,
        Outcome::Configured | Outcome::Unchanged => StatusCode::OK,
    };
    let note =
        AuditNote::object("update", &object.key).generations(before, Some(object.generation));
    Ok(noted(
        with_outcome(json_response(status, object.json, index), outcome),
        note,
    ))
}

pub(super) async fn delete_one(
    state: Ctx,
    raw: Option<String>,
    key: ObjectKey,
) -> Result<Response, ApiError> {
    let params = query::parse(raw.as_deref(), &["resourceVersion"])?;
    let expected = params.u64("resourceVersion")?;
    let deleted = key.to_string();
    let note = AuditNote::object("delete", &key);
    let (index, before) = state
        .run(move |store| {
            let before = store.get(&key)?.map(|o| o.generation);
            Ok((store.delete(&key, expected)?, before))
        })
        .await?;
    let text = serde_json::to_string(&Deleted { deleted, index }).map_err(ApiError::internal)?;
    Ok(noted(
        json_response(StatusCode::OK, text, index),
        note.generations(before, None),
    ))
}

// ---- health and info -------------------------------------------------------------------

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, description = "The server is alive", body = Health)))]
pub async fn healthz() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        r#"{"ok":true}"#,
    )
        .into_response()
}

/// Readiness: the server takes requests (503 while shutting down, or while the store cannot
/// be reached).
#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses(
        (status = 200, description = "Ready", body = Ready),
        (status = 503, description = "Not ready, with the reason", body = Ready),
    ))]
pub async fn readyz(State(state): State<ApiState>) -> Response {
    if state.is_shutting_down() {
        let body = Ready {
            ready: false,
            reason: Some("shutting down".into()),
            leader: state.metrics().leader(),
        };
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    // The store must answer (a database server may be away), within a bound.
    let store = std::sync::Arc::clone(state.store());
    let check = tokio::task::spawn_blocking(move || store.check());
    let unreachable = match tokio::time::timeout(READY_CHECK_TIMEOUT, check).await {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(e))) => Some(format!("the store cannot be reached: {e}")),
        Ok(Err(e)) => Some(format!("the store check failed: {e}")),
        Err(_) => Some(format!(
            "the store did not answer within {}s",
            READY_CHECK_TIMEOUT.as_secs()
        )),
    };
    if let Some(reason) = unreachable {
        let body = Ready {
            ready: false,
            reason: Some(reason),
            leader: state.metrics().leader(),
        };
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    axum::Json(Ready {
        ready: true,
        reason: None,
        leader: state.metrics().leader(),
    })
    .into_response()
}

/// How long `/readyz` waits for the store to answer.
const READY_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Server version, API version and current index.
#[utoipa::path(get, path = "/api/v1/info", tag = "info",
    responses(
        (status = 200, description = "Server information", body = Info),
        (status = 401, description = "No valid API token", body = ErrorBody),
    ))]
pub async fn info(state: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    query::parse(raw.as_deref(), &[])?;
    let index = state.index();
    let caller = state.caller();
    let may_see = rbac::allowed(
        caller.role,
        &caller.scope,
        rbac::Res::Servers,
        rbac::Verb::Read,
    );
    let server = may_see
        .then(|| state.metrics().leader())
        .flatten()
        .map(|l| ServerSelf {
            id: l.server,
            leading: l.leading,
            leader: l.holder,
            epoch: l.epoch,
        });
    let info = Info {
        version: env!("CARGO_PKG_VERSION").into(),
        api_version: API_VERSION.into(),
        index,
        server,
    };
    let text = serde_json::to_string(&info).map_err(ApiError::internal)?;
    Ok(json_response(StatusCode::OK, text, index))
}

// ---- apply -----------------------------------------------------------------------------

/// The 403 of a batch with documents the caller may not `verb`: the first refusal in the
/// message (with the role that would be needed), all of them in details.
fn documents_refused(denials: Vec<FieldProblem>, verb: &str, done: &str) -> ApiError {
    let first = &denials[0];
    let msg = match denials.len() {
        1 => format!("{}: {}; nothing was {done}", first.field, first.problem),
        n => format!(
            "{n} documents are not yours to {verb}, listed in details (the first, {}: {}); nothing was {done}",
            first.field, first.problem
        ),
    };
    ApiError::new(ErrorCode::Forbidden, msg).with_details(denials)
}

/// Creates or updates a batch of objects, all or nothing, parents before children.
#[utoipa::path(post, path = "/api/v1/apply", tag = "objects",
    params(("dryRun" = Option<bool>, Query, description = "Check and report without writing")),
    request_body(description = "`{\"items\":[...]}` as JSON, or YAML documents (one object each)",
        content((ApplyRequest = "application/json"), (String = "application/yaml"))),
    responses(
        (status = 200, description = "What happened to each object, in request order", body = ApplyResponse,
            headers(("X-Clusterclaw-Index" = u64, description = "Store index after the write"))),
        (status = 400, description = "The body is not JSON/YAML (the message gives line and column)", body = ErrorBody),
        (status = 403, description = "The batch writes a Host", body = ErrorBody),
        (status = 404, description = "A referenced tenant or project does not exist", body = ErrorBody),
        (status = 409, description = "A stale resourceVersion", body = ErrorBody),
        (status = 413, description = "Body over 64 MiB or an object over 256 KiB", body = ErrorBody),
        (status = 415, description = "Neither JSON nor YAML", body = ErrorBody),
        (status = 422, description = "Objects break rules; details name items[i].field", body = ErrorBody),
    ))]
pub async fn apply(
    state: Ctx,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let params = query::parse(raw.as_deref(), &["dryRun"])?;
    let dry_run = params.bool("dryRun")?;
    let (bytes, format) = body::read(&headers, body, APPLY_BODY_LIMIT).await?;
    let docs = body::apply_documents(&bytes, format)?;
    drop(bytes);
    let (mut too_large, mut forbidden, mut invalid) = (Vec::new(), Vec::new(), Vec::new());
    let mut denials = Vec::new();
    let mut batch = Vec::with_capacity(docs.len());
    // Secrets are sealed below: no key rotation from here to the commit.
    let sealing = docs
        .iter()
        .any(|d| d.get("kind").and_then(Value::as_str) == Some(Kind::Secret.as_str()));
    let _sealing = match sealing {
        true => Some(state.secret_write_guard().await),
        false => None,
    };
    for (i, doc) in docs.into_iter().enumerate() {
        let item = format!("items[{i}]");
        if let Some(problem) = body::object_too_large(&doc) {
            too_large.push(FieldProblem::new(item, problem));
            continue;
        }
        if doc.get("kind").and_then(Value::as_str) == Some(Kind::Host.as_str()) {
            forbidden.push(FieldProblem::new(format!("{item}.kind"), HOST_READ_ONLY));
            continue;
        }
        match decode(doc) {
            Ok(r) if !r.kind().user_writable() => {
                forbidden.push(FieldProblem::new(format!("{item}.kind"), HOST_READ_ONLY))
            }
            Ok(mut r) => match rbac::check(
                &state.caller().principal,
                rbac::Res::of_resource(&r),
                rbac::Verb::Write,
            ) {
                Ok(_) => {
                    seal_secret(&state, &mut r)?;
                    batch.push((r, WriteMode::Apply))
                }
                Err(denied) => denials.push(FieldProblem::new(format!("{item}.kind"), denied.0)),
            },
            Err(problems) => invalid.extend(problems.into_iter().map(|p| p.under(&item))),
        }
    }
    if !denials.is_empty() {
        return Err(documents_refused(denials, "write", "written"));
    }
    if !too_large.is_empty() {
        let msg = format!(
            "{} object(s) are over the size limit, listed in details",
            too_large.len()
        );
        return Err(ApiError::new(ErrorCode::PayloadTooLarge, msg).with_details(too_large));
    }
    if !forbidden.is_empty() {
        let msg = format!("{}; nothing was written", HOST_READ_ONLY);
        return Err(ApiError::new(ErrorCode::Forbidden, msg).with_details(forbidden));
    }
    if !invalid.is_empty() {
        let mut e = ApiError::invalid(invalid);
        e.message.push_str("; nothing was written");
        return Err(e);
    }
    let summary = state
        .run(move |store| Ok(store.write(&batch, dry_run)?))
        .await?;
    let items = summary
        .results
        .into_iter()
        .map(|r| AppliedItem {
            kind: r.key.kind,
            name: r.key.name,
            tenant: Some(r.key.tenant).filter(|t| !t.is_empty()),
            project: Some(r.key.project).filter(|p| !p.is_empty()),
            outcome: r.outcome,
            resource_version: r.object.resource_version,
        })
        .collect();
    let response = ApplyResponse {
        index: summary.index,
        items,
    };
    let text = serde_json::to_string(&response).map_err(ApiError::internal)?;
    let tenants: std::collections::BTreeSet<&str> = response
        .items
        .iter()
        .filter_map(|i| match i.kind {
            Kind::Tenant => Some(i.name.as_str()),
            _ => i.tenant.as_deref(),
        })
        .collect();
    let tenant = match tenants.len() {
        1 => tenants.into_iter().next().map(str::to_string),
        _ => None,
    };
    let note = AuditNote {
        action: if dry_run { "apply.dry-run" } else { "apply" },
        object: Some(super::batch_object(
            response.items.iter().map(|i| i.outcome),
            tenant,
        )),
        generation_before: None,
        generation_after: None,
    };
    Ok(noted(
        json_response(StatusCode::OK, text, summary.index),
        note,
    ))
}

// ---- batch delete ----------------------------------------------------------------------

/// What `DELETE /api/v1/apply` did to one object.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeletedItem {
    #[schema(value_type = String, example = "Project")]
    pub kind: Kind,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// `deleted`, or `notFound` (with `ignoreNotFound`: it did not exist).
    #[schema(example = "deleted")]
    pub outcome: &'static str,
}

/// `DELETE /api/v1/apply` answer.
#[derive(Serialize, ToSchema)]
pub struct DeleteBatchResponse {
    /// Store index after the delete.
    pub index: u64,
    /// One entry per object, in the order they were deleted (children before parents).
    pub items: Vec<DeletedItem>,
}

/// Why a batch delete refuses a Host document.
const HOST_NOT_IN_BATCH: &str = "a host is removed on its own, with DELETE /api/v1/hosts/{host} (clusterclaw delete host NAME), which also stops accepting its agent; a batch deletes tenants, projects, instances, config templates and secrets";

/// The identity of document `i` of a batch delete: its kind and `metadata` names; nothing else
/// of the document is read.
fn delete_key(i: usize, doc: &Value) -> Result<ObjectKey, Vec<FieldProblem>> {
    let item = format!("items[{i}]");
    let text = |pointer: &str| doc.pointer(pointer).and_then(Value::as_str);
    let Some(kind) = text("/kind").and_then(Kind::from_manifest) else {
        let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        return Err(vec![FieldProblem::new(
            format!("{item}.kind"),
            format!("expected one of {}", kinds.join(", ")),
        )]);
    };
    if kind == Kind::Host {
        return Err(vec![FieldProblem::new(
            format!("{item}.kind"),
            HOST_NOT_IN_BATCH,
        )]);
    }
    let mut problems = Vec::new();
    let mut name_at = |field: &str, required: bool| -> String {
        match text(&format!("/metadata/{field}")) {
            Some(v) => {
                if let Err(e) = validate_dns_label(v) {
                    problems.push(FieldProblem::new(format!("{item}.metadata.{field}"), e));
                }
                v.to_string()
            }
            None if required => {
                problems.push(FieldProblem::new(
                    format!("{item}.metadata.{field}"),
                    format!("required for a {kind}"),
                ));
                String::new()
            }
            None => String::new(),
        }
    };
    let name = name_at("name", true);
    let key = match kind {
        Kind::Tenant | Kind::Host | Kind::ConfigTemplate => ObjectKey::cluster(kind, name),
        Kind::Project => ObjectKey::project(name_at("tenant", true), name),
        Kind::Secret => {
            let tenant = name_at("tenant", true);
            ObjectKey {
                kind,
                tenant,
                project: name_at("project", false),
                name,
            }
        }
        Kind::OpenClawInstance => {
            let tenant = name_at("tenant", true);
            ObjectKey::instance(tenant, name_at("project", true), name)
        }
        Kind::Rollout => ObjectKey {
            kind,
            tenant: name_at("tenant", false),
            project: String::new(),
            name,
        },
    };
    if problems.is_empty() {
        Ok(key)
    } else {
        Err(problems)
    }
}

/// Deletes the objects a batch names, all or nothing, children before parents.
#[utoipa::path(delete, path = "/api/v1/apply", tag = "objects",
    params(("dryRun" = Option<bool>, Query, description = "Check and report without deleting"),
        ("ignoreNotFound" = Option<bool>, Query, description = "An object that does not exist is reported as notFound instead of refusing the batch")),
    request_body(description = "The documents `POST /api/v1/apply` takes (`{\"items\":[...]}` as JSON, or YAML documents); only `kind` and `metadata` name, tenant and project are read",
        content((ApplyRequest = "application/json"), (String = "application/yaml"))),
    responses(
        (status = 200, description = "What happened to each object, in the order they were deleted", body = DeleteBatchResponse,
            headers(("X-Clusterclaw-Index" = u64, description = "Store index after the delete"))),
        (status = 400, description = "The body is not JSON/YAML", body = ErrorBody),
        (status = 403, description = "A document names an object the caller may not delete; details name them", body = ErrorBody),
        (status = 404, description = "An object does not exist (without ignoreNotFound)", body = ErrorBody),
        (status = 409, description = "An object still has children the batch does not delete, or is in use", body = ErrorBody),
        (status = 422, description = "A document names no valid object, or a host (removed on its own); details name items[i].field", body = ErrorBody),
    ))]
pub async fn delete_batch(
    state: Ctx,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let params = query::parse(raw.as_deref(), &["dryRun", "ignoreNotFound"])?;
    let dry_run = params.bool("dryRun")?;
    let ignore_not_found = params.bool("ignoreNotFound")?;
    let (bytes, format) = body::read(&headers, body, APPLY_BODY_LIMIT).await?;
    let docs = body::apply_documents(&bytes, format)?;
    drop(bytes);
    let (mut invalid, mut denials) = (Vec::new(), Vec::new());
    // (request position, key), each object once.
    let mut batch: Vec<(usize, ObjectKey)> = Vec::with_capacity(docs.len());
    let mut seen = std::collections::HashSet::new();
    for (i, doc) in docs.iter().enumerate() {
        match delete_key(i, doc) {
            Ok(key) => match rbac::check(
                &state.caller().principal,
                rbac::Res::of_object(key.kind, Some(&key.tenant), Some(&key.project)),
                rbac::Verb::Delete,
            ) {
                Ok(_) if seen.insert(key.clone()) => batch.push((i, key)),
                Ok(_) => {}
                Err(denied) => {
                    denials.push(FieldProblem::new(format!("items[{i}].kind"), denied.0))
                }
            },
            Err(problems) => invalid.extend(problems),
        }
    }
    drop(docs);
    if !denials.is_empty() {
        return Err(documents_refused(denials, "delete", "deleted"));
    }
    if !invalid.is_empty() {
        let mut e = ApiError::invalid(invalid);
        e.message.push_str("; nothing was deleted");
        return Err(e);
    }
    // Children before parents.
    batch.sort_by_key(|(_, key)| std::cmp::Reverse(key.kind.apply_order()));
    let (positions, keys): (Vec<usize>, Vec<ObjectKey>) = batch.into_iter().unzip();
    let (summary, keys) = state
        .run(move |store| {
            match store.delete_batch(&keys, ignore_not_found, dry_run) {
                Ok(summary) => Ok((summary, keys)),
                // Name the document as the request ordered it.
                Err(StoreError::InBatch { index, source }) => {
                    let mut e = ApiError::from(*source);
                    e.message = format!("{}; nothing was deleted", e.message.trim_end_matches('.'));
                    Err(e.in_item(positions[index]))
                }
                Err(e) => Err(e.into()),
            }
        })
        .await?;
    let mut items = Vec::with_capacity(keys.len());
    for (key, deleted) in keys.into_iter().zip(summary.deleted) {
        items.push(DeletedItem {
            kind: key.kind,
            name: key.name,
            tenant: Some(key.tenant).filter(|t| !t.is_empty()),
            project: Some(key.project).filter(|p| !p.is_empty()),
            outcome: if deleted { "deleted" } else { "notFound" },
        });
    }
    let deleted = items.iter().filter(|i| i.outcome == "deleted").count();
    let tenants: std::collections::BTreeSet<&str> = items
        .iter()
        .filter_map(|i| match i.kind {
            Kind::Tenant => Some(i.name.as_str()),
            _ => i.tenant.as_deref(),
        })
        .collect();
    let tenant = match tenants.len() {
        1 => tenants.into_iter().next().map(str::to_string),
        _ => None,
    };
    let note = AuditNote {
        action: if dry_run { "delete.dry-run" } else { "delete" },
        object: Some(crate::audit::AuditObject {
            kind: "Batch".into(),
            tenant,
            project: None,
            name: format!(
                "{} documents: {deleted} deleted, {} not found",
                items.len(),
                items.len() - deleted
            ),
        }),
        generation_before: None,
        generation_after: None,
    };
    let response = DeleteBatchResponse {
        index: summary.index,
        items,
    };
    let text = serde_json::to_string(&response).map_err(ApiError::internal)?;
    Ok(noted(
        json_response(StatusCode::OK, text, summary.index),
        note,
    ))
}

// ---- tenants ---------------------------------------------------------------------------

fn tenant(name: Option<String>) -> Target {
    Target {
        kind: Kind::Tenant,
        tenant: None,
        project: None,
        name,
    }
}

fn project(tenant: String, name: Option<String>) -> Target {
    Target {
        kind: Kind::Project,
        tenant: Some(tenant),
        project: None,
        name,
    }
}

fn instance(tenant: String, project: String, name: Option<String>) -> Target {
    Target {
        kind: Kind::OpenClawInstance,
        tenant: Some(tenant),
        project: Some(project),
        name,
    }
}

/// Lists tenants.
#[utoipa::path(get, path = "/api/v1/tenants", tag = "tenants",
    params(("labelSelector" = Option<String>, Query, description = "k=v,k!=v,k,!k")),
    responses((status = 200, description = "Tenants by name", body = TenantList,
        headers(("X-Clusterclaw-Index" = u64, description = "Store index the list was read at")))))]
pub async fn list_tenants(state: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    list(
        state,
        raw,
        &["labelSelector"],
        ListFilter::all(Kind::Tenant),
        None,
    )
    .await
}

/// Creates a tenant.
#[utoipa::path(post, path = "/api/v1/tenants", tag = "tenants", request_body = Tenant,
    responses(
        (status = 201, description = "Created", body = Tenant),
        (status = 409, description = "AlreadyExists", body = ErrorBody),
        (status = 422, description = "Invalid", body = ErrorBody),
    ))]
pub async fn create_tenant(
    state: Ctx,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    create(state, raw, headers, body, tenant(None)).await
}

/// Reads a tenant.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path)),
    responses((status = 200, description = "The tenant", body = Tenant), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn get_tenant(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &name)])?;
    get_one(state, raw, ObjectKey::cluster(Kind::Tenant, name)).await
}

/// Creates or updates a tenant.
#[utoipa::path(put, path = "/api/v1/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path)), request_body = Tenant,
    responses(
        (status = 200, description = "Configured or unchanged", body = Tenant,
            headers(("X-Clusterclaw-Outcome" = String, description = "configured or unchanged"))),
        (status = 201, description = "Created", body = Tenant,
            headers(("X-Clusterclaw-Outcome" = String, description = "created"))),
        (status = 409, description = "Stale resourceVersion", body = ErrorBody),
        (status = 422, description = "Invalid", body = ErrorBody),
    ))]
pub async fn put_tenant(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    put_one(state, raw, headers, body, tenant(Some(name))).await
}

/// Deletes a tenant that has no projects left.
#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path), ("resourceVersion" = Option<u64>, Query, description = "Precondition")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "NotFound", body = ErrorBody),
        (status = 409, description = "The tenant still has projects, or a stale resourceVersion", body = ErrorBody),
    ))]
pub async fn delete_tenant(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &name)])?;
    delete_one(state, raw, ObjectKey::cluster(Kind::Tenant, name)).await
}

// ---- projects --------------------------------------------------------------------------

/// Lists projects of every tenant, or of one.
#[utoipa::path(get, path = "/api/v1/projects", tag = "projects",
    params(("tenant" = Option<String>, Query), ("labelSelector" = Option<String>, Query, description = "k=v,k!=v,k,!k")),
    responses((status = 200, description = "Projects by tenant and name", body = ProjectList)))]
pub async fn list_projects(state: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    list(
        state,
        raw,
        &["tenant", "labelSelector"],
        ListFilter::all(Kind::Project),
        None,
    )
    .await
}

/// Lists the projects of a tenant.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/projects", tag = "projects",
    params(("tenant" = String, Path), ("labelSelector" = Option<String>, Query, description = "k=v,k!=v,k,!k")),
    responses((status = 200, description = "Projects by name", body = ProjectList),
        (status = 404, description = "No such tenant", body = ErrorBody)))]
pub async fn list_tenant_projects(
    state: Ctx,
    P(tenant): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant)])?;
    let filter = ListFilter {
        tenant: Some(tenant.clone()),
        ..ListFilter::all(Kind::Project)
    };
    list(
        state,
        raw,
        &["labelSelector"],
        filter,
        Some(ObjectKey::cluster(Kind::Tenant, tenant)),
    )
    .await
}

/// Creates a project in a tenant.
#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/projects", tag = "projects",
    params(("tenant" = String, Path)), request_body = Project,
    responses(
        (status = 201, description = "Created", body = Project),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 409, description = "AlreadyExists", body = ErrorBody),
        (status = 422, description = "Invalid", body = ErrorBody),
    ))]
pub async fn create_project(
    state: Ctx,
    P(tenant): P<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    create(state, raw, headers, body, project(tenant, None)).await
}

/// Reads a project.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/projects/{project}", tag = "projects",
    params(("tenant" = String, Path), ("project" = String, Path)),
    responses((status = 200, description = "The project", body = Project), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn get_project(
    state: Ctx,
    P((tenant, name)): P<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("project", &name)])?;
    get_one(state, raw, ObjectKey::project(tenant, name)).await
}

/// Creates or updates a project.
#[utoipa::path(put, path = "/api/v1/tenants/{tenant}/projects/{project}", tag = "projects",
    params(("tenant" = String, Path), ("project" = String, Path)), request_body = Project,
    responses(
        (status = 200, description = "Configured or unchanged", body = Project,
            headers(("X-Clusterclaw-Outcome" = String, description = "configured or unchanged"))),
        (status = 201, description = "Created", body = Project,
            headers(("X-Clusterclaw-Outcome" = String, description = "created"))),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 409, description = "Stale resourceVersion", body = ErrorBody),
        (status = 422, description = "Invalid", body = ErrorBody),
    ))]
pub async fn put_project(
    state: Ctx,
    P((tenant, name)): P<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    put_one(state, raw, headers, body, project(tenant, Some(name))).await
}

/// Deletes a project that has no instances left.
#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}/projects/{project}", tag = "projects",
    params(("tenant" = String, Path), ("project" = String, Path), ("resourceVersion" = Option<u64>, Query, description = "Precondition")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "NotFound", body = ErrorBody),
        (status = 409, description = "The project still has instances, or a stale resourceVersion", body = ErrorBody),
    ))]
pub async fn delete_project(
    state: Ctx,
    P((tenant, name)): P<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("project", &name)])?;
    delete_one(state, raw, ObjectKey::project(tenant, name)).await
}

// ---- instances -------------------------------------------------------------------------

/// Lists instances, optionally of one tenant and project.
#[utoipa::path(get, path = "/api/v1/instances", tag = "instances",
    params(("tenant" = Option<String>, Query), ("project" = Option<String>, Query),
        ("labelSelector" = Option<String>, Query, description = "k=v,k!=v,k,!k")),
    responses((status = 200, description = "Instances by tenant, project and name", body = InstanceList)))]
pub async fn list_instances(state: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    list(
        state,
        raw,
        &["tenant", "project", "labelSelector"],
        ListFilter::all(Kind::OpenClawInstance),
        None,
    )
    .await
}

/// Lists the instances of a project.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/projects/{project}/instances", tag = "instances",
    params(("tenant" = String, Path), ("project" = String, Path), ("labelSelector" = Option<String>, Query, description = "k=v,k!=v,k,!k")),
    responses((status = 200, description = "Instances by name", body = InstanceList),
        (status = 404, description = "No such project", body = ErrorBody)))]
pub async fn list_project_instances(
    state: Ctx,
    P((tenant, project)): P<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("project", &project)])?;
    let filter = ListFilter {
        tenant: Some(tenant.clone()),
        project: Some(project.clone()),
        ..ListFilter::all(Kind::OpenClawInstance)
    };
    list(
        state,
        raw,
        &["labelSelector"],
        filter,
        Some(ObjectKey::project(tenant, project)),
    )
    .await
}

/// Creates an instance in a project.
#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/projects/{project}/instances", tag = "instances",
    params(("tenant" = String, Path), ("project" = String, Path)), request_body = OpenClawInstance,
    responses(
        (status = 201, description = "Created", body = OpenClawInstance),
        (status = 404, description = "No such tenant or project", body = ErrorBody),
        (status = 409, description = "AlreadyExists", body = ErrorBody),
        (status = 422, description = "Invalid", body = ErrorBody),
    ))]
pub async fn create_instance(
    state: Ctx,
    P((tenant, project)): P<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    create(state, raw, headers, body, instance(tenant, project, None)).await
}

/// Reads an instance, with its status.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}", tag = "instances",
    params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "The instance", body = OpenClawInstance), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn get_instance(
    state: Ctx,
    P((tenant, project, name)): P<(String, String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("project", &project), ("name", &name)])?;
    get_one(state, raw, ObjectKey::instance(tenant, project, name)).await
}

/// Creates or updates an instance.
#[utoipa::path(put, path = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}", tag = "instances",
    params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path)), request_body = OpenClawInstance,
    responses(
        (status = 200, description = "Configured or unchanged", body = OpenClawInstance,
            headers(("X-Clusterclaw-Outcome" = String, description = "configured or unchanged"))),
        (status = 201, description = "Created", body = OpenClawInstance,
            headers(("X-Clusterclaw-Outcome" = String, description = "created"))),
        (status = 404, description = "No such tenant or project", body = ErrorBody),
        (status = 409, description = "Stale resourceVersion", body = ErrorBody),
        (status = 422, description = "Invalid", body = ErrorBody),
    ))]
pub async fn put_instance(
    state: Ctx,
    P((tenant, project, name)): P<(String, String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    put_one(
        state,
        raw,
        headers,
        body,
        instance(tenant, project, Some(name)),
    )
    .await
}

/// Deletes an instance.
#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}", tag = "instances",
    params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path),
        ("resourceVersion" = Option<u64>, Query, description = "Precondition")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "NotFound", body = ErrorBody),
        (status = 409, description = "Stale resourceVersion", body = ErrorBody),
    ))]
pub async fn delete_instance(
    state: Ctx,
    P((tenant, project, name)): P<(String, String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("project", &project), ("name", &name)])?;
    delete_one(state, raw, ObjectKey::instance(tenant, project, name)).await
}

/// Sets the number of replicas of an instance.
#[utoipa::path(put, path = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/scale", tag = "instances",
    params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path)), request_body = ScaleRequest,
    responses(
        (status = 200, description = "The instance after scaling", body = OpenClawInstance,
            headers(("X-Clusterclaw-Outcome" = String, description = "configured or unchanged"))),
        (status = 404, description = "NotFound", body = ErrorBody),
        (status = 422, description = "Replicas out of range", body = ErrorBody),
    ))]
pub async fn scale_instance(
    state: Ctx,
    P((tenant, project, name)): P<(String, String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    query::parse(raw.as_deref(), &[])?;
    let (bytes, format) = body::read(&headers, body, BODY_LIMIT).await?;
    let value = body::one_document(&bytes, format)?;
    let request: ScaleRequest = decode_typed(value).map_err(|p| ApiError::invalid(vec![p]))?;
    if !(0..=MAX_REPLICAS).contains(&request.replicas) {
        return Err(ApiError::invalid(vec![FieldProblem::new(
            "replicas",
            format!(
                "{} is out of range; replicas must be between 0 and {MAX_REPLICAS}",
                request.replicas
            ),
        )]));
    }
    let key = ObjectKey::instance(tenant, project, name);
    let (index, outcome, object, before) = state
        .run(move |store| scale(store, &key, request.replicas))
        .await?;
    let note = AuditNote::object("scale", &object.key).generations(before, Some(object.generation));
    Ok(noted(
        with_outcome(json_response(StatusCode::OK, object.json, index), outcome),
        note,
    ))
}

/// Read, change, write with the read resourceVersion as precondition; retried when another
/// writer got in between.
fn scale(store: &Scoped<'_>, key: &ObjectKey, replicas: i64) -> Result<Written, ApiError> {
    for _ in 0..SCALE_ATTEMPTS {
        let Some(current) = store.get(key)? else {
            return Err(StoreError::NotFound(key.clone()).into());
        };
        let mut resource = current.resource()?;
        match &mut resource {
            Resource::OpenClawInstance(i) => i.spec.replicas = replicas,
            _ => {
                return Err(ApiError::internal(format!("{key} decoded as another kind")));
            }
        }
        resource.metadata_mut().resource_version = Some(current.resource_version);
        let problems = validate_object(&resource);
        if !problems.is_empty() {
            // Name the body's field where the problem is the one this request changed.
            let problems = problems
                .into_iter()
                .map(|mut p| {
                    if p.field == "spec.replicas" {
                        p.field = "replicas".into();
                    }
                    p
                })
                .collect();
            return Err(ApiError::invalid(problems));
        }
        match store
            .write(&[(resource, WriteMode::Update)], false)
            .map_err(single)
        {
            Err(StoreError::Conflict { .. }) => continue,
            other => return written(other?),
        }
    }
    Err(ApiError::new(
        ErrorCode::Conflict,
        format!(
            "{key} kept changing while it was being scaled ({SCALE_ATTEMPTS} attempts); try again"
        ),
    ))
}

// ---- hosts -----------------------------------------------------------------------------

/// Lists hosts.
#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts",
    params(("labelSelector" = Option<String>, Query, description = "k=v,k!=v,k,!k")),
    responses((status = 200, description = "Hosts by name", body = HostList)))]
pub async fn list_hosts(state: Ctx, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    list(
        state,
        raw,
        &["labelSelector"],
        ListFilter::all(Kind::Host),
        None,
    )
    .await
}

/// Reads a host.
#[utoipa::path(get, path = "/api/v1/hosts/{host}", tag = "hosts",
    params(("host" = String, Path)),
    responses((status = 200, description = "The host", body = Host), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn get_host(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("host", &name)])?;
    get_one(state, raw, ObjectKey::cluster(Kind::Host, name)).await
}

/// Hosts are written by their agents; a user's write is refused.
#[utoipa::path(put, path = "/api/v1/hosts/{host}", tag = "hosts",
    params(("host" = String, Path)),
    responses((status = 403, description = "Host objects are read-only to users", body = ErrorBody)))]
pub async fn put_host() -> ApiError {
    ApiError::new(ErrorCode::Forbidden, HOST_READ_ONLY)
}

/// Deletes a host; its agent's certificate is no longer accepted.
#[utoipa::path(delete, path = "/api/v1/hosts/{host}", tag = "hosts",
    params(("host" = String, Path), ("resourceVersion" = Option<u64>, Query, description = "Precondition")),
    responses((status = 200, description = "Deleted", body = Deleted), (status = 404, description = "NotFound", body = ErrorBody)))]
pub async fn delete_host(
    state: Ctx,
    P(name): P<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("host", &name)])?;
    let reports = state.reports().clone();
    let store = state.state.inner.store.clone();
    let response = delete_one(state, raw, ObjectKey::cluster(Kind::Host, name.clone())).await?;
    reports.forget(&name);
    let forgotten = tokio::task::spawn_blocking(move || {
        store
            .forget_heartbeat(&name)
            .and_then(|()| store.forget_host_volumes(&name))
    })
    .await;
    if let Ok(Err(e)) = forgotten {
        tracing::warn!(error = %e, "the deleted host's heartbeat or volumes could not be dropped");
    }
    Ok(response)
}

/// Cordons a host: the scheduler places no new replicas on it; the replicas it runs stay.
/// Idempotent. Status reports and enrollment never clear it; only `uncordon` does.
#[utoipa::path(post, path = "/api/v1/hosts/{host}/cordon", tag = "hosts",
    params(("host" = String, Path)),
    responses((status = 200, description = "The host, with spec.unschedulable true", body = Host),
        (status = 404, description = "No such host", body = ErrorBody)))]
pub async fn cordon_host(state: Ctx, P(name): P<String>) -> Result<Response, ApiError> {
    set_unschedulable(state, name, true).await
}

/// Uncordons a host: the scheduler may place replicas on it again. Idempotent.
#[utoipa::path(post, path = "/api/v1/hosts/{host}/uncordon", tag = "hosts",
    params(("host" = String, Path)),
    responses((status = 200, description = "The host, with spec.unschedulable false", body = Host),
        (status = 404, description = "No such host", body = ErrorBody)))]
pub async fn uncordon_host(state: Ctx, P(name): P<String>) -> Result<Response, ApiError> {
    set_unschedulable(state, name, false).await
}

async fn set_unschedulable(
    state: Ctx,
    name: String,
    unschedulable: bool,
) -> Result<Response, ApiError> {
    check_path_names(&[("host", &name)])?;
    let key = ObjectKey::cluster(Kind::Host, name.clone());
    let note = AuditNote::object(
        if unschedulable {
            "host.cordon"
        } else {
            "host.uncordon"
        },
        &key,
    );
    let (index, text) = state
        .run(move |store| {
            let Some(cluster) = store.cluster_store() else {
                return Err(not_found_host(&name));
            };
            let mut found = false;
            cluster.update(&key, &mut |r| {
                let Resource::Host(h) = r else { return false };
                found = true;
                if h.spec.unschedulable == unschedulable {
                    return false;
                }
                h.spec.unschedulable = unschedulable;
                true
            })?;
            if !found {
                return Err(not_found_host(&name));
            }
            let (index, object) = match cluster.get_at(&key)? {
                (index, Some(o)) => (index, o),
                (_, None) => return Err(not_found_host(&name)),
            };
            let seen = cluster.host_heartbeats()?;
            let text = crate::controllers::hosts::aged_json(
                &object,
                &seen,
                crate::controllers::hosts::now_ms(),
            );
            Ok((index, text))
        })
        .await?;
    let mut resp = json_response(StatusCode::OK, text, index);
    resp.extensions_mut().insert(note);
    Ok(resp)
}

pub(super) fn not_found_host(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("host {name:?} not found; `clusterclaw get hosts` lists the enrolled hosts"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn list_bodies_are_valid_json_across_chunks() {
        /// Everything a writer sent, joined.
        fn body(items: &[String], index: u64) -> (usize, Value) {
            let (tx, mut rx) = mpsc::channel(1024);
            let mut w = ChunkWriter::new(tx);
            for j in items {
                assert!(w.item(index, j.as_bytes()));
            }
            w.finish(index);
            let (mut chunks, mut all) = (0, Vec::new());
            while let Ok(chunk) = rx.try_recv() {
                chunks += 1;
                all.extend_from_slice(&chunk.unwrap());
            }
            (chunks, serde_json::from_slice(&all).unwrap())
        }
        let o = |name: &str| json!({"metadata": {"name": name}}).to_string();
        let (_, v) = body(&[o("a"), o("b")], 7);
        assert_eq!(
            v,
            json!({"index": 7, "items": [{"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}]})
        );
        assert_eq!(body(&[], 0).1, json!({"index": 0, "items": []}));
        // Big enough to need several chunks: still one valid document, every item once.
        let many: Vec<String> = (0..3000)
            .map(|i| o(&format!("bot-{i}-{}", "x".repeat(40))))
            .collect();
        let (chunks, v) = body(&many, 9);
        assert!(chunks > 2, "{chunks} chunks");
        let items = v["items"].as_array().unwrap();
        assert_eq!(items.len(), 3000);
        assert_eq!(
            items[2999]["metadata"]["name"],
            json!(format!("bot-2999-{}", "x".repeat(40)))
        );
    }

    #[test]
    fn a_gone_client_stops_the_list() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut w = ChunkWriter::new(tx);
        let big = "x".repeat(LIST_CHUNK);
        assert!(!w.item(1, big.as_bytes()));
    }

    #[test]
    fn path_binding_fills_in_and_refuses_contradictions() {
        let mut v = json!({"spec": {}});
        bind_to_path(&mut v, &project("acme".into(), Some("helpdesk".into()))).unwrap();
        assert_eq!(
            v,
            json!({"spec": {}, "apiVersion": API_VERSION, "kind": "Project", "metadata": {"name": "helpdesk", "tenant": "acme"}})
        );
        let mut v = json!({"kind": "Tenant", "metadata": {"name": "other"}});
        let e = bind_to_path(&mut v, &project("acme".into(), Some("helpdesk".into()))).unwrap_err();
        let fields: Vec<_> = e.details.iter().map(|d| d.field.as_str()).collect();
        assert_eq!(fields, ["kind", "metadata.name"]);
        let mut v = json!({"kind": "Host"});
        assert_eq!(
            bind_to_path(&mut v, &tenant(None)).unwrap_err().code,
            ErrorCode::Forbidden
        );
    }
}
