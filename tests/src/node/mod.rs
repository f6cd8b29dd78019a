//! The real node `real-0`: kubelet, containerd, runc, the bridge CNI plugin and kube-proxy
//! beside the kwok GPU nodes, running pods for real from images built and imported here.
//!
//! Containment. The node's processes share a network namespace and a mount namespace held
//! by one small process (`sd35-localcluster node-namespace`). Everything they create on the
//! network side (the pod bridge, veths, iptables chains, forwarding, conntrack settings)
//! lives in that network namespace, and every mount (container root filesystems, volume
//! tmpfs, pod network namespaces, the node's private `/run` and `/var/log`) in that mount
//! namespace: both vanish with the last process in them. One veth pair joins the node to the
//! host: [`HOST_ADDRESS`] on the host (where the API server and test servers listen) and
//! [`NODE_ADDRESS`] in the node. The host keeps forwarding off, so no pod packet can leave the
//! machine; pods resolve no names ([`config::RESOLV_CONF`]).
//!
//! What remains global is undone by [`teardown`]: the kernel settings the kubelet sets
//! (recorded before it starts), the cgroup tree under [`CGROUP_ROOT`], and processes that
//! outlive their parents (containerd's shims and their containers). [`HostState`] lets a
//! test check that the host is as it was.
//!
//! One real node runs on a machine at a time: `/run/sd35-real-node` names the state directory
//! of the one that has the machine, from before it changes anything until its teardown is
//! done; the next one waits for it (a test binary's janitor may still be tearing one down).

pub(crate) mod config;
mod host;

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Node;
use kube::Api;

pub use config::REAL_NODE_TAINT;
pub use host::HostState;

use crate::layout::Layout;
use crate::supervisor::Supervisor;
use crate::wait::{Probe, poll_while_healthy};

/// The real node's name.
pub const REAL_NODE_NAME: &str = "real-0";
/// The host's address on the link into the node: the API server listens here, and so may
/// servers a test runs for pods to reach (a model mirror, say).
pub const HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 201, 255, 1);
/// The node's address on that link (its InternalIP, where the kubelet listens).
pub const NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 201, 255, 2);
/// The pods' addresses, on the node's bridge.
pub const POD_CIDR: &str = "10.201.0.0/24";
/// The host end of the link.
pub(crate) const HOST_LINK: &str = "sd35-real0";
/// The pod bridge inside the node.
pub(crate) const POD_BRIDGE: &str = "cni0";
/// The kubelet's cgroup root, in every hierarchy.
pub(crate) const CGROUP_ROOT: &str = "sd35-real-0";
/// The host paths the node's mount namespace replaces with a tmpfs of its own, so nothing
/// the node writes there (CNI's cache in /var/lib/cni, shim sockets, pod log links) reaches
/// the host. Everything the node keeps lives in the state directory instead.
const PRIVATE_DIRS: [&str; 3] = ["/run", "/var/log", "/var/lib"];

/// How long the node's milestones may take (each takes seconds).
const NODE_TIMEOUT: Duration = Duration::from_secs(90);

/// The environment variable naming the directory of the image archives (`make images`
/// writes `target/images`).
pub const IMAGES_DIR_ENV: &str = "SD35_IMAGES_DIR";

/// The images `make images` built: their references, and the archives the node imports.
#[derive(Debug, Clone)]
pub struct Images {
    /// The directory of the archives.
    pub dir: PathBuf,
    /// The operator image.
    pub operator: String,
    /// The CPU flavour of the server image.
    pub server: String,
    /// The pod sandbox image.
    pub pause: String,
}

impl Images {
    /// The images in `SD35_IMAGES_DIR`, else in the repository's `target/images`.
    pub fn locate() -> Result<Self> {
        let dir = match std::env::var_os(IMAGES_DIR_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => crate::binaries::workspace_root().join("target/images"),
        };
        Self::in_dir(&dir)
    }

    /// The images recorded in `dir/images.env`.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let record = dir.join("images.env");
        let text = std::fs::read_to_string(&record).with_context(|| {
            format!(
                "no images in {} ({} is missing); build them with `make images` \
                 (or set {IMAGES_DIR_ENV})",
                dir.display(),
                record.display()
            )
        })?;
        let value = |key: &str| -> Result<String> {
            text.lines()
                .find_map(|line| line.strip_prefix(&format!("{key}=")))
                .map(str::to_owned)
                .with_context(|| format!("{} names no {key} image", record.display()))
        };
        let images = Self {
            dir: dir.to_path_buf(),
            operator: value("operator")?,
            server: value("server")?,
            pause: value("pause")?,
        };
        for archive in images.archives() {
            ensure!(
                archive.is_file(),
                "{} is missing; run `make images`",
                archive.display()
            );
        }
        Ok(images)
    }

    /// The archives to import.
    pub fn archives(&self) -> Vec<PathBuf> {
        ["pause", "sd35-operator", "sd35-server-cpu"]
            .iter()
            .map(|name| self.dir.join(format!("{name}.tar")))
            .collect()
    }
}

/// Why this machine cannot run a real node, if it cannot: not root. Everything else missing
/// is a setup problem that [`check_host`] reports with its remedy.
pub fn unsupported_reason() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_owned))
        });
    (uid.as_deref() != Some("0")).then(|| {
        "a real node needs root (it runs containerd and the kubelet, and makes a network \
         namespace)"
            .to_owned()
    })
}

/// The first directory on `PATH` holding `name`.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// The free space the real node needs on its state directory's filesystem when it starts:
/// its images unpacked, the pods' volumes and the models they cache take about half a
/// gigabyte, and the kubelet evicts pods below [`config::EVICTION_DISK_FREE`].
const NODE_DISK_FREE_BYTES: u64 = 2 << 30;

/// The bytes free to unprivileged users on the filesystem holding `path` (or its nearest
/// existing ancestor).
fn free_bytes(path: &Path) -> Result<u64> {
    let existing = path
        .ancestors()
        .find(|dir| dir.exists())
        .unwrap_or(Path::new("/"));
    let stat = rustix::fs::statvfs(existing)
        .with_context(|| format!("reading the free space of {}", existing.display()))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Fails, saying how much to free, when `free` bytes on `dir`'s filesystem are too few for
/// a real node.
fn check_disk_space(dir: &Path, free: u64) -> Result<()> {
    const MIB: u64 = 1 << 20;
    ensure!(
        free >= NODE_DISK_FREE_BYTES,
        "only {} MiB are free on the filesystem of {}; the real node needs {} MiB there (its \
         images, the pods' volumes and cached models), and its kubelet evicts pods below {}: \
         free {} MiB or more (old clones' target directories, state directories left in /tmp)",
        free / MIB,
        dir.display(),
        NODE_DISK_FREE_BYTES / MIB,
        config::EVICTION_DISK_FREE,
        (NODE_DISK_FREE_BYTES - free).div_ceil(MIB)
    );
    Ok(())
}

/// The CNI plugin directory (Debian's, or the upstream default).
fn cni_bin_dir() -> Option<PathBuf> {
    ["/usr/lib/cni", "/opt/cni/bin"]
        .iter()
        .map(PathBuf::from)
        .find(|dir| {
            ["bridge", "host-local", "loopback"]
                .iter()
                .all(|p| dir.join(p).is_file())
        })
}

/// Checks that the host can run a real node now; the errors say what to install or stop.
pub(crate) fn check_host(layout: &Layout) -> Result<PathBuf> {
    if let Some(reason) = unsupported_reason() {
        bail!("{reason}");
    }
    let missing: Vec<&str> = [
        ("containerd", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        ("iptables", "iptables"),
        ("conntrack", "conntrack"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("unshare", "util-linux"),
        ("mount", "mount"),
    ]
    .into_iter()
    .filter(|(program, _)| on_path(program).is_none())
    .map(|(_, package)| package)
    .collect();
    let cni = cni_bin_dir();
    let mut packages: Vec<&str> = missing;
    if cni.is_none() {
        packages.push("containernetworking-plugins");
    }
    packages.dedup();
    if !packages.is_empty() {
        bail!(
            "the real node needs apt-get install {} (as .ci/run does)",
            packages.join(" ")
        );
    }
    for dir in PRIVATE_DIRS {
        ensure!(
            !layout.root().starts_with(dir),
            "the state directory {} is under {dir}, which the node keeps private; pick another",
            layout.root().display()
        );
    }
    check_disk_space(layout.root(), free_bytes(layout.root())?)?;
    take_machine_lock(layout)?;
    cni.context("no CNI plugins")
}

/// The record of the machine's one real node: its state directory, from before the node
/// changes anything until its teardown has undone everything.
const MACHINE_LOCK: &str = "/run/sd35-real-node";

/// The state directory of the real node that has this machine, if one has.
fn machine_lock_holder() -> Option<PathBuf> {
    std::fs::read_to_string(MACHINE_LOCK)
        .ok()
        .map(|dir| PathBuf::from(dir.trim()))
}

/// Waits until no real node has the machine (one being torn down, say by the janitor of a
/// test binary that just ended), up to `timeout`; fails naming the one that still has it.
pub fn wait_for_no_real_node(timeout: Duration) -> Result<()> {
    let started = std::time::Instant::now();
    while let Some(holder) = machine_lock_holder() {
        if started.elapsed() >= timeout {
            bail!(
                "another real node has this machine (its state is in {}); stop it first \
                 (`make demo-stop`, or `sd35-localcluster stop --state-dir {0}`)",
                holder.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if host::host_link_exists() {
        bail!(
            "the host link {HOST_LINK} of a real node exists, but no node claims it; `ip link delete {HOST_LINK}`"
        );
    }
    Ok(())
}

fn release_machine_lock(state_dir: &Path) -> Result<()> {
    let state_dir = state_dir
        .canonicalize()
        .unwrap_or_else(|_| state_dir.to_path_buf());
    if machine_lock_holder().as_deref() == Some(state_dir.as_path()) {
        std::fs::remove_file(MACHINE_LOCK).with_context(|| format!("removing {MACHINE_LOCK}"))?;
    }
    Ok(())
}

fn take_machine_lock(layout: &Layout) -> Result<()> {
    loop {
        wait_for_no_real_node(Duration::from_secs(60))?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(MACHINE_LOCK)
        {
            Ok(mut file) => {
                std::io::Write::write_all(
                    &mut file,
                    layout.root().display().to_string().as_bytes(),
                )?;
                return Ok(());
            }
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(error).with_context(|| format!("creating {MACHINE_LOCK}")),
        }
    }
}

/// Runs a command to completion, failing with its output.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Runs `program args...` inside the node's namespaces.
fn run_in_node(holder: u32, program: &str, args: &[&str]) -> Result<()> {
    let pid = holder.to_string();
    let mut all = vec!["--target", pid.as_str(), "--net", "--mount", "--", program];
    all.extend_from_slice(args);
    run("nsenter", &all)
}

fn namespace_id(pid: u32, kind: &str) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok()
}

/// The part of the node that exists before the API server starts: the holder of its
/// namespaces and the link the API server listens on.
#[derive(Debug)]
pub(crate) struct PreparedNode {
    holder_pid: u32,
    cni_bin_dir: PathBuf,
}

/// Records the host's settings, starts the namespace holder, wires the link and the node's
/// private directories, and creates the cgroup root.
pub(crate) fn prepare(
    layout: &Layout,
    supervisor: &Supervisor,
    localcluster: &Path,
) -> Result<PreparedNode> {
    let cni_bin_dir = check_host(layout)?;
    std::fs::create_dir_all(layout.node_dir())?;
    // Before anything runs: teardown writes these values back.
    host::write_sysctl_record(&layout.node_path("host-sysctls"), &host::read_sysctls())?;
    let holder_pid = supervisor.launch(&config::holder(layout, localcluster))?;
    let ours = namespace_id(std::process::id(), "net");
    let started = std::time::Instant::now();
    while namespace_id(holder_pid, "net") == ours || namespace_id(holder_pid, "net").is_none() {
        supervisor.check_running()?;
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the node's namespace holder did not enter its namespaces"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let holder = holder_pid.to_string();
    let host = format!("{HOST_ADDRESS}/30");
    let node = format!("{NODE_ADDRESS}/30");
    let via = NODE_ADDRESS.to_string();
    let gateway = HOST_ADDRESS.to_string();
    run(
        "ip",
        &[
            "link", "add", HOST_LINK, "type", "veth", "peer", "name", "eth0", "netns", &holder,
        ],
    )?;
    run("ip", &["address", "add", &host, "dev", HOST_LINK])?;
    run("ip", &["link", "set", HOST_LINK, "up"])?;
    run_in_node(holder_pid, "ip", &["link", "set", "lo", "up"])?;
    run_in_node(holder_pid, "ip", &["address", "add", &node, "dev", "eth0"])?;
    run_in_node(holder_pid, "ip", &["link", "set", "eth0", "up"])?;
    run_in_node(
        holder_pid,
        "ip",
        &["route", "add", "default", "via", &gateway],
    )?;
    // The host reaches pods and Service addresses through the node; the routes go with the
    // link.
    for range in [POD_CIDR, crate::components::SERVICE_CLUSTER_IP_RANGE] {
        run(
            "ip",
            &["route", "add", range, "via", &via, "dev", HOST_LINK],
        )?;
    }
    // Inside the node's network namespace: forwarding between its bridge and its link.
    run_in_node(holder_pid, "sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])?;
    for dir in PRIVATE_DIRS {
        if Path::new(dir).is_dir() {
            run_in_node(
                holder_pid,
                "mount",
                &["-t", "tmpfs", "-o", "mode=0755", "sd35-node", dir],
            )?;
        }
    }
    // Pods get the node's resolv.conf (config::RESOLV_CONF); the node's own processes resolve
    // nothing either.
    let resolv = layout.node_path("resolv.conf");
    std::fs::write(&resolv, config::RESOLV_CONF)?;
    let resolv = resolv.display().to_string();
    if Path::new("/etc/resolv.conf").is_file() {
        run_in_node(
            holder_pid,
            "mount",
            &["--bind", &resolv, "/etc/resolv.conf"],
        )?;
    }
    host::create_cgroup_root()?;
    Ok(PreparedNode {
        holder_pid,
        cni_bin_dir,
    })
}

/// Starts containerd, imports the images, starts the kubelet and kube-proxy, and waits until
/// the node is Ready.
pub(crate) async fn start(
    layout: &Layout,
    supervisor: &Supervisor,
    bin_dir: &Path,
    prepared: &PreparedNode,
    images: &Images,
    client: &kube::Client,
) -> Result<()> {
    let inputs = config::NodeInputs {
        layout,
        bin_dir,
        cni_bin_dir: &prepared.cni_bin_dir,
        pause_image: &images.pause,
        holder_pid: prepared.holder_pid,
    };
    for dir in ["cni", "cni-ipam", "pod-logs", "kubelet", "containerd"] {
        std::fs::create_dir_all(layout.node_path(dir))?;
    }
    std::fs::write(
        layout.node_path("containerd.toml"),
        config::containerd_toml(inputs),
    )?;
    std::fs::write(
        layout.node_path("cni/10-sd35-pods.conflist"),
        config::cni_conflist(layout),
    )?;
    std::fs::write(
        layout.node_path("kubelet.yaml"),
        config::kubelet_yaml(inputs),
    )?;
    std::fs::write(
        layout.node_path("kube-proxy.yaml"),
        config::kube_proxy_yaml(layout),
    )?;

    let started = std::time::Instant::now();
    supervisor.launch(&config::containerd(inputs))?;
    let health = || supervisor.check_running();
    let socket = layout.containerd_socket();
    poll_while_healthy("containerd's socket", NODE_TIMEOUT, &health, || async {
        Ok(if ctr(&socket, &["version"]).is_ok() {
            Probe::Ready(())
        } else {
            Probe::Pending("not answering yet".into())
        })
    })
    .await?;
    for archive in images.archives() {
        let path = archive.display().to_string();
        ctr(&socket, &["images", "import", &path]).with_context(|| format!("importing {path}"))?;
    }
    let imported = started.elapsed();
    supervisor.launch(&config::kubelet(inputs))?;
    let kubelet_started = std::time::Instant::now();
    supervisor.launch(&config::kube_proxy(inputs))?;
    let nodes: Api<Node> = Api::all(client.clone());
    poll_while_healthy(
        &format!("node {REAL_NODE_NAME} to be Ready"),
        NODE_TIMEOUT,
        &health,
        || async {
            Ok(match nodes.get_opt(REAL_NODE_NAME).await? {
                Some(node) if crate::nodes::is_ready(&node) => Probe::Ready(()),
                Some(_) => Probe::Pending("registered, not Ready".into()),
                None => Probe::Pending("not registered".into()),
            })
        },
    )
    .await?;
    // Straight to stderr rather than through eprintln!, which the test harness captures.
    let _ = writeln!(
        std::io::stderr(),
        "sd35-e2e: node {REAL_NODE_NAME} Ready {:.1}s after its kubelet started \
         (containerd up and {} images imported in {:.1}s)",
        kubelet_started.elapsed().as_secs_f64(),
        images.archives().len(),
        imported.as_secs_f64()
    );
    Ok(())
}

/// `ctr --address <socket> -n k8s.io args...`.
fn ctr(socket: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["--namespace", "k8s.io"])
        .args(args)
        .output()
        .context("running ctr")?;
    ensure!(
        output.status.success(),
        "ctr {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Undoes everything the real node of the cluster in `state_dir` did to the host: kills
/// what is left of its processes (shims, containers), removes its cgroups and its link, and
/// writes back the kernel settings recorded before it started. Idempotent; the control
/// plane's processes should be gone already (they are not touched here).
pub fn teardown(state_dir: &Path) -> Result<()> {
    let layout = Layout::new(state_dir.to_path_buf());
    if !layout.node_dir().is_dir() {
        // Nothing started; the machine may have been claimed already.
        release_machine_lock(state_dir)?;
        return Ok(());
    }
    let mut problems = Vec::new();
    if let Err(error) = host::kill_node_processes(state_dir, Duration::from_secs(15)) {
        problems.push(format!("{error:#}"));
    }
    if let Err(error) = host::remove_cgroup_root(Duration::from_secs(10)) {
        problems.push(format!("{error:#}"));
    }
    if let Err(error) = host::remove_host_link(Duration::from_secs(5)) {
        problems.push(format!("{error:#}"));
    }
    host::forget_connections();
    match host::restore_sysctls(&layout.node_path("host-sysctls")) {
        Ok(_) => {}
        Err(error) => problems.push(format!("{error:#}")),
    }
    if problems.is_empty() {
        // The machine is free for the next real node only once everything is undone.
        if machine_lock_holder().as_deref() == Some(state_dir) {
            std::fs::remove_file(MACHINE_LOCK)
                .with_context(|| format!("removing {MACHINE_LOCK}"))?;
        }
        Ok(())
    } else {
        bail!("the real node's teardown left: {}", problems.join("; "))
    }
}

/// The processes running in the node's containers, with their command lines (`argv`).
pub fn container_processes() -> Vec<(u32, Vec<String>)> {
    host::node_container_pids()
        .into_iter()
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let argv = cmdline
                .split(|byte| *byte == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect();
            Some((pid, argv))
        })
        .collect()
}

/// `sd35-localcluster node-namespace`: the process that holds the node's namespaces. It
/// sleeps until it is killed.
pub fn hold_namespaces() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_read_from_the_nearest_existing_directory() {
        let free = free_bytes(Path::new("/no/such/dir/anywhere")).unwrap();
        assert!(free > 0);
        let df = std::process::Command::new("df")
            .args(["-B1", "--output=avail", "/"])
            .output()
            .unwrap();
        let df: u64 = String::from_utf8_lossy(&df.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The same filesystem, read a moment apart by df and by statvfs.
        assert!(free.abs_diff(df) < 256 << 20, "statvfs {free}, df {df}");
    }

    #[test]
    fn too_little_disk_space_is_refused_naming_how_much_to_free() {
        let dir = Path::new("/tmp/sd35-cluster-1-0");
        check_disk_space(dir, NODE_DISK_FREE_BYTES).unwrap();
        let message = format!(
            "{:#}",
            check_disk_space(dir, NODE_DISK_FREE_BYTES - (300 << 20)).unwrap_err()
        );
        assert!(message.contains("only 1748 MiB are free"), "{message}");
        assert!(message.contains("/tmp/sd35-cluster-1-0"), "{message}");
        assert!(message.contains("free 300 MiB or more"), "{message}");
        assert!(message.contains("below 512Mi"), "{message}");
    }
}
