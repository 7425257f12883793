//! Conformance suite (being written).
pub mod pg;
