//! Generated code for the agent protocol (`clusterclaw.agent.v1`) and the codec it uses.

pub mod codec;

/// `clusterclaw.agent.v1`: Enroll, RenewCertificate, WatchAssignments, ReportStatus.
pub mod agent {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("clusterclaw.agent.v1");
}

/// gRPC response metadata both sides agree on (names only).
pub mod metadata {
    /// Set on an `Unauthenticated` answer to say why the host was refused.
    pub const REFUSAL: &str = "clusterclaw-refusal";
    /// [`REFUSAL`]'s value when the host has been removed from the cluster (its certificate is
    /// revoked): the agent stops its replicas and waits to be enrolled again.
    pub const REFUSAL_HOST_REMOVED: &str = "host-removed";
}
