//! How YAML is read, the same in the API and the CLI: YAML 1.2 booleans, a parser budget sized
//! for the largest request body, and parser errors as plain sentences.

use serde_saphyr::budget::BudgetBreach;

/// The largest YAML stream read at once (the `/apply` body limit).
pub const MAX_STREAM_BYTES: usize = 64 << 20;
/// Deepest nesting of lists and mappings (a manifest needs a handful of levels).
pub const MAX_DEPTH: usize = 64;

/// Parser options for every YAML document the server or the CLI reads:
/// - YAML 1.2 core booleans: `yes`, `no`, `on`, `off`, `y`, `n` (think `country: NO`) stay
///   strings;
/// - no source snippets in error messages (they are one line, with the position said apart);
/// - a budget that lets through anything that fits in [`MAX_STREAM_BYTES`] (documents, nodes,
///   events and text are bounded by the size itself) but keeps the limits on nesting and on
///   aliases, so an alias bomb still stops early.
pub fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_documents: MAX_STREAM_BYTES / 4,
            max_nodes: MAX_STREAM_BYTES,
            max_events: 2 * MAX_STREAM_BYTES + 16,
            max_total_scalar_bytes: MAX_STREAM_BYTES,
            max_depth: MAX_DEPTH,
        },
    }
}

/// A parser error as one plain sentence, without the position (report it from
/// [`serde_saphyr::Error::location`]) and without source snippets.
pub fn error_text(e: &serde_saphyr::Error) -> String {
    let mut inner = e;
    while let serde_saphyr::Error::WithSnippet { error, .. }
    | serde_saphyr::Error::AliasError { error, .. } = inner
    {
        inner = error;
    }
    if let serde_saphyr::Error::Budget { breach, .. } = inner {
        return budget_text(breach);
    }
    let text = inner.to_string();
    let text = match text.rfind(" at line ") {
        Some(i) if text[i..].contains("column") => &text[..i],
        _ => text.as_str(),
    };
    let text = text
        .trim()
        .replace('`', "'")
        .replace(", set DuplicateKeyPolicy in Options if acceptable", "");
    if text.contains("recursive references") {
        return "an alias refers to the node that contains it".into();
    }
    text
}

fn budget_text(breach: &BudgetBreach) -> String {
    match breach {
        BudgetBreach::Depth { .. } => format!(
            "lists and mappings are nested more than {MAX_DEPTH} levels deep; a manifest needs far fewer"
        ),
        BudgetBreach::Aliases { .. }
        | BudgetBreach::Anchors { .. }
        | BudgetBreach::AliasAnchorRatio { .. }
        | BudgetBreach::RecordedAnchorEvents { .. }
        | BudgetBreach::RecordedAnchorBytes { .. }
        | BudgetBreach::MergeKeys { .. } => {
            "the document uses too many anchors, aliases (*name) or merge keys (<<); write the values out instead".into()
        }
        BudgetBreach::SequenceUnbalanced => "the document ends in the middle of a list or mapping".into(),
        _ => format!(
            "the YAML is larger than this server reads at once ({} MiB); split it into several requests",
            MAX_STREAM_BYTES >> 20
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parse(text: &str) -> Result<Vec<Value>, serde_saphyr::Error> {
        serde_saphyr::from_multiple_with_options(text, options())
    }

    #[test]
    fn booleans_are_yaml_1_2() {
        let docs = parse("labels: {country: NO, debug: on, ok: true}\n").unwrap();
        assert_eq!(
            docs,
            [json!({"labels": {"country": "NO", "debug": "on", "ok": true}})]
        );
    }

    #[test]
    fn many_documents_and_nodes_fit() {
        let docs: String = (0..5_000).map(|i| format!("n: {i}\n---\n")).collect();
        assert_eq!(parse(&docs).unwrap().len(), 5_000);
        let list = format!("[{}]\n", vec!["1"; 300_000].join(","));
        assert_eq!(parse(&list).unwrap()[0].as_array().unwrap().len(), 300_000);
    }

    #[test]
    fn nesting_and_alias_bombs_are_still_refused_in_words() {
        let deep = format!("a: {}1{}\n", "[".repeat(100), "]".repeat(100));
        let e = parse(&deep).unwrap_err();
        assert_eq!(
            error_text(&e),
            "lists and mappings are nested more than 64 levels deep; a manifest needs far fewer"
        );
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let e = parse(&bomb).unwrap_err();
        let text = error_text(&e);
        assert!(!text.contains("budget") && !text.contains('{'), "{text}");
    }

    #[test]
    fn syntax_errors_are_one_plain_line() {
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(error_text(&e), "duplicate mapping key: a");
        assert_eq!(e.location().map(|l| l.line()), Some(2));
    }
}
