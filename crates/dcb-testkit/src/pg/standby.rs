//! A real streaming hot standby of a [`LocalCluster`], made with `pg_basebackup -R -S <slot>`
//! from the local server binaries, for tests of reads on replicas.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::cleanup::{self, Action};
use super::local::{create_root_dir, free_port, output_tail, pg_ctl_start, run, RunAs};
use super::{LocalCluster, ProvisionError};

/// A hot standby streaming from a [`LocalCluster`] through its own physical replication slot,
/// listening on `127.0.0.1` on a free port (superuser `postgres`, trust authentication, like
/// the primary), with `hot_standby_feedback = on`.
///
/// [`kill`](Self::kill) and [`restart`](Self::restart) are for fault tests; the server is
/// stopped and its directory removed by `Drop` (or at process exit, like a cluster).
///
/// The primary needs nothing special: `initdb`'s defaults (`wal_level = replica`,
/// `max_wal_senders = 10`, `max_replication_slots = 10`, trust for `replication` from
/// 127.0.0.1 in `pg_hba.conf`) already allow streaming replication.
#[derive(Debug)]
pub struct LocalStandby {
    root: PathBuf,
    data_dir: PathBuf,
    port: u16,
    url: String,
    slot: String,
    bin_dir: PathBuf,
    run_as: RunAs,
    cleanup_id: Option<u64>,
    primary_port: u16,
}

static NEXT_SLOT: AtomicU32 = AtomicU32::new(1);

impl LocalStandby {
    /// Takes a base backup of `primary` (creating the replication slot it streams from) and
    /// starts it as a hot standby; returns once it accepts connections.
    ///
    /// Blocks for a few seconds; call it from `tokio::task::spawn_blocking` in async code.
    pub fn start(primary: &LocalCluster) -> Result<Self, ProvisionError> {
        let err = ProvisionError::LocalCluster;
        let run_as = primary.run_as().clone();
        let base = match run_as {
            RunAs::User { .. } => PathBuf::from("/tmp"),
            RunAs::CurrentUser => std::env::temp_dir(),
        };
        let root = create_root_dir(&base).map_err(err)?;
        let data_dir = root.join("data");
        let slot = format!(
            "crablet_standby_{}_{}",
            std::process::id(),
            NEXT_SLOT.fetch_add(1, Ordering::Relaxed)
        );
        let mut standby = LocalStandby {
            cleanup_id: Some(cleanup::register(Action::StopCluster {
                data_dir: data_dir.clone(),
                root: root.clone(),
            })),
            root,
            data_dir,
            port: 0,
            url: String::new(),
            slot,
            bin_dir: primary.bin_dir().to_path_buf(),
            run_as,
            primary_port: primary.port(),
        };
        standby.base_backup(primary).map_err(err)?;
        standby.first_start().map_err(err)?;
        Ok(standby)
    }

    fn base_backup(&self, primary: &LocalCluster) -> Result<(), String> {
        let socket_dir = self.root.join("sock");
        std::fs::create_dir(&socket_dir)
            .map_err(|e| format!("could not create {}: {e}", socket_dir.display()))?;
        if let RunAs::User { uid, gid, .. } = &self.run_as {
            for dir in [&self.root, &socket_dir] {
                std::os::unix::fs::chown(dir, Some(*uid), Some(*gid))
                    .map_err(|e| format!("could not chown {}: {e}", dir.display()))?;
            }
        }
        let program = self.bin_dir.join("pg_basebackup");
        let port = primary.port().to_string();
        let out = run(
            &self.run_as,
            &self.root,
            &program,
            &[
                "-h".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.into(),
                "-U".into(),
                "postgres".into(),
                "-D".into(),
                self.data_dir.clone().into(),
                // Writes standby.signal and primary_conninfo (with the slot).
                "-R".into(),
                "-X".into(),
                "stream".into(),
                "-C".into(),
                "-S".into(),
                self.slot.clone().into(),
                "-c".into(),
                "fast".into(),
                "--no-sync".into(),
            ],
        )?;
        if !out.status.success() {
            return Err(format!(
                "`{} -D {}` from port {} failed ({}): {}",
                program.display(),
                self.data_dir.display(),
                primary.port(),
                out.status,
                output_tail(&out)
            ));
        }
        Ok(())
    }

    fn first_start(&mut self) -> Result<(), String> {
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            self.write_settings(port)?;
            match self.pg_ctl_start() {
                Ok(()) => {
                    self.port = port;
                    self.url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                    return Ok(());
                }
                Err(e) => last_error = e,
            }
            cleanup::stop_postmaster(&self.data_dir)?;
        }
        Err(last_error)
    }

    /// Later lines of `postgresql.conf` win over the ones copied from the primary.
    fn write_settings(&self, port: u16) -> Result<(), String> {
        let conf = self.data_dir.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(|e| format!("could not open {}: {e}", conf.display()))?;
        let socket_dir = self
            .root
            .join("sock")
            .display()
            .to_string()
            .replace('\'', "''");
        writeln!(
            file,
            "\n# crablet testkit standby\nport = {port}\nunix_socket_directories = '{socket_dir}'\n\
             hot_standby = on\nhot_standby_feedback = on\nwal_receiver_status_interval = 1s\n\
             wal_retrieve_retry_interval = 200ms\n"
        )
        .map_err(|e| format!("could not write {}: {e}", conf.display()))
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        pg_ctl_start(&self.run_as, &self.root, &self.bin_dir, &self.data_dir)
            .map_err(|error| format!("the standby: {error}"))
    }

    /// Connection URL of the standby's `postgres` database as superuser `postgres`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// TCP port the standby listens on (on 127.0.0.1); kept across [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The standby's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The name of the primary's replication slot this standby streams from.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// Kills the standby (immediate shutdown: SIGQUIT to the postmaster, as in a crash) and
    /// waits until it is gone. Its data directory stays; [`restart`](Self::restart) brings it
    /// back on the same port. Blocking.
    pub fn kill(&self) -> Result<(), ProvisionError> {
        cleanup::stop_postmaster(&self.data_dir).map_err(ProvisionError::LocalCluster)
    }

    /// Starts a killed standby again on the same port; it recovers and resumes streaming from
    /// its slot. Blocking (returns once it accepts connections).
    pub fn restart(&self) -> Result<(), ProvisionError> {
        self.pg_ctl_start().map_err(ProvisionError::LocalCluster)
    }
}

impl LocalStandby {
    /// Drops the standby's slot on the primary (once the standby is stopped and the slot
    /// inactive). A slot left behind keeps the primary's WAL and, with the standby's
    /// `hot_standby_feedback`, holds the primary's vacuum horizon back forever.
    fn drop_slot(&self) {
        let psql = self.bin_dir.join("psql");
        let sql = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = '{}' AND NOT active",
            self.slot
        );
        for _ in 0..50 {
            let out = std::process::Command::new(&psql)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-Atqc",
                ])
                .arg(&sql)
                .arg("-p")
                .arg(self.primary_port.to_string())
                .stdin(std::process::Stdio::null())
                .output();
            let Ok(out) = out else { return };
            if !out.status.success() {
                // The primary is gone (process exit): nothing to drop.
                return;
            }
            let check = std::process::Command::new(&psql)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-Atqc",
                ])
                .arg(format!(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
                    self.slot
                ))
                .arg("-p")
                .arg(self.primary_port.to_string())
                .stdin(std::process::Stdio::null())
                .output();
            match check {
                Ok(out) if String::from_utf8_lossy(&out.stdout).trim() == "0" => return,
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                Err(_) => return,
            }
        }
        eprintln!(
            "dcb-testkit: the replication slot {} of a dropped standby is still active",
            self.slot
        );
    }
}

impl Drop for LocalStandby {
    fn drop(&mut self) {
        if let Some(action) = self.cleanup_id.take().and_then(cleanup::unregister) {
            if let Err(e) = cleanup::run(&action) {
                eprintln!("dcb-testkit: could not stop the local standby: {e}");
            }
            self.drop_slot();
        }
    }
}
