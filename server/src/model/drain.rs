//! Drains: a host's replicas moved elsewhere, each with its state volume, as recorded in
//! `Host.status.drain` (written by the API when a drain starts, then by the drain controller).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `RetainedVolume.reason` of a volume left behind by a drain (kept until its copy is checked
/// on the new host, or kept for good with `--discard-state`).
pub const RETAINED_BY_DRAIN: &str = "Drain";

/// Longest drain timeout accepted.
pub const MAX_DRAIN_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// A replica being moved to its host with its state: the host it left and the transfer that
/// carries its state volume.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateFrom {
    pub host: String,
    pub transfer: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum DrainPhase {
    #[default]
    Draining,
    Succeeded,
    Failed,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum DrainReplicaPhase {
    /// Not moved yet (its instance has as many replicas unavailable as it allows).
    #[default]
    Waiting,
    /// Placed on its new host, its state on the way; not Ready there yet.
    Moving,
    /// Ready on its new host.
    Moved,
    /// Could not be moved (`message` says why).
    Failed,
}

/// One replica of a drained host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainReplica {
    pub tenant: String,
    pub project: String,
    pub instance: String,
    pub replica: String,
    pub ordinal: u32,
    #[serde(default)]
    pub phase: DrainReplicaPhase,
    /// The host it goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The transfer carrying its state volume (none with `discardState`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<String>,
    /// State bytes relayed so far by the current attempt (written by the server that relays
    /// them, about once a second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// How many times its state transfer was started: more than 1 when a server restart or a
    /// broken connection made the new host ask again, each attempt starting from byte 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Hex SHA-256 of the state volume's tar, once checked end to end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Milliseconds the state transfer took, once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// A drain of a host, started by `clusterclaw drain host`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainStatus {
    #[serde(default)]
    pub phase: DrainPhase,
    /// Replicas start fresh on their new host; their old volumes stay retained here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub discard_state: bool,
    pub started_at: String,
    /// After this (RFC 3339) the replicas not moved yet fail the drain.
    pub deadline: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Filled in by the drain controller on its first pass.
    #[serde(default)]
    pub replicas: Vec<DrainReplica>,
    /// Set once the controller listed the replicas.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub listed: bool,
}

impl DrainStatus {
    pub fn is_finished(&self) -> bool {
        self.phase != DrainPhase::Draining
    }
}
