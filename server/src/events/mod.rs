//! Events: what the control plane and the agents saw happen (a replica scheduled, a container
//! restarted, a host gone NotReady), recorded with retention, as Kubernetes' events.
//!
//! Anything that wants to tell a user what happened calls [`record`]: the event is queued in
//! memory (never waiting for the disk) and a flusher writes the queue in one transaction every
//! [`FLUSH_INTERVAL`]. Identical events (same object, type, reason, message and source) within
//! [`FOLD_WINDOW`] are folded into one with a count, so a crash loop is one line that counts.
//! Events live in their own table with their own sequence: they never move the store's global
//! index, so they wake no controller and rebuild no assignment. Old ones are pruned by age
//! (`[events] ttl`, default 1 h) and by number per tenant (`[events] max_per_tenant`, default
//! 10,000; host and cluster-wide events count as one more "tenant").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::model::{Kind, ObjectKey};
use crate::store::{Scope, Store};

/// How long identical events fold into one.
pub const FOLD_WINDOW: Duration = Duration::from_secs(10 * 60);
/// How often queued events are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// How often old events are pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(30);
/// Events queued but not yet written, at most; beyond this the oldest are dropped (and
/// counted in the log), so a flood cannot hold memory without limit.
pub const MAX_QUEUED: usize = 20_000;
/// Longest message kept (longer ones are cut, with `...`).
pub const MAX_MESSAGE: usize = 1024;

/// Normal or Warning, as Kubernetes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Normal" => Some(EventType::Normal),
            "Warning" => Some(EventType::Warning),
            _ => None,
        }
    }
}

/// One thing that happened, before it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The object it happened to (an instance, a host, a rollout).
    pub object: ObjectKey,
    /// The replica of an instance, when it concerns one.
    pub replica: Option<String>,
    pub type_: EventType,
    /// CamelCase: `Scheduled`, `FailedScheduling`, `ContainerStarted`, `NodeNotReady`...
    pub reason: String,
    pub message: String,
    /// `scheduler`, `rollout`, `hosts`, `agent/HOST`.
    pub source: String,
    /// When, in Unix milliseconds.
    pub at_ms: i64,
}

impl Event {
    /// A Normal event of `object` happening now.
    pub fn normal(object: ObjectKey, reason: &str, message: impl Into<String>) -> Self {
        Event::new(object, EventType::Normal, reason, message)
    }

    /// A Warning event of `object` happening now.
    pub fn warning(object: ObjectKey, reason: &str, message: impl Into<String>) -> Self {
        Event::new(object, EventType::Warning, reason, message)
    }

    fn new(object: ObjectKey, type_: EventType, reason: &str, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        Event {
            object,
            replica: None,
            type_,
            reason: reason.to_string(),
            message,
            source: String::new(),
            at_ms: now_ms(),
        }
    }

    pub fn replica(mut self, replica: impl Into<String>) -> Self {
        self.replica = Some(replica.into());
        self
    }

    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    pub fn at(mut self, at_ms: i64) -> Self {
        self.at_ms = at_ms;
        self
    }

    /// What makes two events the same event (folded into one with a count).
    pub fn fold_key(&self) -> FoldKey {
        FoldKey {
            object: self.object.clone(),
            replica: self.replica.clone().unwrap_or_default(),
            type_: self.type_,
            reason: self.reason.clone(),
            message: self.message.clone(),
            source: self.source.clone(),
        }
    }
}

/// The identity of an event for folding.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FoldKey {
    pub object: ObjectKey,
    pub replica: String,
    pub type_: EventType,
    pub reason: String,
    pub message: String,
    pub source: String,
}

/// Identical events of one batch folded: each with how many times and first/last time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Folded {
    pub event: Event,
    pub count: u64,
    pub first_ms: i64,
    pub last_ms: i64,
}

/// Folds a batch: identical events within [`FOLD_WINDOW`] of the first become one, in the
/// order their first occurrence came.
pub fn fold(batch: Vec<Event>) -> Vec<Folded> {
    let window = FOLD_WINDOW.as_millis() as i64;
    let mut out: Vec<Folded> = Vec::new();
    let mut at: HashMap<FoldKey, usize> = HashMap::new();
    for e in batch {
        let key = e.fold_key();
        if let Some(&i) = at.get(&key)
            && e.at_ms - out[i].first_ms <= window
        {
            let f = &mut out[i];
            f.count += 1;
            f.first_ms = f.first_ms.min(e.at_ms);
            f.last_ms = f.last_ms.max(e.at_ms);
            continue;
        }
        at.insert(key, out.len());
        out.push(Folded {
            count: 1,
            first_ms: e.at_ms,
            last_ms: e.at_ms,
            event: e,
        });
    }
    out
}

/// A stored event: its id, its place in the events' own sequence (bumped whenever it is
/// written again, by folding), and how often it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub id: u64,
    pub seq: u64,
    pub event: Event,
    pub count: u64,
    pub first_ms: i64,
    pub last_ms: i64,
}

impl EventRecord {
    /// The event as the API shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let e = &self.event;
        let mut object = serde_json::json!({
            "kind": e.object.kind.as_str(),
            "name": e.object.name,
        });
        if !e.object.tenant.is_empty() {
            object["tenant"] = e.object.tenant.clone().into();
        }
        if !e.object.project.is_empty() {
            object["project"] = e.object.project.clone().into();
        }
        if let Some(r) = &e.replica {
            object["replica"] = r.clone().into();
        }
        let mut metadata = serde_json::json!({
            "name": format!("{}.{}", e.object.name, self.id),
            "resourceVersion": self.seq,
        });
        if !e.object.tenant.is_empty() {
            metadata["tenant"] = e.object.tenant.clone().into();
        }
        if !e.object.project.is_empty() {
            metadata["project"] = e.object.project.clone().into();
        }
        serde_json::json!({
            "apiVersion": "clusterclaw.io/v1",
            "kind": "Event",
            "metadata": metadata,
            "involvedObject": object,
            "type": e.type_.as_str(),
            "reason": e.reason,
            "message": e.message,
            "count": self.count,
            "firstTimestamp": rfc3339_ms(self.first_ms),
            "lastTimestamp": rfc3339_ms(self.last_ms),
            "source": e.source,
        })
    }
}

/// Which events a list or watch returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub tenant: Option<String>,
    pub project: Option<String>,
    /// `instance/NAME`, `host/NAME`, `rollout/NAME`: one object's events.
    pub object: Option<(Kind, String)>,
    /// Newest this many (the list is oldest first).
    pub limit: Option<usize>,
}

impl EventFilter {
    /// Whether `e` passes the filter and the caller's scope.
    pub fn matches(&self, scope: &Scope, e: &Event) -> bool {
        self.matches_object(scope, &e.object)
    }

    /// Whether events of `object` pass the filter and the caller's scope.
    pub fn matches_object(&self, scope: &Scope, object: &ObjectKey) -> bool {
        scope.sees(object)
            && self.tenant.as_ref().is_none_or(|t| *t == object.tenant)
            && self.project.as_ref().is_none_or(|p| *p == object.project)
            && self
                .object
                .as_ref()
                .is_none_or(|(k, n)| *k == object.kind && *n == object.name)
    }
}

/// Parses `instance/NAME` (also `openclawinstance/`, `host/`, `rollout/`, `tenant/`, `project/`).
pub fn parse_for(s: &str) -> Result<(Kind, String), String> {
    let (kind, name) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: give KIND/NAME, such as instance/support-bot"))?;
    let kind = match kind.to_ascii_lowercase().as_str() {
        "instance" | "instances" | "openclawinstance" => Kind::OpenClawInstance,
        "host" | "hosts" => Kind::Host,
        "rollout" | "rollouts" => Kind::Rollout,
        "tenant" | "tenants" => Kind::Tenant,
        "project" | "projects" => Kind::Project,
        other => {
            return Err(format!(
                "{s:?}: events are kept of instances, hosts, rollouts, tenants and projects, not {other:?}"
            ));
        }
    };
    crate::model::validate_dns_label(name).map_err(|e| format!("{s:?}: {e}"))?;
    Ok((kind, name.to_string()))
}

/// How long events are kept and how many per tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub ttl: Duration,
    pub max_per_tenant: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            ttl: Duration::from_secs(3600),
            max_per_tenant: 10_000,
        }
    }
}

/// Records one event: queued in memory and written with the next batch. Never blocks on the
/// disk and never fails (a store that keeps no events drops it).
pub fn record(store: &dyn Store, event: Event) {
    store.record_events(vec![event]);
}

/// Records several events at once.
pub fn record_all(store: &dyn Store, events: Vec<Event>) {
    if !events.is_empty() {
        store.record_events(events);
    }
}

/// Writes queued events every [`FLUSH_INTERVAL`] and prunes old ones every
/// [`PRUNE_INTERVAL`], until `shutdown` turns true; a last flush on the way out.
pub async fn run_flusher(
    store: Arc<dyn Store>,
    retention: Retention,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    prune_as: impl Fn() -> Option<u64> + Send + 'static,
) {
    let mut flush = tokio::time::interval(FLUSH_INTERVAL);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = flush.tick() => {}
            _ = shutdown.changed() => {
                let s = Arc::clone(&store);
                let _ = tokio::task::spawn_blocking(move || s.flush_events()).await;
                return;
            }
        }
        // Every server writes the events it queued; only the leader prunes (under its epoch).
        let prune_epoch = prune_as();
        let prune = prune_epoch.is_some() && last_prune.elapsed() >= PRUNE_INTERVAL;
        if prune {
            last_prune = tokio::time::Instant::now();
        }
        let s = Arc::clone(&store);
        let result = tokio::task::spawn_blocking(move || {
            s.flush_events()?;
            if prune {
                crate::store::lease::fenced(prune_epoch, || s.prune_events(&retention, now_ms()))?;
            }
            Ok::<_, crate::store::StoreError>(())
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "events could not be written"),
            Err(e) => tracing::warn!(error = %e, "the events task failed"),
        }
    }
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// RFC 3339 of Unix milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests;
