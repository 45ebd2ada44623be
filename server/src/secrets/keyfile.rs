//! The secret key file on disk: parsing, rendering, permission checks and atomic writes.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::{SecureRandom, SystemRandom};

use super::value::{wipe_array, wipe_vec};
use crate::util::hex;

/// Length of every key in the file (AES-256 and the HMAC-SHA256 fingerprint key).
pub(super) const KEY_LEN: usize = 32;
/// Length of a key id in hex characters.
const KEY_ID_LEN: usize = 8;
/// A key file larger than this is not one (a key entry is under 100 bytes).
const MAX_FILE_LEN: u64 = 1024 * 1024;
/// What the entries of the file look like, for error messages.
const ENTRY_FORMS: &str = "`active <id>`, `key <id> <base64 of 32 bytes>`, `fingerprint <base64 of 32 bytes>`, or a `# comment`";

/// Why the secret key file could not be loaded or written. No message carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("cannot {action} the secret key file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error(
        "directory {} for the secret key file {} does not exist; create it first (owned by the server's user, mode 0700)",
        dir.display(),
        path.display()
    )]
    NoDirectory { dir: PathBuf, path: PathBuf },
    #[error("the secret key file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "the secret key file {} has mode {mode:04o}: group and others must have no access to it; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "the secret key file {} is owned by uid {owner}, but the server runs as uid {uid}; run `chown {uid} {}` and `chmod 600 {}`",
        path.display(),
        path.display(),
        path.display()
    )]
    Owner { path: PathBuf, owner: u32, uid: u32 },
    #[error("the secret key file {}, line {line}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("the secret key file {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error(
        "the secret key file {} changed since it was loaded ({message}); load it again and repeat the key rotation",
        path.display()
    )]
    Changed { path: PathBuf, message: String },
    #[error("the system random number generator failed")]
    Random,
}

/// 32 bytes of key material: `Debug` prints `***`, dropped bytes are overwritten with zeros.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct KeyBytes(pub(super) [u8; KEY_LEN]);

impl KeyBytes {
    /// Fresh random key material.
    pub(super) fn random(rng: &SystemRandom) -> Result<KeyBytes, KeyringError> {
        let mut key = KeyBytes([0; KEY_LEN]);
        rng.fill(&mut key.0).map_err(|_| KeyringError::Random)?;
        Ok(key)
    }
}

impl Drop for KeyBytes {
    fn drop(&mut self) {
        wipe_array(&mut self.0);
    }
}

impl fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The parsed content of a key file: every data key in file order, the active one's id, and
/// the fingerprint key.
#[derive(Clone, Debug)]
pub(super) struct KeyFile {
    pub(super) fingerprint: KeyBytes,
    pub(super) keys: Vec<(String, KeyBytes)>,
    pub(super) active: String,
}

impl KeyFile {
    /// A new file's content: one data key, active, and a fingerprint key.
    pub(super) fn generate(rng: &SystemRandom) -> Result<KeyFile, KeyringError> {
        let id = new_key_id(rng, &[])?;
        Ok(KeyFile {
            fingerprint: KeyBytes::random(rng)?,
            keys: vec![(id.clone(), KeyBytes::random(rng)?)],
            active: id,
        })
    }

    /// The key material of the data key `id`.
    pub(super) fn key(&self, id: &str) -> Option<&KeyBytes> {
        self.keys.iter().find(|(k, _)| k == id).map(|(_, key)| key)
    }

    /// The text of the file. The caller wipes it after use.
    fn render(&self) -> String {
        let mut out = String::from(
            "# openClusterClaw secret encryption keys. Keep this file private (mode 0600) and back it\n\
             # up together with the database: without it the stored secret values cannot be read.\n\
             # Entries: `fingerprint <base64>`, `key <id> <base64>`, `active <id>`.\n",
        );
        let fingerprint = STANDARD.encode(self.fingerprint.0);
        out.push_str("fingerprint ");
        out.push_str(&fingerprint);
        out.push('\n');
        wipe_vec(fingerprint.into_bytes());
        for (id, key) in &self.keys {
            let encoded = STANDARD.encode(key.0);
            out.push_str("key ");
            out.push_str(id);
            out.push(' ');
            out.push_str(&encoded);
            out.push('\n');
            wipe_vec(encoded.into_bytes());
        }
        out.push_str("active ");
        out.push_str(&self.active);
        out.push('\n');
        out
    }
}

/// Whether `id` has the form of a key id: 8 lowercase hex characters.
pub(super) fn is_key_id(id: &str) -> bool {
    id.len() == KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A random key id that is not among `taken`.
pub(super) fn new_key_id(rng: &SystemRandom, taken: &[&str]) -> Result<String, KeyringError> {
    loop {
        let mut raw = [0u8; KEY_ID_LEN / 2];
        rng.fill(&mut raw).map_err(|_| KeyringError::Random)?;
        let id = hex(&raw);
        if !taken.contains(&id.as_str()) {
            return Ok(id);
        }
    }
}

/// Parses the text of a key file. Errors name `path` and the line, never key material.
pub(super) fn parse(path: &Path, text: &str) -> Result<KeyFile, KeyringError> {
    let err = |line: usize, message: String| KeyringError::Parse {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut fingerprint: Option<(usize, KeyBytes)> = None;
    let mut active: Option<(usize, String)> = None;
    let mut keys: Vec<(usize, String, KeyBytes)> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = trimmed.split_whitespace().collect();
        match fields.as_slice() {
            ["active", id] => {
                let id = parse_id(id).map_err(|m| err(line, m))?;
                if let Some((first, _)) = &active {
                    return Err(err(
                        line,
                        format!("a second `active` entry (the first is on line {first}); keep one"),
                    ));
                }
                active = Some((line, id));
            }
            ["active", ..] => {
                return Err(err(line, "`active` takes one key id: `active <id>`".into()));
            }
            ["key", id, key] => {
                let id = parse_id(id).map_err(|m| err(line, m))?;
                if let Some((first, _, _)) = keys.iter().find(|(_, k, _)| *k == id) {
                    return Err(err(
                        line,
                        format!(
                            "key id {id} is already defined on line {first}; key ids must be unique"
                        ),
                    ));
                }
                let key = parse_key(key).map_err(|m| err(line, m))?;
                keys.push((line, id, key));
            }
            ["key", ..] => {
                return Err(err(
                    line,
                    "`key` takes a key id and a key: `key <id> <base64 of 32 bytes>`".into(),
                ));
            }
            ["fingerprint", key] => {
                if let Some((first, _)) = &fingerprint {
                    return Err(err(
                        line,
                        format!(
                            "a second `fingerprint` entry (the first is on line {first}); keep one"
                        ),
                    ));
                }
                let key = parse_key(key).map_err(|m| err(line, m))?;
                fingerprint = Some((line, key));
            }
            ["fingerprint", ..] => {
                return Err(err(
                    line,
                    "`fingerprint` takes one key: `fingerprint <base64 of 32 bytes>`".into(),
                ));
            }
            // The unknown word is not echoed: a damaged file can put key material first.
            _ => {
                return Err(err(line, format!("unknown entry; expected {ENTRY_FORMS}")));
            }
        }
    }
    let invalid = |message: String| KeyringError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let Some((_, fingerprint)) = fingerprint else {
        return Err(invalid(
            "no `fingerprint <base64 of 32 bytes>` entry; restore the file from a backup (a new fingerprint key would change every secret fingerprint)".into(),
        ));
    };
    let Some((active_line, active)) = active else {
        return Err(invalid(
            "no `active <id>` entry; add one naming the key that seals new values".into(),
        ));
    };
    if !keys.iter().any(|(_, id, _)| *id == active) {
        return Err(err(
            active_line,
            format!("the active key {active} has no `key {active} <base64>` entry"),
        ));
    }
    Ok(KeyFile {
        fingerprint,
        keys: keys.into_iter().map(|(_, id, key)| (id, key)).collect(),
        active,
    })
}

/// A key id field; the message does not echo a field that is not an id (it may be a key).
fn parse_id(field: &str) -> Result<String, String> {
    if is_key_id(field) {
        Ok(field.to_string())
    } else {
        Err(format!(
            "a key id must be {KEY_ID_LEN} lowercase hex characters (e.g. `0a1b2c3d`)"
        ))
    }
}

/// A base64 key field of exactly 32 bytes; messages never echo the field.
fn parse_key(field: &str) -> Result<KeyBytes, String> {
    let decoded = STANDARD
        .decode(field)
        .map_err(|_| "the key is not valid base64 (standard alphabet, with padding)".to_string())?;
    let len = decoded.len();
    let mut key = KeyBytes([0; KEY_LEN]);
    if len == KEY_LEN {
        key.0.copy_from_slice(&decoded);
    }
    wipe_vec(decoded);
    if len == KEY_LEN {
        Ok(key)
    } else {
        Err(format!(
            "the key decodes to {len} bytes; it must be {KEY_LEN} bytes"
        ))
    }
}

/// The uid this process runs as, from the owner of `/proc/self` (Linux); `None` where that
/// cannot be read, and then the owner check is skipped.
pub(super) fn process_uid() -> Option<u32> {
    fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Reads and parses the key file; `Ok(None)` when it does not exist. The file must be a regular
/// file with no access for group or others and, when `uid` is known, owned by `uid`. The checks
/// are made on the opened file, so a file swapped in between is not read.
pub(super) fn read(path: &Path, uid: Option<u32>) -> Result<Option<KeyFile>, KeyringError> {
    let io_err = |action: &'static str| {
        move |source: io::Error| KeyringError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open")(e)),
    };
    let meta = file.metadata().map_err(io_err("inspect"))?;
    check_metadata(path, meta.is_file(), meta.mode(), meta.uid(), uid)?;
    let mut bytes = Vec::new();
    let read = file
        .take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read"));
    let parsed = match read {
        Err(e) => Err(e),
        Ok(_) if bytes.len() as u64 > MAX_FILE_LEN => Err(KeyringError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "it is larger than {MAX_FILE_LEN} bytes, which no key file is; check the configured path"
            ),
        }),
        Ok(_) => match std::str::from_utf8(&bytes) {
            Ok(text) => parse(path, text),
            Err(e) => {
                let line = bytes
                    .get(..e.valid_up_to())
                    .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
                    + 1;
                Err(KeyringError::Parse {
                    path: path.to_path_buf(),
                    line,
                    message: "the line is not UTF-8 text".into(),
                })
            }
        },
    };
    wipe_vec(bytes);
    parsed.map(Some)
}

/// The file checks of [`read`], apart from the I/O.
fn check_metadata(
    path: &Path,
    is_file: bool,
    mode: u32,
    owner: u32,
    uid: Option<u32>,
) -> Result<(), KeyringError> {
    if !is_file {
        return Err(KeyringError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    if mode & 0o077 != 0 {
        return Err(KeyringError::Permissions {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    if let Some(uid) = uid
        && owner != uid
    {
        return Err(KeyringError::Owner {
            path: path.to_path_buf(),
            owner,
            uid,
        });
    }
    Ok(())
}

/// How [`write`] puts the new file in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WriteMode {
    /// Only if no file exists at the path yet (a hard link, which fails when the name is
    /// taken); returns `false` when another process created it first.
    CreateNew,
    /// Replaces the existing file (a rename).
    Replace,
}

/// Writes `content` to `path` atomically with mode 0600 from the first byte: a temporary file
/// beside it (created with `create_new` and mode 0600, written and synced), then linked or
/// renamed into place and the directory synced. Returns whether the file at `path` is now ours.
pub(super) fn write(path: &Path, content: &KeyFile, how: WriteMode) -> Result<bool, KeyringError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(KeyringError::NoDirectory {
            dir,
            path: path.to_path_buf(),
        });
    }
    let io_err = |action: &'static str| {
        move |source: io::Error| KeyringError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let rng = SystemRandom::new();
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut suffix = [0u8; 6];
    rng.fill(&mut suffix).map_err(|_| KeyringError::Random)?;
    let tmp = dir.join(format!(".{file_name}.{}.tmp", hex(&suffix)));

    let text = content.render().into_bytes();
    let staged = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            let written = f.write_all(&text).and_then(|()| f.sync_all());
            if written.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            written
        });
    wipe_vec(text);
    staged.map_err(io_err("write a temporary file for"))?;

    let placed = match how {
        WriteMode::Replace => fs::rename(&tmp, path).map(|()| true),
        WriteMode::CreateNew => match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            // A file system without hard links: rename, unless the file appeared meanwhile.
            Err(_) if path.exists() => Ok(false),
            Err(_) => fs::rename(&tmp, path).map(|()| true),
        },
    };
    // After a rename the temporary name is gone already; after a link it is removed here.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(_) if placed.is_err() => {}
        Err(e) => return Err(io_err("remove the temporary file of")(e)),
    }
    let placed = placed.map_err(io_err("put in place"))?;
    fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync the directory of"))?;
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    fn p() -> &'static Path {
        Path::new("/var/lib/clusterclaw/secret.keys")
    }

    fn parse_err(text: &str) -> (usize, String) {
        match parse(p(), text) {
            Err(e @ KeyringError::Parse { line, .. }) => (line, e.to_string()),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_valid_file() {
        let text = format!(
            "# comment\n\n  fingerprint {K1}\nkey 0a1b2c3d {K2}\nkey 00000001 {K1}\nactive 00000001\n"
        );
        let f = parse(p(), &text).expect("valid");
        assert_eq!(f.active, "00000001");
        let ids: Vec<&str> = f.keys.iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(ids, ["0a1b2c3d", "00000001"]);
        assert_eq!(f.fingerprint.0[1], 1);
        assert_eq!(f.key("0a1b2c3d").map(|k| k.0[0]), Some(0x20));
        // Rendering and parsing again gives the same content.
        let again = parse(p(), &f.render()).expect("rendered file parses");
        assert_eq!(again.active, f.active);
        assert_eq!(again.keys.len(), 2);
        assert!(again.fingerprint == f.fingerprint);
        assert!(again.key("00000001") == f.key("00000001"));
    }

    #[test]
    fn malformed_lines_name_the_line_and_hide_key_material() {
        let head = format!("fingerprint {K1}\n");
        let cases = [
            // A key with a bad id, whose key material is in the id's place.
            (
                format!("{head}key {K2}\nactive 0a1b2c3d\n"),
                2,
                "`key` takes",
            ),
            (format!("{head}key {K2} {K2}\n"), 2, "lowercase hex"),
            (
                format!("{head}# c\nkey 0A1B2C3D {K2}\n"),
                3,
                "lowercase hex",
            ),
            (format!("{head}key 0a1b2c3d {K2}x\n"), 2, "not valid base64"),
            (
                format!("{head}key 0a1b2c3d AAAA\n"),
                2,
                "decodes to 3 bytes",
            ),
            (format!("{head}{K2}\n"), 2, "unknown entry"),
            (format!("{head}sekrit {K2}\n"), 2, "unknown entry"),
            (
                format!("{head}fingerprint {K2}\n"),
                2,
                "a second `fingerprint`",
            ),
            (
                format!("{head}key 0a1b2c3d {K2}\nkey 0a1b2c3d {K2}\n"),
                3,
                "already defined on line 2",
            ),
            (
                format!("{head}key 0a1b2c3d {K2}\nactive 0a1b2c3d\nactive 0a1b2c3d\n"),
                4,
                "the first is on line 3",
            ),
            (
                format!("{head}key 0a1b2c3d {K2}\nactive 11111111\n"),
                3,
                "has no `key 11111111",
            ),
            (format!("{head}active\n"), 2, "`active` takes one key id"),
        ];
        for (text, want_line, want) in cases {
            let (line, msg) = parse_err(&text);
            assert_eq!(line, want_line, "{msg}");
            assert!(msg.contains(want), "{msg}");
            assert!(
                msg.contains("/var/lib/clusterclaw/secret.keys, line"),
                "{msg}"
            );
            for key in [K1, K2, &K2[..20], &K1[..20]] {
                assert!(!msg.contains(key), "key material in: {msg}");
            }
        }
    }

    #[test]
    fn missing_entries_are_reported() {
        let e = parse(p(), &format!("key 0a1b2c3d {K2}\nactive 0a1b2c3d\n")).unwrap_err();
        assert!(e.to_string().contains("no `fingerprint"), "{e}");
        let e = parse(p(), &format!("fingerprint {K1}\nkey 0a1b2c3d {K2}\n")).unwrap_err();
        assert!(e.to_string().contains("no `active <id>`"), "{e}");
        let e = parse(p(), "").unwrap_err();
        assert!(matches!(e, KeyringError::Invalid { .. }), "{e}");
    }

    #[test]
    fn metadata_checks() {
        assert!(check_metadata(p(), true, 0o100600, 5, Some(5)).is_ok());
        assert!(check_metadata(p(), true, 0o100400, 5, None).is_ok());
        for mode in [0o100640, 0o100604, 0o100620, 0o100602, 0o100610] {
            let e = check_metadata(p(), true, mode, 5, Some(5)).unwrap_err();
            assert!(matches!(e, KeyringError::Permissions { .. }), "{e}");
            assert!(
                e.to_string()
                    .contains("run `chmod 600 /var/lib/clusterclaw/secret.keys`"),
                "{e}"
            );
        }
        let e = check_metadata(p(), true, 0o100600, 1000, Some(999)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the secret key file /var/lib/clusterclaw/secret.keys is owned by uid 1000, but the server runs as uid 999; run `chown 999 /var/lib/clusterclaw/secret.keys` and `chmod 600 /var/lib/clusterclaw/secret.keys`"
        );
        let e = check_metadata(p(), false, 0o040700, 5, Some(5)).unwrap_err();
        assert!(matches!(e, KeyringError::NotAFile { .. }), "{e}");
    }

    #[test]
    fn key_ids() {
        assert!(is_key_id("0a1b2c3d"));
        assert!(!is_key_id("0A1B2C3D"));
        assert!(!is_key_id("0a1b2c3"));
        assert!(!is_key_id("0a1b2c3g"));
        assert!(!is_key_id("0a1b2c3d0"));
        let rng = SystemRandom::new();
        let id = new_key_id(&rng, &[]).expect("id");
        assert!(is_key_id(&id), "{id}");
    }

    #[test]
    fn create_new_does_not_replace_an_existing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        let rng = SystemRandom::new();
        let first = KeyFile::generate(&rng).expect("generate");
        let second = KeyFile::generate(&rng).expect("generate");
        assert!(write(&path, &first, WriteMode::CreateNew).expect("create"));
        assert!(!write(&path, &second, WriteMode::CreateNew).expect("second create"));
        let on_disk = read(&path, process_uid()).expect("read").expect("exists");
        assert_eq!(on_disk.active, first.active);
        assert!(write(&path, &second, WriteMode::Replace).expect("replace"));
        let on_disk = read(&path, process_uid()).expect("read").expect("exists");
        assert_eq!(on_disk.active, second.active);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["keys"]);
    }

    #[test]
    fn missing_directory_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nope").join("keys");
        let rng = SystemRandom::new();
        let e = write(
            &path,
            &KeyFile::generate(&rng).expect("gen"),
            WriteMode::CreateNew,
        )
        .unwrap_err();
        assert!(matches!(e, KeyringError::NoDirectory { .. }), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn non_utf8_and_oversized_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        fs::write(&path, b"# ok\nfingerprint \xff\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = read(&path, None).unwrap_err();
        assert!(matches!(e, KeyringError::Parse { line: 2, .. }), "{e}");
        fs::write(&path, vec![b'#'; MAX_FILE_LEN as usize + 1]).expect("write");
        let e = read(&path, None).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }
}
