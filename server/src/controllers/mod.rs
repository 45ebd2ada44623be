//! Reconcile loops: each one a pure plan function plus a thin loop that re-reads the store.

pub mod rollout;
pub mod runtime;
pub mod scheduler;

#[cfg(test)]
pub(crate) mod fixtures;
pub mod waves;
