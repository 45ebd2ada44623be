//! The web console through the API's router: sessions, CSRF, and the same permissions and
//! scoping as the API, for every console route and every kind of caller.

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::json;
use tower::ServiceExt;

use super::{Fixture, fixture, instance, project, tenant};
use crate::api::routes::Need;
use crate::auth::rbac::{Res, Role, Verb};
use crate::store::{Store, TokenKind};

/// A browser: the cookies it holds.
#[derive(Default, Clone)]
struct Browser {
    cookies: Vec<(String, String)>,
}

struct Page {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_default()
    }

    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no csrf field in {}", self.body));
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').unwrap()].to_string()
    }
}

impl Browser {
    async fn send(&mut self, f: &Fixture, method: Method, path: &str, form: Option<&str>) -> Page {
        let mut req = Request::builder().method(method).uri(path);
        if !self.cookies.is_empty() {
            let c: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req = req.header(header::COOKIE, c.join("; "));
        }
        let body = match form {
            Some(text) => {
                req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
                Body::from(text.to_string())
            }
            None => Body::empty(),
        };
        let resp = f
            .app
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        for set in headers.get_all(header::SET_COOKIE) {
            let set = set.to_str().unwrap();
            let (pair, attrs) = set.split_once(';').unwrap_or((set, ""));
            let (k, v) = pair.split_once('=').unwrap();
            self.cookies.retain(|(name, _)| name != k);
            if !attrs.contains("Max-Age=0") {
                self.cookies.push((k.to_string(), v.to_string()));
            }
        }
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
            .await
            .unwrap();
        Page {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&mut self, f: &Fixture, path: &str) -> Page {
        self.send(f, Method::GET, path, None).await
    }

    async fn post(&mut self, f: &Fixture, path: &str, form: &str) -> Page {
        self.send(f, Method::POST, path, Some(form)).await
    }

    /// Posts the login form with its `csrf` field and the fixture's token; panics unless a
    /// session opens.
    async fn submit_login(&mut self, f: &Fixture, csrf: &str) {
        let r = self
            .post(
                f,
                "/ui/login",
                &format!("csrf={csrf}&next=%2Fui%2F&token={}", f.token),
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        assert!(self.cookies.iter().any(|(k, _)| k == "ccui_session"));
    }

    /// Logs in with `token`; panics unless the console takes it.
    async fn log_in(f: &Fixture, token: &str) -> (Browser, String) {
        let mut b = Browser::default();
        let form = b.get(f, "/ui/login").await;
        assert_eq!(form.status, StatusCode::OK);
        let csrf = form.csrf();
        let r = b
            .post(
                f,
                "/ui/login",
                &format!("csrf={csrf}&next=%2Fui%2F&token={token}"),
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        assert_eq!(r.location(), "/ui/");
        let home = b.get(f, "/ui/").await;
        assert_eq!(home.status, StatusCode::OK, "{}", home.body);
        let csrf = home.csrf();
        (b, csrf)
    }
}

async fn two_tenants() -> Fixture {
    let f = fixture();
    let r = f
        .json(
            Method::POST,
            "/api/v1/apply",
            json!({"items": [
                tenant("acme"), tenant("other"),
                project("acme", "helpdesk"), project("other", "ops"),
                instance("acme", "helpdesk", "bot", 1), instance("other", "ops", "secretbot", 1),
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    f
}

fn token(f: &Fixture, role: Role, tenant: Option<&str>, project: Option<&str>) -> String {
    f.token_record(TokenKind::Api, role.as_str(), |r| {
        r.tenant = tenant.map(Into::into);
        r.project = project.map(Into::into);
    })
}

const BOT: &str = "/ui/tenants/acme/projects/helpdesk/instances/bot";

#[tokio::test]
async fn a_login_page_loaded_later_does_not_void_a_form_already_open() {
    let f = two_tenants().await;
    let mut b = Browser::default();
    let open = b.get(&f, "/ui/login").await.csrf();
    // Another tab, or a live page whose session ended, loads the login page meanwhile.
    let later = b.get(&f, "/ui/login?next=/ui/instances").await.csrf();
    assert_eq!(later, open);
    b.submit_login(&f, &open).await;
    // A login cookie the console did not make is replaced, never echoed into the page.
    let mut odd = Browser {
        cookies: vec![("ccui_login".into(), "%22%3E%3Cscript%3E".into())],
    };
    let form = odd.get(&f, "/ui/login").await;
    let csrf = form.csrf();
    assert!(
        csrf.len() == 64 && csrf.bytes().all(|c| c.is_ascii_hexdigit()),
        "{csrf}"
    );
    assert!(!form.body.contains("script%3E"), "{}", form.body);
    odd.submit_login(&f, &csrf).await;
}

#[tokio::test]
async fn login_opens_a_session_in_a_strict_http_only_cookie() {
    let f = two_tenants().await;
    let mut b = Browser::default();
    // Without a session a page goes to the login form, which comes back to it.
    let r = b.get(&f, "/ui/instances").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/ui/login?next=/ui/instances");
    let form = b.get(&f, "/ui/login?next=/ui/instances").await;
    let csrf = form.csrf();
    // A login post that did not come from the form is refused.
    let mut stranger = Browser::default();
    let r = stranger
        .post(&f, "/ui/login", &format!("csrf={csrf}&token={}", f.token))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(stranger.cookies.iter().all(|(k, _)| k != "ccui_session"));
    // A wrong token: 401, no session.
    let r = b
        .post(
            &f,
            "/ui/login",
            &format!("csrf={csrf}&token=cca_{}", "x".repeat(40)),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("not accepted"), "{}", r.body);
    assert!(b.cookies.iter().all(|(k, _)| k != "ccui_session"));
    let csrf = r.csrf();
    let r = b
        .post(
            &f,
            "/ui/login",
            &format!("csrf={csrf}&next=%2Fui%2Finstances&token={}", f.token),
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(r.location(), "/ui/instances");
    let set: Vec<&str> = r
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    let session = set.iter().find(|c| c.starts_with("ccui_session=")).unwrap();
    assert!(
        session.contains("HttpOnly") && session.contains("SameSite=Strict"),
        "{session}"
    );
    assert!(!session.contains("Secure"), "served without TLS: {session}");
    let page = b.get(&f, "/ui/instances").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("acme/helpdesk/bot"), "{}", page.body);
    // The login never goes elsewhere.
    let r = b.get(&f, "/ui/login?next=https://evil.example/").await;
    assert!(
        r.body.contains("name=\"next\" value=\"/ui/\""),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn a_form_without_the_session_csrf_token_is_refused_and_changes_nothing() {
    let f = two_tenants().await;
    let (mut b, csrf) = Browser::log_in(&f, &f.token).await;
    let before = f.store.index();
    for form in [
        "replicas=3&confirm=yes",
        "csrf=&replicas=3&confirm=yes",
        "csrf=0123&replicas=3&confirm=yes",
    ] {
        let r = b.post(&f, &format!("{BOT}/scale"), form).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{form}: {}", r.body);
        assert!(r.body.contains("CSRF"), "{}", r.body);
    }
    // Another session's token does not do either.
    let (_, other_csrf) = Browser::log_in(&f, &f.token).await;
    let r = b
        .post(
            &f,
            &format!("{BOT}/scale"),
            &format!("csrf={other_csrf}&replicas=3&confirm=yes"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(f.store.index(), before, "a refused form changed the store");

    // The real form: a confirmation naming the object first, then the change.
    let r = b
        .post(
            &f,
            &format!("{BOT}/scale"),
            &format!("csrf={csrf}&replicas=3"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.body
            .contains("Scale instance acme/helpdesk/bot to 3 replicas?"),
        "{}",
        r.body
    );
    assert_eq!(f.store.index(), before);
    let r = b
        .post(
            &f,
            &format!("{BOT}/scale"),
            &format!("csrf={csrf}&replicas=3&confirm=yes"),
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(r.location(), BOT);
    let i = f
        .get("/api/v1/tenants/acme/projects/helpdesk/instances/bot")
        .await;
    assert_eq!(i.body["spec"]["replicas"], 3);
    // Bad input: a clear error, nothing changed.
    let before = f.store.index();
    let r = b
        .post(
            &f,
            &format!("{BOT}/scale"),
            &format!("csrf={csrf}&replicas=lots&confirm=yes"),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("replicas"), "{}", r.body);
    let r = b
        .post(
            &f,
            &format!("{BOT}/scale"),
            &format!("csrf={csrf}&replicas=-1&confirm=yes"),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(r.body.contains("out of range"), "{}", r.body);
    assert_eq!(f.store.index(), before);

    // Logging out ends the session; its token is no use afterwards.
    let r = b.post(&f, "/ui/logout", &format!("csrf={csrf}")).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let r = b.get(&f, "/ui/").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.location().starts_with("/ui/login"));
    let r = b
        .post(
            &f,
            &format!("{BOT}/scale"),
            &format!("csrf={csrf}&replicas=1&confirm=yes"),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn console_changes_are_audited_as_the_api_s() {
    let base = two_tenants().await;
    let (f, writer) = base.audited();
    let (mut b, csrf) = Browser::log_in(&f, &f.token).await;
    let r = b
        .post(
            &f,
            &format!("{BOT}/scale"),
            &format!("csrf={csrf}&replicas=2&confirm=yes"),
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let r = b
        .post(&f, &format!("{BOT}/scale"), "replicas=2&confirm=yes")
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    writer.flush().await.unwrap();
    let records = f.audit_records();
    let scale = records
        .iter()
        .find(|r| r.entry.action == "scale")
        .expect("scale record");
    assert_eq!(scale.entry.object.as_ref().unwrap().name, "bot");
    assert!(
        records.iter().any(|r| r.entry.result.status == 403),
        "the forged post is recorded: {records:?}"
    );
}

#[tokio::test]
async fn the_audit_log_lists_what_was_answered_before_it_was_asked() {
    use crate::audit::{AuditEntry, AuditObject, AuditPrincipal, AuditResult};
    let base = two_tenants().await;
    let (f, writer) = base.audited();
    let (mut b, _) = Browser::log_in(&f, &f.token).await;
    writer.flush().await.unwrap();
    // Another writer holds the database: the record queued now (as a cordon's is, once it
    // is answered) cannot be stored until it lets go.
    let db = base.dir.path().join("clusterclaw.db");
    let hold = rusqlite::Connection::open(&db).unwrap();
    hold.execute_batch("BEGIN IMMEDIATE").unwrap();
    let entry = AuditEntry::now(
        AuditPrincipal::anonymous(),
        "host.cordon",
        AuditResult::ok(200),
    )
    .with_object(AuditObject {
        kind: "Host".into(),
        tenant: None,
        project: None,
        name: "queued-host".into(),
    });
    writer.record(entry).await.unwrap();
    let release = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        hold.execute_batch("ROLLBACK").unwrap();
    };
    let (page, api, ()) = tokio::join!(
        b.get(&f, "/ui/audit"),
        f.send(
            Method::GET,
            "/api/v1/audit",
            Some(&f.token),
            None,
            Body::empty()
        ),
        release
    );
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("queued-host"), "{}", page.body);
    assert_eq!(api.status, StatusCode::OK, "{}", api.body);
    assert!(api.body.to_string().contains("queued-host"), "{}", api.body);
}

#[tokio::test]
async fn a_tenant_token_sees_only_its_tenant() {
    let f = two_tenants().await;
    let t = token(&f, Role::TenantAdmin, Some("acme"), None);
    let (mut b, _) = Browser::log_in(&f, &t).await;
    for path in [
        "/ui/",
        "/ui/instances",
        "/ui/tenants",
        "/ui/instances?tenant=other",
    ] {
        let page = b.get(&f, path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        assert!(!page.body.contains("secretbot"), "{path}: {}", page.body);
        assert!(!page.body.contains("Tenant other"), "{path}");
    }
    assert!(
        b.get(&f, "/ui/instances")
            .await
            .body
            .contains("acme/helpdesk/bot")
    );
    assert!(b.get(&f, "/ui/").await.body.contains("1 instances in all"));
    let r = b
        .get(&f, "/ui/tenants/other/projects/ops/instances/secretbot")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(
        r.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    // Hosts are not a tenant's: no link, and the page is refused.
    assert!(!b.get(&f, "/ui/").await.body.contains("href=\"/ui/hosts\""));
    assert_eq!(b.get(&f, "/ui/hosts").await.status, StatusCode::FORBIDDEN);
    // The watch streams only what the token sees.
    let r = b.get(&f, "/ui/watch/instances").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.body.contains("\"bot\"") && !r.body.contains("secretbot"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn a_viewer_gets_no_write_forms_and_cannot_post_them() {
    let f = two_tenants().await;
    let t = token(&f, Role::Viewer, Some("acme"), None);
    let (mut b, csrf) = Browser::log_in(&f, &t).await;
    let page = b.get(&f, BOT).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    for write in ["/scale", "/delete", "/rollout/"] {
        assert!(
            !page.body.contains(write),
            "a viewer sees {write}: {}",
            page.body
        );
    }
    // The only form is logging out.
    assert_eq!(
        page.body.matches("method=\"post\"").count(),
        1,
        "{}",
        page.body
    );
    let before = f.store.index();
    let r = b
        .post(
            &f,
            &format!("{BOT}/scale"),
            &format!("csrf={csrf}&replicas=3&confirm=yes"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body.contains("viewer"), "{}", r.body);
    assert_eq!(f.store.index(), before);
    // An editor of the project gets them.
    let t = token(&f, Role::ProjectEditor, Some("acme"), Some("helpdesk"));
    let (mut b, _) = Browser::log_in(&f, &t).await;
    let page = b.get(&f, BOT).await;
    assert!(
        page.body.contains(&format!("{BOT}/scale")) && page.body.contains(&format!("{BOT}/delete"))
    );
}

#[tokio::test]
async fn a_revoked_token_ends_its_session() {
    let f = two_tenants().await;
    let t = token(&f, Role::TenantAdmin, Some("acme"), None);
    let (mut b, _) = Browser::log_in(&f, &t).await;
    let id = f
        .store
        .list_tokens()
        .unwrap()
        .into_iter()
        .find(|r| r.role == "tenant-admin")
        .unwrap()
        .id;
    let r = f.delete(&format!("/api/v1/tokens/{id}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = b.get(&f, "/ui/instances").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.location().starts_with("/ui/login"), "{}", r.location());
}

/// Every console route, for every kind of caller, answers as the permission table says,
/// exactly like the API route it stands for.
#[tokio::test]
async fn every_console_route_answers_every_caller_as_the_table_says() {
    let f = two_tenants().await;
    let table = crate::api::route_table();
    let mut pages: Vec<(String, Method, Res, Verb)> = table
        .entries()
        .filter_map(|(path, method, need)| match need {
            Need::Page(res, verb) => Some((path.to_string(), method.clone(), res, verb)),
            _ => None,
        })
        .collect();
    pages.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
    assert!(pages.len() >= 15, "{pages:?}");
    // Every console path is under /ui, and every /ui path is in the table with a need.
    for (path, _, _, _) in &pages {
        assert!(path.starts_with("/ui/"), "{path}");
    }
    let callers = [
        (Role::PlatformAdmin, None, None),
        (Role::TenantAdmin, Some("acme"), None),
        (Role::ProjectEditor, Some("acme"), Some("helpdesk")),
        (Role::Viewer, None, None),
        (Role::Viewer, Some("acme"), None),
    ];
    let mut checked = 0;
    for (role, tenant, project) in callers {
        let t = token(&f, role, tenant, project);
        let (mut b, csrf) = Browser::log_in(&f, &t).await;
        for (template, method, res, verb) in &pages {
            let path = template
                .replace("{tenant}", "acme")
                .replace("{project}", "helpdesk")
                .replace("{name}", "bot")
                .replace("{host}", "no-such-host")
                .replace("{action}", "pause");
            if path.ends_with("/logout") {
                continue;
            }
            let before = f.store.index();
            // Without a session: the login page, or a refusal.
            let mut anonymous = Browser::default();
            let r = anonymous
                .send(&f, method.clone(), &path, Some("csrf=x"))
                .await;
            if *method == Method::GET {
                assert_eq!(r.status, StatusCode::SEE_OTHER, "{method} {path} anonymous");
            } else {
                assert_eq!(
                    r.status,
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} anonymous"
                );
            }
            // Forms without the CSRF token: refused whoever asks.
            if *method != Method::GET {
                let r = b.send(&f, method.clone(), &path, Some("confirm=yes")).await;
                assert_eq!(
                    r.status,
                    StatusCode::FORBIDDEN,
                    "{method} {path} without csrf"
                );
                assert_eq!(f.store.index(), before);
            }
            let form = format!("csrf={csrf}&replicas=1");
            let r = b
                .send(
                    &f,
                    method.clone(),
                    &path,
                    (*method != Method::GET).then_some(form.as_str()),
                )
                .await;
            let allowed = crate::auth::rbac::allowed(
                role,
                &match (tenant, project) {
                    (None, _) => crate::store::Scope::Cluster,
                    (Some(t), None) => crate::store::Scope::Tenant(t.into()),
                    (Some(t), Some(p)) => crate::store::Scope::Project {
                        tenant: t.into(),
                        project: p.into(),
                    },
                },
                *res,
                *verb,
            );
            let what = format!(
                "{method} {path} by {role:?} {tenant:?}: {} {}",
                r.status, r.body
            );
            if allowed {
                assert!(
                    r.status != StatusCode::FORBIDDEN && r.status != StatusCode::UNAUTHORIZED,
                    "{what}"
                );
            } else {
                assert_eq!(r.status, StatusCode::FORBIDDEN, "{what}");
                assert_eq!(f.store.index(), before, "{what}");
            }
            checked += 1;
        }
    }
    assert!(checked > 60, "{checked}");
}

#[tokio::test]
async fn logins_and_logouts_are_audited_without_the_token() {
    let base = two_tenants().await;
    let (f, writer) = base.audited();
    // Refused: a token that is not one; then accepted, then a logout.
    let mut stranger = Browser::default();
    let form = stranger.get(&f, "/ui/login").await;
    let csrf = form.csrf();
    let bad = format!("cca_{}", "z".repeat(40));
    let r = stranger
        .post(&f, "/ui/login", &format!("csrf={csrf}&token={bad}"))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    let (mut b, csrf) = Browser::log_in(&f, &f.token).await;
    let r = b.post(&f, "/ui/logout", &format!("csrf={csrf}")).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    writer.flush().await.unwrap();
    let records = f.audit_records();
    let logins: Vec<_> = records
        .iter()
        .filter(|r| r.entry.action == "login")
        .collect();
    assert_eq!(logins.len(), 2, "{logins:#?}");
    assert_eq!(logins[0].entry.result.status, 401);
    assert_eq!(logins[0].entry.principal.id, "anonymous");
    assert_eq!(logins[1].entry.result.status, 303);
    assert_ne!(logins[1].entry.principal.id, "anonymous");
    assert_eq!(logins[1].entry.object.as_ref().unwrap().name, "token");
    let logout = records
        .iter()
        .find(|r| r.entry.action == "logout")
        .expect("a logout record");
    assert_eq!(
        logout.entry.result.outcome,
        crate::audit::AuditOutcome::Ok,
        "{logout:?}"
    );
    assert_eq!(logout.entry.principal.id, logins[1].entry.principal.id);
    let all = format!("{records:?}");
    assert!(!all.contains(&f.token) && !all.contains(&bad));
}

#[tokio::test]
async fn single_sign_on_refuses_what_it_cannot_tie_to_a_sign_in() {
    let base = two_tenants().await;
    let (f, writer) = base.audited();
    let mut b = Browser::default();
    // Without an issuer configured for the console.
    let r = b.get(&f, "/ui/login/oidc?issuer=0").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert!(r.body.contains("not configured"), "{}", r.body);
    let form = b.get(&f, "/ui/login").await;
    assert!(!form.body.contains("Sign in with"), "{}", form.body);
    // A callback is never a session, whatever it carries.
    for q in ["", "?state=x&code=y", "?error=access_denied&state=x"] {
        let r = b.get(&f, &format!("/ui/login/oidc/callback{q}")).await;
        assert!(r.status.is_client_error(), "{q}: {}", r.status);
        assert!(r.body.contains("Single sign-on failed"), "{q}: {}", r.body);
        assert!(b.cookies.iter().all(|(k, _)| k != "ccui_session"), "{q}");
    }
    writer.flush().await.unwrap();
    let refused = f
        .audit_records()
        .into_iter()
        .filter(|r| r.entry.action == "login" && r.entry.result.status >= 400)
        .count();
    assert_eq!(refused, 3);
}

#[test]
fn the_pre_login_routes_are_the_only_open_console_routes() {
    let table = crate::api::route_table();
    let mut open: Vec<String> = table
        .entries()
        .filter(|(path, _, need)| *need == Need::Open && path.starts_with("/ui"))
        .map(|(path, method, _)| format!("{method} {path}"))
        .collect();
    open.sort();
    assert_eq!(
        open,
        [
            "GET /ui",
            "GET /ui/login",
            "GET /ui/login/oidc",
            "GET /ui/login/oidc/callback",
            "GET /ui/static/console.css",
            "GET /ui/static/console.js",
            "POST /ui/login",
        ]
    );
}
