//! A child process owned by a test: its output goes to a log file, it is killed when the guard
//! drops, and its log is printed if the test is panicking so failures explain themselves.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl ChildGuard {
    /// Starts `command` with stdout and stderr captured to a log file.
    pub fn spawn(name: &str, mut command: Command) -> ChildGuard {
        let log_dir = tempfile::tempdir().expect("temp dir for process log");
        let log_path = log_dir.path().join(format!("{name}.log"));
        let log = File::create(&log_path).expect("create process log");
        let err = log.try_clone().expect("clone log handle");
        command.stdin(Stdio::null()).stdout(log).stderr(err);
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name} ({command:?}): {error}"));
        ChildGuard {
            name: name.to_string(),
            child: Some(child),
            log_path,
            _log_dir: log_dir,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|child| child.id()).unwrap_or(0)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends a signal (e.g. "TERM", "INT") with kill(1), keeping the guard's ownership.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.id().to_string())
            .status();
    }

    /// Whether the process has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Waits for exit up to `timeout`; `None` if it is still running then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        crate::poll_until(timeout, || self.try_wait())
    }

    /// Kills the process now.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} -----\n{}\n----- end of {} -----",
                self.name,
                self.log(),
                self.name
            );
        }
    }
}
