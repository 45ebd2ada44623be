//! A small OpenID Connect provider for end-to-end tests of console single sign-on: discovery,
//! an authorization endpoint that approves at once (or shows the redirect as a link, to let a
//! test take it apart), a token endpoint that checks the PKCE `code_verifier` against the S256
//! challenge (and the client, the redirect URI and the single use of each code), ES256 ID
//! tokens signed with a key made at start-up, and the JWKS.
//!
//! It runs on `127.0.0.1:0` in a thread of its own; the issuer is `http://<host>:<port>`, with
//! `host` chosen by the test (`localhost` makes it another site than a server reached at
//! `127.0.0.1`, as an identity provider is in real life).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Who signs in, and how the provider behaves; change it between sign-ins.
#[derive(Clone, Debug)]
pub struct Behaviour {
    pub client_id: String,
    /// Checked in HTTP Basic authentication when set.
    pub client_secret: Option<String>,
    pub sub: String,
    pub name: String,
    pub groups: Vec<String>,
    /// Puts this nonce in ID tokens instead of the one the request asked for.
    pub nonce_override: Option<String>,
    /// How long ID tokens live.
    pub lifetime: Duration,
    /// The authorization endpoint shows the way back as a link (`#continue`) instead of
    /// redirecting at once.
    pub hold: bool,
}

struct Grant {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    nonce: String,
}

struct Shared {
    issuer: String,
    key: EcdsaKeyPair,
    rng: SystemRandom,
    behaviour: Mutex<Behaviour>,
    codes: Mutex<HashMap<String, Grant>>,
    /// Why the token endpoint refused each refused request, in order.
    refusals: Mutex<Vec<String>>,
    /// Codes exchanged successfully.
    exchanged: Mutex<u32>,
}

/// The provider; stops when dropped.
pub struct OidcProvider {
    pub issuer: String,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn random_text() -> String {
    let bytes: [u8; 24] = rand_bytes();
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut b).expect("random bytes");
    b
}

impl OidcProvider {
    /// Starts the provider on `127.0.0.1:0`; the issuer names it `host`.
    pub fn start(host: &str, behaviour: Behaviour) -> anyhow::Result<OidcProvider> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let issuer = format!("http://{host}:{port}");
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("cannot make a P-256 key"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("cannot load the P-256 key"))?;
        let shared = Arc::new(Shared {
            issuer: issuer.clone(),
            key,
            rng,
            behaviour: Mutex::new(behaviour),
            codes: Mutex::default(),
            refusals: Mutex::default(),
            exchanged: Mutex::new(0),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .route("/jwks", get(jwks))
            .with_state(Arc::clone(&shared));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        Ok(OidcProvider {
            issuer,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Changes how the provider behaves from now on.
    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.shared.behaviour.lock().unwrap());
    }

    /// Why the token endpoint refused requests so far.
    pub fn refusals(&self) -> Vec<String> {
        self.shared.refusals.lock().unwrap().clone()
    }

    /// How many codes were exchanged for tokens.
    pub fn exchanged(&self) -> u32 {
        *self.shared.exchanged.lock().unwrap()
    }
}

async fn discovery(State(s): State<Arc<Shared>>) -> Response {
    let i = &s.issuer;
    axum::Json(json!({
        "issuer": i,
        "authorization_endpoint": format!("{i}/authorize"),
        "token_endpoint": format!("{i}/token"),
        "jwks_uri": format!("{i}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
    }))
    .into_response()
}

async fn jwks(State(s): State<Arc<Shared>>) -> Response {
    let point = s.key.public_key().as_ref();
    let (x, y) = (&point[1..33], &point[33..65]);
    axum::Json(json!({"keys": [{
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "test-key-1",
        "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
    }]}))
    .into_response()
}

fn pairs(text: &str) -> HashMap<String, String> {
    reqwest::Url::parse(&format!("http://q.invalid/?{text}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

fn bad(status: StatusCode, error: &str, why: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": error, "error_description": why})),
    )
        .into_response()
}

async fn authorize(State(s): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Response {
    let q = pairs(raw.as_deref().unwrap_or_default());
    let b = s.behaviour.lock().unwrap().clone();
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let problem = if get("response_type") != "code" {
        Some("response_type must be code")
    } else if get("client_id") != b.client_id {
        Some("unknown client_id")
    } else if get("code_challenge_method") != "S256" || get("code_challenge").len() != 43 {
        Some("PKCE with S256 is required")
    } else if !get("scope").split(' ').any(|s| s == "openid") {
        Some("the openid scope is required")
    } else if get("state").is_empty() || get("nonce").is_empty() {
        Some("state and nonce are required")
    } else {
        None
    };
    if let Some(p) = problem {
        return (StatusCode::BAD_REQUEST, format!("refused: {p}")).into_response();
    }
    let code = random_text();
    s.codes.lock().unwrap().insert(
        code.clone(),
        Grant {
            client_id: get("client_id"),
            redirect_uri: get("redirect_uri"),
            challenge: get("code_challenge"),
            nonce: get("nonce"),
        },
    );
    let mut back = match reqwest::Url::parse(&get("redirect_uri")) {
        Ok(u) => u,
        Err(_) => return (StatusCode::BAD_REQUEST, "bad redirect_uri").into_response(),
    };
    back.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &get("state"));
    if b.hold {
        let page = format!(
            "<!doctype html><title>Test IdP</title><p><a id=\"continue\" href=\"{}\">Continue</a></p>",
            back.as_str().replace('&', "&amp;")
        );
        return ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response();
    }
    (StatusCode::FOUND, [(header::LOCATION, back.to_string())]).into_response()
}

async fn token(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let resp = exchange(&s, &headers, &String::from_utf8_lossy(&body));
    match resp {
        Ok(v) => {
            *s.exchanged.lock().unwrap() += 1;
            axum::Json(v).into_response()
        }
        Err(why) => {
            s.refusals.lock().unwrap().push(why.clone());
            bad(StatusCode::BAD_REQUEST, "invalid_grant", &why)
        }
    }
}

fn exchange(s: &Shared, headers: &HeaderMap, body: &str) -> Result<Value, String> {
    let q = pairs(body);
    let b = s.behaviour.lock().unwrap().clone();
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    if get("grant_type") != "authorization_code" {
        return Err("grant_type must be authorization_code".into());
    }
    if let Some(secret) = &b.client_secret {
        // RFC 6749 §2.3.1: Basic of the form-encoded id and secret.
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|v| STANDARD.decode(v).ok())
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| {
                let (id, pw) = v.split_once(':')?;
                let decoded = pairs(&format!("id={id}&pw={pw}"));
                Some((decoded.get("id")?.clone(), decoded.get("pw")?.clone()))
            });
        if got != Some((b.client_id.clone(), secret.clone())) {
            return Err("the client did not authenticate".into());
        }
    }
    // A code is used once, whatever happens next.
    let grant = s
        .codes
        .lock()
        .unwrap()
        .remove(&get("code"))
        .ok_or("unknown or used code")?;
    if grant.client_id != get("client_id") {
        return Err("the code was issued to another client".into());
    }
    if grant.redirect_uri != get("redirect_uri") {
        return Err("redirect_uri differs from the authorization request's".into());
    }
    let verifier = get("code_verifier");
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    if verifier.len() < 43 || challenge != grant.challenge {
        return Err("code_verifier does not match the code_challenge".into());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = json!({
        "iss": s.issuer,
        "sub": b.sub,
        "aud": b.client_id,
        "azp": b.client_id,
        "iat": now,
        "exp": now + b.lifetime.as_secs(),
        "nonce": b.nonce_override.clone().unwrap_or(grant.nonce),
        "preferred_username": b.name,
        "groups": b.groups,
    });
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": "test-key-1"});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = s
        .key
        .sign(&s.rng, signing_input.as_bytes())
        .map_err(|_| "cannot sign".to_string())?;
    let id_token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
    Ok(json!({
        "access_token": random_text(),
        "token_type": "Bearer",
        "expires_in": b.lifetime.as_secs(),
        "id_token": id_token,
    }))
}
