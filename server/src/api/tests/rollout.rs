//! `rollout` actions through the API: who may, what each does to the update, what the audit
//! log records, and what a request that does not apply gets.

use super::*;
use crate::controllers::rollout::reconcile_once;
use crate::model::{ObjectKey, ReplicaState, RolloutPhase};

const BOT: &str = "/api/v1/tenants/acme/projects/helpdesk/instances/bot";

fn now_ms() -> i64 {
    crate::model::unix_millis(&crate::util::now_rfc3339()).unwrap()
}

/// Three replicas placed and Ready on the instance's newest revision, as the scheduler, the
/// agent and the rollout controller would leave them.
fn all_ready(f: &Fixture) {
    let key = ObjectKey::instance("acme", "helpdesk", "bot");
    f.store
        .update(&key, &mut |r| {
            let crate::model::Resource::OpenClawInstance(i) = r else {
                return false;
            };
            let s = i.status.get_or_insert_with(Default::default);
            let u = s.config_revision;
            for o in 0..3u32 {
                let t = s
                    .replica_status
                    .iter()
                    .find(|r| r.ordinal == o)
                    .and_then(|r| r.target_revision)
                    .or(u);
                s.replica_status.retain(|r| r.ordinal != o);
                s.replica_status.push(crate::model::ReplicaStatus {
                    name: format!("bot-{o}"),
                    ordinal: o,
                    host: Some(format!("h{o}")),
                    state: ReplicaState::Ready,
                    target_revision: t,
                    config_revision: t,
                    ..Default::default()
                });
            }
            s.replica_status.sort_by_key(|r| r.ordinal);
            true
        })
        .unwrap();
    reconcile_once(f.store.as_ref(), now_ms()).unwrap();
}

fn bot(tenant_config: Value) -> Value {
    let mut i = instance("acme", "helpdesk", "bot", 3);
    i["spec"]["config"] = tenant_config;
    i
}

/// An instance on revision 1 (Succeeded), then revision 2 made: the update to 2 has moved
/// bot-2.
async fn updating() -> (Fixture, crate::audit::AuditWriter) {
    let f = super::config_center::fixture_with_keyring();
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [tenant("acme"), project("acme", "helpdesk"), bot(json!({"logging": {"level": "info"}}))]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    all_ready(&f);
    let r = f.get(BOT).await;
    assert_eq!(
        r.body["status"]["rollout"]["phase"], "Succeeded",
        "{}",
        r.body
    );
    let r = f
        .json(
            Method::PUT,
            BOT,
            bot(json!({"logging": {"level": "debug"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    reconcile_once(f.store.as_ref(), now_ms()).unwrap();
    let r = f.get(BOT).await;
    assert_eq!(r.body["status"]["configRevision"], 2, "{}", r.body);
    assert_eq!(r.body["status"]["rollout"]["phase"], "Progressing");
    assert_eq!(r.body["status"]["replicaStatus"][2]["targetRevision"], 2);
    assert_eq!(r.body["status"]["replicaStatus"][1]["targetRevision"], 1);
    assert_eq!(r.body["status"]["readyReplicas"], 3);
    assert_eq!(r.body["status"]["updatedReplicas"], 1);
    f.audited()
}

#[tokio::test]
async fn pause_resume_and_abort_do_what_they_say_and_are_audited() {
    let (f, writer) = updating().await;
    let editor = f.scoped_token("project-editor", Some("acme"), Some("helpdesk"));
    let viewer = f.scoped_token("viewer", Some("acme"), None);
    let r = f
        .as_(&viewer, Method::POST, &format!("{BOT}/rollout/pause"), None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);

    let r = f
        .as_(&editor, Method::POST, &format!("{BOT}/rollout/pause"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["rollout"]["phase"], "Paused");
    assert_eq!(r.body["message"], "update to revision 2 paused");
    reconcile_once(f.store.as_ref(), now_ms()).unwrap();
    let got = f.get(BOT).await.body;
    assert_eq!(
        got["status"]["rollout"]["message"],
        "paused by project-editor test token"
    );
    assert_eq!(got["status"]["phase"], "Progressing");

    let r = f
        .as_(
            &editor,
            Method::POST,
            &format!("{BOT}/rollout/promote"),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.message().contains("rollout resume"), "{}", r.message());

    let r = f
        .as_(
            &editor,
            Method::POST,
            &format!("{BOT}/rollout/resume"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["rollout"]["phase"], "Progressing");

    let r = f
        .as_(&editor, Method::POST, &format!("{BOT}/rollout/abort"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["rollout"]["phase"], "RolledBack");
    let got = f.get(BOT).await.body;
    let targets: Vec<&Value> = got["status"]["replicaStatus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["targetRevision"])
        .collect();
    assert_eq!(targets, [&json!(1), &json!(1), &json!(1)]);
    assert!(
        got["status"]["rollout"]["message"]
            .as_str()
            .unwrap()
            .starts_with("aborted by project-editor test token; rolled back to revision 1"),
        "{got}"
    );
    // Aborting what has ended does not apply.
    let r = f
        .as_(&editor, Method::POST, &format!("{BOT}/rollout/abort"), None)
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(
        r.message().contains("has ended (RolledBack)"),
        "{}",
        r.message()
    );

    writer.flush().await.unwrap();
    let actions: Vec<(String, u16)> = f
        .audit_records()
        .iter()
        .filter(|r| r.entry.action.starts_with("rollout"))
        .map(|r| (r.entry.action.clone(), r.entry.result.status))
        .collect();
    assert_eq!(
        actions,
        [
            ("rollout.pause".to_string(), 403),
            ("rollout.pause".to_string(), 200),
            ("rollout.promote".to_string(), 409),
            ("rollout.resume".to_string(), 200),
            ("rollout.abort".to_string(), 200),
            ("rollout.abort".to_string(), 409),
        ]
    );
    let paused = f
        .audit_records()
        .into_iter()
        .find(|r| r.entry.action == "rollout.pause" && r.entry.result.status == 200)
        .unwrap();
    assert_eq!(
        paused.entry.object.as_ref().map(|o| o.name.as_str()),
        Some("bot"),
        "{paused:?}"
    );
}

#[tokio::test]
async fn bad_requests_say_what_is_allowed() {
    let (f, _writer) = updating().await;
    let r = f
        .json(Method::POST, &format!("{BOT}/rollout/restart"), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        r.message().contains("pause, resume, promote, abort, undo"),
        "{}",
        r.message()
    );
    let r = f
        .json(
            Method::POST,
            &format!("{BOT}/rollout/pause"),
            json!({"toRevision": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.fields(), ["toRevision"]);
    let r = f
        .json(
            Method::POST,
            &format!("{BOT}/rollout/undo"),
            json!({"toRevision": 99}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert!(
        r.message().contains("has no revision 99"),
        "{}",
        r.message()
    );
    let r = f
        .json(
            Method::POST,
            &format!("{BOT}/rollout/undo"),
            json!({"toRevision": 2}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(
        r.message().contains("already the newest"),
        "{}",
        r.message()
    );
    let r = f
        .json(
            Method::POST,
            "/api/v1/tenants/acme/projects/helpdesk/instances/nobody/rollout/pause",
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let _ = RolloutPhase::Paused;
}
