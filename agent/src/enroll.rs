//! Joining the cluster: the host's key (made here, never sent), the certificate signing request,
//! the `Enroll` call, and renewal of the certificate before it expires.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clusterclaw_proto::agent as pb;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use serde::{Deserialize, Serialize};

/// Renew when less than this share of the certificate's lifetime is left.
const RENEW_WHEN_LEFT: f64 = 1.0 / 3.0;

/// Files of the host identity inside the agent's data dir.
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: PathBuf,
    pub host: PathBuf,
}

impl IdentityFiles {
    pub fn in_dir(dir: &Path) -> Self {
        IdentityFiles {
            key: dir.join("host.key"),
            cert: dir.join("host.crt"),
            ca: dir.join("ca.crt"),
            host: dir.join("host.json"),
        }
    }

    pub fn exist(&self) -> bool {
        self.key.exists() && self.cert.exists() && self.ca.exists() && self.host.exists()
    }
}

/// What the agent remembers about its enrollment.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    pub host_id: String,
    pub server: String,
}

/// A host identity loaded from disk.
#[derive(Clone)]
pub struct HostIdentity {
    pub record: HostRecord,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostIdentity")
            .field("record", &self.record)
            .field("key_pem", &"***")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("cannot create a key or certificate request: {0}")]
    Crypto(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Corrupt { path: PathBuf, problem: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EnrollError + '_ {
    move |source| EnrollError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A fresh key pair and a CSR for it (the subject is the hostname; the server decides the
/// certificate's real identity).
pub fn new_key_and_csr(hostname: &str) -> Result<(KeyPair, String), EnrollError> {
    let key = KeyPair::generate().map_err(|e| EnrollError::Crypto(e.to_string()))?;
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| EnrollError::Crypto(e.to_string()))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, hostname);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| EnrollError::Crypto(e.to_string()))?;
    let pem = csr.pem().map_err(|e| EnrollError::Crypto(e.to_string()))?;
    Ok((key, pem))
}

/// Writes `contents` to `path` atomically (temp file + rename) with mode 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), EnrollError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(contents).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

/// Saves a fresh enrollment.
pub fn save(
    files: &IdentityFiles,
    key: &KeyPair,
    resp: &pb::EnrollResponse,
    server: &str,
) -> Result<HostIdentity, EnrollError> {
    let key_pem = key.serialize_pem();
    write_private(&files.key, key_pem.as_bytes())?;
    write_private(&files.cert, resp.certificate_pem.as_bytes())?;
    write_private(&files.ca, resp.ca_pem.as_bytes())?;
    let record = HostRecord {
        host_id: resp.host_id.clone(),
        server: server.to_string(),
    };
    let json =
        serde_json::to_vec_pretty(&record).map_err(|e| EnrollError::Crypto(e.to_string()))?;
    write_private(&files.host, &json)?;
    Ok(HostIdentity {
        record,
        key_pem,
        cert_pem: resp.certificate_pem.clone(),
        ca_pem: resp.ca_pem.clone(),
    })
}

/// Loads a saved enrollment.
pub fn load(files: &IdentityFiles) -> Result<HostIdentity, EnrollError> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(io(p));
    let host = read(&files.host)?;
    let record: HostRecord = serde_json::from_str(&host).map_err(|e| EnrollError::Corrupt {
        path: files.host.clone(),
        problem: e.to_string(),
    })?;
    Ok(HostIdentity {
        record,
        key_pem: read(&files.key)?,
        cert_pem: read(&files.cert)?,
        ca_pem: read(&files.ca)?,
    })
}

/// Deletes the join token file an enrollment used, so the secret does not outlive its use and
/// a provisioning system can tell the host has joined. A file already gone is fine; a failure
/// is logged, not fatal (the host is enrolled either way).
pub fn remove_used_token_file(path: &Path) -> bool {
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "deleted the used join token file");
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete the used join token file; delete it by hand");
            false
        }
    }
}

/// Saves a renewed certificate and its new key.
pub fn save_renewal(
    files: &IdentityFiles,
    key: &KeyPair,
    cert_pem: &str,
) -> Result<(), EnrollError> {
    // The certificate goes first: a crash in between leaves a new cert with the old key, which
    // fails the TLS handshake and is noticed, rather than silently the other way round.
    write_private(
        &files.key.with_extension("new"),
        key.serialize_pem().as_bytes(),
    )?;
    write_private(&files.cert, cert_pem.as_bytes())?;
    std::fs::rename(files.key.with_extension("new"), &files.key).map_err(io(&files.key))?;
    Ok(())
}

/// Prefix of the URI SAN that carries the host's uid in its certificate.
pub const HOST_URI_PREFIX: &str = "urn:clusterclaw:host:";

/// The cluster's id: the first 16 hex digits of the SHA-256 of the cluster CA certificate's DER.
/// Every agent of one cluster computes the same; clusters with their own CA differ.
pub fn cluster_id(ca_pem: &str) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())
        .map_err(|e| format!("the cluster CA certificate: {e}"))?;
    Ok(Sha256::digest(&pem.contents)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The host's uid, from the `urn:clusterclaw:host:` URI in its certificate.
pub fn host_uid(cert_pem: &str) -> Result<String, String> {
    use x509_parser::extensions::GeneralName;
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| format!("the host certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("the host certificate: {e}"))?;
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => u.strip_prefix(HOST_URI_PREFIX).map(str::to_owned),
                _ => None,
            })
        })
        .filter(|uid| !uid.is_empty())
        .ok_or_else(|| {
            "the host certificate carries no host uid (not a clusterclaw host certificate)"
                .to_owned()
        })
}

impl HostIdentity {
    /// What this identity labels its engine objects with (see [`crate::runtime::Owner`]).
    pub fn owner(&self) -> Result<crate::runtime::Owner, String> {
        Ok(crate::runtime::Owner::new(
            &self.record.host_id,
            cluster_id(&self.ca_pem)?,
            host_uid(&self.cert_pem)?,
        ))
    }
}

/// Validity window of a PEM certificate.
pub fn validity(cert_pem: &str) -> Result<(SystemTime, SystemTime), String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| e.to_string())?;
    let cert = pem.parse_x509().map_err(|e| e.to_string())?;
    let v = cert.validity();
    let t = |ts: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64);
    Ok((t(v.not_before.timestamp()), t(v.not_after.timestamp())))
}

/// Whether a certificate valid over `[not_before, not_after]` should be renewed at `now`.
pub fn needs_renewal(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    let total = not_after
        .duration_since(not_before)
        .unwrap_or_default()
        .as_secs_f64();
    let left = not_after
        .duration_since(now)
        .unwrap_or_default()
        .as_secs_f64();
    total <= 0.0 || left / total < RENEW_WHEN_LEFT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_and_private_files() {
        let (key, csr) = new_key_and_csr("node-1").unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let dir = tempfile::tempdir().unwrap();
        let files = IdentityFiles::in_dir(dir.path());
        let resp = pb::EnrollResponse {
            host_id: "node-1".into(),
            certificate_pem: "CERT".into(),
            ca_pem: "CA".into(),
        };
        save(&files, &key, &resp, "https://127.0.0.1:7443").unwrap();
        use std::os::unix::fs::PermissionsExt;
        for p in [&files.key, &files.cert, &files.ca, &files.host] {
            assert_eq!(
                std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                p.display()
            );
        }
        let loaded = load(&files).unwrap();
        assert_eq!(loaded.record.host_id, "node-1");
        assert!(loaded.key_pem.contains("PRIVATE KEY"));
        assert!(
            !format!("{loaded:?}").contains("PRIVATE"),
            "the key never reaches Debug output"
        );
    }

    #[test]
    fn the_used_token_file_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("join-token");
        std::fs::write(&token, "ccj_x\n").unwrap();
        assert!(remove_used_token_file(&token));
        assert!(!token.exists());
        assert!(remove_used_token_file(&token), "already gone is fine");
        // A path that cannot be deleted (a non-empty directory) is reported, not fatal.
        std::fs::create_dir(&token).unwrap();
        std::fs::write(token.join("f"), "x").unwrap();
        assert!(!remove_used_token_file(&token));
    }

    #[test]
    fn renewal_window() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(90);
        assert!(!needs_renewal(start, end, start + Duration::from_secs(10)));
        assert!(!needs_renewal(start, end, start + Duration::from_secs(59)));
        assert!(needs_renewal(start, end, start + Duration::from_secs(61)));
        assert!(needs_renewal(start, end, end + Duration::from_secs(1)));
    }
}
