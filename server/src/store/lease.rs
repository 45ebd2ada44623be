//! One leader among the servers of one database: a lease row with a holder, an epoch and an
//! expiry, and the fence that makes every controller write carry the epoch.
//!
//! - **The lease.** A server takes the row when it has expired (on the database's clock,
//!   `now()`, never the local one), bumping the epoch; its holder renews it every
//!   [`renew_every`] (a third of the lease). The epoch only ever grows, so it names one term
//!   of leadership.
//! - **Stepping down.** A leader counts its lease from the instant it *sent* the renewal,
//!   which is before the database counted it, and stops acting at [`SAFETY`] of the lease
//!   after that instant when it could not renew (database away, process paused): before any
//!   other server can take the row.
//! - **Fencing.** Controllers run under [`as_leader`] with their epoch; each pass runs under
//!   [`fenced`], and every write transaction an engine opens under a fence reads the lease's
//!   epoch (PostgreSQL: `FOR SHARE`, so a takeover waits for it to commit) and refuses the
//!   write ([`StoreError::Fenced`]) when a newer leader exists. A leader that was paused past
//!   its lease and resumes writes nothing.
//!
//! SQLite has one server per database (its data directory is locked), so that server always
//! takes the lease at once; the code path is the same, except that it never steps down
//! because a renewal came late ([`Store::lease_exclusive`]): no other server can take over,
//! and stopping the controllers would only stall them (a renewal waits behind the database's
//! one writer, which a burst of status reports can hold for seconds on a loaded machine).

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Store, StoreError};

/// The name of the controllers' lease row.
pub const LEASE_NAME: &str = "controllers";
/// The default length of a lease.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(6);
/// The shortest lease allowed (renewals every third of it must fit in).
pub const MIN_LEASE: Duration = Duration::from_secs(1);
/// The longest lease allowed.
pub const MAX_LEASE: Duration = Duration::from_secs(300);
/// The part of a lease a leader acts for without a renewal (counted from when it sent the
/// last renewal that succeeded), in tenths.
const SAFETY_TENTHS: u32 = 9;
/// How often a follower asks for the lease, at most.
const MAX_FOLLOWER_POLL: Duration = Duration::from_secs(1);

/// The PostgreSQL migration: the lease row (expired, held by nobody, epoch 0) and the
/// cluster's certificate authority shared by every server of the database.
pub const PG_MIGRATION: &str = r#"CREATE TABLE leader_lease (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        acquired_at TIMESTAMPTZ NOT NULL,
        renewed_at TIMESTAMPTZ NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );
    INSERT INTO leader_lease (name, holder, epoch, acquired_at, renewed_at, expires_at)
        VALUES ('controllers', '', 0, now(), now(), '-infinity');
    CREATE TABLE cluster_ca (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        cert_pem TEXT NOT NULL,
        key_pem TEXT NOT NULL
    );"#;

/// The SQLite migration: the lease row (times in Unix milliseconds). IF NOT EXISTS and OR IGNORE:
/// a database whose version was set back by hand keeps its lease and epoch.
pub const SQLITE_MIGRATION: &str = "CREATE TABLE IF NOT EXISTS leader_lease (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        acquired_at_ms INTEGER NOT NULL,
        renewed_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL
    );
    INSERT OR IGNORE INTO leader_lease (name, holder, epoch, acquired_at_ms, renewed_at_ms, expires_at_ms)
        VALUES ('controllers', '', 0, 0, 0, 0);";

/// What the database says of the lease after an attempt to take or renew it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Who holds it (empty: nobody ever did).
    pub holder: String,
    pub epoch: u64,
    /// When it expires, Unix milliseconds on the database's clock.
    pub expires_at_ms: i64,
    /// The database's clock when it answered, Unix milliseconds.
    pub now_ms: i64,
}

/// What this server knows of the leadership, for `/readyz`, `/metrics` and the controllers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaderStatus {
    /// This server's id in the lease.
    pub server: String,
    /// Whether this server leads (runs the controllers) now.
    pub leading: bool,
    /// The id of the server holding the lease as last read (empty: unknown or nobody).
    pub holder: String,
    /// The lease's epoch as last read (0: never read).
    pub epoch: u64,
    /// When the lease expires (RFC 3339, the database's clock), as last read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl LeaderStatus {
    /// Before the lease was first read.
    pub fn unknown(server: &str) -> Self {
        LeaderStatus {
            server: server.to_string(),
            leading: false,
            holder: String::new(),
            epoch: 0,
            expires_at: None,
        }
    }

    /// The epoch this server leads in, if it leads.
    pub fn leading_epoch(&self) -> Option<u64> {
        self.leading.then_some(self.epoch)
    }
}

thread_local! {
    static FENCE: Cell<Option<u64>> = const { Cell::new(None) };
}

tokio::task_local! {
    static LEADER_EPOCH: u64;
}

/// Runs `f` (blocking store work on this thread) with the writes of its store calls fenced by
/// `epoch` (`None`: not fenced).
pub fn fenced<T>(epoch: Option<u64>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<u64>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FENCE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FENCE.with(|c| c.replace(epoch)));
    f()
}

/// The epoch the store calls on this thread are fenced by, if any.
pub fn fence() -> Option<u64> {
    FENCE.with(Cell::get)
}

/// Refuses a write fenced by `fence` when the lease is at `current`, a newer epoch.
pub fn check_fence(fence: Option<u64>, current: u64) -> Result<(), StoreError> {
    match fence {
        Some(epoch) if current != epoch => Err(StoreError::Fenced { epoch, current }),
        _ => Ok(()),
    }
}

/// Runs a controller's future as the leader of `epoch`: its passes read it with
/// [`leader_epoch`] and fence their writes with it.
pub async fn as_leader<F: Future>(epoch: u64, f: F) -> F::Output {
    LEADER_EPOCH.scope(epoch, f).await
}

/// The epoch of the controller task this runs in (set by [`as_leader`]), if any.
pub fn leader_epoch() -> Option<u64> {
    LEADER_EPOCH.try_with(|e| *e).ok()
}

/// How often the leader renews a lease of `ttl`.
pub fn renew_every(ttl: Duration) -> Duration {
    ttl / 3
}

/// How often a follower asks for a lease of `ttl`.
fn follower_poll(ttl: Duration) -> Duration {
    (ttl / 3).min(MAX_FOLLOWER_POLL)
}

/// How long after sending a renewal that succeeded the leader may act.
pub fn acting_window(ttl: Duration) -> Duration {
    ttl * SAFETY_TENTHS / 10
}

/// A fresh id for this server process in the lease: the host name (or `server`), the process
/// id and a random suffix, so that a restarted server is a new holder.
pub fn new_server_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "server".into());
    let suffix: u32 = rand::random();
    format!("{host}-{}-{suffix:08x}", std::process::id())
}

pub(crate) fn rfc3339_ms(ms: i64) -> Option<String> {
    let at = std::time::UNIX_EPOCH.checked_add(Duration::from_millis(u64::try_from(ms).ok()?))?;
    Some(humantime::format_rfc3339_millis(at).to_string())
}

/// Takes and keeps the lease for `id` while it can, publishing what it knows on `status`,
/// until `shutdown` turns true; then gives the lease up (it expires at once), so that another
/// server takes over without waiting.
pub async fn run_election(
    store: Arc<dyn Store>,
    id: String,
    ttl: Duration,
    status: watch::Sender<LeaderStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let window = acting_window(ttl);
    let exclusive = store.lease_exclusive();
    // The epoch held and until when this server may act on it (`None`: while it renews).
    let mut held: Option<(u64, Option<Instant>)> = None;
    let mut failures: u32 = 0;
    let publish = |held: Option<(u64, Option<Instant>)>, seen: Option<&LeaseRecord>| {
        status.send_if_modified(|s| {
            let before = s.clone();
            s.leading = held.is_some();
            if let Some(r) = seen {
                s.holder = r.holder.clone();
                s.epoch = r.epoch;
                s.expires_at = rfc3339_ms(r.expires_at_ms);
            }
            if let Some((epoch, _)) = held {
                s.epoch = epoch;
            }
            *s != before
        });
    };
    loop {
        if *shutdown.borrow() {
            break;
        }
        let sent = Instant::now();
        let (s, who, epoch) = (Arc::clone(&store), id.clone(), held.map_or(0, |(e, _)| e));
        let call = tokio::task::spawn_blocking(move || s.lease_acquire(&who, epoch, ttl));
        let deadline = held.and_then(|(_, d)| d);
        let outcome = tokio::select! {
            r = call => Some(r),
            () = sleep_until_opt(deadline) => None,
            _ = shutdown.changed() => continue,
        };
        match outcome {
            Some(Ok(Ok(record))) => {
                failures = 0;
                if record.holder == id {
                    if held.map(|(e, _)| e) != Some(record.epoch) {
                        tracing::info!(server = %id, epoch = record.epoch, "this server leads now");
                    }
                    held = Some((record.epoch, acting_until(exclusive, sent, window)));
                } else {
                    if let Some((epoch, _)) = held {
                        tracing::warn!(server = %id, epoch, leader = %record.holder, new_epoch = record.epoch, "another server took the lease; stepping down");
                    }
                    held = None;
                }
                publish(held, Some(&record));
            }
            Some(Ok(Err(e))) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(server = %id, error = %e, "cannot take or renew the leader lease");
                }
            }
            Some(Err(e)) => {
                tracing::warn!(server = %id, error = %e, "the lease call failed");
            }
            None => {}
        }
        if let Some((epoch, Some(until))) = held
            && Instant::now() >= until
        {
            tracing::warn!(server = %id, epoch, "could not renew the leader lease in time; stepping down");
            held = None;
            publish(None, None);
        }
        let next = if held.is_some() {
            renew_every(ttl)
        } else {
            follower_poll(ttl)
        };
        let next = if failures > 0 {
            next.min(Duration::from_millis(200) * failures.min(5))
        } else {
            next
        };
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            () = sleep_until_opt(held.and_then(|(_, d)| d)) => {
                if let Some((epoch, _)) = held {
                    tracing::warn!(server = %id, epoch, "could not renew the leader lease in time; stepping down");
                }
                held = None;
                publish(None, None);
            }
            _ = shutdown.changed() => {}
        }
    }
    if let Some((epoch, _)) = held {
        publish(None, None);
        let (s, who) = (Arc::clone(&store), id.clone());
        let released = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::task::spawn_blocking(move || s.lease_release(&who, epoch)),
        )
        .await;
        match released {
            Ok(Ok(Ok(()))) => tracing::info!(server = %id, epoch, "gave up the leader lease"),
            Ok(Ok(Err(e))) => {
                tracing::warn!(server = %id, error = %e, "cannot give up the leader lease; it expires by itself")
            }
            _ => {
                tracing::warn!(server = %id, "cannot give up the leader lease; it expires by itself")
            }
        }
    }
}

/// Until when a leader whose renewal was sent at `sent` may act: `window` after it, or, on a
/// store no other server can take the lease of, for as long as it keeps renewing.
fn acting_until(exclusive: bool, sent: Instant, window: Duration) -> Option<Instant> {
    (!exclusive).then(|| sent + window)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_nest_and_are_restored() {
        assert_eq!(fence(), None);
        fenced(Some(3), || {
            assert_eq!(fence(), Some(3));
            fenced(None, || assert_eq!(fence(), None));
            assert_eq!(fence(), Some(3));
        });
        assert_eq!(fence(), None);
    }

    #[test]
    fn a_newer_epoch_refuses_a_fenced_write() {
        assert!(check_fence(None, 7).is_ok());
        assert!(check_fence(Some(7), 7).is_ok());
        let e = check_fence(Some(6), 7).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Fenced {
                    epoch: 6,
                    current: 7
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("epoch 6"), "{e}");
    }

    #[test]
    fn a_leader_stops_acting_before_its_lease_ends() {
        let ttl = Duration::from_secs(6);
        assert!(acting_window(ttl) < ttl);
        assert!(renew_every(ttl) * 2 < acting_window(ttl));
        assert!(follower_poll(ttl) <= MAX_FOLLOWER_POLL);
    }

    fn tenant(name: &str) -> crate::model::Resource {
        crate::model::Resource::from_value(serde_json::json!({"apiVersion": "clusterclaw.io/v1",
            "kind": "Tenant", "metadata": {"name": name}}))
        .unwrap()
    }

    fn write_as(store: &dyn Store, epoch: Option<u64>, name: &str) -> Result<(), StoreError> {
        fenced(epoch, || {
            store
                .write(&[(tenant(name), super::super::WriteMode::Apply)], false)
                .map(drop)
        })
    }

    #[test]
    fn sqlite_one_server_always_takes_the_lease_and_fences_the_old_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap();
        let ttl = Duration::from_secs(5);
        let a = store.lease_acquire("a", 0, ttl).unwrap();
        assert_eq!((a.holder.as_str(), a.epoch), ("a", 1));
        assert!(a.expires_at_ms > a.now_ms, "{a:?}");
        let renewed = store.lease_acquire("a", 1, ttl).unwrap();
        assert_eq!(renewed.epoch, 1, "a renewal keeps the epoch");
        write_as(&store, Some(1), "one").unwrap();
        // The next server of the data directory (a restart) takes over at once.
        let b = store.lease_acquire("b", 0, ttl).unwrap();
        assert_eq!((b.holder.as_str(), b.epoch), ("b", 2));
        let refused = write_as(&store, Some(1), "two").unwrap_err();
        assert!(
            matches!(
                refused,
                StoreError::Fenced {
                    epoch: 1,
                    current: 2
                }
            ),
            "{refused}"
        );
        assert!(
            store
                .get(&crate::model::ObjectKey::cluster(
                    crate::model::Kind::Tenant,
                    "two"
                ))
                .unwrap()
                .is_none()
        );
        write_as(&store, Some(2), "two").unwrap();
        write_as(&store, None, "three").unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sqlite_leader_whose_renewal_waits_for_the_writer_keeps_leading() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(super::super::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap());
        store
            .write(&[(tenant("busy"), super::super::WriteMode::Apply)], false)
            .unwrap();
        let ttl = MIN_LEASE;
        let (status, mut seen) = watch::channel(LeaderStatus::unknown("a"));
        let (stop, shutdown) = watch::channel(false);
        let election = tokio::spawn(run_election(
            Arc::clone(&store),
            "a".into(),
            ttl,
            status,
            shutdown,
        ));
        seen.wait_for(|s| s.leading).await.unwrap();
        // One write holds the database's writer for three times the acting window: every
        // renewal meanwhile waits for it.
        let busy = Arc::clone(&store);
        let hold = acting_window(ttl) * 3;
        let writer = tokio::task::spawn_blocking(move || {
            let key = crate::model::ObjectKey::cluster(crate::model::Kind::Tenant, "busy");
            busy.update(&key, &mut |_| {
                std::thread::sleep(hold);
                false
            })
        });
        let until = Instant::now() + hold + ttl;
        while Instant::now() < until {
            let s = seen.borrow().clone();
            assert!(
                s.leading && s.epoch == 1,
                "the only server of the database stepped down: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        writer.await.unwrap().unwrap();
        stop.send(true).unwrap();
        election.await.unwrap();
    }

    #[test]
    fn postgres_one_leader_at_a_time_and_a_stale_epoch_writes_nothing() {
        let Some(schema) = super::super::conformance::PgSchema::new() else {
            return;
        };
        let one = super::super::postgres::PgStore::open_config(schema.config.clone()).unwrap();
        let two = super::super::postgres::PgStore::open_config(schema.config.clone()).unwrap();
        let ttl = Duration::from_millis(1500);
        let a = one.lease_acquire("a", 0, ttl).unwrap();
        assert_eq!((a.holder.as_str(), a.epoch), ("a", 1));
        // Held and not expired: the other server is refused and told who leads.
        let b = two.lease_acquire("b", 0, ttl).unwrap();
        assert_eq!((b.holder.as_str(), b.epoch), ("a", 1));
        assert_eq!(one.lease_acquire("a", 1, ttl).unwrap().epoch, 1);
        write_as(&one, Some(1), "first").unwrap();
        // `a` stops renewing (paused); once the lease expires on the database's clock, `b`
        // takes it with the next epoch.
        std::thread::sleep(ttl + Duration::from_millis(200));
        let b = two.lease_acquire("b", 0, ttl).unwrap();
        assert_eq!((b.holder.as_str(), b.epoch), ("b", 2));
        // `a` resumes: its writes are refused, its renewal too.
        let refused = write_as(&one, Some(1), "stale").unwrap_err();
        assert!(
            matches!(
                refused,
                StoreError::Fenced {
                    epoch: 1,
                    current: 2
                }
            ),
            "{refused}"
        );
        assert!(
            two.get(&crate::model::ObjectKey::cluster(
                crate::model::Kind::Tenant,
                "stale"
            ))
            .unwrap()
            .is_none()
        );
        let again = one.lease_acquire("a", 1, ttl).unwrap();
        assert_eq!((again.holder.as_str(), again.epoch), ("b", 2));
        write_as(&two, Some(2), "second").unwrap();
        // Given up, the lease is taken at once.
        two.lease_release("b", 2).unwrap();
        assert_eq!(one.lease_acquire("a", 0, ttl).unwrap().epoch, 3);
        // The shared CA: the first offer is kept, later ones get it.
        let first = ("cert-1".to_string(), "key-1".to_string());
        let second = ("cert-2".to_string(), "key-2".to_string());
        assert_eq!(one.shared_ca(&first).unwrap(), Some(first.clone()));
        assert_eq!(two.shared_ca(&second).unwrap(), Some(first));
    }

    #[tokio::test]
    async fn the_leader_epoch_is_set_only_inside_its_scope() {
        assert_eq!(leader_epoch(), None);
        assert_eq!(as_leader(4, async { leader_epoch() }).await, Some(4));
    }
}
