//! The web console over plain HTTP, as a browser's requests make it: log in through the
//! login form (its CSRF cookie and field), then send the session cookie.

use anyhow::{Context, bail};

/// An HTTP client that does not follow redirects (a page without a session answers one).
pub fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// The value of a cookie set by `resp`.
pub fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap_or_default().to_string())
}

/// The CSRF token of the first form of a page.
pub fn csrf_of(html: &str) -> Option<String> {
    let at = html.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    let rest = &html[at..];
    Some(rest[..rest.find('"')?].to_string())
}

/// Logs in to the console at `api` with `token` as the login form does; answers the
/// `Cookie` header value of the session.
pub async fn log_in(http: &reqwest::Client, api: &str, token: &str) -> anyhow::Result<String> {
    let form = http.get(format!("{api}/ui/login")).send().await?;
    let login_cookie = set_cookie(&form, "ccui_login").context("no login cookie")?;
    let csrf = csrf_of(&form.text().await?).context("no csrf on the login form")?;
    let resp = http
        .post(format!("{api}/ui/login"))
        .header("Cookie", format!("ccui_login={login_cookie}"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}&next=%2Fui%2F&token={token}"))
        .send()
        .await?;
    if resp.status() != reqwest::StatusCode::SEE_OTHER {
        bail!(
            "the login was answered {}: {}",
            resp.status(),
            resp.text().await?
        );
    }
    let session = set_cookie(&resp, "ccui_session").context("no session cookie")?;
    Ok(format!("ccui_session={session}"))
}
