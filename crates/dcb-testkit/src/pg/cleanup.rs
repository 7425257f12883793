//! Process-exit cleanup for resources that live as long as the test process.
//!
//! Rust never runs `Drop` for values held in a `static`, and a test binary ends
//! with `std::process::exit` (or by returning from `main`). Both go through the
//! C library's `exit`, which runs the handlers registered with `atexit(3)`. So
//! everything that must not outlive the test process (a disposable PostgreSQL
//! cluster, a Docker container) registers an [`Action`] here, and a single
//! `atexit` handler runs the actions that are still registered when the process
//! exits. An owner that cleans up earlier (for example [`super::LocalCluster::stop`])
//! unregisters its action first.
//!
//! A process killed by a signal (SIGKILL, an unhandled SIGINT) runs no `atexit`
//! handler. For that case the local-cluster code also sweeps leftover
//! directories of dead processes when it starts a new cluster, and Docker
//! containers carry the label `crablet.testkit=1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// Something to undo when the process exits.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    /// Stop the PostgreSQL server of `data_dir` (if it runs) and remove `root`.
    StopCluster { data_dir: PathBuf, root: PathBuf },
    /// Remove a Docker container (and its anonymous volumes).
    RemoveContainer { id: String },
}

static REGISTRY: Mutex<Vec<(u64, Action)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static INSTALL: Once = Once::new();

/// Registers `action` to run at process exit; returns a handle for [`unregister`].
pub(crate) fn register(action: Action) -> u64 {
    INSTALL.call_once(|| {
        // SAFETY: `run_at_exit` is an `extern "C" fn()` that never unwinds
        // (it catches panics), as `atexit` requires.
        let rc = unsafe { libc::atexit(run_at_exit) };
        if rc != 0 {
            eprintln!(
                "dcb-testkit: atexit() failed; disposable test databases will not be \
                 removed at process exit"
            );
        }
    });
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut registry = REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    registry.push((id, action));
    id
}

/// Removes a registered action without running it; returns it if it was still registered.
pub(crate) fn unregister(id: u64) -> Option<Action> {
    let mut registry = REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let pos = registry.iter().position(|(i, _)| *i == id)?;
    Some(registry.remove(pos).1)
}

extern "C" fn run_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        // Another thread may still be running while the process exits; never
        // block forever on the lock.
        let deadline = Instant::now() + Duration::from_secs(2);
        let actions = loop {
            match REGISTRY.try_lock() {
                Ok(mut registry) => break std::mem::take(&mut *registry),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                    break std::mem::take(&mut *poisoned.into_inner())
                }
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::sync::TryLockError::WouldBlock) => return,
            }
        };
        // Run in reverse order of registration, like destructors.
        for (_, action) in actions.into_iter().rev() {
            if let Err(e) = run(&action) {
                eprintln!("dcb-testkit: cleanup at exit failed: {e}");
            }
        }
    });
}

/// Runs one action now.
pub(crate) fn run(action: &Action) -> Result<(), String> {
    match action {
        Action::StopCluster { data_dir, root } => {
            stop_postmaster(data_dir)?;
            match std::fs::remove_dir_all(root) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("could not remove {}: {e}", root.display())),
            }
        }
        Action::RemoveContainer { id } => {
            let status = Command::new("docker")
                .args(["rm", "--force", "--volumes", id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("could not run `docker rm`: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("`docker rm --force {id}` failed with {status}"))
            }
        }
    }
}

/// Stops the postmaster whose pid is in `data_dir/postmaster.pid` with an
/// immediate shutdown (SIGQUIT, what `pg_ctl stop -m immediate` sends) and
/// waits up to 10 s for it to exit. The data directory is thrown away right
/// after, so the crash-recovery an immediate shutdown implies never happens.
///
/// Signalling directly rather than running `pg_ctl` works the same whether
/// the server runs as the current user or (when the tests run as root) as
/// another user, and needs no child process during `exit`.
pub(crate) fn stop_postmaster(data_dir: &Path) -> Result<(), String> {
    let Some(pid) = postmaster_pid(data_dir) else {
        return Ok(());
    };
    if !pid_alive(pid) {
        return Ok(());
    }
    // SAFETY: plain syscall with a pid read from our own data directory.
    let rc = unsafe { libc::kill(pid, libc::SIGQUIT) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(format!("could not signal postmaster {pid}: {err}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        if Instant::now() >= deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(100));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The postmaster pid recorded in `data_dir/postmaster.pid`, if any.
pub(crate) fn postmaster_pid(data_dir: &Path) -> Option<libc::pid_t> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: libc::pid_t = text.lines().next()?.trim().parse().ok()?;
    (pid > 0).then_some(pid)
}

/// Whether a process with this pid exists and is not a zombie.
///
/// A daemonized postmaster is re-parented to PID 1, which in some containers
/// never reaps its children: a zombie counts as gone.
pub(crate) fn pid_alive(pid: libc::pid_t) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !is_zombie(pid)
}

fn is_zombie(pid: libc::pid_t) -> bool {
    // /proc/<pid>/stat is "pid (comm) S ...": the state follows the last ')'.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(false)
}
