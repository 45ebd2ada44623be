//! How YAML is read, the same in the API and the CLI: YAML 1.2 booleans, a parser budget sized
//! for the largest request body, alias expansion bounded by the bytes it produces, and parser
//! errors as plain sentences.

use std::collections::HashMap;

use serde_saphyr::budget::BudgetBreach;
use serde_saphyr::granit_parser::{Event, Parser};

/// The largest YAML stream read at once (the `/apply` body limit).
pub const MAX_STREAM_BYTES: usize = 64 << 20;
/// Deepest nesting of lists and mappings (a manifest needs a handful of levels).
pub const MAX_DEPTH: usize = 64;

/// The most that aliases (`*name`, merge keys `<<: *name`) may add to a YAML stream when they
/// are expanded, counted as [`expansion_cost`] does: an alias bomb is refused here, before
/// anything is expanded, instead of after hundreds of megabytes.
pub const MAX_ALIAS_EXPANSION_BYTES: u64 = 4 << 20;
/// What one node (scalar, list or mapping) counts for besides its text: about what a parsed
/// node takes in memory.
const NODE_BYTES: u64 = 32;
/// Most anchors (`&name`) in one stream (the parser budget's default).
pub const MAX_ANCHORS: usize = 50_000;

/// Why a YAML stream was refused before it was parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExpansionError {
    #[error(
        "its aliases (*name) would expand it to more than {} MiB; write the values out instead",
        MAX_ALIAS_EXPANSION_BYTES >> 20
    )]
    TooLarge,
    #[error("it defines more than {MAX_ANCHORS} anchors (&name); write the values out instead")]
    TooManyAnchors,
}

/// What a node costs once parsed: [`NODE_BYTES`] plus its text, for every node inside it.
fn expansion_cost(text_len: usize) -> u64 {
    NODE_BYTES.saturating_add(text_len as u64)
}

/// Checks, from the parser's events alone (nothing is expanded, so this costs no more than
/// reading the text), that the stream's aliases add at most [`MAX_ALIAS_EXPANSION_BYTES`]
/// when expanded. The size of every anchored node is kept, aliases inside it counted at their
/// expanded size; each alias then adds the size of its anchor. Text the parser cannot read
/// passes: the deserializer reports that with its position.
pub fn check_alias_expansion(text: &str) -> Result<(), ExpansionError> {
    // Every alias and merge key is written with a '*'.
    if !text.contains('*') {
        return Ok(());
    }
    let mut sizes: HashMap<usize, u64> = HashMap::new();
    // Anchor id (0: none) and size so far of each collection being read.
    let mut open: Vec<(usize, u64)> = Vec::new();
    let mut expanded: u64 = 0;
    for item in Parser::new_from_str(text) {
        let Ok((event, _)) = item else {
            return Ok(());
        };
        let (anchor, size) = match event {
            Event::Scalar(value, _, anchor, _) => (anchor, expansion_cost(value.len())),
            Event::SequenceStart(_, anchor, _) | Event::MappingStart(_, anchor, _) => {
                open.push((anchor, expansion_cost(0)));
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match open.pop() {
                Some(done) => done,
                None => return Ok(()),
            },
            Event::Alias(id) => {
                let size = sizes.get(&id).copied().unwrap_or(0);
                expanded = expanded.saturating_add(size);
                if expanded > MAX_ALIAS_EXPANSION_BYTES {
                    return Err(ExpansionError::TooLarge);
                }
                (0, size)
            }
            _ => continue,
        };
        if anchor != 0 {
            if sizes.len() >= MAX_ANCHORS {
                return Err(ExpansionError::TooManyAnchors);
            }
            sizes.insert(anchor, size);
        }
        if let Some(parent) = open.last_mut() {
            parent.1 = parent.1.saturating_add(size);
        }
    }
    Ok(())
}

fn expansion_error(e: &ExpansionError) -> serde_saphyr::Error {
    serde_saphyr::Error::Message {
        msg: format!("the YAML is refused: {e}"),
        location: serde_saphyr::Location::UNKNOWN,
    }
}

/// One YAML document, read with [`options`] after [`check_alias_expansion`].
pub fn from_str<'de, T: serde::Deserialize<'de>>(text: &'de str) -> Result<T, serde_saphyr::Error> {
    check_alias_expansion(text).map_err(|e| expansion_error(&e))?;
    serde_saphyr::from_str_with_options(text, options())
}

/// Every document of a YAML stream, read with [`options`] after [`check_alias_expansion`].
pub fn from_multiple<'de, T: serde::Deserialize<'de>>(
    text: &'de str,
) -> Result<Vec<T>, serde_saphyr::Error> {
    check_alias_expansion(text).map_err(|e| expansion_error(&e))?;
    serde_saphyr::from_multiple_with_options(text, options())
}

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
            max_anchors: MAX_ANCHORS,
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
        from_multiple(text)
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

    /// `levels` anchors, each a list of `width` aliases to the one before; the first holds
    /// `width` copies of `leaf`.
    fn bomb(levels: usize, width: usize, leaf: &str) -> String {
        let row = |item: String| vec![item; width].join(", ");
        let mut text = format!("l0: &l0 [{}]\n", row(leaf.to_string()));
        for i in 1..levels {
            text.push_str(&format!("l{i}: &l{i} [{}]\n", row(format!("*l{}", i - 1))));
        }
        text
    }

    #[test]
    fn alias_expansion_is_bounded_by_the_bytes_it_produces() {
        // The billion laughs, and a few bytes of text that name one long scalar many times.
        let laughs = bomb(10, 10, "lol");
        assert!(laughs.len() < 1400);
        assert_eq!(
            check_alias_expansion(&laughs),
            Err(ExpansionError::TooLarge)
        );
        let long = format!(
            "a: &a {}\nb: [{}]\n",
            "x".repeat(64 << 10),
            vec!["*a"; 100].join(",")
        );
        assert_eq!(check_alias_expansion(&long), Err(ExpansionError::TooLarge));
        // Merge keys are aliases too.
        let mut merges = String::from("m0: &m0 {k: v}\n");
        for i in 1..40 {
            merges.push_str(&format!(
                "m{i}: &m{i} {{<<: [*m{p}, *m{p}], k{i}: v}}\n",
                p = i - 1
            ));
        }
        assert_eq!(
            check_alias_expansion(&merges),
            Err(ExpansionError::TooLarge)
        );

        // Reading the bomb through the same entry points as the API and the CLI refuses it in
        // words, before the parser expands anything.
        let e = from_multiple::<Value>(&laughs).unwrap_err();
        assert_eq!(
            error_text(&e),
            "the YAML is refused: its aliases (*name) would expand it to more than 4 MiB; write the values out instead"
        );
        assert!(from_str::<Value>(&laughs).is_err());

        // Under the limit, aliases expand as they always did.
        let fine = bomb(3, 10, "lol");
        assert_eq!(check_alias_expansion(&fine), Ok(()));
        let docs = from_multiple::<Value>(&fine).unwrap();
        assert_eq!(docs[0]["l2"].as_array().unwrap().len(), 10);
        assert_eq!(docs[0]["l2"][9][9][9], json!("lol"));
        // An alias to an anchor of another document, or to nothing, is the parser's to report.
        assert!(check_alias_expansion("a: *nothing\n").is_ok());
        assert!(from_str::<Value>("a: *nothing\n").is_err());
    }

    #[test]
    fn anchors_are_counted() {
        let many: String = (0..=MAX_ANCHORS).map(|i| format!("- &a{i} x\n")).collect();
        let with_alias = format!("{many}- *a0\n");
        assert_eq!(
            check_alias_expansion(&with_alias),
            Err(ExpansionError::TooManyAnchors)
        );
    }

    #[test]
    fn syntax_errors_are_one_plain_line() {
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(error_text(&e), "duplicate mapping key: a");
        assert_eq!(e.location().map(|l| l.line()), Some(2));
    }
}
