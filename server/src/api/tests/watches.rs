//! Watches and events through the API: scoping, 410 Gone, the stream's lines.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tower::ServiceExt;

use super::{Fixture, fixture, instance, project, tenant};
use crate::events::Event;
use crate::model::{Kind, ObjectKey};
use crate::store::{Store, TokenKind};

/// An open watch: its lines as they come.
struct Stream {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
}

impl Stream {
    /// The next line (JSON), or `None` when nothing comes within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(n) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=n).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim().trim_start_matches("data: ").trim();
                if text.is_empty() {
                    continue;
                }
                return Some(serde_json::from_str(text).unwrap());
            }
            let data = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .ok()??
                .ok()?;
            self.buf.extend_from_slice(&data);
        }
    }

    /// The next ADDED/MODIFIED/DELETED line (bookmarks skipped).
    async fn change(&mut self) -> Option<Value> {
        loop {
            let v = self.next(Duration::from_secs(10)).await?;
            if v["type"] != "BOOKMARK" {
                return Some(v);
            }
        }
    }
}

async fn open(f: &Fixture, path: &str, token: &str, sse: bool) -> (StatusCode, Stream) {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    if sse {
        req = req.header(header::ACCEPT, "text/event-stream");
    }
    let resp = f
        .app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    (
        status,
        Stream {
            body: resp.into_body().into_data_stream(),
            buf: Vec::new(),
        },
    )
}

async fn setup() -> (Fixture, String) {
    let f = fixture();
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [tenant("acme"), tenant("other"), project("acme", "helpdesk"), project("other", "ops")]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let acme = f.token_record(TokenKind::Api, "tenant-admin", |r| {
        r.tenant = Some("acme".into())
    });
    (f, acme)
}

#[tokio::test]
async fn a_tenants_watch_carries_its_own_changes_and_never_anothers() {
    let (f, acme) = setup().await;
    let list = f.get("/api/v1/instances").await;
    let index = list.body["index"].as_u64().unwrap();
    let (status, mut w) = open(
        &f,
        &format!("/api/v1/instances?watch=true&resourceVersion={index}"),
        &acme,
        false,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for (t, p) in [("other", "ops"), ("acme", "helpdesk")] {
        let r = f
            .json(
                Method::POST,
                "/api/v1/apply",
                json!({"items": [instance(t, p, "bot", 0)]}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    for (t, p) in [("other", "ops"), ("acme", "helpdesk")] {
        let r = f
            .send(
                Method::DELETE,
                &format!("/api/v1/tenants/{t}/projects/{p}/instances/bot"),
                Some(&f.token),
                None,
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let added = w.change().await.unwrap();
    assert_eq!(added["type"], "ADDED");
    assert_eq!(added["object"]["metadata"]["tenant"], "acme");
    let deleted = w.change().await.unwrap();
    assert_eq!(deleted["type"], "DELETED", "{deleted}");
    assert_eq!(deleted["object"]["metadata"]["tenant"], "acme");
    // Nothing of the other tenant, its delete included.
    assert!(w.next(Duration::from_millis(300)).await.is_none());

    // A watch from the start replays the same, from the change log.
    let (_, mut replay) = open(
        &f,
        "/api/v1/tenants/acme/projects/helpdesk/instances?watch=true&resourceVersion=0",
        &acme,
        true,
    )
    .await;
    let first = replay.change().await.unwrap();
    assert_eq!(
        (
            first["type"].as_str(),
            first["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("bot"))
    );
    assert_eq!(replay.change().await.unwrap()["type"], "DELETED");
}

#[tokio::test]
async fn a_version_older_than_the_log_is_gone() {
    let (f, _) = setup().await;
    // Trim the log as a long-running server would have.
    {
        let conn = rusqlite::Connection::open(f.dir.path().join("clusterclaw.db")).unwrap();
        conn.execute_batch(
            "DELETE FROM changes; UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'index') WHERE key = 'changes_from';",
        )
        .unwrap();
    }
    let r = f.get("/api/v1/tenants?watch=true&resourceVersion=0").await;
    assert_eq!(r.status, StatusCode::GONE, "{}", r.body);
    assert_eq!(r.body["code"], "Gone");
    assert!(r.message().contains("list again"), "{}", r.body);
    let bad = f.get("/api/v1/tenants?resourceVersion=1").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn events_are_listed_and_watched_in_scope() {
    let (f, acme) = setup().await;
    let store = f.store.as_ref();
    let inst = |t: &str, p: &str| ObjectKey {
        kind: Kind::OpenClawInstance,
        tenant: t.into(),
        project: p.into(),
        name: "bot".into(),
    };
    for _ in 0..3 {
        crate::events::record(
            store,
            Event::warning(
                inst("acme", "helpdesk"),
                "ContainerRestarted",
                "exit code 1",
            )
            .replica("bot-0")
            .source("agent/h1"),
        );
    }
    crate::events::record(
        store,
        Event::normal(inst("other", "ops"), "Scheduled", "to h1"),
    );
    crate::events::record(
        store,
        Event::warning(
            ObjectKey::cluster(Kind::Host, "h1"),
            "HostNotReady",
            "silent",
        ),
    );
    store.flush_events().unwrap();

    let all = f.get("/api/v1/events").await;
    assert_eq!(
        all.body["items"].as_array().unwrap().len(),
        3,
        "{}",
        all.body
    );
    let mine = f
        .send(
            Method::GET,
            "/api/v1/events",
            Some(&acme),
            None,
            Body::empty(),
        )
        .await;
    let items = mine.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", mine.body);
    assert_eq!(items[0]["count"], 3);
    assert_eq!(items[0]["involvedObject"]["replica"], "bot-0");
    let one = f
        .get("/api/v1/tenants/acme/projects/helpdesk/events?for=instance/bot")
        .await;
    assert_eq!(one.body["items"].as_array().unwrap().len(), 1);
    let theirs = f
        .send(
            Method::GET,
            "/api/v1/tenants/other/events",
            Some(&acme),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND);
    let bad = f.get("/api/v1/events?for=pod/x").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    // A watch of events: the next restart folds into the same event, MODIFIED with its count.
    let index = mine.body["index"].as_u64().unwrap();
    let (status, mut w) = open(
        &f,
        &format!("/api/v1/events?watch=true&resourceVersion={index}"),
        &acme,
        false,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    crate::events::record(
        store,
        Event::normal(inst("other", "ops"), "Scheduled", "elsewhere"),
    );
    crate::events::record(
        store,
        Event::warning(
            inst("acme", "helpdesk"),
            "ContainerRestarted",
            "exit code 1",
        )
        .replica("bot-0")
        .source("agent/h1"),
    );
    store.flush_events().unwrap();
    let change = w.change().await.unwrap();
    assert_eq!(change["type"], "MODIFIED", "{change}");
    assert_eq!(change["object"]["count"], 4);
    assert!(w.next(Duration::from_millis(300)).await.is_none());
}
