//! The issuer's side of console single sign-on (OpenID Connect authorization code flow with
//! PKCE, S256): the discovery document's endpoints (cached), the authorization request, the
//! code exchange at the token endpoint, and PKCE itself.
//!
//! The console's side (state, nonce, the pending sign-ins, the session) is in
//! `crate::ui::sso`. Neither errors nor logs contain a code, a verifier, a secret or a token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::Url;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::config::{ConsoleLogin, check_url};
use super::jwks::{DISCOVERY_PATH, error_chain, get_json, read_json};

/// How long discovered endpoints are used before the document is read again.
pub const DISCOVERY_MAX_AGE: Duration = Duration::from_secs(60 * 60);
/// After a failed discovery, how long the failure is answered before trying again.
pub const DISCOVERY_RETRY: Duration = Duration::from_secs(10);
/// Length of a PKCE code verifier made here (RFC 7636 allows 43 to 128 characters).
pub const VERIFIER_LEN: usize = 64;

/// The endpoints of an issuer the console needs.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub authorization: Url,
    pub token: Url,
    /// The token endpoint takes the client secret in the body (`client_secret_post`) rather
    /// than in HTTP Basic authentication.
    pub secret_in_body: bool,
}

#[derive(Default)]
pub(super) struct DiscoveryCache {
    endpoints: Option<(Arc<Endpoints>, Instant)>,
    failure: Option<(String, Instant)>,
}

/// A PKCE code verifier: 64 characters of base64url from 48 random bytes.
pub fn pkce_verifier() -> String {
    let bytes: [u8; 48] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The S256 challenge of `verifier`: base64url (unpadded) of its SHA-256.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// Whether `v` is a well-formed code verifier (RFC 7636 §4.1).
pub fn is_pkce_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// What one authorization request carries besides the client's settings.
pub struct AuthRequest<'a> {
    pub redirect_uri: &'a str,
    pub state: &'a str,
    pub nonce: &'a str,
    pub challenge: &'a str,
}

/// The address the browser is sent to: the authorization endpoint with the request in its
/// query (any query the endpoint already has is kept).
pub fn authorization_url(endpoints: &Endpoints, login: &ConsoleLogin, r: &AuthRequest) -> Url {
    let mut url = endpoints.authorization.clone();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &login.client_id)
        .append_pair("redirect_uri", r.redirect_uri)
        .append_pair("scope", &login.scopes.join(" "))
        .append_pair("state", r.state)
        .append_pair("nonce", r.nonce)
        .append_pair("code_challenge", r.challenge)
        .append_pair("code_challenge_method", "S256");
    url
}

/// `application/x-www-form-urlencoded` of `pairs`.
fn form(pairs: &[(&str, &str)]) -> String {
    let mut u = Url::parse("http://form.invalid/").expect("a constant URL");
    {
        let mut q = u.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
    }
    u.query().unwrap_or_default().to_string()
}

/// The issuer's discovery document, read again when older than [`DISCOVERY_MAX_AGE`].
pub(super) async fn endpoints(
    http: &reqwest::Client,
    issuer: &str,
    cache: &tokio::sync::Mutex<DiscoveryCache>,
) -> Result<Arc<Endpoints>, String> {
    let mut c = cache.lock().await;
    if let Some((e, at)) = &c.endpoints
        && at.elapsed() < DISCOVERY_MAX_AGE
    {
        return Ok(Arc::clone(e));
    }
    if let Some((why, at)) = &c.failure
        && at.elapsed() < DISCOVERY_RETRY
    {
        // Keep what worked while the issuer is unreachable.
        if let Some((e, _)) = &c.endpoints {
            return Ok(Arc::clone(e));
        }
        return Err(why.clone());
    }
    match discover(http, issuer).await {
        Ok(e) => {
            let e = Arc::new(e);
            c.endpoints = Some((Arc::clone(&e), Instant::now()));
            c.failure = None;
            Ok(e)
        }
        Err(why) => {
            tracing::warn!(%issuer, error = %why, "cannot read the issuer's discovery document for console single sign-on");
            c.failure = Some((why.clone(), Instant::now()));
            match &c.endpoints {
                Some((e, _)) => Ok(Arc::clone(e)),
                None => Err(why),
            }
        }
    }
}

async fn discover(http: &reqwest::Client, issuer: &str) -> Result<Endpoints, String> {
    #[derive(Deserialize)]
    struct Doc {
        issuer: Option<String>,
        authorization_endpoint: Option<String>,
        token_endpoint: Option<String>,
        code_challenge_methods_supported: Option<Vec<String>>,
        token_endpoint_auth_methods_supported: Option<Vec<String>>,
    }
    let url = format!("{}{DISCOVERY_PATH}", issuer.trim_end_matches('/'));
    let url =
        Url::parse(&url).map_err(|e| format!("cannot build the discovery address {url:?}: {e}"))?;
    let doc: Doc = get_json(http, &url, "the discovery document").await?;
    if doc.issuer.as_deref() != Some(issuer) {
        return Err(format!(
            "the discovery document at {url} names issuer {:?}, not {issuer:?}; check the issuer setting",
            doc.issuer.unwrap_or_default()
        ));
    }
    let endpoint = |v: Option<String>, name: &str| {
        let v = v.ok_or_else(|| format!("the discovery document at {url} has no {name}"))?;
        check_url(&v, false)
            .map_err(|e| format!("the discovery document at {url} names a bad {name}: {e}"))
    };
    let authorization = endpoint(doc.authorization_endpoint, "authorization_endpoint")?;
    let token = endpoint(doc.token_endpoint, "token_endpoint")?;
    if let Some(methods) = &doc.code_challenge_methods_supported
        && !methods.iter().any(|m| m == "S256")
    {
        return Err(format!(
            "the issuer does not support PKCE with S256 (its code_challenge_methods_supported: {}); the console signs in only with S256",
            methods.join(", ")
        ));
    }
    let secret_in_body = doc
        .token_endpoint_auth_methods_supported
        .as_ref()
        .is_some_and(|m| {
            !m.iter().any(|m| m == "client_secret_basic")
                && m.iter().any(|m| m == "client_secret_post")
        });
    Ok(Endpoints {
        authorization,
        token,
        secret_in_body,
    })
}

/// Exchanges an authorization code for the ID token, proving the flow with the PKCE
/// `verifier`. The error says what the token endpoint answered, never the code or a token.
pub(super) async fn exchange_code(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    login: &ConsoleLogin,
    code: &str,
    verifier: &str,
    redirect_uri: &str,
) -> Result<String, String> {
    #[derive(Deserialize)]
    struct TokenAnswer {
        id_token: Option<String>,
    }
    let mut pairs = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect_uri),
        ("code_verifier", verifier),
        ("client_id", login.client_id.as_str()),
    ];
    let mut req = http
        .post(endpoints.token.clone())
        .header(ACCEPT, "application/json")
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(secret) = &login.client_secret {
        if endpoints.secret_in_body {
            pairs.push(("client_secret", secret.0.as_str()));
        } else {
            // RFC 6749 §2.3.1: both parts form-encoded, then Basic.
            let id = form(&[("", &login.client_id)]);
            let pw = form(&[("", &secret.0)]);
            let basic = format!(
                "{}:{}",
                id.trim_start_matches('='),
                pw.trim_start_matches('=')
            );
            req = req.header(
                AUTHORIZATION,
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(basic)
                ),
            );
        }
    }
    let url = endpoints.token.clone();
    let resp = req
        .body(form(&pairs))
        .send()
        .await
        .map_err(|e| format!("cannot reach the token endpoint {url}: {}", error_chain(&e)))?;
    let answer: TokenAnswer = read_json(resp, &url, "the code exchange").await?;
    answer
        .id_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("the token endpoint {url} answered without an id_token; is the \"openid\" scope allowed for this client?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_matches_rfc_7636() {
        // RFC 7636, appendix B.
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let v = pkce_verifier();
        assert_eq!(v.len(), VERIFIER_LEN);
        assert!(is_pkce_verifier(&v), "{v}");
        assert_ne!(v, pkce_verifier());
        assert_eq!(pkce_challenge(&v).len(), 43);
        assert!(!is_pkce_verifier("short"));
        assert!(!is_pkce_verifier(&"a".repeat(129)));
        assert!(!is_pkce_verifier(&format!("{}+", "a".repeat(50))));
        assert!(is_pkce_verifier(&"a~._-".repeat(9)));
    }

    #[test]
    fn the_authorization_request_carries_everything() {
        let e = Endpoints {
            authorization: Url::parse("https://idp.example.com/auth?tenant=x").unwrap(),
            token: Url::parse("https://idp.example.com/token").unwrap(),
            secret_in_body: false,
        };
        let login = ConsoleLogin {
            client_id: "cc console".into(),
            client_secret: None,
            redirect_url: None,
            scopes: vec!["openid".into(), "groups".into()],
            display_name: "IdP".into(),
        };
        let url = authorization_url(
            &e,
            &login,
            &AuthRequest {
                redirect_uri: "https://cc.example.com/ui/login/oidc/callback",
                state: "s1",
                nonce: "n1",
                challenge: "c1",
            },
        );
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["tenant"], "x");
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["client_id"], "cc console");
        assert_eq!(
            q["redirect_uri"],
            "https://cc.example.com/ui/login/oidc/callback"
        );
        assert_eq!(q["scope"], "openid groups");
        assert_eq!(q["state"], "s1");
        assert_eq!(q["nonce"], "n1");
        assert_eq!(q["code_challenge"], "c1");
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(form(&[("a", "b c&d"), ("e", "")]), "a=b+c%26d&e=");
    }
}
