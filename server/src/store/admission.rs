//! Decides what a write does to one object: create, configure or leave unchanged (pure).

use crate::model::Resource;

use super::{Outcome, StoreError, StoredObject, WriteMode};

/// An object as it will be written.
#[derive(Debug)]
pub struct Admitted {
    pub outcome: Outcome,
    /// The full object to store; for [`Outcome::Unchanged`], the existing one.
    pub resource: Resource,
}

/// Applies `incoming` (validated, status ignored) over `existing` for a write at `index`.
/// Server-owned metadata (uid, generation, createdAt, resourceVersion) comes from `existing`
/// or is set here; status is kept; `generation` is bumped when `spec` changes.
pub fn admit(
    existing: Option<&StoredObject>,
    incoming: &Resource,
    mode: WriteMode,
    index: u64,
    now_rfc3339: &str,
    new_uid: impl FnOnce() -> String,
) -> Result<Admitted, StoreError> {
    let key = incoming.key();
    let given_rv = incoming.metadata().resource_version.filter(|rv| *rv != 0);
    let mut next = incoming.clone();
    next.clear_status();
    next.apply_defaults();
    let Some(existing) = existing else {
        if mode == WriteMode::Update {
            return Err(StoreError::NotFound(key));
        }
        if let Some(given) = given_rv {
            return Err(StoreError::Gone { key, given });
        }
        let m = next.metadata_mut();
        m.uid = Some(new_uid());
        m.generation = Some(1);
        m.resource_version = Some(index);
        m.created_at = Some(now_rfc3339.to_string());
        return Ok(Admitted {
            outcome: Outcome::Created,
            resource: next,
        });
    };
    if mode == WriteMode::Create {
        return Err(StoreError::AlreadyExists(key));
    }
    if let Some(given) = given_rv
        && given != existing.resource_version
    {
        return Err(StoreError::Conflict {
            key,
            given,
            current: existing.resource_version,
        });
    }
    let current = existing.resource()?;
    let spec_changed = current.spec_value() != next.spec_value();
    let labels_changed = current.metadata().labels != next.metadata().labels;
    if !spec_changed && !labels_changed {
        return Ok(Admitted {
            outcome: Outcome::Unchanged,
            resource: current,
        });
    }
    let cm = current.metadata();
    let generation = cm.generation.unwrap_or(1) + i64::from(spec_changed);
    let (uid, created_at) = (cm.uid.clone(), cm.created_at.clone());
    let status = current.status_value();
    let m = next.metadata_mut();
    m.uid = uid;
    m.created_at = created_at;
    m.generation = Some(generation);
    m.resource_version = Some(index);
    let mut value = next.to_value();
    if !status.is_null() {
        value["status"] = status;
    }
    let resource = Resource::from_value(value).map_err(StoreError::Invalid)?;
    Ok(Admitted {
        outcome: Outcome::Configured,
        resource,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectKey;
    use serde_json::json;

    fn instance(replicas: i64, labels: serde_json::Value) -> Resource {
        Resource::from_value(json!({
            "apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
            "metadata": {"name": "bot", "tenant": "t", "project": "p", "labels": labels},
            "spec": {"version": "2026.7.1", "replicas": replicas}
        }))
        .unwrap()
    }

    fn stored(r: &Resource) -> StoredObject {
        let m = r.metadata();
        StoredObject {
            key: r.key(),
            uid: m.uid.clone().unwrap(),
            generation: m.generation.unwrap(),
            resource_version: m.resource_version.unwrap(),
            labels: (&m.labels).into(),
            json: serde_json::to_string(&r.to_value()).unwrap(),
        }
    }

    const NOW: &str = "2026-11-24T00:00:00Z";

    #[test]
    fn create_then_unchanged_then_configured() {
        let a = admit(
            None,
            &instance(1, json!({})),
            WriteMode::Apply,
            5,
            NOW,
            || "u1".into(),
        )
        .unwrap();
        assert_eq!(a.outcome, Outcome::Created);
        let m = a.resource.metadata();
        assert_eq!(
            (m.generation, m.resource_version, m.uid.as_deref()),
            (Some(1), Some(5), Some("u1"))
        );
        let OpenClawInstanceSpecCheck(mem) = OpenClawInstanceSpecCheck::of(&a.resource);
        assert_eq!(mem.as_deref(), Some("2Gi"), "defaults are filled in");

        let s = stored(&a.resource);
        let b = admit(
            Some(&s),
            &instance(1, json!({})),
            WriteMode::Apply,
            6,
            NOW,
            || unreachable!(),
        )
        .unwrap();
        assert_eq!(b.outcome, Outcome::Unchanged);
        assert_eq!(b.resource.metadata().resource_version, Some(5));

        let c = admit(
            Some(&s),
            &instance(3, json!({})),
            WriteMode::Apply,
            7,
            NOW,
            || unreachable!(),
        )
        .unwrap();
        assert_eq!(c.outcome, Outcome::Configured);
        assert_eq!(c.resource.metadata().generation, Some(2));
        assert_eq!(c.resource.metadata().uid.as_deref(), Some("u1"));

        let d = admit(
            Some(&s),
            &instance(1, json!({"a": "b"})),
            WriteMode::Apply,
            7,
            NOW,
            || unreachable!(),
        )
        .unwrap();
        assert_eq!(d.outcome, Outcome::Configured);
        assert_eq!(
            d.resource.metadata().generation,
            Some(1),
            "labels alone do not bump generation"
        );
    }

    #[test]
    fn preconditions() {
        let a = admit(
            None,
            &instance(1, json!({})),
            WriteMode::Apply,
            5,
            NOW,
            || "u1".into(),
        )
        .unwrap();
        let s = stored(&a.resource);
        let mut stale = instance(2, json!({}));
        stale.metadata_mut().resource_version = Some(4);
        assert!(matches!(
            admit(
                Some(&s),
                &stale,
                WriteMode::Apply,
                9,
                NOW,
                || unreachable!()
            ),
            Err(StoreError::Conflict {
                given: 4,
                current: 5,
                ..
            })
        ));
        assert!(matches!(
            admit(
                Some(&s),
                &instance(1, json!({})),
                WriteMode::Create,
                9,
                NOW,
                || unreachable!()
            ),
            Err(StoreError::AlreadyExists(_))
        ));
        assert!(matches!(
            admit(None, &instance(1, json!({})), WriteMode::Update, 9, NOW, || unreachable!()),
            Err(StoreError::NotFound(k)) if k == ObjectKey::instance("t", "p", "bot")
        ));
        assert!(matches!(
            admit(None, &stale, WriteMode::Apply, 9, NOW, || unreachable!()),
            Err(StoreError::Gone { given: 4, .. })
        ));
    }

    struct OpenClawInstanceSpecCheck(Option<String>);
    impl OpenClawInstanceSpecCheck {
        fn of(r: &Resource) -> Self {
            match r {
                Resource::OpenClawInstance(i) => {
                    Self(i.spec.resources.memory.as_ref().map(|q| q.0.clone()))
                }
                _ => Self(None),
            }
        }
    }
}
