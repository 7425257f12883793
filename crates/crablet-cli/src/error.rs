//! The command line's errors: each one is printed as ONE line, `error: ...`, on stderr.

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input on the command line (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// Neither `--database-url` nor `DATABASE_URL`.
    #[error("no database given: pass --database-url URL or set DATABASE_URL")]
    NoDatabase,
    /// The database did not answer.
    #[error("cannot connect to the database at {url}: {reason}")]
    Connect {
        /// The URL, without its password.
        url: String,
        /// Why.
        reason: String,
    },
    /// The schema has no crablet tables.
    #[error("no crablet schema {schema:?} in this database: run `crablet --schema {schema} migrate` to create it")]
    MissingSchema {
        /// The schema's name.
        schema: String,
    },
    /// A store operation failed.
    #[error("{0}")]
    Store(#[from] dcb_core::Error),
    /// An operator query failed.
    #[error("{0}")]
    Admin(#[from] dcb_postgres::AdminError),
    /// A partition operation failed.
    #[error("{0}")]
    Partition(#[from] dcb_postgres::PartitionError),
    /// A parked-event operation failed.
    #[error("{0}")]
    Parked(#[from] dcb_postgres::ParkedError),
    /// Reading or writing a file failed.
    #[error("{what}: {source}")]
    File {
        /// Which file, and what was done to it.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing to standard output failed (a closed pipe ends the command quietly).
    #[error("writing the output failed: {0}")]
    Output(#[source] std::io::Error),
    /// A bad line in an import file.
    #[error("{file} line {line}: {message}")]
    ImportLine {
        /// The file.
        file: String,
        /// Its 1-based line number.
        line: u64,
        /// What is wrong and what was (not) written.
        message: String,
    },
    /// Anything else, already worded.
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// The process exit code: 2 for bad usage, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::NoDatabase => 2,
            _ => 1,
        }
    }

    /// True when the output was closed by its reader (`crablet events | head`).
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// The message on one line (line breaks of wrapped errors turned into spaces).
    pub fn one_line(&self) -> String {
        self.to_string().replace(['\r', '\n'], " ")
    }
}

impl From<std::io::Error> for CliError {
    fn from(err: std::io::Error) -> Self {
        CliError::Output(err)
    }
}

/// The command's result.
pub type CliResult<T = ()> = Result<T, CliError>;
