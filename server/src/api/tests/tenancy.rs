//! Tenant isolation, roles and quotas through the router, against a real SQLite store.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use super::{Fixture, Reply, fixture, instance, project, tenant};
use crate::auth::{generate_api_token, generate_token_id, hash_token};
use crate::model::Resource;
use crate::store::{Store, StoreError, TokenKind, TokenRecord, WriteMode};

impl Fixture {
    /// Stores an API token with a role and scope, as `token create` would, and returns it.
    pub(super) fn scoped_token(
        &self,
        role: &str,
        tenant: Option<&str>,
        project: Option<&str>,
    ) -> String {
        self.token_record(TokenKind::Api, role, |r| {
            r.tenant = tenant.map(Into::into);
            r.project = project.map(Into::into);
        })
    }

    /// Stores a token of `kind` with `role`, as `edit` changes it, and returns its secret.
    pub(super) fn token_record(
        &self,
        kind: TokenKind,
        role: &str,
        edit: impl FnOnce(&mut TokenRecord),
    ) -> String {
        let secret = match kind {
            TokenKind::Join => crate::auth::generate_join_token(),
            TokenKind::Api => generate_api_token(),
        };
        let mut record = TokenRecord {
            id: generate_token_id(),
            name: format!("{role} test token"),
            kind,
            role: role.into(),
            tenant: None,
            project: None,
            created_at: 0,
            expires_at: None,
            uses_remaining: None,
            revoked: false,
            hash: hash_token(secret.expose()),
        };
        edit(&mut record);
        self.store.insert_token(&record).unwrap();
        secret.expose().to_string()
    }

    pub(super) async fn as_(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Reply {
        let (ct, body) = match body {
            Some(v) => (Some("application/json"), Body::from(v.to_string())),
            None => (None, Body::empty()),
        };
        self.send(method, path, Some(token), ct, body).await
    }
}

fn sized(tenant: &str, project: &str, name: &str, replicas: i64, memory: &str) -> Value {
    let mut v = instance(tenant, project, name, replicas);
    v["spec"]["resources"] = json!({"cpu": "500m", "memory": memory});
    v
}

/// Tenants `a` (projects `p`, `q`) and `b` (project `p`), one instance in each project.
async fn two_tenants() -> Fixture {
    let f = fixture();
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [
                tenant("a"), tenant("b"),
                project("a", "p"), project("a", "q"), project("b", "p"),
                instance("a", "p", "x", 1), instance("a", "q", "y", 1), instance("b", "p", "z", 1),
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    f
}

fn names(r: &Reply) -> Vec<String> {
    r.body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {}", r.body))
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

fn exists(f: &Fixture, key: &crate::model::ObjectKey) -> bool {
    f.store.get(key).unwrap().is_some()
}

#[tokio::test]
async fn another_tenants_objects_answer_as_if_they_did_not_exist() {
    let f = two_tenants().await;
    let ta = f.scoped_token("tenant-admin", Some("a"), None);
    let g = Method::GET;

    // Reading: the same 404 as for a name nobody has.
    let theirs = f
        .as_(
            &ta,
            g.clone(),
            "/api/v1/tenants/b/projects/p/instances/z",
            None,
        )
        .await;
    let nobodys = f
        .as_(
            &ta,
            g.clone(),
            "/api/v1/tenants/b/projects/p/instances/none",
            None,
        )
        .await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND);
    assert_eq!(theirs.message(), "openclawinstance/b/p/z not found");
    assert_eq!(
        nobodys.message(),
        "openclawinstance/b/p/none not found",
        "the same answer shape"
    );
    let r = f.as_(&ta, g.clone(), "/api/v1/tenants/b", None).await;
    assert_eq!(
        (r.status, r.message()),
        (StatusCode::NOT_FOUND, "tenant/b not found")
    );

    // Listing: only its own, even when asking for the other tenant by name.
    let r = f.as_(&ta, g.clone(), "/api/v1/instances", None).await;
    assert_eq!(names(&r), ["x", "y"]);
    let r = f
        .as_(&ta, g.clone(), "/api/v1/instances?tenant=b", None)
        .await;
    assert!(names(&r).is_empty(), "{}", r.body);
    let r = f.as_(&ta, g.clone(), "/api/v1/tenants", None).await;
    assert_eq!(names(&r), ["a"]);
    let r = f.as_(&ta, g.clone(), "/api/v1/projects", None).await;
    assert_eq!(names(&r), ["p", "q"]);
    let r = f
        .as_(
            &ta,
            g.clone(),
            "/api/v1/tenants/b/projects/p/instances",
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // Writing and deleting: as if the parent did not exist; nothing changes.
    let z = crate::model::ObjectKey::instance("b", "p", "z");
    let r = f
        .as_(
            &ta,
            Method::DELETE,
            "/api/v1/tenants/b/projects/p/instances/z",
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.message()),
        (StatusCode::NOT_FOUND, "openclawinstance/b/p/z not found")
    );
    assert!(exists(&f, &z));
    let r = f
        .as_(
            &ta,
            Method::PUT,
            "/api/v1/tenants/b/projects/p/instances/z",
            Some(instance("b", "p", "z", 5)),
        )
        .await;
    let missing = f
        .as_(
            &ta,
            Method::PUT,
            "/api/v1/tenants/b/projects/nope/instances/z",
            Some(instance("b", "nope", "z", 5)),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.message().replace("b/p", "b/nope"),
        missing.message(),
        "an existing foreign project and a missing one read the same"
    );
    let stored = f.store.get(&z).unwrap().unwrap().resource().unwrap();
    match stored {
        Resource::OpenClawInstance(i) => assert_eq!(i.spec.replicas, 1, "untouched"),
        other => panic!("{other:?}"),
    }

    // A batch with one foreign document writes nothing at all.
    let r = f
        .as_(
            &ta,
            Method::POST,
            "/api/v1/apply",
            Some(json!({"items": [instance("a", "p", "new", 1), instance("b", "p", "sneak", 1)]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_eq!(r.fields(), ["items[1].metadata.project"]);
    assert!(!exists(
        &f,
        &crate::model::ObjectKey::instance("a", "p", "new")
    ));
    assert!(!exists(
        &f,
        &crate::model::ObjectKey::instance("b", "p", "sneak")
    ));

    // Infrastructure is not a tenant's.
    let r = f.as_(&ta, g.clone(), "/api/v1/hosts", None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = f.as_(&ta, g, "/metrics", None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_project_editor_stays_in_its_project() {
    let f = two_tenants().await;
    let pe = f.scoped_token("project-editor", Some("a"), Some("p"));
    let r = f
        .as_(
            &pe,
            Method::GET,
            "/api/v1/tenants/a/projects/q/instances/y",
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = f
        .as_(
            &pe,
            Method::PUT,
            "/api/v1/tenants/a/projects/q/instances/y",
            Some(instance("a", "q", "y", 3)),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = f
        .as_(
            &pe,
            Method::DELETE,
            "/api/v1/tenants/a/projects/q/instances/y",
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(exists(
        &f,
        &crate::model::ObjectKey::instance("a", "q", "y")
    ));
    let r = f.as_(&pe, Method::GET, "/api/v1/instances", None).await;
    assert_eq!(names(&r), ["x"]);
    // Its own instances: yes. Its project, other projects, tokens: no.
    let r = f
        .as_(
            &pe,
            Method::PUT,
            "/api/v1/tenants/a/projects/p/instances/x",
            Some(instance("a", "p", "x", 2)),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = f
        .as_(
            &pe,
            Method::PUT,
            "/api/v1/tenants/a/projects/p",
            Some(project("a", "p")),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(r.message().contains("project-editor"), "{}", r.message());
    let r = f
        .as_(
            &pe,
            Method::POST,
            "/api/v1/apply",
            Some(json!({"items": [project("a", "new")]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(r.fields(), ["items[0].kind"]);
    let r = f.as_(&pe, Method::GET, "/api/v1/tokens", None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_viewer_reads_and_writes_nothing() {
    let f = two_tenants().await;
    let v = f.scoped_token("viewer", Some("a"), None);
    let r = f
        .as_(
            &v,
            Method::GET,
            "/api/v1/tenants/a/projects/p/instances/x",
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    for (method, path, body) in [
        (
            Method::PUT,
            "/api/v1/tenants/a/projects/p/instances/x",
            Some(instance("a", "p", "x", 3)),
        ),
        (
            Method::DELETE,
            "/api/v1/tenants/a/projects/p/instances/x",
            None,
        ),
        (
            Method::PUT,
            "/api/v1/tenants/a/projects/p/instances/x/scale",
            Some(json!({"replicas": 4})),
        ),
        (
            Method::POST,
            "/api/v1/apply",
            Some(json!({"items": [instance("a", "p", "x", 3)]})),
        ),
        (
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"kind": "api", "role": "viewer"})),
        ),
    ] {
        let r = f.as_(&v, method.clone(), path, body).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {}",
            r.body
        );
    }
    let stored = f
        .store
        .get(&crate::model::ObjectKey::instance("a", "p", "x"))
        .unwrap()
        .unwrap();
    assert_eq!(stored.generation, 1, "nothing changed");
}

#[tokio::test]
async fn tokens_are_granted_only_downward_and_inside_the_own_tenant() {
    let f = two_tenants().await;
    let ta = f.scoped_token("tenant-admin", Some("a"), None);
    let post = |body: Value| f.as_(&ta, Method::POST, "/api/v1/tokens", Some(body));

    let r = post(json!({"kind": "api", "role": "viewer", "tenant": "b"})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(
        r.message().contains("only create tokens for tenant a"),
        "{}",
        r.message()
    );
    let r = post(json!({"kind": "api", "role": "platform-admin"})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(
        r.message()
            .contains("may not create a platform-admin token"),
        "{}",
        r.message()
    );
    let r = post(json!({"kind": "join"})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = post(json!({"kind": "api", "role": "project-editor", "project": "nope"})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = post(json!({"kind": "api", "role": "project-editor"})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    let r = post(json!({"kind": "api", "role": "viewer", "tenant": "a/../b"})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);

    // A grant that fits: the new token works, inside its project only.
    let r =
        post(json!({"kind": "api", "role": "project-editor", "project": "p", "name": "ci"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let pe = r.body["token"].as_str().unwrap().to_string();
    let r = f.as_(&pe, Method::GET, "/api/v1/instances", None).await;
    assert_eq!(names(&r), ["x"]);

    // Its token list holds its tenant's tokens only; another tenant's token cannot be revoked.
    let tb = f.scoped_token("tenant-admin", Some("b"), None);
    let r = f.as_(&ta, Method::GET, "/api/v1/tokens", None).await;
    let listed: Vec<&Value> = r.body["items"].as_array().unwrap().iter().collect();
    assert!(listed.iter().all(|t| t["tenant"] == "a"), "{}", r.body);
    let other_id = f
        .store
        .list_tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.tenant.as_deref() == Some("b"))
        .unwrap()
        .id;
    let r = f
        .as_(
            &ta,
            Method::DELETE,
            &format!("/api/v1/tokens/{other_id}"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = f.as_(&tb, Method::GET, "/api/v1/tenants/b", None).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the other tenant's token still works"
    );
}

#[tokio::test]
async fn quotas_refuse_growth_and_say_what_is_left() {
    let f = fixture();
    let mut t = tenant("a");
    t["spec"] = json!({"quota": {"memory": "4Gi", "instances": 3}});
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [t, project("a", "p")]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let path = "/api/v1/tenants/a/projects/p/instances";
    let r = f
        .json(Method::POST, path, sized("a", "p", "one", 2, "1Gi"))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = f
        .json(Method::POST, path, sized("a", "p", "two", 3, "1Gi"))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(
        r.message(),
        "quota exceeded for tenant a: memory 3Gi requested, 2Gi of 4Gi free"
    );
    assert!(!exists(
        &f,
        &crate::model::ObjectKey::instance("a", "p", "two")
    ));
    // Scaling counts too; shrinking is always allowed.
    let r = f
        .json(
            Method::PUT,
            &format!("{path}/one/scale"),
            json!({"replicas": 5}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = f
        .json(
            Method::PUT,
            &format!("{path}/one/scale"),
            json!({"replicas": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // Usage against quota on the tenant.
    let r = f.get("/api/v1/tenants/a").await;
    assert_eq!(
        r.body["status"]["usage"],
        json!({"instances": 1, "replicas": 1, "cpu": "500m", "memory": "1Gi"})
    );
    let r = f.get("/api/v1/tenants").await;
    assert_eq!(
        r.body["items"][0]["status"]["usage"]["memory"], "1Gi",
        "{}",
        r.body
    );
    let r = f.get("/api/v1/tenants/a/projects").await;
    assert_eq!(
        r.body["items"][0]["status"]["usage"]["replicas"], 1,
        "{}",
        r.body
    );
    // A project may not be promised more than its tenant has.
    let mut p = project("a", "big");
    p["spec"] = json!({"quota": {"memory": "8Gi"}});
    let r = f
        .json(Method::POST, "/api/v1/apply", json!({"items": [p]}))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(
        r.body.to_string().contains("more than the 4Gi"),
        "{}",
        r.body
    );
    // A project quota binds inside the tenant's.
    let mut p = project("a", "small");
    p["spec"] = json!({"quota": {"replicas": 1}});
    let r = f
        .json(Method::POST, "/api/v1/apply", json!({"items": [p]}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = f
        .json(
            Method::POST,
            "/api/v1/tenants/a/projects/small/instances",
            sized("a", "small", "s", 2, "512Mi"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(
        r.message(),
        "quota exceeded for project a/small: replicas 2 requested, 1 of 1 free"
    );
}

#[test]
fn parallel_writes_cannot_together_exceed_a_quota() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("q.db")).unwrap());
    let decode = |v: Value| Resource::from_value(v).unwrap();
    let mut t = tenant("a");
    t["spec"] = json!({"quota": {"replicas": 5}});
    store
        .write(
            &[
                (decode(t), WriteMode::Apply),
                (decode(project("a", "p")), WriteMode::Apply),
            ],
            false,
        )
        .unwrap();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let store = Arc::clone(&store);
            let r = decode(sized("a", "p", &format!("i{i}"), 1, "256Mi"));
            std::thread::spawn(move || store.write(&[(r, WriteMode::Apply)], false))
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 5, "exactly the quota's worth were admitted");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(matches!(r, StoreError::QuotaExceeded { .. }), "{r:?}");
    }
    assert_eq!(store.usage(Some("a")).unwrap()["a"].0.replicas, 5);
}

#[tokio::test]
async fn names_that_try_path_or_selector_injection_are_refused() {
    let f = two_tenants().await;
    let ta = f.scoped_token("tenant-admin", Some("a"), None);
    for path in [
        "/api/v1/tenants/a%2F..%2Fb/projects/p/instances/z",
        "/api/v1/tenants/B/projects/p/instances",
        "/api/v1/tenants/a/projects/p%00/instances",
    ] {
        let r = f.as_(&ta, Method::GET, path, None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.body);
    }
    for selector in [
        "tier%3Dgold'%20OR%201%3D1",
        "tier%3Dgold%3B%20DROP",
        "%3Dgold",
    ] {
        let r = f
            .as_(
                &ta,
                Method::GET,
                &format!("/api/v1/instances?labelSelector={selector}"),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{selector}: {}", r.body);
    }
    // A tenant name in a label selector is just a label: it does not widen the scope.
    let r = f
        .as_(
            &ta,
            Method::GET,
            "/api/v1/instances?labelSelector=tier%3Dgold&tenant=b",
            None,
        )
        .await;
    assert!(names(&r).is_empty(), "{}", r.body);
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let f = fixture();
    let r = f
        .send(Method::GET, "/healthz", None, None, Body::empty())
        .await;
    let made = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(made.len(), 32, "{made}");
    let r = f
        .send(Method::GET, "/api/v1/tenants", None, None, Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_ne!(
        r.headers["x-request-id"],
        made.as_str(),
        "a new id per request"
    );
    // A sensible id from the client is kept; anything else is replaced.
    let req = |id: &str| {
        axum::http::Request::builder()
            .uri("/api/v1/info")
            .header("authorization", format!("Bearer {}", f.token))
            .header("x-request-id", id)
            .body(Body::empty())
            .unwrap()
    };
    use tower::ServiceExt;
    let resp = f.app.clone().oneshot(req("trace-42:abc")).await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-42:abc");
    let resp = f.app.clone().oneshot(req("evil\tvalue")).await.unwrap();
    assert_ne!(resp.headers()["x-request-id"], "evil\tvalue");
}

#[tokio::test]
async fn a_flooding_token_gets_429_and_others_do_not() {
    use crate::ratelimit::{RateLimitConfig, RateLimiter};
    let f = two_tenants().await;
    let config: RateLimitConfig =
        toml::from_str("per_token = { rate = 1, burst = 2 }\nper_tenant = { rate = 1000 }")
            .unwrap();
    let limiter = Arc::new(RateLimiter::new(&config.validate().unwrap()));
    let state = super::super::ApiState::with_options(
        f.store.clone() as Arc<dyn Store>,
        f.dir.path().join("admin.token"),
        Arc::default(),
        Arc::default(),
        super::super::ApiOptions {
            limiter: Some(limiter),
            ..Default::default()
        },
    );
    let limited = Fixture {
        app: super::super::router(state),
        dir: tempfile::tempdir().unwrap(),
        store: f.store.clone(),
        token: f.token.clone(),
    };
    let a = limited.scoped_token("viewer", Some("a"), None);
    let b = limited.scoped_token("viewer", Some("b"), None);
    let path = "/api/v1/tenants/a/projects/p/instances/x";
    for _ in 0..2 {
        assert_eq!(
            limited.as_(&a, Method::GET, path, None).await.status,
            StatusCode::OK
        );
    }
    let r = limited.as_(&a, Method::GET, path, None).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "{retry}");
    assert_eq!(r.body["code"], "RateLimited");
    let r = limited
        .as_(
            &b,
            Method::GET,
            "/api/v1/tenants/b/projects/p/instances/z",
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "another token is not held back");
}

#[tokio::test]
async fn changes_and_refusals_are_audited_with_the_change() {
    let f = two_tenants().await;
    let (audited, writer) = f.audited();
    let ta = audited.scoped_token("tenant-admin", Some("a"), None);
    let v = audited.scoped_token("viewer", Some("a"), None);
    let path = "/api/v1/tenants/a/projects/p/instances/x";
    let r = audited
        .as_(&ta, Method::PUT, path, Some(instance("a", "p", "x", 3)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let request_id = r.headers["x-request-id"].to_str().unwrap().to_string();
    // The change's record is in the store as soon as the change is acknowledged.
    let records = f.audit_records();
    let rec = records
        .iter()
        .find(|r| r.entry.request_id == request_id)
        .expect("stored with the change");
    assert_eq!(rec.entry.action, "update");
    assert_eq!(rec.entry.tenant.as_deref(), Some("a"));
    assert_eq!(
        (rec.entry.generation_before, rec.entry.generation_after),
        (Some(1), Some(2))
    );
    assert_eq!(rec.entry.object.as_ref().unwrap().name, "x");
    // A refusal is recorded too; reads that are allowed are not.
    let r = audited.as_(&v, Method::DELETE, path, None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    audited.as_(&v, Method::GET, path, None).await;
    let r = audited
        .send(
            Method::GET,
            "/api/v1/tenants",
            Some("cca_bogus"),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    writer.flush().await.unwrap();
    let records = f.audit_records();
    let outcomes: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r.entry.action.as_str(), r.entry.result.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [("update", "ok"), ("delete", "denied"), ("deny", "denied")]
    );
    assert!(
        !serde_json::to_string(&records)
            .unwrap()
            .contains("cca_bogus"),
        "no token in the log"
    );
    // The chain holds, and the tenant admin sees its tenant's records.
    let r = audited
        .as_(&ta, Method::GET, "/api/v1/audit/verify", None)
        .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "verify is the platform's: {}",
        r.body
    );
    let r = audited.get("/api/v1/audit/verify").await;
    assert_eq!(r.body["ok"], true, "{}", r.body);
    let r = audited.as_(&ta, Method::GET, "/api/v1/audit", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["tenant"] == "a"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn a_batch_delete_checks_every_object_and_deletes_all_or_nothing() {
    use crate::model::ObjectKey;
    let f = two_tenants().await;
    let named = |kind: &str, t: &str, p: Option<&str>, name: &str| {
        let mut metadata = json!({"name": name, "tenant": t});
        if let Some(p) = p {
            metadata["project"] = json!(p);
        }
        json!({"kind": kind, "metadata": metadata})
    };
    let x = named("OpenClawInstance", "a", Some("p"), "x");
    let z = named("OpenClawInstance", "b", Some("p"), "z");
    let ap = named("Project", "a", None, "p");
    let aq = named("Project", "a", None, "q");
    let (xk, zk, pk) = (
        ObjectKey::instance("a", "p", "x"),
        ObjectKey::instance("b", "p", "z"),
        ObjectKey::project("a", "p"),
    );
    let index = f.get("/api/v1/tenants").await.index();
    let delete = |token: String, items: Vec<Value>| {
        let f = &f;
        async move {
            f.as_(
                &token,
                Method::DELETE,
                "/api/v1/apply",
                Some(json!({ "items": items })),
            )
            .await
        }
    };

    // A viewer deletes nothing; a project editor may delete the instance but not the
    // project, so the batch is refused whole, naming the project's document.
    let r = delete(f.scoped_token("viewer", Some("a"), None), vec![x.clone()]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let editor = f.scoped_token("project-editor", Some("a"), Some("p"));
    let r = delete(editor, vec![x.clone(), ap.clone()]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(r.fields(), ["items[1].kind"]);
    assert!(r.message().contains("nothing was deleted"), "{}", r.body);
    // Another tenant's object is as missing, and stops the batch.
    let admin = f.scoped_token("tenant-admin", Some("a"), None);
    let r = delete(admin.clone(), vec![x.clone(), z.clone()]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert!(r.message().starts_with("items[1]: "), "{}", r.body);
    // A project with an instance the batch does not delete: 409 on that document.
    let r = delete(admin.clone(), vec![x.clone(), aq.clone()]).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(
        r.message()
            .starts_with("items[1]: project/a/q still has 1 instance"),
        "{}",
        r.body
    );
    // A host is removed on its own (its agent is refused from then on), not in a batch.
    let r = f
        .json(
            Method::DELETE,
            "/api/v1/apply",
            json!({"items": [x.clone(), {"kind": "Host", "metadata": {"name": "h1"}}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.fields(), ["items[1].kind"]);
    assert!(exists(&f, &xk) && exists(&f, &zk) && exists(&f, &pk));
    assert_eq!(
        f.get("/api/v1/tenants").await.index(),
        index,
        "nothing was written"
    );

    // Children first whatever the order given, once each, in one transaction.
    let r = delete(admin, vec![ap.clone(), x.clone(), ap]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["items"],
        json!([
            {"kind": "OpenClawInstance", "name": "x", "tenant": "a", "project": "p", "outcome": "deleted"},
            {"kind": "Project", "name": "p", "tenant": "a", "outcome": "deleted"},
        ])
    );
    assert_eq!(r.index(), index + 1);
    assert!(!exists(&f, &xk) && !exists(&f, &pk) && exists(&f, &zk));
}

#[tokio::test]
async fn a_batch_delete_is_audited_per_object_and_a_refused_one_as_a_refusal() {
    let f = two_tenants().await;
    let (audited, writer) = f.audited();
    let batch = json!({"items": [
        {"kind": "OpenClawInstance", "metadata": {"name": "x", "tenant": "a", "project": "p"}},
        {"kind": "Project", "metadata": {"name": "p", "tenant": "a"}},
    ]});
    let v = audited.scoped_token("viewer", Some("a"), None);
    let r = audited
        .as_(&v, Method::DELETE, "/api/v1/apply", Some(batch.clone()))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let refused = r.headers["x-request-id"].to_str().unwrap().to_string();
    let ta = audited.scoped_token("tenant-admin", Some("a"), None);
    let r = audited
        .as_(&ta, Method::DELETE, "/api/v1/apply", Some(batch))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let done = r.headers["x-request-id"].to_str().unwrap().to_string();
    writer.flush().await.unwrap();
    let records = f.audit_records();
    let of = |id: &str| -> Vec<(String, String, String)> {
        records
            .iter()
            .filter(|r| r.entry.request_id == id)
            .map(|r| {
                let object = r
                    .entry
                    .object
                    .as_ref()
                    .map_or(String::new(), |o| format!("{}/{}", o.kind, o.name));
                (
                    r.entry.action.clone(),
                    r.entry.result.outcome.as_str().to_string(),
                    object,
                )
            })
            .collect()
    };
    assert_eq!(
        of(&done),
        [
            ("delete".into(), "ok".into(), "OpenClawInstance/x".into()),
            ("delete".into(), "ok".into(), "Project/p".into()),
        ]
    );
    let refusal = of(&refused);
    assert_eq!(refusal.len(), 1, "{refusal:?}");
    assert_eq!(
        (refusal[0].0.as_str(), refusal[0].1.as_str()),
        ("delete", "denied")
    );
}
