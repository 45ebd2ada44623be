//! The assignment book: each host's replicas, rebuilt on store changes, waited on by long polls.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clusterclaw_proto::agent as pb;
use prost::Message;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::model::{Kind, OpenClawInstance, Resource};
use crate::store::{ListFilter, Store};
use crate::util::hex;

/// How long a burst of store changes is coalesced before the book is rebuilt.
const REBUILD_DEBOUNCE: Duration = Duration::from_millis(5);
/// Pause after a failed rebuild.
const REBUILD_RETRY: Duration = Duration::from_secs(1);

/// One host's assignments and the store index at which they last changed.
#[derive(Debug, Default)]
pub struct HostAssignments {
    pub index: u64,
    digest: [u8; 32],
    pub assignments: Vec<pb::Assignment>,
}

/// What a long poll ends with.
#[derive(Debug)]
pub enum Wait {
    Changed(Arc<HostAssignments>),
    NoChange,
}

/// Every host's assignments, kept in memory so that waiting polls read no database.
pub struct AssignmentBook {
    hosts: RwLock<HashMap<String, Arc<HostAssignments>>>,
    /// Bumped whenever any host's assignments change; 0 until the first build.
    version: watch::Sender<u64>,
    built_at: RwLock<u64>,
}

impl Default for AssignmentBook {
    fn default() -> Self {
        AssignmentBook {
            hosts: RwLock::default(),
            version: watch::channel(0).0,
            built_at: RwLock::new(0),
        }
    }
}

/// The `openclaw.json` an instance's replicas run: the Gateway's container settings, with the
/// instance's `spec.config` merged over them.
pub fn render_config(config: &Map<String, Value>) -> Value {
    let mut base = json!({"gateway": {"port": 18789, "bind": "lan"}});
    merge(&mut base, &Value::Object(config.clone()));
    base
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The replicas of `instance` placed on each host, as the agent receives them.
pub fn assignments_of(instance: &OpenClawInstance) -> Vec<(String, pb::Assignment)> {
    let Some(status) = &instance.status else {
        return Vec::new();
    };
    let spec = &instance.spec;
    let m = &instance.metadata;
    let config_json = render_config(&spec.config).to_string();
    let resources = pb::Resources {
        cpu_millis: spec.cpu_millis(),
        memory_bytes: spec.memory_bytes(),
        pids: spec.resources.pids.unwrap_or(crate::model::DEFAULT_PIDS) as u32,
    };
    let image = spec.image_ref();
    // Everything that, when it changes, needs a new container.
    let mut h = Sha256::new();
    h.update(image.as_bytes());
    h.update([0]);
    h.update(config_json.as_bytes());
    h.update([0]);
    for (k, v) in &spec.env {
        h.update(k.as_bytes());
        h.update([b'=']);
        h.update(v.as_bytes());
        h.update([0]);
    }
    h.update(resources.encode_to_vec());
    let config_hash = hex(&h.finalize());
    status
        .replica_status
        .iter()
        .filter(|r| r.ordinal < spec.replicas as u32)
        .filter_map(|r| {
            let host = r.host.clone()?;
            Some((
                host,
                pb::Assignment {
                    tenant: m.tenant.clone().unwrap_or_default(),
                    project: m.project.clone().unwrap_or_default(),
                    instance: m.name.clone(),
                    replica: r.name.clone(),
                    ordinal: r.ordinal,
                    generation: m.generation.unwrap_or(1),
                    image: image.clone(),
                    env: spec
                        .env
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    config_json: config_json.clone(),
                    config_hash: config_hash.clone(),
                    resources: Some(resources),
                    instance_uid: m.uid.clone().unwrap_or_default(),
                    ..Default::default()
                },
            ))
        })
        .collect()
}

impl AssignmentBook {
    /// Recomputes every host's assignments from `instances`, read at store index `index`;
    /// a host whose set differs from before gets `index` as its change index.
    pub fn rebuild(&self, instances: &[OpenClawInstance], index: u64) {
        let mut per_host: HashMap<String, Vec<pb::Assignment>> = HashMap::new();
        for inst in instances {
            for (host, a) in assignments_of(inst) {
                per_host.entry(host).or_default().push(a);
            }
        }
        let mut changed = false;
        {
            let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
            let previous: Vec<String> = hosts.keys().cloned().collect();
            for name in previous {
                per_host.entry(name).or_default();
            }
            for (name, mut list) in per_host {
                list.sort_by(|a, b| {
                    (&a.tenant, &a.project, &a.instance, a.ordinal).cmp(&(
                        &b.tenant,
                        &b.project,
                        &b.instance,
                        b.ordinal,
                    ))
                });
                let mut h = Sha256::new();
                for a in &list {
                    h.update(a.encode_to_vec());
                }
                let digest: [u8; 32] = h.finalize().into();
                match hosts.get(&name) {
                    Some(cur) if cur.digest == digest => {}
                    _ => {
                        changed = true;
                        if list.is_empty() && !hosts.contains_key(&name) {
                            continue;
                        }
                        hosts.insert(
                            name,
                            Arc::new(HostAssignments {
                                index,
                                digest,
                                assignments: list,
                            }),
                        );
                    }
                }
            }
        }
        let first = {
            let mut built = self.built_at.write().unwrap_or_else(|e| e.into_inner());
            let first = *built == 0;
            *built = index.max(1);
            first
        };
        if changed || first {
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// The host's current assignments (empty, at the book's first build index, if it has none).
    pub fn current(&self, host: &str) -> Arc<HostAssignments> {
        let hosts = self.hosts.read().unwrap_or_else(|e| e.into_inner());
        match hosts.get(host) {
            Some(a) => a.clone(),
            None => Arc::new(HostAssignments {
                index: 1,
                ..Default::default()
            }),
        }
    }

    /// Long poll: returns at once when the host's assignments are at another index than
    /// `known` (0 means "I know nothing"), else waits for a change up to `wait`.
    pub async fn wait(&self, host: &str, known: u64, wait: Duration) -> Wait {
        let mut rx = self.version.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if *rx.borrow_and_update() > 0 {
                let cur = self.current(host);
                if known == 0 || cur.index != known {
                    return Wait::Changed(cur);
                }
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Wait::NoChange },
                _ = tokio::time::sleep_until(deadline) => return Wait::NoChange,
            }
        }
    }
}

/// Keeps the book current: rebuilds it after every store change, until `shutdown` flips.
pub async fn run(
    store: Arc<dyn Store>,
    book: Arc<AssignmentBook>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = store.subscribe();
    loop {
        let index = store.index();
        let (s, b) = (store.clone(), book.clone());
        // Reading and decoding every instance is CPU work: it runs on the blocking pool, and
        // each raw object is dropped as soon as it is decoded.
        let rebuilt = tokio::task::spawn_blocking(move || {
            let objects = s.list(&ListFilter::all(Kind::OpenClawInstance))?;
            let instances: Vec<OpenClawInstance> = objects
                .into_iter()
                .filter_map(|o| match o.resource() {
                    Ok(Resource::OpenClawInstance(i)) => Some(i),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping an undecodable instance");
                        None
                    }
                })
                .collect();
            b.rebuild(&instances, index);
            Ok::<(), crate::store::StoreError>(())
        })
        .await;
        match rebuilt {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not read instances for the assignment book; retrying");
                tokio::time::sleep(REBUILD_RETRY).await;
                continue;
            }
            Err(e) => tracing::error!(error = %e, "assignment book rebuild panicked"),
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
        tokio::time::sleep(REBUILD_DEBOUNCE).await;
        changes.borrow_and_update();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{InstanceSpec, InstanceStatus, Metadata, ReplicaStatus};

    fn inst(name: &str, replicas: i64, hosts: &[Option<&str>], memory: &str) -> OpenClawInstance {
        OpenClawInstance {
            api_version: crate::model::API_VERSION.into(),
            kind: Kind::OpenClawInstance,
            metadata: Metadata {
                name: name.into(),
                tenant: Some("t".into()),
                project: Some("p".into()),
                generation: Some(1),
                ..Default::default()
            },
            spec: InstanceSpec {
                version: Some("2026.7.1".into()),
                replicas,
                resources: crate::model::ResourceRequirements {
                    memory: Some(memory.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            status: Some(InstanceStatus {
                replica_status: hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| ReplicaStatus {
                        name: format!("{name}-{i}"),
                        ordinal: i as u32,
                        host: h.map(Into::into),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn config_is_merged_over_gateway_defaults() {
        let mut c = Map::new();
        c.insert("gateway".into(), json!({"auth": {"mode": "token"}}));
        c.insert("agents".into(), json!({"x": 1}));
        let v = render_config(&c);
        assert_eq!(v["gateway"]["port"], 18789);
        assert_eq!(v["gateway"]["auth"]["mode"], "token");
        assert_eq!(v["agents"]["x"], 1);
    }

    #[test]
    fn hash_changes_with_what_needs_a_new_container() {
        let a = assignments_of(&inst("bot", 1, &[Some("h1")], "1Gi"));
        let b = assignments_of(&inst("bot", 2, &[Some("h1")], "1Gi"));
        let c = assignments_of(&inst("bot", 1, &[Some("h1")], "2Gi"));
        assert_eq!(
            a[0].1.config_hash, b[0].1.config_hash,
            "scaling does not replace containers"
        );
        assert_ne!(a[0].1.config_hash, c[0].1.config_hash);
        assert_eq!(a[0].1.resources.unwrap().memory_bytes, 1 << 30);
    }

    #[tokio::test(start_paused = true)]
    async fn long_poll_answers_on_change_and_times_out_otherwise() {
        let book = Arc::new(AssignmentBook::default());
        book.rebuild(&[inst("bot", 2, &[Some("h1"), Some("h2")], "1Gi")], 3);
        let Wait::Changed(first) = book.wait("h1", 0, Duration::from_secs(60)).await else {
            panic!()
        };
        assert_eq!((first.index, first.assignments.len()), (3, 1));
        assert!(matches!(
            book.wait("h1", 3, Duration::from_secs(30)).await,
            Wait::NoChange
        ));
        // Unrelated change elsewhere: h1 keeps its index.
        book.rebuild(
            &[
                inst("bot", 2, &[Some("h1"), Some("h2")], "1Gi"),
                inst("x", 1, &[Some("h2")], "1Gi"),
            ],
            4,
        );
        assert_eq!(book.current("h1").index, 3);
        let waiter = {
            let book = book.clone();
            tokio::spawn(async move { book.wait("h1", 3, Duration::from_secs(300)).await })
        };
        tokio::task::yield_now().await;
        book.rebuild(&[inst("bot", 1, &[Some("h1"), Some("h2")], "2Gi")], 5);
        let Wait::Changed(next) = waiter.await.unwrap() else {
            panic!("the change was not delivered")
        };
        assert_eq!(next.index, 5);
        // bot-1 (ordinal 1) is beyond replicas=1 and is no longer assigned to h2.
        assert!(book.current("h2").assignments.is_empty());
        assert_eq!(book.current("h2").index, 5);
        assert_eq!(book.current("nobody").assignments.len(), 0);
    }
}
