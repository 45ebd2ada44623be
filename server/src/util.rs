//! Small helpers used across the server: time stamps, hex, and running blocking work.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z).
const MAX_RFC3339_UNIX: i64 = 253_402_300_799;

/// Current time in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// RFC 3339 rendering of Unix seconds, e.g. `2027-01-15T08:00:00Z`. A time RFC 3339 cannot
/// write (before 1970 or after the year 9999) is shown as `<n> (Unix seconds)`.
pub fn rfc3339(unix: i64) -> String {
    match u64::try_from(unix) {
        Ok(secs) if unix <= MAX_RFC3339_UNIX => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
        }
        _ => format!("{unix} (Unix seconds)"),
    }
}

/// [`rfc3339`] of unsigned seconds (as the API sends them).
pub fn rfc3339_u64(unix: u64) -> String {
    match i64::try_from(unix) {
        Ok(secs) => rfc3339(secs),
        Err(_) => format!("{unix} (Unix seconds)"),
    }
}

/// The current time in RFC 3339, to the second.
pub fn now_rfc3339() -> String {
    rfc3339(unix_now())
}

/// The current time in RFC 3339, to the millisecond (for times that gate decisions measure
/// against, such as a replica's `readySince`).
pub fn now_rfc3339_millis() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Whether `c` is an invisible formatting character (Unicode general category Cf: bidirectional
/// overrides such as U+202E, zero-width spaces and joiners, tag characters, ...), which can make
/// a text look like another.
pub fn is_format_char(c: char) -> bool {
    matches!(
        u32::from(c),
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// Blocking work that did not finish: it panicked or the runtime is shutting down.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {source}")]
pub struct TaskFailed {
    pub what: &'static str,
    #[source]
    pub source: tokio::task::JoinError,
}

impl From<TaskFailed> for tonic::Status {
    fn from(e: TaskFailed) -> Self {
        tonic::Status::internal(e.to_string())
    }
}

/// Runs blocking work (the store, files, key generation) on the runtime's blocking pool, so
/// that no async worker thread waits on it. `what` names the work in the error.
pub async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TaskFailed> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| TaskFailed { what, source })
}

/// [`blocking`] for work that can fail: its error and a failure to run it come back as one
/// error type.
pub async fn try_blocking<T, E>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<TaskFailed> + Send + 'static,
{
    blocking(what, f).await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_rendering() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_800_000_000), "2027-01-15T08:00:00Z");
        assert_eq!(rfc3339(MAX_RFC3339_UNIX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(MAX_RFC3339_UNIX + 1), "253402300800 (Unix seconds)");
        assert_eq!(rfc3339(-1), "-1 (Unix seconds)");
        assert_eq!(
            rfc3339_u64(u64::MAX),
            format!("{} (Unix seconds)", u64::MAX)
        );
        assert!(now_rfc3339().ends_with('Z'));
    }

    #[test]
    fn format_characters() {
        for c in [
            '\u{202e}',
            '\u{200b}',
            '\u{feff}',
            '\u{2066}',
            '\u{e0041}',
            '\u{ad}',
        ] {
            assert!(is_format_char(c), "{:?}", c);
        }
        for c in ['a', 'é', ' ', '\u{2028}', '字', '🦀'] {
            assert!(!is_format_char(c), "{:?}", c);
        }
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn blocking_work_runs_on_a_current_thread_runtime() {
        assert_eq!(blocking("adding", || 1 + 1).await.unwrap(), 2);
        let e = blocking("panicking", || -> u8 { panic!("boom") })
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("panicking failed"), "{e}");
        let failed: Result<u8, tonic::Status> =
            try_blocking("failing", || Err(tonic::Status::not_found("x"))).await;
        assert_eq!(failed.unwrap_err().code(), tonic::Code::NotFound);
    }
}

/// Where a setting is in a configuration file: `<file>, line L, column C (<key>)` for a byte
/// offset into `text` (lines and columns counted from 1, columns in characters), or
/// `<file> (<key>)` when the place is not known.
pub fn file_location(
    file: &std::path::Path,
    text: &str,
    offset: Option<usize>,
    key: &str,
) -> String {
    let Some(offset) = offset else {
        return format!("{} ({key})", file.display());
    };
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let upto = &text[..end];
    let line = upto.matches('\n').count() + 1;
    let column = upto.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("{}, line {line}, column {column} ({key})", file.display())
}

#[cfg(test)]
mod location_tests {
    #[test]
    fn lines_and_columns_count_from_one_in_characters() {
        let f = std::path::Path::new("/etc/x.toml");
        let text = "a = 1\nbé = 2\n";
        assert_eq!(
            super::file_location(f, text, Some(0), "a"),
            "/etc/x.toml, line 1, column 1 (a)"
        );
        let at = text.find("= 2").unwrap();
        assert_eq!(
            super::file_location(f, text, Some(at), "bé"),
            "/etc/x.toml, line 2, column 4 (bé)"
        );
        assert_eq!(super::file_location(f, text, None, "k"), "/etc/x.toml (k)");
        assert!(super::file_location(f, text, Some(999), "k").contains("line 3"));
    }
}
