//! Console sessions: a random id in an `HttpOnly`, `SameSite=Strict` cookie naming a session
//! held in memory with its API token, its CSRF token and its expiry.
//!
//! The session keeps the token it was opened with and every request authenticates it again
//! (a revoked or expired token ends the session at its next request), so a page sees exactly
//! what the token sees through the API. Forms carry the session's synchronizer token; a
//! post without it, or with another session's, is refused before its handler runs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};

/// The cookie naming the session.
pub const SESSION_COOKIE: &str = "ccui_session";
/// The cookie of the login form's own CSRF token (there is no session yet to tie it to).
pub const LOGIN_COOKIE: &str = "ccui_login";
/// The form field carrying the CSRF token.
pub const CSRF_FIELD: &str = "csrf";
/// How long a session lasts after its last request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long a session lasts at most, however busy.
pub const MAX_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);
/// Sessions held at once; the oldest goes when a new one would pass it.
pub const MAX_SESSIONS: usize = 10_000;

/// An API token (or single sign-on JWT) held for a session; never printed.
#[derive(Clone)]
pub struct SessionToken(String);

impl SessionToken {
    pub fn new(token: String) -> Self {
        SessionToken(token)
    }

    /// The `Authorization` header value that authenticates it.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug)]
struct Entry {
    token: SessionToken,
    csrf: String,
    created: Instant,
    last_seen: Instant,
    /// When the session ends whatever else: the expiry of a single sign-on ID token.
    until: Option<Instant>,
}

/// What a request learns of its session: put in the request's extensions for the pages.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    pub id: String,
    /// The synchronizer token the session's forms carry.
    pub csrf: String,
    pub token: SessionToken,
}

/// The sessions of one server, in memory: a restart logs everyone out.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Entry>>,
}

/// 32 random bytes in hex.
pub fn random_id() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Sessions {
    /// Opens a session for `token` (already authenticated by the caller); returns its id.
    pub fn open(&self, token: SessionToken, now: Instant) -> SessionInfo {
        self.open_until(token, now, None)
    }

    /// Like [`Sessions::open`], for a session that also ends at `until` (when its single
    /// sign-on ID token expires), or at the idle and absolute limits if sooner.
    pub fn open_until(
        &self,
        token: SessionToken,
        now: Instant,
        until: Option<Instant>,
    ) -> SessionInfo {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, e| live(e, now));
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        let id = random_id();
        let csrf = random_id();
        map.insert(
            id.clone(),
            Entry {
                token: token.clone(),
                csrf: csrf.clone(),
                created: now,
                last_seen: now,
                until,
            },
        );
        SessionInfo { id, csrf, token }
    }

    /// The live session `id`, its idle clock restarted; `None` when unknown or expired
    /// (an expired one is forgotten).
    pub fn touch(&self, id: &str, now: Instant) -> Option<SessionInfo> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.get_mut(id)?;
        if !live(entry, now) {
            map.remove(id);
            return None;
        }
        entry.last_seen = now;
        Some(SessionInfo {
            id: id.to_string(),
            csrf: entry.csrf.clone(),
            token: entry.token.clone(),
        })
    }

    /// Ends session `id` (logout, or its token no longer authenticates).
    pub fn close(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn live(e: &Entry, now: Instant) -> bool {
    now.saturating_duration_since(e.last_seen) < IDLE_TIMEOUT
        && now.saturating_duration_since(e.created) < MAX_LIFETIME
        && e.until.is_none_or(|until| now < until)
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, path `/ui`, `Secure` when served over
/// TLS; `max_age` 0 deletes the cookie.
pub fn set_cookie(name: &str, value: &str, max_age: Option<Duration>, secure: bool) -> HeaderValue {
    let mut s = format!("{name}={value}; Path=/ui; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        s.push_str(&format!("; Max-Age={}", age.as_secs()));
    }
    if secure {
        s.push_str("; Secure");
    }
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The value of `field` in an `application/x-www-form-urlencoded` body.
pub fn form_field(body: &[u8], field: &str) -> Option<String> {
    form_fields(body)
        .into_iter()
        .find(|(k, _)| k == field)
        .map(|(_, v)| v)
}

/// Every field of an `application/x-www-form-urlencoded` body, decoded.
pub fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> SessionToken {
        SessionToken::new(format!("cca_{}", "a".repeat(40)))
    }

    #[test]
    fn a_session_lives_until_idle_or_too_old() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let info = s.open(token(), t0);
        assert_eq!(info.id.len(), 64);
        assert_ne!(info.id, info.csrf);
        let again = s.touch(&info.id, t0 + Duration::from_secs(60)).unwrap();
        assert_eq!(again.csrf, info.csrf);
        // Idle for the whole timeout: gone, and forgotten.
        assert!(
            s.touch(&info.id, t0 + Duration::from_secs(60) + IDLE_TIMEOUT)
                .is_none()
        );
        assert!(s.is_empty());

        // Busy, but past its lifetime.
        let info = s.open(token(), t0);
        let mut now = t0;
        while now < t0 + MAX_LIFETIME - Duration::from_secs(600) {
            now += Duration::from_secs(600);
            assert!(s.touch(&info.id, now).is_some());
        }
        assert!(s.touch(&info.id, t0 + MAX_LIFETIME).is_none());
    }

    #[test]
    fn a_single_sign_on_session_ends_with_its_id_token() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let info = s.open_until(token(), t0, Some(t0 + Duration::from_secs(300)));
        assert!(s.touch(&info.id, t0 + Duration::from_secs(299)).is_some());
        assert!(s.touch(&info.id, t0 + Duration::from_secs(300)).is_none());
        assert!(s.is_empty());
        // A token that outlives the session's limits does not stretch them.
        let info = s.open_until(token(), t0, Some(t0 + MAX_LIFETIME * 2));
        assert!(s.touch(&info.id, t0 + IDLE_TIMEOUT).is_none());
    }

    #[test]
    fn logout_ends_the_session_and_ids_are_unguessable() {
        let s = Sessions::default();
        let now = Instant::now();
        let a = s.open(token(), now);
        let b = s.open(token(), now);
        assert_ne!(a.id, b.id);
        assert_ne!(a.csrf, b.csrf);
        s.close(&a.id);
        assert!(s.touch(&a.id, now).is_none());
        assert!(s.touch(&b.id, now).is_some());
        assert!(s.touch("not-a-session", now).is_none());
    }

    #[test]
    fn the_token_never_prints() {
        let s = Sessions::default();
        let info = s.open(token(), Instant::now());
        let printed = format!("{info:?} {s:?}");
        assert!(!printed.contains("cca_"), "{printed}");
    }

    #[test]
    fn cookies_and_forms_are_read() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; ccui_session=abc"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, LOGIN_COOKIE), None);
        let v = set_cookie(SESSION_COOKIE, "abc", None, true);
        let v = v.to_str().unwrap();
        assert!(v.contains("HttpOnly") && v.contains("SameSite=Strict") && v.contains("Secure"));
        assert!(
            !set_cookie(SESSION_COOKIE, "abc", None, false)
                .to_str()
                .unwrap()
                .contains("Secure")
        );
        let body = b"csrf=x%2By&replicas=3&name=a+b";
        assert_eq!(form_field(body, CSRF_FIELD).as_deref(), Some("x+y"));
        assert_eq!(form_field(body, "name").as_deref(), Some("a b"));
        assert_eq!(form_field(body, "other"), None);
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
