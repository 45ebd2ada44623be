//! An in-memory [`ContainerRuntime`] that records every call, for unit tests of reconcile and the sync loop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::{
    ContainerEnv, ContainerRuntime, ContainerSpec, ContainerStatus, Labelled, NetworkSpec,
    ObservedContainer, ObservedNetwork, ObservedVolume, RuntimeError, RuntimeInfo, VolumeSpec,
};
use crate::model::ContainerStats;

/// One call made to a [`FakeRuntime`], with the argument that identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    Ping,
    Info,
    ListContainers,
    InspectContainer(String),
    EnsureImage(String),
    /// Container name and published host port.
    CreateAndStart(String, Option<u16>),
    StartContainer(String),
    /// Container name and published host port (created, not started).
    CreateContainer(String, Option<u16>),
    /// Container id and the path archived.
    DownloadArchive(String, String),
    /// Container id and the directory extracted into.
    UploadArchive(String, String),
    /// Container id and the grace period it was given.
    StopContainer(String, Duration),
    RemoveContainer(String),
    EnsureVolume(String),
    ListVolumes,
    RemoveVolume(String),
    EnsureNetwork(String),
    ListNetworks,
    RemoveNetwork(String),
    ContainerStats(String),
}

#[derive(Default)]
struct State {
    calls: Vec<FakeCall>,
    containers: BTreeMap<String, ObservedContainer>,
    specs: BTreeMap<String, ContainerSpec>,
    volumes: BTreeMap<String, ObservedVolume>,
    networks: BTreeMap<String, ObservedNetwork>,
    images: BTreeSet<String>,
    pull_failures: BTreeMap<String, String>,
    busy_ports: BTreeSet<u16>,
    unavailable: bool,
    /// Lists leave the environment out (inspections still give it).
    env_hidden_in_lists: bool,
    counter: u64,
    /// How long a stop takes (a Gateway using its whole grace period).
    stop_delay: Duration,
    /// How long a stats sample takes (the engine samples twice, about a second apart).
    stats_delay: Duration,
    /// Operations (stops, creations) running right now, and the most at once so far.
    busy: usize,
    max_busy: usize,
    /// What each volume holds (a tar stands for its files).
    volume_data: BTreeMap<String, Vec<u8>>,
    download_failure: Option<String>,
}

/// A container engine in memory. Images are pullable unless [`FakeRuntime::fail_pull`] says not.
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

impl FakeRuntime {
    pub fn new() -> Self {
        FakeRuntime::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, call: FakeCall) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        state.calls.push(call);
        state
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// Calls that change something (not lists, inspections, stats, ping or info).
    pub fn mutations(&self) -> Vec<FakeCall> {
        self.calls()
            .into_iter()
            .filter(|c| {
                !matches!(
                    c,
                    FakeCall::Ping
                        | FakeCall::Info
                        | FakeCall::ListContainers
                        | FakeCall::ListVolumes
                        | FakeCall::ListNetworks
                        | FakeCall::InspectContainer(_)
                        | FakeCall::ContainerStats(_)
                )
            })
            .collect()
    }

    /// Sets what a volume holds.
    pub fn set_volume_data(&self, volume: &str, data: &[u8]) {
        self.lock()
            .volume_data
            .insert(volume.to_owned(), data.to_vec());
    }

    /// What a volume holds (empty when nothing was written to it).
    pub fn volume_data(&self, volume: &str) -> Vec<u8> {
        self.lock()
            .volume_data
            .get(volume)
            .cloned()
            .unwrap_or_default()
    }

    /// Makes archive downloads fail with `reason` (or work again with `None`).
    pub fn fail_download(&self, reason: Option<&str>) {
        self.lock().download_failure = reason.map(str::to_owned);
    }

    /// Makes every stop take `delay` (in tokio time) before the container exits.
    pub fn set_stop_delay(&self, delay: Duration) {
        self.lock().stop_delay = delay;
    }

    /// Makes every stats sample take `delay` (in tokio time).
    pub fn set_stats_delay(&self, delay: Duration) {
        self.lock().stats_delay = delay;
    }

    /// The most stops and creations that ran at once so far.
    pub fn max_concurrent(&self) -> usize {
        self.lock().max_busy
    }

    fn enter(&self) {
        let mut state = self.lock();
        state.busy += 1;
        state.max_busy = state.max_busy.max(state.busy);
    }

    fn leave(&self) {
        self.lock().busy -= 1;
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Makes pulling `image` fail with `reason`.
    pub fn fail_pull(&self, image: &str, reason: &str) {
        self.lock()
            .pull_failures
            .insert(image.to_owned(), reason.to_owned());
    }

    /// Makes `image` pullable again after [`FakeRuntime::fail_pull`].
    pub fn heal_pull(&self, image: &str) {
        self.lock().pull_failures.remove(image);
    }

    /// Makes every call fail as if the engine were gone (or back, with `false`).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.lock().unavailable = unavailable;
    }

    /// Marks a host port as taken by something else.
    pub fn occupy_port(&self, port: u16) {
        self.lock().busy_ports.insert(port);
    }

    /// Adds a container as if something had created it.
    pub fn insert_container(&self, container: ObservedContainer) {
        self.lock()
            .containers
            .insert(container.id.clone(), container);
    }

    pub fn insert_volume(&self, volume: ObservedVolume) {
        self.lock().volumes.insert(volume.name.clone(), volume);
    }

    pub fn insert_network(&self, network: ObservedNetwork) {
        self.lock().networks.insert(network.name.clone(), network);
    }

    /// Changes a container's status, as a crash or an exit would.
    pub fn set_status(&self, id: &str, status: ContainerStatus) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            c.status = status;
        }
    }

    /// Sets (`Some`) or removes (`None`) a variable in a container's environment, as a
    /// container made by hand would differ.
    pub fn set_env(&self, id: &str, name: &str, value: Option<&str>) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            let env = c.env.get_or_insert_with(ContainerEnv::default);
            match value {
                Some(v) => env.set(name, v),
                None => env.remove(name),
            }
        }
    }

    /// Makes lists leave the environment out, as an engine whose list does not inspect would.
    pub fn hide_env_in_lists(&self, hidden: bool) {
        self.lock().env_hidden_in_lists = hidden;
    }

    pub fn containers(&self) -> Vec<ObservedContainer> {
        self.lock().containers.values().cloned().collect()
    }

    /// The spec a container was created from, by container name.
    pub fn spec(&self, name: &str) -> Option<ContainerSpec> {
        self.lock().specs.get(name).cloned()
    }

    pub fn volumes(&self) -> Vec<String> {
        self.lock().volumes.keys().cloned().collect()
    }

    pub fn networks(&self) -> Vec<String> {
        self.lock().networks.keys().cloned().collect()
    }

    fn insert_from_spec(
        state: &mut State,
        spec: &ContainerSpec,
        start: bool,
    ) -> Result<String, RuntimeError> {
        Self::check(state)?;
        if !state.images.contains(&spec.image) {
            return Err(RuntimeError::NotFound(format!("image {}", spec.image)));
        }
        if state.containers.values().any(|c| c.name == spec.name) {
            return Err(RuntimeError::Conflict(format!(
                "container name {} is in use",
                spec.name
            )));
        }
        let host_port = spec.publish.map(|p| p.host_port);
        if let Some(port) = host_port.filter(|_| start) {
            let taken = state.busy_ports.contains(&port)
                || state
                    .containers
                    .values()
                    .any(|c| c.status.is_running() && c.host_port == Some(port));
            if taken {
                return Err(RuntimeError::PortInUse {
                    port,
                    message: "port is already allocated".into(),
                });
            }
        }
        state.counter += 1;
        let id = format!("fake-{:04}", state.counter);
        let started_at = format!("start-{}", state.counter);
        state.containers.insert(
            id.clone(),
            ObservedContainer {
                id: id.clone(),
                name: spec.name.clone(),
                image: spec.image.clone(),
                labels: spec.labels.clone(),
                status: if start {
                    ContainerStatus::Running
                } else {
                    ContainerStatus::Created
                },
                started_at: start.then_some(started_at),
                host_port,
                engine_restarts: 0,
                env: Some(ContainerEnv::from_map(&spec.env)),
            },
        );
        state.specs.insert(spec.name.clone(), spec.clone());
        Ok(id)
    }

    fn check(state: &State) -> Result<(), RuntimeError> {
        if state.unavailable {
            Err(RuntimeError::Unavailable("fake engine is down".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        Self::check(&self.record(FakeCall::Ping))
    }

    async fn info(&self) -> Result<RuntimeInfo, RuntimeError> {
        Self::check(&self.record(FakeCall::Info))?;
        Ok(RuntimeInfo {
            runtime: "fake".into(),
            version: "0".into(),
            api_version: "1.41".into(),
        })
    }

    async fn list_managed_containers(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedContainer>, RuntimeError> {
        let state = self.record(FakeCall::ListContainers);
        Self::check(&state)?;
        let hide_env = state.env_hidden_in_lists;
        Ok(state
            .containers
            .values()
            .filter(|c| c.managed_by(host_id))
            .cloned()
            .map(|mut c| {
                if hide_env {
                    c.env = None;
                }
                c
            })
            .collect())
    }

    async fn inspect_container(&self, id: &str) -> Result<Option<ObservedContainer>, RuntimeError> {
        let state = self.record(FakeCall::InspectContainer(id.into()));
        Self::check(&state)?;
        Ok(state
            .containers
            .values()
            .find(|c| c.id == id || c.name == id)
            .cloned())
    }

    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError> {
        let mut state = self.record(FakeCall::EnsureImage(image.into()));
        Self::check(&state)?;
        if let Some(reason) = state.pull_failures.get(image) {
            return Err(RuntimeError::ImagePull {
                image: image.into(),
                reason: reason.clone(),
            });
        }
        state.images.insert(image.into());
        Ok(())
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.enter();
        tokio::task::yield_now().await;
        self.leave();
        let host_port = spec.publish.map(|p| p.host_port);
        let mut state = self.record(FakeCall::CreateAndStart(spec.name.clone(), host_port));
        Self::insert_from_spec(&mut state, spec, true)
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let host_port = spec.publish.map(|p| p.host_port);
        let mut state = self.record(FakeCall::CreateContainer(spec.name.clone(), host_port));
        Self::insert_from_spec(&mut state, spec, false)
    }

    async fn download_archive(
        &self,
        id: &str,
        path: &str,
        dest: &std::path::Path,
    ) -> Result<u64, RuntimeError> {
        let data = {
            let state = self.record(FakeCall::DownloadArchive(id.into(), path.into()));
            Self::check(&state)?;
            if let Some(reason) = &state.download_failure {
                return Err(RuntimeError::Engine {
                    operation: "download archive",
                    message: reason.clone(),
                });
            }
            let name = &state
                .containers
                .get(id)
                .ok_or_else(|| RuntimeError::NotFound(format!("container {id}")))?
                .name;
            let volume = state
                .specs
                .get(name)
                .and_then(|s| s.volumes.first())
                .map(|v| v.volume.clone())
                .unwrap_or_default();
            state.volume_data.get(&volume).cloned().unwrap_or_default()
        };
        std::fs::write(dest, &data).map_err(|err| RuntimeError::Engine {
            operation: "write archive",
            message: err.to_string(),
        })?;
        Ok(data.len() as u64)
    }

    async fn upload_archive(
        &self,
        id: &str,
        dir: &str,
        src: &std::path::Path,
    ) -> Result<(), RuntimeError> {
        let data = std::fs::read(src).map_err(|err| RuntimeError::Engine {
            operation: "read archive",
            message: err.to_string(),
        })?;
        let mut state = self.record(FakeCall::UploadArchive(id.into(), dir.into()));
        Self::check(&state)?;
        let name = state
            .containers
            .get(id)
            .ok_or_else(|| RuntimeError::NotFound(format!("container {id}")))?
            .name
            .clone();
        let volume = state
            .specs
            .get(&name)
            .and_then(|s| s.volumes.first())
            .map(|v| v.volume.clone())
            .unwrap_or_default();
        state.volume_data.insert(volume, data);
        Ok(())
    }

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut state = self.record(FakeCall::StartContainer(id.into()));
        Self::check(&state)?;
        let port = state.containers.get(id).and_then(|c| c.host_port);
        if let Some(port) = port {
            let taken = state.busy_ports.contains(&port)
                || state
                    .containers
                    .values()
                    .any(|c| c.id != id && c.status.is_running() && c.host_port == Some(port));
            if taken {
                return Err(RuntimeError::PortInUse {
                    port,
                    message: "port is already allocated".into(),
                });
            }
        }
        state.counter += 1;
        let started_at = format!("start-{}", state.counter);
        match state.containers.get_mut(id) {
            Some(c) => {
                c.status = ContainerStatus::Running;
                c.started_at = Some(started_at);
                Ok(())
            }
            None => Err(RuntimeError::NotFound(format!("container {id}"))),
        }
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let delay = {
            let state = self.record(FakeCall::StopContainer(id.into(), grace));
            Self::check(&state)?;
            state.stop_delay
        };
        if !delay.is_zero() {
            self.enter();
            tokio::time::sleep(delay).await;
            self.leave();
        }
        let mut state = self.lock();
        if let Some(c) = state.containers.get_mut(id)
            && c.status.is_running()
        {
            c.status = ContainerStatus::Exited {
                code: 0,
                oom_killed: false,
            };
        }
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut state = self.record(FakeCall::RemoveContainer(id.into()));
        Self::check(&state)?;
        if let Some(c) = state.containers.remove(id) {
            state.specs.remove(&c.name);
        }
        Ok(())
    }

    async fn ensure_volume(&self, spec: &VolumeSpec) -> Result<(), RuntimeError> {
        let mut state = self.record(FakeCall::EnsureVolume(spec.name.clone()));
        Self::check(&state)?;
        state
            .volumes
            .entry(spec.name.clone())
            .or_insert_with(|| ObservedVolume {
                name: spec.name.clone(),
                labels: spec.labels.clone(),
            });
        Ok(())
    }

    async fn list_managed_volumes(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedVolume>, RuntimeError> {
        let state = self.record(FakeCall::ListVolumes);
        Self::check(&state)?;
        Ok(state
            .volumes
            .values()
            .filter(|v| v.managed_by(host_id))
            .cloned()
            .collect())
    }

    async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError> {
        let mut state = self.record(FakeCall::RemoveVolume(name.into()));
        Self::check(&state)?;
        let in_use = state
            .specs
            .values()
            .any(|s| s.volumes.iter().any(|v| v.volume == name));
        if in_use {
            return Err(RuntimeError::Conflict(format!("volume {name} is in use")));
        }
        state.volumes.remove(name);
        state.volume_data.remove(name);
        Ok(())
    }

    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<(), RuntimeError> {
        let mut state = self.record(FakeCall::EnsureNetwork(spec.name.clone()));
        Self::check(&state)?;
        let id = format!("net-{}", spec.name);
        state
            .networks
            .entry(spec.name.clone())
            .or_insert_with(|| ObservedNetwork {
                id,
                name: spec.name.clone(),
                labels: spec.labels.clone(),
            });
        Ok(())
    }

    async fn list_managed_networks(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedNetwork>, RuntimeError> {
        let state = self.record(FakeCall::ListNetworks);
        Self::check(&state)?;
        Ok(state
            .networks
            .values()
            .filter(|n| n.managed_by(host_id))
            .cloned()
            .collect())
    }

    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        let mut state = self.record(FakeCall::RemoveNetwork(name.into()));
        Self::check(&state)?;
        let in_use = state
            .specs
            .values()
            .any(|s| s.network.as_deref() == Some(name));
        if in_use {
            return Err(RuntimeError::Conflict(format!(
                "network {name} has active endpoints"
            )));
        }
        state.networks.remove(name);
        Ok(())
    }

    async fn container_stats(&self, id: &str) -> Result<ContainerStats, RuntimeError> {
        let delay = {
            let state = self.record(FakeCall::ContainerStats(id.into()));
            Self::check(&state)?;
            state.stats_delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let state = self.lock();
        match state.containers.get(id) {
            Some(_) => Ok(ContainerStats::default()),
            None => Err(RuntimeError::NotFound(format!("container {id}"))),
        }
    }
}
