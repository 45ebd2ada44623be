//! Query strings: only the parameters an endpoint documents, each at most once.

use super::error::ApiError;
use crate::store::LabelRequirement;

/// The decoded parameters of one request.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

fn decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "the query string has a bad percent-escape near {:?}",
                            &s[i..]
                        ))
                    })?;
                out.push(byte);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::bad_request("the query string is not UTF-8 once decoded"))
}

/// Parses a raw query string, refusing parameters not in `allowed` and repeated ones.
pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Params, ApiError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let Some(raw) = raw else {
        return Ok(Params(out));
    };
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k)?, decode(v)?);
        if !allowed.contains(&k.as_str()) {
            let accepted = if allowed.is_empty() {
                "this endpoint takes no query parameters".to_string()
            } else {
                format!("this endpoint accepts {}", allowed.join(", "))
            };
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}; {accepted}"
            )));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(ApiError::bad_request(format!(
                "the query parameter {k:?} is given more than once"
            )));
        }
        out.push((k, v));
    }
    Ok(Params(out))
}

impl Params {
    /// A parameter's value; an empty value counts as absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    pub fn bool(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "{name}={other:?} is not allowed; use true or false"
            ))),
        }
    }

    pub fn u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "{name}={v:?} is not allowed; use a whole number"
                    ))
                })
            })
            .transpose()
    }

    /// `labelSelector`, parsed.
    pub fn selector(&self) -> Result<Vec<LabelRequirement>, ApiError> {
        match self.get("labelSelector") {
            None => Ok(Vec::new()),
            Some(s) => LabelRequirement::parse_selector(s).map_err(|e| {
                ApiError::bad_request(format!("{e}; a selector looks like k=v,k!=v,k,!k"))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_parameters_decode() {
        let p = parse(
            Some("labelSelector=region%3Deu%2Ctier!%3Dgold&dryRun=true"),
            &["labelSelector", "dryRun"],
        )
        .unwrap();
        assert_eq!(p.get("labelSelector"), Some("region=eu,tier!=gold"));
        assert!(p.bool("dryRun").unwrap());
        assert_eq!(p.selector().unwrap().len(), 2);
        assert!(parse(None, &[]).unwrap().get("x").is_none());
    }

    #[test]
    fn unknown_repeated_and_bad_values_are_refused() {
        let e = parse(Some("labelselector=a"), &["labelSelector"]).unwrap_err();
        assert!(
            e.message.contains(
                "unknown query parameter \"labelselector\"; this endpoint accepts labelSelector"
            ),
            "{}",
            e.message
        );
        let e = parse(Some("x=1"), &[]).unwrap_err();
        assert!(e.message.contains("takes no query parameters"));
        assert!(parse(Some("dryRun=true&dryRun=false"), &["dryRun"]).is_err());
        assert!(parse(Some("dryRun=%zz"), &["dryRun"]).is_err());
        assert!(
            parse(Some("dryRun=yes"), &["dryRun"])
                .unwrap()
                .bool("dryRun")
                .is_err()
        );
        assert!(
            parse(Some("resourceVersion=x"), &["resourceVersion"])
                .unwrap()
                .u64("resourceVersion")
                .is_err()
        );
        assert!(
            parse(Some("labelSelector=Bad%20Key"), &["labelSelector"])
                .unwrap()
                .selector()
                .is_err()
        );
    }
}
