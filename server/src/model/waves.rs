//! The fleet-wide `Rollout` kind: one change moved across many instances in waves, halted at the
//! first instance that fails its gate (types, defaults and their checks).
//!
//! Where a Rollout lives decides who may run it, with the permission machinery every other kind
//! uses (the caller's tenant scope against the object's key):
//!
//! - `metadata.tenant` set: a tenant's Rollout. Its selector may reach only that tenant's
//!   instances (`spec.selector.tenant` is that tenant or left out), so a tenant-admin may create
//!   one inside its own tenant, and never reach another's.
//! - `metadata.tenant` left out: a cluster-wide Rollout, across tenants; only a platform-admin
//!   may write one.
//!
//! Two sources: a write that revises instances through a shared layer (a `ConfigTemplate`, a
//! tenant's or project's `spec.config`, a secret's values) makes one system Rollout listing the
//! instances it reached (`spec.instances`, `spec.change`) and holds each of them
//! (`status.rollout.heldBy`) until its wave; a user's Rollout names `spec.selector` and
//! `spec.version` (or `spec.image`) and writes that version into the matched instances' spec,
//! wave by wave.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::SortedMap;
use super::rollout::{IntOrPercent, parse_duration};
use super::validate::FieldProblem;

/// `spec.waves` when none are given: one instance, then 10%, 50% and all of them.
pub fn default_waves() -> Vec<IntOrPercent> {
    vec![
        IntOrPercent::Int(1),
        IntOrPercent::Percent("10%".into()),
        IntOrPercent::Percent("50%".into()),
        IntOrPercent::Percent("100%".into()),
    ]
}

/// The waves and bake time given to the Rollouts that changes to shared layers make (the
/// server's `[rollouts]` settings); each such Rollout records them in its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetDefaults {
    pub waves: Vec<IntOrPercent>,
    pub bake_time: String,
}

impl Default for FleetDefaults {
    fn default() -> Self {
        FleetDefaults {
            waves: default_waves(),
            bake_time: "1m".into(),
        }
    }
}

static FLEET_DEFAULTS: std::sync::RwLock<Option<FleetDefaults>> = std::sync::RwLock::new(None);

/// Sets the waves and bake time of the Rollouts this server's writes make from now on.
pub fn set_fleet_defaults(d: FleetDefaults) {
    *FLEET_DEFAULTS.write().unwrap_or_else(|e| e.into_inner()) = Some(d);
}

/// What [`set_fleet_defaults`] set, or the built-in defaults.
pub fn fleet_defaults() -> FleetDefaults {
    FLEET_DEFAULTS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// Parses a list of waves written `1,10%,50%,100%`; the error says what is allowed.
pub fn parse_waves(s: &str) -> Result<Vec<IntOrPercent>, String> {
    let waves: Vec<IntOrPercent> = s
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(|w| match w.parse::<i64>() {
            Ok(n) => IntOrPercent::Int(n),
            Err(_) => IntOrPercent::Percent(w.to_string()),
        })
        .collect();
    if waves.is_empty() || waves.len() > MAX_WAVES || wave_sizes(&waves, 100).is_none() {
        return Err(format!(
            "{s:?} is not a list of waves; write between 1 and {MAX_WAVES} counts of at least 1 or percents between 1% and 100%, separated by commas, such as 1,10%,50%,100%"
        ));
    }
    Ok(waves)
}

/// Parses a bake time (at most 24h).
pub fn parse_bake_time(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > MAX_BAKE_TIME {
        return Err(format!("{s:?} is too long; a bake time is at most 24h"));
    }
    Ok(d)
}

/// `spec.bakeTime` when none is given.
pub const DEFAULT_BAKE_TIME: Duration = Duration::from_secs(60);
/// Most waves of a Rollout.
pub const MAX_WAVES: usize = 32;
/// Longest bake time.
pub const MAX_BAKE_TIME: Duration = Duration::from_secs(24 * 3600);
/// A write that revises at least this many instances through a shared layer moves in waves;
/// a change reaching one instance goes straight to that instance's own update, which already
/// gates it.
pub const MIN_FLEET_INSTANCES: usize = 2;

/// Which instances a user's Rollout changes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSelector {
    /// Only this tenant's instances (required to equal `metadata.tenant` when that is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Only this project's instances (needs `tenant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Instances must carry all these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl RolloutSelector {
    /// Whether an instance at `tenant/project` with `labels` is selected.
    pub fn matches(&self, tenant: &str, project: &str, labels: &SortedMap<String, String>) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
            && self.project.as_deref().is_none_or(|p| p == project)
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// An instance a Rollout moves: `tenant/project/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceRef {
    pub tenant: String,
    pub project: String,
    pub name: String,
}

impl std::fmt::Display for InstanceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.project, self.name)
    }
}

/// `spec` of a `Rollout`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// A user's Rollout: the instances to change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<RolloutSelector>,
    /// A user's Rollout: the OpenClaw release written into every selected instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// A user's Rollout: the full image written instead of `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A system Rollout: the object whose change it moves (`configtemplate/default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    /// A system Rollout: the instances the change revised, in the order they move.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceRef>,
    /// Cumulative size of each wave: a count (`1`) or a percent of the instances (`10%`,
    /// rounded up). Default `[1, 10%, 50%, 100%]`; the last wave always takes every instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub waves: Option<Vec<IntOrPercent>>,
    /// How long to wait after every instance of a wave succeeded before the next wave (`1m`,
    /// the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_time: Option<String>,
    /// No further wave starts while true (updates already under way go on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

impl RolloutSpec {
    /// The waves, defaulted.
    pub fn waves_or_default(&self) -> Vec<IntOrPercent> {
        self.waves.clone().unwrap_or_else(default_waves)
    }

    /// The bake time, defaulted (a malformed value, refused at admission, counts as the default).
    pub fn bake(&self) -> Duration {
        self.bake_time
            .as_deref()
            .and_then(|b| parse_duration(b).ok())
            .unwrap_or(DEFAULT_BAKE_TIME)
    }

    /// Whether this Rollout was made by a write to a shared layer.
    pub fn is_system(&self) -> bool {
        self.change.is_some()
    }
}

/// `status.phase` of a `Rollout`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum WavePhase {
    #[default]
    Progressing,
    Paused,
    Succeeded,
    /// An instance failed its gate: nothing further moves.
    Halted,
}

impl WavePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            WavePhase::Progressing => "Progressing",
            WavePhase::Paused => "Paused",
            WavePhase::Succeeded => "Succeeded",
            WavePhase::Halted => "Halted",
        }
    }
}

/// Where one instance of a Rollout stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum WaveInstanceState {
    /// Waiting for its wave, on its old revision.
    #[default]
    Held,
    /// Released: its own update is under way.
    Progressing,
    Succeeded,
    /// Its update failed or was rolled back: the Rollout halted here.
    Failed,
    /// A newer change took it over.
    Superseded,
    /// It was deleted.
    Gone,
}

/// One instance in `status.instances`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaveInstance {
    pub tenant: String,
    pub project: String,
    pub name: String,
    /// The wave it moves in, from 0.
    pub wave: u32,
    pub state: WaveInstanceState,
    /// The revision it must reach (known at release for a user's Rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// A user's Rollout: the `version` and `image` the instance had before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl WaveInstance {
    pub fn instance(&self) -> InstanceRef {
        InstanceRef {
            tenant: self.tenant.clone(),
            project: self.project.clone(),
            name: self.name.clone(),
        }
    }
}

/// Instances per state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaveCounts {
    pub held: u32,
    pub progressing: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub superseded: u32,
    pub gone: u32,
}

/// `status` of a `Rollout`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaveStatus {
    pub phase: WavePhase,
    /// The wave in progress, from 0 (`waves` once all are done).
    #[serde(default)]
    pub wave: u32,
    /// How many waves there are.
    #[serde(default)]
    pub waves: u32,
    #[serde(default)]
    pub counts: WaveCounts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The instance that failed its gate (`tenant/project/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_instance: Option<String>,
    /// When every instance of the current wave had succeeded: the bake time counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_done_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Every instance the Rollout moves, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<WaveInstance>,
}

/// The cumulative size of each wave for `total` instances: counts as given, percents rounded up
/// (a non-zero percent is at least 1), each clamped to `total`; waves that add nothing are
/// dropped, and a last wave takes the rest when the given ones stop short. `None` when a wave
/// is malformed (admission says why).
pub fn wave_sizes(waves: &[IntOrPercent], total: usize) -> Option<Vec<usize>> {
    let mut out: Vec<usize> = Vec::new();
    if total == 0 {
        // Still check the waves, so a malformed one is refused whatever it would reach.
        return wave_sizes(waves, 1).map(|_| out);
    }
    for w in waves {
        let n = match w {
            IntOrPercent::Int(n) if *n >= 1 => *n as usize,
            IntOrPercent::Int(_) => return None,
            IntOrPercent::Percent(p) => {
                let p: usize = p.strip_suffix('%')?.trim().parse().ok()?;
                if !(1..=100).contains(&p) {
                    return None;
                }
                (total * p).div_ceil(100)
            }
        };
        let n = n.min(total);
        if out.last().is_none_or(|last| n > *last) {
            out.push(n);
        }
    }
    if total > 0 && out.last().is_none_or(|last| *last < total) {
        out.push(total);
    }
    Some(out)
}

/// Checks a Rollout's spec; `tenant` is its `metadata.tenant`.
pub fn check_rollout(spec: &RolloutSpec, tenant: Option<&str>, out: &mut Vec<FieldProblem>) {
    if let Some(waves) = &spec.waves {
        if waves.is_empty() || waves.len() > MAX_WAVES {
            out.push(FieldProblem::new(
                "spec.waves",
                format!("must list between 1 and {MAX_WAVES} waves, such as [1, 10%, 50%, 100%]"),
            ));
        } else if wave_sizes(waves, 100).is_none() {
            out.push(FieldProblem::new(
                "spec.waves",
                "each wave is a count of at least 1 (5) or a percent between 1% and 100% (10%)",
            ));
        }
    }
    if let Some(b) = &spec.bake_time {
        match parse_duration(b) {
            Ok(d) if d <= MAX_BAKE_TIME => {}
            Ok(_) => out.push(FieldProblem::new(
                "spec.bakeTime",
                "must be at most 24h".to_string(),
            )),
            Err(e) => out.push(FieldProblem::new("spec.bakeTime", e)),
        }
    }
    if spec.is_system() {
        if spec.selector.is_some() || spec.version.is_some() || spec.image.is_some() {
            out.push(FieldProblem::new(
                "spec.change",
                "a Rollout made by a change lists its instances; selector, version and image belong to a Rollout that sets a version",
            ));
        }
        return;
    }
    if !spec.instances.is_empty() {
        out.push(FieldProblem::new(
            "spec.instances",
            "is written by the server for a change to a shared layer; select instances with spec.selector",
        ));
    }
    match &spec.selector {
        None => out.push(FieldProblem::new(
            "spec.selector",
            "is required: the instances to change ({labels: {...}, tenant, project})",
        )),
        Some(s) => {
            if s.project.is_some() && s.tenant.is_none() {
                out.push(FieldProblem::new(
                    "spec.selector.project",
                    "needs spec.selector.tenant",
                ));
            }
            if let (Some(own), Some(sel)) = (tenant, s.tenant.as_deref())
                && own != sel
            {
                out.push(FieldProblem::new(
                    "spec.selector.tenant",
                    format!(
                        "{sel:?} is outside this Rollout's tenant {own:?}; a tenant's Rollout reaches only its own instances (a cluster-wide Rollout leaves metadata.tenant out)"
                    ),
                ));
            }
        }
    }
    match (&spec.version, &spec.image) {
        (None, None) => out.push(FieldProblem::new(
            "spec.version",
            "is required (or spec.image): the release to set on the selected instances",
        )),
        (Some(v), _) => {
            if let Err(e) = super::validate::validate_version(v) {
                out.push(FieldProblem::new("spec.version", e));
            }
        }
        (None, Some(i)) if i.trim().is_empty() => {
            out.push(FieldProblem::new("spec.image", "must not be empty"))
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_waves_are_parsed_from_text() {
        assert_eq!(
            parse_waves("1,10%, 100%").unwrap(),
            default_waves()[..2]
                .iter()
                .cloned()
                .chain([IntOrPercent::Percent("100%".into())])
                .collect::<Vec<_>>()
        );
        assert!(parse_waves("").is_err());
        assert!(parse_waves("0").is_err());
        assert!(parse_waves("soon").unwrap_err().contains("1,10%,50%,100%"));
        assert!(parse_bake_time("2d").is_err());
        assert_eq!(parse_bake_time("0s").unwrap(), Duration::ZERO);
    }

    fn p(s: &str) -> IntOrPercent {
        IntOrPercent::Percent(s.into())
    }

    #[test]
    fn default_waves_for_six_and_a_hundred() {
        assert_eq!(wave_sizes(&default_waves(), 6), Some(vec![1, 3, 6]));
        assert_eq!(
            wave_sizes(&default_waves(), 100),
            Some(vec![1, 10, 50, 100])
        );
        assert_eq!(wave_sizes(&default_waves(), 1), Some(vec![1]));
        assert_eq!(wave_sizes(&default_waves(), 0), Some(vec![]));
    }

    #[test]
    fn counts_clamp_and_a_short_list_gets_a_last_wave() {
        assert_eq!(
            wave_sizes(&[IntOrPercent::Int(2), IntOrPercent::Int(50)], 10),
            Some(vec![2, 10])
        );
        assert_eq!(wave_sizes(&[p("25%")], 10), Some(vec![3, 10]));
        assert_eq!(wave_sizes(&[p("0%")], 10), None);
        assert_eq!(wave_sizes(&[IntOrPercent::Int(0)], 10), None);
        assert_eq!(wave_sizes(&[p("ten")], 10), None);
    }

    #[test]
    fn a_tenant_rollout_cannot_select_another_tenant() {
        let spec = RolloutSpec {
            selector: Some(RolloutSelector {
                tenant: Some("globex".into()),
                ..Default::default()
            }),
            version: Some("2026.7.1".into()),
            ..Default::default()
        };
        let mut out = Vec::new();
        check_rollout(&spec, Some("acme"), &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].field, "spec.selector.tenant");
        let mut out = Vec::new();
        check_rollout(&spec, None, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn bad_waves_and_bake_time_name_their_field() {
        let spec = RolloutSpec {
            selector: Some(RolloutSelector::default()),
            version: Some("2026.7.1".into()),
            waves: Some(vec![p("150%")]),
            bake_time: Some("soon".into()),
            ..Default::default()
        };
        let mut out = Vec::new();
        check_rollout(&spec, None, &mut out);
        let fields: Vec<&str> = out.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["spec.waves", "spec.bakeTime"]);
    }
}
