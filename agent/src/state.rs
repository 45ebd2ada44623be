//! The last known assignments and their index, kept on disk so the host runs its replicas while the server is away and across agent restarts.
//!
//! The file (`state.json` in the data directory) is written to a temporary file, synced and
//! renamed over the old one, so a crash leaves either the old or the new state, never a torn
//! one. It holds the assignments' environment (secrets included), so it is created with mode
//! 0600 and the data directory with 0700.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{Assignment, RetainedVolume};
use crate::runtime::{LegacyObjects, Owner};

/// Name of the state file inside the data directory.
pub const STATE_FILE: &str = "state.json";
/// Version of the file's layout; a file with another version is refused, not misread.
pub const STATE_VERSION: u32 = 1;

/// What the agent last heard from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    /// The host id the assignments were made for.
    pub host_id: String,
    /// The assignment index they are current at (send it back as `known_index`).
    pub index: u64,
    pub assignments: Vec<Assignment>,
    /// Seconds since the Unix epoch when they were received.
    pub received_at_unix: u64,
    /// The state volumes to keep although unassigned, as the control plane last said; `None`
    /// in a file written before the agent knew of them (then no volume is deleted).
    #[serde(default)]
    pub retained: Option<Vec<RetainedVolume>>,
    /// The newest placement epoch given per replica (see [`crate::fencing`]); kept for replicas
    /// no longer assigned, so an older assignment of theirs is refused.
    #[serde(default)]
    pub epochs: crate::fencing::Epochs,
}

impl SavedState {
    pub fn new(host_id: impl Into<String>, index: u64, assignments: Vec<Assignment>) -> Self {
        SavedState {
            version: STATE_VERSION,
            host_id: host_id.into(),
            index,
            assignments,
            received_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            retained: Some(Vec::new()),
            epochs: crate::fencing::Epochs::new(),
        }
    }

    /// With the newest epochs seen.
    pub fn with_epochs(mut self, epochs: crate::fencing::Epochs) -> Self {
        self.epochs = epochs;
        self
    }

    /// With the volumes the control plane wants kept.
    pub fn with_retained(mut self, retained: Vec<RetainedVolume>) -> Self {
        self.retained = Some(retained);
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a valid state file: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{path}: state file version {found}, this agent reads version {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// The state file of one data directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    /// The store in `data_dir` (created with mode 0700 on the first save).
    pub fn new(data_dir: impl AsRef<Path>) -> Self {
        StateStore {
            path: data_dir.as_ref().join(STATE_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; `None` when nothing was saved yet.
    pub fn load(&self) -> Result<Option<SavedState>, StateError> {
        let text = match fs::read(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let corrupt = |err: serde_json::Error| StateError::Corrupt {
            path: self.path.clone(),
            message: err.to_string(),
        };
        let Versioned { version } = serde_json::from_slice(&text).map_err(corrupt)?;
        if version != STATE_VERSION {
            return Err(StateError::Version {
                path: self.path.clone(),
                found: version,
            });
        }
        serde_json::from_slice(&text).map(Some).map_err(corrupt)
    }

    /// Saves `state` atomically with mode 0600.
    pub fn save(&self, state: &SavedState) -> Result<(), StateError> {
        let io_err = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            create_private_dir(dir).map_err(io_err)?;
        }
        let mut bytes = serde_json::to_vec_pretty(state).map_err(|err| StateError::Corrupt {
            path: self.path.clone(),
            message: err.to_string(),
        })?;
        bytes.push(b'\n');
        write_file_atomic(&self.path, &bytes, 0o600).map_err(io_err)
    }
}

/// Name of the file recording which pre-upgrade objects the agent adopted.
pub const OWNERSHIP_FILE: &str = "ownership.json";

/// The adopted pre-upgrade objects of one identity (see [`crate::runtime::Owner`]). Written
/// once, at the first pass after an upgrade; never widened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnershipRecord {
    pub version: u32,
    pub host_name: String,
    pub cluster_id: String,
    pub host_uid: String,
    pub legacy: LegacyObjects,
}

impl OwnershipRecord {
    pub fn new(owner: &Owner, legacy: LegacyObjects) -> Self {
        OwnershipRecord {
            version: STATE_VERSION,
            host_name: owner.host_name().to_owned(),
            cluster_id: owner.cluster_id().to_owned(),
            host_uid: owner.host_uid().to_owned(),
            legacy,
        }
    }

    /// Whether it was written for this identity.
    pub fn is_for(&self, owner: &Owner) -> bool {
        self.host_name == owner.host_name()
            && self.cluster_id == owner.cluster_id()
            && self.host_uid == owner.host_uid()
    }
}

/// The ownership record in `data_dir`; `None` when there is none yet.
pub fn load_ownership(data_dir: &Path) -> Result<Option<OwnershipRecord>, StateError> {
    let path = data_dir.join(OWNERSHIP_FILE);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { path, source }),
    };
    let record: OwnershipRecord =
        serde_json::from_slice(&text).map_err(|err| StateError::Corrupt {
            path: path.clone(),
            message: err.to_string(),
        })?;
    if record.version != STATE_VERSION {
        return Err(StateError::Version {
            path,
            found: record.version,
        });
    }
    Ok(Some(record))
}

/// Writes the ownership record into `data_dir` atomically with mode 0600.
pub fn save_ownership(data_dir: &Path, record: &OwnershipRecord) -> Result<(), StateError> {
    let path = data_dir.join(OWNERSHIP_FILE);
    let io_err = |source| StateError::Io {
        path: path.clone(),
        source,
    };
    create_private_dir(data_dir).map_err(io_err)?;
    let mut bytes = serde_json::to_vec_pretty(record).map_err(|err| StateError::Corrupt {
        path: path.clone(),
        message: err.to_string(),
    })?;
    bytes.push(b'\n');
    write_file_atomic(&path, &bytes, 0o600).map_err(io_err)
}

/// Name of the file saying the control plane removed this host (the agent stays down while it
/// exists; a new enrollment sets it aside).
pub const REMOVED_FILE: &str = "removed.json";

/// Why and when the control plane removed this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemovedRecord {
    pub host_id: String,
    pub reason: String,
    /// Seconds since the Unix epoch.
    pub removed_at_unix: u64,
}

impl RemovedRecord {
    pub fn new(host_id: &str, reason: &str) -> Self {
        RemovedRecord {
            host_id: host_id.to_owned(),
            reason: reason.to_owned(),
            removed_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
        }
    }
}

/// Writes `removed.json` into `data_dir`.
pub fn save_removed(data_dir: &Path, record: &RemovedRecord) -> Result<(), StateError> {
    let path = data_dir.join(REMOVED_FILE);
    let io_err = |source| StateError::Io {
        path: path.clone(),
        source,
    };
    let mut bytes = serde_json::to_vec_pretty(record).map_err(|err| StateError::Corrupt {
        path: path.clone(),
        message: err.to_string(),
    })?;
    bytes.push(b'\n');
    write_file_atomic(&path, &bytes, 0o600).map_err(io_err)
}

/// The removal record in `data_dir`, if any. An unreadable one counts as a removal (fail
/// closed), with its problem as the reason.
pub fn load_removed(data_dir: &Path) -> Option<RemovedRecord> {
    let path = data_dir.join(REMOVED_FILE);
    match fs::read(&path) {
        Ok(text) => Some(
            serde_json::from_slice(&text).unwrap_or_else(|err| RemovedRecord {
                host_id: String::new(),
                reason: format!("{} is unreadable: {err}", path.display()),
                removed_at_unix: 0,
            }),
        ),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => Some(RemovedRecord {
            host_id: String::new(),
            reason: format!("{}: {err}", path.display()),
            removed_at_unix: 0,
        }),
    }
}

/// Moves the files of a removed identity (key, certificate, CA, host record, saved
/// assignments, ownership and removal records) into `<data_dir>/removed-<host>-<time>/`, so that
/// a new enrollment starts clean while nothing is deleted. Returns the directory.
pub fn set_aside_identity(data_dir: &Path, host_id: &str) -> io::Result<PathBuf> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let safe: String = host_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let aside = data_dir.join(format!("removed-{safe}-{now}"));
    create_private_dir(&aside)?;
    for name in [
        "host.key",
        "host.crt",
        "ca.crt",
        "host.json",
        STATE_FILE,
        OWNERSHIP_FILE,
        REMOVED_FILE,
    ] {
        match fs::rename(data_dir.join(name), aside.join(name)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    File::open(data_dir)?.sync_all()?;
    Ok(aside)
}

/// Creates `dir` (and missing parents) with mode 0700; an existing directory keeps its mode.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes `contents` to `path` through a temporary file in the same directory: write, sync,
/// set `mode`, rename, sync the directory.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let temp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(contents)?;
        // The mode given to open() is filtered by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = StateStore::new(&data);
        assert_eq!(store.load().unwrap(), None);

        let mut a = Assignment::test("bot-0");
        a.env
            .insert("OPENCLAW_GATEWAY_TOKEN".into(), "t0k3n".into());
        let state = SavedState::new("host-1", 42, vec![a, Assignment::test("bot-1")]);
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), Some(state.clone()));

        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(store.path()), 0o600);
        assert_eq!(mode(&data), 0o700);

        // Overwriting replaces the whole file and leaves no temporary file behind.
        let newer = SavedState::new("host-1", 43, vec![]);
        store.save(&newer).unwrap();
        assert_eq!(store.load().unwrap(), Some(newer));
        let names: Vec<_> = fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [STATE_FILE]);
    }

    #[test]
    fn refuses_corrupt_and_foreign_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        fs::write(store.path(), b"{\"version\":1,\"index\":").unwrap();
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
        fs::write(store.path(), b"{\"version\":99}").unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StateError::Version { found: 99, .. }));
        assert!(err.to_string().contains("version 99"));
    }

    #[test]
    fn a_removed_identity_is_set_aside_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "host.key",
            "host.crt",
            "ca.crt",
            "host.json",
            STATE_FILE,
            "agent.lock",
        ] {
            fs::write(dir.path().join(f), f).unwrap();
        }
        assert_eq!(load_removed(dir.path()), None);
        save_removed(dir.path(), &RemovedRecord::new("node-1", "revoked")).unwrap();
        assert_eq!(load_removed(dir.path()).unwrap().reason, "revoked");
        let aside = set_aside_identity(dir.path(), "node-1").unwrap();
        assert!(
            aside
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("removed-node-1-")
        );
        for f in [
            "host.key",
            "host.crt",
            "ca.crt",
            "host.json",
            STATE_FILE,
            REMOVED_FILE,
        ] {
            assert!(!dir.path().join(f).exists(), "{f} moved");
            assert!(aside.join(f).exists(), "{f} kept");
        }
        assert_eq!(
            fs::read_to_string(aside.join("host.key")).unwrap(),
            "host.key"
        );
        assert!(dir.path().join("agent.lock").exists(), "the lock stays");
        assert_eq!(load_removed(dir.path()), None);
        fs::write(dir.path().join(REMOVED_FILE), b"{not json").unwrap();
        assert!(
            load_removed(dir.path()).is_some(),
            "unreadable counts as removed"
        );
    }

    #[test]
    fn atomic_write_sets_the_mode_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_file_atomic(&path, b"one", 0o644).unwrap();
        write_file_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
