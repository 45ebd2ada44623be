//! Request bodies: size limits, JSON or YAML by content type, documents parsed with positions.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use futures::StreamExt;
use serde_json::Value;
use std::time::Duration;

use super::error::{ApiError, ErrorCode};
use crate::model::MAX_OBJECT_BYTES;

/// Largest `/apply` body.
pub const APPLY_BODY_LIMIT: usize = 64 << 20;
/// Largest body of any other request.
pub const BODY_LIMIT: usize = 1 << 20;
/// Longest pause between two pieces of a request body.
pub const BODY_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time a whole request body may take to arrive.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

// The YAML parser's budget must let through every body the limit lets through.
const _: () = assert!(APPLY_BODY_LIMIT <= crate::yaml::MAX_STREAM_BYTES);

/// How a body is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

fn human_size(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!(
            "the request body is larger than the limit of {}; split it into several requests",
            human_size(limit)
        ),
    )
}

/// The format named by `Content-Type`; `None` when the header is absent (the body decides).
fn declared_format(headers: &HeaderMap) -> Result<Option<Format>, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    let media = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/json" => Ok(Some(Format::Json)),
        m if m.starts_with("application/") && m.ends_with("+json") => Ok(Some(Format::Json)),
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" => {
            Ok(Some(Format::Yaml))
        }
        _ => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!(
                "Content-Type {text:?} is not supported; send application/json or application/yaml"
            ),
        )),
    }
}

/// Reads a whole body of at most `limit` bytes, checking its content type first.
///
/// Memory grows with the bytes that arrive, never with what `Content-Length` announces; a
/// chunked body is refused (413) as soon as it passes the limit; a body that stalls for
/// [`BODY_STALL_TIMEOUT`] or takes longer than [`BODY_READ_TIMEOUT`] in all is answered 408.
pub async fn read(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<(Bytes, Format), ApiError> {
    let declared = declared_format(headers)?;
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let deadline = tokio::time::Instant::now() + BODY_READ_TIMEOUT;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    loop {
        let stall = tokio::time::Instant::now() + BODY_STALL_TIMEOUT;
        let next = match tokio::time::timeout_at(stall.min(deadline), stream.next()).await {
            Ok(next) => next,
            Err(_) => return Err(too_slow(buf.len(), announced, stall <= deadline)),
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request(format!("the request body could not be read: {e}"))
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    let format = declared.unwrap_or_else(|| sniff(&buf));
    Ok((Bytes::from(buf), format))
}

/// The 408 of a body that stalled (`stalled`) or did not finish within [`BODY_READ_TIMEOUT`].
fn too_slow(received: usize, announced: Option<u64>, stalled: bool) -> ApiError {
    let of = announced.map_or(String::new(), |n| format!(" of the {n} announced"));
    let why = if stalled {
        format!("then nothing for {} s", BODY_STALL_TIMEOUT.as_secs())
    } else {
        format!(
            "and the whole body must arrive within {} s",
            BODY_READ_TIMEOUT.as_secs()
        )
    };
    ApiError::new(
        ErrorCode::RequestTimeout,
        format!(
            "the request body came too slowly: {received} bytes{of} arrived, {why}; send the body without pausing"
        ),
    )
}

/// Without a content type: JSON when the body starts like a JSON object or array, else YAML.
fn sniff(body: &[u8]) -> Format {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{' | b'[') => Format::Json,
        _ => Format::Yaml,
    }
}

fn yaml_text(body: &[u8]) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the YAML body is not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })
}

/// YAML documents read as the CLI reads them ([`crate::yaml::from_multiple`], with its alias
/// check answered as a 413): a stream whose aliases would expand past
/// [`crate::yaml::MAX_ALIAS_EXPANSION_BYTES`] is refused before anything is expanded.
fn yaml_documents(text: &str) -> Result<Vec<Value>, ApiError> {
    crate::yaml::check_alias_expansion(text).map_err(|e| {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the YAML body is refused: {e}"),
        )
    })?;
    serde_saphyr::from_multiple_with_options(text, crate::yaml::options())
        .map_err(|e| yaml_error(&e))
}

fn yaml_error(e: &serde_saphyr::Error) -> ApiError {
    let text = crate::yaml::error_text(e);
    match e.location().filter(|l| l.line() > 0) {
        Some(loc) => ApiError::bad_request(format!(
            "the body is not valid YAML: line {}, column {}: {text}",
            loc.line(),
            loc.column()
        )),
        None => ApiError::bad_request(format!("the body is not valid YAML: {text}")),
    }
}

fn json_error(e: &serde_json::Error) -> ApiError {
    ApiError::bad_request(format!("the body is not valid JSON: {e}"))
}

/// Parses a body holding one document.
pub fn one_document(body: &[u8], format: Format) -> Result<Value, ApiError> {
    match format {
        Format::Json => serde_json::from_slice(body).map_err(|e| json_error(&e)),
        Format::Yaml => {
            let mut docs = yaml_documents(yaml_text(body)?)?;
            match docs.len() {
                1 => Ok(docs.remove(0)),
                0 => Err(ApiError::bad_request("the body is empty; send one object")),
                n => Err(ApiError::bad_request(format!(
                    "the body holds {n} YAML documents; this endpoint takes one (send several to /api/v1/apply)"
                ))),
            }
        }
    }
}

/// Parses an `/apply` body: `{"items":[...]}`, or YAML documents each holding one object (or
/// an `items` list).
pub fn apply_documents(body: &[u8], format: Format) -> Result<Vec<Value>, ApiError> {
    let docs = match format {
        Format::Json => vec![serde_json::from_slice::<Value>(body).map_err(|e| json_error(&e))?],
        Format::Yaml => yaml_documents(yaml_text(body)?)?,
    };
    let mut items = Vec::new();
    for doc in docs {
        match doc {
            Value::Object(mut map) if !map.contains_key("kind") && map.contains_key("items") => {
                if let Some(extra) = map.keys().find(|k| *k != "items") {
                    return Err(ApiError::bad_request(format!(
                        "unknown field {extra:?} beside \"items\"; the body is {{\"items\":[object, ...]}}"
                    )));
                }
                match map.remove("items") {
                    Some(Value::Array(list)) => items.extend(list),
                    _ => return Err(ApiError::bad_request("\"items\" must be a list of objects")),
                }
            }
            other => items.push(other),
        }
    }
    if items.is_empty() {
        return Err(ApiError::bad_request(
            "the body holds no objects; send {\"items\":[object, ...]} or YAML documents",
        ));
    }
    Ok(items)
}

/// Size of a value as compact JSON, counted without building the text.
pub fn json_size(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// The 413 problem of an object over the per-object limit, if it is.
pub fn object_too_large(v: &Value) -> Option<String> {
    let size = json_size(v);
    (size > MAX_OBJECT_BYTES).then(|| {
        format!(
            "the object is {size} bytes as JSON; one object may be at most {}",
            human_size(MAX_OBJECT_BYTES)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn yaml_documents_and_lists() {
        let docs =
            apply_documents(b"kind: Tenant\n---\nkind: Project\n---\n", Format::Yaml).unwrap();
        assert_eq!(
            docs,
            vec![json!({"kind": "Tenant"}), json!({"kind": "Project"})]
        );
        let docs = apply_documents(br#"{"items":[{"kind":"Tenant"}]}"#, Format::Json).unwrap();
        assert_eq!(docs, vec![json!({"kind": "Tenant"})]);
        assert!(apply_documents(br#"{"items":[]}"#, Format::Json).is_err());
        assert!(apply_documents(br#"{"items":[], "x": 1}"#, Format::Json).is_err());
        assert!(apply_documents(br#"{"items": 3}"#, Format::Json).is_err());
        let docs = apply_documents(b"labels: {country: NO, debug: on}\n", Format::Yaml).unwrap();
        assert_eq!(
            docs,
            vec![json!({"labels": {"country": "NO", "debug": "on"}})],
            "YAML 1.2 booleans only"
        );
    }

    #[test]
    fn yaml_errors_have_line_and_column() {
        let e =
            apply_documents(b"kind: Tenant\nmetadata:\n  name: [a\n", Format::Yaml).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(
            e.message,
            "the body is not valid YAML: line 3, column 9: unclosed bracket '['"
        );
        let e = apply_documents(b"a: 1\na: 2\n", Format::Yaml).unwrap_err();
        assert_eq!(
            e.message,
            "the body is not valid YAML: line 2, column 1: duplicate mapping key: a"
        );
        let e = one_document(b"{\"a\": }", Format::Json).unwrap_err();
        assert!(e.message.contains("line 1 column 7"), "{}", e.message);
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert_eq!(declared_format(&h).unwrap(), None);
        h.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(declared_format(&h).unwrap(), Some(Format::Json));
        h.insert(header::CONTENT_TYPE, "application/x-yaml".parse().unwrap());
        assert_eq!(declared_format(&h).unwrap(), Some(Format::Yaml));
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(
            declared_format(&h).unwrap_err().code,
            ErrorCode::UnsupportedMediaType
        );
        assert_eq!(sniff(b"  {}"), Format::Json);
        assert_eq!(sniff(b"kind: x"), Format::Yaml);
    }

    fn headers(content_length: Option<u64>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        if let Some(n) = content_length {
            h.insert(header::CONTENT_LENGTH, n.into());
        }
        h
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_is_answered_408() {
        // 3 bytes of an announced million, then nothing.
        let stream = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{\"a"))])
            .chain(futures::stream::pending());
        let start = tokio::time::Instant::now();
        let e = read(
            &headers(Some(1_000_000)),
            Body::from_stream(stream),
            BODY_LIMIT,
        )
        .await
        .unwrap_err();
        assert_eq!(start.elapsed(), BODY_STALL_TIMEOUT);
        assert_eq!(e.code, ErrorCode::RequestTimeout);
        assert_eq!(e.code.status().as_u16(), 408);
        assert_eq!(
            e.message,
            "the request body came too slowly: 3 bytes of the 1000000 announced arrived, then nothing for 10 s; send the body without pausing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_is_cut_off_at_the_read_timeout() {
        // A byte every 5 s never stalls for long, but the whole body has a deadline.
        let stream = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b" ")), ()))
        });
        let start = tokio::time::Instant::now();
        let e = read(&headers(None), Body::from_stream(stream), BODY_LIMIT)
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), BODY_READ_TIMEOUT);
        assert_eq!(e.code, ErrorCode::RequestTimeout);
        assert!(e.message.contains("within 60 s"), "{}", e.message);
    }

    #[tokio::test]
    async fn an_endless_chunked_body_is_refused_once_past_the_limit() {
        // No Content-Length (chunked): the limit is enforced as the bytes arrive, and reading
        // stops there instead of buffering the rest.
        let pulled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = pulled.clone();
        let chunk = Bytes::from(vec![b' '; 64 << 10]);
        let stream = futures::stream::repeat(chunk).map(move |c| {
            counter.fetch_add(c.len(), std::sync::atomic::Ordering::Relaxed);
            Ok::<_, std::io::Error>(c)
        });
        let e = read(&headers(None), Body::from_stream(stream), BODY_LIMIT)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PayloadTooLarge);
        assert_eq!(
            e.message,
            "the request body is larger than the limit of 1 MiB; split it into several requests"
        );
        let pulled = pulled.load(std::sync::atomic::Ordering::Relaxed);
        assert!(pulled <= BODY_LIMIT + (64 << 10), "read {pulled} bytes");
        // An announced length over the limit is refused before any byte is read.
        let e = read(
            &headers(Some(APPLY_BODY_LIMIT as u64 + 1)),
            Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>()),
            APPLY_BODY_LIMIT,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::PayloadTooLarge);
    }

    #[test]
    fn an_alias_bomb_is_refused_before_it_is_expanded() {
        let mut bomb = String::from(
            "kind: Tenant\na: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for (p, n) in ('a'..='h').zip('b'..='i') {
            bomb.push_str(&format!(
                "{n}: &{n} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
            ));
        }
        assert!(bomb.len() < 1400, "{}", bomb.len());
        let e = apply_documents(bomb.as_bytes(), Format::Yaml).unwrap_err();
        assert_eq!(e.code, ErrorCode::PayloadTooLarge);
        assert_eq!(
            e.message,
            "the YAML body is refused: its aliases (*name) would expand it to more than 4 MiB; write the values out instead"
        );
        // Aliases used as intended still work.
        let docs = apply_documents(
            b"kind: Tenant\nlabels: &l {team: a}\nselector: *l\n",
            Format::Yaml,
        )
        .unwrap();
        assert_eq!(
            docs,
            vec![json!({"kind": "Tenant", "labels": {"team": "a"}, "selector": {"team": "a"}})]
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(json_size(&json!({"a": [1, 2]})), r#"{"a":[1,2]}"#.len());
        assert!(object_too_large(&json!({"a": "x".repeat(MAX_OBJECT_BYTES)})).is_some());
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size(256 << 10), "256 KiB");
    }
}
