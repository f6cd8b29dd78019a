//! The real node's configuration files and command lines, as pure functions of the cluster's
//! layout, so they are tested without starting anything.
//!
//! Everything listens on the node's own addresses (inside its network namespace) or on its
//! loopback; every path is in the cluster's state directory, except the host's CNI plugins
//! and the node's private `/run`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::layout::Layout;
use crate::pki;
use crate::process::ProcessSpec;

use super::{CGROUP_ROOT, NODE_ADDRESS, POD_BRIDGE, POD_CIDR, REAL_NODE_NAME};

/// The kubelet's API port on the node's address.
pub(crate) const KUBELET_PORT: u16 = 10250;

/// Labels the real node registers with, besides the kubelet's own (`kubernetes.io/hostname`
/// and friends).
pub(crate) const NODE_LABELS: &str = "sd35.io/node=real,node.kubernetes.io/instance-type=local";

/// The taint the real node registers with: only pods that tolerate it run there, so the
/// GPU examples' Jobs stay on the kwok nodes (where they "succeed" without running).
pub const REAL_NODE_TAINT: &str = "sd35.io/real-node=true:NoSchedule";

/// The free disk space below which the kubelet evicts pods (its `nodefs` and `imagefs`
/// thresholds).
pub(crate) const EVICTION_DISK_FREE: &str = "512Mi";

/// What the node's files and command lines are made from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NodeInputs<'a> {
    pub(crate) layout: &'a Layout,
    /// The directory of the kubelet and kube-proxy executables.
    pub(crate) bin_dir: &'a Path,
    /// The directory of the CNI plugins (`bridge`, `host-local`, `loopback`).
    pub(crate) cni_bin_dir: &'a Path,
    /// The image containerd runs pod sandboxes from.
    pub(crate) pause_image: &'a str,
    /// The pid of the process holding the node's namespaces.
    pub(crate) holder_pid: u32,
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// containerd's configuration: its own socket, root and CNI files; no cgroup driver
/// delegation (the kubelet uses cgroupfs); and `restrict_oom_score_adj`, because lowering an
/// OOM score needs a capability sandboxes like CI runners often lack.
pub(crate) fn containerd_toml(inputs: NodeInputs<'_>) -> String {
    let layout = inputs.layout;
    format!(
        r#"version = 2
root = "{root}"
# The node's /run is a tmpfs of its own mount namespace: shim sockets and runc state vanish
# with it.
state = "/run/containerd"
oom_score = 0

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"#,
        root = display(&layout.node_path("containerd")),
        socket = display(&layout.containerd_socket()),
        opt = display(&layout.node_path("containerd-opt")),
        pause = inputs.pause_image,
        cni_bin = display(inputs.cni_bin_dir),
        cni_conf = display(&layout.node_path("cni")),
    )
}

/// The pod network: one bridge in the node's network namespace, addresses from
/// [`POD_CIDR`], the bridge as every pod's gateway.
pub(crate) fn cni_conflist(layout: &Layout) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "sd35-pods",
        "plugins": [{
            "type": "bridge",
            "bridge": POD_BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_CIDR}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": display(&layout.node_path("cni-ipam")),
            },
        }],
    })
    .to_string()
}

/// The resolver configuration pods get: a name server on the pod's own loopback, where
/// nothing answers, so no name is ever resolved beyond the machine (everything here is
/// reached by address).
pub(crate) const RESOLV_CONF: &str = "\
# The local node's pods resolve no names: everything they reach is addressed by IP.
nameserver 127.0.0.1
options ndots:1 timeout:1 attempts:1
";

/// The kubelet's configuration file.
pub(crate) fn kubelet_yaml(inputs: NodeInputs<'_>) -> String {
    let layout = inputs.layout;
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {address}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup_root}
cgroupsPerQOS: true
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{socket}
resolvConf: {resolv}
clusterDomain: cluster.local
podLogsDir: {pod_logs}
staticPodPath: ""
registerNode: true
rotateCertificates: false
serverTLSBootstrap: false
serializeImagePulls: false
maxPods: 30
oomScoreAdj: 0
# Images are imported, never pulled: none may be collected.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# Absolute disk thresholds: a share of a large disk (2% of 250 GB is 5 GB) would put the
# node under disk pressure with gigabytes free, evicting the pods a test waits for.
evictionHard:
  memory.available: 100Mi
  nodefs.available: {min_free}
  nodefs.inodesFree: 1%
  imagefs.available: {min_free}
"#,
        address = NODE_ADDRESS,
        port = KUBELET_PORT,
        ca = display(&layout.cert(pki::CA)),
        cgroup_root = CGROUP_ROOT,
        socket = display(&layout.containerd_socket()),
        resolv = display(&layout.node_path("resolv.conf")),
        pod_logs = display(&layout.node_path("pod-logs")),
        min_free = EVICTION_DISK_FREE,
    )
}

/// kube-proxy's configuration file: iptables mode, and none of the host-wide settings it
/// would otherwise change (conntrack table size and timeouts, `route_localnet`).
pub(crate) fn kube_proxy_yaml(layout: &Layout) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: {node}
clusterCIDR: {pods}
bindAddress: {address}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
clientConnection:
  kubeconfig: {kubeconfig}
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
  syncPeriod: 30s
  minSyncPeriod: 0s
"#,
        node = REAL_NODE_NAME,
        pods = POD_CIDR,
        address = NODE_ADDRESS,
        kubeconfig = display(&layout.component_kubeconfig(pki::KUBE_PROXY.name)),
    )
}

/// `--flag=value` as one argument.
fn flag(name: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut arg = OsString::from(format!("--{name}="));
    arg.push(value);
    arg
}

/// `program args...` run inside the node's namespaces, through `nsenter`.
fn in_node(
    name: &'static str,
    holder_pid: u32,
    program: PathBuf,
    args: Vec<OsString>,
) -> ProcessSpec {
    let mut all: Vec<OsString> = vec![
        "--target".into(),
        holder_pid.to_string().into(),
        "--net".into(),
        "--mount".into(),
        "--".into(),
        program.into(),
    ];
    all.extend(args);
    ProcessSpec {
        name,
        program: PathBuf::from("nsenter"),
        args: all,
        envs: Vec::new(),
    }
}

/// The process holding the node's network and mount namespaces:
/// `unshare --net --mount -- <localcluster> node-namespace --state-dir <root>`.
pub(crate) fn holder(layout: &Layout, localcluster: &Path) -> ProcessSpec {
    ProcessSpec {
        name: "node-namespace",
        program: PathBuf::from("unshare"),
        args: vec![
            "--net".into(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "--".into(),
            localcluster.into(),
            "node-namespace".into(),
            "--state-dir".into(),
            layout.root().into(),
        ],
        envs: Vec::new(),
    }
}

pub(crate) fn containerd(inputs: NodeInputs<'_>) -> ProcessSpec {
    in_node(
        "containerd",
        inputs.holder_pid,
        PathBuf::from("containerd"),
        vec![
            flag("config", inputs.layout.node_path("containerd.toml")),
            flag("log-level", "warn"),
        ],
    )
}

pub(crate) fn kubelet(inputs: NodeInputs<'_>) -> ProcessSpec {
    let layout = inputs.layout;
    in_node(
        "kubelet",
        inputs.holder_pid,
        inputs.bin_dir.join("kubelet"),
        vec![
            flag("config", layout.node_path("kubelet.yaml")),
            flag("kubeconfig", layout.component_kubeconfig(pki::KUBELET.name)),
            flag("root-dir", layout.node_path("kubelet")),
            flag("hostname-override", REAL_NODE_NAME),
            flag("node-ip", NODE_ADDRESS.to_string()),
            flag("node-labels", NODE_LABELS),
            flag("register-with-taints", REAL_NODE_TAINT),
        ],
    )
}

pub(crate) fn kube_proxy(inputs: NodeInputs<'_>) -> ProcessSpec {
    in_node(
        "kube-proxy",
        inputs.holder_pid,
        inputs.bin_dir.join("kube-proxy"),
        vec![flag("config", inputs.layout.node_path("kube-proxy.yaml"))],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(layout: &Layout) -> NodeInputs<'_> {
        NodeInputs {
            layout,
            bin_dir: Path::new("/bin-dir"),
            cni_bin_dir: Path::new("/usr/lib/cni"),
            pause_image: "localhost/sd35/pause:1",
            holder_pid: 42,
        }
    }

    #[test]
    fn containerd_keeps_its_files_in_the_state_dir_and_never_lowers_oom_scores() {
        let layout = Layout::new(PathBuf::from("/state"));
        let toml = containerd_toml(inputs(&layout));
        assert!(toml.contains("restrict_oom_score_adj = true"));
        assert!(toml.contains("SystemdCgroup = false"));
        assert!(toml.contains(r#"address = "/state/node/containerd.sock""#));
        assert!(toml.contains(r#"root = "/state/node/containerd""#));
        assert!(toml.contains(r#"sandbox_image = "localhost/sd35/pause:1""#));
        for line in toml.lines().filter(|line| line.contains("= \"/")) {
            assert!(
                line.contains("\"/state/")
                    || line.contains("\"/run/")
                    || line.contains("/usr/lib/cni"),
                "containerd writes outside the state dir: {line}"
            );
        }
    }

    #[test]
    fn the_kubelet_listens_on_the_node_address_and_uses_cgroupfs_under_its_own_root() {
        let layout = Layout::new(PathBuf::from("/state"));
        let yaml: serde_yaml::Value = serde_yaml::from_str(&kubelet_yaml(inputs(&layout))).unwrap();
        assert_eq!(yaml["address"].as_str(), Some("10.201.255.2"));
        assert_eq!(yaml["cgroupDriver"].as_str(), Some("cgroupfs"));
        assert_eq!(yaml["cgroupRoot"].as_str(), Some("/sd35-real-0"));
        assert_eq!(yaml["failCgroupV1"].as_bool(), Some(false));
        assert_eq!(yaml["authorization"]["mode"].as_str(), Some("Webhook"));
        assert_eq!(
            yaml["authentication"]["anonymous"]["enabled"].as_bool(),
            Some(false)
        );
        assert_eq!(yaml["resolvConf"].as_str(), Some("/state/node/resolv.conf"));
        // Disk thresholds in bytes, never a share of the disk.
        for signal in ["nodefs.available", "imagefs.available"] {
            assert_eq!(yaml["evictionHard"][signal].as_str(), Some("512Mi"));
        }
        let spec = kubelet(inputs(&layout));
        let args: Vec<String> = spec
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(&args[..5], ["--target", "42", "--net", "--mount", "--"]);
        assert!(args.contains(&"--node-ip=10.201.255.2".to_owned()));
        assert!(args.contains(&"--hostname-override=real-0".to_owned()));
    }

    #[test]
    fn kube_proxy_leaves_host_wide_settings_alone() {
        let layout = Layout::new(PathBuf::from("/state"));
        let yaml: serde_yaml::Value = serde_yaml::from_str(&kube_proxy_yaml(&layout)).unwrap();
        assert_eq!(yaml["conntrack"]["maxPerCore"].as_i64(), Some(0));
        assert_eq!(
            yaml["conntrack"]["tcpEstablishedTimeout"].as_str(),
            Some("0s")
        );
        assert_eq!(
            yaml["iptables"]["localhostNodePorts"].as_bool(),
            Some(false)
        );
        assert_eq!(yaml["mode"].as_str(), Some("iptables"));
    }

    #[test]
    fn pods_get_the_bridge_as_gateway_and_no_outside_resolver() {
        let layout = Layout::new(PathBuf::from("/state"));
        let conf: serde_json::Value = serde_json::from_str(&cni_conflist(&layout)).unwrap();
        let bridge = &conf["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], POD_CIDR);
        assert_eq!(bridge["ipam"]["dataDir"], "/state/node/cni-ipam");
        let servers: Vec<&str> = RESOLV_CONF
            .lines()
            .filter_map(|line| line.strip_prefix("nameserver "))
            .collect();
        assert_eq!(servers, ["127.0.0.1"]);
    }
}
