//! An issuer's signing keys: discovery, JWKS fetching and parsing, and a cache refreshed on
//! demand (an unknown `kid`, an old key set) at most once per interval, with concurrent
//! refreshes coalesced into one fetch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use reqwest::Url;
use reqwest::header::{ACCEPT, LOCATION};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::VerifierOptions;
use super::config::{IssuerSettings, check_url};

/// The largest discovery document or key set read.
pub(super) const MAX_DOCUMENT_BYTES: usize = 512 * 1024;
/// The most keys kept from one key set.
pub(super) const MAX_KEYS: usize = 100;
/// The path of the discovery document under the issuer.
pub(super) const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// base64url, with or without padding (JWKs are unpadded; some publishers pad).
pub(super) const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A public key and the algorithms it may verify: those its type allows, narrowed to the
/// JWK's own `alg` when it has one, and to the issuer's allowed algorithms. The token's header
/// only chooses among these.
pub(super) struct VerifyKey {
    pub kid: Option<String>,
    pub algorithms: Vec<Algorithm>,
    pub key: DecodingKey,
}

/// The keys of one fetch.
#[derive(Default)]
pub(super) struct KeySet {
    pub keys: Vec<VerifyKey>,
    /// `None` until the first successful fetch.
    pub fetched: Option<Instant>,
    /// Bumped by every successful fetch.
    pub generation: u64,
}

/// What a refresh did.
pub(super) enum Refresh {
    /// The key set was fetched (by this call or a concurrent one).
    Done,
    /// The fetch failed; the cached keys stay.
    Failed(String),
    /// Not fetched: the last attempt was too recent. Carries that attempt's error, if any.
    Skipped(Option<String>),
}

#[derive(Default)]
struct RefreshState {
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    /// The `jwks_uri` read from the discovery document.
    discovered: Option<Url>,
}

/// The signing keys of one issuer.
pub(super) struct KeySource {
    issuer: String,
    configured_uri: Option<Url>,
    allowed: Vec<Algorithm>,
    http: reqwest::Client,
    options: VerifierOptions,
    keys: RwLock<Arc<KeySet>>,
    /// Held for the whole of a fetch: concurrent refreshes wait and reuse its result.
    refresh: tokio::sync::Mutex<RefreshState>,
    background: AtomicBool,
}

impl KeySource {
    pub fn new(s: &IssuerSettings, http: reqwest::Client, options: VerifierOptions) -> Self {
        KeySource {
            issuer: s.issuer.clone(),
            configured_uri: s.jwks_uri.clone(),
            allowed: s.algorithms.clone(),
            http,
            options,
            keys: RwLock::new(Arc::new(KeySet::default())),
            refresh: tokio::sync::Mutex::new(RefreshState::default()),
            background: AtomicBool::new(false),
        }
    }

    pub fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Fetches the key set again, unless a fetch finished since `seen_generation` was read
    /// (then that one is used) or the last attempt is more recent than the minimum interval.
    pub async fn refresh(&self, seen_generation: u64) -> Refresh {
        let mut st = self.refresh.lock().await;
        if self.current().generation != seen_generation {
            return Refresh::Done;
        }
        if let Some(at) = st.last_attempt
            && at.elapsed() < self.options.min_refresh_interval
        {
            return Refresh::Skipped(st.last_error.clone());
        }
        st.last_attempt = Some(Instant::now());
        match self.fetch(&mut st).await {
            Ok(keys) => {
                tracing::info!(issuer = %self.issuer, keys = keys.len(), "loaded the issuer's signing keys");
                let mut slot = self.keys.write().unwrap_or_else(|e| e.into_inner());
                let generation = slot.generation + 1;
                *slot = Arc::new(KeySet {
                    keys,
                    fetched: Some(Instant::now()),
                    generation,
                });
                st.last_error = None;
                Refresh::Done
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, "cannot refresh the issuer's signing keys; cached keys stay in use");
                st.last_error = Some(e.clone());
                Refresh::Failed(e)
            }
        }
    }

    /// Starts a refresh in the background when the key set is older than the maximum age, so
    /// keys the issuer withdrew stop being accepted; the request goes on with the cached keys.
    pub fn refresh_if_stale(self: &Arc<Self>, set: &KeySet) {
        let Some(fetched) = set.fetched else { return };
        if fetched.elapsed() < self.options.max_key_age {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.background.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        let generation = set.generation;
        runtime.spawn(async move {
            this.refresh(generation).await;
            this.background.store(false, Ordering::Release);
        });
    }

    async fn fetch(&self, st: &mut RefreshState) -> Result<Vec<VerifyKey>, String> {
        let uri = match (&self.configured_uri, &st.discovered) {
            (Some(u), _) | (None, Some(u)) => u.clone(),
            (None, None) => {
                let u = self.discover().await?;
                st.discovered = Some(u.clone());
                u
            }
        };
        let result = async {
            let raw: RawJwks = self.get_json(&uri, "the key set").await?;
            let (keys, skipped) = parse_keys(&raw.keys, &self.allowed);
            for why in &skipped {
                tracing::debug!(issuer = %self.issuer, "ignoring a key of the key set: {why}");
            }
            if keys.is_empty() {
                let why = if skipped.is_empty() {
                    "it is empty".to_string()
                } else {
                    skipped.join("; ")
                };
                return Err(format!(
                    "the key set at {uri} has no usable signing key for {}: {why}",
                    super::config::algorithm_names(&self.allowed)
                ));
            }
            Ok(keys)
        }
        .await;
        if result.is_err() && self.configured_uri.is_none() {
            // The issuer may have moved its keys: read the discovery document again next time.
            st.discovered = None;
        }
        result
    }

    async fn discover(&self) -> Result<Url, String> {
        #[derive(Deserialize)]
        struct Discovery {
            issuer: Option<String>,
            jwks_uri: Option<String>,
        }
        let url = format!("{}{DISCOVERY_PATH}", self.issuer.trim_end_matches('/'));
        let url = Url::parse(&url)
            .map_err(|e| format!("cannot build the discovery address {url:?}: {e}"))?;
        let doc: Discovery = self.get_json(&url, "the discovery document").await?;
        if doc.issuer.as_deref() != Some(self.issuer.as_str()) {
            return Err(format!(
                "the discovery document at {url} names issuer {:?}, not {:?}; check the issuer setting",
                doc.issuer.unwrap_or_default(),
                self.issuer
            ));
        }
        let jwks = doc
            .jwks_uri
            .ok_or_else(|| format!("the discovery document at {url} has no jwks_uri"))?;
        check_url(&jwks, false)
            .map_err(|e| format!("the discovery document at {url} names a bad jwks_uri: {e}"))
    }

    async fn get_json<T: DeserializeOwned>(&self, url: &Url, what: &str) -> Result<T, String> {
        get_json(&self.http, url, what).await
    }
}

/// Fetches a JSON document of at most [`MAX_DOCUMENT_BYTES`], without following redirects.
pub(super) async fn get_json<T: DeserializeOwned>(
    http: &reqwest::Client,
    url: &Url,
    what: &str,
) -> Result<T, String> {
    let resp = http
        .get(url.clone())
        .header(ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("cannot fetch {what} from {url}: {}", error_chain(&e)))?;
    read_json(resp, url, what).await
}

/// Reads a JSON answer of at most [`MAX_DOCUMENT_BYTES`]; a redirect or an error status is an
/// error naming `what`.
pub(super) async fn read_json<T: DeserializeOwned>(
    mut resp: reqwest::Response,
    url: &Url,
    what: &str,
) -> Result<T, String> {
    let status = resp.status();
    if status.is_redirection() {
        let to = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?");
        return Err(format!(
            "{url} answered with a redirect (HTTP {status}) to {to}; redirects are not followed: configure the final address"
        ));
    }
    let body = read_body(&mut resp, url, what).await?;
    if !status.is_success() {
        // An OAuth error answer names what went wrong; anything else is shown by its status.
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let e = v.get("error")?.as_str()?.to_string();
                let d = v
                    .get("error_description")
                    .and_then(|d| d.as_str())
                    .map(|d| format!(": {}", d.chars().take(200).collect::<String>()))
                    .unwrap_or_default();
                Some(format!(" ({e}{d})"))
            })
            .unwrap_or_default();
        return Err(format!("{url} answered HTTP {status} for {what}{detail}"));
    }
    serde_json::from_slice(&body)
        .map_err(|e| format!("{what} at {url} is not the expected JSON: {e}"))
}

async fn read_body(resp: &mut reqwest::Response, url: &Url, what: &str) -> Result<Vec<u8>, String> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
    {
        return Err(format!(
            "{what} at {url} is larger than {MAX_DOCUMENT_BYTES} bytes"
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("cannot read {what} from {url}: {}", error_chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(format!(
                "{what} at {url} is larger than {MAX_DOCUMENT_BYTES} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The error and its causes, `a: b: c`, without repeats.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    alg: Option<String>,
    kid: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// The usable keys of a key set, and why the others were left out.
pub(super) fn parse_keys(
    raw: &[serde_json::Value],
    allowed: &[Algorithm],
) -> (Vec<VerifyKey>, Vec<String>) {
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, value) in raw.iter().enumerate() {
        let jwk = match RawJwk::deserialize(value) {
            Ok(j) => j,
            Err(e) => {
                skipped.push(format!("key {i} is not a JWK: {e}"));
                continue;
            }
        };
        let name = match &jwk.kid {
            Some(kid) => format!("key {kid:?}"),
            None => format!("key {i}"),
        };
        if keys.len() >= MAX_KEYS {
            skipped.push(format!("{name}: more than {MAX_KEYS} keys"));
            continue;
        }
        match to_key(jwk, allowed) {
            Ok(k) => keys.push(k),
            Err(why) => skipped.push(format!("{name}: {why}")),
        }
    }
    (keys, skipped)
}

fn decode_part(value: Option<&String>, name: &str) -> Result<Vec<u8>, String> {
    let value = value.ok_or_else(|| format!("it has no '{name}'"))?;
    B64URL
        .decode(value)
        .map_err(|_| format!("its '{name}' is not base64url"))
}

fn to_key(jwk: RawJwk, allowed: &[Algorithm]) -> Result<VerifyKey, String> {
    if let Some(u) = jwk.use_.as_deref().filter(|u| *u != "sig") {
        return Err(format!("it is for use {u:?}, not signatures"));
    }
    if let Some(ops) = &jwk.key_ops
        && !ops.iter().any(|o| o == "verify")
    {
        return Err("its key_ops do not include verify".into());
    }
    let (key, family_algorithms): (DecodingKey, Vec<Algorithm>) = match jwk.kty.as_str() {
        "RSA" => {
            let n = decode_part(jwk.n.as_ref(), "n")?;
            let e = decode_part(jwk.e.as_ref(), "e")?;
            let n_trimmed = &n[n.iter().position(|b| *b != 0).unwrap_or(n.len())..];
            if n_trimmed.len() < 256 {
                return Err(format!(
                    "its RSA modulus has {} bits; at least 2048 are required",
                    n_trimmed.len() * 8
                ));
            }
            (
                DecodingKey::from_rsa_raw_components(n_trimmed, &e),
                AlgorithmFamily::Rsa.algorithms().to_vec(),
            )
        }
        "EC" => {
            let (alg, len) = match jwk.crv.as_deref() {
                Some("P-256") => (Algorithm::ES256, 32),
                Some("P-384") => (Algorithm::ES384, 48),
                other => return Err(format!("EC curve {other:?} is not supported")),
            };
            let x = decode_part(jwk.x.as_ref(), "x")?;
            let y = decode_part(jwk.y.as_ref(), "y")?;
            if x.len() != len || y.len() != len {
                return Err(format!("its coordinates are not {len} bytes each"));
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (DecodingKey::from_ec_der(&point), vec![alg])
        }
        "OKP" => {
            if jwk.crv.as_deref() != Some("Ed25519") {
                return Err(format!(
                    "OKP curve {:?} is not supported",
                    jwk.crv.as_deref()
                ));
            }
            let x = decode_part(jwk.x.as_ref(), "x")?;
            if x.len() != 32 {
                return Err("its Ed25519 key is not 32 bytes".into());
            }
            (DecodingKey::from_ed_der(&x), vec![Algorithm::EdDSA])
        }
        "oct" => return Err("it is a shared secret, never used to verify tokens".into()),
        other => return Err(format!("key type {other:?} is not supported")),
    };
    let mut algorithms: Vec<Algorithm> = family_algorithms
        .into_iter()
        .filter(|a| allowed.contains(a))
        .collect();
    if let Some(name) = &jwk.alg {
        match name.parse::<Algorithm>() {
            Ok(a) if algorithms.contains(&a) => algorithms = vec![a],
            _ => {
                return Err(format!(
                    "its alg {name:?} is not allowed for this issuer or does not fit its key type"
                ));
            }
        }
    }
    if algorithms.is_empty() {
        return Err("none of the allowed algorithms fits its key type".into());
    }
    Ok(VerifyKey {
        kid: jwk.kid,
        algorithms,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn rsa(kid: &str, alg: Option<&str>) -> serde_json::Value {
        let mut n = vec![0xc5u8; 256];
        n[0] = 0xd1;
        let mut k = json!({"kty": "RSA", "kid": kid, "n": b64(&n), "e": "AQAB"});
        if let Some(a) = alg {
            k["alg"] = json!(a);
        }
        k
    }

    fn ec(kid: &str, crv: &str, len: usize) -> serde_json::Value {
        json!({"kty": "EC", "kid": kid, "crv": crv, "x": b64(&vec![1; len]), "y": b64(&vec![2; len])})
    }

    const ALL: &[Algorithm] = super::super::config::SUPPORTED_ALGORITHMS;

    #[test]
    fn algorithms_come_from_the_key_and_the_configuration() {
        let raw = vec![
            rsa("r", None),
            rsa("r-ps", Some("PS256")),
            ec("e256", "P-256", 32),
            ec("e384", "P-384", 48),
            json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(&[7; 32])}),
        ];
        let (keys, skipped) = parse_keys(&raw, ALL);
        assert!(skipped.is_empty(), "{skipped:?}");
        let algs: Vec<_> = keys.iter().map(|k| k.algorithms.clone()).collect();
        assert_eq!(
            algs,
            [
                AlgorithmFamily::Rsa.algorithms().to_vec(),
                vec![Algorithm::PS256],
                vec![Algorithm::ES256],
                vec![Algorithm::ES384],
                vec![Algorithm::EdDSA],
            ]
        );
        let (keys, _) = parse_keys(&raw, &[Algorithm::RS256, Algorithm::ES256]);
        let kept: Vec<_> = keys
            .iter()
            .map(|k| (k.kid.as_deref().unwrap(), k.algorithms.clone()))
            .collect();
        assert_eq!(
            kept,
            [
                ("r", vec![Algorithm::RS256]),
                ("e256", vec![Algorithm::ES256])
            ]
        );
    }

    #[test]
    fn unusable_keys_are_left_out_with_a_reason() {
        let raw = vec![
            json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}),
            json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "short", "n": b64(&[0xff; 128]), "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "hs", "alg": "HS256", "n": b64(&[0xff; 256]), "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "ops", "key_ops": ["encrypt"], "n": b64(&[0xff; 256]), "e": "AQAB"}),
            ec("p521", "P-521", 66),
            ec("bad-len", "P-256", 31),
            json!({"kty": "EC", "kid": "nox", "crv": "P-256", "y": b64(&[1; 32])}),
            json!({"kty": "EC", "kid": "bad64", "crv": "P-256", "x": "%%%", "y": b64(&[1; 32])}),
            json!({"kid": "nokty"}),
            json!("not an object"),
        ];
        let (keys, skipped) = parse_keys(&raw, ALL);
        assert!(keys.is_empty());
        let joined = skipped.join("\n");
        for words in [
            "\"hmac\": it is a shared secret",
            "\"enc\": it is for use \"enc\"",
            "\"short\": its RSA modulus has 1024 bits",
            "\"hs\": its alg \"HS256\" is not allowed",
            "\"ops\": its key_ops do not include verify",
            "\"p521\": EC curve Some(\"P-521\") is not supported",
            "\"bad-len\": its coordinates are not 32 bytes",
            "\"nox\": it has no 'x'",
            "\"bad64\": its 'x' is not base64url",
            "key 9 is not a JWK",
            "key 10 is not a JWK",
        ] {
            assert!(joined.contains(words), "{words} missing in:\n{joined}");
        }
    }

    #[test]
    fn a_huge_key_set_is_capped() {
        let raw: Vec<_> = (0..MAX_KEYS + 5)
            .map(|i| ec(&format!("k{i}"), "P-256", 32))
            .collect();
        let (keys, skipped) = parse_keys(&raw, ALL);
        assert_eq!(keys.len(), MAX_KEYS);
        assert_eq!(skipped.len(), 5);
    }
}
