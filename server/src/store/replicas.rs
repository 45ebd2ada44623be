//! The server replicas of one store: every `clusterclaw server` registers itself in the
//! `server_replicas` table and refreshes its row while it runs (what `clusterclaw get servers`
//! and `GET /api/v1/servers` show). Rows are written outside the global index: a heartbeat
//! wakes nothing that watches the store. A replica not seen for [`STALE_BEATS`] of its
//! heartbeats is shown as stale (stopped, or cut off from the store); one not seen for
//! [`PRUNE_AFTER`] is removed by the next heartbeat of any replica.

use std::time::Duration;

use serde::Serialize;

/// Both engines' migration (times in Unix milliseconds on the store's clock). IF NOT EXISTS:
/// a database whose version was set back by hand keeps its rows.
pub const MIGRATION: &str = "CREATE TABLE IF NOT EXISTS server_replicas (
        id TEXT PRIMARY KEY,
        hostname TEXT NOT NULL,
        api TEXT NOT NULL,
        agent TEXT NOT NULL,
        version TEXT NOT NULL,
        started_at_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL,
        beat_every_ms BIGINT NOT NULL,
        is_leader BOOLEAN NOT NULL,
        epoch BIGINT NOT NULL
    );";

/// How many heartbeats a replica may miss before it is shown as stale.
pub const STALE_BEATS: u32 = 4;
/// How long a replica that stopped beating is still listed (as stale).
pub const PRUNE_AFTER: Duration = Duration::from_secs(3600);

/// What a replica says of itself in a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaBeat {
    /// The replica's id (the leader lease's holder id of that process).
    pub id: String,
    pub hostname: String,
    /// The URL of its REST API.
    pub api: String,
    /// The address of its agent port.
    pub agent: String,
    pub version: String,
    /// When the process started, Unix milliseconds.
    pub started_at_ms: i64,
    /// How often it beats (to tell when it is stale).
    pub beat_every: Duration,
    /// Whether it leads, as it knows it.
    pub leading: bool,
    /// The lease epoch it leads in or last read.
    pub epoch: u64,
}

/// One stored replica row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaRow {
    pub beat: ReplicaBeat,
    /// When it last beat, Unix milliseconds on the store's clock.
    pub last_seen_ms: i64,
}

/// The replicas of a store as read at once with the lease.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replicas {
    /// By id.
    pub rows: Vec<ReplicaRow>,
    /// The store's clock when read, Unix milliseconds.
    pub now_ms: i64,
    /// The lease as read: holder, epoch, expiry (Unix milliseconds).
    pub lease: Option<(String, u64, i64)>,
}

/// What a replica is, as shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub enum ServerStatus {
    /// It beat within the last few heartbeats: it runs and reaches the store.
    Ready,
    /// Not seen for [`STALE_BEATS`] heartbeats: stopped, or cut off from the store.
    Stale,
    /// The replica answering cannot reach the store now (its own row, from memory).
    StoreUnreachable,
}

/// One server replica as `GET /api/v1/servers` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerView {
    pub id: String,
    pub hostname: String,
    /// The URL of its REST API.
    pub api: String,
    /// The address of its agent port.
    pub agent: String,
    pub version: String,
    /// RFC 3339.
    pub started_at: String,
    /// When it last refreshed its row (RFC 3339, the store's clock); absent for the answering
    /// replica when it never could.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    pub status: ServerStatus,
    /// Whether it holds the leader lease now (from the lease itself, not from what the replica
    /// last said).
    pub leading: bool,
    /// The lease epoch it leads in, or the one it last read.
    pub epoch: u64,
    /// Whether it reaches the store: for the answering replica its last attempt; for the
    /// others whether their heartbeat is recent (a replica that reaches the store beats).
    pub store_reachable: bool,
    /// Whether this is the replica that answered.
    #[serde(rename = "self")]
    pub this: bool,
}

/// Milliseconds of a duration, saturated.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// How long after its last beat a replica beating every `beat_every` is stale.
pub fn stale_after(beat_every: Duration) -> Duration {
    beat_every * STALE_BEATS
}

/// What the answering replica knows of itself: what it beats, and whether its last attempt
/// to reach the store worked (with the error when not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelfView {
    pub beat: ReplicaBeat,
    pub store_error: Option<String>,
}

/// One replica as shown, from what it beat.
fn view(b: &ReplicaBeat, last_seen_ms: Option<i64>) -> ServerView {
    let rfc = |ms: i64| crate::store::lease::rfc3339_ms(ms).unwrap_or_default();
    ServerView {
        id: b.id.clone(),
        hostname: b.hostname.clone(),
        api: b.api.clone(),
        agent: b.agent.clone(),
        version: b.version.clone(),
        started_at: rfc(b.started_at_ms),
        last_seen: last_seen_ms.map(rfc),
        status: ServerStatus::Ready,
        leading: b.leading,
        epoch: b.epoch,
        store_reachable: true,
        this: false,
    }
}

/// The list as shown: every stored replica (stale ones included) and the answering one,
/// which is listed from memory when its row is missing (never written: the store was away).
pub fn views(replicas: Option<&Replicas>, me: Option<&SelfView>) -> Vec<ServerView> {
    let mut out: Vec<ServerView> = Vec::new();
    if let Some(r) = replicas {
        let leader = r
            .lease
            .as_ref()
            .filter(|(holder, _, expires)| !holder.is_empty() && *expires > r.now_ms);
        for row in &r.rows {
            let b = &row.beat;
            let stale = r.now_ms - row.last_seen_ms > millis(stale_after(b.beat_every));
            let this = me.is_some_and(|m| m.beat.id == b.id);
            let unreachable = this && me.is_some_and(|m| m.store_error.is_some());
            let leading = leader.is_some_and(|(holder, ..)| *holder == b.id);
            out.push(ServerView {
                status: if unreachable {
                    ServerStatus::StoreUnreachable
                } else if stale {
                    ServerStatus::Stale
                } else {
                    ServerStatus::Ready
                },
                leading,
                epoch: match leader {
                    Some((_, epoch, _)) if leading => *epoch,
                    _ => b.epoch,
                },
                store_reachable: !stale && !unreachable,
                this,
                ..view(b, Some(row.last_seen_ms))
            });
        }
    }
    if let Some(m) = me
        && !out.iter().any(|v| v.this)
    {
        let reachable = m.store_error.is_none() && replicas.is_some();
        out.push(ServerView {
            status: if reachable {
                ServerStatus::Ready
            } else {
                ServerStatus::StoreUnreachable
            },
            store_reachable: reachable,
            this: true,
            ..view(&m.beat, None)
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// How often a replica whose leader lease lasts `lease` beats: as often as the leader renews.
pub fn beat_every(lease: Duration) -> Duration {
    super::lease::renew_every(lease).clamp(Duration::from_millis(500), Duration::from_secs(10))
}

/// How long a heartbeat may take before it counts as failed.
const BEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Beats every `every` for this replica (`me`, its leadership as `leader` says) until
/// `shutdown` turns true, publishing what it knows of itself (and whether the store took the
/// beat) through `publish`.
pub async fn run_heartbeat(
    store: std::sync::Arc<dyn super::Store>,
    me: ReplicaBeat,
    leader: tokio::sync::watch::Receiver<super::lease::LeaderStatus>,
    publish: impl Fn(SelfView) + Send + 'static,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let mut beat = me.clone();
        {
            let l = leader.borrow();
            beat.leading = l.leading;
            beat.epoch = l.epoch;
        }
        let (s, b) = (std::sync::Arc::clone(&store), beat.clone());
        let call = tokio::task::spawn_blocking(move || s.server_heartbeat(&b, PRUNE_AFTER));
        let error = match tokio::time::timeout(BEAT_TIMEOUT, call).await {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(e.to_string()),
            Ok(Err(e)) => Some(format!("the heartbeat failed: {e}")),
            Err(_) => Some(format!(
                "the store did not answer within {}s",
                BEAT_TIMEOUT.as_secs()
            )),
        };
        match &error {
            None => failures = 0,
            Some(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(server = %me.id, error = %e, "cannot refresh this server's row in the store");
                }
            }
        }
        publish(SelfView {
            beat,
            store_error: error,
        });
        tokio::select! {
            () = tokio::time::sleep(me.beat_every) => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: &str) -> ReplicaBeat {
        ReplicaBeat {
            id: id.into(),
            hostname: "h".into(),
            api: "http://127.0.0.1:1".into(),
            agent: "127.0.0.1:2".into(),
            version: "0.1.0".into(),
            started_at_ms: 1_000,
            beat_every: Duration::from_secs(2),
            leading: false,
            epoch: 3,
        }
    }

    #[test]
    fn the_lease_says_who_leads_and_old_rows_are_stale() {
        let r = Replicas {
            rows: vec![
                ReplicaRow {
                    beat: ReplicaBeat {
                        // It still believes it leads: the lease says otherwise.
                        leading: true,
                        ..beat("a")
                    },
                    last_seen_ms: 100_000 - 9_000,
                },
                ReplicaRow {
                    beat: beat("b"),
                    last_seen_ms: 100_000 - 1_000,
                },
            ],
            now_ms: 100_000,
            lease: Some(("b".into(), 4, 103_000)),
        };
        let me = SelfView {
            beat: beat("b"),
            store_error: None,
        };
        let v = views(Some(&r), Some(&me));
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].status, v[0].leading, v[0].store_reachable, v[0].this),
            (ServerStatus::Stale, false, false, false)
        );
        assert_eq!(
            (v[1].status, v[1].leading, v[1].epoch, v[1].this),
            (ServerStatus::Ready, true, 4, true)
        );
        // An expired lease: nobody leads.
        let expired = Replicas {
            lease: Some(("b".into(), 4, 99_000)),
            ..r
        };
        assert!(views(Some(&expired), None).iter().all(|v| !v.leading));
    }

    #[test]
    fn the_answering_replica_is_listed_even_when_the_store_is_away() {
        let me = SelfView {
            beat: beat("a"),
            store_error: Some("connection refused".into()),
        };
        let v = views(None, Some(&me));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].status, ServerStatus::StoreUnreachable);
        assert!(!v[0].store_reachable && v[0].this && v[0].last_seen.is_none());
        let json = serde_json::to_value(&v[0]).unwrap();
        assert_eq!(json["self"], true);
        assert_eq!(json["status"], "StoreUnreachable");
    }
}
