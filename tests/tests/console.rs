//! End to end in a real browser: headless Chromium over WebDriver (chromedriver) against the
//! real server and agent on Docker, the stand-in OpenClaw image behind the instances.
//!
//! Logs in with a tenant's token and sees only that tenant; applies an instance through the
//! API and sees it turn Running on the open list without a reload; reads its live logs;
//! cordons a host from the hosts page; a forged form post without the CSRF token is refused;
//! a viewer gets no button that writes; starts a Canary update and promotes it from the
//! instance page until it succeeds; sees the CPU and memory charts of a replica; takes the
//! instance page and the overview at a phone's size. Screenshots of every page are written under
//! `target/console-screenshots/`.
//!
//! And by keyboard alone (no Docker needed): logs in with keys only; Tab from the top of a
//! page goes through the skip link, the main navigation, logout, then the filters and their
//! button, in that order, each with a visible focus outline; the skip link jumps past the
//! navigation; a filter is filled and sent with Enter; focus stays on a link while the list
//! around it is updated live; an instance is deleted through its confirmation page with keys
//! only; Tab leaves every page (no trap) and Shift+Tab goes back.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`tests/browser-setup.sh` installs them):
//! without them the test skips, unless `CI=true` (then it fails).

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clusterclaw_tests::agent::*;
use clusterclaw_tests::browser::{
    Focused, browser, browser_available, click, focused, page_text as text, press, shift_tab,
    start_driver, text_of, type_keys,
};
use clusterclaw_tests::server::TestServer;
use fantoccini::key::Key;
use fantoccini::{Client, Locator};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);
/// How long a page that a form's answer brings may take: the full suite runs beside this test
/// on two cores, and a logout once took longer than 10 s there.
const PAGE_WAIT: Duration = Duration::from_secs(30);

/// Says on the test's output what it does now, at the time the server's log uses, so that a
/// failure's output lines up with the server's.
fn step(what: &str) {
    eprintln!(
        "{} {what}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
}

/// A screenshot of the page, named on the test's output as the step it ends.
async fn shot(c: &Client, name: &str) -> anyhow::Result<()> {
    step(name);
    clusterclaw_tests::browser::shot(c, name).await
}

async fn log_in(c: &Client, api: &str, token: &str) -> anyhow::Result<()> {
    step("logging in");
    match send_login(c, api, token).await {
        Err(e) if network_changed(c).await => {
            step(&format!("{e:#}; logging in again"));
            send_login(c, api, token).await
        }
        done => done,
    }
}

/// Fills in and sends the login form, then waits for the page it brings.
async fn send_login(c: &Client, api: &str, token: &str) -> anyhow::Result<()> {
    c.goto(&format!("{api}/ui/login")).await?;
    c.find(Locator::Id("token")).await?.send_keys(token).await?;
    click(c, "form button[type=submit]").await?;
    wait_element(c, "#who", "the page after logging in").await
}

async fn log_out(c: &Client) -> anyhow::Result<()> {
    step("logging out");
    click(c, "form.logout button").await?;
    match wait_element(c, "#token", "the login page after logging out").await {
        Err(e) if network_changed(c).await => {
            // Whether the first post reached the server or not, the console's front page
            // shows the login form once the session is gone.
            step(&format!("{e:#}; logging out again"));
            let mut url = c.current_url().await?;
            url.set_path("/ui/");
            c.goto(url.as_str()).await?;
            if text_of(c, "#token").await?.is_none() {
                click(c, "form.logout button").await?;
            }
            wait_element(c, "#token", "the login page after logging out again").await
        }
        done => done,
    }
}

/// Chromium's own error page for a navigation it dropped because the machine's addresses
/// changed: the agent of this test creates and removes Docker networks, each a bridge with an
/// address of its own, and a form's post under way when that happens is lost, not answered.
const NETWORK_CHANGED: &str = "ERR_NETWORK_CHANGED";

/// Whether the browser shows Chromium's error page for a dropped navigation.
async fn network_changed(c: &Client) -> bool {
    text(c).await.is_ok_and(|t| t.contains(NETWORK_CHANGED))
}

/// Waits (up to [`PAGE_WAIT`]) until an element `css` selects is on the page; the error names
/// what was waited for, where the browser is and what the page shows.
async fn wait_element(c: &Client, css: &str, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    // A script run while a navigation replaces the page may fail: that is not an answer yet.
    let mut last_error = None;
    loop {
        match text_of(c, css).await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if network_changed(c).await {
            bail!(
                "waiting for {what} ({css}): the browser dropped the navigation ({NETWORK_CHANGED}) \
                 after {:?}",
                started.elapsed()
            );
        }
        if started.elapsed() > PAGE_WAIT {
            let url = match c.current_url().await {
                Ok(u) => u.to_string(),
                Err(e) => format!("(unknown: {e})"),
            };
            let page = text(c)
                .await
                .unwrap_or_else(|e| format!("(unreadable: {e})"));
            bail!(
                "timed out after {:?} waiting for {what} ({css}); the browser is at {url} \
                 (last error: {last_error:?}), and the page shows:\n{}",
                started.elapsed(),
                page
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the page (not reloaded) shows `want`.
async fn wait_text(c: &Client, what: &str, want: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    wait_for_text(c, "body", what, want).await
}

/// Waits until the element `css` selects (on the page as it is, not reloaded) shows `want`;
/// the error names what was waited for and shows the whole page.
async fn wait_for_text(
    c: &Client,
    css: &str,
    what: &str,
    want: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let t = text_of(c, css).await?.unwrap_or_default();
        if want(&t) {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!(
                "timed out waiting for {what} ({css} shows {t:?}); the page shows:\n{}",
                text(c).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The page at a phone's width: nothing wider than the screen (no sideways scrolling, nothing
/// past its right edge; what is hidden on purpose sits off its left), every
/// button within it, every table value labelled with its column.
async fn fits_a_phone(c: &Client, what: &str) -> anyhow::Result<()> {
    let wide = c
        .execute(
            "const w = document.documentElement.clientWidth; \
             const over = Array.from(document.querySelectorAll('button, input, select, a, td, th, pre, svg')) \
               .filter(e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.right > w + 1; }) \
               .map(e => e.tagName + ' ' + (e.getAttribute('aria-label') || e.textContent.trim().slice(0, 40))); \
             const bare = Array.from(document.querySelectorAll('main td')) \
               .filter(td => ['none', 'normal', ''].includes(getComputedStyle(td, '::before').content)) \
               .map(td => td.textContent.trim().slice(0, 40)); \
             return {page: document.documentElement.scrollWidth, screen: w, over: over, unlabelled: bare};",
            vec![],
        )
        .await?;
    ensure!(
        wide["page"].as_u64() <= wide["screen"].as_u64() && wide["over"] == json!([]),
        "{what} is wider than a phone: {wide}"
    );
    // Table rows are stacked on a phone: each value keeps its column's name.
    ensure!(
        wide["unlabelled"] == json!([]),
        "{what}: values without their column's name on a phone: {wide}"
    );
    Ok(())
}

fn token(server: &TestServer, role: &str, tenant: &str) -> String {
    server
        .cli(&["token", "create", "api", "--role", role, "-t", tenant])
        .ok()
        .stdout
        .trim()
        .to_string()
}

#[test]
fn the_console_in_a_real_browser() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    if !browser_available()? {
        return Ok(());
    }
    let scope = Scope::new("ccui");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let join = join_token(&server, 1, "10m");
    let host_name = unique("ccui-host");
    let mut agent = TestAgent::enroll(&server, port, &join, &["--name", &host_name])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;

    let (t, p) = (scope.tenant.clone(), scope.project.clone());
    scope.apply_http(&server, &scope.base_manifest());
    // Another tenant, with an instance this tenant's token must never see.
    let other = Scope::new("ccui-other");
    scope.apply_http(&server, &other.base_manifest());
    other.apply_http(
        &server,
        &other.instance_manifest("hidden-bot", &image, 0, &Default::default()),
    );
    let tenant_token = token(&server, "tenant-admin", &t);
    let viewer_token = token(&server, "viewer", &t);
    let api = server.api_url().to_string();

    let driver = start_driver()?;
    let rt = tokio::runtime::Runtime::new()?;
    let c = rt.block_on(browser(&driver))?;
    let result = (|| -> anyhow::Result<()> {
        // The login page, then the tenant's session.
        rt.block_on(async {
            c.goto(&format!("{api}/ui/")).await?;
            let url = c.current_url().await?;
            ensure!(
                url.path() == "/ui/login",
                "not sent to the login page: {url}"
            );
            shot(&c, "01-login").await?;
            // A login page loaded while this one is open (in another tab, or by a live page
            // whose session ended) leaves this form good.
            let status = c
                .execute(
                    "return fetch('/ui/login?next=%2Fui%2Finstances', \
                     {credentials: 'same-origin'}).then(r => r.status);",
                    vec![],
                )
                .await?;
            ensure!(status == json!(200), "the second login page: {status}");
            c.find(Locator::Id("token"))
                .await?
                .send_keys(&tenant_token)
                .await?;
            click(&c, "form button[type=submit]").await?;
            wait_element(&c, "#who", "the page after logging in").await?;
            shot(&c, "02-overview-tenant").await?;
            c.goto(&format!("{api}/ui/instances")).await?;
            let page = text(&c).await?;
            ensure!(
                !page.contains("hidden-bot"),
                "another tenant's instance shows: {page}"
            );
            ensure!(
                !page.contains(&other.tenant),
                "another tenant shows: {page}"
            );
            c.goto(&format!("{api}/ui/tenants")).await?;
            let page = text(&c).await?;
            ensure!(page.contains(&format!("Tenant {t}")), "{page}");
            ensure!(
                !page.contains(&other.tenant),
                "another tenant shows: {page}"
            );
            shot(&c, "03-tenants").await?;
            // The list, open, with a mark that a reload would wipe.
            c.goto(&format!("{api}/ui/instances?tenant={t}")).await?;
            c.execute("window.ccuiMark = 'still here'; return null;", vec![])
                .await?;
            Ok(())
        })?;

        // Applied through the API while the page is open.
        let applied = Instant::now();
        scope.apply_http(
            &server,
            &scope.instance_manifest("bot", &image, 1, &Default::default()),
        );
        rt.block_on(async {
            let key = format!("{t}/{p}/bot");
            wait_text(&c, "the new instance Running on the open page", |s| {
                s.lines()
                    .any(|l| l.contains(&key) && l.contains("Running") && l.contains("1/1"))
            })
            .await?;
            eprintln!(
                "Running on the open page {:?} after the apply",
                applied.elapsed()
            );
            let mark = c.execute("return window.ccuiMark || null;", vec![]).await?;
            ensure!(mark == json!("still here"), "the page was reloaded: {mark}");
            shot(&c, "04-instances-live").await?;

            // The instance page, its live logs.
            c.goto(&format!("{api}/ui/tenants/{t}/projects/{p}/instances/bot"))
                .await?;
            wait_for_text(&c, "#logs", "live logs on the instance page", |s| {
                s.contains("openclaw-standin: listening")
            })
            .await?;
            let page = text(&c).await?;
            ensure!(page.contains("Replicas") && page.contains(&host), "{page}");
            shot(&c, "05-instance").await?;
            // A tenant-admin sees no host page.
            let page = text(&c).await?;
            ensure!(!page.contains("Hosts"), "{page}");
            // The replica's CPU and memory over the last hour, from the agent's reports: a
            // chart with labelled axes and the current value in words.
            let deadline = Instant::now() + WAIT;
            loop {
                let charts = c.find_all(Locator::Css("#usage svg.chart")).await?;
                if charts.len() == 2 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("no CPU and memory charts: {}", text(&c).await?);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                c.refresh().await?;
            }
            let usage = text_of(&c, "#usage").await?.unwrap_or_default();
            for want in [
                "CPU of bot-0, last hour",
                "% CPU (now)",
                "MiB (now)",
                "60 min ago",
            ] {
                ensure!(usage.contains(want), "the charts lack {want:?}: {usage}");
            }
            shot(&c, "05b-instance-charts").await?;
            // The same page on a phone.
            c.set_window_size(390, 844).await?;
            fits_a_phone(&c, "the instance page").await?;
            shot(&c, "05c-instance-phone").await?;
            c.goto(&format!("{api}/ui/")).await?;
            fits_a_phone(&c, "the overview").await?;
            shot(&c, "05d-overview-phone").await?;
            c.goto(&format!("{api}/ui/instances")).await?;
            fits_a_phone(&c, "the instance list").await?;
            shot(&c, "05e-instances-phone").await?;
            c.set_window_size(1280, 1000).await?;
            Ok(())
        })?;

        // A Canary update, paused after its first replica, promoted from the page.
        let canary = |env: &str| {
            format!(
                "{}  updateStrategy:\n    type: Canary\n    minReadySeconds: 1\n    progressDeadline: 60s\n    steps:\n      - replicas: 1\n      - pause: {{}}\n  env:\n    WAVE: \"{env}\"\n",
                scope.instance_manifest("canary", &image, 2, &Default::default())
            )
        };
        scope.apply_http(&server, &canary("1"));
        wait_for("canary Running 2/2", WAIT, || {
            let i = scope.instance(&server, "canary");
            Ok((i["status"]["readyReplicas"] == json!(2)
                && i["status"]["phase"] == json!("Running"))
            .then_some(()))
        })?;
        scope.apply_http(&server, &canary("2"));
        rt.block_on(async {
            let page = format!("{api}/ui/tenants/{t}/projects/{p}/instances/canary");
            c.goto(&page).await?;
            // The page follows the update live, to its pause.
            let phase = "#rollout-phase";
            wait_for_text(&c, phase, "the canary Paused", |s| s.starts_with("Paused")).await?;
            shot(&c, "06-canary-paused").await?;
            click(&c, "form[action$='/rollout/promote'] button").await?;
            wait_for_text(&c, phase, "the promoted canary Succeeded", |s| {
                s == "Succeeded"
            })
            .await?;
            let page = text(&c).await?;
            ensure!(page.contains("2/2"), "not every replica Ready: {page}");
            shot(&c, "06b-canary-succeeded").await?;
            log_out(&c).await?;

            // A viewer: the same page without a single button that writes.
            log_in(&c, &api, &viewer_token).await?;
            c.goto(&format!("{api}/ui/tenants/{t}/projects/{p}/instances/bot"))
                .await?;
            let buttons = c
                .find_all(Locator::Css("main form[method=post] button"))
                .await?;
            ensure!(
                buttons.is_empty(),
                "a viewer sees {} buttons that write",
                buttons.len()
            );
            let forms = c.find_all(Locator::Css("form[method=post]")).await?;
            ensure!(
                forms.len() == 1,
                "a viewer has {} forms (only logout)",
                forms.len()
            );
            shot(&c, "06c-instance-viewer").await?;
            log_out(&c).await?;

            // The platform admin cordons the host from the hosts page.
            log_in(&c, &api, server.admin_token()).await?;
            c.goto(&format!("{api}/ui/hosts")).await?;
            let row = format!("tr[data-host='{host}']");
            click(&c, &format!("{row} button[aria-label='Cordon {host}']")).await?;
            // The host's own row says so (the page the form answered with, then live).
            let cell = format!("{row} td[data-field=scheduling]");
            wait_for_text(&c, &cell, "the host cordoned", |s| {
                s.starts_with("cordoned")
            })
            .await?;
            shot(&c, "07-hosts-cordoned").await?;
            Ok(())
        })?;
        let h = server.get_json(&format!("/api/v1/hosts/{host}"));
        ensure!(h["spec"]["unschedulable"] == json!(true), "{h}");

        // A forged post from the page's own origin, with the session cookie but no CSRF
        // token, is refused and changes nothing.
        rt.block_on(async {
            let status = c
                .execute_async(
                    &format!(
                        "const done = arguments[0]; fetch('/ui/hosts/{host}/uncordon', {{method: 'POST', \
                         headers: {{'Content-Type': 'application/x-www-form-urlencoded'}}, body: 'x=1'}})\
                         .then(r => done(r.status)).catch(e => done(String(e)));"
                    ),
                    vec![],
                )
                .await?;
            ensure!(status == json!(403), "a forged post was answered {status}");
            c.goto(&format!("{api}/ui/")).await?;
            shot(&c, "08-overview-admin").await?;
            c.goto(&format!("{api}/ui/audit")).await?;
            let page = text(&c).await?;
            ensure!(
                page.lines()
                    .any(|l| l.contains("host.cordon") && l.contains(&host)),
                "no host.cordon record of {host} on the audit page: {page}"
            );
            shot(&c, "09-audit").await?;
            Ok(())
        })?;
        let h = server.get_json(&format!("/api/v1/hosts/{host}"));
        ensure!(
            h["spec"]["unschedulable"] == json!(true),
            "the forged post uncordoned: {h}"
        );

        // The hosts page and the audit log on a phone: every action within reach.
        rt.block_on(async {
            c.set_window_size(390, 844).await?;
            c.goto(&format!("{api}/ui/hosts")).await?;
            fits_a_phone(&c, "the hosts page").await?;
            shot(&c, "10-hosts-phone").await?;
            c.goto(&format!("{api}/ui/audit")).await?;
            fits_a_phone(&c, "the audit log").await?;
            shot(&c, "11-audit-phone").await?;
            c.set_window_size(1280, 1000).await?;
            c.goto(&format!("{api}/ui/hosts")).await?;
            c.execute("window.ccuiMark = 'still here'; return null;", vec![])
                .await?;
            Ok::<_, anyhow::Error>(())
        })?;

        // A status change is on the open page (not reloaded): the host's scheduling changed
        // through the API, timed from the request to the row showing it.
        let cell = format!("tr[data-host='{host}'] td[data-field=scheduling]");
        let mut took = Vec::new();
        for i in 0..6 {
            let (verb, want) = if i % 2 == 0 {
                ("uncordon", "schedulable")
            } else {
                ("cordon", "cordoned")
            };
            let asked = Instant::now();
            let r = server.http(
                "POST",
                &format!("/api/v1/hosts/{host}/{verb}"),
                None,
                Some(server.admin_token()),
            );
            ensure!(r.status == 200, "{verb}: {} {}", r.status, r.body);
            rt.block_on(wait_for_text(&c, &cell, want, |s| s.starts_with(want)))?;
            took.push(asked.elapsed());
        }
        let mark = rt.block_on(c.execute("return window.ccuiMark || null;", vec![]))?;
        ensure!(mark == json!("still here"), "the page was reloaded: {mark}");
        took.sort();
        eprintln!(
            "a status change on the open page: median {:?}, max {:?} over {} changes (load {})",
            took[took.len() / 2],
            took[took.len() - 1],
            took.len(),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        );
        Ok(())
    })();
    let _ = rt.block_on(c.close());
    drop(driver);
    if let Err(e) = &result {
        // The error first: the logs after it are long, and a log viewer may cut them.
        eprintln!("the console test failed: {e:#}\n(the server's and the agent's logs follow)");
        eprintln!("server log:\n{}", server.log());
        eprintln!("agent log:\n{}", agent.log());
        eprintln!("the console test failed: {e:#}");
    }
    drop(agent);
    result
}

/// Presses Tab and answers what then has focus; it must show where it is.
async fn tab(c: &Client) -> anyhow::Result<Option<Focused>> {
    press(c, &[Key::Tab]).await?;
    let f = focused(c).await?;
    if let Some(f) = &f {
        ensure!(
            f.shows && f.on_screen,
            "the keyboard focus does not show on {f:?}"
        );
    }
    Ok(f)
}

/// Presses Tab until `want` has focus (at most `most` times); every step must move focus
/// on (no control holds it).
async fn tab_to(
    c: &Client,
    what: &str,
    most: usize,
    want: impl Fn(&Focused) -> bool,
) -> anyhow::Result<Focused> {
    let mut seen = Vec::new();
    for _ in 0..most {
        let f = tab(c).await?;
        if let Some(f) = &f {
            if want(f) {
                return Ok(f.clone());
            }
            ensure!(
                seen.last() != Some(f),
                "Tab did not move on from {f:?} (a keyboard trap)"
            );
            seen.push(f.clone());
        }
    }
    bail!("Tab never reached {what}; it went through {seen:#?}")
}

/// Waits for the page at `path` (loaded after a key press).
async fn wait_path(c: &Client, path: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let url = c.current_url().await?;
        if url.path() == path {
            c.wait().for_element(Locator::Css("main h1")).await?;
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("still on {url}, not {path}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn the_console_by_keyboard_alone() -> anyhow::Result<()> {
    if !browser_available()? {
        return Ok(());
    }
    let server = TestServer::start()?;
    let scope = Scope::new("cckb");
    let (t, p) = (scope.tenant.clone(), scope.project.clone());
    scope.apply_http(&server, &scope.base_manifest());
    let image = "registry.invalid/openclaw:1";
    scope.apply_http(
        &server,
        &scope.instance_manifest("kb-bot", image, 0, &Default::default()),
    );
    let api = server.api_url().to_string();
    let driver = start_driver()?;
    let rt = tokio::runtime::Runtime::new()?;
    let c = rt.block_on(browser(&driver))?;
    let bot = format!("/ui/tenants/{t}/projects/{p}/instances/kb-bot");
    let result = rt.block_on(async {
        // Log in with keys only: the token field is the first stop, Enter sends it.
        c.goto(&format!("{api}/ui/login")).await?;
        let f = tab(&c).await?;
        ensure!(
            f.as_ref().is_some_and(|f| f.id == "token"),
            "the first Tab on the login page went to {f:?}"
        );
        type_keys(&c, server.admin_token()).await?;
        press(&c, &[Key::Enter]).await?;
        wait_path(&c, "/ui/").await?;
        shot(&c, "20-keyboard-overview").await?;
        // Every control of every page says what it is: a label, or a name of its own.
        for page in ["/ui/", "/ui/tenants", "/ui/instances", "/ui/hosts", "/ui/audit", &bot] {
            c.goto(&format!("{api}{page}")).await?;
            let bare = c
                .execute(
                    "return Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea, button, a[href], [tabindex]')) \
                       .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') \
                         && !e.getAttribute('aria-labelledby') && !(e.innerText || '').trim()) \
                       .map(e => e.outerHTML.slice(0, 120));",
                    vec![],
                )
                .await?;
            ensure!(bare == json!([]), "controls without a name on {page}: {bare}");
        }

        // From the top of a page: the skip link, the navigation, logout, then the filters.
        c.goto(&format!("{api}/ui/instances")).await?;
        let mut order = Vec::new();
        for _ in 0..14 {
            let f = tab(&c).await?.context("focus left the page")?;
            order.push(f.name.clone());
            if order.len() == 1 {
                shot(&c, "21-keyboard-skip-link").await?;
            }
        }
        let want = [
            "Skip to content",
            "openClusterClaw",
            "Overview",
            "Tenants",
            "Instances",
            "Hosts",
            "Audit log",
            "Log out",
            "Tenant",
            "Project",
            "Labels",
            "Phase",
            "Filter",
        ];
        ensure!(
            order[..want.len()] == want,
            "Tab goes through {order:?}, not {want:?}"
        );
        // Shift+Tab goes back.
        shift_tab(&c).await?;
        let back = focused(&c).await?;
        ensure!(
            back.as_ref().is_some_and(|f| f.name == "Filter"),
            "Shift+Tab went to {back:?}"
        );

        // The skip link jumps past the navigation to the filters.
        c.refresh().await?;
        tab(&c).await?;
        press(&c, &[Key::Enter]).await?;
        let f = tab(&c).await?;
        ensure!(
            f.as_ref().is_some_and(|f| f.id == "f-tenant"),
            "after the skip link, Tab went to {f:?}"
        );
        // A filter filled and sent with keys only.
        type_keys(&c, &t).await?;
        press(&c, &[Key::Enter]).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c
            .current_url()
            .await?
            .query()
            .is_some_and(|q| q.contains(&format!("tenant={t}")))
        {
            ensure!(Instant::now() < deadline, "the filter was not sent");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.wait().for_element(Locator::Css("#instance-list")).await?;
        shot(&c, "22-keyboard-filtered").await?;

        // Focus stays on a link while the list around it is updated live.
        let link = tab_to(&c, "the kb-bot link", 20, |f| f.href == bot).await?;
        Ok::<_, anyhow::Error>(link)
    });
    let result = result.and_then(|link| {
        scope.apply_http(
            &server,
            &scope.instance_manifest("kb-bot-2", image, 0, &Default::default()),
        );
        rt.block_on(async {
            wait_for_text(&c, "#instance-list", "kb-bot-2 on the open list", |s| {
                s.contains("kb-bot-2")
            })
            .await?;
            let now = focused(&c).await?;
            ensure!(
                now.as_ref()
                    .is_some_and(|f| f.tag == link.tag && f.href == link.href),
                "the live update moved focus from {link:?} to {now:?}"
            );

            // The instance, then its deletion confirmed, by keyboard.
            press(&c, &[Key::Enter]).await?;
            wait_path(&c, &bot).await?;
            tab_to(&c, "the Delete button", 60, |f| f.name == "Delete…").await?;
            shot(&c, "23-keyboard-delete").await?;
            press(&c, &[Key::Enter]).await?;
            wait_path(&c, &format!("{bot}/delete")).await?;
            let question = text_of(&c, "#question").await?.unwrap_or_default();
            ensure!(
                question.contains("kb-bot") && question.contains(&t),
                "the confirmation does not name the instance: {question}"
            );
            let confirm = tab_to(&c, "the confirming button", 20, |f| {
                f.tag == "button" && f.name.starts_with("Delete")
            })
            .await?;
            shot(&c, "24-keyboard-confirm").await?;
            // Cancel is the next stop, then focus leaves the page.
            let cancel = tab(&c).await?;
            ensure!(
                cancel.as_ref().is_some_and(|f| f.name == "Cancel"),
                "after {confirm:?} came {cancel:?}"
            );
            shift_tab(&c).await?;
            press(&c, &[Key::Enter]).await?;
            wait_path(&c, "/ui/instances").await?;

            // No page holds the keyboard: Tab goes through the whole instance page and
            // comes back to its top.
            c.goto(&format!(
                "{api}/ui/tenants/{t}/projects/{p}/instances/kb-bot-2"
            ))
            .await?;
            let first = tab(&c).await?;
            let mut back = false;
            for _ in 0..80 {
                let f = tab(&c).await?;
                if f.is_some() && f == first {
                    back = true;
                    break;
                }
            }
            ensure!(back, "Tab never came back to the top of the page (a trap)");
            Ok(())
        })
    });
    let result = result.and_then(|()| {
        let gone = server.http(
            "GET",
            &scope.instance_path("kb-bot"),
            None,
            Some(server.admin_token()),
        );
        ensure!(
            gone.status == 404,
            "kb-bot was not deleted: {} {}",
            gone.status,
            gone.body
        );
        Ok(())
    });
    let _ = rt.block_on(c.close());
    drop(driver);
    if let Err(e) = &result {
        eprintln!(
            "the keyboard test failed: {e:#}\nserver log:\n{}",
            server.log()
        );
    }
    result
}
