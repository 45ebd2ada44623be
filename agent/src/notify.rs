//! The service manager's notification protocol (systemd `Type=notify`): readiness once the data
//! directory is locked (an agent that still has to enroll is up and says so in its status),
//! status lines, stopping, and watchdog pings sent only while the agent's async runtime, its
//! blocking pool and its data directory still answer.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::daemon::LOCK_FILE;
use crate::sync::stopped;

/// Pings are sent this many times per watchdog period, so one late check is not fatal.
const PINGS_PER_PERIOD: u32 = 3;
/// The shortest interval between pings, whatever the period.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(100);

/// Sends `state` to the service manager; a failure is logged, never fatal. (The server sends
/// through this too.)
pub fn send(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Tells the service manager the agent is up, with a status line (again to change the line).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the status line the service manager shows.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells the service manager the agent is stopping.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping; the replicas keep running"),
    ]);
}

/// The watchdog task; stops when dropped.
pub struct WatchdogTask(tokio::task::JoinHandle<()>);

impl Drop for WatchdogTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts [`watchdog`] on the current runtime.
pub fn spawn_watchdog(data_dir: PathBuf, stop: watch::Receiver<bool>) -> WatchdogTask {
    WatchdogTask(tokio::spawn(watchdog(data_dir, stop)))
}

/// How often to ping for a watchdog period.
pub fn ping_interval(period: Duration) -> Duration {
    (period / PINGS_PER_PERIOD).max(MIN_PING_INTERVAL)
}

/// Pings the watchdog when the service manager asked for one (`WatchdogSec=`), until `stop`.
/// Each ping follows a check that the runtime schedules timers, that a blocking thread is free
/// and that the locked data directory still holds this process's pid.
pub async fn watchdog(data_dir: PathBuf, stop: watch::Receiver<bool>) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let interval = ping_interval(period);
    tracing::debug!(?period, ?interval, "watchdog enabled");
    let lock = data_dir.join(LOCK_FILE);
    watchdog_loop(
        interval,
        || check_alive(lock.clone(), interval),
        || send(&[NotifyState::Watchdog]),
        stop,
    )
    .await;
}

/// Every `interval`: runs `check` and, when it passes, `ping`. Ends when `stop` turns true.
pub async fn watchdog_loop<C, F>(
    interval: Duration,
    check: C,
    mut ping: impl FnMut(),
    mut stop: watch::Receiver<bool>,
) where
    C: Fn() -> F,
    F: Future<Output = Result<(), String>>,
{
    loop {
        match check().await {
            Ok(()) => ping(),
            Err(problem) => {
                tracing::warn!(%problem, "liveness check failed; not pinging the watchdog")
            }
        }
        tokio::select! {
            () = stopped(&mut stop) => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Reads the lock file on a blocking thread, within `limit`.
async fn check_alive(lock: PathBuf, limit: Duration) -> Result<(), String> {
    let read = tokio::task::spawn_blocking(move || lock_holds_pid(&lock, std::process::id()));
    match tokio::time::timeout(limit, read).await {
        Err(_) => Err(format!(
            "no blocking thread answered within {}",
            humantime::format_duration(limit)
        )),
        Ok(Err(e)) => Err(format!("the check did not run: {e}")),
        Ok(Ok(r)) => r,
    }
}

fn lock_holds_pid(lock: &Path, pid: u32) -> Result<(), String> {
    let text = std::fs::read_to_string(lock)
        .map_err(|e| format!("cannot read {}: {e}", lock.display()))?;
    if text.trim() == pid.to_string() {
        Ok(())
    } else {
        Err(format!(
            "{} holds {:?}, not this agent's pid {pid}",
            lock.display(),
            text.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn intervals() {
        assert_eq!(
            ping_interval(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(ping_interval(Duration::from_millis(90)), MIN_PING_INTERVAL);
    }

    #[test]
    fn the_lock_file_must_hold_our_pid() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(LOCK_FILE);
        assert!(
            lock_holds_pid(&lock, 42)
                .unwrap_err()
                .contains("cannot read")
        );
        std::fs::write(&lock, "42\n").unwrap();
        assert_eq!(lock_holds_pid(&lock, 42), Ok(()));
        let err = lock_holds_pid(&lock, 43).unwrap_err();
        assert!(err.contains("not this agent's pid 43"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn pings_only_after_a_passing_check_and_stops() {
        let pings = Arc::new(AtomicU32::new(0));
        let checks = Arc::new(AtomicU32::new(0));
        let (stop_tx, stop) = watch::channel(false);
        let task = {
            let (pings, checks) = (pings.clone(), checks.clone());
            tokio::spawn(async move {
                watchdog_loop(
                    Duration::from_secs(10),
                    move || {
                        // The second check fails: that round sends no ping.
                        let n = checks.fetch_add(1, Ordering::SeqCst);
                        async move {
                            if n == 1 {
                                Err("stuck".to_string())
                            } else {
                                Ok(())
                            }
                        }
                    },
                    move || {
                        pings.fetch_add(1, Ordering::SeqCst);
                    },
                    stop,
                )
                .await;
            })
        };
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(checks.load(Ordering::SeqCst), 3);
        assert_eq!(pings.load(Ordering::SeqCst), 2);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_live_agent_passes_its_check() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(LOCK_FILE);
        std::fs::write(&lock, format!("{}\n", std::process::id())).unwrap();
        check_alive(lock, Duration::from_secs(5)).await.unwrap();
    }
}
