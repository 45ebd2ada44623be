//! One loop for every controller: a pass at start, after every burst of store changes
//! (coalesced for [`DEBOUNCE`]; paced by [`OBSERVED_PACE`] when only observed state changed), when the pass asks to look again, and every `resync`; retries
//! with [`backoff`] after a failed pass; stops when `shutdown` turns true (or its sender goes).
//! The pacing never puts off a pass the last one asked for: a steady trickle of status reports
//! does not delay a rollout's gate timer.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;

/// After a wake-up by a store change, further changes are coalesced for this long.
pub const DEBOUNCE: Duration = Duration::from_millis(10);
/// After a wake-up by changes of observed state only (status reports, host refreshes: the
/// desired index did not move), the next pass waits this many times as long as the last one
/// took, so that a steady trickle of such writes keeps a pass over a large store from running
/// all the time (at most a fifth of it); a change of desired state cuts the wait short.
pub const OBSERVED_PACE: u32 = 4;
/// The shortest such wait: a pass that decodes only what changed is short, and a stream of
/// status reports would otherwise run it every [`DEBOUNCE`], each pass re-reading the
/// instances the reports rewrote.
pub const MIN_OBSERVED_WAIT: Duration = Duration::from_millis(50);
/// The longest such wait.
pub const MAX_OBSERVED_WAIT: Duration = Duration::from_secs(2);
/// First retry delay after a failed pass; doubles on every further failure.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Upper bound of the retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How much later than asked a timed pass runs, so that it sees the due time passed.
const TIMER_SLACK: Duration = Duration::from_millis(5);

/// The retry delay after `failures` failed passes in a row.
pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    BACKOFF_INITIAL.saturating_mul(factor).min(BACKOFF_MAX)
}

async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Runs `pass` (blocking work: it runs on the blocking pool) until shutdown. A pass returns
/// `Some(after)` to be run again that soon even when nothing changes (a timer of the
/// controller's: a gate, a pause, a bake time), `None` to wait for a change or the resync.
pub async fn run<E, F>(
    name: &'static str,
    store: Arc<dyn Store>,
    mut shutdown: watch::Receiver<bool>,
    resync: Duration,
    pass: F,
) where
    E: Display + Send + 'static,
    F: Fn(&dyn Store) -> Result<Option<Duration>, E> + Send + Sync + 'static,
{
    let pass = Arc::new(pass);
    // Run as the leader of an epoch ([`crate::store::lease::as_leader`]): every write of a
    // pass carries it and is refused once a newer leader exists.
    let epoch = crate::store::lease::leader_epoch();
    let mut changes = store.subscribe();
    let mut desired = store.subscribe_desired();
    let mut changes_open = true;
    let mut failures: u32 = 0;
    tracing::info!(controller = name, resync = ?resync, epoch = ?epoch, "controller started");
    loop {
        if *shutdown.borrow() {
            break;
        }
        // Mark what this pass will see, so any later change wakes the loop again.
        changes.borrow_and_update();
        let desired_before = *desired.borrow_and_update();
        let started = std::time::Instant::now();
        let (s, p) = (Arc::clone(&store), Arc::clone(&pass));
        let joined = tokio::task::spawn_blocking(move || {
            crate::store::lease::fenced(epoch, || p(s.as_ref())).map_err(|e| e.to_string())
        });
        let outcome = tokio::select! {
            joined = joined => joined.unwrap_or_else(|e| Err(format!("the pass panicked: {e}"))),
            () = shutdown_requested(&mut shutdown) => break,
        };
        let took = started.elapsed();
        crate::metrics::observe_loop_pass(name, took);
        let ended = tokio::time::Instant::now();
        let sleep_for = match outcome {
            Ok(after) => {
                failures = 0;
                after.map_or(resync, |a| (a + TIMER_SLACK).min(resync))
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let delay = backoff(failures);
                tracing::warn!(controller = name, error = %e, failures, retry_in = ?delay, "controller pass failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown_requested(&mut shutdown) => break,
                }
                continue;
            }
        };
        let woken_by_change = tokio::select! {
            changed = changes.changed(), if changes_open => {
                if changed.is_err() {
                    tracing::warn!(controller = name, "the store stopped announcing changes; falling back to the timer");
                    changes_open = false;
                }
                changed.is_ok()
            }
            () = tokio::time::sleep(sleep_for) => false,
            () = shutdown_requested(&mut shutdown) => break,
        };
        if woken_by_change {
            let wait = if *desired.borrow() != desired_before {
                DEBOUNCE
            } else {
                took.saturating_mul(OBSERVED_PACE)
                    .clamp(MIN_OBSERVED_WAIT, MAX_OBSERVED_WAIT)
            };
            // No later than the pass the last one asked for.
            let wait = wait
                .min((ended + sleep_for).saturating_duration_since(tokio::time::Instant::now()));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                r = desired.changed(), if wait > DEBOUNCE => {
                    if r.is_ok() {
                        tokio::select! {
                            () = tokio::time::sleep(DEBOUNCE) => {}
                            () = shutdown_requested(&mut shutdown) => break,
                        }
                    } else {
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = shutdown_requested(&mut shutdown) => break,
                        }
                    }
                }
                () = shutdown_requested(&mut shutdown) => break,
            }
        }
    }
    tracing::info!(controller = name, "controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Resource;
    use crate::store::WriteMode;
    use std::sync::Mutex;

    fn host(name: &str, label: u32) -> Resource {
        Resource::from_value(
            serde_json::json!({"apiVersion": "clusterclaw.io/v1", "kind": "Host",
            "metadata": {"name": name, "labels": {"n": label.to_string()}}, "spec": {}}),
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_of_observed_changes_does_not_put_off_a_timed_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap());
        // A pass of 200 ms that asks to run again 300 ms after it: paced by the changes alone,
        // the next pass would wait 4 x 200 ms.
        let passes: Arc<Mutex<Vec<std::time::Instant>>> = Arc::default();
        let seen = Arc::clone(&passes);
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(run(
            "test",
            Arc::clone(&store),
            shutdown,
            Duration::from_secs(30),
            move |_: &dyn Store| {
                seen.lock().unwrap().push(std::time::Instant::now());
                std::thread::sleep(Duration::from_millis(200));
                Ok::<_, String>(Some(Duration::from_millis(300)))
            },
        ));
        // Writes of observed state only (a host's labels) every 20 ms for 4 s.
        let writer = Arc::clone(&store);
        tokio::task::spawn_blocking(move || {
            let until = std::time::Instant::now() + Duration::from_secs(4);
            let mut n = 0;
            while std::time::Instant::now() < until {
                n += 1;
                writer
                    .write(&[(host("h1", n), WriteMode::Apply)], false)
                    .unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .unwrap();
        stop.send(true).unwrap();
        task.await.unwrap();
        let passes = passes.lock().unwrap().clone();
        let mut gaps: Vec<Duration> = passes.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort();
        assert!(gaps.len() >= 2, "{} passes in 4 s", passes.len());
        let median = gaps[gaps.len() / 2];
        assert!(
            median < Duration::from_millis(800),
            "passes {median:?} apart (200 ms pass + 300 ms asked for): the changes put the timer off"
        );
    }
}
