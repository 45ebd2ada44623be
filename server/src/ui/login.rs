//! Logging in to the console with an API token (or a single sign-on token the server
//! verifies), and out; the login page offers single sign-on ([`super::sso`]) with every
//! issuer configured for it. Every login, accepted or refused, is audited (never the token).

use std::time::Duration;

use askama::Template;
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::gate::redirect;
use super::pages::{html, query_params};
use super::session::{
    self, CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, SessionInfo, SessionToken, set_cookie,
};
use crate::api::{ApiState, RequestId};
use crate::audit::{AuditEntry, AuditObject, AuditPrincipal, AuditResult};
use crate::auth::{Principal, rbac};

/// How long the login form's CSRF cookie lasts.
const LOGIN_FORM_LIFETIME: Duration = Duration::from_secs(30 * 60);

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    csrf: String,
    next: String,
    why: String,
    error: String,
    /// "Sign in with ..." links: (address, issuer's display name).
    sso: Vec<(String, String)>,
}

/// Where a login may send the browser next: a path of the console on this server, never
/// another site (no scheme, no `//host`, no backslash, no control character, no `..`).
pub(super) fn safe_next(next: Option<&String>) -> String {
    match next {
        Some(n)
            if n.starts_with("/ui/")
                && !n.contains('\\')
                && !n.contains("/../")
                && !n.ends_with("/..")
                && !n
                    .chars()
                    .any(|c| c.is_control() || c == '"' || c == '<' || c == '>') =>
        {
            n.clone()
        }
        _ => "/ui/".into(),
    }
}

/// Where a request came from, for the audit log.
pub struct Origin {
    request_id: String,
    source: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Origin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Origin {
            request_id: parts
                .extensions
                .get::<RequestId>()
                .map(|r| r.0.to_string())
                .unwrap_or_default(),
            source: parts
                .extensions
                .get::<ConnectInfo<std::net::SocketAddr>>()
                .map_or_else(|| "local".to_string(), |c| c.0.to_string()),
        })
    }
}

/// Records a console login (`via` is `token` or `sso:<issuer>`) in the audit log: the
/// principal when known, the source address, the result; never the token.
pub(super) async fn audit_login(
    state: &ApiState,
    origin: &Origin,
    who: Option<&Principal>,
    via: &str,
    result: AuditResult,
) {
    let Some(writer) = state.audit_writer() else {
        return;
    };
    let principal = who.map_or_else(AuditPrincipal::anonymous, AuditPrincipal::from);
    let entry = AuditEntry::now(principal, "login", result)
        .with_request(origin.request_id.clone(), origin.source.clone())
        .with_object(AuditObject {
            kind: "ConsoleSession".into(),
            tenant: None,
            project: None,
            name: via.to_string(),
        })
        .with_tenant(who.and_then(|p| p.tenant.clone()));
    if let Err(e) = writer.record(entry).await {
        tracing::error!(error = %e, "the audit record of a console login could not be written");
    }
}

/// The login form's CSRF secret: the one this browser already holds in its login cookie when
/// that is one the console made (64 lowercase hex digits), else a new one. Every login form open in a
/// browser carries the same secret, so that one loaded later (in another tab, or a live page's
/// request sent to the login after its session ended) does not void a form already shown.
fn login_secret(headers: &HeaderMap) -> String {
    match session::cookie(headers, LOGIN_COOKIE) {
        Some(c) if session::well_formed(c) => c.to_string(),
        _ => session::random_id(),
    }
}

fn login_form(
    state: &ApiState,
    headers: &HeaderMap,
    next: String,
    why: String,
    error: String,
) -> Response {
    let csrf = login_secret(headers);
    let sso = state
        .oidc()
        .map(|v| {
            v.console_logins()
                .map(|(i, l)| {
                    (
                        format!(
                            "/ui/login/oidc?issuer={i}&next={}",
                            super::views::url_encode(&next)
                        ),
                        l.display_name.clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let page = LoginPage {
        csrf: csrf.clone(),
        next,
        why,
        error,
        sso,
    };
    let mut resp = html(&page).unwrap_or_else(IntoResponse::into_response);
    resp.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(
            LOGIN_COOKIE,
            &csrf,
            Some(LOGIN_FORM_LIFETIME),
            state.secure_cookies(),
        ),
    );
    resp
}

/// `GET /ui/login`: the form.
pub async fn login_page(
    State(state): State<ApiState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = query_params(raw.as_deref());
    let why = q.get("why").cloned().unwrap_or_default();
    login_form(
        &state,
        &headers,
        safe_next(q.get("next")),
        why,
        String::new(),
    )
}

/// `POST /ui/login`: checks the form's CSRF token against its cookie, authenticates the token
/// as the API would, and opens a session.
pub async fn log_in(
    State(state): State<ApiState>,
    origin: Origin,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fields = session::form_fields(&body);
    let field = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
    let next = safe_next(field("next").as_ref());
    let fail = async |status: StatusCode, error: &str| {
        audit_login(
            &state,
            &origin,
            None,
            "token",
            AuditResult::denied(status.as_u16(), error),
        )
        .await;
        let mut resp = login_form(
            &state,
            &headers,
            next.clone(),
            String::new(),
            error.to_string(),
        );
        *resp.status_mut() = status;
        resp
    };
    let cookie = session::cookie(&headers, LOGIN_COOKIE);
    let sent = field(CSRF_FIELD);
    if !matches!((cookie, &sent), (Some(c), Some(s)) if session::same_secret(c, s)) {
        return fail(
            StatusCode::FORBIDDEN,
            "The login form had expired or did not come from this console; try again.",
        )
        .await;
    }
    let token = field("token").unwrap_or_default().trim().to_string();
    if token.is_empty() {
        return fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Token: enter an API token (cca_ followed by 40 letters and digits).",
        )
        .await;
    }
    let token = SessionToken::new(token);
    let principal = match state.authenticate(Some(token.bearer().as_bytes())).await {
        Ok(p) => p,
        Err(e) => {
            return fail(
                StatusCode::UNAUTHORIZED,
                &format!("Token: not accepted: {e}"),
            )
            .await;
        }
    };
    if let Err(e) = rbac::role_of(&principal).and_then(|r| rbac::scope_of(&principal, r)) {
        audit_login(
            &state,
            &origin,
            Some(&principal),
            "token",
            AuditResult::denied(403, e.0.clone()),
        )
        .await;
        let mut resp = login_form(
            &state,
            &headers,
            next.clone(),
            String::new(),
            format!("Token: {}", e.0),
        );
        *resp.status_mut() = StatusCode::FORBIDDEN;
        return resp;
    }
    let info = match state
        .sessions()
        .open(token, &principal.token_id, None)
        .await
    {
        Ok(info) => info,
        Err(e) => {
            tracing::error!(error = %e, "a console session could not be stored");
            return fail(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("The session could not be stored ({e}); try again in a moment."),
            )
            .await;
        }
    };
    audit_login(
        &state,
        &origin,
        Some(&principal),
        "token",
        AuditResult::ok(303),
    )
    .await;
    tracing::info!(principal = %principal.token_id, "console session opened");
    let mut resp = redirect(&next);
    let secure = state.secure_cookies();
    let h = resp.headers_mut();
    h.append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, &info.id, None, secure),
    );
    h.append(
        header::SET_COOKIE,
        set_cookie(LOGIN_COOKIE, "", Some(Duration::ZERO), secure),
    );
    resp
}

/// `POST /ui/logout`: ends the session (its CSRF token was checked on the way in).
pub async fn log_out(
    State(state): State<ApiState>,
    Extension(session): Extension<SessionInfo>,
) -> Response {
    if let Err(e) = state.sessions().close(&session.id).await {
        tracing::error!(error = %e, "a console session could not be removed from the store");
        return super::gate::refused(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "You were not logged out: the session could not be removed from the store ({e}); try again in a moment."
            ),
        );
    }
    let mut resp = redirect("/ui/login");
    resp.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(
            SESSION_COOKIE,
            "",
            Some(Duration::ZERO),
            state.secure_cookies(),
        ),
    );
    resp
}
