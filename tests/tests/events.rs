//! End to end: events of a real instance on a real agent and Docker, through the CLI.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clusterclaw_tests::agent::*;
use clusterclaw_tests::cli_stream::StreamingCli;
use clusterclaw_tests::server::TestServer;

/// `get events --for instance/NAME -w` and `get instances -w` print what happens as it
/// happens: an instance no host can take shows up in the instances' watch and its
/// `FailedScheduling` Warning in the events' watch; `describe` of the instance ends with it, and
/// `describe` of its tenant and project ends with their (empty) events.
#[test]
fn watches_print_changes_and_failed_scheduling_as_they_happen() -> anyhow::Result<()> {
    let server = TestServer::start()?;
    let scope = Scope::new("ev-watch");
    scope.apply_http(&server, &scope.base_manifest());
    let (t, p) = (scope.tenant.as_str(), scope.project.as_str());
    let mut events = StreamingCli::start(
        &server,
        &[
            "get",
            "events",
            "-t",
            t,
            "-p",
            p,
            "--for",
            "instance/bot",
            "-w",
        ],
    )?;
    let mut instances = StreamingCli::start(
        &server,
        &["get", "instances", "-t", t, "-p", p, "-w", "-o", "json"],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    // No host at all: the scheduler cannot place the replica.
    scope.apply_http(
        &server,
        &scope.instance_manifest("bot", "example/openclaw:1", 1, &BTreeMap::new()),
    );
    instances.wait_line("the new instance", |l| l.contains("\"name\":\"bot\""))?;
    let failed = events.wait_line("FailedScheduling", |l| {
        l.contains("FailedScheduling") && l.contains("instance/bot-0")
    })?;
    ensure!(failed.contains("Warning"), "{failed}");
    ensure!(failed.contains("scheduler"), "{failed}");

    let describe = server
        .cli(&["describe", "instance", "bot", "-t", t, "-p", p])
        .ok();
    let (_, tail) = describe
        .stdout
        .rsplit_once("Events:")
        .context("describe ends with Events:")?;
    ensure!(tail.contains("FailedScheduling"), "{}", describe.stdout);
    for args in [
        vec!["describe", "tenant", t],
        vec!["describe", "project", p, "-t", t],
    ] {
        let out = server.cli(&args).ok();
        ensure!(out.stdout.contains("\nEvents:"), "{args:?}: {}", out.stdout);
    }

    // Deleting the instance shows in the instances' watch too.
    scope.delete(&server, "bot");
    instances.wait_line("the instance's delete", |l| {
        l.contains("\"name\":\"bot\"") && l.contains("\"deleted\":true")
    })?;
    Ok(())
}

/// An instance applied on a real host: `get events --for instance/NAME` shows it scheduled and
/// its container started, and `describe` ends with the same events.
#[test]
fn an_instance_shows_its_scheduling_and_container_start() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-events");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host_name = unique("ev-host");
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host_name])?;
    let host = agent.wait_enrolled()?;
    cleanup.host(&host);
    wait_host_ready(&server, &host)?;
    scope.apply(&server, "base", &scope.base_manifest());
    scope.apply(
        &server,
        "bot",
        &scope.instance_manifest("bot", &image, 1, &Default::default()),
    );
    wait_ready(&server, &scope, "bot", 1)?;

    let args = [
        "get",
        "events",
        "-t",
        &scope.tenant,
        "-p",
        &scope.project,
        "--for",
        "instance/bot",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = server.cli(&args).ok();
        if out.stdout.contains("ContainerStarted") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(out.stdout.contains("Scheduled"), "{}", out.stdout);
    assert!(out.stdout.contains("ContainerStarted"), "{}", out.stdout);
    assert!(out.stdout.contains("instance/bot-0"), "{}", out.stdout);
    assert!(
        out.stdout.contains(&format!("agent/{host}")),
        "{}",
        out.stdout
    );

    let describe = server
        .cli(&[
            "describe",
            "instance",
            "bot",
            "-t",
            &scope.tenant,
            "-p",
            &scope.project,
        ])
        .ok();
    let events = describe
        .stdout
        .rsplit_once("Events:")
        .map(|(_, e)| e.to_string())
        .unwrap_or_default();
    assert!(events.contains("ContainerStarted"), "{}", describe.stdout);
    assert!(events.contains("Scheduled"), "{}", describe.stdout);

    // Host events are for cluster-wide callers: the host's own ones show up for the admin.
    let host_events = server
        .cli(&["get", "events", "--for", &format!("host/{host}")])
        .ok();
    assert!(host_events.code == 0, "{}", host_events.stderr);
    drop(agent);
    Ok(())
}
