//! Tasks: the server asking a host's agent for a stream of bytes (a replica's logs), over
//! connections the agent makes.
//!
//! Every agent holds one `Tasks` call open; the [`TaskHub`] keeps, per connected host, the
//! sender of that call's stream. [`TaskHub::ask`] sends a [`pb::Task`] down it and waits for
//! the agent to answer with a `TaskOutput` call whose first chunk names the task; the call's
//! chunks are then relayed to the asker through a small bounded channel, so a slow reader
//! slows the agent (HTTP/2 flow control does the rest) and nothing buffers without limit.
//! When the asker drops its [`TaskStream`], the relay notices and answers the agent's call,
//! which ends the task on the host.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clusterclaw_proto::agent as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};

/// Tasks waiting in a host's `Tasks` stream before [`TaskHub::ask`] gives up.
const TASK_QUEUE: usize = 16;
/// Chunks buffered between a `TaskOutput` call and its asker.
const RELAY_QUEUE: usize = 4;
/// How long an agent has to start answering a task.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a task could not be started or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// The host's agent holds no `Tasks` call (it is down or cannot reach the server).
    #[error(
        "host {0} is not connected to the control plane (its agent is down or cannot reach the server)"
    )]
    NotConnected(String),
    /// The agent did not answer in time.
    #[error("host {0} did not answer in time")]
    NoAnswer(String),
    /// The agent says the thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The agent refused or failed the task.
    #[error("{0}")]
    Failed(String),
    /// The stream broke off (the host went away mid-stream).
    #[error("{0}")]
    Broken(String),
}

/// What a `TaskOutput` call relays to the asker.
enum Relay {
    Data(Vec<u8>),
    Error(TaskError),
    /// The SHA-256 the agent computed over everything it sent (volume streams).
    Digest(String),
}

struct Pending {
    host: String,
    /// Taken by the `TaskOutput` call that answers the task.
    claim: Option<oneshot::Sender<Result<mpsc::Receiver<Relay>, TaskError>>>,
}

/// Connected hosts' task senders and the tasks waiting for their answer.
#[derive(Default)]
pub struct TaskHub {
    hosts: Mutex<HashMap<String, mpsc::Sender<pb::Task>>>,
    pending: Mutex<HashMap<String, Pending>>,
    next_id: AtomicU64,
}

/// The bytes of a running task, as the asker reads them. Dropping it cancels the task.
pub struct TaskStream {
    rx: mpsc::Receiver<Relay>,
    digest: Option<String>,
}

impl TaskStream {
    /// The next piece of output; `None` when the task ended successfully.
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, TaskError>> {
        loop {
            match self.rx.recv().await? {
                Relay::Data(d) => return Some(Ok(d)),
                Relay::Error(e) => return Some(Err(e)),
                Relay::Digest(d) => self.digest = Some(d),
            }
        }
    }

    /// The SHA-256 the agent sent with its last chunk (volume streams), once `next` ended.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }
}

/// Removes a task's pending entry however `ask` ends.
struct PendingGuard<'a> {
    hub: &'a TaskHub,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.hub.lock_pending().remove(&self.id);
    }
}

impl TaskHub {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_hosts(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<pb::Task>>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `host`'s agent holds a `Tasks` call.
    pub fn connected(&self, host: &str) -> bool {
        self.lock_hosts()
            .get(host)
            .is_some_and(|tx| !tx.is_closed())
    }

    /// A new `Tasks` call of `host`: the stream to send its tasks on (replacing an older call).
    pub fn connect(&self, host: &str) -> mpsc::Receiver<pb::Task> {
        let (tx, rx) = mpsc::channel(TASK_QUEUE);
        self.lock_hosts().insert(host.to_string(), tx);
        rx
    }

    /// Sends `kind` to `host`'s agent and waits (up to [`ANSWER_TIMEOUT`]) for it to start
    /// answering. An error the agent answers at once (no such replica) comes back here.
    pub async fn ask(&self, host: &str, kind: pb::task::Kind) -> Result<TaskStream, TaskError> {
        let sender = self
            .lock_hosts()
            .get(host)
            .filter(|tx| !tx.is_closed())
            .cloned()
            .ok_or_else(|| TaskError::NotConnected(host.to_string()))?;
        let id = format!(
            "t{}-{:08x}",
            self.next_id.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let (claim_tx, claim_rx) = oneshot::channel();
        self.lock_pending().insert(
            id.clone(),
            Pending {
                host: host.to_string(),
                claim: Some(claim_tx),
            },
        );
        let _guard = PendingGuard {
            hub: self,
            id: id.clone(),
        };
        let task = pb::Task {
            id: id.clone(),
            kind: Some(kind),
        };
        tokio::time::timeout(ANSWER_TIMEOUT, sender.send(task))
            .await
            .map_err(|_| TaskError::NoAnswer(host.to_string()))?
            .map_err(|_| TaskError::NotConnected(host.to_string()))?;
        match tokio::time::timeout(ANSWER_TIMEOUT, claim_rx).await {
            Err(_) => Err(TaskError::NoAnswer(host.to_string())),
            Ok(Err(_)) => Err(TaskError::NotConnected(host.to_string())),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok(rx))) => Ok(TaskStream { rx, digest: None }),
        }
    }

    /// Serves one `TaskOutput` call of `host`: reads the first chunk, hands the task's stream
    /// to its asker, then relays chunks until the end marker, the call breaks, or the asker
    /// goes away (then the call is answered at once, which tells the agent to stop).
    pub async fn relay(
        &self,
        host: &str,
        mut stream: Streaming<pb::TaskChunk>,
    ) -> Result<pb::TaskOutputResponse, Status> {
        let first = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(e),
            None => return Err(Status::invalid_argument("an empty TaskOutput call")),
        };
        let claim = {
            let mut pending = self.lock_pending();
            match pending.get_mut(&first.task_id) {
                Some(p) if p.host == host => p.claim.take(),
                // Another host's task is answered as an unknown one: nothing is told of it.
                _ => None,
            }
        };
        let Some(claim) = claim else {
            return Err(Status::not_found(format!(
                "task {:?} is not waiting for this host (its reader went away)",
                first.task_id
            )));
        };
        if first.end {
            let error = error_of(&first, host);
            let _ = claim.send(match error {
                Some(e) => Err(e),
                None => Ok(mpsc::channel(1).1),
            });
            return Ok(pb::TaskOutputResponse {});
        }
        let (tx, rx) = mpsc::channel(RELAY_QUEUE);
        if claim.send(Ok(rx)).is_err() {
            return Err(Status::cancelled("the reader went away"));
        }
        if !first.data.is_empty() && tx.send(Relay::Data(first.data)).await.is_err() {
            return Err(Status::cancelled("the reader went away"));
        }
        loop {
            let chunk = tokio::select! {
                c = stream.next() => c,
                () = tx.closed() => return Err(Status::cancelled("the reader went away")),
            };
            match chunk {
                Some(Ok(c)) => {
                    let end = c.end;
                    let error = if end { error_of(&c, host) } else { None };
                    if !c.data.is_empty() && tx.send(Relay::Data(c.data)).await.is_err() {
                        return Err(Status::cancelled("the reader went away"));
                    }
                    if let Some(e) = error {
                        let _ = tx.send(Relay::Error(e)).await;
                    } else if end && !c.sha256.is_empty() {
                        let _ = tx.send(Relay::Digest(c.sha256)).await;
                    }
                    if end {
                        return Ok(pb::TaskOutputResponse {});
                    }
                }
                Some(Err(e)) => {
                    let _ = tx
                        .send(Relay::Error(TaskError::Broken(format!(
                            "host {host} broke off the stream: {}",
                            e.message()
                        ))))
                        .await;
                    return Err(e);
                }
                None => {
                    let _ = tx
                        .send(Relay::Error(TaskError::Broken(format!(
                            "host {host} broke off the stream"
                        ))))
                        .await;
                    return Ok(pb::TaskOutputResponse {});
                }
            }
        }
    }
}

fn error_of(chunk: &pb::TaskChunk, host: &str) -> Option<TaskError> {
    if chunk.error.is_empty() {
        return None;
    }
    let text = format!("host {host}: {}", chunk.error);
    Some(match tonic::Code::from(chunk.error_code) {
        tonic::Code::NotFound => TaskError::NotFound(text),
        tonic::Code::Unavailable => TaskError::Broken(text),
        _ => TaskError::Failed(text),
    })
}

/// The `Tasks` stream of one host, as tonic sends it.
pub type TaskFeed = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::Task, Status>> + Send>>;

/// Wraps a host's task receiver as the response stream of its `Tasks` call.
pub fn feed(rx: mpsc::Receiver<pb::Task>) -> TaskFeed {
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok))
}

/// A hub shared by the agent port and the API.
pub type SharedTaskHub = Arc<TaskHub>;
