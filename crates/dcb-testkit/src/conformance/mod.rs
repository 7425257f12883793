//! The conformance cases. Each is a `pub async fn` taking the backend's [`StoreFactory`]; the
//! [`conformance_tests!`](crate::conformance_tests) macro wraps each in its own test.
//!
//! Cases panic with a message naming what was expected; they never leave a task running once
//! they return.

use crate::StoreFactory;

mod append;
mod batch;
mod cancellation;
mod commands;
mod concurrency;
mod condition;
mod multi_value;
mod projection;
mod query;
mod roundtrip;
mod support;
mod validation;

pub use append::*;
pub use batch::*;
pub use cancellation::*;
pub use commands::*;
pub use concurrency::*;
pub use condition::*;
pub use multi_value::*;
pub use projection::*;
pub use query::*;
pub use roundtrip::*;
pub use validation::*;

/// A factory reference as the cases take it.
pub type Factory<'a> = &'a dyn StoreFactory;
