//! Router tests against a real SQLite store in a temporary directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::{ApiState, router};

mod config_center;
mod console;
mod permissions;
mod rollout;
mod servers;
mod tenancy;
mod volumes;
mod watches;
mod waves;
use crate::auth::{
    self, PLATFORM_ADMIN, generate_api_token, generate_join_token, generate_token_id, hash_token,
};
use crate::model::{MAX_OBJECT_BYTES, Resource};
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, TokenKind, TokenRecord, WriteMode};

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    app: Router,
    token: String,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn index(&self) -> u64 {
        self.headers
            .get("x-clusterclaw-index")
            .unwrap_or_else(|| panic!("no index header on {} {}", self.status, self.body))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn fields(&self) -> Vec<&str> {
        self.body["details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["field"].as_str().unwrap())
            .collect()
    }

    fn message(&self) -> &str {
        self.body["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message in {}", self.body))
    }
}

fn fixture() -> Fixture {
    fixture_with(|_| super::ApiOptions::default())
}

/// A fixture whose API has the options `options` makes (given the data directory).
fn fixture_with(options: impl FnOnce(&std::path::Path) -> super::ApiOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("clusterclaw.db")).unwrap());
    let admin = auth::ensure_admin_token(store.as_ref(), dir.path())
        .unwrap()
        .unwrap();
    let state = ApiState::with_options(
        store.clone() as Arc<dyn Store>,
        dir.path().join("admin.token"),
        Arc::default(),
        Arc::default(),
        options(dir.path()),
    );
    Fixture {
        app: router(state),
        token: admin.token.expose().to_string(),
        store,
        dir,
    }
}

impl Fixture {
    /// The same store and admin token behind an API that writes the audit log, and its writer.
    fn audited(&self) -> (Fixture, crate::audit::AuditWriter) {
        use crate::audit::{AuditConfig, AuditWriter};
        let writer = AuditWriter::start(
            self.store.clone() as Arc<dyn Store>,
            &AuditConfig::default(),
        )
        .unwrap();
        let state = ApiState::with_options(
            self.store.clone() as Arc<dyn Store>,
            self.dir.path().join("admin.token"),
            Arc::default(),
            Arc::default(),
            super::ApiOptions {
                audit: Some(writer.clone()),
                ..Default::default()
            },
        );
        let audited = Fixture {
            app: router(state),
            dir: tempfile::tempdir().unwrap(),
            store: self.store.clone(),
            token: self.token.clone(),
        };
        (audited, writer)
    }

    /// Every record of the audit log, oldest first.
    fn audit_records(&self) -> Vec<crate::audit::AuditRecord> {
        self.store
            .list_audit(&crate::audit::AuditFilter {
                limit: 1000,
                ..Default::default()
            })
            .unwrap()
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Body,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let text_plain = headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"));
        let body = if bytes.is_empty() {
            Value::Null
        } else if text_plain {
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{status}: not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, Some(&self.token), None, Body::empty())
            .await
    }

    async fn json(&self, method: Method, path: &str, body: Value) -> Reply {
        self.send(
            method,
            path,
            Some(&self.token),
            Some("application/json"),
            Body::from(body.to_string()),
        )
        .await
    }

    async fn yaml(&self, path: &str, text: &str) -> Reply {
        self.send(
            Method::POST,
            path,
            Some(&self.token),
            Some("application/yaml"),
            Body::from(text.to_string()),
        )
        .await
    }

    async fn delete(&self, path: &str) -> Reply {
        self.send(Method::DELETE, path, Some(&self.token), None, Body::empty())
            .await
    }

    fn add_token(&self, kind: TokenKind, expires_at: Option<i64>, revoked: bool) -> String {
        let secret = match kind {
            TokenKind::Api => generate_api_token(),
            TokenKind::Join => generate_join_token(),
        };
        let record = TokenRecord {
            id: generate_token_id(),
            name: "t".into(),
            kind,
            role: if kind == TokenKind::Api {
                PLATFORM_ADMIN.into()
            } else {
                String::new()
            },
            tenant: None,
            project: None,
            created_at: 0,
            expires_at,
            uses_remaining: None,
            revoked,
            hash: hash_token(secret.expose()),
        };
        self.store.insert_token(&record).unwrap();
        secret.expose().to_string()
    }
}

fn tenant(name: &str) -> Value {
    json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": name}})
}

fn project(tenant: &str, name: &str) -> Value {
    json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project", "metadata": {"name": name, "tenant": tenant}})
}

fn instance(tenant: &str, project: &str, name: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
        "metadata": {"name": name, "tenant": tenant, "project": project, "labels": {"tier": "gold"}},
        "spec": {"version": "2026.7.1", "replicas": replicas}
    })
}

const INSTANCES: &str = "/api/v1/tenants/acme/projects/helpdesk/instances";

async fn seeded() -> Fixture {
    let f = fixture();
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [tenant("acme"), project("acme", "helpdesk")]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    f
}

// ---- authentication --------------------------------------------------------------------

#[tokio::test]
async fn health_is_open_and_the_api_is_not() {
    let f = fixture();
    let r = f
        .send(Method::GET, "/healthz", None, None, Body::empty())
        .await;
    assert_eq!((r.status, r.body), (StatusCode::OK, json!({"ok": true})));
    let r = f
        .send(Method::GET, "/readyz", None, None, Body::empty())
        .await;
    assert_eq!((r.status, r.body), (StatusCode::OK, json!({"ready": true})));
    for path in [
        "/api/v1/openapi.json",
        "/api/v1/info",
        "/api/v1/tenants",
        "/api/v1/nonexistent",
    ] {
        let r = f.send(Method::GET, path, None, None, Body::empty()).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(r.body["code"], "Unauthorized");
        assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Bearer");
        r.index();
    }
    let r = f
        .send(Method::GET, "/api/v1/info", None, None, Body::empty())
        .await;
    assert!(
        r.message().contains("Authorization: Bearer")
            && r.message().contains("admin.token")
            && r.message().contains("clusterclaw token create"),
        "{}",
        r.message()
    );
    // An anonymous caller learns no path of the server's host.
    let data_dir = f.dir.path().display().to_string();
    let body = r.body.to_string();
    assert!(!body.contains(&data_dir), "{body}");
    assert!(!r.message().contains('/'), "{}", r.message());
}

#[tokio::test]
async fn every_kind_of_bad_token_gets_401_saying_what_to_do() {
    let f = fixture();
    let expired = f.add_token(TokenKind::Api, Some(1), false);
    let revoked = f.add_token(TokenKind::Api, None, true);
    let join = f.add_token(TokenKind::Join, None, false);
    let unknown = generate_api_token().expose().to_string();
    let cases: [(&str, Option<String>, &str); 6] = [
        (
            "malformed scheme",
            Some(format!("Basic {}", f.token)),
            "malformed",
        ),
        ("not a token", Some("Bearer hello".into()), "cca_"),
        ("unknown", Some(format!("Bearer {unknown}")), "not known"),
        (
            "expired",
            Some(format!("Bearer {expired}")),
            "expired at 1970-01-01T00:00:01Z",
        ),
        ("revoked", Some(format!("Bearer {revoked}")), "revoked"),
        (
            "join",
            Some(format!("Bearer {join}")),
            "only enrolls hosts with clusterclaw-agent",
        ),
    ];
    for (what, header_value, says) in cases {
        let mut req = Request::get("/api/v1/info");
        if let Some(h) = header_value {
            req = req.header(header::AUTHORIZATION, h);
        }
        let resp = f
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
        let body: Value = serde_json::from_slice(
            &axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap(),
        )
        .unwrap();
        let msg = body["message"].as_str().unwrap();
        assert!(msg.contains(says), "{what}: {msg}");
        assert!(msg.contains("admin.token"), "{what}: {msg}");
    }
    let r = f.get("/api/v1/info").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["apiVersion"], "clusterclaw.io/v1");
    assert_eq!(r.body["version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn other_roles_are_forbidden_for_now() {
    let f = fixture();
    let secret = generate_api_token();
    let mut record = TokenRecord {
        id: generate_token_id(),
        name: "viewer".into(),
        kind: TokenKind::Api,
        role: "tenant-viewer".into(),
        tenant: Some("acme".into()),
        project: None,
        created_at: 0,
        expires_at: None,
        uses_remaining: None,
        revoked: false,
        hash: String::new(),
    };
    record.hash = hash_token(secret.expose());
    f.store.insert_token(&record).unwrap();
    let r = f
        .send(
            Method::GET,
            "/api/v1/tenants",
            Some(secret.expose()),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.body["code"], "Forbidden");
}

// ---- objects ---------------------------------------------------------------------------

#[tokio::test]
async fn create_get_list_delete() {
    let f = fixture();
    let r = f
        .json(Method::POST, "/api/v1/tenants", tenant("acme"))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["metadata"]["name"], "acme");
    assert_eq!(r.body["metadata"]["generation"], 1);
    let created_at = r.index();
    assert_eq!(r.body["metadata"]["resourceVersion"], created_at);

    let r = f
        .json(Method::POST, "/api/v1/tenants", tenant("acme"))
        .await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (StatusCode::CONFLICT, Some("AlreadyExists"))
    );

    // The path gives tenant, kind and apiVersion when the body leaves them out.
    let r = f
        .json(
            Method::POST,
            "/api/v1/tenants/acme/projects",
            json!({"metadata": {"name": "helpdesk"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["metadata"]["tenant"], "acme");
    let r = f
        .json(
            Method::POST,
            INSTANCES,
            instance("acme", "helpdesk", "bot", 2),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(
        r.body["spec"]["resources"]["memory"], "2Gi",
        "defaults are filled in"
    );

    let r = f.get(&format!("{INSTANCES}/bot")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["spec"]["replicas"], 2);
    assert!(r.index() >= created_at);

    let r = f.get("/api/v1/instances").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["index"], r.index());
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    for path in [
        "/api/v1/instances?tenant=acme&project=helpdesk&labelSelector=tier%3Dgold",
        "/api/v1/instances?labelSelector=tier",
        INSTANCES,
    ] {
        assert_eq!(
            f.get(path).await.body["items"].as_array().unwrap().len(),
            1,
            "{path}"
        );
    }
    for path in [
        "/api/v1/instances?tenant=other",
        "/api/v1/instances?labelSelector=!tier",
        "/api/v1/projects?tenant=x",
    ] {
        assert_eq!(f.get(path).await.body["items"], json!([]), "{path}");
    }
    assert_eq!(
        f.get("/api/v1/tenants/nobody/projects").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        f.get("/api/v1/tenants/acme/projects").await.body["items"][0]["metadata"]["name"],
        "helpdesk"
    );

    let r = f.get(&format!("{INSTANCES}/nobody")).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NotFound"))
    );
    r.index();

    // Deleting a parent with children is refused.
    let r = f.delete("/api/v1/tenants/acme").await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (StatusCode::CONFLICT, Some("Conflict"))
    );
    let r = f
        .delete(&format!("{INSTANCES}/bot?resourceVersion=1"))
        .await;
    assert_eq!(
        r.status,
        StatusCode::CONFLICT,
        "stale precondition: {}",
        r.body
    );
    let r = f.delete(&format!("{INSTANCES}/bot")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["deleted"], "openclawinstance/acme/helpdesk/bot");
    assert_eq!(r.body["index"], r.index());
    assert_eq!(
        f.get(&format!("{INSTANCES}/bot")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        f.delete(&format!("{INSTANCES}/bot")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn put_reports_its_outcome_and_checks_preconditions() {
    let f = seeded().await;
    let path = format!("{INSTANCES}/bot");
    let r = f
        .json(Method::PUT, &path, instance("acme", "helpdesk", "bot", 1))
        .await;
    assert_eq!(
        (
            r.status,
            r.headers["x-clusterclaw-outcome"].to_str().unwrap()
        ),
        (StatusCode::CREATED, "created")
    );
    let rv = r.body["metadata"]["resourceVersion"].as_u64().unwrap();
    let r = f
        .json(Method::PUT, &path, instance("acme", "helpdesk", "bot", 1))
        .await;
    assert_eq!(
        (
            r.status,
            r.headers["x-clusterclaw-outcome"].to_str().unwrap()
        ),
        (StatusCode::OK, "unchanged")
    );
    let mut changed = instance("acme", "helpdesk", "bot", 3);
    changed["metadata"]["resourceVersion"] = json!(rv);
    let r = f.json(Method::PUT, &path, changed.clone()).await;
    assert_eq!(
        (
            r.status,
            r.headers["x-clusterclaw-outcome"].to_str().unwrap()
        ),
        (StatusCode::OK, "configured")
    );
    assert_eq!(r.body["metadata"]["generation"], 2);
    // The same precondition again is now stale.
    changed["spec"]["replicas"] = json!(4);
    let r = f.json(Method::PUT, &path, changed).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (StatusCode::CONFLICT, Some("Conflict"))
    );
    assert_eq!(r.fields(), ["metadata.resourceVersion"]);
    // The body may not contradict the path.
    let r = f
        .json(Method::PUT, &path, instance("acme", "helpdesk", "other", 1))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.fields(), ["metadata.name"]);
    // A project in a tenant that does not exist.
    let r = f
        .json(Method::PUT, "/api/v1/tenants/nobody/projects/p", json!({}))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_eq!(r.fields(), ["metadata.tenant"]);
}

#[tokio::test]
async fn invalid_objects_get_422_with_every_field() {
    let f = seeded().await;
    let mut bad = instance("acme", "helpdesk", "Bad_Name", 1000);
    bad["spec"]["resources"] = json!({"memory": "4GB"});
    let r = f.json(Method::POST, INSTANCES, bad).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["code"], "Invalid");
    assert_eq!(
        r.fields(),
        ["metadata.name", "spec.replicas", "spec.resources.memory"]
    );
    let r = f
        .json(
            Method::POST,
            INSTANCES,
            json!({"spec": {"version": "2026.7.1", "replicaz": 1}, "metadata": {"name": "x"}}),
        )
        .await;
    assert_eq!(r.fields(), ["spec.replicaz"]);
    r.index();
}

#[tokio::test]
async fn apply_is_all_or_nothing_with_item_paths() {
    let f = fixture();
    let mut bad = instance("acme", "helpdesk", "bot", 1);
    bad["spec"]["resources"] = json!({"memory": "lots"});
    let items = json!({"items": [tenant("acme"), project("acme", "helpdesk"), instance("acme", "helpdesk", "ok", 1), bad]});
    let r = f.json(Method::POST, "/api/v1/apply", items).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.fields(), ["items[3].spec.resources.memory"]);
    assert_eq!(
        f.get("/api/v1/tenants").await.body["items"],
        json!([]),
        "nothing was written"
    );

    // A child before its parent in the request is fine: parents are written first.
    let items = json!({"items": [instance("acme", "helpdesk", "bot", 1), project("acme", "helpdesk"), tenant("acme")]});
    let r = f
        .json(Method::POST, "/api/v1/apply?dryRun=true", items.clone())
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["items"][0]["outcome"], "created");
    assert_eq!(
        f.get("/api/v1/tenants").await.body["items"],
        json!([]),
        "a dry run writes nothing"
    );

    let r = f.json(Method::POST, "/api/v1/apply", items.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["index"], r.index());
    assert_eq!(
        r.body["items"][0],
        json!({"kind": "OpenClawInstance", "name": "bot", "tenant": "acme", "project": "helpdesk", "outcome": "created",
               "resourceVersion": r.index()})
    );
    assert_eq!(
        r.body["items"][2],
        json!({"kind": "Tenant", "name": "acme", "outcome": "created", "resourceVersion": r.index()})
    );

    let r = f.json(Method::POST, "/api/v1/apply", items).await;
    let outcomes: Vec<_> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["unchanged"; 3]);

    // A reference to a missing project names the item and the field.
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [tenant("acme"), instance("acme", "nope", "x", 1)]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_eq!(r.fields(), ["items[1].metadata.project"]);

    // Two items naming the same object.
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [tenant("dup"), tenant("dup")]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.fields(), ["items[1]"]);
}

#[tokio::test]
async fn apply_takes_multi_document_yaml() {
    let f = fixture();
    let yaml = "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: acme\n---\n\
                apiVersion: clusterclaw.io/v1\nkind: Project\nmetadata: {name: helpdesk, tenant: acme}\n---\n\
                apiVersion: clusterclaw.io/v1\nkind: OpenClawInstance\nmetadata: {name: bot, tenant: acme, project: helpdesk}\n\
                spec:\n  version: 2026.7.1\n  resources: {cpu: 2, memory: 4Gi}\n";
    let r = f.yaml("/api/v1/apply", yaml).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["items"].as_array().unwrap().len(), 3);
    let r = f.get(&format!("{INSTANCES}/bot")).await;
    assert_eq!(r.body["spec"]["version"], "2026.7.1");
    assert_eq!(r.body["spec"]["resources"]["cpu"], "2");

    let r = f
        .yaml("/api/v1/apply", "kind: Tenant\nmetadata:\n  name: [x\n")
        .await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("BadRequest"))
    );
    assert!(r.message().contains("line 3"), "{}", r.message());
    assert!(r.message().contains("column"), "{}", r.message());

    let r = f.json(Method::POST, "/api/v1/apply", json!("x")).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    let r = f
        .send(
            Method::POST,
            "/api/v1/apply",
            Some(&f.token),
            Some("application/json"),
            Body::from("{\"items\": ["),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("line 1 column 11"), "{}", r.message());
}

#[tokio::test]
async fn users_cannot_write_hosts() {
    let f = fixture();
    let host = json!({"apiVersion": "clusterclaw.io/v1", "kind": "Host", "metadata": {"name": "h1"},
                      "spec": {"hostname": "h1", "capacity": {"cpu": "4", "memory": "8Gi"}}});
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [tenant("acme"), host]}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("Forbidden"))
    );
    assert_eq!(r.fields(), ["items[1].kind"]);
    assert_eq!(f.get("/api/v1/tenants").await.body["items"], json!([]));
    let r = f
        .send(
            Method::PUT,
            "/api/v1/hosts/h1",
            Some(&f.token),
            Some("application/json"),
            Body::from("{}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = f
        .json(
            Method::POST,
            "/api/v1/tenants",
            json!({"kind": "Host", "metadata": {"name": "h1"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn hosts_are_listed_read_and_deleted() {
    let f = fixture();
    let host = Resource::from_value(json!({"apiVersion": "clusterclaw.io/v1", "kind": "Host", "metadata": {"name": "h1", "labels": {"region": "eu"}},
                      "spec": {"hostname": "h1", "capacity": {"cpu": "4", "memory": "8Gi"}}}))
    .unwrap();
    f.store.write(&[(host, WriteMode::Apply)], false).unwrap();
    let r = f.get("/api/v1/hosts?labelSelector=region%3Deu").await;
    assert_eq!(r.body["items"][0]["metadata"]["name"], "h1");
    assert_eq!(
        f.get("/api/v1/hosts/h1").await.body["spec"]["hostname"],
        "h1"
    );
    let r = f.delete("/api/v1/hosts/h1").await;
    assert_eq!(
        (r.status, r.body["deleted"].as_str()),
        (StatusCode::OK, Some("host/h1"))
    );
}

#[tokio::test]
async fn scale_changes_replicas_only() {
    let f = seeded().await;
    f.json(
        Method::POST,
        INSTANCES,
        instance("acme", "helpdesk", "bot", 1),
    )
    .await;
    let path = format!("{INSTANCES}/bot/scale");
    let r = f.json(Method::PUT, &path, json!({"replicas": 5})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["spec"]["replicas"], 5);
    assert_eq!(r.body["metadata"]["labels"]["tier"], "gold");
    assert_eq!(r.headers["x-clusterclaw-outcome"], "configured");
    let r = f.json(Method::PUT, &path, json!({"replicas": -1})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.fields(), ["replicas"]);
    let r = f
        .json(Method::PUT, &path, json!({"replicas": 1, "x": 1}))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = f
        .json(
            Method::PUT,
            &format!("{INSTANCES}/nobody/scale"),
            json!({"replicas": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

// ---- requests that are not well-formed -------------------------------------------------

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let f = seeded().await;
    let big = "x".repeat(super::BODY_LIMIT + 1);
    let r = f
        .send(
            Method::POST,
            "/api/v1/tenants",
            Some(&f.token),
            Some("application/json"),
            Body::from(big),
        )
        .await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("PayloadTooLarge"))
    );
    assert!(r.message().contains("1 MiB"), "{}", r.message());

    // Without a Content-Length (streamed), the limit still holds.
    let chunks = (0..20).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024]));
    let body = Body::from_stream(futures::stream::iter(chunks));
    let r = f
        .send(
            Method::POST,
            "/api/v1/tenants",
            Some(&f.token),
            Some("application/json"),
            body,
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);

    // One object over 256 KiB inside an apply that is itself within its limit.
    let mut huge = instance("acme", "helpdesk", "big", 1);
    huge["spec"]["config"] = json!({"blob": "x".repeat(MAX_OBJECT_BYTES)});
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [tenant("acme"), huge]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.fields(), ["items[1]"]);
    assert!(
        r.body["details"][0]["problem"]
            .as_str()
            .unwrap()
            .contains("256 KiB")
    );
}

#[tokio::test]
async fn bad_queries_media_types_and_routes() {
    let f = fixture();
    let r = f.get("/api/v1/tenants?labelselector=a").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("labelSelector"), "{}", r.message());
    r.index();
    assert_eq!(
        f.get("/api/v1/tenants/acme?pretty=true").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        f.get("/api/v1/tenants?labelSelector=Bad%20Key")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        f.get("/api/v1/instances?project=p&tenant=t&tenant=u")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply?dryRun=maybe",
            json!({"items": [tenant("a")]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = f
        .send(
            Method::POST,
            "/api/v1/tenants",
            Some(&f.token),
            Some("text/plain"),
            Body::from("name: x"),
        )
        .await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Some("UnsupportedMediaType")
        )
    );
    let r = f.get("/api/v1/widgets").await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NotFound"))
    );
    r.index();
    let r = f
        .send(
            Method::DELETE,
            "/api/v1/tenants",
            Some(&f.token),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.body["code"], "MethodNotAllowed");
    r.index();
    let r = f
        .send(Method::GET, "/nothing", None, None, Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

// ---- tokens ----------------------------------------------------------------------------

#[tokio::test]
async fn join_tokens_are_created_listed_and_revoked() {
    let f = fixture();
    let r = f
        .json(
            Method::POST,
            "/api/v1/tokens",
            json!({"kind": "join", "ttl": "1h", "uses": 3, "name": "rack-4"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let secret = r.body["token"].as_str().unwrap().to_string();
    assert!(
        auth::has_token_shape(&secret, auth::JOIN_TOKEN_PREFIX),
        "{secret}"
    );
    assert_eq!(
        (r.body["kind"].as_str(), r.body["usesRemaining"].as_i64()),
        (Some("join"), Some(3))
    );
    assert!(r.body["expiresAt"].as_i64().unwrap() > crate::util::unix_now() + 3500);
    let id = r.body["id"].as_str().unwrap().to_string();

    let r = f.get("/api/v1/tokens").await;
    let text = r.body.to_string();
    assert!(
        !text.contains(&secret) && !text.contains(&hash_token(&secret)),
        "no secrets in listings"
    );
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "the admin token and the new one");
    assert!(
        items
            .iter()
            .any(|t| t["id"] == id.as_str() && t["name"] == "rack-4")
    );

    // A join token cannot call the API.
    let r = f
        .send(
            Method::GET,
            "/api/v1/info",
            Some(&secret),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let r = f.delete(&format!("/api/v1/tokens/{id}")).await;
    assert_eq!(
        (r.status, r.body["revoked"].as_str()),
        (StatusCode::OK, Some(id.as_str()))
    );
    assert_eq!(
        f.delete("/api/v1/tokens/nope").await.status,
        StatusCode::NOT_FOUND
    );

    let r = f
        .json(
            Method::POST,
            "/api/v1/tokens",
            json!({"kind": "join", "ttl": "soon", "uses": 0}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.fields(), ["ttl", "uses"]);
}

#[tokio::test]
async fn a_revoked_api_token_stops_working_at_once() {
    let f = fixture();
    let r = f
        .json(
            Method::POST,
            "/api/v1/tokens",
            json!({"kind": "api", "name": "ci"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let (secret, id) = (
        r.body["token"].as_str().unwrap().to_string(),
        r.body["id"].as_str().unwrap().to_string(),
    );
    assert!(secret.starts_with("cca_"));
    let ok = f
        .send(
            Method::GET,
            "/api/v1/info",
            Some(&secret),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(
        ok.status,
        StatusCode::OK,
        "the token works (and is now cached)"
    );
    assert_eq!(
        f.delete(&format!("/api/v1/tokens/{id}")).await.status,
        StatusCode::OK
    );
    let r = f
        .send(
            Method::GET,
            "/api/v1/info",
            Some(&secret),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.message().contains("revoked"), "{}", r.message());
}

// ---- shutdown and scale ----------------------------------------------------------------

#[tokio::test]
async fn shutting_down_answers_503() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
    let admin = auth::ensure_admin_token(store.as_ref(), dir.path())
        .unwrap()
        .unwrap();
    let state = ApiState::new(store, dir.path().join("admin.token"));
    let app = router(state.clone());
    state.begin_shutdown();
    let resp = app
        .clone()
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let req = Request::get("/api/v1/info")
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", admin.token.expose()),
        )
        .body(Body::empty())
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_10000_instances_is_fast() {
    let f = seeded().await;
    let batch: Vec<_> = (0..10_000)
        .map(|i| {
            let mut v = instance("acme", "helpdesk", &format!("bot-{i:05}"), 1);
            v["spec"]["config"] = json!({"gateway": {"bind": "lan"}, "agents": {"defaults": {"model": "anthropic/claude"}}});
            (Resource::from_value(v).unwrap(), WriteMode::Apply)
        })
        .collect();
    let store = f.store.clone();
    tokio::task::spawn_blocking(move || store.write(&batch, false).unwrap())
        .await
        .unwrap();
    // Warm the reader connection, then measure a full request.
    let _ = f.get("/api/v1/instances?labelSelector=none").await;
    let start = Instant::now();
    let req = Request::get("/api/v1/instances")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.token));
    let resp = f
        .app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let elapsed = start.elapsed();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 10_000);
    assert_eq!(items[0]["metadata"]["name"], "bot-00000");
    assert_eq!(items[9_999]["metadata"]["name"], "bot-09999");
    // The contract is well under 0.5 s end to end; unoptimized builds take about a tenth.
    assert!(
        elapsed < Duration::from_millis(500),
        "listing 10,000 instances took {elapsed:?}"
    );
    eprintln!(
        "listing 10,000 instances ({} bytes) took {elapsed:?}",
        bytes.len()
    );
}

// ---- regressions -----------------------------------------------------------------------

#[tokio::test]
async fn a_token_lifetime_over_ten_years_is_refused_and_nothing_is_stored() {
    let f = fixture();
    let before = f.get("/api/v1/tokens").await.body["items"]
        .as_array()
        .unwrap()
        .len();
    let r = f
        .json(
            Method::POST,
            "/api/v1/tokens",
            json!({"kind": "join", "ttl": "8000y"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.fields(), ["ttl"]);
    let problem = r.body["details"][0]["problem"].as_str().unwrap();
    assert!(
        problem.contains("8000y") && problem.contains("10y"),
        "{problem}"
    );
    let after = f.get("/api/v1/tokens").await.body["items"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after, "no token was stored");
    let r = f
        .json(
            Method::POST,
            "/api/v1/tokens",
            json!({"kind": "join", "ttl": "10y"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "the maximum itself is fine");
}

#[tokio::test]
async fn a_yaml_apply_is_not_capped_by_the_parser_budget() {
    let f = fixture();
    // More documents than the parser's default budget of 1,024.
    let text: String = (0..1_100)
        .map(|i| {
            format!(
                "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata: {{name: t-{i:05}}}\n---\n"
            )
        })
        .collect();
    let r = f.yaml("/api/v1/apply?dryRun=true", &text).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1_100);
    // Nesting is still bounded, and said in words.
    let deep = format!("a: {}1{}\n", "[".repeat(100), "]".repeat(100));
    let r = f.yaml("/api/v1/apply", &deep).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        !r.message().contains("budget") && !r.message().contains("{"),
        "{}",
        r.message()
    );
    assert!(r.message().contains("nested"), "{}", r.message());
}

#[tokio::test]
async fn unknown_routes_and_methods_name_the_whole_path() {
    let f = fixture();
    let r = f.get("/api/v1/widgets").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.message().contains("/api/v1/widgets"), "{}", r.message());
    let r = f.delete("/api/v1/tenants").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        r.message()
            .contains("DELETE is not allowed on /api/v1/tenants"),
        "{}",
        r.message()
    );
    let allow = r.headers.get(header::ALLOW).expect("an Allow header");
    assert_eq!(allow, "GET, POST");
    let r = f.json(Method::POST, "/api/v1/hosts/h1", json!({})).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers[header::ALLOW], "GET, PUT, DELETE");
    // Writing a host is refused as docs/api.md says: 403, not 405.
    let r = f.json(Method::PUT, "/api/v1/hosts/h1", json!({})).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("Forbidden"))
    );
    assert!(
        r.message().ends_with(crate::model::HOST_READ_ONLY),
        "{}",
        r.message()
    );
}

#[tokio::test]
async fn names_in_paths_must_be_dns_labels() {
    let f = seeded().await;
    for (path, param) in [
        ("/api/v1/tenants/Bad_Name", "tenant"),
        ("/api/v1/tenants/acme/projects/x.y", "project"),
        (
            "/api/v1/tenants/acme/projects/helpdesk/instances/-bot",
            "name",
        ),
        ("/api/v1/hosts/UPPER", "host"),
    ] {
        let r = f.get(path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.body);
        assert!(
            r.message().contains(&format!("path parameter {param:?}"))
                && r.message().contains("DNS-1123"),
            "{path}: {}",
            r.message()
        );
        let r = f.delete(path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.body);
    }
}

#[tokio::test]
async fn label_selector_values_are_checked() {
    let f = fixture();
    for selector in ["a%3Db%3Dc", "team%3D!!!", "team!%3Dx%20y"] {
        let r = f
            .get(&format!("/api/v1/tenants?labelSelector={selector}"))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{selector}: {}", r.body);
        assert!(r.message().contains("label value"), "{}", r.message());
    }
    let r = f.get("/api/v1/tenants?labelSelector=team%3D").await;
    assert_eq!(r.status, StatusCode::OK, "an empty value is a value");
}

#[tokio::test]
async fn env_values_may_not_hold_nul_or_be_huge() {
    let f = seeded().await;
    let mut v = instance("acme", "helpdesk", "bot", 1);
    v["spec"]["env"] = json!({"A": "x\u{0}y", "B": "x".repeat(33 * 1024), "C": "two\nlines"});
    let r = f.json(Method::POST, INSTANCES, v).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.fields(), ["spec.env.A", "spec.env.B"]);
}

#[tokio::test]
async fn token_names_refuse_format_characters() {
    let f = fixture();
    let r = f
        .json(
            Method::POST,
            "/api/v1/tokens",
            json!({"kind": "join", "name": "rack\u{202e}4"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.fields(), ["name"]);
}

#[tokio::test]
async fn serde_problems_read_the_same_on_every_endpoint() {
    let f = seeded().await;
    f.json(
        Method::POST,
        INSTANCES,
        instance("acme", "helpdesk", "bot", 1),
    )
    .await;
    let scale = format!("{INSTANCES}/bot/scale");
    let r = f.json(Method::PUT, &scale, json!({"replicas": 1e23})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(
        r.body["details"],
        json!([{"field": "replicas", "problem": "must be a whole number between 0 and 100, found 1e23"}])
    );
    let mut v = instance("acme", "helpdesk", "bot2", 1);
    v["spec"]["replicas"] = json!(1e23);
    let r = f.json(Method::POST, INSTANCES, v).await;
    assert_eq!(
        r.body["details"],
        json!([{"field": "spec.replicas", "problem": "must be a whole number between 0 and 100, found 1e23"}])
    );
    let r = f.json(Method::PUT, &scale, json!({"replicas": 500})).await;
    assert_eq!(
        r.fields(),
        ["replicas"],
        "the body's field, not spec.replicas"
    );
    let r = f.json(Method::PUT, &scale, json!({})).await;
    assert_eq!(
        r.body["details"],
        json!([{"field": "replicas", "problem": "is required"}])
    );
    let r = f
        .json(Method::POST, "/api/v1/tenants", json!({"metadata": {}}))
        .await;
    assert_eq!(
        r.body["details"],
        json!([{"field": "metadata.name", "problem": "is required"}])
    );
    let r = f
        .json(
            Method::POST,
            "/api/v1/tokens",
            json!({"kind": "join", "uses": 1.5}),
        )
        .await;
    assert_eq!(r.fields(), ["uses"]);
    let problem = r.body["details"][0]["problem"].as_str().unwrap();
    assert!(problem.starts_with("must be a whole number"), "{problem}");
    let text = r.body.to_string();
    assert!(!text.contains('`'), "no backticks: {text}");
}

#[tokio::test]
async fn the_allow_table_matches_the_router() {
    let f = seeded().await;
    let table = super::route_table();
    let mut routes: Vec<&str> = table.entries().map(|(p, _, _)| p).collect();
    routes.sort_unstable();
    routes.dedup();
    assert!(routes.len() > 30, "{routes:?}");
    for route in routes {
        let allowed = table.allow(route).unwrap().to_str().unwrap();
        let path = route
            .replace("{tenant}", "acme")
            .replace("{project}", "helpdesk")
            .replace("{name}", "bot")
            .replace("{host}", "h1")
            .replace("{id}", "abc")
            .replace("{revision}", "1");
        let allowed: Vec<&str> = allowed.split(", ").collect();
        for method in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
        ] {
            let req = Request::builder()
                .method(method.clone())
                .uri(&path)
                .header(header::AUTHORIZATION, format!("Bearer {}", f.token))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{}"))
                .unwrap();
            let status = f.app.clone().oneshot(req).await.unwrap().status();
            assert_eq!(
                status == StatusCode::METHOD_NOT_ALLOWED,
                !allowed.contains(&method.as_str()),
                "{method} {path}: {status}"
            );
        }
    }
}

#[tokio::test]
async fn a_listed_index_is_never_below_what_the_list_shows() {
    use crate::store::testing::HookStore;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("db")).unwrap();
    let admin = auth::ensure_admin_token(&sqlite, dir.path())
        .unwrap()
        .unwrap();
    let store = Arc::new(HookStore::new(sqlite));
    let app = router(ApiState::new(
        store.clone() as Arc<dyn Store>,
        dir.path().join("admin.token"),
    ));
    let f = Fixture {
        app,
        token: admin.token.expose().to_string(),
        store: Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap()),
        dir,
    };
    // The index is read, then a write commits, then the objects are read.
    *store.stale_index.lock().unwrap() = Some(0);
    let r = f
        .json(Method::POST, "/api/v1/tenants", tenant("acme"))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = f.get("/api/v1/tenants").await;
    assert_eq!(r.body["items"][0]["metadata"]["resourceVersion"], 1);
    assert_eq!((r.index(), r.body["index"].as_u64()), (1, Some(1)));
    let r = f.get("/api/v1/tenants/acme").await;
    assert_eq!(r.index(), 1);
}
