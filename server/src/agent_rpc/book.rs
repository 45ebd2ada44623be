//! The assignment book: each host's replicas, rebuilt on store changes, waited on by long polls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use clusterclaw_proto::agent as pb;
use prost::Message;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::configcenter;
use crate::model::{EnvValue, Kind, OpenClawInstance, Resource};
use crate::openclaw::secretref::{self, SecretRef};
use crate::secrets::{Keyring, SecretValue};
use crate::store::{ListFilter, SealedValue, Store};
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
    /// Volumes of replicas no longer assigned here that the agent must keep.
    pub retained_volumes: Vec<pb::RetainedVolume>,
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
    /// Opens secret values; none when the server has no key file (then no instance may use
    /// secrets).
    keyring: crate::configcenter::SharedKeyring,
    /// Secret values opened by earlier rebuilds, by envelope.
    opened: Mutex<HashMap<String, (Arc<SecretValue>, String)>>,
    /// Bumped whenever any host's assignments change; 0 until the first build.
    version: watch::Sender<u64>,
    built_at: RwLock<u64>,
}

impl Default for AssignmentBook {
    fn default() -> Self {
        AssignmentBook {
            hosts: RwLock::default(),
            keyring: Arc::default(),
            opened: Mutex::default(),
            version: watch::channel(0).0,
            built_at: RwLock::new(0),
        }
    }
}

/// What assignments are made of besides the instances: each instance's current config
/// revision and the secrets' sealed values.
#[derive(Debug, Default)]
pub struct ConfigInputs {
    /// Instance uid → (revision, effective config text with secret references in place).
    pub configs: HashMap<String, (u64, String)>,
    /// (tenant, project, name, key) → sealed value.
    pub sealed: HashMap<(String, String, String, String), String>,
}

impl ConfigInputs {
    pub fn from_sealed(configs: HashMap<String, (u64, String)>, sealed: Vec<SealedValue>) -> Self {
        ConfigInputs {
            configs,
            sealed: sealed
                .into_iter()
                .map(|v| ((v.tenant, v.project, v.name, v.key), v.sealed))
                .collect(),
        }
    }
}

/// Opens secret values for assignments, remembering what it opened (by envelope).
struct Opener<'a> {
    keyring: Option<&'a Keyring>,
    inputs: &'a ConfigInputs,
    memo: &'a mut HashMap<String, (Arc<SecretValue>, String)>,
    used: HashSet<String>,
}

impl Opener<'_> {
    /// The value and fingerprint of `r` for an instance in `tenant`/`project`.
    fn open(
        &mut self,
        tenant: &str,
        project: &str,
        r: &SecretRef,
    ) -> Result<(Arc<SecretValue>, String), String> {
        for key in configcenter::secret_keys(tenant, project, r) {
            let k = (
                key.tenant.clone(),
                key.project.clone(),
                key.name.clone(),
                r.key.clone(),
            );
            let Some(sealed) = self.inputs.sealed.get(&k) else {
                continue;
            };
            self.used.insert(sealed.clone());
            if let Some(v) = self.memo.get(sealed) {
                return Ok(v.clone());
            }
            let keyring = self
                .keyring
                .ok_or_else(|| "the server has no secrets key file".to_string())?;
            let aad = crate::store::revisions::aad(&k.0, &k.1, &k.2, &k.3);
            let value = keyring
                .open(&aad, sealed)
                .map_err(|e| format!("secret {:?} key {:?}: {e}", r.name, r.key))?;
            let fingerprint = keyring.fingerprint(&value);
            let v = (Arc::new(value), fingerprint);
            self.memo.insert(sealed.clone(), v.clone());
            return Ok(v);
        }
        Err(format!("secret {:?} key {:?} not found", r.name, r.key))
    }
}

/// The config every instance gets when it has no revision yet (written before revisions
/// existed and not valid since): the built-in layer with the instance's own.
fn fallback_config(instance: &OpenClawInstance) -> String {
    let layers = configcenter::layers_of(instance, None, None, None);
    configcenter::render(&layers).to_string()
}

/// The replicas of `instance` placed on each host, as the agent receives them; an error when
/// a secret it references cannot be opened.
fn assignments_with(
    instance: &OpenClawInstance,
    inputs: &ConfigInputs,
    opener: &mut Opener<'_>,
) -> Result<Vec<(String, pb::Assignment)>, String> {
    let Some(status) = &instance.status else {
        return Ok(Vec::new());
    };
    let spec = &instance.spec;
    let m = &instance.metadata;
    let tenant = m.tenant.clone().unwrap_or_default();
    let project = m.project.clone().unwrap_or_default();
    let uid = m.uid.clone().unwrap_or_default();
    let (revision, text) = match inputs.configs.get(&uid) {
        Some((rev, text)) => (*rev, text.clone()),
        None => (0, fallback_config(instance)),
    };
    let config: Value =
        serde_json::from_str(&text).map_err(|e| format!("config revision {revision}: {e}"))?;
    // Everything that, when it changes, needs a new container; secrets by fingerprint only,
    // so that the hash (shown to every reader of the instance) tells nothing of their values.
    let mut h = Sha256::new();
    let image = spec.image_ref();
    h.update(image.as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    h.update([0]);
    let mut fingerprints = BTreeMap::new();
    let mut failure = None;
    let resolved =
        secretref::substitute(&config, &mut |r| match opener.open(&tenant, &project, r) {
            Ok((v, fp)) => {
                fingerprints.insert(format!("{}/{}", r.name, r.key), fp);
                Some(v.expose().to_string())
            }
            Err(e) => {
                failure = Some(e);
                None
            }
        });
    let resolved = match (resolved, failure) {
        (_, Some(e)) => return Err(e),
        (Err(p), None) => return Err(format!("{}: {}", p.path, p.reason)),
        (Ok(v), None) => v,
    };
    let mut env = BTreeMap::new();
    for (k, v) in &spec.env {
        h.update(k.as_bytes());
        h.update([b'=']);
        let value = match v {
            EnvValue::Plain(v) => {
                h.update(v.as_bytes());
                v.clone()
            }
            EnvValue::SecretRef(r) => {
                let (value, fp) = opener.open(&tenant, &project, r)?;
                h.update(format!("secretRef:{}/{}", r.name, r.key).as_bytes());
                fingerprints.insert(format!("{}/{}", r.name, r.key), fp);
                value.expose().to_string()
            }
        };
        h.update([0]);
        env.insert(k.clone(), value);
    }
    for (k, fp) in &fingerprints {
        h.update(k.as_bytes());
        h.update([b'=']);
        h.update(fp.as_bytes());
        h.update([0]);
    }
    let resources = pb::Resources {
        cpu_millis: spec.cpu_millis(),
        memory_bytes: spec.memory_bytes(),
        pids: spec.resources.pids.unwrap_or(crate::model::DEFAULT_PIDS) as u32,
    };
    h.update(resources.encode_to_vec());
    let config_hash = hex(&h.finalize());
    let config_json = resolved.to_string();
    let content_hash = configcenter::content_hash(config_json.as_bytes(), &env);
    Ok(status
        .replica_status
        .iter()
        .filter(|r| r.ordinal < spec.replicas as u32)
        .filter_map(|r| {
            let host = r.host.clone()?;
            Some((
                host,
                pb::Assignment {
                    tenant: tenant.clone(),
                    project: project.clone(),
                    instance: m.name.clone(),
                    replica: r.name.clone(),
                    ordinal: r.ordinal,
                    generation: m.generation.unwrap_or(1),
                    image: image.clone(),
                    env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    config_json: config_json.clone(),
                    config_hash: config_hash.clone(),
                    resources: Some(resources),
                    instance_uid: uid.clone(),
                    config_revision: revision,
                    content_hash: content_hash.clone(),
                    termination_grace_seconds: spec.termination_grace().as_secs() as u32,
                },
            ))
        })
        .collect())
}

/// [`assignments_with`] for an instance that references no secrets (tests, tools).
pub fn assignments_of(instance: &OpenClawInstance) -> Vec<(String, pb::Assignment)> {
    let inputs = ConfigInputs::default();
    let mut memo = HashMap::new();
    let mut opener = Opener {
        keyring: None,
        inputs: &inputs,
        memo: &mut memo,
        used: HashSet::new(),
    };
    assignments_with(instance, &inputs, &mut opener).unwrap_or_default()
}

impl AssignmentBook {
    /// A book that opens secrets with `keyring`.
    pub fn with_keyring(keyring: crate::configcenter::SharedKeyring) -> Self {
        AssignmentBook {
            keyring,
            ..Default::default()
        }
    }

    /// Recomputes every host's assignments from `instances`, read at store index `index`;
    /// a host whose set differs from before gets `index` as its change index.
    pub fn rebuild(&self, instances: &[OpenClawInstance], index: u64) {
        self.rebuild_with(instances, &ConfigInputs::default(), index);
    }

    /// [`AssignmentBook::rebuild`] with configs and secrets. An instance whose secrets cannot
    /// be opened keeps the assignments it had (its replicas keep running) and is logged.
    pub fn rebuild_with(&self, instances: &[OpenClawInstance], inputs: &ConfigInputs, index: u64) {
        let mut per_host: HashMap<String, Vec<pb::Assignment>> = HashMap::new();
        let mut stuck: HashSet<(String, String, String)> = HashSet::new();
        {
            let keyring = crate::configcenter::current_keyring(&self.keyring);
            let mut memo = self.opened.lock().unwrap_or_else(|e| e.into_inner());
            let mut opener = Opener {
                keyring: keyring.as_deref(),
                inputs,
                memo: &mut memo,
                used: HashSet::new(),
            };
            for inst in instances {
                match assignments_with(inst, inputs, &mut opener) {
                    Ok(list) => {
                        for (host, a) in list {
                            per_host.entry(host).or_default().push(a);
                        }
                    }
                    Err(e) => {
                        tracing::error!(instance = %inst.key(), error = %e, "cannot make this instance's assignments; its replicas keep what they run");
                        let m = &inst.metadata;
                        stuck.insert((
                            m.tenant.clone().unwrap_or_default(),
                            m.project.clone().unwrap_or_default(),
                            m.name.clone(),
                        ));
                    }
                }
            }
            let used = std::mem::take(&mut opener.used);
            memo.retain(|sealed, _| used.contains(sealed));
        }
        if !stuck.is_empty() {
            let hosts = self.hosts.read().unwrap_or_else(|e| e.into_inner());
            for (name, cur) in hosts.iter() {
                for a in &cur.assignments {
                    if stuck.contains(&(a.tenant.clone(), a.project.clone(), a.instance.clone())) {
                        per_host.entry(name.clone()).or_default().push(a.clone());
                    }
                }
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
                                retained_volumes: Vec::new(),
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
            let inputs = ConfigInputs::from_sealed(s.current_configs()?, s.sealed_values()?);
            b.rebuild_with(&instances, &inputs, index);
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
    fn an_instance_without_a_revision_runs_its_own_layer_over_the_gateway_defaults() {
        let mut i = inst("bot", 1, &[Some("h1")], "1Gi");
        i.spec.config =
            serde_json::from_value(serde_json::json!({"gateway": {"auth": {"mode": "token"}}}))
                .unwrap();
        let a = assignments_of(&i);
        let v: Value = serde_json::from_str(&a[0].1.config_json).unwrap();
        assert_eq!(v["gateway"]["port"], 18789);
        assert_eq!(v["gateway"]["auth"]["mode"], "token");
        assert_eq!(a[0].1.config_revision, 0);
        assert_eq!(a[0].1.content_hash.len(), 64);
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

    /// A book whose keyring is in `dir`, with `value` sealed as tenant `t`'s secret
    /// `llm/anthropic`.
    fn sealed_inputs(dir: &std::path::Path, value: &str) -> (Arc<Keyring>, ConfigInputs) {
        let keyring = Arc::new(Keyring::load_or_create(&dir.join("secrets.key")).unwrap());
        let aad = crate::store::revisions::aad("t", "", "llm", "anthropic");
        let sealed = keyring
            .seal(&aad, &SecretValue::new(value.to_string()))
            .unwrap();
        let inputs = ConfigInputs::from_sealed(
            HashMap::new(),
            vec![SealedValue {
                tenant: "t".into(),
                project: String::new(),
                name: "llm".into(),
                key: "anthropic".into(),
                sealed,
            }],
        );
        (keyring, inputs)
    }

    #[test]
    fn secrets_reach_only_the_hosts_of_replicas_that_use_them() {
        let dir = tempfile::tempdir().unwrap();
        let (keyring, inputs) = sealed_inputs(dir.path(), "sk-one");
        let book = AssignmentBook::with_keyring(Arc::new(RwLock::new(Some(keyring))));
        let mut user = inst("bot", 1, &[Some("h1")], "1Gi");
        user.spec.env.insert(
            "ANTHROPIC_API_KEY".into(),
            EnvValue::SecretRef(SecretRef {
                name: "llm".into(),
                key: "anthropic".into(),
            }),
        );
        user.spec.config = serde_json::from_value(serde_json::json!({
            "models": {"providers": {"anthropic": {"apiKey": {"secretRef": {"name": "llm", "key": "anthropic"}}}}}
        }))
        .unwrap();
        let other = inst("plain", 1, &[Some("h2")], "1Gi");
        book.rebuild_with(&[user.clone(), other.clone()], &inputs, 2);
        let h1 = book.current("h1");
        let a = &h1.assignments[0];
        assert_eq!(a.env["ANTHROPIC_API_KEY"], "sk-one");
        let config: Value = serde_json::from_str(&a.config_json).unwrap();
        assert_eq!(
            config["models"]["providers"]["anthropic"]["apiKey"],
            "sk-one"
        );
        assert!(!a.config_hash.contains("sk-one"));
        let h2 = book.current("h2");
        assert!(
            !format!("{:?}", h2.assignments).contains("sk-one"),
            "a host without a user of the secret never receives it"
        );
        // A new value replaces the replicas that use it, and only those.
        let before = (a.config_hash.clone(), h2.assignments[0].config_hash.clone());
        let (keyring2, inputs2) = sealed_inputs(dir.path(), "sk-two");
        let book2 = AssignmentBook::with_keyring(Arc::new(RwLock::new(Some(keyring2))));
        book2.rebuild_with(&[user, other], &inputs2, 3);
        assert_ne!(book2.current("h1").assignments[0].config_hash, before.0);
        assert_eq!(book2.current("h2").assignments[0].config_hash, before.1);
    }

    #[test]
    fn an_instance_whose_secret_cannot_be_opened_keeps_its_assignments() {
        let dir = tempfile::tempdir().unwrap();
        let (keyring, inputs) = sealed_inputs(dir.path(), "sk-one");
        let shared = Arc::new(RwLock::new(Some(keyring)));
        let book = AssignmentBook::with_keyring(shared.clone());
        let mut user = inst("bot", 1, &[Some("h1")], "1Gi");
        user.spec.env.insert(
            "K".into(),
            EnvValue::SecretRef(SecretRef {
                name: "llm".into(),
                key: "anthropic".into(),
            }),
        );
        book.rebuild_with(std::slice::from_ref(&user), &inputs, 2);
        assert_eq!(book.current("h1").assignments.len(), 1);
        // The key file is lost: the replica keeps what it was given instead of being removed.
        *shared.write().unwrap() = None;
        let book_without = &book;
        book_without.opened.lock().unwrap().clear();
        book_without.rebuild_with(&[user], &inputs, 3);
        let h1 = book.current("h1");
        assert_eq!(h1.assignments.len(), 1);
        assert_eq!(h1.assignments[0].env["K"], "sk-one");
    }
}
