//! Unit tests of the reconcile plan (plain values) and of the executor against the fake runtime.

use super::*;
use crate::runtime::{ContainerEnv, FakeCall, FakeRuntime};

const HOST: &str = "host-1";

/// This agent's owner in the tests (cluster and host uid labels included).
fn me() -> Owner {
    Owner::new(HOST, "cluster-1", "uid-1")
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A container of this host running `a` (or a variation of it).
fn container(id: &str, a: &Assignment) -> ObservedContainer {
    ObservedContainer {
        id: id.into(),
        name: format!("{}-{id}", spec::container_name(&me(), &a.key())),
        image: a.image.clone(),
        labels: spec::container_labels(&me(), a),
        status: ContainerStatus::Running,
        started_at: Some("2026-01-01T00:00:00Z".into()),
        host_port: Some(19100),
        engine_restarts: 0,
        env: Some(ContainerEnv::from_map(&spec::container_env(a))),
    }
}

fn with_status(mut c: ObservedContainer, status: ContainerStatus) -> ObservedContainer {
    c.status = status;
    c
}

fn exited(code: i64) -> ContainerStatus {
    ContainerStatus::Exited {
        code,
        oom_killed: false,
    }
}

fn volume(a: &Assignment, owner: &Owner) -> ObservedVolume {
    let v = spec::volume_spec(owner, a);
    ObservedVolume {
        name: v.name,
        labels: v.labels,
    }
}

fn network(owner: &Owner, tenant: &str) -> ObservedNetwork {
    let n = spec::network_spec(owner, tenant);
    ObservedNetwork {
        id: format!("id-{}", n.name),
        name: n.name,
        labels: n.labels,
    }
}

struct World {
    desired: Vec<Assignment>,
    observed: Observed,
    probes: BTreeMap<ReplicaKey, ProbeStatus>,
    records: BTreeMap<ReplicaKey, ReplicaRecord>,
    retained: Option<BTreeSet<ReplicaKey>>,
    now: Instant,
}

impl World {
    fn new(desired: Vec<Assignment>, containers: Vec<ObservedContainer>) -> Self {
        World {
            desired,
            observed: Observed {
                containers,
                ..Observed::default()
            },
            probes: BTreeMap::new(),
            records: BTreeMap::new(),
            retained: Some(BTreeSet::new()),
            now: Instant::now(),
        }
    }

    fn plan(&self) -> Vec<Step> {
        plan(&PlanInput {
            owner: &me(),
            desired: &self.desired,
            observed: &self.observed,
            probes: &self.probes,
            records: &self.records,
            retained: self.retained.as_ref(),
            now: self.now,
        })
    }
}

fn probe(c: &ObservedContainer, liveness: Liveness, ready: bool) -> ProbeStatus {
    ProbeStatus {
        container_id: c.id.clone(),
        started_at: c.started_at.clone(),
        ever_alive: matches!(liveness, Liveness::Alive),
        liveness,
        ready,
        readiness_message: None,
    }
}

// --- plan ---------------------------------------------------------------------------------------

#[test]
fn creates_missing_replicas_once_each() {
    let a0 = Assignment::test("bot-0");
    let a1 = Assignment::test("bot-1");
    let world = World::new(vec![a0.clone(), a1.clone(), a0.clone()], vec![]);
    assert_eq!(
        world.plan(),
        vec![
            Step::Create {
                assignment: Box::new(a0),
                preferred_port: None
            },
            Step::Create {
                assignment: Box::new(a1),
                preferred_port: None
            },
        ]
    );
}

#[test]
fn adopts_a_healthy_running_container_untouched() {
    let a = Assignment::test("bot-0");
    let c = container("c1", &a);
    let mut world = World::new(vec![a.clone()], vec![c.clone()]);
    assert_eq!(world.plan(), vec![]);
    world
        .probes
        .insert(a.key(), probe(&c, Liveness::Alive, true));
    assert_eq!(world.plan(), vec![]);
    // Failing below the threshold is not yet a reason to act.
    world.probes.insert(
        a.key(),
        probe(
            &c,
            Liveness::Failing {
                failures: 2,
                message: "x".into(),
            },
            false,
        ),
    );
    assert_eq!(world.plan(), vec![]);
}

#[test]
fn replaces_on_config_change_reusing_the_port_and_keeping_the_volume() {
    let old = Assignment::test("bot-0");
    let new = old.clone().config_hash(&"bb".repeat(32)).generation(2);
    let mut world = World::new(vec![new.clone()], vec![container("c1", &old)]);
    world.observed.volumes = vec![volume(&old, &me())];
    assert_eq!(
        world.plan(),
        vec![Step::Replace {
            container_id: "c1".into(),
            assignment: Box::new(new),
            preferred_port: Some(19100),
            reason: ReplaceReason::ConfigChanged {
                from: "aa".repeat(32),
                to: "bb".repeat(32)
            },
        }]
    );
}

#[test]
fn replaces_on_image_change() {
    let old = Assignment::test("bot-0");
    let new = old.clone().image("example/openclaw:2026.8.1");
    let world = World::new(vec![new.clone()], vec![container("c1", &old)]);
    assert!(matches!(
        world.plan().as_slice(),
        [Step::Replace { reason: ReplaceReason::ImageChanged { to, .. }, .. }] if to == "example/openclaw:2026.8.1"
    ));
}

#[test]
fn a_generation_bump_alone_does_not_replace() {
    let old = Assignment::test("bot-0");
    let new = old.clone().generation(7);
    let world = World::new(vec![new], vec![container("c1", &old)]);
    assert_eq!(world.plan(), vec![]);
}

#[test]
fn removes_unassigned_containers_then_their_volume_and_network() {
    let kept = Assignment::test("bot-0");
    let gone = Assignment::test("bot-1");
    let other_tenant = Assignment::test("web-0").tenant("tenant-b");
    let mut world = World::new(
        vec![kept.clone()],
        vec![
            container("c0", &kept),
            container("c1", &gone),
            container("c2", &other_tenant),
        ],
    );
    world.observed.volumes = vec![
        volume(&kept, &me()),
        volume(&gone, &me()),
        volume(&other_tenant, &me()),
    ];
    world.observed.networks = vec![network(&me(), "tenant-a"), network(&me(), "tenant-b")];
    let steps = world.plan();
    let gone_container = |id: &str| Step::RemoveContainer {
        key: Some(
            world
                .observed
                .containers
                .iter()
                .find(|c| c.id == id)
                .unwrap()
                .replica_key()
                .unwrap(),
        ),
        container_id: id.into(),
        name: world
            .observed
            .containers
            .iter()
            .find(|c| c.id == id)
            .unwrap()
            .name
            .clone(),
        reason: RemoveReason::Unassigned,
    };
    assert_eq!(
        steps,
        vec![
            gone_container("c1"),
            gone_container("c2"),
            Step::RemoveVolume {
                key: gone.key(),
                volume: spec::volume_name(&me(), &gone.key())
            },
            Step::RemoveVolume {
                key: other_tenant.key(),
                volume: spec::volume_name(&me(), &other_tenant.key())
            },
            Step::RemoveNetwork {
                tenant: "tenant-b".into(),
                network: spec::network_name(&me(), "tenant-b")
            },
        ]
    );
}

#[test]
fn never_touches_unmanaged_or_other_hosts_things() {
    let a = Assignment::test("bot-0");
    let mut foreign_host = container("f1", &a);
    foreign_host
        .labels
        .insert(labels::HOST.into(), "host-2".into());
    foreign_host.status = exited(1);
    let mut unmanaged = container("u1", &Assignment::test("bot-9"));
    unmanaged.labels.remove(labels::MANAGED);
    let mut managed_false = container("u2", &Assignment::test("bot-8"));
    managed_false
        .labels
        .insert(labels::MANAGED.into(), "false".into());
    let mut world = World::new(vec![], vec![foreign_host, unmanaged, managed_false]);
    world.observed.volumes = vec![volume(&a, &Owner::new("host-2", "cluster-1", "uid-2"))];
    world.observed.networks = vec![network(
        &Owner::new("host-2", "cluster-1", "uid-2"),
        "tenant-a",
    )];
    assert_eq!(world.plan(), vec![]);

    // With the replica assigned here, the other host's container does not count as ours.
    world.desired = vec![a.clone()];
    assert_eq!(
        world.plan(),
        vec![Step::Create {
            assignment: Box::new(a),
            preferred_port: None
        }]
    );
}

#[test]
fn removes_this_hosts_containers_it_cannot_identify() {
    let mut c = container("x1", &Assignment::test("bot-0"));
    c.labels.remove(labels::REPLICA);
    let world = World::new(vec![], vec![c.clone()]);
    assert_eq!(
        world.plan(),
        vec![Step::RemoveContainer {
            key: None,
            container_id: "x1".into(),
            name: c.name,
            reason: RemoveReason::Unidentified
        }]
    );
}

#[test]
fn keeps_one_container_per_replica() {
    let a = Assignment::test("bot-0");
    let stale = Assignment::test("bot-0").config_hash(&"cc".repeat(32));
    let running = container("c2", &a);
    let stopped = with_status(container("c1", &a), exited(0));
    let old = container("c0", &stale);
    let world = World::new(vec![a.clone()], vec![old, stopped, running]);
    let steps = world.plan();
    let removed: Vec<&str> = steps
        .iter()
        .filter_map(|s| match s {
            Step::RemoveContainer {
                container_id,
                reason: RemoveReason::Duplicate,
                ..
            } => Some(container_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(removed, ["c0", "c1"]);
    assert_eq!(steps.len(), 2, "{steps:?}");
}

#[test]
fn restarts_exited_containers_with_back_off() {
    let a = Assignment::test("bot-0");
    let c = with_status(container("c1", &a), exited(1));
    let mut world = World::new(vec![a.clone()], vec![c]);
    assert_eq!(
        world.plan(),
        vec![Step::Restart {
            key: a.key(),
            container_id: "c1".into(),
            running: false,
            reason: RestartReason::NotRunning(exited(1)),
        }]
    );

    let until = world.now + secs(20);
    world.records.insert(
        a.key(),
        ReplicaRecord {
            restarts: 2,
            consecutive_failures: 2,
            not_before: Some(until),
            ..ReplicaRecord::default()
        },
    );
    assert_eq!(
        world.plan(),
        vec![Step::Wait {
            key: a.key(),
            until
        }]
    );

    world.now += secs(20);
    assert!(matches!(world.plan().as_slice(), [Step::Restart { .. }]));
}

#[test]
fn starts_a_created_but_never_started_container() {
    let a = Assignment::test("bot-0");
    let world = World::new(
        vec![a.clone()],
        vec![with_status(container("c1", &a), ContainerStatus::Created)],
    );
    assert!(matches!(
        world.plan().as_slice(),
        [Step::Restart {
            running: false,
            reason: RestartReason::NotRunning(ContainerStatus::Created),
            ..
        }]
    ));
}

#[test]
fn restarts_on_failed_liveness_of_the_current_run_only() {
    let a = Assignment::test("bot-0");
    let c = container("c1", &a);
    let mut world = World::new(vec![a.clone()], vec![c.clone()]);
    let failed = Liveness::Failed {
        message: "/healthz answered HTTP 503 with \"ok\": false".into(),
    };

    // A verdict about an earlier run of the container is stale.
    let mut earlier = probe(&c, failed.clone(), false);
    earlier.started_at = Some("2025-12-31T00:00:00Z".into());
    world.probes.insert(a.key(), earlier);
    assert_eq!(world.plan(), vec![]);

    world.probes.insert(a.key(), probe(&c, failed, false));
    assert!(matches!(
        world.plan().as_slice(),
        [Step::Restart { running: true, reason: RestartReason::LivenessFailed(m), .. }] if m.contains("503")
    ));
}

#[test]
fn replaces_dead_containers_and_holds_failed_creates() {
    let a = Assignment::test("bot-0");
    let mut world = World::new(
        vec![a.clone()],
        vec![with_status(container("c1", &a), ContainerStatus::Dead)],
    );
    assert!(matches!(
        world.plan().as_slice(),
        [Step::Replace {
            reason: ReplaceReason::Dead,
            preferred_port: Some(19100),
            ..
        }]
    ));

    world.observed.containers.clear();
    let until = world.now + secs(10);
    world.records.insert(
        a.key(),
        ReplicaRecord {
            consecutive_failures: 1,
            not_before: Some(until),
            last_error: Some("ImagePullFailed: no such host".into()),
            ..ReplicaRecord::default()
        },
    );
    assert_eq!(
        world.plan(),
        vec![Step::Wait {
            key: a.key(),
            until
        }]
    );
}

#[test]
fn paused_or_restarting_containers_are_left_alone() {
    let a = Assignment::test("bot-0");
    for status in [ContainerStatus::Paused, ContainerStatus::Restarting] {
        let world = World::new(
            vec![a.clone()],
            vec![with_status(container("c1", &a), status)],
        );
        assert_eq!(world.plan(), vec![]);
    }
}

#[test]
fn backoff_doubles_up_to_the_cap() {
    let policy = BackoffPolicy::default();
    let delays: Vec<u64> = (0..8).map(|n| policy.delay(n).as_secs()).collect();
    assert_eq!(delays, [0, 10, 20, 40, 80, 160, 300, 300]);
    assert_eq!(policy.delay(u32::MAX), policy.max);
}

#[test]
fn the_book_counts_restarts_and_settles_after_a_quiet_period() {
    let book = ReplicaBook::new(BackoffPolicy::default());
    let key = ReplicaKey::new("t", "p", "bot-0");
    let t0 = Instant::now();
    book.record_restart(&key, t0);
    book.record_restart(&key, t0 + secs(10));
    let r = book.get(&key);
    assert_eq!((r.restarts, r.consecutive_failures), (2, 2));
    assert_eq!(r.not_before, Some(t0 + secs(30)));

    book.settle(&key, t0 + secs(60));
    assert_eq!(
        book.get(&key).consecutive_failures,
        2,
        "too early to settle"
    );
    book.settle(&key, t0 + secs(10 + 600));
    let r = book.get(&key);
    assert_eq!(
        (r.restarts, r.consecutive_failures, r.not_before),
        (2, 0, None)
    );

    book.retain(|_| false);
    assert_eq!(book.get(&key), ReplicaRecord::default());
}

// --- status --------------------------------------------------------------------------------------

#[test]
fn status_follows_container_probe_and_record() {
    let a = Assignment::test("bot-0");
    let now = Instant::now();
    let c = container("c1", &a);
    let none = ReplicaRecord::default();
    let state = |c: Option<&ObservedContainer>, p: Option<&ProbeStatus>, r: &ReplicaRecord| {
        let s = replica_status(&a, c, p, r, now);
        (s.state, s.message)
    };

    assert_eq!(state(None, None, &none).0, ReplicaState::Pending);
    let pulling = ReplicaRecord {
        activity: Some(Activity::Pulling),
        ..ReplicaRecord::default()
    };
    assert_eq!(state(None, None, &pulling).0, ReplicaState::Pulling);
    let pull_failed = ReplicaRecord {
        last_error: Some("ImagePullFailed: manifest unknown".into()),
        not_before: Some(now + secs(10)),
        ..ReplicaRecord::default()
    };
    assert_eq!(
        state(None, None, &pull_failed),
        (
            ReplicaState::Failed,
            "ImagePullFailed: manifest unknown".into()
        )
    );

    assert_eq!(state(Some(&c), None, &none).0, ReplicaState::Starting);
    let ready = probe(&c, Liveness::Alive, true);
    assert_eq!(state(Some(&c), Some(&ready), &none).0, ReplicaState::Ready);
    let live = probe(&c, Liveness::Alive, false);
    assert_eq!(state(Some(&c), Some(&live), &none).0, ReplicaState::Running);
    let dead = probe(
        &c,
        Liveness::Failed {
            message: "down".into(),
        },
        false,
    );
    assert_eq!(
        state(Some(&c), Some(&dead), &none),
        (ReplicaState::Unhealthy, "down".into())
    );

    let crashed = with_status(c.clone(), exited(3));
    let held = ReplicaRecord {
        restarts: 4,
        consecutive_failures: 4,
        not_before: Some(now + secs(80)),
        ..ReplicaRecord::default()
    };
    let (s, m) = state(Some(&crashed), None, &held);
    assert_eq!(s, ReplicaState::CrashLoopBackOff);
    assert!(m.contains("exited with code 3") && m.contains("80s"), "{m}");

    let status = replica_status(&a, Some(&c), Some(&ready), &held, now);
    assert_eq!(status.restarts, 4);
    assert_eq!(status.host_port, Some(19100));
    assert_eq!(status.container_id.as_deref(), Some("c1"));
    assert_eq!(status.config_hash, a.config_hash);
    let proto = status.to_proto();
    assert_eq!(
        proto.state,
        clusterclaw_proto::agent::ReplicaState::Ready as i32
    );
}

// --- executor against the fake runtime ------------------------------------------------------------

fn reconciler(fake: &Arc<FakeRuntime>, data_dir: &Path) -> Reconciler {
    let runtime: Arc<dyn ContainerRuntime> = fake.clone();
    Reconciler::new(runtime, ReconcilerSettings::new(me(), data_dir)).with_port_check(|_| true)
}

async fn pass(r: &Reconciler, desired: &[Assignment], now: Instant) -> Pass {
    r.reconcile(desired, &BTreeMap::new(), now)
        .await
        .expect("engine answers")
}

#[tokio::test]
async fn creates_a_replica_with_its_network_volume_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0");
    let key = a.key();
    let now = Instant::now();

    let p = pass(&r, std::slice::from_ref(&a), now).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    let name = spec::container_name(&me(), &key);
    assert_eq!(
        fake.mutations(),
        vec![
            FakeCall::EnsureImage(a.image.clone()),
            FakeCall::EnsureNetwork(spec::network_name(&me(), "tenant-a")),
            FakeCall::EnsureVolume(spec::volume_name(&me(), &key)),
            FakeCall::CreateAndStart(name.clone(), Some(19100)),
        ]
    );
    let config = r.config_file(&key);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), a.config_json);
    let created = fake.spec(&name).expect("created");
    assert_eq!(created.binds[0].source, config);

    // Idempotent: a second pass changes nothing.
    fake.clear_calls();
    let p = pass(&r, std::slice::from_ref(&a), now).await;
    assert!(p.outcomes.is_empty());
    assert!(fake.mutations().is_empty());
}

#[tokio::test]
async fn skips_host_ports_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    // 19100 looks free to a bind test but the engine refuses it; 19120 is bound by someone.
    fake.occupy_port(19100);
    let r = reconciler(&fake, dir.path()).with_port_check(|p| p != 19120);
    let desired = [Assignment::test("bot-0"), Assignment::test("bot-1")];
    let p = pass(&r, &desired, Instant::now()).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    let mut ports: Vec<u16> = fake
        .containers()
        .iter()
        .filter_map(|c| c.host_port)
        .collect();
    ports.sort();
    assert_eq!(ports, [19140, 19160]);
}

#[tokio::test]
async fn an_unpullable_image_fails_the_replica_and_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0").image("example/missing:1");
    fake.fail_pull("example/missing:1", "manifest unknown");
    let now = Instant::now();

    let p = pass(&r, std::slice::from_ref(&a), now).await;
    let failure = p.failures().next().expect("failed");
    assert_eq!(
        failure.result.as_ref().unwrap_err().to_string(),
        "ImagePullFailed: manifest unknown"
    );
    let status = &r.statuses(std::slice::from_ref(&a), &p.observed, &BTreeMap::new(), now)[0];
    assert_eq!(status.state, ReplicaState::Failed);
    assert_eq!(status.message, "ImagePullFailed: manifest unknown");

    // Within the back-off nothing is tried.
    fake.clear_calls();
    let p = pass(&r, std::slice::from_ref(&a), now + secs(5)).await;
    assert_eq!(p.next_wake, Some(now + secs(10)));
    assert!(fake.mutations().is_empty());
    // After it, the pull is tried again.
    pass(&r, std::slice::from_ref(&a), now + secs(10)).await;
    assert_eq!(
        fake.mutations(),
        vec![FakeCall::EnsureImage("example/missing:1".into())]
    );
}

#[tokio::test]
async fn replaces_on_config_change_keeping_volume_and_port() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0");
    let now = Instant::now();
    pass(&r, std::slice::from_ref(&a), now).await;
    let old = fake.containers()[0].clone();

    let mut b = a.clone().config_hash(&"bb".repeat(32)).generation(2);
    b.config_json = r#"{"changed":true}"#.into();
    fake.clear_calls();
    let p = pass(&r, std::slice::from_ref(&b), now).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    let name = spec::container_name(&me(), &a.key());
    let mutations = fake.mutations();
    assert_eq!(
        mutations[0],
        FakeCall::StopContainer(old.id.clone(), spec::DEFAULT_STOP_GRACE)
    );
    assert_eq!(mutations[1], FakeCall::RemoveContainer(old.id.clone()));
    assert_eq!(
        mutations.last(),
        Some(&FakeCall::CreateAndStart(name, Some(19100)))
    );
    assert!(
        !mutations
            .iter()
            .any(|c| matches!(c, FakeCall::RemoveVolume(_)))
    );
    let now_running = fake.containers();
    assert_eq!(now_running.len(), 1);
    assert_eq!(now_running[0].config_hash(), Some(b.config_hash.as_str()));
    assert_eq!(now_running[0].generation(), Some(2));
    assert_eq!(
        std::fs::read_to_string(r.config_file(&a.key())).unwrap(),
        b.config_json
    );
}

#[tokio::test]
async fn a_crash_loop_restarts_with_growing_delays() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0");
    let desired = std::slice::from_ref(&a);
    let t0 = Instant::now();
    pass(&r, desired, t0).await;
    let id = fake.containers()[0].id.clone();

    let mut restarts_at = Vec::new();
    for t in 1..=80 {
        let now = t0 + secs(t);
        fake.set_status(&id, exited(1));
        fake.clear_calls();
        let p = pass(&r, desired, now).await;
        if fake
            .mutations()
            .contains(&FakeCall::StartContainer(id.clone()))
        {
            restarts_at.push(t);
        } else {
            let status = &r.statuses(desired, &p.observed, &BTreeMap::new(), now)[0];
            assert_eq!(status.state, ReplicaState::CrashLoopBackOff, "at {t}s");
        }
    }
    // Immediately, then after 10, 20 and 40 seconds.
    assert_eq!(restarts_at, [1, 11, 31, 71]);
    assert_eq!(r.book().get(&a.key()).restarts, 4);
}

#[tokio::test]
async fn unassigning_removes_container_volume_network_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0");
    let now = Instant::now();
    pass(&r, std::slice::from_ref(&a), now).await;
    let config = r.config_file(&a.key());
    assert!(config.exists());

    let p = pass(&r, &[], now).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    assert!(fake.containers().is_empty());
    assert!(fake.volumes().is_empty());
    assert!(fake.networks().is_empty());
    assert!(!config.exists());
    assert!(!config.parent().unwrap().exists());
}

#[tokio::test]
async fn leaves_other_hosts_and_unmanaged_containers_alone() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0");
    let mut theirs = container("theirs", &a);
    theirs.labels.insert(labels::HOST.into(), "host-2".into());
    let mut unmanaged = container("plain", &a);
    unmanaged.labels.clear();
    fake.insert_container(theirs);
    fake.insert_container(unmanaged);

    pass(&r, &[], Instant::now()).await;
    assert!(fake.mutations().is_empty(), "{:?}", fake.mutations());
    assert_eq!(fake.containers().len(), 2);
}

#[tokio::test]
async fn an_unreachable_engine_fails_the_pass() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    fake.set_unavailable(true);
    let err = r
        .reconcile(
            &[Assignment::test("bot-0")],
            &BTreeMap::new(),
            Instant::now(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Unavailable(_)));
}

#[tokio::test]
async fn probe_targets_point_at_running_containers() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let desired = [Assignment::test("bot-0"), Assignment::test("bot-1")];
    let p = pass(&r, &desired, Instant::now()).await;
    let observed = r.observe().await.unwrap();
    assert_ne!(p.observed, observed);
    let targets = r.probe_targets(&desired, &observed);
    let addrs: Vec<String> = targets.iter().map(|t| t.addr.to_string()).collect();
    assert_eq!(addrs, ["127.0.0.1:19100", "127.0.0.1:19120"]);

    fake.set_status(&targets[1].container_id, exited(0));
    let observed = r.observe().await.unwrap();
    assert_eq!(r.probe_targets(&desired, &observed).len(), 1);
}

// --- config drift ----------------------------------------------------------------------------------

/// A measurement of `c` finding `file` on the host and the assignment's environment.
fn measured(a: &Assignment, c: &ObservedContainer, file: &[u8]) -> Measurement {
    Measurement::new(
        a,
        &c.id,
        drift::FileRead::Bytes(file.to_vec()),
        &EnvPart::assigned(&a.env),
    )
}

fn revision3() -> Assignment {
    Assignment::test("bot-0")
        .env("ANTHROPIC_API_KEY", "sk-secret")
        .config(r#"{"gateway":{"bind":"lan"}}"#, 3)
}

#[test]
fn plans_a_drift_repair_only_when_the_measured_hash_differs() {
    let a = revision3();
    let c = container("c1", &a);
    let mut world = World::new(vec![a.clone()], vec![c.clone()]);
    world
        .observed
        .content
        .insert("c1".into(), measured(&a, &c, a.config_json.as_bytes()));
    assert_eq!(world.plan(), vec![], "in sync");

    let edited = measured(&a, &c, br#"{"gateway":{"bind":"loopback"}}"#);
    let drift = edited.drift(&a).expect("drift");
    world.observed.content.insert("c1".into(), edited);
    assert_eq!(
        world.plan(),
        vec![Step::RepairDrift {
            container_id: "c1".into(),
            assignment: Box::new(a.clone()),
            preferred_port: Some(19100),
            drift,
        }]
    );

    // A failed liveness changes nothing: the repair replaces the container anyway.
    world.probes.insert(
        a.key(),
        probe(
            &c,
            Liveness::Failed {
                message: "down".into(),
            },
            false,
        ),
    );
    assert!(matches!(
        world.plan().as_slice(),
        [Step::RepairDrift { .. }]
    ));

    // Within the back-off of an earlier repair: wait.
    let until = world.now + secs(10);
    world.records.insert(
        a.key(),
        ReplicaRecord {
            consecutive_failures: 1,
            not_before: Some(until),
            ..ReplicaRecord::default()
        },
    );
    assert_eq!(
        world.plan(),
        vec![Step::Wait {
            key: a.key(),
            until
        }]
    );
    world.records.clear();
    world.probes.clear();

    // No content hash (an older control plane): no drift check at all.
    let mut old = a.clone();
    old.content_hash.clear();
    world.desired = vec![old];
    assert_eq!(world.plan(), vec![]);
}

#[test]
fn no_drift_repair_while_the_container_is_replaced_for_a_config_change() {
    let old = revision3();
    let new = old
        .clone()
        .config(r#"{"gateway":{"bind":"lan"},"x":1}"#, 4)
        .config_hash(&"bb".repeat(32));
    let c = container("c1", &old);
    let mut world = World::new(vec![new.clone()], vec![c.clone()]);
    // The old container's file is not the new revision's.
    world
        .observed
        .content
        .insert("c1".into(), measured(&new, &c, old.config_json.as_bytes()));
    assert!(
        matches!(
            world.plan().as_slice(),
            [Step::Replace {
                reason: ReplaceReason::ConfigChanged { .. },
                ..
            }]
        ),
        "{:?}",
        world.plan()
    );
}

#[test]
fn a_stopped_container_is_restarted_not_repaired() {
    let a = revision3();
    let c = with_status(container("c1", &a), exited(1));
    let mut world = World::new(vec![a.clone()], vec![c.clone()]);
    world
        .observed
        .content
        .insert("c1".into(), measured(&a, &c, b"{}"));
    assert!(matches!(world.plan().as_slice(), [Step::Restart { .. }]));
}

#[test]
fn status_reports_revision_observed_hash_and_drift() {
    let a = revision3();
    let c = container("c1", &a);
    let now = Instant::now();

    let in_sync = ReplicaRecord {
        measured: Some(measured(&a, &c, a.config_json.as_bytes())),
        ..ReplicaRecord::default()
    };
    let s = replica_status(&a, Some(&c), None, &in_sync, now);
    assert_eq!(s.config_revision, 3);
    assert_eq!(s.observed_content_hash, a.content_hash);
    assert_eq!(s.message, "waiting for the first probe");

    // The revision is the running container's, from its label (right after an agent restart).
    let older = container("c1", &Assignment::test("bot-0").config("{}", 2));
    assert_eq!(
        replica_status(&a, Some(&older), None, &ReplicaRecord::default(), now).config_revision,
        2
    );
    // Unless it provably has this revision's content: a new revision with the same content
    // (or a container made before revisions were labelled, measured in sync).
    let mut same_content = c.clone();
    same_content
        .labels
        .insert(labels::CONFIG_REVISION.into(), "2".into());
    assert_eq!(
        replica_status(
            &a,
            Some(&same_content),
            None,
            &ReplicaRecord::default(),
            now
        )
        .config_revision,
        3
    );
    same_content.labels.remove(labels::CONFIG_REVISION);
    same_content.labels.remove(labels::CONTENT_HASH);
    assert_eq!(
        replica_status(
            &a,
            Some(&same_content),
            None,
            &ReplicaRecord::default(),
            now
        )
        .config_revision,
        0
    );
    assert_eq!(
        replica_status(&a, Some(&same_content), None, &in_sync, now).config_revision,
        3
    );
    assert_eq!(
        replica_status(&a, None, None, &ReplicaRecord::default(), now).config_revision,
        0
    );

    // A measurement of another container says nothing about this one.
    let other = ReplicaRecord {
        measured: Some(measured(&a, &container("c0", &a), b"{}")),
        ..ReplicaRecord::default()
    };
    let s = replica_status(&a, Some(&c), None, &other, now);
    assert_eq!(s.observed_content_hash, "");
    assert_eq!(s.message, "waiting for the first probe");

    // Drift whose repair failed while the container still runs.
    let edited = measured(&a, &c, b"{}");
    let found = edited.content_hash.clone().unwrap();
    let failed = ReplicaRecord {
        measured: Some(edited.clone()),
        last_error: Some("conflict: container is busy".into()),
        not_before: Some(now + secs(10)),
        ..ReplicaRecord::default()
    };
    let s = replica_status(&a, Some(&c), None, &failed, now);
    assert_eq!(s.observed_content_hash, found);
    assert_eq!(
        s.message,
        "config drift: config file on the host did not match revision 3; the repair failed: conflict: container is busy; retrying in 10s; waiting for the first probe"
    );

    // The repair removed the container and could not create the new one.
    let gone = ReplicaRecord {
        repairing: edited.drift(&a),
        last_error: Some("ImagePullFailed: registry down".into()),
        not_before: Some(now + secs(10)),
        ..ReplicaRecord::default()
    };
    let s = replica_status(&a, None, None, &gone, now);
    assert_eq!(
        (s.state, s.message),
        (
            ReplicaState::Failed,
            "repairing config drift (config file): ImagePullFailed: registry down; retrying in 10s"
                .into()
        )
    );
}

#[test]
fn debug_output_shows_no_config_or_env_values() {
    let a = revision3();
    let c = container("c1", &a);
    let edited = measured(&a, &c, br#"{"gateway":{"bind":"loopback"}}"#);
    let step = Step::RepairDrift {
        container_id: c.id.clone(),
        assignment: Box::new(a.clone()),
        preferred_port: c.host_port,
        drift: edited.drift(&a).unwrap(),
    };
    let mut observed = Observed {
        containers: vec![c],
        ..Observed::default()
    };
    observed.content.insert("c1".into(), edited);
    for shown in [format!("{step:?}"), format!("{observed:?}")] {
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert!(
            !shown.contains("loopback") && !shown.contains("lan\""),
            "{shown}"
        );
        assert!(shown.contains("ANTHROPIC_API_KEY"), "{shown}");
    }
}

#[tokio::test]
async fn a_hand_edited_config_file_is_rewritten_and_the_container_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = revision3();
    let desired = std::slice::from_ref(&a);
    let key = a.key();
    let t0 = Instant::now();
    pass(&r, desired, t0).await;
    let old = fake.containers()[0].clone();

    // In sync: nothing to do, and the status says what was measured.
    let p = pass(&r, desired, t0 + secs(5)).await;
    assert!(p.outcomes.is_empty(), "{:?}", p.outcomes);
    let status = &r.statuses(desired, &p.observed, &BTreeMap::new(), t0 + secs(5))[0];
    assert_eq!(status.observed_content_hash, a.content_hash);
    assert_eq!(status.config_revision, 3);

    let config = r.config_file(&key);
    std::fs::write(&config, r#"{"gateway":{"bind":"loopback"}}"#).unwrap();
    fake.clear_calls();
    let p = pass(&r, desired, t0 + secs(10)).await;
    assert!(
        matches!(
            p.outcomes.as_slice(),
            [StepOutcome { step: Step::RepairDrift { drift, .. }, result: Ok(()) }]
                if drift.kind == drift::DriftKind::ConfigFile && drift.revision == 3
        ),
        "{:?}",
        p.outcomes
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), a.config_json);
    let mutations = fake.mutations();
    assert_eq!(
        mutations[0],
        FakeCall::StopContainer(old.id.clone(), spec::DEFAULT_STOP_GRACE)
    );
    assert_eq!(mutations[1], FakeCall::RemoveContainer(old.id.clone()));
    assert_eq!(
        mutations.last(),
        Some(&FakeCall::CreateAndStart(old.name.clone(), old.host_port))
    );
    let now_running = fake.containers();
    assert_eq!(now_running.len(), 1);
    assert_ne!(now_running[0].id, old.id);
    assert_eq!(now_running[0].config_revision(), Some(3));
    assert_eq!(
        now_running[0].label(labels::CONTENT_HASH),
        Some(a.content_hash.as_str())
    );

    let events = crate::events::notable(r.events().pending());
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e.reason, "ConfigDriftRepaired");
    assert_eq!(
        (e.tenant.as_str(), e.instance.as_str(), e.replica.as_str()),
        ("tenant-a", "bot", "bot-0")
    );
    assert_eq!(
        e.message,
        "replica bot-0: config file on the host did not match revision 3; rewrote it and replaced the container"
    );
    assert!(!e.message.contains("loopback") && !e.message.contains("sk-secret"));

    // Repaired: the next pass measures the new container in sync and does nothing.
    let p = pass(&r, desired, t0 + secs(15)).await;
    assert!(p.outcomes.is_empty(), "{:?}", p.outcomes);
    let status = &r.statuses(desired, &p.observed, &BTreeMap::new(), t0 + secs(15))[0];
    assert_eq!(status.observed_content_hash, a.content_hash);
    assert_eq!(status.container_id.as_ref(), Some(&now_running[0].id));
    assert_eq!(
        crate::events::notable(r.events().pending()).len(),
        1,
        "one event per repair"
    );
}

#[tokio::test]
async fn a_container_whose_environment_differs_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = revision3();
    let desired = std::slice::from_ref(&a);
    let t0 = Instant::now();
    pass(&r, desired, t0).await;
    let old = fake.containers()[0].clone();
    fake.set_env(&old.id, "ANTHROPIC_API_KEY", Some("sk-other"));

    let p = pass(&r, desired, t0 + secs(5)).await;
    assert!(
        matches!(
            p.outcomes.as_slice(),
            [StepOutcome { step: Step::RepairDrift { drift, .. }, result: Ok(()) }]
                if drift.kind == drift::DriftKind::Environment
        ),
        "{:?}",
        p.outcomes
    );
    let now_running = fake.containers();
    assert_ne!(now_running[0].id, old.id);
    let env = now_running[0].env.clone().unwrap();
    assert_eq!(env.get("ANTHROPIC_API_KEY"), Some("sk-secret"));
    let events = crate::events::notable(r.events().pending());
    assert!(
        events[0]
            .message
            .contains("container environment did not match revision 3"),
        "{events:?}"
    );
    assert!(!events[0].message.contains("sk-"));

    // A variable the container lacks is drift too (after the back-off of the first repair).
    fake.set_env(&now_running[0].id, "ANTHROPIC_API_KEY", None);
    let p = pass(&r, desired, t0 + secs(10)).await;
    assert!(
        matches!(
            p.outcomes.as_slice(),
            [StepOutcome {
                step: Step::Wait { .. },
                ..
            }]
        ),
        "{:?}",
        p.outcomes
    );
    let p = pass(&r, desired, t0 + secs(30)).await;
    assert!(
        matches!(
            p.outcomes.as_slice(),
            [StepOutcome {
                step: Step::RepairDrift { .. },
                result: Ok(())
            }]
        ),
        "{:?}",
        p.outcomes
    );
    let p = pass(&r, desired, t0 + secs(35)).await;
    assert!(p.outcomes.is_empty(), "{:?}", p.outcomes);
    assert_eq!(crate::events::notable(r.events().pending()).len(), 2);
}

#[tokio::test]
async fn a_missing_config_file_is_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = revision3();
    let desired = std::slice::from_ref(&a);
    let t0 = Instant::now();
    pass(&r, desired, t0).await;
    let config = r.config_file(&a.key());
    std::fs::remove_file(&config).unwrap();

    let p = pass(&r, desired, t0 + secs(5)).await;
    assert!(
        matches!(
            p.outcomes.as_slice(),
            [StepOutcome { step: Step::RepairDrift { drift, .. }, result: Ok(()) }]
                if drift.kind == drift::DriftKind::FileUnreadable("missing".into())
        ),
        "{:?}",
        p.outcomes
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), a.config_json);
    assert!(
        crate::events::notable(r.events().pending())[0]
            .message
            .contains("config file on the host was missing")
    );
}

#[tokio::test]
async fn a_failed_repair_is_retried_after_the_back_off_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = revision3();
    let desired = std::slice::from_ref(&a);
    let t0 = Instant::now();
    pass(&r, desired, t0).await;
    std::fs::write(r.config_file(&a.key()), "{}").unwrap();
    fake.fail_pull(&a.image, "registry down");

    let p = pass(&r, desired, t0 + secs(5)).await;
    assert!(
        matches!(
            p.outcomes.as_slice(),
            [StepOutcome {
                step: Step::RepairDrift { .. },
                result: Err(_)
            }]
        ),
        "{:?}",
        p.outcomes
    );
    let status = &r.statuses(
        desired,
        &r.observe().await.unwrap(),
        &BTreeMap::new(),
        t0 + secs(5),
    )[0];
    assert_eq!(status.state, ReplicaState::Failed);
    assert_eq!(
        status.message,
        "repairing config drift (config file): ImagePullFailed: registry down; retrying in 10s"
    );
    assert!(
        crate::events::notable(r.events().pending()).is_empty(),
        "not repaired yet"
    );

    // Within the back-off nothing is tried; after it, the replica is created again.
    let p = pass(&r, desired, t0 + secs(10)).await;
    assert!(
        matches!(
            p.outcomes.as_slice(),
            [StepOutcome {
                step: Step::Wait { .. },
                ..
            }]
        ),
        "{:?}",
        p.outcomes
    );
    fake.heal_pull(&a.image);
    let p = pass(&r, desired, t0 + secs(15)).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    assert_eq!(
        std::fs::read_to_string(r.config_file(&a.key())).unwrap(),
        a.config_json
    );
    let events = crate::events::notable(r.events().pending());
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].reason, "ConfigDriftRepaired");
}

#[tokio::test]
async fn the_environment_is_read_once_per_container() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    fake.hide_env_in_lists(true);
    let r = reconciler(&fake, dir.path());
    let a = revision3();
    let t0 = Instant::now();
    pass(&r, std::slice::from_ref(&a), t0).await;
    let id = fake.containers()[0].id.clone();
    for n in 1..=3 {
        let p = pass(&r, std::slice::from_ref(&a), t0 + secs(n)).await;
        assert!(p.outcomes.is_empty(), "{:?}", p.outcomes);
        assert!(p.observed.content.contains_key(&id));
    }
    let inspections = fake
        .calls()
        .iter()
        .filter(|c| **c == FakeCall::InspectContainer(id.clone()))
        .count();
    assert_eq!(inspections, 1);

    // A replaced container's entry goes with it.
    let b = a
        .clone()
        .config(r#"{"gateway":{"bind":"lan"},"x":1}"#, 4)
        .config_hash(&"bb".repeat(32));
    pass(&r, std::slice::from_ref(&b), t0 + secs(5)).await;
    pass(&r, std::slice::from_ref(&b), t0 + secs(6)).await;
    let cached: Vec<String> = r.env_parts_lock().keys().cloned().collect();
    assert_eq!(cached.len(), 1);
    assert_ne!(cached[0], id);
}

#[tokio::test]
async fn no_drift_check_without_a_content_hash() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    fake.hide_env_in_lists(true);
    let r = reconciler(&fake, dir.path());
    let mut a = revision3();
    a.content_hash.clear();
    let t0 = Instant::now();
    pass(&r, std::slice::from_ref(&a), t0).await;
    std::fs::write(r.config_file(&a.key()), "{}").unwrap();
    fake.clear_calls();
    let p = pass(&r, std::slice::from_ref(&a), t0 + secs(5)).await;
    assert!(p.outcomes.is_empty(), "{:?}", p.outcomes);
    assert!(p.observed.content.is_empty());
    assert!(
        !fake
            .calls()
            .iter()
            .any(|c| matches!(c, FakeCall::InspectContainer(_)))
    );
    let status = &r.statuses(std::slice::from_ref(&a), &p.observed, &BTreeMap::new(), t0)[0];
    assert_eq!(status.observed_content_hash, "");
}

// --- ownership: cluster labels and pre-upgrade adoption ---------------------------------------------

/// What an agent before cluster labels made for `a` on host `host`: container, volume, network.
fn legacy_objects(
    host: &str,
    a: &Assignment,
    id: &str,
) -> (ObservedContainer, ObservedVolume, ObservedNetwork) {
    let strip = |mut l: BTreeMap<String, String>| {
        l.remove(labels::CLUSTER);
        l.remove(labels::HOST_UID);
        l
    };
    let old = Owner::from(host);
    let mut c = container(id, a);
    c.name = spec::legacy_container_name(host, &a.key());
    c.labels = strip(spec::container_labels(&old, a));
    let v = ObservedVolume {
        name: spec::legacy_volume_name(host, &a.key()),
        labels: strip(spec::volume_spec(&old, a).labels),
    };
    let n = ObservedNetwork {
        id: "legacy-net".into(),
        name: spec::legacy_network_name(host, &a.tenant),
        labels: strip(spec::network_spec(&old, &a.tenant).labels),
    };
    (c, v, n)
}

#[tokio::test]
async fn pre_upgrade_objects_the_saved_state_knows_are_adopted_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let a = Assignment::test("bot-0");
    let (c, v, n) = legacy_objects(HOST, &a, "legacy-1");
    fake.insert_container(c.clone());
    fake.insert_volume(v.clone());
    fake.insert_network(n.clone());
    state::StateStore::new(dir.path())
        .save(&state::SavedState::new(HOST, 7, vec![a.clone()]))
        .unwrap();
    let r = reconciler(&fake, dir.path());
    // The old agent wrote the rendered config into the same data directory.
    write_config(&r.config_file(&a.key()), a.config_json.as_bytes()).unwrap();
    let now = Instant::now();

    let p = pass(&r, std::slice::from_ref(&a), now).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    assert!(fake.mutations().is_empty(), "{:?}", fake.mutations());
    assert_eq!(p.observed.containers, vec![c.clone()]);
    let statuses = r.statuses(std::slice::from_ref(&a), &p.observed, &BTreeMap::new(), now);
    assert_eq!(statuses[0].container_id.as_deref(), Some("legacy-1"));
    let record = state::load_ownership(dir.path())
        .unwrap()
        .expect("recorded");
    assert!(record.is_for(&me()));
    assert_eq!(
        record.legacy.containers,
        BTreeSet::from(["legacy-1".to_owned()])
    );

    // A new revision replaces the adopted container under this owner's name, on the adopted
    // state volume and network.
    let mut next = a.clone();
    next.config_hash = "h2".into();
    fake.clear_calls();
    let p = pass(&r, std::slice::from_ref(&next), now).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    let name = spec::container_name(&me(), &a.key());
    let created = fake.spec(&name).expect("replaced under the new name");
    assert_eq!(
        created.volumes[0].volume, v.name,
        "the state volume is kept"
    );
    assert_eq!(created.network.as_deref(), Some(n.name.as_str()));
    assert_eq!(created.labels[labels::CLUSTER], "cluster-1");
    assert!(
        !fake
            .mutations()
            .iter()
            .any(|m| matches!(m, FakeCall::EnsureVolume(_) | FakeCall::RemoveVolume(_))),
        "{:?}",
        fake.mutations()
    );

    // The decision is not widened later: a legacy container that appears afterwards is not
    // adopted, even for a replica this host runs.
    let b = Assignment::test("bot-1");
    let (late, _, _) = legacy_objects(HOST, &b, "late");
    fake.insert_container(late);
    let r2 = reconciler(&fake, dir.path());
    let p = pass(&r2, &[next.clone(), b.clone()], now).await;
    assert!(p.observed.containers.iter().all(|c| c.id != "late"));
    assert!(fake.containers().iter().any(|c| c.id == "late"));
}

#[tokio::test]
async fn another_cluster_with_the_same_host_name_leaves_everything_alone() {
    let fake = Arc::new(FakeRuntime::new());
    let a = Assignment::test("bot-0");
    // This cluster's agent runs the replica (and a pre-upgrade one it adopted).
    let mine_dir = tempfile::tempdir().unwrap();
    let mine = reconciler(&fake, mine_dir.path());
    let legacy_a = Assignment::test("old-0");
    let (c, v, n) = legacy_objects(HOST, &legacy_a, "legacy-1");
    fake.insert_container(c);
    fake.insert_volume(v);
    fake.insert_network(n);
    state::StateStore::new(mine_dir.path())
        .save(&state::SavedState::new(HOST, 7, vec![legacy_a.clone()]))
        .unwrap();
    let now = Instant::now();
    let p = pass(&mine, &[a.clone(), legacy_a.clone()], now).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    let before = fake.containers();

    // A second cluster's agent, same host name, same tenant/project/replica names, no state.
    let theirs_dir = tempfile::tempdir().unwrap();
    let them = Owner::new(HOST, "cluster-2", "uid-9");
    let theirs = Reconciler::new(
        fake.clone(),
        ReconcilerSettings::new(them.clone(), theirs_dir.path()),
    )
    .with_port_check(|_| true);
    fake.clear_calls();
    let p = pass(&theirs, std::slice::from_ref(&a), now).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    assert!(p.observed.containers.is_empty(), "sees nothing of ours");
    let name = spec::container_name(&them, &a.key());
    assert_ne!(name, spec::container_name(&me(), &a.key()));
    let made = fake.mutations();
    assert!(
        made.iter().all(|m| match m {
            FakeCall::EnsureImage(_) => true,
            FakeCall::EnsureNetwork(n) => *n == spec::network_name(&them, &a.tenant),
            FakeCall::EnsureVolume(v) => *v == spec::volume_name(&them, &a.key()),
            // The engine refuses the host ports our containers hold; it moves on.
            FakeCall::CreateAndStart(n, _) => *n == name,
            _ => false,
        }),
        "only its own, new objects: {made:?}"
    );
    assert!(
        fake.containers()
            .iter()
            .any(|c| c.name == name && them.owns(c))
    );
    // Nothing of ours changed; and when its instance goes, ours stay.
    for c in &before {
        assert!(fake.containers().contains(c), "{c:?}");
    }
    fake.clear_calls();
    pass(&theirs, &[], now).await;
    let removed: Vec<FakeCall> = fake.mutations();
    assert!(
        removed.iter().all(|m| match m {
            FakeCall::StopContainer(..) | FakeCall::RemoveContainer(_) => true,
            FakeCall::RemoveVolume(v) => *v == spec::volume_name(&them, &a.key()),
            FakeCall::RemoveNetwork(n) => *n == spec::network_name(&them, &a.tenant),
            _ => false,
        }),
        "{removed:?}"
    );
    for c in &before {
        assert!(fake.containers().contains(c), "{c:?}");
    }
    assert!(fake.volumes().contains(&spec::volume_name(&me(), &a.key())));
    assert!(
        fake.volumes()
            .contains(&spec::legacy_volume_name(HOST, &legacy_a.key()))
    );
}

#[tokio::test]
async fn a_removed_host_stops_its_containers_and_keeps_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0");
    pass(&r, std::slice::from_ref(&a), Instant::now()).await;
    let mut foreign = container("foreign", &a);
    foreign
        .labels
        .insert(labels::CLUSTER.into(), "cluster-2".into());
    fake.insert_container(foreign);
    fake.clear_calls();
    assert_eq!(r.stop_all().await.unwrap(), 1);
    let stops: Vec<FakeCall> = fake.mutations();
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert!(matches!(&stops[0], FakeCall::StopContainer(id, _) if id != "foreign"));
    assert_eq!(fake.volumes().len(), 1, "the state volume stays");
    assert_eq!(
        r.stop_all().await.unwrap(),
        0,
        "stopped ones are not stopped again"
    );
}

// --- parallel work, grace periods, retained volumes -------------------------------------------

fn reconciler_with(
    fake: &Arc<FakeRuntime>,
    data_dir: &Path,
    change: impl FnOnce(&mut ReconcilerSettings),
) -> Reconciler {
    let runtime: Arc<dyn ContainerRuntime> = fake.clone();
    let mut settings = ReconcilerSettings::new(me(), data_dir);
    change(&mut settings);
    Reconciler::new(runtime, settings).with_port_check(|_| true)
}

fn stops(fake: &FakeRuntime) -> Vec<(String, Duration)> {
    fake.calls()
        .into_iter()
        .filter_map(|c| match c {
            FakeCall::StopContainer(id, grace) => Some((id, grace)),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_slow_stop_holds_up_neither_the_pass_nor_other_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    fake.set_stop_delay(secs(20));
    let gone = Assignment::test("old-0");
    fake.insert_container(container("gone", &gone));
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0");
    let started = Instant::now();

    let p = pass(&r, std::slice::from_ref(&a), started).await;
    assert!(
        started.elapsed() < secs(5),
        "the pass waited {:?}",
        started.elapsed()
    );
    // The new replica was created while the stop is still pending.
    assert!(
        p.outcomes
            .iter()
            .any(|o| matches!(o.step, Step::Create { .. }) && o.result.is_ok()),
        "{:?}",
        p.outcomes
    );
    assert!(
        !p.outcomes
            .iter()
            .any(|o| matches!(o.step, Step::RemoveContainer { .. })),
        "{:?}",
        p.outcomes
    );
    assert_eq!(r.in_flight(), 1);
    assert!(fake.containers().iter().any(|c| c.id == "gone"));

    // The next pass does not start the removal again.
    pass(&r, std::slice::from_ref(&a), Instant::now()).await;
    assert_eq!(stops(&fake).len(), 1, "{:?}", fake.calls());

    r.wait_idle().await;
    assert!(started.elapsed() >= secs(20));
    assert!(!fake.containers().iter().any(|c| c.id == "gone"));
    assert_eq!(r.in_flight(), 0);
}

#[tokio::test]
async fn creations_of_one_pass_ask_for_their_tenant_network_once() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let desired: Vec<Assignment> = (0..10)
        .map(|i| Assignment::test(&format!("bot-{i}")))
        .collect();
    let p = pass(&r, &desired, Instant::now()).await;
    r.wait_idle().await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    let networks = |fake: &FakeRuntime| {
        fake.calls()
            .into_iter()
            .filter(|c| matches!(c, FakeCall::EnsureNetwork(_)))
            .count()
    };
    assert_eq!(networks(&fake), 1, "{:?}", fake.calls());
    assert_eq!(fake.containers().len(), 10);
    assert_eq!(fake.networks().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn work_that_ended_after_a_pass_looked_is_left_to_the_next_pass() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    fake.set_stop_delay(secs(20));
    let old = Assignment::test("bot-0").config(r#"{"a":1}"#, 1);
    fake.insert_container(container("old", &old));
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0")
        .config(r#"{"a":2}"#, 2)
        .config_hash(&"b".repeat(64));
    pass(&r, std::slice::from_ref(&a), Instant::now()).await;
    assert_eq!(r.in_flight(), 1);
    // A pass looks while the replacement is under way (the old container is still there) and
    // acts only once it is done: what it planned from that view is not done again.
    let seen = r.observe().await.unwrap();
    r.wait_idle().await;
    let steps = plan(&PlanInput {
        owner: &me(),
        desired: std::slice::from_ref(&a),
        observed: &seen,
        probes: &BTreeMap::new(),
        records: &r.book().snapshot(),
        retained: Some(&BTreeSet::new()),
        now: Instant::now(),
    });
    assert!(
        steps.iter().any(|s| matches!(s, Step::Replace { .. })),
        "{steps:?}"
    );
    fake.clear_calls();
    let outcomes = r.execute(steps, &seen, Instant::now()).await;
    r.wait_idle().await;
    assert!(fake.mutations().is_empty(), "{:?}", fake.calls());
    assert!(
        !outcomes
            .iter()
            .any(|o| matches!(o.step, Step::Replace { .. })),
        "{outcomes:?}"
    );
    // The next pass looks again and finds the replica as it should be.
    let p = pass(&r, std::slice::from_ref(&a), Instant::now()).await;
    r.wait_idle().await;
    assert!(fake.mutations().is_empty(), "{:?}", fake.calls());
    let running: Vec<_> = p.observed.containers.iter().map(|c| c.id.clone()).collect();
    assert_eq!(running.len(), 1, "{running:?}");
    assert_ne!(running[0], "old");
}

#[tokio::test(start_paused = true)]
async fn work_runs_at_once_up_to_the_host_limit() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    fake.set_stop_delay(secs(20));
    for i in 0..5 {
        let a = Assignment::test(&format!("old-{i}"));
        fake.insert_container(container(&format!("c{i}"), &a));
    }
    let r = reconciler_with(&fake, dir.path(), |s| s.max_parallel = 2);
    let started = Instant::now();
    pass(&r, &[], started).await;
    r.wait_idle().await;
    assert_eq!(fake.max_concurrent(), 2);
    assert!(fake.containers().is_empty());
    // 5 stops of 20 s, two at a time: three rounds, not five.
    assert!(started.elapsed() >= secs(60) && started.elapsed() < secs(70));

    // Without a tight limit the three stops of a scale-down take one grace period.
    let fake = Arc::new(FakeRuntime::new());
    fake.set_stop_delay(secs(20));
    for i in 0..3 {
        let a = Assignment::test(&format!("old-{i}"));
        fake.insert_container(container(&format!("c{i}"), &a));
    }
    let r = reconciler(&fake, dir.path());
    let started = Instant::now();
    pass(&r, &[], started).await;
    r.wait_idle().await;
    assert_eq!(fake.max_concurrent(), 3);
    assert!(started.elapsed() < secs(25), "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn creations_running_at_once_never_share_a_host_port() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    fake.set_stop_delay(secs(20));
    // bot-0 is replaced slowly and keeps its port 19100 for the new container.
    let old = Assignment::test("bot-0").image("example/openclaw:2026.6.1");
    fake.insert_container(container("old", &old));
    let r = reconciler(&fake, dir.path());
    let desired: Vec<Assignment> = (0..4)
        .map(|i| Assignment::test(&format!("bot-{i}")))
        .collect();
    pass(&r, &desired, Instant::now()).await;
    // A second pass while the replacement is in flight creates nothing more.
    pass(&r, &desired, Instant::now()).await;
    r.wait_idle().await;
    let ports: Vec<u16> = fake
        .containers()
        .iter()
        .filter_map(|c| c.host_port)
        .collect();
    let unique: BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(ports.len(), 4, "{:?}", fake.containers());
    assert_eq!(unique.len(), 4, "{ports:?}");
    let bot0 = fake
        .containers()
        .into_iter()
        .find(|c| c.replica_key() == Some(desired[0].key()))
        .expect("bot-0 runs");
    assert_eq!(
        bot0.host_port,
        Some(19100),
        "the replaced replica keeps its port"
    );
}

#[tokio::test]
async fn each_replica_is_stopped_with_its_own_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0").grace(45);
    pass(&r, std::slice::from_ref(&a), Instant::now()).await;
    let name = spec::container_name(&me(), &a.key());
    let created = fake.spec(&name).expect("created");
    assert_eq!(created.stop_grace, secs(45));
    assert!(created.init, "runs an init process as PID 1");
    assert_eq!(created.labels[labels::STOP_GRACE], "45");

    // A new image: the old container gets its replica's grace period.
    let b = a.clone().image("example/openclaw:2026.8.1");
    pass(&r, std::slice::from_ref(&b), Instant::now()).await;
    assert_eq!(stops(&fake).last().map(|s| s.1), Some(secs(45)));

    // Unassigned: the grace period comes from the container's label.
    fake.clear_calls();
    pass(&r, &[], Instant::now()).await;
    r.wait_idle().await;
    assert_eq!(stops(&fake).len(), 1);
    assert_eq!(stops(&fake)[0].1, secs(45));

    // Without one of its own, the agent's default.
    let c = Assignment::test("bot-1");
    pass(&r, std::slice::from_ref(&c), Instant::now()).await;
    fake.clear_calls();
    pass(&r, &[], Instant::now()).await;
    r.wait_idle().await;
    assert_eq!(
        stops(&fake),
        vec![(stops(&fake)[0].0.clone(), spec::DEFAULT_STOP_GRACE)]
    );
}

#[test]
fn retained_volumes_are_kept_and_others_removed() {
    let gone = Assignment::test("bot-1");
    let kept = Assignment::test("bot-2");
    let mut w = World::new(vec![], vec![]);
    w.observed.volumes = vec![volume(&gone, &me()), volume(&kept, &me())];
    w.retained = Some(BTreeSet::from([kept.key()]));
    let removed: Vec<ReplicaKey> = w
        .plan()
        .into_iter()
        .filter_map(|s| match s {
            Step::RemoveVolume { key, .. } => Some(key),
            _ => None,
        })
        .collect();
    assert_eq!(removed, vec![gone.key()]);

    // Not known which to keep (saved state from before retention): keep all.
    w.retained = None;
    assert!(
        !w.plan()
            .iter()
            .any(|s| matches!(s, Step::RemoveVolume { .. }))
    );
}

#[tokio::test]
async fn a_restarted_agent_keeps_the_retained_volumes_it_saved() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let gone = Assignment::test("bot-1");
    let kept = Assignment::test("bot-2");
    fake.insert_volume(volume(&gone, &me()));
    fake.insert_volume(volume(&kept, &me()));
    let retained = vec![crate::model::RetainedVolume {
        tenant: kept.tenant.clone(),
        project: kept.project.clone(),
        instance: kept.instance.clone(),
        replica: kept.replica.clone(),
        instance_uid: kept.instance_uid.clone(),
    }];
    state::StateStore::new(dir.path())
        .save(&state::SavedState::new(HOST, 7, vec![]).with_retained(retained))
        .unwrap();

    // A new agent reads the saved state (as the sync loop does) and acts on it.
    let saved = state::StateStore::new(dir.path()).load().unwrap().unwrap();
    let r = reconciler(&fake, dir.path());
    r.set_retained(saved.retained.as_deref());
    pass(&r, &[], Instant::now()).await;
    r.wait_idle().await;
    assert_eq!(fake.volumes(), vec![spec::volume_name(&me(), &kept.key())]);

    // A saved state from before retention says nothing: every volume stays.
    let fake = Arc::new(FakeRuntime::new());
    fake.insert_volume(volume(&gone, &me()));
    let r = reconciler(&fake, dir.path());
    r.set_retained(None);
    pass(&r, &[], Instant::now()).await;
    r.wait_idle().await;
    assert_eq!(fake.volumes().len(), 1);

    // Assigned again: the kept volume is used, not a new one.
    let fake = Arc::new(FakeRuntime::new());
    fake.insert_volume(volume(&kept, &me()));
    let r = reconciler(&fake, dir.path());
    pass(&r, std::slice::from_ref(&kept), Instant::now()).await;
    let created = fake
        .spec(&spec::container_name(&me(), &kept.key()))
        .expect("created");
    assert_eq!(
        created.volumes[0].volume,
        spec::volume_name(&me(), &kept.key())
    );
}

// --- snapshots before a change of image ----------------------------------------------------------

fn downloads(fake: &FakeRuntime) -> usize {
    fake.calls()
        .iter()
        .filter(|c| matches!(c, FakeCall::DownloadArchive(..)))
        .count()
}

fn reasons(r: &Reconciler) -> Vec<String> {
    crate::events::notable(r.events().pending())
        .into_iter()
        .map(|e| e.reason)
        .collect()
}

const V1: &str = "example/openclaw:2026.7.1";
const V2: &str = "example/openclaw:2026.8.1";

#[tokio::test]
async fn a_snapshot_is_taken_before_a_new_image_and_not_before_a_new_config() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0").image(V1);
    let volume = spec::volume_name(&me(), &a.key());
    pass(&r, std::slice::from_ref(&a), Instant::now()).await;
    fake.set_volume_data(&volume, b"state of v1");

    // A config-only change: replaced without a snapshot.
    let b = a.clone().config_hash(&"bb".repeat(32));
    let p = pass(&r, std::slice::from_ref(&b), Instant::now()).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    assert_eq!(downloads(&fake), 0);

    // A new image: the old container is stopped, its state saved, then replaced.
    fake.clear_calls();
    let c = b.clone().image(V2);
    let p = pass(&r, std::slice::from_ref(&c), Instant::now()).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    let calls = fake.mutations();
    let stop = calls
        .iter()
        .position(|c| matches!(c, FakeCall::StopContainer(..)))
        .expect("stopped");
    let download = calls
        .iter()
        .position(|c| matches!(c, FakeCall::DownloadArchive(_, path) if *path == snapshot::archive_path()))
        .expect("archived");
    let remove = calls
        .iter()
        .position(|c| matches!(c, FakeCall::RemoveContainer(_)))
        .expect("removed");
    assert!(stop < download && download < remove, "{calls:?}");
    // An upgrade restores nothing: the volume is used as it is.
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, FakeCall::UploadArchive(..) | FakeCall::RemoveVolume(_))),
        "{calls:?}"
    );
    assert_eq!(fake.volume_data(&volume), b"state of v1");
    assert_eq!(reasons(&r), vec![snapshot::SNAPSHOT_TAKEN]);

    // Reported with the replica, newest first.
    let observed = r.observe().await.unwrap();
    let status = &r.statuses(
        std::slice::from_ref(&c),
        &observed,
        &BTreeMap::new(),
        Instant::now(),
    )[0];
    assert_eq!(status.snapshots.len(), 1);
    assert_eq!(status.snapshots[0].image, V1);
    assert_eq!(status.snapshots[0].bytes, b"state of v1".len() as u64);
    let snaps = SnapshotDir::new(r.config_file(&a.key()).parent().unwrap());
    assert_eq!(
        std::fs::read(snaps.tar(&status.snapshots[0].id)).unwrap(),
        b"state of v1"
    );
}

#[tokio::test]
async fn a_failed_snapshot_keeps_the_old_container() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0").image(V1);
    pass(&r, std::slice::from_ref(&a), Instant::now()).await;
    let old = fake.containers()[0].id.clone();

    fake.fail_download(Some("disk full"));
    fake.clear_calls();
    let b = a.clone().image(V2);
    let now = Instant::now();
    let p = pass(&r, std::slice::from_ref(&b), now).await;
    let failed: Vec<_> = p.failures().collect();
    assert_eq!(failed.len(), 1, "{:?}", p.outcomes);
    assert!(matches!(failed[0].result, Err(StepError::Snapshot { .. })));
    let containers = fake.containers();
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0].id, old);
    assert_eq!(containers[0].image, V1);
    assert!(containers[0].status.is_running(), "started again");
    assert!(!fake.mutations().iter().any(|c| matches!(
        c,
        FakeCall::CreateAndStart(..) | FakeCall::RemoveContainer(_)
    )));

    // The replica says why, and the next pass waits for the back-off instead of stopping
    // the old container again.
    let observed = r.observe().await.unwrap();
    let status = &r.statuses(std::slice::from_ref(&b), &observed, &BTreeMap::new(), now)[0];
    assert!(status.message.contains("disk full"), "{}", status.message);
    fake.clear_calls();
    let p = pass(&r, std::slice::from_ref(&b), now + secs(1)).await;
    assert!(
        matches!(
            p.outcomes.as_slice(),
            [StepOutcome {
                step: Step::Wait { .. },
                ..
            }]
        ),
        "{:?}",
        p.outcomes
    );
    assert!(stops(&fake).is_empty());

    // After the back-off, with the disk fixed, the switch happens.
    fake.fail_download(None);
    let p = pass(&r, std::slice::from_ref(&b), now + secs(60)).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    assert_eq!(fake.containers()[0].image, V2);
}

#[tokio::test]
async fn a_downgrade_restores_the_snapshot_of_the_older_version() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0").image(V1);
    let volume = spec::volume_name(&me(), &a.key());
    pass(&r, std::slice::from_ref(&a), Instant::now()).await;
    fake.set_volume_data(&volume, b"state of v1");

    let b = a.clone().image(V2);
    pass(&r, std::slice::from_ref(&b), Instant::now()).await;
    // v2 migrates the state.
    fake.set_volume_data(&volume, b"state migrated by v2");

    fake.clear_calls();
    let p = pass(&r, std::slice::from_ref(&a), Instant::now()).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    assert_eq!(fake.volume_data(&volume), b"state of v1");
    let calls = fake.mutations();
    let at = |f: &dyn Fn(&FakeCall) -> bool| {
        calls
            .iter()
            .position(f)
            .unwrap_or_else(|| panic!("{calls:?}"))
    };
    let emptied = at(&|c| matches!(c, FakeCall::RemoveVolume(_)));
    let created = at(&|c| matches!(c, FakeCall::CreateContainer(..)));
    let uploaded = at(&|c| matches!(c, FakeCall::UploadArchive(_, d) if d == spec::STATE_DIR));
    let started = at(&|c| matches!(c, FakeCall::StartContainer(_)));
    assert!(
        emptied < created && created < uploaded && uploaded < started,
        "{calls:?}"
    );
    assert!(fake.containers()[0].status.is_running());
    assert_eq!(fake.containers()[0].image, V1);
    assert_eq!(
        reasons(&r),
        vec![
            snapshot::SNAPSHOT_TAKEN,
            snapshot::SNAPSHOT_TAKEN,
            snapshot::SNAPSHOT_RESTORED
        ]
    );
    // Both snapshots are kept: v2's state can come back with v2.
    let snaps = SnapshotDir::new(r.config_file(&a.key()).parent().unwrap()).list();
    let images: Vec<&str> = snaps.iter().map(|s| s.image.as_str()).collect();
    assert_eq!(images, vec![V2, V1]);
}

#[tokio::test]
async fn a_rollback_between_tags_that_are_not_versions_restores() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0").image("example/openclaw:stable");
    let volume = spec::volume_name(&me(), &a.key());
    pass(&r, std::slice::from_ref(&a), Instant::now()).await;
    fake.set_volume_data(&volume, b"stable state");
    let b = a.clone().image("example/openclaw:next");
    pass(&r, std::slice::from_ref(&b), Instant::now()).await;
    fake.set_volume_data(&volume, b"next state");
    pass(&r, std::slice::from_ref(&a), Instant::now()).await;
    assert_eq!(fake.volume_data(&volume), b"stable state");
    // Forward again to next: its newest snapshot (of next) restores next's state.
    pass(&r, std::slice::from_ref(&b), Instant::now()).await;
    assert_eq!(fake.volume_data(&volume), b"next state");
}

#[tokio::test]
async fn snapshots_are_pruned_to_the_setting_and_go_with_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler_with(&fake, dir.path(), |s| s.snapshots_keep = 2);
    let images = [
        "example/openclaw:2026.1.1",
        "example/openclaw:2026.2.1",
        "example/openclaw:2026.3.1",
        "example/openclaw:2026.4.1",
    ];
    let a = Assignment::test("bot-0");
    for image in images {
        let p = pass(&r, &[a.clone().image(image)], Instant::now()).await;
        assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    }
    let snaps = SnapshotDir::new(r.config_file(&a.key()).parent().unwrap());
    let kept: Vec<String> = snaps.list().into_iter().map(|s| s.image).collect();
    assert_eq!(kept, vec![images[2], images[1]]);

    // Unassigned and not retained: the volume and its snapshots go.
    pass(&r, &[], Instant::now()).await;
    r.wait_idle().await;
    pass(&r, &[], Instant::now()).await;
    r.wait_idle().await;
    assert!(fake.volumes().is_empty());
    assert!(snaps.list().is_empty());
    assert!(!snaps.path().exists());
}

#[tokio::test]
async fn a_failed_restore_is_tried_again_and_never_starts_on_the_empty_volume() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let r = reconciler(&fake, dir.path());
    let a = Assignment::test("bot-0").image(V1);
    let volume = spec::volume_name(&me(), &a.key());
    pass(&r, std::slice::from_ref(&a), Instant::now()).await;
    fake.set_volume_data(&volume, b"state of v1");
    pass(&r, &[a.clone().image(V2)], Instant::now()).await;

    // The downgrade's new image cannot be pulled: the volume was emptied, nothing runs.
    fake.fail_pull(V1, "registry down");
    let now = Instant::now();
    let p = pass(&r, std::slice::from_ref(&a), now).await;
    assert_eq!(p.failures().count(), 1, "{:?}", p.outcomes);
    assert!(fake.containers().is_empty());

    // A restarted agent (no memory of it) restores too: the pending restore is on disk.
    let r = reconciler(&fake, dir.path());

    // Once the image comes, the creation restores the snapshot.
    fake.heal_pull(V1);
    let p = pass(&r, std::slice::from_ref(&a), now + secs(60)).await;
    assert!(p.failures().next().is_none(), "{:?}", p.outcomes);
    assert_eq!(fake.volume_data(&volume), b"state of v1");
    assert!(fake.containers()[0].status.is_running());
    let snaps = SnapshotDir::new(r.config_file(&a.key()).parent().unwrap());
    assert!(snaps.pending_restore().is_none());
}

#[test]
fn a_restart_says_why_with_the_exit_code() {
    let key = ReplicaKey::new("acme", "helpdesk", "bot-0");
    let oom = restart_events(
        &key,
        &RestartReason::NotRunning(ContainerStatus::Exited {
            code: 137,
            oom_killed: true,
        }),
    );
    let reasons: Vec<&str> = oom.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, ["OOMKilled", "ContainerRestarted"]);
    assert!(oom.iter().all(|e| e.warning && e.exit_code == Some(137)));
    assert_eq!(oom[0].instance, "bot");
    let probe = restart_events(&key, &RestartReason::LivenessFailed("timeout".into()));
    assert_eq!(probe[0].reason, "ProbeFailed");
    assert!(probe[0].message.contains("timeout"));
    let exited = restart_events(
        &key,
        &RestartReason::NotRunning(ContainerStatus::Exited {
            code: 1,
            oom_killed: false,
        }),
    );
    assert_eq!(exited.len(), 1);
    assert_eq!(exited[0].to_proto().exit_code, Some(1));
    assert_eq!(exited[0].to_proto().r#type, "Warning");
}

#[test]
fn only_unclaimed_volumes_of_this_agent_go_on_request() {
    let running = Assignment::test("bot-0");
    let kept = Assignment::test("bot-1");
    let orphan = Assignment::test("bot-2");
    let observed: Vec<ObservedVolume> = [&running, &kept, &orphan]
        .iter()
        .map(|a| volume(a, &me()))
        .collect();
    let names: Vec<String> = observed.iter().map(|v| v.name.clone()).collect();
    let retained = vec![RetainedVolume {
        tenant: kept.tenant.clone(),
        project: kept.project.clone(),
        instance: kept.instance.clone(),
        replica: kept.replica.clone(),
        instance_uid: kept.instance_uid.clone(),
    }];
    let asked = vec![
        names[0].clone(),
        names[1].clone(),
        names[2].clone(),
        "someone-elses".to_string(),
    ];
    let (go, stay) =
        volumes_to_delete(&asked, &observed, std::slice::from_ref(&running), &retained);
    assert_eq!(go, vec![(orphan.key(), names[2].clone())]);
    let stay: Vec<&str> = stay.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(stay.len(), 3, "{stay:?}");
    assert!(stay.contains(&names[0].as_str()) && stay.contains(&names[1].as_str()));
    assert!(stay.contains(&"someone-elses"));
    // Nothing asked, nothing goes.
    assert!(volumes_to_delete(&[], &observed, &[], &[]).0.is_empty());
}

/// `logs --previous` tells runs apart by when the agent asked the engine to start each: the
/// previous run lies between the two last starts it asked for, whatever the engine's own start
/// times (taken once the process runs, after its first lines may be stamped).
#[test]
fn the_previous_run_lies_between_the_two_last_starts_asked_for() {
    use std::time::{Duration, SystemTime};
    let book = ReplicaBook::new(BackoffPolicy::default());
    let key = ReplicaKey {
        tenant: "acme".into(),
        project: "p".into(),
        replica: "bot-0".into(),
    };
    let created = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    let first_restart = created + Duration::from_secs(5);
    let second_restart = first_restart + Duration::from_secs(5);
    book.record_start_asked(&key, created);
    book.record_previous_run(&key, "c1", Some("engine time".into()), first_restart);
    let p = book.get(&key).previous_run.unwrap();
    assert_eq!((p.from, p.until), (Some(created), first_restart));
    assert_eq!(p.container_id, "c1");
    book.record_previous_run(&key, "c1", None, second_restart);
    let p = book.get(&key).previous_run.unwrap();
    assert_eq!((p.from, p.until), (Some(first_restart), second_restart));
    // A container this agent did not start: only the engine's start time is known.
    let other = ReplicaKey {
        replica: "bot-1".into(),
        ..key
    };
    book.record_previous_run(&other, "c2", Some("engine time".into()), second_restart);
    let p = book.get(&other).previous_run.unwrap();
    assert_eq!(p.from, None);
    assert_eq!(p.started_at.as_deref(), Some("engine time"));
}

/// The starts the agent asked for are kept in the replica's directory: after a restart of the
/// agent (a new reconciler over the same data directory, an empty book) the previous run is
/// still the one between the two last starts, not every run before the current one.
#[test]
fn the_previous_run_survives_a_restart_of_the_agent() {
    use std::time::{Duration, SystemTime};
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeRuntime::new());
    let key = ReplicaKey {
        tenant: "acme".into(),
        project: "p".into(),
        replica: "bot-0".into(),
    };
    let created = SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_250);
    let restart = created + Duration::from_millis(5_500);
    let first = reconciler(&fake, dir.path());
    first.book().record_start_asked(&key, created);
    first.book().save_runs(dir.path(), &key);
    // Restarted: the new agent knows nothing yet, and restarts the container once more.
    let second = reconciler(&fake, dir.path());
    assert_eq!(second.book().get(&key).last_start, None);
    second.book().load_runs(dir.path(), &key);
    second
        .book()
        .record_previous_run(&key, "c1", Some("engine time".into()), restart);
    second.book().save_runs(dir.path(), &key);
    let p = second.previous_run(&key).unwrap();
    assert_eq!((p.from, p.until), (Some(created), restart));
    // And once more restarted: the previous run is read back whole.
    let third = reconciler(&fake, dir.path());
    let p = third.previous_run(&key).unwrap();
    assert_eq!(p.container_id, "c1");
    assert_eq!((p.from, p.until), (Some(created), restart));
    assert_eq!(p.started_at.as_deref(), Some("engine time"));
    // A file that cannot be read is ignored, not trusted.
    let other = ReplicaKey {
        replica: "bot-1".into(),
        ..key
    };
    let other_dir = dir.path().join("replicas").join("acme.p.bot-1");
    std::fs::create_dir_all(&other_dir).unwrap();
    std::fs::write(other_dir.join(RUNS_FILE), b"{not json").unwrap();
    assert_eq!(third.previous_run(&other), None);
}
