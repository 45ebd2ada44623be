//! How an instance moves from one revision to the next: `spec.updateStrategy`, the stop grace
//! period, what happens to state volumes, and the rollout's status (types and their checks).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::validate::FieldProblem;

/// Default `spec.terminationGracePeriod`.
pub const DEFAULT_TERMINATION_GRACE: Duration = Duration::from_secs(20);
/// Longest accepted `spec.terminationGracePeriod`.
pub const MAX_TERMINATION_GRACE: Duration = Duration::from_secs(3600);
/// Default `progressDeadline` of an update.
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);
/// Most steps of a canary.
pub const MAX_CANARY_STEPS: usize = 32;
/// Longest `minReadySeconds`.
pub const MAX_MIN_READY_SECONDS: u64 = 3600;

/// `spec.updateStrategy`: how replicas move to a new revision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateStrategy {
    /// `Rolling` (the default) or `Canary`.
    #[serde(default, rename = "type")]
    pub type_: UpdateType,
    /// Rolling: replicas that may be out of service at once, a count (`2`) or a percent of
    /// `spec.replicas` (`25%`, rounded down, at least 1). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub max_unavailable: Option<IntOrPercent>,
    /// Seconds an updated replica must stay Ready, without a restart, to pass the gate. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ready_seconds: Option<u64>,
    /// How long a step of the update may take before it counts as failed (`10m`, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<String>,
    /// Whether a failed update returns its replicas to the last good revision. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rollback: Option<bool>,
    /// Canary: the steps, in order; after the last one every replica is updated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<CanaryStep>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum UpdateType {
    #[default]
    Rolling,
    Canary,
}

/// A replica count or a percentage of `spec.replicas`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrPercent {
    Int(i64),
    /// `"25%"`.
    Percent(String),
}

impl IntOrPercent {
    /// The count for `total` replicas (a percent rounds down, but never below 1); `None` when
    /// the value is malformed.
    pub fn resolve(&self, total: i64) -> Option<i64> {
        match self {
            IntOrPercent::Int(n) => (*n >= 0).then_some(*n),
            IntOrPercent::Percent(p) => {
                let n: i64 = p.strip_suffix('%')?.trim().parse().ok()?;
                if !(0..=100).contains(&n) {
                    return None;
                }
                Some((total * n / 100).max(if n > 0 { 1 } else { 0 }))
            }
        }
    }
}

/// One step of a canary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanaryStep {
    /// Update this many replicas in total (counting those already updated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i64>,
    /// Update this percent of `spec.replicas` in total (rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i64>,
    /// Stop here: until `rollout promote` (`{}`) or for a `duration` (`{duration: 10m}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseStep>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PauseStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
}

/// What a canary step asks for, once checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CanaryAction {
    /// Have this many replicas on the new revision.
    Replicas(i64),
    /// Wait for `rollout promote`.
    PauseUntilPromoted,
    /// Wait this long.
    PauseFor(Duration),
}

impl CanaryStep {
    /// The step for an instance of `total` replicas; `None` when malformed (validation says why).
    pub fn resolve(&self, total: i64) -> Option<CanaryAction> {
        match (self.replicas, self.percent, &self.pause) {
            (Some(n), None, None) if n >= 0 => Some(CanaryAction::Replicas(n.min(total))),
            (None, Some(p), None) if (0..=100).contains(&p) => {
                Some(CanaryAction::Replicas(((total * p) + 99) / 100))
            }
            (None, None, Some(PauseStep { duration: None })) => {
                Some(CanaryAction::PauseUntilPromoted)
            }
            (None, None, Some(PauseStep { duration: Some(d) })) => {
                parse_duration(d).ok().map(CanaryAction::PauseFor)
            }
            _ => None,
        }
    }
}

/// `spec.volumeRetention`: what happens to a replica's state volume when the replica goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeRetention {
    /// When `spec.replicas` goes down: `Retain` (the default; scaling back up reuses it) or
    /// `Delete`.
    #[serde(default = "retain")]
    pub when_scaled: RetentionPolicy,
    /// When the instance is deleted: `Delete` (the default) or `Retain`.
    #[serde(default = "delete")]
    pub when_deleted: RetentionPolicy,
}

impl Default for VolumeRetention {
    fn default() -> Self {
        VolumeRetention {
            when_scaled: RetentionPolicy::Retain,
            when_deleted: RetentionPolicy::Delete,
        }
    }
}

fn retain() -> RetentionPolicy {
    RetentionPolicy::Retain
}

fn delete() -> RetentionPolicy {
    RetentionPolicy::Delete
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum RetentionPolicy {
    Retain,
    Delete,
}

impl RetentionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionPolicy::Retain => "Retain",
            RetentionPolicy::Delete => "Delete",
        }
    }
}

/// Where an update stands (`status.rollout.phase`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum RolloutPhase {
    #[default]
    Progressing,
    Paused,
    Succeeded,
    Failed,
    RolledBack,
}

impl RolloutPhase {
    /// Whether the update has ended (nothing more will happen until the next revision or a
    /// `rollout` command).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutPhase::Succeeded | RolloutPhase::Failed | RolloutPhase::RolledBack
        )
    }
}

/// `status.rollout`: the update to `revision`, as the rollout controller runs it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The revision being rolled out (the newest revision of the instance).
    pub revision: u64,
    pub phase: RolloutPhase,
    /// Replicas whose target is `revision`.
    #[serde(default)]
    pub updated_replicas: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The last revision whose replicas all passed their gate; a failed update returns to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<u64>,
    /// Canary: the index of the step in progress (`steps.len()` once past the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// When the update (or the current step) started, RFC 3339; the progress deadline counts
    /// from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Set by `rollout pause`, cleared by `rollout resume`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Set by `rollout promote`: the pause at this step index is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_step: Option<u32>,
    /// Set by a fleet-wide change (a `Rollout`) while this instance waits for its wave: the
    /// rollout controller does not start the update until it is cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
}

/// A state volume kept after its replica went (scale-down with `whenScaled: Retain`, or a
/// failover that moved the replica off its host).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetainedVolume {
    pub replica: String,
    pub ordinal: u32,
    pub host: String,
    /// When the replica went, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Why it is kept: none for a scale-down, `Failover` when the replica was rescheduled off
    /// a lost host (kept whatever `volumeRetention.whenScaled` says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `RetainedVolume.reason` of a volume left behind by a failover.
pub const RETAINED_BY_FAILOVER: &str = "Failover";

impl RetainedVolume {
    pub fn from_failover(&self) -> bool {
        self.reason.as_deref() == Some(RETAINED_BY_FAILOVER)
    }

    /// Left by a drain: kept whatever `volumeRetention.whenScaled` says, until the drain
    /// controller lets it go.
    pub fn from_drain(&self) -> bool {
        self.reason.as_deref() == Some(super::RETAINED_BY_DRAIN)
    }

    /// Kept whatever `volumeRetention.whenScaled` says (left by a failover or a drain).
    pub fn always_kept(&self) -> bool {
        self.from_failover() || self.from_drain()
    }
}

/// A snapshot of a replica's state volume, taken on its host before a version change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    /// Snapshot id, unique on its host.
    pub id: String,
    /// The image whose state it holds (the one the replica ran when it was taken).
    pub image: String,
    /// When it was taken, RFC 3339.
    pub taken_at: String,
    pub bytes: u64,
}

/// Parses a duration such as `30s`, `10m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); write it as 30s, 10m or 1h"))
}

/// Checks `spec.updateStrategy`, `spec.terminationGracePeriod` and `spec.volumeRetention`.
pub fn check_update_strategy(s: &UpdateStrategy, grace: Option<&str>, out: &mut Vec<FieldProblem>) {
    const F: &str = "spec.updateStrategy";
    if let Some(m) = &s.max_unavailable {
        let ok = match m {
            IntOrPercent::Int(n) => *n >= 1,
            IntOrPercent::Percent(_) => m.resolve(100).is_some_and(|n| n >= 1),
        };
        if !ok {
            out.push(FieldProblem::new(
                format!("{F}.maxUnavailable"),
                "must be a count of at least 1 (2) or a percent between 1% and 100% (25%)",
            ));
        }
        if s.type_ == UpdateType::Canary {
            out.push(FieldProblem::new(
                format!("{F}.maxUnavailable"),
                "applies to type Rolling only; a Canary moves as its steps say",
            ));
        }
    }
    if let Some(n) = s.min_ready_seconds
        && n > MAX_MIN_READY_SECONDS
    {
        out.push(FieldProblem::new(
            format!("{F}.minReadySeconds"),
            format!("{n} is out of range; at most {MAX_MIN_READY_SECONDS}"),
        ));
    }
    if let Some(d) = &s.progress_deadline {
        match parse_duration(d) {
            Ok(d) if d < Duration::from_secs(1) => out.push(FieldProblem::new(
                format!("{F}.progressDeadline"),
                "must be at least 1s",
            )),
            Ok(_) => {}
            Err(e) => out.push(FieldProblem::new(format!("{F}.progressDeadline"), e)),
        }
    }
    match s.type_ {
        UpdateType::Rolling => {
            if !s.steps.is_empty() {
                out.push(FieldProblem::new(
                    format!("{F}.steps"),
                    "apply to type Canary only; set type: Canary or leave steps out",
                ));
            }
        }
        UpdateType::Canary => {
            if s.steps.is_empty() {
                out.push(FieldProblem::new(
                    format!("{F}.steps"),
                    "a Canary needs at least one step: {replicas: N}, {percent: P}, {pause: {}} or {pause: {duration: 10m}}",
                ));
            }
            if s.steps.len() > MAX_CANARY_STEPS {
                out.push(FieldProblem::new(
                    format!("{F}.steps"),
                    format!("{} steps; at most {MAX_CANARY_STEPS}", s.steps.len()),
                ));
            }
            for (i, step) in s.steps.iter().enumerate() {
                let field = format!("{F}.steps[{i}]");
                let set = [
                    step.replicas.is_some(),
                    step.percent.is_some(),
                    step.pause.is_some(),
                ]
                .iter()
                .filter(|b| **b)
                .count();
                if set != 1 {
                    out.push(FieldProblem::new(
                        field,
                        "a step is exactly one of {replicas: N}, {percent: P}, {pause: {}} or {pause: {duration: 10m}}",
                    ));
                    continue;
                }
                if let Some(n) = step.replicas
                    && n < 0
                {
                    out.push(FieldProblem::new(
                        format!("{field}.replicas"),
                        format!("{n} is out of range; at least 0"),
                    ));
                }
                if let Some(p) = step.percent
                    && !(0..=100).contains(&p)
                {
                    out.push(FieldProblem::new(
                        format!("{field}.percent"),
                        format!("{p} is out of range; between 0 and 100"),
                    ));
                }
                if let Some(PauseStep { duration: Some(d) }) = &step.pause
                    && let Err(e) = parse_duration(d)
                {
                    out.push(FieldProblem::new(format!("{field}.pause.duration"), e));
                }
            }
        }
    }
    if let Some(g) = grace {
        match parse_duration(g) {
            Ok(d) if d > MAX_TERMINATION_GRACE => out.push(FieldProblem::new(
                "spec.terminationGracePeriod",
                format!("{g} is too long; at most 1h"),
            )),
            Ok(_) => {}
            Err(e) => out.push(FieldProblem::new("spec.terminationGracePeriod", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percents() {
        assert_eq!(IntOrPercent::Int(2).resolve(10), Some(2));
        assert_eq!(IntOrPercent::Percent("10%".into()).resolve(1000), Some(100));
        assert_eq!(IntOrPercent::Percent("10%".into()).resolve(3), Some(1));
        assert_eq!(IntOrPercent::Percent("ten".into()).resolve(3), None);
        let s = |r, p| CanaryStep {
            replicas: r,
            percent: p,
            pause: None,
        };
        assert_eq!(s(Some(1), None).resolve(3), Some(CanaryAction::Replicas(1)));
        assert_eq!(
            s(None, Some(50)).resolve(3),
            Some(CanaryAction::Replicas(2))
        );
        assert_eq!(s(Some(9), None).resolve(3), Some(CanaryAction::Replicas(3)));
    }

    #[test]
    fn bad_strategies_are_named_field_by_field() {
        let mut out = Vec::new();
        let s = UpdateStrategy {
            type_: UpdateType::Canary,
            max_unavailable: Some(IntOrPercent::Percent("0%".into())),
            progress_deadline: Some("soon".into()),
            steps: vec![
                CanaryStep {
                    replicas: Some(1),
                    percent: Some(2),
                    pause: None,
                },
                CanaryStep {
                    replicas: None,
                    percent: None,
                    pause: Some(PauseStep {
                        duration: Some("x".into()),
                    }),
                },
            ],
            ..Default::default()
        };
        check_update_strategy(&s, Some("2h"), &mut out);
        let fields: Vec<&str> = out.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.updateStrategy.maxUnavailable",
                "spec.updateStrategy.maxUnavailable",
                "spec.updateStrategy.progressDeadline",
                "spec.updateStrategy.steps[0]",
                "spec.updateStrategy.steps[1].pause.duration",
                "spec.terminationGracePeriod",
            ]
        );
    }
}
