//! Which engine objects are this agent's: its cluster's id and its host uid on their labels, or a pre-upgrade object it adopted once.
//!
//! The rules, in order:
//!
//! 1. An object is looked at only if it carries `io.clusterclaw.managed=true` and this host's
//!    name in `io.clusterclaw.host` (what the engine is asked to list).
//! 2. It is this agent's when its `io.clusterclaw.cluster` and `io.clusterclaw.host-uid` labels
//!    both equal the agent's own: the cluster id (a hash of the cluster CA) and the uid the
//!    control plane gave the host at enrollment. Two clusters, or two enrollments of one
//!    cluster, sharing an engine and a host name therefore never act on each other's objects,
//!    and the names they give new objects differ too ([`Owner::name_tag`]).
//! 3. An object made before these labels existed (managed and host name, but neither cluster
//!    nor host-uid label) is *legacy*. Legacy objects are adopted once, at the first start of an
//!    agent that knows the labels, and only those that the agent's own saved assignments
//!    (`state.json` in its data directory, saved for this host name) account for: a container or
//!    volume of a saved replica, or a network of a saved replica's tenant, with exactly the name
//!    the old agent gave it. The choice is written to `ownership.json` in the data directory and
//!    never widened afterwards, so another cluster's agent on the same engine (whose data
//!    directory knows nothing of them) never adopts them, and an agent never adopts a legacy
//!    object that appears later. Adopted objects keep running as they are (no restart); a
//!    replica's adopted state volume and its tenant's adopted network are used by the
//!    containers that later replace the adopted one.
//! 4. Anything else is left alone, whatever its name.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Labelled, ObservedContainer, ObservedNetwork, ObservedVolume, labels, spec};
use crate::model::ReplicaKey;
use crate::state::SavedState;

/// How the engine identifies an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectRef<'a> {
    /// A container, by id.
    Container(&'a str),
    /// A volume, by name.
    Volume(&'a str),
    /// A network, by name.
    Network(&'a str),
}

/// Pre-upgrade objects an agent adopted (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyObjects {
    /// Container ids.
    pub containers: BTreeSet<String>,
    /// Volume names.
    pub volumes: BTreeSet<String>,
    /// Network names.
    pub networks: BTreeSet<String>,
}

impl LegacyObjects {
    pub fn contains(&self, object: ObjectRef<'_>) -> bool {
        match object {
            ObjectRef::Container(id) => self.containers.contains(id),
            ObjectRef::Volume(name) => self.volumes.contains(name),
            ObjectRef::Network(name) => self.networks.contains(name),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.volumes.is_empty() && self.networks.is_empty()
    }

    /// Decides which legacy objects are this agent's (rule 3): only those its own saved
    /// assignments account for, under the names the old agent gave them. Pure.
    pub fn decide(
        host_name: &str,
        saved: Option<&SavedState>,
        containers: &[ObservedContainer],
        volumes: &[ObservedVolume],
        networks: &[ObservedNetwork],
    ) -> LegacyObjects {
        let mut out = LegacyObjects::default();
        let Some(saved) = saved.filter(|s| s.host_id == host_name) else {
            return out;
        };
        let replicas: BTreeSet<ReplicaKey> = saved.assignments.iter().map(|a| a.key()).collect();
        let tenants: BTreeSet<&str> = saved
            .assignments
            .iter()
            .map(|a| a.tenant.as_str())
            .collect();
        let legacy = |o: &dyn Labelled| is_legacy(o, host_name);
        for c in containers.iter().filter(|c| legacy(*c)) {
            if let Some(key) = c.replica_key()
                && replicas.contains(&key)
                && c.name == spec::legacy_container_name(host_name, &key)
            {
                out.containers.insert(c.id.clone());
            }
        }
        for v in volumes.iter().filter(|v| legacy(*v)) {
            if let Some(key) = v.replica_key()
                && replicas.contains(&key)
                && v.name == spec::legacy_volume_name(host_name, &key)
            {
                out.volumes.insert(v.name.clone());
            }
        }
        for n in networks.iter().filter(|n| legacy(*n)) {
            if let Some(tenant) = n.label(labels::TENANT)
                && tenants.contains(tenant)
                && n.name == spec::legacy_network_name(host_name, tenant)
            {
                out.networks.insert(n.name.clone());
            }
        }
        out
    }
}

/// Managed, this host name, and neither a cluster nor a host-uid label.
fn is_legacy(o: &dyn Labelled, host_name: &str) -> bool {
    o.managed_by(host_name)
        && o.label(labels::CLUSTER).is_none()
        && o.label(labels::HOST_UID).is_none()
}

/// This agent's identity on the engine: what it labels its objects with and what it acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    host_name: String,
    cluster_id: String,
    host_uid: String,
    legacy: Arc<LegacyObjects>,
}

impl Owner {
    /// The owner for a host `host_name` with uid `host_uid` in the cluster `cluster_id`.
    pub fn new(
        host_name: impl Into<String>,
        cluster_id: impl Into<String>,
        host_uid: impl Into<String>,
    ) -> Self {
        Owner {
            host_name: host_name.into(),
            cluster_id: cluster_id.into(),
            host_uid: host_uid.into(),
            legacy: Arc::default(),
        }
    }

    /// The same owner, with these adopted legacy objects.
    pub fn with_legacy(mut self, legacy: LegacyObjects) -> Self {
        self.legacy = Arc::new(legacy);
        self
    }

    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    pub fn host_uid(&self) -> &str {
        &self.host_uid
    }

    pub fn legacy(&self) -> &LegacyObjects {
        &self.legacy
    }

    /// Whether the agent may act on `o` (the rules of the module documentation).
    pub fn owns(&self, o: &(impl Labelled + ?Sized)) -> bool {
        if !o.managed_by(&self.host_name) {
            return false;
        }
        match (o.label(labels::CLUSTER), o.label(labels::HOST_UID)) {
            (Some(cluster), Some(uid)) => cluster == self.cluster_id && uid == self.host_uid,
            (None, None) => self.legacy.contains(o.object_ref()),
            (Some(_), None) | (None, Some(_)) => false,
        }
    }

    /// Eight hex digits naming this owner's objects on the engine: a hash of cluster id, host
    /// uid and host name, so that no two owners' names collide on one engine.
    pub fn name_tag(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.cluster_id, &self.host_uid, &self.host_name] {
            h.update(part.as_bytes());
            h.update(b"\n");
        }
        hex8(&h.finalize())
    }
}

/// An owner known by host name only, with empty cluster id and host uid (tests, embedding).
impl From<&str> for Owner {
    fn from(host_name: &str) -> Self {
        Owner::new(host_name, "", "")
    }
}

impl From<&String> for Owner {
    fn from(host_name: &String) -> Self {
        Owner::new(host_name.as_str(), "", "")
    }
}

pub(crate) fn hex8(digest: &[u8]) -> String {
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Assignment;
    use crate::runtime::ContainerStatus;

    fn container(id: &str, name: String, labels: BTreeSet<(&str, &str)>) -> ObservedContainer {
        ObservedContainer {
            id: id.into(),
            name,
            image: "img".into(),
            labels: labels
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            status: ContainerStatus::Running,
            started_at: None,
            host_port: None,
            engine_restarts: 0,
            env: None,
        }
    }

    fn legacy_labels<'a>(host: &'a str, key: &'a ReplicaKey) -> BTreeSet<(&'a str, &'a str)> {
        BTreeSet::from([
            (labels::MANAGED, labels::MANAGED_VALUE),
            (labels::HOST, host),
            (labels::TENANT, key.tenant.as_str()),
            (labels::PROJECT, key.project.as_str()),
            (labels::REPLICA, key.replica.as_str()),
        ])
    }

    #[test]
    fn both_labels_must_be_ours() {
        let me = Owner::new("node-1", "c1", "u1");
        let a = Assignment::test("bot-0");
        let mine = container("a", spec::container_name(&me, &a.key()), BTreeSet::new());
        let mut mine = mine;
        mine.labels = spec::container_labels(&me, &a);
        assert!(me.owns(&mine));
        for (other, why) in [
            (Owner::new("node-1", "c2", "u1"), "another cluster"),
            (Owner::new("node-1", "c1", "u2"), "another enrollment"),
            (Owner::new("node-2", "c1", "u1"), "another host name"),
        ] {
            assert!(!other.owns(&mine), "{why}");
        }
        let mut half = mine.clone();
        half.labels.remove(labels::HOST_UID);
        assert!(
            !me.owns(&half),
            "a cluster label without a host uid is nobody's"
        );
        let mut unmanaged = mine.clone();
        unmanaged.labels.remove(labels::MANAGED);
        assert!(!me.owns(&unmanaged));
    }

    #[test]
    fn names_differ_per_cluster_and_enrollment() {
        let key = ReplicaKey::new("acme", "helpdesk", "bot-0");
        let a = Owner::new("node-1", "c1", "u1");
        let b = Owner::new("node-1", "c2", "u1");
        let c = Owner::new("node-1", "c1", "u2");
        let names: BTreeSet<String> = [&a, &b, &c]
            .iter()
            .flat_map(|o| {
                [
                    spec::container_name(o, &key),
                    spec::volume_name(o, &key),
                    spec::network_name(o, "acme"),
                ]
            })
            .collect();
        assert_eq!(names.len(), 9, "{names:?}");
        assert!(!names.contains(&spec::legacy_container_name("node-1", &key)));
        assert!(!names.contains(&spec::legacy_volume_name("node-1", &key)));
    }

    #[test]
    fn legacy_objects_are_adopted_only_when_the_saved_state_knows_them() {
        let a = Assignment::test("bot-0");
        let key = a.key();
        let gone = ReplicaKey::new(&a.tenant, &a.project, "bot-9");
        let known = container(
            "c-known",
            spec::legacy_container_name("node-1", &key),
            legacy_labels("node-1", &key),
        );
        let unknown = container(
            "c-unknown",
            spec::legacy_container_name("node-1", &gone),
            legacy_labels("node-1", &gone),
        );
        let renamed = container(
            "c-renamed",
            "someone-else".into(),
            legacy_labels("node-1", &key),
        );
        let volume = ObservedVolume {
            name: spec::legacy_volume_name("node-1", &key),
            labels: known.labels.clone(),
        };
        let network = ObservedNetwork {
            id: "n1".into(),
            name: spec::legacy_network_name("node-1", &a.tenant),
            labels: [
                (labels::MANAGED.to_owned(), labels::MANAGED_VALUE.to_owned()),
                (labels::HOST.to_owned(), "node-1".to_owned()),
                (labels::TENANT.to_owned(), a.tenant.clone()),
            ]
            .into(),
        };
        let containers = [known.clone(), unknown.clone(), renamed.clone()];
        let saved = SavedState::new("node-1", 3, vec![a.clone()]);

        let legacy = LegacyObjects::decide(
            "node-1",
            Some(&saved),
            &containers,
            std::slice::from_ref(&volume),
            std::slice::from_ref(&network),
        );
        assert_eq!(legacy.containers, BTreeSet::from(["c-known".to_owned()]));
        assert_eq!(legacy.volumes, BTreeSet::from([volume.name.clone()]));
        assert_eq!(legacy.networks, BTreeSet::from([network.name.clone()]));
        let me = Owner::new("node-1", "c1", "u1").with_legacy(legacy);
        assert!(me.owns(&known) && me.owns(&volume) && me.owns(&network));
        assert!(!me.owns(&unknown) && !me.owns(&renamed));

        // Another agent on the engine with the same host name but no saved state of its own
        // (a second cluster) adopts nothing.
        let fresh = LegacyObjects::decide(
            "node-1",
            None,
            &containers,
            std::slice::from_ref(&volume),
            &[],
        );
        assert!(fresh.is_empty());
        // Nor does a saved state made for another host name.
        let other = SavedState::new("node-2", 3, vec![a]);
        assert!(
            LegacyObjects::decide("node-1", Some(&other), &containers, &[volume], &[]).is_empty()
        );
        let stranger = Owner::new("node-1", "c2", "u9");
        assert!(!stranger.owns(&known), "not adopted, not owned");
    }
}
