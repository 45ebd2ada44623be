//! Instance revisions and sealed secret values, kept in the transaction of the write that
//! causes them: a change to any layer validates and revises every instance it reaches, or
//! nothing is written. Engine-neutral: the rows are read and written through
//! [`super::backend::Tx`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::backend::{Reach, RevisionRow, Tx};
use super::{StoreError, StoredObject, Usage};
use crate::configcenter::{self, LayerRef, SecretLookup};
use crate::model::{
    ConfigTemplate, EnvValue, FieldProblem, Kind, ObjectKey, OpenClawInstance, Project, Resource,
    SEALED_PREFIX, Secret, SortedMap, Tenant,
};
use crate::openclaw::schema::Schema;
use crate::openclaw::secretref::SecretRef;

/// Tables of SQLite migration 4.
pub const MIGRATION: &str = "
CREATE TABLE config_revisions (
    instance_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    project TEXT NOT NULL,
    instance TEXT NOT NULL,
    config TEXT NOT NULL,
    hash TEXT NOT NULL,
    layers TEXT NOT NULL,
    author TEXT NOT NULL,
    message TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (instance_uid, revision)
);
CREATE TABLE secret_values (
    tenant TEXT NOT NULL,
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    key TEXT NOT NULL,
    sealed TEXT NOT NULL,
    PRIMARY KEY (tenant, project, name, key)
);";

/// SQLite migration 5: config revisions become instance revisions (image, env, resources, the secret
/// values by fingerprint and sealed, the instance's own spec fields; filled in for existing
/// rows by [`backfill_instance_revisions`]), and the volumes kept of deleted instances.
pub const INSTANCE_REVISIONS_MIGRATION: &str = "
ALTER TABLE config_revisions ADD COLUMN image TEXT;
ALTER TABLE config_revisions ADD COLUMN env TEXT;
ALTER TABLE config_revisions ADD COLUMN resources TEXT;
ALTER TABLE config_revisions ADD COLUMN secrets TEXT;
ALTER TABLE config_revisions ADD COLUMN spec TEXT;
ALTER TABLE config_revisions ADD COLUMN content_hash TEXT NOT NULL DEFAULT '';
CREATE TABLE retained_volumes (
    instance_uid TEXT NOT NULL,
    tenant TEXT NOT NULL,
    project TEXT NOT NULL,
    instance TEXT NOT NULL,
    replica TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    host TEXT NOT NULL,
    since TEXT NOT NULL,
    PRIMARY KEY (instance_uid, ordinal, host)
);";

/// Revisions kept per instance; older ones are pruned (except those a replica or the
/// rollout still needs).
pub const KEEP_REVISIONS: i64 = 100;

/// Who made a change and why, recorded on the revisions it creates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeNote {
    pub author: String,
    pub message: Option<String>,
}

impl ChangeNote {
    pub fn system(message: &str) -> ChangeNote {
        ChangeNote {
            author: "system".into(),
            message: Some(message.into()),
        }
    }
}

/// One immutable revision of an instance's effective config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionRecord {
    pub revision: u64,
    pub hash: String,
    pub author: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[schema(value_type = Vec<Object>)]
    pub layers: Vec<LayerRef>,
    /// The effective config (secret references in place); left out of history lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub config: Option<serde_json::Value>,
    /// The image the revision runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The instance's own spec fields at this revision (`version`, `image`, `env`, `resources`,
    /// `config`, `configTemplate`): what `rollout undo` writes back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub spec: Option<serde_json::Value>,
}

/// The resource limits a revision runs with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionResources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pids: u32,
}

/// A secret value a revision runs with: where it comes from, its fingerprint, and the value
/// sealed as it was (ciphertext bound to `tenant/project/name/key`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionSecret {
    pub tenant: String,
    pub project: String,
    pub name: String,
    pub key: String,
    pub fingerprint: String,
    pub sealed: String,
}

/// Everything a replica of one revision runs, as the assignment book renders it. Fields
/// that are `None` were not recorded (revisions made before instance revisions existed):
/// the instance's current spec stands in for them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RevisionContent {
    pub uid: String,
    pub revision: u64,
    pub image: Option<String>,
    /// The effective config text, secret references in place.
    pub config: String,
    pub env: Option<SortedMap<String, EnvValue>>,
    pub resources: Option<RevisionResources>,
    pub secrets: Vec<RevisionSecret>,
}

/// A state volume kept after its instance was deleted (`volumeRetention.whenDeleted: Retain`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeletedVolume {
    pub instance_uid: String,
    pub tenant: String,
    pub project: String,
    pub instance: String,
    pub replica: String,
    pub ordinal: u32,
    pub host: String,
    pub since: String,
}

/// A sealed value of a secret key, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedValue {
    pub tenant: String,
    pub project: String,
    pub name: String,
    pub key: String,
    pub sealed: String,
}

impl SealedValue {
    /// What the ciphertext is bound to: it opens only in this place.
    pub fn aad(&self) -> String {
        aad(&self.tenant, &self.project, &self.name, &self.key)
    }
}

/// The associated data of a sealed value: `tenant/project/name/key` (project empty for a
/// tenant-level secret).
pub fn aad(tenant: &str, project: &str, name: &str, key: &str) -> String {
    format!("{tenant}/{project}/{name}/{key}")
}

fn problem(field: &str, text: String) -> StoreError {
    StoreError::Invalid(vec![FieldProblem::new(field, text)])
}

/// Moves a secret's sealed `data` into the stored values (replacing its previous set) and
/// leaves only the fingerprints in the object. Values that are not sealed are refused: the
/// API seals before it writes, and plaintext must never reach the database.
pub fn seal_secret(tx: &mut dyn Tx, secret: &mut Secret) -> Result<(), StoreError> {
    let key = secret.key();
    let data = std::mem::take(&mut secret.spec.data);
    if data.is_empty() {
        return Ok(());
    }
    if data.values().any(|v| !v.0.starts_with(SEALED_PREFIX)) {
        return Err(StoreError::Backend(format!(
            "refusing to store an unsealed value of {key}"
        )));
    }
    let values: Vec<(String, String)> = data.into_iter().map(|(k, v)| (k, v.0)).collect();
    tx.put_secret_values(&key, &values)
}

/// Writes one whole object as it is (server-owned metadata already set).
pub fn put_resource(tx: &mut dyn Tx, r: &Resource) -> Result<(), StoreError> {
    tx.put(&super::rules::to_stored(r)?, Usage::of(r))
}

fn instance_of(o: &StoredObject) -> Result<OpenClawInstance, StoreError> {
    match o.resource()? {
        Resource::OpenClawInstance(i) => Ok(i),
        _ => Err(StoreError::Corrupt(format!("{} is not an instance", o.key))),
    }
}

/// The instances whose effective config a change of `key` may change (or whose references
/// it may break).
fn reached_by(tx: &mut dyn Tx, key: &ObjectKey) -> Result<Vec<StoredObject>, StoreError> {
    match key.kind {
        Kind::OpenClawInstance => Ok(tx.get(key)?.into_iter().collect()),
        Kind::Tenant => tx.instances(Reach::Tenant(&key.name)),
        Kind::Project => tx.instances(Reach::Project(&key.tenant, &key.name)),
        Kind::ConfigTemplate => tx.instances(Reach::Template(&key.name)),
        Kind::Secret if key.project.is_empty() => tx.instances(Reach::Tenant(&key.tenant)),
        Kind::Secret => tx.instances(Reach::Project(&key.tenant, &key.project)),
        Kind::Host | Kind::Rollout => Ok(Vec::new()),
    }
}

/// Reads objects of the layers once per change.
#[derive(Default)]
struct LayerCache {
    templates: HashMap<String, Option<ConfigTemplate>>,
    tenants: HashMap<String, Option<Tenant>>,
    projects: HashMap<(String, String), Option<Project>>,
    secrets: HashMap<ObjectKey, Option<BTreeMap<String, String>>>,
}

impl LayerCache {
    fn read(tx: &mut dyn Tx, key: &ObjectKey) -> Result<Option<Resource>, StoreError> {
        tx.get(key)?.map(|o| o.resource()).transpose()
    }

    fn template(
        &mut self,
        tx: &mut dyn Tx,
        name: &str,
    ) -> Result<Option<ConfigTemplate>, StoreError> {
        if !self.templates.contains_key(name) {
            let t = match Self::read(tx, &ObjectKey::cluster(Kind::ConfigTemplate, name))? {
                Some(Resource::ConfigTemplate(t)) => Some(t),
                _ => None,
            };
            self.templates.insert(name.to_string(), t);
        }
        Ok(self.templates[name].clone())
    }

    fn tenant(&mut self, tx: &mut dyn Tx, name: &str) -> Result<Option<Tenant>, StoreError> {
        if !self.tenants.contains_key(name) {
            let t = match Self::read(tx, &ObjectKey::cluster(Kind::Tenant, name))? {
                Some(Resource::Tenant(t)) => Some(t),
                _ => None,
            };
            self.tenants.insert(name.to_string(), t);
        }
        Ok(self.tenants[name].clone())
    }

    fn project(
        &mut self,
        tx: &mut dyn Tx,
        tenant: &str,
        name: &str,
    ) -> Result<Option<Project>, StoreError> {
        let k = (tenant.to_string(), name.to_string());
        if !self.projects.contains_key(&k) {
            let p = match Self::read(tx, &ObjectKey::project(tenant, name))? {
                Some(Resource::Project(p)) => Some(p),
                _ => None,
            };
            self.projects.insert(k.clone(), p);
        }
        Ok(self.projects[&k].clone())
    }

    /// The keys of a secret with the fingerprints of their values.
    fn secret_fingerprints(
        &mut self,
        tx: &mut dyn Tx,
        key: &ObjectKey,
    ) -> Result<Option<BTreeMap<String, String>>, StoreError> {
        if !self.secrets.contains_key(key) {
            let keys = match Self::read(tx, key)? {
                Some(Resource::Secret(s)) => Some(s.spec.keys),
                _ => None,
            };
            self.secrets.insert(key.clone(), keys);
        }
        Ok(self.secrets[key].clone())
    }

    fn secret_keys(
        &mut self,
        tx: &mut dyn Tx,
        key: &ObjectKey,
    ) -> Result<Option<Vec<String>>, StoreError> {
        Ok(self
            .secret_fingerprints(tx, key)?
            .map(|m| m.into_keys().collect()))
    }

    fn lookup(
        &mut self,
        tx: &mut dyn Tx,
        tenant: &str,
        project: &str,
        r: &SecretRef,
    ) -> Result<SecretLookup, StoreError> {
        for k in configcenter::secret_keys(tenant, project, r) {
            if let Some(keys) = self.secret_keys(tx, &k)? {
                return Ok(SecretLookup::Found { keys });
            }
        }
        Ok(SecretLookup::Missing)
    }
}

/// The layers of a stored instance, read through `cache`.
fn layers_in(
    tx: &mut dyn Tx,
    cache: &mut LayerCache,
    i: &OpenClawInstance,
) -> Result<Vec<configcenter::OwnedLayer>, StoreError> {
    let k = i.key();
    let template = cache.template(tx, configcenter::template_name(i))?;
    let tenant = cache.tenant(tx, &k.tenant)?;
    let project = cache.project(tx, &k.tenant, &k.project)?;
    Ok(configcenter::layers_of(
        i,
        template.as_ref(),
        tenant.as_ref(),
        project.as_ref(),
    ))
}

/// What one revision of an instance captures, worked out from its current layers.
struct Content {
    image: String,
    config_text: String,
    config_hash: String,
    env: String,
    resources: String,
    secrets: Vec<RevisionSecret>,
    spec: String,
    content_hash: String,
}

fn json_text<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(e.to_string()))
}

/// The instance's own spec fields that make a revision (what `rollout undo` writes back).
pub const OWN_SPEC_FIELDS: [&str; 6] = [
    "version",
    "image",
    "env",
    "resources",
    "config",
    "configTemplate",
];

fn own_spec(i: &OpenClawInstance) -> Result<serde_json::Value, StoreError> {
    let full = serde_json::to_value(&i.spec).map_err(|e| StoreError::Backend(e.to_string()))?;
    let mut out = serde_json::Map::new();
    if let serde_json::Value::Object(map) = full {
        for (k, v) in map {
            if OWN_SPEC_FIELDS.contains(&k.as_str()) {
                out.insert(k, v);
            }
        }
    }
    Ok(serde_json::Value::Object(out))
}

/// The hash that decides whether a new revision is made: image, config, env (references,
/// not values), resources and the fingerprint of every secret value used.
fn content_hash_of(
    image: &str,
    config_hash: &str,
    env: &str,
    resources: &str,
    secrets: &[RevisionSecret],
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [image, config_hash, env, resources] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for s in secrets {
        h.update(aad(&s.tenant, &s.project, &s.name, &s.key).as_bytes());
        h.update([b'=']);
        h.update(s.fingerprint.as_bytes());
        h.update([0]);
    }
    crate::util::hex(&h.finalize())
}

fn content_of(
    tx: &mut dyn Tx,
    cache: &mut LayerCache,
    i: &OpenClawInstance,
    effective: &serde_json::Value,
) -> Result<Content, StoreError> {
    let k = i.key();
    let config_text = json_text(effective)?;
    let config_hash = configcenter::config_text_hash(&config_text);
    let image = i.spec.image_ref();
    let env = json_text(&i.spec.env)?;
    let resources = json_text(&RevisionResources {
        cpu_millis: i.spec.cpu_millis(),
        memory_bytes: i.spec.memory_bytes(),
        pids: i.spec.resources.pids.unwrap_or(crate::model::DEFAULT_PIDS) as u32,
    })?;
    let mut secrets: Vec<RevisionSecret> = Vec::new();
    for r in configcenter::references(i, effective) {
        for sk in configcenter::secret_keys(&k.tenant, &k.project, &r) {
            if let Some(fps) = cache.secret_fingerprints(tx, &sk)? {
                secrets.push(RevisionSecret {
                    fingerprint: fps.get(&r.key).cloned().unwrap_or_default(),
                    sealed: tx.sealed_value(&sk, &r.key)?.unwrap_or_default(),
                    tenant: sk.tenant,
                    project: sk.project,
                    name: sk.name,
                    key: r.key.clone(),
                });
                break;
            }
        }
    }
    secrets.sort_by(|a, b| {
        (&a.tenant, &a.project, &a.name, &a.key).cmp(&(&b.tenant, &b.project, &b.name, &b.key))
    });
    secrets.dedup_by(|a, b| {
        (&a.tenant, &a.project, &a.name, &a.key) == (&b.tenant, &b.project, &b.name, &b.key)
    });
    let content_hash = content_hash_of(&image, &config_hash, &env, &resources, &secrets);
    Ok(Content {
        image,
        config_text,
        config_hash,
        env,
        resources,
        secrets,
        spec: json_text(&own_spec(i)?)?,
        content_hash,
    })
}

/// `Kind/path changed` (`secret acme/llm changed` for a secret's value or keys).
fn layer_changed(key: &ObjectKey) -> String {
    let path: Vec<&str> = [&key.tenant, &key.project, &key.name]
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(String::as_str)
        .collect();
    match key.kind {
        Kind::Secret => format!("secret {} changed", path.join("/")),
        _ => format!("{}/{} changed", key.kind.as_str(), path.join("/")),
    }
}

/// What an instance's own change altered since `prev`, in words.
fn own_change(key: &ObjectKey, prev: &RevisionRow, new: &Content) -> String {
    let mut parts = Vec::new();
    if prev.image.as_deref() != Some(new.image.as_str()) {
        parts.push(format!("image changed to {}", new.image));
    }
    if prev.hash != new.config_hash {
        parts.push("config changed".to_string());
    }
    if prev.env.as_deref() != Some(new.env.as_str()) {
        parts.push("env changed".to_string());
    }
    if prev.resources.as_deref() != Some(new.resources.as_str()) {
        parts.push("resources changed".to_string());
    }
    let fps = |list: &[RevisionSecret]| -> Vec<(String, String)> {
        list.iter()
            .map(|s| {
                (
                    aad(&s.tenant, &s.project, &s.name, &s.key),
                    s.fingerprint.clone(),
                )
            })
            .collect()
    };
    let before: Vec<RevisionSecret> = prev
        .secrets
        .as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default();
    if parts.is_empty() && fps(&before) != fps(&new.secrets) {
        parts.push("secret values changed".to_string());
    }
    if parts.is_empty() {
        format!("{key} changed")
    } else {
        parts.join("; ")
    }
}

/// The revisions an instance still needs: those its replicas target and the rollout's.
fn protected_revisions(i: &OpenClawInstance) -> BTreeSet<u64> {
    let mut keep = BTreeSet::new();
    if let Some(status) = &i.status {
        keep.extend(
            status
                .replica_status
                .iter()
                .filter_map(|r| r.target_revision),
        );
        keep.extend(
            status
                .replica_status
                .iter()
                .filter_map(|r| r.config_revision),
        );
        if let Some(r) = &status.rollout {
            keep.extend(r.stable_revision);
            keep.insert(r.revision);
        }
    }
    keep
}

/// Drops revisions beyond the newest `KEEP_REVISIONS`, except those in `keep`.
fn prune(tx: &mut dyn Tx, uid: &str, newest: u64, keep: &BTreeSet<u64>) -> Result<(), StoreError> {
    let limit = newest as i64 - KEEP_REVISIONS;
    if limit < 1 {
        return Ok(());
    }
    for n in tx.revision_numbers(uid, limit as u64)? {
        if !keep.contains(&n) {
            tx.drop_revisions(uid, Some(n))?;
        }
    }
    Ok(())
}

/// After the objects of a write are stored (inside its transaction): checks and revises the
/// effective config of every instance the changed objects reach. A problem anywhere fails
/// the whole write, naming the instance and the key. Returns the instances revised, with their
/// new revision, and writes each new revision number into the instance's status.
pub fn revise(
    tx: &mut dyn Tx,
    changed: &[ObjectKey],
    note: &ChangeNote,
    schema: &Schema,
    index: u64,
    now: &str,
    blame: &dyn Fn(&ObjectKey, StoreError) -> StoreError,
) -> Result<Vec<(ObjectKey, u64)>, StoreError> {
    let mut cache = LayerCache::default();
    let mut seen = HashSet::new();
    let mut revised = Vec::new();
    for key in changed {
        if key.kind == Kind::OpenClawInstance
            && let Some(o) = tx.get(key)?
        {
            let i = instance_of(&o)?;
            let name = configcenter::template_name(&i);
            if i.spec.config_template.is_some() && cache.template(tx, name)?.is_none() {
                return Err(blame(
                    key,
                    problem(
                        "spec.configTemplate",
                        format!(
                            "no ConfigTemplate named {name:?} exists; create it first, or leave spec.configTemplate out to use {:?}",
                            configcenter::DEFAULT_TEMPLATE
                        ),
                    ),
                ));
            }
        }
        for o in reached_by(tx, key)? {
            if !seen.insert(o.key.clone()) {
                continue;
            }
            let mut i = instance_of(&o)?;
            let layers = layers_in(tx, &mut cache, &i)?;
            let effective = configcenter::render(&layers);
            let (tenant, project) = (o.key.tenant.clone(), o.key.project.clone());
            let mut lookup_err = None;
            let problems =
                configcenter::check(&i, &layers, &effective, schema, &mut |r| match cache
                    .lookup(tx, &tenant, &project, r)
                {
                    Ok(l) => l,
                    Err(e) => {
                        lookup_err = Some(e);
                        SecretLookup::Missing
                    }
                });
            if let Some(e) = lookup_err {
                return Err(e);
            }
            if !problems.is_empty() {
                let own = *key == o.key;
                let problems = problems
                    .into_iter()
                    .map(|mut p| {
                        if !own {
                            // The change is to a lower layer: say which instance it breaks.
                            p.problem = format!("{} ({})", p.problem, p.field);
                            p.field = match key.kind {
                                Kind::Secret => "spec.data".into(),
                                _ => "spec.config".into(),
                            };
                            if !p.problem.contains(&o.key.to_string()) {
                                p.problem = format!("{}: {}", o.key, p.problem);
                            }
                        }
                        p
                    })
                    .collect();
                return Err(blame(key, StoreError::Invalid(problems)));
            }
            let content = content_of(tx, &mut cache, &i, &effective)?;
            let last = tx.latest_revision(&o.uid)?;
            if last
                .as_ref()
                .is_some_and(|p| p.content_hash == content.content_hash)
            {
                continue;
            }
            let revision = last.as_ref().map_or(1, |p| p.revision + 1);
            let layer_refs = json_text(&configcenter::layer_refs(&layers))?;
            let message = note.message.clone().unwrap_or_else(|| match &last {
                None => "created".into(),
                Some(prev) if *key == o.key => own_change(&o.key, prev, &content),
                Some(_) => layer_changed(key),
            });
            tx.insert_revision(&RevisionRow {
                instance_uid: o.uid.clone(),
                revision,
                tenant: o.key.tenant.clone(),
                project: o.key.project.clone(),
                instance: o.key.name.clone(),
                config: content.config_text,
                hash: content.config_hash,
                layers: layer_refs,
                author: if note.author.is_empty() {
                    "system".into()
                } else {
                    note.author.clone()
                },
                message,
                created_at: now.to_string(),
                image: Some(content.image),
                env: Some(content.env),
                resources: Some(content.resources),
                secrets: Some(json_text(&content.secrets)?),
                spec: Some(content.spec),
                content_hash: content.content_hash,
            })?;
            prune(tx, &o.uid, revision, &protected_revisions(&i))?;
            i.status
                .get_or_insert_with(Default::default)
                .config_revision = Some(revision);
            if revision == 1 {
                adopt_volumes(tx, &mut i)?;
            }
            i.metadata.resource_version = Some(index);
            put_resource(tx, &Resource::OpenClawInstance(i))?;
            revised.push((o.key.clone(), revision));
        }
    }
    // A change to a shared layer that reached several instances moves them in waves.
    super::waves::hold_revised(tx, changed, &revised, index, now)?;
    Ok(revised)
}

/// Refuses to delete a template or secret that instances still use, naming them; drops an
/// instance's revisions and a secret's values with it.
pub fn before_delete(tx: &mut dyn Tx, key: &ObjectKey) -> Result<(), StoreError> {
    const SHOWN: usize = 5;
    let users: Vec<ObjectKey> = match key.kind {
        Kind::ConfigTemplate => reached_by(tx, key)?.into_iter().map(|o| o.key).collect(),
        Kind::Secret => {
            let mut cache = LayerCache::default();
            let mut users = Vec::new();
            for o in reached_by(tx, key)? {
                let i = instance_of(&o)?;
                let effective = configcenter::render(&layers_in(tx, &mut cache, &i)?);
                let uses = configcenter::references(&i, &effective).iter().any(|r| {
                    // The reference resolves to this secret: same name, and no project
                    // secret of that name shadows a tenant-level one.
                    r.name == key.name
                        && (!key.project.is_empty()
                            || cache
                                .secret_keys(
                                    tx,
                                    &configcenter::secret_keys(&o.key.tenant, &o.key.project, r)[0],
                                )
                                .ok()
                                .flatten()
                                .is_none())
                });
                if uses {
                    users.push(o.key);
                }
            }
            users
        }
        Kind::OpenClawInstance => {
            if let Some(o) = tx.get(key)? {
                tx.drop_revisions(&o.uid, None)?;
                keep_volumes_of(tx, &o, &crate::util::now_rfc3339())?;
            }
            Vec::new()
        }
        Kind::Rollout => {
            super::waves::before_delete(tx, key)?;
            Vec::new()
        }
        Kind::Tenant => {
            super::waves::drop_tenant_rollouts(tx, &key.name)?;
            Vec::new()
        }
        Kind::Project | Kind::Host => Vec::new(),
    };
    if !users.is_empty() {
        let mut names: Vec<String> = users.iter().take(SHOWN).map(|k| k.to_string()).collect();
        if users.len() > SHOWN {
            names.push(format!("and {} more", users.len() - SHOWN));
        }
        let what = match key.kind {
            Kind::ConfigTemplate => {
                "uses this template (spec.configTemplate, or none given for the default)"
            }
            _ => "references this secret",
        };
        return Err(StoreError::InUse {
            key: key.clone(),
            message: format!(
                "{key} is in use and was not deleted: {} {what}; change or delete {} first",
                names.join(", "),
                if users.len() == 1 { "it" } else { "them" }
            ),
        });
    }
    if key.kind == Kind::Secret {
        tx.drop_secret_values(key)?;
    }
    Ok(())
}

fn record_of(row: RevisionRow, full: bool) -> Result<RevisionRecord, StoreError> {
    let revision = row.revision;
    let layers = serde_json::from_str(&row.layers)
        .map_err(|e| StoreError::Corrupt(format!("layers of revision {revision}: {e}")))?;
    let (config, spec) = if full {
        let config = serde_json::from_str(&row.config)
            .map_err(|e| StoreError::Corrupt(format!("config of revision {revision}: {e}")))?;
        let spec = row
            .spec
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("spec of revision {revision}: {e}")))?;
        (Some(config), spec)
    } else {
        (None, None)
    };
    Ok(RevisionRecord {
        revision,
        hash: row.hash,
        author: row.author,
        created_at: row.created_at,
        message: row.message,
        layers,
        config,
        image: row.image,
        spec,
    })
}

/// An instance's revisions, newest first (without their configs and specs).
pub fn revisions_of(tx: &mut dyn Tx, uid: &str) -> Result<Vec<RevisionRecord>, StoreError> {
    tx.revisions(uid)?
        .into_iter()
        .map(|r| record_of(r, false))
        .collect()
}

/// One revision of an instance, in full: config, image and the instance's own spec fields
/// (`spec` is absent for revisions made before instance revisions existed).
pub fn revision_of(
    tx: &mut dyn Tx,
    uid: &str,
    revision: u64,
) -> Result<Option<RevisionRecord>, StoreError> {
    tx.revision(uid, revision)?
        .map(|r| record_of(r, true))
        .transpose()
}

/// What the replicas of the given `(instance uid, revision)` pairs run; pairs that have no
/// revision are left out.
pub fn revision_contents(
    tx: &mut dyn Tx,
    wanted: &[(String, u64)],
) -> Result<Vec<RevisionContent>, StoreError> {
    let mut out = Vec::with_capacity(wanted.len());
    for (uid, revision) in wanted {
        let Some(RevisionRow {
            config,
            image,
            env,
            resources,
            secrets,
            ..
        }) = tx.revision(uid, *revision)?
        else {
            continue;
        };
        let corrupt = |what: &str, e: serde_json::Error| {
            StoreError::Corrupt(format!(
                "{what} of revision {revision} of instance {uid}: {e}"
            ))
        };
        out.push(RevisionContent {
            uid: uid.clone(),
            revision: *revision,
            image,
            config,
            env: env
                .map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| corrupt("env", e))?,
            resources: resources
                .map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| corrupt("resources", e))?,
            secrets: secrets
                .map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| corrupt("secrets", e))?
                .unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Re-seals the secret values held by revisions (key rotation); returns how many.
pub fn reseal_revisions(
    tx: &mut dyn Tx,
    reseal: &mut dyn FnMut(&SealedValue) -> Result<String, StoreError>,
) -> Result<usize, StoreError> {
    let rows = tx.revisions_holding_secrets()?;
    let mut count = 0;
    for (uid, revision, text) in rows {
        let mut secrets: Vec<RevisionSecret> = serde_json::from_str(&text).map_err(|e| {
            StoreError::Corrupt(format!(
                "secrets of revision {revision} of instance {uid}: {e}"
            ))
        })?;
        for s in &mut secrets {
            if s.sealed.is_empty() {
                continue;
            }
            s.sealed = reseal(&SealedValue {
                tenant: s.tenant.clone(),
                project: s.project.clone(),
                name: s.name.clone(),
                key: s.key.clone(),
                sealed: s.sealed.clone(),
            })?;
            count += 1;
        }
        tx.set_revision_secrets(&uid, revision, &json_text(&secrets)?)?;
    }
    Ok(count)
}

/// Every sealed value re-sealed by `reseal` (key rotation), and the values revisions hold:
/// how many of each.
pub fn reseal_all(
    tx: &mut dyn Tx,
    reseal: &mut dyn FnMut(&SealedValue) -> Result<String, StoreError>,
) -> Result<(usize, usize), StoreError> {
    let mut values = tx.sealed_values()?;
    for v in &mut values {
        v.sealed = reseal(v)?;
    }
    for v in &values {
        tx.set_sealed(v)?;
    }
    let held = reseal_revisions(tx, reseal)?;
    Ok((values.len(), held))
}

/// A new instance takes over the volumes kept of a deleted instance of its name (the agent
/// names volumes by tenant, project and replica): they become its own retained volumes, so
/// its replicas return to them (with `whenScaled: Delete` they are let go).
fn adopt_volumes(tx: &mut dyn Tx, i: &mut OpenClawInstance) -> Result<(), StoreError> {
    let k = i.key();
    let mut kept: Vec<crate::model::RetainedVolume> = tx
        .retained_volumes(Some((&k.tenant, &k.project, &k.name)))?
        .into_iter()
        .map(|v| crate::model::RetainedVolume {
            replica: v.replica,
            ordinal: v.ordinal,
            host: v.host,
            reason: None,
            since: Some(v.since),
        })
        .collect();
    if kept.is_empty() {
        return Ok(());
    }
    kept.sort_by(|a, b| (a.ordinal, &a.host).cmp(&(b.ordinal, &b.host)));
    tx.drop_retained_volumes((&k.tenant, &k.project, &k.name), None)?;
    if i.spec.volume_retention.when_scaled == crate::model::RetentionPolicy::Retain {
        let status = i.status.get_or_insert_with(Default::default);
        for v in kept {
            if !status
                .retained_volumes
                .iter()
                .any(|o| o.ordinal == v.ordinal && o.host == v.host)
            {
                status.retained_volumes.push(v);
            }
        }
    }
    Ok(())
}

/// Records the volumes of an instance being deleted with `whenDeleted: Retain`: every
/// placed replica's and every volume already retained from a scale-down.
fn keep_volumes_of(tx: &mut dyn Tx, o: &StoredObject, now: &str) -> Result<(), StoreError> {
    let i = instance_of(o)?;
    if i.spec.volume_retention.when_deleted != crate::model::RetentionPolicy::Retain {
        return Ok(());
    }
    let Some(status) = &i.status else {
        return Ok(());
    };
    let placed = status
        .replica_status
        .iter()
        .filter_map(|r| Some((r.name.as_str(), r.ordinal, r.host.as_deref()?)));
    let kept = status
        .retained_volumes
        .iter()
        .map(|v| (v.replica.as_str(), v.ordinal, v.host.as_str()));
    for (replica, ordinal, host) in placed.chain(kept) {
        tx.keep_volume(&DeletedVolume {
            instance_uid: o.uid.clone(),
            tenant: o.key.tenant.clone(),
            project: o.key.project.clone(),
            instance: o.key.name.clone(),
            replica: replica.to_string(),
            ordinal,
            host: host.to_string(),
            since: now.to_string(),
        })?;
    }
    Ok(())
}

/// Fills in revisions for instances written before the config center existed (migration 4).
pub fn backfill(tx: &mut dyn Tx, schema: &Schema, now: &str) -> Result<(), StoreError> {
    let all = tx.instances(Reach::All)?;
    let keys: Vec<ObjectKey> = all.into_iter().map(|o| o.key).collect();
    let index = tx.index()?;
    let note = ChangeNote::system("revision of the config in effect when revisions began");
    for k in keys {
        if let Err(e) = revise(
            tx,
            std::slice::from_ref(&k),
            &note,
            schema,
            index,
            now,
            &|_, e| e,
        ) {
            tracing::warn!(instance = %k, error = %e, "no first config revision: its effective config does not pass the checks");
        }
    }
    Ok(())
}

/// Fills in the instance-revision columns of revisions made before them (migration 5): the
/// newest revision of each instance gets everything it runs now (so that an unchanged
/// instance gets no new revision), older ones keep only their config (the book renders
/// them with the instance's current image, env and resources).
pub fn backfill_instance_revisions(tx: &mut dyn Tx) -> Result<(), StoreError> {
    let mut cache = LayerCache::default();
    for o in tx.instances(Reach::All)? {
        let Some(mut row) = tx.latest_revision(&o.uid)? else {
            continue;
        };
        let i = instance_of(&o)?;
        let layers = layers_in(tx, &mut cache, &i)?;
        let effective = configcenter::render(&layers);
        let content = content_of(tx, &mut cache, &i, &effective)?;
        if content.config_hash != row.hash {
            // The layers changed without a revision (the write was refused since): the
            // newest revision keeps its config and gets a content hash of its own.
            tracing::warn!(instance = %o.key, "the newest config revision is not the config in effect; the next write makes a new revision");
            continue;
        }
        row.image = Some(content.image);
        row.env = Some(content.env);
        row.resources = Some(content.resources);
        row.secrets = Some(json_text(&content.secrets)?);
        row.spec = Some(content.spec);
        row.content_hash = content.content_hash;
        tx.drop_revisions(&o.uid, Some(row.revision))?;
        tx.insert_revision(&row)?;
    }
    Ok(())
}
