//! Prometheus text exposition: hosts and instances by phase, replica CPU and memory, agent
//! RPC counts and latencies.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::agent_rpc::Reports;
use crate::model::{HostPhase, InstancePhase, Kind, Resource};
use crate::store::{ListFilter, Store, StoreError};

/// Upper bounds (seconds) of the RPC latency histogram.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
struct RpcFigures {
    requests: BTreeMap<(&'static str, String), u64>,
    latency: BTreeMap<&'static str, Histogram>,
}

/// Counters kept by the server process.
#[derive(Default)]
pub struct Metrics {
    rpc: Mutex<RpcFigures>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Records one agent RPC (for the long poll, the whole hold counts as latency).
    pub fn observe_rpc(&self, method: &'static str, code: tonic::Code, took: Duration) {
        let mut f = self.rpc.lock().unwrap_or_else(|e| e.into_inner());
        *f.requests.entry((method, format!("{code:?}"))).or_default() += 1;
        let h = f.latency.entry(method).or_default();
        let secs = took.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    /// The exposition text (blocking: reads the store).
    pub fn render(&self, store: &dyn Store, reports: &Reports) -> Result<String, StoreError> {
        let mut out = String::with_capacity(4096);
        let mut hosts: BTreeMap<&str, u64> = [("Ready", 0), ("NotReady", 0), ("Unknown", 0)].into();
        for o in store.list(&ListFilter::all(Kind::Host))? {
            if let Ok(Resource::Host(h)) = o.resource() {
                let phase = match h.status.map(|s| s.phase).unwrap_or_default() {
                    HostPhase::Ready => "Ready",
                    HostPhase::NotReady => "NotReady",
                    HostPhase::Unknown => "Unknown",
                };
                *hosts.entry(phase).or_default() += 1;
            }
        }
        let _ = writeln!(
            out,
            "# HELP clusterclaw_hosts Hosts by phase.\n# TYPE clusterclaw_hosts gauge"
        );
        for (phase, n) in hosts {
            let _ = writeln!(out, "clusterclaw_hosts{{phase=\"{phase}\"}} {n}");
        }
        let mut instances: BTreeMap<String, u64> =
            ["Pending", "Progressing", "Running", "Degraded", "Failed"]
                .iter()
                .map(|p| (p.to_string(), 0))
                .collect();
        for o in store.list(&ListFilter::all(Kind::OpenClawInstance))? {
            if let Ok(Resource::OpenClawInstance(i)) = o.resource() {
                let phase: InstancePhase = i.status.map(|s| s.phase).unwrap_or_default();
                *instances.entry(format!("{phase:?}")).or_default() += 1;
            }
        }
        let _ = writeln!(
            out,
            "# HELP clusterclaw_instances OpenClaw instances by phase.\n# TYPE clusterclaw_instances gauge"
        );
        for (phase, n) in instances {
            let _ = writeln!(out, "clusterclaw_instances{{phase=\"{phase}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP clusterclaw_store_index The store's global index.\n# TYPE clusterclaw_store_index counter"
        );
        let _ = writeln!(out, "clusterclaw_store_index {}", store.index());

        let snapshot = reports.snapshot();
        let _ = writeln!(
            out,
            "# HELP clusterclaw_replica_cpu_percent CPU use of a replica's container, percent of one core.\n# TYPE clusterclaw_replica_cpu_percent gauge"
        );
        let mut mem = String::new();
        for (host, r) in &snapshot {
            for rep in &r.report.replicas {
                let Some(s) = &rep.stats else { continue };
                let labels = format!(
                    "tenant=\"{}\",project=\"{}\",instance=\"{}\",replica=\"{}\",host=\"{}\"",
                    escape(&rep.tenant),
                    escape(&rep.project),
                    escape(&rep.instance),
                    escape(&rep.replica),
                    escape(host)
                );
                let _ = writeln!(
                    out,
                    "clusterclaw_replica_cpu_percent{{{labels}}} {}",
                    s.cpu_percent
                );
                let _ = writeln!(
                    mem,
                    "clusterclaw_replica_memory_bytes{{{labels}}} {}",
                    s.memory_bytes
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP clusterclaw_replica_memory_bytes Memory use of a replica's container.\n# TYPE clusterclaw_replica_memory_bytes gauge"
        );
        out.push_str(&mem);

        let f = self.rpc.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "# HELP clusterclaw_agent_rpc_requests_total Agent RPCs served.\n# TYPE clusterclaw_agent_rpc_requests_total counter"
        );
        for ((method, code), n) in &f.requests {
            let _ = writeln!(
                out,
                "clusterclaw_agent_rpc_requests_total{{method=\"{method}\",code=\"{code}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP clusterclaw_agent_rpc_duration_seconds Agent RPC latency (a long poll counts its hold).\n# TYPE clusterclaw_agent_rpc_duration_seconds histogram"
        );
        for (method, h) in &f.latency {
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "clusterclaw_agent_rpc_duration_seconds_bucket{{method=\"{method}\",le=\"{le}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "clusterclaw_agent_rpc_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "clusterclaw_agent_rpc_duration_seconds_sum{{method=\"{method}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "clusterclaw_agent_rpc_duration_seconds_count{{method=\"{method}\"}} {}",
                h.count
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe_rpc("Enroll", tonic::Code::Ok, Duration::from_millis(3));
        m.observe_rpc(
            "Enroll",
            tonic::Code::Unauthenticated,
            Duration::from_millis(200),
        );
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap();
        let text = m.render(&store, &Reports::default()).unwrap();
        assert!(
            text.contains("clusterclaw_agent_rpc_requests_total{method=\"Enroll\",code=\"Ok\"} 1"),
            "{text}"
        );
        assert!(text.contains(
            "clusterclaw_agent_rpc_requests_total{method=\"Enroll\",code=\"Unauthenticated\"} 1"
        ));
        assert!(text.contains(
            "clusterclaw_agent_rpc_duration_seconds_bucket{method=\"Enroll\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "clusterclaw_agent_rpc_duration_seconds_bucket{method=\"Enroll\",le=\"0.25\"} 2"
        ));
        assert!(text.contains("clusterclaw_hosts{phase=\"Ready\"} 0"));
        assert!(text.contains("clusterclaw_instances{phase=\"Running\"} 0"));
    }
}
