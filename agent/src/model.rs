//! The agent's own view of its work: assignments, replica identities, replica states and statuses.
//!
//! Generated protocol types are converted into these at the edge (`TryFrom<proto::Assignment>`,
//! `to_proto`), so the rest of the agent never depends on the wire format.

use std::collections::BTreeMap;
use std::fmt;

use clusterclaw_proto::agent as proto;
use serde::{Deserialize, Serialize};

/// Identity of one replica on a host: names are unique per tenant and project.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaKey {
    pub tenant: String,
    pub project: String,
    /// `<instance>-<ordinal>`.
    pub replica: String,
}

impl ReplicaKey {
    pub fn new(
        tenant: impl Into<String>,
        project: impl Into<String>,
        replica: impl Into<String>,
    ) -> Self {
        ReplicaKey {
            tenant: tenant.into(),
            project: project.into(),
            replica: replica.into(),
        }
    }
}

impl fmt::Display for ReplicaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.project, self.replica)
    }
}

/// Limits a replica's container runs under; zero means "no limit" (pids: the default limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in thousandths of a core.
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pids: u32,
}

/// One replica the host must run, as the control plane assigned it.
///
/// `env`, `config_json` and `redact` hold secrets: `Debug` shows env names and sizes only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub tenant: String,
    pub project: String,
    pub instance: String,
    pub replica: String,
    pub ordinal: u32,
    pub generation: i64,
    pub image: String,
    pub env: BTreeMap<String, String>,
    /// The rendered `openclaw.json`.
    pub config_json: String,
    /// Hex SHA-256 of everything that, when changed, requires a new container.
    pub config_hash: String,
    pub resources: Resources,
    pub instance_uid: String,
    /// The instance's config revision `config_json` is (0 from servers without revisions).
    #[serde(default)]
    pub config_revision: u64,
    /// What the container must really have: lowercase hex [`crate::drift::content_hash`] of
    /// `config_json` and `env`; empty from servers without it (then drift is not checked).
    #[serde(default)]
    pub content_hash: String,
    /// Seconds the Gateway gets between SIGTERM and SIGKILL (0: the agent's default).
    #[serde(default)]
    pub termination_grace_seconds: u32,
    /// The placement epoch (0 from servers without epochs): the agent runs the replica only
    /// under the newest epoch it was given.
    #[serde(default)]
    pub epoch: u64,
    /// Seconds without reaching the control plane after which the replica is stopped; 0 keeps
    /// it running.
    #[serde(default)]
    pub stop_after_seconds: u32,
    /// Set while a drain moves the replica here with its state: the transfer whose state
    /// volume is imported before the replica's first container here starts.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub import_transfer: String,
    /// The secret values the replica was given, which its streamed output never shows.
    #[serde(default)]
    pub redact: Vec<String>,
}

impl Assignment {
    pub fn key(&self) -> ReplicaKey {
        ReplicaKey::new(&self.tenant, &self.project, &self.replica)
    }

    /// How long a stop of its container waits after SIGTERM: its own grace period, or
    /// `default` when the control plane sent none.
    pub fn stop_grace(&self, default: std::time::Duration) -> std::time::Duration {
        match self.termination_grace_seconds {
            0 => default,
            n => std::time::Duration::from_secs(u64::from(n)),
        }
    }
}

/// A state volume the control plane wants kept although no assignment of this host uses it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RetainedVolume {
    pub tenant: String,
    pub project: String,
    pub instance: String,
    pub replica: String,
    #[serde(default)]
    pub instance_uid: String,
}

impl RetainedVolume {
    pub fn key(&self) -> ReplicaKey {
        ReplicaKey::new(&self.tenant, &self.project, &self.replica)
    }
}

impl From<proto::RetainedVolume> for RetainedVolume {
    fn from(v: proto::RetainedVolume) -> Self {
        RetainedVolume {
            tenant: v.tenant,
            project: v.project,
            instance: v.instance,
            replica: v.replica,
            instance_uid: v.instance_uid,
        }
    }
}

impl fmt::Debug for Assignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Assignment")
            .field("tenant", &self.tenant)
            .field("project", &self.project)
            .field("instance", &self.instance)
            .field("replica", &self.replica)
            .field("ordinal", &self.ordinal)
            .field("generation", &self.generation)
            .field("image", &self.image)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field(
                "config_json",
                &format_args!("<{} bytes>", self.config_json.len()),
            )
            .field("config_hash", &self.config_hash)
            .field("resources", &self.resources)
            .field("instance_uid", &self.instance_uid)
            .field("config_revision", &self.config_revision)
            .field("content_hash", &self.content_hash)
            .field("termination_grace_seconds", &self.termination_grace_seconds)
            .field("redact", &format_args!("<{} values>", self.redact.len()))
            .finish()
    }
}

/// Why an assignment from the control plane cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("assignment {replica:?}: field `{field}` {problem}")]
pub struct AssignmentError {
    pub replica: String,
    pub field: &'static str,
    pub problem: String,
}

/// Whether `name` is a DNS-1123 label: 1 to 63 of `a-z`, `0-9`, `-`, not starting or ending with `-`.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl TryFrom<proto::Assignment> for Assignment {
    type Error = AssignmentError;

    fn try_from(a: proto::Assignment) -> Result<Self, Self::Error> {
        let fail = |field: &'static str, problem: &str| AssignmentError {
            replica: a.replica.clone(),
            field,
            problem: problem.to_owned(),
        };
        for (field, value) in [
            ("tenant", &a.tenant),
            ("project", &a.project),
            ("instance", &a.instance),
            ("replica", &a.replica),
        ] {
            if !is_dns_label(value) {
                return Err(fail(
                    field,
                    "must be a DNS-1123 label (1-63 of a-z, 0-9, '-', no leading or trailing '-')",
                ));
            }
        }
        if a.image.trim().is_empty() {
            return Err(fail("image", "must not be empty"));
        }
        if a.config_hash.is_empty() || !a.config_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(fail("config_hash", "must be a hex digest"));
        }
        if !(a.content_hash.is_empty()
            || (a.content_hash.len() == 64
                && a.content_hash.bytes().all(|b| b.is_ascii_hexdigit())))
        {
            return Err(fail(
                "content_hash",
                "must be empty or a SHA-256 digest (64 hex digits)",
            ));
        }
        if let Err(err) = serde_json::from_str::<serde_json::Value>(&a.config_json) {
            return Err(fail("config_json", &format!("is not valid JSON: {err}")));
        }
        if let Some(name) = a.env.keys().find(|k| !is_env_name(k)) {
            return Err(fail(
                "env",
                &format!("has an invalid variable name {name:?} (letters, digits, '_')"),
            ));
        }
        let resources = a.resources.unwrap_or_default();
        Ok(Assignment {
            env: a.env.clone().into_iter().collect(),
            resources: Resources {
                cpu_millis: resources.cpu_millis,
                memory_bytes: resources.memory_bytes,
                pids: resources.pids,
            },
            tenant: a.tenant,
            project: a.project,
            instance: a.instance,
            replica: a.replica,
            ordinal: a.ordinal,
            generation: a.generation,
            image: a.image,
            config_json: a.config_json,
            config_hash: a.config_hash,
            instance_uid: a.instance_uid,
            config_revision: a.config_revision,
            content_hash: a.content_hash.to_ascii_lowercase(),
            termination_grace_seconds: a.termination_grace_seconds,
            epoch: a.epoch,
            stop_after_seconds: a.stop_after_seconds,
            import_transfer: a.import_transfer,
            redact: a.redact,
        })
    }
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Where a replica is in its life, as reported to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicaState {
    /// Assigned, no container yet.
    Pending,
    /// The image is being pulled.
    Pulling,
    /// The container runs but has not answered its liveness probe yet.
    Starting,
    /// Live, not (yet) ready.
    Running,
    /// Live and ready.
    Ready,
    /// Liveness probes fail.
    Unhealthy,
    /// The container keeps exiting or failing; the next restart waits for a back-off delay.
    CrashLoopBackOff,
    /// It cannot run as assigned (for example the image cannot be pulled); see the message.
    Failed,
}

impl ReplicaState {
    pub fn to_proto(self) -> proto::ReplicaState {
        match self {
            ReplicaState::Pending => proto::ReplicaState::Pending,
            ReplicaState::Pulling => proto::ReplicaState::Pulling,
            ReplicaState::Starting => proto::ReplicaState::Starting,
            ReplicaState::Running => proto::ReplicaState::Running,
            ReplicaState::Ready => proto::ReplicaState::Ready,
            ReplicaState::Unhealthy => proto::ReplicaState::Unhealthy,
            ReplicaState::CrashLoopBackOff => proto::ReplicaState::CrashLoopBackOff,
            ReplicaState::Failed => proto::ReplicaState::Failed,
        }
    }
}

/// Resource use of one container, sampled from the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ContainerStats {
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub block_read_bytes: u64,
    pub block_write_bytes: u64,
}

impl ContainerStats {
    pub fn to_proto(&self) -> proto::ContainerStats {
        proto::ContainerStats {
            cpu_percent: self.cpu_percent,
            memory_bytes: self.memory_bytes,
            memory_limit_bytes: self.memory_limit_bytes,
            net_rx_bytes: self.net_rx_bytes,
            net_tx_bytes: self.net_tx_bytes,
            block_read_bytes: self.block_read_bytes,
            block_write_bytes: self.block_write_bytes,
        }
    }
}

/// What the agent reports about one assigned replica.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStatus {
    pub tenant: String,
    pub project: String,
    pub instance: String,
    pub replica: String,
    pub ordinal: u32,
    pub generation: i64,
    pub state: ReplicaState,
    pub message: String,
    pub container_id: Option<String>,
    pub restarts: u32,
    pub host_port: Option<u16>,
    /// The config hash of the container that runs (empty when none does).
    pub config_hash: String,
    pub stats: Option<ContainerStats>,
    /// The config revision of the container that runs, from its label (0 when none does); a
    /// container with exactly the assignment's content runs the assignment's revision.
    pub config_revision: u64,
    /// The content hash last measured on the running container (empty when not known).
    pub observed_content_hash: String,
    /// Snapshots of its state volume on this host, newest first.
    pub snapshots: Vec<crate::snapshot::SnapshotMeta>,
    /// The placement epoch its container runs under.
    pub epoch: u64,
}

impl ReplicaStatus {
    pub fn key(&self) -> ReplicaKey {
        ReplicaKey::new(&self.tenant, &self.project, &self.replica)
    }

    pub fn to_proto(&self) -> proto::ReplicaStatus {
        proto::ReplicaStatus {
            tenant: self.tenant.clone(),
            project: self.project.clone(),
            instance: self.instance.clone(),
            replica: self.replica.clone(),
            ordinal: self.ordinal,
            generation: self.generation,
            state: self.state.to_proto() as i32,
            message: self.message.clone(),
            container_id: self.container_id.clone().unwrap_or_default(),
            restarts: self.restarts,
            host_port: self.host_port.map(u32::from).unwrap_or_default(),
            config_hash: self.config_hash.clone(),
            stats: self.stats.as_ref().map(ContainerStats::to_proto),
            config_revision: self.config_revision,
            observed_content_hash: self.observed_content_hash.clone(),
            snapshots: self
                .snapshots
                .iter()
                .map(crate::snapshot::SnapshotMeta::to_proto)
                .collect(),
            epoch: self.epoch,
            gateway_metrics: None,
        }
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Builders for assignments used across the agent's unit tests.

    use super::*;

    impl Assignment {
        /// A valid assignment of `tenant-a/project-a/<replica>` with a fixed config, at config
        /// revision 1 with its content hash.
        pub fn test(replica: &str) -> Assignment {
            let (instance, ordinal) = replica
                .rsplit_once('-')
                .and_then(|(i, o)| Some((i.to_owned(), o.parse().ok()?)))
                .unwrap_or_else(|| (replica.to_owned(), 0));
            Assignment {
                tenant: "tenant-a".into(),
                project: "project-a".into(),
                instance,
                replica: replica.into(),
                ordinal,
                generation: 1,
                image: "example/openclaw:2026.7.1".into(),
                env: BTreeMap::new(),
                config_json: "{}".into(),
                config_hash: "aa".repeat(32),
                resources: Resources {
                    cpu_millis: 1000,
                    memory_bytes: 512 << 20,
                    pids: 0,
                },
                instance_uid: format!("uid-{replica}"),
                config_revision: 1,
                content_hash: crate::drift::content_hash(b"{}", &BTreeMap::new()),
                termination_grace_seconds: 0,
                epoch: 0,
                stop_after_seconds: 0,
                import_transfer: String::new(),
                redact: Vec::new(),
            }
        }

        /// A new config at `revision`, with its content hash (the config hash is left alone).
        pub fn config(mut self, json: &str, revision: u64) -> Self {
            self.config_json = json.into();
            self.config_revision = revision;
            self.content_hash = crate::drift::content_hash(json.as_bytes(), &self.env);
            self
        }

        /// Sets an environment variable, keeping the content hash right.
        pub fn env(mut self, name: &str, value: &str) -> Self {
            self.env.insert(name.into(), value.into());
            self.content_hash = crate::drift::content_hash(self.config_json.as_bytes(), &self.env);
            self
        }

        pub fn tenant(mut self, tenant: &str) -> Self {
            self.tenant = tenant.into();
            self
        }

        pub fn generation(mut self, generation: i64) -> Self {
            self.generation = generation;
            self
        }

        pub fn config_hash(mut self, hash: &str) -> Self {
            self.config_hash = hash.into();
            self
        }

        pub fn image(mut self, image: &str) -> Self {
            self.image = image.into();
            self
        }

        pub fn grace(mut self, seconds: u32) -> Self {
            self.termination_grace_seconds = seconds;
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> proto::Assignment {
        proto::Assignment {
            tenant: "acme".into(),
            project: "helpdesk".into(),
            instance: "support-bot".into(),
            replica: "support-bot-0".into(),
            ordinal: 0,
            generation: 4,
            image: "registry.example/openclaw/openclaw:2026.7.1".into(),
            env: [("OPENCLAW_GATEWAY_TOKEN".to_owned(), "s3cret".to_owned())].into(),
            config_json: r#"{"gateway":{"bind":"lan"}}"#.into(),
            config_hash: "ab12".into(),
            resources: Some(proto::Resources {
                cpu_millis: 2000,
                memory_bytes: 2 << 30,
                pids: 256,
            }),
            instance_uid: "u-1".into(),
            config_revision: 3,
            content_hash: "AB".repeat(32),
            termination_grace_seconds: 0,
            epoch: 0,
            stop_after_seconds: 0,
            import_transfer: String::new(),
            redact: vec!["sk-in-config".into()],
        }
    }

    #[test]
    fn converts_a_valid_assignment() {
        let a = Assignment::try_from(wire()).expect("valid");
        assert_eq!(
            a.key(),
            ReplicaKey::new("acme", "helpdesk", "support-bot-0")
        );
        assert_eq!(a.resources.cpu_millis, 2000);
        assert_eq!(a.resources.pids, 256);
        assert_eq!(a.env["OPENCLAW_GATEWAY_TOKEN"], "s3cret");
        assert_eq!(a.config_revision, 3);
        assert_eq!(a.content_hash, "ab".repeat(32), "normalised to lowercase");
        assert_eq!(a.redact, ["sk-in-config"]);
        assert!(!format!("{a:?}").contains("sk-in-config"), "{a:?}");

        // An older server sends no content hash: accepted, drift is not checked.
        let old = proto::Assignment {
            content_hash: String::new(),
            config_revision: 0,
            ..wire()
        };
        assert_eq!(Assignment::try_from(old).expect("valid").content_hash, "");
    }

    #[test]
    fn rejects_bad_fields_naming_the_field() {
        type Breaker = fn(&mut proto::Assignment);
        let cases: [(&str, Breaker); 8] = [
            ("tenant", |a| a.tenant = "Acme".into()),
            ("content_hash", |a| a.content_hash = "ab12".into()),
            ("content_hash", |a| a.content_hash = "zz".repeat(32)),
            ("content_hash", |a| a.content_hash = "a".repeat(65)),
            ("replica", |a| a.replica = "bot-0-".into()),
            ("image", |a| a.image = " ".into()),
            ("config_json", |a| a.config_json = "{".into()),
            ("env", |a| {
                a.env.insert("BAD-NAME".into(), "x".into());
            }),
        ];
        for (field, break_it) in cases {
            let mut a = wire();
            break_it(&mut a);
            let err = Assignment::try_from(a).expect_err(field);
            assert_eq!(err.field, field);
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let a = Assignment::try_from(wire()).expect("valid");
        let shown = format!("{a:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains("lan"), "{shown}");
        assert!(shown.contains("OPENCLAW_GATEWAY_TOKEN"));
        assert!(shown.contains("config_revision: 3"), "{shown}");
    }

    #[test]
    fn replica_status_sends_revision_and_observed_hash() {
        let a = Assignment::try_from(wire()).expect("valid");
        let status = ReplicaStatus {
            tenant: a.tenant.clone(),
            project: a.project.clone(),
            instance: a.instance.clone(),
            replica: a.replica.clone(),
            ordinal: 0,
            generation: 4,
            state: ReplicaState::Ready,
            message: String::new(),
            container_id: Some("c1".into()),
            restarts: 0,
            host_port: Some(19100),
            config_hash: "ab12".into(),
            stats: None,
            config_revision: 3,
            observed_content_hash: "cd".repeat(32),
            snapshots: Vec::new(),
            epoch: 0,
        };
        let wire = status.to_proto();
        assert_eq!(wire.config_revision, 3);
        assert_eq!(wire.observed_content_hash, "cd".repeat(32));
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("support-bot-0"));
        for bad in ["", "-a", "a-", "A", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
    }
}
