//! Reading manifests for `apply` and `delete -f`: files, directories and stdin, multi-document
//! YAML (JSON is YAML too), local validation, and the file/line of every problem.

use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use serde_saphyr::{Location, Spanned};

use super::CliError;
use crate::model::{FieldProblem, Kind, MAX_OBJECT_BYTES, Resource, Scope, validate_object};

/// A problem in an input document, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The file as the user named it (`<stdin>` for `-`).
    pub file: String,
    /// 1-based number of the document in its file (documents are separated by `---`).
    pub document: Option<usize>,
    /// 0-based position in the `items` of a list document (`get -o yaml` output).
    pub item: Option<usize>,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted field path, empty for the whole document.
    pub field: String,
    pub problem: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        f.write_str(": ")?;
        match (self.document, self.item) {
            (Some(doc), Some(item)) => write!(f, "document {doc}, items[{item}]: ")?,
            (Some(doc), None) => write!(f, "document {doc}: ")?,
            (None, _) => {}
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.problem)
    }
}

impl Located {
    fn file_problem(file: &str, problem: impl Into<String>) -> Located {
        Located {
            file: file.to_string(),
            document: None,
            item: None,
            line: None,
            column: None,
            field: String::new(),
            problem: problem.into(),
        }
    }

    /// One problem per line.
    pub fn join(problems: &[Located]) -> String {
        problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The text of one input: a file or standard input.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub text: String,
}

fn is_manifest_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

fn walk(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> Result<(), Box<Located>> {
    let shown = dir.display().to_string();
    let entries = fs::read_dir(dir).map_err(|e| {
        Box::new(Located::file_problem(
            &shown,
            format!("cannot read the directory: {e}"),
        ))
    })?;
    for entry in entries {
        let entry = entry.map_err(|e| {
            Box::new(Located::file_problem(
                &shown,
                format!("cannot read the directory: {e}"),
            ))
        })?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let is_dir = fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
        if is_dir {
            if recursive {
                walk(&path, recursive, out)?;
            }
        } else if is_manifest_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn read_file(path: &Path, shown: &str) -> Result<Source, Box<Located>> {
    let bytes = fs::read(path).map_err(|e| {
        Box::new(Located::file_problem(
            shown,
            format!("cannot read the file: {e}"),
        ))
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Box::new(Located::file_problem(
            shown,
            format!(
                "the file is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        ))
    })?;
    Ok(Source {
        name: shown.to_string(),
        text,
    })
}

/// Reads every input named by `-f`: files, directories (their `.yaml`/`.yml` files in name order,
/// subdirectories too when `recursive`), and `-` for standard input.
pub fn read_sources(paths: &[String], recursive: bool) -> Result<Vec<Source>, CliError> {
    let mut sources = Vec::new();
    let mut problems = Vec::new();
    let mut stdin_used = false;
    for p in paths {
        if p == "-" {
            if stdin_used {
                return Err(CliError::Usage(
                    "standard input (-f -) can be read only once".into(),
                ));
            }
            stdin_used = true;
            let mut text = String::new();
            match std::io::stdin().read_to_string(&mut text) {
                Ok(_) => sources.push(Source {
                    name: "<stdin>".into(),
                    text,
                }),
                Err(e) => problems.push(Located::file_problem(
                    "<stdin>",
                    format!("cannot read standard input: {e}"),
                )),
            }
            continue;
        }
        let path = Path::new(p);
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => {
                let mut files = Vec::new();
                match walk(path, recursive, &mut files) {
                    Ok(()) if files.is_empty() => problems.push(Located::file_problem(
                        p,
                        if recursive {
                            "the directory holds no .yaml or .yml files".to_string()
                        } else {
                            "the directory holds no .yaml or .yml files (use -R to read its subdirectories)".to_string()
                        },
                    )),
                    Ok(()) => {
                        files.sort();
                        for f in files {
                            match read_file(&f, &f.display().to_string()) {
                                Ok(s) => sources.push(s),
                                Err(e) => problems.push(*e),
                            }
                        }
                    }
                    Err(e) => problems.push(*e),
                }
            }
            Ok(_) => match read_file(path, p) {
                Ok(s) => sources.push(s),
                Err(e) => problems.push(*e),
            },
            Err(e) => problems.push(Located::file_problem(p, format!("cannot read: {e}"))),
        }
    }
    if problems.is_empty() {
        Ok(sources)
    } else {
        Err(CliError::Input(problems))
    }
}

/// A YAML node with the source locations of its keys and values.
#[derive(Debug, Clone)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<String>, Spanned<Node>)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a YAML value")
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
                Ok(Node::Uint(v))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Node, E> {
                Ok(i64::try_from(v)
                    .map(Node::Int)
                    .unwrap_or(Node::Float(v as f64)))
            }
            fn visit_u128<E>(self, v: u128) -> Result<Node, E> {
                Ok(u64::try_from(v)
                    .map(Node::Uint)
                    .unwrap_or(Node::Float(v as f64)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Str(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Node, E> {
                Ok(Node::Str(v))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Node, E> {
                Ok(Node::Str(String::from_utf8_lossy(v).into_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = a.next_element()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = a.next_key::<Spanned<String>>()? {
                    let value = a.next_value()?;
                    entries.push((key, value));
                }
                Ok(Node::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

impl Node {
    /// Converts to JSON; a value JSON cannot hold (`.inf`, `.nan`) is reported with its path.
    fn to_json(node: &Spanned<Node>, path: &str, problems: &mut Vec<(String, Location)>) -> Value {
        match &node.value {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::from(*i),
            Node::Uint(u) => Value::from(*u),
            Node::Float(f) => match Number::from_f64(*f) {
                Some(n) => Value::Number(n),
                None => {
                    problems.push((path.to_string(), node.referenced));
                    Value::Null
                }
            },
            Node::Str(s) => Value::String(s.clone()),
            Node::Seq(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| Node::to_json(item, &format!("{path}[{i}]"), problems))
                    .collect(),
            ),
            Node::Map(entries) => {
                let mut map = Map::new();
                for (k, v) in entries {
                    let child = if path.is_empty() {
                        k.value.clone()
                    } else {
                        format!("{path}.{}", k.value)
                    };
                    map.insert(k.value.clone(), Node::to_json(v, &child, problems));
                }
                Value::Object(map)
            }
        }
    }
}

/// Finds where a dotted field path (`spec.resources.memory`, `spec.env.1X`,
/// `metadata.labels.example.com/tier`, `spec.list[2].name`) is written. Keys may contain dots, so
/// at each level the longest key that starts the remaining path wins. Returns the location of the
/// deepest key found (the parent of a missing field).
fn locate(root: &Spanned<Node>, path: &str) -> Option<Location> {
    let mut node = root;
    let mut rest = path;
    let mut best: Option<Location> = None;
    while !rest.is_empty() {
        match &node.value {
            Node::Map(entries) => {
                let hit = entries
                    .iter()
                    .filter(|(k, _)| {
                        let k = k.value.as_str();
                        rest.strip_prefix(k)
                            .is_some_and(|after| after.is_empty() || after.starts_with(['.', '[']))
                    })
                    .max_by_key(|(k, _)| k.value.len());
                let Some((key, value)) = hit else { break };
                best = Some(key.referenced);
                rest = &rest[key.value.len()..];
                rest = rest.strip_prefix('.').unwrap_or(rest);
                node = value;
            }
            Node::Seq(items) => {
                let (index, after) = match rest.strip_prefix('[').and_then(|r| r.split_once(']')) {
                    Some((i, after)) => (i, after),
                    None => rest.split_once('.').unwrap_or((rest, "")),
                };
                let Some(item) = index.parse::<usize>().ok().and_then(|i| items.get(i)) else {
                    break;
                };
                best = Some(item.referenced);
                rest = after.strip_prefix('.').unwrap_or(after);
                node = item;
            }
            _ => break,
        }
    }
    best.filter(|l| l.line() > 0)
}

/// One `---`-separated piece of a file.
struct Chunk {
    /// Line in the file of the chunk's first line (1-based).
    first_line: usize,
    /// First line that is neither blank nor a comment.
    content_line: Option<usize>,
    text: String,
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// Splits a YAML stream at document markers (`---`, `...` at the start of a line). A marker line
/// stays in the next chunk with the marker blanked, so that lines and columns are unchanged.
fn split_documents(text: &str) -> Vec<Chunk> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut chunks = Vec::new();
    let mut current = Chunk {
        first_line: 1,
        content_line: None,
        text: String::new(),
    };
    for (i, raw) in text.split_inclusive('\n').enumerate() {
        let line_no = i + 1;
        let line = raw.trim_end_matches(['\n', '\r']);
        let mut owned;
        let mut this = raw;
        if is_marker(line, "---") || is_marker(line, "...") {
            chunks.push(std::mem::replace(
                &mut current,
                Chunk {
                    first_line: line_no,
                    content_line: None,
                    text: String::new(),
                },
            ));
            owned = String::with_capacity(raw.len());
            owned.push_str("   ");
            owned.push_str(&raw[3..]);
            this = &owned;
            if line.starts_with("...") {
                owned = "\n".to_string();
                this = &owned;
            }
        }
        let trimmed = this.trim();
        if current.content_line.is_none() && !trimmed.is_empty() && !trimmed.starts_with('#') {
            current.content_line = Some(line_no);
        }
        current.text.push_str(this);
    }
    chunks.push(current);
    chunks
}

/// Where a document is: its file, number and lines, and its parsed tree for finding fields.
#[derive(Debug, Clone)]
pub struct Place {
    pub file: String,
    pub document: usize,
    /// Position in the `items` of a list document.
    pub item: Option<usize>,
    /// The line where the document's content starts.
    pub line: usize,
    first_line: usize,
    node: Spanned<Node>,
}

impl Place {
    /// `file:line: document N`, the start of a message about the whole document.
    pub fn prefix(&self) -> String {
        match self.item {
            Some(i) => format!(
                "{}:{}: document {}, items[{i}]",
                self.file, self.line, self.document
            ),
            None => format!("{}:{}: document {}", self.file, self.line, self.document),
        }
    }

    /// A problem with a field of this document, with the field's line when it can be found.
    pub fn problem(&self, field: &str, problem: impl Into<String>) -> Located {
        let loc = if field.is_empty() {
            None
        } else {
            locate(&self.node, field)
        };
        let line = loc.map_or(self.line, |l| self.first_line + l.line() as usize - 1);
        Located {
            file: self.file.clone(),
            document: Some(self.document),
            item: self.item,
            line: Some(line),
            column: None,
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

/// One document of the input, parsed, defaulted and checked.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub place: Place,
    /// The document as JSON, with tenant/project defaults filled in.
    pub value: Value,
    pub resource: Resource,
}

impl Manifest {
    /// A problem with a field of this document.
    pub fn problem(&self, field: &str, problem: impl Into<String>) -> Located {
        self.place.problem(field, problem)
    }
}

/// How much checking [`load`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Structure and every rule on values (`apply`).
    Full,
    /// Structure only: enough to know which objects are named (`delete -f`).
    Structure,
}

/// Tenant and project filled into manifests that leave them out and whose kind needs them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Defaults<'a> {
    pub tenant: Option<&'a str>,
    pub project: Option<&'a str>,
}

fn fill_defaults(value: &mut Value, defaults: Defaults<'_>) {
    let Some(kind) = value
        .get("kind")
        .and_then(Value::as_str)
        .and_then(Kind::from_manifest)
    else {
        return;
    };
    let Some(Value::Object(meta)) = value.get_mut("metadata") else {
        return;
    };
    let scope = kind.scope();
    if scope != Scope::Cluster
        && !meta.contains_key("tenant")
        && let Some(t) = defaults.tenant
    {
        meta.insert("tenant".into(), Value::String(t.into()));
    }
    if scope == Scope::Project
        && !meta.contains_key("project")
        && let Some(p) = defaults.project
    {
        meta.insert("project".into(), Value::String(p.into()));
    }
}

/// A document `{"items": [...]}` (what `get -o yaml` and `get -o json` print) stands for its
/// items; any other document for itself.
fn split_list(node: Spanned<Node>, value: Value) -> Vec<(Option<usize>, Spanned<Node>, Value)> {
    let Value::Object(mut map) = value else {
        return vec![(None, node, value)];
    };
    let is_list = map.len() == 1 && map.get("items").is_some_and(Value::is_array);
    let item_nodes =
        match &node.value {
            Node::Map(entries) if is_list => entries
                .iter()
                .find(|(k, _)| k.value == "items")
                .and_then(|(_, v)| match &v.value {
                    Node::Seq(items) => Some(items.clone()),
                    _ => None,
                }),
            _ => None,
        };
    match (item_nodes, map.remove("items")) {
        (Some(nodes), Some(Value::Array(items))) if nodes.len() == items.len() => nodes
            .into_iter()
            .zip(items)
            .enumerate()
            .map(|(i, (n, v))| (Some(i), n, v))
            .collect(),
        (_, removed) => {
            if let Some(items) = removed {
                map.insert("items".into(), items);
            }
            vec![(None, node, Value::Object(map))]
        }
    }
}

/// Parses and checks every document of every source. Either every document is good, or every
/// problem found is returned (all documents are looked at, so one run shows them all).
pub fn load(
    sources: &[Source],
    defaults: Defaults<'_>,
    check: Check,
) -> Result<Vec<Manifest>, Vec<Located>> {
    let mut manifests = Vec::new();
    let mut problems = Vec::new();
    for source in sources {
        let mut number = 0;
        for chunk in split_documents(&source.text) {
            let Some(content_line) = chunk.content_line else {
                continue;
            };
            number += 1;
            let at = |line: usize, column: Option<usize>, field: &str, problem: String| Located {
                file: source.name.clone(),
                document: Some(number),
                item: None,
                line: Some(line),
                column,
                field: field.to_string(),
                problem,
            };
            if chunk.text.len() > MAX_OBJECT_BYTES {
                problems.push(at(
                    content_line,
                    None,
                    "",
                    format!(
                        "the document is {} bytes ({} KiB); a manifest may be at most {} KiB",
                        chunk.text.len(),
                        chunk.text.len().div_ceil(1024),
                        MAX_OBJECT_BYTES / 1024
                    ),
                ));
                continue;
            }
            let node: Spanned<Node> = match crate::yaml::from_str(&chunk.text) {
                Ok(n) => n,
                Err(e) => {
                    let (line, column) = match e.location().filter(|l| l.line() > 0) {
                        Some(l) => (
                            chunk.first_line + l.line() as usize - 1,
                            Some(l.column() as usize),
                        ),
                        None => (content_line, None),
                    };
                    problems.push(at(
                        line,
                        column,
                        "",
                        format!("invalid YAML: {}", crate::yaml::error_text(&e)),
                    ));
                    continue;
                }
            };
            let mut bad_numbers = Vec::new();
            let value = Node::to_json(&node, "", &mut bad_numbers);
            if !bad_numbers.is_empty() {
                for (field, loc) in bad_numbers {
                    let line = chunk.first_line + (loc.line() as usize).max(1) - 1;
                    problems.push(at(
                        line,
                        Some(loc.column() as usize),
                        &field,
                        "is not a finite number".into(),
                    ));
                }
                continue;
            }
            for (item, node, mut value) in split_list(node, value) {
                fill_defaults(&mut value, defaults);
                let line = match (item, node.referenced.line()) {
                    (Some(_), l) if l > 0 => chunk.first_line + l as usize - 1,
                    _ => content_line,
                };
                let place = Place {
                    file: source.name.clone(),
                    document: number,
                    item,
                    line,
                    first_line: chunk.first_line,
                    node,
                };
                let found: Vec<FieldProblem> = match Resource::from_value(value.clone()) {
                    Ok(resource) => {
                        let found = if check == Check::Full {
                            validate_object(&resource)
                        } else {
                            Vec::new()
                        };
                        if found.is_empty() {
                            manifests.push(Manifest {
                                place,
                                value,
                                resource,
                            });
                            continue;
                        }
                        found
                    }
                    Err(found) => found,
                };
                problems.extend(
                    found
                        .into_iter()
                        .map(|p| place.problem(&p.field, p.problem)),
                );
            }
        }
        if number == 0 {
            problems.push(Located::file_problem(
                &source.name,
                "holds no manifest (only blank lines or comments)",
            ));
        }
    }
    if problems.is_empty() {
        Ok(manifests)
    } else {
        Err(problems)
    }
}

/// Maps a field path of the server (`items[3].spec.replicas`) back to its document.
pub fn locate_item(manifests: &[Manifest], field: &str, problem: &str) -> Option<Located> {
    let rest = field.strip_prefix("items[")?;
    let (index, rest) = rest.split_once(']')?;
    let manifest = manifests.get(index.parse::<usize>().ok()?)?;
    Some(manifest.problem(rest.strip_prefix('.').unwrap_or(rest), problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(name: &str, text: &str) -> Source {
        Source {
            name: name.into(),
            text: text.into(),
        }
    }

    fn errors(text: &str) -> Vec<String> {
        match load(&[src("m.yaml", text)], Defaults::default(), Check::Full) {
            Ok(m) => panic!("expected problems, loaded {} manifests", m.len()),
            Err(p) => p.into_iter().map(|p| p.to_string()).collect(),
        }
    }

    const GOOD: &str = "\
# the tenant
apiVersion: clusterclaw.io/v1
kind: Tenant
metadata:
  name: acme
---
apiVersion: clusterclaw.io/v1
kind: Project
metadata: { name: helpdesk, tenant: acme }
--- # an instance
apiVersion: clusterclaw.io/v1
kind: OpenClawInstance
metadata:
  name: support-bot
  tenant: acme
  project: helpdesk
  labels:
    example.com/team: support
spec:
  version: 2026.7.1
  replicas: 3
  resources:
    cpu: 2
    memory: 4Gi
";

    #[test]
    fn multi_document_files_load_in_order() {
        let m = load(&[src("m.yaml", GOOD)], Defaults::default(), Check::Full).unwrap();
        let names: Vec<String> = m
            .iter()
            .map(|m| {
                format!(
                    "{}/{}",
                    m.resource.kind().lower(),
                    m.resource.metadata().name
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                "tenant/acme",
                "project/helpdesk",
                "openclawinstance/support-bot"
            ]
        );
        assert_eq!(
            m.iter()
                .map(|m| (m.place.document, m.place.line))
                .collect::<Vec<_>>(),
            [(1, 2), (2, 7), (3, 11)]
        );
        assert_eq!(m[2].value["spec"]["replicas"], 3);
    }

    #[test]
    fn field_lines_are_found_through_nested_and_dotted_keys() {
        let m = load(&[src("m.yaml", GOOD)], Defaults::default(), Check::Full).unwrap();
        let bot = &m[2];
        assert_eq!(bot.problem("spec.resources.memory", "x").line, Some(24));
        assert_eq!(bot.problem("spec.replicas", "x").line, Some(21));
        assert_eq!(
            bot.problem("metadata.labels.example.com/team", "x").line,
            Some(18)
        );
        // A missing field points at its parent.
        assert_eq!(
            bot.problem("spec.placement.hostSelector", "x").line,
            Some(19)
        );
        // Flow mappings too.
        assert_eq!(m[1].problem("metadata.tenant", "x").line, Some(9));
        assert_eq!(bot.problem("", "x").line, Some(11));
    }

    #[test]
    fn json_documents_have_lines_too() {
        let json = "{\n  \"apiVersion\": \"clusterclaw.io/v1\",\n  \"kind\": \"OpenClawInstance\",\n  \"metadata\": {\"name\": \"a\", \"tenant\": \"t\", \"project\": \"p\"},\n  \"spec\": {\n    \"version\": \"2026.7.1\",\n    \"replicas\": 1000\n  }\n}\n";
        let e = errors(json);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("m.yaml:7: document 1: spec.replicas: 1000 is out of range"),
            "{e:?}"
        );
    }

    #[test]
    fn syntax_errors_have_line_and_column_in_the_file() {
        let text = "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: a\n---\napiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata: [unclosed\n  name: b\n";
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("m.yaml:9:"), "{e:?}");
        assert!(e[0].contains("document 2: invalid YAML"), "{e:?}");
        let e = errors("kind: Tenant\nmetadata:\n  name: a\n   bad: indent\n");
        assert!(e[0].starts_with("m.yaml:4:"), "{e:?}");
    }

    #[test]
    fn every_bad_document_is_reported() {
        let text = "\
apiVersion: clusterclaw.io/v1
kind: Pod
metadata: {name: x}
---
apiVersion: clusterclaw.io/v1
kind: OpenClawInstance
metadata: {name: Bad_Name, tenant: a, project: b}
spec:
  version: 2026.7.1
  replicaz: 2
---
apiVersion: clusterclaw.io/v1
kind: OpenClawInstance
metadata: {name: ok, tenant: a, project: b}
spec:
  version: 2026.7.1
  replicas: -1
  resources:
    memory: 4GB
";
        let e = errors(text);
        assert!(
            e[0].starts_with("m.yaml:2: document 1: kind: unknown kind \"Pod\""),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("m.yaml:10: document 2: spec.replicaz: unknown field"),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("m.yaml:17: document 3: spec.replicas: -1 is out of range")),
            "{e:?}"
        );
        assert!(
            e.iter().any(
                |l| l.starts_with("m.yaml:19: document 3: spec.resources.memory:")
                    && l.contains("4Gi")
            ),
            "{e:?}"
        );
    }

    #[test]
    fn names_are_checked_once_structure_is_fine() {
        let e =
            errors("apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: Acme_Corp\n");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("m.yaml:4: document 1: metadata.name:") && e[0].contains("lower case"),
            "{e:?}"
        );
    }

    #[test]
    fn defaults_fill_only_missing_scope_fields_that_the_kind_needs() {
        let text = "apiVersion: clusterclaw.io/v1\nkind: OpenClawInstance\nmetadata: {name: a, project: mine}\nspec: {version: 2026.7.1}\n---\napiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata: {name: t}\n";
        let d = Defaults {
            tenant: Some("acme"),
            project: Some("helpdesk"),
        };
        let m = load(&[src("m.yaml", text)], d, Check::Full).unwrap();
        assert_eq!(m[0].value["metadata"]["tenant"], "acme");
        assert_eq!(m[0].value["metadata"]["project"], "mine");
        assert!(m[1].value["metadata"].get("tenant").is_none());
        let e = errors("apiVersion: clusterclaw.io/v1\nkind: Project\nmetadata: {name: p}\n");
        assert!(
            e[0].contains("metadata.tenant: is required") && e[0].starts_with("m.yaml:3:"),
            "{e:?}"
        );
    }

    #[test]
    fn oversized_documents_are_refused_before_parsing() {
        let blob = "x".repeat(MAX_OBJECT_BYTES);
        let text = format!(
            "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata: {{name: a}}\nspec:\n  description: {blob}\n"
        );
        let e = errors(&text);
        assert!(e[0].contains("at most 256 KiB"), "{e:?}");
    }

    #[test]
    fn empty_inputs_and_comment_only_documents() {
        let e = errors("# nothing here\n---\n\n");
        assert!(e[0].contains("holds no manifest"), "{e:?}");
        let text = "---\n# leading marker and a comment-only document\n---\napiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata: {name: a}\n...\n";
        let m = load(&[src("m.yaml", text)], Defaults::default(), Check::Full).unwrap();
        assert_eq!((m.len(), m[0].place.document, m[0].place.line), (1, 1, 4));
    }

    #[test]
    fn list_documents_stand_for_their_items() {
        let text = "\
items:
- apiVersion: clusterclaw.io/v1
  kind: Tenant
  metadata:
    name: acme
    uid: 5c93a5eb
    resourceVersion: 4
- apiVersion: clusterclaw.io/v1
  kind: Project
  metadata:
    name: Help_Desk
    tenant: acme
";
        let e = match load(&[src("list.yaml", text)], Defaults::default(), Check::Full) {
            Ok(_) => panic!("the project name is invalid"),
            Err(e) => e,
        };
        assert_eq!(e.len(), 1);
        assert!(
            e[0].to_string()
                .starts_with("list.yaml:11: document 1, items[1]: metadata.name:"),
            "{}",
            e[0]
        );
        let good = text.replace("Help_Desk", "helpdesk");
        let m = load(&[src("list.yaml", &good)], Defaults::default(), Check::Full).unwrap();
        assert_eq!((m.len(), m[1].place.line, m[1].place.item), (2, 8, Some(1)));
        assert_eq!(m[0].value["metadata"]["resourceVersion"], 4);
    }

    #[test]
    fn server_item_paths_map_back_to_documents() {
        let m = load(&[src("m.yaml", GOOD)], Defaults::default(), Check::Full).unwrap();
        let l = locate_item(&m, "items[2].spec.resources.cpu", "too much").unwrap();
        assert_eq!(
            l.to_string(),
            "m.yaml:23: document 3: spec.resources.cpu: too much"
        );
        assert!(locate_item(&m, "items[9].spec", "x").is_none());
        assert!(locate_item(&m, "spec", "x").is_none());
    }

    #[test]
    fn directories_are_read_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b.yaml"), "b").unwrap();
        fs::write(dir.path().join("a.yml"), "a").unwrap();
        fs::write(dir.path().join("notes.txt"), "n").unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/c.yaml"), "c").unwrap();
        let d = dir.path().to_string_lossy().to_string();
        let flat: Vec<String> = read_sources(std::slice::from_ref(&d), false)
            .unwrap()
            .into_iter()
            .map(|s| s.text)
            .collect();
        assert_eq!(flat, ["a", "b"]);
        let deep: Vec<String> = read_sources(&[d], true)
            .unwrap()
            .into_iter()
            .map(|s| s.text)
            .collect();
        assert_eq!(deep, ["a", "b", "c"]);
        let empty = tempfile::tempdir().unwrap();
        let err = read_sources(&[empty.path().to_string_lossy().to_string()], false).unwrap_err();
        assert_eq!(err.exit_code(), 4);
        let err = read_sources(&["/nonexistent/m.yaml".to_string()], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/m.yaml"), "{err}");
    }

    #[test]
    fn yaml_is_read_as_the_server_reads_it() {
        let text = "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: acme\n  labels: {country: NO, debug: on}\n";
        let m = load(&[src("m.yaml", text)], Defaults::default(), Check::Full).unwrap();
        assert_eq!(
            m[0].value["metadata"]["labels"],
            serde_json::json!({"country": "NO", "debug": "on"}),
            "YAML 1.2 booleans only, as the API"
        );
    }
}
