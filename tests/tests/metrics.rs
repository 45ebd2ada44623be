//! End to end: what `/metrics` serves. The alert rules pass `promtool check rules` and
//! `promtool test rules`; every metric name the Grafana dashboard and the rules use is one a
//! real server exports; an instance with `spec.metrics.gateway: true` on a real agent and the
//! Docker stand-in has its Gateways' own figures served with tenant, project, instance and
//! replica labels, bounded, and only to callers who may read `/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring")
}

/// Every `clusterclaw_*` and `openclaw_*` name in the dashboard's queries and the rules.
fn used_names() -> anyhow::Result<BTreeSet<String>> {
    let dir = monitoring_dir();
    let dashboard = std::fs::read_to_string(dir.join("grafana/clusterclaw-dashboard.json"))?;
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).context("the dashboard is not JSON")?;
    ensure!(parsed["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let rules = std::fs::read_to_string(dir.join("prometheus/clusterclaw-alerts.yml"))?;
    let mut names = BTreeSet::new();
    for text in [&dashboard, &rules] {
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
            if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
                let start = i;
                while i < bytes.len() && word(bytes[i]) {
                    i += 1;
                }
                let w = &text[start..i];
                if w.starts_with("clusterclaw_") || w.starts_with("openclaw_") {
                    names.insert(w.to_string());
                }
            } else {
                i += 1;
            }
        }
    }
    ensure!(names.len() > 20, "too few names found: {names:?}");
    Ok(names)
}

/// The families a scrape declares (`# TYPE`) and the names of its samples.
fn exported(text: &str) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let mut families = BTreeMap::new();
    let mut samples = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            if let (Some(n), Some(k)) = (parts.next(), parts.next()) {
                families.insert(n.to_string(), k.to_string());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_string());
        }
    }
    (families, samples)
}

/// Whether `name` (as a query uses it) is one the scrape exports: a declared family, a sample
/// name, or a histogram's `_bucket`, `_sum` or `_count`.
fn is_exported(
    name: &str,
    families: &BTreeMap<String, String>,
    samples: &BTreeSet<String>,
) -> bool {
    families.contains_key(name)
        || samples.contains(name)
        || ["_bucket", "_sum", "_count"].iter().any(|s| {
            name.strip_suffix(s).is_some_and(|base| {
                matches!(
                    families.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                )
            })
        })
}

fn scrape(server: &TestServer) -> String {
    let r = server.http("GET", "/metrics", None, Some(server.admin_token()));
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

#[test]
fn alert_rules_pass_promtool() -> anyhow::Result<()> {
    let out = Command::new("sh")
        .arg(monitoring_dir().join("check.sh"))
        .output()
        .context("run monitoring/check.sh")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => {
            ensure!(text.contains("SUCCESS"), "{text}");
            Ok(())
        }
        Some(3) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipped: {text}");
            Ok(())
        }
        _ => anyhow::bail!("monitoring/check.sh failed ({}):\n{text}", out.status),
    }
}

#[test]
fn the_dashboard_and_rules_use_only_names_the_server_exports() -> anyhow::Result<()> {
    let server = TestServer::start()?;
    let scope = Scope::new("names");
    scope.apply_http(&server, &scope.base_manifest());
    scope.apply_http(
        &server,
        &scope.instance_manifest("bot", "example/openclaw:1", 2, &BTreeMap::new()),
    );
    let _ = server.http("GET", "/api/v1/tenants", None, Some(server.admin_token()));
    // A bad switch is refused naming the field, and changes nothing.
    let bad = scope.instance_manifest("bad", "example/openclaw:1", 1, &BTreeMap::new())
        + "  metrics:\n    gateway: \"yes\"\n";
    let r = server.http(
        "POST",
        "/api/v1/apply",
        Some(&bad),
        Some(server.admin_token()),
    );
    ensure!(
        (400..500).contains(&r.status) && r.body.contains("spec.metrics"),
        "{} {}",
        r.status,
        r.body
    );
    let r = server.http(
        "GET",
        &scope.instance_path("bad"),
        None,
        Some(server.admin_token()),
    );
    ensure!(r.status == 404, "{}", r.status);
    let text = scrape(&server);
    let (families, samples) = exported(&text);
    let missing: Vec<String> = used_names()?
        .into_iter()
        .filter(|n| n.starts_with("clusterclaw_"))
        .filter(|n| !is_exported(n, &families, &samples))
        .collect();
    ensure!(
        missing.is_empty(),
        "the dashboard or rules use names the server does not export: {missing:?}\n{text}"
    );
    // The check itself catches a wrong name.
    ensure!(!is_exported(
        "clusterclaw_instance_replica_ready",
        &families,
        &samples
    ));

    // API requests are counted by route template, never by raw path (the 404s: `bad` above
    // and `nope` here).
    let instance_route = "/api/v1/tenants/{tenant}/projects/{project}/instances/{name}";
    let _ = server.http(
        "GET",
        &scope.instance_path("bot"),
        None,
        Some(server.admin_token()),
    );
    let _ = server.http(
        "GET",
        &scope.instance_path("nope"),
        None,
        Some(server.admin_token()),
    );
    let text = scrape(&server);
    for want in [
        format!(
            "clusterclaw_http_requests_total{{route=\"{instance_route}\",method=\"GET\",code=\"200\"}} 1"
        ),
        format!(
            "clusterclaw_http_requests_total{{route=\"{instance_route}\",method=\"GET\",code=\"404\"}} 2"
        ),
        format!(
            "clusterclaw_instance_replicas_desired{{tenant=\"{}\",project=\"e2e\",instance=\"bot\"}} 2",
            scope.tenant
        ),
    ] {
        ensure!(text.contains(&want), "{want} missing:\n{text}");
    }
    ensure!(
        !text.contains("/instances/bot\""),
        "a raw path is a label:\n{text}"
    );
    Ok(())
}

const EXPLICIT_TOKEN: &str = "gw-metrics-e2e-7c41d9";

fn gateway_manifest(
    scope: &Scope,
    name: &str,
    image: &str,
    replicas: u32,
    env: &[(&str, &str)],
) -> String {
    let env: BTreeMap<&str, &str> = env.iter().copied().collect();
    format!(
        "{}  metrics:\n    gateway: true\n",
        scope.instance_manifest(name, image, replicas, &env)
    )
}

#[test]
fn gateway_figures_are_relayed_with_tenant_labels_bounded_and_in_scope() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("gwmetrics");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("gwm-host");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;

    scope.apply(&server, "base", &scope.base_manifest());
    // `bot`: the agent gives the Gateway a token of its own; `big`: the replica has one, and
    // serves more series than the relay passes; `plain`: no switch, nothing relayed.
    scope.apply(
        &server,
        "bot",
        &gateway_manifest(&scope, "bot", &image, 2, &[]),
    );
    scope.apply(
        &server,
        "big",
        &gateway_manifest(
            &scope,
            "big",
            &image,
            1,
            &[
                ("OPENCLAW_GATEWAY_TOKEN", EXPLICIT_TOKEN),
                ("STANDIN_METRICS_SERIES", "700"),
            ],
        ),
    );
    scope.apply(
        &server,
        "plain",
        &scope.instance_manifest("plain", &image, 1, &BTreeMap::new()),
    );
    wait_ready(&server, &scope, "bot", 2)?;
    wait_ready(&server, &scope, "big", 1)?;
    wait_ready(&server, &scope, "plain", 1)?;

    let t = &scope.tenant;
    let labels = |instance: &str, replica: &str| {
        format!(
            "tenant=\"{t}\",project=\"e2e\",instance=\"{instance}\",replica=\"{replica}\",host=\"{host}\""
        )
    };
    let mut last = String::new();
    let relayed = wait_for("relayed Gateway figures", WAIT, || {
        let text = scrape(&server);
        let all = [("bot", "bot-0"), ("bot", "bot-1"), ("big", "big-0")]
            .iter()
            .all(|(i, r)| {
                text.contains(&format!("openclaw_run_completed_total{{{}", labels(i, r)))
            });
        last = text.clone();
        Ok(all.then_some(text))
    });
    let text = match relayed {
        Ok(text) => text,
        Err(e) => {
            let gateway: Vec<&str> = last
                .lines()
                .filter(|l| l.contains("gateway") || l.starts_with("openclaw_"))
                .collect();
            let info = scope
                .containers("bot")?
                .values()
                .filter_map(|c| gateway_get(c.port?, "/standin/info").ok())
                .map(|v| v["config"].to_string())
                .collect::<Vec<_>>();
            anyhow::bail!(
                "{e}: {gateway:#?}\nconfigs: {info:?}\nagent log: {}",
                agent.log()
            );
        }
    };
    for want in [
        "# TYPE openclaw_run_completed_total counter".to_string(),
        "# TYPE openclaw_run_duration_seconds histogram".to_string(),
        format!(
            "openclaw_run_completed_total{{{},channel=\"webchat\",model=\"standin-1\",outcome=\"ok\"",
            labels("bot", "bot-0")
        ),
        format!(
            "openclaw_run_duration_seconds_bucket{{{},le=\"+Inf\"",
            labels("bot", "bot-1")
        ),
        format!("openclaw_model_cost_usd_total{{{}", labels("bot", "bot-0")),
        format!("openclaw_model_tokens_total{{{}", labels("bot", "bot-0")),
        format!("openclaw_tool_execution_total{{{}", labels("bot", "bot-0")),
        format!(
            "clusterclaw_gateway_scrape_ok{{{}}} 1",
            labels("bot", "bot-0")
        ),
        format!(
            "clusterclaw_gateway_series_truncated{{{}}} 0",
            labels("bot", "bot-0")
        ),
        format!(
            "clusterclaw_gateway_scrape_ok{{{}}} 1",
            labels("big", "big-0")
        ),
        format!(
            "clusterclaw_gateway_series_truncated{{{}}} 1",
            labels("big", "big-0")
        ),
        format!(
            "clusterclaw_gateway_series_relayed{{{}}} 500",
            labels("big", "big-0")
        ),
    ] {
        ensure!(text.contains(&want), "{want} missing:\n{text}");
    }
    ensure!(
        !text
            .lines()
            .any(|l| l.starts_with("openclaw_") && l.contains("instance=\"plain\"")),
        "an instance without the switch relays nothing:\n{text}"
    );

    // Every Gateway name the dashboard uses is served now.
    let (families, samples) = exported(&text);
    let missing: Vec<String> = used_names()?
        .into_iter()
        .filter(|n| !is_exported(n, &families, &samples))
        .collect();
    ensure!(missing.is_empty(), "names not exported: {missing:?}");

    // The Gateway refuses a caller without its token (the agent's is the one that works).
    let containers = scope.containers("bot")?;
    let c = containers.values().next().context("a container of bot")?;
    let port = c.port.context("a published port")?;
    let (status, _) = plain_get(port, "/api/diagnostics/prometheus", None)?;
    ensure!(status == 401, "no token: {status}");
    let (status, _) = plain_get(port, "/api/diagnostics/prometheus", Some(EXPLICIT_TOKEN))?;
    ensure!(status == 401, "another replica's token: {status}");

    // `/metrics` is for cluster-wide readers only: another tenant's admin gets nothing.
    let other = Scope::new("gwm-other");
    other.apply(&server, "base", &other.base_manifest());
    let foreign = server
        .cli(&[
            "token",
            "create",
            "api",
            "--role",
            "tenant-admin",
            "-t",
            &other.tenant,
        ])
        .ok()
        .stdout
        .trim()
        .to_string();
    let r = server.http("GET", "/metrics", None, Some(&foreign));
    ensure!(r.status == 403, "{} {}", r.status, r.body);
    ensure!(!r.body.contains("openclaw_"), "{}", r.body);
    let mine = server
        .cli(&["token", "create", "api", "--role", "tenant-admin", "-t", t])
        .ok()
        .stdout
        .trim()
        .to_string();
    let r = server.http("GET", "/metrics", None, Some(&mine));
    ensure!(r.status == 403, "{} {}", r.status, r.body);
    drop(agent);
    Ok(())
}

/// A plain HTTP GET on 127.0.0.1:`port`: status and body.
fn plain_get(port: u16, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("a status line")?;
    Ok((status, raw))
}
