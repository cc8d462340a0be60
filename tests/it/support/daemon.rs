//! A server the tests run as a child process (moto, Garage, etcd, docker-registry): waited for until
//! it answers, killed (SIGKILL) and reaped when stopped or dropped.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::clients::{command, require};

/// The child process of a server, if one runs.
#[derive(Default)]
pub struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    /// Takes a freshly spawned `child` and polls `ready` every `poll` until it holds. `Err` says why
    /// not: the child exited first (it is reaped), or `within` passed (it is killed); `ready_when`
    /// names the check for that message.
    pub fn wait_ready(
        &mut self,
        child: Child,
        within: Duration,
        poll: Duration,
        ready_when: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), String> {
        self.child = Some(child);
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("the child was just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!("exited during startup ({status})"));
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!("not ready ({ready_when}) within {within:?}"));
            }
            std::thread::sleep(poll);
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the child (SIGKILL) and reaps it; its port then refuses connections. No-op when none runs.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A command running `program` under `setpriv --pdeathsig KILL` (so that it dies with the test
/// process even if a panic skips Drop), its stdin closed and its stdout and stderr appended to
/// `log`; the caller adds the arguments.
pub fn logged_child(program: &Path, log: &Path) -> Command {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    let err = out.try_clone().expect("clone a log file handle");
    let mut cmd = command(&require("setpriv", "util-linux"));
    cmd.args(["--pdeathsig", "KILL", "--"])
        .arg(program)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    cmd
}

/// A fresh temp dir under the target dir for a server's data and logs, named `<prefix>…`.
pub fn home_dir(prefix: &str) -> TempDir {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(root).unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(root)
        .unwrap_or_else(|e| panic!("cannot create a temp dir {prefix}…: {e}"))
}
