//! End to end: tenants, roles and quotas through the real `clusterclaw` binary and its CLI.

use clusterclaw_tests::server::{CliOutput, TestServer};

const TENANTS: &str = "\
apiVersion: clusterclaw.io/v1
kind: Tenant
metadata:
  name: enterprise-a
spec:
  quota:
    memory: 16Gi
---
apiVersion: clusterclaw.io/v1
kind: Project
metadata:
  name: helpdesk
  tenant: enterprise-a
---
apiVersion: clusterclaw.io/v1
kind: Tenant
metadata:
  name: enterprise-b
---
apiVersion: clusterclaw.io/v1
kind: Project
metadata:
  name: sales
  tenant: enterprise-b
---
apiVersion: clusterclaw.io/v1
kind: OpenClawInstance
metadata:
  name: secret-bot
  tenant: enterprise-b
  project: sales
spec:
  version: 2026.7.1
";

fn instance(name: &str, replicas: i64, memory: &str) -> String {
    format!(
        "apiVersion: clusterclaw.io/v1
kind: OpenClawInstance
metadata:
  name: {name}
  tenant: enterprise-a
  project: helpdesk
spec:
  version: 2026.7.1
  replicas: {replicas}
  resources:
    memory: {memory}
"
    )
}

/// Runs the CLI as the holder of `token`.
fn as_token(server: &TestServer, token: &str, args: &[&str]) -> CliOutput {
    server.cli_with(
        args,
        &[
            ("CLUSTERCLAW_SERVER", server.api_url()),
            ("CLUSTERCLAW_TOKEN", token),
        ],
        None,
    )
}

#[test]
fn a_tenant_admin_works_inside_its_tenant_and_its_quota() {
    let server = TestServer::start().expect("server");
    let setup = server.write_file("tenants.yaml", TENANTS);
    server.cli(&["apply", "-f", setup.to_str().unwrap()]).ok();

    // The platform admin hands out a tenant-admin token for enterprise-a.
    let out = server
        .cli(&[
            "token",
            "create",
            "api",
            "--role",
            "tenant-admin",
            "-t",
            "enterprise-a",
            "--name",
            "a-admin",
        ])
        .ok();
    let ta = out.stdout.trim().to_string();
    assert!(ta.starts_with("cca_"), "{}", out.stdout);

    // It sees its own tenant only, and another tenant's instance does not exist for it.
    let out = as_token(&server, &ta, &["get", "instances", "-A", "-o", "json"]).ok();
    assert_eq!(
        out.json()["items"].as_array().unwrap().len(),
        0,
        "{}",
        out.stdout
    );
    let out = as_token(
        &server,
        &ta,
        &[
            "get",
            "instance",
            "secret-bot",
            "-t",
            "enterprise-b",
            "-p",
            "sales",
        ],
    );
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("openclawinstance/enterprise-b/sales/secret-bot not found"),
        "{}",
        out.stderr
    );
    let out = as_token(&server, &ta, &["get", "tenants"]).ok();
    assert!(
        out.stdout.contains("enterprise-a") && !out.stdout.contains("enterprise-b"),
        "{}",
        out.stdout
    );

    // It cannot mint a token for the other tenant, nor one above its own role.
    let out = as_token(
        &server,
        &ta,
        &[
            "token",
            "create",
            "api",
            "--role",
            "viewer",
            "-t",
            "enterprise-b",
        ],
    );
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains("only create tokens for tenant enterprise-a"),
        "{}",
        out.stderr
    );
    let out = as_token(
        &server,
        &ta,
        &["token", "create", "api", "--role", "platform-admin"],
    );
    assert_ne!(out.code, 0);

    // Quota: 12Gi fits in 16Gi; 6Gi more does not, and the error says what is left.
    let a = server.write_file("a.yaml", &instance("bot-a", 3, "4Gi"));
    as_token(&server, &ta, &["apply", "-f", a.to_str().unwrap()]).ok();
    let b = server.write_file("b.yaml", &instance("bot-b", 3, "2Gi"));
    let out = as_token(&server, &ta, &["apply", "-f", b.to_str().unwrap()]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains(
            "quota exceeded for tenant enterprise-a: memory 6Gi requested, 4Gi of 16Gi free"
        ),
        "{}",
        out.stderr
    );
    let out = as_token(&server, &ta, &["get", "tenants"]).ok();
    assert!(
        out.stdout.contains("12Gi/16Gi"),
        "usage against quota:\n{}",
        out.stdout
    );

    // A viewer token made by the tenant admin reads but cannot write.
    let out = as_token(
        &server,
        &ta,
        &["token", "create", "api", "--role", "viewer", "--name", "ro"],
    )
    .ok();
    let viewer = out.stdout.trim().to_string();
    as_token(
        &server,
        &viewer,
        &[
            "get",
            "instance",
            "bot-a",
            "-t",
            "enterprise-a",
            "-p",
            "helpdesk",
        ],
    )
    .ok();
    let out = as_token(
        &server,
        &viewer,
        &[
            "delete",
            "instance",
            "bot-a",
            "-t",
            "enterprise-a",
            "-p",
            "helpdesk",
        ],
    );
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("viewer"), "{}", out.stderr);
    server
        .cli(&[
            "get",
            "instance",
            "bot-a",
            "-t",
            "enterprise-a",
            "-p",
            "helpdesk",
        ])
        .ok();
}

/// What a viewer and a tenant-admin could once do through the config center, each refused by
/// the real server with the role that would be needed, recorded as a refusal, nothing written.
#[test]
fn config_center_writes_need_their_roles() {
    let server = TestServer::start().expect("server");
    let setup = server.write_file("tenants.yaml", TENANTS);
    server.cli(&["apply", "-f", setup.to_str().unwrap()]).ok();
    server
        .cli(&[
            "apply",
            "-f",
            server
                .write_file("a.yaml", &instance("bot-a", 1, "1Gi"))
                .to_str()
                .unwrap(),
        ])
        .ok();
    let token = |role: &str| {
        let out = server
            .cli(&[
                "token",
                "create",
                "api",
                "--role",
                role,
                "-t",
                "enterprise-a",
            ])
            .ok();
        out.stdout.trim().to_string()
    };
    let (viewer, tenant_admin) = (token("viewer"), token("tenant-admin"));
    let template = server.write_file("t.json5", "{ gateway: { port: 18789 } }\n");
    let template = template.to_str().unwrap();
    server
        .cli(&["config", "set", "template", "default", "-f", template])
        .ok();
    let before = server
        .cli(&["get", "configtemplates", "-o", "json"])
        .ok()
        .stdout;
    let attempts: [(&str, Vec<&str>, &str); 6] = [
        (
            &viewer,
            vec!["config", "set", "template", "default", "-f", template],
            "only platform-admin may",
        ),
        (
            &viewer,
            vec![
                "secret",
                "set",
                "k",
                "-t",
                "enterprise-a",
                "--from-literal",
                "a=b",
            ],
            "only platform-admin, tenant-admin may",
        ),
        (
            &viewer,
            vec!["secret", "rotate-key"],
            "only platform-admin may",
        ),
        (
            &viewer,
            vec![
                "config",
                "rollback",
                "instance",
                "bot-a",
                "--to",
                "1",
                "-t",
                "enterprise-a",
                "-p",
                "helpdesk",
            ],
            "only platform-admin, tenant-admin, project-editor may",
        ),
        (
            &tenant_admin,
            vec!["config", "set", "template", "default", "-f", template],
            "only platform-admin may",
        ),
        (
            &tenant_admin,
            vec!["delete", "configtemplate", "default"],
            "only platform-admin may",
        ),
    ];
    for (token, args, needed) in &attempts {
        let out = as_token(&server, token, args);
        assert_eq!(out.code, 1, "{args:?}: {}{}", out.stdout, out.stderr);
        assert!(out.stderr.contains(needed), "{args:?}: {}", out.stderr);
    }
    assert_eq!(
        server
            .cli(&["get", "configtemplates", "-o", "json"])
            .ok()
            .stdout,
        before,
        "a refused write changed the templates"
    );
    let out = server.cli(&["audit", "list", "-A", "-o", "json"]).ok();
    let records = out.json();
    let refusals = records["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", out.stdout))
        .iter()
        .filter(|r| r["result"]["outcome"] == "denied")
        .count();
    assert!(
        refusals >= attempts.len(),
        "{refusals} refusals in {}",
        out.stdout
    );
}
