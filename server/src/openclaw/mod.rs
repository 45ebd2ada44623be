//! The openclaw.json library: layers merged by JSON merge patch, JSON5 input, schema
//! validation, secret references and diffs. Pure functions; the only I/O is reading a schema
//! file.

pub mod diff;
#[cfg(test)]
mod fixtures;
pub mod json5;
pub mod layers;
pub mod merge;
pub mod path;
pub mod schema;
pub mod secretref;

pub use diff::{Change, key_diff, unified};
pub use json5::Json5Error;
pub use layers::{Layer, LayerKind, Origin, explain, explain_text, render};
pub use merge::{NotRepresentable, diff_patch, merge_patch};
pub use schema::{Schema, SchemaError, SchemaProblem};
pub use secretref::{RefProblem, SecretRef, find_refs, substitute, with_placeholders};
