//! The config center's parts of the model: config layers, config templates, secrets, and
//! environment values that reference secrets.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use utoipa::ToSchema;

pub use crate::openclaw::secretref::SecretRef;

/// Most keys one secret holds.
pub const MAX_SECRET_KEYS: usize = 64;
/// Largest value of one secret key.
pub const MAX_SECRET_VALUE_BYTES: usize = 64 * 1024;
/// Prefix of a value sealed by the server (the only form a secret value is stored in).
pub const SEALED_PREFIX: &str = "ccs1:";

/// One layer of `openclaw.json`: a JSON object merged (RFC 7396) over the layers below it.
/// On input it may also be a string of JSON5 text, which the server parses and stores as the
/// object it means.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
#[schema(value_type = Object)]
pub struct ConfigFragment(pub Map<String, Value>);

impl ConfigFragment {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_value(&self) -> Value {
        Value::Object(self.0.clone())
    }
}

impl<'de> Deserialize<'de> for ConfigFragment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::Object(map) => Ok(ConfigFragment(map)),
            Value::String(text) => match crate::openclaw::json5::parse(&text) {
                Ok(Value::Object(map)) => Ok(ConfigFragment(map)),
                Ok(other) => Err(D::Error::custom(format!(
                    "the JSON5 text holds {}, not an object of openclaw.json keys",
                    super::json_type(&other)
                ))),
                Err(e) => Err(D::Error::custom(format!("{e} (in the JSON5 text)"))),
            },
            other => Err(D::Error::custom(format!(
                "must be an object of openclaw.json keys or a string of JSON5 text, found {}",
                super::json_type(&other)
            ))),
        }
    }
}

/// The value of an environment variable: plain text, or a key of a `Secret` in the instance's
/// project or tenant (`{secretRef: {name: llm-keys, key: anthropic}}`).
#[derive(Clone, PartialEq, Eq)]
pub enum EnvValue {
    Plain(String),
    SecretRef(SecretRef),
}

impl fmt::Debug for EnvValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Plain values may be credentials too (people put them there): never printed.
            EnvValue::Plain(v) => write!(f, "Plain(<{} bytes>)", v.len()),
            EnvValue::SecretRef(r) => write!(f, "SecretRef({}/{})", r.name, r.key),
        }
    }
}

impl From<&str> for EnvValue {
    fn from(s: &str) -> Self {
        EnvValue::Plain(s.to_string())
    }
}

impl Serialize for EnvValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EnvValue::Plain(v) => s.serialize_str(v),
            EnvValue::SecretRef(r) => {
                #[derive(Serialize)]
                #[serde(rename_all = "camelCase")]
                struct Wrapped<'a> {
                    secret_ref: &'a SecretRef,
                }
                Wrapped { secret_ref: r }.serialize(s)
            }
        }
    }
}

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let shape = "must be a string, or {secretRef: {name: SECRET, key: KEY}}";
        match Value::deserialize(d)? {
            Value::String(v) => Ok(EnvValue::Plain(v)),
            // YAML turns `8080` and `true` into numbers and booleans; the variable is text.
            Value::Number(n) => Ok(EnvValue::Plain(n.to_string())),
            Value::Bool(b) => Ok(EnvValue::Plain(b.to_string())),
            v @ Value::Object(_) => {
                let wrapped = Value::Object(Map::from_iter([("x".to_string(), v)]));
                match crate::openclaw::secretref::find_refs(&wrapped) {
                    Ok(refs) if refs.len() == 1 && refs[0].0 == "x" => {
                        Ok(EnvValue::SecretRef(refs[0].1.clone()))
                    }
                    Ok(_) => Err(D::Error::custom(shape)),
                    Err(p) => Err(D::Error::custom(format!("{}; {shape}", p.reason))),
                }
            }
            other => Err(D::Error::custom(format!(
                "{shape}, found {}",
                super::json_type(&other)
            ))),
        }
    }
}

impl EnvValue {
    pub fn secret_ref(&self) -> Option<&SecretRef> {
        match self {
            EnvValue::SecretRef(r) => Some(r),
            EnvValue::Plain(_) => None,
        }
    }
}

/// `spec` of a `ConfigTemplate`: a named, platform-wide bottom layer of `openclaw.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigTemplateSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "ConfigFragment::is_empty")]
    pub config: ConfigFragment,
}

/// A secret value on its way in: plaintext from the caller, then sealed by the server before
/// anything is stored. `Debug` never shows it; it is never serialized back to a caller.
#[derive(Clone, PartialEq, Eq, ToSchema)]
#[schema(value_type = String)]
pub struct SecretText(pub String);

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for SecretText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(v) => Ok(SecretText(v)),
            // The error names the type only: the value itself is never echoed.
            other => Err(D::Error::custom(format!(
                "a secret value must be a string, found {} (the value is not shown)",
                super::json_type(&other)
            ))),
        }
    }
}

/// `spec` of a `Secret`. `data` is write-only: a write gives every key with its value (the
/// set replaces the stored one), the server encrypts the values and keeps only `keys`, a
/// keyed fingerprint per key, readable.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretSpec {
    /// Key → value; accepted on input only, never returned.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, SecretText>,
    /// Key → fingerprint of its value (`hmac-sha256:…`), set by the server.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<String, String>,
}

impl<'de> Deserialize<'de> for SecretSpec {
    /// Read by hand so that no error, whatever the shape of the input, quotes a value: a
    /// generic decoding error would say `found the string "sk-..."`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let shape = |what: &str, v: &Value| {
            D::Error::custom(format!(
                "{what}, found {} (the value is not shown)",
                super::json_type(v)
            ))
        };
        let v = Value::deserialize(d)?;
        let Value::Object(map) = v else {
            return Err(shape(
                "a Secret's spec must be a mapping with data: {KEY: VALUE, ...}",
                &v,
            ));
        };
        let mut spec = SecretSpec::default();
        for (field, v) in map {
            match (field.as_str(), v) {
                ("data" | "keys", Value::Null) => {}
                ("data", Value::Object(m)) => {
                    for (key, value) in m {
                        match value {
                            Value::String(s) => {
                                spec.data.insert(key, SecretText(s));
                            }
                            other => {
                                return Err(shape(
                                    &format!("data.{key}: a secret value must be a string"),
                                    &other,
                                ));
                            }
                        }
                    }
                }
                ("keys", Value::Object(m)) => {
                    for (key, value) in m {
                        if let Value::String(s) = value {
                            spec.keys.insert(key, s);
                        }
                    }
                }
                ("data", other) => {
                    return Err(shape("data must be a mapping of keys to values", &other));
                }
                ("keys", _) => {}
                (other, _) => {
                    return Err(D::Error::custom(format!(
                        "unknown field {other:?}; a Secret's spec has data (keys and their values)"
                    )));
                }
            }
        }
        Ok(spec)
    }
}

/// Checks a key of a secret: 1 to 253 characters of letters, digits, `.`, `_` and `-`.
pub fn validate_secret_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 253 {
        return Err("a key must be 1 to 253 characters long".into());
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{key:?} is not a valid key; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}
