//! The gRPC service agents call over mutual TLS: enrollment, certificate renewal, the
//! assignment long poll and status reports. The server never connects to a host.

pub mod book;
pub mod history;
pub mod identity;
pub mod reports;
pub mod tasks;
#[cfg(test)]
mod tests;
pub mod transfer;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clusterclaw_proto::agent as pb;
use clusterclaw_proto::agent::agent_service_server::{AgentService, AgentServiceServer};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::batch::Batcher;
use crate::metrics::Metrics;
use crate::model::{
    Host, HostCapacity, HostResources, HostSpec, HostStatus, Kind, MAX_HOSTNAME_BYTES, Metadata,
    Quantity, Resource, format_cpu, format_memory, validate_object,
};
use crate::pki::Ca;
use crate::store::{JoinRefusal, Store, StoreError};
use crate::util::{try_blocking, unix_now};

pub use book::AssignmentBook;
use identity::HostIdentity;
pub use reports::Reports;

/// Longest a `WatchAssignments` call is held.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Shortest hold an agent may ask for.
const MIN_WAIT: Duration = Duration::from_secs(1);
/// How long a host certificate is valid; agents renew at two thirds of it.
pub const HOST_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long an agent's TLS handshake may take on the agent port.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most labels a host may enroll with.
const MAX_HOST_LABELS: usize = crate::model::MAX_LABELS;
/// HTTP/2 receive window of one call on the agent port.
const TASK_STREAM_WINDOW: u32 = 256 * 1024;
/// HTTP/2 receive window of one agent connection (all its calls together).
const AGENT_CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// Names tried after the first when another host already has it.
const NAME_ATTEMPTS: usize = 8;

/// Shared state of the agent service.
#[derive(Clone)]
pub struct AgentRpc {
    pub store: Arc<dyn Store>,
    pub ca: Arc<Ca>,
    pub book: Arc<AssignmentBook>,
    pub reports: Arc<Reports>,
    pub metrics: Arc<Metrics>,
    /// Calls per host, kept apart from the API's limits so that API load never starves agents.
    pub limiter: Option<Arc<crate::ratelimit::AgentRateLimiter>>,
    /// Connected hosts' task streams and the tasks waiting for an answer (shared with the API).
    pub tasks: Arc<tasks::TaskHub>,
    /// Enrollments waiting for the next group write (started by the first enrollment).
    pub enrollments: Arc<EnrollmentQueue>,
    /// Host identities found current, while no host is deleted.
    pub verified: Arc<identity::Verified>,
}

/// Enrollments waiting for the next group write; none if its thread could not be started.
pub type EnrollmentQueue = std::sync::OnceLock<
    Option<Batcher<(String, i64, Resource), Result<crate::store::StoredObject, StoreError>>>,
>;

/// Most enrollments written in one group.
const MAX_ENROLL_GROUP: usize = 256;
/// Most enrollments waiting for a group write.
const ENROLL_QUEUE: usize = 4096;

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::JoinRefused(r) => Status::unauthenticated(match r {
            JoinRefusal::Unknown => {
                "join token not recognised; create one with `clusterclaw token create join`"
            }
            JoinRefusal::Expired => {
                "join token has expired; create a new one with `clusterclaw token create join`"
            }
            JoinRefusal::UsedUp => {
                "join token has been used up; create a new one with `clusterclaw token create join`"
            }
            JoinRefusal::Revoked => "join token has been revoked",
            JoinRefusal::NotAJoinToken => {
                "that is an API token, not a join token; create a join token with `clusterclaw token create join`"
            }
        }),
        StoreError::NotFound(k) => Status::not_found(format!("{k} not found")),
        StoreError::Invalid(p) => Status::invalid_argument(
            p.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        ),
        other => Status::internal(other.to_string()),
    }
}

/// A DNS-1123 label made from a hostname: lower case, dots and other characters become `-`.
pub fn host_name_from(hostname: &str) -> String {
    let mut s: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(50);
    let s = s.trim_matches('-').to_string();
    if s.is_empty() { "host".into() } else { s }
}

impl AgentRpc {
    /// Takes the status reports of one stream of `id`.
    ///
    /// Reports are read as they arrive, also while an earlier one is being applied, and what
    /// arrived meanwhile is applied as one: a full report says everything the host knows and a
    /// delta is expanded onto the report before it (the one waiting or being applied, else the
    /// one this server holds), so the newest stands for those before it (their events and the
    /// last volume list kept). Applying every report in turn would let them queue up in the
    /// stream whenever applying one takes longer than the agent's report interval, and the
    /// host's news (a replica turning Ready) would reach the store that many reports late.
    ///
    /// With `acks`, every report is acknowledged once applied (or at once when it cannot be
    /// expanded), asking for a full report when it could not be held as sent. Fails only when
    /// the host is gone.
    async fn take_reports(
        &self,
        method: &'static str,
        id: &HostIdentity,
        mut stream: Streaming<pb::StatusReport>,
        acks: Option<&tokio::sync::mpsc::Sender<Result<pb::ReportAck, Status>>>,
    ) -> Result<(), Status> {
        let ack = |seq: u64, wanted: Option<String>| {
            if let Some(why) = &wanted {
                tracing::debug!(host = %id.name, "asking for a full status report: {why}");
            }
            pb::ReportAck {
                seq,
                send_full: wanted.is_some(),
                reason: wanted.unwrap_or_default(),
            }
        };
        // The reports taken and not yet applied (as one), with the numbers they stand for.
        // Both boxed: the stream waits for its next report with neither most of the time, and
        // this future is held for every connected host.
        let mut waiting: Option<Box<(Received, Vec<u64>)>> = None;
        // The newest report taken, expanded (waiting or being applied): a delta onto it is
        // expanded onto it.
        let mut newest: Option<Box<pb::StatusReport>> = None;
        let mut applying = std::pin::pin!(futures::future::OptionFuture::from(None));
        let mut busy = false;
        let mut open = true;
        loop {
            tokio::select! {
                msg = stream.next(), if open => match msg {
                    Some(Ok(report)) => {
                        self.reports.heard_from(&id.name);
                        let seq = report.seq;
                        let expanded = match &newest {
                            Some(n) if report.base_seq != 0 && report.base_seq == n.seq => {
                                Ok(Reports::expand_onto(pb::StatusReport::clone(n), report))
                            }
                            _ => self.reports.expand(&id.name, report),
                        };
                        match expanded {
                            Ok(report) => {
                                let assigned = self.book.current(&id.name);
                                let received = Received::new(id, report, &assigned.assignments);
                                newest = Some(Box::new(received.report.clone()));
                                waiting = Some(Box::new(match waiting.take().map(|w| *w) {
                                    Some((earlier, mut seqs)) => {
                                        seqs.push(seq);
                                        (earlier.followed_by(received), seqs)
                                    }
                                    None => (received, vec![seq]),
                                }));
                            }
                            Err(why) => match acks {
                                Some(tx) => {
                                    if tx.send(Ok(ack(seq, Some(why)))).await.is_err() {
                                        return Ok(());
                                    }
                                }
                                None => {
                                    tracing::warn!(host = %id.name, "dropping a status report: {why}");
                                }
                            },
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(host = %id.name, error = %e, "status stream ended with an error");
                        open = false;
                    }
                    None => open = false,
                },
                Some((outcome, seqs)) = &mut applying, if busy => {
                    busy = false;
                    let (outcome, seqs): (Result<Result<(), Status>, Status>, Vec<u64>) =
                        (outcome, seqs);
                    let outcome: Result<(), Status> = match outcome {
                        Err(gone) => {
                            if let Some(tx) = acks {
                                let _ = tx.send(Err(gone.clone())).await;
                            }
                            return Err(gone);
                        }
                        Ok(outcome) => outcome,
                    };
                    if let Some(tx) = acks {
                        let last = seqs.last().copied();
                        for seq in seqs {
                            let wanted = match &outcome {
                                Err(failed) => Some(format!(
                                    "report {seq} could not be applied: {}",
                                    failed.message()
                                )),
                                Ok(()) if Some(seq) == last && !self.reports.holds(&id.name, seq) => {
                                    Some(format!(
                                        "report {seq} is not held as sent (an entry of it was refused)"
                                    ))
                                }
                                Ok(()) => None,
                            };
                            if tx.send(Ok(ack(seq, wanted))).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                }
            }
            if !busy {
                match waiting.take().map(|w| *w) {
                    Some((next, seqs)) => {
                        // Boxed: this loop waits on every open stream (one per host) between
                        // reports, and held inline the application would make each of them
                        // that much larger while idle.
                        applying.set(
                            Some(Box::pin(async move {
                                (self.apply_report(method, id, next).await, seqs)
                            }))
                            .into(),
                        );
                        busy = true;
                    }
                    None if !open => break,
                    // Nothing waiting or being applied: the newest report is the one the
                    // server holds ([`Reports::expand`] expands a delta onto that), so it is
                    // not kept twice while the stream waits. A host's full report is about
                    // 280 bytes a replica, and every host's stream waits most of the time.
                    None => newest = None,
                }
            }
        }
        Ok(())
    }

    /// Applies one report of `id` (with the events of those it stands for): the events, then
    /// the report, written together with the reports of other hosts arriving meanwhile, then
    /// the audit entries; the call is recorded as `method`. The outer error ends the stream
    /// (the host is gone); the inner one is this report's.
    async fn apply_report(
        &self,
        method: &'static str,
        id: &HostIdentity,
        received: Received,
    ) -> Result<Result<(), Status>, Status> {
        let each = Instant::now();
        let Received {
            report,
            audited,
            recorded,
        } = received;
        for e in &recorded {
            if let Some(kind) = crate::metrics::InstanceEvent::of_reason(&e.reason) {
                self.metrics
                    .count_event(&e.object.tenant, &e.object.project, &e.object.name, kind);
            }
        }
        crate::events::record_all(self.store.as_ref(), recorded);
        let assigned = self.book.current(&id.name);
        let mut r = self
            .reports
            .submit(self.store.clone(), id.clone(), report, assigned)
            .await
            .map_err(store_status);
        if r.is_ok() && !audited.is_empty() {
            // What an agent repaired on its own is part of the record of changes.
            let store = self.store.clone();
            r = try_blocking(method, move || {
                store
                    .append_audit(&audited)
                    .map(|_| ())
                    .map_err(store_status)
            })
            .await;
        }
        self.metrics.observe_rpc(
            method,
            r.as_ref().err().map_or(tonic::Code::Ok, |e| e.code()),
            each.elapsed(),
        );
        if let Err(e) = &r {
            tracing::warn!(host = %id.name, error = %e, "could not apply a status report");
            if e.code() == tonic::Code::NotFound {
                // Only a host that is really gone is told so (its agent then stops its
                // replicas); anything else is an error of this report.
                let (store, current) = (self.store.clone(), id.clone());
                try_blocking("checking the host identity", move || {
                    identity::check_current(&current, store.as_ref())
                })
                .await?;
            }
        }
        Ok(r)
    }

    /// The caller's identity from its client certificate, checked against the store on the
    /// blocking pool.
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<HostIdentity, Status> {
        let id = identity::peer_identity(request)?;
        let (store, verified) = (self.store.clone(), self.verified.clone());
        let id = try_blocking("checking the host identity", move || {
            verified.check(&id, store.as_ref())?;
            Ok::<_, Status>(id)
        })
        .await?;
        if let Some(limiter) = &self.limiter {
            limiter.check(&id.name).map_err(|d| d.to_status())?;
        }
        Ok(id)
    }

    fn observe<T>(&self, method: &'static str, started: Instant, r: &Result<T, Status>) {
        let code = match r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics.observe_rpc(method, code, started.elapsed());
    }

    /// Enrolls a host. Everything about the request is checked before the join token is
    /// touched; the token is used up and the `Host` created in one store transaction, shared
    /// with the enrollments of other hosts arriving meanwhile (one sync to disk for the lot).
    async fn enroll_grouped(&self, req: pb::EnrollRequest) -> Result<pb::EnrollResponse, Status> {
        let (req, (base, csr)) = try_blocking("Enroll", move || {
            let checked = check_enrollment(&req)?;
            Ok::<_, Status>((req, checked))
        })
        .await?;
        let hash = crate::auth::hash_token(&req.join_token);
        let host = enrolled_host(&req, &base);
        let store = self.store.clone();
        let queue = self.enrollments.get_or_init(|| {
            Batcher::start(
                "enrollment-writer",
                MAX_ENROLL_GROUP,
                ENROLL_QUEUE,
                move |batch: Vec<(String, i64, Resource)>| store.enroll_hosts(batch),
            )
            .inspect_err(|e| {
                tracing::error!(error = %e, "cannot start the enrollment writer; hosts enroll one by one")
            })
            .ok()
        });
        let first = match queue {
            Some(q) => q.submit((hash, unix_now(), host)).await,
            None => None,
        };
        let this = self.clone();
        try_blocking("Enroll", move || {
            let created = match first {
                Some(Ok(created)) => created,
                // Its name is taken: other names are tried one by one.
                Some(Err(StoreError::AlreadyExists(_))) => this.create_enrolled(&req, &base, 1)?,
                Some(Err(e)) => return Err(store_status(e)),
                None => this.create_enrolled(&req, &base, 0)?,
            };
            this.sign_enrolled(&req, csr, created)
        })
        .await
    }

    /// Creates the host of an enrollment, named `base` (from attempt 0) or `base-XXXX` (a
    /// random suffix, from attempt 1 on) while its name is taken.
    fn create_enrolled(
        &self,
        req: &pb::EnrollRequest,
        base: &str,
        mut attempt: usize,
    ) -> Result<crate::store::StoredObject, Status> {
        let token_hash = crate::auth::hash_token(&req.join_token);
        let now = unix_now();
        loop {
            let name = if attempt == 0 {
                base.to_string()
            } else {
                format!("{base}-{:04x}", rand::random::<u16>())
            };
            match self
                .store
                .enroll_host(&token_hash, now, enrolled_host(req, &name))
            {
                Ok(created) => return Ok(created),
                Err(StoreError::AlreadyExists(_)) if attempt < NAME_ATTEMPTS => attempt += 1,
                Err(e) => return Err(store_status(e)),
            }
        }
    }

    /// Signs the certificate of a host just created by its enrollment.
    fn sign_enrolled(
        &self,
        req: &pb::EnrollRequest,
        csr: crate::pki::CheckedCsr,
        created: crate::store::StoredObject,
    ) -> Result<pb::EnrollResponse, Status> {
        let id = HostIdentity {
            name: created.key.name.clone(),
            uid: created.uid.clone(),
        };
        let signed = self.ca.sign_checked_csr(
            csr,
            &id.name,
            Some(&format!("{}{}", identity::HOST_URI_PREFIX, id.uid)),
            HOST_CERT_VALIDITY,
        );
        let cert = match signed {
            Ok(cert) => cert,
            Err(e) => {
                // Not expected after the checks above; do not leave a host nobody can act as.
                if let Err(undo) = self.store.delete(&created.key, None) {
                    tracing::warn!(host = %id.name, error = %undo, "could not remove a host whose certificate could not be signed");
                }
                return Err(Status::invalid_argument(format!(
                    "cannot sign the certificate request: {e}"
                )));
            }
        };
        tracing::info!(host = %id.name, hostname = %req.hostname, "host enrolled");
        Ok(pb::EnrollResponse {
            host_id: id.name,
            certificate_pem: cert,
            ca_pem: self.ca.cert_pem().to_string(),
        })
    }
}

/// Checks an enrollment request (hostname, labels, certificate request and the names its host
/// may get) and returns the name its host is given first, with the checked request.
fn check_enrollment(req: &pb::EnrollRequest) -> Result<(String, crate::pki::CheckedCsr), Status> {
    if req.hostname.len() > MAX_HOSTNAME_BYTES {
        return Err(Status::invalid_argument(format!(
            "the hostname is {} bytes long; at most {MAX_HOSTNAME_BYTES} are allowed",
            req.hostname.len()
        )));
    }
    if req.labels.len() > MAX_HOST_LABELS {
        return Err(Status::invalid_argument(format!(
            "bad host labels: {} labels given; at most {MAX_HOST_LABELS} are allowed",
            req.labels.len()
        )));
    }
    let mut problems = Vec::new();
    for (k, v) in &req.labels {
        if let Err(e) =
            crate::model::validate_label_key(k).and_then(|_| crate::model::validate_label_value(v))
        {
            problems.push(e);
        }
    }
    if !problems.is_empty() {
        return Err(Status::invalid_argument(format!(
            "bad host labels: {}",
            problems.join("; ")
        )));
    }
    let csr = Ca::check_csr(&req.csr_pem)
        .map_err(|e| Status::invalid_argument(format!("bad certificate request: {e}")))?;
    let base = host_name_from(if req.hostname.is_empty() {
        "host"
    } else {
        &req.hostname
    });
    // The longest name a retry can give is checked too (the suffix adds 5 characters).
    for name in [base.clone(), format!("{base}-ffff")] {
        let problems = validate_object(&enrolled_host(req, &name));
        if !problems.is_empty() {
            return Err(store_status(StoreError::Invalid(problems)));
        }
    }
    Ok((base, csr))
}

/// The `Host` an enrollment creates, named `name`.
fn enrolled_host(req: &pb::EnrollRequest, name: &str) -> Resource {
    let capacity = req.capacity.unwrap_or_default();
    Resource::Host(Host {
        api_version: crate::model::API_VERSION.into(),
        kind: Kind::Host,
        metadata: Metadata {
            name: name.to_string(),
            labels: req.labels.clone().into_iter().collect(),
            ..Default::default()
        },
        spec: HostSpec {
            hostname: req.hostname.clone(),
            capacity: HostCapacity {
                cpu: Quantity(format_cpu(capacity.cpu_millis)),
                memory: Quantity(format_memory(capacity.memory_bytes)),
                disk: (capacity.disk_bytes > 0)
                    .then(|| Quantity(format_memory(capacity.disk_bytes))),
            },
            unschedulable: false,
            agent_version: Some(req.agent_version.clone()).filter(|s| !s.is_empty()),
            os: Some(req.os.clone()).filter(|s| !s.is_empty()),
            arch: Some(req.arch.clone()).filter(|s| !s.is_empty()),
        },
        // As the scheduler's first pass would write it: a new host costs one write, not two.
        status: Some(HostStatus {
            allocated: HostResources::nothing_placed(),
            ..HostStatus::default()
        }),
    })
}

#[tonic::async_trait]
impl AgentService for AgentRpc {
    type TasksStream = tasks::TaskFeed;
    type VolumeImportStream = transfer::ImportFeed;

    async fn volume_import(
        &self,
        request: Request<pb::VolumeImportRequest>,
    ) -> Result<Response<Self::VolumeImportStream>, Status> {
        let started = Instant::now();
        let r = self.authenticate(&request).await;
        self.observe("VolumeImport", started, &r);
        let id = r?;
        let feed = transfer::import(
            self.store.clone(),
            self.tasks.clone(),
            id.name,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(feed))
    }

    async fn tasks(
        &self,
        request: Request<pb::TasksRequest>,
    ) -> Result<Response<Self::TasksStream>, Status> {
        let started = Instant::now();
        let r = self.authenticate(&request).await;
        self.observe("Tasks", started, &r);
        let id = r?;
        tracing::debug!(host = %id.name, "task stream opened");
        Ok(Response::new(tasks::feed(self.tasks.connect(&id.name))))
    }

    async fn task_output(
        &self,
        request: Request<Streaming<pb::TaskChunk>>,
    ) -> Result<Response<pb::TaskOutputResponse>, Status> {
        let started = Instant::now();
        let id = match self.authenticate(&request).await {
            Ok(id) => id,
            Err(e) => {
                self.metrics
                    .observe_rpc("TaskOutput", e.code(), started.elapsed());
                return Err(e);
            }
        };
        let r = self.tasks.relay(&id.name, request.into_inner()).await;
        self.observe("TaskOutput", started, &r);
        r.map(Response::new)
    }

    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let started = Instant::now();
        let r = self.enroll_grouped(request.into_inner()).await;
        self.observe("Enroll", started, &r);
        r.map(Response::new)
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        let started = Instant::now();
        let this = self.clone();
        let r = try_blocking("RenewCertificate", move || {
            let id = identity::authenticate(&request, this.store.as_ref())?;
            let csr = &request.get_ref().csr_pem;
            let uri = format!("{}{}", identity::HOST_URI_PREFIX, id.uid);
            let cert = this
                .ca
                .sign_host_csr(csr, &id.name, Some(&uri), HOST_CERT_VALIDITY)
                .map_err(|e| {
                    Status::invalid_argument(format!("cannot sign the certificate request: {e}"))
                })?;
            tracing::info!(host = %id.name, "host certificate renewed");
            Ok(pb::RenewCertificateResponse {
                certificate_pem: cert,
            })
        })
        .await;
        self.observe("RenewCertificate", started, &r);
        r.map(Response::new)
    }

    async fn watch_assignments(
        &self,
        request: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Response<pb::WatchAssignmentsResponse>, Status> {
        let started = Instant::now();
        let id = self.authenticate(&request).await;
        let request = request.into_inner();
        let id = match id {
            Ok(id) => id,
            Err(e) => {
                self.metrics
                    .observe_rpc("WatchAssignments", e.code(), started.elapsed());
                return Err(e);
            }
        };
        let wait = Duration::from_secs(u64::from(request.wait_seconds)).clamp(MIN_WAIT, MAX_WAIT);
        let waited = self.book.wait(&id.name, request.known_index, wait).await;
        // The host may have been removed while the poll was held: its (now empty) set must
        // not reach it as "run nothing", which would delete its replicas' state volumes.
        let (store, verified) = (self.store.clone(), self.verified.clone());
        let current = id.clone();
        if let Err(e) = try_blocking("checking the host identity", move || {
            verified.check(&current, store.as_ref())
        })
        .await
        {
            self.metrics
                .observe_rpc("WatchAssignments", e.code(), started.elapsed());
            return Err(e);
        }
        let answer = match waited {
            book::Wait::Changed(a) => pb::WatchAssignmentsResponse {
                index: a.index,
                changed: true,
                assignments: a.assignments.clone(),
                retained_volumes: a.retained_volumes.clone(),
                delete_volumes: a.delete_volumes.clone(),
            },
            book::Wait::NoChange => pb::WatchAssignmentsResponse {
                index: request.known_index,
                changed: false,
                assignments: Vec::new(),
                retained_volumes: Vec::new(),
                delete_volumes: Vec::new(),
            },
        };
        self.metrics
            .observe_rpc("WatchAssignments", tonic::Code::Ok, started.elapsed());
        Ok(Response::new(answer))
    }

    async fn report_status(
        &self,
        request: Request<Streaming<pb::StatusReport>>,
    ) -> Result<Response<pb::ReportStatusResponse>, Status> {
        let started = Instant::now();
        // Each report is counted as it is applied; the call itself only when refused.
        let id = self.authenticate(&request).await.inspect_err(|e| {
            self.metrics
                .observe_rpc("ReportStatus", e.code(), started.elapsed())
        })?;
        // Nothing asks for a full report on this call: a delta that does not fit is dropped
        // (agents send deltas only on `Heartbeat`).
        self.take_reports("ReportStatus", &id, request.into_inner(), None)
            .await?;
        Ok(Response::new(pb::ReportStatusResponse {}))
    }

    type HeartbeatStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ReportAck, Status>>;

    async fn heartbeat(
        &self,
        request: Request<Streaming<pb::StatusReport>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let started = Instant::now();
        // Each report is counted as it is applied; the call itself only when refused.
        let id = self.authenticate(&request).await.inspect_err(|e| {
            self.metrics
                .observe_rpc("Heartbeat", e.code(), started.elapsed())
        })?;
        let stream = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this.take_reports("Heartbeat", &id, stream, Some(&tx)).await;
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

/// Reports of one stream that arrived while an earlier one was being applied, as one: the
/// newest report, with the events of all of them (their events and audit entries, made as
/// each arrived) and the newest volume list any of them carried.
struct Received {
    report: pb::StatusReport,
    audited: Vec<crate::audit::AuditEntry>,
    recorded: Vec<crate::events::Event>,
}

impl Received {
    fn new(host: &HostIdentity, mut report: pb::StatusReport, assigned: &[pb::Assignment]) -> Self {
        let events = std::mem::take(&mut report.events);
        let (audited, recorded) = agent_events(host, &events, assigned);
        Received {
            report,
            audited,
            recorded,
        }
    }

    /// This and the `newer` report that followed it, as one.
    fn followed_by(mut self, mut newer: Received) -> Received {
        if !newer.report.volumes_listed && self.report.volumes_listed {
            newer.report.volumes = std::mem::take(&mut self.report.volumes);
            newer.report.volumes_total = self.report.volumes_total;
            newer.report.volumes_listed = true;
        }
        self.audited.append(&mut newer.audited);
        self.recorded.append(&mut newer.recorded);
        newer.audited = self.audited;
        newer.recorded = self.recorded;
        newer
    }
}

/// Most agent events recorded from one report; more are dropped (and logged).
const MAX_EVENTS_PER_REPORT: usize = 32;

/// Audit entries of what an agent did on its own (a repaired config drift), as the host. Only
/// events about replicas the host is assigned count: a host cannot write into the audit log of
/// a tenant it runs nothing for.
fn agent_events(
    host: &HostIdentity,
    events: &[pb::AgentEvent],
    assigned: &[pb::Assignment],
) -> (Vec<crate::audit::AuditEntry>, Vec<crate::events::Event>) {
    use crate::audit::{AuditEntry, AuditObject, AuditPrincipal, AuditResult};
    let ours = |e: &&pb::AgentEvent| {
        assigned.iter().any(|a| {
            a.tenant == e.tenant
                && a.project == e.project
                && a.instance == e.instance
                && a.replica == e.replica
        })
    };
    let kept: Vec<&pb::AgentEvent> = events.iter().filter(ours).collect();
    if kept.len() < events.len() || kept.len() > MAX_EVENTS_PER_REPORT {
        tracing::warn!(host = %host.name, events = events.len(), about_assigned_replicas = kept.len(), recorded = kept.len().min(MAX_EVENTS_PER_REPORT), "agent events about other replicas, or too many, were dropped");
    }
    let kept: Vec<&pb::AgentEvent> = kept.into_iter().take(MAX_EVENTS_PER_REPORT).collect();
    let recorded = kept.iter().map(|e| event_of(host, e)).collect();
    let audited = kept
        .into_iter()
        .filter(|e| !CONTAINER_LIFECYCLE.contains(&e.reason.as_str()))
        .map(|e| {
            tracing::warn!(host = %host.name, replica = %e.replica, reason = %e.reason, message = %e.message, "agent event");
            let reason: String = format!("{}: {}", e.reason, e.message).chars().take(500).collect();
            AuditEntry::now(
                AuditPrincipal::new(format!("host:{}", host.name), host.name.clone()),
                &format!("agent.{}", kebab(&e.reason)),
                AuditResult::ok(200),
            )
            .with_object(AuditObject {
                kind: "OpenClawInstance".into(),
                tenant: Some(e.tenant.clone()),
                project: Some(e.project.clone()),
                name: e.instance.clone(),
            })
            .with_result_reason(reason)
        })
        .collect();
    (audited, recorded)
}

/// Agent events that are events only: what a container did is not a change anyone made, so
/// it stays out of the audit log.
const CONTAINER_LIFECYCLE: [&str; 4] = [
    "ContainerStarted",
    "ContainerRestarted",
    "OOMKilled",
    "ProbeFailed",
];

/// An agent's event as an event of the instance, from `agent/HOST`.
fn event_of(host: &HostIdentity, e: &pb::AgentEvent) -> crate::events::Event {
    let object = crate::model::ObjectKey {
        kind: crate::model::Kind::OpenClawInstance,
        tenant: e.tenant.clone(),
        project: e.project.clone(),
        name: e.instance.clone(),
    };
    let reason: String = e
        .reason
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(64)
        .collect();
    let reason = if reason.is_empty() {
        "AgentEvent".to_string()
    } else {
        reason
    };
    let event = if e.r#type == "Warning" {
        crate::events::Event::warning(object, &reason, e.message.clone())
    } else {
        crate::events::Event::normal(object, &reason, e.message.clone())
    };
    let now = crate::events::now_ms();
    // An agent's clock is believed within a minute of the server's, else the server's time.
    let at = if (e.time_unix_ms - now).abs() <= 60_000 {
        e.time_unix_ms
    } else {
        now
    };
    event
        .replica(e.replica.clone())
        .source(format!("agent/{}", host.name))
        .at(at)
}

/// `ConfigDriftRepaired` → `config-drift-repaired` (audit actions are lower-case); anything
/// but letters and digits is dropped.
fn kebab(reason: &str) -> String {
    let mut out = String::new();
    for c in reason.chars().filter(char::is_ascii_alphanumeric).take(48) {
        if c.is_ascii_uppercase() && !out.is_empty() {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    if out.is_empty() || !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert_str(0, "event");
    }
    out
}

/// TLS material of the agent port.
pub struct AgentTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

/// Serves the agent port on `listener` until `shutdown` completes. Every call but `Enroll`
/// requires a client certificate of the cluster CA (checked per call); a certificate from
/// another CA fails the TLS handshake.
pub async fn serve(
    listener: TcpListener,
    tls: AgentTls,
    rpc: AgentRpc,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(tls.cert_pem, tls.key_pem))
        .client_ca_root(Certificate::from_pem(tls.ca_pem))
        .client_auth_optional(true)
        // A connection that never finishes its handshake is closed instead of holding a file
        // descriptor (and a handshake task) forever.
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    // Small frames (a long poll's answer, its trailers) go out at once: with Nagle's
    // algorithm they would wait for the peer's delayed ACK, tens of milliseconds on loopback.
    // Failed accepts (out of file descriptors) pause and back off, logged once per run.
    let incoming = crate::accept::incoming(listener, "agent");
    Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // A task stream (logs) whose reader stalls holds at most its stream window of the
        // connection's: many of them fit before the connection itself is held up.
        .initial_stream_window_size(Some(TASK_STREAM_WINDOW))
        .initial_connection_window_size(Some(AGENT_CONNECTION_WINDOW))
        .add_service(AgentServiceServer::new(rpc))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Background work of the agent port: the assignment book (host liveness is a controller:
/// [`crate::controllers::hosts`]).
pub async fn run_background(rpc: AgentRpc, shutdown: tokio::sync::watch::Receiver<bool>) {
    let beats = flush_heartbeats(rpc.store.clone(), rpc.reports.clone(), shutdown.clone());
    tokio::join!(
        book::run(rpc.store.clone(), rpc.book.clone(), shutdown),
        beats
    );
}

/// Writes the heartbeats of reports taken (see [`Reports::heard_from`]) every
/// [`reports::HEARTBEAT_FLUSH`], on a thread of its own: not behind the reports' writes, nor
/// behind the blocking pool (long controller passes over a large fleet can fill it).
async fn flush_heartbeats(
    store: Arc<dyn Store>,
    reports: Arc<Reports>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let started = std::thread::Builder::new()
        .name("heartbeat-writer".into())
        .spawn(move || {
            let mut failing = false;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(reports::HEARTBEAT_FLUSH)
            {
                match reports.flush_heartbeats(store.as_ref()) {
                    Ok(_) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cannot write the hosts' heartbeats; they are kept and tried again");
                    }
                    Err(_) => {}
                }
            }
            let _ = done.send(());
        });
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start the heartbeat writer; heartbeats are written with the reports");
        return;
    }
    let _ = shutdown.wait_for(|s| *s).await;
    drop(stop);
    let _ = finished.await;
}
