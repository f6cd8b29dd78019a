//! Launching the cluster's processes and keeping them tied to their owner.
//!
//! [`Lifetime::Attached`] processes cannot outlive the process that started them, however it
//! ends (return, panic, abort, SIGKILL): each one is exec'd through
//! `setpriv --pdeathsig KILL`, and the parent-death signal fires when the *thread* that
//! forked the child exits. So all of them are forked by one dedicated launcher thread that
//! lives exactly as long as its [`Launcher`]; never by a libtest thread or a tokio blocking
//! thread, which come and go.
//!
//! [`Lifetime::Detached`] processes (the `sd35-localcluster start` command) get a session of
//! their own through `setsid` and keep running after the command returns.
//!
//! Either way a process's stdout and stderr go to one log file, whose tail is what start
//! errors show.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;

use anyhow::{Context, Result, anyhow};

/// How long the processes of a cluster live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Killed when the [`crate::Cluster`] is dropped, and by the kernel when this process
    /// ends without dropping it.
    Attached,
    /// Left running in their own session; stopped with `sd35-localcluster stop`.
    Detached,
}

/// What to run for one component.
#[derive(Debug, Clone)]
pub(crate) struct ProcessSpec {
    /// Short name, used for the log file and in errors.
    pub(crate) name: &'static str,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) envs: Vec<(&'static str, OsString)>,
}

/// A running component.
#[derive(Debug)]
pub(crate) struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// An error naming the process, how it ended and the end of its log.
    pub(crate) fn exited_error(&self, status: ExitStatus) -> anyhow::Error {
        anyhow!(
            "{} exited ({status}); last lines of {}:\n{}",
            self.name,
            self.log.display(),
            log_tail(&self.log)
        )
    }

    /// Kills the process and reaps it.
    pub(crate) fn kill(&mut self) {
        // Already gone is fine: both calls only fail when there is nothing left to do.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Starts processes from one long-lived thread; see the module docs for why.
#[derive(Debug)]
pub(crate) struct Launcher {
    lifetime: Lifetime,
    requests: mpsc::Sender<SpawnRequest>,
}

impl Launcher {
    pub(crate) fn new(lifetime: Lifetime) -> Result<Self> {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("sd35-cluster-launcher".to_owned())
            .spawn(move || {
                // Runs until the Launcher (the only sender) is dropped; ending this thread is
                // what delivers the parent-death signal to attached processes.
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .context("starting the process launcher thread")?;
        Ok(Self { lifetime, requests })
    }

    /// Starts `spec` with its output appended to `log`, in the working directory `cwd`.
    pub(crate) fn launch(&self, spec: &ProcessSpec, log: &Path, cwd: &Path) -> Result<Process> {
        let stdout = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let stderr = stdout.try_clone()?;
        let mut command = match self.lifetime {
            Lifetime::Attached => {
                let mut command = Command::new("setpriv");
                command.args(["--pdeathsig", "KILL", "--"]);
                command
            }
            Lifetime::Detached => Command::new("setsid"),
        };
        command
            .arg(&spec.program)
            .args(&spec.args)
            .envs(spec.envs.iter().map(|(key, value)| (key, value)))
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let (reply, response) = mpsc::channel();
        self.requests
            .send((command, reply))
            .map_err(|_| anyhow!("the process launcher thread has stopped"))?;
        let child = response
            .recv()
            .map_err(|_| anyhow!("the process launcher thread has stopped"))?
            .with_context(|| {
                format!(
                    "starting {} ({}); setpriv and setsid come with util-linux",
                    spec.name,
                    spec.program.display()
                )
            })?;
        Ok(Process {
            name: spec.name,
            child,
            log: log.to_path_buf(),
        })
    }
}

/// The last few lines of a log file, or a note on why there are none.
pub(crate) fn log_tail(path: &Path) -> String {
    const TAIL_BYTES: u64 = 6 * 1024;
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(25);
        Ok(lines[start..].join("\n"))
    };
    match read() {
        Ok(tail) if tail.trim().is_empty() => "(empty log)".to_owned(),
        Ok(tail) => tail,
        Err(error) => format!("(log unreadable: {error})"),
    }
}

/// Whether `pid` is a live process (not a zombie) whose command line names `state_dir`, or
/// that runs in it (every process of a cluster starts there; Flux's controllers take no flag
/// with a path, so only their working directory says whose they are). A pid the kernel has
/// since given to an unrelated process does not count.
pub fn runs_for_state_dir(pid: u32, state_dir: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let zombie = std::fs::read_to_string(proc_dir.join("stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    let needle = state_dir.as_os_str().as_encoded_bytes();
    let names_state_dir = std::fs::read(proc_dir.join("cmdline"))
        .is_ok_and(|cmdline| cmdline.windows(needle.len()).any(|window| window == needle));
    let runs_in_state_dir =
        std::fs::read_link(proc_dir.join("cwd")).is_ok_and(|cwd| cwd == state_dir);
    !zombie && (names_state_dir || runs_in_state_dir)
}
