//! Validation of an effective openclaw.json against OpenClaw's config schema (JSON Schema
//! 2020-12): the schema shipped with the server, or one an operator supplies for a newer
//! OpenClaw release.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{ValidationError, Validator};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{path, secretref};

/// The schema shipped with the server.
pub const BUILTIN_TEXT: &str = include_str!("../../schema/openclaw.schema.json");

/// At most this many problems are reported for one config.
pub const MAX_PROBLEMS: usize = 20;

/// Values quoted in problems are cut to about this many characters.
const MAX_SHOWN: usize = 60;

/// A compiled schema. Cloning is cheap (the compiled form is shared), and it can be used from
/// any thread.
#[derive(Clone)]
pub struct Schema {
    inner: Arc<Inner>,
}

struct Inner {
    validator: Validator,
    /// The schema document, to name the keys an object allows.
    raw: Value,
    id: String,
    source: String,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema")
            .field("id", &self.inner.id)
            .field("source", &self.inner.source)
            .finish_non_exhaustive()
    }
}

/// A schema file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The file cannot be read.
    #[error("cannot read the openclaw.json schema {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("the openclaw.json schema {} is not JSON: line {line}, column {column}: {message}", path.display())]
    NotJson {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the JSON parser found wrong.
        message: String,
    },
    /// The file is JSON but not a usable JSON Schema.
    #[error("the openclaw.json schema {} is not a valid JSON Schema: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// One way a config breaks the schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {reason}", if path.is_empty() { "the document" } else { path.as_str() })]
pub struct SchemaProblem {
    /// Dotted path of the offending value, e.g. `gateway.port`,
    /// `channels.telegram.allowFrom[0]`; `""` for the root.
    pub path: String,
    /// What is wrong, e.g. `"abc" is not of type "integer"`.
    pub reason: String,
}

static BUILTIN: LazyLock<Schema> = LazyLock::new(|| {
    let raw: Value = serde_json::from_str(BUILTIN_TEXT)
        .expect("the built-in openclaw.json schema is JSON (a unit test parses it)");
    Schema::compile(BUILTIN_TEXT, raw, "built-in".to_owned())
        .expect("the built-in openclaw.json schema compiles (a unit test compiles it)")
});

impl Schema {
    /// The schema shipped with the server (`server/schema/openclaw.schema.json`), compiled once
    /// per process.
    pub fn builtin() -> Schema {
        BUILTIN.clone()
    }

    /// Reads and compiles a schema file (JSON Schema; draft 2020-12 unless its `$schema` says
    /// otherwise). References to other documents are not fetched.
    pub fn load(path: &Path) -> Result<Schema, SchemaError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchemaError::Read {
            path: path.to_owned(),
            source,
        })?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| SchemaError::NotJson {
            path: path.to_owned(),
            line: e.line(),
            column: e.column(),
            message: json_error_text(&e),
        })?;
        Schema::compile(&text, raw, path.display().to_string()).map_err(|reason| {
            SchemaError::Invalid {
                path: path.to_owned(),
                reason,
            }
        })
    }

    fn compile(text: &str, raw: Value, source: String) -> Result<Schema, String> {
        if !raw.is_object() {
            return Err("the document must be a JSON object (a schema)".into());
        }
        // The draft comes from `$schema`; without one it is 2020-12.
        let validator = jsonschema::options()
            .build(&raw)
            .map_err(|e| schema_error_text(&e))?;
        Ok(Schema {
            inner: Arc::new(Inner {
                validator,
                raw,
                id: short_sha256(text),
                source,
            }),
        })
    }

    /// A short hex SHA-256 of the schema text (12 digits), to tell schemas apart.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Where the schema came from: `built-in` or the file's path.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Checks an effective config. Secret references are replaced by placeholder strings first
    /// ([`secretref::with_placeholders`]), so a reference counts as a string. Returns at most
    /// [`MAX_PROBLEMS`] problems, sorted by path.
    pub fn validate(&self, config: &Value) -> Result<(), Vec<SchemaProblem>> {
        let instance = secretref::with_placeholders(config);
        if self.inner.validator.is_valid(&instance) {
            return Ok(());
        }
        let mut problems = Vec::new();
        for error in self.inner.validator.iter_errors(&instance) {
            self.describe(&error, &instance, &mut problems);
        }
        if problems.is_empty() {
            problems.push(SchemaProblem {
                path: String::new(),
                reason: "the config does not match the schema".into(),
            });
        }
        problems.sort_by(|a, b| a.path.cmp(&b.path).then_with(|| a.reason.cmp(&b.reason)));
        problems.dedup();
        problems.truncate(MAX_PROBLEMS);
        Err(problems)
    }

    /// Appends the problems one validation error stands for.
    fn describe(&self, error: &ValidationError, instance: &Value, out: &mut Vec<SchemaProblem>) {
        let at = path::from_pointer(instance, error.instance_path().as_str());
        if let ValidationErrorKind::AdditionalProperties { unexpected }
        | ValidationErrorKind::UnevaluatedProperties { unexpected } = error.kind()
        {
            let allowed = self.allowed_keys(error.schema_path().as_str());
            for key in unexpected {
                out.push(SchemaProblem {
                    path: path::key(&at, key),
                    reason: unknown_key(key, &allowed),
                });
            }
            return;
        }
        out.push(SchemaProblem {
            reason: self.reason(error, instance),
            path: at,
        });
    }

    /// The reason for one error that is not about unknown keys.
    fn reason(&self, error: &ValidationError, instance: &Value) -> String {
        let value = show(error.instance());
        match error.kind() {
            ValidationErrorKind::Type { kind } => match kind {
                TypeKind::Single(t) => format!("{value} is not of type \"{t}\""),
                TypeKind::Multiple(set) => {
                    let names: Vec<String> = set.iter().map(|t| format!("\"{t}\"")).collect();
                    format!("{value} is not of type {}", or_list(&names))
                }
            },
            ValidationErrorKind::Enum { options } => {
                let names: Vec<String> = options
                    .as_array()
                    .map(|a| a.iter().map(show).collect())
                    .unwrap_or_default();
                format!("{value} is not one of {}", or_list(&names))
            }
            ValidationErrorKind::Constant { expected_value } => {
                format!("{value} is not {}", show(expected_value))
            }
            ValidationErrorKind::Required { property } => {
                format!("missing required key {}", show(property))
            }
            ValidationErrorKind::Minimum { limit } => {
                format!("{value} is less than the minimum of {limit}")
            }
            ValidationErrorKind::Maximum { limit } => {
                format!("{value} is greater than the maximum of {limit}")
            }
            ValidationErrorKind::ExclusiveMinimum { limit } => {
                format!("{value} must be greater than {limit}")
            }
            ValidationErrorKind::ExclusiveMaximum { limit } => {
                format!("{value} must be less than {limit}")
            }
            ValidationErrorKind::MinLength { limit } => {
                format!("{value} is shorter than {limit} characters")
            }
            ValidationErrorKind::MaxLength { limit } => {
                format!("{value} is longer than {limit} characters")
            }
            ValidationErrorKind::MinItems { limit } => {
                format!("the list has fewer than {limit} items")
            }
            ValidationErrorKind::MaxItems { limit } => {
                format!("the list has more than {limit} items")
            }
            ValidationErrorKind::Pattern { pattern } => {
                format!(
                    "{value} does not match the pattern {}",
                    show(&Value::String(pattern.clone()))
                )
            }
            ValidationErrorKind::AnyOf { context }
            | ValidationErrorKind::OneOfNotValid { context } => {
                self.no_branch_matches(&value, context, instance)
            }
            _ => cut(&error.to_string()),
        }
    }

    /// `value matches none of the allowed forms: <why not the first>; or <why not the second>`.
    fn no_branch_matches(
        &self,
        value: &str,
        branches: &[Vec<ValidationError<'static>>],
        instance: &Value,
    ) -> String {
        let mut why = Vec::new();
        for branch in branches {
            let Some(first) = branch.first() else {
                continue;
            };
            let mut problems = Vec::new();
            self.describe(first, instance, &mut problems);
            if let Some(p) = problems.first() {
                why.push(p.reason.clone());
            }
        }
        let mut out = format!("{value} matches none of the allowed forms");
        if !why.is_empty() {
            out.push_str(": ");
            out.push_str(&why.join("; or "));
        }
        out
    }

    /// The keys the object schema owning `additionalProperties` at `schema_path` lists under
    /// `properties`, sorted (empty when it lists none or cannot be found).
    fn allowed_keys(&self, schema_path: &str) -> Vec<String> {
        let parent = schema_path
            .rsplit_once('/')
            .map_or("", |(parent, _)| parent);
        let mut keys: Vec<String> = self
            .inner
            .raw
            .pointer(parent)
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }
}

/// `unknown key "gatewya"; did you mean "gateway"? allowed keys: agents, ..., gateway, ...`
fn unknown_key(key: &str, allowed: &[String]) -> String {
    let mut reason = format!("unknown key {}", show(&Value::String(key.to_owned())));
    if allowed.is_empty() {
        reason.push_str("; this object allows no other keys");
        return reason;
    }
    // Suggestions are for typos; a very long key is not one (and would make the comparison
    // costly).
    let closest = allowed
        .iter()
        .filter(|_| key.len() <= 64)
        .map(|a| (edit_distance(&key.to_lowercase(), &a.to_lowercase()), a))
        .min_by_key(|(d, _)| *d);
    // Suggest a key only when it is close: at most one edit per three characters.
    if let Some((distance, name)) = closest
        && distance * 3 <= key.chars().count()
    {
        let _ = write!(reason, "; did you mean \"{name}\"?");
    }
    let _ = write!(reason, "; allowed keys: {}", allowed.join(", "));
    reason
}

/// Levenshtein distance, counting a swap of two neighbours as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`.
fn or_list(items: &[String]) -> String {
    match items {
        [] => "nothing".into(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// A value as compact JSON, cut to about [`MAX_SHOWN`] characters.
fn show(value: &Value) -> String {
    cut(&value.to_string())
}

fn cut(text: &str) -> String {
    if text.chars().count() <= MAX_SHOWN {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(MAX_SHOWN).collect();
    out.push('…');
    out
}

/// The JSON parser's message without its trailing position (reported apart).
fn json_error_text(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// What is wrong with a schema, with the place in the schema when there is one.
fn schema_error_text(e: &ValidationError) -> String {
    let at = e.instance_path().as_str();
    if at.is_empty() {
        e.to_string()
    } else {
        format!("at {at}: {e}")
    }
}

fn short_sha256(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut hex = crate::util::hex(&digest);
    hex.truncate(12);
    hex
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openclaw::fixtures;
    use serde_json::json;
    use std::time::Instant;

    fn problems(config: Value) -> Vec<SchemaProblem> {
        Schema::builtin().validate(&config).unwrap_err()
    }

    #[test]
    fn schema_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<Schema>();
    }

    #[test]
    fn builtin_compiles_and_accepts_a_realistic_config() {
        let schema = Schema::builtin();
        assert_eq!(schema.id().len(), 12);
        assert_eq!(schema.source(), "built-in");
        assert!(schema.id().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(schema.validate(&fixtures::realistic_config()), Ok(()));
        assert_eq!(schema.validate(&json!({})), Ok(()));
        assert_eq!(schema.validate(&crate::openclaw::layers::builtin()), Ok(()));
        let raw: Value = serde_json::from_str(BUILTIN_TEXT).unwrap();
        assert!(
            raw["$comment"]
                .as_str()
                .unwrap()
                .contains("replace this file")
        );
        for key in [
            "gateway",
            "agents",
            "channels",
            "models",
            "tools",
            "session",
            "messages",
            "logging",
            "hooks",
            "skills",
            "plugins",
            "browser",
            "ui",
            "env",
            "cron",
            "commands",
            "wizard",
            "meta",
            "auth",
            "diagnostics",
            "update",
            "web",
            "talk",
            "broadcast",
            "approvals",
            "bindings",
            "audio",
            "discovery",
            "canvasHost",
            "memory",
            "nodeHost",
        ] {
            assert!(raw["properties"].get(key).is_some(), "{key} missing");
        }
        assert_eq!(raw["additionalProperties"], json!(false));
    }

    #[test]
    fn unknown_keys_name_the_allowed_ones() {
        let p = problems(json!({"gatewya": {"port": 1}}));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].path, "gatewya");
        assert!(
            p[0].reason.starts_with("unknown key \"gatewya\"; did you mean \"gateway\"?; allowed keys: $schema, acp, agents,"),
            "{}",
            p[0].reason
        );
        let p = problems(json!({"gateway": {"auth": {"mdoe": "token"}}}));
        assert_eq!(p[0].path, "gateway.auth.mdoe");
        assert!(
            p[0].reason.contains("did you mean \"mode\"?"),
            "{}",
            p[0].reason
        );
        assert!(
            p[0].reason.ends_with(
                "allowed keys: allowTailscale, mode, password, rateLimit, token, trustedProxy"
            ),
            "{}",
            p[0].reason
        );
        let p = problems(json!({"zzzzzzzz": 1}));
        assert!(!p[0].reason.contains("did you mean"), "{}", p[0].reason);
        let p = problems(json!({"Gateway": 1}));
        assert!(
            p[0].reason.contains("did you mean \"gateway\"?"),
            "{}",
            p[0].reason
        );
        let long = "g".repeat(100_000);
        let p = problems(json!({ long: 1 }));
        assert!(!p[0].reason.contains("did you mean"));
    }

    #[test]
    fn type_enum_and_range_problems() {
        let p = problems(json!({
            "gateway": {"port": "abc", "bind": "everywhere"},
            "channels": {"telegram": {"allowFrom": [true], "dmPolicy": "open"}},
            "canvasHost": {"port": 70000},
        }));
        let got: Vec<(String, String)> = p.into_iter().map(|p| (p.path, p.reason)).collect();
        assert_eq!(
            got,
            [
                ("canvasHost.port".into(), "70000 is greater than the maximum of 65535".into()),
                ("channels.telegram.allowFrom[0]".into(), "true is not of type \"number\" or \"string\"".into()),
                ("gateway.bind".into(), "\"everywhere\" is not one of \"auto\", \"lan\", \"loopback\", \"custom\" or \"tailnet\"".into()),
                ("gateway.port".into(), "\"abc\" is not of type \"integer\"".into()),
            ]
        );
        let p = problems(json!({"gateway": {"port": 0}}));
        assert_eq!(p[0].reason, "0 is less than the minimum of 1");
        let p = problems(json!({"gateway": {"auth": {"trustedProxy": {}}}}));
        assert_eq!(
            (p[0].path.as_str(), p[0].reason.as_str()),
            (
                "gateway.auth.trustedProxy",
                "missing required key \"userHeader\""
            )
        );
        let p = problems(json!({"gateway": {"auth": {"token": 5}}}));
        assert_eq!(p[0].path, "gateway.auth.token");
        assert!(p[0].reason.starts_with("5 matches none of the allowed forms: 5 is not of type \"string\"; or 5 is not of type \"object\""), "{}", p[0].reason);
        let p = problems(json!("not an object"));
        assert_eq!(
            (p[0].path.as_str(), p[0].reason.as_str()),
            ("", "\"not an object\" is not of type \"object\"")
        );
        assert_eq!(
            p[0].to_string(),
            "the document: \"not an object\" is not of type \"object\""
        );
    }

    #[test]
    fn secret_references_count_as_strings() {
        let config = json!({"gateway": {"auth": {"mode": "token", "token": {"secretRef": {"name": "gw", "key": "token"}}}}});
        assert_eq!(Schema::builtin().validate(&config), Ok(()));
        // A malformed reference is not a string: the schema says so too.
        let config = json!({"gateway": {"auth": {"token": {"secretRef": {"name": "gw"}}}}});
        let p = Schema::builtin().validate(&config).unwrap_err();
        assert_eq!(p[0].path, "gateway.auth.token");
    }

    #[test]
    fn problems_are_capped_sorted_and_values_cut() {
        let mut config = serde_json::Map::new();
        for i in 0..30 {
            config.insert(format!("unknown{i:02}"), json!(1));
        }
        let p = problems(Value::Object(config));
        assert_eq!(p.len(), MAX_PROBLEMS);
        assert!(p.windows(2).all(|w| w[0].path <= w[1].path));
        assert_eq!(p[0].path, "unknown00");
        let long = "x".repeat(500);
        let p = problems(json!({"gateway": {"port": long}}));
        assert!(p[0].reason.len() < 120, "{}", p[0].reason);
        assert!(p[0].reason.contains('…'));
    }

    #[test]
    fn load_reports_unreadable_non_json_and_invalid_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let e = Schema::load(&missing).unwrap_err();
        assert!(matches!(e, SchemaError::Read { .. }));
        assert!(e.to_string().contains("missing.json"), "{e}");

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\n  \"type\": \"object\",\n  oops\n}").unwrap();
        let e = Schema::load(&bad).unwrap_err();
        match &e {
            SchemaError::NotJson { line, column, .. } => assert_eq!((*line, *column), (3, 3)),
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string()
                .contains("bad.json is not JSON: line 3, column 3: key must be a string"),
            "{e}"
        );

        let invalid = dir.path().join("invalid.json");
        std::fs::write(&invalid, r#"{"type": "objekt"}"#).unwrap();
        let e = Schema::load(&invalid).unwrap_err();
        assert!(matches!(e, SchemaError::Invalid { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("invalid.json is not a valid JSON Schema"),
            "{e}"
        );

        let remote = dir.path().join("remote.json");
        std::fs::write(&remote, r#"{"$ref": "https://example.com/other.json"}"#).unwrap();
        assert!(matches!(
            Schema::load(&remote).unwrap_err(),
            SchemaError::Invalid { .. }
        ));

        let array = dir.path().join("array.json");
        std::fs::write(&array, "[]").unwrap();
        assert!(matches!(
            Schema::load(&array).unwrap_err(),
            SchemaError::Invalid { .. }
        ));

        let good = dir.path().join("good.json");
        std::fs::write(&good, r#"{"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": false}"#).unwrap();
        let schema = Schema::load(&good).unwrap();
        assert_ne!(schema.id(), Schema::builtin().id());
        assert_eq!(schema.validate(&json!({"a": 1})), Ok(()));
        let p = schema.validate(&json!({"b": 1})).unwrap_err();
        assert_eq!(p[0].reason, "unknown key \"b\"; allowed keys: a");
    }

    #[test]
    fn edit_distance_counts_swaps_as_one() {
        assert_eq!(edit_distance("gatewya", "gateway"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn validation_is_fast_after_compile() {
        let schema = Schema::builtin();
        let config = fixtures::realistic_config();
        let runs = 200;
        let start = Instant::now();
        for _ in 0..runs {
            assert!(schema.validate(&config).is_ok());
        }
        let per_run = start.elapsed() / runs;
        println!("validate: {per_run:?} per run");
        assert!(per_run.as_millis() < 20, "{per_run:?}");
    }
}
