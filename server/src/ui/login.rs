//! Logging in to the console with an API token (or a single sign-on token the server
//! verifies), and out.

use std::time::{Duration, Instant};

use askama::Template;
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::gate::redirect;
use super::pages::{html, query_params};
use super::session::{
    self, CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, SessionInfo, SessionToken, set_cookie,
};
use crate::api::ApiState;
use crate::auth::rbac;

/// How long the login form's CSRF cookie lasts.
const LOGIN_FORM_LIFETIME: Duration = Duration::from_secs(30 * 60);

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    csrf: String,
    next: String,
    why: String,
    error: String,
}

/// Where a login may send the browser next: a console path, never another site.
fn safe_next(next: Option<&String>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("//") && !n.contains('\\') => n.clone(),
        _ => "/ui/".into(),
    }
}

fn login_form(state: &ApiState, next: String, why: String, error: String) -> Response {
    let csrf = session::random_id();
    let page = LoginPage {
        csrf: csrf.clone(),
        next,
        why,
        error,
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
pub async fn login_page(State(state): State<ApiState>, RawQuery(raw): RawQuery) -> Response {
    let q = query_params(raw.as_deref());
    let why = q.get("why").cloned().unwrap_or_default();
    login_form(&state, safe_next(q.get("next")), why, String::new())
}

/// `POST /ui/login`: checks the form's CSRF token against its cookie, authenticates the token
/// as the API would, and opens a session.
pub async fn log_in(State(state): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
    let fields = session::form_fields(&body);
    let field = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
    let next = safe_next(field("next").as_ref());
    let fail = |status: StatusCode, error: &str| {
        let mut resp = login_form(&state, next.clone(), String::new(), error.to_string());
        *resp.status_mut() = status;
        resp
    };
    let cookie = session::cookie(&headers, LOGIN_COOKIE);
    let sent = field(CSRF_FIELD);
    if !matches!((cookie, &sent), (Some(c), Some(s)) if session::same_secret(c, s)) {
        return fail(
            StatusCode::FORBIDDEN,
            "The login form had expired or did not come from this console; try again.",
        );
    }
    let token = field("token").unwrap_or_default().trim().to_string();
    if token.is_empty() {
        return fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Token: enter an API token (cca_ followed by 40 letters and digits).",
        );
    }
    let token = SessionToken::new(token);
    let principal = match state.authenticate(Some(token.bearer().as_bytes())).await {
        Ok(p) => p,
        Err(e) => {
            return fail(
                StatusCode::UNAUTHORIZED,
                &format!("Token: not accepted: {e}"),
            );
        }
    };
    if let Err(e) = rbac::role_of(&principal).and_then(|r| rbac::scope_of(&principal, r)) {
        return fail(StatusCode::FORBIDDEN, &format!("Token: {}", e.0));
    }
    let info = state.sessions().open(token, Instant::now());
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
    state.sessions().close(&session.id);
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
