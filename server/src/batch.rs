//! Group commit: blocking jobs (each a store write) done in groups on one thread of their own,
//! so that what arrives while one group's transaction syncs to disk shares the next group's
//! transaction instead of waiting for a sync of its own.

use tokio::sync::{mpsc, oneshot};

/// A job and where its outcome goes.
type Queued<J, R> = (J, oneshot::Sender<R>);

/// Queues jobs for a thread that does them in groups of at most `max`: the first job waiting
/// and every job queued behind it at that moment.
pub struct Batcher<J, R> {
    tx: mpsc::Sender<Queued<J, R>>,
}

impl<J: Send + 'static, R: Send + 'static> Batcher<J, R> {
    /// Starts the thread `name`; `run` gets each group in the order queued and answers every
    /// job of it, in the same order. The thread ends when the batcher is dropped. At most
    /// `queue` jobs wait (callers beyond wait to queue theirs).
    pub fn start(
        name: &str,
        max: usize,
        queue: usize,
        run: impl Fn(Vec<J>) -> Vec<R> + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Queued<J, R>>(queue.max(1));
        let max = max.max(1);
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut group = vec![first];
                    while group.len() < max {
                        match rx.try_recv() {
                            Ok(next) => group.push(next),
                            Err(_) => break,
                        }
                    }
                    let (jobs, answers): (Vec<J>, Vec<oneshot::Sender<R>>) =
                        group.into_iter().unzip();
                    // A group that panics answers none of its jobs; the next group is done.
                    let outcomes =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(jobs)))
                            .unwrap_or_default();
                    for (answer, outcome) in answers.into_iter().zip(outcomes) {
                        // A caller that went away no longer wants its answer.
                        let _ = answer.send(outcome);
                    }
                }
            })?;
        Ok(Batcher { tx })
    }

    /// Queues `job` and waits for its outcome; `None` when the thread is gone (it panicked) or
    /// answered nothing for this job.
    pub async fn submit(&self, job: J) -> Option<R> {
        let (answer, outcome) = oneshot::channel();
        self.tx.send((job, answer)).await.ok()?;
        outcome.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_queued_during_a_group_share_the_next_one() {
        let groups = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Barrier::new(2));
        let (g, b) = (groups.clone(), gate.clone());
        let batcher = Arc::new(
            Batcher::start("test-batch", 64, 256, move |jobs: Vec<u32>| {
                if g.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The first group holds until the others are queued behind it.
                    b.wait();
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                jobs.into_iter().map(|j| j * 2).collect()
            })
            .unwrap(),
        );
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.submit(1).await }
        });
        tokio::task::spawn_blocking(move || gate.wait())
            .await
            .unwrap();
        let rest: Vec<_> = (2..=11)
            .map(|j| {
                let b = batcher.clone();
                tokio::spawn(async move { b.submit(j).await })
            })
            .collect();
        assert_eq!(first.await.unwrap(), Some(2));
        for (j, r) in (2..=11).zip(rest) {
            assert_eq!(r.await.unwrap(), Some(j * 2));
        }
        assert_eq!(
            groups.load(Ordering::SeqCst),
            2,
            "the ten jobs queued while the first group ran were done as one group"
        );
    }

    #[tokio::test]
    async fn a_group_that_answers_nothing_answers_none() {
        let batcher =
            Batcher::start("test-batch", 4, 4, |_jobs: Vec<u32>| Vec::<u32>::new()).unwrap();
        assert_eq!(batcher.submit(1).await, None);
    }
}
