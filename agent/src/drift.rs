//! Config drift: the content hash of what a replica's container must have, its measurement on the host, and the verdict.
//!
//! **Content hash** (the control plane computes the same for `Assignment.content_hash`):
//! lowercase hex SHA-256 over `b"openclaw.json\0"`, the config file's exact bytes, `b"\0"`,
//! then for each variable of the assignment's `env` in name order (byte-wise):
//! `NAME`, `b"="`, `value`, `b"\0"`.
//!
//! Measured on a host, the bytes are those of the replica's config file as it is on disk, and
//! each value is the one the container really has. Two rules keep a measurement comparable:
//!
//! - a variable the container lacks is written `NAME`, `b"\x01"`, `b"\0"` (instead of
//!   `=value`), so a missing variable differs from an empty one;
//! - where the container holds exactly what the agent derives from the assignment's value (the
//!   heap flag it adds to `NODE_OPTIONS`, its own `HOME` and `OPENCLAW_CONFIG_*`, see
//!   [`spec::container_env`]), the assignment's value is written, since that is what the
//!   container was made from.
//!
//! Nothing here ever shows a config or environment value, nor a hash of one (the content hash
//! covers secret values): messages name the revision and what differed.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::model::Assignment;
use crate::runtime::{ContainerEnv, spec};

/// What the hash starts with: the name of the file it covers and a separator.
const FILE_TAG: &[u8] = b"openclaw.json\0";
/// Written instead of `=value` for a variable the container lacks.
const MISSING_MARK: u8 = 0x01;
/// A config file is read up to this size, or twice the assigned config's size when larger;
/// anything longer is drift without reading further.
pub const CONFIG_READ_LIMIT: u64 = 1 << 20;

/// The content hash of a config file's bytes and an assignment's environment.
///
/// Test vector: `{"gateway":{"bind":"lan"}}` with `A=1`, `B=x` gives
/// `6f452c0c3f97cd7e28d64d3202f198dff3e0d6288d0ba55e9b8beec8d9b0fd92`.
pub fn content_hash(config: &[u8], env: &BTreeMap<String, String>) -> String {
    hash_parts(config, &EnvPart::assigned(env))
}

fn hash_parts(config: &[u8], env: &EnvPart) -> String {
    let mut h = Sha256::new();
    h.update(FILE_TAG);
    h.update(config);
    h.update(b"\0");
    h.update(&env.0);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The environment part of a content hash. It holds values: `Debug` shows its size only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EnvPart(Vec<u8>);

impl fmt::Debug for EnvPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvPart(<{} bytes>)", self.0.len())
    }
}

impl EnvPart {
    /// As the assignment says it.
    pub fn assigned(env: &BTreeMap<String, String>) -> Self {
        let mut out = Vec::new();
        for (name, value) in env {
            push_entry(&mut out, name, Some(value));
        }
        EnvPart(out)
    }

    /// As the container of `a` really has it (see the module docs for the two rules).
    pub fn measured(a: &Assignment, real: &ContainerEnv) -> Self {
        let applied = spec::container_env(a);
        let mut out = Vec::new();
        for (name, assigned) in &a.env {
            let value = match (real.get(name), applied.get(name)) {
                // What the agent set from the assignment's value, or a variable it leaves to
                // the image: the assignment's value.
                (Some(r), Some(applied)) if r == applied => Some(assigned.as_str()),
                (_, None) => Some(assigned.as_str()),
                (r, Some(_)) => r,
            };
            push_entry(&mut out, name, value);
        }
        EnvPart(out)
    }
}

fn push_entry(out: &mut Vec<u8>, name: &str, value: Option<&str>) {
    out.extend_from_slice(name.as_bytes());
    match value {
        Some(v) => {
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
        }
        None => out.push(MISSING_MARK),
    }
    out.push(0);
}

/// A config file as read from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRead {
    Bytes(Vec<u8>),
    /// Longer than the read limit.
    TooLarge,
    /// Missing or unreadable; the reason says which.
    Unreadable(String),
}

/// Reads the config file at `path`, up to the limit for a config of `expected_len` bytes.
pub fn read_config_file(path: &Path, expected_len: usize) -> FileRead {
    let limit = CONFIG_READ_LIMIT.max(2 * expected_len as u64);
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return FileRead::Unreadable("missing".into());
        }
        Err(err) => return FileRead::Unreadable(format!("unreadable ({err})")),
    };
    let mut bytes = Vec::with_capacity(expected_len + 1);
    match file.take(limit + 1).read_to_end(&mut bytes) {
        Ok(n) if n as u64 > limit => FileRead::TooLarge,
        Ok(_) => FileRead::Bytes(bytes),
        Err(err) => FileRead::Unreadable(format!("unreadable ({err})")),
    }
}

/// How the config file on the host compares with the assignment's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileCheck {
    Matches,
    Differs,
    /// Missing or unreadable; the reason says which.
    Unreadable(String),
}

/// One measurement of a running container against its assignment. Hashes and verdicts only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    pub container_id: String,
    /// The content hash of what the container really has; `None` when the config file could
    /// not be read in full.
    pub content_hash: Option<String>,
    pub file: FileCheck,
    /// Whether the container's environment is what the assignment says.
    pub env_matches: bool,
}

impl Measurement {
    /// Measures the container `container_id` of `a` from its config file and its environment part.
    pub fn new(a: &Assignment, container_id: &str, file: FileRead, env: &EnvPart) -> Self {
        let env_matches = *env == EnvPart::assigned(&a.env);
        let (content_hash, file) = match file {
            FileRead::Bytes(bytes) => {
                let check = if bytes == a.config_json.as_bytes() {
                    FileCheck::Matches
                } else {
                    FileCheck::Differs
                };
                (Some(hash_parts(&bytes, env)), check)
            }
            FileRead::TooLarge => (None, FileCheck::Differs),
            FileRead::Unreadable(reason) => (None, FileCheck::Unreadable(reason)),
        };
        Measurement {
            container_id: container_id.to_owned(),
            content_hash,
            file,
            env_matches,
        }
    }

    /// The drift to repair, if any: none when the assignment has no content hash (an older
    /// control plane) or the measured hash is the assigned one.
    ///
    /// When the hashes differ although the file and the environment are what the assignment
    /// says, the assignment disagrees with itself: a repair would change nothing, so there is
    /// no drift to repair (see [`Measurement::disagreement`]).
    pub fn drift(&self, a: &Assignment) -> Option<Drift> {
        if a.content_hash.is_empty() || self.content_hash.as_deref() == Some(&a.content_hash) {
            return None;
        }
        let kind = match (&self.file, self.env_matches) {
            (FileCheck::Unreadable(reason), _) => DriftKind::FileUnreadable(reason.clone()),
            (FileCheck::Differs, true) => DriftKind::ConfigFile,
            (FileCheck::Differs, false) => DriftKind::ConfigFileAndEnvironment,
            (FileCheck::Matches, false) => DriftKind::Environment,
            (FileCheck::Matches, true) => return None,
        };
        Some(Drift {
            kind,
            revision: a.config_revision,
            expected: a.content_hash.clone(),
            found: self.content_hash.clone(),
        })
    }

    /// Why the measured hash differs from the assigned one although the container has exactly
    /// what the assignment says (the control plane hashed something else); `None` otherwise.
    pub fn disagreement(&self, a: &Assignment) -> Option<String> {
        let found = self.content_hash.as_deref()?;
        let agrees = self.file == FileCheck::Matches && self.env_matches;
        (agrees && !a.content_hash.is_empty() && found != a.content_hash).then(|| {
            "the assignment's content hash is not that of its own config and environment; drift is not repaired".to_string()
        })
    }
}

/// What differs from the assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftKind {
    /// The config file is missing or unreadable.
    FileUnreadable(String),
    ConfigFile,
    Environment,
    ConfigFileAndEnvironment,
}

impl DriftKind {
    /// `config file`, `environment`, … for logs.
    pub fn what(&self) -> &'static str {
        match self {
            DriftKind::FileUnreadable(_) | DriftKind::ConfigFile => "config file",
            DriftKind::Environment => "environment",
            DriftKind::ConfigFileAndEnvironment => "config file and environment",
        }
    }
}

/// A replica whose container does not have what its assignment says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub kind: DriftKind,
    /// The config revision the container should run.
    pub revision: u64,
    /// The assigned content hash.
    pub expected: String,
    /// The measured one (`None` when the file could not be read in full).
    pub found: Option<String>,
}

impl Drift {
    /// What was wrong, without any value or hash: `config file on the host did not match
    /// revision 3`. (The content hash covers secret values, so not even a prefix of it is
    /// told: with the rest of the config known, it would let a reader test guesses.)
    pub fn describe(&self) -> String {
        let rev = self.revision;
        match &self.kind {
            DriftKind::FileUnreadable(reason) => {
                format!("config file on the host was {reason} (revision {rev})")
            }
            DriftKind::ConfigFile => {
                format!("config file on the host did not match revision {rev}")
            }
            DriftKind::Environment => {
                format!("container environment did not match revision {rev}")
            }
            DriftKind::ConfigFileAndEnvironment => format!(
                "config file on the host and container environment did not match revision {rev}"
            ),
        }
    }

    /// The event message once repaired, for `replica`.
    pub fn repaired_message(&self, replica: &str) -> String {
        let done = match self.kind {
            DriftKind::Environment => "rewrote the config file and replaced the container",
            _ => "rewrote it and replaced the container",
        };
        format!("replica {replica}: {}; {done}", self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn content_hash_test_vector() {
        assert_eq!(
            content_hash(
                br#"{"gateway":{"bind":"lan"}}"#,
                &env(&[("B", "x"), ("A", "1")])
            ),
            "6f452c0c3f97cd7e28d64d3202f198dff3e0d6288d0ba55e9b8beec8d9b0fd92"
        );
    }

    #[test]
    fn every_part_counts() {
        let base = content_hash(b"{}", &env(&[("A", "1")]));
        assert_ne!(base, content_hash(b"{} ", &env(&[("A", "1")])));
        assert_ne!(base, content_hash(b"{}", &env(&[("A", "2")])));
        assert_ne!(base, content_hash(b"{}", &env(&[("A", "1"), ("B", "")])));
        assert_ne!(base, content_hash(b"{}", &env(&[])));
        // The separators keep the parts apart.
        assert_ne!(
            content_hash(b"{}", &env(&[("A", "1B=2")])),
            content_hash(b"{}", &env(&[("A", "1"), ("B", "2")]))
        );
    }

    fn assignment() -> Assignment {
        Assignment::test("bot-0")
            .env("A", "1")
            .env("NODE_OPTIONS", "--enable-source-maps")
            .config(r#"{"gateway":{"bind":"lan"}}"#, 3)
    }

    #[test]
    fn the_container_the_agent_made_measures_in_sync() {
        let a = assignment();
        let made = ContainerEnv::from_map(&spec::container_env(&a));
        // The agent appended the heap flag to NODE_OPTIONS: still the assignment's value.
        assert_ne!(made.get("NODE_OPTIONS"), Some("--enable-source-maps"));
        let part = EnvPart::measured(&a, &made);
        assert_eq!(part, EnvPart::assigned(&a.env));
        let m = Measurement::new(
            &a,
            "c1",
            FileRead::Bytes(a.config_json.clone().into_bytes()),
            &part,
        );
        assert_eq!(m.content_hash.as_deref(), Some(a.content_hash.as_str()));
        assert_eq!(m.drift(&a), None);
        assert_eq!(m.disagreement(&a), None);
    }

    #[test]
    fn a_missing_variable_differs_from_an_empty_one() {
        let a = assignment();
        let mut real = ContainerEnv::from_map(&spec::container_env(&a));
        real.set("A", "");
        let empty = EnvPart::measured(&a, &real);
        real.remove("A");
        let missing = EnvPart::measured(&a, &real);
        assert_ne!(empty, missing);
        assert_ne!(empty, EnvPart::assigned(&a.env));
    }

    #[test]
    fn drift_kinds_and_messages() {
        let a = assignment();
        let right = EnvPart::assigned(&a.env);
        let mut other = ContainerEnv::from_map(&spec::container_env(&a));
        other.set("A", "2");
        let wrong = EnvPart::measured(&a, &other);
        let edited = FileRead::Bytes(br#"{"gateway":{"bind":"loopback"}}"#.to_vec());

        let m = Measurement::new(&a, "c1", edited.clone(), &right);
        let d = m.drift(&a).expect("drift");
        assert_eq!(d.kind, DriftKind::ConfigFile);
        let found = m.content_hash.clone().unwrap();
        let message = d.repaired_message("bot-0");
        assert_eq!(
            message,
            "replica bot-0: config file on the host did not match revision 3; rewrote it and replaced the container"
        );
        assert!(!message.contains(&found[..8]) && !message.contains(&a.content_hash[..8]));
        assert!(!message.contains("loopback") && !message.contains("lan"));

        let m = Measurement::new(
            &a,
            "c1",
            FileRead::Bytes(a.config_json.clone().into()),
            &wrong,
        );
        assert_eq!(m.drift(&a).unwrap().kind, DriftKind::Environment);
        let m = Measurement::new(&a, "c1", edited, &wrong);
        assert_eq!(
            m.drift(&a).unwrap().kind,
            DriftKind::ConfigFileAndEnvironment
        );
        let m = Measurement::new(&a, "c1", FileRead::Unreadable("missing".into()), &right);
        let d = m.drift(&a).unwrap();
        assert_eq!(d.kind, DriftKind::FileUnreadable("missing".into()));
        assert!(
            d.describe()
                .starts_with("config file on the host was missing")
        );
        let m = Measurement::new(&a, "c1", FileRead::TooLarge, &right);
        assert_eq!(m.drift(&a).unwrap().kind, DriftKind::ConfigFile);

        // No content hash (an older control plane): nothing is drift.
        let mut old = a.clone();
        old.content_hash.clear();
        let m = Measurement::new(&old, "c1", FileRead::Unreadable("missing".into()), &wrong);
        assert_eq!(m.drift(&old), None);
    }

    #[test]
    fn an_assignment_that_disagrees_with_itself_is_not_drift() {
        let mut a = assignment();
        a.content_hash = "ee".repeat(32);
        let m = Measurement::new(
            &a,
            "c1",
            FileRead::Bytes(a.config_json.clone().into()),
            &EnvPart::assigned(&a.env),
        );
        assert_eq!(m.drift(&a), None);
        let why = m.disagreement(&a).unwrap();
        assert!(
            why.contains("drift is not repaired") && !why.contains("eeee"),
            "{why}"
        );
    }

    #[test]
    fn reads_files_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openclaw.json");
        assert_eq!(
            read_config_file(&path, 2),
            FileRead::Unreadable("missing".into())
        );
        std::fs::write(&path, b"{}").unwrap();
        assert_eq!(read_config_file(&path, 2), FileRead::Bytes(b"{}".to_vec()));
        std::fs::write(&path, vec![b' '; CONFIG_READ_LIMIT as usize + 1]).unwrap();
        assert_eq!(read_config_file(&path, 2), FileRead::TooLarge);
    }

    #[test]
    fn debug_shows_no_values() {
        let a = assignment();
        let part = EnvPart::assigned(&a.env);
        assert!(!format!("{part:?}").contains("enable-source-maps"));
        let real = ContainerEnv::from_map(&a.env);
        let shown = format!("{real:?}");
        assert!(
            shown.contains("NODE_OPTIONS") && !shown.contains("enable"),
            "{shown}"
        );
    }
}
