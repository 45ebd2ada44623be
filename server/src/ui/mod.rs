//! The web console at `/ui/`: server-rendered pages over the API's own handlers and scoped
//! store, logged in with an API token, with small scripts that follow the watch API.
//!
//! Every console route is mounted in the API's route table ([`crate::api::routes`]) with the
//! permission it needs ([`Need::Page`](crate::api::routes::Need::Page)), so the API's
//! middleware authenticates the session, checks the CSRF token of a form and authorizes the
//! route exactly as it does for `/api/v1`. The console's routes are pages for browsers, not
//! operations of the API: they are left out of the OpenAPI document.

mod actions;
pub mod charts;
pub mod gate;
pub mod index;
mod login;
pub mod pages;
pub mod session;
pub mod sso;
pub mod views;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::api::routes::{Routes, form, open, page};
use crate::auth::rbac::{Res, Verb};

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// Mounts the console's routes.
pub fn mount(routes: Routes) -> Routes {
    use Res::*;
    let instance = "/ui/tenants/{tenant}/projects/{project}/instances/{name}";
    routes
        .route("/", open(to_console))
        .route("/ui", open(to_console))
        .route("/ui/static/console.css", open(css))
        .route("/ui/static/console.js", open(js))
        .route(
            "/ui/login",
            open(login::login_page).open_post(login::log_in),
        )
        // Single sign-on: pre-login pages, like the login form (the callback checks its own
        // state, browser binding, PKCE and nonce).
        .route("/ui/login/oidc", open(sso::start))
        .route(sso::CALLBACK, open(sso::callback))
        .route("/ui/logout", form(Info, Verb::Read, login::log_out))
        .route("/ui/", page(Instances, pages::overview))
        .route("/ui/tenants", page(Tenants, pages::tenants))
        .route("/ui/instances", page(Instances, pages::instances))
        .route(instance, page(Instances, pages::instance))
        .route(
            &format!("{instance}/logs"),
            page(Instances, crate::api::logs::instance_logs),
        )
        .route(
            &format!("{instance}/scale"),
            form(Instances, Verb::Write, actions::scale),
        )
        .route(
            &format!("{instance}/delete"),
            form(Instances, Verb::Delete, actions::delete),
        )
        .route(
            &format!("{instance}/rollout/{{action}}"),
            form(Instances, Verb::Write, actions::rollout),
        )
        .route("/ui/hosts", page(Hosts, pages::hosts))
        .route(
            "/ui/hosts/{host}/cordon",
            form(HostScheduling, Verb::Write, actions::cordon),
        )
        .route(
            "/ui/hosts/{host}/uncordon",
            form(HostScheduling, Verb::Write, actions::uncordon),
        )
        .route(
            "/ui/hosts/{host}/drain",
            form(HostScheduling, Verb::Write, actions::drain),
        )
        .route("/ui/audit", page(Audit, pages::audit))
        // The watch API's streams, for the pages' scripts (which cannot send a bearer token).
        .route(
            "/ui/watch/instances",
            page(Instances, crate::api::objects::list_instances),
        )
        .route(
            "/ui/watch/hosts",
            page(Hosts, crate::api::objects::list_hosts),
        )
}

/// What the audit log calls a console form, by its path.
pub fn audit_action(path: &str) -> &'static str {
    if path.ends_with("/scale") {
        "scale"
    } else if path.ends_with("/delete") {
        "delete"
    } else if path.ends_with("/logout") {
        "logout"
    } else {
        "update"
    }
}

async fn to_console() -> Response {
    gate::redirect("/ui/")
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

async fn css() -> Response {
    asset(CSS, "text/css; charset=utf-8")
}

async fn js() -> Response {
    asset(JS, "text/javascript; charset=utf-8")
}
