//! The layered openclaw.json: built-in defaults, then a platform template, tenant and project
//! overrides and the instance's own config, merged in that order; and, for every value of the
//! result, which layer set it.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::merge::merge_patch;
use super::{path, secretref};

/// Where a layer comes from, in the order layers are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// What every Gateway in a container needs ([`builtin`]).
    Builtin,
    /// A platform `ConfigTemplate`.
    Template,
    /// The tenant's override.
    Tenant,
    /// The project's override.
    Project,
    /// The instance's `spec.config`.
    Instance,
}

/// One merge patch in the stack.
#[derive(Clone, Debug)]
pub struct Layer<'a> {
    /// What kind of object the patch comes from.
    pub kind: LayerKind,
    /// The object, e.g. `configtemplate/default`, `tenant/acme`, `project/acme/helpdesk`,
    /// `openclawinstance/acme/helpdesk/bot`, `builtin`.
    pub source: String,
    /// The RFC 7396 merge patch.
    pub patch: &'a Value,
}

/// The built-in first layer: what every Gateway in a container needs (its port, listening on
/// the container's network rather than loopback).
pub fn builtin() -> Value {
    json!({"gateway": {"port": 18789, "bind": "lan"}})
}

/// The effective config: `{}` merge-patched with each layer in order. The caller passes the
/// [`builtin`] layer first.
pub fn render(layers: &[Layer]) -> Value {
    let mut out = Value::Object(Map::new());
    for layer in layers {
        merge_patch(&mut out, layer.patch);
    }
    out
}

/// Which layer set one value of the effective config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// Dotted path of the value; keys that need it are quoted, as in `a["x.y"]`. The root is
    /// `""`.
    pub path: String,
    /// The kind of the layer that set it last.
    pub kind: LayerKind,
    /// The layer's [`Layer::source`].
    pub source: String,
}

/// The effective config and, for every leaf of it (a scalar, an array, which layers replace
/// whole, an empty object, or a secret reference, which is one value), the layer that set it
/// last, in document order.
///
/// A leaf's origin is the last layer whose patch holds a non-null value at the leaf's path:
/// a later patch that sets a scalar or array there replaces the value, one that sets an object
/// there merges into it (and makes it an object, whatever it was before). Keys deleted by a
/// later `null` are not in the result, so they have no origin.
pub fn explain(layers: &[Layer]) -> (Value, Vec<Origin>) {
    let value = render(layers);
    let mut origins = Vec::new();
    let nodes: Vec<Option<&Value>> = layers.iter().map(|l| Some(l.patch)).collect();
    let mut at = String::new();
    collect_origins(&value, &nodes, layers, &mut at, &mut origins);
    (value, origins)
}

/// `nodes[i]` is layer `i`'s patch at the path `at` (None where it does not reach).
fn collect_origins(
    value: &Value,
    nodes: &[Option<&Value>],
    layers: &[Layer],
    at: &mut String,
    out: &mut Vec<Origin>,
) {
    match value {
        Value::Object(map) if !map.is_empty() && !secretref::is_ref_object(value) => {
            let mut children: Vec<Option<&Value>> = Vec::with_capacity(nodes.len());
            for (key, child) in map {
                children.clear();
                children.extend(nodes.iter().map(|node| match node {
                    Some(Value::Object(patch)) => patch.get(key),
                    _ => None,
                }));
                let len = at.len();
                path::push_key(at, key);
                collect_origins(child, &children, layers, at, out);
                at.truncate(len);
            }
        }
        _ => {
            let last = nodes
                .iter()
                .rposition(|node| node.is_some_and(|v| !v.is_null()));
            if let Some(layer) = last.and_then(|i| layers.get(i)) {
                out.push(Origin {
                    path: at.clone(),
                    kind: layer.kind,
                    source: layer.source.clone(),
                });
            }
        }
    }
}

/// Arrays whose one-line form is at most this long are printed on one line.
const INLINE_ARRAY_MAX: usize = 60;
/// Comments are aligned in one column, just after the longest commented line, but never further
/// right than this: a longer line gets its comment two spaces after it.
const COMMENT_COLUMN_MAX: usize = 64;

/// The effective file as indented JSON (2 spaces) where every leaf line ends with
/// `// <source>` of its origin, the comments aligned in one column. Removing the comments
/// leaves valid JSON (the text as it stands is valid JSON5). Arrays are printed on one line
/// when that is at most 60 characters, else expanded with the comment on their first line.
/// Secret references are printed on one line, as one leaf. Leaves without an origin get no
/// comment.
pub fn explain_text(value: &Value, origins: &[Origin]) -> String {
    let sources: HashMap<&str, &str> = origins
        .iter()
        .map(|o| (o.path.as_str(), o.source.as_str()))
        .collect();
    let mut lines = Vec::new();
    let mut printer = Printer {
        sources: &sources,
        lines: &mut lines,
    };
    let mut at = String::new();
    printer.value(value, 0, "", true, &mut at);

    let column = lines
        .iter()
        .filter(|l| l.comment.is_some())
        .map(|l| l.width)
        .filter(|w| *w <= COMMENT_COLUMN_MAX)
        .max()
        .unwrap_or(0)
        + 2;
    let mut out = String::with_capacity(lines.iter().map(|l| l.text.len() + 24).sum());
    for line in &lines {
        out.push_str(&line.text);
        if let Some(source) = line.comment {
            let pad = column.saturating_sub(line.width).max(2);
            out.extend(std::iter::repeat_n(' ', pad));
            out.push_str("// ");
            out.push_str(source);
        }
        out.push('\n');
    }
    out
}

struct Line<'s> {
    text: String,
    /// Width of `text` in characters.
    width: usize,
    comment: Option<&'s str>,
}

struct Printer<'s, 'o> {
    sources: &'o HashMap<&'s str, &'s str>,
    lines: &'o mut Vec<Line<'s>>,
}

impl<'s> Printer<'s, '_> {
    fn push(&mut self, text: String, comment: Option<&'s str>) {
        let width = text.chars().count();
        self.lines.push(Line {
            text,
            width,
            comment,
        });
    }

    /// Prints `value` at `indent` levels, its first line starting with `prefix` (the quoted key
    /// and `: `), followed by a comma unless `last`. `at` is its path.
    fn value(&mut self, value: &Value, indent: usize, prefix: &str, last: bool, at: &mut String) {
        let pad = "  ".repeat(indent);
        let comma = if last { "" } else { "," };
        match value {
            Value::Object(map) if !map.is_empty() && !secretref::is_ref_object(value) => {
                self.push(format!("{pad}{prefix}{{"), None);
                let n = map.len();
                for (i, (key, child)) in map.iter().enumerate() {
                    let len = at.len();
                    path::push_key(at, key);
                    let child_prefix = format!("{}: ", json_string(key));
                    self.value(child, indent + 1, &child_prefix, i + 1 == n, at);
                    at.truncate(len);
                }
                self.push(format!("{pad}}}{comma}"), None);
            }
            Value::Array(items) if !items.is_empty() => {
                let comment = self.sources.get(at.as_str()).copied();
                let inline = inline(value);
                if inline.chars().count() <= INLINE_ARRAY_MAX {
                    self.push(format!("{pad}{prefix}{inline}{comma}"), comment);
                } else {
                    self.push(format!("{pad}{prefix}["), comment);
                    let n = items.len();
                    for (i, item) in items.iter().enumerate() {
                        self.plain(item, indent + 1, "", i + 1 == n);
                    }
                    self.push(format!("{pad}]{comma}"), None);
                }
            }
            _ => {
                let comment = self.sources.get(at.as_str()).copied();
                self.push(format!("{pad}{prefix}{}{comma}", inline(value)), comment);
            }
        }
    }

    /// Prints a value inside an expanded array: indented JSON without comments.
    fn plain(&mut self, value: &Value, indent: usize, prefix: &str, last: bool) {
        let pad = "  ".repeat(indent);
        let comma = if last { "" } else { "," };
        match value {
            Value::Object(map) if !map.is_empty() => {
                self.push(format!("{pad}{prefix}{{"), None);
                let n = map.len();
                for (i, (key, child)) in map.iter().enumerate() {
                    let child_prefix = format!("{}: ", json_string(key));
                    self.plain(child, indent + 1, &child_prefix, i + 1 == n);
                }
                self.push(format!("{pad}}}{comma}"), None);
            }
            Value::Array(items) if !items.is_empty() => {
                let inline = inline(value);
                if inline.chars().count() <= INLINE_ARRAY_MAX {
                    self.push(format!("{pad}{prefix}{inline}{comma}"), None);
                } else {
                    self.push(format!("{pad}{prefix}["), None);
                    let n = items.len();
                    for (i, item) in items.iter().enumerate() {
                        self.plain(item, indent + 1, "", i + 1 == n);
                    }
                    self.push(format!("{pad}]{comma}"), None);
                }
            }
            _ => self.push(format!("{pad}{prefix}{}{comma}", inline(value)), None),
        }
    }
}

/// One-line JSON with a space after `,` and `:`: `[1, 2]`, `{"a": 1}`.
fn inline(value: &Value) -> String {
    let mut out = String::new();
    write_inline(value, &mut out);
    out
}

fn write_inline(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_inline(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&json_string(key));
                out.push_str(": ");
                write_inline(item, out);
            }
            out.push('}');
        }
        // Display of a scalar `Value` is its compact JSON text.
        scalar => {
            let _ = write!(out, "{scalar}");
        }
    }
}

fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openclaw::{fixtures, json5};
    use std::time::Instant;

    fn layer(kind: LayerKind, source: &str, patch: &Value) -> Layer<'static> {
        // Tests leak their small patches to get `'static` layers without lifetimes noise.
        Layer {
            kind,
            source: source.to_owned(),
            patch: Box::leak(Box::new(patch.clone())),
        }
    }

    fn origin_of<'a>(origins: &'a [Origin], path: &str) -> Option<&'a str> {
        origins
            .iter()
            .find(|o| o.path == path)
            .map(|o| o.source.as_str())
    }

    #[test]
    fn render_merges_in_order_from_an_empty_object() {
        assert_eq!(render(&[]), json!({}));
        let b = builtin();
        let layers = [
            layer(LayerKind::Builtin, "builtin", &b),
            layer(
                LayerKind::Template,
                "configtemplate/default",
                &json!({"gateway": {"auth": {"mode": "token"}}, "logging": {"level": "info"}}),
            ),
            layer(
                LayerKind::Instance,
                "openclawinstance/acme/helpdesk/bot",
                &json!({"logging": null, "gateway": {"port": 19000}}),
            ),
        ];
        assert_eq!(
            render(&layers),
            json!({"gateway": {"port": 19000, "bind": "lan", "auth": {"mode": "token"}}})
        );
    }

    #[test]
    fn explain_names_the_last_layer_that_set_each_leaf() {
        let b = builtin();
        let layers = [
            layer(LayerKind::Builtin, "builtin", &b),
            layer(
                LayerKind::Template,
                "configtemplate/regulated",
                &json!({
                    "gateway": {"auth": {"mode": "token"}},
                    "agents": {"defaults": {"model": "a", "tags": ["x"]}},
                    "tools": {"deny": ["exec"]},
                    "x": 1,
                }),
            ),
            layer(
                LayerKind::Tenant,
                "tenant/acme",
                &json!({"agents": {"defaults": {"tags": ["y", "z"]}}, "x": {"now": "object"}}),
            ),
            layer(
                LayerKind::Project,
                "project/acme/helpdesk",
                &json!({"tools": null, "agents": {"defaults": {"model": {"primary": "b"}}}}),
            ),
            layer(
                LayerKind::Instance,
                "openclawinstance/acme/helpdesk/bot",
                &json!({"gateway": {"port": 19000}, "x": {"now": null}, "empty": {}}),
            ),
        ];
        let (value, origins) = explain(&layers);
        assert_eq!(value, render(&layers));
        let paths: Vec<&str> = origins.iter().map(|o| o.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "gateway.port",
                "gateway.bind",
                "gateway.auth.mode",
                "agents.defaults.model.primary",
                "agents.defaults.tags",
                "x",
                "empty"
            ]
        );
        assert_eq!(
            origin_of(&origins, "gateway.port"),
            Some("openclawinstance/acme/helpdesk/bot")
        );
        assert_eq!(origin_of(&origins, "gateway.bind"), Some("builtin"));
        assert_eq!(
            origin_of(&origins, "gateway.auth.mode"),
            Some("configtemplate/regulated")
        );
        // An object set over a scalar, then a scalar over... whichever set it last.
        assert_eq!(
            origin_of(&origins, "agents.defaults.model.primary"),
            Some("project/acme/helpdesk")
        );
        // Arrays are one leaf, replaced whole.
        assert_eq!(
            origin_of(&origins, "agents.defaults.tags"),
            Some("tenant/acme")
        );
        // An object emptied by a later null: the layer that emptied it.
        assert_eq!(value["x"], json!({}));
        assert_eq!(
            origin_of(&origins, "x"),
            Some("openclawinstance/acme/helpdesk/bot")
        );
        // Deleted keys have no origin.
        assert_eq!(origin_of(&origins, "tools.deny"), None);
        let kinds: Vec<_> = origins.iter().map(|o| o.kind).collect();
        assert_eq!(kinds[1], LayerKind::Builtin);
        assert_eq!(kinds[4], LayerKind::Tenant);
    }

    #[test]
    fn explain_handles_scalar_layers_and_quoted_keys() {
        let layers = [
            layer(
                LayerKind::Template,
                "configtemplate/t",
                &json!({"a": {"b": 1}}),
            ),
            layer(LayerKind::Tenant, "tenant/t", &json!("replaced")),
        ];
        let (value, origins) = explain(&layers);
        assert_eq!(value, json!("replaced"));
        assert_eq!(origins.len(), 1);
        assert_eq!(origins[0].path, "");
        assert_eq!(origins[0].source, "tenant/t");

        let layers = [
            layer(
                LayerKind::Template,
                "configtemplate/t",
                &json!("scalar first"),
            ),
            layer(
                LayerKind::Tenant,
                "tenant/t",
                &json!({"m": {"api.example.com": true}}),
            ),
        ];
        let (_, origins) = explain(&layers);
        assert_eq!(origins[0].path, "m[\"api.example.com\"]");
        assert_eq!(origins[0].kind, LayerKind::Tenant);
    }

    #[test]
    fn origin_serializes_with_a_lowercase_kind() {
        let o = Origin {
            path: "gateway.port".into(),
            kind: LayerKind::Builtin,
            source: "builtin".into(),
        };
        assert_eq!(
            serde_json::to_value(&o).unwrap(),
            json!({"path": "gateway.port", "kind": "builtin", "source": "builtin"})
        );
    }

    fn sample_layers() -> Vec<Layer<'static>> {
        let b = builtin();
        vec![
            layer(LayerKind::Builtin, "builtin", &b),
            layer(
                LayerKind::Template,
                "configtemplate/regulated",
                &json!({
                    "gateway": {"auth": {"mode": "token", "token": {"secretRef": {"name": "gw", "key": "token"}}}},
                    "agents": {"defaults": {"workspace": "~/.openclaw/workspace", "model": {"primary": "anthropic/claude-opus-4-6", "fallbacks": ["openai/gpt-5.2"]}}},
                    "logging": {"level": "info", "redactSensitive": "tools"},
                }),
            ),
            layer(
                LayerKind::Tenant,
                "tenant/acme",
                &json!({
                    "channels": {"telegram": {"enabled": true, "dmPolicy": "allowlist", "allowFrom": ["tg:100000001", "tg:100000002", "tg:100000003", "tg:100000004", "tg:100000005"]}},
                    "logging": {"level": "debug"},
                }),
            ),
            layer(
                LayerKind::Instance,
                "openclawinstance/acme/helpdesk/bot",
                &json!({"gateway": {"port": 19000}, "messages": {"groupChat": {"mentionPatterns": ["@bot"]}}, "ui": {}, "x.y": [], "n": null}),
            ),
        ]
    }

    #[test]
    fn explain_text_snapshot() {
        let (value, origins) = explain(&sample_layers());
        // A secret reference is one leaf.
        assert_eq!(
            origin_of(&origins, "gateway.auth.token"),
            Some("configtemplate/regulated")
        );
        assert_eq!(
            origin_of(&origins, "gateway.auth.token.secretRef.name"),
            None
        );
        let text = explain_text(&value, &origins);
        insta::assert_snapshot!(text);
        // With the comments it is JSON5; it reads back as the same value.
        assert_eq!(json5::parse(&text).unwrap(), value);
    }

    #[test]
    fn explain_text_without_origins_has_no_comments_and_is_json() {
        let v =
            json!({"a": [1, {"b": [true, null]}], "s": "x // not a comment", "e": {}, "f": 1.5});
        let text = explain_text(&v, &[]);
        assert!(!text.contains("  //"), "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v);
        assert_eq!(explain_text(&json!({}), &[]), "{}\n");
        assert_eq!(explain_text(&json!(3), &[]), "3\n");
    }

    #[test]
    fn long_arrays_expand_with_the_comment_on_the_first_line() {
        let long: Vec<String> = (0..12).map(|i| format!("item-{i}")).collect();
        let v = json!({"list": long, "short": [1, 2]});
        let origins = [
            Origin {
                path: "list".into(),
                kind: LayerKind::Tenant,
                source: "tenant/a".into(),
            },
            Origin {
                path: "short".into(),
                kind: LayerKind::Builtin,
                source: "builtin".into(),
            },
        ];
        let text = explain_text(&v, &origins);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].starts_with("  \"list\": [") && lines[1].ends_with("// tenant/a"),
            "{text}"
        );
        assert_eq!(lines[2], "    \"item-0\",");
        assert!(
            lines[15].starts_with("  \"short\": [1, 2]") && lines[15].ends_with("// builtin"),
            "{text}"
        );
        // Comments aligned in one column.
        assert_eq!(lines[1].find("//"), lines[15].find("//"));
        assert_eq!(json5::parse(&text).unwrap(), v);
    }

    #[test]
    fn explain_is_fast_on_a_realistic_config() {
        // Four layers of a ~3 KB config; the budget is far below a millisecond in release
        // builds, the assertion leaves room for unoptimized builds on a busy machine.
        let layers = sample_layers();
        let big = fixtures::realistic_config();
        assert!(big.to_string().len() > 2_500, "{}", big.to_string().len());
        let layers = [
            layers[0].clone(),
            layer(LayerKind::Template, "configtemplate/big", &big),
            layers[2].clone(),
            layers[3].clone(),
        ];
        let runs = 200;
        let start = Instant::now();
        let mut total = 0;
        for _ in 0..runs {
            let (value, origins) = explain(&layers);
            total += explain_text(&value, &origins).len();
        }
        let per_run = start.elapsed() / runs;
        println!(
            "explain + explain_text: {per_run:?} per run ({} bytes)",
            total / runs as usize
        );
        assert!(per_run.as_millis() < 20, "{per_run:?}");
    }
}
