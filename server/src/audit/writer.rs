//! Writing the audit log from the request path: a bounded queue drained by one task, which
//! stores whatever has queued up in one transaction (one sync to disk for the batch) and then
//! copies each stored record as one JSON line to the configured sink.
//!
//! The request path never waits for the disk: [`AuditWriter::record`] only queues. When the
//! queue is full (the store is slow or failing) it waits up to [`FULL_QUEUE_WAIT`] for room and
//! then fails with [`AuditError::Backlogged`]: the caller should then refuse the request (503)
//! rather than act without a record. An entry that was queued is never dropped: a failing
//! store is retried, with backoff, until it takes the batch. To be sure of room before acting,
//! take an [`AuditSlot`] first ([`AuditWriter::reserve`]) and fill it afterwards, which cannot
//! fail for lack of room.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::{AuditEntry, AuditRecord, round_secs};
use crate::model::FieldProblem;
use crate::store::{Store, StoreError};

/// Messages the queue holds at most.
pub const QUEUE_CAPACITY: usize = 4096;
/// Entries stored in one transaction at most.
pub const MAX_BATCH: usize = 1024;
/// How long [`AuditWriter::record`] waits for room in a full queue.
pub const FULL_QUEUE_WAIT: Duration = Duration::from_secs(2);
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Where stored records are copied, one JSON line each.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum AuditSink {
    /// Only the database.
    #[default]
    None,
    /// Standard output (logs go to standard error).
    Stdout,
    /// A file, opened for appending (created with mode 0600); rotate it by copy and truncate.
    File(PathBuf),
}

impl AuditSink {
    /// `none`, `stdout`, or an absolute file path.
    pub fn parse(s: &str) -> Result<AuditSink, String> {
        match s {
            "none" => Ok(AuditSink::None),
            "stdout" | "-" => Ok(AuditSink::Stdout),
            path if Path::new(path).is_absolute() => Ok(AuditSink::File(PathBuf::from(path))),
            "" => Err("must not be empty; use none, stdout or an absolute file path".into()),
            other => Err(format!(
                "{other:?} is not a sink; use none, stdout or an absolute file path such as /var/log/clusterclaw/audit.jsonl"
            )),
        }
    }
}

impl TryFrom<String> for AuditSink {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        AuditSink::parse(&s)
    }
}

/// The `[audit]` section of the server configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Where every stored record is also written as one JSON line, for a SIEM: `none` (the
    /// default), `stdout`, or an absolute file path.
    #[serde(default)]
    pub sink: AuditSink,
}

/// Why an entry was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("the audit entry is invalid: {}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldProblem>),
    #[error(
        "the audit log is backed up (no room in its queue after {waited}): the database is slow or failing, see the server log; retry in a moment"
    )]
    Backlogged { waited: String },
    #[error("the audit log is shut down")]
    Closed,
    #[error("cannot open the audit sink {path}: {error}")]
    Sink { path: String, error: String },
}

type Reply = oneshot::Sender<Result<AuditRecord, AuditError>>;

enum Msg {
    Entry(Box<AuditEntry>, Option<Reply>),
    Publish(Vec<AuditRecord>),
    Flush(oneshot::Sender<()>),
}

/// The request path's handle on the audit log. Cheap to clone; the writing task ends when the
/// last clone is dropped and the queue is drained.
#[derive(Clone, Debug)]
pub struct AuditWriter {
    tx: mpsc::Sender<Msg>,
    /// Whether stored records are also copied to a sink.
    sink: bool,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Entry(..) => "Entry",
            Msg::Publish(_) => "Publish",
            Msg::Flush(_) => "Flush",
        })
    }
}

/// Room for one message in the queue, taken before acting so that recording afterwards cannot
/// fail for lack of room. Dropping it unused gives the room back.
#[derive(Debug)]
pub struct AuditSlot {
    permit: mpsc::OwnedPermit<Msg>,
}

impl AuditSlot {
    /// Queues `entry` (normalised); fails only if it is invalid.
    pub fn record(self, entry: AuditEntry) -> Result<(), AuditError> {
        let entry = entry.normalize().map_err(AuditError::Invalid)?;
        self.permit.send(Msg::Entry(Box::new(entry), None));
        Ok(())
    }

    /// Copies records already stored (by [`crate::store::rules::append_audit`] inside a change's
    /// own transaction) to the sink.
    pub fn publish(self, records: Vec<AuditRecord>) {
        self.permit.send(Msg::Publish(records));
    }
}

impl AuditWriter {
    /// Opens the sink and starts the writing task (on the current Tokio runtime).
    pub fn start(store: Arc<dyn Store>, config: &AuditConfig) -> Result<AuditWriter, AuditError> {
        Self::start_with(store, config, QUEUE_CAPACITY)
    }

    fn start_with(
        store: Arc<dyn Store>,
        config: &AuditConfig,
        capacity: usize,
    ) -> Result<AuditWriter, AuditError> {
        let sink = SinkWriter::open(&config.sink)?;
        let has_sink = !matches!(sink, SinkWriter::None);
        let (tx, rx) = mpsc::channel(capacity);
        tokio::spawn(run(store, rx, Arc::new(Mutex::new(sink))));
        Ok(AuditWriter { tx, sink: has_sink })
    }

    /// Whether stored records are also copied to a sink (`[audit] sink`).
    pub fn has_sink(&self) -> bool {
        self.sink
    }

    /// Room for one entry: at once when there is some, else after waiting up to
    /// [`FULL_QUEUE_WAIT`]; [`AuditError::Backlogged`] when the queue stays full.
    pub async fn reserve(&self) -> Result<AuditSlot, AuditError> {
        match self.tx.clone().try_reserve_owned() {
            Ok(permit) => return Ok(AuditSlot { permit }),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(AuditError::Closed),
            Err(mpsc::error::TrySendError::Full(_)) => {}
        }
        match tokio::time::timeout(FULL_QUEUE_WAIT, self.tx.clone().reserve_owned()).await {
            Ok(Ok(permit)) => Ok(AuditSlot { permit }),
            Ok(Err(_)) => Err(AuditError::Closed),
            Err(_) => {
                tracing::warn!(
                    waited = ?FULL_QUEUE_WAIT,
                    "the audit queue is full; refusing to go on without a record"
                );
                Err(AuditError::Backlogged {
                    waited: round_secs(FULL_QUEUE_WAIT),
                })
            }
        }
    }

    /// Queues an entry; it is stored with the next batch. Checks the entry before waiting
    /// for room.
    pub async fn record(&self, entry: AuditEntry) -> Result<(), AuditError> {
        let entry = entry.normalize().map_err(AuditError::Invalid)?;
        self.reserve().await?.record(entry)
    }

    /// Queues an entry and waits until it is stored; returns it as stored.
    pub async fn record_and_wait(&self, entry: AuditEntry) -> Result<AuditRecord, AuditError> {
        let entry = entry.normalize().map_err(AuditError::Invalid)?;
        let (reply, stored) = oneshot::channel();
        self.reserve()
            .await?
            .permit
            .send(Msg::Entry(Box::new(entry), Some(reply)));
        stored.await.map_err(|_| AuditError::Closed)?
    }

    /// Waits until everything queued before this call is stored and copied to the sink.
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Flush(done))
            .await
            .map_err(|_| AuditError::Closed)?;
        wait.await.map_err(|_| AuditError::Closed)
    }
}

/// The open sink.
enum SinkWriter {
    None,
    Stdout,
    File { path: PathBuf, file: File },
}

impl SinkWriter {
    fn open(sink: &AuditSink) -> Result<SinkWriter, AuditError> {
        let path = match sink {
            AuditSink::None => return Ok(SinkWriter::None),
            AuditSink::Stdout => return Ok(SinkWriter::Stdout),
            AuditSink::File(path) => path,
        };
        let fail = |e: io::Error| AuditError::Sink {
            path: path.display().to_string(),
            error: e.to_string(),
        };
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(fail)?;
        let mode = file.metadata().map_err(fail)?.permissions().mode();
        if mode & 0o077 != 0 {
            file.set_permissions(fs::Permissions::from_mode(mode & 0o700))
                .map_err(fail)?;
            tracing::warn!(path = %path.display(), "the audit sink file was readable by other users; made it private (mode 0600)");
        }
        Ok(SinkWriter::File {
            path: path.clone(),
            file,
        })
    }

    /// Writes one JSON line per record. The database holds the log; a failing sink is
    /// reported, not retried.
    fn emit<'a>(&mut self, records: impl Iterator<Item = &'a AuditRecord>) {
        if matches!(self, SinkWriter::None) {
            return;
        }
        let mut buf = Vec::with_capacity(512);
        for r in records {
            if serde_json::to_writer(&mut buf, r).is_ok() {
                buf.push(b'\n');
            }
        }
        if buf.is_empty() {
            return;
        }
        let result = match self {
            SinkWriter::None => Ok(()),
            SinkWriter::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&buf).and_then(|()| out.flush())
            }
            SinkWriter::File { file, .. } => file.write_all(&buf),
        };
        if let Err(e) = result {
            let path = match self {
                SinkWriter::File { path, .. } => path.display().to_string(),
                _ => "stdout".into(),
            };
            tracing::error!(sink = %path, error = %e, "cannot write audit records to the sink; they are in the database (clusterclaw audit list)");
        }
    }
}

/// The writing task: one batch at a time, in queue order.
async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Msg>, sink: Arc<Mutex<SinkWriter>>) {
    while let Some(first) = rx.recv().await {
        let mut entries = Vec::new();
        let mut replies = Vec::new();
        let mut published = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Entry(e, reply) => {
                    if let Some(reply) = reply {
                        replies.push((entries.len(), reply));
                    }
                    entries.push(*e);
                }
                Msg::Publish(records) => published.extend(records),
                Msg::Flush(done) => flushes.push(done),
            }
            if entries.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        let outcome = commit(&store, &sink, entries, published).await;
        for (i, reply) in replies {
            let _ = reply.send(match &outcome {
                Ok(records) => records.get(i).cloned().ok_or(AuditError::Closed),
                Err(e) => Err(e.clone()),
            });
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// Stores `entries` in one transaction, retrying a failing store with backoff, then copies
/// the stored records (after `published`) to the sink.
async fn commit(
    store: &Arc<dyn Store>,
    sink: &Arc<Mutex<SinkWriter>>,
    entries: Vec<AuditEntry>,
    published: Vec<AuditRecord>,
) -> Result<Vec<AuditRecord>, AuditError> {
    let entries = Arc::new(entries);
    let published = Arc::new(published);
    let mut backoff = RETRY_FIRST;
    loop {
        let (store, sink, batch, copies) = (
            Arc::clone(store),
            Arc::clone(sink),
            Arc::clone(&entries),
            Arc::clone(&published),
        );
        if batch.is_empty() && copies.is_empty() {
            return Ok(Vec::new());
        }
        let attempt = tokio::task::spawn_blocking(move || {
            let records = if batch.is_empty() {
                Vec::new()
            } else {
                store.append_audit(&batch)?
            };
            let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
            sink.emit(copies.iter().chain(records.iter()));
            Ok::<_, StoreError>(records)
        })
        .await;
        let error = match attempt {
            Ok(Ok(records)) => return Ok(records),
            // Entries are checked when queued, so this is a bug; retrying would not help.
            Ok(Err(StoreError::Invalid(problems))) => {
                tracing::error!(entries = ?entries, "audit entries refused by the store");
                return Err(AuditError::Invalid(problems));
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the storing task failed: {e}"),
        };
        tracing::error!(error = %error, entries = entries.len(), retry_in = ?backoff,
            "cannot store audit entries; retrying (requests are refused once the audit queue is full)");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::fixtures::entry;
    use crate::audit::{AuditFilter, verify_chain};
    use crate::store::sqlite::SqliteStore;
    use crate::store::testing::HookStore;
    use std::sync::atomic::Ordering;

    fn store(dir: &tempfile::TempDir) -> Arc<HookStore> {
        Arc::new(HookStore::new(
            SqliteStore::open(&dir.path().join("clusterclaw.db")).unwrap(),
        ))
    }

    fn stored(store: &HookStore) -> Vec<AuditRecord> {
        store
            .list_audit(&AuditFilter {
                limit: usize::MAX,
                ..AuditFilter::default()
            })
            .unwrap()
    }

    #[test]
    fn sinks_and_config_parse() {
        assert_eq!(AuditSink::parse("none"), Ok(AuditSink::None));
        assert_eq!(AuditSink::parse("stdout"), Ok(AuditSink::Stdout));
        assert_eq!(
            AuditSink::parse("/var/log/a.jsonl"),
            Ok(AuditSink::File("/var/log/a.jsonl".into()))
        );
        assert!(
            AuditSink::parse("audit.jsonl")
                .unwrap_err()
                .contains("absolute")
        );
        let c: AuditConfig = toml::from_str("sink = \"/var/log/a.jsonl\"").unwrap();
        assert_eq!(c.sink, AuditSink::File("/var/log/a.jsonl".into()));
        assert_eq!(
            toml::from_str::<AuditConfig>("").unwrap(),
            AuditConfig::default()
        );
        let e = toml::from_str::<AuditConfig>("sink = \"relative.log\"").unwrap_err();
        assert!(e.to_string().contains("absolute file path"), "{e}");
        let e = toml::from_str::<AuditConfig>("snk = \"stdout\"").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[tokio::test]
    async fn queued_entries_are_stored_in_one_transaction_and_copied_to_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let sink = dir.path().join("audit.jsonl");
        let config = AuditConfig {
            sink: AuditSink::File(sink.clone()),
        };
        let writer = AuditWriter::start(store.clone(), &config).unwrap();
        // The writing task cannot run before this task yields: all 300 queue up.
        for i in 1..=300 {
            writer.record(entry(i)).await.unwrap();
        }
        writer.flush().await.unwrap();
        assert_eq!(
            store.audit_appends.load(Ordering::SeqCst),
            1,
            "one transaction"
        );
        let records = stored(&store);
        assert_eq!(records.len(), 300);
        assert_eq!(verify_chain(&records), Ok(()));
        assert_eq!(records[41].entry, entry(42), "queue order is kept");

        let text = std::fs::read_to_string(&sink).unwrap();
        let lines: Vec<AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, records, "one JSON line per stored record");
        let mode = std::fs::metadata(&sink).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // A record can be awaited; a second writer appends to the same file.
        drop(writer);
        let writer = AuditWriter::start(store.clone(), &config).unwrap();
        let r = writer.record_and_wait(entry(301)).await.unwrap();
        assert_eq!((r.seq, &r.prev_hash), (301, &records[299].hash));
        writer.flush().await.unwrap();
        let text = std::fs::read_to_string(&sink).unwrap();
        assert_eq!(text.lines().count(), 301);
    }

    #[tokio::test]
    async fn invalid_entries_are_refused_before_they_are_queued() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let writer = AuditWriter::start(store.clone(), &AuditConfig::default()).unwrap();
        let mut bad = entry(1);
        bad.time = "yesterday".into();
        let e = writer.record(bad.clone()).await.unwrap_err();
        assert!(
            matches!(&e, AuditError::Invalid(p) if p[0].field == "time"),
            "{e}"
        );
        assert!(writer.record_and_wait(bad.clone()).await.is_err());
        assert!(writer.reserve().await.unwrap().record(bad).is_err());
        writer.flush().await.unwrap();
        assert!(stored(&store).is_empty());
        assert_eq!(store.audit_appends.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn published_records_reach_the_sink_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let sink = dir.path().join("audit.jsonl");
        let writer = AuditWriter::start(
            store.clone(),
            &AuditConfig {
                sink: AuditSink::File(sink.clone()),
            },
        )
        .unwrap();
        // As a change's own transaction would store them.
        let records = store.append_audit(&[entry(1), entry(2)]).unwrap();
        writer.reserve().await.unwrap().publish(records.clone());
        writer.flush().await.unwrap();
        let lines: Vec<AuditRecord> = std::fs::read_to_string(&sink)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, records);
        assert_eq!(stored(&store).len(), 2, "nothing stored twice");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_store_backs_the_queue_up_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        store.audit_failures.store(u32::MAX, Ordering::SeqCst);
        let writer = AuditWriter::start_with(store.clone(), &AuditConfig::default(), 4).unwrap();
        let mut accepted = 0;
        let refused = loop {
            assert!(accepted < 100, "the queue never filled up");
            match writer.record(entry(accepted + 1)).await {
                Ok(()) => accepted += 1,
                Err(e) => break e,
            }
            tokio::task::yield_now().await;
        };
        assert!(
            matches!(refused, AuditError::Backlogged { .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("backed up"), "{refused}");
        assert!(accepted >= 4, "{accepted}");
        assert!(store.audit_appends.load(Ordering::SeqCst) >= 1);

        // Once the store heals, everything accepted is stored, in order.
        store.audit_failures.store(0, Ordering::SeqCst);
        writer.flush().await.unwrap();
        let records = stored(&store);
        assert_eq!(
            records.len(),
            accepted as usize,
            "every accepted entry is stored"
        );
        assert_eq!(verify_chain(&records), Ok(()));
        assert_eq!(records.last().unwrap().entry, entry(accepted));

        // A slot taken before acting is filled afterwards, even if the store fails meanwhile.
        let slot = writer.reserve().await.unwrap();
        store.audit_failures.store(3, Ordering::SeqCst);
        slot.record(entry(1000)).unwrap();
        writer.flush().await.unwrap();
        assert_eq!(stored(&store).last().unwrap().entry, entry(1000));
    }

    #[tokio::test]
    async fn a_sink_that_cannot_be_opened_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("missing-dir/audit.jsonl");
        let e = AuditWriter::start(
            store(&dir),
            &AuditConfig {
                sink: AuditSink::File(bad.clone()),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains(&bad.display().to_string()), "{e}");
    }
}
