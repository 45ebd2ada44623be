//! The web console's sessions as both engines keep them, in the `console_sessions` table:
//! written outside the global index (a login wakes nothing that watches the store), so that
//! a session outlives a restart of its server and every server of one PostgreSQL database
//! accepts it.
//!
//! A row holds no secret a browser sends: the session id is kept as its SHA-256, and the
//! token the session authenticates with is sealed with a key derived from the id
//! ([`crate::ui::session`]), so the rows alone open no session and reveal no token.

/// Both engines' migration (times in Unix milliseconds on the clock of the server that
/// wrote them). IF NOT EXISTS: a database whose version was set back by hand keeps its rows.
pub const MIGRATION: &str = "CREATE TABLE IF NOT EXISTS console_sessions (
        id_hash TEXT PRIMARY KEY,
        token_id TEXT NOT NULL,
        sealed_token TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        last_used_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS console_sessions_last_used ON console_sessions (last_used_ms);";

/// One stored session.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// The SHA-256 of the session id, hex.
    pub id_hash: String,
    /// The public id of the token (or single sign-on principal) it was opened with.
    pub token_id: String,
    /// Its token, sealed with a key only the session id gives.
    pub sealed_token: String,
    /// When it was opened, Unix milliseconds.
    pub created_ms: i64,
    /// When it was last used, as last recorded (at most once a minute), Unix milliseconds.
    pub last_used_ms: i64,
    /// When it ends whatever else (its absolute lifetime, or its single sign-on ID token's
    /// expiry if sooner), Unix milliseconds.
    pub expires_ms: i64,
}

impl std::fmt::Debug for SessionRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRow")
            .field("id_hash", &self.id_hash)
            .field("token_id", &self.token_id)
            .field("sealed_token", &"***")
            .field("created_ms", &self.created_ms)
            .field("last_used_ms", &self.last_used_ms)
            .field("expires_ms", &self.expires_ms)
            .finish()
    }
}

/// What ends stored sessions, for [`crate::store::Store::open_console_session`]'s pruning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Now, Unix milliseconds.
    pub now_ms: i64,
    /// A session not used for this long has ended, milliseconds.
    pub idle_ms: i64,
    /// Sessions kept at most; the least recently used go first.
    pub max_sessions: usize,
}

impl SessionLimits {
    /// Rows last used at or before this have ended.
    pub fn idle_before(&self) -> i64 {
        self.now_ms.saturating_sub(self.idle_ms)
    }
}
