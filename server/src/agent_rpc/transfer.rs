//! State transfers: the state volume of a replica a drain moves, relayed from the host it left
//! to the host it goes to, checksummed end to end and never held whole in memory.
//!
//! The new host's agent asks with a `VolumeImport` call naming the transfer of its assignment.
//! The server checks the store (the replica is placed on the caller with that transfer, and
//! says which host it left), asks that host's agent for a `VolumeExportTask` through the task
//! hub, and relays its chunks into the call through a small bounded channel (a slow importer
//! slows the exporter). It computes the SHA-256 of what passes and compares it with the one the
//! exporter sends last; the importer gets it on the end chunk and compares with its own.
//!
//! How far a transfer has come is written into the drain record of the host it leaves (its
//! `attempts`, `bytes`, and once checked `sha256` and `transferMillis`), about once a second:
//! whichever server replica relays it, the drain controller and every reader see it, and a
//! server restart does not lose it. A transfer asked again (the server restarted, or the
//! connection broke) is a new attempt from byte 0, and the record says so.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clusterclaw_proto::agent as pb;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::Status;

use super::tasks::{TaskError, TaskHub};
use crate::model::{DrainReplica, Kind, ObjectKey, Resource};
use crate::store::{Store, StoreError};

/// Chunks queued between the exporter's stream and the importer's call.
const IMPORT_QUEUE: usize = 4;
/// How often the bytes relayed so far are written to the drain record.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The stream answering a `VolumeImport` call.
pub type ImportFeed =
    Pin<Box<dyn futures::Stream<Item = Result<pb::TaskChunk, Status>> + Send + 'static>>;

fn task_status(e: TaskError) -> Status {
    match e {
        TaskError::NotConnected(_) | TaskError::NoAnswer(_) | TaskError::Broken(_) => {
            Status::unavailable(e.to_string())
        }
        TaskError::NotFound(_) => Status::not_found(e.to_string()),
        TaskError::Failed(_) => Status::failed_precondition(e.to_string()),
    }
}

/// The host the replica of `req` left, when the store places it on `host` with that transfer.
fn source_of(
    store: &dyn Store,
    host: &str,
    req: &pb::VolumeImportRequest,
) -> Result<(String, String), Status> {
    let key = ObjectKey::instance(&req.tenant, &req.project, &req.instance);
    let missing = || {
        Status::not_found(format!(
            "no move of replica {} to host {host} with transfer {:?} is recorded",
            req.replica, req.transfer_id
        ))
    };
    let object = store
        .get(&key)
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(missing)?;
    let Ok(Resource::OpenClawInstance(i)) = object.resource() else {
        return Err(missing());
    };
    let from = i
        .status
        .as_ref()
        .and_then(|s| {
            s.replica_status.iter().find(|r| {
                r.name == req.replica
                    && r.host.as_deref() == Some(host)
                    && r.state_from
                        .as_ref()
                        .is_some_and(|f| f.transfer == req.transfer_id)
            })
        })
        .and_then(|r| r.state_from.as_ref())
        .map(|f| f.host.clone())
        .ok_or_else(missing)?;
    Ok((from, i.metadata.uid.clone().unwrap_or_default()))
}

/// What the relay of a transfer writes into its drain record.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Progress {
    /// A new attempt, from byte 0.
    Started,
    /// Bytes relayed so far by this attempt.
    Bytes(u64),
    /// The whole state relayed, its SHA-256 checked.
    Done {
        bytes: u64,
        millis: u64,
        sha256: String,
    },
}

/// Applies `p` to the drain replica moved by transfer `id`.
fn apply_progress(dr: &mut DrainReplica, p: &Progress) {
    match p {
        Progress::Started => {
            dr.attempts = Some(dr.attempts.unwrap_or(0).saturating_add(1));
            dr.bytes = Some(0);
            dr.sha256 = None;
            dr.transfer_millis = None;
        }
        // An attempt whose start was written before the drain record named its transfer.
        Progress::Bytes(b) => {
            dr.attempts.get_or_insert(1);
            dr.bytes = Some(*b);
        }
        Progress::Done {
            bytes,
            millis,
            sha256,
        } => {
            dr.attempts.get_or_insert(1);
            dr.bytes = Some(*bytes);
            dr.transfer_millis = Some(*millis);
            dr.sha256 = Some(sha256.clone());
        }
    }
}

/// Writes `p` into the drain record of host `from` whose replica moves by transfer `id`;
/// nothing when that drain is no longer there.
fn write_progress(store: &dyn Store, from: &str, id: &str, p: &Progress) -> Result<(), StoreError> {
    store.update(&ObjectKey::cluster(Kind::Host, from), &mut |r| {
        let Resource::Host(h) = r else { return false };
        let Some(dr) = h
            .status
            .as_mut()
            .and_then(|s| s.drain.as_mut())
            .and_then(|d| {
                d.replicas
                    .iter_mut()
                    .find(|r| r.transfer.as_deref() == Some(id))
            })
        else {
            return false;
        };
        let before = dr.clone();
        apply_progress(dr, p);
        *dr != before
    })?;
    Ok(())
}

/// [`write_progress`] off the async workers; a failure is logged, the transfer goes on.
async fn record(store: &Arc<dyn Store>, from: &str, id: &str, p: Progress) {
    let (store, from_host, transfer) = (store.clone(), from.to_string(), id.to_string());
    let written = crate::util::blocking("recording a state transfer's progress", move || {
        write_progress(store.as_ref(), &from_host, &transfer, &p)
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(transfer = %id, error = %e, "could not record the progress of a state transfer")
        }
        Err(e) => {
            tracing::warn!(transfer = %id, error = %e, "could not record the progress of a state transfer")
        }
    }
}

/// Serves a `VolumeImport` call of `host`.
pub async fn import(
    store: Arc<dyn Store>,
    hub: Arc<TaskHub>,
    host: String,
    req: pb::VolumeImportRequest,
) -> Result<ImportFeed, Status> {
    if req.transfer_id.is_empty() || req.replica.is_empty() {
        return Err(Status::invalid_argument(
            "VolumeImport needs a replica and a transfer_id",
        ));
    }
    let (from, uid) = {
        let store = store.clone();
        let host = host.clone();
        let req = req.clone();
        crate::util::try_blocking("VolumeImport", move || {
            source_of(store.as_ref(), &host, &req)
        })
        .await?
    };
    let task = pb::VolumeExportTask {
        tenant: req.tenant.clone(),
        project: req.project.clone(),
        instance: req.instance.clone(),
        replica: req.replica.clone(),
        instance_uid: uid,
        image: req.image.clone(),
        transfer_id: req.transfer_id.clone(),
    };
    let started = Instant::now();
    let id = req.transfer_id.clone();
    let mut stream = hub
        .ask(&from, pb::task::Kind::VolumeExport(task))
        .await
        .map_err(task_status)?;
    record(&store, &from, &id, Progress::Started).await;
    tracing::info!(transfer = %id, replica = %req.replica, from = %from, to = %host, "state transfer started");
    let (tx, rx) = mpsc::channel::<Result<pb::TaskChunk, Status>>(IMPORT_QUEUE);
    tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut noted = (0u64, Instant::now());
        let fail = |error: String| pb::TaskChunk {
            end: true,
            error,
            error_code: tonic::Code::Unavailable as i32,
            ..Default::default()
        };
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                () = tx.closed() => break,
            };
            match next {
                Some(Ok(data)) => {
                    hasher.update(&data);
                    bytes += data.len() as u64;
                    if bytes != noted.0 && noted.1.elapsed() >= PROGRESS_EVERY {
                        noted = (bytes, Instant::now());
                        record(&store, &from, &id, Progress::Bytes(bytes)).await;
                    }
                    let chunk = pb::TaskChunk {
                        data,
                        ..Default::default()
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    record(&store, &from, &id, Progress::Bytes(bytes)).await;
                    let _ = tx.send(Ok(fail(e.to_string()))).await;
                    return;
                }
                None => {
                    let ours = crate::util::hex(&hasher.finalize());
                    let end = match stream.digest() {
                        Some(theirs) if theirs == ours => {
                            let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(0);
                            record(
                                &store,
                                &from,
                                &id,
                                Progress::Done {
                                    bytes,
                                    millis,
                                    sha256: ours.clone(),
                                },
                            )
                            .await;
                            tracing::info!(transfer = %id, bytes, sha256 = %ours, "state relayed");
                            pb::TaskChunk {
                                end: true,
                                sha256: ours,
                                ..Default::default()
                            }
                        }
                        Some(theirs) => fail(format!(
                            "the state of host {from} arrived damaged: SHA-256 {ours} of the {bytes} bytes relayed, {theirs} sent"
                        )),
                        None => fail(format!("host {from} sent no SHA-256 of the state")),
                    };
                    let _ = tx.send(Ok(end)).await;
                    return;
                }
            }
        }
        // The new host stopped reading: this attempt ends here, it asks again.
        tracing::info!(transfer = %id, bytes, to = %host, "state transfer abandoned by the importing host");
        record(&store, &from, &id, Progress::Bytes(bytes)).await;
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
