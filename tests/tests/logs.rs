//! End to end: `clusterclaw logs` streams a replica's container output from its host through
//! the agent's own connection, redacted, merged across replicas, followed across a
//! replacement, in scope only.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::{CliOutput, TestServer, clusterclaw_bin};
use serde_json::Value;

const GATEWAY_TOKEN: &str = "gw-e2e-token-5f1d2c";
const OTHER_SECRET: &str = "sk-e2e-secret-9a7b3e";

fn manifest(scope: &Scope, name: &str, image: &str, rate: &str) -> String {
    format!(
        "{}  env:\n    OPENCLAW_GATEWAY_TOKEN:\n      secretRef: {{name: logkeys, key: token}}\n    \
         OPENCLAW_EXTRA_KEY:\n      secretRef: {{name: logkeys, key: extra}}\n    \
         STANDIN_LOG_ENV: \"1\"\n    STANDIN_LOG_LINES_PER_SEC: \"{rate}\"\n",
        scope.instance_manifest(name, image, 2, &BTreeMap::new())
    )
}

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

/// A `clusterclaw logs -f` running in the background; its lines arrive on a channel.
struct Follower {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Follower {
    fn start(server: &TestServer, args: &[&str]) -> anyhow::Result<Follower> {
        let mut child = Command::new(clusterclaw_bin()?)
            .args(args)
            .env_remove("CLUSTERCLAW_CONFIG")
            .env(
                "CLUSTERCLAW_CONFIG",
                server.scratch_dir().join("cli-config.toml"),
            )
            .env("CLUSTERCLAW_SERVER", server.api_url())
            .env("CLUSTERCLAW_TOKEN", server.admin_token())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start clusterclaw logs -f")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Follower {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits for a line matching `want` among those seen from index `from` on (earlier
    /// waits may already have passed it: stdout and stderr lines of one moment arrive in
    /// either order); returns it.
    fn wait_line_since(
        &mut self,
        from: usize,
        what: &str,
        want: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        if let Some(line) = self.seen.iter().skip(from).find(|l| want(l)) {
            return Ok(line.clone());
        }
        self.wait_line(what, want)
    }

    /// Waits for a line matching `want`; returns it.
    fn wait_line(&mut self, what: &str, want: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!(
                    "no {what} within the deadline; last lines: {:?}",
                    self.seen.iter().rev().take(10).collect::<Vec<_>>()
                ),
            }
        }
    }

    fn wait_exit(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            // Keep draining, so that the CLI never blocks on a full pipe.
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            ensure!(
                Instant::now() < deadline,
                "logs -f did not end after the instance was deleted"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn logs_are_streamed_redacted_merged_followed_and_scoped() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("logs");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("logs-host");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;

    let (t, p) = (scope.tenant.as_str(), scope.project.as_str());
    scope.apply(&server, "base", &scope.base_manifest());
    server
        .cli(&[
            "secret",
            "set",
            "logkeys",
            "-t",
            t,
            "-p",
            p,
            "--from-literal",
            &format!("token={GATEWAY_TOKEN}"),
            "--from-literal",
            &format!("extra={OTHER_SECRET}"),
        ])
        .ok();
    let name = "bot";
    scope.apply(&server, name, &manifest(&scope, name, &image, "5"));
    wait_ready(&server, &scope, name, 2)?;

    // The lowest replica by default, redacted.
    let started = Instant::now();
    let out = server
        .cli(&["logs", "instance", name, "-t", t, "-p", p])
        .ok();
    eprintln!("logs answered in {:?}", started.elapsed());
    ensure!(
        out.stdout.contains("openclaw-standin: listening"),
        "{}",
        out.stdout
    );
    ensure!(
        out.stdout
            .contains("openclaw-standin: env OPENCLAW_GATEWAY_TOKEN=[REDACTED]")
            && out
                .stdout
                .contains("openclaw-standin: env OPENCLAW_EXTRA_KEY=[REDACTED]"),
        "the secret values must be replaced: {}",
        out.stdout
    );
    ensure!(
        out.stdout
            .contains("openclaw-standin: env STANDIN_LOG_ENV=1"),
        "{}",
        out.stdout
    );
    for secret in [GATEWAY_TOKEN, OTHER_SECRET] {
        ensure!(!out.stdout.contains(secret), "{secret} leaked");
    }

    // One replica, its last line.
    let out = server
        .cli(&[
            "logs",
            "instance",
            name,
            "-t",
            t,
            "-p",
            p,
            "--replica",
            "1",
            "--tail",
            "1",
        ])
        .ok();
    ensure!(out.stdout.lines().count() == 1, "{:?}", out.stdout);

    // Every replica, line by line with its prefix.
    let out = server
        .cli(&[
            "logs",
            "instance",
            name,
            "-t",
            t,
            "-p",
            p,
            "--all",
            "--timestamps",
        ])
        .ok();
    ensure!(
        out.stdout
            .lines()
            .all(|l| l.starts_with("bot-0 | ") || l.starts_with("bot-1 | ")),
        "{}",
        out.stdout
    );
    for prefix in ["bot-0 | ", "bot-1 | "] {
        ensure!(
            out.stdout
                .lines()
                .any(|l| l.starts_with(prefix) && l.contains("OPENCLAW_GATEWAY_TOKEN=[REDACTED]")),
            "{prefix}: {}",
            out.stdout
        );
    }
    for secret in [GATEWAY_TOKEN, OTHER_SECRET] {
        ensure!(!out.stdout.contains(secret), "{secret} leaked with --all");
    }

    // Bad input names the flag (usage: exit 2); the API answers 400 with the field.
    for (args, flag) in [
        (vec!["--replica", "1", "--all"], "--all"),
        (vec!["--tail", "-1"], "--tail"),
        (vec!["--since", "yesterday"], "--since"),
    ] {
        let mut all = vec!["logs", "instance", name, "-t", t, "-p", p];
        all.extend(args.iter().copied());
        let out = server.cli(&all).code(2);
        ensure!(out.stderr.contains(flag), "{args:?}: {}", out.stderr);
    }
    let out = server
        .cli(&["logs", "instance", name, "-t", t, "-p", p, "--replica", "7"])
        .code(1);
    ensure!(
        out.stderr.contains("--replica") && out.stderr.contains("no replica 7"),
        "{}",
        out.stderr
    );
    let logs_path = format!("{}/logs", scope.instance_path(name));
    for (query, field) in [
        ("tail=-1", "tail"),
        ("since=soon", "since"),
        ("replica=1&all=true", "replica"),
        ("replica=9", "replica"),
    ] {
        let r = server.http(
            "GET",
            &format!("{logs_path}?{query}"),
            None,
            Some(server.admin_token()),
        );
        ensure!(r.status == 400, "{query}: {} {}", r.status, r.body);
        let v: Value = serde_json::from_str(&r.body)?;
        ensure!(v["details"][0]["field"] == field, "{query}: {v}");
    }

    // Another tenant's token: the logs do not exist, exactly as the instance does not.
    let other = Scope::new("logs-other");
    other.apply(&server, "base", &other.base_manifest());
    let out = server
        .cli(&[
            "token",
            "create",
            "api",
            "--role",
            "tenant-admin",
            "-t",
            &other.tenant,
        ])
        .ok();
    let foreign = out.stdout.trim().to_string();
    let instance = server.http("GET", &scope.instance_path(name), None, Some(&foreign));
    let logs = server.http("GET", &logs_path, None, Some(&foreign));
    ensure!(
        instance.status == 404 && logs.status == 404,
        "{} {}",
        instance.status,
        logs.status
    );
    let (a, b): (Value, Value) = (
        serde_json::from_str(&instance.body)?,
        serde_json::from_str(&logs.body)?,
    );
    ensure!(a == b, "{a} vs {b}");
    let out = as_token(
        &server,
        &foreign,
        &["logs", "instance", name, "-t", t, "-p", p],
    );
    ensure!(out.code == 1, "{}", out.stderr);
    for secret in [GATEWAY_TOKEN, OTHER_SECRET] {
        ensure!(!out.stdout.contains(secret) && !out.stderr.contains(secret));
    }

    // Follow: new lines, then a spec change replaces the container and the stream goes on
    // into the new one with a marker; deleting the instance ends it cleanly.
    let mut follower = Follower::start(
        &server,
        &[
            "logs", "instance", name, "-t", t, "-p", p, "-f", "--tail", "0",
        ],
    )?;
    let first = follower.wait_line("a new line", |l| l.contains("log line"))?;
    follower.wait_line("another new line", |l| l.contains("log line") && l != first)?;
    scope.apply(&server, name, &manifest(&scope, name, &image, "6"));
    let marker = follower.wait_line("the replacement marker", |l| {
        l.starts_with("--- replica bot-0 replaced: now container ")
    })?;
    ensure!(marker.contains("(revision "), "{marker}");
    let replaced_at = follower.seen.len();
    follower.wait_line_since(replaced_at, "the new container's start", |l| {
        l.contains("openclaw-standin: listening")
    })?;
    follower.wait_line_since(replaced_at, "the new container's env", |l| {
        l.contains("STANDIN_LOG_LINES_PER_SEC=6")
    })?;
    follower.wait_line("a line of the new container", |l| l.contains("log line"))?;
    scope.delete(&server, name);
    let status = follower.wait_exit()?;
    ensure!(status.success(), "logs -f ended with {status}");
    for secret in [GATEWAY_TOKEN, OTHER_SECRET] {
        ensure!(
            !follower.seen.iter().any(|l| l.contains(secret)),
            "{secret} leaked while following"
        );
    }
    drop(agent);
    Ok(())
}

/// The boot numbers of the stand-in's `listening on ... (boot N)` lines, in order.
fn boots(out: &str) -> Vec<u64> {
    out.lines()
        .filter(|l| l.contains("openclaw-standin: listening on"))
        .filter_map(|l| {
            l.rsplit_once("(boot ")
                .and_then(|(_, n)| n.trim_end_matches(')').parse().ok())
        })
        .collect()
}

/// `--previous`: a replica whose container crashed and was restarted shows what its previous
/// run wrote (up to the crash), and nothing of the runs before or of the current one; a
/// replica never restarted has no previous run.
#[test]
fn previous_shows_the_run_before_the_last_restart() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("logs-prev");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("logs-prev-host");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;
    let (t, p) = (scope.tenant.as_str(), scope.project.as_str());
    scope.apply(&server, "base", &scope.base_manifest());
    let crashing = BTreeMap::from([
        ("STANDIN_CRASH_AFTER_MS", "4000"),
        ("STANDIN_LOG_LINES_PER_SEC", "2"),
    ]);
    scope.apply(
        &server,
        "crashy",
        &scope.instance_manifest("crashy", &image, 1, &crashing),
    );
    scope.apply(
        &server,
        "steady",
        &scope.instance_manifest("steady", &image, 1, &BTreeMap::new()),
    );
    wait_ready(&server, &scope, "steady", 1)?;

    // The crashing replica restarted at least once: its container shows two boots.
    wait_for("a restart of crashy-0", WAIT, || {
        let out = server.cli(&["logs", "instance", "crashy", "-t", t, "-p", p]);
        Ok((boots(&out.stdout).len() >= 2).then_some(()))
    })?;
    // `--previous` between two reads of the whole output that show the same current run (a
    // restart in between would blur which run is current: read again).
    let all_boots = || {
        boots(
            &server
                .cli(&["logs", "instance", "crashy", "-t", t, "-p", p])
                .ok()
                .stdout,
        )
    };
    let (previous, current) = {
        let mut tries = 0;
        loop {
            let before = all_boots();
            let previous = server
                .cli(&["logs", "instance", "crashy", "-t", t, "-p", p, "--previous"])
                .ok();
            let after = all_boots();
            tries += 1;
            if before.iter().max() == after.iter().max() || tries == 5 {
                break (previous, after.iter().max().copied());
            }
        }
    };
    let earlier = boots(&previous.stdout);
    ensure!(
        earlier.len() == 1,
        "one run, the one before the current: {}",
        previous.stdout
    );
    ensure!(
        earlier.iter().max().copied() < current,
        "the current run (boot {current:?}) is not in --previous: {earlier:?}"
    );
    let last_line = previous.stdout.lines().last().unwrap_or_default();
    ensure!(
        last_line.contains("crashing as told"),
        "the previous run ends with its crash: {}",
        previous.stdout
    );
    ensure!(previous.stdout.contains("log line"), "{}", previous.stdout);
    // With timestamps each line starts with the engine's time.
    let stamped = server
        .cli(&[
            "logs",
            "instance",
            "crashy",
            "-t",
            t,
            "-p",
            p,
            "--previous",
            "--timestamps",
            "--tail",
            "3",
        ])
        .ok();
    ensure!(
        !stamped.stdout.is_empty()
            && stamped
                .stdout
                .lines()
                .all(|l| humantime::parse_rfc3339_weak(l.split(' ').next().unwrap_or("")).is_ok()),
        "{}",
        stamped.stdout
    );

    // Never restarted: no previous run, said plainly.
    let out = server
        .cli(&["logs", "instance", "steady", "-t", t, "-p", p, "--previous"])
        .code(1);
    ensure!(out.stderr.contains("no previous run"), "{}", out.stderr);
    drop(agent);
    Ok(())
}
