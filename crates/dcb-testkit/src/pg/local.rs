//! A disposable PostgreSQL cluster started from the server binaries installed
//! on this machine (`initdb` + `pg_ctl`).

use std::ffi::{OsStr, OsString};
use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::cleanup::{self, Action};
use super::ProvisionError;

/// Prefix of the temporary directories that hold disposable clusters.
const DIR_PREFIX: &str = "crablet-pg-";
/// Name of the system user created to run PostgreSQL when the tests run as
/// root and no `postgres` user exists.
const FALLBACK_USER: &str = "crablet-pg";

/// A throw-away PostgreSQL cluster in a temporary directory, listening on
/// `127.0.0.1` on a free port, superuser `postgres`, trust authentication,
/// `fsync=off`.
///
/// The server is stopped and its directory removed by [`LocalCluster::stop`],
/// by `Drop`, or, for a cluster that is never dropped (for example one held
/// in a `static`), by an `atexit(3)` handler when the process exits.
#[derive(Debug)]
pub struct LocalCluster {
    root: PathBuf,
    data_dir: PathBuf,
    port: u16,
    url: String,
    cleanup_id: Option<u64>,
    bin_dir: PathBuf,
    run_as: RunAs,
}

/// Who runs `initdb`, `pg_ctl` and the server.
#[derive(Debug, Clone)]
pub(super) enum RunAs {
    /// The current (non-root) user.
    CurrentUser,
    /// Another user, because PostgreSQL refuses to run as root.
    User { name: String, uid: u32, gid: u32 },
}

impl LocalCluster {
    /// Finds the PostgreSQL server binaries: a directory holding both `initdb`
    /// and `pg_ctl`, looked up on `PATH`, then under `/usr/lib/postgresql/*/bin`
    /// (highest version first), `/usr/pgsql-*/bin`, `/usr/local/pgsql/bin`,
    /// `/opt/homebrew/bin` and `/usr/local/bin`.
    pub fn find_bin_dir() -> Option<PathBuf> {
        candidate_bin_dirs()
            .into_iter()
            .find(|dir| is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl")))
    }

    /// Like [`LocalCluster::find_bin_dir`], for a directory that also holds `pg_basebackup`
    /// (needed by [`LocalStandby`](super::LocalStandby)); `PATH` may hold `initdb` and
    /// `pg_ctl` without it.
    pub fn find_replication_bin_dir() -> Option<PathBuf> {
        candidate_bin_dirs().into_iter().find(|dir| {
            ["initdb", "pg_ctl", "pg_basebackup"]
                .iter()
                .all(|name| is_executable(&dir.join(name)))
        })
    }

    /// Starts a new cluster with the binaries found by [`LocalCluster::find_bin_dir`].
    ///
    /// This blocks for a few seconds (`initdb` and server start); call it
    /// from `tokio::task::spawn_blocking` in async code.
    pub fn start() -> Result<Self, ProvisionError> {
        let bin_dir = Self::find_bin_dir().ok_or_else(|| {
            ProvisionError::LocalCluster(format!(
                "no directory with both `initdb` and `pg_ctl` found (looked on PATH and in {})",
                FIXED_DIRS_HINT
            ))
        })?;
        Self::start_with(&bin_dir)
    }

    /// Starts a new cluster with the `initdb` and `pg_ctl` in `bin_dir`.
    ///
    /// Blocking, like [`LocalCluster::start`].
    pub fn start_with(bin_dir: &Path) -> Result<Self, ProvisionError> {
        let err = |msg: String| ProvisionError::LocalCluster(msg);
        let run_as = decide_run_as().map_err(err)?;
        sweep_stale_dirs();

        let base = match run_as {
            // The server user must be able to reach the directory: do not
            // use a TMPDIR that may live under root's home.
            RunAs::User { .. } => PathBuf::from("/tmp"),
            RunAs::CurrentUser => std::env::temp_dir(),
        };
        let root = create_root_dir(&base).map_err(err)?;
        let data_dir = root.join("data");
        let mut cluster = LocalCluster {
            cleanup_id: Some(cleanup::register(Action::StopCluster {
                data_dir: data_dir.clone(),
                root: root.clone(),
            })),
            root,
            data_dir,
            port: 0,
            url: String::new(),
            bin_dir: bin_dir.to_path_buf(),
            run_as: run_as.clone(),
        };
        // On any error below, `cluster` is dropped, which stops whatever
        // was started and removes the directory.
        cluster.init_and_start(bin_dir, &run_as).map_err(err)?;
        Ok(cluster)
    }

    fn init_and_start(&mut self, bin_dir: &Path, run_as: &RunAs) -> Result<(), String> {
        let socket_dir = self.root.join("sock");
        std::fs::create_dir(&socket_dir)
            .map_err(|e| format!("could not create {}: {e}", socket_dir.display()))?;
        if let RunAs::User { uid, gid, .. } = run_as {
            for dir in [&self.root, &socket_dir] {
                std::os::unix::fs::chown(dir, Some(*uid), Some(*gid))
                    .map_err(|e| format!("could not chown {}: {e}", dir.display()))?;
            }
        }

        let initdb = bin_dir.join("initdb");
        let out = run(
            run_as,
            &self.root,
            &initdb,
            &[
                OsStr::new("-D").into(),
                self.data_dir.clone().into(),
                "-U".into(),
                "postgres".into(),
                "--auth=trust".into(),
                "--encoding=UTF8".into(),
                "--locale=C".into(),
                "--no-sync".into(),
            ],
        )?;
        if !out.status.success() {
            return Err(format!(
                "`{} -D {}` failed ({}): {}",
                initdb.display(),
                self.data_dir.display(),
                out.status,
                output_tail(&out)
            ));
        }

        let mut last_error = String::new();
        // A free port may be taken between choosing and binding it: retry.
        for _ in 0..3 {
            let port = free_port()?;
            self.write_settings(port, &socket_dir)?;
            match pg_ctl_start(run_as, &self.root, bin_dir, &self.data_dir) {
                Ok(()) => {
                    self.port = port;
                    self.url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                    return Ok(());
                }
                Err(error) => last_error = error,
            }
            // Make sure a half-started server is gone before retrying.
            cleanup::stop_postmaster(&self.data_dir)?;
        }
        Err(last_error)
    }

    /// Appends the settings of this cluster to `postgresql.conf` (later lines win).
    ///
    /// Written to the configuration file rather than passed as `pg_ctl -o "-c ..."`
    /// so that no path has to survive `pg_ctl`'s shell quoting.
    fn write_settings(&self, port: u16, socket_dir: &Path) -> Result<(), String> {
        let conf = self.data_dir.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(|e| format!("could not open {}: {e}", conf.display()))?;
        let socket_dir = socket_dir.display().to_string().replace('\'', "''");
        writeln!(
            file,
            "\n# crablet testkit\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{socket_dir}'\nfsync = off\n\
             synchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
        )
        .map_err(|e| format!("could not write {}: {e}", conf.display()))
    }

    /// Connection URL of the cluster's `postgres` database as superuser `postgres`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory of the server binaries this cluster was started with.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    pub(super) fn run_as(&self) -> &RunAs {
        &self.run_as
    }

    /// Stops the server (immediate shutdown) and removes its directory.
    /// Blocking (at most about 10 s).
    pub fn stop(mut self) -> Result<(), ProvisionError> {
        self.stop_inner().map_err(ProvisionError::LocalCluster)
    }

    fn stop_inner(&mut self) -> Result<(), String> {
        match self.cleanup_id.take().and_then(cleanup::unregister) {
            Some(action) => cleanup::run(&action),
            None => Ok(()),
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("dcb-testkit: could not stop the local PostgreSQL cluster: {e}");
        }
    }
}

const FIXED_DIRS_HINT: &str = "/usr/lib/postgresql/*/bin, /usr/pgsql-*/bin, \
                               /usr/local/pgsql/bin, /opt/homebrew/bin, /usr/local/bin";

fn candidate_bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    dirs.extend(versioned_dirs(Path::new("/usr/lib/postgresql"), "", "bin"));
    dirs.extend(versioned_dirs(Path::new("/usr"), "pgsql-", "bin"));
    for fixed in [
        "/usr/local/pgsql/bin",
        "/opt/homebrew/bin",
        "/usr/local/bin",
    ] {
        dirs.push(PathBuf::from(fixed));
    }
    dirs
}

/// `parent/<prefix><version>/<sub>` directories, highest version first.
fn versioned_dirs(parent: &Path, prefix: &str, sub: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u64>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name.strip_prefix(prefix)?;
            let key: Vec<u64> = version
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            Some((key, entry.path().join(sub)))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, dir)| dir).collect()
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub(super) fn decide_run_as() -> Result<RunAs, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(RunAs::CurrentUser);
    }
    for name in ["postgres", FALLBACK_USER] {
        if let Some((uid, gid)) = lookup_user(name) {
            return Ok(RunAs::User {
                name: name.to_owned(),
                uid,
                gid,
            });
        }
    }
    let useradd = find_on_path("useradd").ok_or_else(|| {
        "running as root, PostgreSQL refuses to run as root, no `postgres` user exists \
         and `useradd` is not available to create one"
            .to_owned()
    })?;
    let out = Command::new(useradd)
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            FALLBACK_USER,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run useradd: {e}"))?;
    // Another process may have created it concurrently: look it up either way.
    match lookup_user(FALLBACK_USER) {
        Some((uid, gid)) => Ok(RunAs::User {
            name: FALLBACK_USER.to_owned(),
            uid,
            gid,
        }),
        None => Err(format!(
            "running as root and could not create the user {FALLBACK_USER} to run \
             PostgreSQL: {}",
            output_tail(&out)
        )),
    }
}

/// `(uid, gid)` of a system user, via `getpwnam_r`.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let c_name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero `passwd` is a valid value to be filled in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live, correctly sized memory.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

/// `pg_ctl start` of the cluster in `data_dir`, logging to `root/server.log`, waiting up to
/// 60 s; on failure, what pg_ctl said and the end of the server log.
pub(super) fn pg_ctl_start(
    run_as: &RunAs,
    root: &Path,
    bin_dir: &Path,
    data_dir: &Path,
) -> Result<(), String> {
    let log_file = root.join("server.log");
    let out = run(
        run_as,
        root,
        &bin_dir.join("pg_ctl"),
        &[
            "-D".into(),
            data_dir.into(),
            "-l".into(),
            log_file.clone().into(),
            "-w".into(),
            "-t".into(),
            "60".into(),
            "start".into(),
        ],
    )?;
    if out.status.success() {
        return Ok(());
    }
    let log = std::fs::read_to_string(&log_file).unwrap_or_default();
    Err(format!(
        "`pg_ctl start` failed ({}): {}\nserver log:\n{}",
        out.status,
        output_tail(&out),
        tail(&log, 2000)
    ))
}

/// Runs `program args` as `run_as`, in `cwd` (a directory the user can read:
/// the test's own working directory may not be), capturing its output.
pub(super) fn run(
    run_as: &RunAs,
    cwd: &Path,
    program: &Path,
    args: &[OsString],
) -> Result<Output, String> {
    let mut command = match run_as {
        RunAs::CurrentUser => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
        RunAs::User { name, .. } => {
            if let Some(runuser) = find_on_path("runuser") {
                let mut c = Command::new(runuser);
                c.arg("-u").arg(name).arg("--").arg(program).args(args);
                c
            } else {
                let su = find_on_path("su").ok_or_else(|| {
                    format!(
                        "running as root: neither `runuser` nor `su` is available to run \
                         {} as {name}",
                        program.display()
                    )
                })?;
                let mut line = shell_quote(program.as_os_str());
                for arg in args {
                    line.push(' ');
                    line.push_str(&shell_quote(arg));
                }
                let mut c = Command::new(su);
                c.args(["-s", "/bin/sh"]).arg(name).arg("-c").arg(line);
                c
            }
        }
    };
    command
        .current_dir(cwd)
        .stdin(Stdio::null())
        .env("LC_ALL", "C")
        .env_remove("PGDATA")
        .env_remove("PGPORT")
        .output()
        .map_err(|e| format!("could not run {}: {e}", program.display()))
}

fn shell_quote(arg: &OsStr) -> String {
    format!("'{}'", arg.to_string_lossy().replace('\'', r"'\''"))
}

pub(super) fn create_root_dir(base: &Path) -> Result<PathBuf, String> {
    let pid = std::process::id();
    for _ in 0..16 {
        let root = base.join(format!("{DIR_PREFIX}{pid}-{:08x}", rand::random::<u32>()));
        match std::fs::create_dir(&root) {
            Ok(()) => {
                std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| format!("could not chmod {}: {e}", root.display()))?;
                std::fs::write(root.join("owner.pid"), pid.to_string())
                    .map_err(|e| format!("could not write in {}: {e}", root.display()))?;
                return Ok(root);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("could not create {}: {e}", root.display())),
        }
    }
    Err(format!(
        "could not create a fresh directory in {}",
        base.display()
    ))
}

/// Removes clusters left behind by test processes that died without running
/// their `atexit` handler (killed by a signal): the directory's `owner.pid`
/// names a process that no longer exists. Best effort.
pub(super) fn sweep_stale_dirs() {
    let mut bases = vec![PathBuf::from("/tmp"), std::env::temp_dir()];
    bases.dedup();
    for base in bases {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with(DIR_PREFIX) {
                continue;
            }
            let root = entry.path();
            let owner = std::fs::read_to_string(root.join("owner.pid"))
                .ok()
                .and_then(|text| text.trim().parse::<libc::pid_t>().ok());
            match owner {
                Some(pid) if !cleanup::pid_alive(pid) => {
                    let _ = cleanup::run(&Action::StopCluster {
                        data_dir: root.join("data"),
                        root,
                    });
                }
                _ => {}
            }
        }
    }
}

pub(super) fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("could not find a free TCP port on 127.0.0.1: {e}"))
}

pub(super) fn output_tail(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        text.push('\n');
        text.push_str(&stdout);
    }
    tail(text.trim(), 2000).to_owned()
}

pub(super) fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_dirs_sort_highest_first() {
        let tmp = std::env::temp_dir().join(format!("crablet-vd-{}", std::process::id()));
        for v in ["9.6", "15", "16", "13", "notaversion"] {
            std::fs::create_dir_all(tmp.join(v).join("bin")).expect("create test dirs");
        }
        let found = versioned_dirs(&tmp, "", "bin");
        let names: Vec<String> = found
            .iter()
            .map(|p| {
                p.parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        let _ = std::fs::remove_dir_all(&tmp);
        assert_eq!(names, ["16", "15", "13", "9.6"]);
    }

    #[test]
    fn shell_quote_escapes_single_quotes() {
        assert_eq!(shell_quote(OsStr::new("a'b c")), r"'a'\''b c'");
    }
}
