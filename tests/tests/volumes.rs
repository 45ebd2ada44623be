//! End to end: a real agent reports its state volumes; `get volumes` and `describe host` show who claims each; `delete volume` is refused while a replica claims the volume and removes it from the engine once it is orphaned (its instance deleted with `whenDeleted: Retain`).

use clusterclaw_tests::agent::*;
use clusterclaw_tests::server::TestServer;
use serde_json::Value;

/// The volumes `get volumes -o json` lists on `host`.
fn listed(server: &TestServer, host: &str) -> Vec<Value> {
    let out = server
        .cli(&["get", "volumes", "--host", host, "-o", "json"])
        .ok();
    out.json()["items"].as_array().cloned().unwrap_or_default()
}

#[test]
fn orphaned_volumes_are_listed_refused_while_claimed_and_removed_on_request() -> anyhow::Result<()>
{
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-volumes");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(&format!("127.0.0.1:{port}"), &[])?;
    let token = join_token(&server, 1, "10m");
    let host = unique("vol-host");
    cleanup.host(&host);
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host])?;
    assert_eq!(agent.wait_enrolled()?, host);
    wait_host_ready(&server, &host)?;

    let name = "bot";
    scope.apply(&server, "base", &scope.base_manifest());
    let manifest = scope.instance_manifest(name, &image, 1, &Default::default())
        + "  volumeRetention:\n    whenDeleted: Retain\n";
    scope.apply(&server, name, &manifest);
    let result = (|| -> anyhow::Result<()> {
        let (_, containers) = wait_ready(&server, &scope, name, 1)?;
        let volume = containers[&format!("{name}-0")].volume.clone();
        assert!(!volume.is_empty());
        let target = format!("{host}/{volume}");

        // Reported and claimed by its replica.
        let v = wait_for("the volume listed InUse", WAIT, || {
            Ok(listed(&server, &host)
                .into_iter()
                .find(|v| v["name"] == volume.as_str() && v["status"] == "InUse"))
        })?;
        assert_eq!(v["tenant"], scope.tenant.as_str());
        assert_eq!(v["replica"], format!("{name}-0").as_str());

        // Claimed: refused, and the volume stays.
        let refused = server.cli(&["delete", "volume", &target]).code(1);
        assert!(
            refused.stderr.contains("InUse") && refused.stderr.contains("no replica claims it"),
            "{}",
            refused.stderr
        );
        assert_eq!(scope.volumes()?, vec![volume.clone()]);

        // The instance goes, its volume is kept (whenDeleted: Retain) and no replica claims it.
        scope.delete(&server, name);
        wait_for("the container to go", WAIT, || {
            Ok(scope.containers(name)?.is_empty().then_some(()))
        })?;
        wait_for("the volume listed Orphaned", WAIT, || {
            Ok(listed(&server, &host)
                .into_iter()
                .find(|v| v["name"] == volume.as_str() && v["status"] == "Orphaned"))
        })?;
        assert_eq!(
            scope.volumes()?,
            vec![volume.clone()],
            "kept while orphaned"
        );
        let table = server.cli(&["get", "volumes"]).ok().stdout;
        let row = table
            .lines()
            .find(|l| l.contains(&volume))
            .unwrap_or_else(|| panic!("no row for {volume}:\n{table}"));
        assert!(
            row.starts_with(&host)
                && row.contains(&format!("{}/{}/{name}", scope.tenant, scope.project))
                && row.contains("Orphaned"),
            "{table}"
        );
        let described = server.cli(&["describe", "host", &host]).ok().stdout;
        assert!(
            described.contains("Volumes:\n")
                && described
                    .lines()
                    .any(|l| l.contains(&volume) && l.contains("Orphaned")),
            "{described}"
        );

        // Orphaned: deleted on request, from the engine too, then no longer listed.
        let asked = std::time::Instant::now();
        let deleted = server.cli(&["delete", "volume", &target]).ok();
        assert!(deleted.stdout.contains("deleted"), "{}", deleted.stdout);
        wait_for("the docker volume to go", WAIT, || {
            Ok(scope.volumes()?.is_empty().then_some(()))
        })?;
        println!(
            "figure: delete volume to the engine's volume gone {:.2}s",
            asked.elapsed().as_secs_f64()
        );
        wait_for("the volume no longer listed", WAIT, || {
            Ok(listed(&server, &host)
                .iter()
                .all(|v| v["name"] != volume.as_str())
                .then_some(()))
        })?;
        // Gone: a second request finds nothing.
        server.cli(&["delete", "volume", &target]).code(1);
        server
            .cli(&["delete", "volume", &target, "--ignore-not-found"])
            .ok();
        Ok(())
    })();
    if let Err(err) = &result {
        eprintln!(
            "{err:#}\n--- agent log:\n{}\n--- server log:\n{}",
            agent.log(),
            server.log()
        );
    }
    result
}

/// With `--orphan-retention`, an orphaned volume is removed once it has been orphaned that
/// long, with an `OrphanedVolumeExpired` event on its host; a claimed one is never touched.
#[test]
fn orphans_past_the_retention_period_are_removed() -> anyhow::Result<()> {
    let Some(image) = require_docker()? else {
        return Ok(());
    };
    let scope = Scope::new("e2e-volret");
    let cleanup = DockerCleanup::tenant(&scope.tenant);
    let port = free_port();
    let server = TestServer::start_on(
        &format!("127.0.0.1:{port}"),
        &["--orphan-retention", "10s", "--resync-interval", "1s"],
    )?;
    let token = join_token(&server, 1, "10m");
    let host = unique("volret-host");
    cleanup.host(&host);
    let mut agent = TestAgent::enroll(&server, port, &token, &["--name", &host])?;
    assert_eq!(agent.wait_enrolled()?, host);
    wait_host_ready(&server, &host)?;
    scope.apply(&server, "base", &scope.base_manifest());
    let retained = "  volumeRetention:\n    whenDeleted: Retain\n";
    scope.apply(
        &server,
        "gone",
        &(scope.instance_manifest("gone", &image, 1, &Default::default()) + retained),
    );
    scope.apply(
        &server,
        "kept",
        &scope.instance_manifest("kept", &image, 1, &Default::default()),
    );
    let result = (|| -> anyhow::Result<()> {
        let (_, gone) = wait_ready(&server, &scope, "gone", 1)?;
        let (_, kept) = wait_ready(&server, &scope, "kept", 1)?;
        let gone_volume = gone["gone-0"].volume.clone();
        let kept_volume = kept["kept-0"].volume.clone();
        scope.delete(&server, "gone");
        let orphaned = std::time::Instant::now();
        wait_for("the orphan removed", WAIT, || {
            Ok((!scope.volumes()?.contains(&gone_volume)).then_some(()))
        })?;
        let took = orphaned.elapsed();
        println!(
            "figure: orphan removed {:.1}s after its instance was deleted (retention 10s)",
            took.as_secs_f64()
        );
        assert!(
            took >= std::time::Duration::from_secs(10),
            "removed after {took:?}, before the retention period"
        );
        assert_eq!(
            scope.volumes()?,
            vec![kept_volume.clone()],
            "the claimed one stays"
        );
        wait_for("the OrphanedVolumeExpired event", WAIT, || {
            let for_host = format!("host/{host}");
            let events = server
                .cli(&["get", "events", "--for", &for_host, "-o", "json"])
                .ok()
                .json();
            Ok(events["items"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| {
                    e["reason"] == "OrphanedVolumeExpired"
                        && e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains(&gone_volume))
                })
                .then_some(()))
        })?;
        Ok(())
    })();
    if let Err(err) = &result {
        eprintln!(
            "{err:#}\n--- agent log:\n{}\n--- server log:\n{}",
            agent.log(),
            server.log()
        );
    }
    result
}
