//! Fleet-wide Rollouts through the API: a template change held in waves, the wave controller
//! releasing and halting it, and who may run one.

use super::*;
use crate::controllers::waves::reconcile_once;
use crate::model::{Kind, ObjectKey, Resource, RolloutPhase, WavePhase};
use crate::store::ListFilter;

const NOW: i64 = 1_800_000_000;

fn template(level: &str) -> Value {
    json!({"apiVersion": "clusterclaw.io/v1", "kind": "ConfigTemplate",
           "metadata": {"name": "default"}, "spec": {"config": {"logging": {"level": level}}}})
}

/// acme/helpdesk with six instances on the `default` template.
async fn six_instances() -> Fixture {
    let f = super::config_center::fixture_with_keyring();
    let mut items = vec![
        tenant("acme"),
        tenant("other"),
        project("acme", "helpdesk"),
        project("other", "ops"),
        template("info"),
    ];
    for n in 0..6 {
        items.push(instance("acme", "helpdesk", &format!("bot-{n}"), 1));
    }
    let r = f
        .json(Method::POST, "/api/v1/apply", json!({ "items": items }))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    f
}

fn held_by(f: &Fixture, name: &str) -> Option<String> {
    let o = f
        .store
        .get(&ObjectKey::instance("acme", "helpdesk", name))
        .unwrap()
        .unwrap();
    let Resource::OpenClawInstance(i) = o.resource().unwrap() else {
        unreachable!()
    };
    i.status.and_then(|s| s.rollout).and_then(|r| r.held_by)
}

fn rollouts(f: &Fixture) -> Vec<crate::model::Rollout> {
    f.store
        .list(&ListFilter::all(Kind::Rollout))
        .unwrap()
        .into_iter()
        .map(|o| match o.resource().unwrap() {
            Resource::Rollout(r) => r,
            _ => unreachable!(),
        })
        .collect()
}

#[tokio::test]
async fn a_template_change_reaching_six_instances_holds_them_in_one_rollout() {
    let f = six_instances().await;
    // Creating instances (and the template with them) makes no Rollout: nothing ran before.
    assert!(rollouts(&f).is_empty());
    let r = f
        .json(
            Method::PUT,
            "/api/v1/configtemplates/default",
            template("debug"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let all = rollouts(&f);
    assert_eq!(all.len(), 1, "{all:?}");
    let ro = &all[0];
    let name = ro.metadata.name.clone();
    assert!(name.starts_with("configtemplate-default-"), "{name}");
    assert_eq!(
        ro.metadata.tenant, None,
        "a template's change is cluster-wide"
    );
    assert_eq!(ro.spec.change.as_deref(), Some("configtemplate/default"));
    assert_eq!(ro.spec.instances.len(), 6);
    for n in 0..6 {
        assert_eq!(
            held_by(&f, &format!("bot-{n}")).as_deref(),
            Some(name.as_str())
        );
    }
    // Listed and shown through the API.
    let list = f.get("/api/v1/rollouts").await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.body["items"][0]["metadata"]["name"], json!(name));
    let one = f.get(&format!("/api/v1/rollouts/{name}")).await;
    assert_eq!(one.status, StatusCode::OK, "{}", one.body);

    // The wave controller releases the first wave: one instance.
    reconcile_once(f.store.as_ref(), NOW).unwrap();
    assert_eq!(held_by(&f, "bot-0"), None);
    for n in 1..6 {
        assert_eq!(
            held_by(&f, &format!("bot-{n}")).as_deref(),
            Some(name.as_str())
        );
    }
    let ro = &rollouts(&f)[0];
    let st = ro.status.as_ref().unwrap();
    assert_eq!(
        (st.phase, st.wave, st.waves),
        (WavePhase::Progressing, 0, 3)
    );
    assert_eq!((st.counts.held, st.counts.progressing), (5, 1));

    // Its update fails its gate and rolls back: the whole change halts, the other five stay
    // held on their old revision.
    let revision = st.instances[0].revision.unwrap();
    f.store
        .update(
            &ObjectKey::instance("acme", "helpdesk", "bot-0"),
            &mut |r| {
                let Resource::OpenClawInstance(i) = r else {
                    return false;
                };
                let ro = i
                    .status
                    .get_or_insert_with(Default::default)
                    .rollout
                    .get_or_insert_with(Default::default);
                ro.revision = revision;
                ro.phase = RolloutPhase::RolledBack;
                ro.message = Some("bot-0-0 failed its health check".into());
                true
            },
        )
        .unwrap();
    reconcile_once(f.store.as_ref(), NOW + 5).unwrap();
    let ro = &rollouts(&f)[0];
    let st = ro.status.as_ref().unwrap();
    assert_eq!(st.phase, WavePhase::Halted);
    assert_eq!(st.failed_instance.as_deref(), Some("acme/helpdesk/bot-0"));
    assert!(
        st.message
            .as_deref()
            .unwrap()
            .contains("bot-0-0 failed its health check"),
        "{:?}",
        st.message
    );
    assert_eq!(st.counts.held, 5);
    for n in 1..6 {
        assert_eq!(
            held_by(&f, &format!("bot-{n}")).as_deref(),
            Some(name.as_str())
        );
    }
    // Later passes change nothing.
    let before = f.store.index();
    reconcile_once(f.store.as_ref(), NOW + 3600).unwrap();
    assert_eq!(f.store.index(), before);

    // A newer change takes the holds over; deleting the halted Rollout then frees nothing of it.
    let r = f
        .json(
            Method::PUT,
            "/api/v1/configtemplates/default",
            template("warn"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let all = rollouts(&f);
    assert_eq!(all.len(), 2);
    let newer = all.iter().find(|r| r.metadata.name != name).unwrap();
    for n in 0..6 {
        assert_eq!(
            held_by(&f, &format!("bot-{n}")).as_deref(),
            Some(newer.metadata.name.as_str())
        );
    }
    let r = f
        .send(
            Method::DELETE,
            &format!("/api/v1/rollouts/{name}"),
            Some(&f.token),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        held_by(&f, "bot-3").as_deref(),
        Some(newer.metadata.name.as_str())
    );
    // Deleting the newer one lets its instances go.
    let r = f
        .send(
            Method::DELETE,
            &format!("/api/v1/rollouts/{}", newer.metadata.name),
            Some(&f.token),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(held_by(&f, "bot-3"), None);
}

#[tokio::test]
async fn a_change_reaching_one_instance_makes_no_rollout() {
    let f = super::config_center::fixture_with_keyring();
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [tenant("acme"), project("acme", "helpdesk"), template("info"),
                instance("acme", "helpdesk", "bot", 1)]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = f
        .json(
            Method::PUT,
            "/api/v1/configtemplates/default",
            template("debug"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(rollouts(&f).is_empty());
}

fn version_rollout(tenant: Option<&str>, selector_tenant: Option<&str>) -> Value {
    let mut v = json!({"apiVersion": "clusterclaw.io/v1", "kind": "Rollout",
        "metadata": {"name": "upgrade"},
        "spec": {"selector": {"labels": {"tier": "gold"}}, "version": "2026.8.1", "bakeTime": "0s"}});
    if let Some(t) = tenant {
        v["metadata"]["tenant"] = json!(t);
    }
    if let Some(t) = selector_tenant {
        v["spec"]["selector"]["tenant"] = json!(t);
    }
    v
}

#[tokio::test]
async fn a_tenant_admin_runs_rollouts_in_its_own_tenant_only() {
    let f = six_instances().await;
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [instance("other", "ops", "bot", 1)]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let ta = f.scoped_token("tenant-admin", Some("acme"), None);
    let send = |method: Method, path: String, body: Value| {
        let ta = ta.clone();
        let f = &f;
        async move {
            f.send(
                method,
                &path,
                Some(&ta),
                Some("application/json"),
                Body::from(body.to_string()),
            )
            .await
        }
    };
    let before = f.store.index();
    // Cluster-wide (no tenant): platform-admins only, by path or in a batch.
    let r = send(
        Method::POST,
        "/api/v1/rollouts".into(),
        version_rollout(None, None),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(r.message().contains("platform-admin may"), "{}", r.body);
    let r = send(
        Method::POST,
        "/api/v1/apply".into(),
        json!({"items": [version_rollout(None, None)]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    // Its own tenant's Rollout may not select another tenant.
    let r = send(
        Method::POST,
        "/api/v1/tenants/acme/rollouts".into(),
        version_rollout(Some("acme"), Some("other")),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.fields(), ["spec.selector.tenant"]);
    // Another tenant's path is answered as if it did not exist.
    let r = send(
        Method::POST,
        "/api/v1/tenants/other/rollouts".into(),
        version_rollout(Some("other"), None),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_eq!(f.store.index(), before, "nothing was written");

    // Inside its tenant it may; the Rollout reaches acme's gold instances only.
    let r = send(
        Method::POST,
        "/api/v1/tenants/acme/rollouts".into(),
        version_rollout(Some("acme"), None),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    reconcile_once(f.store.as_ref(), NOW).unwrap();
    let ro = rollouts(&f)
        .into_iter()
        .find(|r| r.metadata.name == "upgrade")
        .unwrap();
    let st = ro.status.unwrap();
    assert_eq!(st.instances.len(), 6, "{:?}", st.instances);
    assert!(st.instances.iter().all(|i| i.tenant == "acme"));
    assert_eq!(
        st.instances[0].previous_version.as_deref(),
        Some("2026.7.1")
    );
    // The first wave's instance got the version (and a new revision); the rest did not.
    let version = |t: &str, p: &str, n: &str| {
        let o = f.store.get(&ObjectKey::instance(t, p, n)).unwrap().unwrap();
        let Resource::OpenClawInstance(i) = o.resource().unwrap() else {
            unreachable!()
        };
        i.spec.version.unwrap_or_default()
    };
    assert_eq!(version("acme", "helpdesk", "bot-0"), "2026.8.1");
    assert_eq!(version("acme", "helpdesk", "bot-1"), "2026.7.1");
    assert_eq!(version("other", "ops", "bot"), "2026.7.1");
    // Listed in its tenant, to its tenant-admin.
    let r = f
        .send(
            Method::GET,
            "/api/v1/tenants/acme/rollouts",
            Some(&ta),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
}
