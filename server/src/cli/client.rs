//! HTTP client of the REST API: TLS trust, bearer token, and readable errors.

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::settings::{Secret, Settings};
use super::{CliError, stdout_error};
use crate::model::FieldProblem;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// An error answer of the server: `{"code","message","details"}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, thiserror::Error)]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub details: Vec<FieldProblem>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message.trim_end(), self.code)?;
        for d in &self.details {
            write!(f, "\n  {d}")?;
        }
        Ok(())
    }
}

impl ApiError {
    /// Builds an error from a status and a body that may or may not be the API's JSON.
    pub fn from_body(status: StatusCode, body: &[u8]) -> ApiError {
        match serde_json::from_slice::<ApiError>(body) {
            Ok(mut e) => {
                e.status = status.as_u16();
                e
            }
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                ApiError {
                    status: status.as_u16(),
                    code: status
                        .canonical_reason()
                        .unwrap_or("Error")
                        .replace(' ', ""),
                    message: if text.is_empty() || text.len() > 500 {
                        format!("the server answered HTTP {status}")
                    } else {
                        format!("the server answered HTTP {status}: {text}")
                    },
                    details: Vec::new(),
                }
            }
        }
    }
}

/// A client bound to one server and token.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Secret,
}

/// Builds the HTTP client for `server`, trusting only `ca_cert` when one is given. The TLS
/// provider was installed by `main` ([`crate::crypto::install`]).
pub fn http_client(
    server: &str,
    ca_cert: Option<&std::path::Path>,
) -> Result<reqwest::Client, CliError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        // Well inside the server's keep-alive timeout, so a request never goes out on a
        // connection the server is closing as idle.
        .pool_idle_timeout(crate::api::HEADER_READ_TIMEOUT / 2)
        .user_agent(concat!("clusterclaw/", env!("CARGO_PKG_VERSION")))
        .tls_backend_rustls();
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).map_err(|e| {
            CliError::Usage(format!(
                "cannot read the CA certificate {}: {e}",
                path.display()
            ))
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            CliError::Usage(format!(
                "{} is not a PEM certificate file: {e}",
                path.display()
            ))
        })?;
        if certs.is_empty() {
            return Err(CliError::Usage(format!(
                "{} holds no PEM certificate",
                path.display()
            )));
        }
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|e| CliError::Failed(format!("cannot set up the HTTP client for {server}: {e}")))
}

/// Turns a transport error into the user's next step.
pub fn transport_error(server: &str, err: &reqwest::Error) -> CliError {
    let mut cause = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = source {
        cause = e.to_string();
        source = e.source();
    }
    let hint = "point at another server with --server URL or CLUSTERCLAW_SERVER, or save one with `clusterclaw login`";
    let lower = cause.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("unknownissuer") || lower.contains("tls") {
        return CliError::Unreachable(format!(
            "cannot connect securely to the clusterclaw server at {server}: {cause}; \
             pass the CA that signed its certificate with --ca-cert FILE (the server's ca.pem) or CLUSTERCLAW_CA_CERT"
        ));
    }
    if err.is_timeout() {
        return CliError::Unreachable(format!(
            "the clusterclaw server at {server} did not answer in time ({cause}); {hint}"
        ));
    }
    if err.is_connect() {
        return CliError::Unreachable(format!(
            "cannot reach the clusterclaw server at {server}: {cause}; is it running? {hint}"
        ));
    }
    CliError::Unreachable(format!(
        "lost the connection to the clusterclaw server at {server}: {cause}; {hint}"
    ))
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Builds `path?k=v&...`, leaving out empty values.
pub fn with_query(path: &str, params: &[(&str, Option<&str>)]) -> String {
    let query: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| {
            v.filter(|v| !v.is_empty())
                .map(|v| format!("{k}={}", encode(v)))
        })
        .collect();
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

impl Client {
    /// A client for the settings in effect; fails when there is no token.
    pub fn new(settings: &Settings) -> Result<Client, CliError> {
        let token = settings.require_token()?.clone();
        Client::with_token(&settings.server, token, settings.ca_cert.as_deref())
    }

    pub fn with_token(
        server: &str,
        token: Secret,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<Client, CliError> {
        Ok(Client {
            http: http_client(server, ca_cert)?,
            base: server.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    /// Sends a request; a non-2xx answer becomes [`CliError::Api`].
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<reqwest::Response, CliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(self.token.expose())
            .header("Accept", "application/json");
        if let Some(body) = body {
            let bytes = serde_json::to_vec(body)
                .map_err(|e| CliError::Failed(format!("cannot encode the request: {e}")))?;
            req = req.header("Content-Type", "application/json").body(bytes);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| transport_error(&self.base, &e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| transport_error(&self.base, &e))?;
        let mut err = ApiError::from_body(status, &body);
        if status == StatusCode::UNAUTHORIZED {
            err.message = format!(
                "{} (server {}; the token comes from --token, CLUSTERCLAW_TOKEN or the CLI config file)",
                err.message.trim_end_matches('.'),
                self.base
            );
        }
        Err(CliError::Api(err))
    }

    /// `GET path` for a long-running stream (no overall time limit): the answer, to read in
    /// chunks; a non-2xx answer becomes [`CliError::Api`].
    pub async fn get_stream(&self, path: &str) -> Result<reqwest::Response, CliError> {
        self.open_stream(path, "text/plain, application/json").await
    }

    /// A GET whose answer streams until the server ends it or the caller drops it (no overall
    /// timeout), asking for `accept`; a non-2xx answer becomes [`CliError::Api`].
    async fn open_stream(&self, path: &str, accept: &str) -> Result<reqwest::Response, CliError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(self.token.expose())
            .header("Accept", accept)
            // As good as no limit: a followed stream runs until it is interrupted.
            .timeout(Duration::from_secs(10 * 365 * 24 * 3600))
            .send()
            .await
            .map_err(|e| transport_error(&self.base, &e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| transport_error(&self.base, &e))?;
        Err(CliError::Api(ApiError::from_body(status, &body)))
    }

    /// Sends a request and decodes the JSON answer.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, CliError> {
        let resp = self.send(method, path, body).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| transport_error(&self.base, &e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            CliError::Failed(format!(
                "the server at {} sent an answer this clusterclaw cannot read: {e}",
                self.base
            ))
        })
    }

    /// Opens a watch: a GET whose answer streams for as long as the server keeps it open
    /// (no overall timeout). A non-2xx answer becomes [`CliError::Api`].
    pub async fn watch(&self, path: &str) -> Result<reqwest::Response, CliError> {
        self.open_stream(path, "application/x-ndjson").await
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.json(Method::GET, path, None).await
    }

    /// GET that answers `None` on 404.
    pub async fn get_opt(&self, path: &str) -> Result<Option<Value>, CliError> {
        match self.get(path).await {
            Ok(v) => Ok(Some(v)),
            Err(CliError::Api(e)) if e.status == 404 => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Copies a list answer `{"index":N,"items":[...]}` to `out` as `{"items":[...]}`. When the
    /// answer starts the usual way, the bytes after the index are passed through unparsed.
    pub async fn stream_items(
        &self,
        path: &str,
        out: &mut dyn std::io::Write,
    ) -> Result<(), CliError> {
        let mut resp = self.send(Method::GET, path, None).await?;
        let mut head: Vec<u8> = Vec::new();
        let mut streaming = false;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| transport_error(&self.base, &e))?
        {
            if streaming {
                out.write_all(&chunk).map_err(stdout_error)?;
                continue;
            }
            head.extend_from_slice(&chunk);
            match list_prefix_len(&head) {
                Prefix::Found(n) => {
                    out.write_all(b"{\"items\":").map_err(stdout_error)?;
                    out.write_all(&head[n..]).map_err(stdout_error)?;
                    head.clear();
                    streaming = true;
                }
                Prefix::NeedMore => {}
                Prefix::Other => {}
            }
        }
        if !streaming {
            let value: Value = serde_json::from_slice(&head).map_err(|e| {
                CliError::Failed(format!(
                    "the server at {} sent a list this clusterclaw cannot read: {e}",
                    self.base
                ))
            })?;
            let items = value
                .get("items")
                .cloned()
                .unwrap_or(Value::Array(Vec::new()));
            let doc = serde_json::json!({ "items": items });
            serde_json::to_writer(&mut *out, &doc).map_err(|e| stdout_error(e.into()))?;
        }
        out.write_all(b"\n")
            .and_then(|()| out.flush())
            .map_err(stdout_error)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Prefix {
    /// The answer starts `{"index":N,"items":`; the value is that prefix's length.
    Found(usize),
    NeedMore,
    Other,
}

/// Recognises the server's list prefix `{"index":<digits>,"items":` (whitespace allowed).
fn list_prefix_len(buf: &[u8]) -> Prefix {
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < buf.len() && buf[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    for token in [&b"{"[..], b"\"index\"", b":"] {
        skip_ws(&mut i);
        let avail = (buf.len() - i).min(token.len());
        if buf[i..i + avail] != token[..avail] {
            return Prefix::Other;
        }
        if avail < token.len() {
            return Prefix::NeedMore;
        }
        i += token.len();
    }
    skip_ws(&mut i);
    let digits = i;
    while i < buf.len() && buf[i].is_ascii_digit() {
        i += 1;
    }
    if i == buf.len() {
        return Prefix::NeedMore;
    }
    if i == digits {
        return Prefix::Other;
    }
    for token in [&b","[..], b"\"items\"", b":"] {
        skip_ws(&mut i);
        let avail = (buf.len() - i).min(token.len());
        if buf[i..i + avail] != token[..avail] {
            return Prefix::Other;
        }
        if avail < token.len() {
            return Prefix::NeedMore;
        }
        i += token.len();
    }
    Prefix::Found(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_prefix_is_recognised_across_chunk_boundaries() {
        let full = br#"{"index":42,"items":[{"a":1}]}"#;
        let n = r#"{"index":42,"items":"#.len();
        assert_eq!(list_prefix_len(full), Prefix::Found(n));
        for cut in 0..n {
            assert_eq!(
                list_prefix_len(&full[..cut]),
                Prefix::NeedMore,
                "cut at {cut}"
            );
        }
        assert_eq!(
            list_prefix_len(b"{ \"index\" : 7 , \"items\" : []}"),
            Prefix::Found(25)
        );
        assert_eq!(list_prefix_len(br#"{"items":[],"index":3}"#), Prefix::Other);
        assert_eq!(list_prefix_len(br#"{"index":"x"}"#), Prefix::Other);
    }

    #[test]
    fn api_errors_read_the_json_body_or_fall_back_to_the_status() {
        let e = ApiError::from_body(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"code":"Invalid","message":"bad manifest","details":[{"field":"items[0].spec.replicas","problem":"too many"}]}"#,
        );
        assert_eq!(e.status, 422);
        assert_eq!(
            e.to_string(),
            "bad manifest (Invalid)\n  items[0].spec.replicas: too many"
        );
        let e = ApiError::from_body(StatusCode::BAD_GATEWAY, b"upstream down");
        assert_eq!(e.code, "BadGateway");
        assert!(
            e.message.contains("502") && e.message.contains("upstream down"),
            "{}",
            e.message
        );
    }

    #[test]
    fn queries_are_encoded() {
        assert_eq!(
            with_query(
                "/api/v1/instances",
                &[
                    ("tenant", Some("acme")),
                    ("project", None),
                    ("labelSelector", Some("a=b,!c"))
                ]
            ),
            "/api/v1/instances?tenant=acme&labelSelector=a%3Db%2C%21c"
        );
        assert_eq!(with_query("/x", &[("tenant", Some(""))]), "/x");
    }
}
