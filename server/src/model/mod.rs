//! Resource types of the `clusterclaw.io/v1` API and their validation (pure, no I/O).

mod compact;
mod config;
mod drain;
mod failover;
mod names;
mod quantity;
mod resources;
mod rollout;
mod sorted_map;
mod status;
mod validate;
mod waves;

pub use config::*;
pub use drain::*;
pub use failover::*;
pub use names::{validate_dns_label, validate_label_key, validate_label_value};
pub use quantity::{format_cpu, format_memory, parse_cpu, parse_memory};
pub use resources::*;
pub use rollout::*;
pub use sorted_map::SortedMap;
pub use status::{summarize, summarize_at, unix_millis};
pub use validate::{
    FieldProblem, MAX_ENV_VALUE_BYTES, MAX_HOSTNAME_BYTES, MAX_LABELS, MAX_OBJECT_BYTES,
    MAX_REPLICAS, decode_typed, serde_problem, validate_object, validate_version,
};
pub use waves::*;
