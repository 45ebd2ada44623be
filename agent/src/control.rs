//! The control plane as the sync loop sees it: a small [`ControlPlane`] trait (long poll and status stream) and its gRPC implementation over mutual TLS.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use clusterclaw_proto::agent as pb;
use clusterclaw_proto::agent::agent_service_client::AgentServiceClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::client::{self, ClientError};
use crate::enroll::HostIdentity;

/// Extra time a long poll may take beyond the wait the server was asked for, before the agent
/// gives up on the call and asks again.
pub const POLL_GRACE: Duration = Duration::from_secs(15);

/// The answer to one long poll.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchAnswer {
    pub index: u64,
    pub changed: bool,
    pub assignments: Vec<pb::Assignment>,
}

/// Why a call to the control plane failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The server could not be reached, or it did not answer in time: try again later.
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// The server refused this host (revoked, unknown certificate): retrying will not help
    /// until an operator acts, but the host keeps running its replicas.
    #[error("the control plane refused this host: {0}")]
    Refused(String),
    /// The server answered with another error.
    #[error("the control plane failed the call: {0}")]
    Failed(String),
}

impl CallError {
    /// Classifies a gRPC status.
    pub fn from_status(status: &tonic::Status) -> CallError {
        use tonic::Code;
        let text = describe_status(status);
        match status.code() {
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

    /// `ReportStatus`: streams what arrives on `reports` until the channel closes (then `Ok`)
    /// or the call fails.
    async fn report_status(
        &self,
        reports: mpsc::Receiver<pb::StatusReport>,
    ) -> Result<(), CallError>;
}

/// The control plane over gRPC, authenticated as the enrolled host. The identity can be
/// swapped after a certificate renewal; the next call uses it.
pub struct GrpcControlPlane {
    client: RwLock<AgentServiceClient<Channel>>,
}

impl GrpcControlPlane {
    pub fn new(identity: &HostIdentity) -> Result<Self, ClientError> {
        Ok(GrpcControlPlane {
            client: RwLock::new(client::authenticated(identity)?),
        })
    }

    fn client(&self) -> AgentServiceClient<Channel> {
        self.client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Uses `identity` (a renewed certificate) from the next call on.
    pub fn set_identity(&self, identity: &HostIdentity) -> Result<(), ClientError> {
        let fresh = client::authenticated(identity)?;
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// `RenewCertificate` for a new key's CSR; returns the new certificate.
    pub async fn renew_certificate(&self, csr_pem: String) -> Result<String, CallError> {
        let mut client = self.client();
        let mut request = tonic::Request::new(pb::RenewCertificateRequest { csr_pem });
        request.set_timeout(Duration::from_secs(30));
        client
            .renew_certificate(request)
            .await
            .map(|r| r.into_inner().certificate_pem)
            .map_err(|s| CallError::from_status(&s))
    }
}

#[async_trait]
impl ControlPlane for GrpcControlPlane {
    async fn watch_assignments(
        &self,
        known_index: u64,
        wait: Duration,
    ) -> Result<WatchAnswer, CallError> {
        let mut client = self.client();
        let mut request = tonic::Request::new(pb::WatchAssignmentsRequest {
            known_index,
            wait_seconds: u32::try_from(wait.as_secs().max(1)).unwrap_or(u32::MAX),
        });
        request.set_timeout(wait + POLL_GRACE);
        let answer = client
            .watch_assignments(request)
            .await
            .map_err(|s| CallError::from_status(&s))?
            .into_inner();
        Ok(WatchAnswer {
            index: answer.index,
            changed: answer.changed,
            assignments: answer.assignments,
        })
    }

    async fn report_status(
        &self,
        reports: mpsc::Receiver<pb::StatusReport>,
    ) -> Result<(), CallError> {
        let mut client = self.client();
        let stream = tokio_stream::wrappers::ReceiverStream::new(reports);
        client
            .report_status(stream)
            .await
            .map(drop)
            .map_err(|s| CallError::from_status(&s))
    }
}

/// A shared control plane, as the sync loop holds it.
pub type SharedControlPlane = Arc<dyn ControlPlane>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_statuses() {
        assert!(matches!(
            CallError::from_status(&tonic::Status::unauthenticated("host removed")),
            CallError::Refused(m) if m == "host removed"
        ));
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
