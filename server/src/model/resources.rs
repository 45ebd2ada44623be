//! The kinds (`Tenant`, `Project`, `OpenClawInstance`, `Host`, `ConfigTemplate`, `Secret`,
//! `Rollout`) and their envelope.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::config::{ConfigFragment, ConfigTemplateSpec, EnvValue, SecretSpec};
use super::failover::Failover;
use super::rollout::{
    RetainedVolume, RolloutStatus, SnapshotInfo, UpdateStrategy, VolumeRetention,
};
use super::waves::{RolloutSpec, WaveStatus};
use super::{FieldProblem, SortedMap};

/// The only API version this server speaks.
pub const API_VERSION: &str = "clusterclaw.io/v1";
/// Image repository used when an instance names a `version` and no `image`.
pub const DEFAULT_IMAGE_REPOSITORY: &str = "ghcr.io/openclaw/openclaw";
/// Defaults filled in at admission when `spec.resources` leaves them out (OpenClaw's own
/// manifests limit a Gateway to 2Gi).
pub const DEFAULT_CPU: &str = "1";
pub const DEFAULT_MEMORY: &str = "2Gi";
pub const DEFAULT_PIDS: i64 = 512;

/// Why users cannot write `Host` objects; said by the API and the CLI alike.
pub const HOST_READ_ONLY: &str = "Host objects are written by clusterclaw-agent when a host enrolls and reports; they cannot be created or changed by users (DELETE /api/v1/hosts/{host}, or clusterclaw delete host NAME, removes one)";

/// A resource kind.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
pub enum Kind {
    Tenant,
    Project,
    OpenClawInstance,
    Host,
    ConfigTemplate,
    Secret,
    /// A change moved across many instances in waves (see [`super::waves`]).
    Rollout,
}

/// Where objects of a kind live: their names are unique within that scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Cluster,
    Tenant,
    Project,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Tenant,
        Kind::Project,
        Kind::OpenClawInstance,
        Kind::Host,
        Kind::ConfigTemplate,
        Kind::Secret,
        Kind::Rollout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tenant => "Tenant",
            Kind::Project => "Project",
            Kind::OpenClawInstance => "OpenClawInstance",
            Kind::Host => "Host",
            Kind::ConfigTemplate => "ConfigTemplate",
            Kind::Secret => "Secret",
            Kind::Rollout => "Rollout",
        }
    }

    /// Lower-case name used in CLI output (`tenant/acme created`).
    pub fn lower(self) -> &'static str {
        match self {
            Kind::Tenant => "tenant",
            Kind::Project => "project",
            Kind::OpenClawInstance => "openclawinstance",
            Kind::Host => "host",
            Kind::ConfigTemplate => "configtemplate",
            Kind::Secret => "secret",
            Kind::Rollout => "rollout",
        }
    }

    /// Collection name in REST paths.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Tenant => "tenants",
            Kind::Project => "projects",
            Kind::OpenClawInstance => "instances",
            Kind::Host => "hosts",
            Kind::ConfigTemplate => "configtemplates",
            Kind::Secret => "secrets",
            Kind::Rollout => "rollouts",
        }
    }

    pub fn scope(self) -> Scope {
        match self {
            Kind::Tenant | Kind::Host | Kind::ConfigTemplate => Scope::Cluster,
            // A secret belongs to a tenant, and optionally to one of its projects.
            Kind::Project | Kind::Secret => Scope::Tenant,
            // A tenant's Rollout, or (without `metadata.tenant`) a cluster-wide one.
            Kind::Rollout => Scope::Tenant,
            Kind::OpenClawInstance => Scope::Project,
        }
    }

    /// Whether users may create and change objects of this kind (hosts are written by agents).
    pub fn user_writable(self) -> bool {
        !matches!(self, Kind::Host)
    }

    /// Order in which a batch is written: parents before children.
    pub fn apply_order(self) -> u8 {
        match self {
            Kind::ConfigTemplate => 0,
            Kind::Tenant => 1,
            Kind::Project => 2,
            Kind::Secret => 3,
            Kind::OpenClawInstance => 4,
            Kind::Host => 5,
            Kind::Rollout => 6,
        }
    }

    /// The names people may type for this kind on the command line, any case: the plural
    /// first (as help lists it), then the singular and the short forms. The one list that
    /// [`Kind::from_user`], the CLI's help and its suggestions read.
    pub fn user_names(self) -> &'static [&'static str] {
        match self {
            Kind::Tenant => &["tenants", "tenant", "tn"],
            Kind::Project => &["projects", "project", "proj", "pj"],
            Kind::OpenClawInstance => &[
                "instances",
                "instance",
                "inst",
                "openclawinstances",
                "openclawinstance",
                "oci",
            ],
            Kind::Host => &["hosts", "host", "ho"],
            Kind::ConfigTemplate => &[
                "configtemplates",
                "configtemplate",
                "templates",
                "template",
                "ct",
            ],
            Kind::Secret => &["secrets", "secret", "sec"],
            Kind::Rollout => &["rollouts", "rollout", "ro"],
        }
    }

    /// Parses a kind as typed by people: singular, plural, short alias, any case.
    pub fn from_user(s: &str) -> Option<Kind> {
        let s = s.to_ascii_lowercase();
        Kind::ALL
            .into_iter()
            .find(|k| k.user_names().contains(&s.as_str()))
    }

    /// Parses the exact `kind:` field of a manifest.
    pub fn from_manifest(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of an object: kind, scope and name. Unused scope parts are empty strings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub tenant: String,
    pub project: String,
    pub name: String,
}

impl ObjectKey {
    pub fn cluster(kind: Kind, name: impl Into<String>) -> Self {
        ObjectKey {
            kind,
            tenant: String::new(),
            project: String::new(),
            name: name.into(),
        }
    }

    pub fn project(tenant: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            kind: Kind::Project,
            tenant: tenant.into(),
            project: String::new(),
            name: name.into(),
        }
    }

    pub fn instance(
        tenant: impl Into<String>,
        project: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        ObjectKey {
            kind: Kind::OpenClawInstance,
            tenant: tenant.into(),
            project: project.into(),
            name: name.into(),
        }
    }

    /// The tenant this object belongs to: its own name for a tenant.
    pub fn tenant_name(&self) -> &str {
        match self.kind {
            Kind::Tenant => &self.name,
            _ => &self.tenant,
        }
    }

    /// The key of the object this one lives in, if any (a project's tenant, an instance's project).
    pub fn parent(&self) -> Option<ObjectKey> {
        match self.kind {
            Kind::Tenant | Kind::Host | Kind::ConfigTemplate => None,
            Kind::Rollout if self.tenant.is_empty() => None,
            Kind::Rollout => Some(ObjectKey::cluster(Kind::Tenant, &self.tenant)),
            Kind::Project => Some(ObjectKey::cluster(Kind::Tenant, &self.tenant)),
            Kind::Secret if self.project.is_empty() => {
                Some(ObjectKey::cluster(Kind::Tenant, &self.tenant))
            }
            Kind::OpenClawInstance | Kind::Secret => {
                Some(ObjectKey::project(&self.tenant, &self.project))
            }
        }
    }
}

impl fmt::Display for ObjectKey {
    /// `tenant/acme`, `project/acme/helpdesk`, `openclawinstance/acme/helpdesk/support-bot`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.lower())?;
        for part in [&self.tenant, &self.project, &self.name] {
            if !part.is_empty() {
                write!(f, "/{part}")?;
            }
        }
        Ok(())
    }
}

/// A Kubernetes-style quantity, kept as written. Accepts a YAML/JSON string or number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[schema(value_type = String, example = "4Gi")]
pub struct Quantity(pub String);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a quantity such as 2, 500m, 512Mi or 4Gi")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl Quantity {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Quantity {
    fn from(s: &str) -> Self {
        Quantity(s.to_string())
    }
}

/// `metadata` of every object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// DNS-1123 label, unique within the object's scope.
    pub name: String,
    /// The tenant a `Project` or `OpenClawInstance` belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The project an `OpenClawInstance` belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Set by the server at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Bumped by the server on every change of `spec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// The store index of the object's last write. Sent back on update, a stale value is refused
    /// with 409 Conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<u64>,
    /// RFC 3339 time of creation, set by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "SortedMap::is_empty")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub labels: SortedMap<String, String>,
}

/// Limits on a tenant's or project's consumption.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    /// The tenant's layer of `openclaw.json`, merged over the template of each of its instances.
    #[serde(default, skip_serializing_if = "ConfigFragment::is_empty")]
    pub config: ConfigFragment,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    /// The project's layer of `openclaw.json`, merged over its tenant's.
    #[serde(default, skip_serializing_if = "ConfigFragment::is_empty")]
    pub config: ConfigFragment,
}

/// Compute limits of each replica's container.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceRequirements {
    /// Cores (`2`, `0.5`) or millicores (`500m`). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Kubernetes quantity (`512Mi`, `4Gi`). Default 2Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Process limit. Default 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    /// Hosts must carry all these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_selector: BTreeMap<String, String>,
}

fn default_replicas() -> i64 {
    1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceSpec {
    /// OpenClaw release (`2026.7.1`, `2026.7.1-2`, `2026.8.0-beta.1`); the image is
    /// `ghcr.io/openclaw/openclaw:<version>` unless `image` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Full image reference; overrides `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default = "default_replicas")]
    pub replicas: i64,
    #[serde(default)]
    pub resources: ResourceRequirements,
    /// The `ConfigTemplate` under this instance's layers; `default` when not given (and no
    /// template layer when no template of that name exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_template: Option<String>,
    /// This instance's layer of `openclaw.json`, the top one.
    #[serde(default, skip_serializing_if = "ConfigFragment::is_empty")]
    pub config: ConfigFragment,
    /// Environment variables of the Gateway container: text, or `{secretRef: {name, key}}`.
    #[serde(default, skip_serializing_if = "SortedMap::is_empty")]
    #[schema(value_type = BTreeMap<String, Object>)]
    pub env: SortedMap<String, EnvValue>,
    #[serde(default, skip_serializing_if = "is_default_placement")]
    pub placement: Placement,
    /// How replicas move to a new revision: `Rolling` (default) or `Canary`.
    #[serde(default, skip_serializing_if = "is_default_strategy")]
    pub update_strategy: UpdateStrategy,
    /// How long a Gateway gets to stop after SIGTERM before it is killed (`20s`, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period: Option<String>,
    /// What happens to replicas' state volumes on scale-down and on deletion.
    #[serde(default, skip_serializing_if = "is_default_retention")]
    pub volume_retention: VolumeRetention,
    /// What happens to replicas when their host is lost: `Manual` (the default) or
    /// `Reschedule` (see [`Failover`]).
    #[serde(default, skip_serializing_if = "Failover::is_default")]
    pub failover: Failover,
    /// What the replicas' own figures the control plane relays (see [`InstanceMetrics`]).
    #[serde(default, skip_serializing_if = "InstanceMetrics::is_default")]
    pub metrics: InstanceMetrics,
}

/// `spec.metrics`: with `gateway: true` every replica's Gateway serves its own figures (the
/// config keys `diagnostics.enabled` and `plugins.entries.diagnostics-prometheus.enabled` are
/// set over every other layer), its host's agent scrapes them with an operator token and
/// relays them, and `/metrics` serves them with `tenant`, `project`, `instance` and `replica`
/// labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceMetrics {
    /// Relay the Gateway's Prometheus figures (`/api/diagnostics/prometheus`); `false` by default.
    #[serde(default)]
    pub gateway: bool,
}

impl InstanceMetrics {
    pub fn is_default(&self) -> bool {
        *self == InstanceMetrics::default()
    }
}

fn is_default_strategy(s: &UpdateStrategy) -> bool {
    *s == UpdateStrategy::default()
}

fn is_default_retention(r: &VolumeRetention) -> bool {
    *r == VolumeRetention::default()
}

fn is_default_placement(p: &Placement) -> bool {
    p.host_selector.is_empty()
}

impl InstanceSpec {
    /// The image the agent runs.
    pub fn image_ref(&self) -> String {
        match (&self.image, &self.version) {
            (Some(image), _) => image.clone(),
            (None, Some(v)) => format!("{DEFAULT_IMAGE_REPOSITORY}:{v}"),
            (None, None) => format!("{DEFAULT_IMAGE_REPOSITORY}:latest"),
        }
    }

    /// Fills in defaulted resource limits, so the stored spec says what runs.
    pub fn apply_defaults(&mut self) {
        let r = &mut self.resources;
        r.cpu.get_or_insert_with(|| Quantity::from(DEFAULT_CPU));
        r.memory
            .get_or_insert_with(|| Quantity::from(DEFAULT_MEMORY));
        r.pids.get_or_insert(DEFAULT_PIDS);
    }

    /// CPU per replica in millicores (after validation this cannot fail; 0 if it does).
    pub fn cpu_millis(&self) -> u64 {
        let q = self
            .resources
            .cpu
            .as_ref()
            .map_or(DEFAULT_CPU, |q| q.as_str());
        super::parse_cpu(q).unwrap_or(0)
    }

    /// The stop grace period (after validation this cannot fail; the default if it does).
    pub fn termination_grace(&self) -> std::time::Duration {
        self.termination_grace_period
            .as_deref()
            .and_then(|g| super::parse_duration(g).ok())
            .unwrap_or(super::DEFAULT_TERMINATION_GRACE)
    }

    /// Memory per replica in bytes (after validation this cannot fail; 0 if it does).
    pub fn memory_bytes(&self) -> u64 {
        let q = self
            .resources
            .memory
            .as_ref()
            .map_or(DEFAULT_MEMORY, |q| q.as_str());
        super::parse_memory(q).unwrap_or(0)
    }
}

/// What a host offers, as measured by its agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostCapacity {
    pub cpu: Quantity,
    pub memory: Quantity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Quantity>,
}

impl Default for Quantity {
    fn default() -> Self {
        Quantity("0".into())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostSpec {
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub capacity: HostCapacity,
    /// When true the scheduler places no new replicas here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
}

/// A condition in the Kubernetes style.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum HostPhase {
    #[default]
    Unknown,
    Ready,
    NotReady,
}

/// Compute figures of a host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostResources {
    #[serde(default)]
    pub cpu_millis: u64,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u64>,
}

impl HostResources {
    /// What the scheduler records of a host it placed nothing on.
    pub fn nothing_placed() -> HostResources {
        HostResources {
            cpu_millis: 0,
            memory_bytes: 0,
            replicas: Some(0),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    #[serde(default)]
    pub phase: HostPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the host last turned NotReady (server clock, RFC 3339); none while Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready_since: Option<String>,
    /// What the scheduler has placed here.
    #[serde(default)]
    pub allocated: HostResources,
    /// Reported usage: CPU, memory, disk, load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub usage: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The last drain of the host (`clusterclaw drain host`), in progress or finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<super::DrainStatus>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum InstancePhase {
    #[default]
    Pending,
    Progressing,
    Running,
    Degraded,
    Failed,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ReplicaState {
    #[default]
    Pending,
    Pulling,
    Starting,
    Running,
    Ready,
    Unhealthy,
    CrashLoopBackOff,
    Failed,
    /// The replica's host stopped reporting: what the replica does now is not known.
    Unknown,
}

/// Observed state of one replica `<name>-<ordinal>`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub name: String,
    pub ordinal: u32,
    /// The host the scheduler placed the replica on; none while unschedulable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default)]
    pub state: ReplicaState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// The spec generation the replica's container runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// The config revision the replica's container runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_revision: Option<u64>,
    /// Whether the config file and environment the container really has are the ones it was
    /// given (`InSync`), or were changed on the host (`Drift`, repaired by the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sync: Option<ConfigSync>,
    /// The instance revision this replica should run (set by the rollout controller; the
    /// assignment book renders the replica from it). None until the controller first runs:
    /// then the newest revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_revision: Option<u64>,
    /// Since when the replica has been Ready without a restart (server clock, RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_since: Option<String>,
    /// Snapshots of the replica's state volume kept on its host, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    /// The replica's restart count when the rollout controller first saw it run its target
    /// revision (cleared whenever the target moves): a restart after that fails the update's
    /// gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts_at_update: Option<u32>,
    /// The placement epoch: raised every time the replica is placed (on any host). An agent
    /// runs the replica only under the newest epoch it was given; reports of older epochs are
    /// refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Set while a drain moves the replica here with its state: the agent imports the state
    /// volume of this transfer before the replica's first container here starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_from: Option<super::StateFrom>,
}

/// How a replica's real config compares with what it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ConfigSync {
    InSync,
    Drift,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    #[serde(default)]
    pub phase: InstancePhase,
    #[serde(default)]
    pub observed_generation: i64,
    #[serde(default)]
    pub replicas: i64,
    #[serde(default)]
    pub ready_replicas: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_status: Vec<ReplicaStatus>,
    /// The newest revision of the instance: what its spec, layers and secrets make now (see
    /// `GET .../instances/{name}/config/revisions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_revision: Option<u64>,
    /// Replicas whose target is the newest revision.
    #[serde(default)]
    pub updated_replicas: i64,
    /// Replicas Ready for at least `minReadySeconds`, whatever revision they run.
    #[serde(default)]
    pub available_replicas: i64,
    /// The update in progress or the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// State volumes kept on hosts after scale-down; scaling up reuses them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retained_volumes: Vec<RetainedVolume>,
}

/// Status of a tenant or project: what it consumes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScopeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub usage: Option<Value>,
}

macro_rules! object {
    ($(#[$doc:meta])* $name:ident, $kind:ident, $spec:ty, $status:ty) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            /// Always `clusterclaw.io/v1`.
            #[schema(example = "clusterclaw.io/v1")]
            pub api_version: String,
            #[schema(value_type = String)]
            pub kind: Kind,
            pub metadata: Metadata,
            #[serde(default)]
            pub spec: $spec,
            /// Written by the server; ignored on input.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<$status>,
        }
    };
}

object!(
    /// An organisation using the platform: the outer isolation boundary.
    Tenant, Tenant, TenantSpec, ScopeStatus
);
object!(
    /// A group of instances inside a tenant.
    Project, Project, ProjectSpec, ScopeStatus
);
object!(
    /// A set of OpenClaw Gateway replicas.
    OpenClawInstance, OpenClawInstance, InstanceSpec, InstanceStatus
);
object!(
    /// A machine running clusterclaw-agent; written by enrollment and heartbeats.
    Host, Host, HostSpec, HostStatus
);
object!(
    /// A named, platform-wide bottom layer of `openclaw.json`.
    ConfigTemplate, ConfigTemplate, ConfigTemplateSpec, ScopeStatus
);
object!(
    /// Values (API keys, tokens) kept encrypted, referenced from instances' env and config.
    Secret, Secret, SecretSpec, ScopeStatus
);
object!(
    /// A change moved across many instances in waves, halted at the first failed gate.
    Rollout, Rollout, RolloutSpec, WaveStatus
);

impl Rollout {
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            kind: Kind::Rollout,
            tenant: self.metadata.tenant.clone().unwrap_or_default(),
            project: String::new(),
            name: self.metadata.name.clone(),
        }
    }
}

impl Tenant {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::cluster(Kind::Tenant, &self.metadata.name)
    }
}

impl Project {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::project(
            self.metadata.tenant.as_deref().unwrap_or_default(),
            &self.metadata.name,
        )
    }
}

impl OpenClawInstance {
    pub fn key(&self) -> ObjectKey {
        let m = &self.metadata;
        ObjectKey::instance(
            m.tenant.as_deref().unwrap_or_default(),
            m.project.as_deref().unwrap_or_default(),
            &m.name,
        )
    }

    /// The parts of the instance its hosts' assignments are made from. A write that leaves
    /// this view as it was (a replica's observed state, health, restarts, readiness) changes
    /// nothing any host must run.
    pub fn assigned_view(&self) -> AssignedView<'_> {
        let m = &self.metadata;
        let status = self.status.as_ref();
        AssignedView {
            name: &m.name,
            tenant: m.tenant.as_deref(),
            project: m.project.as_deref(),
            uid: m.uid.as_deref(),
            generation: m.generation,
            spec: &self.spec,
            replicas: status
                .map(|s| s.replica_status.iter().map(PlacedReplica::of).collect())
                .unwrap_or_default(),
            retained_volumes: status.map_or(&[], |s| &s.retained_volumes),
        }
    }
}

/// What of an instance reaches its hosts: identity, spec, where each replica is placed and
/// what it targets, and the volumes kept ([`OpenClawInstance::assigned_view`]). A new input of
/// the assignments is a new field here.
#[derive(Debug, PartialEq)]
pub struct AssignedView<'a> {
    pub name: &'a str,
    pub tenant: Option<&'a str>,
    pub project: Option<&'a str>,
    pub uid: Option<&'a str>,
    pub generation: Option<i64>,
    pub spec: &'a InstanceSpec,
    pub replicas: Vec<PlacedReplica<'a>>,
    pub retained_volumes: &'a [RetainedVolume],
}

/// The desired side of one replica: its placement and target.
#[derive(Debug, PartialEq)]
pub struct PlacedReplica<'a> {
    pub name: &'a str,
    pub ordinal: u32,
    pub host: Option<&'a str>,
    pub target_revision: Option<u64>,
    pub epoch: Option<u64>,
}

impl<'a> PlacedReplica<'a> {
    fn of(r: &'a ReplicaStatus) -> Self {
        PlacedReplica {
            name: &r.name,
            ordinal: r.ordinal,
            host: r.host.as_deref(),
            target_revision: r.target_revision,
            epoch: r.epoch,
        }
    }
}

impl Host {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::cluster(Kind::Host, &self.metadata.name)
    }
}

impl ConfigTemplate {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::cluster(Kind::ConfigTemplate, &self.metadata.name)
    }
}

impl Secret {
    pub fn key(&self) -> ObjectKey {
        let m = &self.metadata;
        ObjectKey {
            kind: Kind::Secret,
            tenant: m.tenant.clone().unwrap_or_default(),
            project: m.project.clone().unwrap_or_default(),
            name: m.name.clone(),
        }
    }
}

impl Default for InstanceSpec {
    fn default() -> Self {
        InstanceSpec {
            version: None,
            image: None,
            replicas: 1,
            resources: ResourceRequirements::default(),
            config_template: None,
            config: ConfigFragment::default(),
            env: SortedMap::new(),
            placement: Placement::default(),
            update_strategy: UpdateStrategy::default(),
            termination_grace_period: None,
            volume_retention: VolumeRetention::default(),
            failover: Failover::default(),
            metrics: InstanceMetrics::default(),
        }
    }
}

/// Any object of the API.
// Instances are most of what is stored and decoded: boxing them would add an allocation to
// nearly every value for the sake of the smaller kinds.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Resource {
    Tenant(Tenant),
    Project(Project),
    OpenClawInstance(OpenClawInstance),
    Host(Host),
    ConfigTemplate(ConfigTemplate),
    Secret(Secret),
    Rollout(Rollout),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Tenant(_) => Kind::Tenant,
            Resource::Project(_) => Kind::Project,
            Resource::OpenClawInstance(_) => Kind::OpenClawInstance,
            Resource::Host(_) => Kind::Host,
            Resource::ConfigTemplate(_) => Kind::ConfigTemplate,
            Resource::Secret(_) => Kind::Secret,
            Resource::Rollout(_) => Kind::Rollout,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Tenant(o) => &o.metadata,
            Resource::Project(o) => &o.metadata,
            Resource::OpenClawInstance(o) => &o.metadata,
            Resource::Host(o) => &o.metadata,
            Resource::ConfigTemplate(o) => &o.metadata,
            Resource::Secret(o) => &o.metadata,
            Resource::Rollout(o) => &o.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut Metadata {
        match self {
            Resource::Tenant(o) => &mut o.metadata,
            Resource::Project(o) => &mut o.metadata,
            Resource::OpenClawInstance(o) => &mut o.metadata,
            Resource::Host(o) => &mut o.metadata,
            Resource::ConfigTemplate(o) => &mut o.metadata,
            Resource::Secret(o) => &mut o.metadata,
            Resource::Rollout(o) => &mut o.metadata,
        }
    }

    /// The object's identity; scope parts it does not have are empty.
    pub fn key(&self) -> ObjectKey {
        match self {
            Resource::Tenant(o) => o.key(),
            Resource::Project(o) => o.key(),
            Resource::OpenClawInstance(o) => o.key(),
            Resource::Host(o) => o.key(),
            Resource::ConfigTemplate(o) => o.key(),
            Resource::Secret(o) => o.key(),
            Resource::Rollout(o) => o.key(),
        }
    }

    /// `spec` as JSON, for change detection.
    pub fn spec_value(&self) -> Value {
        let v = match self {
            Resource::Tenant(o) => serde_json::to_value(&o.spec),
            Resource::Project(o) => serde_json::to_value(&o.spec),
            Resource::OpenClawInstance(o) => serde_json::to_value(&o.spec),
            Resource::Host(o) => serde_json::to_value(&o.spec),
            Resource::ConfigTemplate(o) => serde_json::to_value(&o.spec),
            Resource::Secret(o) => serde_json::to_value(&o.spec),
            Resource::Rollout(o) => serde_json::to_value(&o.spec),
        };
        v.unwrap_or(Value::Null)
    }

    /// `status` as JSON (`null` when unset).
    pub fn status_value(&self) -> Value {
        let v = match self {
            Resource::Tenant(o) => serde_json::to_value(&o.status),
            Resource::Project(o) => serde_json::to_value(&o.status),
            Resource::OpenClawInstance(o) => serde_json::to_value(&o.status),
            Resource::Host(o) => serde_json::to_value(&o.status),
            Resource::ConfigTemplate(o) => serde_json::to_value(&o.status),
            Resource::Secret(o) => serde_json::to_value(&o.status),
            Resource::Rollout(o) => serde_json::to_value(&o.status),
        };
        v.unwrap_or(Value::Null)
    }

    /// Drops `status` (input never sets it).
    pub fn clear_status(&mut self) {
        match self {
            Resource::Tenant(o) => o.status = None,
            Resource::Project(o) => o.status = None,
            Resource::OpenClawInstance(o) => o.status = None,
            Resource::Host(o) => o.status = None,
            Resource::ConfigTemplate(o) => o.status = None,
            Resource::Secret(o) => o.status = None,
            Resource::Rollout(o) => o.status = None,
        }
    }

    /// Defaulting done at admission, so the stored spec says what runs.
    pub fn apply_defaults(&mut self) {
        if let Resource::OpenClawInstance(o) = self {
            o.spec.apply_defaults();
        }
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Reads a manifest that has already been parsed into JSON (from YAML or JSON), checking
    /// `apiVersion` and `kind` and reporting unknown fields and wrong types with their path.
    /// This is structure only; see [`super::validate_object`] for the rules on values.
    pub fn from_value(value: Value) -> Result<Resource, Vec<FieldProblem>> {
        let Value::Object(map) = &value else {
            return Err(vec![FieldProblem::new(
                "",
                format!(
                    "a manifest must be a mapping with apiVersion, kind, metadata and spec; found {}",
                    json_type(&value)
                ),
            )]);
        };
        let mut problems = Vec::new();
        match map.get("apiVersion") {
            Some(Value::String(v)) if v == API_VERSION => {}
            Some(Value::String(v)) => problems.push(FieldProblem::new(
                "apiVersion",
                format!("{v:?} is not supported; use {API_VERSION}"),
            )),
            Some(other) => problems.push(FieldProblem::new(
                "apiVersion",
                format!(
                    "must be the string {API_VERSION}, found {}",
                    json_type(other)
                ),
            )),
            None => problems.push(FieldProblem::new(
                "apiVersion",
                format!("is required; use {API_VERSION}"),
            )),
        }
        let allowed = Kind::ALL.map(|k| k.as_str()).join(", ");
        let kind = match map.get("kind") {
            Some(Value::String(k)) => match Kind::from_manifest(k) {
                Some(kind) => Some(kind),
                None => {
                    problems.push(FieldProblem::new(
                        "kind",
                        format!("unknown kind {k:?}; the kinds are {allowed}"),
                    ));
                    None
                }
            },
            Some(other) => {
                problems.push(FieldProblem::new(
                    "kind",
                    format!("must be a string, found {}", json_type(other)),
                ));
                None
            }
            None => {
                problems.push(FieldProblem::new(
                    "kind",
                    format!("is required; one of {allowed}"),
                ));
                None
            }
        };
        let Some(kind) = kind else {
            return Err(problems);
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, Vec<FieldProblem>> {
            super::decode_typed(v).map_err(|p| vec![p])
        }
        Ok(match kind {
            Kind::Tenant => Resource::Tenant(typed(value)?),
            Kind::Project => Resource::Project(typed(value)?),
            Kind::OpenClawInstance => Resource::OpenClawInstance(typed(value)?),
            Kind::Host => Resource::Host(typed(value)?),
            Kind::ConfigTemplate => Resource::ConfigTemplate(typed(value)?),
            Kind::Secret => Resource::Secret(typed(value)?),
            Kind::Rollout => Resource::Rollout(typed(value)?),
        })
    }
}

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Resource::from_value(v).map_err(|p| {
            let msg = p
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            serde::de::Error::custom(msg)
        })
    }
}

/// Names a JSON value's type the way a person reading YAML thinks of it.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}
