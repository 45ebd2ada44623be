//! The list of state volumes a status report carries: bounded in size, and sent only when the set changed or every few minutes.

use std::time::Duration;

use clusterclaw_proto::agent as pb;
use tokio::time::Instant;

use crate::runtime::{ObservedVolume, labels};

/// At most this many volumes go into one report (the first by name); the report also says how
/// many there are in all.
pub const MAX_REPORTED_VOLUMES: usize = 256;
/// An unchanged list is sent again this often, so a restarted server learns it.
pub const VOLUME_REPORT_INTERVAL: Duration = Duration::from_secs(300);

/// What the last report said about the volumes.
#[derive(Debug, Default)]
pub struct VolumeReporter {
    last: Option<(Vec<pb::StateVolume>, u32, Instant)>,
}

/// The list for a report: `observed` (this agent's own volumes and those of its earlier identities) as [`pb::StateVolume`]s,
/// sorted by name, at most [`MAX_REPORTED_VOLUMES`], and the total.
pub fn volume_list(observed: &[ObservedVolume]) -> (Vec<pb::StateVolume>, u32) {
    let mut all: Vec<pb::StateVolume> = observed
        .iter()
        .filter(|v| v.labels.contains_key(labels::REPLICA))
        .map(|v| {
            let label = |k: &str| v.labels.get(k).cloned().unwrap_or_default();
            pb::StateVolume {
                name: v.name.clone(),
                tenant: label(labels::TENANT),
                project: label(labels::PROJECT),
                instance: label(labels::INSTANCE),
                replica: label(labels::REPLICA),
            }
        })
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let total = u32::try_from(all.len()).unwrap_or(u32::MAX);
    all.truncate(MAX_REPORTED_VOLUMES);
    (all, total)
}

impl VolumeReporter {
    /// The list to attach to the next report, or `None` when the last one sent still holds and
    /// is younger than [`VOLUME_REPORT_INTERVAL`]. `observed` is `None` while the engine has not
    /// been observed: nothing is sent then.
    pub fn next(
        &mut self,
        observed: Option<&[ObservedVolume]>,
        now: Instant,
    ) -> Option<(Vec<pb::StateVolume>, u32)> {
        let (list, total) = volume_list(observed?);
        if let Some((last, last_total, at)) = &self.last
            && *last == list
            && *last_total == total
            && now.duration_since(*at) < VOLUME_REPORT_INTERVAL
        {
            return None;
        }
        self.last = Some((list.clone(), total, now));
        Some((list, total))
    }

    /// Forgets what was sent (the report did not reach the server), so the next report sends it.
    pub fn forget(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn volume(name: &str, replica: Option<&str>) -> ObservedVolume {
        let mut labels = BTreeMap::from([
            (labels::TENANT.to_owned(), "acme".to_owned()),
            (labels::PROJECT.to_owned(), "helpdesk".to_owned()),
            (labels::INSTANCE.to_owned(), "bot".to_owned()),
        ]);
        if let Some(r) = replica {
            labels.insert(labels::REPLICA.to_owned(), r.to_owned());
        }
        ObservedVolume {
            name: name.to_owned(),
            labels,
        }
    }

    #[test]
    fn the_list_is_sorted_bounded_and_counts_everything() {
        let many: Vec<ObservedVolume> = (0..MAX_REPORTED_VOLUMES + 10)
            .rev()
            .map(|i| volume(&format!("v-{i:04}"), Some(&format!("bot-{i}"))))
            .chain([volume("no-replica-label", None)])
            .collect();
        let (list, total) = volume_list(&many);
        assert_eq!(list.len(), MAX_REPORTED_VOLUMES);
        assert_eq!(total as usize, MAX_REPORTED_VOLUMES + 10);
        assert_eq!(list[0].name, "v-0000");
        assert_eq!(list[0].replica, "bot-0");
        assert_eq!(list[0].tenant, "acme");
        assert!(list.windows(2).all(|w| w[0].name < w[1].name));
    }

    #[test]
    fn sent_when_changed_or_every_few_minutes() {
        let mut r = VolumeReporter::default();
        let t0 = Instant::now();
        assert_eq!(r.next(None, t0), None, "nothing before the engine is seen");
        let one = vec![volume("a", Some("bot-0"))];
        assert!(r.next(Some(&one), t0).is_some(), "the first list");
        assert_eq!(r.next(Some(&one), t0 + Duration::from_secs(10)), None);
        let two = vec![volume("a", Some("bot-0")), volume("b", Some("bot-1"))];
        let (list, total) = r
            .next(Some(&two), t0 + Duration::from_secs(11))
            .expect("a changed set is sent at once");
        assert_eq!((list.len(), total), (2, 2));
        assert_eq!(r.next(Some(&two), t0 + Duration::from_secs(12)), None);
        assert!(
            r.next(
                Some(&two),
                t0 + Duration::from_secs(11) + VOLUME_REPORT_INTERVAL
            )
            .is_some(),
            "an unchanged list again after the interval"
        );
        r.forget();
        assert!(r.next(Some(&two), t0 + Duration::from_secs(400)).is_some());
        let (empty, total) = r
            .next(Some(&[]), t0 + Duration::from_secs(401))
            .expect("an empty set is a change too");
        assert_eq!((empty.len(), total), (0, 0));
    }
}
