//! The console's forms: each calls the API handler that does the same thing, with the same
//! caller, so it is authorized, validated and audited exactly as through `/api/v1`. Scale,
//! delete and drain first answer a page that names the object and asks to confirm.

use askama::Template;
use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::RawQuery;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::gate::redirect;
use super::pages::{Chrome, error_page, html, json_headers};
use super::session::{SessionInfo, form_fields};
use super::views::instance_href;
use crate::api::{Ctx, P};

#[derive(Template)]
#[template(path = "confirm.html")]
struct ConfirmPage {
    c: Chrome,
    /// What will happen, naming the object.
    question: String,
    action: String,
    /// Hidden fields to post again.
    fields: Vec<(String, String)>,
    button: String,
    back: String,
}

fn field(body: &[u8], name: &str) -> Option<String> {
    form_fields(body)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn confirmed(body: &[u8]) -> bool {
    field(body, "confirm").as_deref() == Some("yes")
}

#[allow(clippy::too_many_arguments)]
fn confirm_page(
    ctx: &Ctx,
    session: &SessionInfo,
    question: String,
    action: String,
    fields: Vec<(String, String)>,
    button: &str,
    back: String,
) -> Response {
    html(&ConfirmPage {
        c: Chrome::new(ctx, session, "Confirm", ""),
        question,
        action,
        fields,
        button: button.into(),
        back,
    })
    .unwrap_or_else(IntoResponse::into_response)
}

/// The API handler's answer: on success, a redirect to `to`; else its error.
fn after(resp: Result<Response, crate::api::ApiError>, to: &str) -> Response {
    match resp {
        Ok(r) if r.status().is_success() => {
            // The handler's audit note rides on the redirect, for the audit log.
            let mut back = redirect(to);
            if let Some(note) = r.extensions().get::<crate::api::AuditNote>() {
                back.extensions_mut().insert(note.clone());
            }
            back
        }
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

type InstancePath = P<(String, String, String)>;

/// `POST .../scale` with `replicas`.
pub async fn scale(
    ctx: Ctx,
    Extension(session): Extension<SessionInfo>,
    P((tenant, project, name)): InstancePath,
    body: Bytes,
) -> Response {
    let href = instance_href(&tenant, &project, &name);
    let raw = field(&body, "replicas").unwrap_or_default();
    let Ok(replicas) = raw.trim().parse::<i64>() else {
        return error_page(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!(
                "replicas: {raw:?} is not a whole number; give the number of replicas wanted, 0 or more"
            ),
        );
    };
    if !confirmed(&body) {
        return confirm_page(
            &ctx,
            &session,
            format!("Scale instance {tenant}/{project}/{name} to {replicas} replicas?"),
            format!("{href}/scale"),
            vec![("replicas".into(), replicas.to_string())],
            &format!("Scale {name} to {replicas}"),
            href,
        );
    }
    let answer = crate::api::objects::scale_instance(
        ctx,
        P((tenant, project, name)),
        RawQuery(None),
        json_headers(),
        Body::from(serde_json::json!({ "replicas": replicas }).to_string()),
    )
    .await;
    after(answer, &href)
}

/// `POST .../delete`.
pub async fn delete(
    ctx: Ctx,
    Extension(session): Extension<SessionInfo>,
    P((tenant, project, name)): InstancePath,
    body: Bytes,
) -> Response {
    let href = instance_href(&tenant, &project, &name);
    if !confirmed(&body) {
        return confirm_page(
            &ctx,
            &session,
            format!(
                "Delete instance {tenant}/{project}/{name}? Its replicas are stopped and removed."
            ),
            format!("{href}/delete"),
            vec![],
            &format!("Delete {name}"),
            href,
        );
    }
    let answer = crate::api::objects::delete_instance(
        ctx,
        P((tenant.clone(), project.clone(), name)),
        RawQuery(None),
    )
    .await;
    after(
        answer,
        &format!("/ui/instances?tenant={tenant}&project={project}"),
    )
}

/// `POST .../rollout/{action}`: pause, resume, promote, abort or undo.
pub async fn rollout(
    ctx: Ctx,
    P((tenant, project, name, action)): P<(String, String, String, String)>,
) -> Response {
    let href = instance_href(&tenant, &project, &name);
    let answer = crate::api::rollout::rollout_action(
        ctx,
        P((tenant, project, name, action)),
        RawQuery(None),
        json_headers(),
        Body::empty(),
    )
    .await;
    after(answer, &href)
}

/// `POST /ui/hosts/{host}/cordon`.
pub async fn cordon(ctx: Ctx, P(host): P<String>) -> Response {
    after(
        crate::api::objects::cordon_host(ctx, P(host)).await,
        "/ui/hosts",
    )
}

/// `POST /ui/hosts/{host}/uncordon`.
pub async fn uncordon(ctx: Ctx, P(host): P<String>) -> Response {
    after(
        crate::api::objects::uncordon_host(ctx, P(host)).await,
        "/ui/hosts",
    )
}

/// `POST /ui/hosts/{host}/drain`.
pub async fn drain(
    ctx: Ctx,
    Extension(session): Extension<SessionInfo>,
    P(host): P<String>,
    body: Bytes,
) -> Response {
    if !confirmed(&body) {
        return confirm_page(
            &ctx,
            &session,
            format!("Drain host {host}? It is cordoned and its replicas move to other hosts."),
            format!("/ui/hosts/{host}/drain"),
            vec![],
            &format!("Drain {host}"),
            "/ui/hosts".into(),
        );
    }
    after(
        crate::api::drain::start_drain(ctx, P(host), RawQuery(None), json_headers(), Body::empty())
            .await,
        "/ui/hosts",
    )
}
