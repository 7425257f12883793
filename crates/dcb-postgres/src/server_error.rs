//! The structured fields of an error the server reported, kept as the source of
//! [`dcb_core::Error::Storage`] so that the store (and callers) can decide by SQLSTATE, table
//! and constraint instead of by the message, which follows the server's `lc_messages`.
use std::fmt;
use std::sync::Arc;
use tokio_postgres::error::DbError;

/// An error reported by the PostgreSQL server, as the `source` of
/// [`dcb_core::Error::Storage`]: its SQLSTATE and the schema, table and constraint the server
/// named. Cheap to clone (the calls of a group commit share one), and displayed exactly as the
/// `tokio_postgres` error it wraps.
///
/// ```
/// # fn demo(error: &dcb_core::Error) {
/// if let dcb_core::Error::Storage { source: Some(source), .. } = error {
///     if let Some(server) = source.downcast_ref::<dcb_postgres::ServerError>() {
///         println!("SQLSTATE {} on {:?}", server.code(), server.table());
///     }
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ServerError {
    code: String,
    schema: Option<String>,
    table: Option<String>,
    constraint: Option<String>,
    error: Option<Arc<tokio_postgres::Error>>,
}

impl ServerError {
    /// The server's fields of `error`, or `error` back when the server did not report it (a
    /// lost connection, a decoding failure).
    pub(crate) fn from_postgres(
        error: tokio_postgres::Error,
    ) -> Result<Self, tokio_postgres::Error> {
        let Some(db) = error.as_db_error() else {
            return Err(error);
        };
        Ok(Self {
            code: db.code().code().to_string(),
            schema: db.schema().map(str::to_string),
            table: db.table().map(str::to_string),
            constraint: db.constraint().map(str::to_string),
            error: Some(Arc::new(error)),
        })
    }

    /// An error with these fields and no server message (tests of the classification).
    #[cfg(test)]
    pub(crate) fn from_fields(
        code: &str,
        schema: Option<&str>,
        table: Option<&str>,
        constraint: Option<&str>,
    ) -> Self {
        Self {
            code: code.to_string(),
            schema: schema.map(str::to_string),
            table: table.map(str::to_string),
            constraint: constraint.map(str::to_string),
            error: None,
        }
    }

    /// The SQLSTATE, five characters (`23514` for a check violation).
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The schema of the table the error is about, when the server named one.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The table the error is about, when the server named one.
    pub fn table(&self) -> Option<&str> {
        self.table.as_deref()
    }

    /// The constraint the error is about, when the server named one (a violated CHECK or
    /// unique constraint does; a row that no partition accepts does not).
    pub fn constraint(&self) -> Option<&str> {
        self.constraint.as_deref()
    }

    /// The server's full report (message, detail, hint, position, ...).
    pub fn db_error(&self) -> Option<&DbError> {
        self.error.as_deref().and_then(|e| e.as_db_error())
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error {
            Some(error) => fmt::Display::fmt(error, f),
            None => write!(f, "server error (SQLSTATE {})", self.code),
        }
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.as_deref().and_then(std::error::Error::source)
    }
}
