//! Dotted key paths into a JSON value, as messages show them: `gateway.auth.mode`,
//! `channels.telegram.allowFrom[0]`, `models.providers["api.example.com"]`.

use serde_json::Value;

/// Whether `key` can be written bare after a dot. Anything else is written quoted, in
/// brackets, as a JSON string: `a["x.y"]`, `a[""]`, `a["two words"]`.
fn is_plain(key: &str) -> bool {
    !key.is_empty()
        && key.chars().all(|c| {
            !matches!(c, '.' | '[' | ']' | '"' | '\'') && !c.is_whitespace() && !c.is_control()
        })
}

/// Appends `key` to `path` in place.
pub fn push_key(path: &mut String, key: &str) {
    if is_plain(key) {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        path.push('[');
        path.push_str(&quote(key));
        path.push(']');
    }
}

/// Appends an array index to `path` in place.
pub fn push_index(path: &mut String, index: usize) {
    path.push('[');
    path.push_str(&index.to_string());
    path.push(']');
}

/// The path of `key` inside the object at `parent` (`""` is the root).
pub fn key(parent: &str, key: &str) -> String {
    let mut path = String::with_capacity(parent.len() + key.len() + 1);
    path.push_str(parent);
    push_key(&mut path, key);
    path
}

/// The path of element `index` of the array at `parent` (`""` is the root).
pub fn index(parent: &str, index: usize) -> String {
    let mut path = String::with_capacity(parent.len() + 4);
    path.push_str(parent);
    push_index(&mut path, index);
    path
}

/// The dotted path of an RFC 6901 JSON pointer (`/channels/telegram/allowFrom/0`), read
/// against `value` so that a segment is an index only where the value holds an array there.
/// Segments below the end of `value` are taken as keys.
pub fn from_pointer(value: &Value, pointer: &str) -> String {
    let mut path = String::new();
    let Some(rest) = pointer.strip_prefix('/') else {
        return path;
    };
    let mut current = Some(value);
    for raw in rest.split('/') {
        let segment = raw.replace("~1", "/").replace("~0", "~");
        match current {
            Some(Value::Array(items)) => match segment.parse::<usize>() {
                Ok(i) => {
                    push_index(&mut path, i);
                    current = items.get(i);
                }
                Err(_) => {
                    push_key(&mut path, &segment);
                    current = None;
                }
            },
            Some(Value::Object(map)) => {
                current = map.get(&segment);
                push_key(&mut path, &segment);
            }
            _ => {
                push_key(&mut path, &segment);
                current = None;
            }
        }
    }
    path
}

/// `key` as a JSON string literal.
fn quote(key: &str) -> String {
    // Serializing a `&str` cannot fail.
    serde_json::to_string(key).unwrap_or_else(|_| format!("\"{key}\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_keys_are_dotted_and_others_quoted() {
        assert_eq!(key("", "gateway"), "gateway");
        assert_eq!(key("gateway", "port"), "gateway.port");
        assert_eq!(
            key("models.providers", "api.example.com"),
            "models.providers[\"api.example.com\"]"
        );
        assert_eq!(key("", "x.y"), "[\"x.y\"]");
        assert_eq!(key("a", ""), "a[\"\"]");
        assert_eq!(key("a", "two words"), "a[\"two words\"]");
        assert_eq!(key("a", "say \"hi\""), "a[\"say \\\"hi\\\"\"]");
        assert_eq!(
            key("auth.profiles", "openai:default"),
            "auth.profiles.openai:default"
        );
        assert_eq!(key("groups", "*"), "groups.*");
        assert_eq!(
            index("channels.telegram.allowFrom", 0),
            "channels.telegram.allowFrom[0]"
        );
        assert_eq!(index("", 3), "[3]");
        assert_eq!(key(&index("a", 1), "b"), "a[1].b");
    }

    #[test]
    fn pointers_become_dotted_paths() {
        let v = json!({"channels": {"telegram": {"allowFrom": ["x"]}}, "m": {"0": {"a/b": 1}}});
        assert_eq!(from_pointer(&v, ""), "");
        assert_eq!(
            from_pointer(&v, "/channels/telegram/allowFrom/0"),
            "channels.telegram.allowFrom[0]"
        );
        assert_eq!(from_pointer(&v, "/m/0/a~1b"), "m.0.a/b");
        assert_eq!(from_pointer(&v, "/missing/1"), "missing.1");
    }
}
