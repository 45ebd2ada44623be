//! The calling host's identity, read from its client certificate and checked against the store.

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
