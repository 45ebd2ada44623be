//! `clusterclaw delete KIND NAME` and `delete -f FILE`: children before parents.

use clap::Args;
use reqwest::Method;

use super::client::{ApiError, Client};
use super::manifest::{self, Check, Defaults, Manifest};
use super::resolve::{self, kind_arg_help, object_path, parse_kind};
use super::settings::{ClientOpts, Settings};
use super::{CliError, CliResult, print_out};
use crate::model::{Kind, ObjectKey};

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[arg(value_parser = parse_kind, help = kind_arg_help(), value_name = "KIND", required_unless_present = "files", requires = "name")]
    pub kind: Option<Kind>,
    pub name: Option<String>,
    /// Delete the objects these manifests name (file, directory or -); repeatable
    #[arg(short = 'f', long = "filename", value_name = "FILE|DIR|-", conflicts_with_all = ["kind", "name"])]
    pub files: Vec<String>,
    /// Read directories given with -f recursively
    #[arg(short = 'R', long, requires = "files")]
    pub recursive: bool,
    /// Treat an object that does not exist as deleted
    #[arg(long)]
    pub ignore_not_found: bool,
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

/// The objects the manifests name, each once, children before parents (input order otherwise).
fn deletion_order(manifests: &[Manifest]) -> Vec<(&Manifest, ObjectKey)> {
    let mut seen = std::collections::HashSet::new();
    let mut keyed: Vec<(&Manifest, ObjectKey)> = manifests
        .iter()
        .map(|m| (m, m.resource.key()))
        .filter(|(_, k)| seen.insert(k.clone()))
        .collect();
    keyed.sort_by_key(|(_, k)| std::cmp::Reverse(deletion_rank(k.kind)));
    keyed
}

fn deletion_rank(kind: Kind) -> u8 {
    match kind {
        // Hosts have no children; delete them with the instances.
        Kind::Host => Kind::OpenClawInstance.apply_order(),
        k => k.apply_order(),
    }
}

pub async fn run(args: DeleteArgs) -> CliResult {
    let settings = Settings::resolve(&args.client)?;
    if let (Some(kind), Some(name)) = (args.kind, args.name.as_deref()) {
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
    let order = deletion_order(&manifests);
    if !args.ignore_not_found {
        let mut missing = Vec::new();
        for (m, key) in &order {
            if client.get_opt(&object_path(key)).await?.is_none() {
                missing.push(
                    m.problem("metadata.name", format!("{key} not found"))
                        .to_string(),
                );
            }
        }
        if !missing.is_empty() {
            return Err(CliError::Api(ApiError {
                status: 404,
                code: "NotFound".into(),
                message: format!(
                    "{}; nothing was deleted (use --ignore-not-found to delete the others)",
                    missing.join("; ")
                ),
                details: Vec::new(),
            }));
        }
    }
    for (_, key) in order {
        if delete_one(&client, &key, args.ignore_not_found).await? {
            print_out(&format!("{} deleted\n", display(&key)))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::manifest::Source;

    #[test]
    fn children_go_first_and_each_object_once() {
        let text = "\
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
metadata: {name: a, tenant: acme, project: helpdesk}
spec: {version: 2026.7.1}
---
apiVersion: clusterclaw.io/v1
kind: OpenClawInstance
metadata: {name: b, tenant: acme, project: helpdesk}
spec: {version: 2026.7.1, replicas: 5000}
---
apiVersion: clusterclaw.io/v1
kind: Tenant
metadata: {name: acme}
";
        // Structure only: a value out of range does not stop a delete.
        let m = manifest::load(
            &[Source {
                name: "m.yaml".into(),
                text: text.into(),
            }],
            Defaults::default(),
            Check::Structure,
        )
        .unwrap();
        let order: Vec<String> = deletion_order(&m)
            .iter()
            .map(|(_, k)| k.to_string())
            .collect();
        assert_eq!(
            order,
            [
                "openclawinstance/acme/helpdesk/a",
                "openclawinstance/acme/helpdesk/b",
                "project/acme/helpdesk",
                "tenant/acme"
            ]
        );
    }
}
