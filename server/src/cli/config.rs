//! `clusterclaw config`: the CLI settings in effect, and the config center: an instance's
//! effective openclaw.json, its revisions, diffs and rollbacks, and writing a config layer.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, IsTerminal, Read};

use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::client::{ApiError, Client, http_client, transport_error};
use super::manifest::Located;
use super::output::{self, table};
use super::resolve::{self, object_path};
use super::settings::{ClientOpts, Settings, Source};
use super::{CliError, CliResult, block_on, print_out};
use crate::model::{API_VERSION, Kind, MAX_OBJECT_BYTES, ObjectKey, validate_dns_label};

/// Request header with the reason for a change; the server records it on the config
/// revisions the change creates.
pub const CHANGE_MESSAGE_HEADER: &str = "X-Clusterclaw-Change-Message";
/// Answer header of a write: `created`, `configured` or `unchanged`.
pub const OUTCOME_HEADER: &str = "X-Clusterclaw-Outcome";
/// Longest change message the server records, in characters.
pub const MAX_CHANGE_MESSAGE_CHARS: usize = 500;

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const CYAN: &str = "\x1b[36m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

const RENDER_ONLY_INSTANCES: &str = "config render works on instances; the layers of templates, tenants and projects are shown by `clusterclaw get KIND NAME -o yaml`";

#[derive(Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the settings in effect (the token redacted) and their sources
    View,
    /// Print the effective openclaw.json of an instance: its template, tenant, project and
    /// instance layers merged
    #[command(after_help = "\
Examples:
  clusterclaw config render instance bot -t acme -p helpdesk
  clusterclaw config render instance bot --explain      # which layer set each key
  clusterclaw config render instance bot -o yaml        # the whole answer: revision, hash, layers")]
    Render(RenderArgs),
    /// List the config revisions of an instance, newest first
    #[command(after_help = "\
Example:
  clusterclaw config history instance bot -t acme -p helpdesk")]
    History(HistoryArgs),
    /// Show what changed in an instance's config between two revisions
    #[command(after_help = "\
The exit code is 0 whether or not the revisions differ.

Examples:
  clusterclaw config diff instance bot 3 7
  clusterclaw config diff instance bot 3 7 --keys       # one line per changed key")]
    Diff(DiffArgs),
    /// Make an old revision of an instance's config current again (as a new revision)
    #[command(after_help = "\
Example:
  clusterclaw config rollback instance bot --to 3 -m \"port change broke the webhook\"")]
    Rollback(RollbackArgs),
    /// Replace the config layer of a template, tenant, project or instance with a file
    #[command(after_help = "\
The file is JSON or JSON5 (comments, unquoted keys, trailing commas); the server parses it and
reports mistakes by line and column. A template that does not exist yet is created. When the
object changes between reading and writing it, nothing is written and the command fails with a
conflict: run it again.

Layers merge in this order, later ones winning key by key (RFC 7396 JSON merge patch):
  template < tenant < project < instance

Examples:
  clusterclaw config set template default -f platform.json5 -m \"raise the log level\"
  clusterclaw config set project helpdesk -t acme -f helpdesk.json5
  clusterclaw config set instance bot -t acme -p helpdesk -f - < bot.json5")]
    Set(SetArgs),
}

/// Parses the KIND of `config history|diff|rollback`, which work on instances only.
fn instance_kind(command: &'static str) -> impl Fn(&str) -> Result<Kind, String> + Clone {
    move |s: &str| match (Kind::from_user(s), is_template_alias(s)) {
        (Some(Kind::OpenClawInstance), _) => Ok(Kind::OpenClawInstance),
        (Some(_), _) | (None, true) if command == "render" => Err(RENDER_ONLY_INSTANCES.into()),
        (Some(_), _) | (None, true) => Err(format!(
            "config {command} works on instances, which keep config revisions; a template, \
             tenant or project layer is changed by `clusterclaw config set KIND NAME -f FILE` \
             and shown by `clusterclaw get KIND NAME -o yaml`"
        )),
        (None, false) => Err(format!(
            "unknown kind {s:?}; config {command} works on instances (instance, inst)"
        )),
    }
}

fn is_template_alias(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "template" | "templates" | "configtemplate" | "configtemplates" | "ct"
    )
}

/// The object whose config layer `config set` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// A cluster-wide `ConfigTemplate`.
    Template,
    Tenant,
    Project,
    Instance,
}

fn parse_layer(s: &str) -> Result<Layer, String> {
    if is_template_alias(s) {
        return Ok(Layer::Template);
    }
    match Kind::from_user(s) {
        Some(Kind::Tenant) => Ok(Layer::Tenant),
        Some(Kind::Project) => Ok(Layer::Project),
        Some(Kind::OpenClawInstance) => Ok(Layer::Instance),
        Some(other) => Err(format!(
            "a {} has no config layer; KIND is template, tenant, project or instance",
            other.lower()
        )),
        None => Err(format!(
            "unknown kind {s:?}; KIND is template (ct), tenant (tn), project (pj) or instance (inst)"
        )),
    }
}

/// The reason for a change (`-m`), sent as [`CHANGE_MESSAGE_HEADER`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeMessage(String);

impl ChangeMessage {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Parses `-m`: 1 to [`MAX_CHANGE_MESSAGE_CHARS`] characters on one line, without control
/// characters. Surrounding white space is dropped.
pub fn parse_message(s: &str) -> Result<ChangeMessage, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("the change message is empty; leave out -m to record none".into());
    }
    let n = s.chars().count();
    if n > MAX_CHANGE_MESSAGE_CHARS {
        return Err(format!(
            "the change message has {n} characters; at most {MAX_CHANGE_MESSAGE_CHARS} are recorded"
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!(
            "the change message holds the control character {c:?}; write it on one line, without tabs"
        ));
    }
    Ok(ChangeMessage(s.to_string()))
}

/// `-o` of `config render` and `config diff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AnswerFormat {
    /// The server's whole answer as JSON
    Json,
    /// The server's whole answer as YAML
    Yaml,
}

/// `-o` of `config history`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum HistoryFormat {
    /// Aligned columns
    #[default]
    Table,
    /// {"items":[...]}, every field of every revision
    Json,
    /// items: [...], every field of every revision
    Yaml,
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    /// instance (also inst, oci, openclawinstance)
    #[arg(value_parser = instance_kind("render"), value_name = "KIND")]
    pub kind: Kind,
    /// The instance's name
    pub name: String,
    /// Print the file with a comment on every line naming the layer that set it, and the
    /// layers in merge order
    #[arg(long)]
    pub explain: bool,
    /// Print the server's whole answer (revision, hash, layers, config) instead of the file
    #[arg(short = 'o', long, value_enum, value_name = "FORMAT")]
    pub output: Option<AnswerFormat>,
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// instance (also inst, oci, openclawinstance)
    #[arg(value_parser = instance_kind("history"), value_name = "KIND")]
    pub kind: Kind,
    /// The instance's name
    pub name: String,
    /// Output format
    #[arg(short = 'o', long, value_enum, default_value_t = HistoryFormat::Table)]
    pub output: HistoryFormat,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// instance (also inst, oci, openclawinstance)
    #[arg(value_parser = instance_kind("diff"), value_name = "KIND")]
    pub kind: Kind,
    /// The instance's name
    pub name: String,
    /// The older revision
    #[arg(value_name = "REV_A", value_parser = clap::value_parser!(u64).range(1..))]
    pub from: u64,
    /// The newer revision
    #[arg(value_name = "REV_B", value_parser = clap::value_parser!(u64).range(1..))]
    pub to: u64,
    /// One line per changed key (`~ gateway.port: 18789 -> 18790`) instead of a unified diff
    #[arg(long, conflicts_with = "output")]
    pub keys: bool,
    /// Print the server's whole answer instead
    #[arg(short = 'o', long, value_enum, value_name = "FORMAT")]
    pub output: Option<AnswerFormat>,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// instance (also inst, oci, openclawinstance)
    #[arg(value_parser = instance_kind("rollback"), value_name = "KIND")]
    pub kind: Kind,
    /// The instance's name
    pub name: String,
    /// The revision whose config becomes current again
    #[arg(long, value_name = "REV", value_parser = clap::value_parser!(u64).range(1..))]
    pub to: u64,
    /// Why: recorded on the new revision (at most 500 characters, one line)
    #[arg(short = 'm', long, value_parser = parse_message, value_name = "MESSAGE")]
    pub message: Option<ChangeMessage>,
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// template (ct), tenant (tn), project (pj) or instance (inst)
    #[arg(value_parser = parse_layer, value_name = "KIND")]
    pub layer: Layer,
    /// The object's name
    pub name: String,
    /// The config layer: a JSON or JSON5 file, or - for standard input
    #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
    pub file: String,
    /// Why: recorded on the config revisions the change creates (at most 500 characters, one
    /// line)
    #[arg(short = 'm', long, value_parser = parse_message, value_name = "MESSAGE")]
    pub message: Option<ChangeMessage>,
}

fn line(out: &mut String, key: &str, value: Option<String>, source: Source) {
    let value = value.map_or_else(|| "# not set".to_string(), |v| format!("{v:?}"));
    let assignment = if value.starts_with('#') {
        format!("# {key} {}", &value[2..])
    } else {
        format!("{key} = {value}")
    };
    out.push_str(&format!("{assignment:<48} # {source}\n"));
}

/// The text of `config view`.
pub fn render(s: &Settings) -> String {
    let exists = if s.config_path.exists() {
        ""
    } else {
        " (does not exist)"
    };
    let mut out = format!("# CLI config file: {}{exists}\n", s.config_path.display());
    line(&mut out, "server", Some(s.server.clone()), s.server_source);
    line(
        &mut out,
        "token",
        s.token.as_ref().map(|t| t.redacted()),
        s.token_source,
    );
    line(
        &mut out,
        "ca_cert",
        s.ca_cert.as_ref().map(|p| p.display().to_string()),
        s.ca_cert_source,
    );
    line(&mut out, "tenant", s.tenant.clone(), s.tenant_source);
    line(&mut out, "project", s.project.clone(), s.project_source);
    out
}

// ---- answers of the server ------------------------------------------------------------

/// One layer of an effective config, weakest first.
#[derive(Debug, Deserialize)]
struct LayerRef {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    source: String,
}

/// `GET INST/config`.
#[derive(Debug, Deserialize)]
struct Effective {
    revision: u64,
    #[serde(default)]
    config: Option<Value>,
    #[serde(default)]
    layers: Vec<LayerRef>,
    #[serde(default)]
    text: Option<String>,
}

/// One item of `GET INST/config/revisions`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RevisionInfo {
    revision: u64,
    #[serde(default)]
    hash: String,
    #[serde(default)]
    author: String,
    #[serde(default)]
    created_at: String,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Revisions {
    items: Vec<RevisionInfo>,
}

/// One change of `GET INST/config/diff`.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Change {
    Added {
        path: String,
        #[serde(default)]
        value: Value,
    },
    Removed {
        path: String,
        #[serde(default)]
        value: Value,
    },
    Changed {
        path: String,
        #[serde(default)]
        from: Value,
        #[serde(default)]
        to: Value,
    },
}

#[derive(Debug, Deserialize)]
struct Diff {
    #[serde(default)]
    changes: Vec<Change>,
    #[serde(default)]
    unified: String,
}

/// `POST INST/config/rollback`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RolledBack {
    revision: u64,
    rolled_back_to: u64,
}

fn decode<T: DeserializeOwned>(server: &str, answer: &Value) -> Result<T, CliError> {
    T::deserialize(answer).map_err(|e| {
        CliError::Failed(format!(
            "the server at {server} sent an answer this clusterclaw cannot read: {e}"
        ))
    })
}

// ---- formatting ----------------------------------------------------------------------------

/// Whether standard output gets colours: it is a terminal and `NO_COLOR` is unset or empty.
fn colour_wanted() -> bool {
    io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn paint(out: &mut String, colour: Option<&str>, text: &str) {
    match colour {
        Some(code) => {
            let _ = writeln!(out, "{code}{text}{RESET}");
        }
        None => {
            let _ = writeln!(out, "{text}");
        }
    }
}

/// `# revision 7 · layers: builtin < configtemplate/default < tenant/acme < ...`
fn explain_footer(e: &Effective) -> String {
    let layers: Vec<&str> = e
        .layers
        .iter()
        .map(|l| {
            if l.source.is_empty() {
                l.kind.as_str()
            } else {
                l.source.as_str()
            }
        })
        .collect();
    let layers = if layers.is_empty() {
        "-".to_string()
    } else {
        layers.join(" < ")
    };
    format!("# revision {} · layers: {layers}\n", e.revision)
}

/// What `config render` prints without `-o`: the file, or with `explain` the annotated file and
/// its footer.
fn render_effective(server: &str, answer: &Value, explain: bool) -> Result<String, CliError> {
    let e: Effective = decode(server, answer)?;
    if explain {
        let Some(text) = e.text.as_deref() else {
            return Err(CliError::Failed(format!(
                "the server at {server} sent no explained file (the \"text\" field); it may be older than this clusterclaw"
            )));
        };
        let mut out = text.to_string();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&explain_footer(&e));
        return Ok(out);
    }
    match &e.config {
        Some(config) => output::to_json(config),
        None => Err(CliError::Failed(format!(
            "the server at {server} sent an effective config without its \"config\" field"
        ))),
    }
}

/// A message cell: one line, `-` when empty.
fn one_line(text: Option<&str>) -> String {
    let text: String = text
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    if text.is_empty() {
        "-".into()
    } else {
        text.to_string()
    }
}

/// The table of `config history`, newest revision first.
fn history_table(mut revisions: Vec<RevisionInfo>) -> String {
    revisions.sort_by_key(|r| std::cmp::Reverse(r.revision));
    let rows: Vec<Vec<String>> = revisions
        .iter()
        .map(|r| {
            vec![
                r.revision.to_string(),
                one_line(Some(&r.created_at)),
                one_line(Some(&r.author)),
                one_line(Some(&r.hash.chars().take(12).collect::<String>())),
                one_line(r.message.as_deref()),
            ]
        })
        .collect();
    table(&["REVISION", "CREATED", "AUTHOR", "HASH", "MESSAGE"], &rows)
}

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
}

/// `config diff --keys`: `~ a.b: 1 -> 2`, `+ a.c: true`, `- a.d: "x"`.
fn key_lines(changes: &[Change], colour: bool) -> String {
    let mut out = String::new();
    for c in changes {
        let (code, text) = match c {
            Change::Added { path, value } => (GREEN, format!("+ {path}: {}", compact(value))),
            Change::Removed { path, value } => (RED, format!("- {path}: {}", compact(value))),
            Change::Changed { path, from, to } => (
                YELLOW,
                format!("~ {path}: {} -> {}", compact(from), compact(to)),
            ),
        };
        paint(&mut out, colour.then_some(code), &text);
    }
    out
}

/// A unified diff, coloured like git's: headers bold, `-` red, `+` green, `@@` cyan.
fn unified_text(unified: &str, colour: bool) -> String {
    let mut out = String::new();
    for l in unified.lines() {
        let code = if !colour {
            None
        } else if l.starts_with("---") || l.starts_with("+++") {
            Some(BOLD)
        } else if l.starts_with("@@") {
            Some(CYAN)
        } else if l.starts_with('-') {
            Some(RED)
        } else if l.starts_with('+') {
            Some(GREEN)
        } else {
            None
        };
        paint(&mut out, code, l);
    }
    out
}

/// What `config diff` prints without `-o`.
fn diff_text(d: &Diff, from: u64, to: u64, keys: bool, colour: bool) -> String {
    let none = d.changes.is_empty() && (keys || d.unified.trim().is_empty());
    if none {
        return format!("no differences between revision {from} and revision {to}\n");
    }
    if keys {
        key_lines(&d.changes, colour)
    } else {
        unified_text(&d.unified, colour)
    }
}

// ---- writes ----------------------------------------------------------------------------------

/// The answer to a write: the server's outcome (`created`, `configured`, `unchanged`) and body.
#[derive(Debug)]
pub(super) struct WriteAnswer {
    pub outcome: String,
    pub body: Value,
}

/// Sends a write with an optional change message ([`CHANGE_MESSAGE_HEADER`]); a non-2xx answer
/// becomes [`CliError::Api`], as with [`Client::send`].
pub(super) async fn write(
    settings: &Settings,
    method: Method,
    path: &str,
    body: &Value,
    message: Option<&ChangeMessage>,
) -> Result<WriteAnswer, CliError> {
    let token = settings.require_token()?;
    let server = settings.server.trim_end_matches('/');
    let http = http_client(server, settings.ca_cert.as_deref())?;
    let bytes = serde_json::to_vec(body)
        .map_err(|e| CliError::Failed(format!("cannot encode the request: {e}")))?;
    let mut req = http
        .request(method, format!("{server}{path}"))
        .bearer_auth(token.expose())
        .header(ACCEPT, "application/json")
        .header(CONTENT_TYPE, "application/json")
        .body(bytes);
    if let Some(m) = message {
        let value = HeaderValue::from_bytes(m.as_str().as_bytes()).map_err(|_| {
            CliError::Usage("the change message cannot be sent as an HTTP header".into())
        })?;
        req = req.header(CHANGE_MESSAGE_HEADER, value);
    }
    let resp = req.send().await.map_err(|e| transport_error(server, &e))?;
    let status = resp.status();
    let outcome = resp
        .headers()
        .get(OUTCOME_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| transport_error(server, &e))?;
    if !status.is_success() {
        let mut err = ApiError::from_body(status, &bytes);
        if status == reqwest::StatusCode::UNAUTHORIZED {
            err.message = format!(
                "{} (server {server}; the token comes from --token, CLUSTERCLAW_TOKEN or the CLI config file)",
                err.message.trim_end_matches('.')
            );
        }
        return Err(CliError::Api(err));
    }
    let body: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            CliError::Failed(format!(
                "the server at {server} sent an answer this clusterclaw cannot read: {e}"
            ))
        })?
    };
    let outcome = outcome
        .or_else(|| {
            body.get("outcome")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "configured".into());
    Ok(WriteAnswer { outcome, body })
}

/// Reads the file of `config set` (`-` is standard input) as text.
fn read_config_file(file: &str, stdin: &mut dyn Read) -> Result<(String, String), CliError> {
    let shown = if file == "-" { "<stdin>" } else { file };
    let problem = |problem: String| {
        CliError::Input(vec![Located {
            file: shown.to_string(),
            document: None,
            item: None,
            line: None,
            column: None,
            field: String::new(),
            problem,
        }])
    };
    let limit = MAX_OBJECT_BYTES as u64;
    let mut bytes = Vec::new();
    let read = if file == "-" {
        stdin.take(limit + 1).read_to_end(&mut bytes)
    } else {
        fs::File::open(file).and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
    };
    read.map_err(|e| problem(format!("cannot read the file: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(problem(format!(
            "the file is larger than {} KiB, the most an object may hold",
            limit / 1024
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        problem(format!(
            "the file is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(problem(
            "the file is empty; a config layer is a JSON or JSON5 object, {} for none".into(),
        ));
    }
    Ok((shown.to_string(), text))
}

/// Puts the file's text into `spec.config` (the server parses it) and drops `status`.
fn with_config(mut object: Value, text: String, label: &str) -> Result<Value, CliError> {
    let Some(map) = object.as_object_mut() else {
        return Err(CliError::Failed(format!(
            "the server sent {label} as something other than a JSON object"
        )));
    };
    map.remove("status");
    let spec = map.entry("spec").or_insert_with(|| json!({}));
    match spec.as_object_mut() {
        Some(spec) => {
            spec.insert("config".into(), Value::String(text));
        }
        None => *spec = json!({ "config": text }),
    }
    Ok(object)
}

/// The part of a field path inside `spec.config`: `""` for the layer itself, `gateway.port`
/// for `spec.config.gateway.port`; `None` outside it.
fn in_config(field: &str) -> Option<&str> {
    let rest = field.strip_prefix("spec.config")?;
    if rest.is_empty() {
        Some("")
    } else if rest.starts_with('[') {
        Some(rest)
    } else {
        rest.strip_prefix('.')
    }
}

/// `line 3, column 5: expected ...` → (3, 5, `expected ...`).
fn line_column(problem: &str) -> Option<(usize, usize, &str)> {
    let rest = problem.strip_prefix("line ")?;
    let (line, rest) = rest.split_once(", column ")?;
    let (column, rest) = rest.split_once(": ").unwrap_or((rest, ""));
    Some((line.trim().parse().ok()?, column.trim().parse().ok()?, rest))
}

/// A refusal of the file's content, told against the file: `app.json5:3:5: ...` or
/// `app.json5: gateway.port: ...`. `None` when the refusal is about something else.
fn config_problems(e: &ApiError, file: &str) -> Option<Vec<Located>> {
    if !matches!(e.status, 400 | 422) {
        return None;
    }
    let problems: Vec<(&str, &str)> = if e.details.is_empty() {
        vec![e.message.split_once(": ")?]
    } else {
        e.details
            .iter()
            .map(|d| (d.field.as_str(), d.problem.as_str()))
            .collect()
    };
    problems
        .into_iter()
        .map(|(field, problem)| {
            let field = in_config(field)?;
            let (line, column, problem) = match line_column(problem) {
                Some((l, c, p)) if field.is_empty() => (Some(l), Some(c), p),
                _ => (None, None, problem),
            };
            Some(Located {
                file: file.to_string(),
                document: None,
                item: None,
                line,
                column,
                field: field.to_string(),
                problem: problem.to_string(),
            })
        })
        .collect()
}

/// Makes a refused `config set` say which file (and line) or which race was the cause.
fn explain_set_error(err: CliError, file: &str, label: &str) -> CliError {
    match err {
        CliError::Api(e) if e.status == 409 => CliError::Api(ApiError {
            message: format!(
                "{}; {label} was changed by someone else after this command read it, and nothing was written: run the command again",
                e.message.trim_end().trim_end_matches('.')
            ),
            ..e
        }),
        CliError::Api(e) => match config_problems(&e, file) {
            Some(problems) => CliError::Input(problems),
            None => CliError::Api(e),
        },
        other => other,
    }
}

fn new_template(name: &str) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "ConfigTemplate",
        "metadata": { "name": name },
        "spec": {},
    })
}

/// Label, REST path and content of an object found by name.
fn found((key, object): (ObjectKey, Value)) -> (String, String, Value) {
    (key.to_string(), object_path(&key), object)
}

async fn set_layer(
    settings: &Settings,
    args: SetArgs,
    stdin: &mut dyn Read,
) -> Result<String, CliError> {
    let (shown, text) = read_config_file(&args.file, stdin)?;
    let client = Client::new(settings)?;
    let (label, path, object) = match args.layer {
        Layer::Template => {
            validate_dns_label(&args.name)
                .map_err(|e| CliError::Usage(format!("template {:?}: {e}", args.name)))?;
            let path = format!("/api/v1/configtemplates/{}", args.name);
            let object = client
                .get_opt(&path)
                .await?
                .unwrap_or_else(|| new_template(&args.name));
            (format!("configtemplate/{}", args.name), path, object)
        }
        Layer::Tenant => found(resolve::find(&client, settings, Kind::Tenant, &args.name).await?),
        Layer::Project => found(resolve::find(&client, settings, Kind::Project, &args.name).await?),
        Layer::Instance => {
            found(resolve::find(&client, settings, Kind::OpenClawInstance, &args.name).await?)
        }
    };
    let object = with_config(object, text, &label)?;
    let answer = write(settings, Method::PUT, &path, &object, args.message.as_ref())
        .await
        .map_err(|e| explain_set_error(e, &shown, &label))?;
    Ok(format!("{label} {}\n", answer.outcome))
}

fn answer_text(answer: &Value, format: AnswerFormat) -> Result<String, CliError> {
    match format {
        AnswerFormat::Json => output::to_json(answer),
        AnswerFormat::Yaml => output::to_yaml(answer),
    }
}

/// Runs one subcommand and answers what it prints.
async fn execute(
    command: ConfigCommand,
    settings: &Settings,
    colour: bool,
    stdin: &mut dyn Read,
) -> Result<String, CliError> {
    let instance_path = async |client: &Client, kind: Kind, name: &str| {
        let (key, _) = resolve::find(client, settings, kind, name).await?;
        Ok::<_, CliError>((object_path(&key), key))
    };
    match command {
        ConfigCommand::View => Ok(render(settings)),
        ConfigCommand::Render(a) => {
            let client = Client::new(settings)?;
            let (path, _) = instance_path(&client, a.kind, &a.name).await?;
            let query = if a.explain { "?explain=true" } else { "" };
            let answer = client.get(&format!("{path}/config{query}")).await?;
            match a.output {
                Some(format) => answer_text(&answer, format),
                None => render_effective(client.server(), &answer, a.explain),
            }
        }
        ConfigCommand::History(a) => {
            let client = Client::new(settings)?;
            let (path, key) = instance_path(&client, a.kind, &a.name).await?;
            let answer = client.get(&format!("{path}/config/revisions")).await?;
            match a.output {
                HistoryFormat::Json => output::to_json(&answer),
                HistoryFormat::Yaml => output::to_yaml(&answer),
                HistoryFormat::Table => {
                    let revisions: Revisions = decode(client.server(), &answer)?;
                    if revisions.items.is_empty() {
                        Ok(format!("{key} has no config revisions\n"))
                    } else {
                        Ok(history_table(revisions.items))
                    }
                }
            }
        }
        ConfigCommand::Diff(a) => {
            let client = Client::new(settings)?;
            let (path, _) = instance_path(&client, a.kind, &a.name).await?;
            let answer = client
                .get(&format!("{path}/config/diff?from={}&to={}", a.from, a.to))
                .await?;
            match a.output {
                Some(format) => answer_text(&answer, format),
                None => {
                    let diff: Diff = decode(client.server(), &answer)?;
                    Ok(diff_text(&diff, a.from, a.to, a.keys, colour))
                }
            }
        }
        ConfigCommand::Rollback(a) => {
            let client = Client::new(settings)?;
            let (path, key) = instance_path(&client, a.kind, &a.name).await?;
            let mut body = json!({ "revision": a.to });
            if let Some(m) = &a.message {
                body["message"] = json!(m.as_str());
            }
            let answer = write(
                settings,
                Method::POST,
                &format!("{path}/config/rollback"),
                &body,
                a.message.as_ref(),
            )
            .await?;
            let done: RolledBack = decode(client.server(), &answer.body)?;
            Ok(format!(
                "{key} rolled back to revision {} (now revision {})\n",
                done.rolled_back_to, done.revision
            ))
        }
        ConfigCommand::Set(a) => set_layer(settings, a, stdin).await,
    }
}

pub fn run(args: ConfigArgs) -> CliResult {
    let settings = Settings::resolve(&args.client)?;
    match args.command {
        ConfigCommand::View => print_out(&render(&settings)),
        command => block_on(async move {
            let text = execute(command, &settings, colour_wanted(), &mut io::stdin()).await?;
            print_out(&text)
        }),
    }
}

/// A scripted stand-in for the REST API, for the tests of the config and secret commands.
#[cfg(test)]
pub(super) mod fake {
    use std::sync::{Arc, Mutex};

    use axum::body::{Body, to_bytes};
    use axum::extract::{Request, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::Response;
    use serde_json::Value;

    use crate::cli::settings::{ClientOpts, Secret, Settings};

    /// One request the server received.
    #[derive(Clone, Debug)]
    pub struct Seen {
        pub method: String,
        /// Path and query.
        pub uri: String,
        pub headers: HeaderMap,
        pub body: Value,
    }

    /// A scripted answer to `METHOD /path?query`.
    pub struct Route {
        pub method: &'static str,
        pub uri: String,
        pub status: u16,
        pub headers: Vec<(&'static str, &'static str)>,
        pub body: Value,
    }

    pub fn route(method: &'static str, uri: impl Into<String>, status: u16, body: Value) -> Route {
        Route {
            method,
            uri: uri.into(),
            status,
            headers: Vec::new(),
            body,
        }
    }

    struct Shared {
        routes: Vec<Route>,
        seen: Mutex<Vec<Seen>>,
    }

    pub struct Fake {
        pub url: String,
        shared: Arc<Shared>,
    }

    impl Fake {
        /// Every request so far.
        pub fn seen(&self) -> Vec<Seen> {
            self.shared.seen.lock().unwrap().clone()
        }

        /// Settings that point at this server, with a token and no CLI config file.
        pub fn settings(&self, tenant: Option<&str>, project: Option<&str>) -> Settings {
            Settings::resolve(&ClientOpts {
                server: Some(self.url.clone()),
                token: Some(Secret::new("cca_faketoken0123456789")),
                config: Some("/nonexistent/clusterclaw/config.toml".into()),
                tenant: tenant.map(str::to_string),
                project: project.map(str::to_string),
                ..ClientOpts::default()
            })
            .unwrap()
        }
    }

    async fn answer(State(shared): State<Arc<Shared>>, req: Request) -> Response {
        let method = req.method().to_string();
        let uri = req.uri().to_string();
        let headers = req.headers().clone();
        let bytes = to_bytes(req.into_body(), 1 << 20).await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        shared.seen.lock().unwrap().push(Seen {
            method: method.clone(),
            uri: uri.clone(),
            headers,
            body,
        });
        let (status, extra, body) = match shared
            .routes
            .iter()
            .find(|r| r.method == method && r.uri == uri)
        {
            Some(r) => (r.status, r.headers.clone(), r.body.to_string()),
            None => (
                404,
                Vec::new(),
                serde_json::json!({"code": "NotFound", "message": format!("no route {method} {uri}")})
                    .to_string(),
            ),
        };
        let mut resp = Response::builder()
            .status(StatusCode::from_u16(status).unwrap())
            .header("content-type", "application/json");
        for (k, v) in extra {
            resp = resp.header(k, v);
        }
        resp.body(Body::from(body)).unwrap()
    }

    /// Starts the server on a free local port (and installs the crypto providers, as `main`
    /// does before a client is built).
    pub async fn start(routes: Vec<Route>) -> Fake {
        crate::crypto::install();
        let shared = Arc::new(Shared {
            routes,
            seen: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Fake { url, shared }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{self, route};
    use super::*;
    use crate::cli::settings::{ConfigFile, Secret};
    use crate::cli::{Cli, Command};
    use clap::Parser;

    const INST: &str = "/api/v1/tenants/acme/projects/helpdesk/instances/bot";

    fn parse(args: &[&str]) -> Result<ConfigCommand, clap::Error> {
        let mut all = vec!["clusterclaw", "config"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all)?;
        let Command::Config(c) = cli.command else {
            panic!("not the config command")
        };
        Ok(c.command)
    }

    fn instance() -> Value {
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
            "metadata": {"name": "bot", "tenant": "acme", "project": "helpdesk", "resourceVersion": 41},
            "spec": {"version": "2026.7.1", "config": {"old": true}},
            "status": {"phase": "Running"}})
    }

    fn effective() -> Value {
        json!({
            "instance": "acme/helpdesk/bot", "revision": 7, "hash": "0123456789abcdef0123",
            "config": {"gateway": {"port": 18789}, "tools": {"web": {"enabled": true}}},
            "layers": [
                {"kind": "builtin", "source": "builtin"},
                {"kind": "template", "source": "configtemplate/default"},
                {"kind": "tenant", "source": "tenant/acme"},
                {"kind": "project", "source": "project/acme/helpdesk"},
                {"kind": "instance", "source": "openclawinstance/acme/helpdesk/bot"}
            ],
            "text": "{\n  \"gateway\": {\n    \"port\": 18789 // builtin\n  }\n}"
        })
    }

    async fn exec(settings: &Settings, args: &[&str]) -> Result<String, CliError> {
        execute(parse(args).unwrap(), settings, false, &mut io::empty()).await
    }

    #[test]
    fn view_redacts_the_token_and_names_sources() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        ConfigFile {
            token: Some(Secret::new("cca_0123456789abcdef")),
            tenant: Some("acme".into()),
            ..Default::default()
        }
        .save(&path)
        .unwrap();
        let opts = ClientOpts {
            config: Some(path),
            project: Some("helpdesk".into()),
            ..Default::default()
        };
        let text = render(&Settings::resolve(&opts).unwrap());
        assert!(!text.contains("0123456789ab"), "{text}");
        assert!(text.contains("token = \"cca_***cdef\""), "{text}");
        assert!(text.contains("# config file"), "{text}");
        assert!(
            text.contains("server = \"http://127.0.0.1:7080\""),
            "{text}"
        );
        assert!(text.contains("# ca_cert not set"), "{text}");
    }

    #[test]
    fn arguments_parse() {
        let ConfigCommand::Render(r) =
            parse(&["render", "inst", "bot", "--explain", "-o", "yaml"]).unwrap()
        else {
            panic!("not render")
        };
        assert_eq!(
            (r.kind, r.name.as_str(), r.explain, r.output),
            (
                Kind::OpenClawInstance,
                "bot",
                true,
                Some(AnswerFormat::Yaml)
            )
        );
        let ConfigCommand::Diff(d) =
            parse(&["diff", "instance", "bot", "3", "7", "--keys"]).unwrap()
        else {
            panic!("not diff")
        };
        assert_eq!((d.from, d.to, d.keys, d.output), (3, 7, true, None));
        let ConfigCommand::Rollback(r) = parse(&[
            "rollback",
            "oci",
            "bot",
            "--to",
            "3",
            "-m",
            " port broke it ",
        ])
        .unwrap() else {
            panic!("not rollback")
        };
        assert_eq!(r.to, 3);
        assert_eq!(r.message.unwrap().as_str(), "port broke it");
        let ConfigCommand::Set(s) =
            parse(&["set", "template", "default", "-f", "p.json5", "-m", "why"]).unwrap()
        else {
            panic!("not set")
        };
        assert_eq!((s.layer, s.file.as_str()), (Layer::Template, "p.json5"));
        for (kind, layer) in [
            ("ct", Layer::Template),
            ("tn", Layer::Tenant),
            ("projects", Layer::Project),
            ("inst", Layer::Instance),
        ] {
            let ConfigCommand::Set(s) = parse(&["set", kind, "x", "-f", "-"]).unwrap() else {
                panic!("not set")
            };
            assert_eq!(s.layer, layer);
        }
        let ConfigCommand::History(h) =
            parse(&["history", "instance", "bot", "-t", "acme"]).unwrap()
        else {
            panic!("not history")
        };
        assert_eq!(h.output, HistoryFormat::Table);
    }

    #[test]
    fn wrong_kinds_and_values_are_usage_errors() {
        let e = parse(&["render", "tenant", "acme"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let text = e.to_string();
        assert!(text.contains(RENDER_ONLY_INSTANCES), "{text}");
        let text = parse(&["render", "template", "default"])
            .unwrap_err()
            .to_string();
        assert!(text.contains(RENDER_ONLY_INSTANCES), "{text}");
        let text = parse(&["history", "project", "x"]).unwrap_err().to_string();
        assert!(text.contains("config set KIND NAME -f FILE"), "{text}");
        let text = parse(&["diff", "pods", "x", "1", "2"])
            .unwrap_err()
            .to_string();
        assert!(text.contains("unknown kind \"pods\""), "{text}");
        let text = parse(&["set", "host", "h1", "-f", "x"])
            .unwrap_err()
            .to_string();
        assert!(text.contains("a host has no config layer"), "{text}");
        for bad in [
            vec!["diff", "inst", "bot", "0", "2"],
            vec!["diff", "inst", "bot", "1", "two"],
            vec!["diff", "inst", "bot", "1", "2", "--keys", "-o", "json"],
            vec!["rollback", "inst", "bot"],
            vec!["rollback", "inst", "bot", "--to", "1", "-m", ""],
            vec!["rollback", "inst", "bot", "--to", "1", "-m", "two\nlines"],
            vec!["set", "inst", "bot"],
            vec!["render", "inst", "bot", "-o", "table"],
        ] {
            let e = parse(&bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        assert!(parse_message(&"x".repeat(500)).is_ok());
        let e = parse_message(&"x".repeat(501)).unwrap_err();
        assert!(e.contains("at most 500"), "{e}");
        assert!(parse_message("schön, ünïcödé").is_ok());
    }

    #[test]
    fn render_prints_the_file_or_the_explained_file_with_its_layers() {
        let text = render_effective("http://s", &effective(), false).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            effective()["config"]
        );
        assert!(text.starts_with("{\n  \"gateway\""), "{text}");
        let text = render_effective("http://s", &effective(), true).unwrap();
        assert_eq!(
            text,
            "{\n  \"gateway\": {\n    \"port\": 18789 // builtin\n  }\n}\n\
             # revision 7 · layers: builtin < configtemplate/default < tenant/acme < project/acme/helpdesk < openclawinstance/acme/helpdesk/bot\n"
        );
        let mut old = effective();
        old.as_object_mut().unwrap().remove("text");
        let e = render_effective("http://s", &old, true).unwrap_err();
        assert!(e.to_string().contains("no explained file"), "{e}");
        let e = render_effective("http://s", &json!({"revision": "x"}), false).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }

    #[test]
    fn history_is_a_table_newest_first() {
        let revisions: Revisions = serde_json::from_value(json!({"items": [
            {"revision": 2, "hash": "aaaaaaaaaaaaaaaaaaaaaaaa", "author": "admin", "createdAt": "2026-07-10T12:00:00Z", "message": "raise\nlog level", "layers": []},
            {"revision": 10, "hash": "bbbbbbbbbbbbbbbbbbbbbbbbbb", "author": "ci-bot", "createdAt": "2026-07-11T08:30:00Z"},
        ]}))
        .unwrap();
        assert_eq!(
            history_table(revisions.items),
            "REVISION   CREATED                AUTHOR   HASH           MESSAGE\n\
             10         2026-07-11T08:30:00Z   ci-bot   bbbbbbbbbbbb   -\n\
             2          2026-07-10T12:00:00Z   admin    aaaaaaaaaaaa   raise log level\n"
        );
    }

    fn diff_answer() -> Diff {
        serde_json::from_value(json!({
            "from": 3, "to": 7,
            "changes": [
                {"op": "changed", "path": "gateway.port", "from": 18789, "to": 18790},
                {"op": "added", "path": "tools.web.enabled", "value": true},
                {"op": "removed", "path": "logging.level", "value": "debug"}
            ],
            "unified": "--- revision 3\n+++ revision 7\n@@ -1,3 +1,3 @@\n {\n-  \"port\": 18789\n+  \"port\": 18790\n"
        }))
        .unwrap()
    }

    #[test]
    fn diffs_by_key_or_unified_with_colour_only_when_asked() {
        let d = diff_answer();
        assert_eq!(
            diff_text(&d, 3, 7, true, false),
            "~ gateway.port: 18789 -> 18790\n+ tools.web.enabled: true\n- logging.level: \"debug\"\n"
        );
        assert_eq!(
            diff_text(&d, 3, 7, false, false),
            "--- revision 3\n+++ revision 7\n@@ -1,3 +1,3 @@\n {\n-  \"port\": 18789\n+  \"port\": 18790\n"
        );
        assert!(!diff_text(&d, 3, 7, false, false).contains('\x1b'));
        let coloured = diff_text(&d, 3, 7, false, true);
        assert!(
            coloured.contains("\x1b[31m-  \"port\": 18789\x1b[0m\n"),
            "{coloured:?}"
        );
        assert!(
            coloured.contains("\x1b[32m+  \"port\": 18790\x1b[0m\n"),
            "{coloured:?}"
        );
        assert!(
            coloured.contains("\x1b[36m@@ -1,3 +1,3 @@\x1b[0m\n"),
            "{coloured:?}"
        );
        assert!(coloured.contains("\n {\n"), "{coloured:?}");
        let empty: Diff =
            serde_json::from_value(json!({"from": 3, "to": 3, "changes": [], "unified": ""}))
                .unwrap();
        for keys in [true, false] {
            assert_eq!(
                diff_text(&empty, 3, 3, keys, true),
                "no differences between revision 3 and revision 3\n"
            );
        }
    }

    #[test]
    fn config_errors_of_the_server_point_into_the_file() {
        let syntax = ApiError {
            status: 422,
            code: "Invalid".into(),
            message: "the request is invalid: 1 problem".into(),
            details: vec![crate::model::FieldProblem::new(
                "spec.config",
                "line 3, column 5: expected ':' after an object key",
            )],
        };
        let e = explain_set_error(CliError::Api(syntax), "bot.json5", "x");
        assert_eq!(e.exit_code(), 4);
        assert_eq!(
            e.to_string(),
            "bot.json5:3:5: expected ':' after an object key"
        );
        let only_message = ApiError {
            status: 400,
            code: "BadRequest".into(),
            message: "spec.config.gateway.port: must be a port number, 1 to 65535".into(),
            details: vec![],
        };
        let e = explain_set_error(CliError::Api(only_message), "<stdin>", "x");
        assert_eq!(
            e.to_string(),
            "<stdin>: gateway.port: must be a port number, 1 to 65535"
        );
        let elsewhere = ApiError {
            status: 422,
            code: "Invalid".into(),
            message: "spec.configTemplate: no template named nope".into(),
            details: vec![],
        };
        let e = explain_set_error(CliError::Api(elsewhere), "f", "x");
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().starts_with("spec.configTemplate"), "{e}");
        let conflict = ApiError {
            status: 409,
            code: "Conflict".into(),
            message: "metadata.resourceVersion: 41 is stale.".into(),
            details: vec![],
        };
        let text = explain_set_error(CliError::Api(conflict), "f", "tenant/acme").to_string();
        assert!(
            text.contains("41 is stale; tenant/acme was changed by someone else")
                && text.contains("run the command again"),
            "{text}"
        );
    }

    #[test]
    fn config_files_are_read_as_text() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.json5");
        fs::write(&ok, "{ // comment\n  gateway: { port: 18790, },\n}\n").unwrap();
        let (shown, text) = read_config_file(ok.to_str().unwrap(), &mut io::empty()).unwrap();
        assert_eq!(shown, ok.to_str().unwrap());
        assert!(text.contains("// comment"));
        let (shown, text) = read_config_file("-", &mut "{a: 1}".as_bytes()).unwrap();
        assert_eq!((shown.as_str(), text.as_str()), ("<stdin>", "{a: 1}"));
        let e = read_config_file("-", &mut " \n".as_bytes()).unwrap_err();
        assert_eq!(e.exit_code(), 4);
        assert!(
            e.to_string().starts_with("<stdin>: the file is empty"),
            "{e}"
        );
        let missing = dir.path().join("missing.json5");
        let e = read_config_file(missing.to_str().unwrap(), &mut io::empty()).unwrap_err();
        assert!(e.to_string().contains("missing.json5: cannot read"), "{e}");
        let big = vec![b' '; MAX_OBJECT_BYTES + 1];
        let e = read_config_file("-", &mut big.as_slice()).unwrap_err();
        assert!(e.to_string().contains("larger than 256 KiB"), "{e}");
        let e = read_config_file("-", &mut [b'{', 0xff, b'}'].as_slice()).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }

    #[tokio::test]
    async fn render_and_history_ask_the_instance_config_endpoints() {
        let fake = fake::start(vec![
            route("GET", INST, 200, instance()),
            route("GET", format!("{INST}/config?explain=true"), 200, effective()),
            route("GET", format!("{INST}/config"), 200, effective()),
            route(
                "GET",
                format!("{INST}/config/revisions"),
                200,
                json!({"items": [{"revision": 7, "hash": "0123456789abcdef", "author": "admin", "createdAt": "2026-07-10T12:00:00Z", "message": "first"}]}),
            ),
        ])
        .await;
        let settings = fake.settings(Some("acme"), Some("helpdesk"));
        let text = exec(&settings, &["render", "inst", "bot", "--explain"])
            .await
            .unwrap();
        assert!(
            text.ends_with("# revision 7 · layers: builtin < configtemplate/default < tenant/acme < project/acme/helpdesk < openclawinstance/acme/helpdesk/bot\n"),
            "{text}"
        );
        let text = exec(&settings, &["render", "inst", "bot", "-o", "json"])
            .await
            .unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), effective());
        let text = exec(&settings, &["history", "inst", "bot"]).await.unwrap();
        assert!(
            text.contains("7          2026-07-10T12:00:00Z   admin    0123456789ab   first"),
            "{text}"
        );
        let uris: Vec<String> = fake.seen().into_iter().map(|s| s.uri).collect();
        assert!(
            uris.contains(&format!("{INST}/config?explain=true")),
            "{uris:?}"
        );
        let e = exec(&settings, &["diff", "inst", "bot", "1", "2"])
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), 1);
    }

    #[tokio::test]
    async fn rollback_posts_the_revision_and_the_message() {
        let fake = fake::start(vec![
            route("GET", INST, 200, instance()),
            route(
                "POST",
                format!("{INST}/config/rollback"),
                200,
                json!({"revision": 8, "rolledBackTo": 3}),
            ),
        ])
        .await;
        let settings = fake.settings(Some("acme"), Some("helpdesk"));
        let text = exec(
            &settings,
            &[
                "rollback",
                "inst",
                "bot",
                "--to",
                "3",
                "-m",
                "port broke it",
            ],
        )
        .await
        .unwrap();
        assert_eq!(
            text,
            "openclawinstance/acme/helpdesk/bot rolled back to revision 3 (now revision 8)\n"
        );
        let post = fake
            .seen()
            .into_iter()
            .find(|s| s.method == "POST")
            .unwrap();
        assert_eq!(
            post.body,
            json!({"revision": 3, "message": "port broke it"})
        );
        assert_eq!(post.headers[CHANGE_MESSAGE_HEADER], "port broke it");
        assert_eq!(
            post.headers["authorization"],
            "Bearer cca_faketoken0123456789"
        );
    }

    #[tokio::test]
    async fn set_sends_the_file_text_with_the_version_read() {
        let mut configured = fake::route("PUT", INST, 200, instance());
        configured.headers = vec![(OUTCOME_HEADER, "configured")];
        let fake = fake::start(vec![route("GET", INST, 200, instance()), configured]).await;
        let settings = fake.settings(Some("acme"), Some("helpdesk"));
        let file = "{ gateway: { port: 18790 }, // the new port\n}\n";
        let text = execute(
            parse(&["set", "instance", "bot", "-f", "-", "-m", "new port"]).unwrap(),
            &settings,
            false,
            &mut file.as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(text, "openclawinstance/acme/helpdesk/bot configured\n");
        let put = fake.seen().into_iter().find(|s| s.method == "PUT").unwrap();
        assert_eq!(put.body["spec"]["config"], json!(file));
        assert_eq!(put.body["spec"]["version"], "2026.7.1");
        assert_eq!(put.body["metadata"]["resourceVersion"], 41);
        assert!(put.body.get("status").is_none(), "{}", put.body);
        assert_eq!(put.headers[CHANGE_MESSAGE_HEADER], "new port");
    }

    #[tokio::test]
    async fn set_creates_a_missing_template_and_locates_parse_errors() {
        let mut created = fake::route(
            "PUT",
            "/api/v1/configtemplates/default",
            201,
            json!({"kind": "ConfigTemplate"}),
        );
        created.headers = vec![(OUTCOME_HEADER, "created")];
        let refused = fake::route(
            "PUT",
            "/api/v1/configtemplates/strict",
            422,
            json!({"code": "Invalid", "message": "the request is invalid",
                "details": [{"field": "spec.config", "problem": "line 2, column 3: unexpected end of input"}]}),
        );
        let fake = fake::start(vec![created, refused]).await;
        let settings = fake.settings(None, None);
        let set = |name: &'static str| {
            let settings = settings.clone();
            async move {
                execute(
                    parse(&["set", "template", name, "-f", "-"]).unwrap(),
                    &settings,
                    false,
                    &mut "{\n  a: [\n".as_bytes(),
                )
                .await
            }
        };
        assert_eq!(
            set("default").await.unwrap(),
            "configtemplate/default created\n"
        );
        let put = fake.seen().into_iter().find(|s| s.method == "PUT").unwrap();
        assert_eq!(
            put.body,
            json!({"apiVersion": "clusterclaw.io/v1", "kind": "ConfigTemplate",
                "metadata": {"name": "default"}, "spec": {"config": "{\n  a: [\n"}})
        );
        assert!(put.headers.get(CHANGE_MESSAGE_HEADER).is_none());
        let e = set("strict").await.unwrap_err();
        assert_eq!(e.exit_code(), 4);
        assert_eq!(e.to_string(), "<stdin>:2:3: unexpected end of input");
    }
}
