//! Host agent: runs the replicas assigned to this host in Docker or Podman and reports on them.
//!
//! [`daemon::run`] is the whole agent; [`config`] loads its settings and [`crypto`] installs
//! the TLS provider at start-up. [`enroll`] and [`client`] join the cluster and talk to it,
//! [`control`] is the control plane as the host loops in [`sync`] see it, [`runtime`] talks to
//! the container engine, [`reconcile`] decides and executes what to change, [`drift`] measures
//! whether containers still have what their assignments say, [`events`] queues what the agent
//! did on its own for the next report, [`probe`] checks the Gateways' health, [`metrics`]
//! samples host figures and [`state`] keeps the last known assignments on disk. [`rlimit`]
//! raises the open-files limit at start (the server uses it too).

pub mod client;
pub mod config;
pub mod control;
pub mod crypto;
pub mod daemon;
pub mod drift;
pub mod engine;
pub mod enroll;
pub mod events;
pub mod fencing;
pub mod gateway;
pub mod heartbeat;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod ports;
pub mod probe;
pub mod reconcile;
pub mod rlimit;
pub mod runtime;
pub mod snapshot;
pub mod state;
pub mod sync;
pub mod tasks;
pub mod transfer;
pub mod volumes;
