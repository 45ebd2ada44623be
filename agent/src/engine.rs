//! The container engine as the daemon holds it: connected on first use and again after a failed connect, so an agent started before its engine (or while the socket is missing) keeps running and recovers.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::OnceCell;

use crate::model::ContainerStats;
use crate::runtime::{
    ContainerRuntime, ContainerSpec, DockerRuntime, LogOptions, LogStream, NetworkSpec,
    ObservedContainer, ObservedNetwork, ObservedVolume, RuntimeError, RuntimeInfo, RuntimeKind,
    VolumeSpec,
};

/// A [`DockerRuntime`] connected lazily: until the engine answers, every call fails with
/// [`RuntimeError::Unavailable`] and the next one tries to connect again.
pub struct LazyEngine {
    kind: RuntimeKind,
    host: Option<String>,
    engine: OnceCell<DockerRuntime>,
}

impl LazyEngine {
    pub fn new(kind: RuntimeKind, host: Option<String>) -> Self {
        LazyEngine {
            kind,
            host,
            engine: OnceCell::new(),
        }
    }

    pub fn kind(&self) -> RuntimeKind {
        self.kind
    }

    /// Where the engine is expected, for messages.
    pub fn address(&self) -> String {
        self.host
            .clone()
            .unwrap_or_else(|| self.kind.default_socket())
    }

    async fn get(&self) -> Result<&DockerRuntime, RuntimeError> {
        self.engine
            .get_or_try_init(|| DockerRuntime::connect(self.kind, self.host.as_deref()))
            .await
    }
}

#[async_trait]
impl ContainerRuntime for LazyEngine {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.get().await?.ping().await
    }

    async fn info(&self) -> Result<RuntimeInfo, RuntimeError> {
        self.get().await?.info().await
    }

    async fn list_managed_containers(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedContainer>, RuntimeError> {
        self.get().await?.list_managed_containers(host_id).await
    }

    async fn inspect_container(&self, id: &str) -> Result<Option<ObservedContainer>, RuntimeError> {
        self.get().await?.inspect_container(id).await
    }

    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError> {
        self.get().await?.ensure_image(image).await
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.get().await?.create_and_start(spec).await
    }

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.get().await?.start_container(id).await
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.get().await?.create_container(spec).await
    }

    async fn download_archive(
        &self,
        id: &str,
        path: &str,
        dest: &std::path::Path,
    ) -> Result<u64, RuntimeError> {
        self.get().await?.download_archive(id, path, dest).await
    }

    async fn upload_archive(
        &self,
        id: &str,
        dir: &str,
        src: &std::path::Path,
    ) -> Result<(), RuntimeError> {
        self.get().await?.upload_archive(id, dir, src).await
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        self.get().await?.stop_container(id, grace).await
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.get().await?.remove_container(id).await
    }

    async fn ensure_volume(&self, spec: &VolumeSpec) -> Result<(), RuntimeError> {
        self.get().await?.ensure_volume(spec).await
    }

    async fn list_managed_volumes(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedVolume>, RuntimeError> {
        self.get().await?.list_managed_volumes(host_id).await
    }

    async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError> {
        self.get().await?.remove_volume(name).await
    }

    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<(), RuntimeError> {
        self.get().await?.ensure_network(spec).await
    }

    async fn list_managed_networks(
        &self,
        host_id: &str,
    ) -> Result<Vec<ObservedNetwork>, RuntimeError> {
        self.get().await?.list_managed_networks(host_id).await
    }

    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        self.get().await?.remove_network(name).await
    }

    async fn container_stats(&self, id: &str) -> Result<ContainerStats, RuntimeError> {
        self.get().await?.container_stats(id).await
    }

    async fn container_logs(
        &self,
        id: &str,
        options: &LogOptions,
    ) -> Result<LogStream, RuntimeError> {
        self.get().await?.container_logs(id, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_socket_is_unavailable_and_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let engine = LazyEngine::new(
            RuntimeKind::Docker,
            Some(format!("unix://{}", socket.display())),
        );
        for _ in 0..2 {
            let err = engine.ping().await.unwrap_err();
            assert!(matches!(err, RuntimeError::Unavailable(_)), "{err:?}");
        }
        assert!(engine.address().ends_with("docker.sock"));
    }
}
