//! The service manager's notification protocol (systemd `Type=notify`): readiness once both
//! ports are bound, stopping, and watchdog pings sent only while a read through the store
//! answers.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::model::{Kind, ObjectKey};
use crate::server::Endpoints;
use crate::store::Store;

/// Pings are sent this many times per watchdog period, so one slow check is not fatal.
const PINGS_PER_PERIOD: u32 = 3;
/// The shortest interval between pings, whatever the period.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(100);

fn send(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Tells the service manager the server is ready (call it once both ports are bound), and
/// starts the watchdog task in `tasks` (it ends when `stop` turns true).
pub fn ready(
    tasks: &mut JoinSet<&'static str>,
    store: &Arc<dyn Store>,
    stop: &watch::Receiver<bool>,
    endpoints: &Endpoints,
) {
    let status = format!("API {}, agent port {}", endpoints.api, endpoints.agent);
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    let (store, stop) = (Arc::clone(store), stop.clone());
    tasks.spawn(async move {
        watchdog(store, stop).await;
        "watchdog"
    });
}

/// Tells the service manager the server is draining.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining requests"),
    ]);
}

/// How often to ping for a watchdog period.
pub fn ping_interval(period: Duration) -> Duration {
    (period / PINGS_PER_PERIOD).max(MIN_PING_INTERVAL)
}

/// Pings the watchdog when the service manager asked for one (`WatchdogSec=`), each time after
/// a read through the store (on a blocking thread, as every store call) answered in time.
/// Runs until `stop` turns true, also when no watchdog is asked for.
async fn watchdog(store: Arc<dyn Store>, mut stop: watch::Receiver<bool>) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        let _ = stop.wait_for(|s| *s).await;
        return;
    };
    let interval = ping_interval(period);
    tracing::debug!(?period, ?interval, "watchdog enabled");
    watchdog_loop(
        interval,
        || check_store(Arc::clone(&store), interval),
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
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Reads one (absent) object through the store, within `limit`.
async fn check_store(store: Arc<dyn Store>, limit: Duration) -> Result<(), String> {
    let key = ObjectKey::cluster(Kind::Host, "-liveness-check");
    let read = tokio::task::spawn_blocking(move || store.get(&key));
    match tokio::time::timeout(limit, read).await {
        Err(_) => Err(format!(
            "the store did not answer within {}",
            humantime::format_duration(limit)
        )),
        Ok(Err(e)) => Err(format!("the store read did not run: {e}")),
        Ok(Ok(Err(e))) => Err(format!("the store read failed: {e}")),
        Ok(Ok(Ok(_))) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn intervals() {
        assert_eq!(
            ping_interval(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(ping_interval(Duration::from_millis(90)), MIN_PING_INTERVAL);
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
    async fn a_real_store_passes_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(&dir.path().join("clusterclaw.db")).unwrap(),
        );
        check_store(store, Duration::from_secs(5)).await.unwrap();
    }
}
