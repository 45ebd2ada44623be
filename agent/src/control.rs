//! The control plane as the sync loop sees it: a small [`ControlPlane`] trait (long poll and status stream) and its gRPC implementation over mutual TLS.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use clusterclaw_proto::agent as pb;
use clusterclaw_proto::agent::agent_service_client::AgentServiceClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::client::{self, ClientError};
use crate::enroll::HostIdentity;
use crate::events::EventQueue;
use crate::heartbeat::{DeltaEncoder, Exchange};

/// Extra time a long poll may take beyond the wait the server was asked for, before the agent
/// gives up on the call and asks again.
pub const POLL_GRACE: Duration = Duration::from_secs(15);

/// The answer to one long poll.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchAnswer {
    pub index: u64,
    pub changed: bool,
    pub assignments: Vec<pb::Assignment>,
    /// Volumes to keep although unassigned (meaningful only when `changed`).
    pub retained_volumes: Vec<pb::RetainedVolume>,
    /// State volumes to remove, by name (meaningful only when `changed`).
    pub delete_volumes: Vec<String>,
}

/// Why a call to the control plane failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The server could not be reached, or it did not answer in time: try again later.
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// The server refused this host (unknown certificate, rate limit): retrying will not help
    /// until an operator acts, but the host keeps running its replicas.
    #[error("the control plane refused this host: {0}")]
    Refused(String),
    /// The server says this host has been removed from the cluster and its certificate
    /// revoked: the host stops its replicas and waits to be enrolled again.
    #[error("this host has been removed from the cluster: {0}")]
    Removed(String),
    /// The server answered with another error.
    #[error("the control plane failed the call: {0}")]
    Failed(String),
}

impl CallError {
    /// Classifies a gRPC status.
    pub fn from_status(status: &tonic::Status) -> CallError {
        use tonic::Code;
        let text = describe_status(status);
        let removed = status
            .metadata()
            .get(clusterclaw_proto::metadata::REFUSAL)
            .is_some_and(|v| {
                v.as_bytes() == clusterclaw_proto::metadata::REFUSAL_HOST_REMOVED.as_bytes()
            });
        match status.code() {
            Code::Unauthenticated if removed => CallError::Removed(text),
            Code::Unauthenticated | Code::PermissionDenied => CallError::Refused(text),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                CallError::Unreachable(text)
            }
            Code::Ok
            | Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss => CallError::Failed(text),
        }
    }
}

/// A status's message with its underlying cause (transport errors hide the useful part there).
pub fn describe_status(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        let s = err.to_string();
        if !text.contains(&s) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&s);
        }
        source = err.source();
    }
    if text.is_empty() {
        format!("{:?}", status.code())
    } else {
        text
    }
}

/// The reports of one status stream (`Heartbeat`, or `ReportStatus` with a server that lacks
/// it), as the stream takes them.
///
/// Taking a report numbers it, makes it a delta once enabled (see [`crate::heartbeat`]) and
/// attaches every queued [`crate::events::AgentEvent`] to it, removing them from the queue.
/// Being taken by the stream (handed to the connection) is when a report counts as sent: a
/// report that waits in the channel when the call fails is dropped with the channel, and its
/// events ride on the next report. A report the connection had already taken when it broke
/// can be lost with its events.
pub struct ReportStream {
    reports: mpsc::Receiver<pb::StatusReport>,
    events: EventQueue,
    encoder: DeltaEncoder,
    exchange: Arc<Exchange>,
    /// Told of every report as the stream takes it.
    taken: Option<TakenHook>,
}

/// What [`ReportStream::on_taken`] calls.
type TakenHook = Box<dyn FnMut(&pb::StatusReport) + Send + Sync>;

impl ReportStream {
    /// Full reports until [`ReportStream::enable_deltas`].
    pub fn new(reports: mpsc::Receiver<pb::StatusReport>, events: EventQueue) -> Self {
        let exchange = Arc::new(Exchange::default());
        ReportStream {
            reports,
            events,
            encoder: DeltaEncoder::new(exchange.clone()),
            exchange,
            taken: None,
        }
    }

    /// What this stream sent and what the server answered (its acknowledgements go there).
    pub fn exchange(&self) -> Arc<Exchange> {
        self.exchange.clone()
    }

    /// Reports after the first may carry only what changed (the server acknowledges each).
    pub fn enable_deltas(&mut self) {
        self.encoder.enable();
    }

    /// Calls `f` with every report as the stream takes it (hands it to the connection), for
    /// a control plane that times what it sends.
    pub fn on_taken(mut self, f: impl FnMut(&pb::StatusReport) + Send + Sync + 'static) -> Self {
        self.taken = Some(Box::new(f));
        self
    }

    /// The next report, with the queued events attached; `None` when the sender is gone.
    pub async fn recv(&mut self) -> Option<pb::StatusReport> {
        std::future::poll_fn(|cx| self.poll_report(cx)).await
    }

    fn poll_report(&mut self, cx: &mut Context<'_>) -> Poll<Option<pb::StatusReport>> {
        match self.reports.poll_recv(cx) {
            Poll::Ready(Some(report)) => {
                let mut report = self.encoder.encode(report, tokio::time::Instant::now());
                let events = self.events.take();
                report.events.extend(events.iter().map(|e| e.to_proto()));
                if let Some(taken) = self.taken.as_mut() {
                    taken(&report);
                }
                Poll::Ready(Some(report))
            }
            other => other,
        }
    }
}

/// Streams `reports` on a `Heartbeat` call of `client` until the channel closes (`Ok`) or the
/// call fails, taking the server's acknowledgements into the stream's [`Exchange`] (a request
/// for a full report makes the next one full).
pub async fn heartbeat(
    client: &mut AgentServiceClient<Channel>,
    mut reports: ReportStream,
) -> Result<(), tonic::Status> {
    reports.enable_deltas();
    let exchange = reports.exchange();
    let mut acks = client.heartbeat(reports).await?.into_inner();
    while let Some(ack) = acks.message().await? {
        exchange.acknowledged(&ack);
    }
    Ok(())
}

impl futures::Stream for ReportStream {
    type Item = pb::StatusReport;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_report(cx)
    }
}

/// What the sync loop needs from the control plane; the real one is [`GrpcControlPlane`],
/// unit tests script a fake.
#[async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    /// `WatchAssignments`: answers at once when the host's assignments are at another index
    /// than `known_index` (0: "I know nothing"), else holds up to `wait`.
    async fn watch_assignments(
        &self,
        known_index: u64,
        wait: Duration,
    ) -> Result<WatchAnswer, CallError>;

    /// `ReportStatus`: streams what `reports` yields until its channel closes (then `Ok`) or
    /// the call fails. Only what the call takes from `reports` counts as sent.
    async fn report_status(&self, reports: ReportStream) -> Result<(), CallError>;
}

/// The control plane over gRPC, authenticated as the enrolled host. The identity can be
/// swapped after a certificate renewal; the next call uses it.
///
/// With several servers (of one cluster, sharing its CA) it talks to one at a time, starting
/// with the first, and moves to the next in order when a call finds its server unreachable;
/// the caller's retries (with backoff) then reach the next one.
pub struct GrpcControlPlane {
    servers: Vec<String>,
    /// How many times it moved on; the server in use is `servers[moves % servers.len()]`.
    moves: AtomicUsize,
    identity: RwLock<HostIdentity>,
    client: RwLock<AgentServiceClient<Channel>>,
    /// A connection of its own for task streams (logs): a reader that stalls one holds up to
    /// a flow-control window of it, which must never hold up the long poll or the reports.
    task_client: RwLock<AgentServiceClient<Channel>>,
    /// The server answered that it does not implement `Heartbeat`: reports go by
    /// `ReportStatus`, every one full (until the agent moves to another server).
    full_reports_only: AtomicBool,
}

impl GrpcControlPlane {
    /// Talks to `servers` in order (none given: the server of the identity).
    pub fn new(identity: &HostIdentity, servers: &[String]) -> Result<Self, ClientError> {
        let servers = if servers.is_empty() {
            vec![identity.record.server.clone()]
        } else {
            servers.to_vec()
        };
        let first = with_server(identity, &servers[0]);
        Ok(GrpcControlPlane {
            client: RwLock::new(client::authenticated(&first)?),
            task_client: RwLock::new(client::authenticated(&first)?),
            servers,
            moves: AtomicUsize::new(0),
            identity: RwLock::new(identity.clone()),
            full_reports_only: AtomicBool::new(false),
        })
    }

    /// The server calls go to now.
    pub fn server(&self) -> String {
        let moves = self.moves.load(Ordering::SeqCst);
        self.servers[moves % self.servers.len()].clone()
    }

    /// After a call made while `moves` was current found its server unreachable: moves to the
    /// next server (once, however many calls failed together).
    fn move_on(&self, moves: usize, error: &CallError) {
        if self.servers.len() < 2 || !matches!(error, CallError::Unreachable(_)) {
            return;
        }
        if self
            .moves
            .compare_exchange(
                moves,
                moves.wrapping_add(1),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_err()
        {
            return;
        }
        let from = &self.servers[moves % self.servers.len()];
        let to = self.servers[moves.wrapping_add(1) % self.servers.len()].clone();
        let identity = self
            .identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match self.connect(&identity, &to) {
            Ok(()) => {
                tracing::warn!(from = %from, to = %to, error = %error, "the control plane server is unreachable; moving to the next one")
            }
            Err(e) => {
                tracing::warn!(server = %to, error = %e, "cannot set up a connection to the next server")
            }
        }
    }

    fn connect(&self, identity: &HostIdentity, server: &str) -> Result<(), ClientError> {
        let id = with_server(identity, server);
        let fresh = client::authenticated(&id)?;
        let fresh_tasks = client::authenticated(&id)?;
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        *self.task_client.write().unwrap_or_else(|e| e.into_inner()) = fresh_tasks;
        self.full_reports_only.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// A client on the task connection, with the current identity.
    pub fn task_client(&self) -> AgentServiceClient<Channel> {
        self.task_client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn client(&self) -> AgentServiceClient<Channel> {
        self.client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Uses `identity` (a renewed certificate) from the next call on.
    pub fn set_identity(&self, identity: &HostIdentity) -> Result<(), ClientError> {
        self.connect(identity, &self.server())?;
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) = identity.clone();
        Ok(())
    }

    /// `RenewCertificate` for a new key's CSR; returns the new certificate.
    pub async fn renew_certificate(&self, csr_pem: String) -> Result<String, CallError> {
        let moves = self.moves.load(Ordering::SeqCst);
        let mut client = self.client();
        let mut request = tonic::Request::new(pb::RenewCertificateRequest { csr_pem });
        request.set_timeout(Duration::from_secs(30));
        client
            .renew_certificate(request)
            .await
            .map(|r| r.into_inner().certificate_pem)
            .map_err(|s| CallError::from_status(&s))
            .inspect_err(|e| self.move_on(moves, e))
    }
}

#[async_trait]
impl ControlPlane for GrpcControlPlane {
    async fn watch_assignments(
        &self,
        known_index: u64,
        wait: Duration,
    ) -> Result<WatchAnswer, CallError> {
        let moves = self.moves.load(Ordering::SeqCst);
        let mut client = self.client();
        let mut request = tonic::Request::new(pb::WatchAssignmentsRequest {
            known_index,
            wait_seconds: u32::try_from(wait.as_secs().max(1)).unwrap_or(u32::MAX),
        });
        request.set_timeout(wait + POLL_GRACE);
        let answer = client
            .watch_assignments(request)
            .await
            .map_err(|s| CallError::from_status(&s))
            .inspect_err(|e| self.move_on(moves, e))?
            .into_inner();
        Ok(WatchAnswer {
            index: answer.index,
            changed: answer.changed,
            assignments: answer.assignments,
            retained_volumes: answer.retained_volumes,
            delete_volumes: answer.delete_volumes,
        })
    }

    async fn report_status(&self, reports: ReportStream) -> Result<(), CallError> {
        let moves = self.moves.load(Ordering::SeqCst);
        let mut client = self.client();
        if self.full_reports_only.load(Ordering::SeqCst) {
            return client
                .report_status(reports)
                .await
                .map(drop)
                .map_err(|s| CallError::from_status(&s))
                .inspect_err(|e| self.move_on(moves, e));
        }
        match heartbeat(&mut client, reports).await {
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::info!(
                    "the control plane does not take status deltas; sending full reports"
                );
                self.full_reports_only.store(true, Ordering::SeqCst);
                Err(CallError::Failed(describe_status(&s)))
            }
            r => r
                .map_err(|s| CallError::from_status(&s))
                .inspect_err(|e| self.move_on(moves, e)),
        }
    }
}

/// `identity` talking to `server`.
fn with_server(identity: &HostIdentity, server: &str) -> HostIdentity {
    let mut id = identity.clone();
    id.record.server = server.to_string();
    id
}

/// A shared control plane, as the sync loop holds it.
pub type SharedControlPlane = Arc<dyn ControlPlane>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::AgentEvent;
    use crate::model::Assignment;

    fn event(message: &str) -> AgentEvent {
        AgentEvent::about(&Assignment::test("bot-0"), "Test", message.into())
    }

    /// A port of 127.0.0.1 nothing listens on.
    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn an_unreachable_server_moves_the_calls_to_the_next_in_order() {
        crate::crypto::install_provider();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let servers: Vec<String> = (0..2)
            .map(|_| format!("https://127.0.0.1:{}", closed_port()))
            .collect();
        let identity = HostIdentity {
            record: crate::enroll::HostRecord {
                host_id: "h".into(),
                server: "https://127.0.0.1:1".into(),
            },
            key_pem: key.serialize_pem(),
            cert_pem: cert.pem(),
            ca_pem: cert.pem(),
        };
        let control = GrpcControlPlane::new(&identity, &servers).unwrap();
        assert_eq!(
            control.server(),
            servers[0],
            "the first given, not the enrolled one"
        );
        let e = control
            .watch_assignments(0, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::Unreachable(_)), "{e}");
        assert_eq!(control.server(), servers[1]);
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        let e = control
            .report_status(ReportStream::new(rx, EventQueue::default()))
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::Unreachable(_)), "{e}");
        assert_eq!(control.server(), servers[0], "round and round");

        // One server: nothing to move to.
        let alone = GrpcControlPlane::new(&identity, &[]).unwrap();
        assert_eq!(alone.server(), "https://127.0.0.1:1");
        let _ = alone.watch_assignments(0, Duration::from_secs(1)).await;
        assert_eq!(alone.server(), "https://127.0.0.1:1");
    }

    #[tokio::test]
    async fn events_go_with_the_report_the_stream_takes() {
        let events = EventQueue::default();
        let (tx, rx) = mpsc::channel(4);
        events.push(event("one"));
        tx.try_send(pb::StatusReport::default()).unwrap();
        tx.try_send(pb::StatusReport::default()).unwrap();
        // The stream fails before taking anything: the reports go, the event stays.
        drop(ReportStream::new(rx, events.clone()));
        assert_eq!(events.pending().len(), 1);

        let (tx, rx) = mpsc::channel(4);
        let mut stream = ReportStream::new(rx, events.clone());
        tx.try_send(pb::StatusReport::default()).unwrap();
        tx.try_send(pb::StatusReport::default()).unwrap();
        let first = stream.recv().await.unwrap();
        assert_eq!(first.events.len(), 1);
        assert_eq!(first.events[0].message, "one");
        assert!(events.pending().is_empty());
        // Taken once: the report queued behind it does not carry it again.
        events.push(event("two"));
        let second = stream.recv().await.unwrap();
        let messages: Vec<&str> = second.events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["two"]);
        drop(tx);
        assert!(stream.recv().await.is_none());
    }

    #[test]
    fn classifies_statuses() {
        assert!(matches!(
            CallError::from_status(&tonic::Status::unauthenticated("host removed")),
            CallError::Refused(m) if m == "host removed"
        ));
        let mut removed = tonic::Status::unauthenticated("host x has been removed");
        removed.metadata_mut().insert(
            clusterclaw_proto::metadata::REFUSAL,
            clusterclaw_proto::metadata::REFUSAL_HOST_REMOVED
                .parse()
                .unwrap(),
        );
        assert!(matches!(
            CallError::from_status(&removed),
            CallError::Removed(m) if m.contains("removed")
        ));
        let mut other = tonic::Status::unavailable("down");
        other.metadata_mut().insert(
            clusterclaw_proto::metadata::REFUSAL,
            clusterclaw_proto::metadata::REFUSAL_HOST_REMOVED
                .parse()
                .unwrap(),
        );
        assert!(
            !matches!(CallError::from_status(&other), CallError::Removed(_)),
            "only a refusal of the identity means removed"
        );
        assert!(matches!(
            CallError::from_status(&tonic::Status::unavailable("down")),
            CallError::Unreachable(_)
        ));
        assert!(matches!(
            CallError::from_status(&tonic::Status::internal("db")),
            CallError::Failed(_)
        ));
    }
}
