//! openClusterClaw control plane: resource model, store, REST API, agent RPC, controllers, CLI.

pub mod accept;
pub mod agent_rpc;
pub mod api;
pub mod audit;
pub mod auth;
pub mod batch;
pub mod cli;
pub mod config;
pub mod configcenter;
pub mod controllers;
pub mod crypto;
pub mod events;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod openclaw;
pub mod pki;
pub mod ratelimit;
pub mod secrets;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod ui;
pub mod util;
pub mod yaml;
