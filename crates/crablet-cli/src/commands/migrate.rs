//! `crablet migrate`.
use crate::connect::Target;
use crate::error::{CliError, CliResult};

/// Applies the missing migrations (the store's own `migrate`, serialized across processes by
/// an advisory lock) and prints the schema's version.
pub async fn run(target: &Target) -> CliResult {
    let store = target
        .connect_with(target.config().auto_migrate(true))
        .await?;
    let version = store.schema_version().await?.ok_or_else(|| {
        CliError::Other(format!(
            "schema {:?} has no crablet tables after migrating",
            target.schema
        ))
    })?;
    println!(
        "schema {:?} is at version {version} (this crablet's version: {})",
        target.schema,
        dcb_postgres::SCHEMA_VERSION
    );
    Ok(())
}
