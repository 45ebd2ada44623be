//! `clusterclaw secret set | rotate-key`: secret values, encrypted by the server and never shown
//! again, and the data key that seals them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use clap::{ArgGroup, Args, Subcommand};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::config::{ChangeMessage, parse_message, write};
use super::manifest::Located;
use super::settings::{ClientOpts, Secret, Settings};
use super::{CliError, CliResult, print_out};
use crate::model::{API_VERSION, MAX_OBJECT_BYTES, validate_dns_label};

/// Longest secret key, in characters.
pub const MAX_KEY_CHARS: usize = 253;

#[derive(Args, Debug)]
pub struct SecretArgs {
    #[command(subcommand)]
    pub command: SecretCommand,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Create a secret or replace all its values; prints its keys and their fingerprints,
    /// never the values
    #[command(after_help = "\
The secret belongs to the tenant (-t), or to a project of it when a project is given (-p, or the
configured one; -p '' makes a tenant-level secret when a project is configured). Every write
gives all the keys: keys left out are removed.

Values given with --from-literal are visible to other users of this machine in the process list
and stay in the shell history; prefer --from-file (- reads standard input).

A config layer refers to a value by secret name and key:
  {\"secretRef\": {\"name\": \"llm-keys\", \"key\": \"anthropic\"}}

Examples:
  clusterclaw secret set llm-keys -t acme --from-file anthropic=./anthropic.key
  pass show llm/openai | clusterclaw secret set llm-keys -t acme -p helpdesk --from-file openai=-
  clusterclaw secret set llm-keys -t acme --from-env-file ./keys.env -m \"rotate provider keys\"")]
    Set(SetArgs),
    /// Generate a new data key and re-encrypt every stored secret value with it (platform
    /// admins only)
    #[command(after_help = "\
The values themselves do not change; instances keep running.

Example:
  clusterclaw secret rotate-key -m \"yearly rotation\"")]
    RotateKey(RotateKeyArgs),
}

/// Keeps a `--from-literal` argument out of `Debug` output; it is split and checked later, so
/// that no error message repeats it.
fn hidden(s: &str) -> Result<Secret, Infallible> {
    Ok(Secret::new(s))
}

/// `--from-file KEY=PATH`, or `--from-file PATH` (the key is the file's name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FromFile {
    pub key: String,
    /// A path, or `-` for standard input.
    pub path: String,
}

fn parse_from_file(s: &str) -> Result<FromFile, String> {
    let (key, path) = match s.split_once('=') {
        Some((key, path)) => (key.to_string(), path.to_string()),
        None => {
            let name = Path::new(s)
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|_| s != "-")
                .ok_or_else(|| {
                    format!("{s:?} names no file; use KEY=PATH (KEY=- for standard input)")
                })?;
            (name.to_string(), s.to_string())
        }
    };
    check_key(&key)?;
    if path.is_empty() {
        return Err(format!(
            "no file after {key}=; use KEY=PATH (KEY=- for standard input)"
        ));
    }
    Ok(FromFile { key, path })
}

/// A secret key is 1 to 253 letters, digits, `.`, `_` and `-` (it may become an environment
/// variable or a file name).
pub fn check_key(key: &str) -> Result<(), String> {
    let n = key.chars().count();
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if (1..=MAX_KEY_CHARS).contains(&n) && key.chars().all(allowed) {
        return Ok(());
    }
    let shown: String = key.chars().take(64).collect();
    let shown = if n > 64 {
        format!("{shown:?}...")
    } else {
        format!("{shown:?}")
    };
    Err(format!(
        "the key {shown} is not allowed: a key is 1 to {MAX_KEY_CHARS} characters of letters, digits, '.', '_' and '-'"
    ))
}

#[derive(Args, Debug)]
#[command(group(
    ArgGroup::new("values")
        .args(["from_literal", "from_file", "from_env_file"])
        .required(true)
        .multiple(true)
))]
pub struct SetArgs {
    /// The secret's name (lower-case letters, digits and '-')
    pub name: String,
    /// A key and its value; repeatable. Other users of this machine can read it in the process
    /// list: prefer --from-file
    #[arg(long = "from-literal", value_name = "KEY=VALUE", value_parser = hidden)]
    pub from_literal: Vec<Secret>,
    /// A key and the file holding its value (- for standard input); repeatable. One final line
    /// break of the file is dropped. Without KEY=, the key is the file's name
    #[arg(long = "from-file", value_name = "KEY=PATH", value_parser = parse_from_file)]
    pub from_file: Vec<FromFile>,
    /// A file of KEY=VALUE lines (- for standard input); repeatable. Empty lines and lines
    /// starting with # are skipped, an `export ` prefix is allowed, white space around keys and
    /// values is dropped, and quotes around a whole value are removed (quote a value to keep
    /// its spaces)
    #[arg(long = "from-env-file", value_name = "PATH")]
    pub from_env_file: Vec<PathBuf>,
    /// Why: recorded with the change (at most 500 characters, one line)
    #[arg(short = 'm', long, value_parser = parse_message, value_name = "MESSAGE")]
    pub message: Option<ChangeMessage>,
}

#[derive(Args, Debug)]
pub struct RotateKeyArgs {
    /// Why: recorded with the change (at most 500 characters, one line)
    #[arg(short = 'm', long, value_parser = parse_message, value_name = "MESSAGE")]
    pub message: Option<ChangeMessage>,
}

/// One value of the secret, and where it came from (for messages; never the value).
#[derive(Debug)]
struct Entry {
    key: String,
    value: Secret,
    origin: String,
}

fn file_problem(file: &str, line: Option<usize>, problem: impl Into<String>) -> CliError {
    CliError::Input(vec![Located {
        file: file.to_string(),
        document: None,
        item: None,
        line,
        column: None,
        field: String::new(),
        problem: problem.into(),
    }])
}

/// Reads a whole file (or standard input for `-`) as UTF-8 text.
fn read_text(path: &str, stdin: &mut dyn Read) -> Result<(String, String), CliError> {
    let shown = if path == "-" { "<stdin>" } else { path };
    let limit = MAX_OBJECT_BYTES as u64;
    let mut bytes = Vec::new();
    let read = if path == "-" {
        stdin.take(limit + 1).read_to_end(&mut bytes)
    } else {
        fs::File::open(path).and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
    };
    read.map_err(|e| file_problem(shown, None, format!("cannot read the file: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(file_problem(
            shown,
            None,
            format!(
                "the file is larger than {} KiB, the most a secret may hold",
                limit / 1024
            ),
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        file_problem(
            shown,
            None,
            format!(
                "the file is not UTF-8 text (invalid byte at offset {}); secret values are text",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    Ok((shown.to_string(), text))
}

/// `KEY=VALUE` of `--from-literal`; errors never repeat the argument.
fn split_literal(raw: &Secret) -> Result<Entry, CliError> {
    let Some((key, value)) = raw.expose().split_once('=') else {
        return Err(CliError::Usage(
            "--from-literal takes KEY=VALUE, and one argument has no '=' (it is not shown here, as it may be a secret)".into(),
        ));
    };
    check_key(key).map_err(|e| CliError::Usage(format!("--from-literal: {e}")))?;
    Ok(Entry {
        key: key.to_string(),
        value: Secret::new(value),
        origin: "--from-literal".into(),
    })
}

/// The value of `--from-file`: the file's text without one final line break.
fn file_value(f: &FromFile, stdin: &mut dyn Read) -> Result<Entry, CliError> {
    let (shown, mut text) = read_text(&f.path, stdin)?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(Entry {
        key: f.key.clone(),
        value: Secret::new(text),
        origin: format!("--from-file {shown}"),
    })
}

/// The entries of an env file: `KEY=VALUE` lines, `# comments`, empty lines.
fn env_file_values(shown: &str, text: &str) -> Result<Vec<Entry>, CliError> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(file_problem(
                shown,
                Some(n),
                "the line is not KEY=VALUE (the line is not shown, as it may hold a secret); \
                 a line is KEY=VALUE, a # comment or empty",
            ));
        };
        let key = key.trim();
        check_key(key).map_err(|e| CliError::Usage(format!("{shown}:{n}: {e}")))?;
        let value = value.trim();
        let value = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        entries.push(Entry {
            key: key.to_string(),
            value: Secret::new(value),
            origin: format!("{shown} line {n}"),
        });
    }
    Ok(entries)
}

/// Every key and value given, checked: each key once, at least one key.
fn gather(args: &SetArgs, stdin: &mut dyn Read) -> Result<Vec<Entry>, CliError> {
    let stdin_uses = args.from_file.iter().filter(|f| f.path == "-").count()
        + args
            .from_env_file
            .iter()
            .filter(|p| p.as_os_str() == "-")
            .count();
    if stdin_uses > 1 {
        return Err(CliError::Usage(
            "standard input (- of --from-file or --from-env-file) can be read only once".into(),
        ));
    }
    let mut entries = Vec::new();
    for raw in &args.from_literal {
        entries.push(split_literal(raw)?);
    }
    for f in &args.from_file {
        entries.push(file_value(f, stdin)?);
    }
    for path in &args.from_env_file {
        let (shown, text) = read_text(&path.display().to_string(), stdin)?;
        entries.extend(env_file_values(&shown, &text)?);
    }
    let mut first: BTreeMap<&str, &str> = BTreeMap::new();
    for e in &entries {
        if let Some(before) = first.insert(&e.key, &e.origin) {
            return Err(CliError::Usage(format!(
                "the key {} is given twice, by {before} and by {}; give each key once",
                e.key, e.origin
            )));
        }
    }
    if entries.is_empty() {
        return Err(CliError::Usage(
            "no keys given: the env files hold no KEY=VALUE lines; a secret needs at least one key"
                .into(),
        ));
    }
    Ok(entries)
}

/// Where the secret lives: `(label, REST path)`.
fn place(tenant: &str, project: Option<&str>, name: &str) -> (String, String) {
    match project {
        Some(p) => (
            format!("secret/{tenant}/{p}/{name}"),
            format!("/api/v1/tenants/{tenant}/projects/{p}/secrets/{name}"),
        ),
        None => (
            format!("secret/{tenant}/{name}"),
            format!("/api/v1/tenants/{tenant}/secrets/{name}"),
        ),
    }
}

/// The manifest sent: the only place the values are exposed.
fn manifest(name: &str, tenant: &str, project: Option<&str>, entries: &[Entry]) -> Value {
    let mut metadata = json!({ "name": name, "tenant": tenant });
    if let Some(p) = project {
        metadata["project"] = json!(p);
    }
    let data: Map<String, Value> = entries
        .iter()
        .map(|e| (e.key.clone(), Value::String(e.value.expose().to_string())))
        .collect();
    json!({
        "apiVersion": API_VERSION,
        "kind": "Secret",
        "metadata": metadata,
        "spec": { "data": data },
    })
}

/// `secret/acme/llm-keys configured` and one line per key with its fingerprint.
fn summary(label: &str, outcome: &str, entries: &[Entry], answer: &Value) -> String {
    let fingerprints = answer.pointer("/spec/keys").and_then(Value::as_object);
    let mut keys: Vec<&str> = match fingerprints {
        Some(f) => f.keys().map(String::as_str).collect(),
        None => entries.iter().map(|e| e.key.as_str()).collect(),
    };
    keys.sort_unstable();
    let width = keys.iter().map(|k| k.chars().count()).max().unwrap_or(0);
    let mut out = format!("{label} {outcome}\n");
    for k in keys {
        let fingerprint = fingerprints
            .and_then(|f| f.get(k))
            .and_then(Value::as_str)
            .unwrap_or("-");
        let _ = writeln!(out, "  {k:<width$}   {fingerprint}");
    }
    out
}

fn check_name(what: &str, name: &str) -> Result<(), CliError> {
    validate_dns_label(name).map_err(|e| CliError::Usage(format!("{what} {name:?}: {e}")))
}

async fn set(settings: &Settings, args: SetArgs, stdin: &mut dyn Read) -> Result<String, CliError> {
    check_name("secret", &args.name)?;
    let Some(tenant) = settings.tenant.as_deref() else {
        return Err(CliError::Usage(
            "a secret belongs to a tenant: pass -t TENANT (and -p PROJECT for a project's secret) or set CLUSTERCLAW_TENANT".into(),
        ));
    };
    check_name("tenant", tenant)?;
    let project = settings.project.as_deref();
    if let Some(p) = project {
        check_name("project", p)?;
    }
    let entries = gather(&args, stdin)?;
    let (label, path) = place(tenant, project, &args.name);
    let body = manifest(&args.name, tenant, project, &entries);
    let answer = write(settings, Method::PUT, &path, &body, args.message.as_ref()).await?;
    Ok(summary(&label, &answer.outcome, &entries, &answer.body))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rotated {
    key_id: String,
    resealed: u64,
}

fn rotated_line(r: &Rotated) -> String {
    let values = if r.resealed == 1 { "value" } else { "values" };
    format!(
        "data key rotated: {}; {} {values} re-encrypted\n",
        r.key_id, r.resealed
    )
}

async fn rotate_key(settings: &Settings, args: RotateKeyArgs) -> Result<String, CliError> {
    let answer = write(
        settings,
        Method::POST,
        "/api/v1/secrets/rotate-key",
        &json!({}),
        args.message.as_ref(),
    )
    .await?;
    let rotated: Rotated = Rotated::deserialize(&answer.body).map_err(|e| {
        CliError::Failed(format!(
            "the server at {} sent an answer this clusterclaw cannot read: {e}",
            settings.server
        ))
    })?;
    Ok(rotated_line(&rotated))
}

pub async fn run(args: SecretArgs) -> CliResult {
    let settings = Settings::resolve(&args.client)?;
    let text = match args.command {
        SecretCommand::Set(a) => set(&settings, a, &mut io::stdin()).await?,
        SecretCommand::RotateKey(a) => rotate_key(&settings, a).await?,
    };
    print_out(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::config::fake::{self, route};
    use crate::cli::config::{CHANGE_MESSAGE_HEADER, OUTCOME_HEADER};
    use crate::cli::{Cli, Command};
    use clap::Parser;

    const VALUE: &str = "sk-ant-SUPERSECRETVALUE-0123";

    fn parse(args: &[&str]) -> Result<SecretCommand, clap::Error> {
        let mut all = vec!["clusterclaw", "secret"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all)?;
        let Command::Secret(s) = cli.command else {
            panic!("not the secret command")
        };
        Ok(s.command)
    }

    fn set_args(args: &[&str]) -> SetArgs {
        let mut all = vec!["set"];
        all.extend_from_slice(args);
        match parse(&all).unwrap() {
            SecretCommand::Set(a) => a,
            SecretCommand::RotateKey(_) => panic!("not set"),
        }
    }

    #[test]
    fn arguments_parse_and_need_a_value_source() {
        let a = set_args(&[
            "llm-keys",
            "--from-literal",
            "anthropic=sk-1",
            "--from-file",
            "openai=./o.key",
            "--from-file",
            "/run/keys/gemini",
            "--from-env-file",
            "k.env",
            "-m",
            "rotate",
        ]);
        assert_eq!(a.name, "llm-keys");
        assert_eq!(a.from_literal.len(), 1);
        assert_eq!(
            a.from_file,
            [
                FromFile {
                    key: "openai".into(),
                    path: "./o.key".into()
                },
                FromFile {
                    key: "gemini".into(),
                    path: "/run/keys/gemini".into()
                }
            ]
        );
        assert_eq!(a.message.unwrap().as_str(), "rotate");
        assert!(matches!(
            parse(&["rotate-key", "-m", "yearly"]).unwrap(),
            SecretCommand::RotateKey(_)
        ));
        for bad in [
            vec!["set", "llm-keys"],
            vec!["set", "llm-keys", "--from-file", "bad key=./x"],
            vec!["set", "llm-keys", "--from-file", "-"],
            vec!["set", "llm-keys", "--from-file", "k="],
            vec![
                "set",
                "llm-keys",
                "--from-file",
                &format!("{}=x", "k".repeat(254)),
            ],
        ] {
            let e = parse(&bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        assert!(check_key(&"k".repeat(253)).is_ok());
        assert!(check_key("ANTHROPIC_API_KEY.v2-x").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("a/b").unwrap_err().contains("letters, digits"));
    }

    #[test]
    fn values_stay_out_of_debug_output_and_errors() {
        let cli = Cli::try_parse_from([
            "clusterclaw",
            "secret",
            "set",
            "llm-keys",
            "--from-literal",
            &format!("anthropic={VALUE}"),
        ])
        .unwrap();
        let debug = format!("{cli:?}");
        assert!(!debug.contains("SUPERSECRET"), "{debug}");
        let a = set_args(&["llm-keys", "--from-literal", &format!("anthropic={VALUE}")]);
        let entries = gather(&a, &mut io::empty()).unwrap();
        assert_eq!(entries[0].value.expose(), VALUE);
        let debug = format!("{entries:?} {a:?}");
        assert!(!debug.contains("SUPERSECRET"), "{debug}");
        // A value given without its key is not repeated in the error.
        let a = set_args(&["llm-keys", "--from-literal", VALUE]);
        let e = gather(&a, &mut io::empty()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(!e.to_string().contains("SUPERSECRET"), "{e}");
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
    }

    #[test]
    fn keys_are_given_once_and_at_least_once() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("keys.env");
        fs::write(
            &env,
            "# provider keys\n\nexport openai=\"sk-o=1\"\r\nanthropic = 'sk-a'\nempty=\n",
        )
        .unwrap();
        let env = env.to_str().unwrap();
        let key_file = dir.path().join("gemini.key");
        fs::write(&key_file, "g-1\n").unwrap();
        let key_file = key_file.to_str().unwrap();
        let a = set_args(&[
            "s",
            "--from-env-file",
            env,
            "--from-file",
            key_file,
            "--from-file",
            "stdin=-",
        ]);
        let entries = gather(&a, &mut "two\nlines\r\n".as_bytes()).unwrap();
        let got: Vec<(&str, &str)> = entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.expose()))
            .collect();
        assert_eq!(
            got,
            [
                ("gemini.key", "g-1"),
                ("stdin", "two\nlines"),
                ("openai", "sk-o=1"),
                ("anthropic", "sk-a"),
                ("empty", ""),
            ]
        );
        let a = set_args(&["s", "--from-literal", "openai=x", "--from-env-file", env]);
        let e = gather(&a, &mut io::empty()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains(&format!(
                "the key openai is given twice, by --from-literal and by {env} line 3"
            )),
            "{e}"
        );
        let blank = dir.path().join("blank.env");
        fs::write(&blank, "# nothing yet\n").unwrap();
        let a = set_args(&["s", "--from-env-file", blank.to_str().unwrap()]);
        let e = gather(&a, &mut io::empty()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("no keys given"), "{e}");
        let bad = dir.path().join("bad.env");
        fs::write(&bad, "ok=1\nsk-live-SUPERSECRET\n").unwrap();
        let a = set_args(&["s", "--from-env-file", bad.to_str().unwrap()]);
        let e = gather(&a, &mut io::empty()).unwrap_err();
        assert_eq!(e.exit_code(), 4);
        assert!(
            e.to_string()
                .contains("bad.env:2: the line is not KEY=VALUE"),
            "{e}"
        );
        assert!(!e.to_string().contains("SUPERSECRET"), "{e}");
        fs::write(&bad, "bad key=1\n").unwrap();
        let e = gather(&a, &mut io::empty()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains("bad.env:1: the key \"bad key\""),
            "{e}"
        );
        let a = set_args(&["s", "--from-file", "a=-", "--from-file", "b=-"]);
        assert_eq!(gather(&a, &mut io::empty()).unwrap_err().exit_code(), 2);
        let a = set_args(&["s", "--from-file", "a=/nonexistent/clusterclaw/key"]);
        let e = gather(&a, &mut io::empty()).unwrap_err();
        assert!(e.to_string().contains("cannot read the file"), "{e}");
    }

    #[test]
    fn summaries_show_keys_and_fingerprints() {
        let entries = vec![
            Entry {
                key: "openai".into(),
                value: Secret::new(VALUE),
                origin: "--from-literal".into(),
            },
            Entry {
                key: "anthropic".into(),
                value: Secret::new(VALUE),
                origin: "--from-literal".into(),
            },
        ];
        let answer = json!({"spec": {"keys": {"openai": "hmac-sha256:89ab", "anthropic": "hmac-sha256:0123"}}});
        assert_eq!(
            summary("secret/acme/llm-keys", "configured", &entries, &answer),
            "secret/acme/llm-keys configured\n  anthropic   hmac-sha256:0123\n  openai      hmac-sha256:89ab\n"
        );
        assert_eq!(
            summary("secret/acme/x", "created", &entries, &json!({})),
            "secret/acme/x created\n  anthropic   -\n  openai      -\n"
        );
        assert_eq!(
            rotated_line(&Rotated {
                key_id: "1a2b3c4d".into(),
                resealed: 42
            }),
            "data key rotated: 1a2b3c4d; 42 values re-encrypted\n"
        );
    }

    #[tokio::test]
    async fn set_puts_the_manifest_and_prints_no_value() {
        let mut tenant_level = route(
            "PUT",
            "/api/v1/tenants/acme/secrets/llm-keys",
            201,
            json!({"kind": "Secret", "metadata": {"name": "llm-keys", "tenant": "acme"},
                "spec": {"keys": {"anthropic": "hmac-sha256:0123abcd"}}}),
        );
        tenant_level.headers = vec![(OUTCOME_HEADER, "created")];
        let project_level = route(
            "PUT",
            "/api/v1/tenants/acme/projects/helpdesk/secrets/llm-keys",
            200,
            json!({"spec": {"keys": {"anthropic": "hmac-sha256:0123abcd"}}}),
        );
        let fake = fake::start(vec![tenant_level, project_level]).await;
        let args = || {
            set_args(&[
                "llm-keys",
                "--from-literal",
                &format!("anthropic={VALUE}"),
                "-m",
                "new key",
            ])
        };
        let text = set(&fake.settings(Some("acme"), None), args(), &mut io::empty())
            .await
            .unwrap();
        assert_eq!(
            text,
            "secret/acme/llm-keys created\n  anthropic   hmac-sha256:0123abcd\n"
        );
        assert!(!text.contains("SUPERSECRET"));
        let text = set(
            &fake.settings(Some("acme"), Some("helpdesk")),
            args(),
            &mut io::empty(),
        )
        .await
        .unwrap();
        assert!(
            text.starts_with("secret/acme/helpdesk/llm-keys configured\n"),
            "{text}"
        );
        let seen = fake.seen();
        assert_eq!(
            seen[0].body,
            json!({"apiVersion": "clusterclaw.io/v1", "kind": "Secret",
                "metadata": {"name": "llm-keys", "tenant": "acme"},
                "spec": {"data": {"anthropic": VALUE}}})
        );
        assert_eq!(seen[0].headers[CHANGE_MESSAGE_HEADER], "new key");
        assert_eq!(seen[1].body["metadata"]["project"], "helpdesk");
        let e = set(&fake.settings(None, None), args(), &mut io::empty())
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("pass -t TENANT"), "{e}");
    }

    #[tokio::test]
    async fn rotate_key_posts_and_reports() {
        let fake = fake::start(vec![route(
            "POST",
            "/api/v1/secrets/rotate-key",
            200,
            json!({"keyId": "1a2b3c4d", "resealed": 1}),
        )])
        .await;
        let text = rotate_key(&fake.settings(None, None), RotateKeyArgs { message: None })
            .await
            .unwrap();
        assert_eq!(text, "data key rotated: 1a2b3c4d; 1 value re-encrypted\n");
        let fake = fake::start(vec![route(
            "POST",
            "/api/v1/secrets/rotate-key",
            403,
            json!({"code": "Forbidden", "message": "only a platform-admin may rotate the data key"}),
        )])
        .await;
        let e = rotate_key(&fake.settings(None, None), RotateKeyArgs { message: None })
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("platform-admin"), "{e}");
    }
}
