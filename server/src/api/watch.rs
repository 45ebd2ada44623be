//! Watches: `GET` of a list with `?watch=true&resourceVersion=N` streams the changes after `N`
//! as JSON lines (`{"type":"ADDED|MODIFIED|DELETED","object":{...}}`, and every
//! [`BOOKMARK_INTERVAL`] `{"type":"BOOKMARK","resourceVersion":N}`), or as server-sent events
//! when the client accepts `text/event-stream`.
//!
//! One feed per sequence (objects, events) reads the store's change log once per change,
//! serializes each change's line once, and hands each batch to every watcher through one
//! bounded broadcast ring ([`RING`] batches): a watcher that falls that far behind gets an
//! `ERROR` line (410, "list again") and its stream ends, so a slow client never holds memory
//! without limit (at most [`CLIENT_BUFFER`] lines of its own, shared with every other watcher
//! otherwise). Each watcher filters the shared batches by its list's filter and its caller's
//! scope, deletes included, and sends the shared lines as they are. A version older than the
//! change log keeps is answered 410 Gone before the stream starts.
//!
//! The lists that are views rather than objects have no change log. Volumes, tokens and an
//! instance's config revisions are watched by reading the caller's list again after every
//! change of the store (at most every [`MIN_READ_GAP`], and every [`POLL_INTERVAL`] for what
//! moves no index, such as the volumes hosts report) and sending what differs
//! ([`watch_polled`]); given a `resourceVersion`, such a watch cannot replay, so it starts
//! with every current item as `ADDED` and a bookmark with `"initialEventsEnd":true`. The audit
//! log is append-only and numbered: its watch sends the records after a `seq`
//! ([`watch_appended`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, ApiState, ErrorCode};
use crate::events::EventFilter;
use crate::model::Kind;
use crate::store::{Change, ChangeType, ChangesSince, Feed, ListFilter, Scope, Store};

/// How often an idle watch says where it stands.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(10);
/// Batches the broadcast ring holds: a watcher further behind than this is dropped.
pub const RING: usize = 1024;
/// Lines waiting for one client's connection.
const CLIENT_BUFFER: usize = 256;
/// Changes read from the store at once.
const READ_LIMIT: usize = 1000;
/// How often a watch of a list without a change log reads it again when the store's index
/// did not move (volume reports and audit records of refused requests move none).
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Least time between two reads of a list without a change log, however fast the index moves.
pub const MIN_READ_GAP: Duration = Duration::from_millis(250);

/// One item of a list without a change log: its identity in the list and its JSON.
pub type Entry = (String, String);

/// One change of a batch, with its line made once for every watcher.
#[derive(Debug)]
pub struct Item {
    pub change: Change,
    /// The JSON line, newline included.
    line: Bytes,
    /// The server-sent event, made by the first watcher that sends one.
    event: OnceLock<Bytes>,
}

impl Item {
    pub fn new(change: Change) -> Item {
        let line = Bytes::from(frame(&change_line(&change), false));
        Item {
            change,
            line,
            event: OnceLock::new(),
        }
    }

    /// The change as a line of a JSON-lines or server-sent-events stream.
    fn framed(&self, sse: bool) -> Bytes {
        if sse {
            self.event
                .get_or_init(|| Bytes::from(frame(&change_line(&self.change), true)))
                .clone()
        } else {
            self.line.clone()
        }
    }
}

/// One batch of changes, shared by every watcher of a feed.
#[derive(Debug)]
pub struct Batch {
    pub items: Vec<Item>,
    /// The version the feed has reached with this batch.
    pub upto: u64,
    /// The feed lost its place (the log was trimmed under it): watchers must list again.
    pub reset: bool,
}

/// The feeds of one server: started on the first watch.
#[derive(Default)]
pub struct Hub {
    objects: OnceLock<broadcast::Sender<Arc<Batch>>>,
    events: OnceLock<broadcast::Sender<Arc<Batch>>>,
}

impl Hub {
    /// A receiver of `feed`, starting its reader on first use.
    pub fn subscribe(&self, store: &Arc<dyn Store>, feed: Feed) -> broadcast::Receiver<Arc<Batch>> {
        let cell = match feed {
            Feed::Objects => &self.objects,
            Feed::Events => &self.events,
        };
        cell.get_or_init(|| {
            let (tx, _) = broadcast::channel(RING);
            let version = match feed {
                Feed::Objects => Some(store.subscribe()),
                Feed::Events => store.subscribe_events(),
            };
            if let Some(mut version) = version {
                // Read here, not in the task: a change between now and the task's first poll
                // is then still seen as a change.
                let last = *version.borrow_and_update();
                tokio::spawn(run_feed(Arc::clone(store), feed, version, last, tx.clone()));
            }
            tx
        })
        .subscribe()
    }
}

/// Reads the change log after every change of `version` and broadcasts what it finds.
async fn run_feed(
    store: Arc<dyn Store>,
    feed: Feed,
    mut version: watch::Receiver<u64>,
    mut last: u64,
    tx: broadcast::Sender<Arc<Batch>>,
) {
    loop {
        if version.changed().await.is_err() {
            return;
        }
        let current = *version.borrow_and_update();
        while last < current {
            let s = Arc::clone(&store);
            let read =
                tokio::task::spawn_blocking(move || s.changes_since(feed, last, READ_LIMIT)).await;
            match read {
                Ok(Ok(ChangesSince::Changes { items, upto })) => {
                    let stuck = upto <= last;
                    last = last.max(upto);
                    let items = items.into_iter().map(Item::new).collect();
                    let _ = tx.send(Arc::new(Batch {
                        items,
                        upto: last,
                        reset: false,
                    }));
                    if stuck {
                        break;
                    }
                }
                Ok(Ok(ChangesSince::Gone { .. })) => {
                    last = current;
                    let _ = tx.send(Arc::new(Batch {
                        items: Vec::new(),
                        upto: last,
                        reset: true,
                    }));
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the watch feed could not read the change log; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the watch feed task failed");
                    break;
                }
            }
        }
    }
}

/// What one watcher wants.
#[derive(Clone, Debug)]
pub enum Want {
    /// Objects of a list (its filter already narrowed to the caller's scope).
    Objects(ListFilter),
    Events(EventFilter),
}

impl Want {
    fn feed(&self) -> Feed {
        match self {
            Want::Objects(_) => Feed::Objects,
            Want::Events(_) => Feed::Events,
        }
    }

    /// Whether `c` goes to a caller in `scope` watching this.
    pub fn matches(&self, scope: &Scope, c: &Change) -> bool {
        match self {
            Want::Events(f) => f.matches_object(scope, &c.key),
            Want::Objects(f) => {
                let k = &c.key;
                let name_field =
                    |pin: &Option<String>, v: &str| pin.as_deref().is_none_or(|p| p == v);
                // Tenants and projects are pinned by name: a tenant's list filters on
                // `name`, a project's on `tenant` and `name`.
                k.kind == f.kind
                    && scope.sees(k)
                    && match k.kind {
                        Kind::Tenant => {
                            name_field(&f.name, &k.name) && name_field(&f.tenant, &k.name)
                        }
                        Kind::Project => {
                            name_field(&f.tenant, &k.tenant) && name_field(&f.name, &k.name)
                        }
                        _ => {
                            name_field(&f.tenant, &k.tenant)
                                && name_field(&f.project, &k.project)
                                && name_field(&f.name, &k.name)
                        }
                    }
                    && f.labels.iter().all(|r| r.matches(&c.labels))
            }
        }
    }
}

/// `line` framed for the stream: a JSON line or a server-sent event.
fn frame(line: &str, sse: bool) -> String {
    if sse {
        format!("data: {line}\n\n")
    } else {
        format!("{line}\n")
    }
}

/// A change as a line of the stream.
fn change_line(c: &Change) -> String {
    format!(
        "{{\"type\":\"{}\",\"object\":{}}}",
        c.type_.as_str(),
        c.json
    )
}

fn bookmark_line(version: u64) -> String {
    format!("{{\"type\":\"BOOKMARK\",\"resourceVersion\":{version}}}")
}

fn error_line(message: &str) -> String {
    serde_json::json!({"type": "ERROR", "object": {"code": 410, "reason": "Expired", "message": message}})
        .to_string()
}

/// The line that ends a watch on `e` (a list that can no longer be read: its instance was
/// deleted, the store is away).
fn failure_line(e: &ApiError) -> String {
    serde_json::json!({"type": "ERROR", "object": {"code": e.code.status().as_u16(), "reason": e.code, "message": e.message}})
        .to_string()
}

/// The bookmark after the current items a watch without replay starts with.
fn initial_end_line(version: u64) -> String {
    format!("{{\"type\":\"BOOKMARK\",\"resourceVersion\":{version},\"initialEventsEnd\":true}}")
}

/// A change of a list without a change log, as a line of the stream.
fn entry_line(type_: ChangeType, json: &str) -> String {
    format!("{{\"type\":\"{}\",\"object\":{json}}}", type_.as_str())
}

/// What changed from `known` to `now` (in `now`'s order, then the deletes by identity), as
/// lines; `known` becomes `now`.
pub fn diff(known: &mut BTreeMap<String, String>, now: Vec<Entry>) -> Vec<String> {
    let mut lines = Vec::new();
    let mut next = BTreeMap::new();
    for (id, json) in now {
        match known.remove(&id) {
            None => lines.push(entry_line(ChangeType::Added, &json)),
            Some(old) if old != json => lines.push(entry_line(ChangeType::Modified, &json)),
            Some(_) => {}
        }
        next.insert(id, json);
    }
    for json in known.values() {
        lines.push(entry_line(ChangeType::Deleted, json));
    }
    *known = next;
    lines
}

/// Where the lines of one watch go.
struct Out {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    sse: bool,
}

impl Out {
    /// Sends `line`; false once the client is gone.
    async fn send(&self, line: &str) -> bool {
        self.tx
            .send(Ok(Bytes::from(frame(line, self.sse))))
            .await
            .is_ok()
    }
}

/// When a watch of a list without a change log reads again: after a change of the store's
/// index or every [`POLL_INTERVAL`], at most every [`MIN_READ_GAP`]; a bookmark every
/// [`BOOKMARK_INTERVAL`] meanwhile.
struct Pacer {
    index: watch::Receiver<u64>,
    poll: tokio::time::Interval,
    bookmarks: tokio::time::Interval,
    last_read: tokio::time::Instant,
}

impl Pacer {
    /// Started before the first read: a change from then on is a reason to read again.
    fn new(state: &ApiState) -> Pacer {
        let mut index = state.inner.index.clone();
        index.borrow_and_update();
        let mut poll =
            tokio::time::interval_at(tokio::time::Instant::now() + POLL_INTERVAL, POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let bookmarks = tokio::time::interval_at(
            tokio::time::Instant::now() + BOOKMARK_INTERVAL,
            BOOKMARK_INTERVAL,
        );
        Pacer {
            index,
            poll,
            bookmarks,
            last_read: tokio::time::Instant::now(),
        }
    }

    /// Waits until it is time to read again, sending bookmarks at `version()` meanwhile;
    /// false when the watch is over (the client left, the server is stopping).
    async fn next(&mut self, state: &ApiState, out: &Out, version: impl Fn() -> u64) -> bool {
        loop {
            tokio::select! {
                r = self.index.changed() => {
                    if r.is_err() {
                        return false;
                    }
                    break;
                }
                _ = self.poll.tick() => break,
                _ = self.bookmarks.tick() => {
                    if !out.send(&bookmark_line(version())).await {
                        return false;
                    }
                }
                () = out.tx.closed() => return false,
            }
        }
        if state.is_shutting_down() {
            return false;
        }
        tokio::time::sleep_until(self.last_read + MIN_READ_GAP).await;
        self.index.borrow_and_update();
        self.last_read = tokio::time::Instant::now();
        true
    }
}

/// The streaming answer of a watch.
fn stream_response(
    lines: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    sse: bool,
    from: u64,
) -> Response {
    let mut resp = Response::new(Body::from_stream(ReceiverStream::new(lines)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if sse {
            "text/event-stream"
        } else {
            "application/x-ndjson"
        }),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(super::INDEX_HEADER, HeaderValue::from(from));
    *resp.status_mut() = StatusCode::OK;
    resp
}

/// Answers a watch of a list without a change log, which `read` reads as the caller sees it
/// (its identities unique). Each read after a change of the store is compared with the one
/// before and what differs is sent. With `from` (a client that listed before) the stream
/// starts with every current item as `ADDED`, then a bookmark with `"initialEventsEnd":true`:
/// what changed between that list and this watch is not known otherwise. A read that fails
/// (the list's parent was deleted) ends the stream with an `ERROR` line saying why.
pub async fn watch_polled<F, Fut>(
    state: &ApiState,
    from: Option<u64>,
    sse: bool,
    read: F,
) -> Result<Response, ApiError>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Vec<Entry>, ApiError>> + Send + 'static,
{
    let mut pacer = Pacer::new(state);
    let first = read().await?;
    let at = state.index();
    let (tx, lines) = mpsc::channel(CLIENT_BUFFER);
    let state = state.clone();
    tokio::spawn(async move {
        let out = Out { tx, sse };
        if from.is_some() {
            for (_, json) in &first {
                if !out.send(&entry_line(ChangeType::Added, json)).await {
                    return;
                }
            }
            if !out.send(&initial_end_line(at)).await {
                return;
            }
        }
        let mut known: BTreeMap<String, String> = first.into_iter().collect();
        while pacer.next(&state, &out, || state.index()).await {
            let now = match read().await {
                Ok(now) => now,
                Err(e) => {
                    let _ = out.send(&failure_line(&e)).await;
                    return;
                }
            };
            for line in diff(&mut known, now) {
                if !out.send(&line).await {
                    return;
                }
            }
        }
    });
    Ok(stream_response(lines, sse, from.unwrap_or(at)))
}

/// Answers a watch of an append-only, numbered log (the audit log): `read_after(n)` reads the
/// caller's records numbered after `n`, oldest first, at most a page; each is sent as `ADDED`,
/// from the records after `from` on. Bookmarks carry the last number sent past.
pub async fn watch_appended<F, Fut>(
    state: &ApiState,
    from: u64,
    sse: bool,
    read_after: F,
) -> Result<Response, ApiError>
where
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(Vec<(u64, String)>, bool), ApiError>> + Send + 'static,
{
    let mut pacer = Pacer::new(state);
    let first = read_after(from).await?;
    let (tx, lines) = mpsc::channel(CLIENT_BUFFER);
    let state = state.clone();
    tokio::spawn(async move {
        let out = Out { tx, sse };
        let mut cursor = from;
        let mut page = first;
        loop {
            let (records, full) = page;
            for (seq, json) in records {
                if !out.send(&entry_line(ChangeType::Added, &json)).await {
                    return;
                }
                cursor = cursor.max(seq);
            }
            // More than a page waits: read on at once.
            if !full && !pacer.next(&state, &out, || cursor).await {
                return;
            }
            page = match read_after(cursor).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = out.send(&failure_line(&e)).await;
                    return;
                }
            };
        }
    });
    Ok(stream_response(lines, sse, from))
}

fn gone(given: u64, oldest: u64) -> ApiError {
    ApiError::new(
        ErrorCode::Gone,
        format!(
            "resourceVersion {given} is too old: the server can replay changes only after {oldest}; list again and watch from the list's resourceVersion"
        ),
    )
}

/// Answers a watch of `want` from version `from` (the current one when `None`) for a caller
/// in `scope`.
pub async fn watch(
    state: &ApiState,
    scope: Scope,
    want: Want,
    from: Option<u64>,
    sse: bool,
) -> Result<Response, ApiError> {
    let store = Arc::clone(state.store());
    let feed = want.feed();
    // Subscribed before the catch-up read, so nothing falls between the two.
    let rx = state.inner.hub.subscribe(&store, feed);
    let from = match from {
        Some(v) => v,
        None => match feed {
            Feed::Objects => store.index(),
            Feed::Events => store.subscribe_events().map_or(0, |r| *r.borrow()),
        },
    };
    let first = read(state, feed, from).await?;
    let (mut cursor, mut pending) = match first {
        ChangesSince::Gone { oldest } => return Err(gone(from, oldest)),
        ChangesSince::Changes { items, upto } => (upto.max(from), items),
    };
    let (tx, lines) = mpsc::channel::<Result<Bytes, std::io::Error>>(CLIENT_BUFFER);
    let state = state.clone();
    tokio::spawn(async move {
        let send = |line: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(Bytes::from(frame(&line, sse)))).await.is_ok() }
        };
        // Catch up from the log, then follow the feed.
        loop {
            let more = pending.len() >= READ_LIMIT;
            for c in pending.drain(..) {
                if want.matches(&scope, &c) && !send(change_line(&c)).await {
                    return;
                }
            }
            if !more {
                break;
            }
            match read(&state, feed, cursor).await {
                Ok(ChangesSince::Changes { items, upto }) => {
                    cursor = cursor.max(upto);
                    pending = items;
                }
                Ok(ChangesSince::Gone { .. }) | Err(_) => {
                    let _ = send(error_line(
                        "the watch fell behind the change log; list again",
                    ))
                    .await;
                    return;
                }
            }
        }
        follow(rx, &want, &scope, cursor, &tx, sse, || {
            state.is_shutting_down()
        })
        .await;
    });
    Ok(stream_response(lines, sse, from))
}

/// Sends the feed's changes after `cursor` that `want` matches for `scope`, and a bookmark
/// every [`BOOKMARK_INTERVAL`], until the client leaves, the server is `stopping`, or the
/// watch falls more than the ring behind: then an `ERROR` line (410) and the end.
async fn follow(
    mut rx: broadcast::Receiver<Arc<Batch>>,
    want: &Want,
    scope: &Scope,
    mut cursor: u64,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    sse: bool,
    stopping: impl Fn() -> bool,
) {
    let send = |bytes: Bytes| async move { tx.send(Ok(bytes)).await.is_ok() };
    let text = |line: String| Bytes::from(frame(&line, sse));
    let mut bookmarks = tokio::time::interval(BOOKMARK_INTERVAL);
    bookmarks.tick().await;
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Ok(b) if b.reset => {
                    let _ = send(text(error_line("the change log was trimmed past this watch; list again"))).await;
                    return;
                }
                Ok(b) => {
                    for item in b.items.iter().filter(|i| i.change.rv > cursor) {
                        if want.matches(scope, &item.change) && !send(item.framed(sse)).await {
                            return;
                        }
                    }
                    cursor = cursor.max(b.upto);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = send(text(error_line(&format!(
                        "this watch fell {n} batches behind and was dropped; list again"
                    ))))
                    .await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = bookmarks.tick() => {
                if !send(text(bookmark_line(cursor))).await {
                    return;
                }
            }
            _ = tx.closed() => return,
        }
        if stopping() {
            return;
        }
    }
}

async fn read(state: &ApiState, feed: Feed, after: u64) -> Result<ChangesSince, ApiError> {
    state
        .run_unscoped(move |store| Ok(store.changes_since(feed, after, READ_LIMIT)?))
        .await
}

/// `?watch=true&resourceVersion=N` of a list: whether to watch, and from where.
pub fn params(params: &super::query::Params) -> Result<Option<Option<u64>>, ApiError> {
    if !params.bool("watch")? {
        if params.get("resourceVersion").is_some() {
            return Err(ApiError::bad_request(
                "resourceVersion on a list goes with watch=true",
            ));
        }
        return Ok(None);
    }
    let from = params
        .get("resourceVersion")
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "resourceVersion {v:?} is not a number; give the resourceVersion of a list"
                ))
            })
        })
        .transpose()?;
    Ok(Some(from))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::ObjectKey;

    fn change(kind: Kind, tenant: &str, project: &str, name: &str, type_: ChangeType) -> Change {
        Change {
            rv: 1,
            type_,
            key: ObjectKey {
                kind,
                tenant: tenant.into(),
                project: project.into(),
                name: name.into(),
            },
            labels: BTreeMap::new(),
            json: "{}".into(),
        }
    }

    #[test]
    fn a_tenant_watch_never_carries_another_tenants_object_deletes_included() {
        let acme = Scope::Tenant("acme".into());
        let mut filter = ListFilter::all(Kind::OpenClawInstance);
        assert!(acme.narrow(&mut filter));
        let want = Want::Objects(filter);
        for t in [ChangeType::Added, ChangeType::Modified, ChangeType::Deleted] {
            assert!(want.matches(
                &acme,
                &change(Kind::OpenClawInstance, "acme", "p", "bot", t)
            ));
            assert!(!want.matches(
                &acme,
                &change(Kind::OpenClawInstance, "other", "p", "bot", t)
            ));
        }
        assert!(!want.matches(&acme, &change(Kind::Host, "", "", "h1", ChangeType::Added)));
        // Tenants: only its own.
        let mut tenants = ListFilter::all(Kind::Tenant);
        assert!(acme.narrow(&mut tenants));
        let want = Want::Objects(tenants);
        assert!(want.matches(
            &acme,
            &change(Kind::Tenant, "", "", "acme", ChangeType::Deleted)
        ));
        assert!(!want.matches(
            &acme,
            &change(Kind::Tenant, "", "", "other", ChangeType::Deleted)
        ));
        // Events of hosts are for cluster-wide callers.
        let events = Want::Events(EventFilter::default());
        assert!(!events.matches(&acme, &change(Kind::Host, "", "", "h1", ChangeType::Added)));
        assert!(events.matches(
            &Scope::Cluster,
            &change(Kind::Host, "", "", "h1", ChangeType::Added)
        ));
    }

    fn batch(rv: u64) -> Arc<Batch> {
        let mut c = change(
            Kind::OpenClawInstance,
            "acme",
            "p",
            "bot",
            ChangeType::Modified,
        );
        c.rv = rv;
        Arc::new(Batch {
            items: vec![Item::new(c)],
            upto: rv,
            reset: false,
        })
    }

    #[tokio::test]
    async fn a_watcher_that_stops_reading_is_dropped_with_410_not_buffered() {
        let (feed, rx) = broadcast::channel(8);
        let (tx, mut lines) = mpsc::channel(4);
        let want = Want::Objects(ListFilter::all(Kind::OpenClawInstance));
        let follower = tokio::spawn(async move {
            follow(rx, &want, &Scope::Cluster, 0, &tx, false, || false).await;
        });
        // The client reads nothing while 100 changes go by: its own queue fills (4 lines),
        // the follower waits on it, and the shared ring (8 batches) overflows.
        // Once the follower has given up (410) it holds no receiver, and later sends find none:
        // when that happens depends on the scheduler, so a send's result is not the test.
        for rv in 1..=100 {
            let _ = feed.send(batch(rv));
            tokio::task::yield_now().await;
        }
        let mut got = Vec::new();
        while let Some(line) = tokio::time::timeout(Duration::from_secs(5), lines.recv())
            .await
            .unwrap()
        {
            got.push(String::from_utf8(line.unwrap().to_vec()).unwrap());
        }
        tokio::time::timeout(Duration::from_secs(5), follower)
            .await
            .unwrap()
            .unwrap();
        // What it was sent is bounded by its queue and the ring, not by what went by.
        assert!(got.len() <= 4 + 8 + 2, "{} lines: {got:?}", got.len());
        let last: serde_json::Value = serde_json::from_str(got.last().unwrap()).unwrap();
        assert_eq!(last["type"], "ERROR", "{got:?}");
        assert_eq!(last["object"]["code"], 410);
        assert!(
            got[..got.len() - 1]
                .iter()
                .all(|l| l.starts_with("{\"type\":\"MODIFIED\"")),
            "{got:?}"
        );
        // Its place in the ring is released.
        assert_eq!(feed.receiver_count(), 0);
        feed.send(batch(101)).unwrap_err();
    }

    #[test]
    fn a_list_read_again_sends_what_differs() {
        let e = |id: &str, json: &str| (id.to_string(), json.to_string());
        let mut known = BTreeMap::new();
        assert_eq!(
            diff(&mut known, vec![e("a", "{\"v\":1}"), e("b", "{\"v\":1}")]),
            [
                "{\"type\":\"ADDED\",\"object\":{\"v\":1}}",
                "{\"type\":\"ADDED\",\"object\":{\"v\":1}}"
            ]
        );
        // Unchanged: nothing; changed: MODIFIED; gone: DELETED as it was; new: ADDED.
        assert_eq!(
            diff(&mut known, vec![e("b", "{\"v\":2}"), e("c", "{\"v\":3}")]),
            [
                "{\"type\":\"MODIFIED\",\"object\":{\"v\":2}}",
                "{\"type\":\"ADDED\",\"object\":{\"v\":3}}",
                "{\"type\":\"DELETED\",\"object\":{\"v\":1}}"
            ]
        );
        assert!(diff(&mut known, vec![e("b", "{\"v\":2}"), e("c", "{\"v\":3}")]).is_empty());
        assert_eq!(known.len(), 2);
    }

    #[test]
    fn a_change_is_serialized_once_for_every_watcher() {
        let item = Item::new(change(
            Kind::OpenClawInstance,
            "acme",
            "p",
            "bot",
            ChangeType::Added,
        ));
        let a = item.framed(false);
        let b = item.framed(false);
        // The same bytes, not a copy.
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(&a[..], b"{\"type\":\"ADDED\",\"object\":{}}\n");
        let e = item.framed(true);
        assert_eq!(e.as_ptr(), item.framed(true).as_ptr());
        assert_eq!(&e[..], b"data: {\"type\":\"ADDED\",\"object\":{}}\n\n");
    }
}
