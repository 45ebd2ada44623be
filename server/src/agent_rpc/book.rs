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
use crate::store::{SealedValue, Store};
use crate::util::hex;

/// How long a burst of store changes is coalesced before the book is rebuilt.
const REBUILD_DEBOUNCE: Duration = Duration::from_millis(1);
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
    /// State volumes whose removal was asked for, by name.
    pub delete_volumes: Vec<String>,
}

/// What a long poll ends with.
#[derive(Debug)]
pub enum Wait {
    Changed(Arc<HostAssignments>),
    NoChange,
}

/// Every host's assignments, kept in memory so that waiting polls read no database. Work is
/// in proportion to what changed: an instance whose assigned view, newest revision and secret
/// values stayed as they were is not rendered again, a changed one re-renders only its own
/// replicas (reusing its rendered revisions while its spec stays), and only the hosts its
/// replicas leave or reach are assembled again.
pub struct AssignmentBook {
    hosts: RwLock<HashMap<String, Arc<HostAssignments>>>,
    /// What each instance contributes to its hosts, as last rendered.
    parts: Mutex<Parts>,
    /// Opens secret values; none when the server has no key file (then no instance may use
    /// secrets).
    keyring: crate::configcenter::SharedKeyring,
    /// Secret values opened by earlier rebuilds, by envelope.
    opened: Mutex<HashMap<String, (Arc<SecretValue>, String)>>,
    /// 0 until the first build, then 1.
    version: watch::Sender<u64>,
    /// Per host with a long poll waiting: bumped when that host's assignments change, so that
    /// a change wakes the polls of the hosts it reaches, not every poll of the fleet.
    signals: Mutex<HashMap<String, watch::Sender<u64>>>,
    built_at: RwLock<u64>,
}

impl Default for AssignmentBook {
    fn default() -> Self {
        AssignmentBook {
            hosts: RwLock::default(),
            parts: Mutex::default(),
            keyring: Arc::default(),
            opened: Mutex::default(),
            version: watch::channel(0).0,
            signals: Mutex::default(),
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
    /// Host → names of its state volumes whose removal was asked for, sorted.
    pub volume_deletions: HashMap<String, Vec<String>>,
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
    /// The sealed values it opened.
    envelopes: Vec<String>,
    image: String,
    env: BTreeMap<String, String>,
    config_json: String,
    config_hash: String,
    resources: pb::Resources,
    content_hash: String,
    /// The secret values it resolved (config and env), for the agent to redact from logs.
    redact: Vec<String>,
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
    let mut redact = std::collections::BTreeSet::new();
    let mut failure = None;
    let resolved = secretref::substitute(&config, &mut |r| match opener
        .open(&tenant, &project, r, held)
    {
        Ok((v, fp)) => {
            fingerprints.insert(format!("{}/{}", r.name, r.key), fp);
            redact.insert(v.expose().to_string());
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
                redact.insert(value.expose().to_string());
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
        envelopes: Vec::new(),
        image,
        env,
        config_json,
        config_hash,
        resources,
        content_hash,
        redact: redact.into_iter().collect(),
    })
}

/// Renders revision `revision` of `instance` as [`render_revision`] does, noting which sealed
/// values it opened.
fn render_noted(
    instance: &OpenClawInstance,
    revision: u64,
    content: Option<&RevisionContent>,
    config_text: Option<&str>,
    opener: &mut Opener<'_>,
) -> Result<Rendered, String> {
    let outer = std::mem::take(&mut opener.used);
    let rendered = render_revision(instance, revision, content, config_text, opener);
    let used = std::mem::replace(&mut opener.used, outer);
    opener.used.extend(used.iter().cloned());
    rendered.map(|mut r| {
        r.envelopes = used.into_iter().collect();
        r
    })
}

/// The revisions rendered for one instance's replicas, by revision number.
type Renders = BTreeMap<u64, Arc<Rendered>>;

/// The replicas of `instance` placed on each host, as the agent receives them, each rendered
/// from the revision it targets (none: the newest), and the renders they use; a render in
/// `cache` is taken as it is. An error when a secret it references cannot be opened.
fn assignments_with(
    instance: &OpenClawInstance,
    inputs: &ConfigInputs,
    opener: &mut Opener<'_>,
    cache: &Renders,
) -> Result<(Vec<(String, pb::Assignment)>, Renders), String> {
    let mut rendered = Renders::new();
    let Some(status) = &instance.status else {
        return Ok((Vec::new(), rendered));
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
        if revision != newest
            && !inputs.revisions.contains_key(&(uid.clone(), revision))
            && !cache.contains_key(&revision)
        {
            tracing::warn!(instance = %instance.key(), replica = %r.name, revision, "the revision this replica targets is not stored; it gets the newest");
            revision = newest;
        }
        let v = match rendered.entry(revision) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => match cache.get(&revision) {
                Some(done) => e.insert(done.clone()),
                None => {
                    let content = inputs.revisions.get(&(uid.clone(), revision));
                    let text = newest_text
                        .filter(|(n, _)| *n == revision)
                        .map(|(_, t)| t.as_str());
                    e.insert(Arc::new(render_noted(
                        instance, revision, content, text, opener,
                    )?))
                }
            },
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
                epoch: r.epoch.unwrap_or(0),
                stop_after_seconds: spec.failover.stop_after_seconds(),
                import_transfer: r
                    .state_from
                    .as_ref()
                    .map(|f| f.transfer.clone())
                    .unwrap_or_default(),
                redact: v.redact.clone(),
            },
        ));
    }
    Ok((out, rendered))
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
        let Some(status) = &i.status else { continue };
        let retain_scaled = i.spec.volume_retention.when_scaled == RetentionPolicy::Retain;
        if !retain_scaled && !status.retained_volumes.iter().any(|v| v.always_kept()) {
            continue;
        }
        let m = &i.metadata;
        // Replicas a scale-down just removed, which the scheduler has not yet moved into
        // `retainedVolumes`: their assignments go with this very spec change, so their volumes
        // must be kept from the same answer on.
        let removed = status
            .replica_status
            .iter()
            .filter(|_| retain_scaled)
            .filter(|r| i64::from(r.ordinal) >= i.spec.replicas)
            .filter_map(|r| Some((r.host.clone()?, r.name.clone())));
        let listed = status
            .retained_volumes
            .iter()
            .filter(|v| retain_scaled || v.always_kept())
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
        sort_retained(list);
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
    assignments_with(instance, &inputs, &mut opener, &Renders::new())
        .map(|(list, _)| list)
        .unwrap_or_default()
}

/// What one instance contributes to one host.
#[derive(Debug, Default)]
struct Part {
    /// Its replicas placed there, by ordinal.
    assignments: Vec<pb::Assignment>,
    /// Its volumes kept there.
    retained: Vec<pb::RetainedVolume>,
    /// Of both, so that a host's digest needs no re-encoding of what did not change.
    digest: [u8; 32],
}

/// One instance as the book last rendered it.
struct Entry {
    /// The instance rendered: its assigned view decides whether a later one is rendered again.
    instance: OpenClawInstance,
    /// Its newest revision then.
    newest: u64,
    /// Its renders, by revision: reused while its generation stays, dropped when no replica of
    /// it targets their revision any more.
    rendered: Renders,
    /// By host.
    parts: BTreeMap<String, Part>,
}

impl Entry {
    fn uses_secrets(&self) -> bool {
        self.rendered.values().any(|r| !r.envelopes.is_empty())
    }
}

/// Every instance's contribution, and which instances each host has a part of.
#[derive(Default)]
struct Parts {
    entries: HashMap<crate::model::ObjectKey, Entry>,
    /// Host → the instances with a part there, in the order their assignments are listed.
    by_host: HashMap<String, std::collections::BTreeSet<crate::model::ObjectKey>>,
    /// Volumes kept of deleted instances, by host.
    deleted: HashMap<String, Vec<pb::RetainedVolume>>,
    /// The sealed values the renders were made with.
    sealed: HashMap<(String, String, String, String), String>,
    /// Host → names of its state volumes whose removal was asked for, sorted.
    deletions: HashMap<String, Vec<String>>,
}

impl Parts {
    fn remove(
        &mut self,
        key: &crate::model::ObjectKey,
        touched: &mut HashSet<String>,
    ) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        for host in e.parts.keys() {
            touched.insert(host.clone());
            if let Some(set) = self.by_host.get_mut(host) {
                set.remove(key);
                if set.is_empty() {
                    self.by_host.remove(host);
                }
            }
        }
        Some(e)
    }

    fn insert(&mut self, key: crate::model::ObjectKey, e: Entry, touched: &mut HashSet<String>) {
        for host in e.parts.keys() {
            touched.insert(host.clone());
            self.by_host
                .entry(host.clone())
                .or_default()
                .insert(key.clone());
        }
        self.entries.insert(key, e);
    }
}

fn digest_part(assignments: &[pb::Assignment], retained: &[pb::RetainedVolume]) -> [u8; 32] {
    let mut h = Sha256::new();
    for a in assignments {
        h.update(a.encode_to_vec());
    }
    // The retained volumes are part of what the host is told: a change to them moves its
    // index too.
    h.update(b"retained\0");
    for v in retained {
        h.update(v.encode_to_vec());
    }
    h.finalize().into()
}

/// The parts of one instance by host, from its assignments and kept volumes.
fn parts_of(
    list: Vec<(String, pb::Assignment)>,
    retained: HashMap<String, Vec<pb::RetainedVolume>>,
) -> BTreeMap<String, Part> {
    let mut parts: BTreeMap<String, Part> = BTreeMap::new();
    for (host, a) in list {
        parts.entry(host).or_default().assignments.push(a);
    }
    for (host, kept) in retained {
        parts.entry(host).or_default().retained = kept;
    }
    for p in parts.values_mut() {
        // Kept until the instance changes: without the room its pushes reserved (a host
        // with one replica of an instance would otherwise keep room for four).
        p.assignments.shrink_to_fit();
        p.retained.shrink_to_fit();
        p.assignments.sort_by_key(|a| a.ordinal);
        p.digest = digest_part(&p.assignments, &p.retained);
    }
    parts
}

fn sort_retained(list: &mut Vec<pb::RetainedVolume>) {
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
        let present: HashSet<crate::model::ObjectKey> =
            instances.iter().map(OpenClawInstance::key).collect();
        let removed: Vec<crate::model::ObjectKey> = {
            let parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
            parts
                .entries
                .keys()
                .filter(|k| !present.contains(*k))
                .cloned()
                .collect()
        };
        self.update(instances, &removed, inputs, index);
    }

    /// Brings the book up to date with the instances given (changed or new; one whose
    /// assigned view, newest revision and secret values are as they were costs a comparison)
    /// and the removal of `removed`, read at store index `index` with `inputs` (which hold at
    /// least the revisions the given instances use). Hosts whose assignments or kept volumes
    /// changed get `index` as their change index. Returns the instances that could not be
    /// rendered (they keep what they had).
    pub fn update(
        &self,
        instances: &[OpenClawInstance],
        removed: &[crate::model::ObjectKey],
        inputs: &ConfigInputs,
        index: u64,
    ) -> Vec<crate::model::ObjectKey> {
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let parts = &mut *parts;
        let mut touched: HashSet<String> = HashSet::new();
        let mut stuck = Vec::new();
        for key in removed {
            parts.remove(key, &mut touched);
        }
        let sealed_changed = parts.sealed != inputs.sealed;
        if sealed_changed {
            parts.sealed = inputs.sealed.clone();
        }
        let mut rendered_any = false;
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
                let key = inst.key();
                let uid = inst.metadata.uid.clone().unwrap_or_default();
                let newest = inputs
                    .newest
                    .get(&uid)
                    .copied()
                    .or(inputs.configs.get(&uid).map(|(n, _)| *n))
                    .unwrap_or(0);
                let cached = parts.entries.get(&key);
                if let Some(e) = cached
                    && e.newest == newest
                    && !(sealed_changed && e.uses_secrets())
                    && e.instance.assigned_view() == inst.assigned_view()
                {
                    continue;
                }
                // Renders stay good while the spec (what a revision did not record comes
                // from) and the secret values are as they were.
                let reusable = cached
                    .filter(|e| {
                        !sealed_changed
                            && e.instance.metadata.generation == inst.metadata.generation
                            && e.instance.spec == inst.spec
                    })
                    .map(|e| &e.rendered);
                let empty = Renders::new();
                match assignments_with(inst, inputs, &mut opener, reusable.unwrap_or(&empty)) {
                    Ok((list, rendered)) => {
                        rendered_any = true;
                        let retained = retained_by_host(std::slice::from_ref(inst), &[]);
                        let entry = Entry {
                            instance: inst.clone(),
                            newest,
                            rendered,
                            parts: parts_of(list, retained),
                        };
                        if entry.parts.is_empty() {
                            // Nothing of it on any host (no replica placed, no volume kept):
                            // it is not kept either. With 10,000 instances waiting for hosts,
                            // their entries held 80 MB. Its next change brings it here again.
                            parts.remove(&key, &mut touched);
                            continue;
                        }
                        // Only hosts whose part of this instance changed are assembled again.
                        let mut scratch = HashSet::new();
                        let before = parts.remove(&key, &mut scratch).unwrap_or_else(|| Entry {
                            instance: inst.clone(),
                            newest,
                            rendered: Renders::new(),
                            parts: BTreeMap::new(),
                        });
                        for host in before.parts.keys().chain(entry.parts.keys()) {
                            let (b, a) = (before.parts.get(host), entry.parts.get(host));
                            if b.map(|p| p.digest) != a.map(|p| p.digest) {
                                touched.insert(host.clone());
                            }
                        }
                        parts.insert(key, entry, &mut scratch);
                    }
                    Err(e) => {
                        tracing::error!(instance = %key, error = %e, "cannot make this instance's assignments; its replicas keep what they run");
                        stuck.push(key);
                    }
                }
            }
            if rendered_any || sealed_changed || !removed.is_empty() {
                let used: HashSet<&String> = parts
                    .entries
                    .values()
                    .flat_map(|e| e.rendered.values())
                    .flat_map(|r| r.envelopes.iter())
                    .collect();
                memo.retain(|sealed, _| used.contains(sealed));
            }
        }
        let mut deleted: HashMap<String, Vec<pb::RetainedVolume>> =
            retained_by_host(&[], &inputs.deleted_volumes);
        if deleted != parts.deleted {
            touched.extend(deleted.keys().cloned());
            touched.extend(parts.deleted.keys().cloned());
            std::mem::swap(&mut parts.deleted, &mut deleted);
        }
        let mut deletions = inputs.volume_deletions.clone();
        for names in deletions.values_mut() {
            names.sort();
        }
        deletions.retain(|_, names| !names.is_empty());
        if deletions != parts.deletions {
            touched.extend(deletions.keys().cloned());
            touched.extend(parts.deletions.keys().cloned());
            std::mem::swap(&mut parts.deletions, &mut deletions);
        }
        let mut changed_hosts: Vec<String> = Vec::new();
        {
            let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
            for name in touched {
                let mut list = Vec::new();
                let mut kept = Vec::new();
                let mut h = Sha256::new();
                for key in parts.by_host.get(&name).into_iter().flatten() {
                    let Some(p) = parts.entries.get(key).and_then(|e| e.parts.get(&name)) else {
                        continue;
                    };
                    list.extend(p.assignments.iter().cloned());
                    kept.extend(p.retained.iter().cloned());
                    h.update(p.digest);
                }
                if let Some(d) = parts.deleted.get(&name) {
                    kept.extend(d.iter().cloned());
                    h.update(digest_part(&[], d));
                }
                let delete = parts.deletions.get(&name).cloned().unwrap_or_default();
                h.update(b"delete\0");
                for v in &delete {
                    h.update(v.as_bytes());
                    h.update(b"\0");
                }
                sort_retained(&mut kept);
                let digest: [u8; 32] = h.finalize().into();
                match hosts.get(&name) {
                    Some(cur) if cur.digest == digest => {}
                    None if list.is_empty() && kept.is_empty() && delete.is_empty() => {}
                    _ => {
                        // Kept until the host's next change: without the room the extends
                        // reserved.
                        list.shrink_to_fit();
                        kept.shrink_to_fit();
                        changed_hosts.push(name.clone());
                        hosts.insert(
                            name,
                            Arc::new(HostAssignments {
                                index,
                                digest,
                                assignments: list,
                                retained_volumes: kept,
                                delete_volumes: delete,
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
        if first {
            self.version.send_replace(1);
        }
        if !changed_hosts.is_empty() {
            let mut signals = self.signals.lock().unwrap_or_else(|e| e.into_inner());
            for name in &changed_hosts {
                if let Some(signal) = signals.get(name) {
                    if signal.receiver_count() == 0 {
                        signals.remove(name);
                    } else {
                        signal.send_modify(|v| *v += 1);
                    }
                }
            }
        }
        stuck
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
        let mut built = self.version.subscribe();
        let mut mine = self
            .signals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(host.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if *built.borrow_and_update() > 0 {
                mine.borrow_and_update();
                let cur = self.current(host);
                if known == 0 || cur.index != known {
                    return Wait::Changed(cur);
                }
            }
            tokio::select! {
                r = built.changed() => if r.is_err() { return Wait::NoChange },
                r = mine.changed() => if r.is_err() { return Wait::NoChange },
                _ = tokio::time::sleep_until(deadline) => return Wait::NoChange,
            }
        }
    }
}

/// What the book's loop knows of the store: each instance's uid and resourceVersion as last
/// read, and the inputs shared by many instances.
#[derive(Default)]
struct Seen {
    instances: HashMap<crate::model::ObjectKey, (String, u64)>,
    newest: HashMap<String, u64>,
    sealed: Vec<SealedValue>,
}

/// One pass: reads the instances changed since `seen` (all of them on the first pass or
/// after a secret's value changed), the revisions they use and the shared inputs, and hands
/// them to the book.
fn pass(
    store: &dyn Store,
    book: &AssignmentBook,
    seen: &mut Seen,
    index: u64,
) -> Result<(), crate::store::StoreError> {
    // Through the store's cache of decoded objects: an instance a control loop already
    // decoded at its current version is not decoded again here.
    let listed = crate::store::decoded::list_decoded(store, Kind::OpenClawInstance)?;
    let newest = store.newest_revisions()?;
    let sealed = store.sealed_values()?;
    if sealed != seen.sealed {
        // Renders may hold the old values: every instance is looked at again.
        seen.instances.clear();
    }
    let present: HashSet<&crate::model::ObjectKey> = listed.iter().map(|d| &d.key).collect();
    let removed: Vec<crate::model::ObjectKey> = seen
        .instances
        .keys()
        .filter(|k| !present.contains(k))
        .cloned()
        .collect();
    let mut read: HashMap<crate::model::ObjectKey, (String, u64)> = HashMap::new();
    let mut instances: Vec<OpenClawInstance> = Vec::new();
    for d in listed.iter() {
        let changed = match seen.instances.get(&d.key) {
            Some((u, v)) => {
                *u != d.uid
                    || *v != d.resource_version
                    || seen.newest.get(&d.uid) != newest.get(&d.uid)
            }
            None => true,
        };
        if !changed {
            continue;
        }
        match &d.resource {
            Ok(Resource::OpenClawInstance(i)) => {
                read.insert(d.key.clone(), (d.uid.clone(), d.resource_version));
                // A copy: the decoded object is shared with the other readers.
                instances.push(i.clone());
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(instance = %d.key, error = %e, "skipping an undecodable instance")
            }
        }
    }
    // The revisions in use: each changed instance's newest and every replica's target, read
    // by (uid, revision).
    let newest_of_changed: HashMap<String, u64> = instances
        .iter()
        .filter_map(|i| {
            let uid = i.metadata.uid.as_ref()?;
            Some((uid.clone(), *newest.get(uid)?))
        })
        .collect();
    let wanted = ConfigInputs::wanted(&instances, &newest_of_changed);
    let mut inputs = ConfigInputs::from_sealed(HashMap::new(), sealed.clone())
        .with_revisions(store.revision_contents(&wanted)?);
    inputs.newest = newest.clone();
    inputs.deleted_volumes = store.deleted_volumes()?;
    for (host, name) in store.volume_deletions()? {
        inputs.volume_deletions.entry(host).or_default().push(name);
    }
    let stuck: HashSet<crate::model::ObjectKey> = book
        .update(&instances, &removed, &inputs, index)
        .into_iter()
        .collect();
    for key in &removed {
        seen.instances.remove(key);
    }
    for (key, version) in read {
        if stuck.contains(&key) {
            // Tried again on the next pass.
            seen.instances.remove(&key);
        } else {
            seen.instances.insert(key, version);
        }
    }
    seen.newest = newest;
    seen.sealed = sealed;
    Ok(())
}

/// Keeps the book current: brings it up to date after every store change that may reach
/// hosts ([`Store::subscribe_desired`]; writes of observed state alone wake nothing), until
/// `shutdown` flips.
pub async fn run(
    store: Arc<dyn Store>,
    book: Arc<AssignmentBook>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = store.subscribe_desired();
    let mut seen = Seen::default();
    loop {
        let index = store.index();
        let (s, b) = (store.clone(), book.clone());
        // Reading and decoding instances is CPU work: it runs on the blocking pool.
        let rebuilt = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let r = pass(s.as_ref(), &b, &mut seen, index);
            crate::metrics::observe_loop_pass("assignment book", started.elapsed());
            (r, seen)
        })
        .await;
        match rebuilt {
            Ok((Ok(()), s)) => seen = s,
            Ok((Err(e), s)) => {
                seen = s;
                tracing::warn!(error = %e, "could not read instances for the assignment book; retrying");
                tokio::time::sleep(REBUILD_RETRY).await;
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "assignment book pass panicked; reading everything again");
                seen = Seen::default();
            }
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

    #[tokio::test(start_paused = true)]
    async fn a_change_wakes_only_the_polls_of_the_hosts_it_reaches() {
        let book = Arc::new(AssignmentBook::default());
        book.rebuild(&[inst("bot", 1, &[Some("h1")], "1Gi")], 3);
        let poll = |host: &'static str, known: u64| {
            let book = book.clone();
            tokio::spawn(async move { book.wait(host, known, Duration::from_secs(300)).await })
        };
        let h1 = poll("h1", 3);
        let h2 = poll("h2", 1);
        tokio::task::yield_now().await;
        assert_eq!(book.signals.lock().unwrap().len(), 2);
        // Only h2 is reached: its poll answers, h1's is not even woken.
        let h1_signal = book.signals.lock().unwrap()["h1"].borrow().to_owned();
        book.rebuild(
            &[
                inst("bot", 1, &[Some("h1")], "1Gi"),
                inst("x", 1, &[Some("h2")], "1Gi"),
            ],
            4,
        );
        let Wait::Changed(got) = h2.await.unwrap() else {
            panic!("h2's change was not delivered")
        };
        assert_eq!((got.index, got.assignments.len()), (4, 1));
        assert_eq!(*book.signals.lock().unwrap()["h1"].borrow(), h1_signal);
        assert!(!h1.is_finished());
        book.rebuild(&[inst("x", 1, &[Some("h2")], "1Gi")], 5);
        let Wait::Changed(got) = h1.await.unwrap() else {
            panic!("h1's change was not delivered")
        };
        assert_eq!((got.index, got.assignments.len()), (5, 0));
        // No poll waits any more: the next change forgets their signals.
        book.rebuild(&[inst("x", 1, &[Some("h1")], "1Gi")], 6);
        assert!(book.signals.lock().unwrap().is_empty());
    }

    #[test]
    fn an_instance_with_nothing_on_any_host_is_not_kept() {
        let book = AssignmentBook::default();
        let entries = |book: &AssignmentBook| book.parts.lock().unwrap().entries.len();
        book.rebuild(
            &[
                inst("waiting", 2, &[None, None], "1Gi"),
                inst("bot", 1, &[Some("h1")], "1Gi"),
            ],
            3,
        );
        assert_eq!(entries(&book), 1, "only the placed instance is kept");
        assert_eq!(book.current("h1").assignments.len(), 1);
        // Placed, it is kept and reaches its host.
        book.rebuild(
            &[
                inst("waiting", 2, &[Some("h1"), None], "1Gi"),
                inst("bot", 1, &[Some("h1")], "1Gi"),
            ],
            4,
        );
        assert_eq!(entries(&book), 2);
        let h1 = book.current("h1");
        assert_eq!((h1.index, h1.assignments.len()), (4, 2));
        // Its replica unplaced again (its host gone), it leaves the host and the book.
        book.rebuild(
            &[
                inst("waiting", 2, &[None, None], "1Gi"),
                inst("bot", 1, &[Some("h1")], "1Gi"),
            ],
            5,
        );
        assert_eq!(entries(&book), 1);
        let h1 = book.current("h1");
        assert_eq!((h1.index, h1.assignments.len()), (5, 1));
        assert_eq!(h1.assignments[0].instance, "bot");
    }

    /// The render of `revision` the book holds for instance `name` of `t/p`.
    fn render_of(book: &AssignmentBook, name: &str, revision: u64) -> Option<Arc<Rendered>> {
        let parts = book.parts.lock().unwrap();
        let e = parts
            .entries
            .get(&crate::model::ObjectKey::instance("t", "p", name))?;
        e.rendered.get(&revision).cloned()
    }

    #[test]
    fn only_what_changed_is_rendered_and_only_hosts_it_reaches_move() {
        let book = AssignmentBook::default();
        let bot = inst("bot", 1, &[Some("h1")], "1Gi");
        let x = inst("x", 1, &[Some("h2")], "1Gi");
        book.rebuild(&[bot.clone(), x.clone()], 2);
        let (bot_render, x_render) = (
            render_of(&book, "bot", 0).unwrap(),
            render_of(&book, "x", 0).unwrap(),
        );
        // Observed state only: nothing is rendered, no host moves.
        let mut ready = bot.clone();
        let r = &mut ready.status.as_mut().unwrap().replica_status[0];
        r.state = crate::model::ReplicaState::Ready;
        r.restarts = 3;
        book.update(
            std::slice::from_ref(&ready),
            &[],
            &ConfigInputs::default(),
            3,
        );
        assert!(Arc::ptr_eq(
            &render_of(&book, "bot", 0).unwrap(),
            &bot_render
        ));
        assert_eq!((book.current("h1").index, book.current("h2").index), (2, 2));
        // Scaling bot places its second replica on h2: only h2 moves, and x is not looked at.
        let scaled = inst("bot", 2, &[Some("h1"), Some("h2")], "1Gi");
        book.update(
            std::slice::from_ref(&scaled),
            &[],
            &ConfigInputs::default(),
            4,
        );
        assert_eq!(
            book.current("h1").index,
            2,
            "h1's part of bot did not change"
        );
        let h2 = book.current("h2");
        assert_eq!(h2.index, 4);
        let names: Vec<&str> = h2.assignments.iter().map(|a| a.instance.as_str()).collect();
        assert_eq!(names, ["bot", "x"], "listed by tenant, project, instance");
        assert!(Arc::ptr_eq(&render_of(&book, "x", 0).unwrap(), &x_render));
        // Removal takes an instance's replicas away from its hosts only.
        book.update(&[], &[x.key()], &ConfigInputs::default(), 5);
        assert_eq!(book.current("h2").assignments.len(), 1);
        assert_eq!((book.current("h1").index, book.current("h2").index), (2, 5));
        assert!(render_of(&book, "x", 0).is_none());
    }

    #[test]
    fn renders_are_kept_while_replicas_target_their_revision() {
        let mut i = inst("bot", 2, &[Some("h1"), Some("h2")], "1Gi");
        i.metadata.uid = Some("u1".into());
        let content = |n: u64| RevisionContent {
            uid: "u1".into(),
            revision: n,
            image: Some(format!("img:{n}")),
            config: serde_json::json!({"n": n}).to_string(),
            env: None,
            resources: None,
            secrets: vec![],
        };
        let inputs = ConfigInputs::default().with_revisions(vec![content(1), content(2)]);
        let book = AssignmentBook::default();
        let st = i.status.as_mut().unwrap();
        st.replica_status[0].target_revision = Some(1);
        st.replica_status[1].target_revision = Some(2);
        book.rebuild_with(std::slice::from_ref(&i), &inputs, 2);
        let two = render_of(&book, "bot", 2).unwrap();
        assert!(render_of(&book, "bot", 1).is_some());
        // The first replica moves on: revision 1 is dropped, revision 2 is not rendered again
        // (the inputs hold no revision any more: the render is the book's own).
        i.status.as_mut().unwrap().replica_status[0].target_revision = Some(2);
        let mut later = ConfigInputs::default();
        later.newest.insert("u1".into(), 2);
        book.update(std::slice::from_ref(&i), &[], &later, 3);
        assert!(render_of(&book, "bot", 1).is_none());
        assert!(Arc::ptr_eq(&render_of(&book, "bot", 2).unwrap(), &two));
        let h1 = book.current("h1");
        assert_eq!((h1.index, h1.assignments[0].image.as_str()), (3, "img:2"));
        assert_eq!(book.current("h2").index, 2);
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
        // A reference under a key that names no secret: listed for redaction all the same.
        let mut hooked = inst("hooked", 1, &[Some("h3")], "1Gi");
        hooked.spec.config = serde_json::from_value(serde_json::json!({
            "hooks": {"url": {"secretRef": {"name": "llm", "key": "anthropic"}}}
        }))
        .unwrap();
        book.rebuild_with(&[user.clone(), other.clone(), hooked], &inputs, 2);
        assert_eq!(book.current("h3").assignments[0].redact, ["sk-one"]);
        let h1 = book.current("h1");
        let a = &h1.assignments[0];
        assert_eq!(a.env["ANTHROPIC_API_KEY"], "sk-one");
        assert_eq!(a.redact, ["sk-one"]);
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
    fn volumes_to_delete_reach_their_host_only_and_move_its_index() {
        let book = AssignmentBook::default();
        let i = inst("bot", 1, &[Some("h1")], "1Gi");
        book.rebuild(std::slice::from_ref(&i), 2);
        let inputs = ConfigInputs {
            volume_deletions: HashMap::from([("h2".to_string(), vec!["v-old".to_string()])]),
            ..Default::default()
        };
        book.rebuild_with(std::slice::from_ref(&i), &inputs, 3);
        let h2 = book.current("h2");
        assert_eq!(
            (h2.index, h2.delete_volumes.clone()),
            (3, vec!["v-old".to_string()])
        );
        assert_eq!(book.current("h1").index, 2, "h1 is not told");
        assert!(book.current("h1").delete_volumes.is_empty());
        // Gone from the host: no longer asked, and the host hears of it.
        book.rebuild(std::slice::from_ref(&i), 4);
        let h2 = book.current("h2");
        assert_eq!(h2.index, 4);
        assert!(h2.delete_volumes.is_empty());
    }

    #[test]
    fn retained_volumes_are_listed_per_host_and_move_its_index() {
        let book = AssignmentBook::default();
        let mut i = inst("bot", 1, &[Some("h1")], "1Gi");
        i.metadata.uid = Some("u1".into());
        book.rebuild(std::slice::from_ref(&i), 2);
        assert_eq!(book.current("h2").index, 1, "h2 has nothing yet");
        i.status.as_mut().unwrap().retained_volumes = vec![crate::model::RetainedVolume {
            reason: None,
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
            reason: None,
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
