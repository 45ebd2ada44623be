//! Host agent.
