//! OpenID Connect single sign-on: verifies bearer JWTs from the configured issuers (signature
//! against the issuer's published keys, `iss`, `aud`, `exp`, `nbf`, with clock skew) and maps
//! the user's groups to a role, tenant and project.
//!
//! How a token is checked, in order, each step refusing with its own [`OidcError`]:
//!
//! 1. size (at most [`MAX_TOKEN_BYTES`]) and shape (three base64url parts, JSON header and
//!    payload);
//! 2. the header's `alg`: `none` and shared-secret algorithms (HS*) are refused outright,
//!    anything else must be in the issuer's `allowed_algorithms`; headers with `crit` are
//!    refused;
//! 3. the issuer, chosen by the payload's `iss`, which must equal a configured `issuer`;
//! 4. the key: the issuer's JWKS entry named by `kid` (fetched on first use, again when a
//!    `kid` is unknown, at most once per [`VerifierOptions::min_refresh_interval`]). The
//!    algorithm is pinned by the key: its type, its own `alg` and the configuration decide
//!    which algorithms it verifies, and the header's `alg` must be one of them, so a token
//!    cannot pick how its signature is checked (no algorithm confusion);
//! 5. the signature, then `exp` (required), `nbf`, `iss` and `aud` (required), allowing the
//!    issuer's `clock_skew`;
//! 6. the groups claim against the issuer's mappings (see [`IssuerSettings::mapping_for`]).
//!
//! Neither errors nor logs ever contain the token.

mod config;
mod crypto;
mod jwks;
pub mod sso;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, Validation};
use serde_json::{Map, Value};

use super::Principal;
use crate::util::rfc3339_u64;
use jwks::{B64URL, KeySet, KeySource, Refresh, VerifyKey};

/// Makes ring the process-wide crypto of `jsonwebtoken`; see [`crate::crypto::install`].
pub(crate) fn install_crypto() {
    crypto::install();
}

pub use config::{
    CALLBACK_PATH, ClientSecret, ConsoleLogin, DEFAULT_ALGORITHMS, DEFAULT_CLOCK_SKEW,
    DEFAULT_GROUPS_CLAIM, DEFAULT_SCOPES, DEFAULT_USERNAME_CLAIM, IssuerConfig, IssuerSettings,
    MAX_CLOCK_SKEW, MappingConfig, OidcConfig, OidcConfigProblem, OidcSettings, OneOrMany,
    PROJECT_EDITOR, ROLES_BY_PRIVILEGE, RoleMapping, SUPPORTED_ALGORITHMS, TENANT_ADMIN, VIEWER,
    algorithm_names, privilege_rank,
};

/// The longest token accepted, in bytes. Real ID and access tokens are 1 to 4 KiB.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Prefix of the `token_id` of a principal signed in through OIDC: `oidc:<issuer>:<sub>`.
pub const PRINCIPAL_PREFIX: &str = "oidc:";

/// Whether `token` has the shape of a JWT (three base64url parts separated by dots, the
/// first two non-empty), so the caller can route it here rather than to API-token checks.
/// Cheap; says nothing about validity.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let b64url = |s: &str| {
        s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    !header.is_empty()
        && !payload.is_empty()
        && b64url(header)
        && b64url(payload)
        && b64url(signature)
}

/// Tuning of key fetching; the defaults suit production.
#[derive(Clone, Debug)]
pub struct VerifierOptions {
    /// The shortest time between two fetches of an issuer's keys, whatever asks for them
    /// (unknown `kid`s, an old key set): a flood of tokens with random `kid`s costs the
    /// identity provider one request per interval.
    pub min_refresh_interval: Duration,
    /// Keys older than this are fetched again in the background, so withdrawn keys stop
    /// working; the cached keys stay in use while the issuer is unreachable.
    pub max_key_age: Duration,
    /// Limit of one discovery or key-set request, connection included.
    pub fetch_timeout: Duration,
}

impl Default for VerifierOptions {
    fn default() -> Self {
        VerifierOptions {
            min_refresh_interval: Duration::from_secs(30),
            max_key_age: Duration::from_secs(15 * 60),
            fetch_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a bearer JWT was refused. None of the messages contains the token.
///
/// For an HTTP answer: [`OidcError::KeysUnavailable`] is the server's problem (503), and
/// [`OidcError::NoRole`] is an authenticated user without access (403); every other variant
/// means the token is not acceptable (401).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    #[error("the token is {len} bytes long; at most {max} are accepted")]
    TooLarge { len: usize, max: usize },
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error(
        "the token is unsigned (alg \"none\"); only tokens signed by a trusted issuer are accepted"
    )]
    Unsigned,
    #[error(
        "the token is signed with {0:?}, a shared-secret algorithm; only tokens signed with an issuer's private key are accepted"
    )]
    SharedSecretAlgorithm(Algorithm),
    #[error("the token's signature algorithm is not one this server knows")]
    UnknownAlgorithm,
    #[error(
        "the token is signed with {alg:?}, which is not allowed for {issuer}; allowed: {allowed}"
    )]
    DisallowedAlgorithm {
        alg: Algorithm,
        issuer: String,
        allowed: String,
    },
    #[error("the token's issuer (iss) is not trusted by this server; trusted: {trusted}")]
    UnknownIssuer { trusted: String },
    #[error("the token is signed with a key (kid) that {issuer} does not publish{}", note_suffix(.note))]
    UnknownKey {
        issuer: String,
        /// Why the key set may be out of date.
        note: Option<String>,
    },
    #[error("the token names no key (kid) and {issuer} publishes several keys for {alg:?}")]
    AmbiguousKey { issuer: String, alg: Algorithm },
    #[error(
        "the token claims algorithm {alg:?}, but the key it names verifies only {key_algorithms}"
    )]
    AlgorithmMismatch {
        alg: Algorithm,
        key_algorithms: String,
    },
    #[error(
        "the token's signature does not verify with its issuer's key: the token was altered or signed by someone else"
    )]
    BadSignature,
    #[error("the token expired at {at} (with {skew_secs}s of allowed clock skew); sign in again")]
    Expired { at: String, skew_secs: u64 },
    #[error(
        "the token is not valid before {at} (with {skew_secs}s of allowed clock skew); check the clocks"
    )]
    NotYetValid { at: String, skew_secs: u64 },
    #[error("the token has no '{0}' claim, which is required")]
    MissingClaim(String),
    #[error("the token's '{claim}' claim {problem}")]
    InvalidClaim { claim: String, problem: String },
    #[error("the token is meant for another audience: its 'aud' holds none of {expected}")]
    WrongAudience { expected: String },
    #[error(
        "{user} (signed in by {issuer}) has no role on this server: none of the {groups} group(s) in the token's '{claim}' claim matches a configured mapping"
    )]
    NoRole {
        user: String,
        issuer: String,
        claim: String,
        groups: usize,
    },
    #[error("the signing keys of {issuer} cannot be fetched: {reason}")]
    KeysUnavailable { issuer: String, reason: String },
    #[error("the token could not be checked: {0}")]
    Internal(String),
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn note_suffix(note: &Option<String>) -> String {
    note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
}

/// Failure to set up an [`OidcVerifier`].
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the HTTP client for the OIDC issuer {issuer}: {reason}")]
pub struct OidcSetupError {
    pub issuer: String,
    pub reason: String,
}

struct Issuer {
    settings: IssuerSettings,
    keys: Arc<KeySource>,
    http: reqwest::Client,
    /// The endpoints of console single sign-on.
    discovery: tokio::sync::Mutex<sso::DiscoveryCache>,
}

/// Which audiences a JWT may be for: the API's (`audience` of the issuer), or on the
/// console's sign-in and sessions also the issuer's console client id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Audience {
    Api,
    Console,
}

/// Verifies bearer JWTs against the configured issuers. Cheap to share (`Arc`); the key
/// caches live inside.
pub struct OidcVerifier {
    issuers: Vec<Issuer>,
    external_url: Option<reqwest::Url>,
}

/// Why a console sign-in's ID token was refused: the token's own problem, or a claim that
/// does not belong to this sign-in.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    #[error(transparent)]
    Token(#[from] OidcError),
    #[error("the ID token was issued by {got}, not by {expected}, where this sign-in began")]
    OtherIssuer { got: String, expected: String },
    #[error("the ID token was issued to another client: its 'aud' does not hold {client_id}")]
    OtherClient { client_id: String },
    #[error("the ID token's 'azp' names another client than {client_id}")]
    OtherParty { client_id: String },
    #[error(
        "the ID token's nonce does not match this sign-in's: it was issued for another sign-in (a replay)"
    )]
    WrongNonce,
}

impl OidcVerifier {
    /// Builds the verifier; fetches nothing yet (see [`OidcVerifier::warm_up`]). The process's
    /// crypto providers must be installed first ([`crate::crypto::install`], done by `main`).
    pub fn new(settings: &OidcSettings, options: VerifierOptions) -> Result<Self, OidcSetupError> {
        let mut issuers = Vec::new();
        for s in &settings.issuers {
            let mut builder = reqwest::Client::builder()
                .tls_backend_rustls()
                .connect_timeout(options.fetch_timeout)
                .timeout(options.fetch_timeout)
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("clusterclaw/", env!("CARGO_PKG_VERSION")));
            if !s.ca_certs.is_empty() {
                let certs = s
                    .ca_certs
                    .iter()
                    .map(|der| reqwest::Certificate::from_der(der))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| OidcSetupError {
                        issuer: s.issuer.clone(),
                        reason: format!("a CA certificate is not usable: {e}"),
                    })?;
                builder = builder.tls_certs_only(certs);
            }
            let http = builder.build().map_err(|e| OidcSetupError {
                issuer: s.issuer.clone(),
                reason: e.to_string(),
            })?;
            issuers.push(Issuer {
                keys: Arc::new(KeySource::new(s, http.clone(), options.clone())),
                settings: s.clone(),
                http,
                discovery: Default::default(),
            });
        }
        Ok(OidcVerifier {
            issuers,
            external_url: settings.external_url.clone(),
        })
    }

    /// The issuers the console offers single sign-on with: their index and their settings.
    pub fn console_logins(&self) -> impl Iterator<Item = (usize, &ConsoleLogin)> {
        self.issuers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.settings.console.as_ref().map(|c| (i, c)))
    }

    /// Issuer `index` when it offers console single sign-on.
    pub fn console_login(&self, index: usize) -> Option<(&str, &ConsoleLogin)> {
        let i = self.issuers.get(index)?;
        Some((i.settings.issuer.as_str(), i.settings.console.as_ref()?))
    }

    /// `external_url`: where browsers reach the console, when configured.
    pub fn external_url(&self) -> Option<&reqwest::Url> {
        self.external_url.as_ref()
    }

    /// The authorization and token endpoints of issuer `index` (from its discovery document,
    /// cached).
    pub async fn endpoints(&self, index: usize) -> Result<Arc<sso::Endpoints>, String> {
        let i = self
            .issuers
            .get(index)
            .ok_or_else(|| format!("no issuer number {index}"))?;
        sso::endpoints(&i.http, &i.settings.issuer, &i.discovery).await
    }

    /// Exchanges a code from issuer `index` for its ID token (not verified yet).
    pub async fn exchange_code(
        &self,
        index: usize,
        code: &str,
        verifier: &str,
        redirect_uri: &str,
    ) -> Result<String, String> {
        let i = self
            .issuers
            .get(index)
            .ok_or_else(|| format!("no issuer number {index}"))?;
        let login = i
            .settings
            .console
            .as_ref()
            .ok_or_else(|| format!("{} has no console single sign-on", i.settings.issuer))?;
        let endpoints = sso::endpoints(&i.http, &i.settings.issuer, &i.discovery).await?;
        sso::exchange_code(&i.http, &endpoints, login, code, verifier, redirect_uri).await
    }

    /// Checks the ID token of a console sign-in begun with issuer `index`: everything
    /// [`OidcVerifier::verify`] checks, and that it was issued by that issuer to its console
    /// client (`aud`, and `azp` when present) for this sign-in (`nonce`). Returns the user and
    /// the token's expiry (seconds since 1970).
    pub async fn verify_id_token(
        &self,
        index: usize,
        token: &str,
        nonce: &str,
    ) -> Result<(Principal, u64), IdTokenError> {
        let expected = self
            .issuers
            .get(index)
            .ok_or_else(|| OidcError::Internal(format!("no issuer number {index}")))?;
        let client_id = expected
            .settings
            .console
            .as_ref()
            .map(|c| c.client_id.clone())
            .ok_or_else(|| OidcError::Internal("no console client".into()))?;
        let (issuer, claims) = self.verified_claims(token, Audience::Console).await?;
        if issuer.settings.issuer != expected.settings.issuer {
            return Err(IdTokenError::OtherIssuer {
                got: issuer.settings.issuer.clone(),
                expected: expected.settings.issuer.clone(),
            });
        }
        let for_client = match claims.get("aud") {
            Some(Value::String(a)) => a == &client_id,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(&client_id)),
            _ => false,
        };
        if !for_client {
            return Err(IdTokenError::OtherClient { client_id });
        }
        if let Some(azp) = claims.get("azp")
            && azp.as_str() != Some(client_id.as_str())
        {
            return Err(IdTokenError::OtherParty { client_id });
        }
        let sent = claims.get("nonce").and_then(Value::as_str).unwrap_or("");
        if !constant_time_eq(sent.as_bytes(), nonce.as_bytes()) {
            return Err(IdTokenError::WrongNonce);
        }
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| OidcError::MissingClaim("exp".into()))?;
        Ok((principal(&issuer.settings, &claims)?, exp))
    }

    /// Whether no issuer is configured (then no JWT is ever accepted).
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Fetches every issuer's keys now, so the first sign-in does not wait for them. Returns
    /// the issuers whose keys could not be fetched, with the reason; those are fetched again
    /// when a token needs them.
    pub async fn warm_up(&self) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        for i in &self.issuers {
            let generation = i.keys.current().generation;
            match i.keys.refresh(generation).await {
                Refresh::Done => {}
                Refresh::Failed(e) | Refresh::Skipped(Some(e)) => {
                    failed.push((i.settings.issuer.clone(), e));
                }
                Refresh::Skipped(None) => {}
            }
        }
        failed
    }

    /// Checks a bearer JWT and returns who it stands for.
    pub async fn verify(&self, token: &str) -> Result<Principal, OidcError> {
        let (issuer, claims) = self.verified_claims(token, Audience::Api).await?;
        principal(&issuer.settings, &claims)
    }

    /// Checks the JWT of a console session (an ID token a console sign-in took): as
    /// [`OidcVerifier::verify`], with the issuer's console client id also an audience.
    pub async fn verify_console(&self, token: &str) -> Result<Principal, OidcError> {
        let (issuer, claims) = self.verified_claims(token, Audience::Console).await?;
        principal(&issuer.settings, &claims)
    }

    /// The issuer and the claims of a JWT whose signature, `iss`, `aud`, `exp` and `nbf`
    /// check out.
    async fn verified_claims(
        &self,
        token: &str,
        audience: Audience,
    ) -> Result<(&Issuer, Map<String, Value>), OidcError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(OidcError::TooLarge {
                len: token.len(),
                max: MAX_TOKEN_BYTES,
            });
        }
        let (header_b64, payload_b64, signature_b64) = split(token)?;
        let header = parse_header(header_b64)?;
        if signature_b64.is_empty() {
            return Err(OidcError::Malformed("it has no signature".into()));
        }
        let claims = decode_json(payload_b64, "payload")?;
        let iss = match claims.get("iss") {
            None => return Err(OidcError::MissingClaim("iss".into())),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(OidcError::InvalidClaim {
                    claim: "iss".into(),
                    problem: "is not a string".into(),
                });
            }
        };
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.settings.issuer == iss)
            .ok_or_else(|| OidcError::UnknownIssuer {
                trusted: if self.issuers.is_empty() {
                    "none configured".into()
                } else {
                    self.issuers
                        .iter()
                        .map(|i| i.settings.issuer.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })?;
        let s = &issuer.settings;
        if !s.algorithms.contains(&header.alg) {
            return Err(OidcError::DisallowedAlgorithm {
                alg: header.alg,
                issuer: s.issuer.clone(),
                allowed: algorithm_names(&s.algorithms),
            });
        }
        let keys = issuer.key_set(header.kid.as_deref(), header.alg).await?;
        let key = find_key(&keys, header.kid.as_deref(), header.alg, s)?
            .ok_or_else(|| OidcError::Internal("the key vanished from the key set".into()))?;

        let mut validation = Validation::new(header.alg);
        validation.leeway = s.clock_skew.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        let mut audiences = s.audiences.clone();
        if audience == Audience::Console
            && let Some(c) = &s.console
            && !audiences.contains(&c.client_id)
        {
            audiences.push(c.client_id.clone());
        }
        validation.set_audience(&audiences);
        validation.set_issuer(&[&s.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let verified = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|e| map_jwt_error(e.into_kind(), header.alg, &claims, s))?;
        Ok((issuer, verified.claims))
    }
}

impl Issuer {
    /// The key set, fetched first when it is empty or lacks the token's key.
    async fn key_set(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<KeySet>, OidcError> {
        let set = self.keys.current();
        if set.fetched.is_some() && find_key(&set, kid, alg, &self.settings)?.is_some() {
            self.keys.refresh_if_stale(&set);
            return Ok(set);
        }
        let outcome = self.keys.refresh(set.generation).await;
        let set = self.keys.current();
        let note = match outcome {
            Refresh::Done => None,
            Refresh::Failed(e) | Refresh::Skipped(Some(e)) => {
                Some(format!("the key set could not be refreshed: {e}"))
            }
            Refresh::Skipped(None) => Some("the key set was refreshed moments ago".into()),
        };
        if set.fetched.is_none() {
            return Err(OidcError::KeysUnavailable {
                issuer: self.settings.issuer.clone(),
                reason: note.unwrap_or_else(|| "no key set was fetched yet".into()),
            });
        }
        match find_key(&set, kid, alg, &self.settings)? {
            Some(_) => Ok(set),
            None => Err(OidcError::UnknownKey {
                issuer: self.settings.issuer.clone(),
                note,
            }),
        }
    }
}

/// The key that verifies a token with `kid` and `alg`: `Ok(None)` when the set has no key
/// for it (a refresh may help), an error when the token cannot fit any key of the set.
fn find_key<'a>(
    set: &'a KeySet,
    kid: Option<&str>,
    alg: Algorithm,
    s: &IssuerSettings,
) -> Result<Option<&'a VerifyKey>, OidcError> {
    match kid {
        Some(kid) => {
            let mut named = set.keys.iter().filter(|k| k.kid.as_deref() == Some(kid));
            let Some(first) = named.clone().next() else {
                return Ok(None);
            };
            if let Some(k) = named.find(|k| k.algorithms.contains(&alg)) {
                return Ok(Some(k));
            }
            Err(OidcError::AlgorithmMismatch {
                alg,
                key_algorithms: algorithm_names(&first.algorithms),
            })
        }
        None => {
            let mut fits = set.keys.iter().filter(|k| k.algorithms.contains(&alg));
            match (fits.next(), fits.next()) {
                (None, _) => Ok(None),
                (Some(k), None) => Ok(Some(k)),
                (Some(_), Some(_)) => Err(OidcError::AmbiguousKey {
                    issuer: s.issuer.clone(),
                    alg,
                }),
            }
        }
    }
}

fn split(token: &str) -> Result<(&str, &str, &str), OidcError> {
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) if !h.is_empty() && !p.is_empty() => Ok((h, p, s)),
        (Some(_), Some(_), Some(_), None) => Err(OidcError::Malformed(
            "its header or payload is empty".into(),
        )),
        _ => Err(OidcError::Malformed(
            "a JWT is three base64url parts separated by dots (header.payload.signature)".into(),
        )),
    }
}

fn decode_json(part: &str, name: &str) -> Result<Map<String, Value>, OidcError> {
    if part.ends_with('=') {
        return Err(OidcError::Malformed(format!(
            "its {name} is padded; JWT parts are unpadded base64url"
        )));
    }
    let bytes = B64URL
        .decode(part)
        .map_err(|_| OidcError::Malformed(format!("its {name} is not base64url")))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(OidcError::Malformed(format!(
            "its {name} is not a JSON object"
        ))),
        Err(_) => Err(OidcError::Malformed(format!("its {name} is not JSON"))),
    }
}

struct Header {
    alg: Algorithm,
    kid: Option<String>,
}

fn parse_header(part: &str) -> Result<Header, OidcError> {
    let map = decode_json(part, "header")?;
    let alg = match map.get("alg") {
        Some(Value::String(a)) => a.as_str(),
        Some(_) => {
            return Err(OidcError::Malformed(
                "its header's 'alg' is not a string".into(),
            ));
        }
        None => return Err(OidcError::Malformed("its header has no 'alg'".into())),
    };
    if alg.eq_ignore_ascii_case("none") {
        return Err(OidcError::Unsigned);
    }
    let alg: Algorithm = alg.parse().map_err(|_| OidcError::UnknownAlgorithm)?;
    if alg.family() == AlgorithmFamily::Hmac {
        return Err(OidcError::SharedSecretAlgorithm(alg));
    }
    if map.contains_key("crit") {
        return Err(OidcError::Malformed(
            "its header lists critical extensions ('crit'), which this server does not support"
                .into(),
        ));
    }
    let kid = match map.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => {
            return Err(OidcError::Malformed(
                "its header's 'kid' is not a string".into(),
            ));
        }
    };
    Ok(Header { alg, kid })
}

fn time_claim(claims: &Map<String, Value>, name: &str) -> String {
    match claims.get(name).and_then(Value::as_u64) {
        Some(t) => rfc3339_u64(t),
        None => "an unreadable time".into(),
    }
}

fn map_jwt_error(
    kind: ErrorKind,
    alg: Algorithm,
    claims: &Map<String, Value>,
    s: &IssuerSettings,
) -> OidcError {
    let skew_secs = s.clock_skew.as_secs();
    match kind {
        ErrorKind::InvalidSignature => OidcError::BadSignature,
        ErrorKind::ExpiredSignature => OidcError::Expired {
            at: time_claim(claims, "exp"),
            skew_secs,
        },
        ErrorKind::ImmatureSignature => OidcError::NotYetValid {
            at: time_claim(claims, "nbf"),
            skew_secs,
        },
        // The library reports a claim it cannot read as missing.
        ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c)
            if claims.get(&c).is_some_and(|v| !v.is_null()) =>
        {
            let problem = match c.as_str() {
                "exp" | "nbf" => "is not a number of seconds since 1970",
                _ => "is neither a string nor a list of strings",
            };
            OidcError::InvalidClaim {
                claim: c,
                problem: problem.into(),
            }
        }
        ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) => {
            OidcError::MissingClaim(c)
        }
        ErrorKind::InvalidAudience => OidcError::WrongAudience {
            expected: s.audiences.join(", "),
        },
        ErrorKind::InvalidIssuer => OidcError::UnknownIssuer {
            trusted: s.issuer.clone(),
        },
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => {
            OidcError::Malformed("its parts do not decode as a signed JWT".into())
        }
        // The key and the algorithm were matched before: the library disagreeing is a bug.
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            OidcError::Internal(format!("the key does not accept {alg:?}"))
        }
        other => OidcError::Internal(format!("{other:?}")),
    }
}

fn string_claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Result<&'a str, OidcError> {
    match claims.get(name) {
        None | Some(Value::Null) => Err(OidcError::MissingClaim(name.into())),
        Some(Value::String(v)) if !v.trim().is_empty() => Ok(v),
        Some(Value::String(_)) => Err(OidcError::InvalidClaim {
            claim: name.into(),
            problem: "is empty".into(),
        }),
        Some(_) => Err(OidcError::InvalidClaim {
            claim: name.into(),
            problem: "is not a string".into(),
        }),
    }
}

/// The principal of verified claims: `token_id` is `oidc:<issuer>:<sub>` (stable per user),
/// `token_name` the username claim, role/tenant/project from the best mapping.
fn principal(s: &IssuerSettings, claims: &Map<String, Value>) -> Result<Principal, OidcError> {
    let sub = string_claim(claims, "sub")?;
    let user = string_claim(claims, &s.username_claim)?;
    let groups: Vec<&str> = match claims.get(&s.groups_claim) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(g)) => vec![g.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        Some(_) => {
            return Err(OidcError::InvalidClaim {
                claim: s.groups_claim.clone(),
                problem: "is neither a list of group names nor a group name".into(),
            });
        }
    };
    let Some(m) = s.mapping_for(&groups) else {
        return Err(OidcError::NoRole {
            user: user.to_string(),
            issuer: s.issuer.clone(),
            claim: s.groups_claim.clone(),
            groups: groups.len(),
        });
    };
    Ok(Principal {
        token_id: format!("{PRINCIPAL_PREFIX}{}:{sub}", s.short_name()),
        token_name: user.to_string(),
        role: m.role.clone(),
        tenant: m.tenant.clone(),
        project: m.project.clone(),
    })
}
