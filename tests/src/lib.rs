//! Test support.

pub mod agent;
pub mod browser;
pub mod cli_stream;
pub mod console_http;
pub mod fleet;
pub mod ha;
pub mod oidc_provider;
pub mod podman;
pub mod postgres;
pub mod proxy;
pub mod server;
pub mod simfleet;
pub mod standin;

pub use standin::{docker_available, ensure_standin_image, ensure_standin_versions};
