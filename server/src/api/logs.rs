//! `GET .../instances/{name}/logs`: a replica's container output, streamed from its host's
//! agent (through the agent's own connection, see [`crate::agent_rpc::tasks`]) as chunked
//! `text/plain`. The agent redacts the replica's environment and secret values.
//!
//! With `follow`, the host's agent follows the replica into its next container on that host;
//! when the replica leaves the host (a drain or a failover moves it) or the host's stream
//! breaks, the server finds the host the replica is placed on now, prints a marker line and
//! follows it there ([`Follow`]), until the replica or its instance is deleted or the reader
//! goes away.

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
/// How often a follower looks for the host a moved replica runs on now.
const FOLLOW_RETRY: Duration = Duration::from_millis(500);

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
        ("follow" = Option<bool>, Query, description = "Keep streaming new output, across replacements of the replica's container and into its next host when a drain or a failover moves it (a marker line says where), until the replica is deleted"),
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
        let task = pb::LogTask {
            tenant: key.tenant.clone(),
            project: key.project.clone(),
            instance: key.name.clone(),
            replica: r.name.clone(),
            follow: q.follow,
            tail: q.tail.map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX)),
            since_unix: q.since_unix.unwrap_or(0),
            timestamps: q.timestamps,
            previous: q.previous,
        };
        let stream = state
            .tasks()
            .ask(&host, pb::task::Kind::Log(task.clone()))
            .await
            .map_err(task_error)?;
        let follow = (q.follow && !q.previous).then(|| Follow {
            ctx: state.clone(),
            key: key.clone(),
            task,
            host,
        });
        streams.push((r.name.clone(), stream, follow));
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(MERGE_QUEUE);
    for (name, stream, follow) in streams {
        let prefix = if q.all {
            format!("{name} | ")
        } else {
            String::new()
        };
        tokio::spawn(relay(stream, prefix, follow, tx.clone()));
    }
    drop(tx);
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

/// How one host's stream of a replica ended.
enum Ended {
    /// The agent ended it: the replica left the host (or, without follow, the output ended).
    Done,
    /// The reader went away.
    Gone,
    /// The stream broke off.
    Broken(TaskError),
}

/// Relays `stream` into the body until it ends: as it comes with an empty `prefix`, else line
/// by line with `prefix` (a line longer than [`MAX_LINE`] is split), `partial` holding the
/// start of a line not yet ended.
async fn pump(
    stream: &mut TaskStream,
    prefix: &str,
    partial: &mut Vec<u8>,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Ended {
    while let Some(item) = next_unless_closed(stream, tx).await {
        let data = match item {
            Ok(data) => data,
            Err(e) => return Ended::Broken(e),
        };
        let out = if prefix.is_empty() {
            data
        } else {
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
                out.append(partial);
                out.push(b'\n');
            }
            out
        };
        if !out.is_empty() && tx.send(Ok(Bytes::from(out))).await.is_err() {
            return Ended::Gone;
        }
    }
    if tx.is_closed() {
        Ended::Gone
    } else {
        Ended::Done
    }
}

/// What a `follow` needs to find a replica again once its host's stream ends.
struct Follow {
    ctx: Ctx,
    key: ObjectKey,
    /// The task as first asked (tail, since, timestamps).
    task: pb::LogTask,
    /// The host streaming now.
    host: String,
}

impl Follow {
    /// The host the replica is placed on now: `Err(())` once the instance or the replica is
    /// gone (the follow ends), `Ok(None)` while it is placed nowhere.
    fn placement(&self) -> Result<Option<String>, ()> {
        let key = self.key.clone();
        let found = self.ctx.read_point(move |store| {
            Ok(match store.get(&key)?.map(|o| o.resource()).transpose()? {
                Some(Resource::OpenClawInstance(i)) => Some(i),
                _ => None,
            })
        });
        let Ok(Some(instance)) = found else {
            return Err(());
        };
        instance
            .status
            .as_ref()
            .and_then(|s| {
                s.replica_status
                    .iter()
                    .find(|r| r.name == self.task.replica)
            })
            .map(|r| r.host.clone())
            .ok_or(())
    }

    /// Waits for the replica's next stream (on the host it is placed on now) and says where it
    /// went with a marker line; `None` when the follow ends (the replica or its instance was
    /// deleted, the reader went away, the host refused).
    async fn next(
        &mut self,
        prefix: &str,
        tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> Option<TaskStream> {
        loop {
            let Ok(placed) = self.placement() else {
                return None;
            };
            if let Some(host) = placed {
                let mut task = self.task.clone();
                if host == self.host {
                    // The same host again (its stream broke): only what comes from now on.
                    task.tail = 0;
                } else {
                    // Another host: the new container's output from its start.
                    task.tail = -1;
                    task.since_unix = 0;
                }
                match self.ctx.tasks().ask(&host, pb::task::Kind::Log(task)).await {
                    Ok(stream) => {
                        let marker = if host == self.host {
                            format!(
                                "{prefix}--- replica {} followed again on host {host} ---\n",
                                self.task.replica
                            )
                        } else {
                            format!(
                                "{prefix}--- replica {} moved to host {host} ---\n",
                                self.task.replica
                            )
                        };
                        self.host = host;
                        if tx.send(Ok(Bytes::from(marker))).await.is_err() {
                            return None;
                        }
                        return Some(stream);
                    }
                    // Not there yet (its container is being made, its volume moved), or the
                    // host is away for now: look again.
                    Err(TaskError::NotFound(_) | TaskError::NotConnected(_))
                    | Err(TaskError::NoAnswer(_) | TaskError::Broken(_)) => {}
                    Err(e @ TaskError::Failed(_)) => {
                        let _ = tx
                            .send(Ok(Bytes::from(format!("{prefix}--- error: {e} ---\n"))))
                            .await;
                        return None;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_RETRY) => {}
                () = tx.closed() => return None,
            }
        }
    }
}

/// One replica's output into the body (line by line with `prefix` when it is not empty);
/// with `follow`, across hosts. A failure without follow ends the body with an error line and
/// an abort.
async fn relay(
    mut stream: TaskStream,
    prefix: String,
    mut follow: Option<Follow>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let ended = pump(&mut stream, &prefix, &mut partial, &tx).await;
        if !partial.is_empty() && !matches!(ended, Ended::Gone) {
            partial.push(b'\n');
            let mut out = prefix.clone().into_bytes();
            out.append(&mut partial);
            if tx.send(Ok(Bytes::from(out))).await.is_err() {
                return;
            }
        }
        match (ended, follow.as_mut()) {
            (Ended::Gone, _) | (Ended::Done, None) => return,
            (Ended::Broken(e), None) => {
                let _ = tx
                    .send(Ok(Bytes::from(format!("{prefix}--- error: {e} ---\n"))))
                    .await;
                let _ = tx.send(Err(broken(&e))).await;
                return;
            }
            (Ended::Done | Ended::Broken(_), Some(f)) => match f.next(&prefix, &tx).await {
                Some(next) => stream = next,
                None => return,
            },
        }
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
