//! Secret references inside an openclaw.json fragment: `{"secretRef": {"name": "<secret>",
//! "key": "<key>"}}` stands for one key of a Secret of the same tenant. Finding them, replacing
//! them by the secret's value, or by a placeholder for validation.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::path;
use crate::model::validate_dns_label;

/// The key of the object that marks a reference.
pub const REF_KEY: &str = "secretRef";

/// A reference to one key of a Secret. It holds names only, never a value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SecretRef {
    /// The Secret's name (a DNS-1123 label).
    pub name: String,
    /// The key inside the Secret.
    pub key: String,
}

impl SecretRef {
    /// The placeholder that stands for this reference before validation: `<secret:NAME/KEY>`.
    pub fn placeholder(&self) -> String {
        format!("<secret:{}/{}>", self.name, self.key)
    }
}

/// A malformed reference, or one that cannot be resolved. The reason names secrets and keys,
/// never a secret's value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", if path.is_empty() { "the document" } else { path.as_str() })]
pub struct RefProblem {
    /// Dotted path of the object holding `secretRef` (`""` for the root).
    pub path: String,
    /// What is wrong and what is allowed.
    pub reason: String,
}

/// Checks a key of a Secret: 1 to 253 characters of `A-Z a-z 0-9 . _ -`.
pub fn validate_secret_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("must not be empty".into());
    }
    if key.len() > 253 {
        return Err(format!(
            "is {} characters long; at most 253 are allowed",
            key.len()
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "contains {c:?}; a key is letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Every reference in `config` with its dotted path, in document order. An object that has a
/// `secretRef` key but is not exactly `{"secretRef": {"name": .., "key": ..}}` with a valid
/// name and key is a [`RefProblem`] (the first one found).
pub fn find_refs(config: &Value) -> Result<Vec<(String, SecretRef)>, RefProblem> {
    let mut out = Vec::new();
    let mut at = String::new();
    walk(config, &mut at, &mut |at, r| {
        out.push((at.to_owned(), r));
        Ok(())
    })?;
    Ok(out)
}

/// `config` with each reference replaced by the string `resolve` returns for it. A reference
/// it has no value for (None) is a [`RefProblem`] naming the path, the Secret and the key.
pub fn substitute(
    config: &Value,
    resolve: &mut dyn FnMut(&SecretRef) -> Option<String>,
) -> Result<Value, RefProblem> {
    let mut at = String::new();
    replace(config, &mut at, &mut |at, r| {
        resolve(&r).map(Value::String).ok_or_else(|| RefProblem {
            path: at.to_owned(),
            reason: format!(
                "the Secret {:?} has no key {:?} (or there is no such Secret)",
                r.name, r.key
            ),
        })
    })
}

/// `config` with each well-formed reference replaced by the string `<secret:NAME/KEY>`, so a
/// reference counts as a string where the schema wants one. Malformed ones are left as they
/// are ([`find_refs`] reports them).
pub fn with_placeholders(config: &Value) -> Value {
    fn go(value: &Value) -> Value {
        match value {
            Value::Object(map) => match map.get(REF_KEY) {
                Some(_) => match parse_ref(map) {
                    Ok(r) => Value::String(r.placeholder()),
                    Err(_) => value.clone(),
                },
                None => Value::Object(map.iter().map(|(k, v)| (k.clone(), go(v))).collect()),
            },
            Value::Array(items) => Value::Array(items.iter().map(go).collect()),
            other => other.clone(),
        }
    }
    go(config)
}

/// Whether `value` is an object with a `secretRef` key (well-formed or not).
pub fn is_ref_object(value: &Value) -> bool {
    value.as_object().is_some_and(|m| m.contains_key(REF_KEY))
}

fn walk(
    value: &Value,
    at: &mut String,
    found: &mut dyn FnMut(&str, SecretRef) -> Result<(), RefProblem>,
) -> Result<(), RefProblem> {
    match value {
        Value::Object(map) if map.contains_key(REF_KEY) => {
            let r = parse_ref(map).map_err(|reason| RefProblem {
                path: at.clone(),
                reason,
            })?;
            found(at, r)
        }
        Value::Object(map) => {
            for (key, child) in map {
                let len = at.len();
                path::push_key(at, key);
                walk(child, at, found)?;
                at.truncate(len);
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                let len = at.len();
                path::push_index(at, i);
                walk(child, at, found)?;
                at.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn replace(
    value: &Value,
    at: &mut String,
    resolve: &mut dyn FnMut(&str, SecretRef) -> Result<Value, RefProblem>,
) -> Result<Value, RefProblem> {
    match value {
        Value::Object(map) if map.contains_key(REF_KEY) => {
            let r = parse_ref(map).map_err(|reason| RefProblem {
                path: at.clone(),
                reason,
            })?;
            resolve(at, r)
        }
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, child) in map {
                let len = at.len();
                path::push_key(at, key);
                out.insert(key.clone(), replace(child, at, resolve)?);
                at.truncate(len);
            }
            Ok(Value::Object(out))
        }
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, child) in items.iter().enumerate() {
                let len = at.len();
                path::push_index(at, i);
                out.push(replace(child, at, resolve)?);
                at.truncate(len);
            }
            Ok(Value::Array(out))
        }
        other => Ok(other.clone()),
    }
}

const SHAPE: &str = r#"a secret reference is {"secretRef": {"name": "<secret>", "key": "<key>"}}"#;

/// The reference in an object that has a `secretRef` key, or what is wrong with it.
fn parse_ref(map: &Map<String, Value>) -> Result<SecretRef, String> {
    if let Some(other) = map.keys().find(|k| *k != REF_KEY) {
        return Err(format!(
            "an object with \"secretRef\" holds nothing else, but it also has {other:?}; {SHAPE}"
        ));
    }
    let Some(Value::Object(inner)) = map.get(REF_KEY) else {
        return Err(format!(
            "\"secretRef\" is {}, not an object; {SHAPE}",
            kind_of(map.get(REF_KEY).unwrap_or(&Value::Null))
        ));
    };
    if let Some(other) = inner.keys().find(|k| *k != "name" && *k != "key") {
        return Err(format!(
            "unknown key {other:?} in secretRef; allowed keys: name, key"
        ));
    }
    let field = |field: &str, what: &str| -> Result<String, String> {
        match inner.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!(
                "secretRef.{field} is {}; it must be a string: {what}",
                kind_of(other)
            )),
            None => Err(format!("secretRef has no \"{field}\" ({what}); {SHAPE}")),
        }
    };
    let name = field("name", "the Secret's name")?;
    let key = field("key", "the key inside the Secret")?;
    validate_dns_label(&name).map_err(|e| format!("secretRef.name {e}"))?;
    validate_secret_key(&key).map_err(|e| format!("secretRef.key {key:?} {e}"))?;
    Ok(SecretRef { name, key })
}

/// A JSON type as messages name it.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn r(name: &str, key: &str) -> Value {
        json!({"secretRef": {"name": name, "key": key}})
    }

    fn sref(name: &str, key: &str) -> SecretRef {
        SecretRef {
            name: name.into(),
            key: key.into(),
        }
    }

    fn sample() -> Value {
        json!({
            "gateway": {"auth": {"mode": "token", "token": r("gw", "token")}},
            "models": {"providers": {"api.example.com": {"apiKey": r("llm", "OPENAI_API_KEY")}}},
            "hooks": {"mappings": [{"x": 1}, {"token": r("hooks", "a.b_c-d")}]},
            "plain": "secretRef",
            "n": null
        })
    }

    #[test]
    fn finds_every_reference_with_its_path() {
        let refs = find_refs(&sample()).unwrap();
        assert_eq!(
            refs,
            [
                ("gateway.auth.token".to_owned(), sref("gw", "token")),
                (
                    "models.providers[\"api.example.com\"].apiKey".to_owned(),
                    sref("llm", "OPENAI_API_KEY")
                ),
                (
                    "hooks.mappings[1].token".to_owned(),
                    sref("hooks", "a.b_c-d")
                ),
            ]
        );
        assert_eq!(find_refs(&json!({"a": [1, "x"]})).unwrap(), []);
        assert_eq!(
            find_refs(&r("root", "k")).unwrap(),
            [(String::new(), sref("root", "k"))]
        );
    }

    #[test]
    fn malformed_references_are_problems() {
        let cases = [
            (
                json!({"t": {"secretRef": {"name": "a", "key": "k"}, "extra": 1}}),
                "also has \"extra\"",
            ),
            (
                json!({"t": {"secretRef": "a/k"}}),
                "\"secretRef\" is a string, not an object",
            ),
            (
                json!({"t": {"secretRef": {"name": "a"}}}),
                "secretRef has no \"key\"",
            ),
            (
                json!({"t": {"secretRef": {"key": "k"}}}),
                "secretRef has no \"name\"",
            ),
            (
                json!({"t": {"secretRef": {"name": "a", "key": "k", "value": "x"}}}),
                "unknown key \"value\" in secretRef; allowed keys: name, key",
            ),
            (
                json!({"t": {"secretRef": {"name": "Bad_Name", "key": "k"}}}),
                "secretRef.name \"Bad_Name\" contains 'B'",
            ),
            (
                json!({"t": {"secretRef": {"name": "a", "key": "has space"}}}),
                "secretRef.key \"has space\" contains ' '",
            ),
            (
                json!({"t": {"secretRef": {"name": "a", "key": ""}}}),
                "secretRef.key \"\" must not be empty",
            ),
            (
                json!({"t": {"secretRef": {"name": "a", "key": "k".repeat(254)}}}),
                "at most 253",
            ),
            (
                json!({"t": {"secretRef": {"name": 5, "key": "k"}}}),
                "secretRef.name is a number",
            ),
            (json!({"t": [{"secretRef": null}]}), "\"secretRef\" is null"),
        ];
        for (config, want) in cases {
            let e = find_refs(&config).unwrap_err();
            assert!(e.reason.contains(want), "{config}: {e}");
            assert!(e.path == "t" || e.path == "t[0]", "{e:?}");
            assert_eq!(
                substitute(&config, &mut |_| Some("v".into())).unwrap_err(),
                e
            );
            // Left as they are by the placeholder pass.
            assert_eq!(with_placeholders(&config), config);
        }
        assert!(validate_secret_key(&"k".repeat(253)).is_ok());
    }

    #[test]
    fn substitute_replaces_references_by_their_values() {
        let out = substitute(&sample(), &mut |r| {
            Some(format!("value-of-{}-{}", r.name, r.key))
        })
        .unwrap();
        assert_eq!(out["gateway"]["auth"]["token"], json!("value-of-gw-token"));
        assert_eq!(
            out["hooks"]["mappings"][1]["token"],
            json!("value-of-hooks-a.b_c-d")
        );
        assert_eq!(out["hooks"]["mappings"][0], json!({"x": 1}));
        assert_eq!(out["plain"], json!("secretRef"));
        let keys: Vec<_> = out.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["gateway", "models", "hooks", "plain", "n"]);
    }

    #[test]
    fn an_unresolved_reference_names_path_and_secret_but_no_value() {
        let mut seen = Vec::new();
        let e = substitute(&sample(), &mut |r| {
            seen.push(r.clone());
            (r.name == "gw").then(|| "s3cr3t-value".to_owned())
        })
        .unwrap_err();
        assert_eq!(e.path, "models.providers[\"api.example.com\"].apiKey");
        assert_eq!(
            e.to_string(),
            "models.providers[\"api.example.com\"].apiKey: the Secret \"llm\" has no key \"OPENAI_API_KEY\" (or there is no such Secret)"
        );
        assert!(!e.to_string().contains("s3cr3t"));
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn placeholders_stand_for_references() {
        let out = with_placeholders(&sample());
        assert_eq!(out["gateway"]["auth"]["token"], json!("<secret:gw/token>"));
        assert_eq!(
            out["models"]["providers"]["api.example.com"]["apiKey"],
            json!("<secret:llm/OPENAI_API_KEY>")
        );
        assert_eq!(
            out["hooks"]["mappings"][1]["token"],
            json!("<secret:hooks/a.b_c-d>")
        );
        assert_eq!(out["n"], Value::Null);
        assert!(is_ref_object(&r("a", "b")));
        assert!(!is_ref_object(&json!({"a": 1})));
    }

    #[test]
    fn secret_ref_serializes_as_name_and_key() {
        assert_eq!(
            serde_json::to_value(sref("a", "b")).unwrap(),
            json!({"name": "a", "key": "b"})
        );
    }
}
