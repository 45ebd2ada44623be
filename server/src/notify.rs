//! The service manager's notification protocol (systemd `Type=notify`): readiness once both
//! ports are bound, stopping, and watchdog pings sent only while a read through the store
//! answers.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing. Sending, the ping
//! interval and the check-then-ping loop are the agent library's (`clusterclaw_agent::notify`).

use std::sync::Arc;
use std::time::Duration;

use clusterclaw_agent::notify::{ping_interval, send, watchdog_loop};
use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::model::{Kind, ObjectKey};
use crate::server::Endpoints;
use crate::store::Store;

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

    #[tokio::test]
    async fn a_real_store_passes_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(&dir.path().join("clusterclaw.db")).unwrap(),
        );
        check_store(store, Duration::from_secs(5)).await.unwrap();
    }
}
