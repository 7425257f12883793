//! PostgreSQL in a Docker container, through `testcontainers`.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use testcontainers::core::wait::LogWaitStrategy;
use testcontainers::core::{IntoContainerPort as _, WaitFor};
use testcontainers::runners::AsyncRunner as _;
use testcontainers::{ContainerAsync, GenericImage, ImageExt as _};

use super::cleanup::{self, Action};
use super::ProvisionError;

/// Image started when no other PostgreSQL is available.
pub(crate) const IMAGE: (&str, &str) = ("postgres", "16");

/// The container of this process. Kept here so that `testcontainers` never
/// drops (and removes) it; the `atexit` handler removes it instead.
static CONTAINER: OnceLock<ContainerAsync<GenericImage>> = OnceLock::new();

/// Whether `docker info` succeeds within 15 s (a client without a running
/// engine fails).
pub(crate) fn docker_available() -> bool {
    let Ok(mut child) = Command::new("docker")
        .arg("info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Starts `postgres:16` with trust authentication and returns its URL.
pub(crate) async fn start_container() -> Result<String, ProvisionError> {
    let err = |e: testcontainers::TestcontainersError| ProvisionError::Docker(e.to_string());
    let container = GenericImage::new(IMAGE.0, IMAGE.1)
        .with_exposed_port(5432.tcp())
        // The image's entrypoint runs a temporary server during
        // initialisation, then the real one: wait for the second "ready".
        .with_wait_for(WaitFor::log(
            LogWaitStrategy::stderr("database system is ready to accept connections").with_times(2),
        ))
        .with_env_var("POSTGRES_USER", "postgres")
        .with_env_var("POSTGRES_DB", "postgres")
        .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
        .with_cmd([
            "postgres",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ])
        .with_label("crablet.testkit", "1")
        .with_startup_timeout(Duration::from_secs(180))
        .start()
        .await
        .map_err(err)?;
    cleanup::register(Action::RemoveContainer {
        id: container.id().to_owned(),
    });
    let host = container.get_host().await.map_err(err)?;
    let port = container.get_host_port_ipv4(5432).await.map_err(err)?;
    let host = match host.to_string().as_str() {
        "localhost" => "127.0.0.1".to_owned(),
        other => other.to_owned(),
    };
    // Only one provisioning runs per process (see `test_database`), so the
    // cell is empty here.
    CONTAINER.set(container).map_err(|_| {
        ProvisionError::Docker("a test container was already started by this process".into())
    })?;
    Ok(format!("postgres://postgres@{host}:{port}/postgres"))
}
