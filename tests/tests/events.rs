//! End to end: events of a real instance on a real agent and Docker, through the CLI.

use std::time::{Duration, Instant};

use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;

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
