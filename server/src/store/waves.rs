//! Fleet-wide changes in the store: the `Rollout` a write to a shared layer makes, in that
//! write's transaction, and the holds it keeps on the instances it reached.

use super::StoreError;
use super::backend::Tx;
use super::revisions::put_resource;
use crate::model::{
    API_VERSION, InstanceRef, Kind, MIN_FLEET_INSTANCES, Metadata, ObjectKey, Resource, Rollout,
    RolloutSpec, RolloutStatus, WaveInstance, WaveInstanceState, WaveStatus,
};

/// Longest object name (a DNS-1123 label).
const MAX_NAME: usize = 63;

/// The name of the Rollout a change of `source` at store index `index` makes:
/// `configtemplate-default-42`, `project-acme-helpdesk-43`.
pub fn rollout_name(source: &ObjectKey, index: u64) -> String {
    let mut parts = vec![source.kind.lower()];
    for p in [&source.tenant, &source.project, &source.name] {
        if !p.is_empty() {
            parts.push(p);
        }
    }
    let suffix = format!("-{index}");
    let mut head = parts.join("-");
    head.truncate(MAX_NAME - suffix.len());
    format!("{}{suffix}", head.trim_end_matches('-'))
}

/// After `revise` (inside the same transaction): when the write changed a shared layer (a
/// `ConfigTemplate`, a `Tenant` or `Project` config, a `Secret`) and that revised at least
/// [`MIN_FLEET_INSTANCES`] existing instances, makes one `Rollout` listing them (in the order
/// revised) and holds each of them for it (`status.rollout.heldBy`), taking over any older
/// hold. Instances created or changed by the write itself are not held: their own update
/// moves them. Returns the Rollout's key, if one was made.
pub fn hold_revised(
    tx: &mut dyn Tx,
    changed: &[ObjectKey],
    revised: &[(ObjectKey, u64)],
    index: u64,
    now: &str,
) -> Result<Option<ObjectKey>, StoreError> {
    let Some(source) = changed.iter().find(|k| {
        matches!(
            k.kind,
            Kind::ConfigTemplate | Kind::Tenant | Kind::Project | Kind::Secret
        )
    }) else {
        return Ok(None);
    };
    let reached: Vec<&(ObjectKey, u64)> = revised
        .iter()
        .filter(|(k, r)| *r > 1 && !changed.contains(k))
        .collect();
    if reached.len() < MIN_FLEET_INSTANCES {
        return Ok(None);
    }
    let name = rollout_name(source, index);
    let tenant = match source.kind {
        Kind::ConfigTemplate => None,
        _ => Some(source.tenant_name().to_string()),
    };
    let refs: Vec<InstanceRef> = reached
        .iter()
        .map(|(k, _)| InstanceRef {
            tenant: k.tenant.clone(),
            project: k.project.clone(),
            name: k.name.clone(),
        })
        .collect();
    let rollout = Rollout {
        api_version: API_VERSION.into(),
        kind: Kind::Rollout,
        metadata: Metadata {
            name: name.clone(),
            tenant,
            uid: Some(uuid::Uuid::new_v4().to_string()),
            generation: Some(1),
            resource_version: Some(index),
            created_at: Some(now.to_string()),
            ..Default::default()
        },
        spec: {
            let defaults = crate::model::fleet_defaults();
            RolloutSpec {
                change: Some(source.to_string()),
                instances: refs.clone(),
                waves: Some(defaults.waves),
                bake_time: Some(defaults.bake_time),
                ..Default::default()
            }
        },
        status: Some(WaveStatus {
            started_at: Some(now.to_string()),
            instances: reached
                .iter()
                .map(|(k, r)| WaveInstance {
                    tenant: k.tenant.clone(),
                    project: k.project.clone(),
                    name: k.name.clone(),
                    wave: 0,
                    state: WaveInstanceState::Held,
                    revision: Some(*r),
                    previous_version: None,
                    previous_image: None,
                    message: None,
                })
                .collect(),
            message: Some("waiting for the wave controller".into()),
            ..Default::default()
        }),
    };
    let key = rollout.key();
    put_resource(tx, &Resource::Rollout(rollout))?;
    for (k, _) in reached {
        set_hold(tx, k, Some(&name), index)?;
    }
    Ok(Some(key))
}

/// Sets (or, with `None`, clears) the hold on one instance.
fn set_hold(
    tx: &mut dyn Tx,
    key: &ObjectKey,
    holder: Option<&str>,
    index: u64,
) -> Result<(), StoreError> {
    let Some(o) = tx.get(key)? else {
        return Ok(());
    };
    let Resource::OpenClawInstance(mut i) = o.resource()? else {
        return Ok(());
    };
    let rollout = i
        .status
        .get_or_insert_with(Default::default)
        .rollout
        .get_or_insert_with(RolloutStatus::default);
    rollout.held_by = holder.map(str::to_string);
    i.metadata.resource_version = Some(index);
    put_resource(tx, &Resource::OpenClawInstance(i))
}

/// Before a Rollout is deleted: the instances it still holds are let go (their own update then
/// moves them to their newest revision).
pub fn before_delete(tx: &mut dyn Tx, key: &ObjectKey) -> Result<(), StoreError> {
    let Some(o) = tx.get(key)? else {
        return Ok(());
    };
    let Resource::Rollout(r) = o.resource()? else {
        return Ok(());
    };
    let index = tx.index()? + 1;
    let mut members = r.spec.instances.clone();
    if let Some(s) = &r.status {
        members.extend(s.instances.iter().map(WaveInstance::instance));
    }
    members.sort();
    members.dedup();
    for m in members {
        let k = ObjectKey::instance(&m.tenant, &m.project, &m.name);
        let Some(o) = tx.get(&k)? else {
            continue;
        };
        let Resource::OpenClawInstance(i) = o.resource()? else {
            continue;
        };
        let held = i
            .status
            .as_ref()
            .and_then(|s| s.rollout.as_ref())
            .and_then(|r| r.held_by.as_deref())
            == Some(key.name.as_str());
        if held {
            set_hold(tx, &k, None, index)?;
        }
    }
    Ok(())
}

/// Before a tenant is deleted (it has no projects, so no instances, left): its Rollouts go with
/// it.
pub fn drop_tenant_rollouts(tx: &mut dyn Tx, tenant: &str) -> Result<(), StoreError> {
    for o in tx.list_in_tenant(Kind::Rollout, tenant)? {
        tx.remove(&o)?;
    }
    Ok(())
}
