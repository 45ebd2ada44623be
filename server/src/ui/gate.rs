//! The console's side of the API's authentication middleware: a page's principal comes from
//! its session (and a form's CSRF token is checked) before the route table's permission is
//! checked exactly as for the API; API errors on pages are answered as HTML.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::session::{self, CSRF_FIELD, SESSION_COOKIE};
use crate::api::ApiState;
use crate::auth::Principal;

/// The largest form a console page posts.
pub const FORM_LIMIT: usize = 64 * 1024;

/// The principal of a console request: its session's token, authenticated again now. A form
/// must carry the session's CSRF token. `Err` is the answer: a `GET` without a live session
/// goes to the login page, a form is refused.
pub async fn session_principal(
    state: &ApiState,
    req: Request,
) -> Result<(Arc<Principal>, Request), Response> {
    let reading = req.method() == Method::GET || req.method() == Method::HEAD;
    let back = req
        .uri()
        .path_and_query()
        .map_or("/ui/", |p| p.as_str())
        .to_string();
    let info = match session::cookie(req.headers(), SESSION_COOKIE) {
        Some(id) => match state.sessions().touch(id).await {
            Ok(info) => info,
            Err(e) => {
                tracing::error!(error = %e, "a console session could not be read from the store");
                return Err(refused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "Your console session could not be read from the store ({e}); try again in a moment."
                    ),
                ));
            }
        },
        None => None,
    };
    let Some(info) = info else {
        return Err(if reading {
            to_login(&back, None)
        } else {
            refused(
                StatusCode::UNAUTHORIZED,
                "Your console session has ended (logged out or expired): log in again, then repeat what you did.",
            )
        });
    };
    let req = if reading {
        req
    } else {
        let (parts, body) = req.into_parts();
        let form = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let bytes = match axum::body::to_bytes(body, FORM_LIMIT).await {
            Ok(b) => b,
            Err(_) => {
                return Err(refused(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("A console form is at most {FORM_LIMIT} bytes."),
                ));
            }
        };
        let sent = form
            .then(|| session::form_field(&bytes, CSRF_FIELD))
            .flatten();
        if !sent.is_some_and(|t| session::same_secret(&t, &info.csrf)) {
            tracing::warn!(path = %parts.uri.path(), "a console form without its session's CSRF token was refused");
            return Err(refused(
                StatusCode::FORBIDDEN,
                "This form was refused: it did not carry this session's CSRF token (field \"csrf\"). Forms are only accepted from the console's own pages; reload the page and try again.",
            ));
        }
        Request::from_parts(parts, Body::from(bytes))
    };
    let bearer = info.token.bearer();
    let principal = match state.authenticate_session(Some(bearer.as_bytes())).await {
        Ok(p) => p,
        Err(e) => {
            // The token was revoked or expired: the session ends with it.
            if let Err(e) = state.sessions().close(&info.id).await {
                tracing::error!(error = %e, "an ended console session could not be removed from the store");
            }
            let why = format!("The session's token no longer authenticates ({e}); log in again.");
            return Err(if reading {
                to_login(&back, Some(&why))
            } else {
                refused(StatusCode::UNAUTHORIZED, &why)
            });
        }
    };
    let mut req = req;
    req.extensions_mut().insert(info);
    Ok((principal, req))
}

/// A redirect to the login page that comes back to `back`.
fn to_login(back: &str, why: Option<&str>) -> Response {
    let mut to = format!("/ui/login?next={}", super::views::url_encode(back));
    if let Some(why) = why {
        to.push_str("&why=");
        to.push_str(&super::views::url_encode(why));
    }
    redirect(&to)
}

/// A `303 See Other` to `to` (a path of the console).
pub fn redirect(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// An HTML page saying why a request was refused, with its status.
pub fn refused(status: StatusCode, message: &str) -> Response {
    let mut resp = super::pages::error_page(status, message).into_response();
    *resp.status_mut() = status;
    resp.extensions_mut().insert(crate::api::ErrorSummary(
        message.chars().take(300).collect(),
    ));
    resp
}

/// Turns the API's JSON errors on a page into an HTML page with the same status and message.
pub fn html_errors(resp: Response) -> Response {
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || !json {
        return resp;
    }
    let summary = resp
        .extensions()
        .get::<crate::api::ErrorSummary>()
        .map(|s| s.0.clone());
    let message = summary.unwrap_or_else(|| status.to_string());
    let mut page = super::pages::error_page(status, &message).into_response();
    *page.status_mut() = status;
    page
}

/// The API error in a handler's JSON answer, for a page to show.
pub fn error_message(body: &[u8]) -> Option<String> {
    let e: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut m = e.get("message")?.as_str()?.to_string();
    for d in e["details"].as_array().into_iter().flatten() {
        m.push_str(&format!(
            "; {}: {}",
            d["field"].as_str().unwrap_or_default(),
            d["problem"].as_str().unwrap_or_default()
        ));
    }
    Some(m)
}
