//! Tenant isolation in the store layer: a [`Scoped`] view of a [`Store`] that answers every
//! read and write as if objects outside the caller's [`Scope`] did not exist.
//!
//! The API hands its handlers only a `Scoped` view, built from the authenticated principal, so
//! a handler cannot reach tenant data without naming a scope; the controllers, which act for
//! the whole cluster, use the [`Store`] itself.

use std::collections::BTreeMap;

use std::sync::Arc;

use super::{
    ChangeNote, DeleteSummary, ListFilter, Store, StoreError, StoredObject, TokenRecord, Usage,
    WriteMode, WriteResult, WriteSummary,
};
use crate::audit::{AuditEntry, AuditRecord};
use crate::model::{Kind, ObjectKey, Resource};

/// The tenant data a caller may see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything (platform roles, controllers).
    Cluster,
    /// One tenant: the tenant object itself, its projects and their instances.
    Tenant(String),
    /// One project: the project, its instances, and (read-only, by RBAC) its tenant object.
    Project { tenant: String, project: String },
}

impl Scope {
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Scope::Cluster => None,
            Scope::Tenant(t) | Scope::Project { tenant: t, .. } => Some(t),
        }
    }

    pub fn project(&self) -> Option<&str> {
        match self {
            Scope::Project { project, .. } => Some(project),
            _ => None,
        }
    }

    /// Whether the object named by `key` is visible in this scope.
    pub fn sees(&self, key: &ObjectKey) -> bool {
        let (tenant, project) = match self {
            Scope::Cluster => return true,
            Scope::Tenant(t) => (t, None),
            Scope::Project { tenant, project } => (tenant, Some(project)),
        };
        match key.kind {
            Kind::Host => false,
            // Templates are platform-wide: every role reads them (RBAC keeps writes to
            // platform-admin).
            Kind::ConfigTemplate => true,
            Kind::Tenant => key.name == *tenant,
            Kind::Project => key.tenant == *tenant && project.is_none_or(|p| key.name == *p),
            // A project's member sees its project's secrets only, not the tenant-level ones.
            Kind::OpenClawInstance | Kind::Secret => {
                key.tenant == *tenant && project.is_none_or(|p| key.project == *p)
            }
            // A tenant's Rollouts; cluster-wide ones (no tenant) only to cluster-wide callers.
            Kind::Rollout => key.tenant == *tenant,
        }
    }

    /// Whether a token record belongs to this scope.
    pub fn sees_token(&self, t: &TokenRecord) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Tenant(tenant) => t.tenant.as_deref() == Some(tenant),
            Scope::Project { tenant, project } => {
                t.tenant.as_deref() == Some(tenant) && t.project.as_deref() == Some(project)
            }
        }
    }

    /// Narrows `filter` to this scope; `false` when nothing it could match is visible.
    pub fn narrow(&self, filter: &mut ListFilter) -> bool {
        let (tenant, project) = match self {
            Scope::Cluster => return true,
            Scope::Tenant(t) => (t, None),
            Scope::Project { tenant, project } => (tenant, Some(project)),
        };
        // Pins one filter field to `value`; false when the filter already asks for another.
        fn pin(field: &mut Option<String>, value: &str) -> bool {
            match field {
                Some(v) if v != value => false,
                _ => {
                    *field = Some(value.to_string());
                    true
                }
            }
        }
        match filter.kind {
            Kind::Host => false,
            Kind::ConfigTemplate => true,
            Kind::Tenant => pin(&mut filter.name, tenant),
            Kind::Project => {
                pin(&mut filter.tenant, tenant) && project.is_none_or(|p| pin(&mut filter.name, p))
            }
            Kind::OpenClawInstance | Kind::Secret => {
                pin(&mut filter.tenant, tenant)
                    && project.is_none_or(|p| pin(&mut filter.project, p))
            }
            Kind::Rollout => pin(&mut filter.tenant, tenant),
        }
    }
}

/// Makes the audit entries of a request's changes, to be stored in the same transaction.
pub trait AuditHook: Send + Sync {
    fn write_entries(&self, results: &[WriteResult]) -> Vec<AuditEntry>;
    fn delete_entries(&self, key: &ObjectKey, generation: Option<i64>) -> Vec<AuditEntry>;
    /// The records stored with the change.
    fn recorded(&self, records: Vec<AuditRecord>);
}

/// Per-instance usage maps, by tenant: the tenant's total and each project's.
pub type UsageByTenant = BTreeMap<String, (Usage, BTreeMap<String, Usage>)>;

/// A view of a [`Store`] limited to one [`Scope`].
pub struct Scoped<'a> {
    store: &'a dyn Store,
    scope: Scope,
    audit: Option<Arc<dyn AuditHook>>,
    /// Who writes through this view and why, for config revisions.
    note: ChangeNote,
}

impl<'a> Scoped<'a> {
    pub fn new(store: &'a dyn Store, scope: Scope) -> Self {
        Scoped {
            store,
            scope,
            audit: None,
            note: ChangeNote::default(),
        }
    }

    /// Changes through this view are recorded on config revisions as made by `note.author`.
    pub fn with_note(mut self, note: ChangeNote) -> Self {
        self.note = note;
        self
    }

    /// An instance's config revisions (the instance must be in scope: pass its stored uid).
    pub fn config_revisions(
        &self,
        key: &ObjectKey,
    ) -> Result<(String, Vec<super::RevisionRecord>), StoreError> {
        let o = self
            .get(key)?
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        Ok((o.uid.clone(), self.store.config_revisions(&o.uid)?))
    }

    /// One config revision of an instance in scope.
    pub fn config_revision(
        &self,
        key: &ObjectKey,
        revision: u64,
    ) -> Result<Option<super::RevisionRecord>, StoreError> {
        let o = self
            .get(key)?
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        self.store.config_revision(&o.uid, revision)
    }

    /// Changes through this view store their audit records with them.
    pub fn with_audit(mut self, hook: Option<Arc<dyn AuditHook>>) -> Self {
        self.audit = hook;
        self
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    pub fn index(&self) -> u64 {
        self.store.index()
    }

    pub fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
        if !self.scope.sees(key) {
            return Ok(None);
        }
        self.store.get(key)
    }

    pub fn get_at(&self, key: &ObjectKey) -> Result<(u64, Option<StoredObject>), StoreError> {
        if !self.scope.sees(key) {
            return Ok((self.store.index(), None));
        }
        self.store.get_at(key)
    }

    pub fn list_at(&self, filter: &ListFilter) -> Result<(u64, Vec<StoredObject>), StoreError> {
        let mut filter = filter.clone();
        if !self.scope.narrow(&mut filter) {
            return Ok((self.store.index(), Vec::new()));
        }
        self.store.list_at(&filter)
    }

    /// [`Store::scan`] within the scope.
    pub fn scan(
        &self,
        filter: &ListFilter,
        start: &mut dyn FnMut(u64) -> bool,
        each: &mut dyn FnMut(&StoredObject) -> bool,
    ) -> Result<(), StoreError> {
        let mut filter = filter.clone();
        if !self.scope.narrow(&mut filter) {
            start(self.store.index());
            return Ok(());
        }
        self.store.scan(&filter, start, each)
    }

    /// [`Store::write`]; an object outside the scope fails as if its parent did not exist
    /// (or, for a tenant, as if it did not exist), whatever the store holds.
    pub fn write(
        &self,
        batch: &[(Resource, WriteMode)],
        dry_run: bool,
    ) -> Result<WriteSummary, StoreError> {
        for (i, (r, _)) in batch.iter().enumerate() {
            let key = r.key();
            if !self.scope.sees(&key) {
                let err = match key.parent() {
                    Some(parent) => StoreError::ParentMissing {
                        key,
                        parent: Box::new(parent),
                    },
                    None => StoreError::NotFound(key),
                };
                return Err(StoreError::InBatch {
                    index: i,
                    source: Box::new(err),
                });
            }
        }
        match &self.audit {
            None => self.store.write_noted(batch, dry_run, &self.note),
            Some(hook) => {
                let (summary, records) =
                    self.store
                        .write_audited(batch, dry_run, &self.note, &mut |r| {
                            hook.write_entries(r)
                        })?;
                hook.recorded(records);
                Ok(summary)
            }
        }
    }

    /// [`Scoped::write`] with `message` on the config revisions it makes.
    pub fn write_with_message(
        &self,
        batch: &[(Resource, WriteMode)],
        message: Option<&str>,
    ) -> Result<WriteSummary, StoreError> {
        let mut noted = Scoped {
            store: self.store,
            scope: self.scope.clone(),
            audit: self.audit.clone(),
            note: self.note.clone(),
        };
        if let Some(m) = message {
            noted.note.message = Some(m.to_string());
        }
        noted.write(batch, false)
    }

    pub fn delete(&self, key: &ObjectKey, expected: Option<u64>) -> Result<u64, StoreError> {
        if !self.scope.sees(key) {
            return Err(StoreError::NotFound(key.clone()));
        }
        match &self.audit {
            None => self.store.delete(key, expected),
            Some(hook) => {
                let (index, records) = self
                    .store
                    .delete_audited(key, expected, &mut |g| hook.delete_entries(key, g))?;
                hook.recorded(records);
                Ok(index)
            }
        }
    }

    /// [`Store::delete_batch`] of objects in this scope; an object outside it is as missing.
    pub fn delete_batch(
        &self,
        keys: &[ObjectKey],
        skip_missing: bool,
        dry_run: bool,
    ) -> Result<DeleteSummary, StoreError> {
        let visible: Vec<usize> = (0..keys.len())
            .filter(|i| self.scope.sees(&keys[*i]))
            .collect();
        if !skip_missing && let Some(i) = (0..keys.len()).find(|i| !visible.contains(i)) {
            return Err(StoreError::InBatch {
                index: i,
                source: Box::new(StoreError::NotFound(keys[i].clone())),
            });
        }
        let in_scope: Vec<ObjectKey> = visible.iter().map(|i| keys[*i].clone()).collect();
        let result = match &self.audit {
            None => self
                .store
                .delete_batch(&in_scope, skip_missing, dry_run, None),
            Some(hook) => self.store.delete_batch(
                &in_scope,
                skip_missing,
                dry_run,
                Some(&mut |key, generation| hook.delete_entries(key, generation)),
            ),
        };
        // Positions in errors are those of `keys`.
        let (summary, records) = result.map_err(|e| match e {
            StoreError::InBatch { index, source } => StoreError::InBatch {
                index: visible.get(index).copied().unwrap_or(index),
                source,
            },
            other => other,
        })?;
        if let Some(hook) = &self.audit {
            hook.recorded(records);
        }
        // Back to one answer per key given.
        let mut deleted = vec![false; keys.len()];
        for (i, d) in visible.iter().zip(summary.deleted) {
            deleted[*i] = d;
        }
        Ok(DeleteSummary {
            index: summary.index,
            deleted,
        })
    }

    /// Instance usage per tenant, and per project inside it, for the tenants in scope.
    pub fn usage(&self) -> Result<UsageByTenant, StoreError> {
        self.usage_of(None)
    }

    /// [`Scoped::usage`] of one tenant only (when `tenant` is given).
    pub fn usage_of(&self, tenant: Option<&str>) -> Result<UsageByTenant, StoreError> {
        let tenant = match (self.scope.tenant(), tenant) {
            (Some(own), Some(asked)) if own != asked => return Ok(UsageByTenant::new()),
            (Some(own), _) => Some(own),
            (None, asked) => asked,
        };
        let mut out = self.store.usage(tenant)?;
        if let Some(p) = self.scope.project() {
            for (_, projects) in out.values_mut() {
                projects.retain(|name, _| name == p);
            }
        }
        Ok(out)
    }

    /// Stores a token; its tenant and project must be inside the scope.
    pub fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        if !self.scope.sees_token(t) {
            return Err(StoreError::Invalid(vec![crate::model::FieldProblem::new(
                "tenant",
                "a token can only be created inside the caller's own tenant or project",
            )]));
        }
        self.store.insert_token(t)
    }

    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut all = self.store.list_tokens()?;
        all.retain(|t| self.scope.sees_token(t));
        Ok(all)
    }

    /// Revokes a token in scope; `false` when there is no such token in scope.
    pub fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        if self.scope != Scope::Cluster
            && !self
                .store
                .list_tokens()?
                .iter()
                .any(|t| t.id == id && self.scope.sees_token(t))
        {
            return Ok(false);
        }
        self.store.revoke_token(id)
    }

    /// When each host last reported; hosts are cluster data, so a tenant's view sees none.
    pub fn host_heartbeats(&self) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        if self.scope != Scope::Cluster {
            return Ok(std::collections::HashMap::new());
        }
        self.store.host_heartbeats()
    }

    /// The underlying store, for the few reads that are not tenant data (the index, hosts'
    /// reports) and for writes the platform itself makes.
    pub fn cluster_store(&self) -> Option<&'a dyn Store> {
        (self.scope == Scope::Cluster).then_some(self.store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(t: &str) -> Scope {
        Scope::Tenant(t.into())
    }

    #[test]
    fn scopes_see_their_own_objects_only() {
        let a = tenant("a");
        assert!(a.sees(&ObjectKey::cluster(Kind::Tenant, "a")));
        assert!(!a.sees(&ObjectKey::cluster(Kind::Tenant, "b")));
        assert!(a.sees(&ObjectKey::project("a", "p")));
        assert!(!a.sees(&ObjectKey::project("b", "p")));
        assert!(a.sees(&ObjectKey::instance("a", "p", "x")));
        assert!(!a.sees(&ObjectKey::instance("b", "p", "x")));
        assert!(!a.sees(&ObjectKey::cluster(Kind::Host, "h")));
        let p = Scope::Project {
            tenant: "a".into(),
            project: "p".into(),
        };
        assert!(p.sees(&ObjectKey::instance("a", "p", "x")));
        assert!(!p.sees(&ObjectKey::instance("a", "q", "x")));
        assert!(!p.sees(&ObjectKey::project("a", "q")));
        assert!(Scope::Cluster.sees(&ObjectKey::cluster(Kind::Host, "h")));
    }

    #[test]
    fn narrowing_pins_the_filter_or_empties_it() {
        let a = tenant("a");
        let mut f = ListFilter::all(Kind::OpenClawInstance);
        assert!(a.narrow(&mut f));
        assert_eq!(f.tenant.as_deref(), Some("a"));
        let mut f = ListFilter::all(Kind::OpenClawInstance);
        f.tenant = Some("b".into());
        assert!(!a.narrow(&mut f), "asking for another tenant finds nothing");
        let mut f = ListFilter::all(Kind::Tenant);
        assert!(a.narrow(&mut f));
        assert_eq!(f.name.as_deref(), Some("a"));
        assert!(!a.narrow(&mut ListFilter::all(Kind::Host)));
        let p = Scope::Project {
            tenant: "a".into(),
            project: "p".into(),
        };
        let mut f = ListFilter::all(Kind::Project);
        assert!(p.narrow(&mut f));
        assert_eq!(
            (f.tenant.as_deref(), f.name.as_deref()),
            (Some("a"), Some("p"))
        );
    }
}
