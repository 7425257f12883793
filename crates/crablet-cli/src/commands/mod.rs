//! One module per command.
pub mod events;
pub mod handlers;
pub mod import;
pub mod migrate;
pub mod partition;
pub mod status;
