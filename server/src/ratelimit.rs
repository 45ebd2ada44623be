//! Request rate limits: per API token and per tenant on the REST API, per host on the agent port, each a keyed GCRA limiter (governor).
//!
//! Configuration, in the server's TOML file (every key optional; shown with the defaults).
//! Limiting is off until the section sets `enabled = true` or any limit; the packaged
//! `server.toml` turns it on.
//!
//! ```toml
//! [rate_limit]
//! enabled = false
//! per_token = { rate = 50, burst = 100 }       # requests per second, and the burst above it
//! per_tenant = { rate = 200, burst = 400 }
//! agent_per_host = { rate = 10, burst = 30 }
//! ```
//!
//! `rate` is a number of requests per second (fractions allowed: `0.5` is one every two
//! seconds); `burst` is how many may come at once after a quiet spell, at least 1 (default: the
//! rate rounded up). The keys may also be spelled with dashes (`per-token`).
//!
//! An API request passes two limits: its token's, then its tenant's (when it names one). The
//! token is checked first so that a single flooding token is cut at its own limit and consumes
//! at most its own rate from its tenant's budget: a refused token leaves the tenant's budget
//! alone. The other way round cannot be had for free (governor has no "peek"): when the token
//! passes and the tenant refuses, the token has spent one request of its own budget on a refused
//! request. That only slows a client whose tenant is already over its limit, and is accepted.
//!
//! The agent port has a limiter of its own, keyed by host id, so no amount of API traffic takes
//! anything from an agent's budget.
//!
//! A refused request is answered `429 Too Many Requests` with `Retry-After` in whole seconds,
//! rounded up, at least 1, and the API's error body `{code: "RateLimited", message, details}`;
//! on the agent port, gRPC `RESOURCE_EXHAUSTED` with the same `retry-after` in the metadata.
//! Keys that have not been seen for longer than it takes to refill their burst are dropped by
//! [`spawn_cleanup`], so memory stays bounded by the keys active in the last burst period.

use std::fmt;
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Name of the configuration section; every [`RateLimitProblem::key`] starts with it.
pub const SECTION: &str = "rate_limit";
/// How often [`spawn_cleanup`] drops idle keys by default.
pub const CLEANUP_INTERVAL: Duration = Duration::from_secs(60);
/// The lowest and highest `rate` accepted, and the highest `burst`.
pub const MIN_RATE: f64 = 0.001;
pub const MAX_RATE: f64 = 1_000_000.0;
pub const MAX_BURST: i64 = 1_000_000;
/// The API error code of a refused request.
pub const ERROR_CODE: &str = "RateLimited";
/// gRPC metadata key carrying the retry delay in whole seconds.
pub const GRPC_RETRY_AFTER: &str = "retry-after";

// ------------------------------------------------------------------------- configuration

/// The `[rate_limit]` section as written in the config file; [`RateLimitConfig::validate`] turns
/// it into [`RateLimits`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub enabled: Option<Spanned<bool>>,
    #[serde(alias = "per-token")]
    pub per_token: Option<Spanned<LimitConfig>>,
    #[serde(alias = "per-tenant")]
    pub per_tenant: Option<Spanned<LimitConfig>>,
    #[serde(alias = "agent-per-host")]
    pub agent_per_host: Option<Spanned<LimitConfig>>,
}

/// One limit as written: `{ rate = 50, burst = 100 }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Requests per second.
    pub rate: Spanned<f64>,
    /// Requests allowed at once; the rate rounded up when absent.
    pub burst: Option<Spanned<i64>>,
}

/// One thing wrong with the `[rate_limit]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitProblem {
    /// The setting, e.g. `rate_limit.per_token.rate`.
    pub key: String,
    /// Byte range of the value in the file's text, when known.
    pub span: Option<Range<usize>>,
    /// What is wrong and what is allowed.
    pub problem: String,
}

impl RateLimitProblem {
    /// `<file>, line N, column M (<key>): <problem>`, the form of the server's other
    /// configuration errors; `text` is the whole file.
    pub fn describe(&self, path: &Path, text: &str) -> String {
        let place =
            crate::util::file_location(path, text, self.span.as_ref().map(|s| s.start), &self.key);
        format!("{place}: {}", self.problem)
    }
}

impl fmt::Display for RateLimitProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

/// A validated limit: `rate` requests per second, up to `burst` saved up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Requests per 1,000 seconds, so that the rate as written is kept exactly.
    millirate: u64,
    burst: NonZeroU32,
}

impl Limit {
    /// `rate` requests per second, `burst` at once. `None` unless
    /// `MIN_RATE <= rate <= MAX_RATE`.
    pub fn per_second(rate: f64, burst: NonZeroU32) -> Option<Limit> {
        if !(rate.is_finite() && (MIN_RATE..=MAX_RATE).contains(&rate)) {
            return None;
        }
        Some(Limit {
            millirate: ((rate * 1000.0).round() as u64).max(1),
            burst,
        })
    }

    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.millirate as f64 / 1000.0
    }

    pub fn burst(&self) -> u32 {
        self.burst.get()
    }

    /// The time it takes to earn one request.
    fn period(&self) -> Duration {
        Duration::from_nanos((1_000_000_000_000 / self.millirate.max(1)).max(1))
    }

    fn quota(&self) -> Quota {
        // `period` is at least 1 ns, so `with_period` always gives a quota; the fallback is
        // never taken.
        Quota::with_period(self.period())
            .unwrap_or_else(|| Quota::per_second(self.burst))
            .allow_burst(self.burst)
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = format!("{:.3}", self.rate());
        let rate = rate.trim_end_matches('0').trim_end_matches('.');
        write!(f, "{rate} per second (burst {})", self.burst)
    }
}

/// The validated rate limits of a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    /// When false, nothing is ever refused.
    pub enabled: bool,
    pub per_token: Limit,
    pub per_tenant: Limit,
    pub agent_per_host: Limit,
}

const fn limit(rate_per_second: u32, burst: u32) -> Limit {
    let burst = match NonZeroU32::new(burst) {
        Some(b) => b,
        None => NonZeroU32::MIN,
    };
    Limit {
        millirate: rate_per_second as u64 * 1000,
        burst,
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            enabled: false,
            per_token: limit(50, 100),
            per_tenant: limit(200, 400),
            agent_per_host: limit(10, 30),
        }
    }
}

impl RateLimitConfig {
    /// Checks every setting, reporting every problem at once; absent settings take the
    /// defaults of [`RateLimits::default`].
    pub fn validate(&self) -> Result<RateLimits, Vec<RateLimitProblem>> {
        let defaults = RateLimits::default();
        let mut problems = Vec::new();
        let mut one = |name: &str, given: Option<&Spanned<LimitConfig>>, default: Limit| {
            given.map_or(default, |given| {
                validate_limit(name, given, &mut problems).unwrap_or(default)
            })
        };
        let limits = RateLimits {
            enabled: self.enabled.as_ref().map_or(
                self.per_token.is_some()
                    || self.per_tenant.is_some()
                    || self.agent_per_host.is_some(),
                |e| *e.get_ref(),
            ),
            per_token: one("per_token", self.per_token.as_ref(), defaults.per_token),
            per_tenant: one("per_tenant", self.per_tenant.as_ref(), defaults.per_tenant),
            agent_per_host: one(
                "agent_per_host",
                self.agent_per_host.as_ref(),
                defaults.agent_per_host,
            ),
        };
        if problems.is_empty() {
            Ok(limits)
        } else {
            Err(problems)
        }
    }
}

fn validate_limit(
    name: &str,
    given: &Spanned<LimitConfig>,
    problems: &mut Vec<RateLimitProblem>,
) -> Option<Limit> {
    let before = problems.len();
    let mut problem = |field: &str, span: Range<usize>, text: String| {
        problems.push(RateLimitProblem {
            key: format!("{SECTION}.{name}.{field}"),
            span: Some(span),
            problem: text,
        });
    };
    let rate = *given.get_ref().rate.get_ref();
    if !(rate.is_finite() && (MIN_RATE..=MAX_RATE).contains(&rate)) {
        problem(
            "rate",
            given.get_ref().rate.span(),
            format!(
                "{rate} is not a rate; give requests per second, from {MIN_RATE} to {MAX_RATE}, \
                 e.g. rate = 50 (fractions allowed: 0.5 is one every 2 seconds)"
            ),
        );
    }
    let burst = match &given.get_ref().burst {
        None => u32::try_from(rate.ceil() as i64).ok(),
        Some(b) => {
            let value = *b.get_ref();
            let ok = u32::try_from(value)
                .ok()
                .filter(|&v| v >= 1 && i64::from(v) <= MAX_BURST);
            if ok.is_none() {
                problem(
                    "burst",
                    b.span(),
                    format!(
                        "{value} is not a burst; give how many requests may come at once, \
                         from 1 to {MAX_BURST}, e.g. burst = 100"
                    ),
                );
            }
            ok
        }
    };
    if problems.len() > before {
        return None;
    }
    Limit::per_second(rate, NonZeroU32::new(burst?.max(1))?)
}

// ------------------------------------------------------------------------------- limiting

/// What a limit applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// One API token.
    Token,
    /// Every API token of one tenant together.
    Tenant,
    /// One agent, on the agent port.
    Host,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Token => "token",
            Scope::Tenant => "tenant",
            Scope::Host => "host",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused request: which limit refused it, and how long until one would pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "too many requests for this {scope}: the limit is {limit}; retry after {} s",
    self.retry_after_secs()
)]
pub struct Denied {
    pub retry_after: Duration,
    pub scope: Scope,
    pub limit: Limit,
}

impl Denied {
    /// The `Retry-After` value: whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }

    /// The answer on the agent port: `RESOURCE_EXHAUSTED` with `retry-after` (seconds) in the
    /// metadata.
    pub fn to_status(&self) -> tonic::Status {
        let mut status = tonic::Status::resource_exhausted(self.to_string());
        if let Ok(value) = self.retry_after_secs().to_string().parse() {
            status.metadata_mut().insert(GRPC_RETRY_AFTER, value);
        }
        status
    }
}

/// The API's error body (the shape of `api::error::ErrorBody`) with the code `RateLimited`.
#[derive(Serialize)]
struct RateLimitedBody {
    code: &'static str,
    message: String,
    details: [(); 0],
}

impl IntoResponse for Denied {
    /// `429 Too Many Requests`, `Retry-After`, and the API's `{code, message, details}` body.
    fn into_response(self) -> Response {
        let body = RateLimitedBody {
            code: ERROR_CODE,
            message: self.to_string(),
            details: [],
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = (StatusCode::TOO_MANY_REQUESTS, bytes).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(self.retry_after_secs()),
        );
        resp
    }
}

type Keyed<C> = governor::RateLimiter<
    String,
    DashMapStateStore<String>,
    C,
    NoOpMiddleware<<C as Clock>::Instant>,
>;

/// One keyed limit and the clock to measure its waits with.
struct KeyedLimit<C: Clock> {
    limiter: Keyed<C>,
    limit: Limit,
    scope: Scope,
    clock: C,
}

impl<C: Clock + Clone> KeyedLimit<C> {
    fn new(limit: Limit, scope: Scope, clock: &C) -> Self {
        KeyedLimit {
            limiter: Keyed::dashmap_with_clock(limit.quota(), clock.clone()),
            limit,
            scope,
            clock: clock.clone(),
        }
    }

    fn check(&self, key: &str) -> Result<(), Denied> {
        self.limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| Denied {
                retry_after: not_until.wait_time_from(self.clock.now()),
                scope: self.scope,
                limit: self.limit,
            })
    }

    fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.limiter.len()
    }
}

/// The REST API's limits: per token, then per tenant.
pub struct RateLimiter<C: Clock = DefaultClock> {
    enabled: bool,
    per_token: KeyedLimit<C>,
    per_tenant: KeyedLimit<C>,
}

impl RateLimiter {
    pub fn new(limits: &RateLimits) -> Self {
        RateLimiter::with_clock(limits, &DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimiter<C> {
    pub fn with_clock(limits: &RateLimits, clock: &C) -> Self {
        RateLimiter {
            enabled: limits.enabled,
            per_token: KeyedLimit::new(limits.per_token, Scope::Token, clock),
            per_tenant: KeyedLimit::new(limits.per_tenant, Scope::Tenant, clock),
        }
    }

    /// Admits one request of `token_id`, about `tenant` when it names one. The token's limit is
    /// checked first: a refusal there leaves the tenant's budget untouched (see the module
    /// documentation).
    pub fn check(&self, token_id: &str, tenant: Option<&str>) -> Result<(), Denied> {
        if !self.enabled {
            return Ok(());
        }
        self.per_token.check(token_id)?;
        match tenant {
            Some(tenant) => self.per_tenant.check(tenant),
            None => Ok(()),
        }
    }

    /// How many tokens and tenants have state.
    pub fn tracked_keys(&self) -> usize {
        self.per_token.len() + self.per_tenant.len()
    }
}

/// The agent port's limit, per host id.
pub struct AgentRateLimiter<C: Clock = DefaultClock> {
    enabled: bool,
    per_host: KeyedLimit<C>,
}

impl AgentRateLimiter {
    pub fn new(limits: &RateLimits) -> Self {
        AgentRateLimiter::with_clock(limits, &DefaultClock::default())
    }
}

impl<C: Clock + Clone> AgentRateLimiter<C> {
    pub fn with_clock(limits: &RateLimits, clock: &C) -> Self {
        AgentRateLimiter {
            enabled: limits.enabled,
            per_host: KeyedLimit::new(limits.agent_per_host, Scope::Host, clock),
        }
    }

    /// Admits one call of the agent `host_id`.
    pub fn check(&self, host_id: &str) -> Result<(), Denied> {
        if !self.enabled {
            return Ok(());
        }
        self.per_host.check(host_id)
    }

    /// How many hosts have state.
    pub fn tracked_keys(&self) -> usize {
        self.per_host.len()
    }
}

/// A limiter whose idle keys can be dropped.
pub trait Housekeeping: Send + Sync + 'static {
    /// Drops every key whose state is the same as a fresh one (its burst is full again).
    fn retain_recent(&self);
}

impl<C> Housekeeping for RateLimiter<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    fn retain_recent(&self) {
        self.per_token.retain_recent();
        self.per_tenant.retain_recent();
    }
}

impl<C> Housekeeping for AgentRateLimiter<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    fn retain_recent(&self) {
        self.per_host.retain_recent();
    }
}

/// Drops `limiter`'s idle keys every `every` (see [`CLEANUP_INTERVAL`]); the task ends by
/// itself once the limiter is dropped.
pub fn spawn_cleanup<L: Housekeeping>(
    limiter: &Arc<L>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let weak: Weak<L> = Arc::downgrade(limiter);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            match weak.upgrade() {
                Some(limiter) => limiter.retain_recent(),
                None => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[derive(Deserialize)]
    struct File {
        rate_limit: RateLimitConfig,
    }

    fn parse(text: &str) -> Result<RateLimits, Vec<String>> {
        let file: File = toml::from_str(text).map_err(|e| vec![e.message().to_owned()])?;
        file.rate_limit.validate().map_err(|problems| {
            problems
                .iter()
                .map(|p| p.describe(Path::new("/etc/clusterclaw/server.toml"), text))
                .collect()
        })
    }

    fn limits(token: (u32, u32), tenant: (u32, u32), host: (u32, u32)) -> RateLimits {
        RateLimits {
            enabled: true,
            per_token: limit(token.0, token.1),
            per_tenant: limit(tenant.0, tenant.1),
            agent_per_host: limit(host.0, host.1),
        }
    }

    /// Checks `n` requests at the same instant; how many passed.
    fn passes(
        l: &RateLimiter<FakeRelativeClock>,
        token: &str,
        tenant: Option<&str>,
        n: u32,
    ) -> u32 {
        (0..n).filter(|_| l.check(token, tenant).is_ok()).count() as u32
    }

    #[test]
    fn defaults_apply_to_an_empty_or_absent_section() {
        assert_eq!(
            RateLimitConfig::default().validate(),
            Ok(RateLimits::default())
        );
        assert_eq!(parse("[rate_limit]\n"), Ok(RateLimits::default()));
        let d = RateLimits::default();
        assert!(!d.enabled, "off unless configured");
        assert!(parse("[rate_limit]\nenabled = true\n").unwrap().enabled);
        assert!(
            parse("[rate_limit]\nper_token = { rate = 5 }\n")
                .unwrap()
                .enabled,
            "a limit given turns limiting on"
        );
        assert_eq!((d.per_token.rate(), d.per_token.burst()), (50.0, 100));
        assert_eq!(d.per_token.to_string(), "50 per second (burst 100)");
    }

    #[test]
    fn a_full_section_is_read_in_either_spelling() {
        let snake = "[rate_limit]\nenabled = false\nper_token = { rate = 5, burst = 7 }\n\
                     per_tenant = { rate = 0.5, burst = 2 }\nagent_per_host = { rate = 2.5 }\n";
        let l = parse(snake).expect("valid");
        assert!(!l.enabled);
        assert_eq!((l.per_token.rate(), l.per_token.burst()), (5.0, 7));
        assert_eq!((l.per_tenant.rate(), l.per_tenant.burst()), (0.5, 2));
        assert_eq!(l.per_tenant.to_string(), "0.5 per second (burst 2)");
        // No burst: the rate rounded up.
        assert_eq!(
            (l.agent_per_host.rate(), l.agent_per_host.burst()),
            (2.5, 3)
        );
        let kebab = snake
            .replace("per_token", "per-token")
            .replace("per_tenant", "per-tenant")
            .replace("agent_per_host", "agent-per-host");
        assert_eq!(parse(&kebab), Ok(l));
        // A sub-table works as well as an inline table.
        let l = parse("[rate_limit.per_token]\nrate = 3\nburst = 4\n").expect("valid");
        assert_eq!((l.per_token.rate(), l.per_token.burst()), (3.0, 4));
    }

    #[test]
    fn every_bad_setting_is_reported_with_its_line_and_key() {
        let text = "[rate_limit]\n\
                    per_token = { rate = 0, burst = 10 }\n\
                    per_tenant = { rate = 20, burst = 0 }\n\
                    agent_per_host = { rate = -1, burst = 99999999999 }\n";
        let problems = parse(text).expect_err("invalid");
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(
            problems[0].starts_with(
                "/etc/clusterclaw/server.toml, line 2, column 22 (rate_limit.per_token.rate): 0 is not a rate"
            ),
            "{problems:#?}"
        );
        assert!(
            problems[1].starts_with(
                "/etc/clusterclaw/server.toml, line 3, column 35 (rate_limit.per_tenant.burst): 0 is not a burst"
            ),
            "{problems:#?}"
        );
        assert!(problems[2].contains("line 4,") && problems[2].contains("agent_per_host.rate"));
        assert!(
            problems[3].contains("agent_per_host.burst") && problems[3].contains("1 to 1000000")
        );
        for (bad, what) in [
            ("rate = nan", "NaN is not a rate"),
            ("rate = inf", "inf is not a rate"),
            ("rate = 1000001", "is not a rate"),
            (
                "rate = 0.0001",
                "is not a rate; give requests per second, from 0.001 to 1000000",
            ),
        ] {
            let problems =
                parse(&format!("[rate_limit]\nper_token = {{ {bad} }}\n")).expect_err(bad);
            assert!(problems[0].contains(what), "{bad}: {problems:?}");
        }
    }

    #[test]
    fn unknown_or_mistyped_keys_are_refused() {
        for (text, what) in [
            (
                "[rate_limit]\nper_user = { rate = 1 }\n",
                "unknown field `per_user`",
            ),
            (
                "[rate_limit]\nper_token = { rate = 1, brust = 2 }\n",
                "unknown field `brust`",
            ),
            (
                "[rate_limit]\nper_token = { burst = 2 }\n",
                "missing field `rate`",
            ),
            (
                "[rate_limit]\nper_token = { rate = \"50/s\" }\n",
                "invalid type",
            ),
            ("[rate_limit]\nenabled = \"yes\"\n", "invalid type"),
        ] {
            let problems = parse(text).expect_err(text);
            assert!(problems[0].contains(what), "{text}: {problems:?}");
        }
    }

    #[test]
    fn a_token_gets_its_burst_then_waits_for_the_rate() {
        let clock = FakeRelativeClock::default();
        let l = RateLimiter::with_clock(&limits((10, 20), (1000, 1000), (1, 1)), &clock);
        assert_eq!(passes(&l, "tok", None, 25), 20);
        let denied = l.check("tok", None).expect_err("over the burst");
        assert_eq!(denied.scope, Scope::Token);
        assert_eq!(denied.retry_after, Duration::from_millis(100));
        assert_eq!(denied.retry_after_secs(), 1, "rounded up to a whole second");
        clock.advance(Duration::from_millis(99));
        assert!(l.check("tok", None).is_err());
        clock.advance(Duration::from_millis(1));
        assert!(l.check("tok", None).is_ok());
        assert!(l.check("tok", None).is_err());
        // After a quiet second, ten more (the rate), not the whole burst.
        clock.advance(Duration::from_secs(1));
        assert_eq!(passes(&l, "tok", None, 30), 10);
        // Another token has a budget of its own.
        assert_eq!(passes(&l, "other", None, 30), 20);
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let clock = FakeRelativeClock::default();
        let slow = RateLimits {
            per_token: Limit::per_second(0.4, NonZeroU32::MIN).expect("valid"),
            ..limits((1, 1), (1, 1), (1, 1))
        };
        let l = RateLimiter::with_clock(&slow, &clock);
        assert!(l.check("t", None).is_ok());
        let denied = l.check("t", None).expect_err("limited");
        assert_eq!(denied.retry_after, Duration::from_millis(2500));
        assert_eq!(denied.retry_after_secs(), 3);
        clock.advance(Duration::from_millis(500));
        assert_eq!(
            l.check("t", None).expect_err("limited").retry_after_secs(),
            2
        );
        let exact = |ms| Denied {
            retry_after: Duration::from_millis(ms),
            scope: Scope::Token,
            limit: limit(1, 1),
        };
        assert_eq!(exact(0).retry_after_secs(), 1, "never 0");
        assert_eq!(exact(2000).retry_after_secs(), 2);
        assert_eq!(exact(2001).retry_after_secs(), 3);
    }

    #[test]
    fn a_tenant_limits_all_its_tokens_together() {
        let clock = FakeRelativeClock::default();
        let l = RateLimiter::with_clock(&limits((100, 10), (100, 15), (1, 1)), &clock);
        assert_eq!(passes(&l, "a1", Some("acme"), 10), 10);
        assert_eq!(passes(&l, "a2", Some("acme"), 10), 5);
        let denied = l.check("a3", Some("acme")).expect_err("tenant is over");
        assert_eq!(denied.scope, Scope::Tenant);
        assert!(
            denied
                .to_string()
                .starts_with("too many requests for this tenant"),
            "{denied}"
        );
        // Cluster-scoped requests of the same tokens only count against the token.
        assert!(l.check("a3", None).is_ok());
        // Another tenant is not affected.
        assert_eq!(passes(&l, "b1", Some("globex"), 10), 10);
    }

    #[test]
    fn a_flooding_token_takes_no_more_than_its_rate_from_its_tenant() {
        let clock = FakeRelativeClock::default();
        let l = RateLimiter::with_clock(&limits((10, 10), (20, 20), (1, 1)), &clock);
        // A flood at 10x the token's limit, a second long, in steps of 10 ms.
        let mut passed = 0;
        for _ in 0..100 {
            passed += passes(&l, "flood", Some("acme"), 1);
            clock.advance(Duration::from_millis(10));
        }
        assert!((19..=20).contains(&passed), "{passed}");
        // The tenant's burst was not drained by the refused requests: another token of the same
        // tenant still gets its own burst.
        assert_eq!(passes(&l, "calm", Some("acme"), 10), 10);
    }

    #[test]
    fn disabled_limits_refuse_nothing() {
        let off = RateLimits {
            enabled: false,
            ..limits((1, 1), (1, 1), (1, 1))
        };
        let clock = FakeRelativeClock::default();
        let l = RateLimiter::with_clock(&off, &clock);
        assert_eq!(passes(&l, "t", Some("acme"), 1000), 1000);
        let a = AgentRateLimiter::with_clock(&off, &clock);
        assert!((0..1000).all(|_| a.check("host").is_ok()));
        assert_eq!(l.tracked_keys() + a.tracked_keys(), 0);
    }

    #[test]
    fn agents_have_their_own_budget_per_host() {
        let clock = FakeRelativeClock::default();
        let same = limits((5, 5), (5, 5), (5, 5));
        let api = RateLimiter::with_clock(&same, &clock);
        let agents = AgentRateLimiter::with_clock(&same, &clock);
        // The API is flooded with a key that is also a host id: the agent port does not care.
        assert_eq!(passes(&api, "h1", Some("h1"), 100), 5);
        assert_eq!((0..10).filter(|_| agents.check("h1").is_ok()).count(), 5);
        let denied = agents.check("h1").expect_err("over");
        assert_eq!(denied.scope, Scope::Host);
        assert_eq!(denied.retry_after, Duration::from_millis(200));
        assert!(agents.check("h2").is_ok(), "one host per budget");
    }

    #[test]
    fn idle_keys_are_dropped() {
        let clock = FakeRelativeClock::default();
        let l = RateLimiter::with_clock(&limits((10, 20), (10, 20), (1, 1)), &clock);
        for i in 0..10_000 {
            let _ = l.check(&format!("token-{i}"), Some(&format!("tenant-{}", i % 100)));
        }
        assert_eq!(l.tracked_keys(), 10_100);
        l.retain_recent();
        assert_eq!(l.tracked_keys(), 10_100, "all were just used");
        // Long enough for every burst to be full again.
        clock.advance(Duration::from_secs(3));
        assert!(l.check("busy", None).is_ok());
        l.retain_recent();
        assert_eq!(l.tracked_keys(), 1, "only the key used since");
    }

    #[tokio::test(start_paused = true)]
    async fn the_cleanup_task_runs_until_the_limiter_is_dropped() {
        let clock = FakeRelativeClock::default();
        let l = Arc::new(AgentRateLimiter::with_clock(
            &limits((1, 1), (1, 1), (10, 10)),
            &clock,
        ));
        for host in ["a", "b", "c"] {
            l.check(host).expect("first call");
        }
        let task = spawn_cleanup(&l, Duration::from_secs(60));
        clock.advance(Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(l.tracked_keys(), 3, "not yet");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(l.tracked_keys(), 0);
        drop(l);
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("the task ends")
            .expect("no panic");
    }

    #[tokio::test]
    async fn a_refusal_is_a_429_in_the_api_error_format() {
        let denied = Denied {
            retry_after: Duration::from_millis(1500),
            scope: Scope::Token,
            limit: limit(50, 100),
        };
        let resp = denied.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!({
                "code": "RateLimited",
                "message": "too many requests for this token: the limit is 50 per second (burst 100); retry after 2 s",
                "details": [],
            })
        );
    }

    #[test]
    fn a_refusal_on_the_agent_port_is_resource_exhausted() {
        let denied = Denied {
            retry_after: Duration::from_millis(200),
            scope: Scope::Host,
            limit: limit(10, 30),
        };
        let status = denied.to_status();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status
                .metadata()
                .get(GRPC_RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        assert!(
            status.message().contains("this host"),
            "{}",
            status.message()
        );
    }
}
