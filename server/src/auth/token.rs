//! Bearer tokens: generation from a CSPRNG, SHA-256 hashing, and the `Secret` wrapper.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::util::hex;

/// Prefix of API tokens (they authenticate REST calls).
pub const API_TOKEN_PREFIX: &str = "cca_";
/// Prefix of join tokens (they only enroll hosts).
pub const JOIN_TOKEN_PREFIX: &str = "ccj_";
/// Number of base62 characters after the prefix.
pub const TOKEN_RANDOM_CHARS: usize = 40;
/// Length of a public token id (base62).
const TOKEN_ID_CHARS: usize = 12;

/// A value that must never be printed: `Debug` and `Display` show `***`. It serializes as the
/// plain string, for the places where it is handed to its owner (an API answer that shows a
/// new token once, the CLI config file).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; call only where it is handed to its owner (a file, a response, an
    /// `Authorization` header).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A recognisable but harmless form: the token kind prefix and the last four characters.
    pub fn redacted(&self) -> String {
        let prefix = self.0.split_once('_').map_or("", |(p, _)| p);
        let tail: String = self
            .0
            .chars()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if self.0.chars().count() < 12 {
            "***".into()
        } else if prefix.is_empty() {
            format!("***{tail}")
        } else {
            format!("{prefix}_***{tail}")
        }
    }
}

impl FromStr for Secret {
    type Err = String;

    /// Surrounding white space is dropped (a token pasted with its newline); an empty value is
    /// refused.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            Err("the token is empty".into())
        } else {
            Ok(Secret(s.to_string()))
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

fn base62(len: usize) -> String {
    // ThreadRng is a CSPRNG (ChaCha, reseeded from the operating system).
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// A new API token: `cca_` followed by 40 base62 characters.
pub fn generate_api_token() -> Secret {
    Secret(format!("{API_TOKEN_PREFIX}{}", base62(TOKEN_RANDOM_CHARS)))
}

/// A new join token: `ccj_` followed by 40 base62 characters.
pub fn generate_join_token() -> Secret {
    Secret(format!("{JOIN_TOKEN_PREFIX}{}", base62(TOKEN_RANDOM_CHARS)))
}

/// A new public token id (not secret; used to list and revoke).
pub fn generate_token_id() -> String {
    base62(TOKEN_ID_CHARS)
}

/// SHA-256 of a token, as raw bytes.
pub fn hash_token_bytes(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// SHA-256 of a token as 64 lower-case hex digits: the only form in which a token is stored.
pub fn hash_token(token: &str) -> String {
    hex(&hash_token_bytes(token))
}

/// Whether `s` has the shape of a token with `prefix` (prefix plus 40 base62 characters).
pub fn has_token_shape(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == TOKEN_RANDOM_CHARS && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_documented_shape() {
        let api = generate_api_token();
        assert!(
            has_token_shape(api.expose(), API_TOKEN_PREFIX),
            "{}",
            api.expose()
        );
        assert_eq!(api.expose().len(), 44);
        let join = generate_join_token();
        assert!(has_token_shape(join.expose(), JOIN_TOKEN_PREFIX));
        assert_ne!(generate_api_token(), api, "tokens are random");
        let id = generate_token_id();
        assert_eq!(id.len(), 12);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = generate_api_token();
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{:?}", Some(&s)), "Some(***)");
    }

    #[test]
    fn secrets_parse_and_redact() {
        assert_eq!(" cca_abc\n".parse::<Secret>().unwrap().expose(), "cca_abc");
        assert!("  ".parse::<Secret>().is_err());
        assert_eq!(
            Secret::new("cca_supersecretvalue1234").redacted(),
            "cca_***1234"
        );
        assert_eq!(Secret::new("short").redacted(), "***");
        assert_eq!(
            serde_json::to_string(&Secret::new("x")).unwrap(),
            "\"x\"",
            "serialized for its owner"
        );
    }

    #[test]
    fn hashes_are_sha256_hex() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hash_token("abc").len(), 64);
    }

    #[test]
    fn shape_check() {
        assert!(!has_token_shape("cca_short", API_TOKEN_PREFIX));
        assert!(!has_token_shape(
            &format!("cca_{}", "-".repeat(40)),
            API_TOKEN_PREFIX
        ));
        assert!(!has_token_shape(
            &format!("ccj_{}", "a".repeat(40)),
            API_TOKEN_PREFIX
        ));
    }
}
