//! Console sessions: a random id in an `HttpOnly`, `SameSite=Strict` cookie naming a session
//! kept in the store ([`crate::store::sessions`]) with its API token, so that it outlives a
//! restart of the server and every server of one PostgreSQL database accepts it.
//!
//! The store keeps only the SHA-256 of the id, and the token sealed (AES-256-GCM) with a key
//! derived from the id: the rows alone open no session and give away no token. The CSRF
//! token of the session's forms is derived from the id too, so it is never stored.
//!
//! The session keeps the token it was opened with and every request authenticates it again
//! (a revoked or expired token ends the session at its next request), so a page sees exactly
//! what the token sees through the API. Forms carry the session's synchronizer token; a
//! post without it, or with another session's, is refused before its handler runs.
//!
//! A session ends after [`IDLE_TIMEOUT`] without a request, at [`MAX_LIFETIME`] however busy,
//! or when its single sign-on ID token expires. When it was last used is written at most
//! once every [`TOUCH_EVERY`] (not on every page load), so the idle timeout counts from a
//! request at most that much older than the last one. Ended rows are removed when the next
//! session opens, and when their cookie comes back.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest, Sha256};

use crate::store::sessions::{SessionLimits, SessionRow};
use crate::store::{Store, StoreError};
use crate::util::hex;

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
/// Sessions kept at once; the least recently used goes when a new one would pass it.
pub const MAX_SESSIONS: usize = 10_000;
/// How often a busy session's last use is written to the store.
pub const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Domain separation of what is derived from a session id.
const KEY_CONTEXT: &[u8] = b"clusterclaw console session token key\0";
const CSRF_CONTEXT: &[u8] = b"clusterclaw console session csrf\0";

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

/// What a request learns of its session: put in the request's extensions for the pages.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    pub id: String,
    /// The synchronizer token the session's forms carry.
    pub csrf: String,
    pub token: SessionToken,
}

/// The console's sessions, kept in the store.
pub struct Sessions {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions")
    }
}

/// 32 random bytes in hex.
pub fn random_id() -> String {
    let bytes: [u8; 32] = rand::random();
    hex(&bytes)
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Milliseconds of a duration, saturated.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether `id` has the shape of a session id or a login form's secret (what [`random_id`]
/// makes).
pub(super) fn well_formed(id: &str) -> bool {
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The key the store knows a session by.
fn id_hash(id: &str) -> String {
    hex(&Sha256::digest(id.as_bytes()))
}

/// The CSRF token of session `id`.
fn csrf_of(id: &str) -> String {
    hex(&Sha256::new()
        .chain_update(CSRF_CONTEXT)
        .chain_update(id.as_bytes())
        .finalize())
}

/// The key that seals the token of session `id`.
fn sealing_key(id: &str) -> Result<LessSafeKey, StoreError> {
    let bytes = Sha256::new()
        .chain_update(KEY_CONTEXT)
        .chain_update(id.as_bytes())
        .finalize();
    UnboundKey::new(&AES_256_GCM, &bytes)
        .map(LessSafeKey::new)
        .map_err(|_| StoreError::Backend("the session key could not be made".into()))
}

/// The token sealed for session `id` (bound to the row's key): nonce and ciphertext, base64.
fn seal(id: &str, token: &SessionToken) -> Result<String, StoreError> {
    let key = sealing_key(id)?;
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut buf = token.0.as_bytes().to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(id_hash(id).as_bytes()),
        &mut buf,
    )
    .map_err(|_| StoreError::Backend("the session token could not be sealed".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    Ok(STANDARD_NO_PAD.encode(out))
}

/// The token of session `id` from its sealed form; `None` when it does not open (another
/// session's, or altered).
fn unseal(id: &str, row: &SessionRow) -> Option<SessionToken> {
    let key = sealing_key(id).ok()?;
    let raw = STANDARD_NO_PAD.decode(&row.sealed_token).ok()?;
    if raw.len() < NONCE_LEN {
        return None;
    }
    let (nonce, sealed) = raw.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut buf = sealed.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(row.id_hash.as_bytes()), &mut buf)
        .ok()?;
    String::from_utf8(plain.to_vec()).ok().map(SessionToken)
}

fn live(row: &SessionRow, now_ms: i64) -> bool {
    now_ms < row.expires_ms && now_ms.saturating_sub(row.last_used_ms) < millis(IDLE_TIMEOUT)
}

/// Opens a session for `token` (already authenticated by the caller, as `token_id`) at
/// `now_ms`; it also ends at `until_ms` (when its single sign-on ID token expires) if that
/// comes before its own limits.
pub fn open_in(
    store: &dyn Store,
    token: SessionToken,
    token_id: &str,
    now_ms: i64,
    until_ms: Option<i64>,
) -> Result<SessionInfo, StoreError> {
    let id = random_id();
    let lifetime_end = now_ms.saturating_add(millis(MAX_LIFETIME));
    let row = SessionRow {
        id_hash: id_hash(&id),
        token_id: token_id.to_string(),
        sealed_token: seal(&id, &token)?,
        created_ms: now_ms,
        last_used_ms: now_ms,
        expires_ms: until_ms.map_or(lifetime_end, |u| u.min(lifetime_end)),
    };
    store.open_console_session(
        &row,
        &SessionLimits {
            now_ms,
            idle_ms: millis(IDLE_TIMEOUT),
            max_sessions: MAX_SESSIONS,
        },
    )?;
    Ok(SessionInfo {
        csrf: csrf_of(&id),
        id,
        token,
    })
}

/// The live session `id` at `now_ms`, its last use recorded when the one recorded is
/// [`TOUCH_EVERY`] old; `None` when unknown or ended (an ended one is removed).
pub fn touch_in(
    store: &dyn Store,
    id: &str,
    now_ms: i64,
) -> Result<Option<SessionInfo>, StoreError> {
    if !well_formed(id) {
        return Ok(None);
    }
    let key = id_hash(id);
    let Some(row) = store.console_session(&key)? else {
        return Ok(None);
    };
    let token = match unseal(id, &row) {
        Some(token) if live(&row, now_ms) => token,
        _ => {
            store.close_console_session(&key)?;
            return Ok(None);
        }
    };
    if now_ms.saturating_sub(row.last_used_ms) >= millis(TOUCH_EVERY)
        && !store.touch_console_session(&key, now_ms)?
    {
        // Logged out meanwhile (on another server).
        return Ok(None);
    }
    Ok(Some(SessionInfo {
        id: id.to_string(),
        csrf: csrf_of(id),
        token,
    }))
}

/// Ends session `id` (logout, or its token no longer authenticates).
pub fn close_in(store: &dyn Store, id: &str) -> Result<(), StoreError> {
    if well_formed(id) {
        store.close_console_session(&id_hash(id))?;
    }
    Ok(())
}

/// Runs session work on the blocking pool.
async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = Arc::clone(store);
    crate::util::blocking("a console session's store work", move || f(store.as_ref()))
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
}

impl Sessions {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Sessions { store }
    }

    /// [`open_in`] now.
    pub async fn open(
        &self,
        token: SessionToken,
        token_id: &str,
        until_ms: Option<i64>,
    ) -> Result<SessionInfo, StoreError> {
        let token_id = token_id.to_string();
        blocking(&self.store, move |s| {
            open_in(s, token, &token_id, crate::events::now_ms(), until_ms)
        })
        .await
    }

    /// [`touch_in`] now.
    pub async fn touch(&self, id: &str) -> Result<Option<SessionInfo>, StoreError> {
        let id = id.to_string();
        blocking(&self.store, move |s| {
            touch_in(s, &id, crate::events::now_ms())
        })
        .await
    }

    /// [`close_in`].
    pub async fn close(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        blocking(&self.store, move |s| close_in(s, &id)).await
    }
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

    use crate::store::sqlite::SqliteStore;

    fn token() -> SessionToken {
        SessionToken::new(format!("cca_{}", "a".repeat(40)))
    }

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
        (dir, store)
    }

    const MIN: i64 = 60_000;
    const T0: i64 = 1_800_000_000_000;

    #[test]
    fn a_session_lives_until_idle_or_too_old() {
        let (_dir, s) = store();
        let info = open_in(&s, token(), "tok1", T0, None).unwrap();
        assert_eq!(info.id.len(), 64);
        assert_ne!(info.id, info.csrf);
        let again = touch_in(&s, &info.id, T0 + MIN).unwrap().unwrap();
        assert_eq!(again.csrf, info.csrf);
        assert_eq!(again.token.bearer(), token().bearer());
        // Idle for the whole timeout: gone, and removed.
        let idle = millis(IDLE_TIMEOUT);
        assert!(touch_in(&s, &info.id, T0 + MIN + idle).unwrap().is_none());
        assert!(s.console_session(&id_hash(&info.id)).unwrap().is_none());

        // Busy, but past its lifetime.
        let info = open_in(&s, token(), "tok1", T0, None).unwrap();
        let mut now = T0;
        while now < T0 + millis(MAX_LIFETIME) - 10 * MIN {
            now += 10 * MIN;
            assert!(touch_in(&s, &info.id, now).unwrap().is_some(), "{now}");
        }
        assert!(
            touch_in(&s, &info.id, T0 + millis(MAX_LIFETIME))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn last_use_is_written_at_most_once_a_minute() {
        let (_dir, s) = store();
        let info = open_in(&s, token(), "tok1", T0, None).unwrap();
        let used = |s: &SqliteStore| {
            s.console_session(&id_hash(&info.id))
                .unwrap()
                .unwrap()
                .last_used_ms
        };
        for ms in [1_000, 30_000, MIN - 1] {
            assert!(touch_in(&s, &info.id, T0 + ms).unwrap().is_some());
            assert_eq!(used(&s), T0, "written {ms} ms after the last write");
        }
        assert!(touch_in(&s, &info.id, T0 + MIN).unwrap().is_some());
        assert_eq!(used(&s), T0 + MIN);
        // Pages keep it alive past the idle timeout of its opening.
        let mut now = T0 + MIN;
        while now < T0 + 2 * millis(IDLE_TIMEOUT) {
            now += 20_000;
            assert!(touch_in(&s, &info.id, now).unwrap().is_some(), "{now}");
        }
    }

    #[test]
    fn a_single_sign_on_session_ends_with_its_id_token() {
        let (_dir, s) = store();
        let info = open_in(&s, token(), "sso", T0, Some(T0 + 300_000)).unwrap();
        assert!(touch_in(&s, &info.id, T0 + 299_000).unwrap().is_some());
        assert!(touch_in(&s, &info.id, T0 + 300_000).unwrap().is_none());
        // A token that outlives the session's limits does not stretch them.
        let info = open_in(&s, token(), "sso", T0, Some(T0 + 2 * millis(MAX_LIFETIME))).unwrap();
        assert!(
            touch_in(&s, &info.id, T0 + millis(IDLE_TIMEOUT))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn logout_ends_the_session_and_ids_are_unguessable() {
        let (_dir, s) = store();
        let a = open_in(&s, token(), "tok1", T0, None).unwrap();
        let b = open_in(&s, token(), "tok1", T0, None).unwrap();
        assert_ne!(a.id, b.id);
        assert_ne!(a.csrf, b.csrf);
        close_in(&s, &a.id).unwrap();
        assert!(touch_in(&s, &a.id, T0).unwrap().is_none());
        assert!(touch_in(&s, &b.id, T0).unwrap().is_some());
        assert!(touch_in(&s, "not-a-session", T0).unwrap().is_none());
        assert!(touch_in(&s, &"0".repeat(64), T0).unwrap().is_none());
    }

    #[test]
    fn the_store_keeps_no_id_and_no_token() {
        let (dir, s) = store();
        let info = open_in(&s, token(), "tok1", T0, None).unwrap();
        let row = s.console_session(&id_hash(&info.id)).unwrap().unwrap();
        let printed = format!("{info:?} {row:?}");
        assert!(!printed.contains("cca_"), "{printed}");
        drop(s);
        let mut file = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            file.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        let file = String::from_utf8_lossy(&file);
        assert!(file.contains(&row.id_hash), "the row is not in the files");
        for secret in [info.id.as_str(), info.csrf.as_str(), "cca_aaaa"] {
            assert!(!file.contains(secret), "{secret} is stored");
        }
        // A row moved to another id does not open: its token was sealed for its own.
        let s = SqliteStore::open(&dir.path().join("store.db")).unwrap();
        let other = random_id();
        assert!(unseal(&other, &row).is_none());
        let forged = SessionRow {
            id_hash: id_hash(&other),
            ..row
        };
        assert!(unseal(&other, &forged).is_none());
        assert!(touch_in(&s, &info.id, T0).unwrap().is_some());
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
