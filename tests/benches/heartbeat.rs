//! Bytes per heartbeat of a host with 100 replicas: full reports (`ReportStatus`, every replica
//! every time) against the `Heartbeat` stream's reports, which after the first carry only what
//! changed (see `clusterclaw_agent::heartbeat`).
//!
//! The reports are the simulated fleet's (`clusterclaw_tests::simfleet::sample_report`): 100
//! replicas Running with their 64-hex container ids and hashes, and container and host figures
//! that move on every report as a real host's do. Each is encoded as it goes on the wire by the
//! agent's own report stream code, once every report interval (10 s, the agent's default) over
//! ten minutes of simulated time, in two cases: a quiet host, and one where a replica
//! restarts (a new container id) on every report.
//!
//! Run with `cargo bench -p clusterclaw-tests --bench heartbeat`; `CLUSTERCLAW_BENCH_HB_REPLICAS`
//! sets the replicas per host (default 100).

use std::sync::Arc;
use std::time::Duration;

use clusterclaw_agent::heartbeat::{DeltaEncoder, Exchange};
use clusterclaw_proto::agent as pb;
use clusterclaw_tests::simfleet::sample_report;
use prost::Message;
use tokio::time::Instant;

/// The agent's default report interval.
const INTERVAL: Duration = Duration::from_secs(10);
/// Reports per case: ten minutes at the default interval, and the first.
const REPORTS: u64 = 61;

fn assignments(count: usize) -> Vec<pb::Assignment> {
    (0..count)
        .map(|i| {
            let instance = format!("bot-{}", i / 4);
            let ordinal = (i % 4) as u32;
            pb::Assignment {
                tenant: "enterprise-a".into(),
                project: "helpdesk".into(),
                replica: format!("{instance}-{ordinal}"),
                instance,
                ordinal,
                generation: 3,
                config_hash: format!("{:064x}", i * 7919 + 1),
                content_hash: format!("{:064x}", i * 104_729 + 3),
                config_revision: 2,
                epoch: 40 + i as u64,
                ..Default::default()
            }
        })
        .collect()
}

fn median(mut v: Vec<usize>) -> usize {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Bytes of each report of one case: full ones, then the stream's.
fn case(assigned: &[pb::Assignment], restart_one: bool) -> (Vec<usize>, Vec<usize>) {
    let start = Instant::now();
    let mut encoder = DeltaEncoder::new(Arc::new(Exchange::default()));
    encoder.enable();
    let (mut full, mut delta) = (Vec::new(), Vec::new());
    // Replicas restarted so far: their new container and restart count.
    let mut restarted = std::collections::HashMap::new();
    for n in 0..REPORTS {
        let mut report = sample_report(assigned, 17, n);
        if restart_one {
            let i = (n as usize) % assigned.len();
            let count = restarted.get(&i).map_or(1, |(_, c)| c + 1);
            restarted.insert(i, (format!("{:064x}", 1_000_000 + n), count));
        }
        for (&i, (container, count)) in &restarted {
            let r = &mut report.replicas[i];
            r.container_id.clone_from(container);
            r.restarts = *count;
        }
        full.push(report.encoded_len());
        let at = start + INTERVAL * n as u32;
        delta.push(encoder.encode(report, at).encoded_len());
    }
    (full, delta)
}

fn main() {
    let replicas: usize = std::env::var("CLUSTERCLAW_BENCH_HB_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let assigned = assignments(replicas);
    println!(
        "bytes per heartbeat, {replicas} replicas on one host, {REPORTS} reports {}s apart",
        INTERVAL.as_secs()
    );
    println!(
        "| case | full report (median) | Heartbeat (median) | Heartbeat (mean, first full one included) | ratio of medians | bytes/s per host, full -> Heartbeat |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, restart_one) in [
        ("quiet host", false),
        ("a replica restarts every report", true),
    ] {
        let (full, delta) = case(&assigned, restart_one);
        let mean = delta.iter().sum::<usize>() as f64 / delta.len() as f64;
        let full_mean = full.iter().sum::<usize>() as f64 / full.len() as f64;
        let (fm, dm) = (median(full), median(delta));
        println!(
            "| {name} | {fm} B | {dm} B | {mean:.0} B | {:.1}x | {:.0} -> {:.0} |",
            fm as f64 / dm.max(1) as f64,
            full_mean / INTERVAL.as_secs_f64(),
            mean / INTERVAL.as_secs_f64()
        );
    }
}
