//! Request bodies: size limits, JSON or YAML by content type, documents parsed with positions.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use futures::StreamExt;
use serde_json::Value;

use super::error::{ApiError, ErrorCode};
use crate::model::MAX_OBJECT_BYTES;

/// Largest `/apply` body.
pub const APPLY_BODY_LIMIT: usize = 64 << 20;
/// Largest body of any other request.
pub const BODY_LIMIT: usize = 1 << 20;
/// Most memory set aside up front for a body, whatever its `Content-Length` says; a larger
/// body grows the buffer as it arrives.
const INITIAL_CAPACITY_LIMIT: usize = 1 << 20;

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
    let mut stream = body.into_data_stream();
    let mut buf = Vec::with_capacity(initial_capacity(announced));
    while let Some(chunk) = stream.next().await {
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

/// Buffer size to start with for a body of `announced` bytes.
fn initial_capacity(announced: Option<u64>) -> usize {
    announced.map_or(0, |n| {
        usize::try_from(n).map_or(INITIAL_CAPACITY_LIMIT, |n| n.min(INITIAL_CAPACITY_LIMIT))
    })
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

/// YAML documents read as the CLI reads them ([`crate::yaml::options`]).
fn yaml_documents(text: &str) -> Result<Vec<Value>, ApiError> {
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

    #[test]
    fn a_large_content_length_does_not_reserve_its_size() {
        assert_eq!(initial_capacity(None), 0);
        assert_eq!(initial_capacity(Some(512)), 512);
        assert_eq!(
            initial_capacity(Some(APPLY_BODY_LIMIT as u64)),
            INITIAL_CAPACITY_LIMIT
        );
        assert_eq!(initial_capacity(Some(u64::MAX)), INITIAL_CAPACITY_LIMIT);
    }

    #[test]
    fn sizes() {
        assert_eq!(json_size(&json!({"a": [1, 2]})), r#"{"a":[1,2]}"#.len());
        assert!(object_too_large(&json!({"a": "x".repeat(MAX_OBJECT_BYTES)})).is_some());
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size(256 << 10), "256 KiB");
    }
}
