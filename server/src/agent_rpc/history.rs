//! A short memory of what each replica used: one CPU and memory sample per [`SAMPLE_EVERY`]
//! per replica, for the last [`KEEP`] samples (an hour), taken from the agents' status
//! reports. Fixed-size rings in memory only (nothing is written to the store); a replica's
//! ring goes when its host stops reporting it or the host is forgotten.
//!
//! A ring keeps each sample in 16 bytes ([`Kept`]): its time as milliseconds after the
//! ring's base, the CPU as an `f32`, the memory; the memory limit, which is drawn as one line,
//! is the ring's latest. A full hour of 10,000 replicas takes about 20 MB, where a [`Sample`]
//! each (40 bytes) took 51 MB.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use clusterclaw_proto::agent as pb;

/// At most one sample per replica this often.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(30);
/// How far back the history reaches.
pub const SPAN: Duration = Duration::from_secs(3600);
/// Samples kept per replica: [`SPAN`] / [`SAMPLE_EVERY`].
pub const KEEP: usize = (SPAN.as_secs() / SAMPLE_EVERY.as_secs()) as usize;

/// One replica's figures at one time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub at: Instant,
    /// Percent of one CPU (200 is two CPUs busy).
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    /// 0: no limit. The replica's latest: a ring keeps one.
    pub memory_limit_bytes: u64,
}

/// (tenant, project, instance, replica).
type ReplicaId = (String, String, String, String);

struct Ring {
    /// The host that reports the replica.
    host: String,
    /// What the samples' times count from.
    base: Instant,
    /// The memory limit of the latest sample (0: none).
    memory_limit_bytes: u64,
    samples: VecDeque<Kept>,
}

/// One sample as a ring keeps it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Kept {
    /// Milliseconds after the ring's base.
    at_ms: u32,
    cpu_percent: f32,
    memory_bytes: u64,
}

impl Ring {
    fn new(host: &str, now: Instant) -> Ring {
        Ring {
            host: host.to_string(),
            base: now,
            memory_limit_bytes: 0,
            samples: VecDeque::new(),
        }
    }

    fn at(&self, k: &Kept) -> Instant {
        self.base + Duration::from_millis(u64::from(k.at_ms))
    }

    fn last_at(&self) -> Option<Instant> {
        self.samples.back().map(|k| self.at(k))
    }

    /// `now` as milliseconds after the base. When that no longer fits (the ring is weeks
    /// old), samples older than [`SPAN`] (never shown) are dropped and the base moves to the
    /// oldest one left, or to `now`.
    fn offset(&mut self, now: Instant) -> u32 {
        let fits = |base: Instant| u32::try_from(now.saturating_duration_since(base).as_millis());
        if let Ok(ms) = fits(self.base) {
            return ms;
        }
        while let Some(oldest) = self.samples.front()
            && now.saturating_duration_since(self.at(oldest)) > SPAN
        {
            self.samples.pop_front();
        }
        let base = self.samples.front().map_or(now, |k| self.at(k));
        let shift = u32::try_from(base.saturating_duration_since(self.base).as_millis())
            .unwrap_or(u32::MAX);
        for k in &mut self.samples {
            k.at_ms -= shift.min(k.at_ms);
        }
        self.base = base;
        fits(base).unwrap_or(0)
    }
}

/// What one host reported last: its replicas, and when the first of their rings is due a
/// sample (none: at its next report).
struct HostRings {
    ids: Vec<ReplicaId>,
    due: Option<Instant>,
}

/// The samples of every replica reported lately.
#[derive(Default)]
pub struct History {
    replicas: HashMap<ReplicaId, Ring>,
    /// The replicas each host reported last, so that a report looks at its own host's
    /// replicas only, not at every ring of the fleet.
    hosts: HashMap<String, HostRings>,
}

fn same_replicas(ids: &[ReplicaId], replicas: &[pb::ReplicaStatus]) -> bool {
    ids.len() == replicas.len()
        && ids.iter().zip(replicas).all(|((t, p, i, n), r)| {
            *t == r.tenant && *p == r.project && *i == r.instance && *n == r.replica
        })
}

/// One replica's samples, oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaHistory {
    pub replica: String,
    pub host: String,
    pub samples: Vec<Sample>,
}

impl History {
    /// Takes the figures of one report of `host` at `now`: a sample for each replica that has
    /// figures, unless its last one is younger than [`SAMPLE_EVERY`]. Replicas `host` reported
    /// before and no longer does are dropped.
    ///
    /// A report that names the replicas the host's previous one named, before any of their
    /// rings is due a sample, costs a comparison and no allocation.
    pub fn record(&mut self, host: &str, now: Instant, replicas: &[pb::ReplicaStatus]) {
        if let Some(last) = self.hosts.get(host)
            && last.due.is_some_and(|due| now < due)
            && same_replicas(&last.ids, replicas)
        {
            return;
        }
        let mut reported: Vec<ReplicaId> = Vec::with_capacity(replicas.len());
        for r in replicas {
            let id = (
                r.tenant.clone(),
                r.project.clone(),
                r.instance.clone(),
                r.replica.clone(),
            );
            reported.push(id.clone());
            let Some(stats) = &r.stats else { continue };
            let ring = self
                .replicas
                .entry(id)
                .or_insert_with(|| Ring::new(host, now));
            if ring.host != host {
                // The replica moved: its figures on the old host say nothing of the new one.
                *ring = Ring::new(host, now);
            }
            if ring
                .last_at()
                .is_some_and(|last| now.saturating_duration_since(last) < SAMPLE_EVERY)
            {
                continue;
            }
            if ring.samples.len() == KEEP {
                ring.samples.pop_front();
            }
            let at_ms = ring.offset(now);
            ring.memory_limit_bytes = stats.memory_limit_bytes;
            ring.samples.push_back(Kept {
                at_ms,
                cpu_percent: if stats.cpu_percent.is_finite() {
                    stats.cpu_percent.max(0.0) as f32
                } else {
                    0.0
                },
                memory_bytes: stats.memory_bytes,
            });
        }
        // Nothing reported: nothing is due until the list changes.
        let mut due: Option<Instant> = reported.is_empty().then(|| now + SPAN);
        for id in &reported {
            match self.replicas.get(id).and_then(Ring::last_at) {
                Some(last) if self.replicas[id].host == host => {
                    let at = last + SAMPLE_EVERY;
                    due = Some(due.map_or(at, |d| d.min(at)));
                }
                // A replica without figures, or another host's now: look again next time.
                _ => {
                    due = Some(now);
                    break;
                }
            }
        }
        let latest = HostRings { ids: reported, due };
        let previous = match self.hosts.get_mut(host) {
            Some(last) => Some(std::mem::replace(last, latest)),
            None => {
                self.hosts.insert(host.to_string(), latest);
                None
            }
        };
        if let Some(previous) = previous {
            let now_reported: std::collections::HashSet<&ReplicaId> =
                self.hosts[host].ids.iter().collect();
            for id in previous.ids {
                if !now_reported.contains(&id)
                    && self.replicas.get(&id).is_some_and(|r| r.host == host)
                {
                    self.replicas.remove(&id);
                }
            }
        }
    }

    /// Drops every replica `host` reported.
    pub fn forget_host(&mut self, host: &str) {
        if let Some(last) = self.hosts.remove(host) {
            for id in last.ids {
                if self.replicas.get(&id).is_some_and(|r| r.host == host) {
                    self.replicas.remove(&id);
                }
            }
        }
    }

    /// The samples of an instance's replicas within [`SPAN`] before `now`, by replica name.
    pub fn of_instance(
        &self,
        tenant: &str,
        project: &str,
        instance: &str,
        now: Instant,
    ) -> Vec<ReplicaHistory> {
        let mut out: Vec<ReplicaHistory> = self
            .replicas
            .iter()
            .filter(|((t, p, i, _), _)| t == tenant && p == project && i == instance)
            .map(|((_, _, _, replica), ring)| ReplicaHistory {
                replica: replica.clone(),
                host: ring.host.clone(),
                samples: ring
                    .samples
                    .iter()
                    .map(|k| Sample {
                        at: ring.at(k),
                        cpu_percent: f64::from(k.cpu_percent),
                        memory_bytes: k.memory_bytes,
                        memory_limit_bytes: ring.memory_limit_bytes,
                    })
                    .filter(|s| now.saturating_duration_since(s.at) <= SPAN)
                    .collect(),
            })
            .filter(|h| !h.samples.is_empty())
            .collect();
        out.sort_by(|a, b| a.replica.cmp(&b.replica));
        out
    }

    /// How many samples are held in all (for tests and metrics).
    pub fn samples(&self) -> usize {
        self.replicas.values().map(|r| r.samples.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str, cpu: f64, mem: u64) -> pb::ReplicaStatus {
        pb::ReplicaStatus {
            tenant: "t".into(),
            project: "p".into(),
            instance: "bot".into(),
            replica: name.into(),
            stats: Some(pb::ContainerStats {
                cpu_percent: cpu,
                memory_bytes: mem,
                memory_limit_bytes: 1 << 30,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn one_sample_per_period_and_at_most_an_hour_of_them() {
        let mut h = History::default();
        let t0 = Instant::now();
        h.record("h1", t0, &[replica("bot-0", 10.0, 100)]);
        // A report 10 s later adds nothing: the last sample is younger than the period.
        h.record(
            "h1",
            t0 + Duration::from_secs(10),
            &[replica("bot-0", 99.0, 100)],
        );
        let got = h.of_instance("t", "p", "bot", t0 + Duration::from_secs(10));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].samples.len(), 1);
        assert_eq!(got[0].samples[0].cpu_percent, 10.0);
        // Three hours of reports every 10 s keep exactly KEEP samples, the newest.
        let mut now = t0;
        for i in 0..1080u64 {
            now = t0 + Duration::from_secs(30 + i * 10);
            h.record("h1", now, &[replica("bot-0", i as f64, i)]);
        }
        assert_eq!(h.samples(), KEEP);
        let got = h.of_instance("t", "p", "bot", now);
        let s = &got[0].samples;
        assert_eq!(s.len(), KEEP);
        assert!(s.windows(2).all(|w| w[1].at - w[0].at >= SAMPLE_EVERY));
        assert_eq!(s.last().unwrap().memory_bytes, 1077);
    }

    #[test]
    fn replicas_go_when_no_longer_reported_or_their_host_is_forgotten() {
        let mut h = History::default();
        let t0 = Instant::now();
        h.record(
            "h1",
            t0,
            &[replica("bot-0", 1.0, 1), replica("bot-1", 2.0, 2)],
        );
        h.record("h2", t0, &[replica("bot-2", 3.0, 3)]);
        let names = |h: &History| {
            h.of_instance("t", "p", "bot", t0)
                .into_iter()
                .map(|r| r.replica)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&h), ["bot-0", "bot-1", "bot-2"]);
        // h1 no longer reports bot-1; h2's replica is untouched by h1's report.
        h.record("h1", t0 + SAMPLE_EVERY, &[replica("bot-0", 1.0, 1)]);
        assert_eq!(names(&h), ["bot-0", "bot-2"]);
        h.forget_host("h2");
        assert_eq!(names(&h), ["bot-0"]);
        // A replica that moves to another host starts a new history there.
        h.record("h2", t0 + SAMPLE_EVERY * 2, &[replica("bot-0", 5.0, 5)]);
        let got = h.of_instance("t", "p", "bot", t0 + SAMPLE_EVERY * 2);
        assert_eq!(got[0].host, "h2");
        assert_eq!(got[0].samples.len(), 1);
        // h1's next report no longer names it, and it stays: it is h2's now.
        h.record("h1", t0 + SAMPLE_EVERY * 3, &[]);
        assert_eq!(names(&h), ["bot-0"]);
    }

    #[test]
    fn a_report_within_the_period_still_drops_what_it_no_longer_names() {
        let mut h = History::default();
        let t0 = Instant::now();
        let both = [replica("bot-0", 1.0, 1), replica("bot-1", 2.0, 2)];
        h.record("h1", t0, &both);
        h.record("h2", t0, &[replica("bot-2", 3.0, 3)]);
        // The same list again before a sample is due changes nothing.
        h.record("h1", t0 + Duration::from_secs(10), &both);
        assert_eq!(h.samples(), 3);
        // A shorter list before a sample is due drops the replica it no longer names.
        h.record(
            "h1",
            t0 + Duration::from_secs(20),
            &[replica("bot-0", 1.0, 1)],
        );
        let names: Vec<String> = h
            .of_instance("t", "p", "bot", t0 + Duration::from_secs(20))
            .into_iter()
            .map(|r| r.replica)
            .collect();
        assert_eq!(names, ["bot-0", "bot-2"]);
        // Once due, the same list takes a sample.
        h.record("h1", t0 + SAMPLE_EVERY, &[replica("bot-0", 4.0, 4)]);
        assert_eq!(h.samples(), 3);
        h.forget_host("h1");
        assert_eq!(h.samples(), 1);
    }

    #[test]
    fn old_samples_are_not_shown_and_bad_figures_are_clamped() {
        let mut h = History::default();
        let t0 = Instant::now();
        h.record("h1", t0, &[replica("bot-0", f64::NAN, 1)]);
        h.record("h1", t0 + SAMPLE_EVERY, &[replica("bot-0", -5.0, 2)]);
        let got = h.of_instance("t", "p", "bot", t0 + SAMPLE_EVERY);
        assert!(got[0].samples.iter().all(|s| s.cpu_percent == 0.0));
        // Two hours later, nothing within the span remains to show.
        assert!(h.of_instance("t", "p", "bot", t0 + SPAN * 2).is_empty());
        // Another instance's replicas are not this one's.
        assert!(h.of_instance("t", "p", "other", t0).is_empty());
    }

    #[test]
    fn a_kept_sample_takes_16_bytes() {
        assert_eq!(std::mem::size_of::<Kept>(), 16);
    }

    #[test]
    fn samples_keep_their_time_and_figures_and_a_ring_weeks_old_moves_its_base() {
        let mut h = History::default();
        let t0 = Instant::now();
        h.record("h1", t0, &[replica("bot-0", 12.5, 1 << 30)]);
        h.record("h1", t0 + SAMPLE_EVERY, &[replica("bot-0", 99.0, 7)]);
        let got = h.of_instance("t", "p", "bot", t0 + SAMPLE_EVERY);
        let figures: Vec<(Instant, f64, u64)> = got[0]
            .samples
            .iter()
            .map(|s| (s.at, s.cpu_percent, s.memory_bytes))
            .collect();
        assert_eq!(figures, [(t0, 12.5, 1 << 30), (t0 + SAMPLE_EVERY, 99.0, 7)]);
        // 60 days on (past what milliseconds in 32 bits reach), the old samples go and the
        // new one is kept at its time.
        let later = t0 + Duration::from_secs(60 * 24 * 3600);
        h.record("h1", later, &[replica("bot-0", 4.0, 4)]);
        let got = h.of_instance("t", "p", "bot", later);
        assert_eq!(got[0].samples.len(), 1);
        assert_eq!(got[0].samples[0].at, later);
        assert_eq!(h.samples(), 1);
        h.record("h1", later + SAMPLE_EVERY, &[replica("bot-0", 5.0, 5)]);
        let got = h.of_instance("t", "p", "bot", later + SAMPLE_EVERY);
        assert_eq!(got[0].samples[1].at, later + SAMPLE_EVERY);
    }
}
