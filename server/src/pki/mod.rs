//! The cluster's certificate authority: creating it, the agent-port server certificate, and
//! signing host client certificates from CSRs.

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::auth::{Secret, commit_file, stage_file, staged_path, sync_dir, sync_parent};

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_CERT_FILE: &str = "server.crt";
pub const SERVER_KEY_FILE: &str = "server.key";

/// Lifetime of the CA certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the agent-port server certificate.
pub const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A server certificate closer than this to its end is renewed at start.
pub const SERVER_CERT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates start this long before they are made, for hosts whose clocks lag.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// Longest host id accepted as a certificate common name (the X.509 upper bound).
const MAX_COMMON_NAME: usize = 64;

/// Paths of the files of a PKI directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiFiles {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl PkiFiles {
    pub fn in_dir(dir: &Path) -> Self {
        PkiFiles {
            dir: dir.to_path_buf(),
            ca_cert: dir.join(CA_CERT_FILE),
            ca_key: dir.join(CA_KEY_FILE),
            server_cert: dir.join(SERVER_CERT_FILE),
            server_key: dir.join(SERVER_KEY_FILE),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "a certificate authority already exists in {} ({} or {} is present); refusing to overwrite it, since every enrolled host trusts it. Remove the directory only if you mean to re-enroll every host",
        .0.display(), CA_CERT_FILE, CA_KEY_FILE
    )]
    CaExists(PathBuf),
    #[error("no certificate authority in {}: {} is missing", .dir.display(), .missing)]
    CaMissing { dir: PathBuf, missing: &'static str },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not usable: {reason}", .path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("the certificate signing request was refused: {0}")]
    BadCsr(String),
    #[error("{name:?} cannot be put in a certificate: {reason}")]
    BadName { name: String, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A newly signed certificate with its private key.
pub struct SignedCert {
    pub cert_pem: String,
    pub key_pem: Secret,
}

impl fmt::Debug for SignedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &self.key_pem)
            .finish()
    }
}

/// The certificate authority: its certificate and signing key.
pub struct Ca {
    cert_pem: String,
    key_pem: Secret,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .field("key", &"***")
            .finish()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // a positive integer
    bytes[0] |= 0x01; // and never with a leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    params.not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now).into();
    params.not_after = now.checked_add(lifetime).unwrap_or(now).into();
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl Ca {
    /// A new self-signed CA.
    pub fn generate() -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "openClusterClaw");
        dn.push(DnType::CommonName, "clusterclaw CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        let key_pem = Secret::new(key.serialize_pem());
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `ca.crt` and `ca.key` from a PKI directory.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let files = PkiFiles::in_dir(dir);
        for (path, name) in [(&files.ca_cert, CA_CERT_FILE), (&files.ca_key, CA_KEY_FILE)] {
            if !path.exists() {
                return Err(PkiError::CaMissing {
                    dir: dir.to_path_buf(),
                    missing: name,
                });
            }
        }
        let cert_pem = read(&files.ca_cert)?;
        let key_pem = Secret::new(read(&files.ca_key)?);
        let key = KeyPair::from_pem(key_pem.expose()).map_err(|e| PkiError::BadFile {
            path: files.ca_key.clone(),
            reason: format!("not a PEM private key ({e})"),
        })?;
        let der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| PkiError::BadFile {
                path: files.ca_cert.clone(),
                reason: format!("not a PEM certificate ({e})"),
            })?;
        let (_, parsed) = X509Certificate::from_der(&der).map_err(|e| PkiError::BadFile {
            path: files.ca_cert.clone(),
            reason: format!("not an X.509 certificate ({e})"),
        })?;
        if !parsed.is_ca() {
            return Err(PkiError::BadFile {
                path: files.ca_cert.clone(),
                reason: "it is not a CA certificate".into(),
            });
        }
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(PkiError::BadFile {
                path: files.ca_key.clone(),
                reason: format!(
                    "this key does not belong to the certificate in {}",
                    files.ca_cert.display()
                ),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| PkiError::BadFile {
            path: files.ca_cert.clone(),
            reason: e.to_string(),
        })?;
        Ok(Ca {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    /// The CA certificate (PEM), the trust anchor handed to agents.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for the agent port, valid for `names` (DNS names or IP addresses).
    pub fn sign_server(&self, names: &[String]) -> Result<SignedCert, PkiError> {
        if names.is_empty() {
            return Err(PkiError::BadName {
                name: String::new(),
                reason: "a server certificate needs at least one name".into(),
            });
        }
        for n in names {
            check_server_name(n)?;
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "openClusterClaw");
        dn.push(DnType::CommonName, names[0].as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        validity(&mut params, SERVER_CERT_VALIDITY);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(SignedCert {
            cert_pem: cert.pem(),
            key_pem: Secret::new(key.serialize_pem()),
        })
    }

    /// Signs a host's CSR (PEM) after checking its signature: the certificate's subject is
    /// `CN=<host_id>`, it may only authenticate a TLS client, and it is valid for `validity`.
    /// Everything else the CSR asks for (names, extensions) is ignored.
    pub fn sign_client_csr(
        &self,
        csr_pem: &str,
        host_id: &str,
        validity_for: Duration,
    ) -> Result<String, PkiError> {
        self.sign_host_csr(csr_pem, host_id, None, validity_for)
    }

    /// Checks that `csr_pem` is a well-formed CSR whose signature matches its key, and keeps
    /// what signing needs of it: enrollment checks the request before it touches the join
    /// token and signs it after, without parsing and verifying it twice.
    pub fn check_csr(csr_pem: &str) -> Result<CheckedCsr, PkiError> {
        CertificateSigningRequestParams::from_pem(csr_pem)
            .map(CheckedCsr)
            .map_err(csr_error)
    }

    /// [`Ca::sign_client_csr`], with a URI subject alternative name (the host's uid) when given.
    pub fn sign_host_csr(
        &self,
        csr_pem: &str,
        host_id: &str,
        uri: Option<&str>,
        validity_for: Duration,
    ) -> Result<String, PkiError> {
        self.sign_checked_csr(Self::check_csr(csr_pem)?, host_id, uri, validity_for)
    }

    /// [`Ca::sign_host_csr`] of a request [`Ca::check_csr`] checked.
    pub fn sign_checked_csr(
        &self,
        csr: CheckedCsr,
        host_id: &str,
        uri: Option<&str>,
        validity_for: Duration,
    ) -> Result<String, PkiError> {
        check_host_id(host_id)?;
        let request = csr.0;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host_id);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if let Some(uri) = uri {
            let uri = rcgen::string::Ia5String::try_from(uri.to_string()).map_err(|e| {
                PkiError::BadName {
                    name: uri.into(),
                    reason: e.to_string(),
                }
            })?;
            params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        }
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        validity(&mut params, validity_for);
        let signed = CertificateSigningRequestParams {
            params,
            public_key: request.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(signed.pem())
    }
}

/// A certificate signing request whose signature [`Ca::check_csr`] checked.
pub struct CheckedCsr(CertificateSigningRequestParams);

impl std::fmt::Debug for CheckedCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CheckedCsr")
    }
}

/// A host id a certificate may name: 1 to [`MAX_COMMON_NAME`] letters, digits, '-', '_', '.'.
fn check_host_id(host_id: &str) -> Result<(), PkiError> {
    if host_id.is_empty()
        || host_id.len() > MAX_COMMON_NAME
        || !host_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(PkiError::BadName {
            name: host_id.into(),
            reason: format!("a host id is 1 to {MAX_COMMON_NAME} letters, digits, '-', '_' or '.'"),
        });
    }
    Ok(())
}

/// Words for why a CSR was refused.
fn csr_error(e: rcgen::Error) -> PkiError {
    PkiError::BadCsr(match e {
        rcgen::Error::InvalidCertificationRequestSignature => {
            "its signature does not match its public key".to_string()
        }
        rcgen::Error::CouldNotParseCertificationRequest => {
            "it is not a PEM certificate signing request".to_string()
        }
        rcgen::Error::UnsupportedExtension => {
            "it asks for an extension that is not supported".to_string()
        }
        rcgen::Error::UnsupportedSignatureAlgorithm => {
            "its key type is not supported; use ECDSA P-256 or P-384, Ed25519 or RSA".to_string()
        }
        other => other.to_string(),
    })
}

/// Checks that a name can go into a server certificate: an IP address or a DNS name.
pub fn check_server_name(name: &str) -> Result<(), PkiError> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let bad = |reason: &str| {
        Err(PkiError::BadName {
            name: name.into(),
            reason: reason.into(),
        })
    };
    if name.is_empty() || name.len() > 253 {
        return bad("a DNS name is 1 to 253 characters");
    }
    for label in name.trim_end_matches('.').split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return bad(
                "not a DNS name or IP address (DNS labels are letters, digits and '-', 1 to 63 characters)",
            );
        }
    }
    Ok(())
}

/// Writes `contents` beside `path` under its staged name, synced; see [`commit`].
fn stage(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf, PkiError> {
    stage_file(path, contents, mode).map_err(|source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Puts a staged file in place.
fn commit(staged: &Path, path: &Path) -> Result<(), PkiError> {
    commit_file(staged, path).map_err(|source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Stages files, makes the staged names durable, then commits them in the order given. Callers
/// order them so that a crash between two commits leaves a state the next start repairs.
fn write_in_order(dir: &Path, files: &[(&Path, &[u8], u32)]) -> Result<(), PkiError> {
    let mut staged = Vec::with_capacity(files.len());
    for (path, contents, mode) in files {
        staged.push((stage(path, contents, *mode)?, *path));
    }
    sync_dir(dir);
    for (tmp, path) in staged {
        commit(&tmp, path)?;
    }
    sync_dir(dir);
    Ok(())
}

/// Writes the agent-port certificate and its key: the key first, so that a crash in between
/// leaves a new key beside the old certificate, which [`ensure`] sees does not match and
/// replaces at the next start.
fn write_server_cert(files: &PkiFiles, cert: &SignedCert) -> Result<(), PkiError> {
    write_in_order(
        &files.dir,
        &[
            (&files.server_key, cert.key_pem.expose().as_bytes(), 0o600),
            (&files.server_cert, cert.cert_pem.as_bytes(), 0o644),
        ],
    )
}

/// A crash while a CA was written can leave `ca.key` without `ca.crt`, the certificate still
/// under its staged name. Finishes that write, so the server can start; the key and the
/// certificate are checked against each other when the CA is loaded.
fn finish_interrupted_init(files: &PkiFiles) -> Result<(), PkiError> {
    let staged = staged_path(&files.ca_cert);
    if !files.ca_cert.exists() && files.ca_key.exists() && staged.exists() {
        commit(&staged, &files.ca_cert)?;
        sync_parent(&files.ca_cert);
        tracing::info!(dir = %files.dir.display(), "finished writing a CA whose creation was interrupted");
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

/// Creates a new CA and an agent-port server certificate for `server_names` in `dir` (made if
/// missing). Refuses to touch a directory that already holds a CA.
pub fn init_dir(dir: &Path, server_names: &[String]) -> Result<PkiFiles, PkiError> {
    let files = PkiFiles::in_dir(dir);
    if files.ca_cert.exists() || files.ca_key.exists() {
        return Err(PkiError::CaExists(dir.to_path_buf()));
    }
    for n in server_names {
        check_server_name(n)?;
    }
    create_dir(dir)?;
    let ca = Ca::generate()?;
    let server = ca.sign_server(server_names)?;
    // The CA certificate last: until it is in place a start makes a new CA (the server files
    // are useless without it), and once it is, everything else is too.
    write_in_order(
        dir,
        &[
            (&files.server_key, server.key_pem.expose().as_bytes(), 0o600),
            (&files.server_cert, server.cert_pem.as_bytes(), 0o644),
            (&files.ca_key, ca.key_pem.expose().as_bytes(), 0o600),
            (&files.ca_cert, ca.cert_pem.as_bytes(), 0o644),
        ],
    )?;
    Ok(files)
}

/// What [`ensure`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PkiSetup {
    /// A new CA and server certificate were made.
    Created,
    /// The CA was there; the server certificate was missing, lacked a name, was not signed by
    /// the CA or was close to its end, and was issued again.
    ServerCertRenewed,
    /// Everything was in place.
    Loaded,
}

/// Makes sure `dir` holds a CA and a server certificate that covers `server_names` and is
/// valid for a while; creates or renews what is missing.
pub fn ensure(dir: &Path, server_names: &[String]) -> Result<(PkiFiles, PkiSetup), PkiError> {
    let files = PkiFiles::in_dir(dir);
    finish_interrupted_init(&files)?;
    if !files.ca_cert.exists() && !files.ca_key.exists() {
        return init_dir(dir, server_names).map(|f| (f, PkiSetup::Created));
    }
    let ca = Ca::load(dir)?;
    if server_cert_is_current(&ca, &files, server_names) {
        return Ok((files, PkiSetup::Loaded));
    }
    let server = ca.sign_server(server_names)?;
    write_server_cert(&files, &server)?;
    Ok((files, PkiSetup::ServerCertRenewed))
}

/// Whether the server certificate is signed by the CA, belongs to `server.key`, covers every
/// name and is not close to its end.
fn server_cert_is_current(ca: &Ca, files: &PkiFiles, names: &[String]) -> bool {
    let Ok(key_pem) = fs::read_to_string(&files.server_key).map(Secret::new) else {
        return false;
    };
    let Ok(key) = KeyPair::from_pem(key_pem.expose()) else {
        return false;
    };
    let Ok(pem) = fs::read(&files.server_cert) else {
        return false;
    };
    let Ok(der) = CertificateDer::from_pem_slice(&pem) else {
        return false;
    };
    let Ok((_, cert)) = X509Certificate::from_der(&der) else {
        return false;
    };
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return false;
    }
    let Ok(ca_der) = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()) else {
        return false;
    };
    let Ok((_, ca_cert)) = X509Certificate::from_der(&ca_der) else {
        return false;
    };
    if cert.verify_signature(Some(ca_cert.public_key())).is_err() {
        return false;
    }
    let renew_at = SystemTime::now() + SERVER_CERT_RENEW_BEFORE;
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    if SystemTime::UNIX_EPOCH + Duration::from_secs(not_after) < renew_at {
        return false;
    }
    let have = san_names(&cert);
    names
        .iter()
        .all(|n| have.iter().any(|h| h.eq_ignore_ascii_case(n)))
}

/// When the first certificate of a PEM text expires (Unix seconds); `None` when unreadable.
pub fn pem_not_after(pem: &str) -> Option<i64> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// DNS names and IP addresses in a certificate's subject alternative names.
pub fn san_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => out.push((*d).to_string()),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => out.push(
                        IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap_or_default()).to_string(),
                    ),
                    16 => out.push(
                        IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap_or_default()).to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::RootCertStore;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls_pki_types::{ServerName, UnixTime};

    fn names() -> Vec<String> {
        vec![
            "cp.example.com".into(),
            "localhost".into(),
            "127.0.0.1".into(),
        ]
    }

    fn roots(ca: &Ca) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
            .unwrap();
        Arc::new(roots)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn host_csr() -> (String, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["whatever.example".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "i-want-to-be-admin");
        let csr = params.serialize_request(&key).unwrap();
        (csr.pem().unwrap(), key)
    }

    #[test]
    fn init_dir_writes_private_keys_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let files = init_dir(&pki, &names()).unwrap();
        for key in [&files.ca_key, &files.server_key] {
            assert_eq!(
                fs::metadata(key).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                key.display()
            );
        }
        assert_eq!(
            fs::metadata(&pki).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let ca_before = fs::read(&files.ca_cert).unwrap();
        let err = init_dir(&pki, &names()).unwrap_err();
        assert!(matches!(err, PkiError::CaExists(_)), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(
            fs::read(&files.ca_cert).unwrap(),
            ca_before,
            "the CA is untouched"
        );
    }

    #[test]
    fn the_server_cert_has_the_names_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let files = init_dir(dir.path(), &names()).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        let der = CertificateDer::from_pem_slice(&fs::read(&files.server_cert).unwrap()).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(san_names(&cert), names());
        let verifier = WebPkiServerVerifier::builder_with_provider(roots(&ca), provider())
            .build()
            .unwrap();
        for name in ["cp.example.com", "localhost", "127.0.0.1"] {
            let server_name = ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&der, &[], &server_name, &[], UnixTime::now())
                .unwrap();
        }
        let other = ServerName::try_from("evil.example.com").unwrap();
        assert!(
            verifier
                .verify_server_cert(&der, &[], &other, &[], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn a_signed_client_cert_verifies_against_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), &names()).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        let (csr, _key) = host_csr();
        let pem = ca
            .sign_client_csr(&csr, "host-7f3a", Duration::from_secs(86400))
            .unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();

        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca), provider())
            .build()
            .unwrap();
        verifier
            .verify_client_cert(&der, &[], UnixTime::now())
            .unwrap();

        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            cn,
            ["host-7f3a"],
            "the CN is the host id, not what the CSR asked for"
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(
            san_names(&cert).is_empty(),
            "names asked for in the CSR are dropped"
        );

        // A client certificate cannot serve: the server verifier refuses it.
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots(&ca), provider())
            .build()
            .unwrap();
        let sn = ServerName::try_from("whatever.example").unwrap();
        assert!(
            server_verifier
                .verify_server_cert(&der, &[], &sn, &[], UnixTime::now())
                .is_err()
        );

        // Another CA's verifier refuses it.
        let other = Ca::generate().unwrap();
        let other_verifier = WebPkiClientVerifier::builder_with_provider(roots(&other), provider())
            .build()
            .unwrap();
        assert!(
            other_verifier
                .verify_client_cert(&der, &[], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn bad_csrs_and_host_ids_are_refused() {
        let ca = Ca::generate().unwrap();
        let (csr, _) = host_csr();
        // Change one letter of the signed subject: still well-formed, but the signature no
        // longer matches.
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        let at = bytes.windows(5).position(|w| w == b"admin").unwrap();
        bytes[at] = b'A';
        let tampered = pem_encode("CERTIFICATE REQUEST", &bytes);
        let err = ca
            .sign_client_csr(&tampered, "host-1", Duration::from_secs(60))
            .unwrap_err();
        assert!(
            err.to_string().contains("signature does not match"),
            "{err}"
        );
        let untampered = pem_encode("CERTIFICATE REQUEST", der.as_ref());
        assert!(
            ca.sign_client_csr(&untampered, "host-1", Duration::from_secs(60))
                .is_ok()
        );
        let err = ca
            .sign_client_csr("garbage", "host-1", Duration::from_secs(60))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("not a PEM certificate signing request"),
            "{err}"
        );
        for bad in ["", "has space", &"x".repeat(65)] {
            assert!(matches!(
                ca.sign_client_csr(&csr, bad, Duration::from_secs(60)),
                Err(PkiError::BadName { .. })
            ));
        }
    }

    #[test]
    fn ensure_creates_then_loads_then_renews_for_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let (_, what) = ensure(dir.path(), &names()).unwrap();
        assert_eq!(what, PkiSetup::Created);
        let (_, what) = ensure(dir.path(), &names()).unwrap();
        assert_eq!(what, PkiSetup::Loaded);
        let mut more = names();
        more.push("cp2.example.com".into());
        let (files, what) = ensure(dir.path(), &more).unwrap();
        assert_eq!(what, PkiSetup::ServerCertRenewed);
        let der = CertificateDer::from_pem_slice(&fs::read(&files.server_cert).unwrap()).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(san_names(&cert).contains(&"cp2.example.com".to_string()));
        fs::remove_file(&files.server_cert).unwrap();
        assert_eq!(
            ensure(dir.path(), &names()).unwrap().1,
            PkiSetup::ServerCertRenewed
        );
    }

    #[test]
    fn a_server_key_that_does_not_match_its_certificate_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = ensure(dir.path(), &names()).unwrap();
        // As a crash between writing the new key and the new certificate leaves it.
        fs::write(
            &files.server_key,
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        assert_eq!(
            ensure(dir.path(), &names()).unwrap().1,
            PkiSetup::ServerCertRenewed
        );
        let ca = Ca::load(dir.path()).unwrap();
        assert!(server_cert_is_current(&ca, &files, &names()));
        assert_eq!(
            fs::metadata(&files.server_key)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }

    #[test]
    fn an_interrupted_ca_creation_is_finished_at_the_next_start() {
        let made = tempfile::tempdir().unwrap();
        let files = init_dir(made.path(), &names()).unwrap();
        // A crash after ca.key was put in place, before ca.crt was: the certificate is still
        // under its staged name and nothing else is there.
        let dir = tempfile::tempdir().unwrap();
        let crashed = PkiFiles::in_dir(dir.path());
        fs::copy(&files.ca_key, &crashed.ca_key).unwrap();
        fs::copy(&files.ca_cert, staged_path(&crashed.ca_cert)).unwrap();
        let (_, setup) = ensure(dir.path(), &names()).unwrap();
        assert_eq!(setup, PkiSetup::ServerCertRenewed);
        assert_eq!(
            fs::read(&crashed.ca_cert).unwrap(),
            fs::read(&files.ca_cert).unwrap(),
            "the CA written before the crash is kept"
        );
        assert!(!staged_path(&crashed.ca_cert).exists());
        Ca::load(dir.path()).unwrap();
        // Without the staged certificate nothing is guessed.
        let lost = tempfile::tempdir().unwrap();
        fs::copy(&files.ca_key, lost.path().join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            ensure(lost.path(), &names()),
            Err(PkiError::CaMissing { .. })
        ));
    }

    #[test]
    fn nothing_staged_is_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), &names()).unwrap();
        let mut names_in_dir: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names_in_dir.sort();
        assert_eq!(
            names_in_dir,
            [CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE]
        );
    }

    #[test]
    fn load_reports_missing_and_mismatched_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Ca::load(dir.path()),
            Err(PkiError::CaMissing { .. })
        ));
        init_dir(dir.path(), &names()).unwrap();
        let other = tempfile::tempdir().unwrap();
        init_dir(other.path(), &names()).unwrap();
        fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        let err = Ca::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn server_names_are_checked() {
        assert!(check_server_name("cp.example.com").is_ok());
        assert!(check_server_name("::1").is_ok());
        assert!(check_server_name("bad name").is_err());
        assert!(check_server_name("-x.example").is_err());
        assert!(check_server_name("").is_err());
    }

    #[test]
    fn debug_output_hides_keys() {
        let ca = Ca::generate().unwrap();
        let shown = format!("{ca:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        let cert = ca.sign_server(&names()).unwrap();
        assert!(!format!("{cert:?}").contains("PRIVATE KEY"));
    }

    fn pem_encode(label: &str, der: &[u8]) -> String {
        const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in der.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    s.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        let body: Vec<String> = s
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            body.join("\n")
        )
    }
}
