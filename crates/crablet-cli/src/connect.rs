//! Connecting to the store, with errors an operator can act on.
use crate::error::{CliError, CliResult};
use dcb_postgres::{PostgresEventStore, ReadFrom, ReplicaConfig, StoreConfig};
use std::time::Duration;

/// How long connecting (and, for `migrate`, migrating) may take before crablet gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// The connection URL (or `key=value` string).
    pub url: Option<String>,
    /// The schema.
    pub schema: String,
    /// Hot standbys of the database (`--standby`, repeatable).
    pub standbys: Vec<String>,
    /// Where the read commands (`events`, `export`) read (`--read-from`).
    pub read_from: ReadFrom,
}

impl Target {
    /// The store's configuration for this command line.
    pub fn config(&self) -> StoreConfig {
        StoreConfig::default()
            .schema(self.schema.clone())
            .pool_size(4)
    }

    /// Connects with `config` (from [`config`](Self::config)), checking the schema version.
    pub async fn connect_with(&self, config: StoreConfig) -> CliResult<PostgresEventStore> {
        self.connect_routed(config, None).await
    }

    /// Connects for a read command: with `--read-from standby`, to the primary and the
    /// `--standby` URLs, reading on a standby (on the primary when none can serve, the
    /// library's default fallback); otherwise as [`connect`](Self::connect).
    pub async fn connect_reader(&self) -> CliResult<PostgresEventStore> {
        match self.read_from {
            ReadFrom::Primary => self.connect().await,
            ReadFrom::Standby => {
                if self.standbys.is_empty() {
                    return Err(CliError::Usage(
                        "--read-from standby needs at least one --standby URL".into(),
                    ));
                }
                let replicas = ReplicaConfig::new(self.standbys.iter().cloned())
                    .default_read(ReadFrom::Standby);
                self.connect_routed(self.config(), Some(replicas)).await
            }
        }
    }

    async fn connect_routed(
        &self,
        config: StoreConfig,
        replicas: Option<ReplicaConfig>,
    ) -> CliResult<PostgresEventStore> {
        let url = self
            .url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .ok_or(CliError::NoDatabase)?;
        let shown = redact(url);
        let connect = async {
            match replicas {
                None => PostgresEventStore::connect(url, config).await,
                Some(replicas) => {
                    PostgresEventStore::connect_with_standbys(url, config, replicas).await
                }
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Err(_) => Err(CliError::Connect {
                url: shown,
                reason: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            }),
            Ok(Ok(store)) => Ok(store),
            Ok(Err(err)) => Err(self.connect_error(err, shown)),
        }
    }

    /// Connects, checking the schema version.
    pub async fn connect(&self) -> CliResult<PostgresEventStore> {
        self.connect_with(self.config()).await
    }

    fn connect_error(&self, err: dcb_core::Error, url: String) -> CliError {
        match err {
            dcb_core::Error::Storage { .. } => CliError::Connect {
                url,
                reason: causes(&err),
            },
            dcb_core::Error::Timeout { .. } => CliError::Connect {
                url,
                reason: err.to_string(),
            },
            dcb_core::Error::Schema { message } if message.starts_with("no crablet schema") => {
                CliError::MissingSchema {
                    schema: self.schema.clone(),
                }
            }
            dcb_core::Error::Schema { message } => CliError::Other(format!(
                "schema {:?}: {message} (`crablet --schema {} migrate` upgrades it)",
                self.schema, self.schema
            )),
            dcb_core::Error::Config {
                field: "url",
                reason,
            } => CliError::Usage(format!("--database-url: {reason}")),
            dcb_core::Error::Config {
                field: "schema",
                reason,
            } => CliError::Usage(format!("--schema: {reason}")),
            dcb_core::Error::Config {
                field: "standby_urls",
                reason,
            } => CliError::Usage(format!("--standby: {reason}")),
            other => CliError::Store(other),
        }
    }
}

/// The error's message and those of its sources, each once, without the pool's wrapping.
fn causes(err: &dcb_core::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&dyn std::error::Error> = match err {
        dcb_core::Error::Storage {
            message, source, ..
        } => {
            parts.push(message.clone());
            source.as_deref().map(|s| s as &dyn std::error::Error)
        }
        other => Some(other),
    };
    while let Some(e) = current {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts
        .join(": ")
        .replace("could not get a connection from the pool: ", "")
        .replace("Error occurred while creating a new object: ", "")
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // A key=value string: hide a password=... pair.
        return url
            .split_whitespace()
            .map(|pair| {
                if pair.starts_with("password=") {
                    "password=***"
                } else {
                    pair
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!(
                    "{}{user}:***{}",
                    &url[..scheme_end + 3],
                    &url[scheme_end + 3 + at..]
                ),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("host=h password=secret user=u"),
            "host=h password=*** user=u"
        );
    }
}
