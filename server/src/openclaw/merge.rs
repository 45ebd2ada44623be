//! RFC 7396 JSON merge patch: applying a patch, and computing the smallest patch between two
//! values.

use serde_json::{Map, Value};

use super::path;

/// A value that no merge patch can produce: it holds `null` as the value of an object key,
/// and `null` in a merge patch deletes the key instead of setting it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} is null, and a JSON merge patch cannot set a key to null (null in a patch deletes the key); remove the key or give it a value",
    if path.is_empty() { "the document" } else { path.as_str() }
)]
pub struct NotRepresentable {
    /// Dotted key path of the `null` value.
    pub path: String,
}

/// Applies `patch` to `target` as RFC 7396 says: an object patch merges key by key, recursing
/// into objects, with `null` deleting a key; any other patch (arrays included) replaces the
/// target whole. Existing keys keep their place; new keys are appended in the patch's order.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        merge_objects(target, patch);
    }
}

fn merge_objects(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        if value.is_null() {
            target.shift_remove(key);
            continue;
        }
        match target.get_mut(key) {
            Some(existing) => merge_patch(existing, value),
            None => {
                let mut fresh = Value::Null;
                merge_patch(&mut fresh, value);
                target.insert(key.clone(), fresh);
            }
        }
    }
}

/// The smallest merge patch `p` with `merge_patch(from, p) == to`: keys that are unchanged are
/// left out, removed keys are `null`, objects are diffed key by key, and everything else
/// (scalars, arrays, an object replacing a non-object) is carried whole.
///
/// `to` holding `null` as the value of an object key (at any depth reached through objects)
/// cannot be written as a merge patch, unless `from` holds the same `null` there already (the
/// patch then leaves it alone): that is [`NotRepresentable`], naming the first such key.
pub fn diff_patch(from: &Value, to: &Value) -> Result<Value, NotRepresentable> {
    let mut at = String::new();
    diff_at(from, to, &mut at)
}

fn diff_at(from: &Value, to: &Value, at: &mut String) -> Result<Value, NotRepresentable> {
    let Value::Object(to_map) = to else {
        // A non-object patch replaces the target whole, whatever the target was.
        return Ok(to.clone());
    };
    let Value::Object(from_map) = from else {
        // The patch is applied to `{}`: it must be `to` itself, which must hold no null.
        check_no_null_member(to_map, at)?;
        return Ok(to.clone());
    };
    let mut patch = Map::new();
    for key in from_map.keys() {
        if !to_map.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    for (key, to_value) in to_map {
        let len = at.len();
        path::push_key(at, key);
        match from_map.get(key) {
            Some(from_value) if from_value == to_value => {}
            _ if to_value.is_null() => return Err(NotRepresentable { path: at.clone() }),
            Some(from_value) => {
                let sub = diff_at(from_value, to_value, at)?;
                patch.insert(key.clone(), sub);
            }
            None => {
                let sub = diff_at(&Value::Null, to_value, at)?;
                patch.insert(key.clone(), sub);
            }
        }
        at.truncate(len);
    }
    Ok(Value::Object(patch))
}

fn check_no_null_member(map: &Map<String, Value>, at: &mut String) -> Result<(), NotRepresentable> {
    for (key, value) in map {
        let len = at.len();
        path::push_key(at, key);
        match value {
            Value::Null => return Err(NotRepresentable { path: at.clone() }),
            Value::Object(inner) => check_no_null_member(inner, at)?,
            _ => {}
        }
        at.truncate(len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use serde_json::json;

    fn merged(target: Value, patch: Value) -> Value {
        let mut t = target;
        merge_patch(&mut t, &patch);
        t
    }

    /// The examples of RFC 7396, appendix A.
    #[test]
    fn rfc_7396_appendix_a() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, want) in cases {
            assert_eq!(
                merged(target.clone(), patch.clone()),
                want,
                "{target} + {patch}"
            );
        }
    }

    #[test]
    fn key_order_is_kept_and_new_keys_are_appended() {
        let out = merged(
            json!({"z": 1, "a": 2, "m": 3}),
            json!({"b": 9, "a": null, "z": 5}),
        );
        let keys: Vec<_> = out.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["z", "m", "b"]);
        assert_eq!(out, json!({"z": 5, "m": 3, "b": 9}));
    }

    #[test]
    fn diff_patch_hand_written_cases() {
        let cases = [
            (json!({"a": 1}), json!({"a": 1}), json!({})),
            (json!({"a": 1, "b": 2}), json!({"a": 1}), json!({"b": null})),
            (
                json!({"a": {"x": 1, "y": 2}}),
                json!({"a": {"x": 1, "y": 3}}),
                json!({"a": {"y": 3}}),
            ),
            (json!({"a": [1, 2]}), json!({"a": [1]}), json!({"a": [1]})),
            (
                json!({"a": 1}),
                json!({"a": {"b": 2}}),
                json!({"a": {"b": 2}}),
            ),
            (json!({"a": {"b": 2}}), json!({"a": 1}), json!({"a": 1})),
            (
                json!({"a": {"b": 2}}),
                json!({"a": {}}),
                json!({"a": {"b": null}}),
            ),
            (json!(1), json!({"a": 1}), json!({"a": 1})),
            (json!({"a": 1}), json!([1]), json!([1])),
            (json!({"a": 1}), json!(null), json!(null)),
            (
                json!({"a": [null]}),
                json!({"a": [null, 1]}),
                json!({"a": [null, 1]}),
            ),
        ];
        for (from, to, want) in cases {
            let p = diff_patch(&from, &to).unwrap();
            assert_eq!(p, want, "diff {from} -> {to}");
            assert_eq!(merged(from, p), to);
        }
    }

    #[test]
    fn null_inside_an_object_is_not_representable() {
        let e = diff_patch(&json!({}), &json!({"a": {"b": null}})).unwrap_err();
        assert_eq!(e.path, "a.b");
        let e = diff_patch(&json!({"a": {"b": 1}}), &json!({"a": {"b": null}})).unwrap_err();
        assert_eq!(e.path, "a.b");
        let e = diff_patch(&json!(5), &json!({"x": {"y.z": null}})).unwrap_err();
        assert_eq!(e.path, "x[\"y.z\"]");
        assert!(e.to_string().contains("x[\"y.z\"] is null"), "{e}");
        // A null that is already there is left alone.
        assert_eq!(
            diff_patch(&json!({"a": null}), &json!({"a": null})).unwrap(),
            json!({})
        );
        let e = diff_patch(&json!({"a": null}), &json!({"a": null, "b": {"c": null}})).unwrap_err();
        assert_eq!(e.path, "b.c");
        // Nulls inside arrays are fine: arrays are replaced whole.
        assert!(diff_patch(&json!({}), &json!({"a": [{"b": null}]})).is_ok());
    }

    fn random_value(rng: &mut StdRng, depth: u32, allow_null: bool) -> Value {
        let top = if depth == 0 { 4 } else { 7 };
        match rng.random_range(0..top) {
            0 if allow_null => Value::Null,
            0 | 1 => json!(rng.random_range(0..3)),
            2 => json!(["x", "y", "z"][rng.random_range(0..3)]),
            3 => json!(rng.random_bool(0.5)),
            4 => {
                let n = rng.random_range(0..3);
                Value::Array((0..n).map(|_| random_value(rng, depth - 1, true)).collect())
            }
            _ => {
                let n = rng.random_range(0..4);
                let mut map = Map::new();
                for _ in 0..n {
                    let key = ["a", "b", "c", "d.e"][rng.random_range(0..4)];
                    map.insert(key.to_string(), random_value(rng, depth - 1, allow_null));
                }
                Value::Object(map)
            }
        }
    }

    fn has_null_member(v: &Value) -> bool {
        match v {
            Value::Object(m) => m.values().any(|v| v.is_null() || has_null_member(v)),
            _ => false,
        }
    }

    #[test]
    fn diff_then_merge_round_trips_on_random_values() {
        let mut rng = StdRng::seed_from_u64(7396);
        let mut representable = 0;
        for _ in 0..20_000 {
            let from = random_value(&mut rng, 3, true);
            let allow_null = rng.random_bool(0.2);
            let to = random_value(&mut rng, 3, allow_null);
            match diff_patch(&from, &to) {
                Ok(p) => {
                    representable += 1;
                    assert_eq!(merged(from.clone(), p.clone()), to, "from {from} patch {p}");
                    // Smallest: applying the patch to `to` changes nothing, and no key of the
                    // patch could be dropped.
                    assert_eq!(
                        merged(to.clone(), p.clone()),
                        to,
                        "patch {p} not idempotent"
                    );
                    if let (Value::Object(pm), Value::Object(_)) = (&p, &from) {
                        for key in pm.keys() {
                            let mut smaller = p.clone();
                            smaller.as_object_mut().unwrap().shift_remove(key);
                            assert_ne!(
                                merged(from.clone(), smaller),
                                to,
                                "{key} not needed in {p}"
                            );
                        }
                    }
                }
                Err(e) => {
                    assert!(has_null_member(&to), "{to} has no null, yet {e}");
                }
            }
        }
        assert!(representable > 10_000, "{representable}");
    }
}
