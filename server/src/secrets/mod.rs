//! Secret values at rest: sealing with AES-256-GCM under keys from a key file, fingerprints.
//!
//! Every value of a `Secret` object is stored sealed: `ccs1:<key id>:<base64>`, where the
//! base64 holds a random 96-bit nonce followed by the AES-256-GCM ciphertext and its 16-byte
//! tag. The additional authenticated data is the value's place (`tenant/project/secret/key`),
//! so a sealed value copied to another secret or key does not open. A fingerprint
//! (`hmac-sha256:` and 16 hex characters, an HMAC-SHA256 under a key that never rotates) tells
//! whether two values are equal without revealing them.
//!
//! # The key file
//!
//! The keys live in a text file beside the database, created on first start with mode 0600
//! and refused when group or others have any access to it (fix: `chmod 600 FILE`) or when it
//! is owned by another user than the server's. One entry per line; blank lines and lines
//! starting with `#` are ignored:
//!
//! ```text
//! # openClusterClaw secret encryption keys.
//! fingerprint <base64 of 32 random bytes>
//! key <id> <base64 of 32 random bytes>
//! key <id> <base64 of 32 random bytes>
//! active <id>
//! ```
//!
//! - `fingerprint`: exactly one; the HMAC-SHA256 key of fingerprints. It never changes (a new
//!   one would change every fingerprint).
//! - `key`: one or more AES-256-GCM data keys; an id is 8 lowercase hex characters, made at
//!   random when the key is made, and unique in the file.
//! - `active`: exactly one; the id of the key that seals new values. The others only open
//!   values sealed before the last rotation.
//!
//! Back the file up together with the database: without it no stored secret can be read, and
//! with a key file of another installation every value fails with an unknown key id.
//!
//! # Key rotation
//!
//! [`Keyring::add_key`] writes the file with a new active key, keeping the old ones; the
//! caller then re-seals every stored value in one transaction, and
//! [`Keyring::retire_inactive`] rewrites the file with only the active key. Every write is
//! atomic (a temporary 0600 file, synced, renamed, directory synced), so whenever the process
//! stops, the file on disk opens every value in the database.

mod keyfile;
mod keyring;
mod value;

pub use keyfile::KeyringError;
pub use keyring::{Keyring, SEALED_PREFIX, SealError};
pub use value::SecretValue;
