//! End to end: an enrolled host started with `--re-enroll` and a new join token gets a new identity on the same data directory; the old identity's containers go, its state volume stays (listed as Orphaned on the new host until deleted), the old host turns NotReady.

use std::time::Duration;

use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;
use serde_json::Value;

#[test]
fn re_enrollment_under_a_new_identity() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-reenroll");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server =
        TestServer::start_on(&format!("127.0.0.1:{port}"), &["--heartbeat-timeout", "5s"])?;
    let token = join_token(&server, 2, "10m");
    let (old_name, new_name) = (unique("re-old"), unique("re-new"));
    cleanup.host(&old_name);
    cleanup.host(&new_name);
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &old_name])?;
    assert_eq!(agent.wait_enrolled()?, old_name);
    wait_host_ready(&server, &old_name)?;

    let name = "bot";
    scope.apply(&server, "base", &scope.base_manifest());
    scope.apply(
        &server,
        name,
        &scope.instance_manifest(name, &image, 1, &Default::default()),
    );
    let (_, before) = wait_ready(&server, &scope, name, 1)?;
    let old = before[&format!("{name}-0")].clone();
    assert!(!old.volume.is_empty());

    // The same data directory, a new join token and --re-enroll.
    agent.kill9();
    let mut args: Vec<String> = vec!["--log-format".into(), "json".into()];
    args.extend(FAST.iter().map(|s| s.to_string()));
    args.extend(
        [
            "--join-token",
            token.as_str(),
            "--re-enroll",
            "--name",
            &new_name,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    agent.args = args;
    agent.spawn()?;
    let result = (|| -> anyhow::Result<()> {
        wait_for("the new identity", WAIT, || {
            Ok(agent
                .identity()
                .ok()
                .filter(|id| id.record.host_id == new_name)
                .map(drop))
        })?;
        wait_host_ready(&server, &new_name)?;
        // The old identity's container is gone; its state volume stays.
        wait_for("the old container to go", WAIT, || {
            Ok(scope.containers(name)?.is_empty().then_some(()))
        })?;
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            scope.volumes()?,
            vec![old.volume.clone()],
            "the old state volume is kept, not adopted or deleted"
        );
        assert!(
            std::fs::read_dir(agent.data_dir())?
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with("removed-")),
            "the old identity is set aside in the data directory"
        );
        // The old host stops reporting: NotReady, and it stays until an admin deletes it.
        wait_for("the old host NotReady", WAIT, || {
            let v = server.get_json(&format!("/api/v1/hosts/{old_name}"));
            Ok(
                (v.pointer("/status/phase").and_then(Value::as_str) == Some("NotReady"))
                    .then_some(()),
            )
        })?;
        assert!(agent.log().contains("enrolling again under a new identity"));

        // The new identity reports the old identity's volume: listed on the new host as
        // Orphaned (its replica is placed on the old host), and removed on request only.
        let listed_orphan = || -> anyhow::Result<Option<()>> {
            let out = server
                .cli(&["get", "volumes", "--host", &new_name, "-o", "json"])
                .ok();
            Ok(out.json()["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == old.volume.as_str() && v["status"] == "Orphaned")
                .map(drop))
        };
        wait_for(
            "the old volume listed Orphaned on the new host",
            WAIT,
            listed_orphan,
        )?;
        assert_eq!(scope.volumes()?, vec![old.volume.clone()]);
        server
            .cli(&["delete", "volume", &format!("{new_name}/{}", old.volume)])
            .ok();
        wait_for("the old volume removed", WAIT, || {
            Ok(scope.volumes()?.is_empty().then_some(()))
        })?;
        Ok(())
    })();
    if let Err(err) = &result {
        eprintln!("{err:#}\n--- agent log:\n{}", agent.log());
    }
    result
}
