//! Status reports that carry what changed: the agent's side of the `Heartbeat` stream.
//!
//! The sync loop builds full reports; the stream numbers each one as it takes it and, once the
//! server is known to take deltas, turns it into a delta onto the report it sent before:
//! - a replica whose entry changed (anything but its figures) is sent whole;
//! - a replica no longer reported is named in `removed`;
//! - a replica whose only change is its figures (container stats, Gateway figures) has them
//!   sent in `figures`, at most once per [`FIGURES_REFRESH`] (the server keeps one sample per
//!   replica that often for its charts); unchanged replicas are not sent at all.
//!
//! The first report of a stream is full, and so is the next one after the server asked for
//! it (its acknowledgement of a report it could not hold as sent, see [`Exchange`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clusterclaw_proto::agent as pb;
use prost::Message;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Figures of a replica whose entry did not otherwise change are sent at most this often.
pub const FIGURES_REFRESH: Duration = Duration::from_secs(30);

/// Report numbers, rising across every stream of the process.
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

/// (tenant, project, instance, replica).
type Key = (String, String, String, String);

fn key(r: &pb::ReplicaStatus) -> Key {
    (
        r.tenant.clone(),
        r.project.clone(),
        r.instance.clone(),
        r.replica.clone(),
    )
}

/// What one report stream sent and what the server answered, shared by the stream (which
/// encodes the reports) and whoever reads the acknowledgements.
#[derive(Default)]
pub struct Exchange {
    state: Mutex<ExchangeState>,
    /// Woken when the server asks for a full report.
    full_asked: Notify,
    reports: AtomicU64,
    bytes: AtomicU64,
}

#[derive(Default)]
struct ExchangeState {
    /// The next report taken must be full.
    full_wanted: bool,
    /// The last full report sent.
    last_full: u64,
    /// The highest report acknowledged.
    acked: u64,
}

impl Exchange {
    /// Takes one acknowledgement. A request for a full report counts only when it answers a
    /// report sent since the last full one (the answers to deltas sent before it are stale).
    pub fn acknowledged(&self, ack: &pb::ReportAck) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.acked = s.acked.max(ack.seq);
        if ack.send_full && ack.seq >= s.last_full && !s.full_wanted {
            s.full_wanted = true;
            drop(s);
            tracing::debug!(seq = ack.seq, reason = %ack.reason, "the server asks for a full status report");
            self.full_asked.notify_one();
        }
    }

    /// Resolves when the server asks for a full report (the report loop then sends one at once).
    pub async fn full_asked(&self) {
        self.full_asked.notified().await;
    }

    /// The highest report number the server acknowledged.
    pub fn acked(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).acked
    }

    /// Reports taken by the stream so far.
    pub fn reports(&self) -> u64 {
        self.reports.load(Ordering::Relaxed)
    }

    /// Encoded bytes of the reports taken by the stream so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether the next report must be full, noting that it is sent as `seq` if so.
    fn take_full_wanted(&self, seq: u64) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let wanted = std::mem::take(&mut s.full_wanted);
        if wanted {
            s.last_full = seq;
        }
        wanted
    }

    fn sent_full(&self, seq: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.last_full = seq;
        s.full_wanted = false;
    }

    fn count(&self, report: &pb::StatusReport) {
        self.reports.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(report.encoded_len() as u64, Ordering::Relaxed);
    }
}

/// A replica as the last report sent it: its entry without figures, and its figures.
struct Held {
    entry: pb::ReplicaStatus,
    stats: Option<pb::ContainerStats>,
    gateway: Option<pb::GatewayMetrics>,
    figures_at: Instant,
}

impl Held {
    fn of(mut entry: pb::ReplicaStatus, now: Instant) -> Held {
        let stats = entry.stats.take();
        let gateway = entry.gateway_metrics.take();
        Held {
            entry,
            stats,
            gateway,
            figures_at: now,
        }
    }
}

/// Numbers the reports of one stream and, once enabled, turns each into a delta onto the one
/// sent before it.
pub struct DeltaEncoder {
    exchange: Arc<Exchange>,
    deltas: bool,
    /// The last report sent: its number and its replicas.
    last: Option<(u64, HashMap<Key, Held>)>,
}

impl DeltaEncoder {
    /// Full reports only, until [`DeltaEncoder::enable`].
    pub fn new(exchange: Arc<Exchange>) -> DeltaEncoder {
        DeltaEncoder {
            exchange,
            deltas: false,
            last: None,
        }
    }

    /// Reports after the next one may be deltas (the server acknowledges them).
    pub fn enable(&mut self) {
        self.deltas = true;
    }

    /// Numbers `report` (a full one) and, when deltas are enabled and the server holds the
    /// previous one, makes it a delta onto that.
    pub fn encode(&mut self, mut report: pb::StatusReport, now: Instant) -> pb::StatusReport {
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        report.seq = seq;
        report.base_seq = 0;
        report.removed.clear();
        report.figures.clear();
        let full_wanted = self.exchange.take_full_wanted(seq);
        let last = self.last.take();
        let (base, mut held) = match last {
            Some((base, held)) if self.deltas && !full_wanted => (base, held),
            _ => {
                let held = report
                    .replicas
                    .iter()
                    .map(|r| (key(r), Held::of(r.clone(), now)))
                    .collect();
                self.last = Some((seq, held));
                self.exchange.sent_full(seq);
                self.exchange.count(&report);
                return report;
            }
        };
        let mut changed = Vec::new();
        let mut figures = Vec::new();
        let mut now_held = HashMap::with_capacity(report.replicas.len());
        for r in std::mem::take(&mut report.replicas) {
            let k = key(&r);
            let Some(mut before) = held.remove(&k) else {
                changed.push(r.clone());
                now_held.insert(k, Held::of(r, now));
                continue;
            };
            let current = Held::of(r, now);
            if current.entry != before.entry {
                let mut whole = current.entry.clone();
                whole.stats = current.stats;
                whole.gateway_metrics = current.gateway.clone();
                changed.push(whole);
                now_held.insert(k, current);
                continue;
            }
            let figures_moved = current.stats != before.stats || current.gateway != before.gateway;
            if figures_moved && now.duration_since(before.figures_at) >= FIGURES_REFRESH {
                figures.push(pb::ReplicaFigures {
                    replica: Some(pb::ReplicaRef {
                        tenant: k.0.clone(),
                        project: k.1.clone(),
                        instance: k.2.clone(),
                        replica: k.3.clone(),
                    }),
                    stats: current.stats,
                    gateway_metrics: current.gateway.clone(),
                });
                before.stats = current.stats;
                before.gateway = current.gateway;
                before.figures_at = now;
            }
            now_held.insert(k, before);
        }
        let mut removed: Vec<pb::ReplicaRef> = held
            .into_keys()
            .map(|(tenant, project, instance, replica)| pb::ReplicaRef {
                tenant,
                project,
                instance,
                replica,
            })
            .collect();
        removed.sort_by(|a, b| {
            (&a.tenant, &a.project, &a.replica).cmp(&(&b.tenant, &b.project, &b.replica))
        });
        report.replicas = changed;
        report.removed = removed;
        report.figures = figures;
        report.base_seq = base;
        self.last = Some((seq, now_held));
        self.exchange.count(&report);
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str, state: pb::ReplicaState, cpu: f64) -> pb::ReplicaStatus {
        pb::ReplicaStatus {
            tenant: "t".into(),
            project: "p".into(),
            instance: "bot".into(),
            replica: name.into(),
            state: state as i32,
            container_id: format!("{name:0>64}"),
            config_hash: "c".repeat(64),
            observed_content_hash: "d".repeat(64),
            epoch: 3,
            stats: Some(pb::ContainerStats {
                cpu_percent: cpu,
                memory_bytes: 200 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn report(replicas: Vec<pb::ReplicaStatus>) -> pb::StatusReport {
        pb::StatusReport {
            replicas,
            applied_index: 7,
            ..Default::default()
        }
    }

    fn names(r: &[pb::ReplicaStatus]) -> Vec<&str> {
        r.iter().map(|r| r.replica.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_full_report_only_what_changed_is_sent() {
        let exchange = Arc::new(Exchange::default());
        let mut enc = DeltaEncoder::new(exchange.clone());
        enc.enable();
        let running = pb::ReplicaState::Running;
        let all = || {
            vec![
                replica("bot-0", running, 1.0),
                replica("bot-1", running, 1.0),
                replica("bot-2", running, 1.0),
            ]
        };
        let first = enc.encode(report(all()), Instant::now());
        assert_eq!(first.base_seq, 0, "the first report of a stream is full");
        assert_eq!(names(&first.replicas), ["bot-0", "bot-1", "bot-2"]);

        // Nothing changed: nothing of the replicas is sent, the host part is.
        let second = enc.encode(report(all()), Instant::now());
        assert_eq!(second.base_seq, first.seq);
        assert!(second.seq > first.seq);
        assert!(second.replicas.is_empty() && second.removed.is_empty());
        assert!(second.figures.is_empty());
        assert_eq!(second.applied_index, 7);

        // One turns Ready, one goes, one's figures move: the first is sent whole, the second
        // named, the third's figures wait for the refresh.
        tokio::time::advance(Duration::from_secs(10)).await;
        let third = enc.encode(
            report(vec![
                replica("bot-0", pb::ReplicaState::Ready, 1.0),
                replica("bot-1", running, 9.0),
            ]),
            Instant::now(),
        );
        assert_eq!(third.base_seq, second.seq);
        assert_eq!(names(&third.replicas), ["bot-0"]);
        assert!(
            third.replicas[0].stats.is_some(),
            "a changed entry is whole"
        );
        let removed: Vec<&str> = third.removed.iter().map(|r| r.replica.as_str()).collect();
        assert_eq!(removed, ["bot-2"]);
        assert!(third.figures.is_empty(), "figures wait for the refresh");

        tokio::time::advance(FIGURES_REFRESH).await;
        let fourth = enc.encode(
            report(vec![
                replica("bot-0", pb::ReplicaState::Ready, 1.0),
                replica("bot-1", running, 9.0),
            ]),
            Instant::now(),
        );
        assert!(fourth.replicas.is_empty());
        assert_eq!(fourth.figures.len(), 1);
        assert_eq!(fourth.figures[0].replica.as_ref().unwrap().replica, "bot-1");
        assert_eq!(fourth.figures[0].stats.unwrap().cpu_percent, 9.0);
        // Sent once: not again until they move and the refresh passed.
        let fifth = enc.encode(
            report(vec![
                replica("bot-0", pb::ReplicaState::Ready, 1.0),
                replica("bot-1", running, 9.0),
            ]),
            Instant::now(),
        );
        assert!(fifth.figures.is_empty());
        assert_eq!(exchange.reports(), 5);
        assert!(exchange.bytes() > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_report_follows_the_server_s_request_once() {
        let exchange = Arc::new(Exchange::default());
        let mut enc = DeltaEncoder::new(exchange.clone());
        enc.enable();
        let all = || vec![replica("bot-0", pb::ReplicaState::Running, 1.0)];
        let first = enc.encode(report(all()), Instant::now());
        let second = enc.encode(report(all()), Instant::now());
        let third = enc.encode(report(all()), Instant::now());
        assert_ne!(third.base_seq, 0);
        // The server could not hold the second: it asks, and its answer to the third (a delta
        // onto the second) asks again.
        exchange.acknowledged(&pb::ReportAck {
            seq: first.seq,
            ..Default::default()
        });
        assert_eq!(exchange.acked(), first.seq);
        exchange.acknowledged(&pb::ReportAck {
            seq: second.seq,
            send_full: true,
            reason: "lost".into(),
        });
        tokio::time::timeout(Duration::from_secs(1), exchange.full_asked())
            .await
            .expect("the report loop is woken");
        let full = enc.encode(report(all()), Instant::now());
        assert_eq!(full.base_seq, 0);
        assert_eq!(names(&full.replicas), ["bot-0"]);
        exchange.acknowledged(&pb::ReportAck {
            seq: third.seq,
            send_full: true,
            reason: "no base".into(),
        });
        let next = enc.encode(report(all()), Instant::now());
        assert_eq!(
            next.base_seq, full.seq,
            "an answer to a report sent before the full one asks for nothing"
        );
        // A refusal of a report after the full one does.
        exchange.acknowledged(&pb::ReportAck {
            seq: next.seq,
            send_full: true,
            reason: "refused".into(),
        });
        assert_eq!(enc.encode(report(all()), Instant::now()).base_seq, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_deltas_every_report_is_full_and_numbered() {
        let mut enc = DeltaEncoder::new(Arc::default());
        let all = || vec![replica("bot-0", pb::ReplicaState::Running, 1.0)];
        let a = enc.encode(report(all()), Instant::now());
        let b = enc.encode(report(all()), Instant::now());
        assert!(b.seq > a.seq);
        assert_eq!((a.base_seq, b.base_seq), (0, 0));
        assert_eq!(b.replicas.len(), 1);
    }
}
