//! `SecretValue`: a plaintext secret that never prints and is wiped from memory when dropped.

use std::fmt;
use std::sync::atomic::{Ordering, compiler_fence};

/// The plaintext of one secret value (an API key, a gateway token).
///
/// `Debug` and `Display` print `***`, never the value; [`SecretValue::expose`] is the one way
/// to read it. When dropped, every byte of its buffer (its whole capacity) is overwritten with
/// zeros, so the value does not linger in freed memory.
#[derive(Clone, Default)]
pub struct SecretValue {
    value: String,
}

impl SecretValue {
    /// Wraps a plaintext. The `String`'s buffer is kept as it is (no copy is made).
    pub fn new(value: String) -> Self {
        SecretValue { value }
    }

    /// The plaintext; call only where it is handed on (a container's environment, a config
    /// file written for the agent, sealing).
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Length of the plaintext in bytes.
    pub fn len(&self) -> usize {
        self.value.len()
    }

    /// Whether the plaintext is empty.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        wipe_vec(std::mem::take(&mut self.value).into_bytes());
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Overwrites the whole allocation of `bytes` (not only its length) with zeros, then frees it.
pub(super) fn wipe_vec(mut bytes: Vec<u8>) {
    zero_capacity(&mut bytes);
}

/// Overwrites the whole allocation of `bytes` with zeros, leaving it `capacity()` zeros long.
/// The zeros are passed through `black_box` so the compiler cannot drop the writes as dead
/// stores before a free.
fn zero_capacity(bytes: &mut Vec<u8>) {
    let capacity = bytes.capacity();
    bytes.clear();
    bytes.resize(capacity, 0);
    std::hint::black_box(bytes.as_slice());
    compiler_fence(Ordering::SeqCst);
}

/// Overwrites a fixed buffer with zeros, in a way the compiler keeps.
pub(super) fn wipe_array<const N: usize>(bytes: &mut [u8; N]) {
    bytes.fill(0);
    std::hint::black_box(bytes.as_slice());
    compiler_fence(Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let v = SecretValue::new("sk-ant-very-secret".into());
        assert_eq!(format!("{v:?}"), "***");
        assert_eq!(format!("{v}"), "***");
        assert_eq!(format!("{:?}", Some(&v)), "Some(***)");
        assert_eq!(v.expose(), "sk-ant-very-secret");
        assert_eq!(v.len(), 18);
        assert!(!v.is_empty());
        assert!(SecretValue::new(String::new()).is_empty());
    }

    #[test]
    fn clone_is_independent() {
        let a = SecretValue::new("abc".into());
        let b = a.clone();
        drop(a);
        assert_eq!(b.expose(), "abc");
    }

    #[test]
    fn wipe_zeroes_the_whole_capacity() {
        // Spare capacity holding stale secret bytes, as after `truncate`.
        let mut v = b"secret-secret-secret".to_vec();
        v.truncate(3);
        let capacity = v.capacity();
        zero_capacity(&mut v);
        assert_eq!(v.len(), capacity);
        assert!(capacity >= 20);
        assert!(v.iter().all(|&b| b == 0));

        let mut a = [7u8; 32];
        wipe_array(&mut a);
        assert_eq!(a, [0u8; 32]);
    }
}
