//! `GET .../instances/{name}/logs`: a replica's container output, streamed from its host's
//! agent (through the agent's own connection, see [`crate::agent_rpc::tasks`]) as chunked
//! `text/plain`. The agent redacts the replica's environment and secret values.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::RawQuery;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use clusterclaw_proto::agent as pb;
use tokio::sync::mpsc;

use super::error::{ApiError, ErrorCode};
use super::objects::check_path_names;
use super::{Ctx, P, query};
use crate::agent_rpc::tasks::{TaskError, TaskStream};
use crate::model::{FieldProblem, ObjectKey, Resource};
use crate::store::StoreError;

/// Longest line passed through whole when merging replicas (longer ones are split).
const MAX_LINE: usize = 64 * 1024;
/// Chunks buffered between the replicas' streams and the response.
const MERGE_QUEUE: usize = 8;

fn field_error(field: &str, problem: impl Into<String>) -> ApiError {
    let problem = problem.into();
    ApiError::bad_request(format!("{field}: {problem}"))
        .with_details(vec![FieldProblem::new(field, problem)])
}

/// What the query asks for.
#[derive(Debug, PartialEq)]
pub struct LogQuery {
    pub follow: bool,
    pub replica: Option<u32>,
    pub all: bool,
    pub tail: Option<u64>,
    /// Seconds since the epoch.
    pub since_unix: Option<i64>,
    pub timestamps: bool,
    pub previous: bool,
}

/// Reads the query; every bad value is a 400 naming its parameter.
pub fn parse_query(raw: Option<&str>, now: SystemTime) -> Result<LogQuery, ApiError> {
    let p = query::parse(
        raw,
        &[
            "follow",
            "replica",
            "all",
            "tail",
            "since",
            "timestamps",
            "previous",
        ],
    )?;
    let flag = |name: &str| p.bool(name).map_err(|e| field_error(name, e.message));
    let replica = p
        .get("replica")
        .map(|v| {
            v.parse::<u32>().map_err(|_| {
                field_error(
                    "replica",
                    format!("{v:?} is not a replica ordinal (a whole number from 0)"),
                )
            })
        })
        .transpose()?;
    let all = flag("all")?;
    if all && replica.is_some() {
        return Err(field_error(
            "replica",
            "give either replica or all=true, not both",
        ));
    }
    let tail = p
        .get("tail")
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                field_error(
                    "tail",
                    format!("{v:?} is not allowed; use a number of lines, 0 or more"),
                )
            })
        })
        .transpose()?;
    let since_unix = p.get("since").map(|v| parse_since(v, now)).transpose()?;
    Ok(LogQuery {
        follow: flag("follow")?,
        replica,
        all,
        tail,
        since_unix,
        timestamps: flag("timestamps")?,
        previous: flag("previous")?,
    })
}

/// `10m`, `1h30m` (that long ago) or an RFC 3339 time.
fn parse_since(v: &str, now: SystemTime) -> Result<i64, ApiError> {
    let at = if let Ok(d) = humantime::parse_duration(v) {
        now.checked_sub(d).unwrap_or(UNIX_EPOCH)
    } else if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        t
    } else {
        return Err(field_error(
            "since",
            format!("{v:?} is neither a duration (10m, 2h) nor an RFC 3339 time"),
        ));
    };
    let secs = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    Ok(i64::try_from(secs.max(1)).unwrap_or(i64::MAX))
}

fn task_error(e: TaskError) -> ApiError {
    match e {
        TaskError::NotFound(m) => ApiError::new(ErrorCode::NotFound, m),
        TaskError::NotConnected(_) | TaskError::NoAnswer(_) | TaskError::Broken(_) => {
            ApiError::new(ErrorCode::Unavailable, e.to_string())
        }
        TaskError::Failed(m) => ApiError::new(ErrorCode::Conflict, m),
    }
}

/// `GET .../logs`: a replica's container output, redacted, as chunked text/plain (`follow` keeps streaming it across replacements of the container).
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/logs", tag = "instances",
    params(("tenant" = String, Path), ("project" = String, Path), ("name" = String, Path),
        ("follow" = Option<bool>, Query, description = "Keep streaming new output, across replacements of the replica's container, until the replica is deleted"),
        ("replica" = Option<u32>, Query, description = "The replica's ordinal (default: the lowest)"),
        ("all" = Option<bool>, Query, description = "Every replica, merged line by line with a `replica-N | ` prefix"),
        ("tail" = Option<u64>, Query, description = "Lines from the end to start with (default: all)"),
        ("since" = Option<String>, Query, description = "Only output since this long ago (`10m`) or this RFC 3339 time"),
        ("timestamps" = Option<bool>, Query, description = "Start each line with its timestamp"),
        ("previous" = Option<bool>, Query, description = "The output of the replica container's previous run (the one before its last restart, which crashed or was stopped), else an older container of the replica its host still has")),
    responses((status = 200, description = "The output, as chunked text/plain", content_type = "text/plain", body = String),
        (status = 400, description = "BadRequest: a bad parameter (named in details)", body = super::error::ErrorBody),
        (status = 404, description = "NotFound: no such instance in scope, no such container, or (previous) no previous run", body = super::error::ErrorBody),
        (status = 503, description = "Unavailable: the replica's host is not connected", body = super::error::ErrorBody)))]
pub async fn instance_logs(
    state: Ctx,
    P((tenant, project, name)): P<(String, String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_path_names(&[("tenant", &tenant), ("project", &project), ("name", &name)])?;
    let key = ObjectKey::instance(tenant, project, name);
    let instance = {
        let key = key.clone();
        state.read_point(move |store| {
            match store.get(&key)?.map(|o| o.resource()).transpose()? {
                Some(Resource::OpenClawInstance(i)) => Ok(i),
                _ => Err(ApiError::from(StoreError::NotFound(key))),
            }
        })?
    };
    let q = parse_query(raw.as_deref(), SystemTime::now())?;
    let mut replicas: Vec<_> = instance
        .status
        .as_ref()
        .map(|s| s.replica_status.clone())
        .unwrap_or_default();
    replicas.sort_by_key(|r| r.ordinal);
    let chosen = if q.all {
        replicas
    } else if let Some(n) = q.replica {
        match replicas.into_iter().find(|r| r.ordinal == n) {
            Some(r) => vec![r],
            None => {
                return Err(field_error(
                    "replica",
                    format!(
                        "instance {} has no replica {n} ({}-{n})",
                        key.name, key.name
                    ),
                ));
            }
        }
    } else {
        replicas.into_iter().take(1).collect()
    };
    if chosen.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("instance {} has no replicas", key.name),
        ));
    }
    let mut streams = Vec::new();
    for r in &chosen {
        let Some(host) = r.host.clone() else {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!("replica {} is not placed on a host", r.name),
            ));
        };
        let task = pb::task::Kind::Log(pb::LogTask {
            tenant: key.tenant.clone(),
            project: key.project.clone(),
            instance: key.name.clone(),
            replica: r.name.clone(),
            follow: q.follow,
            tail: q.tail.map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX)),
            since_unix: q.since_unix.unwrap_or(0),
            timestamps: q.timestamps,
            previous: q.previous,
        });
        let stream = state.tasks().ask(&host, task).await.map_err(task_error)?;
        streams.push((r.name.clone(), stream));
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(MERGE_QUEUE);
    if q.all {
        for (name, stream) in streams {
            tokio::spawn(relay_prefixed(stream, format!("{name} | "), tx.clone()));
        }
    } else if let Some((_, stream)) = streams.pop() {
        tokio::spawn(relay(stream, tx));
    }
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

/// The stream's next item, or `None` once the response is gone (then the task is dropped,
/// which stops it on the host) even while the replica writes nothing.
async fn next_unless_closed(
    stream: &mut TaskStream,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Option<Result<Vec<u8>, TaskError>> {
    tokio::select! {
        item = stream.next() => item,
        () = tx.closed() => None,
    }
}

fn broken(e: &TaskError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// One replica's output as it comes; a failure ends the body with an error line and an abort.
async fn relay(mut stream: TaskStream, tx: mpsc::Sender<Result<Bytes, std::io::Error>>) {
    while let Some(item) = next_unless_closed(&mut stream, &tx).await {
        match item {
            Ok(data) => {
                if tx.send(Ok(Bytes::from(data))).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx
                    .send(Ok(Bytes::from(format!("--- error: {e} ---\n"))))
                    .await;
                let _ = tx.send(Err(broken(&e))).await;
                return;
            }
        }
    }
}

/// One replica's output, line by line with `prefix`, into a merged body.
async fn relay_prefixed(
    mut stream: TaskStream,
    prefix: String,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut partial: Vec<u8> = Vec::new();
    while let Some(item) = next_unless_closed(&mut stream, &tx).await {
        match item {
            Ok(data) => {
                partial.extend_from_slice(&data);
                let mut out = Vec::new();
                let mut start = 0;
                while let Some(pos) = partial[start..].iter().position(|b| *b == b'\n') {
                    out.extend_from_slice(prefix.as_bytes());
                    out.extend_from_slice(&partial[start..=start + pos]);
                    start += pos + 1;
                }
                partial.drain(..start);
                if partial.len() > MAX_LINE {
                    out.extend_from_slice(prefix.as_bytes());
                    out.append(&mut partial);
                    out.push(b'\n');
                }
                if !out.is_empty() && tx.send(Ok(Bytes::from(out))).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx
                    .send(Ok(Bytes::from(format!("{prefix}--- error: {e} ---\n"))))
                    .await;
                let _ = tx.send(Err(broken(&e))).await;
                return;
            }
        }
    }
    if !partial.is_empty() {
        partial.push(b'\n');
        let mut out = prefix.into_bytes();
        out.append(&mut partial);
        let _ = tx.send(Ok(Bytes::from(out))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    #[test]
    fn reads_the_query() {
        let q = parse_query(Some("follow=true&tail=10&since=10m&replica=2"), now()).unwrap();
        assert!(q.follow);
        assert_eq!(q.tail, Some(10));
        assert_eq!(q.since_unix, Some(1_000_000 - 600));
        assert_eq!(q.replica, Some(2));
        let q = parse_query(Some("since=2026-01-01T00:00:00Z"), now()).unwrap();
        assert_eq!(q.since_unix, Some(1_767_225_600));
    }

    #[test]
    fn bad_values_name_their_parameter() {
        for (raw, field) in [
            ("tail=-1", "tail"),
            ("since=yesterday", "since"),
            ("replica=x", "replica"),
            ("replica=1&all=true", "replica"),
            ("follow=maybe", "follow"),
        ] {
            let e = parse_query(Some(raw), now()).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{raw}");
            assert_eq!(e.details[0].field, field, "{raw}");
        }
    }
}
