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
    /// The answer's `Content-Type`.
    content_type: String,
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
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (
        status,
        Stream {
            body: resp.into_body().into_data_stream(),
            buf: Vec::new(),
            content_type,
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

/// Routes read with `GET` that are not lists: single objects (their path ends in a name),
/// streams and reports.
const NOT_LISTS: &[&str] = &[
    "/metrics",
    "/api/v1/openapi.json",
    "/api/v1/info",
    "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/logs",
    "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/config",
    "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}/config/diff",
    "/api/v1/hosts/{host}/drain",
    "/api/v1/audit/verify",
];

/// Every list the API serves can be watched (and says so in the OpenAPI document), with the
/// same permission as the list: a new list that cannot be watched fails here.
#[tokio::test]
async fn every_list_route_can_be_watched() {
    use super::super::openapi::WATCHABLE_LISTS;
    use super::super::routes::Need;
    let (f, acme) = setup().await;
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [instance("acme", "helpdesk", "bot", 0)]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let table = super::super::route_table();
    let mut lists = Vec::new();
    for (path, method, need) in table.entries() {
        if *method != Method::GET || !matches!(need, Need::Perm(..)) {
            continue;
        }
        if path.ends_with('}') || NOT_LISTS.contains(&path) {
            assert!(!WATCHABLE_LISTS.contains(&path), "{path}");
            continue;
        }
        assert!(
            WATCHABLE_LISTS.contains(&path),
            "{path} is a list the OpenAPI document does not show as watchable"
        );
        lists.push(path.to_string());
    }
    assert_eq!(lists.len(), WATCHABLE_LISTS.len(), "{lists:?}");
    for path in lists {
        let concrete = path
            .replace("{tenant}", "acme")
            .replace("{project}", "helpdesk")
            .replace("{name}", "bot");
        for (token, sse) in [(f.token.as_str(), false), (acme.as_str(), true)] {
            let (status, w) = open(&f, &format!("{concrete}?watch=true"), token, sse).await;
            // The same permission as the list's: a tenant's role may not list hosts nor
            // cluster-wide Rollouts, nor watch them.
            let listed = f
                .send(Method::GET, &concrete, Some(token), None, Body::empty())
                .await;
            assert_eq!(status, listed.status, "{path} sse={sse}");
            if listed.status != StatusCode::OK {
                assert_eq!(listed.status, StatusCode::FORBIDDEN, "{path}");
                continue;
            }
            assert_eq!(
                w.content_type,
                if sse {
                    "text/event-stream"
                } else {
                    "application/x-ndjson"
                },
                "{path}"
            );
        }
    }
    // A role that may not read a list may not watch it either.
    let viewer_elsewhere = f.token_record(TokenKind::Api, "viewer", |r| {
        r.tenant = Some("other".into())
    });
    let (status, _) = open(
        &f,
        "/api/v1/tenants/acme/projects/helpdesk/instances/bot/config/revisions?watch=true",
        &viewer_elsewhere,
        false,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// The next line that is not a periodic bookmark.
async fn next_line(w: &mut Stream) -> Value {
    loop {
        let v = w.next(Duration::from_secs(10)).await.expect("a line");
        if v["type"] != "BOOKMARK" || v.get("initialEventsEnd").is_some() {
            return v;
        }
    }
}

#[tokio::test]
async fn tokens_are_watched_in_scope_from_their_current_list() {
    let (f, acme) = setup().await;
    let list = f
        .send(
            Method::GET,
            "/api/v1/tokens",
            Some(&acme),
            None,
            Body::empty(),
        )
        .await;
    let index = list.body["index"].as_u64().unwrap();
    let listed = list.body["items"].as_array().unwrap().len();
    assert_eq!(listed, 1, "{}", list.body);
    let (status, mut w) = open(
        &f,
        &format!("/api/v1/tokens?watch=true&resourceVersion={index}"),
        &acme,
        false,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // No replay: the current list first, then the end of it.
    let first = next_line(&mut w).await;
    assert_eq!(first["type"], "ADDED", "{first}");
    assert_eq!(first["object"]["tenant"], "acme");
    let end = next_line(&mut w).await;
    assert_eq!(end["initialEventsEnd"], true, "{end}");
    // Another tenant's token is never seen; this tenant's comes, and its revocation.
    f.token_record(TokenKind::Api, "viewer", |r| {
        r.tenant = Some("other".into())
    });
    f.token_record(TokenKind::Api, "viewer", |r| {
        r.tenant = Some("acme".into());
        r.name = "watched".into();
    });
    let added = next_line(&mut w).await;
    assert_eq!(added["type"], "ADDED", "{added}");
    assert_eq!(added["object"]["name"], "watched");
    assert!(added["object"].get("hash").is_none(), "{added}");
    let id = added["object"]["id"].as_str().unwrap().to_string();
    let r = f.delete(&format!("/api/v1/tokens/{id}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let revoked = next_line(&mut w).await;
    assert_eq!(revoked["type"], "MODIFIED", "{revoked}");
    assert_eq!(revoked["object"]["revoked"], true);
    assert!(w.next(Duration::from_millis(1500)).await.is_none());
}

#[tokio::test]
async fn volumes_are_watched_in_scope_although_reports_move_no_index() {
    use crate::store::volumes::ReportedVolume;
    let (f, acme) = setup().await;
    let vol = |tenant: &str, project: &str| ReportedVolume {
        name: format!("vol-{tenant}"),
        tenant: tenant.into(),
        project: project.into(),
        instance: "bot".into(),
        replica: "bot-0".into(),
    };
    let (status, mut w) = open(&f, "/api/v1/volumes?watch=true", &acme, false).await;
    assert_eq!(status, StatusCode::OK);
    let now = "2026-01-01T00:00:00Z";
    f.store
        .record_host_volumes("h1", &[vol("acme", "helpdesk"), vol("other", "ops")], now)
        .unwrap();
    let added = next_line(&mut w).await;
    assert_eq!(added["type"], "ADDED", "{added}");
    assert_eq!(added["object"]["name"], "vol-acme");
    assert_eq!(added["object"]["host"], "h1");
    f.store
        .record_host_volumes("h1", &[vol("other", "ops")], now)
        .unwrap();
    let deleted = next_line(&mut w).await;
    assert_eq!(deleted["type"], "DELETED", "{deleted}");
    assert_eq!(deleted["object"]["name"], "vol-acme");
    // The other tenant's volume never showed.
    assert!(w.next(Duration::from_millis(1500)).await.is_none());
    let bad = f.get("/api/v1/volumes?watch=true&resourceVersion=x").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.message().contains("resourceVersion"), "{}", bad.body);
}

#[tokio::test]
async fn config_revisions_are_watched_until_their_instance_goes() {
    let (f, _) = setup().await;
    let apply = |version: &str| {
        let mut i = instance("acme", "helpdesk", "bot", 0);
        i["spec"]["version"] = json!(version);
        json!({ "items": [i] })
    };
    let r = f
        .json(Method::POST, "/api/v1/apply", apply("2026.7.1"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let path = "/api/v1/tenants/acme/projects/helpdesk/instances/bot/config/revisions";
    let (status, mut w) = open(&f, &format!("{path}?watch=true"), &f.token, true).await;
    assert_eq!(status, StatusCode::OK);
    let r = f
        .json(Method::POST, "/api/v1/apply", apply("2026.8.1"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let added = next_line(&mut w).await;
    assert_eq!(added["type"], "ADDED", "{added}");
    assert_eq!(added["object"]["revision"], 2);
    let r = f
        .delete("/api/v1/tenants/acme/projects/helpdesk/instances/bot")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let end = next_line(&mut w).await;
    assert_eq!(end["type"], "ERROR", "{end}");
    assert_eq!(end["object"]["code"], 404);
    assert!(w.next(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn the_audit_log_is_watched_after_a_seq_in_scope() {
    let (f, acme) = setup().await;
    let (audited, writer) = f.audited();
    let write = |t: &str, p: &str| json!({"items": [instance(t, p, "bot", 0)]});
    let r = audited
        .json(Method::POST, "/api/v1/apply", write("acme", "helpdesk"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    writer.flush().await.unwrap();
    let seq = f.audit_records().last().unwrap().seq;
    // From before that record: it is replayed.
    let (status, mut w) = open(
        &audited,
        &format!("/api/v1/audit?watch=true&resourceVersion={}", seq - 1),
        &acme,
        false,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let replayed = next_line(&mut w).await;
    assert_eq!(replayed["type"], "ADDED", "{replayed}");
    assert_eq!(replayed["object"]["seq"], seq);
    // Then what comes, of this tenant only.
    for (t, p) in [("other", "ops"), ("acme", "helpdesk")] {
        let mut body = write(t, p);
        body["items"][0]["spec"]["replicas"] = json!(1);
        let r = audited.json(Method::POST, "/api/v1/apply", body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    writer.flush().await.unwrap();
    let next = next_line(&mut w).await;
    assert_eq!(next["type"], "ADDED", "{next}");
    assert!(next["object"]["seq"].as_u64().unwrap() > seq);
    assert_eq!(next["object"]["tenant"], "acme", "{next}");
    assert!(w.next(Duration::from_millis(1500)).await.is_none());
    let bad = audited.get("/api/v1/audit?watch=true&limit=5").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.message().contains("limit"), "{}", bad.body);
}
