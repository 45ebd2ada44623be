//! Snapshots of a replica's state volume, taken before its container changes image, and the rule that decides when one is restored.
//!
//! A snapshot is a tar of the contents of [`crate::runtime::spec::STATE_DIR`] read out of the stopped old
//! container through the engine's archive API, streamed to
//! `<data_dir>/replicas/<replica>/snapshots/<id>.tar`, with its metadata in `<id>.json`. The
//! newest [`DEFAULT_KEEP`] (a setting) are kept per replica; they go with the replica's
//! volume.
//!
//! Restore rule, when a replica's image changes from `from` to `to` (see [`restore_choice`]):
//! when both tags are OpenClaw versions and `to` is the older (a downgrade), the newest
//! snapshot taken from exactly `to` is restored; when a tag is not a version, the replica's
//! newest snapshot before this change is restored when it was taken from exactly `to` (a
//! rollback). Otherwise the volume is used as it is.

use std::cmp::Ordering;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clusterclaw_proto::agent as proto;
use serde::{Deserialize, Serialize};

/// What is archived: the contents of the state directory (entries `./...`), so that they
/// extract straight into the state volume.
pub fn archive_path() -> String {
    format!("{}/.", crate::runtime::spec::STATE_DIR)
}

/// Names the snapshot whose restore is under way.
const PENDING_FILE: &str = "restore-pending";

/// Snapshots kept per replica by default.
pub const DEFAULT_KEEP: usize = 3;

/// `reason` of the event saying a snapshot was taken.
pub const SNAPSHOT_TAKEN: &str = "SnapshotTaken";
/// `reason` of the event saying a snapshot was restored.
pub const SNAPSHOT_RESTORED: &str = "SnapshotRestored";

/// One snapshot of a replica's state volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Unique on the host; sorts by time.
    pub id: String,
    /// The image the replica ran when it was taken.
    pub image: String,
    pub taken_unix_ms: i64,
    pub bytes: u64,
}

impl SnapshotMeta {
    pub fn to_proto(&self) -> proto::VolumeSnapshot {
        proto::VolumeSnapshot {
            id: self.id.clone(),
            image: self.image.clone(),
            taken_unix_ms: self.taken_unix_ms,
            bytes: self.bytes,
        }
    }
}

/// An OpenClaw release version: `YYYY.M.D`, optionally `-N` (a later fix of that release) or
/// `-beta.N` (a prerelease before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpenClawVersion {
    year: u32,
    month: u32,
    day: u32,
    /// 0: beta, 1: the release, 2: a numbered fix; then the number.
    rank: (u8, u32),
}

impl OpenClawVersion {
    pub fn parse(tag: &str) -> Option<Self> {
        let tag = tag.strip_prefix('v').unwrap_or(tag);
        let (date, suffix) = match tag.split_once('-') {
            Some((d, s)) => (d, Some(s)),
            None => (tag, None),
        };
        let mut parts = date.split('.');
        let number = |s: Option<&str>| -> Option<u32> {
            let s = s?;
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        let year = number(parts.next())?;
        let month = number(parts.next())?;
        let day = number(parts.next())?;
        if parts.next().is_some()
            || !(1000..=9999).contains(&year)
            || !(1..=12).contains(&month)
            || !(1..=31).contains(&day)
        {
            return None;
        }
        let rank = match suffix {
            None => (1, 0),
            Some(s) => match s.strip_prefix("beta.") {
                Some(n) => (0, number(Some(n))?),
                None => (2, number(Some(s))?),
            },
        };
        Some(OpenClawVersion {
            year,
            month,
            day,
            rank,
        })
    }
}

/// The tag of an image reference (`None` when it has none, e.g. only a digest).
pub fn image_tag(image: &str) -> Option<&str> {
    let name = image.split('@').next().unwrap_or(image);
    let last = name.rsplit('/').next().unwrap_or(name);
    last.split_once(':').map(|(_, tag)| tag)
}

/// Compares the versions in two images' tags; `None` when either is not a version.
pub fn compare_images(a: &str, b: &str) -> Option<Ordering> {
    let a = OpenClawVersion::parse(image_tag(a)?)?;
    let b = OpenClawVersion::parse(image_tag(b)?)?;
    Some(a.cmp(&b))
}

/// Which snapshot to restore when a replica changes image from `from` to `to`; `earlier` are
/// its snapshots from before this change, newest first. Pure.
pub fn restore_choice<'s>(
    from: &str,
    to: &str,
    earlier: &'s [SnapshotMeta],
) -> Option<&'s SnapshotMeta> {
    if from == to {
        return None;
    }
    match compare_images(to, from) {
        Some(Ordering::Less) => earlier.iter().find(|s| s.image == to),
        Some(_) => None,
        None => earlier.first().filter(|s| s.image == to),
    }
}

/// A replica's snapshot directory.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
}

impl SnapshotDir {
    pub fn new(replica_dir: &Path) -> Self {
        SnapshotDir {
            dir: replica_dir.join("snapshots"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn tar(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.tar"))
    }

    fn meta(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Its snapshots, newest first (unreadable entries are skipped).
    pub fn list(&self) -> Vec<SnapshotMeta> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<SnapshotMeta> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .filter(|m: &SnapshotMeta| self.tar(&m.id).is_file())
            .collect();
        out.sort_by(|a, b| (b.taken_unix_ms, &b.id).cmp(&(a.taken_unix_ms, &a.id)));
        out
    }

    /// A new snapshot's id and the file its tar is streamed to (renamed by [`Self::commit`]).
    pub fn begin(&self) -> io::Result<(String, PathBuf)> {
        crate::state::create_private_dir(&self.dir)?;
        let now = now_unix_ms();
        let mut n = 0u32;
        loop {
            let id = format!("{now:013}-{n}");
            if !self.tar(&id).exists() && !self.meta(&id).exists() {
                let part = self.dir.join(format!("{id}.tar.part"));
                return Ok((id, part));
            }
            n += 1;
        }
    }

    /// Makes a streamed tar a snapshot.
    pub fn commit(&self, part: &Path, meta: &SnapshotMeta) -> io::Result<()> {
        std::fs::rename(part, self.tar(&meta.id))?;
        let json = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
        crate::state::write_file_atomic(&self.meta(&meta.id), &json, 0o600)
    }

    /// Records that `id` must be restored before the replica starts again (written before its
    /// volume is emptied, so that a failure or an agent restart never starts it empty).
    pub fn set_pending_restore(&self, id: &str) -> io::Result<()> {
        crate::state::create_private_dir(&self.dir)?;
        crate::state::write_file_atomic(&self.dir.join(PENDING_FILE), id.as_bytes(), 0o600)
    }

    pub fn clear_pending_restore(&self) {
        let _ = std::fs::remove_file(self.dir.join(PENDING_FILE));
    }

    /// The snapshot a restore of which was started and did not finish.
    pub fn pending_restore(&self) -> Option<SnapshotMeta> {
        let id = std::fs::read_to_string(self.dir.join(PENDING_FILE)).ok()?;
        self.list().into_iter().find(|s| s.id == id.trim())
    }

    /// Keeps the newest `keep`, deleting the rest; returns how many were deleted.
    pub fn prune(&self, keep: usize) -> usize {
        let mut deleted = 0;
        let pending = self.pending_restore().map(|s| s.id);
        for old in self
            .list()
            .into_iter()
            .skip(keep)
            .filter(|s| Some(&s.id) != pending.as_ref())
        {
            let _ = std::fs::remove_file(self.tar(&old.id));
            let _ = std::fs::remove_file(self.meta(&old.id));
            deleted += 1;
        }
        deleted
    }
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, image: &str, at: i64) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            image: image.into(),
            taken_unix_ms: at,
            bytes: 10,
        }
    }

    #[test]
    fn versions_parse_and_order() {
        let v = |s: &str| OpenClawVersion::parse(s).unwrap_or_else(|| panic!("{s}"));
        assert!(v("2026.1.5-beta.1") < v("2026.1.5"));
        assert!(v("2026.1.5") < v("2026.1.5-1"));
        assert!(v("2026.1.5-2") < v("2026.1.10"));
        assert!(v("2025.12.31") < v("2026.1.1"));
        for bad in [
            "latest",
            "2026.1",
            "2026.13.1",
            "2026.1.1-rc.1",
            "2026.1.1-",
            "main-2026.1.1",
        ] {
            assert!(OpenClawVersion::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(
            image_tag("reg.example:5000/openclaw/openclaw:2026.2.1"),
            Some("2026.2.1")
        );
        assert_eq!(image_tag("reg.example:5000/openclaw/openclaw"), None);
        assert_eq!(image_tag("openclaw:2026.2.1@sha256:abcd"), Some("2026.2.1"));
    }

    #[test]
    fn a_downgrade_restores_the_newest_snapshot_of_the_older_image() {
        let old = "ex/openclaw:2026.1.5";
        let new = "ex/openclaw:2026.2.1";
        let earlier = vec![
            snap("3", "ex/openclaw:2026.1.20", 3),
            snap("2", old, 2),
            snap("1", old, 1),
        ];
        assert_eq!(
            restore_choice(new, old, &earlier).map(|s| s.id.as_str()),
            Some("2")
        );
        // An upgrade restores nothing.
        assert_eq!(restore_choice(old, new, &earlier), None);
        // A downgrade to an image never snapshotted restores nothing.
        assert_eq!(restore_choice(new, "ex/openclaw:2025.1.1", &earlier), None);
    }

    #[test]
    fn without_versions_a_rollback_restores_the_newest_snapshot() {
        let earlier = vec![
            snap("2", "ex/openclaw:stable", 2),
            snap("1", "ex/openclaw:next", 1),
        ];
        assert_eq!(
            restore_choice("ex/openclaw:next", "ex/openclaw:stable", &earlier)
                .map(|s| s.id.as_str()),
            Some("2")
        );
        // The newest is not of the new image: nothing.
        assert_eq!(
            restore_choice("ex/openclaw:stable", "ex/openclaw:next", &earlier),
            None
        );
        assert_eq!(restore_choice("a:x", "b:y", &[]), None);
    }

    #[test]
    fn snapshots_are_listed_newest_first_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = SnapshotDir::new(dir.path());
        assert!(snaps.list().is_empty());
        for i in 0..5 {
            let (id, part) = snaps.begin().unwrap();
            std::fs::write(&part, b"tar").unwrap();
            snaps
                .commit(&part, &snap(&id, &format!("img:{i}"), 100 + i))
                .unwrap();
        }
        let all = snaps.list();
        assert_eq!(all.len(), 5);
        assert_eq!(all[0].image, "img:4");
        assert_eq!(snaps.prune(3), 2);
        let kept: Vec<String> = snaps.list().into_iter().map(|s| s.image).collect();
        assert_eq!(kept, vec!["img:4", "img:3", "img:2"]);
    }
}
