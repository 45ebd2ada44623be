//! Test support.

pub mod agent;
pub mod fleet;
pub mod server;
pub mod standin;

pub use standin::{docker_available, ensure_standin_image, ensure_standin_versions};
