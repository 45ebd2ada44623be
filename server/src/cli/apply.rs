//! `clusterclaw apply -f FILE|DIR|-`: validate every document locally, then one all-or-nothing
//! `POST /api/v1/apply`.

use std::collections::HashMap;

use clap::Args;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::client::{ApiError, Client};
use super::manifest::{self, Check, Defaults, Located, Manifest};
use super::settings::{ClientOpts, Settings};
use super::{CliError, CliResult, print_out};
use crate::model::{FieldProblem, HOST_READ_ONLY, Kind, ObjectKey};

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// Manifest file (YAML, several documents separated by ---, or JSON), a directory of
    /// .yaml/.yml files, or - for standard input; repeatable
    #[arg(
        short = 'f',
        long = "filename",
        required = true,
        value_name = "FILE|DIR|-"
    )]
    pub files: Vec<String>,
    /// Read directories given with -f recursively
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// Let the server check everything and report what would change, without writing
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Deserialize)]
struct ApplyAnswer {
    items: Vec<ApplyItem>,
}

#[derive(Debug, Deserialize)]
struct ApplyItem {
    kind: String,
    name: String,
    outcome: String,
}

/// Checks that apply-specific rules hold over the whole batch: no `Host`, no object twice.
fn check_batch(manifests: &[Manifest]) -> Vec<Located> {
    let mut problems = Vec::new();
    let mut seen: HashMap<ObjectKey, &Manifest> = HashMap::new();
    for m in manifests {
        if !m.resource.kind().user_writable() {
            problems.push(m.problem("kind", HOST_READ_ONLY));
            continue;
        }
        let key = m.resource.key();
        if let Some(first) = seen.get(&key) {
            problems.push(m.problem(
                "metadata.name",
                format!(
                    "{key} is already defined in {} document {} (line {}); each object may appear once",
                    first.place.file, first.place.document, first.place.line
                ),
            ));
        } else {
            seen.insert(key, m);
        }
    }
    problems
}

/// Rewrites a refusal of the server so that every problem names its file, document and line;
/// the message ends with "nothing was {done}" (applied, deleted).
pub(super) fn locate_refusal(mut err: ApiError, manifests: &[Manifest], done: &str) -> ApiError {
    let located: Vec<(Option<Located>, FieldProblem)> = std::mem::take(&mut err.details)
        .into_iter()
        .map(|d| (manifest::locate_item(manifests, &d.field, &d.problem), d))
        .collect();
    // Errors about one item of the batch start "items[N]: ".
    let item = err
        .message
        .strip_prefix("items[")
        .and_then(|rest| rest.split_once("]: "))
        .and_then(|(n, what)| Some((manifests.get(n.parse::<usize>().ok()?)?, what.to_string())));
    match (item, located.as_slice()) {
        // One problem, said twice (message and detail): say it once, at the field's line.
        (Some((_, what)), [(Some(l), d)]) if d.problem == what => err.message = l.to_string(),
        (item, _) => {
            if let Some((m, what)) = item {
                err.message = format!("{}: {what}", m.place.prefix());
            }
            err.details = located
                .into_iter()
                .map(|(l, d)| match l {
                    Some(l) => {
                        let place = l.to_string();
                        let place = place
                            .strip_suffix(&format!(": {}", d.problem))
                            .unwrap_or(&place)
                            .to_string();
                        FieldProblem::new(place, d.problem)
                    }
                    None => d,
                })
                .collect();
        }
    }
    if !err.message.contains("nothing was") {
        err.message = format!("{}; nothing was {done}", err.message.trim_end_matches('.'));
    }
    err
}

pub async fn run(args: ApplyArgs) -> CliResult {
    let settings = Settings::resolve(&args.client)?;
    let sources = manifest::read_sources(&args.files, args.recursive)?;
    let defaults = Defaults {
        tenant: settings.tenant.as_deref(),
        project: settings.project.as_deref(),
    };
    let manifests = manifest::load(&sources, defaults, Check::Full).map_err(CliError::Input)?;
    let problems = check_batch(&manifests);
    if !problems.is_empty() {
        return Err(CliError::Input(problems));
    }
    let client = Client::new(&settings)?;
    let body = json!({ "items": manifests.iter().map(|m| &m.value).collect::<Vec<&Value>>() });
    let path = format!("/api/v1/apply?dryRun={}", args.dry_run);
    let answer: ApplyAnswer = match client.json(Method::POST, &path, Some(&body)).await {
        Ok(a) => a,
        Err(CliError::Api(e)) => {
            return Err(CliError::Api(locate_refusal(e, &manifests, "applied")));
        }
        Err(e) => return Err(e),
    };
    let suffix = if args.dry_run { " (dry run)" } else { "" };
    let mut out = String::new();
    for item in &answer.items {
        let kind = Kind::from_manifest(&item.kind)
            .map_or_else(|| item.kind.to_ascii_lowercase(), |k| k.lower().to_string());
        out.push_str(&format!("{kind}/{} {}{suffix}\n", item.name, item.outcome));
    }
    print_out(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::manifest::Source;

    fn load(text: &str) -> Vec<Manifest> {
        manifest::load(
            &[Source {
                name: "m.yaml".into(),
                text: text.into(),
            }],
            Defaults::default(),
            Check::Full,
        )
        .unwrap()
    }

    const TWO: &str = "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata: {name: acme}\n---\napiVersion: clusterclaw.io/v1\nkind: Project\nmetadata:\n  name: helpdesk\n  tenant: nope\n";

    #[test]
    fn duplicates_and_hosts_are_refused() {
        let text = "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata: {name: acme}\n---\napiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata: {name: acme}\n---\napiVersion: clusterclaw.io/v1\nkind: Host\nmetadata: {name: h1}\n";
        let p = check_batch(&load(text));
        assert_eq!(p.len(), 2);
        assert!(p[0].to_string().starts_with("m.yaml:7: document 2: metadata.name: tenant/acme is already defined in m.yaml document 1 (line 1)"), "{}", p[0]);
        assert!(
            p[1].to_string().contains("document 3: kind: Host objects"),
            "{}",
            p[1]
        );
    }

    #[test]
    fn server_refusals_point_at_the_document() {
        let m = load(TWO);
        let problem = "tenant/nope does not exist; create it before project/nope/helpdesk";
        let err = ApiError {
            status: 404,
            code: "NotFound".into(),
            message: format!("items[1]: {problem}"),
            details: vec![FieldProblem::new("items[1].metadata.tenant", problem)],
        };
        let text = locate_refusal(err, &m, "applied").to_string();
        assert_eq!(
            text,
            format!(
                "m.yaml:9: document 2: metadata.tenant: {problem}; nothing was applied (NotFound)"
            )
        );
        let err = ApiError {
            status: 422,
            code: "Invalid".into(),
            message: "the request is invalid: 2 problems, listed in details; nothing was written"
                .into(),
            details: vec![
                FieldProblem::new("items[0].spec.displayName", "too long"),
                FieldProblem::new("items[1].metadata.name", "bad"),
            ],
        };
        let text = locate_refusal(err, &m, "applied").to_string();
        assert_eq!(
            text,
            "the request is invalid: 2 problems, listed in details; nothing was written (Invalid)\n  \
             m.yaml:1: document 1: spec.displayName: too long\n  \
             m.yaml:8: document 2: metadata.name: bad"
        );
    }
}
