//! The Gateways' own figures: which replicas serve them, the token the agent scrapes them with, one bounded scrape of `/api/diagnostics/prometheus`, and the parse of its Prometheus text.
//!
//! A replica serves its figures when its rendered `openclaw.json` enables both
//! `diagnostics.enabled` and `plugins.entries.diagnostics-prometheus.enabled` (the control
//! plane sets both for `spec.metrics.gateway: true`). The route needs an operator-scope bearer
//! token: the Gateway's own token when the replica is given one (`gateway.auth.token` in its
//! config, else `OPENCLAW_GATEWAY_TOKEN` in its environment); otherwise the agent gives the
//! container `OPENCLAW_GATEWAY_TOKEN`, derived from a random key kept on this host
//! ([`load_host_key`]) and the replica's identity, so the token never leaves the host and is
//! the same for a container adopted after a restart of the agent.
//!
//! What is relayed is bounded per replica: at most [`MAX_SERIES`] series and [`MAX_BYTES`]
//! bytes of names and labels (the rest is left out and `truncated` set), only families whose
//! name starts with `openclaw_`, from a response of at most [`MAX_RESPONSE_BYTES`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use clusterclaw_proto::agent as pb;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::model::Assignment;

/// The Gateway's route for its Prometheus text.
pub const PATH: &str = "/api/diagnostics/prometheus";
/// The variable the Gateway reads its token from.
pub const TOKEN_VAR: &str = "OPENCLAW_GATEWAY_TOKEN";
/// The config entry of the plugin that serves the figures.
pub const PLUGIN: &str = "diagnostics-prometheus";
/// Most series relayed per replica.
pub const MAX_SERIES: usize = 500;
/// Most bytes of sample names, label names and values relayed per replica.
pub const MAX_BYTES: usize = 64 * 1024;
/// Most bytes read of one answer (head and body).
pub const MAX_RESPONSE_BYTES: u64 = 1 << 20;
/// How long one scrape may take.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);
/// Only families with this prefix are relayed.
pub const NAME_PREFIX: &str = "openclaw_";
/// The file in the data directory holding the host key tokens are derived from.
pub const KEY_FILE: &str = "gateway-metrics.key";

static HOST_KEY: OnceLock<[u8; 32]> = OnceLock::new();

/// Loads (or creates, mode 0600) the host key tokens are derived from. Without it the agent
/// uses a key of its own process (tokens then change when the agent restarts).
pub fn load_host_key(data_dir: &Path) -> std::io::Result<()> {
    let path = data_dir.join(KEY_FILE);
    let key = match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(&bytes);
            k
        }
        _ => {
            let k: [u8; 32] = rand::random();
            let tmp = data_dir.join(format!("{KEY_FILE}.tmp"));
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(&k)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path)?;
            k
        }
    };
    let _ = HOST_KEY.set(key);
    Ok(())
}

fn host_key() -> &'static [u8; 32] {
    HOST_KEY.get_or_init(rand::random)
}

/// Whether the replica's config enables the Gateway's Prometheus route.
pub fn enabled(a: &Assignment) -> bool {
    let Ok(config) = serde_json::from_str::<serde_json::Value>(&a.config_json) else {
        return false;
    };
    enabled_in(&config)
}

fn enabled_in(config: &serde_json::Value) -> bool {
    let on = |v: Option<&serde_json::Value>| v.and_then(serde_json::Value::as_bool) == Some(true);
    on(config.pointer("/diagnostics/enabled"))
        && on(config
            .get("plugins")
            .and_then(|p| p.get("entries"))
            .and_then(|e| e.get(PLUGIN))
            .and_then(|p| p.get("enabled")))
}

/// The token the replica was given (config first, then environment), if any.
fn given_token(a: &Assignment, config: &serde_json::Value) -> Option<String> {
    config
        .pointer("/gateway/auth/token")
        .and_then(serde_json::Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .or_else(|| a.env.get(TOKEN_VAR).filter(|t| !t.is_empty()).cloned())
}

/// The token derived for a replica without one of its own.
fn derived_token(a: &Assignment) -> String {
    let mut h = Sha256::new();
    h.update(host_key());
    h.update(b"gateway-metrics\0");
    h.update(a.instance_uid.as_bytes());
    h.update([0]);
    h.update(a.tenant.as_bytes());
    h.update([0]);
    h.update(a.project.as_bytes());
    h.update([0]);
    h.update(a.replica.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What the agent scrapes a replica with: `None` when its figures are not enabled.
pub fn scrape_token(a: &Assignment) -> Option<String> {
    let config = serde_json::from_str::<serde_json::Value>(&a.config_json).ok()?;
    if !enabled_in(&config) {
        return None;
    }
    Some(given_token(a, &config).unwrap_or_else(|| derived_token(a)))
}

/// The token the agent adds to the container's environment: only when the figures are
/// enabled and the replica has no token of its own.
pub fn injected_token(a: &Assignment) -> Option<String> {
    let config = serde_json::from_str::<serde_json::Value>(&a.config_json).ok()?;
    (enabled_in(&config) && given_token(a, &config).is_none()).then(|| derived_token(a))
}

/// Bounds of what is relayed.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub series: usize,
    pub bytes: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            series: MAX_SERIES,
            bytes: MAX_BYTES,
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        })
}

fn valid_label(name: &str) -> bool {
    !name.is_empty() && !name.contains(':') && valid_name(name)
}

/// Parses Prometheus text (version 0.0.4) into families, keeping only `openclaw_` ones, within
/// `caps`. Malformed lines are skipped.
pub fn parse(text: &str, caps: Caps) -> pb::GatewayMetrics {
    let mut out = pb::GatewayMetrics::default();
    let mut order: Vec<String> = Vec::new();
    let mut families: HashMap<String, pb::GatewayFamily> = HashMap::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    let mut bytes = 0usize;
    let mut kept = 0usize;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            if let Some(decl) = rest.strip_prefix("TYPE ") {
                let mut parts = decl.split_whitespace();
                if let (Some(n), Some(t)) = (parts.next(), parts.next()) {
                    let t = match t {
                        "counter" | "gauge" | "histogram" | "summary" => t,
                        _ => "untyped",
                    };
                    types.insert(n.to_string(), t.to_string());
                }
            } else if let Some(decl) = rest.strip_prefix("HELP ")
                && let Some((n, h)) = decl.split_once(' ')
            {
                helps.insert(n.to_string(), h.chars().take(200).collect());
            }
            continue;
        }
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        if !name.starts_with(NAME_PREFIX) {
            continue;
        }
        out.series_total += 1;
        let size = name.len()
            + labels
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
            + 8;
        if kept >= caps.series || bytes + size > caps.bytes {
            out.truncated = true;
            continue;
        }
        kept += 1;
        bytes += size;
        let family = family_of(&name, &types);
        let entry = families.entry(family.clone()).or_insert_with(|| {
            order.push(family.clone());
            pb::GatewayFamily {
                name: family.clone(),
                r#type: types
                    .get(&family)
                    .cloned()
                    .unwrap_or_else(|| "untyped".into()),
                help: helps.get(&family).cloned().unwrap_or_default(),
                samples: Vec::new(),
            }
        });
        entry.samples.push(pb::GatewaySample {
            name,
            labels: labels.into_iter().collect(),
            value,
        });
    }
    out.families = order
        .into_iter()
        .filter_map(|n| families.remove(&n))
        .collect();
    out
}

/// The family a sample belongs to: its own name, or the declared histogram or summary whose
/// name it extends with `_bucket`, `_sum` or `_count`.
fn family_of(name: &str, types: &HashMap<String, String>) -> String {
    if types.contains_key(name) {
        return name.to_string();
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            )
        {
            return base.to_string();
        }
    }
    name.to_string()
}

/// One sample line: name, labels, value (a timestamp after the value is ignored).
/// A sample's name, labels and value.
type Sample = (String, Vec<(String, String)>, f64);

fn sample(line: &str) -> Option<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if !valid_name(name) {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let end;
        loop {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let &(start, c) = chars.peek()?;
            if c == '}' {
                end = start + 1;
                break;
            }
            let mut key_end = start;
            while let Some(&(i, c)) = chars.peek() {
                if c == '=' {
                    key_end = i;
                    break;
                }
                chars.next();
            }
            let key = body[start..key_end].trim().to_string();
            chars.next(); // '='
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            }
            if !valid_label(&key) {
                return None;
            }
            labels.push((key, value));
        }
        rest = &body[end..];
    }
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some((name.to_string(), labels, value))
}

/// One scrape of the Gateway published on `addr`: its figures, or the error text.
pub async fn scrape(addr: SocketAddr, token: &str, caps: Caps) -> pb::GatewayMetrics {
    let mut out = match tokio::time::timeout(SCRAPE_TIMEOUT, get(addr, token)).await {
        Err(_) => pb::GatewayMetrics {
            error: format!("{PATH} timed out after {} ms", SCRAPE_TIMEOUT.as_millis()),
            ..Default::default()
        },
        Ok(Err(e)) => pb::GatewayMetrics {
            error: format!("{PATH}: {e}"),
            ..Default::default()
        },
        Ok(Ok((200, body))) => parse(&String::from_utf8_lossy(&body), caps),
        Ok(Ok((status, _))) => pb::GatewayMetrics {
            error: format!("{PATH} answered HTTP {status}"),
            ..Default::default()
        },
    };
    out.scraped_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    out
}

async fn get(addr: SocketAddr, token: &str) -> Result<(u16, Vec<u8>), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "GET {PATH} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: clusterclaw-agent\r\n\
         Authorization: Bearer {token}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read: {e}"))?;
    crate::probe::parse_response(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP openclaw_run_completed_total Runs completed.
# TYPE openclaw_run_completed_total counter
openclaw_run_completed_total{outcome="ok",model="m\"1"} 12
openclaw_run_completed_total{outcome="error"} 3 1700000000000
# TYPE openclaw_run_duration_seconds histogram
openclaw_run_duration_seconds_bucket{outcome="ok",le="1"} 4
openclaw_run_duration_seconds_bucket{outcome="ok",le="+Inf"} 12
openclaw_run_duration_seconds_sum{outcome="ok"} 20.5
openclaw_run_duration_seconds_count{outcome="ok"} 12
process_cpu_seconds_total 5
clusterclaw_hosts{phase="Ready"} 99
openclaw_model_cost_usd_total 0.25
bad line {
"#;

    #[test]
    fn parses_families_and_keeps_only_openclaw_series() {
        let m = parse(TEXT, Caps::default());
        assert!(!m.truncated);
        assert_eq!(m.series_total, 7);
        let names: Vec<&str> = m.families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "openclaw_run_completed_total",
                "openclaw_run_duration_seconds",
                "openclaw_model_cost_usd_total"
            ]
        );
        let runs = &m.families[0];
        assert_eq!(runs.r#type, "counter");
        assert_eq!(runs.help, "Runs completed.");
        assert_eq!(runs.samples[0].labels["model"], "m\"1");
        assert_eq!(runs.samples[1].value, 3.0);
        let hist = &m.families[1];
        assert_eq!(hist.r#type, "histogram");
        assert_eq!(hist.samples.len(), 4);
        assert_eq!(hist.samples[1].value, 12.0);
        assert_eq!(m.families[2].r#type, "untyped");
    }

    #[test]
    fn caps_cut_and_say_so() {
        let m = parse(
            TEXT,
            Caps {
                series: 2,
                bytes: MAX_BYTES,
            },
        );
        assert!(m.truncated);
        assert_eq!(m.series_total, 7);
        let kept: usize = m.families.iter().map(|f| f.samples.len()).sum();
        assert_eq!(kept, 2);
        let m = parse(
            TEXT,
            Caps {
                series: 100,
                bytes: 60,
            },
        );
        assert!(m.truncated);
        let kept: usize = m.families.iter().map(|f| f.samples.len()).sum();
        assert!(kept < 7);
    }

    #[test]
    fn tokens_come_from_the_replica_or_the_host_key() {
        let mut a = Assignment::test("bot-0");
        assert_eq!(scrape_token(&a), None);
        assert_eq!(injected_token(&a), None);
        a.config_json = r#"{"diagnostics":{"enabled":true},"plugins":{"entries":{"diagnostics-prometheus":{"enabled":true}}}}"#.into();
        let derived = injected_token(&a).expect("a derived token");
        assert_eq!(derived.len(), 64);
        assert_eq!(scrape_token(&a).as_deref(), Some(derived.as_str()));
        let mut other = a.clone();
        other.replica = "bot-1".into();
        assert_ne!(injected_token(&other), Some(derived.clone()));
        a.env.insert(TOKEN_VAR.into(), "own-token".into());
        assert_eq!(injected_token(&a), None);
        assert_eq!(scrape_token(&a).as_deref(), Some("own-token"));
        a.config_json = r#"{"gateway":{"auth":{"token":"cfg"}},"diagnostics":{"enabled":true},"plugins":{"entries":{"diagnostics-prometheus":{"enabled":true}}}}"#.into();
        assert_eq!(scrape_token(&a).as_deref(), Some("cfg"));
    }
}
