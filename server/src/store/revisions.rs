//! Config revisions and sealed secret values in SQLite, kept in the transaction of the write
//! that causes them: a change to any layer validates and revises every instance it reaches,
//! or nothing is written.

use std::collections::{HashMap, HashSet};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use super::{StoreError, StoredObject};
use crate::configcenter::{self, LayerRef, SecretLookup};
use crate::model::{
    ConfigTemplate, FieldProblem, Kind, ObjectKey, OpenClawInstance, Project, Resource,
    SEALED_PREFIX, Secret, Tenant,
};
use crate::openclaw::schema::Schema;
use crate::openclaw::secretref::SecretRef;

/// Tables of migration 4.
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

/// Revisions kept per instance; older ones are pruned.
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

/// Moves a secret's sealed `data` into `secret_values` (replacing its previous set) and
/// leaves only the fingerprints in the object. Values that are not sealed are refused: the
/// API seals before it writes, and plaintext must never reach the database.
pub fn store_secret_values(tx: &Transaction<'_>, secret: &mut Secret) -> Result<(), StoreError> {
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
    tx.prepare_cached(
        "DELETE FROM secret_values WHERE tenant = ?1 AND project = ?2 AND name = ?3",
    )?
    .execute(params![key.tenant, key.project, key.name])?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO secret_values (tenant, project, name, key, sealed) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (k, v) in &data {
        insert.execute(params![key.tenant, key.project, key.name, k, v.0])?;
    }
    Ok(())
}

/// Every sealed value (for the assignment book and key rotation).
pub fn sealed_values(conn: &Connection) -> Result<Vec<SealedValue>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT tenant, project, name, key, sealed FROM secret_values ORDER BY tenant, project, name, key",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(SealedValue {
            tenant: r.get(0)?,
            project: r.get(1)?,
            name: r.get(2)?,
            key: r.get(3)?,
            sealed: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Replaces sealed values by key (after a re-seal with a new data key).
pub fn replace_sealed(tx: &Transaction<'_>, values: &[SealedValue]) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(
        "UPDATE secret_values SET sealed = ?5 WHERE tenant = ?1 AND project = ?2 AND name = ?3 AND key = ?4",
    )?;
    for v in values {
        stmt.execute(params![v.tenant, v.project, v.name, v.key, v.sealed])?;
    }
    Ok(())
}

fn instance_of(o: &StoredObject) -> Result<OpenClawInstance, StoreError> {
    match o.resource()? {
        Resource::OpenClawInstance(i) => Ok(i),
        _ => Err(StoreError::Corrupt(format!("{} is not an instance", o.key))),
    }
}

fn instances_where(
    conn: &Connection,
    sql_where: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<StoredObject>, StoreError> {
    let sql = format!(
        "SELECT kind, tenant, project, name, uid, generation, resource_version, labels, body
         FROM objects WHERE kind = 'OpenClawInstance' AND {sql_where} ORDER BY tenant, project, name"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(args, super::sqlite::row_to_object)?;
    let mut out = Vec::new();
    for row in rows {
        let (kind, k, s) = row?;
        out.push(super::sqlite::assemble(kind, k, s)?);
    }
    Ok(out)
}

/// The instances whose effective config a change of `key` may change (or whose references
/// it may break).
fn reached_by(conn: &Connection, key: &ObjectKey) -> Result<Vec<StoredObject>, StoreError> {
    match key.kind {
        Kind::OpenClawInstance => Ok(super::sqlite::get_in(conn, key)?.into_iter().collect()),
        Kind::Tenant => instances_where(conn, "tenant = ?1", &[&key.name]),
        Kind::Project => instances_where(
            conn,
            "tenant = ?1 AND project = ?2",
            &[&key.tenant, &key.name],
        ),
        Kind::ConfigTemplate => instances_where(
            conn,
            &format!(
                "COALESCE(json_extract(body, '$.spec.configTemplate'), '{}') = ?1",
                configcenter::DEFAULT_TEMPLATE
            ),
            &[&key.name],
        ),
        Kind::Secret if key.project.is_empty() => {
            instances_where(conn, "tenant = ?1", &[&key.tenant])
        }
        Kind::Secret => instances_where(
            conn,
            "tenant = ?1 AND project = ?2",
            &[&key.tenant, &key.project],
        ),
        Kind::Host | Kind::Rollout => Ok(Vec::new()),
    }
}

/// Reads objects of the layers once per change.
struct LayerCache<'c> {
    conn: &'c Connection,
    templates: HashMap<String, Option<ConfigTemplate>>,
    tenants: HashMap<String, Option<Tenant>>,
    projects: HashMap<(String, String), Option<Project>>,
    secrets: HashMap<ObjectKey, Option<Vec<String>>>,
}

impl<'c> LayerCache<'c> {
    fn new(conn: &'c Connection) -> Self {
        LayerCache {
            conn,
            templates: HashMap::new(),
            tenants: HashMap::new(),
            projects: HashMap::new(),
            secrets: HashMap::new(),
        }
    }

    fn read(&self, key: &ObjectKey) -> Result<Option<Resource>, StoreError> {
        super::sqlite::get_in(self.conn, key)?
            .map(|o| o.resource())
            .transpose()
    }

    fn template(&mut self, name: &str) -> Result<Option<ConfigTemplate>, StoreError> {
        if !self.templates.contains_key(name) {
            let t = match self.read(&ObjectKey::cluster(Kind::ConfigTemplate, name))? {
                Some(Resource::ConfigTemplate(t)) => Some(t),
                _ => None,
            };
            self.templates.insert(name.to_string(), t);
        }
        Ok(self.templates[name].clone())
    }

    fn tenant(&mut self, name: &str) -> Result<Option<Tenant>, StoreError> {
        if !self.tenants.contains_key(name) {
            let t = match self.read(&ObjectKey::cluster(Kind::Tenant, name))? {
                Some(Resource::Tenant(t)) => Some(t),
                _ => None,
            };
            self.tenants.insert(name.to_string(), t);
        }
        Ok(self.tenants[name].clone())
    }

    fn project(&mut self, tenant: &str, name: &str) -> Result<Option<Project>, StoreError> {
        let k = (tenant.to_string(), name.to_string());
        if !self.projects.contains_key(&k) {
            let p = match self.read(&ObjectKey::project(tenant, name))? {
                Some(Resource::Project(p)) => Some(p),
                _ => None,
            };
            self.projects.insert(k.clone(), p);
        }
        Ok(self.projects[&k].clone())
    }

    fn secret_keys(&mut self, key: &ObjectKey) -> Result<Option<Vec<String>>, StoreError> {
        if !self.secrets.contains_key(key) {
            let keys = match self.read(key)? {
                Some(Resource::Secret(s)) => Some(s.spec.keys.keys().cloned().collect()),
                _ => None,
            };
            self.secrets.insert(key.clone(), keys);
        }
        Ok(self.secrets[key].clone())
    }

    fn lookup(
        &mut self,
        tenant: &str,
        project: &str,
        r: &SecretRef,
    ) -> Result<SecretLookup, StoreError> {
        for k in configcenter::secret_keys(tenant, project, r) {
            if let Some(keys) = self.secret_keys(&k)? {
                return Ok(SecretLookup::Found { keys });
            }
        }
        Ok(SecretLookup::Missing)
    }
}

/// The layers of a stored instance, read through `cache`.
fn layers_in(
    cache: &mut LayerCache<'_>,
    i: &OpenClawInstance,
) -> Result<Vec<configcenter::OwnedLayer>, StoreError> {
    let k = i.key();
    let template = cache.template(configcenter::template_name(i))?;
    let tenant = cache.tenant(&k.tenant)?;
    let project = cache.project(&k.tenant, &k.project)?;
    Ok(configcenter::layers_of(
        i,
        template.as_ref(),
        tenant.as_ref(),
        project.as_ref(),
    ))
}

/// The newest revision of an instance: number and hash.
fn latest(conn: &Connection, uid: &str) -> Result<Option<(u64, String)>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT revision, hash FROM config_revisions WHERE instance_uid = ?1 ORDER BY revision DESC LIMIT 1",
        )?
        .query_row([uid], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
        .optional()?)
}

/// After the objects of a write are stored (inside its transaction): checks and revises the
/// effective config of every instance the changed objects reach. A problem anywhere fails
/// the whole write, naming the instance and the key. Returns the instances revised, with their
/// new revision, and writes each new revision number into the instance's status.
pub fn revise(
    tx: &Transaction<'_>,
    changed: &[ObjectKey],
    note: &ChangeNote,
    schema: &Schema,
    index: u64,
    now: &str,
    blame: &dyn Fn(&ObjectKey, StoreError) -> StoreError,
) -> Result<Vec<(ObjectKey, u64)>, StoreError> {
    let mut cache = LayerCache::new(tx);
    let mut seen = HashSet::new();
    let mut revised = Vec::new();
    for key in changed {
        if key.kind == Kind::OpenClawInstance
            && let Some(o) = super::sqlite::get_in(tx, key)?
        {
            let i = instance_of(&o)?;
            let name = configcenter::template_name(&i);
            if i.spec.config_template.is_some() && cache.template(name)?.is_none() {
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
            let layers = layers_in(&mut cache, &i)?;
            let effective = configcenter::render(&layers);
            let (tenant, project) = (o.key.tenant.clone(), o.key.project.clone());
            let mut lookup_err = None;
            let problems =
                configcenter::check(&i, &layers, &effective, schema, &mut |r| match cache
                    .lookup(&tenant, &project, r)
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
            let text = serde_json::to_string(&effective)
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            let hash = configcenter::config_text_hash(&text);
            let last = latest(tx, &o.uid)?;
            if last.as_ref().is_some_and(|(_, h)| *h == hash) {
                continue;
            }
            let revision = last.map_or(1, |(n, _)| n + 1);
            let layer_refs = serde_json::to_string(&configcenter::layer_refs(&layers))
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            let message = note.message.clone().unwrap_or_else(|| {
                if revision == 1 {
                    "created".into()
                } else if *key == o.key {
                    format!("{} changed", o.key)
                } else {
                    format!("{key} changed")
                }
            });
            tx.prepare_cached(
                "INSERT INTO config_revisions (instance_uid, revision, tenant, project, instance, config, hash, layers, author, message, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                o.uid,
                revision as i64,
                o.key.tenant,
                o.key.project,
                o.key.name,
                text,
                hash,
                layer_refs,
                if note.author.is_empty() { "system" } else { note.author.as_str() },
                message,
                now
            ])?;
            tx.prepare_cached(
                "DELETE FROM config_revisions WHERE instance_uid = ?1 AND revision <= ?2",
            )?
            .execute(params![o.uid, revision as i64 - KEEP_REVISIONS])?;
            i.status
                .get_or_insert_with(Default::default)
                .config_revision = Some(revision);
            i.metadata.resource_version = Some(index);
            let r = Resource::OpenClawInstance(i);
            super::sqlite::put_in(tx, &r)?;
            revised.push((o.key.clone(), revision));
        }
    }
    // A change to a shared layer that reached several instances moves them in waves.
    super::waves::hold_revised(tx, changed, &revised, index, now)?;
    Ok(revised)
}

/// Refuses to delete a template or secret that instances still use, naming them; drops an
/// instance's revisions and a secret's values with it.
pub fn before_delete(tx: &Transaction<'_>, key: &ObjectKey) -> Result<(), StoreError> {
    const SHOWN: usize = 5;
    let users: Vec<ObjectKey> = match key.kind {
        Kind::ConfigTemplate => reached_by(tx, key)?.into_iter().map(|o| o.key).collect(),
        Kind::Secret => {
            let mut cache = LayerCache::new(tx);
            let mut users = Vec::new();
            for o in reached_by(tx, key)? {
                let i = instance_of(&o)?;
                let effective = configcenter::render(&layers_in(&mut cache, &i)?);
                let uses = configcenter::references(&i, &effective).iter().any(|r| {
                    // The reference resolves to this secret: same name, and no project
                    // secret of that name shadows a tenant-level one.
                    r.name == key.name
                        && (!key.project.is_empty()
                            || cache
                                .secret_keys(
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
            if let Some(o) = super::sqlite::get_in(tx, key)? {
                tx.prepare_cached("DELETE FROM config_revisions WHERE instance_uid = ?1")?
                    .execute([&o.uid])?;
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
        tx.prepare_cached(
            "DELETE FROM secret_values WHERE tenant = ?1 AND project = ?2 AND name = ?3",
        )?
        .execute(params![key.tenant, key.project, key.name])?;
    }
    Ok(())
}

fn record_from_row(
    r: &rusqlite::Row<'_>,
    with_config: bool,
) -> rusqlite::Result<(RevisionRecord, String, String)> {
    Ok((
        RevisionRecord {
            revision: r.get::<_, i64>(0)? as u64,
            hash: r.get(1)?,
            author: r.get(2)?,
            created_at: r.get(3)?,
            message: r.get(4)?,
            layers: Vec::new(),
            config: None,
            image: None,
            spec: None,
        },
        r.get(5)?,
        if with_config {
            r.get(6)?
        } else {
            String::new()
        },
    ))
}

fn finish(
    (mut rec, layers, config): (RevisionRecord, String, String),
    with_config: bool,
) -> Result<RevisionRecord, StoreError> {
    rec.layers = serde_json::from_str(&layers)
        .map_err(|e| StoreError::Corrupt(format!("layers of revision {}: {e}", rec.revision)))?;
    if with_config {
        rec.config = Some(serde_json::from_str(&config).map_err(|e| {
            StoreError::Corrupt(format!("config of revision {}: {e}", rec.revision))
        })?);
    }
    Ok(rec)
}

/// An instance's revisions, newest first (without their configs).
pub fn revisions_of(conn: &Connection, uid: &str) -> Result<Vec<RevisionRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT revision, hash, author, created_at, message, layers FROM config_revisions
         WHERE instance_uid = ?1 ORDER BY revision DESC",
    )?;
    let rows = stmt.query_map([uid], |r| record_from_row(r, false))?;
    rows.map(|r| finish(r?, false)).collect()
}

/// One revision of an instance, with its config.
pub fn revision_of(
    conn: &Connection,
    uid: &str,
    revision: u64,
) -> Result<Option<RevisionRecord>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT revision, hash, author, created_at, message, layers, config FROM config_revisions
             WHERE instance_uid = ?1 AND revision = ?2",
        )?
        .query_row(params![uid, revision as i64], |r| record_from_row(r, true))
        .optional()?;
    row.map(|r| finish(r, true)).transpose()
}

/// The newest revision of every instance: uid → (revision, config text).
pub fn current_configs(conn: &Connection) -> Result<HashMap<String, (u64, String)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT r.instance_uid, r.revision, r.config FROM config_revisions r
         JOIN (SELECT instance_uid, MAX(revision) AS revision FROM config_revisions GROUP BY instance_uid) m
           ON r.instance_uid = m.instance_uid AND r.revision = m.revision",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            (r.get::<_, i64>(1)? as u64, r.get::<_, String>(2)?),
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Fills in revisions for instances written before the config center existed (migration 4).
pub fn backfill(tx: &Transaction<'_>, schema: &Schema, now: &str) -> Result<(), StoreError> {
    let all = instances_where(tx, "1 = 1", &[])?;
    let keys: Vec<ObjectKey> = all.into_iter().map(|o| o.key).collect();
    let index = super::sqlite::index_in(tx)?;
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
