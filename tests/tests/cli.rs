//! End to end: the `clusterclaw` CLI against the real server binary: secrets named with and
//! without a tenant, `delete -f` all or nothing, kinds in help and unknown kinds, and TLS
//! clients built without a panic (by every command, and by `clusterclaw dev` at start).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clusterclaw_tests::agent::free_port;
use clusterclaw_tests::server::{CliOutput, TestServer, clusterclaw_bin, run_cli};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const FAMILY: &str = "\
apiVersion: clusterclaw.io/v1
kind: Tenant
metadata:
  name: acme
---
apiVersion: clusterclaw.io/v1
kind: Project
metadata:
  name: helpdesk
  tenant: acme
---
apiVersion: clusterclaw.io/v1
kind: OpenClawInstance
metadata:
  name: bot
  tenant: acme
  project: helpdesk
spec:
  version: 2026.7.1
";

const OTHER_PROJECT: &str = "\
apiVersion: clusterclaw.io/v1
kind: Project
metadata:
  name: other
  tenant: acme
";

fn start() -> TestServer {
    TestServer::start().unwrap_or_else(|e| panic!("start clusterclaw server: {e:#}"))
}

fn apply(s: &TestServer, name: &str, text: &str) {
    let path = s.write_file(name, text);
    s.cli(&["apply", "-f", path.to_str().unwrap()]).ok();
}

/// The first whitespace-separated fields of the table row that starts with `name`.
fn row<'a>(out: &'a CliOutput, name: &str) -> Vec<&'a str> {
    out.stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row {name} in\n{}", out.stdout))
}

#[test]
fn a_tenant_secret_named_with_its_tenant_is_found_by_every_verb() {
    let s = start();
    apply(&s, "family.yaml", FAMILY);
    s.cli(&[
        "secret",
        "set",
        "llm-keys",
        "-t",
        "acme",
        "--from-literal",
        "anthropic=sk-e2e",
    ])
    .ok();
    s.cli(&[
        "secret",
        "set",
        "desk-keys",
        "-t",
        "acme",
        "-p",
        "helpdesk",
        "--from-literal",
        "openai=sk-e2e",
    ])
    .ok();

    // With -t and no -p: the tenant's secret, as `secret set` put it there; without -t too.
    for args in [
        &["get", "secret", "llm-keys", "-t", "acme"][..],
        &["get", "secret", "llm-keys"][..],
        &["get", "sec", "llm-keys", "--tenant", "acme"][..],
    ] {
        let out = s.cli(args).ok();
        assert_eq!(
            row(&out, "llm-keys")[..4],
            ["llm-keys", "acme", "-", "anthropic"]
        );
    }
    let out = s
        .cli(&["get", "secret", "llm-keys", "-t", "acme", "-o", "json"])
        .ok();
    let v = out.json();
    assert_eq!(v["metadata"]["tenant"], "acme");
    assert!(v["metadata"].get("project").is_none(), "{v}");
    let out = s
        .cli(&["describe", "secret", "llm-keys", "-t", "acme"])
        .ok();
    assert!(out.stdout.contains("llm-keys"), "{}", out.stdout);
    assert!(out.stdout.contains("anthropic"), "{}", out.stdout);
    assert!(!out.stdout.contains("sk-e2e"), "{}", out.stdout);

    // A project's secret: with -p; with -t alone it is not the tenant's.
    let out = s
        .cli(&["get", "secret", "desk-keys", "-t", "acme", "-p", "helpdesk"])
        .ok();
    assert_eq!(
        row(&out, "desk-keys")[..4],
        ["desk-keys", "acme", "helpdesk", "openai"]
    );
    let out = s.cli(&["get", "secret", "desk-keys", "-t", "acme"]).code(1);
    assert_eq!(
        out.stderr,
        "error: secret/acme/desk-keys not found (NotFound)\n"
    );
    // Found without a tenant, it is deleted where it lives (its project).
    let out = s.cli(&["describe", "secret", "desk-keys"]).ok();
    assert!(out.stdout.contains("helpdesk"), "{}", out.stdout);

    let out = s.cli(&["delete", "secret", "llm-keys", "-t", "acme"]).ok();
    assert_eq!(out.stdout, "secret/llm-keys deleted\n");
    let out = s.cli(&["get", "secret", "llm-keys", "-t", "acme"]).code(1);
    assert_eq!(
        out.stderr,
        "error: secret/acme/llm-keys not found (NotFound)\n"
    );
    let out = s.cli(&["delete", "secret", "desk-keys"]).ok();
    assert_eq!(out.stdout, "secret/desk-keys deleted\n");
    let out = s.cli(&["get", "secrets", "-t", "acme"]).ok();
    assert_eq!(out.stdout, "");
}

#[test]
fn delete_from_a_file_is_all_or_nothing() {
    let s = start();
    apply(&s, "family.yaml", FAMILY);
    apply(&s, "other.yaml", OTHER_PROJECT);
    let file = s.write_file("delete.yaml", FAMILY);
    let file = file.to_str().unwrap();

    // The tenant still has a project the file does not name: the whole file is refused,
    // naming the document, and the instance (deleted first otherwise) is still there.
    let before = s.index();
    let out = s.cli(&["delete", "-f", file]).code(1);
    assert_eq!(
        out.stderr,
        format!(
            "error: {file}:1: document 1: tenant/acme still has 1 project; delete it first; nothing was deleted (Conflict)\n"
        )
    );
    assert_eq!(out.stdout, "");
    s.cli(&["get", "instance", "bot", "-t", "acme", "-p", "helpdesk"])
        .ok();
    s.cli(&["get", "project", "helpdesk", "-t", "acme"]).ok();
    assert_eq!(s.index(), before, "nothing was written");

    // A dry run of a batch that can go through deletes nothing either.
    s.cli(&["delete", "project", "other", "-t", "acme"]).ok();
    let out = s.cli(&["delete", "-f", file, "--dry-run"]).ok();
    assert_eq!(
        out.stdout,
        "openclawinstance/bot deleted (dry run)\nproject/helpdesk deleted (dry run)\ntenant/acme deleted (dry run)\n"
    );
    s.cli(&["get", "instance", "bot", "-t", "acme", "-p", "helpdesk"])
        .ok();

    // Children before parents, in one transaction.
    let before = s.index();
    let out = s.cli(&["delete", "-f", file]).ok();
    assert_eq!(
        out.stdout,
        "openclawinstance/bot deleted\nproject/helpdesk deleted\ntenant/acme deleted\n"
    );
    assert_eq!(s.index(), before + 1, "one index bump for the batch");
    s.cli(&["get", "tenant", "acme"]).code(1);

    // Gone: refused, naming the first missing document, unless missing ones are allowed.
    let out = s.cli(&["delete", "-f", file]).code(1);
    assert!(
        out.stderr.starts_with(&format!("error: {file}:")) && out.stderr.contains("not found"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("nothing was deleted"), "{}", out.stderr);
    let out = s.cli(&["delete", "-f", file, "--ignore-not-found"]).ok();
    assert_eq!(out.stdout, "");
    s.cli(&["delete", "tenant", "acme", "--ignore-not-found"])
        .ok();
}

#[test]
fn help_lists_every_kind_and_an_unknown_kind_gets_the_nearest() {
    let bin = clusterclaw_bin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for command in ["get", "describe", "delete"] {
        let out = run_cli(&bin, dir.path(), &[command, "--help"], &[], None);
        assert_eq!(out.code, 0, "{}", out.stderr);
        for line in [
            "  tenants          tenant, tn",
            "  projects         project, proj, pj",
            "  instances        instance, inst, openclawinstances, openclawinstance, oci",
            "  hosts            host, ho",
            "  configtemplates  configtemplate, templates, template, ct",
            "  secrets          secret, sec",
        ] {
            assert!(
                out.stdout.lines().any(|l| l == line),
                "{command} --help lacks {line:?}:\n{}",
                out.stdout
            );
        }
    }
    for (args, says) in [
        (
            &["get", "hsots"][..],
            "unknown kind \"hsots\"; did you mean \"hosts\"?",
        ),
        (
            &["describe", "tenats", "acme"][..],
            "unknown kind \"tenats\"; did you mean \"tenants\"?",
        ),
        (
            &["delete", "secrte", "k"][..],
            "unknown kind \"secrte\"; did you mean \"secret\"?",
        ),
        (
            &["get", "pods"][..],
            "unknown kind \"pods\"; the kinds are tenants (tenant, tn), ",
        ),
    ] {
        let out = run_cli(&bin, dir.path(), args, &[], None);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
}

/// The CLI builds its HTTPS client on every command: with the TLS provider installed at start
/// this is an answer (exit 3, nothing listens), never a panic (exit 101).
#[test]
fn the_https_client_is_built_without_a_panic() {
    let bin = clusterclaw_bin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for scheme in ["https", "http", "https", "http", "https"] {
        let server = format!("{scheme}://127.0.0.1:{port}");
        let out = run_cli(
            &bin,
            dir.path(),
            &["get", "tenants"],
            &[
                ("CLUSTERCLAW_SERVER", &server),
                ("CLUSTERCLAW_TOKEN", "cca_x"),
            ],
            None,
        );
        assert_eq!(out.code, 3, "{server}: {}", out.stderr);
        assert!(
            out.stderr.contains("cannot reach the clusterclaw server"),
            "{}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
}

/// `clusterclaw dev` builds its HTTP client right after its in-process server starts; while the
/// TLS provider was installed on the side rather than at process start, that panicked in a race
/// (2 starts in 61). Ten starts, each to a Ready host and a clean stop on Ctrl-C. The agent is
/// pointed at an engine socket that does not exist, so no container of this machine is touched.
#[test]
fn dev_starts_and_stops_cleanly_every_time() {
    let bin = clusterclaw_bin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let no_engine = format!("unix://{}", dir.path().join("no-engine.sock").display());
    for i in 0..10 {
        let data = dir.path().join(format!("dev-{i}"));
        let log = dir.path().join(format!("dev-{i}.log"));
        let mut child = Command::new(&bin)
            .args([
                "dev",
                "--data-dir",
                data.to_str().unwrap(),
                "--api-listen",
                &format!("127.0.0.1:{}", free_port()),
                "--agent-listen",
                &format!("127.0.0.1:{}", free_port()),
                "--docker-host",
                &no_engine,
            ])
            .current_dir(dir.path())
            // `dev` rewrites the CLI config file: a scratch one, never the user's.
            .env(
                "CLUSTERCLAW_CONFIG",
                dir.path().join(format!("cli-{i}.toml")),
            )
            .env_remove("CLUSTERCLAW_SERVER")
            .env_remove("CLUSTERCLAW_TOKEN")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut seen = Vec::new();
        let ready = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("a local cluster is running") => break true,
                Ok(line) => seen.push(line),
                Err(_) => break false,
            }
        };
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "start {i}: not ready\nstdout:\n{}\nlog:\n{}",
                seen.join("\n"),
                log_text()
            );
        }
        kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
        let stop = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > stop {
                let _ = child.kill();
                let _ = child.wait();
                panic!("start {i}: no exit after Ctrl-C\nlog:\n{}", log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = log_text();
        assert!(status.success(), "start {i}: {status}\nlog:\n{log}");
        assert!(
            !log.contains("panicked") && !log.contains("CryptoProvider"),
            "start {i}:\n{log}"
        );
    }
}
