//! Reconcile loops: each one a pure plan function plus a thin loop that re-reads the store.

pub mod drain;
pub mod hosts;
pub mod rollout;
pub mod runtime;
pub mod scheduler;
pub mod volumes;

#[cfg(test)]
pub(crate) mod fixtures;
pub mod waves;
