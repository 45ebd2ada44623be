//! Tasks of the control plane: the agent holds a `Tasks` call open (opened again with backoff
//! when it breaks, like the long poll) and answers every task with a `TaskOutput` call.
//!
//! A log task streams a replica's container output up. The agent redacts it line by line
//! before it leaves the host: every value of the replica's environment (the Gateway token and
//! the secrets among them) and the secret-looking strings of its config become `[REDACTED]`.
//! Chunks go through a small bounded channel into the call, so a slow reader slows the engine
//! read and nothing piles up. When the server answers the call (its reader went away), the
//! task stops. With `follow`, the stream goes on into the replica's next container when it is
//! replaced (with a marker line) and ends when the replica is no longer assigned here.

use std::sync::Arc;
use std::time::Duration;

use clusterclaw_proto::agent as pb;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::control::{GrpcControlPlane, describe_status};
use crate::model::{Assignment, ReplicaKey};
use crate::reconcile::Reconciler;
use crate::runtime::{Labelled, LogOptions, LogStream, ObservedContainer, labels};
use crate::sync::{DesiredSet, RECONNECT_MAX_DELAY, reconnect_backoff, stopped};

/// What replaces a redacted value.
pub const REDACTED: &str = "[REDACTED]";
/// Shortest value redacted (shorter ones would garble every line).
const MIN_REDACTED_LEN: usize = 4;
/// Chunks queued for the `TaskOutput` call.
const CHUNK_QUEUE: usize = 4;
/// Most bytes gathered into one chunk.
const CHUNK_BYTES: usize = 32 * 1024;
/// How long output is gathered into one chunk after its first piece.
const GATHER: Duration = Duration::from_millis(20);
/// Longest line kept whole; a longer one is cut.
const MAX_LINE: usize = 64 * 1024;
/// How often a follower looks for the replica's next container.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// Runs the task loop.
pub struct TaskRunner {
    control: Arc<GrpcControlPlane>,
    reconciler: Arc<Reconciler>,
    host_id: String,
    desired: watch::Receiver<Option<Arc<DesiredSet>>>,
}

/// Why a task could not start: the gRPC code that fits and a message.
type Refusal = (tonic::Code, String);

impl TaskRunner {
    pub fn new(
        control: Arc<GrpcControlPlane>,
        reconciler: Arc<Reconciler>,
        host_id: String,
        desired: watch::Receiver<Option<Arc<DesiredSet>>>,
    ) -> Self {
        TaskRunner {
            control,
            reconciler,
            host_id,
            desired,
        }
    }

    /// Holds the `Tasks` call open until `stop`, answering every task on its own task.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let mut backoff = reconnect_backoff(RECONNECT_MAX_DELAY);
        let mut running = tokio::task::JoinSet::new();
        loop {
            let mut client = this.control.task_client();
            let opened = tokio::select! {
                () = stopped(&mut stop) => break,
                r = client.tasks(pb::TasksRequest {}) => r,
            };
            match opened {
                Ok(stream) => {
                    backoff = reconnect_backoff(RECONNECT_MAX_DELAY);
                    let mut stream = stream.into_inner();
                    loop {
                        let next = tokio::select! {
                            () = stopped(&mut stop) => {
                                running.abort_all();
                                return;
                            }
                            m = stream.message() => m,
                            Some(_) = running.join_next(), if !running.is_empty() => continue,
                        };
                        match next {
                            Ok(Some(task)) => {
                                running.spawn(Arc::clone(&this).answer(task));
                            }
                            Ok(None) => break,
                            Err(status) => {
                                tracing::debug!(error = %describe_status(&status), "the task stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    tracing::debug!(error = %describe_status(&status), "cannot open the task stream");
                }
            }
            let delay = backoff.next().unwrap_or(RECONNECT_MAX_DELAY);
            tokio::select! {
                () = stopped(&mut stop) => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        running.abort_all();
    }

    async fn answer(self: Arc<Self>, task: pb::Task) {
        match task.kind {
            Some(pb::task::Kind::Log(log)) => self.answer_log(task.id, log).await,
            Some(pb::task::Kind::VolumeExport(export)) => {
                self.answer_export(task.id, export).await;
            }
            None => {
                let chunk = pb::TaskChunk {
                    task_id: task.id,
                    end: true,
                    error: "this agent does not know that kind of task".into(),
                    error_code: tonic::Code::Unimplemented as i32,
                    ..Default::default()
                };
                let mut client = self.control.task_client();
                let _ = client.task_output(futures::stream::iter([chunk])).await;
            }
        }
    }

    async fn answer_log(self: Arc<Self>, id: String, task: pb::LogTask) {
        let started = self.start_log(&task).await;
        let (tx, rx) = mpsc::channel(CHUNK_QUEUE);
        let mut client = self.control.task_client();
        let first = match &started {
            Ok(_) => pb::TaskChunk {
                task_id: id.clone(),
                ..Default::default()
            },
            Err((code, message)) => pb::TaskChunk {
                task_id: id.clone(),
                end: true,
                error: message.clone(),
                error_code: *code as i32,
                ..Default::default()
            },
        };
        // The channel is empty: this cannot wait.
        let _ = tx.try_send(first);
        let call = client.task_output(tokio_stream::wrappers::ReceiverStream::new(rx));
        tokio::pin!(call);
        let Ok((container, stream, redactor)) = started else {
            drop(tx);
            let _ = call.await;
            return;
        };
        let produce = self.produce(&task, container, stream, &redactor, tx);
        tokio::select! {
            r = &mut call => {
                // The server answered first: its reader went away (or the connection broke).
                if let Err(status) = r {
                    tracing::debug!(task = %id, replica = %task.replica, reason = %describe_status(&status), "log stream stopped");
                }
            }
            () = produce => {
                let _ = call.await;
            }
        }
    }

    /// Streams a replica's state volume up (see [`crate::transfer`]).
    async fn answer_export(self: Arc<Self>, id: String, task: pb::VolumeExportTask) {
        let key = ReplicaKey::new(&task.tenant, &task.project, &task.replica);
        let desired = self.desired.clone();
        let assigned = move || {
            desired
                .borrow()
                .as_ref()
                .is_some_and(|d| d.assignments.iter().any(|a| a.key() == key))
        };
        // Accepted at once: reading the volume out may take longer than the server waits
        // for a first answer; a failure from here on ends the stream with its reason.
        let (tx, rx) = mpsc::channel(CHUNK_QUEUE);
        let mut client = self.control.task_client();
        let _ = tx.try_send(pb::TaskChunk {
            task_id: id.clone(),
            ..Default::default()
        });
        let call = client.task_output(tokio_stream::wrappers::ReceiverStream::new(rx));
        tokio::pin!(call);
        let produce = async {
            let prepared = crate::transfer::export_to_file(
                self.reconciler.runtime(),
                &self.reconciler.owner(),
                &self.host_id,
                &self.reconciler.settings().data_dir,
                &task,
                assigned,
            )
            .await;
            let (file, bytes) = match prepared {
                Ok(p) => p,
                Err((code, message)) => {
                    tracing::warn!(task = %id, replica = %task.replica, error = %message, "cannot export the state volume");
                    let _ = tx
                        .send(pb::TaskChunk {
                            end: true,
                            error: message,
                            error_code: code as i32,
                            ..Default::default()
                        })
                        .await;
                    return;
                }
            };
            tracing::info!(task = %id, replica = %task.replica, bytes, "exporting the state volume");
            if let Err(e) = crate::transfer::send_file(&file.0, &tx).await {
                tracing::warn!(task = %id, replica = %task.replica, error = %e, "state export stopped");
            }
            drop(file);
            drop(tx);
        };
        tokio::select! {
            r = &mut call => {
                if let Err(status) = r {
                    tracing::warn!(task = %id, replica = %task.replica, reason = %describe_status(&status), "state export stopped");
                }
            }
            () = produce => {
                let _ = call.await;
            }
        }
    }

    fn assignment(&self, task: &pb::LogTask) -> Option<Assignment> {
        let desired = self.desired.borrow().clone()?;
        desired
            .assignments
            .iter()
            .find(|a| {
                a.tenant == task.tenant && a.project == task.project && a.replica == task.replica
            })
            .cloned()
    }

    /// The replica's containers on this host, the current one first (running, then newest).
    async fn containers(&self, key: &ReplicaKey) -> Result<Vec<ObservedContainer>, Refusal> {
        let owner = self.reconciler.owner();
        let mut found: Vec<ObservedContainer> = self
            .reconciler
            .runtime()
            .list_managed_containers(&self.host_id)
            .await
            .map_err(|e| (tonic::Code::Unavailable, e.to_string()))?
            .into_iter()
            .filter(|c| owner.owns(c) && c.replica_key().as_ref() == Some(key))
            .collect();
        found.sort_by(|a, b| {
            b.status
                .is_running()
                .cmp(&a.status.is_running())
                .then_with(|| b.started_at.cmp(&a.started_at))
        });
        Ok(found)
    }

    async fn start_log(
        &self,
        task: &pb::LogTask,
    ) -> Result<(ObservedContainer, LogStream, Redactor), Refusal> {
        let Some(assignment) = self.assignment(task) else {
            return Err((
                tonic::Code::NotFound,
                format!("replica {} is not assigned to this host", task.replica),
            ));
        };
        let key = assignment.key();
        let mut containers = self.containers(&key).await?;
        let container = if task.previous {
            if containers.len() < 2 {
                return Err((
                    tonic::Code::NotFound,
                    format!(
                        "no previous container of replica {} is kept on this host (a replaced container is removed)",
                        task.replica
                    ),
                ));
            }
            containers.swap_remove(1)
        } else if containers.is_empty() {
            return Err((
                tonic::Code::NotFound,
                format!("replica {} has no container on this host yet", task.replica),
            ));
        } else {
            containers.swap_remove(0)
        };
        let options = LogOptions {
            follow: task.follow && !task.previous,
            tail: u64::try_from(task.tail).ok(),
            since_unix: task.since_unix.max(0),
            timestamps: task.timestamps,
        };
        let stream = self
            .reconciler
            .runtime()
            .container_logs(&container.id, &options)
            .await
            .map_err(|e| (tonic::Code::Unavailable, e.to_string()))?;
        Ok((container, stream, Redactor::for_assignment(&assignment)))
    }

    /// Sends the output, redacted, until it ends (following into the next container with
    /// `follow`), or the call's reader is gone.
    async fn produce(
        &self,
        task: &pb::LogTask,
        mut container: ObservedContainer,
        mut stream: LogStream,
        redactor: &Redactor,
        tx: mpsc::Sender<pb::TaskChunk>,
    ) {
        let follow = task.follow && !task.previous;
        let send = |data: Vec<u8>| {
            let tx = tx.clone();
            async move {
                tx.send(pb::TaskChunk {
                    data,
                    ..Default::default()
                })
                .await
                .is_ok()
            }
        };
        let mut lines = LineBuffer::default();
        loop {
            // Read this container's output.
            let failure = loop {
                let first = match stream.next().await {
                    Some(Ok(b)) => b,
                    Some(Err(e)) => break Some(e.to_string()),
                    None => break None,
                };
                let mut out = lines.push(&first, redactor);
                let deadline = Instant::now() + GATHER;
                let mut ended = None;
                while out.len() < CHUNK_BYTES {
                    match tokio::time::timeout_at(deadline, stream.next()).await {
                        Ok(Some(Ok(b))) => out.extend(lines.push(&b, redactor)),
                        Ok(Some(Err(e))) => {
                            ended = Some(Some(e.to_string()));
                            break;
                        }
                        Ok(None) => {
                            ended = Some(None);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if !out.is_empty() && !send(out).await {
                    return;
                }
                if let Some(end) = ended {
                    break end;
                }
            };
            let rest = lines.finish(redactor);
            if !rest.is_empty() && !send(rest).await {
                return;
            }
            if !follow {
                let _ = tx
                    .send(match failure {
                        None => pb::TaskChunk {
                            end: true,
                            ..Default::default()
                        },
                        Some(e) => pb::TaskChunk {
                            end: true,
                            error: e,
                            error_code: tonic::Code::Unavailable as i32,
                            ..Default::default()
                        },
                    })
                    .await;
                return;
            }
            // Follow: the container stopped. Wait for it to run again, for its replacement, or
            // for the replica to leave this host.
            let next = tokio::select! {
                () = tx.closed() => return,
                n = self.next_container(task, &container) => n,
            };
            let (next, options) = match next {
                None => {
                    let _ = tx
                        .send(pb::TaskChunk {
                            end: true,
                            ..Default::default()
                        })
                        .await;
                    return;
                }
                Some(c) if c.id == container.id => {
                    let since = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
                    (
                        c,
                        LogOptions {
                            follow: true,
                            since_unix: since,
                            timestamps: task.timestamps,
                            tail: None,
                        },
                    )
                }
                Some(c) => {
                    let marker = format!(
                        "--- replica {} replaced: now container {} (revision {}) ---\n",
                        task.replica,
                        short_id(&c.id),
                        c.label(labels::CONFIG_REVISION).unwrap_or("?")
                    );
                    if !send(marker.into_bytes()).await {
                        return;
                    }
                    (
                        c,
                        LogOptions {
                            follow: true,
                            timestamps: task.timestamps,
                            ..Default::default()
                        },
                    )
                }
            };
            match self
                .reconciler
                .runtime()
                .container_logs(&next.id, &options)
                .await
            {
                Ok(s) => {
                    stream = s;
                    container = next;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the next container's output yet");
                    container = next;
                    stream = futures::stream::empty().boxed();
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
            }
        }
    }

    /// The container to follow after `old` stopped: `old` once it runs again, another running
    /// container of the replica, or `None` once the replica is no longer assigned here.
    async fn next_container(
        &self,
        task: &pb::LogTask,
        old: &ObservedContainer,
    ) -> Option<ObservedContainer> {
        loop {
            let assignment = self.assignment(task)?;
            if let Ok(found) = self.containers(&assignment.key()).await
                && let Some(c) = found.into_iter().find(|c| {
                    c.status.is_running() && (c.id != old.id || c.started_at != old.started_at)
                })
            {
                return Some(c);
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Replaces a replica's secret values in its output.
#[derive(Debug, Default, Clone)]
pub struct Redactor {
    /// Longest first, so that a value containing another is replaced whole.
    values: Vec<String>,
}

impl Redactor {
    /// The values of the assignment's environment (with the Gateway token the agent adds, see
    /// [`crate::gateway`]), and the strings of its config under keys
    /// that name a secret (`token`, `password`, `secret`, `apiKey`, ...).
    pub fn for_assignment(a: &Assignment) -> Self {
        let mut values: Vec<String> = a.env.values().cloned().collect();
        values.extend(crate::gateway::injected_token(a));
        if let Ok(config) = serde_json::from_str::<serde_json::Value>(&a.config_json) {
            secret_strings(&config, false, &mut values);
        }
        Redactor::new(values)
    }

    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut values: Vec<String> = values
            .into_iter()
            .filter(|v| v.len() >= MIN_REDACTED_LEN)
            .collect();
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        Redactor { values }
    }

    /// One line (or any text) with every value replaced.
    pub fn redact(&self, line: &[u8]) -> Vec<u8> {
        let mut out = line.to_vec();
        for v in &self.values {
            let v = v.as_bytes();
            if out.len() < v.len() {
                continue;
            }
            if let Some(first) = find(&out, v) {
                let mut replaced = Vec::with_capacity(out.len());
                replaced.extend_from_slice(&out[..first]);
                let mut rest = &out[first..];
                while let Some(at) = find(rest, v) {
                    replaced.extend_from_slice(&rest[..at]);
                    replaced.extend_from_slice(REDACTED.as_bytes());
                    rest = &rest[at + v.len()..];
                }
                replaced.extend_from_slice(rest);
                out = replaced;
            }
        }
        out
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["token", "password", "secret", "apikey", "api_key", "key"]
        .iter()
        .any(|s| k.contains(s))
}

fn secret_strings(v: &serde_json::Value, secret: bool, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) if secret => out.push(s.clone()),
        serde_json::Value::Array(items) => {
            for i in items {
                secret_strings(i, secret, out);
            }
        }
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                secret_strings(v, secret || secret_key(k), out);
            }
        }
        _ => {}
    }
}

/// Cuts output into whole lines, so that a value split across pieces is still redacted.
#[derive(Debug, Default)]
pub struct LineBuffer {
    partial: Vec<u8>,
}

impl LineBuffer {
    /// The whole lines completed by `piece`, redacted; the rest waits for its end.
    pub fn push(&mut self, piece: &[u8], redactor: &Redactor) -> Vec<u8> {
        self.partial.extend_from_slice(piece);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.partial[start..].iter().position(|b| *b == b'\n') {
            out.extend(redactor.redact(&self.partial[start..=start + pos]));
            start += pos + 1;
        }
        self.partial.drain(..start);
        if self.partial.len() > MAX_LINE {
            out.extend(self.finish(redactor));
        }
        out
    }

    /// What is left (a last line without its newline), redacted, with a newline.
    pub fn finish(&mut self, redactor: &Redactor) -> Vec<u8> {
        if self.partial.is_empty() {
            return Vec::new();
        }
        let mut out = redactor.redact(&self.partial);
        out.push(b'\n');
        self.partial.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_values_split_across_pieces() {
        let r = Redactor::new(["s3cret-token".to_string(), "ab".to_string()]);
        let mut lines = LineBuffer::default();
        let mut out = lines.push(b"token is s3cr", &r);
        assert!(out.is_empty());
        out.extend(lines.push(b"et-token, ab\nnext s3cret-token", &r));
        out.extend(lines.finish(&r));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "token is [REDACTED], ab\nnext [REDACTED]\n"
        );
    }

    #[test]
    fn the_longest_value_goes_first() {
        let r = Redactor::new(["abcd".to_string(), "abcdefgh".to_string()]);
        assert_eq!(r.redact(b"x abcdefgh abcd"), b"x [REDACTED] [REDACTED]");
    }

    #[test]
    fn config_secrets_are_redacted() {
        let mut a = Assignment::test("bot-0");
        a.env
            .insert("OPENCLAW_GATEWAY_TOKEN".into(), "gw-token-1".into());
        a.config_json = r#"{"gateway":{"auth":{"token":"tok-in-config"}},"models":{"apiKey":"sk-123456"},"name":"visible"}"#.into();
        let r = Redactor::for_assignment(&a);
        let line = b"gw-token-1 tok-in-config sk-123456 visible";
        assert_eq!(
            String::from_utf8(r.redact(line)).unwrap(),
            "[REDACTED] [REDACTED] [REDACTED] visible"
        );
    }
}
