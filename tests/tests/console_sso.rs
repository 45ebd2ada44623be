//! Console single sign-on end to end, in a real browser: headless Chromium over WebDriver
//! against the real server and the test library's OpenID Connect provider (on `localhost`,
//! another site than the server at `127.0.0.1`).
//!
//! Signs in with "Sign in with Test IdP" and lands, logged in, on the page first asked for,
//! seeing only the tenant the user's group maps to; an ID token with another nonce, a code
//! redeemed with another sign-in's PKCE verifier and a replayed `state` are each refused
//! with an error page and no session; the session ends when the ID token expires; every
//! login and logout is in the audit log with its principal and source address.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`tests/browser-setup.sh` installs them):
//! without them the test skips, unless `CI=true` (then it fails).

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clusterclaw_tests::agent::Scope;
use clusterclaw_tests::browser::{
    browser, browser_available, page_text as text, shot, start_driver,
};
use clusterclaw_tests::oidc_provider::{Behaviour, OidcProvider};
use clusterclaw_tests::server::TestServer;
use fantoccini::{Client, Locator};
use serde_json::Value;

const CLIENT_ID: &str = "cc-console";
const SECRET: &str = "s3cret value/+";

/// Waits for the page to show `want`.
async fn wait_text(c: &Client, want: &str) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let t = text(c).await.unwrap_or_default();
        if t.contains(want) {
            return Ok(t);
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "timed out waiting for {want:?} at {}; the page shows:\n{t}",
                c.current_url().await?
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// From the login page: clicks "Sign in with Test IdP".
async fn click_sign_in(c: &Client) -> anyhow::Result<()> {
    let link = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("a.sso-login"))
        .await?;
    ensure!(
        link.text().await?.contains("Sign in with Test IdP"),
        "the link says {:?}",
        link.text().await?
    );
    link.click().await?;
    Ok(())
}

/// Signs in from the login page and waits for a console page.
async fn sign_in(c: &Client) -> anyhow::Result<()> {
    click_sign_in(c).await?;
    if c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Id("who"))
        .await
        .is_err()
    {
        bail!(
            "no console page after signing in: at {} the page shows:\n{}",
            c.current_url().await?,
            text(c).await.unwrap_or_default()
        );
    }
    Ok(())
}

/// Whether the browser has no session: a console page sends it to the login form.
async fn logged_out(c: &Client, api: &str) -> anyhow::Result<bool> {
    c.goto(&format!("{api}/ui/")).await?;
    Ok(c.find(Locator::Id("token")).await.is_ok() && c.find(Locator::Id("who")).await.is_err())
}

async fn log_out(c: &Client) -> anyhow::Result<()> {
    c.find(Locator::Css("form.logout button"))
        .await?
        .click()
        .await?;
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Id("token"))
        .await?;
    Ok(())
}

/// With the provider holding: starts a sign-in and returns the way back it offers (the
/// callback with the code and the state).
async fn held_callback(c: &Client, api: &str) -> anyhow::Result<String> {
    c.goto(&format!("{api}/ui/login")).await?;
    click_sign_in(c).await?;
    let link = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Id("continue"))
        .await?;
    link.attr("href")
        .await?
        .context("the provider's link has no href")
}

fn query(url: &str) -> std::collections::HashMap<String, String> {
    reqwest::Url::parse(url)
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

#[test]
fn console_single_sign_on_in_a_real_browser() -> anyhow::Result<()> {
    if !browser_available()? {
        return Ok(());
    }
    let idp = OidcProvider::start(
        "localhost",
        Behaviour {
            client_id: CLIENT_ID.into(),
            client_secret: Some(SECRET.into()),
            sub: "u-1234".into(),
            name: "alice".into(),
            groups: vec!["staff".into(), "sso-admins".into()],
            nonce_override: None,
            lifetime: Duration::from_secs(300),
            hold: false,
        },
    )?;
    let scope = Scope::new("ccsso");
    let other = Scope::new("ccsso-other");
    let config_dir = tempfile::tempdir()?;
    std::fs::write(
        config_dir.path().join("console-secret"),
        format!("{SECRET}\n"),
    )?;
    let config = config_dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[oidc.issuers]]
issuer = "{issuer}"
audience = "cc-api"
allowed_algorithms = ["ES256"]
username_claim = "preferred_username"
client_id = "{CLIENT_ID}"
client_secret_file = "console-secret"
display_name = "Test IdP"

[[oidc.issuers.mappings]]
group = "sso-admins"
role = "tenant-admin"
tenant = "{tenant}"
"#,
            issuer = idp.issuer,
            tenant = scope.tenant
        ),
    )?;
    let server = TestServer::start_with(&["--config", config.to_str().context("path")?])?;
    scope.apply_http(&server, &scope.base_manifest());
    other.apply_http(&server, &other.base_manifest());
    let api = server.api_url().to_string();

    let driver = start_driver()?;
    let rt = tokio::runtime::Runtime::new()?;
    let c = rt.block_on(browser(&driver))?;
    let result = rt.block_on(async {
        // A page asked for before logging in: the login page offers single sign-on, and
        // signing in comes back to that page, scoped to the mapped tenant.
        c.goto(&format!("{api}/ui/tenants")).await?;
        shot(&c, "sso-login").await?;
        sign_in(&c).await?;
        let url = c.current_url().await?;
        ensure!(url.path() == "/ui/tenants", "landed on {url}");
        let t = text(&c).await?;
        ensure!(t.contains("alice"), "{t}");
        ensure!(t.contains(&scope.tenant), "{t}");
        ensure!(
            !t.contains(&other.tenant),
            "another tenant is visible:\n{t}"
        );
        shot(&c, "sso-signed-in").await?;
        ensure!(idp.exchanged() == 1);
        log_out(&c).await?;
        ensure!(logged_out(&c, &api).await?);

        // An ID token for another sign-in (its nonce differs): refused, no session.
        idp.set(|b| b.nonce_override = Some("another-sign-in".into()));
        c.goto(&format!("{api}/ui/login")).await?;
        click_sign_in(&c).await?;
        let t = wait_text(&c, "Single sign-on failed").await?;
        ensure!(t.contains("nonce does not match"), "{t}");
        shot(&c, "sso-wrong-nonce").await?;
        ensure!(logged_out(&c, &api).await?, "a session after a wrong nonce");
        idp.set(|b| b.nonce_override = None);

        // A code from one sign-in redeemed in another (whose PKCE verifier does not match
        // the code's challenge): the provider refuses it, so does the console.
        idp.set(|b| b.hold = true);
        let first = held_callback(&c, &api).await?;
        let second = held_callback(&c, &api).await?;
        let (first, second) = (query(&first), query(&second));
        let injected = format!(
            "{api}/ui/login/oidc/callback?code={}&state={}",
            first["code"], second["state"]
        );
        c.goto(&injected).await?;
        let t = wait_text(&c, "Single sign-on failed").await?;
        ensure!(t.contains("code exchange"), "{t}");
        ensure!(
            idp.refusals()
                .last()
                .is_some_and(|r| r.contains("code_verifier does not match")),
            "{:?}",
            idp.refusals()
        );
        ensure!(
            logged_out(&c, &api).await?,
            "a session after a wrong verifier"
        );

        // A state works once: the same way back, replayed after logging out, is refused.
        let back = held_callback(&c, &api).await?;
        c.goto(&back).await?;
        c.wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Id("who"))
            .await?;
        log_out(&c).await?;
        c.goto(&back).await?;
        let t = wait_text(&c, "Single sign-on failed").await?;
        ensure!(t.contains("already used"), "{t}");
        ensure!(
            logged_out(&c, &api).await?,
            "a session from a replayed state"
        );
        shot(&c, "sso-replayed").await?;

        // The session ends when the ID token expires.
        idp.set(|b| {
            b.hold = false;
            b.lifetime = Duration::from_secs(3);
        });
        c.goto(&format!("{api}/ui/login")).await?;
        sign_in(&c).await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        ensure!(
            logged_out(&c, &api).await?,
            "the session outlived its ID token"
        );
        Ok(())
    });
    let _ = rt.block_on(c.close());
    result?;

    // Every login and logout, accepted or refused, with who and from where.
    let r = server.http(
        "GET",
        "/api/v1/audit?limit=1000",
        None,
        Some(server.admin_token()),
    );
    ensure!(r.status == 200, "{}", r.body);
    let records: Vec<Value> = r.json()["items"].as_array().cloned().unwrap_or_default();
    let of = |action: &str, outcome: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["action"] == action && r["result"]["outcome"] == outcome)
            .collect()
    };
    let logins = of("login", "ok");
    ensure!(logins.len() == 3, "{logins:#?}");
    let principal = format!("oidc:{}:u-1234", idp.issuer.trim_start_matches("http://"));
    for l in &logins {
        ensure!(l["principal"]["id"] == principal.as_str(), "{l:#}");
        ensure!(l["principal"]["name"] == "alice", "{l:#}");
        ensure!(l["tenant"] == scope.tenant.as_str(), "{l:#}");
        ensure!(
            l["source"]
                .as_str()
                .unwrap_or_default()
                .starts_with("127.0.0.1:"),
            "{l:#}"
        );
        ensure!(
            l["object"]["name"]
                .as_str()
                .unwrap_or_default()
                .starts_with("sso:"),
            "{l:#}"
        );
    }
    let refused = of("login", "denied");
    let reasons: Vec<&str> = refused
        .iter()
        .map(|r| r["result"]["reason"].as_str().unwrap_or_default())
        .collect();
    for want in ["nonce does not match", "code exchange", "already used"] {
        ensure!(
            reasons.iter().any(|r| r.contains(want)),
            "no refused login for {want:?}: {reasons:#?}"
        );
    }
    let logouts = of("logout", "ok");
    ensure!(logouts.len() == 2, "{logouts:#?}");
    ensure!(
        logouts.iter().all(|l| l["principal"]["name"] == "alice"),
        "{logouts:#?}"
    );
    let all = records.iter().map(Value::to_string).collect::<String>();
    ensure!(!all.contains("eyJ"), "a token is in the audit log");
    Ok(())
}
