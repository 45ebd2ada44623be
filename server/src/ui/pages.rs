//! The console's pages: each reads through the caller's [`Ctx`] (the same scoped store and
//! the same API handlers as `/api/v1`) and renders a template.

use std::collections::BTreeMap;

use askama::Template;
use axum::Extension;
use axum::body::Body;
use axum::extract::RawQuery;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::session::SessionInfo;
use super::views::{
    self, AuditRow, Bar, EventRow, HostRow, InstanceRow, ReplicaRow, instance_href, text,
};
use crate::api::{ApiError, Ctx, P};
use crate::auth::rbac::{self, Res, Verb};
use crate::model::Kind;
use crate::store::{LabelRequirement, ListFilter};

/// Instances a list page shows at once.
pub const PAGE_SIZE: usize = 100;
/// Warning events the overview shows.
const OVERVIEW_WARNINGS: usize = 20;
/// Rollouts in progress the overview lists.
const OVERVIEW_ROLLOUTS: usize = 50;

/// What every page has around its content: the navigation, who is logged in, the CSRF token
/// of the logout form.
pub struct Chrome {
    pub title: String,
    pub nav: &'static str,
    pub csrf: String,
    pub who: String,
    pub can_hosts: bool,
    pub can_audit: bool,
}

impl Chrome {
    pub fn new(
        ctx: &Ctx,
        session: &SessionInfo,
        title: impl Into<String>,
        nav: &'static str,
    ) -> Self {
        let c = ctx.caller();
        let p = &c.principal;
        let name = if p.token_name.is_empty() {
            &p.token_id
        } else {
            &p.token_name
        };
        let mut who = format!("{name} ({}", c.role.as_str());
        if let Some(t) = c.scope.tenant() {
            who.push_str(&format!(", tenant {t}"));
        }
        if let Some(pr) = c.scope.project() {
            who.push_str(&format!(", project {pr}"));
        }
        who.push(')');
        Chrome {
            title: title.into(),
            nav,
            csrf: session.csrf.clone(),
            who,
            can_hosts: may(ctx, Res::Hosts, Verb::Read),
            can_audit: may(ctx, Res::Audit, Verb::Read),
        }
    }
}

/// Whether the caller may `verb` `res`: the API's own decision ([`rbac`]), so that a page
/// offers only what the API would let it do.
pub fn may(ctx: &Ctx, res: Res, verb: Verb) -> bool {
    let c = ctx.caller();
    rbac::allowed(c.role, &c.scope, res, verb) || rbac::check(&c.principal, res, verb).is_ok()
}

/// A rendered page, never cached, framed by nobody, scripts only from the console.
pub fn html(t: &impl Template) -> Result<Response, ApiError> {
    let body = t.render().map_err(ApiError::internal)?;
    Ok(html_response(body))
}

fn html_response(body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    resp
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: String,
    message: &'a str,
}

/// An HTML page saying what went wrong.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let page = ErrorPage {
        status: status.to_string(),
        message,
    };
    let body = page
        .render()
        .unwrap_or_else(|_| format!("{status}: {message}"));
    let mut resp = html_response(body);
    *resp.status_mut() = status;
    resp
}

/// The JSON body of an API handler's answer; its error (as the API would answer it) when it
/// failed.
pub async fn answer_json(resp: Result<Response, ApiError>) -> Result<Value, Response> {
    let resp = resp.map_err(IntoResponse::into_response)?;
    if !resp.status().is_success() {
        return Err(resp);
    }
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .map_err(|e| ApiError::internal(e).into_response())?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::internal(e).into_response())
}

/// The query's parameters, decoded.
pub fn query_params(raw: Option<&str>) -> BTreeMap<String, String> {
    super::session::form_fields(raw.unwrap_or_default().as_bytes())
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

// ---- overview -------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    c: Chrome,
    hosts: Option<Vec<(String, usize)>>,
    cordoned: usize,
    phases: Vec<(String, usize)>,
    total: usize,
    rollouts: Vec<InstanceRow>,
    /// Instances with an update in progress (more than `rollouts` lists when many).
    rolling: usize,
    warnings: Vec<EventRow>,
    /// Fleet-wide Rollouts not yet done; `None`: the caller may not read them.
    waves: Option<Vec<WaveRow>>,
    index: u64,
}

/// A fleet-wide Rollout as the overview shows it.
pub struct WaveRow {
    /// `name` or `tenant/name`.
    pub name: String,
    pub phase: String,
    /// `2 of 4`.
    pub wave: String,
    pub succeeded: i64,
    pub total: i64,
    pub failed: i64,
    pub message: String,
}

impl WaveRow {
    pub fn of(r: &Value) -> WaveRow {
        let st = &r["status"];
        let counts = &st["counts"];
        let total = [
            "held",
            "progressing",
            "succeeded",
            "failed",
            "superseded",
            "gone",
        ]
        .iter()
        .map(|k| views::num(counts, k))
        .sum();
        let (wave, waves) = (views::num(st, "wave"), views::num(st, "waves"));
        let tenant = text(r, "metadata.tenant");
        let name = text(r, "metadata.name");
        WaveRow {
            name: if tenant.is_empty() {
                name
            } else {
                format!("{tenant}/{name}")
            },
            phase: match text(st, "phase") {
                p if p.is_empty() => "Progressing".into(),
                p => p,
            },
            wave: format!("{} of {waves}", (wave + 1).min(waves.max(1))),
            succeeded: views::num(counts, "succeeded")
                + views::num(counts, "superseded")
                + views::num(counts, "gone"),
            total,
            failed: views::num(counts, "failed"),
            message: text(st, "message"),
        }
    }
}

/// Counts of instances by phase and the rollouts in progress of the caller's scope, from the
/// console's index of instances (caught up with the store first).
pub async fn instance_summary(ctx: &Ctx) -> Result<super::index::Summary, ApiError> {
    let scope = ctx.caller().scope.clone();
    let index = std::sync::Arc::clone(ctx.console_index());
    ctx.run_unscoped(move |store| Ok(index.summary(store, &scope, OVERVIEW_ROLLOUTS)?))
        .await
}

pub async fn overview(
    ctx: Ctx,
    Extension(session): Extension<SessionInfo>,
) -> Result<Response, Response> {
    let super::index::Summary {
        index,
        total,
        phases,
        rollouts,
        rolling,
    } = instance_summary(&ctx)
        .await
        .map_err(IntoResponse::into_response)?;
    let hosts = if may(&ctx, Res::Hosts, Verb::Read) {
        Some(
            ctx.run(|store| {
                let mut phases: BTreeMap<String, usize> = BTreeMap::new();
                let mut cordoned = 0;
                let hosts = store
                    .cluster_store()
                    .map(|s| s.list(&ListFilter::all(Kind::Host)))
                    .transpose()?
                    .unwrap_or_default();
                for h in hosts {
                    let v: Value = serde_json::from_str(&h.json).unwrap_or_default();
                    let phase = text(&v, "status.phase");
                    *phases
                        .entry(if phase.is_empty() {
                            "Unknown".into()
                        } else {
                            phase
                        })
                        .or_default() += 1;
                    if v["spec"]["unschedulable"].as_bool() == Some(true) {
                        cordoned += 1;
                    }
                }
                Ok((phases.into_iter().collect::<Vec<_>>(), cordoned))
            })
            .await
            .map_err(IntoResponse::into_response)?,
        )
    } else {
        None
    };
    let events = answer_json(
        crate::api::events::list_events(ctx.clone(), RawQuery(Some("limit=500".into()))).await,
    )
    .await?;
    let warnings: Vec<EventRow> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .filter(|e| e["type"] == "Warning")
        .take(OVERVIEW_WARNINGS)
        .map(EventRow::of)
        .collect();
    let cluster = ctx.caller().scope == crate::store::Scope::Cluster;
    let waves = if may(
        &ctx,
        if cluster {
            Res::Rollouts
        } else {
            Res::TenantRollouts
        },
        Verb::Read,
    ) {
        let list = answer_json(crate::api::waves::list_rollouts(ctx.clone(), RawQuery(None)).await)
            .await?;
        Some(
            list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(WaveRow::of)
                .filter(|w| w.phase != "Succeeded")
                .collect(),
        )
    } else {
        None
    };
    let (hosts, cordoned) = match hosts {
        Some((h, c)) => (Some(h), c),
        None => (None, 0),
    };
    html(&OverviewPage {
        c: Chrome::new(&ctx, &session, "Overview", "overview"),
        hosts,
        cordoned,
        // In the order of an instance's life, then any other.
        phases: {
            let mut ordered: Vec<(String, usize)> = PHASES
                .iter()
                .map(|p| (p.to_string(), phases.get(*p).copied().unwrap_or_default()))
                .collect();
            ordered.extend(
                phases
                    .into_iter()
                    .filter(|(p, _)| !PHASES.contains(&p.as_str())),
            );
            ordered
        },
        total,
        rollouts,
        rolling,
        warnings,
        waves,
        index,
    })
    .map_err(IntoResponse::into_response)
}

// ---- tenants ---------------------------------------------------------------------------

pub struct ProjectView {
    pub name: String,
    pub bars: Vec<Bar>,
}

pub struct TenantView {
    pub name: String,
    pub display: String,
    pub bars: Vec<Bar>,
    pub projects: Vec<ProjectView>,
}

#[derive(Template)]
#[template(path = "tenants.html")]
struct TenantsPage {
    c: Chrome,
    tenants: Vec<TenantView>,
}

pub async fn tenants(
    ctx: Ctx,
    Extension(session): Extension<SessionInfo>,
) -> Result<Response, Response> {
    let tenants =
        answer_json(crate::api::objects::list_tenants(ctx.clone(), RawQuery(None)).await).await?;
    let projects =
        answer_json(crate::api::objects::list_projects(ctx.clone(), RawQuery(None)).await).await?;
    let mut by_tenant: BTreeMap<String, Vec<ProjectView>> = BTreeMap::new();
    for p in projects["items"].as_array().into_iter().flatten() {
        by_tenant
            .entry(text(p, "metadata.tenant"))
            .or_default()
            .push(ProjectView {
                name: text(p, "metadata.name"),
                bars: views::quota_bars(p),
            });
    }
    let tenants = tenants["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let name = text(t, "metadata.name");
            TenantView {
                display: text(t, "spec.displayName"),
                bars: views::quota_bars(t),
                projects: by_tenant.remove(&name).unwrap_or_default(),
                name,
            }
        })
        .collect();
    html(&TenantsPage {
        c: Chrome::new(&ctx, &session, "Tenants and projects", "tenants"),
        tenants,
    })
    .map_err(IntoResponse::into_response)
}

// ---- instances -------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "instances.html")]
struct InstancesPage {
    c: Chrome,
    tenant: String,
    project: String,
    label: String,
    phase: String,
    rows: Vec<InstanceRow>,
    matched: usize,
    page: usize,
    pages: usize,
    prev: Option<String>,
    next: Option<String>,
    index: u64,
    /// The watch's query (the filters the server can apply).
    watch: String,
    phases: &'static [&'static str],
}

const PHASES: [&str; 5] = ["Pending", "Progressing", "Running", "Degraded", "Failed"];

pub async fn instances(
    ctx: Ctx,
    Extension(session): Extension<SessionInfo>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Response> {
    let q = query_params(raw.as_deref());
    let bad = |m: String| error_page(StatusCode::BAD_REQUEST, &m);
    for (k, _) in q.iter() {
        if !["tenant", "project", "label", "phase", "page"].contains(&k.as_str()) {
            return Err(bad(format!(
                "unknown filter {k:?}; the filters are tenant, project, label, phase and page"
            )));
        }
    }
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let (tenant, project, label, phase) =
        (get("tenant"), get("project"), get("label"), get("phase"));
    for (field, v) in [("tenant", &tenant), ("project", &project)] {
        if !v.is_empty() && crate::model::validate_dns_label(v).is_err() {
            return Err(bad(format!(
                "filter {field}: {v:?} is not a name; names are 1 to 63 lower-case letters, digits and '-'"
            )));
        }
    }
    if !phase.is_empty() && !PHASES.contains(&phase.as_str()) {
        return Err(bad(format!(
            "filter phase: {phase:?} is not a phase; one of {}",
            PHASES.join(", ")
        )));
    }
    let labels: Vec<LabelRequirement> = if label.is_empty() {
        Vec::new()
    } else {
        LabelRequirement::parse_selector(&label).map_err(|e| bad(format!("filter label: {e}")))?
    };
    let page: usize = match q.get("page") {
        None => 1,
        Some(p) => p
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| bad(format!("page: {p:?} is not a page number (1 or more)")))?,
    };
    let mut filter = ListFilter::all(Kind::OpenClawInstance);
    filter.tenant = (!tenant.is_empty()).then(|| tenant.clone());
    filter.project = (!project.is_empty()).then(|| project.clone());
    filter.labels = labels;
    let skip = (page - 1) * PAGE_SIZE;
    let scope = ctx.caller().scope.clone();
    let console_index = std::sync::Arc::clone(ctx.console_index());
    let want_phase = phase.clone();
    let super::index::ListPage {
        index,
        rows,
        matched,
    } = ctx
        .run_unscoped(move |store| {
            Ok(console_index.list(store, &scope, &filter, &want_phase, skip, PAGE_SIZE)?)
        })
        .await
        .map_err(IntoResponse::into_response)?;
    let pages = matched.div_ceil(PAGE_SIZE).max(1);
    let link = |n: usize| {
        let mut parts = vec![];
        for (k, v) in [
            ("tenant", &tenant),
            ("project", &project),
            ("label", &label),
            ("phase", &phase),
        ] {
            if !v.is_empty() {
                parts.push(format!("{k}={}", views::url_encode(v)));
            }
        }
        parts.push(format!("page={n}"));
        format!("/ui/instances?{}", parts.join("&"))
    };
    let mut watch = vec![];
    for (k, v) in [("tenant", &tenant), ("project", &project)] {
        if !v.is_empty() {
            watch.push(format!("{k}={}", views::url_encode(v)));
        }
    }
    if !label.is_empty() {
        watch.push(format!("labelSelector={}", views::url_encode(&label)));
    }
    html(&InstancesPage {
        c: Chrome::new(&ctx, &session, "Instances", "instances"),
        prev: (page > 1).then(|| link(page - 1)),
        next: (page < pages).then(|| link(page + 1)),
        tenant,
        project,
        label,
        phase,
        rows,
        matched,
        page,
        pages,
        index,
        watch: watch.join("&"),
        phases: &PHASES,
    })
    .map_err(IntoResponse::into_response)
}

// ---- one instance ----------------------------------------------------------------------

pub struct RevisionView {
    pub revision: u64,
    pub created: String,
    pub author: String,
    pub message: String,
}

#[derive(Template)]
#[template(path = "instance.html")]
struct InstancePage {
    c: Chrome,
    tenant: String,
    project: String,
    name: String,
    href: String,
    phase: String,
    message: String,
    version: String,
    replicas: i64,
    ready: i64,
    revision: String,
    rows: Vec<ReplicaRow>,
    rollout: Option<RolloutView>,
    config: String,
    revisions: Vec<RevisionView>,
    diff: Option<String>,
    diff_from: String,
    diff_to: String,
    events: Vec<EventRow>,
    /// CPU and memory of each replica over the last hour.
    charts: Vec<super::charts::ReplicaCharts>,
    can_write: bool,
    can_delete: bool,
    index: u64,
}

pub struct RolloutView {
    pub phase: String,
    pub revision: String,
    pub stable: String,
    pub step: String,
    pub updated: i64,
    pub message: String,
    pub paused: bool,
    pub active: bool,
}

pub type InstancePath = P<(String, String, String)>;

pub async fn instance(
    ctx: Ctx,
    Extension(session): Extension<SessionInfo>,
    P((tenant, project, name)): InstancePath,
    RawQuery(raw): RawQuery,
) -> Result<Response, Response> {
    let q = query_params(raw.as_deref());
    let path = || P((tenant.clone(), project.clone(), name.clone()));
    let i =
        answer_json(crate::api::objects::get_instance(ctx.clone(), path(), RawQuery(None)).await)
            .await?;
    let config = answer_json(
        crate::api::configs::effective(ctx.clone(), path(), RawQuery(Some("explain=true".into())))
            .await,
    )
    .await
    .map(|c| text(&c, "text"))
    .unwrap_or_else(|_| "The effective configuration could not be read.".into());
    let history =
        answer_json(crate::api::configs::history(ctx.clone(), path(), RawQuery(None)).await)
            .await
            .unwrap_or_default();
    let revisions: Vec<RevisionView> = history["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| RevisionView {
            revision: r["revision"].as_u64().unwrap_or_default(),
            created: text(r, "createdAt"),
            author: text(r, "author"),
            message: text(r, "message"),
        })
        .collect();
    let (diff_from, diff_to) = (
        q.get("from").cloned().unwrap_or_default(),
        q.get("to").cloned().unwrap_or_default(),
    );
    let diff = if diff_from.is_empty() || diff_to.is_empty() {
        None
    } else {
        let query = format!(
            "from={}&to={}",
            views::url_encode(&diff_from),
            views::url_encode(&diff_to)
        );
        match crate::api::configs::diff(ctx.clone(), path(), RawQuery(Some(query))).await {
            Ok(resp) => {
                let d = answer_json(Ok(resp)).await?;
                let u = text(&d, "unified");
                Some(if u.is_empty() {
                    "The two revisions have the same configuration.".into()
                } else {
                    u
                })
            }
            Err(e) => Some(format!("No diff: {}", e.message)),
        }
    };
    let events = answer_json(
        crate::api::events::list_project_events(
            ctx.clone(),
            P((tenant.clone(), project.clone())),
            RawQuery(Some(format!("for=instance/{name}&limit=50"))),
        )
        .await,
    )
    .await
    .unwrap_or_default();
    let events = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .map(EventRow::of)
        .collect();
    let st = &i["status"];
    let rollout = match &st["rollout"] {
        Value::Null => None,
        r => {
            let phase = text(r, "phase");
            Some(RolloutView {
                active: matches!(phase.as_str(), "Progressing" | "Paused"),
                paused: r["paused"].as_bool().unwrap_or(false),
                revision: text(r, "revision"),
                stable: text(r, "stableRevision"),
                step: text(r, "step"),
                updated: views::num(r, "updatedReplicas"),
                message: text(r, "message"),
                phase,
            })
        }
    };
    let index = ctx.index();
    // The instance was read in the caller's scope above: its replicas' figures are theirs.
    let now = std::time::Instant::now();
    let charts = ctx
        .reports()
        .usage_history(&tenant, &project, &name)
        .iter()
        .map(|h| super::charts::replica_charts(h, now))
        .collect();
    html(&InstancePage {
        c: Chrome::new(
            &ctx,
            &session,
            format!("{tenant}/{project}/{name}"),
            "instances",
        ),
        href: instance_href(&tenant, &project, &name),
        phase: text(st, "phase"),
        message: text(st, "message"),
        version: match text(&i, "spec.version") {
            v if v.is_empty() => text(&i, "spec.image"),
            v => v,
        },
        replicas: views::num(&i, "spec.replicas"),
        ready: views::num(st, "readyReplicas"),
        revision: text(st, "configRevision"),
        rows: st["replicaStatus"]
            .as_array()
            .into_iter()
            .flatten()
            .map(ReplicaRow::of)
            .collect(),
        rollout,
        config,
        revisions,
        diff,
        diff_from,
        diff_to,
        events,
        charts,
        can_write: may(&ctx, Res::Instances, Verb::Write),
        can_delete: may(&ctx, Res::Instances, Verb::Delete),
        index,
        tenant,
        project,
        name,
    })
    .map_err(IntoResponse::into_response)
}

// ---- hosts -----------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "hosts.html")]
struct HostsPage {
    c: Chrome,
    rows: Vec<HostRow>,
    can_schedule: bool,
    index: u64,
}

pub async fn hosts(
    ctx: Ctx,
    Extension(session): Extension<SessionInfo>,
) -> Result<Response, Response> {
    let list =
        answer_json(crate::api::objects::list_hosts(ctx.clone(), RawQuery(None)).await).await?;
    html(&HostsPage {
        c: Chrome::new(&ctx, &session, "Hosts", "hosts"),
        rows: list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(HostRow::of)
            .collect(),
        can_schedule: may(&ctx, Res::HostScheduling, Verb::Write),
        index: list["index"].as_u64().unwrap_or_default(),
    })
    .map_err(IntoResponse::into_response)
}

// ---- audit -----------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    c: Chrome,
    tenant: String,
    since: String,
    action: String,
    rows: Vec<AuditRow>,
}

pub async fn audit(
    ctx: Ctx,
    Extension(session): Extension<SessionInfo>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Response> {
    let q = query_params(raw.as_deref());
    for (k, _) in q.iter() {
        if !["tenant", "since", "action"].contains(&k.as_str()) {
            return Err(error_page(
                StatusCode::BAD_REQUEST,
                &format!("unknown filter {k:?}; the filters are tenant, since and action"),
            ));
        }
    }
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let (tenant, since, action) = (get("tenant"), get("since"), get("action"));
    let mut api_query = vec!["limit=1000".to_string()];
    if !tenant.is_empty() {
        api_query.push(format!("tenant={}", views::url_encode(&tenant)));
    }
    if !since.is_empty() {
        api_query.push(format!("since={}", views::url_encode(&since)));
    }
    let list = answer_json(
        crate::api::audit::list_audit(ctx.clone(), RawQuery(Some(api_query.join("&")))).await,
    )
    .await?;
    let rows = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .map(AuditRow::of)
        .filter(|r| action.is_empty() || r.action.contains(action.as_str()))
        .take(200)
        .collect();
    html(&AuditPage {
        c: Chrome::new(&ctx, &session, "Audit log", "audit"),
        tenant,
        since,
        action,
        rows,
    })
    .map_err(IntoResponse::into_response)
}

// ---- keys ------------------------------------------------------------------------------

/// Headers of a JSON body handed to an API handler.
pub fn json_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h
}
