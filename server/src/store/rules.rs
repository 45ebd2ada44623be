//! The rules of a write, once for every engine: admission, parents and children, quotas,
//! secrets kept apart, revisions, join tokens, the audit chain, and what a change moves.
//! They run inside an engine's write transaction ([`super::backend::Tx`]) with the next index.

use std::collections::{BTreeMap, HashMap};

use super::backend::Tx;
use super::revisions::ChangeNote;
use super::{
    JoinRefusal, Outcome, StoreError, StoredObject, TokenKind, TokenRecord, Usage, WriteMode,
    WriteResult, admit,
};
use crate::audit::{AuditEntry, AuditRecord, CHAIN_VERSION, GENESIS_HASH, record_hash};
use crate::model::{
    FieldProblem, Kind, ObjectKey, Quota, Resource, format_cpu, format_memory, parse_cpu,
    parse_memory,
};
use crate::openclaw::schema::Schema;

/// Makes the audit entries of a write from its results.
pub type WriteAudit<'a> = dyn FnMut(&[WriteResult]) -> Vec<AuditEntry> + 'a;

/// What a committed write changed, for those who wait on the store: every change moves the
/// index; one that may change what hosts run moves the desired index too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Effect {
    Unchanged,
    /// Observed state only: a replica's or host's status.
    Observed,
    Desired,
}

impl Effect {
    /// The effect of writing or deleting `keys` whole: hosts are observed state (no host's
    /// assignments are made from a Host object); every other kind may reach assignments
    /// (instances directly, templates and secrets through the revisions they make).
    pub fn of_keys<'a>(keys: impl IntoIterator<Item = &'a ObjectKey>) -> Effect {
        keys.into_iter()
            .map(|k| match k.kind {
                Kind::Host => Effect::Observed,
                Kind::Tenant
                | Kind::Project
                | Kind::OpenClawInstance
                | Kind::ConfigTemplate
                | Kind::Secret
                | Kind::Rollout => Effect::Desired,
            })
            .max()
            .unwrap_or(Effect::Unchanged)
    }

    /// The effect of an in-place update (status, or a host's spec) from `before` to `after`:
    /// desired only when an instance's [`crate::model::OpenClawInstance::assigned_view`]
    /// changed. Updates make no revisions and touch no sealed values, so no other kind's
    /// update reaches assignments.
    pub fn of_update(before: &Resource, after: &Resource) -> Effect {
        match (before, after) {
            _ if before == after => Effect::Unchanged,
            (Resource::OpenClawInstance(b), Resource::OpenClawInstance(a))
                if b.assigned_view() == a.assigned_view() =>
            {
                Effect::Observed
            }
            (Resource::OpenClawInstance(_), _) => Effect::Desired,
            _ => Effect::Observed,
        }
    }
}

pub fn in_batch(index: usize, e: StoreError) -> StoreError {
    StoreError::InBatch {
        index,
        source: Box::new(e),
    }
}

/// What one all-or-nothing write did: one result per request (in request order), the audit
/// records appended, and what it changed.
pub struct Written {
    pub results: Vec<WriteResult>,
    pub records: Vec<AuditRecord>,
    pub effect: Effect,
}

/// [`super::Store::write`] inside `tx` at index `next`, with the audit entries `audit` makes
/// of the results appended (only when something changed and it is no dry run).
#[allow(clippy::too_many_arguments)]
pub fn write_batch(
    tx: &mut dyn Tx,
    batch: &[(Resource, WriteMode)],
    dry_run: bool,
    note: &ChangeNote,
    schema: &Schema,
    next: u64,
    now: &str,
    audit: Option<&mut WriteAudit<'_>>,
) -> Result<Written, StoreError> {
    let keys: Vec<ObjectKey> = batch.iter().map(|(r, _)| r.key()).collect();
    let mut seen: HashMap<&ObjectKey, usize> = HashMap::new();
    let mut dupes = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        if let Some(first) = seen.insert(k, i) {
            dupes.push(FieldProblem::new(
                format!("items[{i}]"),
                format!("names {k} again (as items[{first}] does)"),
            ));
        }
    }
    if !dupes.is_empty() {
        return Err(StoreError::Invalid(dupes));
    }
    // Parents before children, otherwise in request order.
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| batch[i].0.kind().apply_order());
    // The tenants and projects whose usage the batch may change, for the quota check.
    let mut owners: Vec<ObjectKey> = Vec::new();
    for k in keys.iter().filter(|k| k.kind == Kind::OpenClawInstance) {
        for owner in [
            ObjectKey::cluster(Kind::Tenant, &k.tenant),
            ObjectKey::project(&k.tenant, &k.project),
        ] {
            if !owners.contains(&owner) {
                owners.push(owner);
            }
        }
    }
    // Usage before the write, of the owners that have a quota (or may get one in this batch):
    // only those are checked.
    let mut before = Vec::with_capacity(owners.len());
    for owner in &owners {
        let limited = keys.contains(owner) || quota_in(tx, owner)?.is_some();
        let u = match owner.kind {
            _ if !limited => None,
            Kind::Project => Some(tx.usage(&owner.tenant, Some(&owner.name))?),
            _ => Some(tx.usage(&owner.name, None)?),
        };
        before.push(u);
    }
    let mut results: Vec<Option<WriteResult>> = vec![None; batch.len()];
    let mut changed = false;
    for &i in &order {
        let (res, mode) = &batch[i];
        let key = &keys[i];
        if let Some(parent) = key.parent()
            && !tx.exists(&parent)?
        {
            return Err(in_batch(
                i,
                StoreError::ParentMissing {
                    key: key.clone(),
                    parent: Box::new(parent),
                },
            ));
        }
        let existing = tx.get(key)?;
        let previous_generation = existing.as_ref().map(|e| e.generation);
        // A secret's sealed values are kept apart; the object keeps the fingerprints, which
        // decide whether anything changed.
        let mut incoming_secret = None;
        let res = match res {
            Resource::Secret(s) => {
                let mut s = s.clone();
                let data = std::mem::take(&mut s.spec.data);
                incoming_secret = Some(data);
                std::borrow::Cow::Owned(Resource::Secret(s))
            }
            other => std::borrow::Cow::Borrowed(other),
        };
        let mut admitted = admit(existing.as_ref(), &res, *mode, next, now, || {
            uuid::Uuid::new_v4().to_string()
        })
        .map_err(|e| in_batch(i, e))?;
        let object = match (admitted.outcome, existing) {
            (Outcome::Unchanged, Some(existing)) => existing,
            _ => {
                if let (Resource::Secret(s), Some(data)) =
                    (&mut admitted.resource, incoming_secret.take())
                {
                    s.spec.data = data;
                    super::revisions::seal_secret(tx, s).map_err(|e| in_batch(i, e))?;
                }
                check_project_quota(tx, &admitted.resource).map_err(|e| in_batch(i, e))?;
                let o = to_stored(&admitted.resource)?;
                tx.put(&o, Usage::of(&admitted.resource))?;
                changed = true;
                o
            }
        };
        results[i] = Some(WriteResult {
            key: key.clone(),
            outcome: admitted.outcome,
            object,
            previous_generation,
        });
    }
    if changed {
        let changed_keys: Vec<ObjectKey> = results
            .iter()
            .flatten()
            .filter(|r| r.outcome != Outcome::Unchanged)
            .map(|r| r.key.clone())
            .collect();
        super::revisions::revise(tx, &changed_keys, note, schema, next, now, &|k, e| {
            // Name the document whose change the problem comes from.
            match keys.iter().position(|b| b == k) {
                Some(at) if batch.len() > 1 => in_batch(at, e),
                _ => e,
            }
        })?;
        // The objects as stored (revisions write the instances' status).
        for r in results.iter_mut().flatten() {
            if r.key.kind == Kind::OpenClawInstance
                && let Some(o) = tx.get(&r.key)?
            {
                r.object = o;
            }
        }
    }
    let mut records = Vec::new();
    if changed
        && !dry_run
        && let Some(audit) = audit
    {
        let written: Vec<WriteResult> = results.iter().flatten().cloned().collect();
        records = append_audit(tx, &audit(&written))?;
    }
    if changed {
        for (owner, before) in owners.iter().zip(&before) {
            let Some(before) = before else { continue };
            check_quota(tx, owner, *before).map_err(|e| {
                // Name the first document that adds to this owner's usage.
                let item = keys.iter().position(|k| {
                    k.kind == Kind::OpenClawInstance
                        && k.tenant == owner.tenant_name()
                        && (owner.kind == Kind::Tenant || k.project == owner.name)
                });
                match item {
                    Some(i) if batch.len() > 1 => in_batch(i, e),
                    _ => e,
                }
            })?;
        }
    }
    let effect = match changed {
        false => Effect::Unchanged,
        true => Effect::of_keys(
            results
                .iter()
                .flatten()
                .filter(|r| r.outcome != Outcome::Unchanged)
                .map(|r| &r.key),
        ),
    };
    Ok(Written {
        results: results.into_iter().flatten().collect(),
        records,
        effect,
    })
}

/// Deletes one object inside `tx`; refuses while it has children (deletes earlier in the same
/// transaction count as done) or while it is in use. Returns the generation deleted.
pub fn delete_one(
    tx: &mut dyn Tx,
    key: &ObjectKey,
    expected: Option<u64>,
) -> Result<i64, StoreError> {
    let existing = tx
        .get(key)?
        .ok_or_else(|| StoreError::NotFound(key.clone()))?;
    let generation = existing.generation;
    if let Some(given) = expected.filter(|rv| *rv != 0)
        && given != existing.resource_version
    {
        return Err(StoreError::Conflict {
            key: key.clone(),
            given,
            current: existing.resource_version,
        });
    }
    let children = match key.kind {
        Kind::Tenant => Some(("projects", tx.count(Kind::Project, &key.name, None)?)),
        Kind::Project => Some((
            "instances",
            tx.count(Kind::OpenClawInstance, &key.tenant, Some(&key.name))?,
        )),
        Kind::OpenClawInstance
        | Kind::Host
        | Kind::ConfigTemplate
        | Kind::Secret
        | Kind::Rollout => None,
    };
    // Secrets live in a tenant or project as well: they go first too.
    let children = match (children, key.kind) {
        (Some((_, 0)), Kind::Tenant) => {
            Some(("secrets", tx.count(Kind::Secret, &key.name, Some(""))?))
        }
        (Some((_, 0)), Kind::Project) => Some((
            "secrets",
            tx.count(Kind::Secret, &key.tenant, Some(&key.name))?,
        )),
        (c, _) => c,
    };
    if let Some((child, count)) = children.filter(|(_, n)| *n > 0) {
        return Err(StoreError::HasChildren {
            key: key.clone(),
            count: count as usize,
            child,
        });
    }
    super::revisions::before_delete(tx, key)?;
    tx.remove(&existing)?;
    Ok(generation)
}

/// [`super::Store::delete_batch`] inside `tx`: per key whether it was deleted, the audit
/// records appended, and what it changed.
pub fn delete_batch(
    tx: &mut dyn Tx,
    keys: &[ObjectKey],
    skip_missing: bool,
    dry_run: bool,
    mut audit: Option<super::DeleteAudit<'_>>,
) -> Result<(Vec<bool>, Vec<AuditRecord>, Effect), StoreError> {
    let mut deleted = Vec::with_capacity(keys.len());
    let mut entries = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        if skip_missing && !tx.exists(key)? {
            deleted.push(false);
            continue;
        }
        let generation = delete_one(tx, key, None).map_err(|e| in_batch(index, e))?;
        if let Some(audit) = audit.as_mut() {
            entries.extend(audit(key, Some(generation)));
        }
        deleted.push(true);
    }
    let changed = deleted.iter().any(|d| *d);
    let mut records = Vec::new();
    if changed && !dry_run && !entries.is_empty() {
        records = append_audit(tx, &entries)?;
    }
    let effect = Effect::of_keys(
        keys.iter()
            .zip(&deleted)
            .filter(|(_, d)| **d)
            .map(|(k, _)| k),
    );
    Ok((deleted, records, effect))
}

/// What the updates of one transaction read from and hand to the store's cache of decoded
/// objects ([`super::decoded::DecodedCache`]): an object the cache holds at the version read
/// is copied instead of decoded, and each object written is kept decoded, for the cache to take
/// once the transaction has committed.
pub struct Seeds<'a> {
    cache: &'a super::decoded::DecodedCache,
    written: Vec<super::decoded::Decoded>,
}

impl<'a> Seeds<'a> {
    pub fn new(cache: &'a super::decoded::DecodedCache) -> Seeds<'a> {
        Seeds {
            cache,
            written: Vec::new(),
        }
    }

    /// The objects written: for the cache, after the commit.
    pub fn into_written(self) -> Vec<super::decoded::Decoded> {
        self.written
    }

    /// The object at `key` as stored now, decoded, or `None` when there is none: the cache's
    /// copy when it holds the stored version (only the row's uid and version are read), else
    /// the row, read and decoded.
    fn current(&self, tx: &mut dyn Tx, key: &ObjectKey) -> Result<Option<Resource>, StoreError> {
        let Some((uid, version)) = tx.head(key)? else {
            return Ok(None);
        };
        if let Some(Ok(r)) = self
            .cache
            .get(key, &uid, version)
            .as_deref()
            .map(|d| &d.resource)
        {
            return Ok(Some(r.clone()));
        }
        tx.get(key)?.map(|existing| existing.resource()).transpose()
    }
}

/// Applies `change` to one stored object and writes it if it changed; server-owned metadata is
/// kept and `resourceVersion` set to `next`. The object written is handed to `seeds`.
fn update_one(
    tx: &mut dyn Tx,
    key: &ObjectKey,
    before: Resource,
    next: u64,
    change: &mut dyn FnMut(&mut Resource) -> bool,
    seeds: &mut Seeds<'_>,
) -> Result<Effect, StoreError> {
    let mut after = before.clone();
    if !change(&mut after) || after == before {
        return Ok(Effect::Unchanged);
    }
    if after.key() != *key {
        return Err(StoreError::Backend(format!(
            "an update of {key} tried to rename it to {}",
            after.key()
        )));
    }
    let m = after.metadata_mut();
    m.resource_version = Some(next);
    let bm = before.metadata();
    m.uid.clone_from(&bm.uid);
    m.generation = bm.generation;
    m.created_at.clone_from(&bm.created_at);
    let stored = to_stored(&after)?;
    // What the cache is given must be what a read of the row decodes to.
    #[cfg(debug_assertions)]
    assert!(
        stored.resource().ok().as_ref() == Some(&after),
        "{key} does not decode to what was written"
    );
    tx.put(&stored, Usage::of(&after))?;
    let effect = Effect::of_update(&before, &after);
    seeds.written.push(super::decoded::Decoded::written(after));
    Ok(effect)
}

/// [`super::Store::update`] inside `tx`: the object must exist.
pub fn update_key(
    tx: &mut dyn Tx,
    key: &ObjectKey,
    next: u64,
    change: &mut dyn FnMut(&mut Resource) -> bool,
    seeds: &mut Seeds<'_>,
) -> Result<Effect, StoreError> {
    let before = seeds
        .current(tx, key)?
        .ok_or_else(|| StoreError::NotFound(key.clone()))?;
    update_one(tx, key, before, next, change, seeds)
}

/// [`super::Store::update_many`] inside `tx`: keys that no longer exist are skipped.
pub fn update_many(
    tx: &mut dyn Tx,
    keys: &[ObjectKey],
    next: u64,
    change: &mut dyn FnMut(&mut Resource) -> bool,
    seeds: &mut Seeds<'_>,
) -> Result<Effect, StoreError> {
    let mut effect = Effect::Unchanged;
    for key in keys {
        if let Some(before) = seeds.current(tx, key)? {
            effect = effect.max(update_one(tx, key, before, next, change, seeds)?);
        }
    }
    Ok(effect)
}

/// Checks a join token and uses it up by one, inside the caller's transaction.
pub fn use_join_token(tx: &mut dyn Tx, hash: &str, now: i64) -> Result<TokenRecord, StoreError> {
    let refuse = |r| Err(StoreError::JoinRefused(r));
    let Some(mut t) = tx.token_by_hash(hash)? else {
        return refuse(JoinRefusal::Unknown);
    };
    if t.kind != TokenKind::Join {
        return refuse(JoinRefusal::NotAJoinToken);
    }
    if t.revoked {
        return refuse(JoinRefusal::Revoked);
    }
    if t.expires_at.is_some_and(|exp| exp <= now) {
        return refuse(JoinRefusal::Expired);
    }
    if let Some(uses) = t.uses_remaining {
        if uses <= 0 {
            return refuse(JoinRefusal::UsedUp);
        }
        t.uses_remaining = Some(uses - 1);
        tx.set_token_uses(&t.id, uses - 1)?;
    }
    Ok(t)
}

/// [`super::Store::enroll_host`] inside `tx` at index `next`.
pub fn enroll_host(
    tx: &mut dyn Tx,
    join_token_hash: &str,
    now: i64,
    host: &Resource,
    next: u64,
    created_at: &str,
) -> Result<StoredObject, StoreError> {
    let key = host.key();
    if key.kind != Kind::Host {
        return Err(StoreError::Backend(format!(
            "enrollment creates hosts, not {key}"
        )));
    }
    use_join_token(tx, join_token_hash, now)?;
    let existing = tx.get(&key)?;
    let admitted = admit(
        existing.as_ref(),
        host,
        WriteMode::Create,
        next,
        created_at,
        || uuid::Uuid::new_v4().to_string(),
    )?;
    // The server's own write: the status the host starts with is kept (admission drops the
    // status of what people write).
    let mut created = admitted.resource;
    if let (Resource::Host(h), Resource::Host(given)) = (&mut created, host) {
        h.status.clone_from(&given.status);
    }
    let object = to_stored(&created)?;
    tx.put(&object, Usage::default())?;
    Ok(object)
}

/// Appends `entries`, in order, inside the caller's transaction (so that an entry can commit
/// together with the change it records), chained by hash to the record before. Every entry is
/// normalised first ([`AuditEntry::normalize`]); if any is invalid nothing is written and every
/// problem is returned, by `entries[i].field`.
pub fn append_audit(
    tx: &mut dyn Tx,
    entries: &[AuditEntry],
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut normalized = Vec::with_capacity(entries.len());
    let mut problems = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match e.normalize() {
            Ok(e) => normalized.push(e),
            Err(p) => problems.extend(p.into_iter().map(|p| p.under(&format!("entries[{i}]")))),
        }
    }
    if !problems.is_empty() {
        return Err(StoreError::Invalid(problems));
    }
    if normalized.is_empty() {
        return Ok(Vec::new());
    }
    let (last_seq, last_hash, written) = tx.audit_head()?;
    let mut prev = last_hash.unwrap_or_else(|| GENESIS_HASH.to_string());
    // After rows were cut off the end, numbering goes on from the count written, so the gap
    // stays visible.
    let mut seq = last_seq.max(written);
    let mut out = Vec::with_capacity(normalized.len());
    for entry in normalized {
        seq += 1;
        let hash = record_hash(CHAIN_VERSION, &prev, seq, &entry)
            .ok_or_else(|| StoreError::Backend("the audit chain version is unknown".into()))?;
        out.push(AuditRecord {
            seq,
            entry,
            chain_version: CHAIN_VERSION,
            prev_hash: std::mem::replace(&mut prev, hash.clone()),
            hash,
        });
    }
    tx.audit_insert(&out)?;
    tx.set_audit_written(seq)?;
    Ok(out)
}

/// An object as stored, from a resource whose server-owned metadata is set.
pub fn to_stored(r: &Resource) -> Result<StoredObject, StoreError> {
    let m = r.metadata();
    let json = serde_json::to_string(r)
        .map_err(|e| StoreError::Backend(format!("encoding {}: {e}", r.key())))?;
    Ok(StoredObject {
        key: r.key(),
        uid: m.uid.clone().unwrap_or_default(),
        generation: m.generation.unwrap_or(1),
        resource_version: m.resource_version.unwrap_or(0),
        labels: BTreeMap::from(&m.labels),
        json,
    })
}

/// The quota set on a tenant or project object, if any.
fn quota_in(tx: &mut dyn Tx, key: &ObjectKey) -> Result<Option<Quota>, StoreError> {
    let Some(o) = tx.get(key)? else {
        return Ok(None);
    };
    Ok(match o.resource()? {
        Resource::Tenant(t) => t.spec.quota,
        Resource::Project(p) => p.spec.quota,
        _ => None,
    })
}

/// A quota as numbers: `None` where a dimension is unlimited.
fn quota_limits(q: &Quota) -> [(&'static str, Option<i64>); 4] {
    let cpu = q
        .cpu
        .as_ref()
        .and_then(|c| parse_cpu(c.as_str()).ok())
        .map(|v| v as i64);
    let mem = q
        .memory
        .as_ref()
        .and_then(|m| parse_memory(m.as_str()).ok())
        .map(|v| v as i64);
    [
        ("instances", q.instances),
        ("replicas", q.replicas),
        ("cpu", cpu),
        ("memory", mem),
    ]
}

fn usage_values(u: &Usage) -> [i64; 4] {
    [u.instances, u.replicas, u.cpu_millis, u.memory_bytes]
}

fn format_amount(resource: &str, v: i64) -> String {
    let v = v.max(0) as u64;
    match resource {
        "cpu" => format_cpu(v),
        "memory" => format_memory(v),
        _ => v.to_string(),
    }
}

/// Refuses a write that grows a tenant's or project's usage past its quota. `before` is the
/// usage read in the same transaction before the write; shrinking, or staying put, is always
/// allowed, so lowering a quota below what runs blocks only growth.
fn check_quota(tx: &mut dyn Tx, owner: &ObjectKey, before: Usage) -> Result<(), StoreError> {
    let Some(quota) = quota_in(tx, owner)? else {
        return Ok(());
    };
    let project = (owner.kind == Kind::Project).then_some(owner.name.as_str());
    let tenant = if owner.kind == Kind::Project {
        &owner.tenant
    } else {
        &owner.name
    };
    let after = tx.usage(tenant, project)?;
    let (b, a) = (usage_values(&before), usage_values(&after));
    for (i, (resource, limit)) in quota_limits(&quota).into_iter().enumerate() {
        let Some(limit) = limit else { continue };
        if a[i] > limit && a[i] > b[i] {
            let scope = match project {
                Some(p) => format!("project {tenant}/{p}"),
                None => format!("tenant {tenant}"),
            };
            return Err(StoreError::QuotaExceeded {
                scope,
                resource,
                requested: format_amount(resource, a[i] - b[i]),
                free: format_amount(resource, limit - b[i]),
                limit: format_amount(resource, limit),
            });
        }
    }
    Ok(())
}

/// Refuses a project quota larger than its tenant's in any dimension the tenant limits.
fn check_project_quota(tx: &mut dyn Tx, project: &Resource) -> Result<(), StoreError> {
    let Resource::Project(p) = project else {
        return Ok(());
    };
    let Some(own) = &p.spec.quota else {
        return Ok(());
    };
    let tenant_key =
        ObjectKey::cluster(Kind::Tenant, p.metadata.tenant.clone().unwrap_or_default());
    let Some(parent) = quota_in(tx, &tenant_key)? else {
        return Ok(());
    };
    for ((resource, mine), (_, theirs)) in quota_limits(own).into_iter().zip(quota_limits(&parent))
    {
        if let (Some(mine), Some(theirs)) = (mine, theirs)
            && mine > theirs
        {
            return Err(StoreError::QuotaAboveParent(format!(
                "{resource} {} is more than the {} of tenant {}'s quota",
                format_amount(resource, mine),
                format_amount(resource, theirs),
                tenant_key.name
            )));
        }
    }
    Ok(())
}
