//! Owns a cluster's processes and state directory, and guarantees both go away.
//!
//! Dropping the [`Supervisor`] kills every process, tears down the real node if the cluster
//! has one (see [`crate::node::teardown`]), and removes the state directory (kept when
//! `SD35_KEEP_STATE=1`; the host is restored either way). A cluster held in a `static` is
//! never dropped, so for attached clusters a janitor — a shell in a session of its own
//! waiting for its stdin to close — does the same once this process has ended, however it
//! ended; the processes are already gone by then through their parent-death signal, and the
//! node's teardown (`sd35-localcluster node-teardown`) ends what outlived them.
//! [`Supervisor::detach`] hands everything over to `sd35-localcluster stop` instead.

use std::io::Write;
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::{Context, Result};

use crate::layout::Layout;
use crate::process::{Launcher, Lifetime, Process, ProcessSpec};

/// Set to `1` to keep a test cluster's state directory (logs, audit log, etcd data).
pub const KEEP_STATE_ENV: &str = "SD35_KEEP_STATE";

#[derive(Debug)]
pub(crate) struct Supervisor {
    layout: Layout,
    launcher: Launcher,
    processes: Mutex<Vec<Process>>,
    keep_state: bool,
    detached: bool,
    /// Closing this (by exiting) tells the janitor to remove the state directory.
    _janitor: Option<ChildStdin>,
}

impl Supervisor {
    /// `localcluster` is the `sd35-localcluster` executable the janitor runs the real
    /// node's teardown with.
    pub(crate) fn new(layout: Layout, lifetime: Lifetime, localcluster: &Path) -> Result<Self> {
        let keep_state = std::env::var(KEEP_STATE_ENV).is_ok_and(|value| value == "1");
        if keep_state && lifetime == Lifetime::Attached {
            let _ = writeln!(
                std::io::stderr(),
                "sd35-e2e: {KEEP_STATE_ENV}=1, so the cluster state stays in {}",
                layout.root().display()
            );
        }
        let janitor = match lifetime {
            Lifetime::Attached => Some(start_janitor(layout.root(), localcluster, keep_state)?),
            Lifetime::Detached => None,
        };
        Ok(Self {
            layout,
            launcher: Launcher::new(lifetime)?,
            processes: Mutex::new(Vec::new()),
            keep_state,
            detached: false,
            _janitor: janitor,
        })
    }

    /// Starts one component, logging to its file in the state directory; returns its pid.
    pub(crate) fn launch(&self, spec: &ProcessSpec) -> Result<u32> {
        let process = self.launcher.launch(
            spec,
            &self.layout.process_log(spec.name),
            self.layout.root(),
        )?;
        let pid = process.pid();
        self.lock().push(process);
        Ok(pid)
    }

    /// Fails with the process's log tail if any component has exited.
    pub(crate) fn check_running(&self) -> Result<()> {
        for process in self.lock().iter_mut() {
            if let Some(status) = process.exit_status() {
                return Err(process.exited_error(status));
            }
        }
        Ok(())
    }

    /// The name and pid of every process started so far.
    pub(crate) fn process_ids(&self) -> Vec<(&'static str, u32)> {
        self.lock()
            .iter()
            .map(|process| (process.name(), process.pid()))
            .collect()
    }

    /// `name pid` per process, as recorded in the state directory's `pids` file.
    pub(crate) fn write_pid_file(&self) -> Result<()> {
        let record: String = self
            .process_ids()
            .into_iter()
            .map(|(name, pid)| format!("{name} {pid}\n"))
            .collect();
        let path = self.layout.pids();
        std::fs::write(&path, record).with_context(|| format!("writing {}", path.display()))
    }

    /// Leaves the processes running and the state directory in place.
    pub(crate) fn detach(&mut self) {
        self.detached = true;
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Process>> {
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        let processes = self
            .processes
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for process in processes.iter_mut().rev() {
            process.kill();
        }
        let root = self.layout.root();
        // Straight to stderr: the test harness would capture eprintln! and hide the path.
        let mut stderr = std::io::stderr();
        if let Err(error) = crate::node::teardown(root) {
            let _ = writeln!(stderr, "sd35-e2e: {error:#}");
        }
        if self.keep_state {
            let _ = writeln!(
                stderr,
                "sd35-e2e: kept the cluster state in {}",
                root.display()
            );
        } else if let Err(error) = std::fs::remove_dir_all(root) {
            let _ = writeln!(
                stderr,
                "sd35-e2e: could not remove {}: {error}",
                root.display()
            );
        }
    }
}

fn start_janitor(root: &Path, localcluster: &Path, keep_state: bool) -> Result<ChildStdin> {
    // Ignoring the terminal's signals keeps Ctrl-C from ending the janitor before the
    // cleanup; the pause lets the killed processes finish dying before the teardown.
    const SCRIPT: &str = r#"trap '' INT TERM HUP; cat >/dev/null; sleep 1
if [ -d "$1/node" ]; then "$2" node-teardown --state-dir "$1" >>"$1/logs/node-teardown.log" 2>&1; fi
[ "$3" = keep ] || rm -rf -- "$1""#;
    let mut janitor = Command::new("setsid")
        .args(["sh", "-c", SCRIPT, "sd35-cluster-janitor"])
        .arg(root)
        .arg(localcluster)
        .arg(if keep_state { "keep" } else { "remove" })
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the state directory janitor (setsid, sh)")?;
    janitor
        .stdin
        .take()
        .context("the janitor has no stdin pipe")
}
