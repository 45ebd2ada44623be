//! Reconcile loops: each one a pure plan function plus a thin loop that re-reads the store.
//!
//! They run only on the leader ([`while_leading`]): every server serves the API and the agent
//! port, one decides.

pub mod drain;
pub mod hosts;
pub mod rollout;
pub mod runtime;
pub mod scheduler;
pub mod volumes;

#[cfg(test)]
pub(crate) mod fixtures;
pub mod waves;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::store::lease::{self, LeaderStatus};

/// How long the controllers of an ended term get to stop before they are abandoned (their
/// writes are fenced meanwhile).
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// One controller to start: its name and its loop, given the signal to stop.
pub type Starter =
    Box<dyn Fn(watch::Receiver<bool>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Runs the controllers `starters` make while this server leads, each term under its epoch
/// ([`lease::as_leader`]: their writes are fenced by it); stops them when the term ends and
/// starts them again in the next. Returns at `shutdown` (after stopping them), or with the
/// name of a controller that stopped by itself.
pub async fn while_leading(
    mut leader: watch::Receiver<LeaderStatus>,
    mut shutdown: watch::Receiver<bool>,
    starters: Vec<(&'static str, Starter)>,
) -> Option<&'static str> {
    loop {
        // Wait for a term.
        let epoch = loop {
            if *shutdown.borrow() {
                return None;
            }
            if let Some(epoch) = leader.borrow_and_update().leading_epoch() {
                break epoch;
            }
            tokio::select! {
                r = leader.changed() => if r.is_err() { return None },
                r = shutdown.changed() => if r.is_err() { return None },
            }
        };
        tracing::info!(epoch, "leading: starting the controllers");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut running: JoinSet<&'static str> = JoinSet::new();
        for (name, start) in &starters {
            let fut = start(stop_rx.clone());
            let name: &'static str = name;
            running.spawn(lease::as_leader(epoch, async move {
                fut.await;
                name
            }));
        }
        let mut unexpected = None;
        let mut stopping = false;
        while !stopping {
            tokio::select! {
                r = leader.changed() => {
                    let ended = r.is_err() || leader.borrow_and_update().leading_epoch() != Some(epoch);
                    if ended {
                        tracing::warn!(epoch, "no longer leading: stopping the controllers");
                        stopping = true;
                    }
                }
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        stopping = true;
                    }
                }
                Some(joined) = running.join_next() => {
                    unexpected = Some(joined.unwrap_or("a controller"));
                    stopping = true;
                }
            }
        }
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(STOP_GRACE, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                epoch,
                controllers = running.len(),
                "controllers did not stop in time; abandoning them (their writes are fenced)"
            );
            running.abort_all();
        }
        if unexpected.is_some() {
            return unexpected;
        }
        if *shutdown.borrow() {
            return None;
        }
    }
}
