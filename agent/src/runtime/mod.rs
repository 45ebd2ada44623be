//! The container engine behind a small trait: Docker (and Podman through its Docker-compatible API) or a fake.
//!
//! Everything the agent creates carries the labels in [`labels`]; the agent lists containers,
//! volumes and networks by the managed label and its host name, and acts only on what
//! [`Owner::owns`] accepts: its cluster's id and its host uid, or a pre-upgrade object it adopted.

mod docker;
mod fake;
pub mod spec;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

pub use docker::{DockerRuntime, RuntimeKind};
pub use fake::{FakeCall, FakeRuntime};
pub use owner::{LegacyObjects, ObjectRef, Owner};

mod owner;

use crate::model::{ContainerStats, ReplicaKey};

/// Label names and values on everything the agent manages.
pub mod labels {
    pub const MANAGED: &str = "io.clusterclaw.managed";
    pub const MANAGED_VALUE: &str = "true";
    pub const HOST: &str = "io.clusterclaw.host";
    /// The cluster's id: a short hash of the cluster CA's certificate.
    pub const CLUSTER: &str = "io.clusterclaw.cluster";
    /// The uid the control plane gave the host at enrollment (in its certificate).
    pub const HOST_UID: &str = "io.clusterclaw.host-uid";
    pub const TENANT: &str = "io.clusterclaw.tenant";
    pub const PROJECT: &str = "io.clusterclaw.project";
    pub const INSTANCE: &str = "io.clusterclaw.instance";
    pub const REPLICA: &str = "io.clusterclaw.replica";
    pub const GENERATION: &str = "io.clusterclaw.generation";
    pub const CONFIG_HASH: &str = "io.clusterclaw.config-hash";
    /// The instance's config revision the container runs.
    pub const CONFIG_REVISION: &str = "io.clusterclaw.config-revision";
    /// The content hash the container must have (see [`crate::drift`]); empty from older servers.
    pub const CONTENT_HASH: &str = "io.clusterclaw.content-hash";
    /// Seconds a stop of the container waits after SIGTERM (its replica's grace period when it
    /// was created); read to stop it once its replica is no longer assigned.
    pub const STOP_GRACE: &str = "io.clusterclaw.stop-grace";
    /// The placement epoch the container was created under (absent for epoch 0).
    pub const EPOCH: &str = "io.clusterclaw.epoch";
    /// The image reference the container was created from, as assigned. Engines may report
    /// another spelling of it (Podman qualifies a local `repo:tag` as `localhost/repo:tag`).
    pub const IMAGE: &str = "io.clusterclaw.image";
}

/// Reads the managed labels of a container, volume or network.
pub trait Labelled {
    fn labels(&self) -> &BTreeMap<String, String>;

    fn label(&self, name: &str) -> Option<&str> {
        self.labels().get(name).map(String::as_str)
    }

    /// How the engine identifies it: a container by id, a volume or network by name.
    fn object_ref(&self) -> ObjectRef<'_>;

    /// Whether it carries `io.clusterclaw.managed=true` and this host name (what the engine is
    /// asked to list; not enough to act on it, see [`Owner::owns`]).
    fn managed_by(&self, host_name: &str) -> bool {
        self.label(labels::MANAGED) == Some(labels::MANAGED_VALUE)
            && self.label(labels::HOST) == Some(host_name)
    }

    /// The replica it belongs to, when all three naming labels are present.
    fn replica_key(&self) -> Option<ReplicaKey> {
        Some(ReplicaKey::new(
            self.label(labels::TENANT)?,
            self.label(labels::PROJECT)?,
            self.label(labels::REPLICA)?,
        ))
    }
}

/// The engine's view of a container's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerStatus {
    Created,
    Running,
    Paused,
    Restarting,
    Exited { code: i64, oom_killed: bool },
    Removing,
    Dead,
    Unknown(String),
}

impl ContainerStatus {
    pub fn is_running(&self) -> bool {
        matches!(self, ContainerStatus::Running)
    }
}

impl fmt::Display for ContainerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContainerStatus::Created => f.write_str("created"),
            ContainerStatus::Running => f.write_str("running"),
            ContainerStatus::Paused => f.write_str("paused"),
            ContainerStatus::Restarting => f.write_str("restarting"),
            ContainerStatus::Exited {
                code,
                oom_killed: true,
            } => write!(f, "exited with code {code} (out of memory)"),
            ContainerStatus::Exited { code, .. } => write!(f, "exited with code {code}"),
            ContainerStatus::Removing => f.write_str("being removed"),
            ContainerStatus::Dead => f.write_str("dead"),
            ContainerStatus::Unknown(s) => write!(f, "in unknown state {s:?}"),
        }
    }
}

/// A container as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedContainer {
    pub id: String,
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub status: ContainerStatus,
    /// When the current (or last) run started, as the engine formats it; changes on every start.
    pub started_at: Option<String>,
    /// The host port the Gateway port (18789/tcp) is published on, if any.
    pub host_port: Option<u16>,
    /// How many times the engine itself restarted it (the agent does not use restart policies).
    pub engine_restarts: u32,
    /// Its environment (`Config.Env`), when the engine reported it; `None` when not read.
    pub env: Option<ContainerEnv>,
}

impl Labelled for ObservedContainer {
    fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    fn object_ref(&self) -> ObjectRef<'_> {
        ObjectRef::Container(&self.id)
    }
}

impl ObservedContainer {
    pub fn generation(&self) -> Option<i64> {
        self.label(labels::GENERATION)?.parse().ok()
    }

    pub fn config_hash(&self) -> Option<&str> {
        self.label(labels::CONFIG_HASH)
    }

    /// The config revision it runs, from its label (`None` when the label is absent or bad).
    pub fn config_revision(&self) -> Option<u64> {
        self.label(labels::CONFIG_REVISION)?.parse().ok()
    }

    /// The placement epoch it was created under (its label), `None` when absent or bad.
    pub fn epoch(&self) -> Option<u64> {
        self.label(labels::EPOCH)?.parse().ok()
    }

    /// The grace period it was created with (its label), `None` when absent or bad.
    pub fn stop_grace(&self) -> Option<Duration> {
        let secs: u64 = self.label(labels::STOP_GRACE)?.parse().ok()?;
        (secs > 0).then(|| Duration::from_secs(secs))
    }
}

/// A container's environment as the engine reports it: `NAME=value` entries.
///
/// It holds secrets: `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ContainerEnv(Vec<String>);

impl ContainerEnv {
    pub fn new(entries: Vec<String>) -> Self {
        ContainerEnv(entries)
    }

    /// From a name → value map, as a container spec holds it.
    pub fn from_map(env: &BTreeMap<String, String>) -> Self {
        ContainerEnv(env.iter().map(|(k, v)| format!("{k}={v}")).collect())
    }

    /// The value of `name`; `None` when the container does not have it (an entry without `=`
    /// sets nothing).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find_map(|entry| {
            let (k, v) = entry.split_once('=')?;
            (k == name).then_some(v)
        })
    }

    /// Sets `name` to `value` (replacing an earlier value).
    pub fn set(&mut self, name: &str, value: &str) {
        self.0
            .retain(|entry| entry.split_once('=').map_or(entry.as_str(), |(k, _)| k) != name);
        self.0.push(format!("{name}={value}"));
    }

    /// Removes `name`.
    pub fn remove(&mut self, name: &str) {
        self.0
            .retain(|entry| entry.split_once('=').map_or(entry.as_str(), |(k, _)| k) != name);
    }

    /// The variable names, in the engine's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .map(|entry| entry.split_once('=').map_or(entry.as_str(), |(k, _)| k))
    }
}

impl fmt::Debug for ContainerEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

/// A named volume as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedVolume {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Labelled for ObservedVolume {
    fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    fn object_ref(&self) -> ObjectRef<'_> {
        ObjectRef::Volume(&self.name)
    }
}

/// A network as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedNetwork {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Labelled for ObservedNetwork {
    fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    fn object_ref(&self) -> ObjectRef<'_> {
        ObjectRef::Network(&self.name)
    }
}

/// Everything a container is created with. Built by [`spec::container_spec`].
#[derive(Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// May hold secrets; `Debug` shows names only.
    pub env: BTreeMap<String, String>,
    /// `uid:gid`.
    pub user: String,
    pub read_only_rootfs: bool,
    /// Capabilities to drop (`ALL` for the hardened default).
    pub cap_drop: Vec<String>,
    pub no_new_privileges: bool,
    /// Mount point → tmpfs options, e.g. `/tmp` → `rw,nosuid,nodev,mode=1777`.
    pub tmpfs: BTreeMap<String, String>,
    pub memory_bytes: Option<u64>,
    pub nano_cpus: Option<u64>,
    pub pids_limit: Option<i64>,
    /// The bridge network to attach it to.
    pub network: Option<String>,
    pub volumes: Vec<VolumeMount>,
    pub binds: Vec<BindMount>,
    pub publish: Option<PortPublish>,
    /// How long `docker stop` waits after SIGTERM before killing.
    pub stop_grace: Duration,
    /// Runs an init process as PID 1 that forwards signals (`HostConfig.Init`).
    pub init: bool,
}

impl fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("labels", &self.labels)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("user", &self.user)
            .field("read_only_rootfs", &self.read_only_rootfs)
            .field("cap_drop", &self.cap_drop)
            .field("no_new_privileges", &self.no_new_privileges)
            .field("tmpfs", &self.tmpfs)
            .field("memory_bytes", &self.memory_bytes)
            .field("nano_cpus", &self.nano_cpus)
            .field("pids_limit", &self.pids_limit)
            .field("network", &self.network)
            .field("volumes", &self.volumes)
            .field("binds", &self.binds)
            .field("publish", &self.publish)
            .field("stop_grace", &self.stop_grace)
            .field("init", &self.init)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    pub volume: String,
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortPublish {
    pub container_port: u16,
    pub host_ip: std::net::IpAddr,
    pub host_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// What to read of a container's output.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogOptions {
    /// Keep streaming what it writes next, until the container stops.
    pub follow: bool,
    /// Lines from the end to start with; `None` for all of them.
    pub tail: Option<u64>,
    /// Only output since this time (Unix seconds); 0 for all of it.
    pub since_unix: i64,
    /// Only output before this time (Unix seconds); 0 for all of it.
    pub until_unix: i64,
    /// Start each line with the engine's RFC 3339 timestamp.
    pub timestamps: bool,
}

/// A container's output (stdout and stderr as the engine interleaves them), in pieces that
/// need not end on line boundaries.
pub type LogStream = futures::stream::BoxStream<'static, Result<Vec<u8>, RuntimeError>>;

/// What the engine says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// `docker` or `podman`.
    pub runtime: String,
    pub version: String,
    pub api_version: String,
}

/// A failed engine operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The engine does not answer (socket missing, connection refused, timeout).
    #[error("container engine unavailable: {0}")]
    Unavailable(String),
    /// The image is not present and cannot be pulled.
    #[error("ImagePullFailed: {reason}")]
    ImagePull { image: String, reason: String },
    /// The host port is already taken.
    #[error("host port {port} is already in use: {message}")]
    PortInUse { port: u16, message: String },
    /// The named object does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A name is taken or an object is in use.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Any other refusal by the engine.
    #[error("{operation}: {message}")]
    Engine {
        operation: &'static str,
        message: String,
    },
}

/// The container engine, as reconcile needs it. Object-safe: use `Arc<dyn ContainerRuntime>`.
///
/// Every operation is idempotent where the engine allows: removing what is gone, stopping what
/// is stopped and ensuring what exists all succeed.
#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Answers when the engine is reachable.
    async fn ping(&self) -> Result<(), RuntimeError>;
    /// Engine name and version.
    async fn info(&self) -> Result<RuntimeInfo, RuntimeError>;

    /// All containers (running or not) labelled managed and with this host name.
    async fn list_managed_containers(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedContainer>, RuntimeError>;
    /// One container by id or name; `None` when it does not exist.
    async fn inspect_container(&self, id: &str) -> Result<Option<ObservedContainer>, RuntimeError>;
    /// Makes the image present, pulling it when missing ([`RuntimeError::ImagePull`] otherwise).
    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError>;
    /// Creates and starts a container; returns its id. A container that fails to start is removed.
    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError>;
    /// Creates a container without starting it; returns its id.
    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError>;
    /// Starts an existing, stopped container.
    async fn start_container(&self, id: &str) -> Result<(), RuntimeError>;
    /// Streams a tar of `path` inside a (stopped) container to the file `dest`, through the
    /// engine's archive API (nothing is needed inside the image); returns the bytes written.
    async fn download_archive(
        &self,
        id: &str,
        path: &str,
        dest: &std::path::Path,
    ) -> Result<u64, RuntimeError>;
    /// Extracts the tar file `src` into `dir` inside a (created, not started) container,
    /// keeping the owners recorded in the tar.
    async fn upload_archive(
        &self,
        id: &str,
        dir: &str,
        src: &std::path::Path,
    ) -> Result<(), RuntimeError>;
    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError>;
    /// Removes a container (killing it if it still runs); its named volumes stay.
    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError>;

    async fn ensure_volume(&self, spec: &VolumeSpec) -> Result<(), RuntimeError>;
    async fn list_managed_volumes(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedVolume>, RuntimeError>;
    async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError>;

    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<(), RuntimeError>;
    async fn list_managed_networks(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedNetwork>, RuntimeError>;
    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError>;

    /// One sample of a running container's resource use.
    async fn container_stats(&self, id: &str) -> Result<ContainerStats, RuntimeError>;

    /// The container's output (stdout and stderr). Engines that cannot read it say so.
    async fn container_logs(
        &self,
        id: &str,
        options: &LogOptions,
    ) -> Result<LogStream, RuntimeError> {
        let _ = (id, options);
        Err(RuntimeError::Engine {
            operation: "container logs",
            message: "this container engine cannot read container output".to_owned(),
        })
    }
}
