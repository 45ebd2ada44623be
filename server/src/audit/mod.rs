//! The audit log: who did what to which object, and with what result; append-only and
//! hash-chained, stored with the objects and copied as JSON lines to a sink for a SIEM.
//!
//! # What is recorded
//!
//! One [`AuditEntry`] per mutating request and per denied request: the time (RFC 3339, UTC,
//! milliseconds), the principal (token id and display name, never a token), the tenant, the
//! action (`create`, `apply`, `delete`, `scale`, `token.create`, ...), the object, the result
//! (`ok`, `denied` or `error`, the HTTP status and a short reason), the request id, the source
//! address, and the object's generation before and after. Once stored it becomes an
//! [`AuditRecord`]: the entry, its sequence number `seq` (1, 2, 3, ... without gaps), the hash
//! of the record before it (`prevHash`) and its own `hash`.
//!
//! Text is normalised before it is hashed and stored ([`AuditEntry::normalize`]): anything
//! shaped like a clusterclaw token (`cca_...`, `ccj_...`) is cut to `cca_***`, control and
//! invisible formatting characters become U+FFFD, and long values are shortened (ending in
//! `…`). Normalising twice changes nothing.
//!
//! # The chain (version 1)
//!
//! `hash` is the lower-case hex SHA-256 of this exact byte string:
//!
//! ```text
//! "clusterclaw-audit-v1\n"
//! f(prevHash) f(seq) f(time) f(principal.id) f(principal.name) f(tenant) f(action)
//! f(object.kind) f(object.tenant) f(object.project) f(object.name)
//! f(result.outcome) f(result.status) f(result.reason)
//! f(requestId) f(source) f(generationBefore) f(generationAfter)
//! ```
//!
//! where `f(absent) = "~"` and `f(value)` is the netstring of the value's text: its length in
//! bytes in decimal, `:`, its UTF-8 bytes, `,` (so `f("acme") = "4:acme,"`, `f("") = "0:,"`).
//! Numbers are written in decimal without a sign for positive values or leading zeros (`-1`
//! for minus one); `result.outcome` is `ok`, `denied` or `error`. When there is no object, its
//! four fields are absent; an object always has a kind and a name. The first record's
//! `prevHash` is 64 zeros. Every record stores the version of this encoding (`chainVersion`),
//! so that a later encoding can be introduced without rewriting history.
//!
//! [`verify_chain`] recomputes every hash and checks that each record names the hash of the
//! one before it and that `seq` counts up by one. A changed row no longer matches its hash; a
//! deleted, inserted or moved row breaks the numbering or the link to its neighbour. The store
//! also keeps the number of records written, so that rows cut off the end are found. A chain
//! without a secret key cannot stop someone who can write the database from rewriting every
//! record after the one they changed: compare the head hash `clusterclaw audit verify` prints
//! with the last line the SIEM received (every JSON line carries `seq` and `hash`).

mod chain;
pub mod row;
mod sqlite;
mod writer;

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::{FieldProblem, ObjectKey};
use crate::util::is_format_char;

pub use chain::{
    CHAIN_VERSION, ChainBreak, ChainProblem, ChainVerifier, GENESIS_HASH, record_hash, verify_chain,
};
pub use sqlite::{MIGRATION, verify_database};
pub(crate) use sqlite::{head_in, insert_in, list_audit_in, set_written_in, verify_audit_in};
pub use writer::{AuditConfig, AuditError, AuditSink, AuditSlot, AuditWriter};

/// Well-known actions. Any lower-case word, or words joined by `.`, `-` or `_`, is accepted.
pub mod actions {
    pub const CREATE: &str = "create";
    pub const APPLY: &str = "apply";
    pub const UPDATE: &str = "update";
    pub const DELETE: &str = "delete";
    pub const SCALE: &str = "scale";
    pub const TOKEN_CREATE: &str = "token.create";
    pub const TOKEN_REVOKE: &str = "token.revoke";
    /// A request refused before its action was known.
    pub const DENY: &str = "deny";
}

/// Longest principal id, tenant, object field, request id or source address, in characters.
pub const MAX_FIELD: usize = 256;
/// Longest reason, in characters.
pub const MAX_REASON: usize = 512;
/// Longest action, in characters.
pub const MAX_ACTION: usize = 64;

/// Who made the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditPrincipal {
    /// Public id of the token used (never the token itself), or `anonymous`.
    pub id: String,
    /// The token's display name.
    pub name: String,
}

impl AuditPrincipal {
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        AuditPrincipal {
            id: id.into(),
            name: name.into(),
        }
    }

    /// A caller that presented no valid token.
    pub fn anonymous() -> Self {
        AuditPrincipal::new("anonymous", "")
    }
}

impl From<&crate::auth::Principal> for AuditPrincipal {
    fn from(p: &crate::auth::Principal) -> Self {
        AuditPrincipal::new(p.token_id.clone(), p.token_name.clone())
    }
}

/// What the request acted on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditObject {
    /// `Tenant`, `Project`, `OpenClawInstance`, `Host`, `Token`.
    pub kind: String,
    pub tenant: Option<String>,
    pub project: Option<String>,
    /// The object's name, or a token's id.
    pub name: String,
}

impl AuditObject {
    /// A token, by its public id.
    pub fn token(id: impl Into<String>) -> Self {
        AuditObject {
            kind: "Token".into(),
            tenant: None,
            project: None,
            name: id.into(),
        }
    }
}

impl From<&ObjectKey> for AuditObject {
    fn from(k: &ObjectKey) -> Self {
        let part = |s: &str| (!s.is_empty()).then(|| s.to_string());
        AuditObject {
            kind: k.kind.as_str().to_string(),
            tenant: part(&k.tenant),
            project: part(&k.project),
            name: k.name.clone(),
        }
    }
}

impl std::fmt::Display for AuditObject {
    /// `openclawinstance/acme/helpdesk/bot`, `token/tok_123`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.kind.to_ascii_lowercase())?;
        for part in [self.tenant.as_deref(), self.project.as_deref()]
            .into_iter()
            .flatten()
            .chain([self.name.as_str()])
        {
            write!(f, "/{part}")?;
        }
        Ok(())
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuditOutcome {
    /// Done.
    Ok,
    /// Refused by authentication or authorization.
    Denied,
    /// Allowed, but failed (invalid, conflict, internal error, ...).
    Error,
}

impl AuditOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Ok => "ok",
            AuditOutcome::Denied => "denied",
            AuditOutcome::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ok" => Some(AuditOutcome::Ok),
            "denied" => Some(AuditOutcome::Denied),
            "error" => Some(AuditOutcome::Error),
            _ => None,
        }
    }
}

/// The result of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditResult {
    pub outcome: AuditOutcome,
    /// HTTP status of the answer.
    pub status: u16,
    /// Why it was denied or failed, in short.
    pub reason: Option<String>,
}

impl AuditResult {
    pub fn ok(status: u16) -> Self {
        AuditResult {
            outcome: AuditOutcome::Ok,
            status,
            reason: None,
        }
    }

    pub fn denied(status: u16, reason: impl Into<String>) -> Self {
        AuditResult {
            outcome: AuditOutcome::Denied,
            status,
            reason: Some(reason.into()),
        }
    }

    pub fn error(status: u16, reason: impl Into<String>) -> Self {
        AuditResult {
            outcome: AuditOutcome::Error,
            status,
            reason: Some(reason.into()),
        }
    }
}

/// One request as the request path hands it in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// RFC 3339, UTC, milliseconds: `2026-07-10T12:00:00.123Z`.
    pub time: String,
    pub principal: AuditPrincipal,
    /// The tenant the request concerned, if any.
    pub tenant: Option<String>,
    /// `create`, `apply`, `update`, `delete`, `scale`, `token.create`, `token.revoke`, `deny`, ...
    pub action: String,
    pub object: Option<AuditObject>,
    pub result: AuditResult,
    pub request_id: String,
    /// Address of the client, `IP:PORT`.
    pub source: String,
    pub generation_before: Option<i64>,
    pub generation_after: Option<i64>,
}

impl AuditEntry {
    /// An entry stamped with the current time; add the rest with the `with_*` methods.
    pub fn now(principal: AuditPrincipal, action: &str, result: AuditResult) -> Self {
        AuditEntry {
            time: now_millis(),
            principal,
            tenant: None,
            action: action.to_string(),
            object: None,
            result,
            request_id: String::new(),
            source: String::new(),
            generation_before: None,
            generation_after: None,
        }
    }

    /// Sets the object and, unless one is set already, the tenant from it.
    pub fn with_object(mut self, object: AuditObject) -> Self {
        if self.tenant.is_none() {
            self.tenant.clone_from(&object.tenant);
        }
        self.object = Some(object);
        self
    }

    pub fn with_tenant(mut self, tenant: Option<String>) -> Self {
        self.tenant = tenant;
        self
    }

    pub fn with_request(
        mut self,
        request_id: impl Into<String>,
        source: impl Into<String>,
    ) -> Self {
        self.request_id = request_id.into();
        self.source = source.into();
        self
    }

    /// Sets the reason of the result (what an agent event says).
    pub fn with_result_reason(mut self, reason: String) -> Self {
        self.result.reason = Some(reason);
        self
    }

    pub fn with_generations(mut self, before: Option<i64>, after: Option<i64>) -> Self {
        self.generation_before = before;
        self.generation_after = after;
        self
    }

    /// The entry as it is hashed and stored: checks what code sets (time, action, status,
    /// principal id, object kind and name) and cleans what callers send (see the module
    /// documentation). Every problem is listed, by field.
    pub fn normalize(&self) -> Result<AuditEntry, Vec<FieldProblem>> {
        let mut problems = Vec::new();
        if canonical_time(&self.time).is_none() {
            problems.push(FieldProblem::new(
                "time",
                format!(
                    "{:?} is not a time in the form 2026-07-10T12:00:00.123Z (RFC 3339, UTC, milliseconds)",
                    self.time
                ),
            ));
        }
        if !valid_action(&self.action) {
            problems.push(FieldProblem::new(
                "action",
                format!(
                    "{:?} is not an action: lower-case letters and digits, words joined by '.', '-' or '_', starting with a letter, at most {MAX_ACTION} characters (e.g. create, token.revoke)",
                    self.action
                ),
            ));
        }
        if !(100..=599).contains(&self.result.status) {
            problems.push(FieldProblem::new(
                "result.status",
                format!("{} is not an HTTP status (100 to 599)", self.result.status),
            ));
        }
        if self.principal.id.is_empty() {
            problems.push(FieldProblem::new(
                "principal.id",
                "must not be empty; use `anonymous` for a caller without a valid token",
            ));
        }
        if let Some(o) = &self.object {
            if o.kind.is_empty() {
                problems.push(FieldProblem::new("object.kind", "must not be empty"));
            }
            if o.name.is_empty() {
                problems.push(FieldProblem::new("object.name", "must not be empty"));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let field = |s: &str| clean(s, MAX_FIELD);
        let opt = |s: &Option<String>| s.as_deref().map(field);
        Ok(AuditEntry {
            time: self.time.clone(),
            principal: AuditPrincipal {
                id: field(&self.principal.id),
                name: field(&self.principal.name),
            },
            tenant: opt(&self.tenant),
            action: self.action.clone(),
            object: self.object.as_ref().map(|o| AuditObject {
                kind: field(&o.kind),
                tenant: opt(&o.tenant),
                project: opt(&o.project),
                name: field(&o.name),
            }),
            result: AuditResult {
                outcome: self.result.outcome,
                status: self.result.status,
                reason: self.result.reason.as_deref().map(|r| clean(r, MAX_REASON)),
            },
            request_id: field(&self.request_id),
            source: field(&self.source),
            generation_before: self.generation_before,
            generation_after: self.generation_after,
        })
    }
}

/// A stored entry: its place in the chain and its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// 1, 2, 3, ... in the order entries were stored.
    pub seq: u64,
    #[serde(flatten)]
    pub entry: AuditEntry,
    /// Version of the encoding the hash is computed over (see the API documentation).
    pub chain_version: u32,
    /// `hash` of the record before (64 zeros for the first).
    pub prev_hash: String,
    /// Lower-case hex SHA-256 over `prevHash` and the record.
    pub hash: String,
}

/// Which records a listing returns, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only records of this tenant.
    pub tenant: Option<String>,
    /// Only records at or after this time ([`canonical_time`] form).
    pub since: Option<String>,
    /// Only records with a greater `seq` (paging: the last `seq` seen).
    pub after_seq: Option<u64>,
    /// At most this many.
    pub limit: usize,
    /// The newest `limit` matching records instead of the oldest (still oldest first).
    pub tail: bool,
}

/// The outcome of checking the whole chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditVerification {
    /// Records found intact, from the first one on.
    pub records: u64,
    /// Hash of the last intact record ([`GENESIS_HASH`] when there is none).
    pub head: String,
    /// The first problem, if any.
    pub broken: Option<ChainBreak>,
}

impl AuditVerification {
    /// What is wrong, for people: `record 77: ...; the 76 records before it are intact`.
    pub fn problem(&self) -> Option<String> {
        let b = self.broken.as_ref()?;
        let before = match self.records {
            0 => "it is the first record".to_string(),
            1 => "the record before it is intact".to_string(),
            n => format!("the {n} records before it are intact"),
        };
        Some(format!("record {}: {}; {before}", b.seq, b.what))
    }
}

/// The current time in the audit form (RFC 3339, UTC, milliseconds).
pub fn now_millis() -> String {
    format_millis(SystemTime::now()).unwrap_or_else(|| "1970-01-01T00:00:00.000Z".to_string())
}

/// `t` in the audit form; `None` outside 1970 to 9999.
pub fn format_millis(t: SystemTime) -> Option<String> {
    let mut s = String::with_capacity(24);
    t.duration_since(UNIX_EPOCH).ok()?;
    write!(s, "{}", humantime::format_rfc3339_millis(t)).ok()?;
    Some(s)
}

/// The time in `s` if `s` is exactly in the audit form (`2026-07-10T12:00:00.123Z`).
pub fn canonical_time(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let shape = b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    if !shape {
        return None;
    }
    humantime::parse_rfc3339(s).ok()
}

/// Parses a `since` given by a person or a query: an RFC 3339 time (`2026-07-10T12:00:00Z`,
/// fractions and offsets `+00:00` allowed, UTC assumed without one) or a duration back from
/// `now` (`90m`, `1h`, `7d`). Returns the time in the audit form.
pub fn parse_since(s: &str, now: SystemTime) -> Result<String, String> {
    let s = s.trim();
    let t = if let Ok(d) = humantime::parse_duration(s) {
        now.checked_sub(d)
            .filter(|t| *t >= UNIX_EPOCH)
            .unwrap_or(UNIX_EPOCH)
    } else if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        t
    } else {
        return Err(format!(
            "{s:?} is neither a duration (such as 30m, 1h, 7d) nor an RFC 3339 time (such as 2026-07-10T12:00:00Z)"
        ));
    };
    format_millis(t).ok_or_else(|| format!("{s:?} is out of range (years 1970 to 9999)"))
}

/// Not more than a second of `d`, for messages.
pub(crate) fn round_secs(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
}

fn valid_action(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_ACTION
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b".-_".contains(c))
}

/// Prefixes of secrets this server issues.
const SECRET_PREFIXES: [&str; 2] = [
    crate::auth::API_TOKEN_PREFIX,
    crate::auth::JOIN_TOKEN_PREFIX,
];

/// Cuts secrets out, replaces control and formatting characters, shortens to `max`
/// characters. Idempotent.
fn clean(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max * 4));
    let mut rest = s;
    'outer: while !rest.is_empty() {
        for prefix in SECRET_PREFIXES {
            if let Some(after) = rest.strip_prefix(prefix) {
                let secret = after.bytes().take_while(u8::is_ascii_alphanumeric).count();
                if secret > 0 {
                    out.push_str(prefix);
                    out.push_str("***");
                    rest = &after[secret..];
                    continue 'outer;
                }
            }
        }
        let Some(c) = rest.chars().next() else { break };
        out.push(if c.is_control() || is_format_char(c) {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        });
        rest = &rest[c.len_utf8()..];
    }
    if out.chars().count() > max {
        let mut cut: String = out.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        out
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A valid entry with every field set; `n` makes it distinct.
    pub fn entry(n: u32) -> AuditEntry {
        AuditEntry {
            time: format!("2026-07-10T12:00:{:02}.{:03}Z", n % 60, n % 1000),
            principal: AuditPrincipal::new("tok_admin", "admin"),
            tenant: Some("acme".into()),
            action: actions::APPLY.into(),
            object: Some(AuditObject {
                kind: "OpenClawInstance".into(),
                tenant: Some("acme".into()),
                project: Some("helpdesk".into()),
                name: format!("bot-{n}"),
            }),
            result: AuditResult::ok(200),
            request_id: format!("req-{n}"),
            source: "127.0.0.1:50000".into(),
            generation_before: Some(i64::from(n)),
            generation_after: Some(i64::from(n) + 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::entry;
    use super::*;
    use crate::model::Kind;

    #[test]
    fn secrets_are_cut_and_text_is_cleaned() {
        let token = format!("cca_{}", "A1b2".repeat(10));
        let reason =
            format!("bad header 'Bearer {token}' and ccj_zz9\u{202e}x\n, cca_ and cca_***");
        let cleaned = clean(&reason, MAX_REASON);
        assert_eq!(
            cleaned,
            "bad header 'Bearer cca_***' and ccj_***\u{fffd}x\u{fffd}, cca_ and cca_***"
        );
        assert_eq!(clean(&cleaned, MAX_REASON), cleaned, "idempotent");
        let long = "é".repeat(600);
        let short = clean(&long, MAX_REASON);
        assert_eq!(short.chars().count(), MAX_REASON);
        assert!(short.ends_with('…'));
        assert_eq!(clean(&short, MAX_REASON), short, "idempotent");
    }

    #[test]
    fn normalize_lists_every_problem_and_is_idempotent() {
        let mut bad = entry(1);
        bad.time = "2026-07-10T12:00:00Z".into();
        bad.action = "Apply!".into();
        bad.result.status = 42;
        bad.principal.id = String::new();
        bad.object.as_mut().unwrap().name = String::new();
        let fields: Vec<String> = bad
            .normalize()
            .unwrap_err()
            .into_iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(
            fields,
            [
                "time",
                "action",
                "result.status",
                "principal.id",
                "object.name"
            ]
        );

        let mut messy = entry(2);
        messy.principal.name = "ops\u{7}cca_SECRETSECRET".into();
        messy.result = AuditResult::denied(403, format!("no {}", "x".repeat(1000)));
        let once = messy.normalize().unwrap();
        assert_eq!(once.principal.name, "ops\u{fffd}cca_***");
        assert_eq!(
            once.result.reason.as_ref().unwrap().chars().count(),
            MAX_REASON
        );
        assert_eq!(once.normalize().unwrap(), once);
        assert_eq!(
            entry(3).normalize().unwrap(),
            entry(3),
            "clean input is kept"
        );
    }

    #[test]
    fn times_are_in_one_exact_form() {
        assert!(canonical_time("2026-07-10T12:00:00.123Z").is_some());
        for bad in [
            "2026-07-10T12:00:00Z",
            "2026-07-10T12:00:00.123+00:00",
            "2026-07-10 12:00:00.123Z",
            "2026-13-10T12:00:00.123Z",
            "",
        ] {
            assert!(canonical_time(bad).is_none(), "{bad}");
        }
        let now = canonical_time("2026-07-10T12:00:00.000Z").unwrap();
        assert_eq!(parse_since("90m", now).unwrap(), "2026-07-10T10:30:00.000Z");
        assert_eq!(
            parse_since("2026-07-01T00:00:00Z", now).unwrap(),
            "2026-07-01T00:00:00.000Z"
        );
        assert_eq!(
            parse_since("2026-07-01 08:00:00.5", now).unwrap(),
            "2026-07-01T08:00:00.500Z"
        );
        assert_eq!(
            parse_since("1000years", now).unwrap(),
            "1970-01-01T00:00:00.000Z",
            "a duration longer than the epoch is the epoch, not a panic"
        );
        assert!(
            parse_since("yesterday", now)
                .unwrap_err()
                .contains("neither")
        );
        assert!(canonical_time(&now_millis()).is_some());
    }

    #[test]
    fn objects_come_from_keys_and_show_as_paths() {
        let o = AuditObject::from(&ObjectKey::instance("acme", "web", "bot"));
        assert_eq!(o.to_string(), "openclawinstance/acme/web/bot");
        let e = AuditEntry::now(
            AuditPrincipal::anonymous(),
            actions::DENY,
            AuditResult::denied(401, "no token"),
        )
        .with_object(o);
        assert_eq!(e.tenant.as_deref(), Some("acme"));
        assert_eq!(
            AuditObject::from(&ObjectKey::cluster(Kind::Host, "h1")).to_string(),
            "host/h1"
        );
        assert_eq!(AuditObject::token("tok_1").to_string(), "token/tok_1");
        assert!(e.normalize().is_ok());
    }

    #[test]
    fn records_serialize_flat_and_never_carry_a_token() {
        let r = AuditRecord {
            seq: 7,
            entry: entry(1),
            chain_version: CHAIN_VERSION,
            prev_hash: GENESIS_HASH.into(),
            hash: "ab".repeat(32),
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["requestId"], "req-1");
        assert_eq!(
            v["principal"],
            serde_json::json!({"id": "tok_admin", "name": "admin"})
        );
        assert_eq!(v["result"]["outcome"], "ok");
        assert_eq!(v["generationAfter"], 2);
        let back: AuditRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}
