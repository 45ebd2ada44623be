//! The server replicas through the API: every registered replica is listed with the leader
//! taken from the lease, `/info` names the answering replica, both only to cluster-wide callers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, StatusCode};

use super::Fixture;
use crate::api::{ApiState, router};
use crate::auth;
use crate::metrics::Metrics;
use crate::store::lease::LeaderStatus;
use crate::store::replicas::{ReplicaBeat, SelfView};
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, TokenKind};

fn beat(id: &str, leading: bool) -> ReplicaBeat {
    ReplicaBeat {
        id: id.into(),
        hostname: "cp".into(),
        api: format!("http://127.0.0.1:7080/{id}"),
        agent: "127.0.0.1:7443".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at_ms: 1_000,
        beat_every: Duration::from_secs(2),
        leading,
        epoch: 1,
    }
}

#[tokio::test]
async fn the_replicas_are_listed_with_the_leader_of_the_lease_to_cluster_wide_callers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("clusterclaw.db")).unwrap());
    let admin = auth::ensure_admin_token(store.as_ref(), dir.path())
        .unwrap()
        .unwrap();
    let lease = store
        .lease_acquire("cp1-1", 0, Duration::from_secs(60))
        .unwrap();
    let hour = Duration::from_secs(3600);
    // The other replica still says it leads; the lease says who does.
    store.server_heartbeat(&beat("cp2-2", true), hour).unwrap();
    store.server_heartbeat(&beat("cp1-1", true), hour).unwrap();
    let metrics = Arc::new(Metrics::default());
    metrics.set_leader(LeaderStatus {
        server: "cp1-1".into(),
        leading: true,
        holder: "cp1-1".into(),
        epoch: lease.epoch,
        expires_at: None,
    });
    metrics.set_replica(SelfView {
        beat: beat("cp1-1", true),
        store_error: None,
    });
    let state = ApiState::with_options(
        store.clone() as Arc<dyn Store>,
        dir.path().join("admin.token"),
        Arc::default(),
        metrics,
        Default::default(),
    );
    let f = Fixture {
        app: router(state),
        token: admin.token.expose().to_string(),
        store,
        dir,
    };
    let r = f.get("/api/v1/servers").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{}", r.body);
    assert_eq!(
        (&items[0]["id"], &items[0]["leading"], &items[0]["self"]),
        (&"cp1-1".into(), &true.into(), &true.into())
    );
    assert_eq!(items[0]["status"], "Ready");
    assert_eq!(items[0]["storeReachable"], true);
    assert_eq!(items[0]["epoch"], lease.epoch);
    assert_eq!(
        (&items[1]["id"], &items[1]["leading"], &items[1]["self"]),
        (&"cp2-2".into(), &false.into(), &false.into())
    );
    assert!(
        items[1]["lastSeen"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let info = f.get("/api/v1/info").await;
    assert_eq!(info.body["server"]["id"], "cp1-1", "{}", info.body);
    assert_eq!(info.body["server"]["leading"], true);
    assert_eq!(info.body["server"]["leader"], "cp1-1");

    // A tenant's viewer reads /info without the replica, and may not list the replicas; a
    // cluster-wide viewer may.
    let as_caller = |path: &'static str, token: String| {
        let f = &f;
        async move {
            f.send(Method::GET, path, Some(&token), None, Body::empty())
                .await
        }
    };
    let viewer = f.token_record(TokenKind::Api, "viewer", |r| r.tenant = Some("acme".into()));
    let info = as_caller("/api/v1/info", viewer.clone()).await;
    assert_eq!(info.status, StatusCode::OK);
    assert!(info.body.get("server").is_none(), "{}", info.body);
    let r = as_caller("/api/v1/servers", viewer).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let viewer = f.token_record(TokenKind::Api, "viewer", |_| {});
    let r = as_caller("/api/v1/servers", viewer).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}
