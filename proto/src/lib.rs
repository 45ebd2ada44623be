//! Generated code for the agent protocol (`clusterclaw.agent.v1`); no logic lives here.

/// `clusterclaw.agent.v1`: Enroll, RenewCertificate, WatchAssignments, ReportStatus.
pub mod agent {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("clusterclaw.agent.v1");
}
