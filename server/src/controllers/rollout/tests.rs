//! The rollout plan, rule by rule, with builder fixtures and a simulated agent.

use super::*;
use crate::controllers::fixtures::InstanceBuilder;
use crate::model::{CanaryStep, PauseStep, UpdateStrategy, unix_millis};

/// 2026-07-10T12:00:00Z.
fn t0() -> i64 {
    unix_millis("2026-07-10T12:00:00Z").unwrap()
}

fn succeeded(revision: u64) -> RolloutStatus {
    RolloutStatus {
        revision,
        phase: RolloutPhase::Succeeded,
        stable_revision: Some(revision),
        ..Default::default()
    }
}

/// `n` replicas Ready on revision 1 after a successful update, and revision `u` just made.
fn updated_to(n: u32, u: u64, strategy: UpdateStrategy) -> OpenClawInstance {
    after(succeeded(1), n, u, strategy)
}

/// `n` replicas Ready on revision 1 with `rollout` recorded, and revision `u` just made.
fn after(rollout: RolloutStatus, n: u32, u: u64, strategy: UpdateStrategy) -> OpenClawInstance {
    let mut b = InstanceBuilder::new("bot")
        .replicas(i64::from(n))
        .strategy(strategy)
        .rollout(rollout);
    for o in 0..n {
        b = b.on_revision(o, &format!("h{o}"), 1);
    }
    b.revision(u).build()
}

fn targets(i: &OpenClawInstance) -> Vec<Option<u64>> {
    i.status
        .as_ref()
        .unwrap()
        .replica_status
        .iter()
        .map(|r| r.target_revision)
        .collect()
}

fn ro(i: &OpenClawInstance) -> &RolloutStatus {
    i.status.as_ref().unwrap().rollout.as_ref().unwrap()
}

fn serving(i: &OpenClawInstance) -> usize {
    i.status
        .as_ref()
        .unwrap()
        .replica_status
        .iter()
        .filter(|r| r.state == ReplicaState::Ready)
        .count()
}

/// One controller pass.
fn pass(i: &mut OpenClawInstance, now: i64) -> Decision {
    let d = plan(i, now);
    apply(i, &d, now);
    d
}

/// What the agent and the reports would do in a second: a replica whose target differs from
/// what it runs is replaced (Starting on its target); a Starting replica turns Ready when its
/// revision is good, else crash-loops.
fn agent(i: &mut OpenClawInstance, now: i64, good: &dyn Fn(u64) -> bool) {
    for r in &mut i.status.as_mut().unwrap().replica_status {
        let Some(t) = r.target_revision else { continue };
        if r.config_revision != Some(t) {
            r.config_revision = Some(t);
            r.state = ReplicaState::Starting;
            r.ready_since = None;
        } else if r.state == ReplicaState::Starting {
            if good(t) {
                r.state = ReplicaState::Ready;
                r.ready_since = Some(crate::util::rfc3339(now / 1000));
            } else {
                r.state = ReplicaState::CrashLoopBackOff;
                r.restarts += 1;
                r.message = Some("exit code 1".into());
            }
        }
    }
}

/// Runs agent and controller a second at a time until the update ends; returns the fewest
/// replicas serving at any moment, and every revision each replica was ever given.
fn simulate(
    i: &mut OpenClawInstance,
    good: &dyn Fn(u64) -> bool,
) -> (usize, Vec<std::collections::BTreeSet<u64>>) {
    let mut now = t0();
    let mut fewest = usize::MAX;
    let mut given = vec![std::collections::BTreeSet::new(); targets(i).len()];
    for _ in 0..200 {
        pass(i, now);
        for (g, t) in given.iter_mut().zip(targets(i)) {
            g.extend(t);
        }
        fewest = fewest.min(serving(i));
        if ro(i).phase.is_final() {
            return (fewest, given);
        }
        now += 1000;
        agent(i, now, good);
        fewest = fewest.min(serving(i));
    }
    panic!("the update never ended: {:#?}", i.status);
}

#[test]
fn the_first_revision_starts_every_replica_at_once() {
    let mut i = InstanceBuilder::new("bot")
        .replicas(3)
        .placed(0, "h0")
        .placed(1, "h1")
        .placed(2, "h2")
        .revision(1)
        .build();
    for r in &mut i.status.as_mut().unwrap().replica_status {
        r.state = ReplicaState::Pending;
    }
    pass(&mut i, t0());
    assert_eq!(targets(&i), [Some(1), Some(1), Some(1)]);
    assert_eq!(ro(&i).phase, RolloutPhase::Progressing);
    assert_eq!(ro(&i).stable_revision, None);
    let (_, _) = simulate(&mut i, &|_| true);
    assert_eq!(ro(&i).phase, RolloutPhase::Succeeded);
    assert_eq!(ro(&i).stable_revision, Some(1));
    let s = i.status.as_ref().unwrap();
    assert_eq!(s.phase, crate::model::InstancePhase::Running);
    assert_eq!((s.ready_replicas, s.updated_replicas), (3, 3));
}

#[test]
fn a_failing_rolling_update_touches_one_replica_and_rolls_back() {
    let mut i = updated_to(3, 2, UpdateStrategy::default());
    let first = plan(&i, t0());
    assert_eq!(
        first.targets,
        [(2, 2)],
        "the highest ordinal first, one at a time"
    );
    let (fewest, given) = simulate(&mut i, &|rev| rev != 2);
    assert_eq!(ro(&i).phase, RolloutPhase::RolledBack);
    assert_eq!(targets(&i), [Some(1), Some(1), Some(1)]);
    assert_eq!(given[0], [1].into(), "bot-0 was never touched");
    assert_eq!(given[1], [1].into(), "bot-1 was never touched");
    assert_eq!(given[2], [1, 2].into());
    assert!(fewest >= 2, "only {fewest} replicas served at one point");
    let message = ro(&i).message.clone().unwrap();
    assert!(
        message.contains("bot-2") && message.contains("CrashLoopBackOff"),
        "{message}"
    );
    assert!(message.contains("rolled back to revision 1"), "{message}");
    // Nothing restarts it: later passes change nothing.
    let d = plan(&i, t0() + 3_600_000);
    assert!(d.targets.is_empty() && d.rollout.is_none(), "{d:?}");
    // The replica returns to the old revision and the instance ends Running on it.
    let mut now = t0() + 10_000;
    for _ in 0..3 {
        agent(&mut i, now, &|rev| rev != 2);
        pass(&mut i, now);
        now += 1000;
    }
    let s = i.status.as_ref().unwrap();
    assert_eq!(
        (s.phase, s.ready_replicas),
        (crate::model::InstancePhase::Running, 3)
    );
}

#[test]
fn a_good_rolling_update_keeps_all_but_max_unavailable_serving() {
    for (n, max, floor) in [
        (3, IntOrPercent::Int(1), 2),
        (10, IntOrPercent::Percent("30%".into()), 7),
    ] {
        let mut i = updated_to(
            n,
            2,
            UpdateStrategy {
                max_unavailable: Some(max.clone()),
                min_ready_seconds: Some(2),
                ..Default::default()
            },
        );
        let (fewest, _) = simulate(&mut i, &|_| true);
        assert_eq!(ro(&i).phase, RolloutPhase::Succeeded, "{n} replicas");
        assert_eq!(ro(&i).stable_revision, Some(2));
        assert!(targets(&i).iter().all(|t| *t == Some(2)));
        assert!(
            fewest >= floor,
            "{n} replicas, {max:?}: only {fewest} served"
        );
        assert_eq!(i.status.as_ref().unwrap().updated_replicas, i64::from(n));
    }
}

#[test]
fn min_ready_seconds_holds_the_next_move_and_a_restart_fails_the_gate() {
    let strategy = UpdateStrategy {
        min_ready_seconds: Some(30),
        ..Default::default()
    };
    let mut i = updated_to(3, 2, strategy);
    let first = pass(&mut i, t0());
    assert_eq!(first.targets, [(2, 2)]);
    assert_eq!(first.gate, None, "the first move follows no gate");
    let now = t0() + 1000;
    agent(&mut i, now, &|_| true);
    agent(&mut i, now, &|_| true);
    pass(&mut i, now);
    let d = plan(&i, now + 10_000);
    assert!(d.targets.is_empty(), "bot-2 is Ready for 10s of 30: {d:?}");
    assert_eq!(d.wake_after_ms, Some(20_000), "wakes when the gate is due");
    let d = plan(&i, now + 30_000);
    assert_eq!(d.targets, [(1, 2)], "bot-2 passed; bot-1 moves");
    assert_eq!(
        d.gate,
        Some(GateDecision {
            replica: "bot-2".into(),
            after_ms: 0
        }),
        "the move is decided when bot-2's gate passes"
    );
    let late = plan(&i, now + 30_042);
    assert_eq!(late.gate.map(|g| g.after_ms), Some(42));
    // A restart (the agent reports it; readySince starts over) fails the gate instead.
    let r = &mut i.status.as_mut().unwrap().replica_status[2];
    r.restarts += 1;
    r.ready_since = Some(crate::util::rfc3339((now + 20_000) / 1000));
    pass(&mut i, now + 30_000);
    assert_eq!(ro(&i).phase, RolloutPhase::RolledBack);
    assert!(
        ro(&i)
            .message
            .as_deref()
            .unwrap()
            .contains("bot-2 restarted 1 time(s)")
    );
}

#[test]
fn a_missed_deadline_halts_the_update() {
    let strategy = UpdateStrategy {
        progress_deadline: Some("5m".into()),
        ..Default::default()
    };
    let mut i = updated_to(3, 2, strategy);
    pass(&mut i, t0());
    agent(&mut i, t0() + 1000, &|_| true);
    // bot-2 stays Starting (pulling a huge image, say).
    let d = plan(&i, t0() + 60_000);
    assert!(d.rollout.is_none() && d.targets.is_empty(), "{d:?}");
    assert_eq!(d.wake_after_ms, Some(240_000));
    pass(&mut i, t0() + 300_000);
    assert_eq!(ro(&i).phase, RolloutPhase::RolledBack);
    assert_eq!(targets(&i), [Some(1), Some(1), Some(1)]);
    let m = ro(&i).message.clone().unwrap();
    assert!(
        m.contains("bot-2 (Starting) did not pass the gate within the progress deadline (300s)"),
        "{m}"
    );
}

#[test]
fn without_auto_rollback_a_failed_update_stops_where_it_is() {
    let strategy = UpdateStrategy {
        auto_rollback: Some(false),
        ..Default::default()
    };
    let mut i = updated_to(3, 2, strategy);
    let (_, given) = simulate(&mut i, &|rev| rev != 2);
    assert_eq!(ro(&i).phase, RolloutPhase::Failed);
    assert_eq!(targets(&i), [Some(1), Some(1), Some(2)], "nothing moves");
    assert_eq!(given[1], [1].into());
    assert!(
        ro(&i)
            .message
            .as_deref()
            .unwrap()
            .contains("autoRollback is off")
    );
    assert_eq!(
        i.status.as_ref().unwrap().phase,
        crate::model::InstancePhase::Degraded
    );
}

fn canary(steps: Vec<CanaryStep>) -> UpdateStrategy {
    UpdateStrategy {
        type_: UpdateType::Canary,
        steps,
        ..Default::default()
    }
}

fn replicas_step(n: i64) -> CanaryStep {
    CanaryStep {
        replicas: Some(n),
        percent: None,
        pause: None,
    }
}

fn pause_step(duration: Option<&str>) -> CanaryStep {
    CanaryStep {
        replicas: None,
        percent: None,
        pause: Some(PauseStep {
            duration: duration.map(Into::into),
        }),
    }
}

/// Agent and controller until nothing changes any more.
fn settle(i: &mut OpenClawInstance, now: &mut i64) {
    for _ in 0..20 {
        *now += 1000;
        agent(i, *now, &|_| true);
        pass(i, *now);
    }
}

#[test]
fn a_canary_pauses_until_promoted_then_rolls_the_rest() {
    let mut i = updated_to(4, 2, canary(vec![replicas_step(1), pause_step(None)]));
    let mut now = t0();
    pass(&mut i, now);
    assert_eq!(targets(&i), [Some(1), Some(1), Some(1), Some(2)]);
    settle(&mut i, &mut now);
    assert_eq!(ro(&i).phase, RolloutPhase::Paused);
    assert_eq!(ro(&i).step, Some(1));
    assert_eq!(
        targets(&i),
        [Some(1), Some(1), Some(1), Some(2)],
        "waits at the pause"
    );
    assert!(
        ro(&i)
            .message
            .as_deref()
            .unwrap()
            .contains("rollout promote")
    );
    // Scaling up while paused: the new replica gets the stable revision.
    assert_eq!(initial_target(&i), Some(1));
    // Pause and resume are not promote.
    let e = command(&mut i, Command::Resume, "alice", now).unwrap_err();
    assert!(e.contains("not paused"), "{e}");
    command(&mut i, Command::Promote, "alice", now).unwrap();
    assert!(
        ro(&i)
            .message
            .as_deref()
            .unwrap()
            .contains("promoted by alice")
    );
    settle(&mut i, &mut now);
    assert_eq!(ro(&i).phase, RolloutPhase::Succeeded);
    assert_eq!(targets(&i), [Some(2); 4]);
}

#[test]
fn aborting_a_canary_returns_its_replicas_and_says_who() {
    let mut i = updated_to(4, 2, canary(vec![replicas_step(2), pause_step(None)]));
    let mut now = t0();
    pass(&mut i, now);
    settle(&mut i, &mut now);
    assert_eq!(targets(&i), [Some(1), Some(1), Some(2), Some(2)]);
    let done = command(&mut i, Command::Abort, "alice", now).unwrap();
    assert!(done.contains("aborted"), "{done}");
    assert_eq!(ro(&i).phase, RolloutPhase::RolledBack);
    assert_eq!(targets(&i), [Some(1); 4]);
    assert!(
        ro(&i)
            .message
            .as_deref()
            .unwrap()
            .starts_with("aborted by alice")
    );
    // Nothing restarts it until a command or a new revision.
    settle(&mut i, &mut now);
    assert_eq!(targets(&i), [Some(1); 4]);
    command(&mut i, Command::Resume, "bob", now).unwrap();
    pass(&mut i, now);
    assert_eq!(
        targets(&i),
        [Some(1), Some(1), Some(2), Some(2)],
        "restarted at step 1"
    );
}

#[test]
fn a_timed_pause_waits_its_duration() {
    let mut i = updated_to(
        3,
        2,
        canary(vec![
            replicas_step(1),
            pause_step(Some("1m")),
            CanaryStep {
                replicas: None,
                percent: Some(100),
                pause: None,
            },
        ]),
    );
    let mut now = t0();
    pass(&mut i, now);
    settle(&mut i, &mut now);
    assert_eq!(ro(&i).phase, RolloutPhase::Paused);
    let d = plan(&i, now);
    let wait = d.wake_after_ms.unwrap();
    assert!(wait > 30_000 && wait <= 60_000, "{wait}");
    now += wait;
    pass(&mut i, now);
    assert_eq!(ro(&i).phase, RolloutPhase::Progressing);
    assert_eq!(
        targets(&i),
        [Some(2); 3],
        "percent 100 moves the rest at once"
    );
    settle(&mut i, &mut now);
    assert_eq!(ro(&i).phase, RolloutPhase::Succeeded);
}

#[test]
fn pause_stops_moves_and_resume_continues() {
    let mut i = updated_to(3, 2, UpdateStrategy::default());
    let mut now = t0();
    pass(&mut i, now);
    command(&mut i, Command::Pause, "alice", now).unwrap();
    assert_eq!(ro(&i).phase, RolloutPhase::Paused);
    settle(&mut i, &mut now);
    assert_eq!(targets(&i), [Some(1), Some(1), Some(2)]);
    assert_eq!(ro(&i).message.as_deref(), Some("paused by alice"));
    let e = command(&mut i, Command::Promote, "alice", now).unwrap_err();
    assert!(e.contains("rollout resume"), "{e}");
    command(&mut i, Command::Resume, "alice", now).unwrap();
    settle(&mut i, &mut now);
    assert_eq!(ro(&i).phase, RolloutPhase::Succeeded);
}

#[test]
fn new_replicas_join_as_the_update_stands() {
    // During a healthy update: the new revision.
    let mut i = updated_to(3, 2, UpdateStrategy::default());
    pass(&mut i, t0());
    assert_eq!(initial_target(&i), Some(2));
    // Rolled back: the stable revision, and the controller agrees for a replica with none.
    let (_, _) = simulate(&mut i, &|rev| rev != 2);
    assert_eq!(ro(&i).phase, RolloutPhase::RolledBack);
    assert_eq!(initial_target(&i), Some(1));
    i.spec.replicas = 4;
    let st = i.status.as_mut().unwrap();
    st.replica_status.push(ReplicaStatus {
        name: "bot-3".into(),
        ordinal: 3,
        host: Some("h3".into()),
        ..Default::default()
    });
    let d = plan(&i, t0() + 1_000_000);
    assert_eq!(d.targets, [(3, 1)]);
    // After a success: the new revision.
    let mut ok = updated_to(2, 2, UpdateStrategy::default());
    simulate(&mut ok, &|_| true);
    assert_eq!(initial_target(&ok), Some(2));
}

#[test]
fn a_held_update_does_not_start() {
    let mut i = updated_to(3, 2, UpdateStrategy::default());
    i.status.as_mut().unwrap().rollout.as_mut().unwrap().held_by = Some("rollout/eu-wave".into());
    let d = plan(&i, t0());
    assert!(d.targets.is_empty() && d.rollout.is_none(), "{d:?}");
    assert_eq!(initial_target(&i), Some(1));
    // Released: the update starts.
    i.status.as_mut().unwrap().rollout.as_mut().unwrap().held_by = None;
    let d = plan(&i, t0());
    assert_eq!(d.targets, [(2, 2)]);
}

#[test]
fn commands_that_do_not_apply_say_why() {
    let mut i = updated_to(2, 1, UpdateStrategy::default());
    let e = command(&mut i, Command::Pause, "alice", t0()).unwrap_err();
    assert!(e.contains("has ended (Succeeded)"), "{e}");
    let mut first = InstanceBuilder::new("bot")
        .placed(0, "h")
        .revision(1)
        .build();
    pass(&mut first, t0());
    let e = command(&mut first, Command::Abort, "alice", t0()).unwrap_err();
    assert!(e.contains("no earlier revision"), "{e}");
    let mut bare = InstanceBuilder::new("bot").build();
    assert!(command(&mut bare, Command::Promote, "alice", t0()).is_err());
}

// ---------------------------------------------------------------------------------------------
// the loop against SQLite

mod with_store {
    use std::sync::Arc;

    use super::*;
    use crate::controllers::fixtures::{PROJECT, TENANT, project, tenant};
    use crate::model::{ConfigFragment, Resource};
    use crate::store::WriteMode;
    use crate::store::sqlite::SqliteStore;

    fn key() -> ObjectKey {
        ObjectKey::instance(TENANT, PROJECT, "bot")
    }

    fn read(store: &SqliteStore) -> OpenClawInstance {
        match store.get(&key()).unwrap().unwrap().resource().unwrap() {
            Resource::OpenClawInstance(i) => i,
            other => panic!("{other:?}"),
        }
    }

    /// What the agent reports: every replica runs its target and is Ready since now.
    fn report_ready(store: &SqliteStore) {
        store
            .update(&key(), &mut |r| {
                let Resource::OpenClawInstance(i) = r else {
                    return false;
                };
                let mut changed = false;
                for r in &mut i.status.as_mut().unwrap().replica_status {
                    if r.target_revision.is_some() && r.config_revision != r.target_revision {
                        r.config_revision = r.target_revision;
                        r.state = ReplicaState::Ready;
                        r.ready_since = Some(crate::util::now_rfc3339_millis());
                        changed = true;
                    }
                }
                changed
            })
            .unwrap();
    }

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn a_pass_plans_only_instances_written_since_or_whose_timer_is_due() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let mut writes = vec![
            (Resource::Tenant(tenant(TENANT)), WriteMode::Apply),
            (
                Resource::Project(project(TENANT, PROJECT)),
                WriteMode::Apply,
            ),
        ];
        for name in ["a", "b", "c"] {
            let i = InstanceBuilder::new(name).replicas(1).build();
            writes.push((Resource::OpenClawInstance(i), WriteMode::Apply));
        }
        store.write(&writes, false).unwrap();
        let mut settled = Settled::default();
        let now = t0();
        let first = reconcile_settled(&store, now, &mut settled).unwrap();
        let second = reconcile_settled(&store, now + 10, &mut settled).unwrap();
        assert_eq!((first.instances, second.instances), (3, 3));
        // The first pass may write (a first revision's status); the pass after it plans what
        // it wrote, and then nothing is left to plan.
        let third = reconcile_settled(&store, now + 20, &mut settled).unwrap();
        assert_eq!(third.planned, 0, "{first:?} {second:?} {third:?}");
        let b = ObjectKey::instance(TENANT, PROJECT, "b");
        store
            .update(&b, &mut |r| {
                let Resource::OpenClawInstance(i) = r else {
                    return false;
                };
                i.metadata.labels.insert("touched".into(), "yes".into());
                true
            })
            .unwrap();
        let fourth = reconcile_settled(&store, now + 30, &mut settled).unwrap();
        assert_eq!(fourth.planned, 1, "only the instance written since");
        let resync =
            reconcile_settled(&store, now + 30 + RESYNC.as_millis() as i64, &mut settled).unwrap();
        assert_eq!(resync.planned, 3, "everything again at the resync");
    }

    #[tokio::test]
    async fn the_loop_moves_on_store_changes_and_on_its_gate_timer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
        let mut bot = InstanceBuilder::new("bot").replicas(2).build();
        bot.spec.update_strategy.min_ready_seconds = Some(1);
        store
            .write(
                &[
                    (Resource::Tenant(tenant(TENANT)), WriteMode::Apply),
                    (
                        Resource::Project(project(TENANT, PROJECT)),
                        WriteMode::Apply,
                    ),
                    (Resource::OpenClawInstance(bot.clone()), WriteMode::Apply),
                ],
                false,
            )
            .unwrap();
        // Placed as the scheduler would.
        store
            .update(&key(), &mut |r| {
                let Resource::OpenClawInstance(i) = r else {
                    return false;
                };
                let s = i.status.get_or_insert_with(Default::default);
                s.replica_status = (0..2)
                    .map(|o| ReplicaStatus {
                        name: format!("bot-{o}"),
                        ordinal: o,
                        host: Some(format!("h{o}")),
                        ..Default::default()
                    })
                    .collect();
                true
            })
            .unwrap();
        assert_eq!(read(&store).status.unwrap().config_revision, Some(1));
        let (tx, rx) = watch::channel(false);
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let task = tokio::spawn(run(store.clone() as Arc<dyn Store>, metrics.clone(), rx));
        let gate_count = || {
            let text = metrics
                .render(store.as_ref(), &crate::agent_rpc::Reports::default())
                .unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("clusterclaw_rollout_gate_decision_seconds_count "))
                .map(|n| n.parse::<u64>().unwrap())
        };
        assert_eq!(
            gate_count(),
            Some(0),
            "the histogram is served from the start"
        );
        eventually("the first revision's targets", || {
            targets(&read(&store)) == [Some(1), Some(1)]
        })
        .await;
        report_ready(&store);
        eventually("the first update to succeed", || {
            read(&store).status.unwrap().rollout.unwrap().phase == RolloutPhase::Succeeded
        })
        .await;
        // A new revision: bot-1 moves; once it has been Ready for a second (no store change in
        // between), the timer moves bot-0.
        let mut changed = read(&store);
        changed.spec.config = ConfigFragment(
            serde_json::from_value(serde_json::json!({"logging": {"level": "debug"}})).unwrap(),
        );
        changed.metadata.resource_version = None;
        store
            .write(
                &[(Resource::OpenClawInstance(changed), WriteMode::Apply)],
                false,
            )
            .unwrap();
        eventually("bot-1 to move", || {
            targets(&read(&store)) == [Some(1), Some(2)]
        })
        .await;
        report_ready(&store);
        eventually("bot-0 to move after bot-1's gate", || {
            targets(&read(&store)) == [Some(2), Some(2)]
        })
        .await;
        assert_eq!(
            gate_count(),
            Some(1),
            "one gate decision: bot-1's gate let bot-0 move"
        );
        report_ready(&store);
        eventually("the update to succeed", || {
            let s = read(&store).status.unwrap();
            s.rollout.unwrap().phase == RolloutPhase::Succeeded && s.available_replicas == 2
        })
        .await;
        tx.send(true).unwrap();
        task.await.unwrap();
    }
}

#[test]
fn the_scheduler_gives_new_replicas_their_initial_target_and_keeps_it() {
    use crate::controllers::scheduler::{InstancePlan, ReplicaPlacement, apply_instance_plan};
    let mut i = updated_to(2, 2, UpdateStrategy::default());
    i.spec.replicas = 3;
    i.status.as_mut().unwrap().rollout.as_mut().unwrap().phase = RolloutPhase::RolledBack;
    i.status
        .as_mut()
        .unwrap()
        .rollout
        .as_mut()
        .unwrap()
        .revision = 2;
    let plan = InstancePlan {
        generation: i.metadata.generation,
        replicas: vec![
            ReplicaPlacement::Placed { host: "h0".into() },
            ReplicaPlacement::Unplaced {
                reason: "Unschedulable: 0/1 hosts fit".into(),
            },
            ReplicaPlacement::Placed { host: "h2".into() },
        ],
    };
    apply_instance_plan(&mut i, &plan, "2026-07-10T12:00:00Z");
    // bot-1 lost its host but keeps its target; bot-2 is new and joins the stable revision.
    assert_eq!(targets(&i), [Some(1), Some(1), Some(1)]);
    let before = i.clone();
    let changed = apply_instance_plan(&mut i, &plan, "2026-07-10T12:00:01Z");
    assert_eq!(before.status, i.status);
    assert!(!changed, "stable");
}

#[test]
fn a_new_revision_before_the_first_update_was_recorded_still_moves_one_replica_at_a_time() {
    // Every replica runs revision 1 Ready, but the controller had not yet recorded the first
    // update as Succeeded when revision 2 arrived: revision 1 is still the stable one.
    let first = RolloutStatus {
        revision: 1,
        phase: RolloutPhase::Progressing,
        ..Default::default()
    };
    let mut i = after(first, 3, 2, UpdateStrategy::default());
    pass(&mut i, t0());
    assert_eq!(ro(&i).stable_revision, Some(1));
    assert_eq!(targets(&i), [Some(1), Some(1), Some(2)]);
}

#[test]
fn an_instance_released_from_a_placeholder_hold_moves_one_replica_at_a_time() {
    // A wave held the instance before it had any update recorded (revision 0 placeholder).
    let placeholder = RolloutStatus {
        revision: 0,
        phase: RolloutPhase::Progressing,
        ..Default::default()
    };
    let mut i = after(placeholder, 3, 2, UpdateStrategy::default());
    pass(&mut i, t0());
    assert_eq!(ro(&i).stable_revision, Some(1));
    assert_eq!(targets(&i), [Some(1), Some(1), Some(2)]);
}
