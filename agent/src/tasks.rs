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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
        let redactor = Redactor::for_assignment(&assignment);
        if task.previous {
            let (container, stream) = self.previous_output(task, &key, containers).await?;
            return Ok((container, stream, redactor));
        }
        if containers.is_empty() {
            return Err((
                tonic::Code::NotFound,
                format!("replica {} has no container on this host yet", task.replica),
            ));
        }
        let container = containers.swap_remove(0);
        let options = LogOptions {
            follow: task.follow,
            tail: u64::try_from(task.tail).ok(),
            since_unix: task.since_unix.max(0),
            timestamps: task.timestamps,
            ..Default::default()
        };
        let stream = self
            .reconciler
            .runtime()
            .container_logs(&container.id, &options)
            .await
            .map_err(|e| (tonic::Code::Unavailable, e.to_string()))?;
        Ok((container, stream, redactor))
    }

    /// `previous`: what the replica's current container wrote before its last start (the
    /// agent restarts a stopped container in place, so one container holds every run), else
    /// the output of an older container of the replica still on the host. `NotFound` when
    /// there is neither.
    async fn previous_output(
        &self,
        task: &pb::LogTask,
        key: &ReplicaKey,
        containers: Vec<ObservedContainer>,
    ) -> Result<(ObservedContainer, LogStream), Refusal> {
        let runtime = self.reconciler.runtime();
        let tail = u64::try_from(task.tail).ok();
        let since_unix = task.since_unix.max(0);
        let previous_run = self
            .reconciler
            .previous_run(key)
            .filter(|p| containers.first().is_some_and(|c| c.id == p.container_id));
        // This agent (or an earlier run of it) started the replica's latest run but never
        // restarted the current container: it has one run, and no previous one to show (the
        // engine's start time would let the current run's first lines through). Only a
        // container this agent knows nothing of is cut at the engine's start time.
        let one_run =
            previous_run.is_none() && self.reconciler.book().get(key).last_start.is_some();
        if let Some(current) = containers.first().filter(|_| !one_run)
            && let Some(started) = previous_run
                .as_ref()
                .map(|p| p.until)
                .or_else(|| current.started_at.as_deref().and_then(engine_time))
        {
            let started_secs = started
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            // The runs are told apart by when this agent asked the engine to start each: the
            // engine's own start time is taken once the process runs, after its first lines
            // may have been stamped. When the previous run began, if this agent (or an earlier
            // run of it, which recorded it in the replica's directory) restarted the container;
            // else every earlier run is shown.
            let from = previous_run
                .and_then(|p| {
                    p.from
                        .or_else(|| p.started_at.as_deref().and_then(engine_time))
                })
                .filter(|from| *from < started);
            let from_secs = from.map_or(0, |f| {
                f.duration_since(UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
            });
            // The engine cuts at whole seconds: read up to the second after the start and
            // keep the lines stamped before it. Its `tail` counts the lines of the current run
            // within that second too: ask for that many more.
            let until_unix = i64::try_from(started_secs + 1).unwrap_or(i64::MAX);
            let tail = match tail {
                Some(n) => {
                    let boundary = LogOptions {
                        since_unix: i64::try_from(started_secs).unwrap_or(i64::MAX),
                        until_unix,
                        timestamps: true,
                        ..Default::default()
                    };
                    let stream = runtime
                        .container_logs(&current.id, &boundary)
                        .await
                        .map_err(|e| (tonic::Code::Unavailable, e.to_string()))?;
                    Some(n + lines_from(stream, started).await)
                }
                None => None,
            };
            let options = LogOptions {
                follow: false,
                tail,
                since_unix: since_unix.max(from_secs),
                until_unix,
                timestamps: true,
            };
            let stream = runtime
                .container_logs(&current.id, &options)
                .await
                .map_err(|e| (tonic::Code::Unavailable, e.to_string()))?;
            let mut earlier = written_between(stream, from, started, task.timestamps);
            match earlier.next().await {
                Some(first) => {
                    let stream = futures::stream::iter([first]).chain(earlier).boxed();
                    return Ok((current.clone(), stream));
                }
                // `since` leaves nothing of an earlier run (or there is none): nothing to show.
                None if since_unix > 0 => {
                    return Ok((current.clone(), futures::stream::empty().boxed()));
                }
                None => {}
            }
        }
        let Some(older) = containers.get(1) else {
            return Err((
                tonic::Code::NotFound,
                format!(
                    "replica {} has no previous run on this host: its container has not been restarted (the output of a replaced container goes with it)",
                    task.replica
                ),
            ));
        };
        let options = LogOptions {
            tail,
            since_unix,
            timestamps: task.timestamps,
            ..Default::default()
        };
        let stream = runtime
            .container_logs(&older.id, &options)
            .await
            .map_err(|e| (tonic::Code::Unavailable, e.to_string()))?;
        Ok((older.clone(), stream))
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
                            ..Default::default()
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

/// A time as the engine writes it (`2026-12-04T14:26:05.123456789Z`); `None` for its zero
/// time (never started) or anything else.
fn engine_time(s: &str) -> Option<SystemTime> {
    let t = humantime::parse_rfc3339_weak(s.trim()).ok()?;
    (t > UNIX_EPOCH).then_some(t)
}

/// How many lines of `stream` (read with the engine's timestamps) were written at or after
/// `from`.
async fn lines_from(mut stream: LogStream, from: SystemTime) -> u64 {
    let mut partial: Vec<u8> = Vec::new();
    let mut count = 0;
    let mut line_at = |line: &[u8]| {
        let stamp = line.split(|b| *b == b' ').next().unwrap_or_default();
        let t = std::str::from_utf8(stamp).ok().and_then(engine_time);
        if t.is_some_and(|t| t >= from) {
            count += 1;
        }
    };
    while let Some(Ok(piece)) = stream.next().await {
        partial.extend_from_slice(&piece);
        let mut start = 0;
        while let Some(pos) = partial[start..].iter().position(|b| *b == b'\n') {
            line_at(&partial[start..start + pos]);
            start += pos + 1;
        }
        partial.drain(..start);
        if partial.len() > MAX_LINE {
            line_at(&partial);
            partial.clear();
        }
    }
    if !partial.is_empty() {
        line_at(&partial);
    }
    count
}

/// The lines of `stream` (read with the engine's timestamps) written from `from` (when given)
/// and before `until`: it ends at the first line stamped at or after `until` (the output is
/// in order). A line keeps its timestamp only with `keep_timestamps`; a line without one is
/// passed as it is.
pub fn written_between(
    stream: LogStream,
    from: Option<SystemTime>,
    until: SystemTime,
    keep_timestamps: bool,
) -> LogStream {
    struct State {
        stream: LogStream,
        partial: Vec<u8>,
        done: bool,
    }
    /// The line to pass (`Some`, empty for a line before `from`), or `None` once it was
    /// written at or after `until`.
    fn pass(
        line: &[u8],
        from: Option<SystemTime>,
        until: SystemTime,
        keep: bool,
    ) -> Option<Vec<u8>> {
        let stamp_end = line.iter().position(|b| *b == b' ');
        let stamped = stamp_end.and_then(|end| {
            let t = std::str::from_utf8(&line[..end])
                .ok()
                .and_then(engine_time)?;
            Some((t, end + 1))
        });
        match stamped {
            Some((t, _)) if t >= until => None,
            Some((t, _)) if from.is_some_and(|from| t < from) => Some(Vec::new()),
            Some((_, rest)) if !keep => Some(line[rest..].to_vec()),
            _ => Some(line.to_vec()),
        }
    }
    let state = State {
        stream,
        partial: Vec::new(),
        done: false,
    };
    futures::stream::unfold(state, move |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let mut out = Vec::new();
            let mut start = 0;
            while let Some(pos) = st.partial[start..].iter().position(|b| *b == b'\n') {
                let line = &st.partial[start..=start + pos];
                start += pos + 1;
                match pass(line, from, until, keep_timestamps) {
                    Some(l) => out.extend(l),
                    None => {
                        st.done = true;
                        break;
                    }
                }
            }
            st.partial.drain(..start);
            if !st.done && st.partial.len() > MAX_LINE {
                let line = std::mem::take(&mut st.partial);
                match pass(&line, from, until, keep_timestamps) {
                    Some(l) => out.extend(l),
                    None => st.done = true,
                }
            }
            if !out.is_empty() {
                return Some((Ok(out), st));
            }
            if st.done {
                return None;
            }
            match st.stream.next().await {
                Some(Ok(piece)) => st.partial.extend_from_slice(&piece),
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                None => {
                    st.done = true;
                    let line = std::mem::take(&mut st.partial);
                    return (!line.is_empty())
                        .then(|| pass(&line, from, until, keep_timestamps))
                        .flatten()
                        .map(|l| (Ok(l), st));
                }
            }
        }
    })
    .boxed()
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
    /// [`crate::gateway`]), the secret values the control plane listed (`redact`: its
    /// config's resolved secret references, wherever they are), and the strings of its config
    /// under keys
    /// that name a secret (`token`, `password`, `secret`, `apiKey`, ...).
    pub fn for_assignment(a: &Assignment) -> Self {
        let mut values: Vec<String> = a.env.values().cloned().collect();
        values.extend(a.redact.iter().cloned());
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
        a.config_json = r#"{"gateway":{"auth":{"token":"tok-in-config"}},"models":{"apiKey":"sk-123456"},"hooks":{"url":"https://hooks.example/T0/B1/xyzzy"},"name":"visible"}"#.into();
        // A secret reference under a key that names no secret: only the control plane's
        // list tells it apart.
        let line = b"gw-token-1 tok-in-config sk-123456 https://hooks.example/T0/B1/xyzzy visible";
        assert_eq!(
            String::from_utf8(Redactor::for_assignment(&a).redact(line)).unwrap(),
            "[REDACTED] [REDACTED] [REDACTED] https://hooks.example/T0/B1/xyzzy visible"
        );
        a.redact = vec!["https://hooks.example/T0/B1/xyzzy".into()];
        assert_eq!(
            String::from_utf8(Redactor::for_assignment(&a).redact(line)).unwrap(),
            "[REDACTED] [REDACTED] [REDACTED] [REDACTED] visible"
        );
    }

    fn collect(stream: LogStream) -> String {
        let pieces: Vec<Vec<u8>> = futures::executor::block_on(stream.collect::<Vec<_>>())
            .into_iter()
            .map(Result::unwrap)
            .collect();
        String::from_utf8(pieces.concat()).unwrap()
    }

    #[test]
    fn the_previous_run_is_what_was_written_before_the_last_start() {
        // One container, two runs: the restart at 10:00:05.5, within the second of the crash.
        let pieces: Vec<Result<Vec<u8>, crate::runtime::RuntimeError>> = vec![
            Ok(b"2026-12-04T10:00:01.000000000Z boot 1\n2026-12-04T10:00:05.1".to_vec()),
            Ok(b"00000000Z crashing\n2026-12-04T10:00:05.600000000Z boot 2\n".to_vec()),
            Ok(b"2026-12-04T10:00:05.700000000Z after\n".to_vec()),
        ];
        let started = engine_time("2026-12-04T10:00:05.500000000Z").unwrap();
        let stream = || futures::stream::iter(pieces.clone()).boxed();
        assert_eq!(
            collect(written_between(stream(), None, started, false)),
            "boot 1\ncrashing\n"
        );
        // From the start of the previous run on only.
        let previous = engine_time("2026-12-04T10:00:05.000000000Z");
        assert_eq!(
            collect(written_between(stream(), previous, started, false)),
            "crashing\n"
        );
        assert_eq!(
            collect(written_between(stream(), None, started, true)),
            "2026-12-04T10:00:01.000000000Z boot 1\n2026-12-04T10:00:05.100000000Z crashing\n"
        );
        assert_eq!(
            futures::executor::block_on(lines_from(stream(), started)),
            2
        );
        // Nothing before the first start: nothing at all.
        let first = engine_time("2026-12-04T10:00:00Z").unwrap();
        assert_eq!(collect(written_between(stream(), None, first, false)), "");
        assert_eq!(engine_time("0001-01-01T00:00:00Z"), None);
    }
}
