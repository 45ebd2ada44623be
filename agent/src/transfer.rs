//! State transfers of a drain: a replica's state volume read out as a tar on the host it
//! leaves, and fetched (checked against its SHA-256) on the host it goes to.
//!
//! Export: once the replica is no longer assigned here, its containers are removed (the volume
//! stays: the control plane retains it for the move), a container that mounts the volume is
//! created from the replica's image (never started), the engine's archive API reads the state
//! directory into a file under the data dir, and the file goes up in chunks through a bounded
//! channel with its SHA-256 on the last one. Import: the tar comes down the same way into a
//! file, its SHA-256 is checked against the one the control plane relays, and reconcile
//! extracts it into the new volume before the replica's first container starts (as a restore
//! from a snapshot). Memory is bounded by a few chunks on either side.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use clusterclaw_proto::agent as pb;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::control::GrpcControlPlane;
use crate::model::{Assignment, ReplicaKey};
use crate::runtime::{ContainerRuntime, ContainerSpec, Labelled, VolumeMount, spec};

/// Bytes per chunk sent up.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// How long an export waits for the replica to leave this host's assignments.
const LEAVE_WAIT: Duration = Duration::from_secs(60);
/// How often it looks.
const LEAVE_POLL: Duration = Duration::from_millis(200);
/// How long the replica's container gets to stop before it is killed, when still running.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Where transfer files live while they are in flight.
pub fn transfer_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("transfers")
}

/// A file name for a transfer id (ids come from the control plane; keep only safe characters).
fn file_name(transfer: &str, suffix: &str) -> String {
    let safe: String = transfer
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(96)
        .collect();
    format!("{safe}.{suffix}")
}

/// A file removed when dropped.
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Why an export could not be done: the gRPC code that fits and a message.
pub type Refusal = (tonic::Code, String);

/// Reads the state volume of the replica of `task` into a file (see the module doc).
/// `assigned` says whether the replica is still assigned to this host.
pub async fn export_to_file(
    runtime: &Arc<dyn ContainerRuntime>,
    owner: &crate::runtime::Owner,
    host_id: &str,
    data_dir: &Path,
    task: &pb::VolumeExportTask,
    assigned: impl Fn() -> bool,
) -> Result<(TempFile, u64), Refusal> {
    let unavailable = |e: crate::runtime::RuntimeError| (tonic::Code::Unavailable, e.to_string());
    let key = ReplicaKey::new(&task.tenant, &task.project, &task.replica);
    let waited = tokio::time::Instant::now();
    while assigned() {
        if waited.elapsed() >= LEAVE_WAIT {
            return Err((
                tonic::Code::FailedPrecondition,
                format!(
                    "replica {} is still assigned to this host; its state is not read while it may run",
                    task.replica
                ),
            ));
        }
        tokio::time::sleep(LEAVE_POLL).await;
    }
    // The replica's containers go (reconcile removes them too); the volume stays.
    let containers = runtime
        .list_managed_containers(host_id)
        .await
        .map_err(unavailable)?;
    for c in containers
        .iter()
        .filter(|c| owner.owns(*c) && c.replica_key().as_ref() == Some(&key))
    {
        if c.status.is_running() {
            runtime
                .stop_container(&c.id, c.stop_grace().unwrap_or(STOP_GRACE))
                .await
                .map_err(unavailable)?;
        }
        runtime.remove_container(&c.id).await.map_err(unavailable)?;
    }
    let mut volumes: Vec<_> = runtime
        .list_managed_volumes(host_id)
        .await
        .map_err(unavailable)?
        .into_iter()
        .filter(|v| owner.owns(v) && v.replica_key().as_ref() == Some(&key))
        .collect();
    volumes.sort_by_key(|v| {
        (
            v.label(crate::runtime::labels::CLUSTER).is_some(),
            v.name.clone(),
        )
    });
    let Some(volume) = volumes.first() else {
        return Err((
            tonic::Code::NotFound,
            format!("replica {} has no state volume on this host", task.replica),
        ));
    };
    runtime
        .ensure_image(&task.image)
        .await
        .map_err(unavailable)?;
    let dir = transfer_dir(data_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| (tonic::Code::Internal, format!("{}: {e}", dir.display())))?;
    let helper = ContainerSpec {
        name: format!("{}-export", volume.name),
        image: task.image.clone(),
        labels: Default::default(),
        env: Default::default(),
        user: "1000:1000".into(),
        read_only_rootfs: true,
        cap_drop: vec!["ALL".into()],
        no_new_privileges: true,
        tmpfs: Default::default(),
        memory_bytes: None,
        nano_cpus: None,
        pids_limit: None,
        network: Some("none".into()),
        volumes: vec![VolumeMount {
            volume: volume.name.clone(),
            target: spec::STATE_DIR.into(),
            read_only: true,
        }],
        binds: Vec::new(),
        publish: None,
        stop_grace: Duration::from_secs(1),
        init: false,
    };
    // A helper left by an export that broke off goes first.
    let _ = runtime.remove_container(&helper.name).await;
    let id = runtime
        .create_container(&helper)
        .await
        .map_err(unavailable)?;
    let file = TempFile(dir.join(file_name(&task.transfer_id, "out.tar")));
    let read = runtime
        .download_archive(&id, &crate::snapshot::archive_path(), &file.0)
        .await;
    let _ = runtime.remove_container(&id).await;
    let bytes = read.map_err(unavailable)?;
    Ok((file, bytes))
}

/// Sends the file in chunks, the last one (`end`) with the SHA-256 of all of it. Stops when
/// the receiver goes away.
pub async fn send_file(path: &Path, tx: &mpsc::Sender<pb::TaskChunk>) -> Result<u64, String> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut filled = 0;
        while filled < CHUNK_BYTES {
            let n = file
                .read(&mut buf[filled..])
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        hasher.update(&buf);
        sent += filled as u64;
        let chunk = pb::TaskChunk {
            data: buf,
            ..Default::default()
        };
        if tx.send(chunk).await.is_err() {
            return Err("the control plane stopped reading".into());
        }
    }
    let end = pb::TaskChunk {
        end: true,
        sha256: hex(&hasher.finalize()),
        ..Default::default()
    };
    tx.send(end)
        .await
        .map_err(|_| "the control plane stopped reading".to_string())?;
    Ok(sent)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Where the state of a replica moved here comes from.
#[async_trait]
pub trait StateSource: Send + Sync + 'static {
    /// Writes the state tar of `a.import_transfer` to `dest`, checking its SHA-256; returns
    /// the bytes written.
    async fn fetch(&self, a: &Assignment, dest: &Path) -> Result<u64, String>;
}

/// The control plane's `VolumeImport`.
pub struct GrpcStateSource(pub Arc<GrpcControlPlane>);

#[async_trait]
impl StateSource for GrpcStateSource {
    async fn fetch(&self, a: &Assignment, dest: &Path) -> Result<u64, String> {
        let mut client = self.0.task_client();
        let request = pb::VolumeImportRequest {
            tenant: a.tenant.clone(),
            project: a.project.clone(),
            instance: a.instance.clone(),
            replica: a.replica.clone(),
            transfer_id: a.import_transfer.clone(),
            image: a.image.clone(),
        };
        let mut stream = client
            .volume_import(request)
            .await
            .map_err(|s| crate::control::describe_status(&s))?
            .into_inner();
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let io = |e: std::io::Error| format!("{}: {e}", dest.display());
        let mut file = tokio::fs::File::create(dest).await.map_err(io)?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        loop {
            let chunk = stream
                .message()
                .await
                .map_err(|s| crate::control::describe_status(&s))?
                .ok_or_else(|| "the state stream ended without its SHA-256".to_string())?;
            if !chunk.data.is_empty() {
                hasher.update(&chunk.data);
                bytes += chunk.data.len() as u64;
                file.write_all(&chunk.data).await.map_err(io)?;
            }
            if chunk.end {
                if !chunk.error.is_empty() {
                    return Err(chunk.error);
                }
                let ours = hex(&hasher.finalize());
                if ours != chunk.sha256 {
                    return Err(format!(
                        "the state arrived damaged: SHA-256 {ours} of the {bytes} bytes received, {} sent",
                        chunk.sha256
                    ));
                }
                break;
            }
        }
        file.flush().await.map_err(io)?;
        file.sync_all().await.map_err(io)?;
        Ok(bytes)
    }
}

/// The file an import of `a` is written to.
pub fn import_file(data_dir: &Path, a: &Assignment) -> PathBuf {
    transfer_dir(data_dir).join(file_name(&a.import_transfer, "in.tar"))
}
