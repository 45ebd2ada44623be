//! Name and label syntax: DNS-1123 labels and Kubernetes-style label keys and values.

/// Checks a DNS-1123 label: 1 to 63 characters of `a-z`, `0-9` and `-`, starting and ending
/// with a letter or digit. Returns what is wrong, in words a person can act on.
pub fn validate_dns_label(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 63 {
        return Err(format!(
            "{name:?} is {} characters long; at most 63 are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        let hint = if c.is_ascii_uppercase() {
            " (use lower case)"
        } else {
            ""
        };
        return Err(format!(
            "{name:?} contains {c:?}{hint}; a name is a DNS-1123 label: lower-case letters, digits and '-'"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "{name:?} must start and end with a lower-case letter or digit"
        ));
    }
    Ok(())
}

fn valid_label_segment(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Checks a label key: `[prefix/]name`, where the optional prefix is a DNS subdomain (at most 253
/// characters) and the name is 1 to 63 characters of letters, digits, `-`, `_` and `.`, starting
/// and ending with a letter or digit.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok =
            !p.is_empty() && p.len() <= 253 && p.split('.').all(|l| validate_dns_label(l).is_ok());
        if !ok {
            return Err(format!(
                "label key {key:?} has an invalid prefix {p:?}; the prefix must be a DNS subdomain such as example.com"
            ));
        }
    }
    if !valid_label_segment(name) {
        return Err(format!(
            "label key {key:?} is invalid: the name part must be 1-63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Checks a label value: empty, or 1 to 63 characters of letters, digits, `-`, `_` and `.`,
/// starting and ending with a letter or digit.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || valid_label_segment(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} is invalid: at most 63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "support-bot", "a1", "0abc", &"a".repeat(63)] {
            assert!(validate_dns_label(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Support",
            "a_b",
            "a.b",
            "ä",
            &"a".repeat(64),
        ] {
            assert!(validate_dns_label(bad).is_err(), "{bad}");
        }
        assert!(
            validate_dns_label("Support")
                .unwrap_err()
                .contains("lower case")
        );
    }

    #[test]
    fn label_keys_and_values() {
        for ok in [
            "region",
            "clusterclaw.io/role",
            "a.b-c_d",
            "topology.example.com/zone",
        ] {
            assert!(validate_label_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/x",
            "Ex ample",
            "-a",
            "a/",
            "EXAMPLE.com/x",
            &"k".repeat(64),
        ] {
            assert!(validate_label_key(bad).is_err(), "{bad}");
        }
        for ok in ["", "eu", "eu-west.1", "A_b"] {
            assert!(validate_label_value(ok).is_ok(), "{ok}");
        }
        for bad in ["-eu", "eu west", "x/y", &"v".repeat(64)] {
            assert!(validate_label_value(bad).is_err(), "{bad}");
        }
    }
}
