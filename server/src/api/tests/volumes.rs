//! State volumes through the API: the list is scoped like every list, a claimed volume's
//! removal is refused with why, an orphan's is recorded, told to its host and audited.

use axum::http::{Method, StatusCode};
use serde_json::json;

use super::{fixture, instance, project, tenant};
use crate::model::{InstanceStatus, ObjectKey, ReplicaStatus, Resource};
use crate::store::Store;
use crate::store::volumes::ReportedVolume;

fn reported(tenant: &str, project: &str, instance: &str, replica: &str) -> ReportedVolume {
    ReportedVolume {
        name: format!("vol-{tenant}-{replica}"),
        tenant: tenant.into(),
        project: project.into(),
        instance: instance.into(),
        replica: replica.into(),
    }
}

#[tokio::test]
async fn volumes_are_listed_in_scope_and_only_unclaimed_ones_are_deleted() {
    let f = fixture();
    let (audited, writer) = f.audited();
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [tenant("acme"), tenant("other"), project("acme", "helpdesk"),
                project("other", "ops"), instance("acme", "helpdesk", "bot", 1)]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    f.store
        .update(&ObjectKey::instance("acme", "helpdesk", "bot"), &mut |r| {
            let Resource::OpenClawInstance(i) = r else {
                return false;
            };
            i.status = Some(InstanceStatus {
                replica_status: vec![ReplicaStatus {
                    name: "bot-0".into(),
                    host: Some("h1".into()),
                    ..Default::default()
                }],
                ..Default::default()
            });
            true
        })
        .unwrap();
    f.store
        .record_host_volumes(
            "h1",
            &[
                reported("acme", "helpdesk", "bot", "bot-0"),
                reported("acme", "helpdesk", "gone", "gone-0"),
                reported("other", "ops", "x", "x-0"),
            ],
            "2026-01-01T00:00:00Z",
        )
        .unwrap();

    let all = f.get("/api/v1/volumes").await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    let statuses: Vec<(&str, &str)> = all.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        statuses,
        [
            ("vol-acme-bot-0", "InUse"),
            ("vol-acme-gone-0", "Orphaned"),
            ("vol-other-x-0", "Orphaned")
        ]
    );
    assert_eq!(
        f.get("/api/v1/volumes?host=h2").await.body["items"],
        json!([])
    );
    let r = f.get("/api/v1/volumes?node=h1").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("host"), "{}", r.message());

    let ta = f.scoped_token("tenant-admin", Some("acme"), None);
    let mine = f.as_(&ta, Method::GET, "/api/v1/volumes", None).await;
    assert_eq!(
        mine.body["items"].as_array().unwrap().len(),
        2,
        "{}",
        mine.body
    );

    // Claimed: refused with why, nothing changes.
    let before = f.store.index();
    let r = audited
        .as_(
            &ta,
            Method::DELETE,
            "/api/v1/hosts/h1/volumes/vol-acme-bot-0",
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(
        r.message().contains("InUse") && r.message().contains("replica bot-0"),
        "{}",
        r.message()
    );
    // Another tenant's: as if absent.
    let r = audited
        .as_(
            &ta,
            Method::DELETE,
            "/api/v1/hosts/h1/volumes/vol-other-x-0",
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    // A bad name: 400 naming the field.
    let r = audited
        .as_(&ta, Method::DELETE, "/api/v1/hosts/h1/volumes/-x", None)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.message().starts_with("volume:"), "{}", r.message());
    assert_eq!(f.store.index(), before);

    // Orphaned: recorded, Deleting, the index moves (the host is told).
    let r = audited
        .as_(
            &ta,
            Method::DELETE,
            "/api/v1/hosts/h1/volumes/vol-acme-gone-0",
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["status"], "Deleting");
    assert!(
        r.body["deleteReason"]
            .as_str()
            .unwrap()
            .starts_with("user:")
    );
    assert!(f.store.index() > before);
    writer.flush().await.unwrap();
    let records = f.audit_records();
    let deletes: Vec<(u16, Option<String>)> = records
        .iter()
        .filter(|r| r.entry.action == "volume.delete")
        .map(|r| {
            (
                r.entry.result.status,
                r.entry.object.as_ref().map(|o| o.name.clone()),
            )
        })
        .collect();
    assert_eq!(deletes, [(200, Some("h1/vol-acme-gone-0".to_string()))]);
}
