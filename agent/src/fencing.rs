//! Placement epochs and failover stops on the host: which assignments may run, and which must stop
//! because the control plane has been out of reach for longer than they allow.
//!
//! Pure functions over plain values; the sync loops call them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::model::{Assignment, ReplicaKey};

/// Shortest long poll while an assignment has a stop deadline (the server's own minimum).
pub const MIN_FENCED_POLL: Duration = Duration::from_secs(1);

/// The newest epoch seen per replica (by [`ReplicaKey`]'s text), as saved in `state.json`.
pub type Epochs = BTreeMap<String, u64>;

/// An assignment refused because the host has already been given a newer epoch of its replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub assignment: Assignment,
    /// The newest epoch seen for the replica.
    pub newest: u64,
}

impl Refused {
    pub fn message(&self) -> String {
        format!(
            "refusing assignment of epoch {} for {}: epoch {} has been seen; the replica runs only under its newest epoch",
            self.assignment.epoch,
            self.assignment.key(),
            self.newest
        )
    }
}

/// Splits `assignments` into those that may run (their epoch is the newest seen for their
/// replica, or newer) and those refused (older); raises `epochs` to what was accepted. Epoch 0
/// (a server without epochs) is accepted only while no epoch was seen for the replica.
pub fn admit(epochs: &mut Epochs, assignments: Vec<Assignment>) -> (Vec<Assignment>, Vec<Refused>) {
    let mut ok = Vec::with_capacity(assignments.len());
    let mut refused = Vec::new();
    for a in assignments {
        let key = a.key().to_string();
        let newest = epochs.get(&key).copied().unwrap_or(0);
        if a.epoch < newest {
            refused.push(Refused {
                assignment: a,
                newest,
            });
            continue;
        }
        if a.epoch > 0 {
            epochs.insert(key, a.epoch);
        }
        ok.push(a);
    }
    (ok, refused)
}

/// The replicas that must be stopped at `now`: those whose `stop_after_seconds` is set and has
/// passed since `last_contact` (the last answer of the control plane).
pub fn silenced(
    last_contact: Instant,
    now: Instant,
    assignments: &[Assignment],
) -> BTreeSet<ReplicaKey> {
    let silent = now.saturating_duration_since(last_contact);
    assignments
        .iter()
        .filter(|a| a.stop_after_seconds > 0)
        .filter(|a| silent >= Duration::from_secs(u64::from(a.stop_after_seconds)))
        .map(Assignment::key)
        .collect()
}

/// When the next replica would have to stop without contact, if any still runs with a deadline.
pub fn next_stop(
    last_contact: Instant,
    now: Instant,
    assignments: &[Assignment],
) -> Option<Instant> {
    assignments
        .iter()
        .filter(|a| a.stop_after_seconds > 0)
        .map(|a| last_contact + Duration::from_secs(u64::from(a.stop_after_seconds)))
        .filter(|at| *at > now)
        .min()
}

/// How long to hold a long poll: `base`, but while an assignment has a stop deadline at most a
/// third of the shortest one, so a healthy connection answers well before it (an answer is
/// what counts as contact).
pub fn poll_wait(base: Duration, assignments: &[Assignment]) -> Duration {
    assignments
        .iter()
        .filter(|a| a.stop_after_seconds > 0)
        .map(|a| Duration::from_secs(u64::from(a.stop_after_seconds)) / 3)
        .min()
        .map_or(base, |d| base.min(d.max(MIN_FENCED_POLL)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(replica: &str, epoch: u64, stop_after: u32) -> Assignment {
        let mut a = Assignment::test(replica);
        a.epoch = epoch;
        a.stop_after_seconds = stop_after;
        a
    }

    #[test]
    fn an_older_epoch_is_refused_and_the_newest_is_kept() {
        let mut epochs = Epochs::new();
        let (ok, refused) = admit(&mut epochs, vec![at("bot-0", 5, 0), at("bot-1", 0, 0)]);
        assert_eq!(ok.len(), 2);
        assert!(refused.is_empty());
        assert_eq!(epochs.len(), 1);
        // The same epoch again is fine; an older one is refused; a newer one raises it.
        let (ok, refused) = admit(&mut epochs, vec![at("bot-0", 5, 0)]);
        assert_eq!((ok.len(), refused.len()), (1, 0));
        let (ok, refused) = admit(&mut epochs, vec![at("bot-0", 4, 0), at("bot-1", 2, 0)]);
        assert_eq!(
            ok.iter().map(|a| a.replica.as_str()).collect::<Vec<_>>(),
            ["bot-1"]
        );
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].newest, 5);
        assert!(
            refused[0].message().contains("epoch 4"),
            "{}",
            refused[0].message()
        );
        // Epoch 0 after an epoch was seen is older too.
        let (_, refused) = admit(&mut epochs, vec![at("bot-0", 0, 0)]);
        assert_eq!(refused.len(), 1);
        let (ok, _) = admit(&mut epochs, vec![at("bot-0", 9, 0)]);
        assert_eq!(ok.len(), 1);
        assert_eq!(epochs[&ok[0].key().to_string()], 9);
    }

    #[test]
    fn replicas_stop_once_their_stop_after_has_passed_without_contact() {
        let t0 = Instant::now();
        let set = [at("bot-0", 1, 10), at("bot-1", 1, 0), at("bot-2", 1, 30)];
        assert!(silenced(t0, t0 + Duration::from_secs(9), &set).is_empty());
        let s = silenced(t0, t0 + Duration::from_secs(10), &set);
        assert_eq!(
            s.iter().map(|k| k.replica.as_str()).collect::<Vec<_>>(),
            ["bot-0"]
        );
        // 0 never stops (static stability).
        let s = silenced(t0, t0 + Duration::from_secs(3600), &set);
        assert_eq!(s.len(), 2);
        assert!(!s.iter().any(|k| k.replica == "bot-1"));
        assert_eq!(
            next_stop(t0, t0 + Duration::from_secs(1), &set),
            Some(t0 + Duration::from_secs(10))
        );
        assert_eq!(
            next_stop(t0, t0 + Duration::from_secs(10), &set),
            Some(t0 + Duration::from_secs(30))
        );
        assert_eq!(next_stop(t0, t0 + Duration::from_secs(31), &set), None);
    }

    #[test]
    fn the_long_poll_is_shortened_while_a_replica_can_be_stopped() {
        let base = Duration::from_secs(300);
        assert_eq!(poll_wait(base, &[at("bot-0", 1, 0)]), base);
        assert_eq!(
            poll_wait(base, &[at("bot-0", 1, 0), at("bot-1", 1, 30)]),
            Duration::from_secs(10)
        );
        assert_eq!(poll_wait(base, &[at("bot-0", 1, 2)]), MIN_FENCED_POLL);
        assert_eq!(
            poll_wait(Duration::from_secs(2), &[at("bot-0", 1, 30)]),
            Duration::from_secs(2)
        );
    }
}
