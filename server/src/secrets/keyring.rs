//! `Keyring`: the AES-256-GCM data keys and the fingerprint key, sealing and opening values.

use std::fmt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use super::keyfile::{self, KeyBytes, KeyFile, KeyringError, WriteMode};
use super::value::{SecretValue, wipe_vec};
use crate::util::hex;

/// Prefix of every sealed value: the envelope format, version 1.
pub const SEALED_PREFIX: &str = "ccs1:";
/// Length of the AES-GCM authentication tag.
const TAG_LEN: usize = 16;
/// Number of HMAC bytes shown in a fingerprint (16 hex characters).
const FINGERPRINT_BYTES: usize = 8;
/// What the fingerprint key signs to make a key file's identity ([`Keyring::identity`]).
const IDENTITY_LABEL: &[u8] = b"openclusterclaw key file identity v1";
/// Number of HMAC bytes in a key file's identity (32 hex characters).
const IDENTITY_BYTES: usize = 16;

/// Why a sealed value could not be opened, or a value not sealed. No message carries a
/// plaintext or key material.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("malformed sealed value: {reason}; expected `ccs1:<key id>:<base64>`")]
    Malformed { reason: &'static str },
    #[error(
        "the value was sealed with key {id}, which is not in the secret key file: the key file may be from another installation, or the key was retired before every value was re-sealed"
    )]
    UnknownKey { id: String },
    #[error(
        "authentication failed: the sealed value was altered, or it belongs to another secret or key"
    )]
    Authentication,
    #[error("the opened value is not UTF-8 text")]
    NotUtf8,
    #[error("the value is too long to seal ({len} bytes)")]
    TooLong { len: usize },
    #[error("the system random number generator failed")]
    Random,
}

/// One data key with its id.
#[derive(Clone)]
struct DataKey {
    id: String,
    key: LessSafeKey,
}

/// The keys that seal secret values at rest, loaded from the key file beside the database.
///
/// Data keys are AES-256-GCM keys, each with an 8-hex-character id; the active one seals new
/// values, the others only open older ones until they are re-sealed. The fingerprint key
/// (HMAC-SHA256) never rotates, so fingerprints stay the same across key rotations. `Debug`
/// shows only the key ids.
pub struct Keyring {
    /// What the key file held when this keyring was made: checked and rewritten on rotation.
    file: KeyFile,
    keys: Vec<DataKey>,
    active: DataKey,
    fingerprint: hmac::Key,
    rng: SystemRandom,
}

impl Keyring {
    /// Loads the key file at `path`, or creates it with a new data key and fingerprint key when
    /// there is none. The parent directory must exist. A new file is mode 0600 from its first
    /// byte; an existing file must not be accessible by group or others, and must be owned by
    /// the user the server runs as.
    pub fn load_or_create(path: &Path) -> Result<Keyring, KeyringError> {
        let uid = keyfile::process_uid();
        if let Some(file) = keyfile::read(path, uid)? {
            return Keyring::from_file(path, file);
        }
        let rng = SystemRandom::new();
        let file = KeyFile::generate(&rng)?;
        if keyfile::write(path, &file, WriteMode::CreateNew)? {
            return Keyring::from_file(path, file);
        }
        // Another process created the file first: use its keys.
        match keyfile::read(path, uid)? {
            Some(file) => Keyring::from_file(path, file),
            None => Err(KeyringError::Invalid {
                path: path.to_path_buf(),
                message: "it disappeared while it was being created; start again".into(),
            }),
        }
    }

    /// Loads the key file at `path` if there is one (`None`: there is none), with the checks
    /// of [`Keyring::load_or_create`]; never creates it.
    pub fn load(path: &Path) -> Result<Option<Keyring>, KeyringError> {
        match keyfile::read(path, keyfile::process_uid())? {
            Some(file) => Keyring::from_file(path, file).map(Some),
            None => Ok(None),
        }
    }

    /// What tells this key file from another without revealing a key: `keyring:` and 32 hex
    /// characters of an HMAC under the fingerprint key, which never rotates, so the identity
    /// stays the same across data key rotations. Recorded in the store by the first server
    /// that uses it, so that a server with another key file is refused.
    pub fn identity(&self) -> String {
        let tag = hmac::sign(&self.fingerprint, IDENTITY_LABEL);
        format!("keyring:{}", hex(&tag.as_ref()[..IDENTITY_BYTES]))
    }

    /// First step of a key rotation: adds a new data key to the key file at `path` and makes it
    /// active, keeping every older key, and returns the new keyring. The file is replaced
    /// atomically, so at every moment it opens every value sealed so far.
    ///
    /// Then re-seal every stored value with the returned keyring (one transaction), and call
    /// [`Keyring::retire_inactive`]. If the process stops in between, the file still holds the
    /// old keys: loading it and re-sealing again, then retiring, completes the rotation.
    /// Rotations must not run concurrently (the server runs one at a time).
    pub fn add_key(path: &Path) -> Result<Keyring, KeyringError> {
        let mut file = read_existing(path)?;
        let rng = SystemRandom::new();
        let taken: Vec<&str> = file.keys.iter().map(|(id, _)| id.as_str()).collect();
        let id = keyfile::new_key_id(&rng, &taken)?;
        file.keys.push((id.clone(), KeyBytes::random(&rng)?));
        file.active = id;
        keyfile::write(path, &file, WriteMode::Replace)?;
        Keyring::from_file(path, file)
    }

    /// Second step of a key rotation: rewrites the key file at `path` with only the active key
    /// of `keyring` (and the fingerprint key), once every stored value is sealed with it.
    /// Refuses when the file no longer has the same active key and fingerprint key as
    /// `keyring` (it was changed meanwhile), so no key still in use is dropped.
    pub fn retire_inactive(path: &Path, keyring: &Keyring) -> Result<Keyring, KeyringError> {
        let on_disk = read_existing(path)?;
        let changed = |message: &str| KeyringError::Changed {
            path: path.to_path_buf(),
            message: message.to_string(),
        };
        if on_disk.active != keyring.file.active {
            return Err(changed(&format!(
                "its active key is {}, not {}",
                on_disk.active, keyring.file.active
            )));
        }
        if on_disk.key(&on_disk.active) != keyring.file.key(&keyring.file.active) {
            return Err(changed("the active key's material differs"));
        }
        if on_disk.fingerprint != keyring.file.fingerprint {
            return Err(changed("the fingerprint key differs"));
        }
        if on_disk.keys.len() == 1 {
            return Keyring::from_file(path, on_disk);
        }
        let active = on_disk.active.clone();
        let file = KeyFile {
            fingerprint: on_disk.fingerprint.clone(),
            keys: on_disk
                .keys
                .iter()
                .filter(|(id, _)| *id == active)
                .cloned()
                .collect(),
            active,
        };
        keyfile::write(path, &file, WriteMode::Replace)?;
        Keyring::from_file(path, file)
    }

    /// Seals `plaintext` with the active key: `ccs1:<key id>:<base64(nonce || ciphertext+tag)>`
    /// with a fresh random 96-bit nonce. `aad` binds the result to its place (the caller passes
    /// `tenant/project/secret/key`): it opens only with the same `aad`.
    pub fn seal(&self, aad: &str, plaintext: &SecretValue) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let plain = plaintext.expose().as_bytes();
        // Sized once, so no reallocation leaves a copy of the plaintext behind.
        let mut buf = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        buf.extend_from_slice(&nonce);
        buf.extend_from_slice(plain);
        let (_, in_out) = buf.split_at_mut(NONCE_LEN);
        let tag = match self.active.key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_bytes()),
            in_out,
        ) {
            Ok(tag) => tag,
            Err(_) => {
                wipe_vec(buf);
                return Err(SealError::TooLong { len: plain.len() });
            }
        };
        buf.extend_from_slice(tag.as_ref());
        Ok(format!(
            "{SEALED_PREFIX}{}:{}",
            self.active.id,
            STANDARD.encode(&buf)
        ))
    }

    /// Opens a value made by [`Keyring::seal`] with the same `aad`, with whichever key of the
    /// keyring sealed it.
    pub fn open(&self, aad: &str, sealed: &str) -> Result<SecretValue, SealError> {
        let malformed = |reason| SealError::Malformed { reason };
        let rest = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or(malformed("it does not start with `ccs1:`"))?;
        let (id, payload) = rest
            .split_once(':')
            .ok_or(malformed("there is no `:` after the key id"))?;
        if !keyfile::is_key_id(id) {
            return Err(malformed("the key id is not 8 lowercase hex characters"));
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| SealError::UnknownKey { id: id.to_string() })?;
        let mut nonce_bytes = STANDARD
            .decode(payload)
            .map_err(|_| malformed("the payload is not base64"))?;
        if nonce_bytes.len() < NONCE_LEN + TAG_LEN {
            return Err(malformed("the payload is too short"));
        }
        let mut body = nonce_bytes.split_off(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce_bytes
            .as_slice()
            .try_into()
            .map_err(|_| malformed("the payload is too short"))?;
        let opened = key
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut body,
            )
            .map(|plain| plain.len());
        let Ok(len) = opened else {
            wipe_vec(body);
            return Err(SealError::Authentication);
        };
        body.truncate(len);
        String::from_utf8(body).map(SecretValue::new).map_err(|e| {
            wipe_vec(e.into_bytes());
            SealError::NotUtf8
        })
    }

    /// `hmac-sha256:` and the first 16 hex characters of the HMAC of `value` under the
    /// fingerprint key: equal values have equal fingerprints, and the fingerprint reveals
    /// nothing else. It does not change when data keys rotate.
    pub fn fingerprint(&self, value: &SecretValue) -> String {
        let tag = hmac::sign(&self.fingerprint, value.expose().as_bytes());
        let head: Vec<u8> = tag
            .as_ref()
            .iter()
            .take(FINGERPRINT_BYTES)
            .copied()
            .collect();
        format!("hmac-sha256:{}", hex(&head))
    }

    /// Id of the key that seals new values.
    pub fn active_id(&self) -> &str {
        &self.active.id
    }

    /// Ids of every data key, in key file order.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// The key id of a sealed value, if it has the envelope's form (without opening it); a
    /// value whose id is not [`Keyring::active_id`] is due to be re-sealed.
    pub fn sealed_key_id(sealed: &str) -> Option<&str> {
        let (id, _) = sealed.strip_prefix(SEALED_PREFIX)?.split_once(':')?;
        keyfile::is_key_id(id).then_some(id)
    }

    /// Builds the ring keys of a parsed key file.
    fn from_file(path: &Path, file: KeyFile) -> Result<Keyring, KeyringError> {
        let invalid = || KeyringError::Invalid {
            path: path.to_path_buf(),
            message: "a key could not be used as an AES-256-GCM key".into(),
        };
        let mut keys = Vec::with_capacity(file.keys.len());
        for (id, bytes) in &file.keys {
            let unbound = UnboundKey::new(&AES_256_GCM, &bytes.0).map_err(|_| invalid())?;
            keys.push(DataKey {
                id: id.clone(),
                key: LessSafeKey::new(unbound),
            });
        }
        let active = keys
            .iter()
            .find(|k| k.id == file.active)
            .cloned()
            .ok_or_else(invalid)?;
        let fingerprint = hmac::Key::new(hmac::HMAC_SHA256, &file.fingerprint.0);
        Ok(Keyring {
            file,
            keys,
            active,
            fingerprint,
            rng: SystemRandom::new(),
        })
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("active", &self.active.id)
            .field("keys", &self.key_ids())
            .finish_non_exhaustive()
    }
}

/// Reads a key file that must exist (rotation never creates one).
fn read_existing(path: &Path) -> Result<KeyFile, KeyringError> {
    keyfile::read(path, keyfile::process_uid())?.ok_or_else(|| KeyringError::Io {
        path: path.to_path_buf(),
        action: "read",
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "it does not exist; a key rotation needs the file the server loaded at start",
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use super::*;

    const AAD: &str = "enterprise-a/helpdesk/provider-keys/ANTHROPIC_API_KEY";

    fn v(s: &str) -> SecretValue {
        SecretValue::new(s.to_string())
    }

    fn fresh() -> (tempfile::TempDir, PathBuf, Keyring) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret.keys");
        let ring = Keyring::load_or_create(&path).expect("create keyring");
        (dir, path, ring)
    }

    /// The base64 key material written in the key file.
    fn key_material(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .expect("read key file")
            .lines()
            .filter(|l| l.starts_with("key ") || l.starts_with("fingerprint "))
            .filter_map(|l| l.split_whitespace().last().map(str::to_string))
            .collect()
    }

    /// `sealed` with one byte of its decoded payload flipped.
    fn flip(sealed: &str, index: usize) -> String {
        let (head, payload) = sealed.rsplit_once(':').expect("envelope");
        let mut bytes = STANDARD.decode(payload).expect("base64");
        bytes[index] ^= 0x01;
        format!("{head}:{}", STANDARD.encode(bytes))
    }

    #[test]
    fn round_trip() {
        let (_dir, _path, ring) = fresh();
        for plain in ["sk-ant-api03-xyz", "", "päss wörd ✓ with spaces\nand lines"] {
            let sealed = ring.seal(AAD, &v(plain)).expect("seal");
            assert!(
                sealed.starts_with(&format!("ccs1:{}:", ring.active_id())),
                "{sealed}"
            );
            assert_eq!(Keyring::sealed_key_id(&sealed), Some(ring.active_id()));
            if !plain.is_empty() {
                assert!(!sealed.contains(plain));
            }
            let opened = ring.open(AAD, &sealed).expect("open");
            assert_eq!(opened.expose(), plain);
        }
        // A fresh nonce every time: sealing the same value twice gives different results.
        let a = ring.seal(AAD, &v("same")).expect("seal");
        let b = ring.seal(AAD, &v("same")).expect("seal");
        assert_ne!(a, b);
    }

    #[test]
    fn wrong_aad_fails_authentication() {
        let (_dir, _path, ring) = fresh();
        let sealed = ring.seal(AAD, &v("token-1")).expect("seal");
        for other in [
            "enterprise-a/helpdesk/provider-keys/OPENAI_API_KEY",
            "enterprise-b/helpdesk/provider-keys/ANTHROPIC_API_KEY",
            "",
        ] {
            let e = ring.open(other, &sealed).unwrap_err();
            assert!(matches!(e, SealError::Authentication), "{e}");
            assert!(e.to_string().contains("authentication failed"), "{e}");
            assert!(!e.to_string().contains("token-1"));
        }
    }

    #[test]
    fn any_tampered_byte_fails_authentication() {
        let (_dir, _path, ring) = fresh();
        let sealed = ring.seal(AAD, &v("abc")).expect("seal");
        let len = STANDARD
            .decode(sealed.rsplit_once(':').expect("envelope").1)
            .expect("base64")
            .len();
        assert_eq!(len, NONCE_LEN + 3 + TAG_LEN);
        // Every byte: nonce, ciphertext and tag.
        for i in 0..len {
            let e = ring.open(AAD, &flip(&sealed, i)).unwrap_err();
            assert!(matches!(e, SealError::Authentication), "byte {i}: {e}");
        }
        // A truncated tag.
        let (head, payload) = sealed.rsplit_once(':').expect("envelope");
        let mut bytes = STANDARD.decode(payload).expect("base64");
        bytes.pop();
        let e = ring
            .open(AAD, &format!("{head}:{}", STANDARD.encode(bytes)))
            .unwrap_err();
        assert!(matches!(e, SealError::Authentication), "{e}");
    }

    #[test]
    fn unknown_key_id_is_named() {
        let (_dir, _path, ring) = fresh();
        let (_dir2, _path2, other) = fresh();
        let sealed = other.seal(AAD, &v("from elsewhere")).expect("seal");
        let e = ring.open(AAD, &sealed).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, SealError::UnknownKey { .. }), "{msg}");
        assert!(msg.contains(other.active_id()), "{msg}");
        assert!(msg.contains("another installation"), "{msg}");
        assert!(!msg.contains("from elsewhere"), "{msg}");
    }

    #[test]
    fn malformed_envelopes() {
        let (_dir, _path, ring) = fresh();
        let id = ring.active_id().to_string();
        let short = STANDARD.encode([0u8; NONCE_LEN + TAG_LEN - 1]);
        let cases = [
            ("plain text".to_string(), "does not start"),
            ("ccs2:0a1b2c3d:AAAA".to_string(), "does not start"),
            (format!("ccs1:{id}"), "no `:` after the key id"),
            ("ccs1:XYZ:AAAA".to_string(), "8 lowercase hex"),
            (format!("ccs1:{id}:not base64!"), "not base64"),
            (format!("ccs1:{id}:{short}"), "too short"),
            (format!("ccs1:{id}:"), "too short"),
        ];
        for (sealed, want) in cases {
            let e = ring.open(AAD, &sealed).unwrap_err();
            assert!(matches!(e, SealError::Malformed { .. }), "{sealed}: {e}");
            assert!(e.to_string().contains(want), "{sealed}: {e}");
        }
        assert_eq!(Keyring::sealed_key_id("ccs1:XYZ:AAAA"), None);
        assert_eq!(Keyring::sealed_key_id("nope"), None);
        assert_eq!(Keyring::sealed_key_id("ccs1:0a1b2c3d:x"), Some("0a1b2c3d"));
    }

    #[test]
    fn created_file_is_private_and_reloads() {
        let (_dir, path, ring) = fresh();
        let meta = fs::metadata(&path).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("# "), "{text}");
        assert_eq!(key_material(&path).len(), 2);

        let sealed = ring.seal(AAD, &v("kept")).expect("seal");
        let again = Keyring::load_or_create(&path).expect("reload");
        assert_eq!(again.active_id(), ring.active_id());
        assert_eq!(again.open(AAD, &sealed).expect("open").expose(), "kept");
        assert_eq!(again.fingerprint(&v("x")), ring.fingerprint(&v("x")));
    }

    #[test]
    fn concurrent_creation_yields_one_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret.keys");
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| Keyring::load_or_create(&path).map(|k| k.active_id().to_string()))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread").expect("load"))
                .collect()
        });
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    }

    #[test]
    fn group_readable_file_is_refused() {
        let (_dir, path, _ring) = fresh();
        for mode in [0o640, 0o604, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
            let e = Keyring::load_or_create(&path).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, KeyringError::Permissions { .. }), "{msg}");
            assert!(
                msg.contains(&format!("chmod 600 {}", path.display())),
                "{msg}"
            );
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            // Rotation refuses it too.
            assert!(matches!(
                Keyring::add_key(&path),
                Err(KeyringError::Permissions { .. })
            ));
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(Keyring::load_or_create(&path).is_ok());
    }

    #[test]
    fn malformed_file_error_has_line_and_no_key_material() {
        let (_dir, path, _ring) = fresh();
        let material = key_material(&path);
        let text = fs::read_to_string(&path).expect("read");
        // Break the `key` line: drop its id, so the key stands where the id should be.
        let broken: String = text
            .lines()
            .map(|l| match l.strip_prefix("key ") {
                Some(rest) => format!("key {}\n", rest.split_whitespace().last().unwrap_or("")),
                None => format!("{l}\n"),
            })
            .collect();
        let key_line = broken
            .lines()
            .position(|l| l.starts_with("key "))
            .expect("key line")
            + 1;
        fs::write(&path, &broken).expect("write");
        let e = Keyring::load_or_create(&path).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, KeyringError::Parse { line, .. } if line == key_line),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("{}, line {key_line}", path.display())),
            "{msg}"
        );
        for m in &material {
            assert!(!msg.contains(m.as_str()), "{msg}");
            assert!(!format!("{e:?}").contains(m.as_str()));
        }
    }

    #[test]
    fn debug_prints_no_secret() {
        let (_dir, path, ring) = fresh();
        let dbg = format!("{ring:?}");
        assert!(dbg.contains(ring.active_id()), "{dbg}");
        for m in key_material(&path) {
            assert!(!dbg.contains(&m), "{dbg}");
        }
        let value = v("sk-live-123456");
        assert!(!format!("{value:?} {value}").contains("sk-live"));
        let e = ring.open(AAD, "ccs1:0a1b2c3d:AAAA").unwrap_err();
        assert!(!format!("{e:?}").contains("AAAA"));
    }

    #[test]
    fn a_key_file_has_one_identity_across_rotations_and_loading_never_creates_one() {
        let (dir, path, ring) = fresh();
        let id = ring.identity();
        assert!(id.starts_with("keyring:"), "{id}");
        assert_eq!(id.len(), "keyring:".len() + 32);
        let rotated = Keyring::add_key(&path).expect("add key");
        assert_eq!(rotated.identity(), id);
        let retired = Keyring::retire_inactive(&path, &rotated).expect("retire");
        assert_eq!(retired.identity(), id);
        assert_eq!(Keyring::load(&path).unwrap().unwrap().identity(), id);
        let (_dir2, _path2, other) = fresh();
        assert_ne!(other.identity(), id);
        let missing = dir.path().join("none.key");
        assert!(Keyring::load(&missing).unwrap().is_none());
        assert!(!missing.exists());
    }

    #[test]
    fn fingerprints() {
        let (_dir, path, ring) = fresh();
        let a = ring.fingerprint(&v("value-a"));
        assert!(a.starts_with("hmac-sha256:"), "{a}");
        assert_eq!(a.len(), "hmac-sha256:".len() + 16);
        assert!(!a.contains("value-a"));
        assert_eq!(a, ring.fingerprint(&v("value-a")));
        assert_ne!(a, ring.fingerprint(&v("value-b")));
        assert_ne!(a, ring.fingerprint(&v("")));

        // Stable across a rotation of the data keys.
        let rotated = Keyring::add_key(&path).expect("add key");
        assert_ne!(rotated.active_id(), ring.active_id());
        assert_eq!(rotated.fingerprint(&v("value-a")), a);
        let retired = Keyring::retire_inactive(&path, &rotated).expect("retire");
        assert_eq!(retired.fingerprint(&v("value-a")), a);

        // Another installation (another fingerprint key) gives another fingerprint.
        let (_dir2, _path2, other) = fresh();
        assert_ne!(other.fingerprint(&v("value-a")), a);
    }

    #[test]
    fn rotation_survives_a_crash_between_the_steps() {
        let (_dir, path, old) = fresh();
        let old_id = old.active_id().to_string();
        let sealed_old = old.seal(AAD, &v("old value")).expect("seal");

        // Step 1, then the process stops before re-sealing: only the file remains.
        let added = Keyring::add_key(&path).expect("add key");
        let new_id = added.active_id().to_string();
        drop(added);
        assert_eq!(
            fs::metadata(&path).expect("stat").permissions().mode() & 0o777,
            0o600
        );

        let restarted = Keyring::load_or_create(&path).expect("reload after crash");
        assert_eq!(restarted.active_id(), new_id);
        assert_eq!(restarted.key_ids(), [old_id.as_str(), new_id.as_str()]);
        // Old ciphertexts still open; new seals use the new key.
        assert_eq!(
            restarted.open(AAD, &sealed_old).expect("open old").expose(),
            "old value"
        );
        let sealed_new = restarted.seal(AAD, &v("new value")).expect("seal");
        assert_eq!(Keyring::sealed_key_id(&sealed_new), Some(new_id.as_str()));

        // Retiring with a keyring from before the rotation is refused: the file changed.
        let e = Keyring::retire_inactive(&path, &old).unwrap_err();
        assert!(matches!(e, KeyringError::Changed { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("its active key is {new_id}, not {old_id}")),
            "{e}"
        );
        assert_eq!(
            Keyring::load_or_create(&path)
                .expect("load")
                .key_ids()
                .len(),
            2
        );

        // Re-seal (here: the one old value), then step 2.
        let opened = restarted.open(AAD, &sealed_old).expect("open");
        let resealed = restarted.seal(AAD, &opened).expect("reseal");
        let retired = Keyring::retire_inactive(&path, &restarted).expect("retire");
        assert_eq!(retired.key_ids(), [new_id.as_str()]);
        assert_eq!(
            fs::metadata(&path).expect("stat").permissions().mode() & 0o777,
            0o600
        );

        let reloaded = Keyring::load_or_create(&path).expect("reload");
        assert_eq!(reloaded.key_ids(), [new_id.as_str()]);
        assert_eq!(key_material(&path).len(), 2);
        assert_eq!(
            reloaded.open(AAD, &resealed).expect("open").expose(),
            "old value"
        );
        assert_eq!(
            reloaded.open(AAD, &sealed_new).expect("open").expose(),
            "new value"
        );
        let e = reloaded.open(AAD, &sealed_old).unwrap_err();
        assert!(
            matches!(&e, SealError::UnknownKey { id } if *id == old_id),
            "{e}"
        );

        // Retiring again is a no-op.
        let again = Keyring::retire_inactive(&path, &reloaded).expect("retire again");
        assert_eq!(again.key_ids(), [new_id.as_str()]);
    }

    #[test]
    fn rotation_needs_an_existing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing.keys");
        let e = Keyring::add_key(&path).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(!path.exists());
    }

    #[test]
    fn keyring_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Keyring>();
        check::<SecretValue>();
        check::<SealError>();
        check::<KeyringError>();
    }

    #[test]
    fn sealing_is_fast() {
        let (_dir, _path, ring) = fresh();
        let value = v("sk-ant-api03-0123456789abcdefghijklmnopqrstuvwxyz0123456789");
        let start = Instant::now();
        let sealed: Vec<String> = (0..1000)
            .map(|i| ring.seal(&format!("t/p/s/K{i}"), &value).expect("seal"))
            .collect();
        let elapsed = start.elapsed();
        assert_eq!(sealed.len(), 1000);
        // Well under this in release; the bound leaves room for an unoptimised build on a busy
        // machine while still catching an accidental per-call key setup or file read.
        assert!(
            elapsed < Duration::from_secs(2),
            "1000 seals took {elapsed:?}"
        );
    }
}
