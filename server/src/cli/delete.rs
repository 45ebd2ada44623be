//! `clusterclaw delete KIND NAME` and `delete -f FILE`: a batch deleted all or nothing by the server, children before parents.

use clap::Args;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::apply::locate_refusal;
use super::client::Client;
use super::manifest::{self, Check, Defaults, Manifest};
use super::resolve::{self, kind_arg_help, object_path, parse_kind};
use super::settings::{ClientOpts, Settings};
use super::{CliError, CliResult, print_out};
use crate::model::{Kind, ObjectKey};

/// What `delete` removes: objects of a kind, or a state volume on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteKind {
    Object(Kind),
    /// `delete volume HOST/NAME`.
    Volume,
}

fn parse_delete_kind(s: &str) -> Result<DeleteKind, String> {
    match s.to_ascii_lowercase().as_str() {
        "volume" | "volumes" | "vol" => Ok(DeleteKind::Volume),
        _ => parse_kind(s).map(DeleteKind::Object),
    }
}

fn delete_kind_help() -> String {
    format!(
        "{}, or volume (then NAME is HOST/VOLUME, as `get volumes` shows it)",
        kind_arg_help()
    )
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[arg(value_parser = parse_delete_kind, help = delete_kind_help(), value_name = "KIND", required_unless_present = "files", requires = "name")]
    pub kind: Option<DeleteKind>,
    pub name: Option<String>,
    /// Delete the objects these manifests name (file, directory or -); repeatable. All or
    /// nothing: one object that cannot be deleted (missing, still has children the files do
    /// not delete, in use, not yours) stops the whole batch, and the error names its document
    #[arg(short = 'f', long = "filename", value_name = "FILE|DIR|-", conflicts_with_all = ["kind", "name"])]
    pub files: Vec<String>,
    /// Read directories given with -f recursively
    #[arg(short = 'R', long, requires = "files")]
    pub recursive: bool,
    /// Treat an object that does not exist as deleted
    #[arg(long)]
    pub ignore_not_found: bool,
    /// With -f: check that the whole batch could be deleted, and delete nothing
    #[arg(long, requires = "files")]
    pub dry_run: bool,
    #[command(flatten)]
    pub client: ClientOpts,
}

fn display(key: &ObjectKey) -> String {
    format!("{}/{}", key.kind.lower(), key.name)
}

/// Deletes one object; `Ok(false)` when it was already gone and that is allowed.
async fn delete_one(
    client: &Client,
    key: &ObjectKey,
    ignore_not_found: bool,
) -> Result<bool, CliError> {
    match client.send(Method::DELETE, &object_path(key), None).await {
        Ok(_) => Ok(true),
        Err(CliError::Api(e)) if e.status == 404 && ignore_not_found => Ok(false),
        Err(e) => Err(e),
    }
}

/// The body of `DELETE /api/v1/apply`: each document's kind and names, in file order (the
/// server deletes children before parents, each object once).
fn batch_body(manifests: &[Manifest]) -> Value {
    let items: Vec<Value> = manifests
        .iter()
        .map(|m| {
            let key = m.resource.key();
            let mut metadata = json!({ "name": key.name });
            if !key.tenant.is_empty() {
                metadata["tenant"] = json!(key.tenant);
            }
            if !key.project.is_empty() {
                metadata["project"] = json!(key.project);
            }
            json!({ "kind": key.kind.as_str(), "metadata": metadata })
        })
        .collect();
    json!({ "items": items })
}

/// What the server did to one object of the batch.
#[derive(Debug, Deserialize)]
struct DeletedItem {
    kind: String,
    name: String,
    outcome: String,
}

#[derive(Debug, Deserialize)]
struct DeleteAnswer {
    items: Vec<DeletedItem>,
}

pub async fn run(args: DeleteArgs) -> CliResult {
    let settings = Settings::resolve(&args.client)?;
    if let (Some(DeleteKind::Volume), Some(name)) = (args.kind, args.name.as_deref()) {
        let client = Client::new(&settings)?;
        return super::volumes::delete_volume(&client, name, args.ignore_not_found).await;
    }
    if let (Some(DeleteKind::Object(kind)), Some(name)) = (args.kind, args.name.as_deref()) {
        let client = Client::new(&settings)?;
        let key = match resolve::find(&client, &settings, kind, name).await {
            Ok((key, _)) => key,
            Err(CliError::Api(e)) if e.status == 404 && args.ignore_not_found => return Ok(()),
            Err(e) => return Err(e),
        };
        if delete_one(&client, &key, args.ignore_not_found).await? {
            print_out(&format!("{} deleted\n", display(&key)))?;
        }
        return Ok(());
    }
    let sources = manifest::read_sources(&args.files, args.recursive)?;
    let defaults = Defaults {
        tenant: settings.tenant.as_deref(),
        project: settings.project.as_deref(),
    };
    let manifests =
        manifest::load(&sources, defaults, Check::Structure).map_err(CliError::Input)?;
    let client = Client::new(&settings)?;
    let path = format!(
        "/api/v1/apply?ignoreNotFound={}&dryRun={}",
        args.ignore_not_found, args.dry_run
    );
    let answer: DeleteAnswer = match client
        .json(Method::DELETE, &path, Some(&batch_body(&manifests)))
        .await
    {
        Ok(a) => a,
        Err(CliError::Api(e)) => {
            return Err(CliError::Api(locate_refusal(e, &manifests, "deleted")));
        }
        Err(e) => return Err(e),
    };
    let suffix = if args.dry_run { " (dry run)" } else { "" };
    let mut out = String::new();
    for item in answer.items.iter().filter(|i| i.outcome == "deleted") {
        let kind = Kind::from_manifest(&item.kind)
            .map_or_else(|| item.kind.to_ascii_lowercase(), |k| k.lower().to_string());
        out.push_str(&format!("{kind}/{} deleted{suffix}\n", item.name));
    }
    print_out(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::client::ApiError;
    use crate::cli::manifest::Source;
    use crate::model::FieldProblem;

    fn load(text: &str, defaults: Defaults<'_>) -> Vec<Manifest> {
        // Structure only: a value out of range does not stop a delete.
        manifest::load(
            &[Source {
                name: "m.yaml".into(),
                text: text.into(),
            }],
            defaults,
            Check::Structure,
        )
        .unwrap()
    }

    const FILE: &str = "\
apiVersion: clusterclaw.io/v1
kind: Tenant
metadata: {name: acme}
---
apiVersion: clusterclaw.io/v1
kind: Project
metadata: {name: helpdesk, tenant: acme}
---
apiVersion: clusterclaw.io/v1
kind: OpenClawInstance
metadata: {name: b}
spec: {version: 2026.7.1, replicas: 5000}
---
apiVersion: clusterclaw.io/v1
kind: Secret
metadata: {name: llm-keys, tenant: acme}
";

    #[test]
    fn the_batch_names_each_document_by_kind_and_names_only() {
        let m = load(
            FILE,
            Defaults {
                tenant: Some("acme"),
                project: Some("helpdesk"),
            },
        );
        assert_eq!(
            batch_body(&m),
            json!({"items": [
                {"kind": "Tenant", "metadata": {"name": "acme"}},
                {"kind": "Project", "metadata": {"name": "helpdesk", "tenant": "acme"}},
                {"kind": "OpenClawInstance", "metadata": {"name": "b", "tenant": "acme", "project": "helpdesk"}},
                {"kind": "Secret", "metadata": {"name": "llm-keys", "tenant": "acme"}},
            ]})
        );
    }

    #[test]
    fn a_refused_batch_names_the_blocking_document() {
        let m = load(FILE, Defaults::default());
        let problem = "project/acme/helpdesk has 1 instance; delete it first";
        let err = ApiError {
            status: 409,
            code: "Conflict".into(),
            message: format!("items[1]: {problem}; nothing was deleted"),
            details: vec![FieldProblem::new(
                "items[1]",
                format!("{problem}; nothing was deleted"),
            )],
        };
        assert_eq!(
            locate_refusal(err, &m, "deleted").to_string(),
            format!("m.yaml:5: document 2: {problem}; nothing was deleted (Conflict)")
        );
    }
}
