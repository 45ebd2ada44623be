//! Role-based access control: the one permission table of the API, and the scope of tenant
//! data a principal sees.
//!
//! [`PERMISSIONS`] says which roles may read, write or delete each resource; README.md shows
//! the same table to people, and a test holds the two equal. Every route of the API declares
//! the row it needs where it is mounted (`api::routes`), so a route without a declaration
//! cannot be mounted, and the authentication middleware checks it before any handler runs or
//! any body is read. A batch `apply` is checked document by document with [`check`]. What a
//! role may see inside its rows is its [`Scope`]: a tenant-admin's tenant, a project-editor's
//! project; the store answers out-of-scope objects as if they did not exist.

use std::fmt;

use axum::http::Method;

use super::Principal;
use crate::model::{Kind, Resource};
use crate::store::Scope;

/// The roles, from most to least privileged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    PlatformAdmin,
    TenantAdmin,
    ProjectEditor,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::PlatformAdmin,
        Role::TenantAdmin,
        Role::ProjectEditor,
        Role::Viewer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::PlatformAdmin => "platform-admin",
            Role::TenantAdmin => "tenant-admin",
            Role::ProjectEditor => "project-editor",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether a holder of `self` may hand out `other` (the same or a less privileged role).
    pub fn may_grant(self, other: Role) -> bool {
        self <= other
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a route or document touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Res {
    Info,
    Tenants,
    Projects,
    Instances,
    Hosts,
    /// Whether the scheduler may place new replicas on a host (`cordon`, `uncordon`), and
    /// moving its replicas off it (`drain`).
    HostScheduling,
    Tokens,
    Audit,
    /// The whole audit chain, every tenant's records (`audit verify`).
    AuditChain,
    Metrics,
    Templates,
    /// Secrets of every level, read: keys and fingerprints, never values.
    Secrets,
    /// A tenant's own secrets (any of its projects may reference them).
    TenantSecrets,
    /// A project's secrets.
    ProjectSecrets,
    /// The data key secrets are encrypted with.
    SecretKey,
    /// A batch of objects (`/apply`): the caller must be able to write something; every
    /// document is then checked as what it is.
    Apply,
    /// Cluster-wide `Rollout`s (no `metadata.tenant`): waves across tenants.
    Rollouts,
    /// A tenant's `Rollout`s: waves over that tenant's instances only.
    TenantRollouts,
    /// Events: every role reads those of its scope.
    Events,
    /// State volumes on hosts: every role reads those of its scope; an unclaimed one is
    /// deleted by a platform-admin or its tenant's admin.
    Volumes,
    /// The server replicas of the control plane (`get servers`).
    Servers,
}

impl Res {
    pub const ALL: [Res; 21] = [
        Res::Info,
        Res::Tenants,
        Res::Projects,
        Res::Instances,
        Res::Hosts,
        Res::HostScheduling,
        Res::Tokens,
        Res::Audit,
        Res::AuditChain,
        Res::Metrics,
        Res::Templates,
        Res::Secrets,
        Res::TenantSecrets,
        Res::ProjectSecrets,
        Res::SecretKey,
        Res::Apply,
        Res::Rollouts,
        Res::TenantRollouts,
        Res::Events,
        Res::Volumes,
        Res::Servers,
    ];

    /// What writing or deleting an object of `kind` touches: a secret is its tenant's or, when
    /// it names a project, its project's; a Rollout is its tenant's or, without a tenant,
    /// cluster-wide.
    pub fn of_object(kind: Kind, tenant: Option<&str>, project: Option<&str>) -> Res {
        match kind {
            Kind::Tenant => Res::Tenants,
            Kind::Project => Res::Projects,
            Kind::OpenClawInstance => Res::Instances,
            Kind::Host => Res::Hosts,
            Kind::ConfigTemplate => Res::Templates,
            Kind::Secret if project.is_some_and(|p| !p.is_empty()) => Res::ProjectSecrets,
            Kind::Secret => Res::TenantSecrets,
            Kind::Rollout if tenant.is_some_and(|t| !t.is_empty()) => Res::TenantRollouts,
            Kind::Rollout => Res::Rollouts,
        }
    }

    /// [`Res::of_object`] of a resource.
    pub fn of_resource(resource: &Resource) -> Res {
        let m = resource.metadata();
        Res::of_object(resource.kind(), m.tenant.as_deref(), m.project.as_deref())
    }

    /// The resource's row in README.md's permission table.
    pub fn row_name(self) -> &'static str {
        match self {
            Res::Info => "server info, API description",
            Res::Tenants => "tenants",
            Res::Projects => "projects",
            Res::Instances => {
                "instances, their config revisions, diff, rollback, rollouts and logs"
            }
            Res::Hosts => "hosts",
            Res::HostScheduling => "host scheduling (`cordon`, `uncordon`, `drain`)",
            Res::Tokens => "tokens",
            Res::Audit => "audit log",
            Res::AuditChain => "the audit chain (`audit verify`)",
            Res::Metrics => "`/metrics`",
            Res::Templates => "config templates",
            Res::Secrets => "secrets (keys and fingerprints, never values)",
            Res::TenantSecrets => "a tenant's secrets",
            Res::ProjectSecrets => "a project's secrets",
            Res::SecretKey => "the secrets' data key (`secret rotate-key`)",
            Res::Apply => "`apply` and `delete -f` (a batch; each document is checked as its kind)",
            Res::Rollouts => "cluster-wide rollouts (waves across tenants)",
            Res::TenantRollouts => "a tenant's rollouts (waves over its own instances)",
            Res::Events => {
                "events (a tenant's own; host and cluster-wide ones to cluster-wide callers)"
            }
            Res::Volumes => "state volumes on hosts (a tenant's own; `delete volume`)",
            Res::Servers => "server replicas (`get servers`)",
        }
    }

    pub fn noun(self) -> &'static str {
        match self {
            Res::Info => "server information",
            Res::Tenants => "tenants",
            Res::Projects => "projects",
            Res::Instances => "instances",
            Res::Hosts => "hosts",
            Res::HostScheduling => "host scheduling",
            Res::Templates => "config templates",
            Res::Secrets => "secrets",
            Res::TenantSecrets => "a tenant's secrets",
            Res::ProjectSecrets => "a project's secrets",
            Res::SecretKey => "the secrets' data key",
            Res::Apply => "a batch of objects",
            Res::Tokens => "tokens",
            Res::Audit => "the audit log",
            Res::AuditChain => "the whole audit chain",
            Res::Metrics => "metrics",
            Res::Rollouts => "cluster-wide rollouts",
            Res::TenantRollouts => "a tenant's rollouts",
            Res::Events => "events",
            Res::Volumes => "state volumes",
            Res::Servers => "server replicas",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Read,
    Write,
    Delete,
}

impl Verb {
    pub fn of_method(m: &Method) -> Verb {
        match *m {
            Method::GET | Method::HEAD | Method::OPTIONS => Verb::Read,
            Method::DELETE => Verb::Delete,
            _ => Verb::Write,
        }
    }

    pub const ALL: [Verb; 3] = [Verb::Read, Verb::Write, Verb::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Read => "read",
            Verb::Write => "write",
            Verb::Delete => "delete",
        }
    }
}

/// Who may do what. `cluster_only`: the role must also be cluster-wide (a viewer without a
/// tenant), for infrastructure no tenant owns.
pub struct Permission {
    pub res: Res,
    pub verb: Verb,
    pub roles: &'static [Role],
    pub cluster_only: bool,
}

const EVERY_ROLE: &[Role] = &Role::ALL;
const PA: &[Role] = &[Role::PlatformAdmin];
const PA_TA: &[Role] = &[Role::PlatformAdmin, Role::TenantAdmin];
const EDITORS: &[Role] = &[Role::PlatformAdmin, Role::TenantAdmin, Role::ProjectEditor];
const PA_VIEWER: &[Role] = &[Role::PlatformAdmin, Role::Viewer];

const fn p(res: Res, verb: Verb, roles: &'static [Role], cluster_only: bool) -> Permission {
    Permission {
        res,
        verb,
        roles,
        cluster_only,
    }
}

/// The permission table. A (resource, verb) pair that is not here is allowed to nobody.
pub const PERMISSIONS: &[Permission] = &[
    p(Res::Info, Verb::Read, EVERY_ROLE, false),
    p(Res::Tenants, Verb::Read, EVERY_ROLE, false),
    p(Res::Tenants, Verb::Write, PA, false),
    p(Res::Tenants, Verb::Delete, PA, false),
    p(Res::Projects, Verb::Read, EVERY_ROLE, false),
    p(Res::Projects, Verb::Write, PA_TA, false),
    p(Res::Projects, Verb::Delete, PA_TA, false),
    p(Res::Instances, Verb::Read, EVERY_ROLE, false),
    p(Res::Instances, Verb::Write, EDITORS, false),
    p(Res::Instances, Verb::Delete, EDITORS, false),
    p(Res::Hosts, Verb::Read, PA_VIEWER, true),
    // Hosts are written by their agents only: no role writes them.
    p(Res::Hosts, Verb::Delete, PA, false),
    // Cordon, uncordon and drain: the one field of a host users set, and moving its replicas.
    p(Res::HostScheduling, Verb::Read, PA, false),
    p(Res::HostScheduling, Verb::Write, PA, false),
    p(Res::Tokens, Verb::Read, PA_TA, false),
    p(Res::Tokens, Verb::Write, PA_TA, false),
    p(Res::Tokens, Verb::Delete, PA_TA, false),
    p(Res::Audit, Verb::Read, PA_TA, false),
    p(Res::AuditChain, Verb::Read, PA, false),
    p(Res::Metrics, Verb::Read, PA_VIEWER, true),
    p(Res::Servers, Verb::Read, PA_VIEWER, true),
    p(Res::Templates, Verb::Read, EVERY_ROLE, false),
    p(Res::Templates, Verb::Write, PA, false),
    p(Res::Templates, Verb::Delete, PA, false),
    p(Res::Secrets, Verb::Read, EVERY_ROLE, false),
    p(Res::TenantSecrets, Verb::Write, PA_TA, false),
    p(Res::TenantSecrets, Verb::Delete, PA_TA, false),
    p(Res::ProjectSecrets, Verb::Write, EDITORS, false),
    p(Res::ProjectSecrets, Verb::Delete, EDITORS, false),
    p(Res::SecretKey, Verb::Write, PA, false),
    p(Res::Rollouts, Verb::Read, PA_VIEWER, true),
    p(Res::Rollouts, Verb::Write, PA, false),
    p(Res::Rollouts, Verb::Delete, PA, false),
    p(Res::TenantRollouts, Verb::Read, EVERY_ROLE, false),
    p(Res::TenantRollouts, Verb::Write, PA_TA, false),
    p(Res::TenantRollouts, Verb::Delete, PA_TA, false),
    p(Res::Events, Verb::Read, EVERY_ROLE, false),
    p(Res::Volumes, Verb::Read, EVERY_ROLE, false),
    p(Res::Volumes, Verb::Delete, PA_TA, false),
    p(Res::Apply, Verb::Write, EDITORS, false),
    p(Res::Apply, Verb::Delete, EDITORS, false),
];

/// Why a principal may not do something; the text names the role and what it may do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The role a principal acts with; a token whose role or scope does not fit is refused.
pub fn role_of(p: &Principal) -> Result<Role, Denied> {
    let role = Role::parse(&p.role).ok_or_else(|| {
        Denied(format!(
            "{} has the unknown role {:?}; roles are {}",
            p.token_id,
            p.role,
            role_names()
        ))
    })?;
    scope_of(p, role)?;
    Ok(role)
}

/// The tenant data a principal sees.
pub fn scope_of(p: &Principal, role: Role) -> Result<Scope, Denied> {
    let bad = |what: &str| Denied(format!("{} ({role}) {what}", p.token_id));
    match (role, &p.tenant, &p.project) {
        (Role::PlatformAdmin, _, _) => Ok(Scope::Cluster),
        (Role::TenantAdmin, Some(t), None) => Ok(Scope::Tenant(t.clone())),
        (Role::TenantAdmin, _, _) => Err(bad("must name exactly one tenant and no project")),
        (Role::ProjectEditor, Some(t), Some(pr)) => Ok(Scope::Project {
            tenant: t.clone(),
            project: pr.clone(),
        }),
        (Role::ProjectEditor, _, _) => Err(bad("must name a tenant and a project")),
        (Role::Viewer, None, None) => Ok(Scope::Cluster),
        (Role::Viewer, Some(t), None) => Ok(Scope::Tenant(t.clone())),
        (Role::Viewer, Some(t), Some(pr)) => Ok(Scope::Project {
            tenant: t.clone(),
            project: pr.clone(),
        }),
        (Role::Viewer, None, Some(_)) => Err(bad("names a project without its tenant")),
    }
}

/// Whether `role` in `scope` may `verb` `res`.
pub fn allowed(role: Role, scope: &Scope, res: Res, verb: Verb) -> bool {
    PERMISSIONS.iter().any(|perm| {
        perm.res == res
            && perm.verb == verb
            && perm.roles.contains(&role)
            && (!perm.cluster_only || matches!(scope, Scope::Cluster))
    })
}

/// The roles that may `verb` `res`, as text (`None`: nobody), with "without a tenant" where
/// only cluster-wide holders may.
pub fn who_may(res: Res, verb: Verb) -> Option<String> {
    let who: Vec<String> = PERMISSIONS
        .iter()
        .filter(|perm| perm.res == res && perm.verb == verb)
        .flat_map(|perm| {
            perm.roles
                .iter()
                .map(move |r| match (perm.cluster_only, r) {
                    (true, Role::Viewer | Role::TenantAdmin | Role::ProjectEditor) => {
                        format!("{r} without a tenant")
                    }
                    _ => r.as_str().to_string(),
                })
        })
        .collect();
    (!who.is_empty()).then(|| who.join(", "))
}

/// [`allowed`], as an error that says what the role may do.
pub fn check(p: &Principal, res: Res, verb: Verb) -> Result<(Role, Scope), Denied> {
    let role = role_of(p)?;
    let scope = scope_of(p, role)?;
    if allowed(role, &scope, res, verb) {
        return Ok((role, scope));
    }
    let hint = if res == Res::Hosts && verb == Verb::Write {
        crate::model::HOST_READ_ONLY.to_string()
    } else {
        match who_may(res, verb) {
            Some(who) => format!("only {who} may"),
            None => "no role may".to_string(),
        }
    };
    Err(Denied(format!(
        "the role {role} of {} may not {} {}; {hint}",
        p.token_id,
        verb.as_str(),
        res.noun()
    )))
}

pub fn role_names() -> String {
    Role::ALL
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: &str, tenant: Option<&str>, project: Option<&str>) -> Principal {
        Principal {
            token_id: "tok".into(),
            token_name: "t".into(),
            role: role.into(),
            tenant: tenant.map(Into::into),
            project: project.map(Into::into),
        }
    }

    #[test]
    fn the_table_holds_per_role() {
        let t = Scope::Tenant("a".into());
        let pr = Scope::Project {
            tenant: "a".into(),
            project: "p".into(),
        };
        use Res::*;
        use Role::*;
        use Verb::*;
        assert!(allowed(PlatformAdmin, &Scope::Cluster, Tenants, Write));
        assert!(!allowed(TenantAdmin, &t, Tenants, Write));
        assert!(allowed(TenantAdmin, &t, Projects, Write));
        assert!(allowed(TenantAdmin, &t, Tokens, Write));
        assert!(!allowed(TenantAdmin, &t, Hosts, Read));
        assert!(!allowed(ProjectEditor, &pr, Projects, Write));
        assert!(allowed(ProjectEditor, &pr, Instances, Delete));
        assert!(!allowed(ProjectEditor, &pr, Tokens, Read));
        for res in [Tenants, Projects, Instances] {
            assert!(allowed(Viewer, &t, res, Read));
            assert!(!allowed(Viewer, &t, res, Write));
            assert!(!allowed(Viewer, &t, res, Delete));
        }
        assert!(allowed(Viewer, &Scope::Cluster, Hosts, Read));
        assert!(!allowed(Viewer, &t, Hosts, Read));
        assert!(!allowed(Viewer, &Scope::Cluster, Audit, Read));
    }

    #[test]
    fn scopes_follow_role_and_token_fields() {
        let s = |r, t, p| scope_of(&principal(r, t, p), Role::parse(r).unwrap());
        assert_eq!(s("platform-admin", None, None), Ok(Scope::Cluster));
        assert_eq!(
            s("tenant-admin", Some("a"), None),
            Ok(Scope::Tenant("a".into()))
        );
        assert!(s("tenant-admin", None, None).is_err());
        assert!(s("tenant-admin", Some("a"), Some("p")).is_err());
        assert!(s("project-editor", Some("a"), None).is_err());
        assert_eq!(s("viewer", None, None), Ok(Scope::Cluster));
        assert!(s("viewer", None, Some("p")).is_err());
        assert!(role_of(&principal("root", None, None)).is_err());
    }

    #[test]
    fn denials_say_who_may() {
        let e = check(
            &principal("viewer", Some("a"), None),
            Res::Instances,
            Verb::Write,
        )
        .unwrap_err();
        assert!(
            e.0.contains("viewer") && e.0.contains("project-editor"),
            "{e}"
        );
    }

    #[test]
    fn roles_grant_only_down() {
        assert!(Role::TenantAdmin.may_grant(Role::Viewer));
        assert!(Role::TenantAdmin.may_grant(Role::TenantAdmin));
        assert!(!Role::TenantAdmin.may_grant(Role::PlatformAdmin));
        assert!(!Role::Viewer.may_grant(Role::ProjectEditor));
    }
}
