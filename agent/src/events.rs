//! Things the agent did on its own that an operator should know of (a repaired drift), queued until a status report carries them.
//!
//! The queue is bounded ([`EVENT_QUEUE_CAPACITY`]): when it is full the oldest event is
//! dropped and counted. An event leaves the queue only when the status stream takes the report
//! that carries it (see [`crate::control::ReportStream`]): a report that is never sent, or
//! that is still waiting when the stream fails, loses nothing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use clusterclaw_proto::agent as proto;
use tokio::sync::watch;

use crate::drift::Drift;
use crate::model::Assignment;

/// How many events wait for a report at most.
pub const EVENT_QUEUE_CAPACITY: usize = 100;

/// `reason` of an event saying a drift was repaired.
pub const CONFIG_DRIFT_REPAIRED: &str = "ConfigDriftRepaired";

/// One event about a replica. Never holds config or environment values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEvent {
    pub time_unix_ms: i64,
    pub tenant: String,
    pub project: String,
    pub instance: String,
    pub replica: String,
    /// CamelCase, e.g. [`CONFIG_DRIFT_REPAIRED`].
    pub reason: String,
    pub message: String,
    /// A Warning (something went wrong) rather than Normal.
    pub warning: bool,
    /// The container's exit code, when it exited.
    pub exit_code: Option<i64>,
}

/// `reason` of an event saying a replica's container was started.
pub const CONTAINER_STARTED: &str = "ContainerStarted";
/// `reason` of an event saying a replica's container was restarted after it stopped.
pub const CONTAINER_RESTARTED: &str = "ContainerRestarted";
/// `reason` of an event saying a replica's container was killed for want of memory.
pub const OOM_KILLED: &str = "OOMKilled";
/// `reason` of an event saying a replica failed its liveness probe (and is restarted).
pub const PROBE_FAILED: &str = "ProbeFailed";

impl AgentEvent {
    /// An event about the replica `key`, stamped now.
    pub fn of_replica(key: &crate::model::ReplicaKey, reason: &str, message: String) -> Self {
        let instance = key
            .replica
            .rsplit_once('-')
            .map_or(key.replica.as_str(), |(i, _)| i);
        AgentEvent {
            time_unix_ms: now_ms(),
            tenant: key.tenant.clone(),
            project: key.project.clone(),
            instance: instance.to_string(),
            replica: key.replica.clone(),
            reason: reason.to_owned(),
            message,
            warning: false,
            exit_code: None,
        }
    }

    /// The same event as a Warning.
    pub fn warning(mut self) -> Self {
        self.warning = true;
        self
    }

    /// The same event with the container's exit code.
    pub fn exit_code(mut self, code: i64) -> Self {
        self.exit_code = Some(code);
        self
    }

    /// An event about the replica of `a`, stamped now.
    pub fn about(a: &Assignment, reason: &str, message: String) -> Self {
        AgentEvent {
            time_unix_ms: now_ms(),
            warning: false,
            exit_code: None,
            tenant: a.tenant.clone(),
            project: a.project.clone(),
            instance: a.instance.clone(),
            replica: a.replica.clone(),
            reason: reason.to_owned(),
            message,
        }
    }

    /// `ConfigDriftRepaired` for the replica of `a`.
    pub fn drift_repaired(a: &Assignment, drift: &Drift) -> Self {
        AgentEvent::about(a, CONFIG_DRIFT_REPAIRED, drift.repaired_message(&a.replica))
    }

    pub fn to_proto(&self) -> proto::AgentEvent {
        proto::AgentEvent {
            time_unix_ms: self.time_unix_ms,
            tenant: self.tenant.clone(),
            project: self.project.clone(),
            instance: self.instance.clone(),
            replica: self.replica.clone(),
            reason: self.reason.clone(),
            message: self.message.clone(),
            r#type: if self.warning { "Warning" } else { "Normal" }.to_string(),
            exit_code: self.exit_code,
        }
    }
}

/// Events other than a container's starts, restarts, OOM kills and failed probes: what else
/// happened on the host.
pub fn notable(events: Vec<AgentEvent>) -> Vec<AgentEvent> {
    events
        .into_iter()
        .filter(|e| {
            ![
                CONTAINER_STARTED,
                CONTAINER_RESTARTED,
                OOM_KILLED,
                PROBE_FAILED,
            ]
            .contains(&e.reason.as_str())
        })
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<AgentEvent>,
    dropped: u64,
}

/// The agent's event queue; clones share it.
#[derive(Debug, Clone)]
pub struct EventQueue {
    queue: Arc<Mutex<Queue>>,
    capacity: usize,
    /// Counts events ever queued: a report loop watches it to send new events at once.
    queued: watch::Sender<u64>,
}

impl Default for EventQueue {
    fn default() -> Self {
        EventQueue::new(EVENT_QUEUE_CAPACITY)
    }
}

impl EventQueue {
    /// A queue of at most `capacity` events (at least one).
    pub fn new(capacity: usize) -> Self {
        EventQueue {
            queue: Arc::default(),
            capacity: capacity.max(1),
            queued: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `event`, dropping the oldest one when the queue is full.
    pub fn push(&self, event: AgentEvent) {
        {
            let mut q = self.lock();
            if q.events.len() >= self.capacity {
                q.events.pop_front();
                q.dropped += 1;
                tracing::warn!(
                    dropped = q.dropped,
                    capacity = self.capacity,
                    "event queue full (no status report got through); dropped the oldest event"
                );
            }
            q.events.push_back(event);
        }
        self.queued.send_modify(|n| *n += 1);
    }

    /// Removes and returns every queued event, oldest first: for the report the status stream
    /// is taking now.
    pub fn take(&self) -> Vec<AgentEvent> {
        self.lock().events.drain(..).collect()
    }

    /// The queued events, oldest first, left in the queue.
    pub fn pending(&self) -> Vec<AgentEvent> {
        self.lock().events.iter().cloned().collect()
    }

    /// How many events were dropped because the queue was full, since the agent started.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// How many events were ever queued.
    pub fn queued_total(&self) -> u64 {
        *self.queued.borrow()
    }

    /// Changes whenever an event is queued; the value counts every event ever queued.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.queued.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> AgentEvent {
        AgentEvent::about(&Assignment::test("bot-0"), "Test", format!("event {n}"))
    }

    #[test]
    fn drops_the_oldest_when_full_and_counts() {
        let q = EventQueue::new(3);
        let mut seen = q.subscribe();
        for n in 0..5 {
            q.push(event(n));
        }
        assert!(seen.has_changed().unwrap());
        assert_eq!(*seen.borrow_and_update(), 5);
        let messages: Vec<String> = q.pending().into_iter().map(|e| e.message).collect();
        assert_eq!(messages, ["event 2", "event 3", "event 4"]);
        assert_eq!(q.dropped(), 2);
        assert_eq!(q.take().len(), 3);
        assert!(q.pending().is_empty());
    }

    #[test]
    fn events_name_their_replica_and_time() {
        let e = event(1);
        assert_eq!(
            (e.tenant.as_str(), e.instance.as_str(), e.replica.as_str()),
            ("tenant-a", "bot", "bot-0")
        );
        assert!(e.time_unix_ms > 1_700_000_000_000);
        assert_eq!(e.to_proto().reason, "Test");
    }
}
