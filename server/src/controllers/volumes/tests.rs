//! Unit tests of the volume rules and the controller's plan (plain values), and of a pass
//! against a real store.

use super::*;
use crate::controllers::fixtures::InstanceBuilder;
use crate::model::RetainedVolume;
use crate::store::volumes::ReportedVolume;

fn reported(host: &str, instance: &str, replica: &str) -> HostVolume {
    HostVolume {
        host: host.into(),
        volume: ReportedVolume {
            name: format!("vol-{host}-{replica}"),
            tenant: "acme".into(),
            project: "web".into(),
            instance: instance.into(),
            replica: replica.into(),
        },
        first_seen: "2026-01-01T00:00:00Z".into(),
        ..HostVolume::default()
    }
}

fn status_of(views: &[VolumeView], name: &str) -> VolumeStatus {
    views
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no {name} in {views:?}"))
        .status
}

#[test]
fn volumes_are_in_use_retained_or_orphaned_by_who_claims_them() {
    let mut bot = InstanceBuilder::new("bot")
        .replicas(1)
        .placed(0, "h1")
        .build();
    bot.status.as_mut().unwrap().retained_volumes = vec![
        RetainedVolume {
            replica: "bot-1".into(),
            ordinal: 1,
            host: "h2".into(),
            ..Default::default()
        },
        RetainedVolume {
            replica: "bot-2".into(),
            ordinal: 2,
            host: "h1".into(),
            reason: Some(crate::model::RETAINED_BY_FAILOVER.into()),
            ..Default::default()
        },
    ];
    let volumes = vec![
        reported("h1", "bot", "bot-0"),
        reported("h2", "bot", "bot-0"),
        reported("h2", "bot", "bot-1"),
        reported("h1", "bot", "bot-2"),
        reported("h1", "gone", "gone-0"),
        reported("h1", "kept", "kept-0"),
        HostVolume {
            delete_requested: Some("2026-01-02T00:00:00Z".into()),
            delete_reason: Some("user:admin".into()),
            ..reported("h3", "gone", "gone-0")
        },
    ];
    let deleted = vec![DeletedVolume {
        instance_uid: "u".into(),
        tenant: "acme".into(),
        project: "web".into(),
        instance: "kept".into(),
        replica: "kept-0".into(),
        ordinal: 0,
        host: "h1".into(),
        since: "2026-01-01T00:00:00Z".into(),
    }];
    let views = classify(&volumes, &[bot.clone()], &deleted);
    assert_eq!(status_of(&views, "vol-h1-bot-0"), VolumeStatus::InUse);
    assert_eq!(
        status_of(&views, "vol-h2-bot-0"),
        VolumeStatus::Orphaned,
        "the replica runs on another host"
    );
    assert_eq!(status_of(&views, "vol-h2-bot-1"), VolumeStatus::Retained);
    assert_eq!(status_of(&views, "vol-h1-bot-2"), VolumeStatus::Retained);
    assert_eq!(status_of(&views, "vol-h1-gone-0"), VolumeStatus::Orphaned);
    assert_eq!(status_of(&views, "vol-h1-kept-0"), VolumeStatus::Orphaned);
    assert!(
        views
            .iter()
            .find(|v| v.name == "vol-h1-kept-0")
            .unwrap()
            .message
            .contains("whenDeleted: Retain")
    );
    assert_eq!(status_of(&views, "vol-h3-gone-0"), VolumeStatus::Deleting);

    // With whenScaled: Delete a scale-down keeps nothing; a failover still does.
    bot.spec.volume_retention.when_scaled = RetentionPolicy::Delete;
    let views = classify(&volumes, &[bot], &deleted);
    assert_eq!(status_of(&views, "vol-h2-bot-1"), VolumeStatus::Orphaned);
    assert_eq!(status_of(&views, "vol-h1-bot-2"), VolumeStatus::Retained);
}

fn view(name: &str, status: VolumeStatus, orphaned_since: Option<&str>) -> VolumeView {
    VolumeView {
        host: "h1".into(),
        name: name.into(),
        tenant: "acme".into(),
        project: "web".into(),
        instance: "bot".into(),
        replica: "bot-0".into(),
        status,
        message: String::new(),
        first_seen: "2026-01-01T00:00:00Z".into(),
        orphaned_since: orphaned_since.map(str::to_string),
        delete_requested: None,
        delete_reason: None,
    }
}

#[test]
fn orphans_are_marked_then_expire_only_with_a_retention_period() {
    // 2026-01-01T01:00:00Z
    let now_ms = 1_767_229_200_000;
    let now = "2026-01-01T01:00:00Z";
    let views = vec![
        view("new-orphan", VolumeStatus::Orphaned, None),
        view(
            "old-orphan",
            VolumeStatus::Orphaned,
            Some("2026-01-01T00:00:00Z"),
        ),
        view(
            "young-orphan",
            VolumeStatus::Orphaned,
            Some("2026-01-01T00:50:00Z"),
        ),
        view(
            "claimed-again",
            VolumeStatus::InUse,
            Some("2026-01-01T00:00:00Z"),
        ),
        view("in-use", VolumeStatus::InUse, None),
        view("retained", VolumeStatus::Retained, None),
    ];
    let p = plan(&views, None, now_ms, now);
    assert_eq!(
        p.marks,
        vec![
            ("h1".into(), "new-orphan".into(), Some(now.to_string())),
            ("h1".into(), "claimed-again".into(), None),
        ]
    );
    assert!(
        p.expire.is_empty(),
        "without a retention period nothing goes"
    );
    assert_eq!(p.next, None);

    let p = plan(&views, Some(Duration::from_secs(30 * 60)), now_ms, now);
    assert_eq!(p.expire, vec![("h1".to_string(), "old-orphan".to_string())]);
    assert_eq!(
        p.next,
        Some(Duration::from_secs(20 * 60)),
        "the young orphan expires in 20 minutes"
    );
}

#[test]
fn a_pass_asks_for_the_removal_of_expired_orphans_and_leaves_claimed_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap();
    let listed = vec![ReportedVolume {
        name: "v0".into(),
        tenant: "acme".into(),
        project: "web".into(),
        instance: "gone".into(),
        replica: "gone-0".into(),
    }];
    let index = store.index();
    assert!(
        store
            .record_host_volumes("h1", &listed, "2026-01-01T00:00:00Z")
            .unwrap()
    );
    assert!(
        !store
            .record_host_volumes("h1", &listed, "2026-01-01T00:00:09Z")
            .unwrap()
    );
    assert_eq!(store.index(), index, "a reported list moves no index");

    // No retention: marked, kept.
    let t0 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    assert_eq!(reconcile_at(&store, None, t0).unwrap(), None);
    let v = &store.host_volumes(Some("h1")).unwrap()[0];
    assert_eq!(
        v.orphaned_since.as_deref(),
        Some("2026-01-01T00:00:00.000Z")
    );
    assert_eq!(v.delete_requested, None);

    // With one: asked for once the period passed, with an index move.
    let hour = Duration::from_secs(3600);
    assert_eq!(
        reconcile_at(&store, Some(hour), t0 + 1000).unwrap(),
        Some(hour - Duration::from_secs(1))
    );
    reconcile_at(&store, Some(hour), t0 + 3_600_000).unwrap();
    let v = &store.host_volumes(Some("h1")).unwrap()[0];
    assert_eq!(v.delete_reason.as_deref(), Some("retention"));
    assert_eq!(
        store.volume_deletions().unwrap(),
        [("h1".to_string(), "v0".to_string())]
    );
    let asked_at = store.index();
    assert!(asked_at > index);
    assert_eq!(
        views(&store, None).unwrap()[0].status,
        VolumeStatus::Deleting
    );

    // The host no longer lists it: gone, and the index moves so the host is no longer asked.
    assert!(
        store
            .record_host_volumes("h1", &[], "2026-01-01T01:00:05Z")
            .unwrap()
    );
    assert!(store.host_volumes(None).unwrap().is_empty());
    assert!(store.index() > asked_at);
}
