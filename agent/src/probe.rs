//! HTTP health probes of the Gateways: liveness (`/healthz`, `"ok": true`) and readiness (`/readyz`, `"ready": true`).
//!
//! The Gateway answers unknown paths with its Control UI's HTML and status 200, so a probe
//! succeeds only on a 2xx answer whose JSON body has the expected field set to `true`.
//!
//! [`Prober`] keeps per-replica counters. Liveness fails after `failure_threshold` consecutive
//! failures (not counting failures during `initial_delay` after a container run started); the
//! reconcile plan then restarts the container with back-off. Counters start over whenever the
//! container id or its start time changes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::model::ReplicaKey;

/// The most of an answer a probe reads.
const MAX_RESPONSE_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Liveness,
    Readiness,
}

impl ProbeKind {
    pub fn path(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "/healthz",
            ProbeKind::Readiness => "/readyz",
        }
    }

    /// The JSON field that must be `true`.
    pub fn field(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "ok",
            ProbeKind::Readiness => "ready",
        }
    }
}

/// How often and how patiently replicas are probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive liveness failures after which the replica counts as dead.
    pub failure_threshold: u32,
    /// Liveness failures this soon after a container run started are not counted.
    pub initial_delay: Duration,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        ProbeSettings {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(3),
            failure_threshold: 3,
            initial_delay: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Success,
    Failure(String),
}

/// Judges an answer: success only for a 2xx status with `{"<field>": true}` in a JSON body.
pub fn judge(kind: ProbeKind, status: u16, body: &[u8]) -> ProbeOutcome {
    let path = kind.path();
    let field = kind.field();
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return ProbeOutcome::Failure(format!(
            "{path} answered HTTP {status} without a JSON body (not a Gateway health endpoint?)"
        ));
    };
    match json.get(field) {
        Some(serde_json::Value::Bool(true)) if (200..300).contains(&status) => {
            ProbeOutcome::Success
        }
        Some(value) => ProbeOutcome::Failure(format!(
            "{path} answered HTTP {status} with \"{field}\": {value}"
        )),
        None => ProbeOutcome::Failure(format!(
            "{path} answered HTTP {status} without a \"{field}\" field"
        )),
    }
}

/// Probes `addr` once.
pub async fn check(kind: ProbeKind, addr: SocketAddr, timeout: Duration) -> ProbeOutcome {
    match tokio::time::timeout(timeout, http_get(addr, kind.path())).await {
        Err(_) => ProbeOutcome::Failure(format!(
            "{} timed out after {} ms",
            kind.path(),
            timeout.as_millis()
        )),
        Ok(Err(err)) => ProbeOutcome::Failure(format!("{} on {addr}: {err}", kind.path())),
        Ok(Ok((status, body))) => judge(kind, status, &body),
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: clusterclaw-agent\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n"
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
    // The answer is read: the connection ends with a reset instead of a close, so that neither
    // side keeps it in TIME_WAIT. Probes open a connection per check (two per replica and
    // interval), and where a firewall tracks connections each closed one would hold an entry
    // for minutes; enough of them fill the table, and then packets of every connection are
    // dropped.
    if let Err(e) = stream.set_zero_linger() {
        tracing::debug!(%addr, error = %e, "cannot set SO_LINGER on a probe connection");
    }
    parse_response(&raw)
}

/// Splits an HTTP/1.x response into status and body (content length and chunked encoding honoured).
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("incomplete HTTP response")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "non-UTF-8 HTTP head")?;
    let body = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(format!("not an HTTP/1 response: {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    let body = if chunked {
        decode_chunked(body)?
    } else if let Some(length) = length {
        body.get(..length)
            .ok_or("body shorter than its Content-Length")?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("truncated chunk")?;
    }
}

/// Consecutive results of one kind of probe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeCounter {
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    /// Whether this container run ever passed this probe.
    pub ever_succeeded: bool,
    pub last: Option<ProbeOutcome>,
}

impl ProbeCounter {
    /// Records an outcome; a failure with `count_failure == false` is remembered but not counted.
    pub fn record(&mut self, outcome: ProbeOutcome, count_failure: bool) {
        match &outcome {
            ProbeOutcome::Success => {
                self.consecutive_failures = 0;
                self.consecutive_successes += 1;
                self.ever_succeeded = true;
            }
            ProbeOutcome::Failure(_) => {
                self.consecutive_successes = 0;
                if count_failure {
                    self.consecutive_failures += 1;
                }
            }
        }
        self.last = Some(outcome);
    }

    fn last_failure(&self) -> Option<&str> {
        match &self.last {
            Some(ProbeOutcome::Failure(message)) => Some(message),
            _ => None,
        }
    }
}

/// The verdict on a replica's liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Not probed yet in this container run.
    Unknown,
    /// The last probe passed.
    Alive,
    /// Failing, but fewer times in a row than the threshold.
    Failing { failures: u32, message: String },
    /// Failed `failure_threshold` times in a row: the container should be restarted.
    Failed { message: String },
}

/// A replica's container, as the prober needs to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub key: ReplicaKey,
    pub container_id: String,
    /// The container run's start time; a new value starts the counters over.
    pub started_at: Option<String>,
    pub addr: SocketAddr,
}

/// What the prober knows about one replica's current container run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeStatus {
    pub container_id: String,
    pub started_at: Option<String>,
    pub liveness: Liveness,
    /// Whether liveness ever passed in this container run.
    pub ever_alive: bool,
    pub ready: bool,
    /// Why the last readiness probe failed, if it did.
    pub readiness_message: Option<String>,
}

#[derive(Debug, Clone)]
struct Tracked {
    target: ProbeTarget,
    since: Instant,
    last_probe: Option<Instant>,
    liveness: ProbeCounter,
    readiness: ProbeCounter,
}

/// Probes the replicas' Gateways and keeps the verdicts.
#[derive(Debug, Clone)]
pub struct Prober {
    settings: ProbeSettings,
    tracked: BTreeMap<ReplicaKey, Tracked>,
}

impl Prober {
    pub fn new(settings: ProbeSettings) -> Self {
        Prober {
            settings,
            tracked: BTreeMap::new(),
        }
    }

    pub fn settings(&self) -> &ProbeSettings {
        &self.settings
    }

    /// Tracks exactly `targets`: new replicas and new container runs start with fresh counters;
    /// replicas not in `targets` are forgotten.
    pub fn set_targets(&mut self, targets: &[ProbeTarget], now: Instant) {
        let mut next = BTreeMap::new();
        for target in targets {
            let kept = self.tracked.remove(&target.key).filter(|t| {
                t.target.container_id == target.container_id
                    && t.target.started_at == target.started_at
            });
            let tracked = match kept {
                Some(mut t) => {
                    t.target.addr = target.addr;
                    t
                }
                None => Tracked {
                    target: target.clone(),
                    since: now,
                    last_probe: None,
                    liveness: ProbeCounter::default(),
                    readiness: ProbeCounter::default(),
                },
            };
            next.insert(target.key.clone(), tracked);
        }
        self.tracked = next;
    }

    /// Targets whose next probe is due at `now`.
    pub fn due(&self, now: Instant) -> Vec<ProbeTarget> {
        self.tracked
            .values()
            .filter(|t| {
                t.last_probe
                    .is_none_or(|at| now >= at + self.settings.interval)
            })
            .map(|t| t.target.clone())
            .collect()
    }

    /// When the next probe falls due (`None` when nothing is tracked).
    pub fn next_due(&self) -> Option<Instant> {
        self.tracked
            .values()
            .map(|t| {
                t.last_probe
                    .map_or(t.since, |at| at + self.settings.interval)
            })
            .min()
    }

    /// Records one probe result for the replica's current container run.
    pub fn record(
        &mut self,
        key: &ReplicaKey,
        kind: ProbeKind,
        outcome: ProbeOutcome,
        now: Instant,
    ) {
        let initial_delay = self.settings.initial_delay;
        let Some(t) = self.tracked.get_mut(key) else {
            return;
        };
        t.last_probe = Some(now);
        match kind {
            ProbeKind::Liveness => {
                let count = now >= t.since + initial_delay;
                t.liveness.record(outcome, count);
            }
            ProbeKind::Readiness => t.readiness.record(outcome, true),
        }
    }

    /// Probes every due target (concurrently, both kinds) and records the results.
    pub async fn probe_due(&mut self, now: Instant) -> usize {
        let due = self.due(now);
        let timeout = self.settings.timeout;
        let results = futures::future::join_all(due.iter().map(|t| async move {
            let (live, ready) = tokio::join!(
                check(ProbeKind::Liveness, t.addr, timeout),
                check(ProbeKind::Readiness, t.addr, timeout)
            );
            (t.key.clone(), live, ready)
        }))
        .await;
        for (key, live, ready) in results {
            self.record(&key, ProbeKind::Liveness, live, now);
            self.record(&key, ProbeKind::Readiness, ready, now);
        }
        due.len()
    }

    pub fn status(&self, key: &ReplicaKey) -> Option<ProbeStatus> {
        let t = self.tracked.get(key)?;
        let threshold = self.settings.failure_threshold.max(1);
        let liveness = match (&t.liveness.last, t.liveness.consecutive_failures) {
            (None, _) => Liveness::Unknown,
            (Some(ProbeOutcome::Success), _) => Liveness::Alive,
            (Some(ProbeOutcome::Failure(message)), n) if n >= threshold => Liveness::Failed {
                message: message.clone(),
            },
            (Some(ProbeOutcome::Failure(message)), n) => Liveness::Failing {
                failures: n,
                message: message.clone(),
            },
        };
        Some(ProbeStatus {
            container_id: t.target.container_id.clone(),
            started_at: t.target.started_at.clone(),
            liveness,
            ever_alive: t.liveness.ever_succeeded,
            ready: matches!(t.readiness.last, Some(ProbeOutcome::Success)),
            readiness_message: t.readiness.last_failure().map(str::to_owned),
        })
    }

    /// Every tracked replica's status, as the reconcile plan takes it.
    pub fn statuses(&self) -> BTreeMap<ReplicaKey, ProbeStatus> {
        self.tracked
            .keys()
            .filter_map(|k| Some((k.clone(), self.status(k)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn key() -> ReplicaKey {
        ReplicaKey::new("t", "p", "bot-0")
    }

    fn target(id: &str, started: &str) -> ProbeTarget {
        ProbeTarget {
            key: key(),
            container_id: id.into(),
            started_at: Some(started.into()),
            addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1)),
        }
    }

    fn fail() -> ProbeOutcome {
        ProbeOutcome::Failure("nope".into())
    }

    #[test]
    fn judges_the_json_body_not_only_the_status() {
        use ProbeKind::*;
        assert_eq!(
            judge(Liveness, 200, br#"{"ok":true}"#),
            ProbeOutcome::Success
        );
        assert_eq!(
            judge(Readiness, 200, br#"{"ready":true,"x":1}"#),
            ProbeOutcome::Success
        );
        let html = b"<!doctype html><html>Control UI</html>";
        assert!(
            matches!(judge(Liveness, 200, html), ProbeOutcome::Failure(m) if m.contains("JSON"))
        );
        assert!(matches!(
            judge(Liveness, 200, br#"{"ok":false}"#),
            ProbeOutcome::Failure(_)
        ));
        assert!(matches!(
            judge(Liveness, 200, br#"{"ok":"true"}"#),
            ProbeOutcome::Failure(_)
        ));
        assert!(matches!(
            judge(Readiness, 503, br#"{"ready":false}"#),
            ProbeOutcome::Failure(_)
        ));
        assert!(matches!(
            judge(Readiness, 503, br#"{"ready":true}"#),
            ProbeOutcome::Failure(_)
        ));
        assert!(
            matches!(judge(Readiness, 200, br#"{"ok":true}"#), ProbeOutcome::Failure(m) if m.contains("\"ready\""))
        );
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}trailing";
        assert_eq!(
            parse_response(plain).unwrap(),
            (200, b"{\"ok\":true}".to_vec())
        );
        let chunked = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"rea\r\na;ext=1\r\ndy\":false}\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).unwrap(),
            (503, b"{\"ready\":false}".to_vec())
        );
        let until_close = b"HTTP/1.0 200 OK\r\n\r\n{\"ok\":true}";
        assert_eq!(
            parse_response(until_close).unwrap().1,
            b"{\"ok\":true}".to_vec()
        );
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_fails_after_the_threshold_and_only_after_the_initial_delay() {
        let settings = ProbeSettings {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
            initial_delay: Duration::from_secs(15),
        };
        let mut prober = Prober::new(settings);
        let start = Instant::now();
        prober.set_targets(&[target("c1", "s1")], start);
        assert_eq!(prober.status(&key()).unwrap().liveness, Liveness::Unknown);
        assert_eq!(prober.due(start).len(), 1);

        // Inside the initial delay: remembered, not counted.
        prober.record(&key(), ProbeKind::Liveness, fail(), start);
        assert!(matches!(
            prober.status(&key()).unwrap().liveness,
            Liveness::Failing { failures: 0, .. }
        ));
        assert!(prober.due(start + Duration::from_secs(5)).is_empty());
        assert_eq!(prober.next_due(), Some(start + Duration::from_secs(10)));

        for secs in [20, 30] {
            prober.record(
                &key(),
                ProbeKind::Liveness,
                fail(),
                start + Duration::from_secs(secs),
            );
        }
        assert!(matches!(
            prober.status(&key()).unwrap().liveness,
            Liveness::Failing { failures: 2, .. }
        ));
        prober.record(
            &key(),
            ProbeKind::Liveness,
            fail(),
            start + Duration::from_secs(40),
        );
        assert!(matches!(
            prober.status(&key()).unwrap().liveness,
            Liveness::Failed { .. }
        ));

        // One success clears it.
        prober.record(
            &key(),
            ProbeKind::Liveness,
            ProbeOutcome::Success,
            start + Duration::from_secs(50),
        );
        let status = prober.status(&key()).unwrap();
        assert_eq!(status.liveness, Liveness::Alive);
        assert!(status.ever_alive);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_container_run_starts_fresh_and_gone_replicas_are_forgotten() {
        let mut prober = Prober::new(ProbeSettings {
            initial_delay: Duration::ZERO,
            failure_threshold: 1,
            ..ProbeSettings::default()
        });
        let now = Instant::now();
        prober.set_targets(&[target("c1", "s1")], now);
        prober.record(&key(), ProbeKind::Liveness, fail(), now);
        prober.record(&key(), ProbeKind::Readiness, ProbeOutcome::Success, now);
        assert!(matches!(
            prober.status(&key()).unwrap().liveness,
            Liveness::Failed { .. }
        ));
        assert!(prober.status(&key()).unwrap().ready);

        // Same container and run: kept.
        prober.set_targets(&[target("c1", "s1")], now);
        assert!(matches!(
            prober.status(&key()).unwrap().liveness,
            Liveness::Failed { .. }
        ));
        // Restarted (new start time): fresh.
        prober.set_targets(&[target("c1", "s2")], now);
        let status = prober.status(&key()).unwrap();
        assert_eq!(status.liveness, Liveness::Unknown);
        assert!(!status.ready);
        assert_eq!(status.started_at.as_deref(), Some("s2"));

        prober.set_targets(&[], now);
        assert!(prober.status(&key()).is_none());
        assert!(prober.statuses().is_empty());
    }

    #[test]
    fn readiness_follows_the_last_result() {
        let mut counter = ProbeCounter::default();
        counter.record(ProbeOutcome::Success, true);
        counter.record(fail(), true);
        assert_eq!(counter.consecutive_failures, 1);
        assert!(counter.ever_succeeded);
        assert_eq!(counter.last_failure(), Some("nope"));
    }

    async fn serve_once(response: &'static [u8]) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            socket.write_all(response).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn checks_over_real_sockets() {
        let ok = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"ok\":true}").await;
        assert_eq!(
            check(ProbeKind::Liveness, ok, Duration::from_secs(2)).await,
            ProbeOutcome::Success
        );

        let html = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n<html>").await;
        assert!(matches!(
            check(ProbeKind::Readiness, html, Duration::from_secs(2)).await,
            ProbeOutcome::Failure(_)
        ));

        // Nothing listens: a connection error is a failure.
        let closed = {
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap()
        };
        assert!(
            matches!(check(ProbeKind::Liveness, closed, Duration::from_secs(2)).await, ProbeOutcome::Failure(m) if m.contains("connect"))
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        });
        let outcome = check(ProbeKind::Liveness, addr, Duration::from_millis(200)).await;
        assert!(matches!(outcome, ProbeOutcome::Failure(m) if m.contains("timed out")));
    }
}
