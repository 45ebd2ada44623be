//! Unit tests of the host loops against the fake engine and a scripted control plane.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use super::*;
use crate::control::WatchAnswer;
use crate::events::AgentEvent;
use crate::reconcile::ReconcilerSettings;
use crate::runtime::{ContainerStatus, FakeCall, FakeRuntime, ObservedContainer, Owner, spec};

const HOST: &str = "host-1";
const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// A control plane that answers long polls from a script and records what it is sent.
#[derive(Default)]
struct ScriptedControl {
    answers: Mutex<VecDeque<WatchAnswer>>,
    known: Mutex<Vec<u64>>,
    reports: Mutex<Vec<pb::StatusReport>>,
    down: AtomicBool,
    streams: Mutex<u32>,
    /// Refuse every call as the server refuses a removed host.
    removed: AtomicBool,
}

impl ScriptedControl {
    fn answer(&self, index: u64, assignments: &[Assignment]) {
        self.answers.lock().unwrap().push_back(WatchAnswer {
            index,
            changed: true,
            assignments: assignments.iter().map(wire).collect(),
            retained_volumes: Vec::new(),
            delete_volumes: Vec::new(),
        });
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn reports(&self) -> Vec<pb::StatusReport> {
        self.reports.lock().unwrap().clone()
    }

    fn known(&self) -> Vec<u64> {
        self.known.lock().unwrap().clone()
    }
}

#[async_trait]
impl ControlPlane for ScriptedControl {
    async fn watch_assignments(
        &self,
        known_index: u64,
        wait: Duration,
    ) -> Result<WatchAnswer, CallError> {
        self.known.lock().unwrap().push(known_index);
        if self.removed.load(Ordering::SeqCst) {
            return Err(CallError::Removed("host host-1 has been removed".into()));
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(CallError::Unreachable("connection refused".into()));
        }
        let next = self.answers.lock().unwrap().pop_front();
        match next {
            Some(a) => Ok(a),
            None => {
                // Hold like the server, but wake up now and then to pick up new script lines.
                tokio::time::sleep(wait.min(Duration::from_millis(20))).await;
                Ok(WatchAnswer {
                    index: known_index,
                    changed: false,
                    assignments: Vec::new(),
                    retained_volumes: Vec::new(),
                    delete_volumes: Vec::new(),
                })
            }
        }
    }

    async fn report_status(&self, mut reports: ReportStream) -> Result<(), CallError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(CallError::Unreachable("connection refused".into()));
        }
        *self.streams.lock().unwrap() += 1;
        loop {
            tokio::select! {
                r = reports.recv() => match r {
                    Some(r) => self.reports.lock().unwrap().push(r),
                    None => return Ok(()),
                },
                () = tokio::time::sleep(Duration::from_millis(10)) => {
                    if self.removed.load(Ordering::SeqCst) {
                        return Err(CallError::Removed("host host-1 has been removed".into()));
                    }
                    if self.down.load(Ordering::SeqCst) {
                        return Err(CallError::Unreachable("stream reset".into()));
                    }
                }
            }
        }
    }
}

fn wire(a: &Assignment) -> pb::Assignment {
    pb::Assignment {
        tenant: a.tenant.clone(),
        project: a.project.clone(),
        instance: a.instance.clone(),
        replica: a.replica.clone(),
        ordinal: a.ordinal,
        generation: a.generation,
        image: a.image.clone(),
        env: a.env.clone().into_iter().collect(),
        config_json: a.config_json.clone(),
        config_hash: a.config_hash.clone(),
        resources: Some(pb::Resources {
            cpu_millis: a.resources.cpu_millis,
            memory_bytes: a.resources.memory_bytes,
            pids: a.resources.pids,
        }),
        instance_uid: a.instance_uid.clone(),
        config_revision: a.config_revision,
        content_hash: a.content_hash.clone(),
        termination_grace_seconds: a.termination_grace_seconds,
        ..Default::default()
    }
}

struct Harness {
    engine: Arc<FakeRuntime>,
    control: Arc<ScriptedControl>,
    dir: tempfile::TempDir,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<LoopsEnd>>,
    reconciler: Option<Arc<Reconciler>>,
}

impl Harness {
    fn new() -> Self {
        let (stop, _) = watch::channel(false);
        Harness {
            engine: Arc::new(FakeRuntime::new()),
            control: Arc::new(ScriptedControl::default()),
            dir: tempfile::tempdir().unwrap(),
            stop,
            task: None,
            reconciler: None,
        }
    }

    fn settings(&self) -> SyncSettings {
        SyncSettings {
            host_id: HOST.into(),
            data_dir: self.dir.path().to_path_buf(),
            poll_wait: Duration::from_secs(60),
            report_interval: Duration::from_millis(300),
            resync_interval: Duration::from_millis(50),
            probe: ProbeSettings {
                interval: Duration::from_millis(200),
                timeout: Duration::from_millis(100),
                failure_threshold: 3,
                initial_delay: Duration::from_secs(30),
            },
            runtime_name: "docker".into(),
        }
    }

    fn start(&mut self) {
        self.start_with(self.settings());
    }

    fn start_with(&mut self, settings: SyncSettings) {
        let engine: Arc<dyn ContainerRuntime> = self.engine.clone();
        let reconciler = Arc::new(
            Reconciler::new(engine, ReconcilerSettings::new(HOST, self.dir.path()))
                .with_port_check(|_| true),
        );
        self.reconciler = Some(reconciler.clone());
        let loops = HostLoops::new(settings, reconciler, self.control.clone());
        let stop = self.stop.subscribe();
        self.task = Some(tokio::spawn(loops.run(stop)));
    }

    async fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT_LIMIT, task)
                .await
                .expect("the loops stop promptly")
                .expect("no loop panicked");
        }
    }

    fn reconciler(&self) -> &Reconciler {
        self.reconciler.as_deref().expect("started")
    }

    /// Every event the control plane received, in order.
    fn events_received(&self) -> Vec<pb::AgentEvent> {
        self.control
            .reports()
            .into_iter()
            .flat_map(|r| r.events)
            .filter(|e| {
                ![
                    crate::events::CONTAINER_STARTED,
                    crate::events::CONTAINER_RESTARTED,
                    crate::events::OOM_KILLED,
                    crate::events::PROBE_FAILED,
                ]
                .contains(&e.reason.as_str())
            })
            .collect()
    }

    fn running(&self) -> Vec<ObservedContainer> {
        self.engine
            .containers()
            .into_iter()
            .filter(|c| c.status.is_running())
            .collect()
    }

    fn save(&self, index: u64, assignments: Vec<Assignment>) {
        StateStore::new(self.dir.path())
            .save(&SavedState::new(HOST, index, assignments))
            .unwrap();
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_LIMIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn replicas(n: usize) -> Vec<Assignment> {
    (0..n)
        .map(|i| Assignment::test(&format!("bot-{i}")))
        .collect()
}

#[tokio::test]
async fn new_assignments_are_saved_then_run_and_reported() {
    let mut h = Harness::new();
    h.control.answer(7, &replicas(2));
    h.start();
    wait_until("two containers run", || h.running().len() == 2).await;

    let saved = StateStore::new(h.dir.path())
        .load()
        .unwrap()
        .expect("saved");
    assert_eq!(saved.index, 7);
    assert_eq!(saved.host_id, HOST);
    assert_eq!(saved.assignments, replicas(2));

    // The next long poll carries the index it was given.
    wait_until("the agent polls with index 7", || {
        h.control.known().contains(&7)
    })
    .await;
    assert_eq!(h.control.known()[0], 0, "a fresh agent knows nothing");

    // A report names both replicas with their containers and ports, at index 7.
    wait_until("a report with both containers", || {
        h.control.reports().iter().any(|r| {
            r.applied_index == 7
                && r.replicas.len() == 2
                && r.replicas
                    .iter()
                    .all(|s| !s.container_id.is_empty() && s.host_port >= 19100)
        })
    })
    .await;
    let ports: BTreeSet<Option<u16>> = h.running().iter().map(|c| c.host_port).collect();
    assert_eq!(
        ports.len(),
        2,
        "replicas created together get their own ports"
    );
    let last = h.control.reports().pop().unwrap();
    assert!(last.runtime.unwrap().ready);
    assert_eq!(last.agent_version, AGENT_VERSION);
    assert!(last.host.unwrap().memory_total_bytes > 0);

    // Scale down: one replica goes, the other is left alone.
    let keep = h
        .running()
        .into_iter()
        .find(|c| c.name.contains("bot-0"))
        .unwrap();
    h.control.answer(8, &replicas(1));
    wait_until("one container runs", || h.running().len() == 1).await;
    assert_eq!(h.running()[0].id, keep.id);
    h.stop().await;
    assert_eq!(h.running().len(), 1, "containers keep running after a stop");
}

#[tokio::test]
async fn saved_assignments_run_while_the_server_is_away() {
    let mut h = Harness::new();
    h.save(3, replicas(2));
    h.control.set_down(true);
    h.start();
    wait_until("the saved replicas run", || h.running().len() == 2).await;
    // A replica that exits is restarted from the saved assignments.
    let victim = h.running()[0].id.clone();
    h.engine.set_status(
        &victim,
        ContainerStatus::Exited {
            code: 1,
            oom_killed: false,
        },
    );
    wait_until("the exited replica is started again", || {
        h.engine
            .calls()
            .contains(&FakeCall::StartContainer(victim.clone()))
    })
    .await;
    // It keeps asking the server with the saved index, with growing delays.
    wait_until("a few retries", || h.control.known().len() >= 3).await;
    assert!(h.control.known().iter().all(|k| *k == 3));
    assert!(h.control.reports().is_empty());

    // The server comes back: a report arrives promptly with the saved index.
    h.control.set_down(false);
    wait_until("a report after the server is back", || {
        h.control
            .reports()
            .iter()
            .any(|r| r.applied_index == 3 && r.replicas.len() == 2)
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn nothing_is_touched_before_assignments_are_known() {
    let mut h = Harness::new();
    // A managed container of this host, from an earlier life.
    let a = Assignment::test("bot-0");
    h.engine.insert_container(ObservedContainer {
        id: "old".into(),
        name: spec::container_name(&Owner::from(HOST), &a.key()),
        image: a.image.clone(),
        labels: spec::container_labels(&Owner::from(HOST), &a),
        status: ContainerStatus::Running,
        started_at: Some("t0".into()),
        host_port: Some(19100),
        engine_restarts: 0,
        env: None,
    });
    h.control.set_down(true);
    h.start();
    wait_until("several polls", || h.control.known().len() >= 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.engine.mutations(), [], "no assignments, no changes");
    assert!(h.engine.calls().contains(&FakeCall::Ping));

    // Once the server answers, the container is adopted as it is.
    h.control.set_down(false);
    h.control.answer(1, std::slice::from_ref(&a));
    wait_until("the assignment is saved", || {
        StateStore::new(h.dir.path())
            .load()
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.engine.mutations(), [], "the running container is adopted");
    h.stop().await;
}

#[tokio::test]
async fn an_engine_outage_is_reported_and_recovered() {
    let mut h = Harness::new();
    h.engine.set_unavailable(true);
    h.control.answer(2, &replicas(1));
    h.start();
    wait_until("a report saying the engine is down", || {
        h.control.reports().iter().any(|r| {
            r.runtime
                .as_ref()
                .is_some_and(|c| !c.ready && c.message.contains("fake engine is down"))
        })
    })
    .await;
    h.engine.set_unavailable(false);
    wait_until("the replica runs", || h.running().len() == 1).await;
    wait_until("a report saying the engine is back", || {
        h.control
            .reports()
            .last()
            .and_then(|r| r.runtime.clone())
            .is_some_and(|c| c.ready && c.runtime == "fake")
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn an_invalid_assignment_set_is_not_acted_on() {
    let mut h = Harness::new();
    h.save(4, replicas(1));
    let mut bad = replicas(2);
    bad[1].tenant = "Not A Label".into();
    h.control.answer(5, &bad);
    h.start();
    wait_until("the agent moves past index 5", || {
        h.control.known().contains(&5)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.running().len(), 1, "the saved set still runs");
    let saved = StateStore::new(h.dir.path()).load().unwrap().unwrap();
    assert_eq!(saved.index, 4, "an invalid set is not saved");
    h.stop().await;
}

#[tokio::test]
async fn a_drifted_replica_is_repaired_and_the_event_reported() {
    let mut h = Harness::new();
    let a = Assignment::test("bot-0")
        .env("OPENCLAW_GATEWAY_TOKEN", "t0ken")
        .config(r#"{"gateway":{"bind":"lan"}}"#, 3);
    h.control.answer(1, std::slice::from_ref(&a));
    h.start();
    wait_until("a report of the measured content", || {
        h.control.reports().iter().any(|r| {
            r.replicas.iter().any(|s| {
                s.observed_content_hash == a.content_hash
                    && s.config_revision == 3
                    && !s.container_id.is_empty()
            })
        })
    })
    .await;
    let old = h.running()[0].id.clone();

    let config = h.reconciler().config_file(&a.key());
    std::fs::write(&config, r#"{"gateway":{"bind":"loopback"}}"#).unwrap();
    wait_until("the event reaches the control plane", || {
        !h.events_received().is_empty()
    })
    .await;
    let events = h.events_received();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].reason, "ConfigDriftRepaired");
    assert_eq!(events[0].replica, "bot-0");
    assert!(events[0].message.contains("revision 3"), "{events:?}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), a.config_json);
    let now_running = h.running();
    assert_eq!(now_running.len(), 1);
    assert_ne!(now_running[0].id, old);
    assert!(
        h.reconciler()
            .events()
            .pending()
            .into_iter()
            .filter(|e| !crate::events::notable(vec![e.clone()]).is_empty())
            .count()
            == 0
    );

    // The report names the new container, measured in sync; the event is not sent again.
    let new_id = now_running[0].id.clone();
    wait_until("a report of the new container in sync", || {
        h.control.reports().iter().any(|r| {
            r.replicas
                .iter()
                .any(|s| s.container_id == new_id && s.observed_content_hash == a.content_hash)
        })
    })
    .await;
    assert_eq!(h.events_received().len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn events_wait_for_a_report_that_is_sent() {
    let mut h = Harness::new();
    h.save(1, replicas(1));
    h.control.set_down(true);
    h.start();
    wait_until("the replica runs", || h.running().len() == 1).await;
    let a = Assignment::test("bot-0");
    h.reconciler().events().push(AgentEvent::about(
        &a,
        "Test",
        "while the server is away".into(),
    ));
    // Reports fail to go out: the event stays queued.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(h.control.reports().is_empty());
    assert_eq!(
        h.reconciler()
            .events()
            .pending()
            .into_iter()
            .filter(|e| !crate::events::notable(vec![e.clone()]).is_empty())
            .count(),
        1
    );

    h.control.set_down(false);
    wait_until("the event reaches the control plane", || {
        !h.events_received().is_empty()
    })
    .await;
    assert!(
        h.reconciler()
            .events()
            .pending()
            .into_iter()
            .filter(|e| !crate::events::notable(vec![e.clone()]).is_empty())
            .count()
            == 0
    );
    // Later reports do not carry it again.
    let sent = h.control.reports().len();
    wait_until("more reports", || h.control.reports().len() >= sent + 2).await;
    let events = h.events_received();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].message, "while the server is away");
    h.stop().await;
}

#[tokio::test]
async fn a_slow_stats_sample_holds_back_no_report() {
    let mut h = Harness::new();
    // As with a real engine, a stats sample takes its time; here far longer than the report
    // interval (300 ms).
    h.engine.set_stats_delay(Duration::from_secs(3));
    h.control.answer(1, &replicas(1));
    h.start();
    wait_until("the replica runs", || h.running().len() == 1).await;
    wait_until("a stats sample is under way", || {
        h.engine
            .calls()
            .iter()
            .any(|c| matches!(c, FakeCall::ContainerStats(_)))
    })
    .await;
    let before = h.control.reports().len();
    let sampling = Instant::now();
    let a = Assignment::test("bot-0");
    h.reconciler().events().push(AgentEvent::about(
        &a,
        "Test",
        "while stats are sampled".into(),
    ));
    wait_until("a report carrying the event", || {
        h.events_received()
            .iter()
            .any(|e| e.message == "while stats are sampled")
    })
    .await;
    let changed = sampling.elapsed();
    assert!(
        changed < Duration::from_millis(500),
        "a change waited {changed:?} for a stats sample"
    );
    // The periodic reports (the host's heartbeat) keep their pace meanwhile.
    wait_until("three more reports", || {
        h.control.reports().len() >= before + 4
    })
    .await;
    let periodic = sampling.elapsed();
    assert!(
        periodic < Duration::from_secs(2),
        "three report intervals took {periodic:?} during a stats sample"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_new_event_alone_is_reported_at_once() {
    let mut h = Harness::new();
    h.control.answer(1, &[]);
    let mut settings = h.settings();
    // No periodic report within the test: only a change can send one.
    settings.report_interval = Duration::from_secs(3600);
    h.start_with(settings);
    wait_until("a report at index 1 with the engine ready", || {
        h.control
            .reports()
            .iter()
            .any(|r| r.applied_index == 1 && r.runtime.as_ref().is_some_and(|c| c.ready))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = h.control.reports().len();
    let a = Assignment::test("bot-0");
    h.reconciler()
        .events()
        .push(AgentEvent::about(&a, "Test", "nothing else changed".into()));
    wait_until("a report carrying the event", || {
        h.events_received()
            .iter()
            .any(|e| e.message == "nothing else changed")
    })
    .await;
    assert_eq!(h.control.reports().len(), before + 1);
    h.stop().await;
}

#[test]
fn a_new_event_changes_the_signature() {
    let report = pb::StatusReport::default();
    assert_eq!(signature(&report, 3), signature(&report, 3));
    assert_ne!(signature(&report, 3), signature(&report, 4));
    let mut drifted = report.clone();
    drifted.replicas.push(pb::ReplicaStatus {
        observed_content_hash: "ab".repeat(32),
        ..Default::default()
    });
    let mut in_sync = drifted.clone();
    in_sync.replicas[0].observed_content_hash = "cd".repeat(32);
    assert_ne!(signature(&drifted, 0), signature(&in_sync, 0));
}

#[test]
fn startup_probes_are_frequent_until_ready() {
    let settings = ProbeSettings {
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(1),
        failure_threshold: 3,
        initial_delay: Duration::from_secs(15),
    };
    let t0 = Instant::now();
    let mut s = RunSchedule::new(("c".into(), None), t0);
    assert_eq!(s.next_due(&settings), t0, "a new run is probed at once");
    s.last = Some(t0 + Duration::from_secs(1));
    assert_eq!(
        s.next_due(&settings),
        t0 + Duration::from_secs(1) + STARTUP_PROBE_INTERVAL
    );
    s.ready_seen = true;
    assert_eq!(s.next_due(&settings), t0 + Duration::from_secs(11));
    // Past the initial delay, a replica not ready yet is probed every tenth of its age...
    s.ready_seen = false;
    s.last = Some(t0 + Duration::from_secs(16));
    assert_eq!(
        s.next_due(&settings),
        t0 + Duration::from_millis(17_600),
        "16 s into its run: every 1.6 s"
    );
    // ... and never less often than the probe interval.
    s.last = Some(t0 + Duration::from_secs(300));
    assert_eq!(s.next_due(&settings), t0 + Duration::from_secs(310));
    // Short initial delays: right past it, still about every STARTUP_PROBE_INTERVAL.
    let fast = ProbeSettings {
        interval: Duration::from_secs(1),
        initial_delay: Duration::from_secs(1),
        ..settings
    };
    s.last = Some(t0 + Duration::from_millis(1_100));
    assert_eq!(s.next_due(&fast), t0 + Duration::from_millis(1_210));
    s.last = Some(t0 + Duration::from_millis(500));
    assert_eq!(s.next_due(&fast), t0 + Duration::from_millis(600));
}

#[test]
fn liveness_keeps_its_interval_while_readiness_is_probed_often() {
    let settings = ProbeSettings {
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(1),
        failure_threshold: 3,
        initial_delay: Duration::from_secs(15),
    };
    let t0 = Instant::now();
    let mut s = RunSchedule::new(("c".into(), None), t0);
    // During the initial delay every probe checks liveness too (failures do not count then).
    s.last_live = Some(t0 + Duration::from_secs(14));
    assert!(s.liveness_due(&settings, t0 + Duration::from_millis(14_100)));
    // Past it, once a probe interval.
    s.last_live = Some(t0 + Duration::from_secs(16));
    assert!(!s.liveness_due(&settings, t0 + Duration::from_secs(18)));
    assert!(s.liveness_due(&settings, t0 + Duration::from_secs(26)));
    s.last_live = None;
    assert!(s.liveness_due(&settings, t0 + Duration::from_secs(20)));
}

#[test]
fn poll_waits_are_jittered_below_the_setting() {
    let wait = Duration::from_secs(300);
    for _ in 0..100 {
        let w = jittered_wait(wait);
        assert!(w <= wait && w >= Duration::from_secs(270), "{w:?}");
    }
    assert_eq!(
        jittered_wait(Duration::from_secs(1)),
        Duration::from_secs(1)
    );
}

#[test]
fn reconnect_delays_grow_and_stay_capped() {
    let cap = Duration::from_secs(2);
    let delays: Vec<Duration> = reconnect_backoff(cap).take(12).collect();
    assert!(delays[0] >= RECONNECT_MIN_DELAY);
    assert!(delays[0] <= RECONNECT_MIN_DELAY * 2);
    assert!(delays.iter().all(|d| *d <= cap), "{delays:?}");
    assert!(delays[11] >= cap / 2, "{delays:?}");
}

#[tokio::test]
async fn a_removed_host_stops_its_replicas_keeps_volumes_and_stays_down() {
    let mut h = Harness::new();
    h.control.answer(7, &replicas(2));
    h.start();
    wait_until("two containers run", || h.running().len() == 2).await;
    h.control.removed.store(true, Ordering::SeqCst);
    let task = h.task.take().expect("started");
    let end = tokio::time::timeout(WAIT_LIMIT, task)
        .await
        .expect("the loops end")
        .expect("no panic");
    assert!(
        matches!(&end, LoopsEnd::Removed(r) if r.contains("removed")),
        "{end:?}"
    );
    assert!(h.running().is_empty(), "every replica stopped");
    assert_eq!(h.engine.containers().len(), 2, "stopped, not removed");
    assert_eq!(h.engine.volumes().len(), 2, "the state volumes are kept");
    let record = crate::state::load_removed(h.dir.path()).expect("recorded");
    assert_eq!(record.host_id, HOST);
    // The stops came after every loop had ended: nothing was started after them.
    let calls = h.engine.calls();
    let last_stop = calls
        .iter()
        .rposition(|c| matches!(c, FakeCall::StopContainer(..)))
        .expect("stops");
    assert!(
        !calls[last_stop..].iter().any(|c| matches!(
            c,
            FakeCall::StartContainer(_) | FakeCall::CreateAndStart(..)
        )),
        "{calls:?}"
    );
}

#[tokio::test]
async fn saved_replicas_are_not_started_when_the_control_plane_says_removed_at_start() {
    let mut h = Harness::new();
    h.save(5, replicas(1));
    h.control.removed.store(true, Ordering::SeqCst);
    h.start();
    let task = h.task.take().expect("started");
    let end = tokio::time::timeout(WAIT_LIMIT, task)
        .await
        .expect("the loops end")
        .expect("no panic");
    assert!(matches!(end, LoopsEnd::Removed(_)), "{end:?}");
    assert!(
        !h.engine.calls().iter().any(|c| matches!(
            c,
            FakeCall::CreateAndStart(..) | FakeCall::StartContainer(_)
        )),
        "{:?}",
        h.engine.calls()
    );
}

#[tokio::test]
async fn retained_volumes_from_the_server_are_kept_and_saved() {
    let mut h = Harness::new();
    let owner = Owner::from(HOST);
    let kept = Assignment::test("bot-7");
    let gone = Assignment::test("bot-8");
    for a in [&kept, &gone] {
        let v = spec::volume_spec(&owner, a);
        h.engine.insert_volume(crate::runtime::ObservedVolume {
            name: v.name,
            labels: v.labels,
        });
    }
    h.control.answers.lock().unwrap().push_back(WatchAnswer {
        index: 5,
        changed: true,
        assignments: replicas(1).iter().map(wire).collect(),
        retained_volumes: vec![pb::RetainedVolume {
            tenant: kept.tenant.clone(),
            project: kept.project.clone(),
            instance: kept.instance.clone(),
            replica: kept.replica.clone(),
            instance_uid: kept.instance_uid.clone(),
        }],
        delete_volumes: Vec::new(),
    });
    h.start();
    let gone_name = spec::volume_name(&owner, &gone.key());
    wait_until("the volume not retained is removed", || {
        !h.engine.volumes().contains(&gone_name)
    })
    .await;
    assert!(
        h.engine
            .volumes()
            .contains(&spec::volume_name(&owner, &kept.key()))
    );
    let saved = StateStore::new(h.dir.path())
        .load()
        .unwrap()
        .expect("saved");
    let retained = saved.retained.expect("the list is saved");
    assert_eq!(retained.len(), 1);
    assert_eq!(retained[0].key(), kept.key());
    h.stop().await;
}

/// A Gateway stand-in on 127.0.0.1: answers every connection healthy and ready (counting
/// them), or, when `silent`, accepts and never answers.
async fn gateway_stub(silent: bool) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            if silent {
                held.push(socket);
                continue;
            }
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let body = br#"{"ok":true,"ready":true}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(body).await;
            });
        }
    });
    (addr, served)
}

#[tokio::test]
async fn a_slow_probe_delays_no_other_replica() {
    let timeout = Duration::from_secs(3);
    let settings = ProbeSettings {
        interval: Duration::from_millis(200),
        timeout,
        failure_threshold: 3,
        initial_delay: Duration::ZERO,
    };
    let (slow_addr, _) = gateway_stub(true).await;
    let (fast_addr, fast_served) = gateway_stub(false).await;
    let target = |name: &str, addr| ProbeTarget {
        key: ReplicaKey::new("t", "p", name),
        container_id: format!("c-{name}"),
        started_at: Some("s1".into()),
        addr,
    };
    let (_targets_tx, targets_rx) = watch::channel(Arc::new(vec![
        target("slow", slow_addr),
        target("fast", fast_addr),
    ]));
    let probes: watch::Sender<Probes> = watch::Sender::new(Arc::default());
    let failed = Notify::new();
    let (_stop_tx, mut stop) = watch::channel(false);
    let started = Instant::now();
    let fast = ReplicaKey::new("t", "p", "fast");
    let slow = ReplicaKey::new("t", "p", "slow");
    let mut seen = probes.subscribe();
    let check = async {
        // The fast replica is published Ready long before the slow probe times out...
        seen.wait_for(|p| p.get(&fast).is_some_and(|s| s.ready))
            .await
            .unwrap();
        let ready_after = started.elapsed();
        assert!(
            ready_after < Duration::from_secs(1),
            "the fast replica was published Ready after {ready_after:?}, held up by the slow probe"
        );
        // ... and keeps being probed on its own schedule meanwhile.
        tokio::time::sleep_until(started + Duration::from_millis(1_500)).await;
        let served = fast_served.load(Ordering::SeqCst);
        assert!(
            served >= 6,
            "the fast replica's Gateway was probed {served} times in 1.5 s (every 200 ms expected)"
        );
        let now = probes.borrow().clone();
        assert!(!now[&slow].ready, "the silent Gateway is not ready");
        assert!(
            now[&slow].readiness_message.is_none(),
            "its probe is still under way (no verdict before the timeout)"
        );
        // Once the slow probe times out, its failure is published too.
        seen.wait_for(|p| {
            p.get(&slow)
                .and_then(|s| s.readiness_message.as_deref())
                .is_some_and(|m| m.contains("timed out"))
        })
        .await
        .unwrap();
        assert!(started.elapsed() >= timeout);
    };
    tokio::select! {
        () = run_probes(settings, targets_rx, &probes, &failed, &mut stop) => panic!("the probe loop stopped"),
        r = tokio::time::timeout(WAIT_LIMIT, check) => r.expect("the probes' verdicts in time"),
    }
}
