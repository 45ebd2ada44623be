//! The calling host's identity, read from its client certificate and checked against the store.

use std::collections::HashMap;
use std::sync::Mutex;

use tonic::Status;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::model::{Kind, ObjectKey};
use crate::store::Store;

/// Prefix of the URI SAN that carries a host's uid in its certificate.
pub const HOST_URI_PREFIX: &str = "urn:clusterclaw:host:";

/// Who is calling: the `Host` object's name and uid, both from the certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIdentity {
    pub name: String,
    pub uid: String,
}

/// Reads name (subject CN) and uid (URI SAN) from a DER certificate the TLS layer has verified.
pub fn identity_from_der(der: &[u8]) -> Result<HostIdentity, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or("the client certificate has no common name")?
        .to_string();
    let uid = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => u.strip_prefix(HOST_URI_PREFIX).map(str::to_string),
                _ => None,
            })
        })
        .ok_or("the client certificate is not a clusterclaw host certificate (no host uid)")?;
    Ok(HostIdentity { name, uid })
}

/// The caller's identity: a client certificate is required, and the `Host` it names must
/// still exist with the same uid (deleting a host revokes its certificates). Blocking: it reads
/// the store.
pub fn authenticate<T>(req: &tonic::Request<T>, store: &dyn Store) -> Result<HostIdentity, Status> {
    let id = peer_identity(req)?;
    check_current(&id, store)?;
    Ok(id)
}

/// The identity in the caller's client certificate, as the TLS layer verified it (no store
/// access; [`check_current`] checks it is still valid).
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Result<HostIdentity, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated(
            "a client certificate is required; enroll this host with a join token first",
        )
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    identity_from_der(leaf.as_ref()).map_err(Status::unauthenticated)
}

/// Checks that the `Host` an identity names still exists with its uid. Blocking.
pub fn check_current(id: &HostIdentity, store: &dyn Store) -> Result<(), Status> {
    let host = store
        .get(&ObjectKey::cluster(Kind::Host, &id.name))
        .map_err(|e| Status::unavailable(format!("store: {e}")))?;
    // The uid is a column of the stored object: nothing is decoded on this path, which every
    // call of every host takes.
    match host {
        Some(h) if h.uid == id.uid => Ok(()),
        _ => Err(removed(&id.name)),
    }
}

/// The identities [`check_current`] found current, kept while the store's count of deleted
/// hosts ([`Store::kind_deletions`]) stays where it was when they were checked: until then
/// every one of those hosts is still there with its uid. A host's every long poll is checked
/// twice (before its wait and before its answer); this asks the store one small row instead
/// of reading the host.
#[derive(Default)]
pub struct Verified {
    inner: Mutex<VerifiedHosts>,
}

#[derive(Default)]
struct VerifiedHosts {
    /// The store's count of deleted hosts the entries were checked under.
    deletions: u64,
    /// Host name -> uid.
    hosts: HashMap<String, String>,
}

impl Verified {
    /// [`check_current`], answered from memory for a host checked before if no host has been
    /// deleted since (or written again under another uid). Blocking: it reads the store.
    pub fn check(&self, id: &HostIdentity, store: &dyn Store) -> Result<(), Status> {
        let deletions = store
            .kind_deletions(Kind::Host)
            .map_err(|e| Status::unavailable(format!("store: {e}")))?;
        let Some(deletions) = deletions else {
            return check_current(id, store);
        };
        {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if inner.deletions != deletions {
                inner.hosts.clear();
                inner.deletions = deletions;
            } else if inner.hosts.get(&id.name) == Some(&id.uid) {
                return Ok(());
            }
        }
        // The count was read before the host: a deletion after this read moves it, and the
        // entry made below is dropped at the next check.
        check_current(id, store)?;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.deletions == deletions {
            inner.hosts.insert(id.name.clone(), id.uid.clone());
        }
        Ok(())
    }
}

/// The refusal of a removed host's certificate, marked so that its agent stops its replicas.
pub fn removed(name: &str) -> Status {
    let mut status = Status::unauthenticated(format!(
        "host {name} has been removed from the cluster and its certificate is revoked; enroll again with a new join token"
    ));
    status.metadata_mut().insert(
        clusterclaw_proto::metadata::REFUSAL,
        tonic::metadata::MetadataValue::from_static(
            clusterclaw_proto::metadata::REFUSAL_HOST_REMOVED,
        ),
    );
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Resource;
    use crate::store::WriteMode;
    use crate::store::sqlite::SqliteStore;

    fn create_host(store: &dyn Store, name: &str) -> HostIdentity {
        let host = Resource::from_value(serde_json::json!({"apiVersion": "clusterclaw.io/v1",
            "kind": "Host", "metadata": {"name": name},
            "spec": {"hostname": name, "capacity": {"cpu": "4", "memory": "8Gi"}}}))
        .unwrap();
        let written = store.write(&[(host, WriteMode::Create)], false).unwrap();
        HostIdentity {
            name: name.to_string(),
            uid: written.results[0].object.uid.clone(),
        }
    }

    fn refused(r: Result<(), Status>) -> bool {
        r.is_err_and(|s| s.code() == tonic::Code::Unauthenticated)
    }

    #[test]
    fn a_checked_host_is_answered_from_memory_until_a_host_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = SqliteStore::open(&path).unwrap();
        let verified = Verified::default();
        let a = create_host(&store, "a");
        let b = create_host(&store, "b");
        verified.check(&a, &store).unwrap();
        verified.check(&b, &store).unwrap();

        // Host a's row goes behind the store's back (its count of deletions stays): the check
        // is answered from memory.
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.execute_batch(
            "DELETE FROM objects WHERE kind = 'Host' AND name = 'a';
             UPDATE kind_stats SET count = count + 1, deleted = deleted - 1 WHERE kind = 'Host';",
        )
        .unwrap();
        verified.check(&a, &store).unwrap();

        // A host deleted through the store moves the count: every host is read again.
        store
            .delete(&ObjectKey::cluster(Kind::Host, "b"), None)
            .unwrap();
        assert!(refused(verified.check(&b, &store)), "b was deleted");
        assert!(refused(verified.check(&a, &store)), "a is gone too");

        // A name enrolled again is a new uid: the old identity stays refused.
        let c = create_host(&store, "c");
        verified.check(&c, &store).unwrap();
        store
            .delete(&ObjectKey::cluster(Kind::Host, "c"), None)
            .unwrap();
        let c2 = create_host(&store, "c");
        assert_ne!(c.uid, c2.uid);
        assert!(refused(verified.check(&c, &store)));
        verified.check(&c2, &store).unwrap();
        // An identity that was never current is refused, and is not remembered as current.
        let forged = HostIdentity {
            name: "c".into(),
            uid: "not-its-uid".into(),
        };
        assert!(refused(verified.check(&forged, &store)));
        assert!(refused(verified.check(&forged, &store)));
        verified.check(&c2, &store).unwrap();
    }
}
