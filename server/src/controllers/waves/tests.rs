//! Unit tests of the wave plan, with plain values.

use std::collections::HashMap;

use super::*;
use crate::model::{IntOrPercent, RolloutSelector};

const NAME: &str = "configtemplate-default-7";
const T0: i64 = 1_800_000_000;

fn inst(n: usize) -> InstanceRef {
    InstanceRef {
        tenant: "acme".into(),
        project: "web".into(),
        name: format!("bot-{n}"),
    }
}

/// A system Rollout over `n` instances, each held by it at revision 2.
fn system(n: usize) -> (RolloutSpec, WaveStatus, HashMap<InstanceRef, Observed>) {
    let members: Vec<InstanceRef> = (0..n).map(inst).collect();
    let spec = RolloutSpec {
        change: Some("configtemplate/default".into()),
        instances: members.clone(),
        ..Default::default()
    };
    let status = WaveStatus {
        instances: members
            .iter()
            .map(|m| WaveInstance {
                tenant: m.tenant.clone(),
                project: m.project.clone(),
                name: m.name.clone(),
                wave: 0,
                state: WaveInstanceState::Held,
                revision: Some(2),
                previous_version: None,
                previous_image: None,
                message: None,
            })
            .collect(),
        started_at: Some(rfc3339(T0)),
        ..Default::default()
    };
    let observed = members
        .iter()
        .map(|m| {
            (
                m.clone(),
                Observed {
                    held_by: Some(NAME.into()),
                    phase: Some(RolloutPhase::Succeeded),
                    rollout_revision: Some(1),
                    config_revision: Some(2),
                    version: Some("2026.7.1".into()),
                    ..Default::default()
                },
            )
        })
        .collect();
    (spec, status, observed)
}

/// What the executor and the instance's own update would do with `steps`: released
/// instances are no longer held and report `phase` for revision 2.
fn act(observed: &mut HashMap<InstanceRef, Observed>, steps: &[Step], phase: RolloutPhase) {
    for s in steps {
        let Step::Release(r) = s else { continue };
        let o = observed.get_mut(r).unwrap();
        o.held_by = None;
        o.phase = Some(phase);
        o.rollout_revision = Some(2);
    }
}

fn released(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .map(|s| match s {
            Step::Release(r) | Step::SetVersion { instance: r, .. } => r.name.clone(),
        })
        .collect()
}

#[test]
fn six_instances_move_in_waves_of_one_two_and_three_with_bake_time_between() {
    let (spec, status, mut obs) = system(6);
    let p = plan(NAME, &spec, &status, &[], &obs, T0);
    assert_eq!(released(&p.steps), ["bot-0"]);
    assert_eq!(p.status.waves, 3);
    assert_eq!(p.status.phase, WavePhase::Progressing);
    assert_eq!(p.status.counts.held, 5);
    assert_eq!(p.status.counts.progressing, 1);

    // The first instance is still updating: nothing more moves.
    let again = plan(NAME, &spec, &p.status, &[], &obs, T0 + 1);
    assert!(again.steps.is_empty());
    assert_eq!(again.status, p.status);

    act(&mut obs, &p.steps, RolloutPhase::Succeeded);
    let baking = plan(NAME, &spec, &p.status, &[], &obs, T0 + 10);
    assert!(baking.steps.is_empty(), "{:?}", baking.steps);
    assert_eq!(baking.status.counts.succeeded, 1);
    assert_eq!(
        baking.status.wave_done_at.as_deref(),
        Some(rfc3339(T0 + 10).as_str())
    );
    // Still baking 59 s later (the default bake time is a minute) ...
    let still = plan(NAME, &spec, &baking.status, &[], &obs, T0 + 69);
    assert!(still.steps.is_empty());
    // ... and the next wave goes at 60 s.
    let second = plan(NAME, &spec, &still.status, &[], &obs, T0 + 70);
    assert_eq!(released(&second.steps), ["bot-1", "bot-2"]);
    assert_eq!(second.status.wave, 1);
    assert_eq!(second.status.wave_done_at, None);

    act(&mut obs, &second.steps, RolloutPhase::Succeeded);
    let b = plan(NAME, &spec, &second.status, &[], &obs, T0 + 80);
    let third = plan(NAME, &spec, &b.status, &[], &obs, T0 + 140);
    assert_eq!(released(&third.steps), ["bot-3", "bot-4", "bot-5"]);
    act(&mut obs, &third.steps, RolloutPhase::Succeeded);
    // No bake after the last wave.
    let done = plan(NAME, &spec, &third.status, &[], &obs, T0 + 141);
    assert_eq!(done.status.phase, WavePhase::Succeeded);
    assert_eq!(done.status.counts.succeeded, 6);
    assert!(done.steps.is_empty());
}

#[test]
fn the_first_failed_instance_halts_the_change_and_the_rest_stay_held() {
    let (spec, status, mut obs) = system(6);
    let p = plan(NAME, &spec, &status, &[], &obs, T0);
    act(&mut obs, &p.steps, RolloutPhase::RolledBack);
    obs.get_mut(&inst(0)).unwrap().rollout_message =
        Some("bot-0-0 was not Ready within 10m".into());
    let halted = plan(NAME, &spec, &p.status, &[], &obs, T0 + 30);
    assert!(halted.steps.is_empty());
    assert_eq!(halted.status.phase, WavePhase::Halted);
    assert_eq!(
        halted.status.failed_instance.as_deref(),
        Some("acme/web/bot-0")
    );
    assert_eq!(halted.status.counts.held, 5);
    assert_eq!(halted.status.counts.failed, 1);
    let msg = halted.status.message.clone().unwrap();
    assert!(msg.contains("wave 1 of 3"), "{msg}");
    assert!(msg.contains("bot-0-0 was not Ready within 10m"), "{msg}");
    assert!(msg.contains("5 instances not yet released"), "{msg}");
    // A halted change stays halted, however much time passes.
    let later = plan(NAME, &spec, &halted.status, &[], &obs, T0 + 100_000);
    assert!(later.steps.is_empty());
    assert_eq!(later.status.phase, WavePhase::Halted);
}

#[test]
fn a_failure_of_an_older_revision_does_not_count() {
    let (spec, status, mut obs) = system(2);
    let p = plan(NAME, &spec, &status, &[], &obs, T0);
    // Released, but its update still reports the last one (revision 1) as failed.
    let o = obs.get_mut(&inst(0)).unwrap();
    o.held_by = None;
    o.phase = Some(RolloutPhase::Failed);
    o.rollout_revision = Some(1);
    let next = plan(NAME, &spec, &p.status, &[], &obs, T0 + 1);
    assert_eq!(next.status.phase, WavePhase::Progressing);
    assert_eq!(next.status.counts.progressing, 1);
}

#[test]
fn a_newer_change_takes_over_the_hold_and_the_older_one_records_it() {
    let (spec, status, mut obs) = system(3);
    let p = plan(NAME, &spec, &status, &[], &obs, T0);
    assert_eq!(released(&p.steps), ["bot-0"]);
    // A newer template change holds bot-0 (mid-update) and bot-2 (still held) for itself.
    for n in [0, 2] {
        obs.get_mut(&inst(n)).unwrap().held_by = Some("configtemplate-default-9".into());
    }
    let next = plan(NAME, &spec, &p.status, &[], &obs, T0 + 1);
    let states: Vec<_> = next.status.instances.iter().map(|i| i.state).collect();
    assert_eq!(
        states,
        [
            WaveInstanceState::Superseded,
            WaveInstanceState::Held,
            WaveInstanceState::Superseded
        ]
    );
    assert_eq!(
        next.status.instances[0].message.as_deref(),
        Some("taken over by rollout configtemplate-default-9")
    );
    // bot-0 counts as done: after the bake, bot-1 is released; then the older Rollout ends
    // without waiting on instances it no longer holds.
    let go = plan(NAME, &spec, &next.status, &[], &obs, T0 + 61);
    assert_eq!(released(&go.steps), ["bot-1"]);
    act(&mut obs, &go.steps, RolloutPhase::Succeeded);
    let baked = plan(NAME, &spec, &go.status, &[], &obs, T0 + 62);
    let done = plan(NAME, &spec, &baked.status, &[], &obs, T0 + 122);
    assert!(
        done.steps.is_empty(),
        "nothing left to release: {:?}",
        done.steps
    );
    assert_eq!(done.status.phase, WavePhase::Succeeded);
    assert_eq!(done.status.counts.superseded, 2);
}

#[test]
fn a_deleted_instance_counts_as_gone() {
    let (spec, status, mut obs) = system(2);
    obs.remove(&inst(0));
    let p = plan(NAME, &spec, &status, &[], &obs, T0);
    assert_eq!(p.status.instances[0].state, WaveInstanceState::Gone);
    assert!(released(&p.steps).is_empty());
    assert_eq!(p.status.wave_done_at.as_deref(), Some(rfc3339(T0).as_str()));
}

#[test]
fn pause_keeps_the_next_wave_from_starting() {
    let (mut spec, status, mut obs) = system(4);
    spec.bake_time = Some("0s".into());
    let p = plan(NAME, &spec, &status, &[], &obs, T0);
    spec.paused = true;
    // Paused while its first wave updates: that update goes on, the status says so.
    let during = plan(NAME, &spec, &p.status, &[], &obs, T0);
    assert_eq!(during.status.phase, WavePhase::Paused);
    assert_eq!(
        during.status.message.as_deref(),
        Some("paused; wave 1 of 3: 1 instance updating")
    );
    act(&mut obs, &p.steps, RolloutPhase::Succeeded);
    let paused = plan(NAME, &spec, &p.status, &[], &obs, T0 + 1);
    assert!(paused.steps.is_empty());
    assert_eq!(paused.status.phase, WavePhase::Paused);
    spec.paused = false;
    let resumed = plan(NAME, &spec, &paused.status, &[], &obs, T0 + 2);
    assert_eq!(released(&resumed.steps), ["bot-1"]);
    assert_eq!(resumed.status.phase, WavePhase::Progressing);
}

#[test]
fn custom_waves_in_counts_and_percents() {
    let (mut spec, status, mut obs) = system(10);
    spec.waves = Some(vec![
        IntOrPercent::Int(2),
        IntOrPercent::Percent("50%".into()),
    ]);
    spec.bake_time = Some("0s".into());
    let p = plan(NAME, &spec, &status, &[], &obs, T0);
    assert_eq!(released(&p.steps), ["bot-0", "bot-1"]);
    assert_eq!(p.status.waves, 3);
    act(&mut obs, &p.steps, RolloutPhase::Succeeded);
    let second = plan(NAME, &spec, &p.status, &[], &obs, T0 + 1);
    assert_eq!(released(&second.steps), ["bot-2", "bot-3", "bot-4"]);
    act(&mut obs, &second.steps, RolloutPhase::Succeeded);
    let third = plan(NAME, &spec, &second.status, &[], &obs, T0 + 2);
    assert_eq!(third.steps.len(), 5);
}

#[test]
fn a_user_rollout_writes_its_version_and_remembers_the_old_one() {
    let members: Vec<InstanceRef> = (0..3).map(inst).collect();
    let spec = RolloutSpec {
        selector: Some(RolloutSelector::default()),
        version: Some("2026.8.1".into()),
        ..Default::default()
    };
    let mut obs: HashMap<InstanceRef, Observed> = members
        .iter()
        .map(|m| {
            (
                m.clone(),
                Observed {
                    phase: Some(RolloutPhase::Succeeded),
                    rollout_revision: Some(4),
                    config_revision: Some(4),
                    version: Some("2026.7.1".into()),
                    ..Default::default()
                },
            )
        })
        .collect();
    let p = plan("upgrade", &spec, &WaveStatus::default(), &members, &obs, T0);
    assert_eq!(
        p.steps,
        [Step::SetVersion {
            instance: inst(0),
            version: Some("2026.8.1".into()),
            image: None
        }]
    );
    let first = &p.status.instances[0];
    assert_eq!(first.previous_version.as_deref(), Some("2026.7.1"));
    assert_eq!(first.revision, None);
    assert_eq!(p.status.instances.len(), 3);
    // The write made revision 5; its update succeeded with it.
    let o = obs.get_mut(&inst(0)).unwrap();
    o.config_revision = Some(5);
    let next = plan("upgrade", &spec, &p.status, &[], &obs, T0 + 1);
    assert_eq!(next.status.instances[0].revision, Some(5));
    assert_eq!(
        next.status.counts.progressing, 1,
        "revision 4 succeeding is not enough"
    );
    let o = obs.get_mut(&inst(0)).unwrap();
    o.rollout_revision = Some(5);
    let after = plan("upgrade", &spec, &next.status, &[], &obs, T0 + 2);
    assert_eq!(after.status.counts.succeeded, 1);
}

#[test]
fn a_user_rollout_takes_over_instances_an_older_change_holds() {
    let members: Vec<InstanceRef> = (0..2).map(inst).collect();
    let spec = RolloutSpec {
        selector: Some(RolloutSelector::default()),
        version: Some("2026.8.1".into()),
        ..Default::default()
    };
    let obs: HashMap<InstanceRef, Observed> = members
        .iter()
        .map(|m| {
            (
                m.clone(),
                Observed {
                    held_by: Some(NAME.into()),
                    config_revision: Some(2),
                    ..Default::default()
                },
            )
        })
        .collect();
    let p = plan("upgrade", &spec, &WaveStatus::default(), &members, &obs, T0);
    assert_eq!(released(&p.steps), ["bot-0"]);
    assert_eq!(
        p.status.counts.held, 1,
        "bot-1 waits for its wave, not superseded"
    );
    assert_eq!(p.status.counts.superseded, 0);

    // The older system Rollout sees its hold gone: a newer change moved the instance.
    let (sys, status, mut sys_obs) = system(2);
    sys_obs.get_mut(&inst(1)).unwrap().held_by = None;
    let s = plan(NAME, &sys, &status, &[], &sys_obs, T0);
    assert_eq!(s.status.instances[1].state, WaveInstanceState::Superseded);
    assert_eq!(
        s.status.instances[1].message.as_deref(),
        Some("released by a newer change")
    );
}
