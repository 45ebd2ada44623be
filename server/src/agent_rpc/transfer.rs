//! State transfers: the state volume of a replica a drain moves, relayed from the host it left
//! to the host it goes to, checksummed end to end and never held whole in memory.
//!
//! The new host's agent asks with a `VolumeImport` call naming the transfer of its assignment.
//! The server checks the store (the replica is placed on the caller with that transfer, and
//! says which host it left), asks that host's agent for a `VolumeExportTask` through the task
//! hub, and relays its chunks into the call through a small bounded channel (a slow importer
//! slows the exporter). It computes the SHA-256 of what passes and compares it with the one the
//! exporter sends last; the importer gets it on the end chunk and compares with its own.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use clusterclaw_proto::agent as pb;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::Status;

use super::tasks::{TaskError, TaskHub, Transfer};
use crate::model::{ObjectKey, Resource};
use crate::store::Store;

/// Chunks queued between the exporter's stream and the importer's call.
const IMPORT_QUEUE: usize = 4;
/// How often progress is recorded (every this many bytes).
const PROGRESS_EVERY: u64 = 1024 * 1024;

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
    hub.record_transfer(&id, Transfer::default());
    let mut stream = match hub.ask(&from, pb::task::Kind::VolumeExport(task)).await {
        Ok(s) => s,
        Err(e) => {
            hub.record_transfer(
                &id,
                Transfer {
                    error: Some(e.to_string()),
                    done: true,
                    ..Transfer::default()
                },
            );
            return Err(task_status(e));
        }
    };
    tracing::info!(transfer = %id, replica = %req.replica, from = %from, to = %host, "state transfer started");
    let (tx, rx) = mpsc::channel::<Result<pb::TaskChunk, Status>>(IMPORT_QUEUE);
    tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut noted = 0u64;
        let millis = |started: Instant| u64::try_from(started.elapsed().as_millis()).unwrap_or(0);
        let fail = |error: String, bytes: u64| {
            hub.record_transfer(
                &id,
                Transfer {
                    bytes,
                    millis: millis(started),
                    error: Some(error.clone()),
                    done: true,
                    sha256: None,
                },
            );
            pb::TaskChunk {
                end: true,
                error,
                error_code: tonic::Code::Unavailable as i32,
                ..Default::default()
            }
        };
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                () = tx.closed() => {
                    let _ = fail(format!("host {host} stopped reading the state"), bytes);
                    return;
                }
            };
            match next {
                Some(Ok(data)) => {
                    hasher.update(&data);
                    bytes += data.len() as u64;
                    if bytes - noted >= PROGRESS_EVERY {
                        noted = bytes;
                        hub.record_transfer(
                            &id,
                            Transfer {
                                bytes,
                                millis: millis(started),
                                ..Transfer::default()
                            },
                        );
                    }
                    let chunk = pb::TaskChunk {
                        data,
                        ..Default::default()
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        let _ = fail(format!("host {host} stopped reading the state"), bytes);
                        return;
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Ok(fail(e.to_string(), bytes))).await;
                    return;
                }
                None => break,
            }
        }
        let ours = crate::util::hex(&hasher.finalize());
        let end = match stream.digest() {
            Some(theirs) if theirs == ours => {
                hub.record_transfer(
                    &id,
                    Transfer {
                        bytes,
                        millis: millis(started),
                        sha256: Some(ours.clone()),
                        error: None,
                        done: true,
                    },
                );
                tracing::info!(transfer = %id, bytes, sha256 = %ours, "state relayed");
                pb::TaskChunk {
                    end: true,
                    sha256: ours,
                    ..Default::default()
                }
            }
            Some(theirs) => fail(
                format!(
                    "the state of host {from} arrived damaged: SHA-256 {ours} of the {bytes} bytes relayed, {theirs} sent"
                ),
                bytes,
            ),
            None => fail(format!("host {from} sent no SHA-256 of the state"), bytes),
        };
        let _ = tx.send(Ok(end)).await;
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
