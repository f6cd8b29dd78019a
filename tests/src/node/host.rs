//! What the real node changes on the host, and undoing it.
//!
//! The node's network and mounts live in namespaces of their own (see the parent module), so
//! what it can leave on the host is: the kernel settings the kubelet sets (recorded before it
//! starts, written back at teardown), the cgroup tree under [`CGROUP_ROOT`], and processes
//! that outlive their parents (containerd's shims and the containers under them). [`HostState`]
//! captures everything a node could touch, so a test can compare before and after.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{CGROUP_ROOT, HOST_LINK};

/// Kernel settings the kubelet, kube-proxy, containerd or the CNI plugins set when they run
/// in the host's namespaces; the ones outside the network namespace are global.
pub(crate) const WATCHED_SYSCTLS: [&str; 14] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv4/conf/all/route_localnet",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
];

/// Executables whose processes belong to a real node when their command line names its state
/// directory.
const NODE_EXECUTABLES: [&str; 7] = [
    "containerd",
    "containerd-shim-runc-v2",
    "kubelet",
    "kube-proxy",
    "nsenter",
    "unshare",
    "sd35-localcluster",
];

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key)
}

/// The current values of [`WATCHED_SYSCTLS`] (absent ones left out).
pub(crate) fn read_sysctls() -> BTreeMap<String, String> {
    WATCHED_SYSCTLS
        .iter()
        .filter_map(|key| {
            let value = std::fs::read_to_string(sysctl_path(key)).ok()?;
            Some(((*key).to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// Writes the recorded sysctls as `key=value` lines.
pub(crate) fn write_sysctl_record(path: &Path, values: &BTreeMap<String, String>) -> Result<()> {
    let text: String = values
        .iter()
        .map(|(key, value)| format!("{key}={value}\n"))
        .collect();
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes back every recorded sysctl whose value has changed; returns the keys restored.
pub(crate) fn restore_sysctls(record: &Path) -> Result<Vec<String>> {
    let text = match std::fs::read_to_string(record) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", record.display())),
    };
    let current = read_sysctls();
    let mut restored = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if current.get(key).is_some_and(|now| now != value) {
            std::fs::write(sysctl_path(key), value)
                .with_context(|| format!("restoring {key} to {value}"))?;
            restored.push(format!("{key}={value}"));
        }
    }
    Ok(restored)
}

/// The mount points of cgroup hierarchies (v1 controllers, or the one v2 tree).
pub(crate) fn cgroup_mounts() -> Vec<PathBuf> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fstype = after.split_whitespace().next()?;
            let mount_point = before.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// Creates the kubelet's cgroup root in every hierarchy. cpuset needs its CPUs and memory
/// nodes before any task may join; v2 needs the controllers delegated to it.
pub(crate) fn create_cgroup_root() -> Result<()> {
    for mount in cgroup_mounts() {
        let dir = mount.join(CGROUP_ROOT);
        if !dir.exists() {
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = mount.join(file);
            if parent.exists() && dir.join(file).exists() {
                let value = std::fs::read_to_string(&parent)?;
                std::fs::write(dir.join(file), value.trim())
                    .with_context(|| format!("writing {}", dir.join(file).display()))?;
            }
        }
        let controllers = mount.join("cgroup.subtree_control");
        if controllers.exists() {
            let available = std::fs::read_to_string(mount.join("cgroup.controllers"))?;
            let enable: String = available
                .split_whitespace()
                .map(|controller| format!("+{controller} "))
                .collect();
            // The root may already delegate them; what matters is the node's own subtree.
            let _ = std::fs::write(&controllers, enable.trim());
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), enable.trim());
        }
    }
    Ok(())
}

/// Every directory of the cgroup tree under `dir`, deepest first.
fn cgroup_dirs_deepest_first(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                cgroup_dirs_deepest_first(&entry.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

/// Removes the node's cgroup trees; fails if one stays busy.
pub(crate) fn remove_cgroup_root(timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for mount in cgroup_mounts() {
        let root = mount.join(CGROUP_ROOT);
        if !root.exists() {
            continue;
        }
        let mut dirs = Vec::new();
        cgroup_dirs_deepest_first(&root, &mut dirs);
        for dir in dirs {
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
                    Err(error) if Instant::now() >= deadline => {
                        return Err(error).with_context(|| format!("removing {}", dir.display()));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }
    }
    Ok(())
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` is in the node's cgroup tree (a container, a pod sandbox).
fn in_node_cgroup(pid: u32) -> bool {
    let needle = format!(":/{CGROUP_ROOT}");
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|cgroups| {
        cgroups.lines().any(|line| {
            line.find(&needle).is_some_and(|at| {
                let rest = &line[at + needle.len()..];
                rest.is_empty() || rest.starts_with('/')
            })
        })
    })
}

/// Whether `pid` is one of the node's own processes (containerd, a shim, the kubelet...):
/// a known executable whose command line names the state directory.
fn is_node_process(pid: u32, state_dir: &Path) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let known = exe
        .as_ref()
        .and_then(|path| path.file_name())
        .and_then(|name| name.to_str())
        .is_some_and(|name| {
            NODE_EXECUTABLES
                .iter()
                .any(|known| name.trim_end_matches(" (deleted)") == *known)
        });
    known && crate::process::runs_for_state_dir(pid, state_dir)
}

/// The pids of this process and its ancestors, which a sweep never touches.
fn self_and_ancestors() -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    let mut pid = std::process::id();
    while pid > 1 && pids.insert(pid) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        pid = status
            .lines()
            .find_map(|line| line.strip_prefix("PPid:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
    }
    pids
}

/// The processes in the node's cgroup tree: its containers and pod sandboxes.
pub(crate) fn node_container_pids() -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&pid| in_node_cgroup(pid))
        .collect()
}

/// The node's remaining processes: its daemons and everything in its cgroup tree.
pub(crate) fn node_processes(state_dir: &Path) -> Vec<u32> {
    let spared = self_and_ancestors();
    all_pids()
        .into_iter()
        .filter(|pid| !spared.contains(pid))
        .filter(|&pid| in_node_cgroup(pid) || is_node_process(pid, state_dir))
        .collect()
}

/// Kills the node's remaining processes until none is left.
pub(crate) fn kill_node_processes(state_dir: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = node_processes(state_dir);
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the node's processes {pids:?} survived SIGKILL");
        }
        for pid in &pids {
            // A process that is gone already is what we want.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the host still has the link into a node's network namespace.
pub(crate) fn host_link_exists() -> bool {
    Path::new("/sys/class/net").join(HOST_LINK).exists()
}

/// Waits for the host link to go with the node's network namespace, then deletes it if it
/// is still there (a namespace kept alive by something outside the node).
pub(crate) fn remove_host_link(timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while host_link_exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if host_link_exists() {
        let status = Command::new("ip")
            .args(["link", "delete", HOST_LINK])
            .status()
            .context("running ip link delete")?;
        if !status.success() && host_link_exists() {
            bail!("could not delete the host link {HOST_LINK}");
        }
    }
    Ok(())
}

/// Drops the host's connection-tracking entries of the node's addresses (the host's side of
/// its conversations with pods and Services), best effort: `conntrack` exits non-zero when
/// there is nothing to drop.
pub(crate) fn forget_connections() {
    for range in ["10.201.0.0/16", crate::components::SERVICE_CLUSTER_IP_RANGE] {
        for direction in ["--orig-src", "--orig-dst"] {
            let _ = Command::new("conntrack")
                .args(["--delete", direction, range])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// A picture of everything on the host a real node could change, for before/after
/// comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostState {
    entries: BTreeMap<String, String>,
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_else(|error| format!("({program} failed: {error})"))
}

/// Mount points and file system types, without the ids that change on every remount.
fn mounts() -> String {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut lines: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split_whitespace().nth(4)?;
            let fstype = after.split_whitespace().next()?;
            Some(format!("{mount_point} {fstype}"))
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// The first two levels of every cgroup hierarchy.
fn cgroup_tree() -> String {
    let mut dirs = Vec::new();
    for mount in cgroup_mounts() {
        for entry in std::fs::read_dir(&mount).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                dirs.push(entry.path().display().to_string());
            }
        }
    }
    dirs.sort();
    dirs.join("\n")
}

/// Network interfaces by name and flags (their counters and ids are left out).
fn links() -> String {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.join(" ")
}

impl HostState {
    /// Captures the host's sysctls (all of `net.ipv4.conf.*` included), links, addresses,
    /// routes, iptables and nftables rules, mounts, network namespaces, cgroups, and the
    /// directories CNI and containerd write by default.
    pub fn capture() -> Self {
        let mut entries = BTreeMap::new();
        for (key, value) in read_sysctls() {
            entries.insert(format!("sysctl {key}"), value);
        }
        for conf in std::fs::read_dir("/proc/sys/net/ipv4/conf")
            .into_iter()
            .flatten()
            .flatten()
        {
            for setting in std::fs::read_dir(conf.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Ok(value) = std::fs::read_to_string(setting.path()) {
                    let key = format!(
                        "sysctl net/ipv4/conf/{}/{}",
                        conf.file_name().to_string_lossy(),
                        setting.file_name().to_string_lossy()
                    );
                    entries.insert(key, value.trim().to_owned());
                }
            }
        }
        entries.insert("links".into(), links());
        entries.insert(
            "addresses".into(),
            command_output("ip", &["-4", "-o", "address", "show"])
                .lines()
                .map(|line| line.split(" valid_lft").next().unwrap_or(line).to_owned())
                .collect::<Vec<_>>()
                .join("\n"),
        );
        entries.insert(
            "routes".into(),
            command_output("ip", &["route", "show", "table", "all"]),
        );
        entries.insert(
            "iptables".into(),
            strip_counters(&command_output("iptables-save", &[])),
        );
        entries.insert(
            "ip6tables".into(),
            strip_counters(&command_output("ip6tables-save", &[])),
        );
        entries.insert(
            "nftables".into(),
            command_output("nft", &["list", "ruleset"]),
        );
        entries.insert("mounts".into(), mounts());
        entries.insert("cgroups".into(), cgroup_tree());
        for dir in [
            "/",
            "/etc",
            "/opt",
            "/run",
            "/var",
            "/var/lib",
            "/var/log",
            "/run/netns",
            "/var/run/netns",
            "/var/lib/cni",
            "/etc/cni",
            "/opt/cni",
            "/var/lib/containerd",
            "/run/containerd",
            "/var/lib/kubelet",
            "/var/log/pods",
            "/var/log/containers",
        ] {
            let listing = std::fs::read_dir(dir)
                .map(|entries| {
                    let mut names: Vec<String> = entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    names.sort();
                    names.join(" ")
                })
                .unwrap_or_else(|_| "(absent)".to_owned());
            entries.insert(format!("dir {dir}"), listing);
        }
        Self { entries }
    }

    /// What differs from `earlier`, one line per entry (empty when nothing does).
    pub fn differences(&self, earlier: &Self) -> Vec<String> {
        let keys: BTreeSet<&String> = self.entries.keys().chain(earlier.entries.keys()).collect();
        keys.into_iter()
            .filter_map(|key| {
                let before = earlier.entries.get(key);
                let after = self.entries.get(key);
                (before != after).then(|| {
                    format!(
                        "{key}: before {:?}, after {:?}",
                        before.map_or("(absent)", String::as_str),
                        after.map_or("(absent)", String::as_str)
                    )
                })
            })
            .collect()
    }
}

/// iptables-save output without its comments and packet counters, which change on their own.
fn strip_counters(save: &str) -> String {
    save.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| match line.split_once(" [") {
            Some((chain, _)) if line.starts_with(':') => chain.to_owned(),
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_do_not_count_as_changes() {
        let a = "# Generated by iptables-save v1.8.9 on Mon\n*nat\n:PREROUTING ACCEPT [3:180]\nCOMMIT\n";
        let b = "# Generated by iptables-save v1.8.9 on Tue\n*nat\n:PREROUTING ACCEPT [9:540]\nCOMMIT\n";
        assert_eq!(strip_counters(a), strip_counters(b));
        assert_ne!(
            strip_counters(a),
            strip_counters("*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n")
        );
    }

    #[test]
    fn a_changed_entry_is_reported() {
        let before = HostState {
            entries: BTreeMap::from([("sysctl kernel/panic".to_owned(), "1".to_owned())]),
        };
        let after = HostState {
            entries: BTreeMap::from([("sysctl kernel/panic".to_owned(), "10".to_owned())]),
        };
        assert!(before.differences(&before).is_empty());
        let differences = after.differences(&before);
        assert_eq!(differences.len(), 1);
        assert!(differences[0].contains("kernel/panic"), "{differences:?}");
    }

    #[test]
    fn this_process_is_never_one_of_the_nodes() {
        assert!(self_and_ancestors().contains(&std::process::id()));
        assert!(!node_processes(Path::new("/no/such/state/dir")).contains(&std::process::id()));
    }
}
