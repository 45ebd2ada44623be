//! Differences between two configs: key by key (for an API and a table), and as a unified
//! diff of the pretty-printed JSON (for a terminal).

use serde::Serialize;
use serde_json::Value;
use similar::TextDiff;

use super::{path, secretref};

/// One leaf-level difference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Change {
    /// A value only the second config has.
    Added {
        /// Dotted path.
        path: String,
        /// The new value.
        value: Value,
    },
    /// A value only the first config has.
    Removed {
        /// Dotted path.
        path: String,
        /// The old value.
        value: Value,
    },
    /// A value both have, different.
    Changed {
        /// Dotted path.
        path: String,
        /// The old value.
        from: Value,
        /// The new value.
        to: Value,
    },
}

impl Change {
    /// The dotted path of the change.
    pub fn path(&self) -> &str {
        match self {
            Change::Added { path, .. }
            | Change::Removed { path, .. }
            | Change::Changed { path, .. } => path,
        }
    }
}

/// The leaf-level differences from `a` to `b`, sorted by path. Leaves are scalars, arrays
/// (compared whole), empty objects and secret references (compared as values: they hold
/// names, not secrets). A subtree only one side has is listed leaf by leaf; where one side has
/// a leaf and the other an object, that is one change of the whole value.
pub fn key_diff(a: &Value, b: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    let mut at = String::new();
    diff_at(a, b, &mut at, &mut out);
    out.sort_by(|x, y| x.path().cmp(y.path()));
    out
}

/// Whether `value` has children to compare one by one.
fn is_branch(value: &Value) -> bool {
    matches!(value, Value::Object(m) if !m.is_empty()) && !secretref::is_ref_object(value)
}

fn diff_at(a: &Value, b: &Value, at: &mut String, out: &mut Vec<Change>) {
    if a == b {
        return;
    }
    match (a, b) {
        (Value::Object(am), Value::Object(bm)) if is_branch(a) && is_branch(b) => {
            for (key, av) in am {
                let len = at.len();
                path::push_key(at, key);
                match bm.get(key) {
                    Some(bv) => diff_at(av, bv, at, out),
                    None => leaves(av, at, &mut |path, value| {
                        out.push(Change::Removed { path, value });
                    }),
                }
                at.truncate(len);
            }
            for (key, bv) in bm {
                if am.contains_key(key) {
                    continue;
                }
                let len = at.len();
                path::push_key(at, key);
                leaves(bv, at, &mut |path, value| {
                    out.push(Change::Added { path, value });
                });
                at.truncate(len);
            }
        }
        _ => out.push(Change::Changed {
            path: at.clone(),
            from: a.clone(),
            to: b.clone(),
        }),
    }
}

/// Calls `f` with every leaf under `value` (itself if it is one).
fn leaves(value: &Value, at: &mut String, f: &mut dyn FnMut(String, Value)) {
    match value {
        Value::Object(map) if is_branch(value) => {
            for (key, child) in map {
                let len = at.len();
                path::push_key(at, key);
                leaves(child, at, f);
                at.truncate(len);
            }
        }
        leaf => f(at.clone(), leaf.clone()),
    }
}

/// A unified diff of `a` and `b` pretty-printed as JSON (2 spaces), with `--- a_label` and
/// `+++ b_label` headers and `@@` hunks with `context` lines around each change. Empty when
/// the two print the same.
pub fn unified(a: &Value, b: &Value, a_label: &str, b_label: &str, context: usize) -> String {
    let old = pretty(a);
    let new = pretty(b);
    if old == new {
        return String::new();
    }
    TextDiff::from_lines(&old, &new)
        .unified_diff()
        .context_radius(context)
        .header(a_label, b_label)
        .to_string()
}

fn pretty(value: &Value) -> String {
    // Serializing a `Value` cannot fail; the compact form is a fallback that never runs.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn leaf_changes_sorted_by_path() {
        let a = json!({
            "gateway": {"port": 18789, "bind": "lan", "auth": {"mode": "token"}},
            "tools": {"deny": ["exec"]},
            "x": 1,
            "e": {},
        });
        let b = json!({
            "gateway": {"port": 19000, "bind": "lan", "auth": {"mode": "token", "token": "t"}},
            "channels": {"telegram": {"enabled": true, "allowFrom": ["1"]}},
            "x": {"y": 2},
            "e": {"now": "set"},
        });
        let changes = key_diff(&a, &b);
        assert_eq!(
            changes,
            [
                Change::Added {
                    path: "channels.telegram.allowFrom".into(),
                    value: json!(["1"])
                },
                Change::Added {
                    path: "channels.telegram.enabled".into(),
                    value: json!(true)
                },
                Change::Changed {
                    path: "e".into(),
                    from: json!({}),
                    to: json!({"now": "set"})
                },
                Change::Added {
                    path: "gateway.auth.token".into(),
                    value: json!("t")
                },
                Change::Changed {
                    path: "gateway.port".into(),
                    from: json!(18789),
                    to: json!(19000)
                },
                Change::Removed {
                    path: "tools.deny".into(),
                    value: json!(["exec"])
                },
                Change::Changed {
                    path: "x".into(),
                    from: json!(1),
                    to: json!({"y": 2})
                },
            ]
        );
        assert_eq!(key_diff(&a, &a), []);
    }

    #[test]
    fn arrays_are_compared_whole_and_paths_quoted() {
        let changes = key_diff(&json!({"a.b": [1, 2]}), &json!({"a.b": [1, 3]}));
        assert_eq!(
            changes,
            [Change::Changed {
                path: "[\"a.b\"]".into(),
                from: json!([1, 2]),
                to: json!([1, 3])
            }]
        );
        let changes = key_diff(&json!([1]), &json!({"a": 1}));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].path(), "");
    }

    #[test]
    fn secret_references_are_compared_as_values() {
        let r = |name: &str| json!({"secretRef": {"name": name, "key": "token"}});
        let a = json!({"gateway": {"auth": {"token": r("old")}}});
        let b = json!({"gateway": {"auth": {"token": r("new")}}, "extra": {"k": r("x")}});
        assert_eq!(
            key_diff(&a, &b),
            [
                Change::Added {
                    path: "extra.k".into(),
                    value: r("x")
                },
                Change::Changed {
                    path: "gateway.auth.token".into(),
                    from: r("old"),
                    to: r("new")
                },
            ]
        );
    }

    #[test]
    fn changes_serialize_tagged_by_op() {
        let changes = key_diff(&json!({"a": 1, "b": 2}), &json!({"a": 3, "c": 4}));
        assert_eq!(
            serde_json::to_value(&changes).unwrap(),
            json!([
                {"op": "changed", "path": "a", "from": 1, "to": 3},
                {"op": "removed", "path": "b", "value": 2},
                {"op": "added", "path": "c", "value": 4},
            ])
        );
    }

    #[test]
    fn unified_diff_of_pretty_json() {
        let a = json!({"gateway": {"port": 18789, "bind": "lan"}, "logging": {"level": "info"}});
        let b = json!({"gateway": {"port": 19000, "bind": "lan"}, "logging": {"level": "info"}});
        let text = unified(&a, &b, "revision 3", "revision 4", 1);
        assert_eq!(
            text,
            "--- revision 3\n+++ revision 4\n@@ -2,3 +2,3 @@\n   \"gateway\": {\n-    \"port\": 18789,\n+    \"port\": 19000,\n     \"bind\": \"lan\"\n"
        );
        assert_eq!(unified(&a, &a, "x", "y", 3), "");
        let whole = unified(&a, &b, "x", "y", 100);
        assert!(whole.contains("   \"logging\": {"), "{whole}");
    }
}
