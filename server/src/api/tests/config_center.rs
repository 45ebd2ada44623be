//! The config center through the API: layers, JSON5, schema checks, revisions, diff,
//! rollback, secrets, and what bad input gets.

use super::*;
use crate::api::ApiOptions;

pub(super) fn fixture_with_keyring() -> Fixture {
    fixture_with(|dir| {
        let key_path = dir.join("secrets.key");
        let keyring = crate::secrets::Keyring::load_or_create(&key_path).unwrap();
        ApiOptions {
            keyring: Arc::new(std::sync::RwLock::new(Some(Arc::new(keyring)))),
            keyring_path: Some(key_path),
            ..Default::default()
        }
    })
}

async fn seeded_with_keyring() -> Fixture {
    let f = fixture_with_keyring();
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

const BOT: &str = "/api/v1/tenants/acme/projects/helpdesk/instances/bot";

impl Fixture {
    async fn put_with_message(&self, path: &str, body: Value, message: &str) -> Reply {
        let req = Request::builder()
            .method(Method::PUT)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .header("X-Clusterclaw-Change-Message", message)
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }
}

fn template(config: Value) -> Value {
    json!({"apiVersion": "clusterclaw.io/v1", "kind": "ConfigTemplate",
           "metadata": {"name": "default"}, "spec": {"config": config}})
}

fn bot(config: Value) -> Value {
    let mut i = instance("acme", "helpdesk", "bot", 1);
    i["spec"]["config"] = config;
    i
}

#[tokio::test]
async fn four_layers_merge_into_revisions_that_diff_and_roll_back() {
    let f = seeded_with_keyring().await;
    let r = f
        .json(
            Method::PUT,
            "/api/v1/configtemplates/default",
            template(json!({"logging": {"level": "info"}, "agents": {"defaults": {"timeoutSeconds": 600}}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    // The tenant's layer as JSON5 text: comments, unquoted keys, a trailing comma.
    let mut t = tenant("acme");
    t["spec"]["config"] =
        json!("{\n  // everyone at acme logs more\n  logging: { level: 'debug', },\n}");
    let r = f.json(Method::PUT, "/api/v1/tenants/acme", t).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["spec"]["config"]["logging"]["level"], "debug");
    let mut p = project("acme", "helpdesk");
    p["spec"]["config"] = json!({"agents": {"defaults": {"timeoutSeconds": 300}}});
    let r = f
        .json(Method::PUT, "/api/v1/tenants/acme/projects/helpdesk", p)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = f
        .put_with_message(BOT, bot(json!({"gateway": {"port": 18790}})), "first bot")
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["status"]["configRevision"], 1, "{}", r.body);

    let r = f.get(&format!("{BOT}/config?explain=true")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let c = &r.body["config"];
    assert_eq!(c["gateway"]["port"], 18790);
    assert_eq!(c["gateway"]["bind"], "lan");
    assert_eq!(c["logging"]["level"], "debug");
    assert_eq!(c["agents"]["defaults"]["timeoutSeconds"], 300);
    let sources: Vec<&str> = r.body["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["source"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources,
        [
            "builtin",
            "configtemplate/default",
            "tenant/acme",
            "project/acme/helpdesk",
            "openclawinstance/acme/helpdesk/bot"
        ]
    );
    let origin = |path: &str| {
        r.body["origins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["path"] == path)
            .map(|o| o["source"].as_str().unwrap().to_string())
    };
    assert_eq!(origin("logging.level").as_deref(), Some("tenant/acme"));
    assert_eq!(
        origin("agents.defaults.timeoutSeconds").as_deref(),
        Some("project/acme/helpdesk")
    );
    assert_eq!(origin("gateway.bind").as_deref(), Some("builtin"));
    assert!(
        r.body["text"].as_str().unwrap().contains("tenant/acme"),
        "{}",
        r.body["text"]
    );

    // A template change reaches the instance as a new revision, by the template's author.
    let r = f
        .put_with_message(
            "/api/v1/configtemplates/default",
            template(json!({"logging": {"level": "info"}, "agents": {"defaults": {"timeoutSeconds": 600}}, "tools": {"web": {"enabled": true}}})),
            "turn on web tools",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let h = f.get(&format!("{BOT}/config/revisions")).await;
    assert_eq!(h.status, StatusCode::OK, "{}", h.body);
    let items = h.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{}", h.body);
    assert_eq!(items[0]["revision"], 2);
    assert_eq!(items[0]["message"], "turn on web tools");
    assert_eq!(items[1]["message"], "first bot");
    assert!(items[0]["author"].as_str().is_some_and(|a| !a.is_empty()));

    let d = f.get(&format!("{BOT}/config/diff?from=1&to=2")).await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.body);
    assert!(
        d.body["unified"].as_str().unwrap().contains("+"),
        "{}",
        d.body
    );

    // Rolling back to revision 1 makes a revision 3 equal to it.
    let r = f
        .json(
            Method::POST,
            &format!("{BOT}/config/rollback"),
            json!({"revision": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["revision"], 3);
    let one = f.get(&format!("{BOT}/config/revisions/1")).await;
    let three = f.get(&format!("{BOT}/config/revisions/3")).await;
    assert_eq!(one.body["config"], three.body["config"]);
    assert_eq!(three.body["message"], "rollback to revision 1");
}

#[tokio::test]
async fn bad_config_input_is_refused_and_changes_nothing() {
    let f = seeded_with_keyring().await;
    let r = f.json(Method::PUT, BOT, bot(json!({}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let index = f.store.index();

    // Malformed JSON5: line and column.
    let mut t = tenant("acme");
    t["spec"]["config"] = json!("{\n  logging: { level: 'debug' \n  oops\n}");
    let r = f.json(Method::PUT, "/api/v1/tenants/acme", t).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.fields(), ["spec.config"], "{}", r.body);
    assert!(r.body.to_string().contains("line "), "{}", r.body);
    assert!(r.body.to_string().contains("column "), "{}", r.body);

    // A key of the wrong type, set by a lower layer: named with the instance it breaks.
    let r = f
        .json(
            Method::PUT,
            "/api/v1/configtemplates/default",
            template(json!({"gateway": {"port": "eighteen"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    let text = r.body.to_string();
    assert!(text.contains("gateway.port"), "{text}");
    assert!(
        text.contains("openclawinstance/acme/helpdesk/bot"),
        "{text}"
    );

    // A template that does not exist.
    let mut i = bot(json!({}));
    i["spec"]["configTemplate"] = json!("regulated");
    let r = f.json(Method::PUT, BOT, i).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.fields(), ["spec.configTemplate"], "{}", r.body);
    assert!(r.message().contains("\"regulated\""), "{}", r.body);

    // A missing secret and a missing key.
    let mut i = bot(json!({}));
    i["spec"]["env"] =
        json!({"ANTHROPIC_API_KEY": {"secretRef": {"name": "llm-keys", "key": "anthropic"}}});
    let r = f.json(Method::PUT, BOT, i.clone()).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.fields(), ["spec.env.ANTHROPIC_API_KEY"], "{}", r.body);
    assert!(r.message().contains("llm-keys"), "{}", r.body);
    assert_eq!(f.store.index(), index, "nothing was written");

    let secret = json!({"apiVersion": "clusterclaw.io/v1", "kind": "Secret",
        "metadata": {"name": "llm-keys", "tenant": "acme"}, "spec": {"data": {"openai": "sk-openai-1"}}});
    let r = f
        .json(Method::PUT, "/api/v1/tenants/acme/secrets/llm-keys", secret)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = f.json(Method::PUT, BOT, i).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(
        r.message().contains("has no key \"anthropic\""),
        "{}",
        r.body
    );

    // Rollback to a revision that does not exist (or is another instance's).
    let r = f
        .json(
            Method::POST,
            &format!("{BOT}/config/rollback"),
            json!({"revision": 7}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = f
        .json(
            Method::POST,
            "/api/v1/tenants/acme/projects/helpdesk/instances/nobody/config/rollback",
            json!({"revision": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // A template in use is not deleted, and its users are named.
    let r = f
        .json(
            Method::PUT,
            "/api/v1/configtemplates/default",
            template(json!({"logging": {"level": "info"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = f.delete("/api/v1/configtemplates/default").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(
        r.message().contains("openclawinstance/acme/helpdesk/bot"),
        "{}",
        r.body
    );
    assert_eq!(
        f.get("/api/v1/configtemplates/default").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn secrets_are_write_only_sealed_at_rest_and_tenant_private() {
    let f = seeded_with_keyring().await;
    let value = "sk-ant-very-secret-value-0123456789";
    let secret = json!({"apiVersion": "clusterclaw.io/v1", "kind": "Secret",
        "metadata": {"name": "llm-keys", "tenant": "acme"}, "spec": {"data": {"anthropic": value}}});
    let r = f
        .json(Method::PUT, "/api/v1/tenants/acme/secrets/llm-keys", secret)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert!(!r.body.to_string().contains(value));
    let fp = r.body["spec"]["keys"]["anthropic"]
        .as_str()
        .unwrap()
        .to_string();
    // A malformed secret is refused without its value in the answer.
    for spec in [
        json!(value),
        json!({"data": value}),
        json!({"data": {"k": [value]}}),
        json!({"data": {"k": 7}}),
    ] {
        let bad = json!({"apiVersion": "clusterclaw.io/v1", "kind": "Secret",
            "metadata": {"name": "bad", "tenant": "acme"}, "spec": spec});
        for (method, path, body) in [
            (Method::PUT, "/api/v1/tenants/acme/secrets/bad", bad.clone()),
            (
                Method::POST,
                "/api/v1/apply",
                json!({"items": [bad.clone()]}),
            ),
        ] {
            let r = f.json(method, path, body).await;
            assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
            assert!(!r.body.to_string().contains(value), "{}", r.body);
        }
    }
    // A tenant-level path does not take a project-level secret.
    let wrong = json!({"apiVersion": "clusterclaw.io/v1", "kind": "Secret",
        "metadata": {"name": "x", "tenant": "acme", "project": "helpdesk"}, "spec": {"data": {"k": "v"}}});
    let r = f
        .json(Method::PUT, "/api/v1/tenants/acme/secrets/x", wrong)
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.fields(), ["metadata.project"], "{}", r.body);
    assert!(fp.starts_with("hmac-sha256:"), "{fp}");
    for path in [
        "/api/v1/tenants/acme/secrets/llm-keys",
        "/api/v1/tenants/acme/secrets",
        "/api/v1/secrets",
    ] {
        let r = f.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        assert!(!r.body.to_string().contains(value), "{path}: {}", r.body);
        assert!(!r.body.to_string().contains("ccs1:"), "{path}: {}", r.body);
    }
    // Nothing on disk holds the value in the clear.
    for entry in std::fs::read_dir(f.dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        assert!(
            !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
            "a file holds the secret in the clear"
        );
    }
    // Referenced from env, the instance is accepted.
    let mut i = bot(json!({}));
    i["spec"]["env"] =
        json!({"ANTHROPIC_API_KEY": {"secretRef": {"name": "llm-keys", "key": "anthropic"}}});
    let r = f.json(Method::PUT, BOT, i).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    // In use: not deleted.
    let r = f.delete("/api/v1/tenants/acme/secrets/llm-keys").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.message().contains("bot"), "{}", r.body);
    // Another tenant's viewer sees nothing of it.
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [tenant("other")]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = f
        .json(
            Method::POST,
            "/api/v1/tokens",
            json!({"kind": "api", "role": "viewer", "tenant": "other"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let viewer = r.body["token"].as_str().unwrap().to_string();
    let r = f
        .send(
            Method::GET,
            "/api/v1/tenants/acme/secrets/llm-keys",
            Some(&viewer),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = f
        .send(
            Method::GET,
            "/api/v1/secrets",
            Some(&viewer),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(
        r.body["items"].as_array().map(Vec::len),
        Some(0),
        "{}",
        r.body
    );

    // A tenant with a secret left is not deleted (the secret would outlive it).
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [tenant("solo"), {
            "apiVersion": "clusterclaw.io/v1", "kind": "Secret",
            "metadata": {"name": "s", "tenant": "solo"}, "spec": {"data": {"k": "v"}}}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = f.delete("/api/v1/tenants/solo").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.message().contains("secret"), "{}", r.body);
    assert_eq!(
        f.delete("/api/v1/tenants/solo/secrets/s").await.status,
        StatusCode::OK
    );
    assert_eq!(
        f.delete("/api/v1/tenants/solo").await.status,
        StatusCode::OK
    );

    // Rotation: every value re-sealed with the new key; the fingerprint does not change.
    let r = f
        .json(Method::POST, "/api/v1/secrets/rotate-key", json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["resealed"], 1, "{}", r.body);
    let r = f.get("/api/v1/tenants/acme/secrets/llm-keys").await;
    assert_eq!(r.body["spec"]["keys"]["anthropic"], fp.as_str());
    let sealed = f.store.sealed_values().unwrap();
    let keyring =
        crate::secrets::Keyring::load_or_create(&f.dir.path().join("secrets.key")).unwrap();
    let opened = keyring.open(&sealed[0].aad(), &sealed[0].sealed).unwrap();
    assert_eq!(opened.expose(), value);
}
