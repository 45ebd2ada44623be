//! End to end: console sessions are kept in the store, over plain HTTP as a browser sends it
//! (no browser needed), against the real server binary.
//!
//! - On SQLite: a session opened through the login form still works after the server is
//!   restarted on the same data directory; a logout ends it, also across another restart.
//! - On PostgreSQL, two servers on one database: a session opened on one is accepted by the
//!   other, and a logout on the second ends it on both.
//!
//! Without PostgreSQL the second test skips with the reason printed, unless `CI=true`.

use anyhow::{Context, ensure};
use clusterclaw_tests::agent::free_port;
use clusterclaw_tests::console_http::{client, csrf_of, log_in};
use clusterclaw_tests::ha;
use clusterclaw_tests::server::TestServer;

/// What a console page answers a session cookie: its status, where it redirects, its body.
async fn page(
    http: &reqwest::Client,
    api: &str,
    cookie: &str,
) -> anyhow::Result<(u16, String, String)> {
    let resp = http
        .get(format!("{api}/ui/"))
        .header("Cookie", cookie)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok((status, location, resp.text().await?))
}

/// The overview page is served to the session (it names who is logged in).
async fn logged_in(http: &reqwest::Client, api: &str, cookie: &str) -> anyhow::Result<String> {
    let (status, location, body) = page(http, api, cookie).await?;
    ensure!(
        status == 200 && body.contains("id=\"who\""),
        "the session was not accepted by {api}: {status} {location}"
    );
    Ok(body)
}

/// The session is gone: a page goes to the login form.
async fn logged_out(http: &reqwest::Client, api: &str, cookie: &str) -> anyhow::Result<()> {
    let (status, location, _) = page(http, api, cookie).await?;
    ensure!(
        status == 303 && location.starts_with("/ui/login"),
        "the session still works on {api}: {status} {location}"
    );
    Ok(())
}

/// Logs out with the page's own form (its CSRF token).
async fn log_out(
    http: &reqwest::Client,
    api: &str,
    cookie: &str,
    page: &str,
) -> anyhow::Result<()> {
    let csrf = csrf_of(page).context("no csrf on the page")?;
    let resp = http
        .post(format!("{api}/ui/logout"))
        .header("Cookie", cookie)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await?;
    ensure!(resp.status() == 303, "logout answered {}", resp.status());
    Ok(())
}

#[test]
fn a_console_session_survives_a_server_restart() -> anyhow::Result<()> {
    let mut server = TestServer::start()?;
    let rt = tokio::runtime::Runtime::new()?;
    let http = client()?;
    let api = server.api_url().to_string();
    let cookie = rt.block_on(log_in(&http, &api, server.admin_token()))?;
    rt.block_on(logged_in(&http, &api, &cookie))?;
    // A cookie the server never made is no session.
    rt.block_on(logged_out(
        &http,
        &api,
        &format!("ccui_session={}", "ab".repeat(32)),
    ))?;

    server.restart()?;
    let api = server.api_url().to_string();
    let page = rt
        .block_on(logged_in(&http, &api, &cookie))
        .with_context(|| server.log())?;
    rt.block_on(log_out(&http, &api, &cookie, &page))?;
    rt.block_on(logged_out(&http, &api, &cookie))?;
    // The logout is kept too.
    server.restart()?;
    let api = server.api_url().to_string();
    rt.block_on(logged_out(&http, &api, &cookie))?;
    Ok(())
}

#[test]
fn servers_on_one_postgresql_share_console_sessions() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let (_schema, store, password_file) = match ha::database(scratch.path()) {
        Ok(d) => d,
        Err(why) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("the shared-session test cannot run: {why}");
            }
            eprintln!("skipped: {why}");
            return Ok(());
        }
    };
    let first = ha::server(&store, &password_file, free_port(), None);
    let second = ha::server(&store, &password_file, free_port(), Some(&first));
    let rt = tokio::runtime::Runtime::new()?;
    let http = client()?;
    let (one, two) = (first.api_url().to_string(), second.api_url().to_string());
    // Opened on the first, accepted by the second.
    let cookie = rt.block_on(log_in(&http, &one, first.admin_token()))?;
    rt.block_on(logged_in(&http, &one, &cookie))?;
    let page = rt.block_on(logged_in(&http, &two, &cookie))?;
    // Logged out on the second: ended on both.
    rt.block_on(log_out(&http, &two, &cookie, &page))?;
    rt.block_on(logged_out(&http, &two, &cookie))?;
    rt.block_on(logged_out(&http, &one, &cookie))?;
    Ok(())
}
