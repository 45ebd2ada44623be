//! `spec.failover`: what happens to an instance's replicas when their host stops reporting.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{FieldProblem, parse_duration};

/// How long a replica's host must have been NotReady before `Reschedule` moves it (`5m`).
pub const DEFAULT_FAILOVER_AFTER: Duration = Duration::from_secs(300);
/// The shortest `failover.after` accepted.
pub const MIN_FAILOVER_AFTER: Duration = Duration::from_secs(5);
/// The shortest `failover.stopAfter` accepted.
pub const MIN_FAILOVER_STOP_AFTER: Duration = Duration::from_secs(1);

/// `spec.failover`.
///
/// `Manual` (the default): a replica stays on its host whatever happens to the host; nothing
/// is started elsewhere and nothing is lost silently. `Reschedule`: once the host has been
/// NotReady for `after`, the replica is placed on another host with a new epoch and starts
/// with fresh state (its volume stays on the lost host and is retained there). An agent that
/// has not reached the control plane for `stopAfter` stops such replicas itself, so the old
/// copy is down before the new one starts; `stopAfter` defaults to half of `after` and must be
/// shorter than it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Failover {
    #[serde(default)]
    pub policy: FailoverPolicy,
    /// How long the host must have been NotReady before the replica moves (`5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// How long an agent cut off from the control plane keeps the replica running (half of
    /// `after` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum FailoverPolicy {
    #[default]
    Manual,
    Reschedule,
}

impl Failover {
    pub fn is_default(&self) -> bool {
        *self == Failover::default()
    }

    /// Whether replicas move off a lost host.
    pub fn reschedules(&self) -> bool {
        self.policy == FailoverPolicy::Reschedule
    }

    /// `after`, defaulted (after validation this cannot fail; the default if it does).
    pub fn after(&self) -> Duration {
        self.after
            .as_deref()
            .and_then(|d| parse_duration(d).ok())
            .unwrap_or(DEFAULT_FAILOVER_AFTER)
    }

    /// `stopAfter`, defaulted to half of `after`.
    pub fn stop_after(&self) -> Duration {
        self.stop_after
            .as_deref()
            .and_then(|d| parse_duration(d).ok())
            .unwrap_or_else(|| self.after() / 2)
    }

    /// The seconds an agent may stay cut off before stopping the replica: 0 (never) unless the
    /// policy is `Reschedule`; at least 1.
    pub fn stop_after_seconds(&self) -> u32 {
        if !self.reschedules() {
            return 0;
        }
        u32::try_from(self.stop_after().as_secs().max(1)).unwrap_or(u32::MAX)
    }
}

/// Checks `spec.failover`.
pub fn check_failover(f: &Failover, out: &mut Vec<FieldProblem>) {
    const F: &str = "spec.failover";
    if f.policy == FailoverPolicy::Manual {
        for (field, value) in [("after", &f.after), ("stopAfter", &f.stop_after)] {
            if value.is_some() {
                out.push(FieldProblem::new(
                    format!("{F}.{field}"),
                    "applies to policy Reschedule only; with Manual replicas wait for their host",
                ));
            }
        }
        return;
    }
    let after = match f.after.as_deref().map(parse_duration) {
        None => Some(DEFAULT_FAILOVER_AFTER),
        Some(Ok(d)) if d < MIN_FAILOVER_AFTER => {
            out.push(FieldProblem::new(
                format!("{F}.after"),
                format!(
                    "{:?} is too short; at least {}s",
                    f.after.as_deref().unwrap_or_default(),
                    MIN_FAILOVER_AFTER.as_secs()
                ),
            ));
            None
        }
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            out.push(FieldProblem::new(format!("{F}.after"), e));
            None
        }
    };
    if let Some(s) = f.stop_after.as_deref() {
        match parse_duration(s) {
            Ok(d) if d < MIN_FAILOVER_STOP_AFTER => out.push(FieldProblem::new(
                format!("{F}.stopAfter"),
                format!(
                    "{s:?} is too short; at least {}s",
                    MIN_FAILOVER_STOP_AFTER.as_secs()
                ),
            )),
            Ok(d) => {
                if let Some(a) = after
                    && d >= a
                {
                    out.push(FieldProblem::new(
                        format!("{F}.stopAfter"),
                        format!(
                            "{s:?} must be shorter than after ({}), so the old copy stops before a new one starts",
                            humantime::format_duration(a)
                        ),
                    ));
                }
            }
            Err(e) => out.push(FieldProblem::new(format!("{F}.stopAfter"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(f: &Failover) -> Vec<String> {
        let mut out = Vec::new();
        check_failover(f, &mut out);
        out.iter().map(ToString::to_string).collect()
    }

    fn reschedule(after: Option<&str>, stop_after: Option<&str>) -> Failover {
        Failover {
            policy: FailoverPolicy::Reschedule,
            after: after.map(Into::into),
            stop_after: stop_after.map(Into::into),
        }
    }

    #[test]
    fn defaults() {
        let f = Failover::default();
        assert!(!f.reschedules());
        assert_eq!(f.stop_after_seconds(), 0);
        let r = reschedule(None, None);
        assert_eq!(r.after(), Duration::from_secs(300));
        assert_eq!(r.stop_after(), Duration::from_secs(150));
        assert_eq!(r.stop_after_seconds(), 150);
        let r = reschedule(Some("20s"), Some("10s"));
        assert_eq!(r.stop_after_seconds(), 10);
        assert!(problems(&r).is_empty());
        assert!(problems(&reschedule(Some("1m"), None)).is_empty());
    }

    #[test]
    fn problems_name_the_field_and_what_is_allowed() {
        let p = problems(&reschedule(Some("20s"), Some("20s")));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("spec.failover.stopAfter"), "{p:?}");
        assert!(p[0].contains("shorter than after (20s)"), "{p:?}");
        let p = problems(&reschedule(Some("2s"), None));
        assert!(
            p[0].contains("spec.failover.after") && p[0].contains("at least 5s"),
            "{p:?}"
        );
        let p = problems(&reschedule(Some("soon"), Some("0s")));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("write it as 30s"), "{p:?}");
        let p = problems(&Failover {
            policy: FailoverPolicy::Manual,
            after: Some("1m".into()),
            stop_after: None,
        });
        assert!(
            p[0].contains("spec.failover.after") && p[0].contains("policy Reschedule only"),
            "{p:?}"
        );
    }
}
