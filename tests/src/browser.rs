//! A real browser for the console's tests: headless Chromium driven over WebDriver by a
//! `chromedriver` of its own, and screenshots written under `target/console-screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use fantoccini::{Client, ClientBuilder};
use serde_json::json;

use crate::agent::{free_port, wait_for};

/// `chromedriver` on a free port; killed on drop.
pub struct Driver {
    child: Child,
    pub url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `cmd --version` runs.
fn found(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `tests/browser-setup.sh` when chromium or chromedriver is missing. `Ok(false)`:
/// skip (still missing, and `CI` is not `true`).
pub fn browser_available() -> anyhow::Result<bool> {
    if found("chromium") && found("chromedriver") {
        return Ok(true);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser-setup.sh");
    let _ = Command::new("bash").arg(&script).status();
    if found("chromium") && found("chromedriver") {
        return Ok(true);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!(
            "CI=true but chromium or chromedriver is missing (tests/browser-setup.sh installs them)"
        );
    }
    eprintln!(
        "no chromium/chromedriver; skipping (tests/browser-setup.sh installs them; CI=true fails)"
    );
    Ok(false)
}

pub fn start_driver() -> anyhow::Result<Driver> {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start chromedriver")?;
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    wait_for("chromedriver to listen", Duration::from_secs(20), || {
        Ok(std::net::TcpStream::connect(("127.0.0.1", port)).ok())
    })?;
    Ok(driver)
}

/// A headless Chromium session at 1280 x 1000.
pub async fn browser(driver: &Driver) -> anyhow::Result<Client> {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--window-size=1280,1000"]}),
    );
    Ok(
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url)
            .await?,
    )
}

/// Where screenshots go.
pub fn shots_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("console-screenshots");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// A screenshot of the page as `NAME.png`.
pub async fn shot(c: &Client, name: &str) -> anyhow::Result<()> {
    let png = c.screenshot().await?;
    std::fs::write(shots_dir().join(format!("{name}.png")), png)?;
    Ok(())
}

/// The page's text now, read in one script: an element found first could be swapped by a
/// live update, or gone with a navigation, before its text is read.
pub async fn page_text(c: &Client) -> anyhow::Result<String> {
    Ok(text_of(c, "body").await?.unwrap_or_default())
}

/// The text of the first element `css` selects, read in one script; `None` when none does.
pub async fn text_of(c: &Client, css: &str) -> anyhow::Result<Option<String>> {
    let t = c
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
            vec![json!(css)],
        )
        .await?;
    Ok(t.as_str().map(str::to_string))
}

/// Clicks the element `css` selects. The console's live parts are replaced when what they
/// show changes: an element replaced between being found and clicked is found again.
pub async fn click(c: &Client, css: &str) -> anyhow::Result<()> {
    let mut replaced = 0;
    loop {
        let found = c.find(fantoccini::Locator::Css(css)).await?;
        match found.click().await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_stale_element_reference() && replaced < 20 => {
                replaced += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("click {css}"))),
        }
    }
}

/// Presses `keys` one after the other, as a person at a keyboard does (WebDriver key
/// actions, sent to whatever has focus).
pub async fn press(c: &Client, keys: &[fantoccini::key::Key]) -> anyhow::Result<()> {
    let chars: Vec<char> = keys.iter().map(|k| char::from(*k)).collect();
    press_chars(c, &chars).await
}

/// Types `text` into whatever has focus, key by key.
pub async fn type_keys(c: &Client, text: &str) -> anyhow::Result<()> {
    let chars: Vec<char> = text.chars().collect();
    press_chars(c, &chars).await
}

async fn press_chars(c: &Client, chars: &[char]) -> anyhow::Result<()> {
    use fantoccini::actions::{InputSource, KeyAction, KeyActions};
    let mut keys = KeyActions::new("keyboard".into());
    for &value in chars {
        keys = keys
            .then(KeyAction::Down { value })
            .then(KeyAction::Up { value });
    }
    c.perform_actions(keys).await?;
    Ok(())
}

/// Shift+Tab: focus goes back one control.
pub async fn shift_tab(c: &Client) -> anyhow::Result<()> {
    use fantoccini::actions::{InputSource, KeyAction, KeyActions};
    use fantoccini::key::Key;
    let keys = KeyActions::new("keyboard".into())
        .then(KeyAction::Down {
            value: Key::Shift.into(),
        })
        .then(KeyAction::Down {
            value: Key::Tab.into(),
        })
        .then(KeyAction::Up {
            value: Key::Tab.into(),
        })
        .then(KeyAction::Up {
            value: Key::Shift.into(),
        });
    c.perform_actions(keys).await?;
    Ok(())
}

/// What has focus now, read in one script: `None` when nothing does (the page itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Focused {
    /// Lower-case tag name.
    pub tag: String,
    pub id: String,
    /// Its accessible label, else its text, else its value (trimmed, at most 60 characters).
    pub name: String,
    pub href: String,
    /// The focus shows: an outline of 2 px or more, or a box shadow, while `:focus-visible`.
    pub shows: bool,
    /// On the screen, not pushed off it.
    pub on_screen: bool,
}

pub async fn focused(c: &Client) -> anyhow::Result<Option<Focused>> {
    let v = c
        .execute(
            "const e = document.activeElement; \
             if (!e || e === document.body || e === document.documentElement) return null; \
             const s = getComputedStyle(e); const r = e.getBoundingClientRect(); \
             const label = e.getAttribute('aria-label') || (e.labels && e.labels[0] && e.labels[0].innerText) || e.innerText || e.value || ''; \
             return {tag: e.tagName.toLowerCase(), id: e.id || '', name: label.trim().slice(0, 60), \
               href: e.getAttribute('href') || '', \
               shows: e.matches(':focus-visible') && ((s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2) || s.boxShadow !== 'none'), \
               on_screen: r.width > 0 && r.height > 0 && r.right > 0 && r.bottom > 0 && r.left < window.innerWidth};",
            vec![],
        )
        .await?;
    if v.is_null() {
        return Ok(None);
    }
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    Ok(Some(Focused {
        tag: s("tag"),
        id: s("id"),
        name: s("name"),
        href: s("href"),
        shows: v["shows"].as_bool().unwrap_or(false),
        on_screen: v["on_screen"].as_bool().unwrap_or(false),
    }))
}
