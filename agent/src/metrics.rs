//! Host figures for status reports and enrollment: CPU, memory, the data directory's disk, load averages and capacity (sysinfo).

use std::path::{Path, PathBuf};

use clusterclaw_proto::agent as proto;
use sysinfo::{CpuRefreshKind, Disks, RefreshKind, System};

/// What the host offers to the scheduler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Logical CPUs, in thousandths of a core.
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Size of the disk holding the agent's data directory.
    pub disk_bytes: u64,
}

impl Capacity {
    pub fn to_proto(self) -> proto::Capacity {
        proto::Capacity {
            cpu_millis: self.cpu_millis,
            memory_bytes: self.memory_bytes,
            disk_bytes: self.disk_bytes,
        }
    }
}

/// One sample of the host's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostFigures {
    /// Busy share of all CPUs since the previous sample, 0 to 100.
    pub cpu_percent: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub capacity: Capacity,
}

impl HostFigures {
    pub fn to_proto(&self) -> proto::HostFigures {
        proto::HostFigures {
            cpu_percent: self.cpu_percent,
            memory_used_bytes: self.memory_used_bytes,
            memory_total_bytes: self.memory_total_bytes,
            disk_used_bytes: self.disk_used_bytes,
            disk_total_bytes: self.disk_total_bytes,
            load1: self.load1,
            load5: self.load5,
            load15: self.load15,
            capacity: Some(self.capacity.to_proto()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("reading host figures: {0}")]
pub struct MetricsError(String);

/// Samples host figures; keep one alive, since CPU use is measured between two samples.
pub struct HostMetrics {
    system: System,
    disks: Disks,
    disk_path: PathBuf,
}

impl HostMetrics {
    /// Figures for this host, with disk figures for the filesystem holding `disk_path`.
    pub fn new(disk_path: impl Into<PathBuf>) -> Result<Self, MetricsError> {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_usage())
                .with_memory(sysinfo::MemoryRefreshKind::everything()),
        )
        .map_err(|e| MetricsError(e.to_string()))?;
        let disks = Disks::new_with_refreshed_list().map_err(|e| MetricsError(e.to_string()))?;
        Ok(HostMetrics {
            system,
            disks,
            disk_path: disk_path.into(),
        })
    }

    /// Takes a sample. The first one's CPU figure covers the time since [`HostMetrics::new`].
    pub fn sample(&mut self) -> HostFigures {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.disks.refresh(true);
        let (disk_total, disk_available) = self.disk_figures();
        let load = System::load_average().unwrap_or(sysinfo::LoadAvg {
            one: 0.0,
            five: 0.0,
            fifteen: 0.0,
        });
        let cpus = match self.system.cpus().len() {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let memory_total = self.system.total_memory();
        HostFigures {
            cpu_percent: f64::from(self.system.global_cpu_usage()).clamp(0.0, 100.0),
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: memory_total,
            disk_used_bytes: disk_total.saturating_sub(disk_available),
            disk_total_bytes: disk_total,
            load1: load.one,
            load5: load.five,
            load15: load.fifteen,
            capacity: Capacity {
                cpu_millis: cpus as u64 * 1000,
                memory_bytes: memory_total,
                disk_bytes: disk_total,
            },
        }
    }

    fn disk_figures(&self) -> (u64, u64) {
        let path = existing_ancestor(&self.disk_path);
        self.disks
            .iter()
            .filter(|d| path.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map_or((0, 0), |d| (d.total_space(), d.available_space()))
    }
}

/// The path itself when it exists (resolved), else its nearest existing ancestor.
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find_map(|p| p.canonicalize().ok())
        .unwrap_or_else(|| PathBuf::from("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_plausible_host_figures() {
        let dir = tempfile::tempdir().unwrap();
        let mut metrics = HostMetrics::new(dir.path().join("not-yet-created")).unwrap();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let f = metrics.sample();
        assert!(f.memory_total_bytes > 0);
        assert!(f.memory_used_bytes <= f.memory_total_bytes);
        assert!((0.0..=100.0).contains(&f.cpu_percent));
        assert!(f.capacity.cpu_millis >= 1000);
        assert_eq!(f.capacity.memory_bytes, f.memory_total_bytes);
        assert!(f.disk_total_bytes > 0, "no disk found for {:?}", dir.path());
        assert!(f.disk_used_bytes <= f.disk_total_bytes);
        assert!(f.load1 >= 0.0);
        let p = f.to_proto();
        assert_eq!(p.capacity.unwrap().cpu_millis, f.capacity.cpu_millis);
    }

    #[test]
    fn resolves_the_nearest_existing_directory() {
        assert_eq!(
            existing_ancestor(Path::new("/definitely/not/here")),
            PathBuf::from("/")
        );
    }
}
