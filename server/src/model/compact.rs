//! Spare capacity given back from objects that are kept for long.
//!
//! A decoded object holds more heap than its contents need: JSON arrays decode into vectors
//! grown by doubling (one or two elements take room for four), JSON objects into maps whose
//! entry vector is sized to their hash table, and a status assembled by a control loop
//! carries the room its pushes reserved. An object kept once is not much; the decoded
//! objects the control loops share ([`crate::store::decoded`]) keep one per stored instance
//! and host, so the slack is paid ten thousand times over. [`Resource::compact`] trims it
//! before an object is kept. What it holds does not change, only the room around it.

use serde_json::{Map, Value};

use super::{
    Condition, Host, HostStatus, InstanceSpec, InstanceStatus, Metadata, OpenClawInstance,
    ReplicaStatus, Resource,
};

impl Resource {
    /// Gives back the spare capacity of the vectors, strings and JSON maps this object holds
    /// (see the module's documentation). Equal to itself before and after.
    pub fn compact(&mut self) {
        match self {
            Resource::OpenClawInstance(o) => o.compact(),
            Resource::Host(o) => o.compact(),
            Resource::Tenant(o) => metadata(&mut o.metadata),
            Resource::Project(o) => metadata(&mut o.metadata),
            Resource::ConfigTemplate(o) => metadata(&mut o.metadata),
            Resource::Secret(o) => metadata(&mut o.metadata),
            Resource::Rollout(o) => {
                metadata(&mut o.metadata);
                if let Some(status) = &mut o.status {
                    string(&mut status.message);
                    status.instances.shrink_to_fit();
                }
            }
        }
    }
}

impl OpenClawInstance {
    fn compact(&mut self) {
        metadata(&mut self.metadata);
        instance_spec(&mut self.spec);
        if let Some(status) = &mut self.status {
            instance_status(status);
        }
    }
}

impl Host {
    fn compact(&mut self) {
        metadata(&mut self.metadata);
        self.spec.hostname.shrink_to_fit();
        if let Some(status) = &mut self.status {
            host_status(status);
        }
    }
}

fn metadata(m: &mut Metadata) {
    m.name.shrink_to_fit();
    m.labels.shrink_to_fit();
    for s in [&mut m.tenant, &mut m.project, &mut m.uid, &mut m.created_at] {
        string(s);
    }
}

fn instance_spec(spec: &mut InstanceSpec) {
    json_map(&mut spec.config.0);
    spec.env.shrink_to_fit();
    spec.update_strategy.steps.shrink_to_fit();
}

fn instance_status(status: &mut InstanceStatus) {
    string(&mut status.message);
    conditions(&mut status.conditions);
    status.replica_status.iter_mut().for_each(replica);
    status.replica_status.shrink_to_fit();
    status.retained_volumes.shrink_to_fit();
    if let Some(rollout) = &mut status.rollout {
        string(&mut rollout.message);
    }
}

fn replica(r: &mut ReplicaStatus) {
    r.name.shrink_to_fit();
    for s in [
        &mut r.host,
        &mut r.message,
        &mut r.container_id,
        &mut r.config_hash,
        &mut r.ready_since,
    ] {
        string(s);
    }
    r.snapshots.shrink_to_fit();
}

fn host_status(status: &mut HostStatus) {
    for s in [
        &mut status.last_heartbeat,
        &mut status.message,
        &mut status.not_ready_since,
    ] {
        string(s);
    }
    conditions(&mut status.conditions);
    if let Some(usage) = &mut status.usage {
        json(usage);
    }
    if let Some(drain) = &mut status.drain {
        drain.replicas.shrink_to_fit();
    }
}

fn conditions(conditions: &mut Vec<Condition>) {
    for c in conditions.iter_mut() {
        string(&mut c.reason);
        string(&mut c.message);
    }
    conditions.shrink_to_fit();
}

fn string(s: &mut Option<String>) {
    if let Some(s) = s {
        s.shrink_to_fit();
    }
}

fn json(v: &mut Value) {
    match v {
        Value::Object(map) => json_map(map),
        Value::Array(items) => {
            items.iter_mut().for_each(json);
            items.shrink_to_fit();
        }
        Value::String(s) => s.shrink_to_fit(),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// A JSON map rebuilt at its size, in its order. The map type has no way to shrink in place.
fn json_map(map: &mut Map<String, Value>) {
    let mut rebuilt = Map::with_capacity(map.len());
    for (key, mut value) in std::mem::take(map) {
        json(&mut value);
        rebuilt.insert(key, value);
    }
    *map = rebuilt;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Resource {
        let json = serde_json::json!({
            "apiVersion": "clusterclaw.io/v1",
            "kind": "OpenClawInstance",
            "metadata": {"name": "bot", "tenant": "t", "project": "p", "labels": {"team": "a"}},
            "spec": {
                "replicas": 2,
                "config": {"agents": {"defaults": {"model": "m", "list": [1, 2]}}, "z": {}, "a": 1},
                "env": {"LOG_LEVEL": "info"},
            },
            "status": {
                "phase": "Pending",
                "conditions": [{"type": "Scheduled", "status": "False", "reason": "NoHost"}],
                "replicaStatus": [
                    {"name": "bot-0", "ordinal": 0, "state": "Pending"},
                    {"name": "bot-1", "ordinal": 1, "state": "Pending", "host": "h1"},
                ],
            },
        });
        serde_json::from_value(json).expect("the test instance decodes")
    }

    #[test]
    fn compacting_changes_nothing_an_object_holds_and_keeps_the_config_order() {
        let before = instance();
        let mut after = before.clone();
        after.compact();
        assert_eq!(after, before);
        let Resource::OpenClawInstance(i) = &after else {
            panic!("an instance")
        };
        let keys: Vec<&String> = i.spec.config.0.keys().collect();
        assert_eq!(keys, ["agents", "z", "a"], "the config keeps its order");
        assert_eq!(
            serde_json::to_string(&after).ok(),
            serde_json::to_string(&before).ok()
        );
    }

    #[test]
    fn compacting_gives_back_the_room_pushes_reserved() {
        let mut r = instance();
        let Resource::OpenClawInstance(i) = &mut r else {
            panic!("an instance")
        };
        let status = i.status.as_mut().expect("a status");
        status.conditions.reserve(8);
        status.replica_status.reserve(8);
        r.compact();
        let Resource::OpenClawInstance(i) = &r else {
            panic!("an instance")
        };
        let status = i.status.as_ref().expect("a status");
        assert_eq!(status.conditions.capacity(), 1);
        assert_eq!(status.replica_status.capacity(), 2);
    }
}
