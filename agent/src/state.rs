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

use crate::model::Assignment;

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
        }
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
