//! [`ContainerRuntime`] over the Docker Engine API (bollard); also serves Podman's Docker-compatible socket.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum,
    ContainerStatsResponse, HostConfig, Mount, MountType, NetworkCreateRequest, PortBinding,
    RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveVolumeOptionsBuilder, StatsOptionsBuilder, StopContainerOptionsBuilder,
};
use futures::StreamExt;

use super::{
    ContainerEnv, ContainerRuntime, ContainerSpec, ContainerStatus, LogOptions, LogStream,
    NetworkSpec, ObservedContainer, ObservedNetwork, ObservedVolume, RuntimeError, RuntimeInfo,
    VolumeSpec, labels, spec::GATEWAY_PORT,
};
use crate::model::ContainerStats;

/// Seconds any single engine request may take (an image pull is one request).
const REQUEST_TIMEOUT_SECS: u64 = 600;
/// Docker's socket when no host is given.
pub const DOCKER_DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Podman's system-wide socket (rootful).
pub const PODMAN_SYSTEM_SOCKET: &str = "/run/podman/podman.sock";

/// Which engine answers on the socket; only the default socket path and the name reported differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    Docker,
    Podman,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Docker => "docker",
            RuntimeKind::Podman => "podman",
        }
    }

    /// The socket to use when none is given: Docker's, or Podman's system socket when it exists
    /// (or the agent runs as root), else the user's `$XDG_RUNTIME_DIR/podman/podman.sock`.
    pub fn default_socket(self) -> String {
        match self {
            RuntimeKind::Docker => DOCKER_DEFAULT_SOCKET.to_owned(),
            RuntimeKind::Podman => {
                if Path::new(PODMAN_SYSTEM_SOCKET).exists() {
                    return PODMAN_SYSTEM_SOCKET.to_owned();
                }
                match std::env::var("XDG_RUNTIME_DIR") {
                    Ok(dir) if !dir.is_empty() => format!("{dir}/podman/podman.sock"),
                    _ => PODMAN_SYSTEM_SOCKET.to_owned(),
                }
            }
        }
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "docker" => Ok(RuntimeKind::Docker),
            "podman" => Ok(RuntimeKind::Podman),
            other => Err(format!(
                "unknown runtime {other:?}: expected `docker` or `podman`"
            )),
        }
    }
}

/// The engine behind a Docker-compatible API socket.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    kind: RuntimeKind,
}

impl DockerRuntime {
    /// Connects to `host` (`unix:///path`, `/path`, `tcp://h:p` or `http://h:p`; the kind's
    /// default socket when `None`) and negotiates the API version with the engine.
    pub async fn connect(kind: RuntimeKind, host: Option<&str>) -> Result<Self, RuntimeError> {
        let host = host.map_or_else(|| kind.default_socket(), str::to_owned);
        let version = bollard::API_DEFAULT_VERSION;
        let docker = if let Some(path) = host.strip_prefix("unix://") {
            Docker::connect_with_socket(path, REQUEST_TIMEOUT_SECS, version)
        } else if host.starts_with('/') {
            Docker::connect_with_socket(&host, REQUEST_TIMEOUT_SECS, version)
        } else if host.starts_with("tcp://") || host.starts_with("http://") {
            Docker::connect_with_http(&host, REQUEST_TIMEOUT_SECS, version)
        } else {
            return Err(RuntimeError::Unavailable(format!(
                "unsupported engine address {host:?}: expected unix:///path, /path, tcp://host:port or http://host:port"
            )));
        }
        .map_err(|err| RuntimeError::Unavailable(format!("{host}: {err}")))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|err| RuntimeError::Unavailable(format!("{host}: {err}")))?;
        Ok(DockerRuntime { docker, kind })
    }

    pub fn kind(&self) -> RuntimeKind {
        self.kind
    }

    /// The underlying client, for what the trait does not cover.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerInspectResponse>, RuntimeError> {
        match self.docker.inspect_container(id, None).await {
            Ok(found) => Ok(Some(found)),
            Err(err) if status_of(&err) == Some(404) => Ok(None),
            Err(err) => Err(map_error("inspect container", err)),
        }
    }
}

fn status_of(err: &BollardError) -> Option<u16> {
    match err {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn map_error(operation: &'static str, err: BollardError) -> RuntimeError {
    match err {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => match status_code {
            404 => RuntimeError::NotFound(message),
            409 => RuntimeError::Conflict(message),
            _ => RuntimeError::Engine {
                operation,
                message: with_hint(message),
            },
        },
        BollardError::SocketNotFoundError(path) => {
            RuntimeError::Unavailable(format!("socket {path} not found"))
        }
        err @ (BollardError::RequestTimeoutError
        | BollardError::IOError { .. }
        | BollardError::HyperResponseError { .. }
        | BollardError::HttpClientError { .. }) => RuntimeError::Unavailable(err.to_string()),
        other => RuntimeError::Engine {
            operation,
            message: other.to_string(),
        },
    }
}

/// Adds what to do to the engine refusals whose cause is the engine's set-up, not the request.
fn with_hint(message: String) -> String {
    let hint = if message.contains("container-init binary not found")
        || message.contains("init binary")
    {
        // Replicas run with `HostConfig.Init`; Podman needs catatonit (or `init_path`) for it.
        Some(
            "the engine has no init binary for containers run with an init process: install catatonit (Podman looks for /usr/libexec/podman/catatonit) or set `init_path` in the [containers] section of containers.conf",
        )
    } else if message.contains("setrlimit") || message.contains("RLIMIT_") {
        Some(
            "the engine may not raise resource limits here (no CAP_SYS_RESOURCE): for Podman set `default_ulimits = []` in the [containers] section of /etc/containers/containers.conf",
        )
    } else {
        None
    };
    match hint {
        Some(hint) => format!("{message} ({hint})"),
        None => message,
    }
}

/// How often a container list that names a state the Docker API does not know is asked for
/// again, and how long apart.
const LIST_RETRIES: u32 = 10;
const LIST_RETRY_DELAY: Duration = Duration::from_millis(300);

/// A response the client could not read because it names a state outside the Docker API's
/// (Podman's transient `stopped`).
fn is_unknown_state(err: &BollardError) -> bool {
    matches!(
        err,
        BollardError::JsonSerdeError { .. } | BollardError::JsonDataError { .. }
    ) && err.to_string().contains("unknown variant")
}

fn is_port_conflict(message: &str) -> bool {
    message.contains("port is already allocated")
        || message.contains("address already in use")
        || message.contains("bind: address")
}

fn observed_from_inspect(c: ContainerInspectResponse) -> ObservedContainer {
    let config = c.config.unwrap_or_default();
    let state = c.state.unwrap_or_default();
    let status = match state.status {
        Some(ContainerStateStatusEnum::CREATED) => ContainerStatus::Created,
        Some(ContainerStateStatusEnum::RUNNING) => ContainerStatus::Running,
        Some(ContainerStateStatusEnum::PAUSED) => ContainerStatus::Paused,
        Some(ContainerStateStatusEnum::RESTARTING) => ContainerStatus::Restarting,
        Some(ContainerStateStatusEnum::EXITED) => ContainerStatus::Exited {
            code: state.exit_code.unwrap_or_default(),
            oom_killed: state.oom_killed.unwrap_or_default(),
        },
        Some(ContainerStateStatusEnum::REMOVING) => ContainerStatus::Removing,
        Some(ContainerStateStatusEnum::DEAD) => ContainerStatus::Dead,
        Some(other) => ContainerStatus::Unknown(other.to_string()),
        None => ContainerStatus::Unknown(String::new()),
    };
    let port_key = format!("{GATEWAY_PORT}/tcp");
    let first_port = |map: Option<&HashMap<String, Option<Vec<PortBinding>>>>| {
        map?.get(&port_key)?
            .as_ref()?
            .iter()
            .find_map(|b| b.host_port.as_deref()?.parse::<u16>().ok())
    };
    let host_port = first_port(
        c.host_config
            .as_ref()
            .and_then(|h| h.port_bindings.as_ref()),
    )
    .or_else(|| first_port(c.network_settings.as_ref().and_then(|n| n.ports.as_ref())));
    ObservedContainer {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        image: container_image(
            config.labels.as_ref().and_then(|l| l.get(labels::IMAGE)),
            config.image.unwrap_or_default(),
        ),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        status,
        started_at: state.started_at.filter(|s| !s.starts_with("0001-")),
        host_port,
        engine_restarts: c
            .restart_count
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or_default(),
        env: Some(ContainerEnv::new(config.env.unwrap_or_default())),
    }
}

/// The image a container runs, spelled as it was assigned: the agent's image label when the
/// container has one, else the engine's reference without the prefixes an engine adds to a
/// short name (Podman's `localhost/` for a local image).
fn container_image(label: Option<&String>, reported: String) -> String {
    if let Some(image) = label.filter(|l| !l.is_empty()) {
        return image.clone();
    }
    match reported.strip_prefix("localhost/") {
        Some(short) => short.to_owned(),
        None => reported,
    }
}

fn label_filter(host_id: &str, extra: &[(&str, &str)]) -> HashMap<String, Vec<String>> {
    let mut wanted = vec![
        format!("{}={}", labels::MANAGED, labels::MANAGED_VALUE),
        format!("{}={host_id}", labels::HOST),
    ];
    wanted.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
    HashMap::from([("label".to_owned(), wanted)])
}

fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let mut mounts: Vec<Mount> = spec
        .volumes
        .iter()
        .map(|v| Mount {
            target: Some(v.target.clone()),
            source: Some(v.volume.clone()),
            typ: Some(MountType::VOLUME),
            read_only: Some(v.read_only),
            ..Default::default()
        })
        .collect();
    mounts.extend(spec.binds.iter().map(|b| Mount {
        target: Some(b.target.clone()),
        source: Some(b.source.to_string_lossy().into_owned()),
        typ: Some(MountType::BIND),
        read_only: Some(b.read_only),
        ..Default::default()
    }));
    let memory = spec.memory_bytes.and_then(|m| i64::try_from(m).ok());
    let host_config = HostConfig {
        memory,
        // The same value as the memory limit: no swap on top of it.
        memory_swap: memory,
        nano_cpus: spec.nano_cpus.and_then(|n| i64::try_from(n).ok()),
        pids_limit: spec.pids_limit,
        readonly_rootfs: Some(spec.read_only_rootfs),
        cap_drop: Some(spec.cap_drop.clone()),
        security_opt: spec
            .no_new_privileges
            .then(|| vec!["no-new-privileges:true".to_owned()]),
        tmpfs: Some(spec.tmpfs.clone().into_iter().collect()),
        mounts: Some(mounts),
        network_mode: spec.network.clone(),
        port_bindings: spec.publish.map(|p| {
            HashMap::from([(
                format!("{}/tcp", p.container_port),
                Some(vec![PortBinding {
                    host_ip: Some(p.host_ip.to_string()),
                    host_port: Some(p.host_port.to_string()),
                }]),
            )])
        }),
        // An init process as PID 1 forwards SIGTERM to the Gateway.
        init: Some(spec.init),
        // Restarts are the agent's decision (counted, with back-off), never the engine's.
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        user: Some(spec.user.clone()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(spec.labels.clone().into_iter().collect()),
        exposed_ports: spec
            .publish
            .map(|p| vec![format!("{}/tcp", p.container_port)]),
        stop_timeout: i64::try_from(spec.stop_grace.as_secs()).ok(),
        host_config: Some(host_config),
        ..Default::default()
    }
}

fn stats_from(s: &ContainerStatsResponse) -> ContainerStats {
    let cpu = s.cpu_stats.as_ref();
    let pre = s.precpu_stats.as_ref();
    let total = |c: Option<&bollard::models::ContainerCpuStats>| {
        c.and_then(|c| c.cpu_usage.as_ref()?.total_usage)
            .unwrap_or(0)
    };
    let system = |c: Option<&bollard::models::ContainerCpuStats>| {
        c.and_then(|c| c.system_cpu_usage).unwrap_or(0)
    };
    let cpu_delta = total(cpu).saturating_sub(total(pre)) as f64;
    let system_delta = system(cpu).saturating_sub(system(pre)) as f64;
    let online = cpu
        .and_then(|c| {
            c.online_cpus.map(u64::from).or_else(|| {
                c.cpu_usage
                    .as_ref()?
                    .percpu_usage
                    .as_ref()
                    .map(|v| v.len() as u64)
            })
        })
        .unwrap_or(1) as f64;
    let cpu_percent = if system_delta > 0.0 && cpu_delta > 0.0 {
        cpu_delta / system_delta * online * 100.0
    } else {
        0.0
    };

    let memory = s.memory_stats.as_ref();
    let usage = memory.and_then(|m| m.usage).unwrap_or(0);
    // Page cache that can be reclaimed is not counted, as `docker stats` does.
    let inactive_file = memory
        .and_then(|m| m.stats.as_ref())
        .and_then(|st| {
            st.get("total_inactive_file")
                .or_else(|| st.get("inactive_file"))
                .copied()
        })
        .unwrap_or(0);
    let (mut rx, mut tx) = (0, 0);
    for net in s.networks.iter().flat_map(|n| n.values()) {
        rx += net.rx_bytes.unwrap_or(0);
        tx += net.tx_bytes.unwrap_or(0);
    }
    let (mut read, mut write) = (0, 0);
    for entry in s
        .blkio_stats
        .iter()
        .flat_map(|b| b.io_service_bytes_recursive.iter().flatten())
    {
        match entry.op.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("read") => read += entry.value.unwrap_or(0),
            Some("write") => write += entry.value.unwrap_or(0),
            _ => {}
        }
    }
    ContainerStats {
        cpu_percent,
        memory_bytes: usage.saturating_sub(inactive_file),
        memory_limit_bytes: memory.and_then(|m| m.limit).unwrap_or(0),
        net_rx_bytes: rx,
        net_tx_bytes: tx,
        block_read_bytes: read,
        block_write_bytes: write,
    }
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.docker
            .ping()
            .await
            .map(drop)
            .map_err(|err| map_error("ping", err))
    }

    async fn info(&self) -> Result<RuntimeInfo, RuntimeError> {
        let v = self
            .docker
            .version()
            .await
            .map_err(|err| map_error("version", err))?;
        let is_podman = v
            .components
            .iter()
            .flatten()
            .any(|c| c.name.to_ascii_lowercase().contains("podman"))
            || v.platform
                .as_ref()
                .is_some_and(|p| p.name.to_ascii_lowercase().contains("podman"));
        let runtime = if is_podman {
            RuntimeKind::Podman
        } else {
            self.kind
        };
        Ok(RuntimeInfo {
            runtime: runtime.as_str().to_owned(),
            version: v.version.unwrap_or_default(),
            api_version: v.api_version.unwrap_or_default(),
        })
    }

    async fn list_managed_containers(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedContainer>, RuntimeError> {
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&label_filter(host_id, &[]))
            .build();
        // Podman 4 lists a container it is stopping in the state `stopped`, which the Docker API
        // does not know (it becomes `exited` a moment later): such a list is asked for again.
        let mut attempt = 0;
        let summaries = loop {
            match self.docker.list_containers(Some(options.clone())).await {
                Ok(found) => break found,
                Err(err) if attempt < LIST_RETRIES && is_unknown_state(&err) => {
                    attempt += 1;
                    tokio::time::sleep(LIST_RETRY_DELAY).await;
                }
                Err(err) => return Err(map_error("list containers", err)),
            }
        };
        let ids: Vec<String> = summaries.into_iter().filter_map(|s| s.id).collect();
        let inspected = futures::future::join_all(ids.iter().map(|id| self.inspect(id))).await;
        let mut out = Vec::with_capacity(ids.len());
        for found in inspected {
            // A container removed between listing and inspection is simply gone.
            if let Some(c) = found? {
                out.push(observed_from_inspect(c));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn inspect_container(&self, id: &str) -> Result<Option<ObservedContainer>, RuntimeError> {
        Ok(self.inspect(id).await?.map(observed_from_inspect))
    }

    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(err) if status_of(&err) == Some(404) => {}
            Err(err) => return Err(map_error("inspect image", err)),
        }
        let options = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut progress = self.docker.create_image(Some(options), None, None);
        while let Some(item) = progress.next().await {
            if let Err(err) = item {
                let reason = match err {
                    BollardError::DockerResponseServerError { message, .. } => message,
                    BollardError::DockerStreamError { error } => error,
                    other => other.to_string(),
                };
                return Err(RuntimeError::ImagePull {
                    image: image.to_owned(),
                    reason,
                });
            }
        }
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(()),
            Err(err) => Err(RuntimeError::ImagePull {
                image: image.to_owned(),
                reason: format!("pull finished but the image is not present: {err}"),
            }),
        }
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let created = self
            .docker
            .create_container(Some(options), create_body(spec))
            .await
            .map_err(|err| map_error("create container", err))?;
        if let Err(err) = self.docker.start_container(&created.id, None).await {
            // Leave nothing half-made behind: a created, never-started container would hold the name.
            let _ = self.remove_container(&created.id).await;
            return Err(match err {
                BollardError::DockerResponseServerError { message, .. }
                    if is_port_conflict(&message) =>
                {
                    RuntimeError::PortInUse {
                        port: spec.publish.map(|p| p.host_port).unwrap_or_default(),
                        message,
                    }
                }
                other => map_error("start container", other),
            });
        }
        Ok(created.id)
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        self.docker
            .create_container(Some(options), create_body(spec))
            .await
            .map(|c| c.id)
            .map_err(|err| map_error("create container", err))
    }

    async fn download_archive(
        &self,
        id: &str,
        path: &str,
        dest: &Path,
    ) -> Result<u64, RuntimeError> {
        use tokio::io::AsyncWriteExt;
        let io = |err: std::io::Error| RuntimeError::Engine {
            operation: "write archive",
            message: format!("{}: {err}", dest.display()),
        };
        let options = bollard::query_parameters::DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let mut stream = self.docker.download_from_container(id, Some(options));
        let mut file = tokio::fs::File::create(dest).await.map_err(io)?;
        let mut bytes = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|err| map_error("download archive", err))?;
            bytes += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        file.sync_all().await.map_err(io)?;
        Ok(bytes)
    }

    async fn upload_archive(&self, id: &str, dir: &str, src: &Path) -> Result<(), RuntimeError> {
        let file = tokio::fs::File::open(src)
            .await
            .map_err(|err| RuntimeError::Engine {
                operation: "read archive",
                message: format!("{}: {err}", src.display()),
            })?;
        let options = bollard::query_parameters::UploadToContainerOptionsBuilder::default()
            .path(dir)
            .build();
        // Read in 64 KiB chunks: the tar is never held in memory.
        let body = futures::stream::unfold(Some(file), |file| async move {
            use tokio::io::AsyncReadExt;
            let mut file = file?;
            let mut buf = vec![0u8; 64 * 1024];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(buf.into()), Some(file)))
                }
                Err(err) => Some((Err(err), None)),
            }
        });
        self.docker
            .upload_to_container(id, Some(options), bollard::body_try_stream(body))
            .await
            .map_err(|err| map_error("upload archive", err))
    }

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        match self.docker.start_container(id, None).await {
            Ok(()) => Ok(()),
            Err(err) if status_of(&err) == Some(304) => Ok(()),
            Err(BollardError::DockerResponseServerError { message, .. })
                if is_port_conflict(&message) =>
            {
                Err(RuntimeError::PortInUse { port: 0, message })
            }
            Err(err) => Err(map_error("start container", err)),
        }
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        match self.docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(err) if matches!(status_of(&err), Some(304 | 404)) => Ok(()),
            Err(err) => Err(map_error("stop container", err)),
        }
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(false)
            .build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(err) if status_of(&err) == Some(404) => Ok(()),
            Err(BollardError::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already in progress") => Ok(()),
            Err(err) => Err(map_error("remove container", err)),
        }
    }

    async fn ensure_volume(&self, spec: &VolumeSpec) -> Result<(), RuntimeError> {
        match self.docker.inspect_volume(&spec.name).await {
            Ok(_) => return Ok(()),
            Err(err) if status_of(&err) == Some(404) => {}
            Err(err) => return Err(map_error("inspect volume", err)),
        }
        let request = VolumeCreateRequest {
            name: Some(spec.name.clone()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            ..Default::default()
        };
        self.docker
            .create_volume(request)
            .await
            .map(drop)
            .map_err(|err| map_error("create volume", err))
    }

    async fn list_managed_volumes(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedVolume>, RuntimeError> {
        let options = ListVolumesOptionsBuilder::default()
            .filters(&label_filter(host_id, &[]))
            .build();
        let listed = self
            .docker
            .list_volumes(Some(options))
            .await
            .map_err(|err| map_error("list volumes", err))?;
        let mut out: Vec<ObservedVolume> = listed
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| ObservedVolume {
                name: v.name,
                labels: v.labels.into_iter().collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError> {
        let options = RemoveVolumeOptionsBuilder::default().force(false).build();
        match self.docker.remove_volume(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(err) if status_of(&err) == Some(404) => Ok(()),
            Err(err) => Err(map_error("remove volume", err)),
        }
    }

    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<(), RuntimeError> {
        match self.docker.inspect_network(&spec.name, None).await {
            Ok(_) => return Ok(()),
            Err(err) if status_of(&err) == Some(404) => {}
            Err(err) => return Err(map_error("inspect network", err)),
        }
        let request = NetworkCreateRequest {
            name: spec.name.clone(),
            driver: Some("bridge".to_owned()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            ..Default::default()
        };
        self.docker
            .create_network(request)
            .await
            .map(drop)
            .map_err(|err| map_error("create network", err))
    }

    async fn list_managed_networks(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedNetwork>, RuntimeError> {
        let options = ListNetworksOptionsBuilder::default()
            .filters(&label_filter(host_id, &[]))
            .build();
        let listed = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(|err| map_error("list networks", err))?;
        let mut out: Vec<ObservedNetwork> = listed
            .into_iter()
            .map(|n| ObservedNetwork {
                id: n.id.unwrap_or_default(),
                name: n.name.unwrap_or_default(),
                labels: n.labels.unwrap_or_default().into_iter().collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        match self.docker.remove_network(name).await {
            Ok(()) => Ok(()),
            Err(err) if status_of(&err) == Some(404) => Ok(()),
            Err(BollardError::DockerResponseServerError { message, .. })
                if message.contains("active endpoints") =>
            {
                Err(RuntimeError::Conflict(message))
            }
            Err(err) => Err(map_error("remove network", err)),
        }
    }

    async fn container_stats(&self, id: &str) -> Result<ContainerStats, RuntimeError> {
        // Not one-shot: the engine then samples twice, which CPU percent needs.
        let options = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(false)
            .build();
        let mut stream = self.docker.stats(id, Some(options));
        match stream.next().await {
            Some(Ok(sample)) => Ok(stats_from(&sample)),
            Some(Err(err)) => Err(map_error("container stats", err)),
            None => Err(RuntimeError::Engine {
                operation: "container stats",
                message: "the engine sent no sample".to_owned(),
            }),
        }
    }

    async fn container_logs(
        &self,
        id: &str,
        options: &LogOptions,
    ) -> Result<LogStream, RuntimeError> {
        let query = bollard::query_parameters::LogsOptions {
            follow: options.follow,
            stdout: true,
            stderr: true,
            since: i32::try_from(options.since_unix).unwrap_or(i32::MAX),
            until: i32::try_from(options.until_unix.max(0)).unwrap_or(0),
            timestamps: options.timestamps,
            tail: options
                .tail
                .map_or_else(|| "all".to_owned(), |n| n.to_string()),
        };
        Ok(self
            .docker
            .logs(id, Some(query))
            .map(|item| {
                item.map(|out| out.into_bytes().to_vec())
                    .map_err(|e| map_error("container logs", e))
            })
            .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{
        ContainerBlkioStatEntry, ContainerBlkioStats, ContainerCpuStats, ContainerCpuUsage,
        ContainerMemoryStats, ContainerNetworkStats,
    };

    #[test]
    fn stats_follow_the_docker_cli_formulas() {
        let cpu = |total, system| ContainerCpuStats {
            cpu_usage: Some(ContainerCpuUsage {
                total_usage: Some(total),
                ..Default::default()
            }),
            system_cpu_usage: Some(system),
            online_cpus: Some(2),
            ..Default::default()
        };
        let sample = ContainerStatsResponse {
            cpu_stats: Some(cpu(300, 2000)),
            precpu_stats: Some(cpu(100, 1000)),
            memory_stats: Some(ContainerMemoryStats {
                usage: Some(1000),
                limit: Some(4000),
                stats: Some(HashMap::from([("total_inactive_file".to_owned(), 200)])),
                ..Default::default()
            }),
            networks: Some(HashMap::from([(
                "eth0".to_owned(),
                ContainerNetworkStats {
                    rx_bytes: Some(5),
                    tx_bytes: Some(7),
                    ..Default::default()
                },
            )])),
            blkio_stats: Some(ContainerBlkioStats {
                io_service_bytes_recursive: Some(vec![
                    ContainerBlkioStatEntry {
                        op: Some("Read".into()),
                        value: Some(11),
                        ..Default::default()
                    },
                    ContainerBlkioStatEntry {
                        op: Some("write".into()),
                        value: Some(13),
                        ..Default::default()
                    },
                    ContainerBlkioStatEntry {
                        op: Some("Total".into()),
                        value: Some(24),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let stats = stats_from(&sample);
        assert!((stats.cpu_percent - 40.0).abs() < 1e-9, "{stats:?}");
        assert_eq!(stats.memory_bytes, 800);
        assert_eq!(stats.memory_limit_bytes, 4000);
        assert_eq!((stats.net_rx_bytes, stats.net_tx_bytes), (5, 7));
        assert_eq!((stats.block_read_bytes, stats.block_write_bytes), (11, 13));
    }

    #[test]
    fn images_are_spelled_as_assigned() {
        let label = "clusterclaw-test/openclaw-standin:2026.1.1".to_owned();
        assert_eq!(
            container_image(Some(&label), "localhost/other:1".into()),
            label
        );
        assert_eq!(
            container_image(
                None,
                "localhost/clusterclaw-test/openclaw-standin:2026.1.1".into()
            ),
            label
        );
        assert_eq!(
            container_image(None, "docker.io/library/busybox:1".into()),
            "docker.io/library/busybox:1"
        );
        assert_eq!(
            container_image(None, "ghcr.io/openclaw/openclaw:2026.7.1".into()),
            "ghcr.io/openclaw/openclaw:2026.7.1"
        );
    }

    #[test]
    fn engine_set_up_errors_say_what_to_do() {
        let init = with_hint(
            "container create: container-init binary not found on the host: stat /usr/libexec/podman/catatonit: no such file or directory".into(),
        );
        assert!(init.contains("install catatonit"), "{init}");
        let limits = with_hint("crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted".into());
        assert!(limits.contains("default_ulimits = []"), "{limits}");
        assert_eq!(with_hint("no such image".into()), "no such image");
    }

    #[test]
    fn port_conflicts_are_recognised() {
        assert!(is_port_conflict(
            "driver failed programming external connectivity on endpoint x: Bind for 127.0.0.1:19100 failed: port is already allocated"
        ));
        assert!(is_port_conflict(
            "Error starting userland proxy: listen tcp4 127.0.0.1:19100: bind: address already in use"
        ));
        assert!(!is_port_conflict("no such image"));
    }

    #[test]
    fn runtime_kind_parses() {
        assert_eq!("podman".parse(), Ok(RuntimeKind::Podman));
        assert_eq!("docker".parse(), Ok(RuntimeKind::Docker));
        assert!("lxc".parse::<RuntimeKind>().is_err());
        assert_eq!(RuntimeKind::Docker.default_socket(), DOCKER_DEFAULT_SOCKET);
    }
}
