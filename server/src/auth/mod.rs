//! Who is calling: API token authentication, the principal, and the first-start admin token.

pub mod oidc;
pub mod rbac;
mod token;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::store::{Store, StoreError, TokenKind, TokenRecord};
use crate::util::{hex, rfc3339, unix_now};

pub use token::{
    API_TOKEN_PREFIX, JOIN_TOKEN_PREFIX, Secret, TOKEN_RANDOM_CHARS, generate_api_token,
    generate_join_token, generate_token_id, has_token_shape, hash_token, hash_token_bytes,
};

/// The role that may do everything.
pub const PLATFORM_ADMIN: &str = "platform-admin";
/// File name of the admin token inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// How long an authenticated token is trusted before the store is asked again. A token
/// revoked through this server is forgotten at once; one revoked elsewhere (another replica,
/// direct database access) stops working within this time.
const CACHE_TTL: Duration = Duration::from_secs(5);
/// Upper bound of cached tokens; the cache is emptied when it grows past it.
const CACHE_MAX: usize = 10_000;

/// The authenticated caller of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Public id of the token used.
    pub token_id: String,
    /// Name given to the token when it was created.
    pub token_name: String,
    /// `platform-admin`, ...
    pub role: String,
    /// Tenant the token is limited to, if any.
    pub tenant: Option<String>,
    /// Project the token is limited to, if any.
    pub project: Option<String>,
}

impl Principal {
    pub fn is_platform_admin(&self) -> bool {
        self.role == PLATFORM_ADMIN
    }

    fn from_record(r: &TokenRecord) -> Self {
        Principal {
            token_id: r.id.clone(),
            token_name: r.name.clone(),
            role: r.role.clone(),
            tenant: r.tenant.clone(),
            project: r.project.clone(),
        }
    }
}

/// Why a request was not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the request has no Authorization header")]
    MissingHeader,
    #[error("the Authorization header is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token is not known to this server")]
    Unknown,
    #[error("the token {id} expired at {at}")]
    Expired { id: String, at: String },
    #[error("the token {id} has been revoked")]
    Revoked { id: String },
    #[error("a join token was used on the API")]
    JoinToken,
    /// A JWT from single sign-on that did not verify (or no issuer is configured).
    #[error(transparent)]
    Oidc(#[from] oidc::OidcError),
    #[error(
        "the token looks like a single sign-on JWT, but this server has no [oidc] issuers configured"
    )]
    OidcNotConfigured,
    #[error(transparent)]
    Store(Box<StoreError>),
}

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        AuthError::Store(Box::new(e))
    }
}

/// Where a caller gets a token, named in every authentication error. No filesystem path: an
/// anonymous caller learns nothing about the server's host (the server logs the admin token's
/// path itself when it creates it).
const GET_A_TOKEN: &str = "a platform admin's token is in the file admin.token in the server's data directory on the server host, and `clusterclaw token create` makes more (see the README, \"Tenancy and access\")";

impl AuthError {
    /// The whole message for the caller: what was wrong and what to do. It names no path.
    pub fn user_message(&self) -> String {
        match self {
            AuthError::MissingHeader => format!(
                "this endpoint needs an API token: send the header 'Authorization: Bearer cca_...'; {GET_A_TOKEN}"
            ),
            AuthError::Malformed(why) => format!(
                "the Authorization header is malformed ({why}); send 'Authorization: Bearer cca_...'; {GET_A_TOKEN}"
            ),
            AuthError::Unknown => format!(
                "the token is not known to this server: check that it was copied whole, or ask an administrator for a new API token; {GET_A_TOKEN}"
            ),
            AuthError::Expired { id, at } => {
                format!("the token {id} expired at {at}; use another API token; {GET_A_TOKEN}")
            }
            AuthError::Revoked { id } => {
                format!("the token {id} has been revoked; use another API token; {GET_A_TOKEN}")
            }
            AuthError::JoinToken => format!(
                "this is a join token (ccj_...): it only enrolls hosts with clusterclaw-agent; use an API token (cca_...) here; {GET_A_TOKEN}"
            ),
            AuthError::Store(e) => format!("the token could not be checked: {e}"),
            AuthError::Oidc(e) => format!("the single sign-on token was refused: {e}"),
            AuthError::OidcNotConfigured => format!(
                "the token looks like a single sign-on JWT, but this server has no [oidc] issuers configured; use an API token (cca_...); {GET_A_TOKEN}"
            ),
        }
    }
}

struct CacheEntry {
    principal: Arc<Principal>,
    expires_at: Option<i64>,
    checked: Instant,
}

/// Checks bearer tokens against the store, with a short-lived cache so the request path does
/// one store query, not two.
pub struct Authenticator {
    store: Arc<dyn Store>,
    cache: RwLock<HashMap<[u8; 32], CacheEntry>>,
    /// Bumped (under the cache's write lock) every time a token is forgotten. A lookup that
    /// started before a bump may have read the token before its revocation committed; it does
    /// not cache what it read.
    generation: AtomicU64,
    admin_token_path: PathBuf,
    /// Verifies single sign-on JWTs, when issuers are configured.
    oidc: Option<Arc<oidc::OidcVerifier>>,
}

impl Authenticator {
    /// Accepts JWTs from the issuers `verifier` trusts, besides API tokens.
    pub fn with_oidc(mut self, verifier: Option<Arc<oidc::OidcVerifier>>) -> Self {
        self.oidc = verifier;
        self
    }

    /// `admin_token_path` is named in error messages so a caller knows where to look.
    pub fn new(store: Arc<dyn Store>, admin_token_path: PathBuf) -> Self {
        Authenticator {
            store,
            cache: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            admin_token_path,
            oidc: None,
        }
    }

    pub fn admin_token_path(&self) -> &Path {
        &self.admin_token_path
    }

    /// Authenticates the value of an `Authorization` header.
    pub async fn authenticate(&self, header: Option<&[u8]>) -> Result<Arc<Principal>, AuthError> {
        self.authenticate_for(header, false).await
    }

    /// Authenticates the token of a console session: as [`Authenticator::authenticate`],
    /// and a single sign-on ID token may be for the console's client id.
    pub async fn authenticate_session(
        &self,
        header: Option<&[u8]>,
    ) -> Result<Arc<Principal>, AuthError> {
        self.authenticate_for(header, true).await
    }

    async fn authenticate_for(
        &self,
        header: Option<&[u8]>,
        console: bool,
    ) -> Result<Arc<Principal>, AuthError> {
        let token = bearer_token(header)?;
        if token.starts_with(JOIN_TOKEN_PREFIX) {
            return Err(AuthError::JoinToken);
        }
        if !token.starts_with(API_TOKEN_PREFIX) && oidc::looks_like_jwt(token) {
            let verifier = self.oidc.as_ref().ok_or(AuthError::OidcNotConfigured)?;
            let principal = if console {
                verifier.verify_console(token).await?
            } else {
                verifier.verify(token).await?
            };
            return Ok(Arc::new(principal));
        }
        if !has_token_shape(token, API_TOKEN_PREFIX) {
            return Err(AuthError::Malformed(
                "API tokens are 'cca_' followed by 40 letters and digits",
            ));
        }
        let digest = hash_token_bytes(token);
        let now = unix_now();
        if let Some(p) = self.cached(&digest, now)? {
            return Ok(p);
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let store = Arc::clone(&self.store);
        let hash = hex(&digest);
        let record = crate::util::blocking("the token lookup", move || {
            store.token_by_hash(&hash).map_err(AuthError::from)
        })
        .await
        .map_err(|e| AuthError::from(StoreError::Backend(e.to_string())))??;
        let record = record.ok_or(AuthError::Unknown)?;
        let principal = Arc::new(check_record(&record, now)?);
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::SeqCst) != generation {
            // A token was revoked while this one was looked up: what was read may be stale.
            return Ok(principal);
        }
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(
            digest,
            CacheEntry {
                principal: Arc::clone(&principal),
                expires_at: record.expires_at,
                checked: Instant::now(),
            },
        );
        Ok(principal)
    }

    fn cached(&self, digest: &[u8; 32], now: i64) -> Result<Option<Arc<Principal>>, AuthError> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = cache.get(digest) else {
            return Ok(None);
        };
        if entry.checked.elapsed() >= CACHE_TTL {
            return Ok(None);
        }
        if let Some(at) = entry.expires_at.filter(|at| *at <= now) {
            return Err(AuthError::Expired {
                id: entry.principal.token_id.clone(),
                at: rfc3339(at),
            });
        }
        Ok(Some(Arc::clone(&entry.principal)))
    }

    /// Drops a token from the cache (after its revocation committed); lookups still in flight
    /// do not cache what they read.
    pub fn forget_token(&self, token_id: &str) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        cache.retain(|_, e| e.principal.token_id != token_id);
    }
}

fn bearer_token(header: Option<&[u8]>) -> Result<&str, AuthError> {
    let raw = header.ok_or(AuthError::MissingHeader)?;
    let value =
        std::str::from_utf8(raw).map_err(|_| AuthError::Malformed("it is not ASCII text"))?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(AuthError::Malformed("expected 'Bearer <token>'"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed("the scheme must be Bearer"));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed("the token after 'Bearer' is empty"));
    }
    Ok(token)
}

fn check_record(r: &TokenRecord, now: i64) -> Result<Principal, AuthError> {
    match r.kind {
        TokenKind::Join => return Err(AuthError::JoinToken),
        TokenKind::Api => {}
    }
    if r.revoked {
        return Err(AuthError::Revoked { id: r.id.clone() });
    }
    if let Some(at) = r.expires_at.filter(|at| *at <= now) {
        return Err(AuthError::Expired {
            id: r.id.clone(),
            at: rfc3339(at),
        });
    }
    Ok(Principal::from_record(r))
}

/// Failure to set up the admin token at first start.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error("cannot write the admin token to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot store the admin token: {0}")]
    Store(Box<StoreError>),
}

impl From<StoreError> for AdminTokenError {
    fn from(e: StoreError) -> Self {
        AdminTokenError::Store(Box::new(e))
    }
}

/// The admin token created at first start.
#[derive(Debug)]
pub struct NewAdminToken {
    pub token: Secret,
    pub id: String,
    pub path: PathBuf,
}

/// At first start (the store holds no API token), creates a `platform-admin` token and writes
/// it to `<data_dir>/admin.token` (mode 0600). Returns it so the caller can show it once.
/// Blocking.
pub fn ensure_admin_token(
    store: &dyn Store,
    data_dir: &Path,
) -> Result<Option<NewAdminToken>, AdminTokenError> {
    if store
        .list_tokens()?
        .iter()
        .any(|t| t.kind == TokenKind::Api)
    {
        return Ok(None);
    }
    let token = generate_api_token();
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    // The file first: if storing fails, the next start makes a new token and overwrites the
    // file; the other order could leave a stored admin token nobody knows.
    write_private_file(&path, format!("{}\n", token.expose()).as_bytes()).map_err(|source| {
        AdminTokenError::Write {
            path: path.clone(),
            source,
        }
    })?;
    let record = TokenRecord {
        id: generate_token_id(),
        name: "admin".into(),
        kind: TokenKind::Api,
        role: PLATFORM_ADMIN.into(),
        tenant: None,
        project: None,
        created_at: unix_now(),
        expires_at: None,
        uses_remaining: None,
        revoked: false,
        hash: hash_token(token.expose()),
    };
    store.insert_token(&record)?;
    Ok(Some(NewAdminToken {
        token,
        id: record.id,
        path,
    }))
}

/// The banner shown once on stderr when the admin token is created.
pub fn admin_token_banner(t: &NewAdminToken) -> String {
    let rule = "=".repeat(78);
    format!(
        "{rule}\n  clusterclaw: a platform-admin API token was created (id {id}).\n  It is shown only this once, and saved in {path} (mode 0600):\n\n    {token}\n\n  Use it as 'Authorization: Bearer <token>', or with the clusterclaw CLI.\n{rule}",
        id = t.id,
        path = t.path.display(),
        token = t.token.expose(),
    )
}

/// Writes a file readable only by its owner, atomically: the content goes to a temporary file
/// created with mode 0600 (never readable by others, not even briefly), which then replaces
/// `path`.
pub fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_file_atomic(path, contents, 0o600)
}

/// Writes a file atomically with the given mode: a temporary file beside `path`, created with
/// `mode`, synced, then renamed over `path`.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let staged = stage_file(path, contents, mode)?;
    commit_file(&staged, path)?;
    sync_parent(path);
    Ok(())
}

/// The temporary name of `path` while it is written: `.<name>.tmp` beside it.
pub fn staged_path(path: &Path) -> PathBuf {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{file_name}.tmp"))
}

/// The first half of an atomic write: `contents` in [`staged_path`]`(path)`, created with
/// `mode` (never readable by others, not even briefly, when `mode` says so) and synced to
/// disk. [`commit_file`] puts it in place. Several files can be staged first and committed
/// after, in an order that keeps every intermediate state usable.
pub fn stage_file(path: &Path, contents: &[u8], mode: u32) -> io::Result<PathBuf> {
    let tmp = staged_path(path);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let written = f.write_all(contents).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// The second half of an atomic write: renames a staged file over `path`.
pub fn commit_file(staged: &Path, path: &Path) -> io::Result<()> {
    fs::rename(staged, path).inspect_err(|_| {
        let _ = fs::remove_file(staged);
    })
}

/// Persists renames in the directory of `path` (not every file system can sync a directory).
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
}

/// Persists the entries of a directory (created and renamed files), where the file system can.
pub fn sync_dir(dir: &Path) {
    let _ = fs::File::open(dir).and_then(|d| d.sync_all());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn bearer_parsing() {
        assert!(matches!(bearer_token(None), Err(AuthError::MissingHeader)));
        assert!(matches!(
            bearer_token(Some(b"Basic abc")),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            bearer_token(Some(b"Bearer")),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            bearer_token(Some(b"Bearer   ")),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            bearer_token(Some(b"Bearer \xff")),
            Err(AuthError::Malformed(_))
        ));
        assert_eq!(bearer_token(Some(b"bearer  cca_x ")).unwrap(), "cca_x");
    }

    #[test]
    fn private_files_are_0600_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin.token");
        write_private_file(&p, b"one").unwrap();
        write_private_file(&p, b"two").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["admin.token"], "no temporary file is left behind");
    }

    #[test]
    fn messages_say_what_to_do() {
        let m = AuthError::JoinToken.user_message();
        assert!(
            m.contains("only enrolls hosts with clusterclaw-agent"),
            "{m}"
        );
        let m = AuthError::MissingHeader.user_message();
        assert!(m.contains("Authorization: Bearer"), "{m}");
        assert!(m.contains("clusterclaw token create"), "{m}");
        // No path: an anonymous caller learns nothing about the server's filesystem.
        for e in [
            AuthError::MissingHeader,
            AuthError::Unknown,
            AuthError::JoinToken,
            AuthError::OidcNotConfigured,
        ] {
            assert!(!e.user_message().contains('/'), "{}", e.user_message());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_revoked_during_its_lookup_is_not_cached() {
        use crate::store::sqlite::SqliteStore;
        use crate::store::testing::HookStore;
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("db")).unwrap();
        let admin = ensure_admin_token(&sqlite, dir.path()).unwrap().unwrap();
        let store = Arc::new(HookStore::new(sqlite));
        let auth = Arc::new(Authenticator::new(
            store.clone() as Arc<dyn Store>,
            dir.path().join(ADMIN_TOKEN_FILE),
        ));
        let header = format!("Bearer {}", admin.token.expose());
        // The token is revoked (and forgotten) after the lookup read it, before it is cached.
        let (hook_store, hook_auth, id) = (store.clone(), auth.clone(), admin.id.clone());
        *store.after_token_lookup.lock().unwrap() = Some(Box::new(move || {
            assert!(hook_store.inner.revoke_token(&id).unwrap());
            hook_auth.forget_token(&id);
        }));
        let in_flight = auth.authenticate(Some(header.as_bytes())).await;
        assert!(
            in_flight.is_ok(),
            "the request in flight read the token before"
        );
        let next = auth.authenticate(Some(header.as_bytes())).await;
        assert!(
            matches!(next, Err(AuthError::Revoked { .. })),
            "the next request must not be served from a stale cache entry: {next:?}"
        );
    }
}
