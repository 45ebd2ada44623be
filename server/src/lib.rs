//! openClusterClaw control plane: resource model, store, REST API, agent RPC, controllers, CLI.

pub mod model;
pub mod store;
