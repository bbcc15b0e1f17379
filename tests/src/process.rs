//! Process helpers for the lab and the tests: every command runs with a deadline, and every
//! long-running child is owned by a guard that kills and reaps it (by PID) when dropped.

use std::{
    fmt,
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// Deadline for ordinary lab commands (ip, tc, sysctl, short clients).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Shows a command line the way a person would type it, for error messages.
pub fn describe(argv: &[&str]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                (*a).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `command` to completion, capturing its output; kills it if it outlives `timeout`.
/// A non-zero exit is NOT an error here (callers assert on it); failing to start or a timeout is.
pub fn run_bounded(command: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    // Drain both pipes concurrently so a chatty child cannot block on a full pipe.
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {shown}"))?
        {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(2));
    };
    let stdout = stdout.and_then(|t| t.join().ok()).unwrap_or_default();
    let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{shown} timed out after {timeout:?} (killed); stderr: {}",
            String::from_utf8_lossy(&stderr).trim()
        ),
    }
}

/// Like [`run_bounded`], but a non-zero exit is an error carrying stderr; returns stdout.
pub fn run_ok(command: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let shown = format!("{command:?}");
    let output = run_bounded(command, timeout)?;
    check(&shown, &output)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Fails with the command and its stderr unless `output` is a success.
pub fn check(shown: &str, output: &Output) -> anyhow::Result<()> {
    if !output.status.success() {
        bail!(
            "{shown} failed with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(())
}

fn drain<R: Read + Send + 'static>(mut reader: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = reader.read_to_end(&mut buf);
        buf
    })
}

/// A child process that is killed (SIGKILL) and reaped when the guard is dropped, even on panic.
/// Its stdout and stderr go to a log file (a pipe nobody reads would eventually block it).
pub struct ChildGuard {
    child: Option<Child>,
    shown: String,
    log: PathBuf,
}

impl fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildGuard")
            .field("pid", &self.pid())
            .field("command", &self.shown)
            .finish()
    }
}

impl ChildGuard {
    /// Starts `command` with stdin from /dev/null and stdout+stderr appended to `log`.
    pub fn spawn(command: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let shown = format!("{command:?}");
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {shown}"))?;
        Ok(Self {
            child: Some(child),
            shown,
            log: log.to_owned(),
        })
    }

    /// The child's PID (0 once it was released or killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Where the child's stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What the child wrote so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if the child has ended, without blocking.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.shown)),
            None => bail!("{} was already released", self.shown),
        }
    }

    /// Waits up to `timeout` for the child to end; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends SIGTERM (a chance to clean up), waits up to `grace`, then SIGKILLs; returns the status.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        signal(self.pid(), nix::sys::signal::Signal::SIGTERM);
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        let child = self.child.as_mut().context("child already released")?;
        let _ = child.kill();
        child
            .wait()
            .with_context(|| format!("reaping {}", self.shown))
    }

    /// Lets the child run on after the guard is gone (e.g. servers of a lab that is kept up).
    pub fn release(mut self) -> u32 {
        let pid = self.pid();
        self.child = None;
        pid
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Sends `sig` to one process by PID; errors (e.g. it is already gone) are ignored.
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        if pid > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }
}
