//! Console single sign-on: the OpenID Connect authorization code flow with PKCE (S256).
//!
//! `GET /ui/login/oidc?issuer=N&next=/ui/...` makes a random `state`, `nonce` and PKCE code
//! verifier, keeps them server-side in [`PendingLogins`] (at most [`MAX_PENDING`], each for
//! [`PENDING_LIFETIME`]), ties the sign-in to the browser with a random value in the
//! `ccui_sso` cookie, and sends the browser to the issuer's authorization endpoint with the
//! S256 challenge. `GET /ui/login/oidc/callback?code=...&state=...` takes the pending sign-in
//! named by `state` (once: a replayed `state` is unknown), checks the browser's cookie,
//! exchanges the code with the verifier at the token endpoint, verifies the ID token
//! (signature, `iss`, `aud` = the client id, `exp`, and the sign-in's `nonce`), maps the
//! user's groups to a role and opens a console session that ends when the ID token expires.
//! Every failure answers an error page and opens no session; every sign-in, accepted or
//! refused, is audited.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use askama::Template;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::gate::redirect;
use super::login::{Origin, audit_login, safe_next};
use super::pages::{error_page, html, query_params};
use super::session::{self, LOGIN_COOKIE, SESSION_COOKIE, SessionToken, set_cookie};
use crate::api::ApiState;
use crate::audit::AuditResult;
use crate::auth::oidc::sso::{AuthRequest, authorization_url, pkce_challenge, pkce_verifier};
use crate::auth::oidc::{CALLBACK_PATH, IdTokenError, OidcError};
use crate::auth::rbac;

/// How long a sign-in may take at the identity provider.
pub const PENDING_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Sign-ins pending at once; the oldest is dropped when a new one would pass it.
pub const MAX_PENDING: usize = 1_000;
/// The cookie tying a pending sign-in to the browser that started it.
pub const FLOW_COOKIE: &str = "ccui_sso";
/// The callback's route.
pub const CALLBACK: &str = CALLBACK_PATH;
/// The path the flow cookie is sent to.
const FLOW_COOKIE_PATH: &str = "/ui/login/oidc";

/// One sign-in between its start and its callback.
struct Pending {
    issuer: usize,
    verifier: String,
    nonce: String,
    /// The value of the browser's flow cookie.
    binding: String,
    next: String,
    redirect_uri: String,
    created: Instant,
}

/// The pending sign-ins, by `state`: bounded in number and in age, whatever clients send.
#[derive(Default)]
pub struct PendingLogins {
    map: Mutex<HashMap<String, Pending>>,
}

impl std::fmt::Debug for PendingLogins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PendingLogins({})", self.len())
    }
}

impl PendingLogins {
    fn begin(&self, state: String, p: Pending, now: Instant) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, p| live(p, now));
        while map.len() >= MAX_PENDING {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, p)| p.created)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(state, p);
    }

    /// The pending sign-in `state`, removed: a state is used once. `None` when unknown,
    /// used already or expired.
    fn take(&self, state: &str, now: Instant) -> Option<Pending> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(state).filter(|p| live(p, now))
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn live(p: &Pending, now: Instant) -> bool {
    now.saturating_duration_since(p.created) < PENDING_LIFETIME
}

/// The flow cookie: `SameSite=Lax`, because the browser comes back from the identity
/// provider's site with a top-level `GET`, which `Strict` cookies do not follow.
fn flow_cookie(value: &str, max_age: Duration, secure: bool) -> HeaderValue {
    let mut s = format!(
        "{FLOW_COOKIE}={value}; Path={FLOW_COOKIE_PATH}; HttpOnly; SameSite=Lax; Max-Age={}",
        max_age.as_secs()
    );
    if secure {
        s.push_str("; Secure");
    }
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Whether `host` is a plain `Host` header value: a name or address and an optional port.
fn plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// Where the identity provider sends the browser back: the issuer's `redirect_url`, else
/// `external_url` and the callback path, else this request's own scheme and `Host`.
fn redirect_uri(
    configured: Option<&reqwest::Url>,
    external: Option<&reqwest::Url>,
    headers: &HeaderMap,
    tls: bool,
) -> Result<String, String> {
    if let Some(u) = configured {
        return Ok(u.to_string());
    }
    if let Some(u) = external {
        return Ok(format!(
            "{}{CALLBACK_PATH}",
            u.as_str().trim_end_matches('/')
        ));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| plain_host(h))
        .ok_or_else(|| {
            "the request has no usable Host header to build the redirect URL from; set oidc.external_url or the issuer's redirect_url".to_string()
        })?;
    let scheme = if tls { "https" } else { "http" };
    Ok(format!("{scheme}://{host}{CALLBACK_PATH}"))
}

/// `GET /ui/login/oidc?issuer=N&next=...`: starts a sign-in with issuer `N`.
pub async fn start(
    State(state): State<ApiState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = query_params(raw.as_deref());
    let Some(verifier) = state.oidc() else {
        return error_page(
            StatusCode::NOT_FOUND,
            "Single sign-on is not configured on this server: log in with an API token.",
        );
    };
    let index = q.get("issuer").and_then(|i| i.parse::<usize>().ok());
    let Some((index, (issuer, login))) =
        index.and_then(|i| verifier.console_login(i).map(|l| (i, l)))
    else {
        let offered: Vec<String> = verifier
            .console_logins()
            .map(|(i, l)| format!("{i} ({})", l.display_name))
            .collect();
        return error_page(
            StatusCode::BAD_REQUEST,
            &format!(
                "Parameter issuer: {:?} is not an issuer this console signs in with; offered: {}. Use the buttons of the login page.",
                q.get("issuer").map(String::as_str).unwrap_or_default(),
                if offered.is_empty() {
                    "none".to_string()
                } else {
                    offered.join(", ")
                }
            ),
        );
    };
    let next = safe_next(q.get("next"));
    let redirect_to = match redirect_uri(
        login.redirect_url.as_ref(),
        verifier.external_url(),
        &headers,
        state.secure_cookies(),
    ) {
        Ok(u) => u,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e),
    };
    let endpoints = match verifier.endpoints(index).await {
        Ok(e) => e,
        Err(e) => {
            return error_page(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "Cannot sign in with {}: its discovery document cannot be read: {e}",
                    login.display_name
                ),
            );
        }
    };
    let flow_state = session::random_id();
    let nonce = session::random_id();
    let binding = session::random_id();
    let code_verifier = pkce_verifier();
    let url = authorization_url(
        &endpoints,
        login,
        &AuthRequest {
            redirect_uri: &redirect_to,
            state: &flow_state,
            nonce: &nonce,
            challenge: &pkce_challenge(&code_verifier),
        },
    );
    state.sso_pending().begin(
        flow_state,
        Pending {
            issuer: index,
            verifier: code_verifier,
            nonce,
            binding: binding.clone(),
            next,
            redirect_uri: redirect_to,
            created: Instant::now(),
        },
        Instant::now(),
    );
    tracing::debug!(%issuer, "console single sign-on started");
    let mut resp = redirect(url.as_str());
    resp.headers_mut().append(
        header::SET_COOKIE,
        flow_cookie(&binding, PENDING_LIFETIME, state.secure_cookies()),
    );
    resp
}

#[derive(Template)]
#[template(path = "sso_done.html")]
struct Done<'a> {
    next: &'a str,
    user: &'a str,
    provider: &'a str,
}

/// `GET /ui/login/oidc/callback`: where the identity provider sends the browser back.
pub async fn callback(
    State(state): State<ApiState>,
    origin: Origin,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = query_params(raw.as_deref());
    let secure = state.secure_cookies();
    // Whatever happens, the flow cookie has served.
    let clear = flow_cookie("", Duration::ZERO, secure);
    let mut resp = finish(&state, &origin, &headers, &q).await;
    resp.headers_mut().append(header::SET_COOKIE, clear);
    resp
}

async fn finish(
    state: &ApiState,
    origin: &Origin,
    headers: &HeaderMap,
    q: &std::collections::BTreeMap<String, String>,
) -> Response {
    let refuse = |status: StatusCode, via: String, why: String| async move {
        audit_login(
            state,
            origin,
            None,
            &via,
            AuditResult::denied(status.as_u16(), why.clone()),
        )
        .await;
        error_page(status, &format!("Single sign-on failed: {why}"))
    };
    let Some(verifier) = state.oidc() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "sso".into(),
            "single sign-on is not configured on this server".into(),
        )
        .await;
    };
    // The state is used up first, whatever else is wrong: it never works twice.
    let pending = q
        .get("state")
        .and_then(|s| state.sso_pending().take(s, Instant::now()));
    let Some(p) = pending else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "sso".into(),
            "this sign-in is unknown, expired or was already used (parameter state); start again from the login page".into(),
        )
        .await;
    };
    let (issuer, login) = match verifier.console_login(p.issuer) {
        Some(l) => l,
        None => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "sso".into(),
                "the issuer of this sign-in is no longer configured".into(),
            )
            .await;
        }
    };
    let via = format!("sso:{issuer}");
    let bound =
        session::cookie(headers, FLOW_COOKIE).is_some_and(|c| session::same_secret(c, &p.binding));
    if !bound {
        return refuse(
            StatusCode::FORBIDDEN,
            via,
            "this sign-in was not started by this browser (its ccui_sso cookie is missing or differs); start again from the login page".into(),
        )
        .await;
    }
    if let Some(error) = q.get("error") {
        let detail = q
            .get("error_description")
            .map(|d| format!(": {}", d.chars().take(300).collect::<String>()))
            .unwrap_or_default();
        return refuse(
            StatusCode::UNAUTHORIZED,
            via,
            format!(
                "{} refused the sign-in ({}{detail})",
                login.display_name,
                error.chars().take(100).collect::<String>()
            ),
        )
        .await;
    }
    let Some(code) = q.get("code") else {
        return refuse(
            StatusCode::BAD_REQUEST,
            via,
            "the identity provider sent no authorization code (parameter code)".into(),
        )
        .await;
    };
    let id_token = match verifier
        .exchange_code(p.issuer, code, &p.verifier, &p.redirect_uri)
        .await
    {
        Ok(t) => t,
        Err(e) => {
            return refuse(
                StatusCode::BAD_GATEWAY,
                via,
                format!("the code exchange with {} failed: {e}", login.display_name),
            )
            .await;
        }
    };
    let (principal, exp) = match verifier
        .verify_id_token(p.issuer, &id_token, &p.nonce)
        .await
    {
        Ok(v) => v,
        Err(e) => {
            let status = match &e {
                IdTokenError::Token(OidcError::KeysUnavailable { .. }) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                IdTokenError::Token(OidcError::NoRole { .. }) => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            return refuse(status, via, format!("the ID token was refused: {e}")).await;
        }
    };
    if let Err(e) = rbac::role_of(&principal).and_then(|r| rbac::scope_of(&principal, r)) {
        audit_login(
            state,
            origin,
            Some(&principal),
            &via,
            AuditResult::denied(403, e.0.clone()),
        )
        .await;
        return error_page(
            StatusCode::FORBIDDEN,
            &format!("Single sign-on failed: {}", e.0),
        );
    }
    let until_ms = i64::try_from(exp.saturating_mul(1000)).unwrap_or(i64::MAX);
    let info = match state
        .sessions()
        .open(
            SessionToken::new(id_token),
            &principal.token_id,
            Some(until_ms),
        )
        .await
    {
        Ok(info) => info,
        Err(e) => {
            tracing::error!(error = %e, "a console session could not be stored");
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "Single sign-on failed: the session could not be stored ({e}); try again in a moment."
                ),
            );
        }
    };
    audit_login(state, origin, Some(&principal), &via, AuditResult::ok(200)).await;
    tracing::info!(principal = %principal.token_id, "console session opened by single sign-on");
    let page = Done {
        next: &p.next,
        user: &principal.token_name,
        provider: &login.display_name,
    };
    let mut resp = html(&page).unwrap_or_else(IntoResponse::into_response);
    resp.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, &info.id, None, state.secure_cookies()),
    );
    // The login form's secret ends with the login, as after a token's.
    resp.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(
            LOGIN_COOKIE,
            "",
            Some(std::time::Duration::ZERO),
            state.secure_cookies(),
        ),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(binding: &str, created: Instant) -> Pending {
        Pending {
            issuer: 0,
            verifier: pkce_verifier(),
            nonce: "n".into(),
            binding: binding.into(),
            next: "/ui/".into(),
            redirect_uri: "http://127.0.0.1/ui/login/oidc/callback".into(),
            created,
        }
    }

    #[test]
    fn a_state_works_once_and_expires() {
        let p = PendingLogins::default();
        let t0 = Instant::now();
        p.begin("s1".into(), pending("b1", t0), t0);
        p.begin("s2".into(), pending("b2", t0), t0);
        assert_eq!(p.take("s1", t0).unwrap().binding, "b1");
        assert!(p.take("s1", t0).is_none(), "a state is single use");
        assert!(p.take("unknown", t0).is_none());
        assert!(p.take("s2", t0 + PENDING_LIFETIME).is_none(), "expired");
        assert!(p.is_empty());
    }

    #[test]
    fn pending_sign_ins_are_bounded() {
        let p = PendingLogins::default();
        let t0 = Instant::now();
        for i in 0..MAX_PENDING + 50 {
            let at = t0 + Duration::from_millis(i as u64);
            p.begin(format!("s{i}"), pending("b", at), at);
        }
        assert_eq!(p.len(), MAX_PENDING);
        let later = t0 + Duration::from_secs(1);
        assert!(p.take("s0", later).is_none(), "the oldest went first");
        assert!(p.take(&format!("s{}", MAX_PENDING + 49), later).is_some());
        // Expired ones are swept when a new one begins.
        let much_later = t0 + PENDING_LIFETIME + Duration::from_secs(2);
        p.begin("new".into(), pending("b", much_later), much_later);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn the_redirect_uri_comes_from_the_settings_or_the_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8443"));
        let configured =
            reqwest::Url::parse("https://cc.example.com/ui/login/oidc/callback").unwrap();
        let external = reqwest::Url::parse("https://console.example.com:9443").unwrap();
        assert_eq!(
            redirect_uri(Some(&configured), Some(&external), &h, true).unwrap(),
            "https://cc.example.com/ui/login/oidc/callback"
        );
        assert_eq!(
            redirect_uri(None, Some(&external), &h, true).unwrap(),
            "https://console.example.com:9443/ui/login/oidc/callback"
        );
        assert_eq!(
            redirect_uri(None, None, &h, true).unwrap(),
            "https://127.0.0.1:8443/ui/login/oidc/callback"
        );
        assert_eq!(
            redirect_uri(None, None, &h, false).unwrap(),
            "http://127.0.0.1:8443/ui/login/oidc/callback"
        );
        h.insert(
            header::HOST,
            HeaderValue::from_static("evil.example/x?y=@z"),
        );
        assert!(redirect_uri(None, None, &h, true).is_err());
        assert!(redirect_uri(None, None, &HeaderMap::new(), true).is_err());
    }

    #[test]
    fn the_flow_cookie_is_lax_and_scoped() {
        let v = flow_cookie("abc", PENDING_LIFETIME, true);
        let v = v.to_str().unwrap();
        assert!(
            v.starts_with("ccui_sso=abc; Path=/ui/login/oidc; HttpOnly; SameSite=Lax; Max-Age=600")
        );
        assert!(v.ends_with("; Secure"));
    }
}
