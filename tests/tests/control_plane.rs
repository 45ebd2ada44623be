//! End to end: the real `clusterclaw` binary as server, driven by its own CLI and by plain HTTP.

use std::fs;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use clusterclaw_tests::server::{CliOutput, TestServer, clusterclaw_bin, run_cli};
use serde_json::{Value, json};

const TENANT_AND_PROJECT: &str = "\
apiVersion: clusterclaw.io/v1
kind: Tenant
metadata:
  name: acme
spec:
  displayName: ACME Corp
---
apiVersion: clusterclaw.io/v1
kind: Project
metadata:
  name: helpdesk
  tenant: acme
";

fn instance(name: &str, replicas: i64) -> String {
    format!(
        "apiVersion: clusterclaw.io/v1
kind: OpenClawInstance
metadata:
  name: {name}
  tenant: acme
  project: helpdesk
  labels:
    team: support
spec:
  version: 2026.7.1
  replicas: {replicas}
  resources:
    cpu: 1
    memory: 2Gi
"
    )
}

/// A tenant, a project and three instances in one file.
fn fleet(bot_replicas: i64) -> String {
    [
        TENANT_AND_PROJECT.to_string(),
        instance("support-bot", bot_replicas),
        instance("sales-bot", 1),
        instance("ops-bot", 1),
    ]
    .join("---\n")
}

fn start() -> TestServer {
    TestServer::start().unwrap_or_else(|e| panic!("start clusterclaw server: {e:#}"))
}

fn lines(out: &CliOutput) -> Vec<&str> {
    out.stdout.lines().collect()
}

/// Applies the fleet file; returns its path.
fn apply_fleet(s: &TestServer) -> String {
    let path = s.write_file("fleet.yaml", &fleet(3));
    s.cli(&["apply", "-f", path.to_str().unwrap()]).ok();
    path.to_string_lossy().into_owned()
}

#[test]
fn apply_creates_then_leaves_unchanged_then_configures() {
    let s = start();
    let path = s.write_file("fleet.yaml", &fleet(3));
    let path = path.to_str().unwrap();
    let out = s.cli(&["apply", "-f", path]).ok();
    assert_eq!(
        lines(&out),
        [
            "tenant/acme created",
            "project/helpdesk created",
            "openclawinstance/support-bot created",
            "openclawinstance/sales-bot created",
            "openclawinstance/ops-bot created"
        ]
    );
    let index = s.settled_index();

    let out = s.cli(&["apply", "-f", path]).ok();
    assert_eq!(
        lines(&out),
        [
            "tenant/acme unchanged",
            "project/helpdesk unchanged",
            "openclawinstance/support-bot unchanged",
            "openclawinstance/sales-bot unchanged",
            "openclawinstance/ops-bot unchanged"
        ]
    );
    assert_eq!(
        s.index(),
        index,
        "an unchanged apply must not move the store index"
    );

    s.write_file("fleet.yaml", &fleet(5));
    let out = s.cli(&["apply", "-f", path]).ok();
    assert_eq!(
        lines(&out),
        [
            "tenant/acme unchanged",
            "project/helpdesk unchanged",
            "openclawinstance/support-bot configured",
            "openclawinstance/sales-bot unchanged",
            "openclawinstance/ops-bot unchanged"
        ]
    );
    assert!(s.index() > index);
    let bot = s.get_json("/api/v1/tenants/acme/projects/helpdesk/instances/support-bot");
    assert_eq!(bot["spec"]["replicas"], 5);
}

#[test]
fn apply_from_stdin_with_dry_run_writes_nothing() {
    let s = start();
    let index = s.index();
    let env = [
        ("CLUSTERCLAW_SERVER", s.api_url()),
        ("CLUSTERCLAW_TOKEN", s.admin_token()),
    ];
    let out = s
        .cli_with(&["apply", "-f", "-", "--dry-run"], &env, Some(&fleet(2)))
        .ok();
    assert_eq!(lines(&out)[0], "tenant/acme created (dry run)");
    assert_eq!(lines(&out).len(), 5);
    assert_eq!(s.index(), index);
    assert_eq!(
        s.http("GET", "/api/v1/tenants/acme", None, Some(s.admin_token()))
            .status,
        404
    );
    // Tenant and project from -t/-p fill manifests that leave them out.
    let bare = "apiVersion: clusterclaw.io/v1\nkind: OpenClawInstance\nmetadata: {name: lone}\nspec: {version: 2026.7.1}\n";
    let input = format!("{TENANT_AND_PROJECT}---\n{bare}");
    let out = s
        .cli_with(
            &["apply", "-f", "-", "-t", "acme", "-p", "helpdesk"],
            &env,
            Some(&input),
        )
        .ok();
    assert_eq!(lines(&out)[2], "openclawinstance/lone created");
    s.get_json("/api/v1/tenants/acme/projects/helpdesk/instances/lone");
}

#[test]
fn get_in_every_output_format() {
    let s = start();
    apply_fleet(&s);

    let table = s.cli(&["get", "instances"]).ok();
    let rows = lines(&table);
    assert_eq!(rows.len(), 4, "{}", table.stdout);
    for column in [
        "NAME", "TENANT", "PROJECT", "VERSION", "READY", "PHASE", "AGE",
    ] {
        assert!(rows[0].contains(column), "{}", rows[0]);
    }
    let bot = rows
        .iter()
        .find(|r| r.starts_with("support-bot "))
        .expect("a support-bot row");
    let cells: Vec<&str> = bot.split_whitespace().collect();
    assert_eq!(
        &cells[..5],
        ["support-bot", "acme", "helpdesk", "2026.7.1", "0/3"]
    );

    let wide = s.cli(&["get", "inst", "-o", "wide"]).ok();
    for column in ["IMAGE", "CPU", "MEMORY", "HOSTS"] {
        assert!(lines(&wide)[0].contains(column), "{}", wide.stdout);
    }
    assert!(
        wide.stdout.contains("ghcr.io/openclaw/openclaw:2026.7.1"),
        "{}",
        wide.stdout
    );

    let list = s.cli(&["get", "instances", "-o", "json"]).ok().json();
    let obj = list.as_object().unwrap();
    assert_eq!(
        obj.keys().collect::<Vec<_>>(),
        ["items"],
        "a JSON list is {{\"items\":[...]}} only"
    );
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ops-bot", "sales-bot", "support-bot"]);

    let one = s
        .cli(&["get", "instance", "support-bot", "-o", "json"])
        .ok()
        .json();
    assert_eq!(one["kind"], "OpenClawInstance");
    assert_eq!(one["metadata"]["name"], "support-bot");
    assert_eq!(one["spec"]["replicas"], 3);

    let yaml = s.cli(&["get", "instances", "-o", "yaml"]).ok();
    let yaml_list = yaml.stdout.clone();
    let parsed: Value = serde_saphyr::from_str(&yaml.stdout).unwrap();
    assert_eq!(parsed["items"].as_array().unwrap().len(), 3);
    let yaml = s
        .cli(&[
            "get",
            "instance",
            "sales-bot",
            "-o",
            "yaml",
            "-t",
            "acme",
            "-p",
            "helpdesk",
        ])
        .ok();
    let parsed: Value = serde_saphyr::from_str(&yaml.stdout).unwrap();
    assert_eq!(parsed["metadata"]["name"], "sales-bot");

    // What `get -o yaml` prints applies back unchanged (kubectl's get | apply round trip).
    let env = [
        ("CLUSTERCLAW_SERVER", s.api_url()),
        ("CLUSTERCLAW_TOKEN", s.admin_token()),
    ];
    let back = s
        .cli_with(&["apply", "-f", "-"], &env, Some(&yaml_list))
        .ok();
    assert_eq!(
        lines(&back),
        [
            "openclawinstance/ops-bot unchanged",
            "openclawinstance/sales-bot unchanged",
            "openclawinstance/support-bot unchanged"
        ]
    );

    let tenants = s.cli(&["get", "tenants"]).ok();
    assert!(
        lines(&tenants)[1].starts_with("acme ") && tenants.stdout.contains("ACME Corp"),
        "{}",
        tenants.stdout
    );
    let projects = s.cli(&["get", "pj", "-o", "json"]).ok().json();
    assert_eq!(projects["items"][0]["metadata"]["tenant"], "acme");
    let hosts = s.cli(&["get", "hosts"]).ok();
    assert_eq!(hosts.stdout, "");
    assert!(hosts.stderr.contains("No hosts found"), "{}", hosts.stderr);

    // Label selectors and tenant scoping.
    let none = s
        .cli(&["get", "instances", "-l", "team=sales", "-o", "json"])
        .ok()
        .json();
    assert_eq!(none["items"], json!([]));
    let other = s
        .cli(&["get", "instances", "-t", "nobody", "-o", "json"])
        .ok()
        .json();
    assert_eq!(other["items"], json!([]));
    let all = s
        .cli(&["get", "instances", "-t", "nobody", "-A", "-o", "json"])
        .ok()
        .json();
    assert_eq!(all["items"].as_array().unwrap().len(), 3);

    let missing = s.cli(&["get", "instance", "no-such-bot"]).code(1);
    assert!(missing.stderr.contains("no-such-bot"), "{}", missing.stderr);
}

#[test]
fn describe_shows_spec_and_status() {
    let s = start();
    apply_fleet(&s);
    let out = s.cli(&["describe", "instance", "support-bot"]).ok();
    for needle in [
        "Name:",
        "support-bot",
        "Tenant:",
        "acme",
        "Spec:",
        "Replicas:",
        "Status:",
        "ghcr.io/openclaw/openclaw:2026.7.1",
        "team=support",
    ] {
        assert!(
            out.stdout.contains(needle),
            "missing {needle:?} in\n{}",
            out.stdout
        );
    }
    let out = s.cli(&["describe", "tenant", "acme"]).ok();
    assert!(out.stdout.contains("ACME Corp"), "{}", out.stdout);
    s.cli(&["describe", "host", "nope"]).code(1);
}

#[test]
fn scale_and_delete_by_name() {
    let s = start();
    apply_fleet(&s);
    let out = s
        .cli(&["scale", "instance", "support-bot", "--replicas", "5"])
        .ok();
    assert!(
        out.stdout.contains("openclawinstance/support-bot scaled"),
        "{}",
        out.stdout
    );
    let bot = s.get_json("/api/v1/tenants/acme/projects/helpdesk/instances/support-bot");
    assert_eq!(bot["spec"]["replicas"], 5);
    let index = s.settled_index();
    s.cli(&["scale", "instance", "support-bot", "--replicas", "101"])
        .code(2);
    s.cli(&["scale", "tenant", "acme", "--replicas", "1"])
        .code(2);
    assert_eq!(s.index(), index);

    let out = s.cli(&["delete", "instance", "support-bot"]).ok();
    assert_eq!(out.stdout, "openclawinstance/support-bot deleted\n");
    s.cli(&["get", "instance", "support-bot"]).code(1);
    s.cli(&["delete", "instance", "support-bot"]).code(1);
    s.cli(&["delete", "instance", "support-bot", "--ignore-not-found"])
        .ok();
    // A project that still has instances is not deleted.
    let out = s.cli(&["delete", "project", "helpdesk"]).code(1);
    assert!(out.stderr.contains("Conflict"), "{}", out.stderr);
}

#[test]
fn delete_from_manifests_goes_children_first() {
    let s = start();
    let path = apply_fleet(&s);
    let out = s.cli(&["delete", "-f", &path]).ok();
    assert_eq!(
        lines(&out),
        [
            "openclawinstance/support-bot deleted",
            "openclawinstance/sales-bot deleted",
            "openclawinstance/ops-bot deleted",
            "project/helpdesk deleted",
            "tenant/acme deleted"
        ]
    );
    assert_eq!(s.get_json("/api/v1/tenants")["items"], json!([]));
    let index = s.settled_index();
    let out = s.cli(&["delete", "-f", &path]).code(1);
    assert!(
        out.stderr.contains("not found") && out.stderr.contains("fleet.yaml"),
        "{}",
        out.stderr
    );
    s.cli(&["delete", "-f", &path, "--ignore-not-found"]).ok();
    assert_eq!(s.index(), index);
}

#[test]
fn apply_a_directory_of_manifests() {
    let s = start();
    s.write_file(
        "repo/01-tenant.yaml",
        TENANT_AND_PROJECT.split("---\n").next().unwrap(),
    );
    s.write_file(
        "repo/02-project.yml",
        TENANT_AND_PROJECT.split("---\n").nth(1).unwrap(),
    );
    s.write_file("repo/README.md", "# not a manifest\n");
    s.write_file("repo/bots/support.yaml", &instance("support-bot", 2));
    let dir = s.scratch_dir().join("repo");
    let dir = dir.to_str().unwrap();
    let out = s.cli(&["apply", "-f", dir]).ok();
    assert_eq!(
        lines(&out),
        ["tenant/acme created", "project/helpdesk created"]
    );
    let out = s.cli(&["apply", "-f", dir, "-R"]).ok();
    assert_eq!(
        lines(&out),
        [
            "tenant/acme unchanged",
            "project/helpdesk unchanged",
            "openclawinstance/support-bot created"
        ]
    );
}

/// Runs `apply -f` on one file, expecting a refusal with `code` whose message contains every
/// needle, and no change to the store.
#[track_caller]
fn refused(s: &TestServer, name: &str, text: &str, code: i32, needles: &[&str]) {
    let before = s.settled_index();
    let path = s.write_file(name, text);
    let out = s.cli(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(
        out.code, code,
        "{name}: exit code\nstdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    assert_eq!(out.stdout, "", "{name}: nothing may be reported as applied");
    for needle in needles {
        assert!(
            out.stderr.contains(needle),
            "{name}: {needle:?} missing in\n{}",
            out.stderr
        );
    }
    assert_eq!(s.index(), before, "{name}: the store index moved");
}

#[test]
fn bad_inputs_are_refused_with_file_line_and_field() {
    let s = start();
    let ok = s.write_file("base.yaml", TENANT_AND_PROJECT);
    s.cli(&["apply", "-f", ok.to_str().unwrap()]).ok();
    let good = instance("bot", 1);

    // Every document is checked before anything is sent: a good first document is not applied.
    let malformed = format!(
        "{good}---\napiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: \"acme\n"
    );
    refused(
        &s,
        "malformed.yaml",
        &malformed,
        4,
        &["malformed.yaml:19:9: document 2: invalid YAML", "quote"],
    );
    let tabs = "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: a\n   extra: x\n";
    refused(&s, "indent.yaml", tabs, 4, &["indent.yaml:5:"]);

    let unknown_kind = good.replace("kind: OpenClawInstance", "kind: Deployment");
    refused(
        &s,
        "kind.yaml",
        &unknown_kind,
        4,
        &[
            "kind.yaml:2:",
            "kind: unknown kind \"Deployment\"",
            "OpenClawInstance",
        ],
    );

    let unknown_field = good.replace("  replicas: 1", "  replicaz: 1");
    refused(
        &s,
        "field.yaml",
        &unknown_field,
        4,
        &["field.yaml:11:", "spec.replicaz", "unknown field"],
    );

    let bad_name = good.replace("name: bot", "name: Support_Bot");
    refused(
        &s,
        "name.yaml",
        &bad_name,
        4,
        &["name.yaml:4:", "metadata.name", "DNS-1123"],
    );

    let negative = good.replace("replicas: 1", "replicas: -1");
    refused(
        &s,
        "neg.yaml",
        &negative,
        4,
        &["neg.yaml:11:", "spec.replicas", "between 0 and 100"],
    );
    let huge = good.replace("replicas: 1", "replicas: 100000");
    refused(
        &s,
        "huge.yaml",
        &huge,
        4,
        &["huge.yaml:11:", "spec.replicas", "100000"],
    );

    let gb = good.replace("memory: 2Gi", "memory: 4GB");
    refused(
        &s,
        "gb.yaml",
        &gb,
        4,
        &["gb.yaml:14:", "spec.resources.memory", "4Gi"],
    );

    let big = format!(
        "{good}  config:\n    blob: \"{}\"\n",
        "x".repeat(300 * 1024)
    );
    refused(&s, "big.yaml", &big, 4, &["big.yaml:1:", "256 KiB"]);

    // References are checked by the server, in the same transaction: still nothing written.
    let no_tenant = format!(
        "{good}---\n{}",
        instance("other", 1).replace("tenant: acme", "tenant: globex")
    );
    refused(
        &s,
        "no-tenant.yaml",
        &no_tenant,
        1,
        &[
            "no-tenant.yaml:21: document 2: metadata.project: project/globex/helpdesk does not exist",
            "nothing was applied",
        ],
    );
    let no_project = good.replace("project: helpdesk", "project: sales");
    refused(
        &s,
        "no-project.yaml",
        &no_project,
        1,
        &[
            "no-project.yaml:6: document 1: metadata.project: project/acme/sales does not exist",
            "nothing was applied",
        ],
    );

    // A stale resourceVersion is a conflict.
    let path = s.write_file("bot.yaml", &good);
    s.cli(&["apply", "-f", path.to_str().unwrap()]).ok();
    let current = s.get_json("/api/v1/tenants/acme/projects/helpdesk/instances/bot")["metadata"]["resourceVersion"].as_u64().unwrap();
    let stale = good
        .replace(
            "  project: helpdesk\n",
            &format!("  project: helpdesk\n  resourceVersion: {}\n", current - 1),
        )
        .replace("replicas: 1", "replicas: 2");
    refused(
        &s,
        "stale.yaml",
        &stale,
        1,
        &[
            "stale.yaml:7: document 1: metadata.resourceVersion",
            "Conflict",
            "nothing was applied",
        ],
    );
}

#[test]
fn tokens_are_checked() {
    let s = start();
    let path = s.write_file("fleet.yaml", &fleet(1));
    let path = path.to_str().unwrap();

    let out = s
        .cli_with(
            &["apply", "-f", path],
            &[("CLUSTERCLAW_SERVER", s.api_url())],
            None,
        )
        .code(2);
    assert!(
        out.stderr.contains("admin.token") && out.stderr.contains("clusterclaw login"),
        "{}",
        out.stderr
    );

    let env = [
        ("CLUSTERCLAW_SERVER", s.api_url()),
        ("CLUSTERCLAW_TOKEN", "cca_not-a-real-token-at-all"),
    ];
    let out = s.cli_with(&["apply", "-f", path], &env, None).code(1);
    assert!(out.stderr.contains("Unauthorized"), "{}", out.stderr);

    let join = s
        .cli(&["token", "create", "join", "--ttl", "1h", "--uses", "2"])
        .ok();
    let secret = join.stdout.trim();
    assert!(secret.starts_with("ccj_"), "{}", join.stdout);
    assert_eq!(
        join.stdout.lines().count(),
        1,
        "only the token goes to stdout"
    );
    let env = [
        ("CLUSTERCLAW_SERVER", s.api_url()),
        ("CLUSTERCLAW_TOKEN", secret),
    ];
    let out = s.cli_with(&["apply", "-f", path], &env, None).code(1);
    assert!(out.stderr.contains("Unauthorized"), "{}", out.stderr);
    let out = s.cli_with(&["get", "tenants"], &env, None).code(1);
    assert!(out.stderr.contains("Unauthorized"), "{}", out.stderr);
    assert_eq!(s.http("GET", "/api/v1/info", None, None).status, 401);

    // Nothing was applied with the wrong tokens.
    assert_eq!(s.get_json("/api/v1/tenants")["items"], json!([]));
}

#[test]
fn token_lifecycle() {
    let s = start();
    let created = s
        .cli(&[
            "token", "create", "join", "--ttl", "30m", "--name", "rack-7",
        ])
        .ok();
    let secret = created.stdout.trim().to_string();
    let list = s.cli(&["token", "list", "-o", "json"]).ok();
    assert!(
        !list.stdout.contains(&secret),
        "token list must never show a secret"
    );
    let items = list.json()["items"].as_array().unwrap().clone();
    let join = items
        .iter()
        .find(|t| t["kind"] == "join")
        .expect("the join token is listed");
    let id = join["id"].as_str().unwrap().to_string();
    let table = s.cli(&["token", "list"]).ok();
    assert!(
        table.stdout.contains(&id) && table.stdout.contains("active"),
        "{}",
        table.stdout
    );
    let out = s.cli(&["token", "revoke", &id]).ok();
    assert_eq!(out.stdout, format!("token {id} revoked\n"));
    let table = s.cli(&["token", "list"]).ok();
    let row = table
        .stdout
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap()
        .to_string();
    assert!(row.contains("revoked"), "{row}");
    s.cli(&["token", "create", "join", "--ttl", "soon"]).code(2);
    // An API token works until it is revoked.
    let api = s.cli(&["token", "create", "api", "--name", "ci"]).ok();
    let api_secret = api.stdout.trim().to_string();
    assert!(api_secret.starts_with("cca_"), "{}", api.stdout);
    let env = [
        ("CLUSTERCLAW_SERVER", s.api_url()),
        ("CLUSTERCLAW_TOKEN", api_secret.as_str()),
    ];
    s.cli_with(&["get", "tenants"], &env, None).ok();
    let list = s.cli(&["token", "list", "-o", "json"]).ok().json();
    let api_id = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .expect("the API token is listed")["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.cli(&["token", "revoke", &api_id]).ok();
    let out = s.cli_with(&["get", "tenants"], &env, None).code(1);
    assert!(out.stderr.contains("revoked"), "{}", out.stderr);
}

#[test]
fn login_saves_settings_and_config_view_redacts_the_token() {
    let s = start();
    let config = s.scratch_dir().join("home/clusterclaw/config.toml");
    let config = config.to_str().unwrap();
    let env = [("CLUSTERCLAW_CONFIG", config)];
    let out = s
        .cli_with(
            &[
                "login",
                "--server",
                s.api_url(),
                "--token",
                s.admin_token(),
                "-t",
                "acme",
            ],
            &env,
            None,
        )
        .ok();
    assert!(out.stdout.contains("Logged in"), "{}", out.stdout);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(config).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Later commands need neither flag nor environment.
    s.cli_with(&["get", "tenants"], &env, None).ok();
    let view = s.cli_with(&["config", "view"], &env, None).ok();
    assert!(view.stdout.contains(s.api_url()), "{}", view.stdout);
    assert!(view.stdout.contains("tenant = \"acme\""), "{}", view.stdout);
    assert!(
        !view.stdout.contains(s.admin_token()),
        "config view must not print the token"
    );
    // A wrong token is not saved.
    let out = s
        .cli_with(
            &[
                "login",
                "--server",
                s.api_url(),
                "--token",
                "cca_wrong-wrong-wrong",
            ],
            &env,
            None,
        )
        .code(1);
    assert!(out.stderr.contains("Unauthorized"), "{}", out.stderr);
    assert!(
        fs::read_to_string(config)
            .unwrap()
            .contains(s.admin_token())
    );
}

#[test]
fn an_acknowledged_apply_survives_kill_9() {
    let mut s = start();
    let path = s.write_file("fleet.yaml", &fleet(2));
    s.cli(&["apply", "-f", path.to_str().unwrap()]).ok();
    s.kill();
    s.restart().unwrap_or_else(|e| panic!("restart: {e:#}"));
    let bot = s
        .cli(&[
            "get",
            "instance",
            "support-bot",
            "-t",
            "acme",
            "-p",
            "helpdesk",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(bot["spec"]["replicas"], 2);
    assert_eq!(
        s.cli(&["get", "instances", "-o", "json"]).ok().json()["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn sigterm_stops_the_server_with_exit_code_0() {
    let mut s = start();
    let status = s.terminate().unwrap();
    assert_eq!(status.code(), Some(0), "server log:\n{}", s.log());
}

#[test]
fn an_unreachable_server_exits_3_and_names_the_url() {
    let s = start();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let env = [
        ("CLUSTERCLAW_SERVER", url.as_str()),
        ("CLUSTERCLAW_TOKEN", s.admin_token()),
    ];
    let out = s.cli_with(&["get", "tenants"], &env, None).code(3);
    assert!(
        out.stderr.contains(&url) && out.stderr.contains("--server"),
        "{}",
        out.stderr
    );
}

#[test]
fn listing_ten_thousand_instances_is_fast() {
    let s = start();
    let mut items = vec![
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": "acme"}}),
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project", "metadata": {"name": "helpdesk", "tenant": "acme"}}),
    ];
    for i in 0..10_000 {
        items.push(json!({
            "apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
            "metadata": {"name": format!("bot-{i:05}"), "tenant": "acme", "project": "helpdesk", "labels": {"team": "support"}},
            "spec": {"version": "2026.7.1", "replicas": 1, "config": {"gateway": {"bind": "lan"}}}
        }));
    }
    let body = json!({ "items": items }).to_string();
    let resp = s.http("POST", "/api/v1/apply", Some(&body), Some(s.admin_token()));
    assert_eq!(resp.status, 200, "{}", resp.body);

    // Warm up (page cache, first connection), then take the best of three.
    s.cli(&["get", "instances", "-o", "json"]).ok();
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..3 {
        let started = Instant::now();
        let o = s.cli(&["get", "instances", "-o", "json"]).ok();
        best = best.min(started.elapsed());
        out = Some(o);
    }
    let list = out.unwrap().json();
    assert_eq!(list["items"].as_array().unwrap().len(), 10_000);
    assert_eq!(list["items"][9_999]["metadata"]["name"], "bot-09999");
    let limit = if cfg!(debug_assertions) {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(500)
    };
    assert!(
        best < limit,
        "get instances -o json with 10,000 instances took {best:?} (limit {limit:?})"
    );
    let table = s.cli(&["get", "instances"]).ok();
    assert_eq!(table.stdout.lines().count(), 10_001);
}

#[test]
fn usage_errors_exit_2_and_help_documents_exit_codes() {
    let bin = clusterclaw_bin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = run_cli(&bin, dir.path(), &["get", "pods"], &[], None);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("instances"), "{}", out.stderr);
    let help = run_cli(&bin, dir.path(), &["--help"], &[], None);
    assert_eq!(help.code, 0);
    assert!(
        help.stdout.contains("Exit codes:")
            && help.stdout.contains("3  the server cannot be reached"),
        "{}",
        help.stdout
    );
    let out = run_cli(&bin, dir.path(), &["completion", "bash"], &[], None);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("clusterclaw") && out.stdout.contains("apply"));
    // Local checks need no server.
    fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata: {name: Bad}\n",
    )
    .unwrap();
    let out = run_cli(&bin, dir.path(), &["apply", "-f", "bad.yaml"], &[], None);
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(
        out.stderr.contains("bad.yaml:3: document 1: metadata.name"),
        "{}",
        out.stderr
    );
}

#[test]
fn pki_init_writes_a_ca_once() {
    let bin = clusterclaw_bin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let pki_arg = pki.to_str().unwrap();
    let out = run_cli(
        &bin,
        dir.path(),
        &[
            "pki",
            "init",
            "--dir",
            pki_arg,
            "--server-name",
            "cc.example.com",
        ],
        &[],
        None,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    for file in ["ca.crt", "ca.key", "server.crt", "server.key"] {
        assert!(
            pki.join(file).exists(),
            "{file} missing; stdout:\n{}",
            out.stdout
        );
        assert!(out.stdout.contains(file), "{}", out.stdout);
    }
    let again = run_cli(
        &bin,
        dir.path(),
        &["pki", "init", "--dir", pki_arg],
        &[],
        None,
    );
    assert_eq!(again.code, 1, "{}", again.stderr);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
}

#[test]
fn an_https_api_is_trusted_through_ca_cert() {
    let bin = clusterclaw_bin().unwrap();
    let work = tempfile::tempdir().unwrap();
    let pki = work.path().join("api-pki");
    let pki_arg = pki.to_str().unwrap();
    let out = run_cli(
        &bin,
        work.path(),
        &["pki", "init", "--dir", pki_arg],
        &[],
        None,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let cert = pki.join("server.crt");
    let key = pki.join("server.key");
    let s = TestServer::start_with(&[
        "--api-tls-cert",
        cert.to_str().unwrap(),
        "--api-tls-key",
        key.to_str().unwrap(),
    ])
    .unwrap_or_else(|e| panic!("start an https server: {e:#}"));
    assert!(s.api_url().starts_with("https://"), "{}", s.api_url());
    let ca = pki.join("ca.crt");
    let ca = ca.to_str().unwrap();

    let env = [
        ("CLUSTERCLAW_SERVER", s.api_url()),
        ("CLUSTERCLAW_TOKEN", s.admin_token()),
    ];
    let out = s.cli_with(&["get", "tenants"], &env, None).code(3);
    assert!(out.stderr.contains("--ca-cert"), "{}", out.stderr);

    let with_ca = [
        ("CLUSTERCLAW_SERVER", s.api_url()),
        ("CLUSTERCLAW_TOKEN", s.admin_token()),
        ("CLUSTERCLAW_CA_CERT", ca),
    ];
    let path = s.write_file("fleet.yaml", &fleet(1));
    s.cli_with(&["apply", "-f", path.to_str().unwrap()], &with_ca, None)
        .ok();
    let out = s
        .cli_with(&["get", "tenants", "-o", "json"], &with_ca, None)
        .ok();
    assert_eq!(out.json()["items"][0]["metadata"]["name"], "acme");

    // login keeps the CA, so later commands need no flags.
    let config = s.scratch_dir().join("login.toml");
    let config = config.to_str().unwrap();
    let out = s.cli_with(
        &[
            "login",
            "--server",
            s.api_url(),
            "--token",
            s.admin_token(),
            "--ca-cert",
            ca,
        ],
        &[("CLUSTERCLAW_CONFIG", config)],
        None,
    );
    let out = out.ok();
    assert!(out.stdout.contains("Logged in"), "{}", out.stdout);
    s.cli_with(
        &["get", "instances"],
        &[("CLUSTERCLAW_CONFIG", config)],
        None,
    )
    .ok();
}

#[test]
fn a_token_lifetime_beyond_ten_years_is_refused_without_a_crash() {
    let s = start();
    let count = |s: &TestServer| {
        s.cli(&["token", "list", "-o", "json"]).ok().json()["items"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = count(&s);
    let out = s
        .cli(&["token", "create", "join", "--ttl", "8000y"])
        .code(1);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(
        out.stderr.contains("ttl") && out.stderr.contains("maximum of 10y"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.is_empty(),
        "no secret is printed: {}",
        out.stdout
    );
    assert_eq!(count(&s), before, "no token was stored");
    // The longest lifetime allowed is created and listed with its date.
    let out = s.cli(&["token", "create", "join", "--ttl", "10y"]).ok();
    assert!(out.stdout.trim().starts_with("ccj_"), "{}", out.stdout);
    s.cli(&["token", "list"]).ok();
}

#[test]
fn a_yaml_apply_of_thirty_thousand_tenants_is_read_whole() {
    let s = start();
    let body: String = (0..30_000)
        .map(|i| {
            format!(
                "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata:\n  name: t-{i:05}\n---\n"
            )
        })
        .collect();
    let resp = s.http(
        "POST",
        "/api/v1/apply?dryRun=true",
        Some(&body),
        Some(s.admin_token()),
    );
    assert_eq!(
        resp.status,
        200,
        "{}",
        &resp.body[..resp.body.len().min(500)]
    );
    assert_eq!(resp.json()["items"].as_array().unwrap().len(), 30_000);
    assert_eq!(
        s.get_json("/api/v1/tenants")["items"],
        json!([]),
        "a dry run"
    );
}

#[test]
fn the_database_is_readable_by_the_server_user_only() {
    use std::os::unix::fs::PermissionsExt;
    let mut s = start();
    let modes = |s: &TestServer| -> Vec<(String, u32)> {
        fs::read_dir(s.data_dir())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("clusterclaw.db")
            })
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().permissions().mode() & 0o777,
                )
            })
            .collect()
    };
    apply_fleet(&s);
    let found = modes(&s);
    assert!(
        found.iter().any(|(n, _)| n == "clusterclaw.db"),
        "{found:?}"
    );
    assert!(found.iter().all(|(_, m)| *m == 0o600), "{found:?}");
    // A data directory opened up by hand, with the database in it, is tightened at start.
    s.terminate().unwrap();
    fs::set_permissions(s.data_dir(), fs::Permissions::from_mode(0o755)).unwrap();
    for (name, _) in modes(&s) {
        fs::set_permissions(s.data_dir().join(name), fs::Permissions::from_mode(0o644)).unwrap();
    }
    s.restart().unwrap();
    s.cli(&[
        "scale",
        "instance",
        "support-bot",
        "--replicas",
        "2",
        "-t",
        "acme",
        "-p",
        "helpdesk",
    ])
    .ok();
    let found = modes(&s);
    assert!(found.iter().all(|(_, m)| *m == 0o600), "{found:?}");
}
