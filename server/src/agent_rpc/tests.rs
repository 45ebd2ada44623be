//! The agent port over real TLS on loopback: enrollment, identity, revocation, long poll and
//! status reports, against a real SQLite store.

use std::sync::Arc;
use std::time::Duration;

use clusterclaw_proto::agent as pb;
use clusterclaw_proto::agent::agent_service_client::AgentServiceClient;
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::*;
use crate::model::{HostPhase, InstancePhase, ObjectKey, ReplicaState};
use crate::pki::PkiFiles;
use crate::store::sqlite::SqliteStore;
use crate::store::{TokenKind, TokenRecord};

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    url: String,
    ca_pem: String,
    stop: tokio::sync::watch::Sender<bool>,
}

async fn start() -> Harness {
    crate::crypto::install();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
    let pki = dir.path().join("pki");
    crate::pki::init_dir(&pki, &["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let files = PkiFiles::in_dir(&pki);
    let ca = Arc::new(Ca::load(&pki).unwrap());
    let rpc = AgentRpc {
        limiter: None,
        store: store.clone(),
        ca: ca.clone(),
        book: Arc::default(),
        reports: Arc::default(),
        metrics: Arc::default(),
        tasks: Arc::default(),
        enrollments: Arc::default(),
        verified: Arc::default(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let tls = AgentTls {
        cert_pem: std::fs::read_to_string(&files.server_cert).unwrap(),
        key_pem: std::fs::read_to_string(&files.server_key).unwrap(),
        ca_pem: ca.cert_pem().to_string(),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut s1 = stopped.clone();
    tokio::spawn(serve(listener, tls, rpc.clone(), async move {
        let _ = s1.changed().await;
    }));
    tokio::spawn(run_background(rpc, stopped.clone()));
    tokio::spawn(crate::controllers::scheduler::run(
        store.clone(),
        stopped,
        Duration::from_secs(30),
    ));
    Harness {
        _dir: dir,
        store,
        url,
        ca_pem: ca.cert_pem().to_string(),
        stop,
    }
}

fn join_token(store: &dyn Store, uses: Option<i64>, expires_at: Option<i64>) -> String {
    let secret = crate::auth::generate_join_token();
    store
        .insert_token(&TokenRecord {
            id: crate::auth::generate_token_id(),
            name: "test".into(),
            kind: TokenKind::Join,
            role: String::new(),
            tenant: None,
            project: None,
            created_at: 0,
            expires_at,
            uses_remaining: uses,
            revoked: false,
            hash: crate::auth::hash_token(secret.expose()),
        })
        .unwrap();
    secret.expose().to_string()
}

fn client(url: &str, ca_pem: &str, identity: Option<(&str, &str)>) -> AgentServiceClient<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    AgentServiceClient::new(
        Endpoint::from_shared(url.to_string())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_lazy(),
    )
}

fn csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    (
        params.serialize_request(&key).unwrap().pem().unwrap(),
        key.serialize_pem(),
    )
}

async fn enroll(
    h: &Harness,
    token: &str,
    hostname: &str,
) -> Result<(pb::EnrollResponse, String), Status> {
    let (csr, key) = csr();
    let resp = client(&h.url, &h.ca_pem, None)
        .enroll(pb::EnrollRequest {
            join_token: token.into(),
            csr_pem: csr,
            hostname: hostname.into(),
            labels: [("region".to_string(), "eu".to_string())].into(),
            capacity: Some(pb::Capacity {
                cpu_millis: 4000,
                memory_bytes: 8 << 30,
                disk_bytes: 0,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok((resp, key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_host_is_stored_as_the_scheduler_would_write_it() {
    let h = start().await;
    let token = join_token(h.store.as_ref(), Some(1), None);
    let (resp, _) = enroll(&h, &token, "node-1").await.unwrap();
    let report = crate::controllers::scheduler::reconcile_once(h.store.as_ref()).unwrap();
    assert_eq!(
        (report.hosts, report.hosts_written),
        (1, 0),
        "a host that has nothing placed is not written again by the scheduler"
    );
    let Ok(Resource::Host(host)) = h
        .store
        .get(&ObjectKey::cluster(Kind::Host, &resp.host_id))
        .unwrap()
        .expect("the host is stored")
        .resource()
    else {
        panic!("the host reads")
    };
    let status = host.status.expect("a status from enrollment on");
    assert_eq!(
        status.allocated,
        crate::model::HostResources::nothing_placed()
    );
    assert_eq!(
        status.phase,
        HostPhase::default(),
        "not Ready before it reports"
    );
    let _ = h.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_watch_report_revoke() {
    let h = start().await;
    let token = join_token(h.store.as_ref(), Some(2), None);
    let (resp, key) = enroll(&h, &token, "Node-1.example.com").await.unwrap();
    assert_eq!(resp.host_id, "node-1-example-com");
    let (resp2, _) = enroll(&h, &token, "Node-1.example.com").await.unwrap();
    assert_ne!(
        resp2.host_id, resp.host_id,
        "a second host with the same hostname gets its own id"
    );
    let used_up = enroll(&h, &token, "node-3").await.unwrap_err();
    assert_eq!(used_up.code(), tonic::Code::Unauthenticated);
    assert!(
        used_up.message().contains("used up"),
        "{}",
        used_up.message()
    );
    let wrong = enroll(&h, "ccj_nope", "node-3").await.unwrap_err();
    assert!(
        wrong.message().contains("not recognised"),
        "{}",
        wrong.message()
    );

    let mut host = client(&h.url, &h.ca_pem, Some((&resp.certificate_pem, &key)));
    // No certificate: refused.
    let anon = client(&h.url, &h.ca_pem, None)
        .watch_assignments(pb::WatchAssignmentsRequest {
            known_index: 0,
            wait_seconds: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(anon.code(), tonic::Code::Unauthenticated);

    let first = host
        .watch_assignments(pb::WatchAssignmentsRequest {
            known_index: 0,
            wait_seconds: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.changed && first.assignments.is_empty());

    // The host is not Ready until it reports; report, then place an instance on it.
    let report = pb::StatusReport {
        host: Some(pb::HostFigures {
            capacity: Some(pb::Capacity {
                cpu_millis: 4000,
                memory_bytes: 8 << 30,
                disk_bytes: 0,
            }),
            ..Default::default()
        }),
        runtime: Some(pb::RuntimeCondition {
            ready: true,
            runtime: "docker".into(),
            version: "20.10".into(),
            message: String::new(),
        }),
        ..Default::default()
    };
    host.report_status(tokio_stream::iter(vec![report]))
        .await
        .unwrap();
    let host_key = ObjectKey::cluster(Kind::Host, &resp.host_id);
    let Resource::Host(stored) = h.store.get(&host_key).unwrap().unwrap().resource().unwrap()
    else {
        panic!()
    };
    assert_eq!(stored.status.unwrap().phase, HostPhase::Ready);
    assert_eq!(
        stored.metadata.labels.get("region").map(String::as_str),
        Some("eu")
    );
    // Make the second host unschedulable so both replicas land on the first.
    h.store
        .update(&ObjectKey::cluster(Kind::Host, &resp2.host_id), &mut |r| {
            if let Resource::Host(h) = r {
                h.spec.unschedulable = true;
            }
            true
        })
        .unwrap();

    let watch = {
        let mut host = host.clone();
        let known = first.index;
        tokio::spawn(async move {
            host.watch_assignments(pb::WatchAssignmentsRequest {
                known_index: known,
                wait_seconds: 30,
            })
            .await
        })
    };
    let objects: Vec<(Resource, crate::store::WriteMode)> = [
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Tenant", "metadata": {"name": "t"}}),
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "Project", "metadata": {"name": "p", "tenant": "t"}}),
        json!({"apiVersion": "clusterclaw.io/v1", "kind": "OpenClawInstance",
               "metadata": {"name": "bot", "tenant": "t", "project": "p"},
               "spec": {"version": "2026.7.1", "replicas": 2, "resources": {"memory": "1Gi"}, "env": {"A": "b"}}}),
    ]
    .into_iter()
    .map(|v| (Resource::from_value(v).unwrap(), crate::store::WriteMode::Apply))
    .collect();
    let started = std::time::Instant::now();
    h.store.write(&objects, false).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_inner();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the long poll answered on the change, not on its timeout"
    );
    assert!(got.changed);
    assert_eq!(got.assignments.len(), 2);
    let a = &got.assignments[0];
    assert_eq!(
        (a.replica.as_str(), a.ordinal, a.image.as_str()),
        ("bot-0", 0, "ghcr.io/openclaw/openclaw:2026.7.1")
    );
    assert_eq!(a.env.get("A").map(String::as_str), Some("b"));
    assert!(a.config_json.contains("18789"));

    // Reports turn into instance status.
    let replicas = got
        .assignments
        .iter()
        .map(|a| pb::ReplicaStatus {
            tenant: a.tenant.clone(),
            project: a.project.clone(),
            instance: a.instance.clone(),
            replica: a.replica.clone(),
            ordinal: a.ordinal,
            generation: a.generation,
            state: pb::ReplicaState::Ready as i32,
            container_id: format!("c{}", a.ordinal),
            host_port: 19100 + 20 * a.ordinal,
            config_hash: a.config_hash.clone(),
            epoch: a.epoch,
            ..Default::default()
        })
        .collect();
    host.report_status(tokio_stream::iter(vec![pb::StatusReport {
        replicas,
        ..Default::default()
    }]))
    .await
    .unwrap();
    let Resource::OpenClawInstance(inst) = h
        .store
        .get(&ObjectKey::instance("t", "p", "bot"))
        .unwrap()
        .unwrap()
        .resource()
        .unwrap()
    else {
        panic!()
    };
    let status = inst.status.unwrap();
    assert_eq!(
        (status.phase, status.ready_replicas),
        (InstancePhase::Running, 2)
    );
    assert_eq!(status.replica_status[1].state, ReplicaState::Ready);
    assert_eq!(status.replica_status[1].host_port, Some(19120));

    // A quiet long poll holds and answers "no change".
    let quiet = host
        .watch_assignments(pb::WatchAssignmentsRequest {
            known_index: got.index,
            wait_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!quiet.changed);

    // Deleting the host revokes its certificate.
    h.store.delete(&host_key, None).unwrap();
    let revoked = host
        .watch_assignments(pb::WatchAssignmentsRequest {
            known_index: 0,
            wait_seconds: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), tonic::Code::Unauthenticated);
    assert!(
        revoked.message().contains("revoked"),
        "{}",
        revoked.message()
    );
    let _ = h.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_fails_the_handshake() {
    let h = start().await;
    let other = tempfile::tempdir().unwrap();
    crate::pki::init_dir(other.path(), &["localhost".to_string()]).unwrap();
    let stranger = Ca::load(other.path()).unwrap();
    let (csr, key) = csr();
    let cert = stranger
        .sign_host_csr(
            &csr,
            "intruder",
            Some("urn:clusterclaw:host:x"),
            Duration::from_secs(3600),
        )
        .unwrap();
    let err = client(&h.url, &h.ca_pem, Some((&cert, &key)))
        .watch_assignments(pb::WatchAssignmentsRequest {
            known_index: 0,
            wait_seconds: 1,
        })
        .await
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    let expired = join_token(h.store.as_ref(), None, Some(1));
    let e = enroll(&h, &expired, "late").await.unwrap_err();
    assert!(e.message().contains("expired"), "{}", e.message());
    let _ = h.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_enrollment_does_not_use_the_token() {
    let h = start().await;
    let token = join_token(h.store.as_ref(), Some(1), None);
    let uses_left = || {
        h.store
            .token_by_hash(&crate::auth::hash_token(&token))
            .unwrap()
            .unwrap()
            .uses_remaining
    };
    let huge = "h".repeat(4 << 20);
    let e = enroll(&h, &token, &huge[..1 << 20]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("hostname"), "{}", e.message());
    let e = enroll(&h, &token, "node\n1").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("spec.hostname"), "{}", e.message());
    let (csr, _) = csr();
    let e = client(&h.url, &h.ca_pem, None)
        .enroll(pb::EnrollRequest {
            join_token: token.clone(),
            csr_pem: csr,
            hostname: "node-1".into(),
            os: "x".repeat(1000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert_eq!(
        uses_left(),
        Some(1),
        "refused requests leave the token as it was"
    );
    assert!(
        h.store
            .list(&crate::store::ListFilter::all(Kind::Host))
            .unwrap()
            .is_empty()
    );
    let (ok, _) = enroll(&h, &token, "node-1").await.unwrap();
    assert_eq!(ok.host_id, "node-1");
    assert_eq!(uses_left(), Some(0));
    let _ = h.stop.send(true);
}

#[test]
fn agent_event_reasons_become_audit_actions() {
    assert_eq!(super::kebab("ConfigDriftRepaired"), "config-drift-repaired");
    assert_eq!(super::kebab("x!Y"), "x-y");
    assert_eq!(super::kebab("9lives"), "event9lives");
    assert_eq!(super::kebab(""), "event");
    let entry = crate::audit::AuditEntry::now(
        crate::audit::AuditPrincipal::new("host:h", "h"),
        &format!("agent.{}", super::kebab("ConfigDriftRepaired")),
        crate::audit::AuditResult::ok(200),
    );
    assert!(
        entry.normalize().is_ok(),
        "the action is a valid audit action"
    );
}

#[test]
fn reports_that_queued_up_are_applied_as_the_newest_with_all_their_events() {
    let host = HostIdentity {
        name: "h1".into(),
        uid: "u1".into(),
    };
    let assigned = vec![pb::Assignment {
        tenant: "t".into(),
        project: "p".into(),
        instance: "i".into(),
        replica: "i-0".into(),
        ..Default::default()
    }];
    let replica = |state: pb::ReplicaState| pb::ReplicaStatus {
        tenant: "t".into(),
        project: "p".into(),
        instance: "i".into(),
        replica: "i-0".into(),
        state: state as i32,
        ..Default::default()
    };
    let event = |reason: &str| pb::AgentEvent {
        tenant: "t".into(),
        project: "p".into(),
        instance: "i".into(),
        replica: "i-0".into(),
        reason: reason.into(),
        message: "m".into(),
        time_unix_ms: crate::events::now_ms(),
        ..Default::default()
    };
    let volume = pb::StateVolume {
        name: "v0".into(),
        ..Default::default()
    };
    let first = pb::StatusReport {
        applied_index: 1,
        replicas: vec![replica(pb::ReplicaState::Starting)],
        events: vec![event("ConfigDriftRepaired")],
        volumes: vec![volume.clone()],
        volumes_listed: true,
        volumes_total: 1,
        ..Default::default()
    };
    let second = pb::StatusReport {
        applied_index: 2,
        replicas: vec![replica(pb::ReplicaState::Running)],
        events: vec![event("ContainerStarted")],
        ..Default::default()
    };
    let third = pb::StatusReport {
        applied_index: 3,
        replicas: vec![replica(pb::ReplicaState::Ready)],
        ..Default::default()
    };
    let merged = [second, third]
        .into_iter()
        .fold(Received::new(&host, first, &assigned), |earlier, r| {
            earlier.followed_by(Received::new(&host, r, &assigned))
        });
    assert_eq!(merged.report.applied_index, 3, "the newest report stands");
    assert_eq!(
        merged.report.replicas[0].state,
        pb::ReplicaState::Ready as i32
    );
    let reasons: Vec<&str> = merged.recorded.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(
        reasons,
        ["ConfigDriftRepaired", "ContainerStarted"],
        "every report's events, in order"
    );
    assert_eq!(merged.audited.len(), 1, "the repaired drift is audited");
    assert!(
        merged.report.events.is_empty(),
        "events are taken apart once"
    );
    assert!(
        merged.report.volumes_listed,
        "the last volume list is kept when a newer report lists none"
    );
    assert_eq!(merged.report.volumes, vec![volume]);
    assert_eq!(merged.report.volumes_total, 1);
}

/// Whether a refusal carries the "host removed" mark agents act on.
fn is_removed(s: &Status) -> bool {
    s.code() == tonic::Code::Unauthenticated
        && s.metadata()
            .get(clusterclaw_proto::metadata::REFUSAL)
            .is_some_and(|v| v == clusterclaw_proto::metadata::REFUSAL_HOST_REMOVED)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_hosts_certificate_gets_nothing_more() {
    let h = start().await;
    let token = join_token(h.store.as_ref(), Some(2), None);
    let (resp, key) = enroll(&h, &token, "gone").await.unwrap();
    let mut old = client(&h.url, &h.ca_pem, Some((&resp.certificate_pem, &key)));
    let first = old
        .watch_assignments(pb::WatchAssignmentsRequest {
            known_index: 0,
            wait_seconds: 5,
        })
        .await
        .unwrap()
        .into_inner();

    // A long poll held while the host is removed is answered with the refusal, never with an
    // empty set (which would tell the agent to delete its replicas' volumes).
    let held = {
        let mut old = old.clone();
        tokio::spawn(async move {
            old.watch_assignments(pb::WatchAssignmentsRequest {
                known_index: first.index,
                wait_seconds: 3,
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let host_key = ObjectKey::cluster(Kind::Host, &resp.host_id);
    h.store.delete(&host_key, None).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .unwrap()
        .unwrap();
    let refused = answer.expect_err("a removed host gets no assignments");
    assert!(is_removed(&refused), "{refused:?}");

    // A new host enrolls under the same name: the old certificate stays refused everywhere.
    let (again, new_key) = enroll(&h, &token, "gone").await.unwrap();
    assert_eq!(again.host_id, resp.host_id, "the name is free again");
    let watch = old
        .watch_assignments(pb::WatchAssignmentsRequest {
            known_index: 0,
            wait_seconds: 1,
        })
        .await
        .unwrap_err();
    assert!(is_removed(&watch), "{watch:?}");
    let report = old
        .report_status(tokio_stream::iter(vec![pb::StatusReport::default()]))
        .await
        .unwrap_err();
    assert!(is_removed(&report), "{report:?}");
    let renew = old
        .renew_certificate(pb::RenewCertificateRequest { csr_pem: csr().0 })
        .await
        .unwrap_err();
    assert!(is_removed(&renew), "{renew:?}");
    // Nothing the old certificate sent reached the new host's status.
    let Resource::Host(stored) = h.store.get(&host_key).unwrap().unwrap().resource().unwrap()
    else {
        panic!()
    };
    // (The scheduler may have written the new host's allocation meanwhile: no report is in it.)
    assert!(
        stored
            .status
            .as_ref()
            .is_none_or(|s| s.last_heartbeat.is_none() && s.usage.is_none()),
        "{:?}",
        stored.status
    );

    let mut new = client(&h.url, &h.ca_pem, Some((&again.certificate_pem, &new_key)));
    new.watch_assignments(pb::WatchAssignmentsRequest {
        known_index: 0,
        wait_seconds: 1,
    })
    .await
    .expect("the new identity is accepted");
    let _ = h.stop.send(true);
}

/// A newly enrolled host `name` with its `Heartbeat` stream open: where to send its reports
/// (room for 64) and the acknowledgements.
async fn heartbeat_stream(
    h: &Harness,
    name: &str,
) -> (
    pb::EnrollResponse,
    tokio::sync::mpsc::Sender<pb::StatusReport>,
    tonic::Streaming<pb::ReportAck>,
) {
    let token = join_token(h.store.as_ref(), Some(1), None);
    let (resp, key) = enroll(h, &token, name).await.unwrap();
    let mut host = client(&h.url, &h.ca_pem, Some((&resp.certificate_pem, &key)));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acks = host
        .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (resp, tx, acks)
}

/// A runtime condition that says the engine is up.
fn ready_runtime() -> Option<pb::RuntimeCondition> {
    Some(pb::RuntimeCondition {
        ready: true,
        runtime: "docker".into(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_reports_are_acknowledged_and_a_gap_asks_for_a_full_one() {
    let h = start().await;
    let (resp, tx, mut acks) = heartbeat_stream(&h, "beat").await;
    async fn exchange(
        tx: &tokio::sync::mpsc::Sender<pb::StatusReport>,
        acks: &mut tonic::Streaming<pb::ReportAck>,
        r: pb::StatusReport,
    ) -> pb::ReportAck {
        tx.send(r).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), acks.message())
            .await
            .expect("every report is answered")
            .unwrap()
            .unwrap()
    }
    let runtime = ready_runtime();
    let full = exchange(
        &tx,
        &mut acks,
        pb::StatusReport {
            seq: 1,
            runtime: runtime.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((full.seq, full.send_full), (1, false), "{full:?}");
    let host_key = ObjectKey::cluster(Kind::Host, &resp.host_id);
    let Resource::Host(stored) = h.store.get(&host_key).unwrap().unwrap().resource().unwrap()
    else {
        panic!()
    };
    assert_eq!(stored.status.unwrap().phase, HostPhase::Ready);

    let delta = exchange(
        &tx,
        &mut acks,
        pb::StatusReport {
            seq: 2,
            base_seq: 1,
            runtime: runtime.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((delta.seq, delta.send_full), (2, false), "{delta:?}");
    // Report 3 never arrived: a delta onto it is not applied and a full report is asked for.
    let gap = exchange(
        &tx,
        &mut acks,
        pb::StatusReport {
            seq: 4,
            base_seq: 3,
            runtime: runtime.clone(),
            ..Default::default()
        },
    )
    .await;
    assert!(gap.send_full, "{gap:?}");
    assert!(gap.reason.contains("holds report 2"), "{}", gap.reason);
    let again = exchange(
        &tx,
        &mut acks,
        pb::StatusReport {
            seq: 5,
            runtime,
            ..Default::default()
        },
    )
    .await;
    assert!(!again.send_full, "{again:?}");

    // A removed host's stream ends with the refusal.
    h.store.delete(&host_key, None).unwrap();
    tx.send(pb::StatusReport {
        seq: 6,
        ..Default::default()
    })
    .await
    .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), acks.message())
        .await
        .unwrap()
        .expect_err("a removed host's report is refused");
    assert!(is_removed(&refused), "{refused:?}");
    let _ = h.stop.send(true);
}

/// Deltas sent one after another without waiting for their acknowledgements (as an agent
/// does while the server applies an earlier report) are expanded onto the report before
/// them, also when that one is still waiting or being applied: every one is acknowledged,
/// in order, and none asks for a full report.
#[tokio::test]
async fn deltas_sent_while_earlier_reports_are_applied_are_all_taken() {
    let h = start().await;
    let (_, tx, mut acks) = heartbeat_stream(&h, "quick").await;
    let runtime = ready_runtime();
    const REPORTS: u64 = 40;
    for seq in 1..=REPORTS {
        tx.send(pb::StatusReport {
            seq,
            base_seq: seq - 1,
            runtime: runtime.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for seq in 1..=REPORTS {
        let ack = tokio::time::timeout(Duration::from_secs(10), acks.message())
            .await
            .expect("every report is answered")
            .unwrap()
            .unwrap();
        assert_eq!((ack.seq, ack.send_full), (seq, false), "{ack:?}");
    }
    let _ = h.stop.send(true);
}

/// Fails closed: every RPC of the agent service except `Enroll` refuses a caller without a
/// host certificate. The list is checked against the service definition, so an RPC added
/// to the proto without being listed here fails this test.
#[tokio::test]
async fn every_rpc_but_enroll_refuses_a_caller_without_a_certificate() {
    let proto = include_str!("../../../proto/proto/clusterclaw/agent/v1/agent.proto");
    let declared: std::collections::BTreeSet<&str> = proto
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .filter_map(|l| l.split('(').next())
        .map(str::trim)
        .collect();
    let h = start().await;
    let anon = || client(&h.url, &h.ca_pem, None);
    let one_report = || tokio_stream::iter(vec![pb::StatusReport::default()]);
    let mut checked = std::collections::BTreeSet::new();
    for rpc in &declared {
        let refused: Status = match *rpc {
            "Enroll" => continue,
            "RenewCertificate" => anon()
                .renew_certificate(pb::RenewCertificateRequest { csr_pem: csr().0 })
                .await
                .unwrap_err(),
            "WatchAssignments" => anon()
                .watch_assignments(pb::WatchAssignmentsRequest {
                    known_index: 0,
                    wait_seconds: 1,
                })
                .await
                .unwrap_err(),
            "ReportStatus" => anon().report_status(one_report()).await.unwrap_err(),
            "Heartbeat" => match anon().heartbeat(one_report()).await {
                Err(s) => s,
                Ok(acks) => acks
                    .into_inner()
                    .next()
                    .await
                    .expect("a refusal, not an empty stream")
                    .expect_err("a caller without a certificate got an acknowledgement"),
            },
            "Tasks" => match anon().tasks(pb::TasksRequest {}).await {
                Err(s) => s,
                Ok(tasks) => tasks
                    .into_inner()
                    .next()
                    .await
                    .expect("a refusal, not an empty stream")
                    .expect_err("a caller without a certificate got a task"),
            },
            "TaskOutput" => anon()
                .task_output(tokio_stream::iter(vec![pb::TaskChunk::default()]))
                .await
                .unwrap_err(),
            "VolumeImport" => match anon()
                .volume_import(pb::VolumeImportRequest::default())
                .await
            {
                Err(s) => s,
                Ok(chunks) => chunks
                    .into_inner()
                    .next()
                    .await
                    .expect("a refusal, not an empty stream")
                    .expect_err("a caller without a certificate got volume data"),
            },
            other => panic!("the agent RPC {other} has no check here: add one"),
        };
        assert_eq!(
            refused.code(),
            tonic::Code::Unauthenticated,
            "{rpc} without a certificate: {refused:?}"
        );
        checked.insert(*rpc);
    }
    assert_eq!(checked.len() + 1, declared.len());
    let _ = h.stop.send(true);
}
