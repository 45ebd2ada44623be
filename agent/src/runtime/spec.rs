//! How an assignment becomes a container: names, labels and OpenClaw's hardened container settings.
//!
//! Every replica runs as uid 1000 with all capabilities dropped, `no-new-privileges`, a
//! read-only root filesystem, a `/tmp` tmpfs with mode 1777, memory/CPU/pids limits, its
//! rendered config bind-mounted read-only at [`CONFIG_PATH`], its own named volume at
//! [`STATE_DIR`], its tenant's bridge network, and the Gateway port published on 127.0.0.1 only.
//!
//! The state volume: a new named volume is created empty and owned by root. The engine copies
//! the image's content at the mount point into an empty volume on first mount, ownership
//! included, so an image in which `/home/node/.openclaw` exists and belongs to 1000:1000 yields a
//! volume the Gateway can write to. The container cannot fix ownership itself (it runs as uid
//! 1000 on a read-only root filesystem), so images run this way must ship that directory.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{
    BindMount, ContainerSpec, NetworkSpec, Owner, PortPublish, VolumeMount, VolumeSpec, labels,
};
use crate::model::{Assignment, ReplicaKey};

/// The port the Gateway listens on inside its container.
pub const GATEWAY_PORT: u16 = 18789;
/// Where the rendered config is mounted.
pub const CONFIG_PATH: &str = "/etc/openclaw/openclaw.json";
/// Where the Gateway keeps its state (sessions, workspace, SQLite database).
pub const STATE_DIR: &str = "/home/node/.openclaw";
/// The user the Gateway runs as.
pub const CONTAINER_USER: &str = "1000:1000";
/// Numeric uid and gid of [`CONTAINER_USER`].
pub const CONTAINER_UID: u32 = 1000;
pub const CONTAINER_GID: u32 = 1000;
/// Pids limit when the assignment gives none.
pub const DEFAULT_PIDS_LIMIT: u32 = 512;
/// How long a stop waits after SIGTERM before killing.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(20);
/// Share of the memory limit given to V8's old generation (`--max-old-space-size`), in percent.
pub const NODE_HEAP_PERCENT: u64 = 75;
/// Prefix of every name the agent gives to containers, volumes and networks.
pub const NAME_PREFIX: &str = "clusterclaw";

/// Eight hex digits of a host name: the tag of names given before objects carried the cluster's
/// id (see [`legacy_container_name`]).
pub fn legacy_host_tag(host_name: &str) -> String {
    super::owner::hex8(&Sha256::digest(host_name.as_bytes()))
}

/// `clusterclaw-<tenant>-<project>-<replica>-<owner tag>` (see [`Owner::name_tag`]).
pub fn container_name(owner: &Owner, key: &ReplicaKey) -> String {
    replica_object_name(key, &owner.name_tag())
}

fn replica_object_name(key: &ReplicaKey, tag: &str) -> String {
    format!(
        "{NAME_PREFIX}-{}-{}-{}-{tag}",
        key.tenant, key.project, key.replica
    )
}

/// The replica's state volume; same shape as [`container_name`], with a `-state` suffix.
pub fn volume_name(owner: &Owner, key: &ReplicaKey) -> String {
    format!("{}-state", container_name(owner, key))
}

/// `clusterclaw-<tenant>-<owner tag>`: one bridge network per tenant.
pub fn network_name(owner: &Owner, tenant: &str) -> String {
    format!("{NAME_PREFIX}-{tenant}-{}", owner.name_tag())
}

/// The name agents gave a replica's container before objects carried the cluster's id: the
/// tag was a hash of the host name alone, so two clusters' agents with one host name collided.
pub fn legacy_container_name(host_name: &str, key: &ReplicaKey) -> String {
    replica_object_name(key, &legacy_host_tag(host_name))
}

/// The pre-upgrade name of a replica's state volume.
pub fn legacy_volume_name(host_name: &str, key: &ReplicaKey) -> String {
    format!("{}-state", legacy_container_name(host_name, key))
}

/// The pre-upgrade name of a tenant's network.
pub fn legacy_network_name(host_name: &str, tenant: &str) -> String {
    format!("{NAME_PREFIX}-{tenant}-{}", legacy_host_tag(host_name))
}

/// Labels of the container running `a` on this host.
pub fn container_labels(owner: &Owner, a: &Assignment) -> BTreeMap<String, String> {
    let mut out = replica_labels(owner, &a.key());
    out.insert(labels::INSTANCE.into(), a.instance.clone());
    out.insert(labels::GENERATION.into(), a.generation.to_string());
    out.insert(labels::CONFIG_HASH.into(), a.config_hash.clone());
    out.insert(
        labels::CONFIG_REVISION.into(),
        a.config_revision.to_string(),
    );
    out.insert(labels::CONTENT_HASH.into(), a.content_hash.clone());
    if a.epoch > 0 {
        out.insert(labels::EPOCH.into(), a.epoch.to_string());
    }
    out
}

/// Labels of everything belonging to one replica (its container and its volume).
pub fn replica_labels(owner: &Owner, key: &ReplicaKey) -> BTreeMap<String, String> {
    let mut out = base_labels(owner);
    out.insert(labels::TENANT.into(), key.tenant.clone());
    out.insert(labels::PROJECT.into(), key.project.clone());
    out.insert(labels::REPLICA.into(), key.replica.clone());
    out
}

/// The managed label, the host name, the cluster id and the host uid.
fn base_labels(owner: &Owner) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::MANAGED.into(), labels::MANAGED_VALUE.into()),
        (labels::HOST.into(), owner.host_name().into()),
        (labels::CLUSTER.into(), owner.cluster_id().into()),
        (labels::HOST_UID.into(), owner.host_uid().into()),
    ])
}

/// A new state volume for `a` (an existing one of the replica is used instead: see
/// [`crate::reconcile`]).
pub fn volume_spec(owner: &Owner, a: &Assignment) -> VolumeSpec {
    let key = a.key();
    let mut labels = replica_labels(owner, &key);
    labels.insert(labels::INSTANCE.into(), a.instance.clone());
    VolumeSpec {
        name: volume_name(owner, &key),
        labels,
    }
}

pub fn network_spec(owner: &Owner, tenant: &str) -> NetworkSpec {
    let mut labels = base_labels(owner);
    labels.insert(labels::TENANT.into(), tenant.into());
    NetworkSpec {
        name: network_name(owner, tenant),
        labels,
    }
}

/// `NODE_OPTIONS` for a memory limit: the assignment's own value with
/// `--max-old-space-size=<75% of the limit in MiB>` appended, unless the assignment already
/// sizes the heap itself. No limit, no change.
pub fn node_options(user_value: Option<&str>, memory_bytes: u64) -> Option<String> {
    let user = user_value.map(str::trim).filter(|v| !v.is_empty());
    if memory_bytes == 0 || user.is_some_and(|v| v.contains("--max-old-space-size")) {
        return user.map(str::to_owned);
    }
    let heap_mib = (memory_bytes >> 20) * NODE_HEAP_PERCENT / 100;
    let flag = format!("--max-old-space-size={}", heap_mib.max(1));
    Some(match user {
        Some(user) => format!("{user} {flag}"),
        None => flag,
    })
}

/// The environment the container of `a` gets: the assignment's variables, `NODE_OPTIONS` sized
/// for the memory limit (see [`node_options`]; removed when that leaves it empty), and the
/// agent's own `OPENCLAW_CONFIG_PATH`, `OPENCLAW_CONFIG_READONLY` and `HOME`, which win over the
/// assignment's.
pub fn container_env(a: &Assignment) -> BTreeMap<String, String> {
    let mut env = a.env.clone();
    match node_options(
        a.env.get("NODE_OPTIONS").map(String::as_str),
        a.resources.memory_bytes,
    ) {
        Some(value) => env.insert("NODE_OPTIONS".into(), value),
        None => env.remove("NODE_OPTIONS"),
    };
    env.insert("OPENCLAW_CONFIG_PATH".into(), CONFIG_PATH.into());
    env.insert("OPENCLAW_CONFIG_READONLY".into(), "1".into());
    env.insert("HOME".into(), "/home/node".into());
    env
}

/// Where a new container's state, network and config come from.
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    pub config_file: &'a Path,
    /// The replica's state volume.
    pub volume: &'a str,
    /// Its tenant's network.
    pub network: &'a str,
}

/// The container that runs `a` on this host, publishing the Gateway on `127.0.0.1:host_port`,
/// with the rendered config, state volume and network of `placement`.
pub fn container_spec(
    owner: &Owner,
    a: &Assignment,
    placement: &Placement<'_>,
    host_port: u16,
    stop_grace: Duration,
) -> ContainerSpec {
    let key = a.key();
    let pids = match a.resources.pids {
        0 => DEFAULT_PIDS_LIMIT,
        n => n,
    };
    ContainerSpec {
        name: container_name(owner, &key),
        image: a.image.clone(),
        labels: {
            let mut labels = container_labels(owner, a);
            labels.insert(labels::STOP_GRACE.into(), stop_grace.as_secs().to_string());
            labels.insert(labels::IMAGE.into(), a.image.clone());
            labels
        },
        env: {
            let mut env = container_env(a);
            if let Some(token) = crate::gateway::injected_token(a) {
                env.insert(crate::gateway::TOKEN_VAR.into(), token);
            }
            env
        },
        user: CONTAINER_USER.into(),
        read_only_rootfs: true,
        cap_drop: vec!["ALL".into()],
        no_new_privileges: true,
        tmpfs: BTreeMap::from([("/tmp".into(), "rw,nosuid,nodev,mode=1777".into())]),
        memory_bytes: (a.resources.memory_bytes > 0).then_some(a.resources.memory_bytes),
        nano_cpus: (a.resources.cpu_millis > 0).then_some(a.resources.cpu_millis * 1_000_000),
        pids_limit: Some(i64::from(pids)),
        network: Some(placement.network.to_owned()),
        volumes: vec![VolumeMount {
            volume: placement.volume.to_owned(),
            target: STATE_DIR.into(),
            read_only: false,
        }],
        binds: vec![BindMount {
            source: placement.config_file.to_path_buf(),
            target: CONFIG_PATH.into(),
            read_only: true,
        }],
        publish: Some(PortPublish {
            container_port: GATEWAY_PORT,
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host_port,
        }),
        stop_grace,
        init: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_options_gets_three_quarters_of_the_limit() {
        assert_eq!(
            node_options(None, 2 << 30).as_deref(),
            Some("--max-old-space-size=1536")
        );
        assert_eq!(
            node_options(Some("--enable-source-maps"), 512 << 20).as_deref(),
            Some("--enable-source-maps --max-old-space-size=384")
        );
        assert_eq!(
            node_options(Some("--max-old-space-size=100"), 2 << 30).as_deref(),
            Some("--max-old-space-size=100")
        );
        assert_eq!(node_options(None, 0), None);
        assert_eq!(node_options(Some("--x"), 0).as_deref(), Some("--x"));
    }

    #[test]
    fn spec_has_the_hardened_defaults() {
        let mut a = Assignment::test("bot-0");
        a.env.insert("ANTHROPIC_API_KEY".into(), "sk-secret".into());
        let owner = Owner::new("host-1", "c0ffee", "uid-1");
        let spec = container_spec(
            &owner,
            &a,
            &Placement {
                config_file: Path::new("/var/lib/x/openclaw.json"),
                volume: "vol",
                network: "net",
            },
            19100,
            DEFAULT_STOP_GRACE,
        );
        assert_eq!(spec.user, "1000:1000");
        assert!(spec.read_only_rootfs && spec.no_new_privileges);
        assert_eq!(spec.cap_drop, ["ALL"]);
        assert!(spec.tmpfs["/tmp"].contains("mode=1777"));
        assert_eq!(spec.memory_bytes, Some(512 << 20));
        assert_eq!(spec.nano_cpus, Some(1_000_000_000));
        assert_eq!(spec.pids_limit, Some(512));
        assert_eq!(spec.env["NODE_OPTIONS"], "--max-old-space-size=384");
        assert_eq!(spec.env["OPENCLAW_CONFIG_PATH"], CONFIG_PATH);
        assert_eq!(spec.env["OPENCLAW_CONFIG_READONLY"], "1");
        assert_eq!(spec.env["ANTHROPIC_API_KEY"], "sk-secret");
        assert!(
            !spec.env.contains_key(crate::gateway::TOKEN_VAR),
            "no token without the Gateway figures"
        );
        a.config_json = r#"{"diagnostics":{"enabled":true},"plugins":{"entries":{"diagnostics-prometheus":{"enabled":true}}}}"#.into();
        let with = container_spec(
            &owner,
            &a,
            &Placement {
                config_file: Path::new("/var/lib/x/openclaw.json"),
                volume: "vol",
                network: "net",
            },
            19100,
            DEFAULT_STOP_GRACE,
        );
        assert_eq!(
            with.env.get(crate::gateway::TOKEN_VAR),
            crate::gateway::scrape_token(&a).as_ref(),
            "the container gets the token the agent scrapes with"
        );
        assert_eq!(spec.volumes[0].target, STATE_DIR);
        assert!(spec.binds[0].read_only);
        let publish = spec.publish.expect("published");
        assert_eq!(publish.host_ip.to_string(), "127.0.0.1");
        assert_eq!((publish.container_port, publish.host_port), (18789, 19100));
        assert_eq!(spec.labels[labels::MANAGED], "true");
        assert_eq!(spec.labels[labels::HOST], "host-1");
        assert_eq!(spec.labels[labels::CLUSTER], "c0ffee");
        assert_eq!(spec.labels[labels::HOST_UID], "uid-1");
        assert_eq!(spec.name, container_name(&owner, &a.key()));
        assert_eq!(
            (spec.volumes[0].volume.as_str(), spec.network.as_deref()),
            ("vol", Some("net"))
        );
        assert_eq!(spec.labels[labels::REPLICA], "bot-0");
        assert_eq!(spec.labels[labels::INSTANCE], "bot");
        assert_eq!(spec.labels[labels::GENERATION], "1");
        assert_eq!(spec.labels[labels::CONFIG_HASH], a.config_hash);
        assert_eq!(spec.labels[labels::CONFIG_REVISION], "1");
        assert_eq!(spec.labels[labels::CONTENT_HASH], a.content_hash);
        assert!(!format!("{spec:?}").contains("sk-secret"));
    }

    #[test]
    fn names_are_per_host_and_valid_for_the_engine() {
        let key = ReplicaKey::new("acme", "helpdesk", "bot-0");
        let host_a = Owner::from("host-a");
        let a = container_name(&host_a, &key);
        assert!(a.starts_with("clusterclaw-acme-helpdesk-bot-0-"));
        assert_ne!(a, container_name(&Owner::from("host-b"), &key));
        assert_eq!(volume_name(&host_a, &key), format!("{a}-state"));
        // The names agents gave before the cluster labels, which adoption recognises.
        assert_eq!(
            legacy_container_name("host-a", &key),
            format!(
                "clusterclaw-acme-helpdesk-bot-0-{}",
                legacy_host_tag("host-a")
            )
        );
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        );
    }
}
