//! Builders of instances, hosts, tenants and projects for controller tests.

use std::collections::BTreeMap;

use crate::model::{
    API_VERSION, Host, HostCapacity, HostPhase, HostSpec, HostStatus, InstanceSpec, InstanceStatus,
    Kind, Metadata, OpenClawInstance, Project, Quantity, ReplicaState, ReplicaStatus,
    RolloutStatus, Tenant, UpdateStrategy,
};

/// Tenant of instances built without [`InstanceBuilder::tenant`].
pub const TENANT: &str = "acme";
/// Project of instances built without [`InstanceBuilder::project`].
pub const PROJECT: &str = "web";

/// `InstanceBuilder::new("bot").replicas(3).memory("1Gi").build()`.
#[derive(Clone, Debug)]
pub struct InstanceBuilder {
    instance: OpenClawInstance,
}

impl InstanceBuilder {
    /// One replica of 1 cpu and 2Gi in `acme/web`, generation 1, no status.
    pub fn new(name: &str) -> Self {
        let mut spec = InstanceSpec {
            version: Some("2026.7.1".into()),
            ..InstanceSpec::default()
        };
        spec.apply_defaults();
        InstanceBuilder {
            instance: OpenClawInstance {
                api_version: API_VERSION.into(),
                kind: Kind::OpenClawInstance,
                metadata: Metadata {
                    name: name.into(),
                    tenant: Some(TENANT.into()),
                    project: Some(PROJECT.into()),
                    generation: Some(1),
                    ..Metadata::default()
                },
                spec,
                status: None,
            },
        }
    }

    pub fn tenant(mut self, tenant: &str) -> Self {
        self.instance.metadata.tenant = Some(tenant.into());
        self
    }

    pub fn project(mut self, project: &str) -> Self {
        self.instance.metadata.project = Some(project.into());
        self
    }

    pub fn replicas(mut self, n: i64) -> Self {
        self.instance.spec.replicas = n;
        self
    }

    pub fn cpu(mut self, q: &str) -> Self {
        self.instance.spec.resources.cpu = Some(Quantity::from(q));
        self
    }

    pub fn memory(mut self, q: &str) -> Self {
        self.instance.spec.resources.memory = Some(Quantity::from(q));
        self
    }

    pub fn generation(mut self, g: i64) -> Self {
        self.instance.metadata.generation = Some(g);
        self
    }

    /// Requires hosts to carry all these labels.
    pub fn selector(mut self, labels: &[(&str, &str)]) -> Self {
        self.instance.spec.placement.host_selector = to_map(labels);
        self
    }

    /// Records that replica `ordinal` runs on `host`, ready, at the generation set so far, as a
    /// previous pass and the agent would have.
    pub fn placed(mut self, ordinal: u32, host: &str) -> Self {
        let name = format!("{}-{ordinal}", self.instance.metadata.name);
        let generation = self.instance.metadata.generation;
        let status = self
            .instance
            .status
            .get_or_insert_with(InstanceStatus::default);
        status.replica_status.retain(|r| r.ordinal != ordinal);
        status.replica_status.push(ReplicaStatus {
            name,
            ordinal,
            host: Some(host.into()),
            state: ReplicaState::Ready,
            container_id: Some(format!("c{ordinal}{host}")),
            restarts: 2,
            host_port: Some(19100 + ordinal as u16),
            generation,
            ..ReplicaStatus::default()
        });
        status.replica_status.sort_by_key(|r| r.ordinal);
        self
    }

    /// Sets `status.configRevision`, the newest revision.
    pub fn revision(mut self, u: u64) -> Self {
        self.instance
            .status
            .get_or_insert_with(InstanceStatus::default)
            .config_revision = Some(u);
        self
    }

    /// Sets `spec.updateStrategy`.
    pub fn strategy(mut self, s: UpdateStrategy) -> Self {
        self.instance.spec.update_strategy = s;
        self
    }

    /// Sets `status.rollout`.
    pub fn rollout(mut self, r: RolloutStatus) -> Self {
        self.instance
            .status
            .get_or_insert_with(InstanceStatus::default)
            .rollout = Some(r);
        self
    }

    /// Records replica `ordinal` as placed on `host`, Ready, targeting and running `revision`.
    pub fn on_revision(mut self, ordinal: u32, host: &str, revision: u64) -> Self {
        self = self.placed(ordinal, host);
        if let Some(r) = self
            .instance
            .status
            .as_mut()
            .and_then(|s| s.replica_status.iter_mut().find(|r| r.ordinal == ordinal))
        {
            r.target_revision = Some(revision);
            r.config_revision = Some(revision);
            r.ready_since = Some("2026-07-10T00:00:00Z".into());
            r.restarts_at_update = Some(r.restarts);
        }
        self
    }

    /// Sets the status as a whole.
    pub fn status(mut self, status: InstanceStatus) -> Self {
        self.instance.status = Some(status);
        self
    }

    pub fn build(self) -> OpenClawInstance {
        self.instance
    }
}

/// `HostBuilder::new("h1").cpu("4").memory("8Gi").labels(&[("region", "eu")]).build()`.
#[derive(Clone, Debug)]
pub struct HostBuilder {
    host: Host,
}

impl HostBuilder {
    /// A Ready, schedulable host with 4 cpu and 8Gi and no labels.
    pub fn new(name: &str) -> Self {
        HostBuilder {
            host: Host {
                api_version: API_VERSION.into(),
                kind: Kind::Host,
                metadata: Metadata {
                    name: name.into(),
                    generation: Some(1),
                    ..Metadata::default()
                },
                spec: HostSpec {
                    hostname: format!("{name}.example.net"),
                    capacity: HostCapacity {
                        cpu: Quantity::from("4"),
                        memory: Quantity::from("8Gi"),
                        disk: None,
                    },
                    ..HostSpec::default()
                },
                status: Some(HostStatus {
                    phase: HostPhase::Ready,
                    ..HostStatus::default()
                }),
            },
        }
    }

    pub fn cpu(mut self, q: &str) -> Self {
        self.host.spec.capacity.cpu = Quantity::from(q);
        self
    }

    pub fn memory(mut self, q: &str) -> Self {
        self.host.spec.capacity.memory = Quantity::from(q);
        self
    }

    pub fn labels(mut self, labels: &[(&str, &str)]) -> Self {
        self.host.metadata.labels = to_map(labels).into();
        self
    }

    pub fn phase(mut self, phase: HostPhase) -> Self {
        self.host
            .status
            .get_or_insert_with(HostStatus::default)
            .phase = phase;
        self
    }

    pub fn not_ready(self) -> Self {
        self.phase(HostPhase::NotReady)
    }

    /// Cordons the host: nothing new is placed on it.
    pub fn unschedulable(mut self) -> Self {
        self.host.spec.unschedulable = true;
        self
    }

    pub fn resource_version(mut self, rv: u64) -> Self {
        self.host.metadata.resource_version = Some(rv);
        self
    }

    /// A host that has enrolled but never reported (no status at all).
    pub fn no_status(mut self) -> Self {
        self.host.status = None;
        self
    }

    pub fn build(self) -> Host {
        self.host
    }
}

pub fn tenant(name: &str) -> Tenant {
    Tenant {
        api_version: API_VERSION.into(),
        kind: Kind::Tenant,
        metadata: Metadata {
            name: name.into(),
            ..Metadata::default()
        },
        spec: Default::default(),
        status: None,
    }
}

pub fn project(tenant: &str, name: &str) -> Project {
    Project {
        api_version: API_VERSION.into(),
        kind: Kind::Project,
        metadata: Metadata {
            name: name.into(),
            tenant: Some(tenant.into()),
            ..Metadata::default()
        },
        spec: Default::default(),
        status: None,
    }
}

fn to_map(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
