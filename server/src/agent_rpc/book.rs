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
use crate::model::{EnvValue, Kind, OpenClawInstance, Resource, RetentionPolicy};
use crate::openclaw::secretref::{self, SecretRef};
use crate::secrets::{Keyring, SecretValue};
use crate::store::revisions::{DeletedVolume, RevisionContent, RevisionSecret};
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

/// What assignments are made of besides the instances: the revisions replicas run, the
/// secrets' sealed values, and the volumes kept of deleted instances.
#[derive(Debug, Default)]
pub struct ConfigInputs {
    /// Instance uid → (revision, effective config text with secret references in place):
    /// the newest config of instances whose revisions are not loaded in full.
    pub configs: HashMap<String, (u64, String)>,
    /// (tenant, project, name, key) → sealed value, as the secret holds it now.
    pub sealed: HashMap<(String, String, String, String), String>,
    /// Instance uid → its newest revision.
    pub newest: HashMap<String, u64>,
    /// (instance uid, revision) → what its replicas run: the newest revision of each
    /// instance and every revision a replica targets.
    pub revisions: HashMap<(String, u64), RevisionContent>,
    /// Volumes kept of deleted instances.
    pub deleted_volumes: Vec<DeletedVolume>,
}

impl ConfigInputs {
    pub fn from_sealed(configs: HashMap<String, (u64, String)>, sealed: Vec<SealedValue>) -> Self {
        ConfigInputs {
            configs,
            sealed: sealed
                .into_iter()
                .map(|v| ((v.tenant, v.project, v.name, v.key), v.sealed))
                .collect(),
            ..Default::default()
        }
    }

    /// Adds revisions (and takes the newest of each instance among them as its newest, unless
    /// a newer one is known).
    pub fn with_revisions(mut self, revisions: Vec<RevisionContent>) -> Self {
        for r in revisions {
            let newest = self.newest.entry(r.uid.clone()).or_insert(r.revision);
            *newest = (*newest).max(r.revision);
            self.revisions.insert((r.uid.clone(), r.revision), r);
        }
        self
    }

    /// The `(instance uid, revision)` pairs the replicas of `instances` run: each instance's
    /// newest revision and every replica's target.
    pub fn wanted(
        instances: &[OpenClawInstance],
        newest: &HashMap<String, u64>,
    ) -> Vec<(String, u64)> {
        let mut wanted: std::collections::BTreeSet<(String, u64)> =
            newest.iter().map(|(u, n)| (u.clone(), *n)).collect();
        for i in instances {
            let (Some(uid), Some(status)) = (&i.metadata.uid, &i.status) else {
                continue;
            };
            for r in &status.replica_status {
                if let Some(t) = r.target_revision {
                    wanted.insert((uid.clone(), t));
                }
            }
        }
        wanted.into_iter().collect()
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
    /// The value and fingerprint of `r` for an instance in `tenant`/`project`: the value
    /// the revision holds (`held`), else the secret's current one.
    fn open(
        &mut self,
        tenant: &str,
        project: &str,
        r: &SecretRef,
        held: &[RevisionSecret],
    ) -> Result<(Arc<SecretValue>, String), String> {
        for key in configcenter::secret_keys(tenant, project, r) {
            let k = (
                key.tenant.clone(),
                key.project.clone(),
                key.name.clone(),
                r.key.clone(),
            );
            let kept = held.iter().find(|s| {
                !s.sealed.is_empty()
                    && (&s.tenant, &s.project, &s.name, &s.key) == (&k.0, &k.1, &k.2, &k.3)
            });
            let Some(sealed) = kept
                .map(|s| &s.sealed)
                .or_else(|| self.inputs.sealed.get(&k))
            else {
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

/// What the replicas of one revision get, rendered once for all of them.
struct Rendered {
    revision: u64,
    image: String,
    env: BTreeMap<String, String>,
    config_json: String,
    config_hash: String,
    resources: pb::Resources,
    content_hash: String,
}

/// Renders revision `revision` of `instance` (0: none recorded, the instance's own layer
/// over the defaults). Whatever the revision did not record comes from the current spec.
fn render_revision(
    instance: &OpenClawInstance,
    revision: u64,
    content: Option<&RevisionContent>,
    config_text: Option<&str>,
    opener: &mut Opener<'_>,
) -> Result<Rendered, String> {
    let spec = &instance.spec;
    let m = &instance.metadata;
    let tenant = m.tenant.clone().unwrap_or_default();
    let project = m.project.clone().unwrap_or_default();
    let text = match (content, config_text) {
        (Some(c), _) => c.config.clone(),
        (None, Some(t)) => t.to_string(),
        (None, None) => fallback_config(instance),
    };
    let held: &[RevisionSecret] = content.map_or(&[], |c| &c.secrets);
    let image = content
        .and_then(|c| c.image.clone())
        .unwrap_or_else(|| spec.image_ref());
    let env_spec = content.and_then(|c| c.env.as_ref()).unwrap_or(&spec.env);
    let resources = match content.and_then(|c| c.resources) {
        Some(r) => pb::Resources {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            pids: r.pids,
        },
        None => pb::Resources {
            cpu_millis: spec.cpu_millis(),
            memory_bytes: spec.memory_bytes(),
            pids: spec.resources.pids.unwrap_or(crate::model::DEFAULT_PIDS) as u32,
        },
    };
    let config: Value =
        serde_json::from_str(&text).map_err(|e| format!("config revision {revision}: {e}"))?;
    // Everything that, when it changes, needs a new container; secrets by fingerprint only,
    // so that the hash (shown to every reader of the instance) tells nothing of their values.
    let mut h = Sha256::new();
    h.update(image.as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    h.update([0]);
    let mut fingerprints = BTreeMap::new();
    let mut failure = None;
    let resolved = secretref::substitute(&config, &mut |r| match opener
        .open(&tenant, &project, r, held)
    {
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
    for (k, v) in env_spec {
        h.update(k.as_bytes());
        h.update([b'=']);
        let value = match v {
            EnvValue::Plain(v) => {
                h.update(v.as_bytes());
                v.clone()
            }
            EnvValue::SecretRef(r) => {
                let (value, fp) = opener.open(&tenant, &project, r, held)?;
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
    h.update(resources.encode_to_vec());
    let config_hash = hex(&h.finalize());
    let config_json = resolved.to_string();
    let content_hash = configcenter::content_hash(config_json.as_bytes(), &env);
    Ok(Rendered {
        revision,
        image,
        env,
        config_json,
        config_hash,
        resources,
        content_hash,
    })
}

/// The replicas of `instance` placed on each host, as the agent receives them, each rendered
/// from the revision it targets (none: the newest); an error when a secret it references
/// cannot be opened.
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
    let newest_text = inputs.configs.get(&uid);
    let newest = inputs
        .newest
        .get(&uid)
        .copied()
        .or(newest_text.map(|(n, _)| *n))
        .unwrap_or(0);
    let mut rendered: BTreeMap<u64, Rendered> = BTreeMap::new();
    let mut out = Vec::new();
    for r in status
        .replica_status
        .iter()
        .filter(|r| r.ordinal < spec.replicas as u32)
    {
        let Some(host) = r.host.clone() else {
            continue;
        };
        let mut revision = r.target_revision.unwrap_or(newest);
        if revision != newest && !inputs.revisions.contains_key(&(uid.clone(), revision)) {
            tracing::warn!(instance = %instance.key(), replica = %r.name, revision, "the revision this replica targets is not stored; it gets the newest");
            revision = newest;
        }
        let v = match rendered.entry(revision) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let content = inputs.revisions.get(&(uid.clone(), revision));
                let text = newest_text
                    .filter(|(n, _)| *n == revision)
                    .map(|(_, t)| t.as_str());
                e.insert(render_revision(instance, revision, content, text, opener)?)
            }
        };
        out.push((
            host,
            pb::Assignment {
                tenant: tenant.clone(),
                project: project.clone(),
                instance: m.name.clone(),
                replica: r.name.clone(),
                ordinal: r.ordinal,
                generation: m.generation.unwrap_or(1),
                image: v.image.clone(),
                env: v.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                config_json: v.config_json.clone(),
                config_hash: v.config_hash.clone(),
                resources: Some(v.resources),
                instance_uid: uid.clone(),
                config_revision: v.revision,
                content_hash: v.content_hash.clone(),
                termination_grace_seconds: spec.termination_grace().as_secs() as u32,
            },
        ));
    }
    Ok(out)
}

/// The volumes each host must keep although no replica of theirs is assigned: those of
/// scale-downs with `whenScaled: Retain` and those of instances deleted with
/// `whenDeleted: Retain`.
fn retained_by_host(
    instances: &[OpenClawInstance],
    deleted: &[DeletedVolume],
) -> HashMap<String, Vec<pb::RetainedVolume>> {
    let mut out: HashMap<String, Vec<pb::RetainedVolume>> = HashMap::new();
    for i in instances {
        if i.spec.volume_retention.when_scaled != RetentionPolicy::Retain {
            continue;
        }
        let Some(status) = &i.status else { continue };
        let m = &i.metadata;
        // Replicas a scale-down just removed, which the scheduler has not yet moved into
        // `retainedVolumes`: their assignments go with this very spec change, so their volumes
        // must be kept from the same answer on.
        let removed = status
            .replica_status
            .iter()
            .filter(|r| i64::from(r.ordinal) >= i.spec.replicas)
            .filter_map(|r| Some((r.host.clone()?, r.name.clone())));
        let listed = status
            .retained_volumes
            .iter()
            .map(|v| (v.host.clone(), v.replica.clone()));
        for (host, replica) in listed.chain(removed) {
            out.entry(host).or_default().push(pb::RetainedVolume {
                tenant: m.tenant.clone().unwrap_or_default(),
                project: m.project.clone().unwrap_or_default(),
                instance: m.name.clone(),
                replica,
                instance_uid: m.uid.clone().unwrap_or_default(),
            });
        }
    }
    for v in deleted {
        out.entry(v.host.clone())
            .or_default()
            .push(pb::RetainedVolume {
                tenant: v.tenant.clone(),
                project: v.project.clone(),
                instance: v.instance.clone(),
                replica: v.replica.clone(),
                instance_uid: v.instance_uid.clone(),
            });
    }
    for list in out.values_mut() {
        list.sort_by(|a, b| {
            (
                &a.tenant,
                &a.project,
                &a.instance,
                &a.replica,
                &a.instance_uid,
            )
                .cmp(&(
                    &b.tenant,
                    &b.project,
                    &b.instance,
                    &b.replica,
                    &b.instance_uid,
                ))
        });
        list.dedup();
    }
    out
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
        let mut retained = retained_by_host(instances, &inputs.deleted_volumes);
        let mut changed = false;
        {
            let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
            let previous: Vec<String> = hosts.keys().cloned().collect();
            for name in previous.into_iter().chain(retained.keys().cloned()) {
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
                let kept = retained.remove(&name).unwrap_or_default();
                let mut h = Sha256::new();
                for a in &list {
                    h.update(a.encode_to_vec());
                }
                // The retained volumes are part of what the host is told: a change to them
                // moves its index too.
                h.update(b"retained\0");
                for v in &kept {
                    h.update(v.encode_to_vec());
                }
                let digest: [u8; 32] = h.finalize().into();
                match hosts.get(&name) {
                    Some(cur) if cur.digest == digest => {}
                    _ => {
                        changed = true;
                        if list.is_empty() && kept.is_empty() && !hosts.contains_key(&name) {
                            continue;
                        }
                        hosts.insert(
                            name,
                            Arc::new(HostAssignments {
                                index,
                                digest,
                                assignments: list,
                                retained_volumes: kept,
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
            // The revisions in use: each instance's newest and every replica's target, read
            // by (uid, revision).
            let newest = s.newest_revisions()?;
            let wanted = ConfigInputs::wanted(&instances, &newest);
            let mut inputs = ConfigInputs::from_sealed(HashMap::new(), s.sealed_values()?)
                .with_revisions(s.revision_contents(&wanted)?);
            inputs.newest = newest;
            inputs.deleted_volumes = s.deleted_volumes()?;
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

    fn revision(
        uid: &str,
        n: u64,
        image: &str,
        config: Value,
        secrets: Vec<RevisionSecret>,
    ) -> RevisionContent {
        RevisionContent {
            uid: uid.into(),
            revision: n,
            image: Some(image.into()),
            config: config.to_string(),
            env: Some(
                [(
                    "K".to_string(),
                    EnvValue::SecretRef(SecretRef {
                        name: "llm".into(),
                        key: "anthropic".into(),
                    }),
                )]
                .into(),
            ),
            resources: Some(crate::store::revisions::RevisionResources {
                cpu_millis: 500,
                memory_bytes: 1 << 30,
                pids: 256,
            }),
            secrets,
        }
    }

    fn held(keyring: &Keyring, value: &str) -> RevisionSecret {
        let aad = crate::store::revisions::aad("t", "", "llm", "anthropic");
        RevisionSecret {
            tenant: "t".into(),
            project: String::new(),
            name: "llm".into(),
            key: "anthropic".into(),
            fingerprint: keyring.fingerprint(&SecretValue::new(value.to_string())),
            sealed: keyring
                .seal(&aad, &SecretValue::new(value.to_string()))
                .unwrap(),
        }
    }

    #[test]
    fn each_replica_runs_the_revision_it_targets() {
        let dir = tempfile::tempdir().unwrap();
        let (keyring, inputs) = sealed_inputs(dir.path(), "sk-new");
        let book = AssignmentBook::with_keyring(Arc::new(RwLock::new(Some(keyring.clone()))));
        let mut i = inst("bot", 3, &[Some("h1"), Some("h1"), Some("h2")], "1Gi");
        i.metadata.uid = Some("u1".into());
        let st = i.status.as_mut().unwrap();
        st.replica_status[0].target_revision = Some(3);
        st.replica_status[1].target_revision = Some(4);
        st.replica_status[2].target_revision = None;
        let inputs = inputs.with_revisions(vec![
            revision(
                "u1",
                3,
                "img:old",
                serde_json::json!({"a": 1}),
                vec![held(&keyring, "sk-old")],
            ),
            revision(
                "u1",
                4,
                "img:new",
                serde_json::json!({"a": 2}),
                vec![held(&keyring, "sk-new")],
            ),
        ]);
        assert_eq!(
            ConfigInputs::wanted(std::slice::from_ref(&i), &inputs.newest).len(),
            2
        );
        book.rebuild_with(std::slice::from_ref(&i), &inputs, 2);
        let h1 = book.current("h1");
        let (old, new) = (&h1.assignments[0], &h1.assignments[1]);
        assert_eq!((old.config_revision, new.config_revision), (3, 4));
        assert_eq!(
            (old.image.as_str(), new.image.as_str()),
            ("img:old", "img:new")
        );
        assert_eq!(
            (old.env["K"].as_str(), new.env["K"].as_str()),
            ("sk-old", "sk-new")
        );
        assert!(old.config_json.contains("\"a\":1") && new.config_json.contains("\"a\":2"));
        assert_ne!(old.config_hash, new.config_hash);
        assert_eq!(old.resources.unwrap().cpu_millis, 500);
        // No target: the newest revision, with the same hash as a replica targeting it.
        let none = &book.current("h2").assignments[0];
        assert_eq!(none.config_revision, 4);
        assert_eq!(none.image, "img:new");
        assert_eq!(none.config_hash, new.config_hash);
    }

    #[test]
    fn the_same_content_gives_the_same_hash_and_a_revision_without_held_values_uses_the_current_ones()
     {
        let dir = tempfile::tempdir().unwrap();
        let (keyring, inputs) = sealed_inputs(dir.path(), "sk-now");
        let book = AssignmentBook::with_keyring(Arc::new(RwLock::new(Some(keyring))));
        let mut i = inst("bot", 2, &[Some("h1"), Some("h1")], "1Gi");
        i.metadata.uid = Some("u1".into());
        i.status.as_mut().unwrap().replica_status[0].target_revision = Some(1);
        let inputs = inputs.with_revisions(vec![
            revision("u1", 1, "img:a", serde_json::json!({"a": 1}), vec![]),
            revision("u1", 2, "img:a", serde_json::json!({"a": 1}), vec![]),
        ]);
        book.rebuild_with(&[i], &inputs, 2);
        let h1 = book.current("h1");
        assert_eq!(h1.assignments[0].config_revision, 1);
        assert_eq!(h1.assignments[1].config_revision, 2);
        assert_eq!(h1.assignments[0].config_hash, h1.assignments[1].config_hash);
        assert_eq!(h1.assignments[0].env["K"], "sk-now");
    }

    #[test]
    fn retained_volumes_are_listed_per_host_and_move_its_index() {
        let book = AssignmentBook::default();
        let mut i = inst("bot", 1, &[Some("h1")], "1Gi");
        i.metadata.uid = Some("u1".into());
        book.rebuild(std::slice::from_ref(&i), 2);
        assert_eq!(book.current("h2").index, 1, "h2 has nothing yet");
        i.status.as_mut().unwrap().retained_volumes = vec![crate::model::RetainedVolume {
            replica: "bot-1".into(),
            ordinal: 1,
            host: "h2".into(),
            since: None,
        }];
        book.rebuild(std::slice::from_ref(&i), 3);
        let h2 = book.current("h2");
        assert_eq!(h2.index, 3);
        assert_eq!(h2.retained_volumes.len(), 1);
        assert_eq!(h2.retained_volumes[0].replica, "bot-1");
        assert_eq!(h2.retained_volumes[0].instance_uid, "u1");
        assert_eq!(book.current("h1").index, 2, "h1's list did not change");
        // A deleted instance's volume kept on h1.
        let inputs = ConfigInputs {
            deleted_volumes: vec![DeletedVolume {
                instance_uid: "u0".into(),
                tenant: "t".into(),
                project: "p".into(),
                instance: "gone".into(),
                replica: "gone-0".into(),
                ordinal: 0,
                host: "h1".into(),
                since: "2026-01-01T00:00:00Z".into(),
            }],
            ..Default::default()
        };
        book.rebuild_with(std::slice::from_ref(&i), &inputs, 4);
        assert_eq!(book.current("h1").index, 4);
        assert_eq!(book.current("h1").retained_volumes[0].instance, "gone");
        // whenScaled: Delete lists nothing.
        i.spec.volume_retention.when_scaled = RetentionPolicy::Delete;
        book.rebuild(std::slice::from_ref(&i), 5);
        assert!(book.current("h2").retained_volumes.is_empty());
        assert_eq!(book.current("h2").index, 5);
    }

    #[test]
    fn a_scale_down_keeps_volumes_in_the_same_answer_that_drops_the_replicas() {
        // The spec went from 3 replicas to 1; the scheduler has not yet moved the removed
        // replicas into retainedVolumes. The answer that takes their assignments away must
        // already tell the agent to keep their volumes.
        let book = AssignmentBook::default();
        let mut i = inst("bot", 3, &[Some("h1"), Some("h1"), Some("h2")], "1Gi");
        i.metadata.uid = Some("u1".into());
        book.rebuild(std::slice::from_ref(&i), 2);
        assert!(book.current("h1").retained_volumes.is_empty());
        i.spec.replicas = 1;
        book.rebuild(std::slice::from_ref(&i), 3);
        let h1 = book.current("h1");
        assert_eq!(h1.assignments.len(), 1);
        let kept: Vec<&str> = h1
            .retained_volumes
            .iter()
            .map(|v| v.replica.as_str())
            .collect();
        assert_eq!(kept, ["bot-1"]);
        let h2 = book.current("h2");
        assert!(h2.assignments.is_empty());
        assert_eq!(h2.retained_volumes[0].replica, "bot-2");
        // The same once the scheduler has recorded them: listed once.
        i.status.as_mut().unwrap().retained_volumes = vec![crate::model::RetainedVolume {
            replica: "bot-2".into(),
            ordinal: 2,
            host: "h2".into(),
            since: None,
        }];
        book.rebuild(std::slice::from_ref(&i), 4);
        assert_eq!(book.current("h2").retained_volumes.len(), 1);
        assert_eq!(book.current("h2").index, 3, "nothing changed for h2");
    }
}
