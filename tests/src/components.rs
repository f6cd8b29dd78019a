//! The command lines of the cluster's processes, in start order.
//!
//! Everything listens on 127.0.0.1 only, on the ports picked for this cluster — except the
//! API server of a cluster with a real node, which listens on the host's end of the link
//! into that node ([`crate::node::HOST_ADDRESS`]) so that pods reach it. Every file named
//! here lives in the cluster's state directory. The functions are pure, so the command lines
//! are tested without starting anything.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::Path;

use crate::binaries::Binaries;
use crate::layout::Layout;
use crate::pki::{
    self, APISERVER_KUBELET_CLIENT, CONTROLLER_MANAGER, KWOK, PROVISIONER, SCHEDULER,
};
use crate::ports::Ports;
use crate::process::ProcessSpec;

/// The service-account token issuer, the same as a kubeadm cluster's.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc";

/// The range Service cluster IPs are allocated from; nothing is ever routed to it.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";

/// The annotation (key=value) that hands a Node to kwok.
pub const KWOK_NODE_ANNOTATION: (&str, &str) = ("kwok.x-k8s.io/node", "fake");

/// The provisioner name of the default StorageClass, served by `sd35-localcluster provision`.
pub const LOCAL_PROVISIONER: &str = "sd35.io/local-test";

/// Controllers that need a cloud provider or node CIDRs, which this cluster has neither of.
const DISABLED_CONTROLLERS: [&str; 4] = [
    "cloud-node-lifecycle-controller",
    "node-ipam-controller",
    "node-route-controller",
    "service-lb-controller",
];

/// The audit policy: one Metadata-level event per request, recorded when the response is
/// complete (or has started, for watches), never also when it is received, so counting
/// events counts requests.
pub(crate) const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages:
  - RequestReceived
rules:
  - level: Metadata
";

/// What the command lines are built from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Inputs<'a> {
    pub(crate) layout: &'a Layout,
    pub(crate) ports: &'a Ports,
    pub(crate) binaries: &'a Binaries,
    /// The executable that has the `provision` subcommand.
    pub(crate) provisioner: &'a Path,
    /// Whether the cluster has a real node, whose pods must reach the API server.
    pub(crate) real_node: bool,
    /// Raise client limits and sync concurrency (see `ClusterOptions::high_throughput`).
    pub(crate) high_throughput: bool,
}

impl Inputs<'_> {
    /// Where the API server listens.
    pub(crate) fn api_address(&self) -> Ipv4Addr {
        api_address(self.real_node)
    }
}

/// Where the API server listens: loopback, or the host's end of the real node's link.
pub(crate) fn api_address(real_node: bool) -> Ipv4Addr {
    if real_node {
        crate::node::HOST_ADDRESS
    } else {
        Ipv4Addr::LOCALHOST
    }
}

/// kwok's configuration with raised parallelism (its client has no rate limit of its own).
pub(crate) const KWOK_HIGH_THROUGHPUT: &str = "\
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  podPlayStageParallelism: 32
  nodePlayStageParallelism: 8
  podsOnNodeSyncParallelism: 8
";

/// Where kwok's configuration is written when throughput is raised.
pub(crate) fn kwok_config_path(layout: &Layout) -> std::path::PathBuf {
    layout.root().join("kwok-config.yaml")
}

/// Client limits and sync concurrency of a control plane that is not a benchmark's ceiling.
const HIGH_QPS: &str = "2000";
const HIGH_BURST: &str = "4000";
const HIGH_CONCURRENCY: &str = "50";

/// The Go garbage collector's target of a control plane that is not a benchmark's ceiling:
/// the heap may grow to 5× the live data between collections (the default is 2×), which
/// roughly halves the collector's share of the API server's CPU for a few hundred MB more.
const HIGH_THROUGHPUT_GOGC: &str = "400";

/// The Go processes' environment when throughput is raised.
fn go_tuning(inputs: Inputs<'_>, mut spec: ProcessSpec) -> ProcessSpec {
    if inputs.high_throughput {
        spec.envs.push(("GOGC", HIGH_THROUGHPUT_GOGC.into()));
    }
    spec
}

/// The storage and the API server, started first.
pub(crate) fn api(inputs: Inputs<'_>) -> Vec<ProcessSpec> {
    vec![
        go_tuning(inputs, etcd(inputs)),
        go_tuning(inputs, kube_apiserver(inputs)),
    ]
}

/// The API server's clients, started once it is ready: the controller-manager and
/// scheduler read their delegated-auth configuration at start and exit if the RBAC
/// bootstrap policy is not in place yet.
pub(crate) fn clients(inputs: Inputs<'_>) -> Vec<ProcessSpec> {
    vec![
        go_tuning(inputs, kube_controller_manager(inputs)),
        go_tuning(inputs, kube_scheduler(inputs)),
        go_tuning(inputs, kwok(inputs)),
        provisioner(inputs),
    ]
}

fn loopback_url(scheme: &str, port: u16) -> String {
    format!("{scheme}://127.0.0.1:{port}")
}

/// The URL clients use to reach the API server.
pub(crate) fn server_url(ports: &Ports, real_node: bool) -> String {
    format!("https://{}:{}", api_address(real_node), ports.apiserver)
}

fn spec(name: &'static str, inputs: Inputs<'_>, args: Vec<OsString>) -> ProcessSpec {
    ProcessSpec {
        name,
        program: inputs.binaries.path(name),
        args,
        envs: Vec::new(),
    }
}

/// `--flag=value` as one argument.
fn flag(name: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut arg = OsString::from(format!("--{name}="));
    arg.push(value);
    arg
}

fn etcd(inputs: Inputs<'_>) -> ProcessSpec {
    let client = loopback_url("http", inputs.ports.etcd_client);
    let peer = loopback_url("http", inputs.ports.etcd_peer);
    spec(
        "etcd",
        inputs,
        vec![
            flag("name", "sd35-local"),
            flag("data-dir", inputs.layout.etcd_data()),
            flag("listen-client-urls", &client),
            flag("advertise-client-urls", &client),
            flag("listen-peer-urls", &peer),
            flag("initial-advertise-peer-urls", &peer),
            flag("initial-cluster", format!("sd35-local={peer}")),
            flag("initial-cluster-state", "new"),
            // The data dies with the cluster, so durability buys nothing but slowness.
            "--unsafe-no-fsync".into(),
            flag("log-level", "warn"),
        ],
    )
}

fn kube_apiserver(inputs: Inputs<'_>) -> ProcessSpec {
    let layout = inputs.layout;
    let address = inputs.api_address().to_string();
    let mut args = vec![
        flag("advertise-address", &address),
        flag("bind-address", &address),
        flag("secure-port", inputs.ports.apiserver.to_string()),
        flag(
            "etcd-servers",
            loopback_url("http", inputs.ports.etcd_client),
        ),
        flag("cert-dir", layout.pki_dir()),
        flag("client-ca-file", layout.cert(pki::CA)),
        flag("tls-cert-file", layout.cert(pki::APISERVER)),
        flag("tls-private-key-file", layout.key(pki::APISERVER)),
        flag("service-account-issuer", SERVICE_ACCOUNT_ISSUER),
        flag(
            "service-account-key-file",
            layout.service_account_public_key(),
        ),
        flag(
            "service-account-signing-key-file",
            layout.key(pki::SERVICE_ACCOUNT),
        ),
        flag("service-cluster-ip-range", SERVICE_CLUSTER_IP_RANGE),
        flag("authorization-mode", "Node,RBAC"),
        flag("allow-privileged", "true"),
        flag("audit-policy-file", layout.audit_policy()),
        flag("audit-log-path", layout.audit_log()),
        flag("audit-log-format", "json"),
        flag("profiling", "false"),
    ];
    if inputs.real_node {
        // The `kubernetes` Service's endpoint is the advertised address, which pods route
        // to. The API server reaches the kubelet by its InternalIP (a lookup of the node's
        // name would go to the machine's resolver) with a client certificate the kubelet's
        // Webhook authorization accepts.
        args.extend([
            flag("kubelet-preferred-address-types", "InternalIP"),
            flag(
                "kubelet-client-certificate",
                layout.cert(APISERVER_KUBELET_CLIENT.name),
            ),
            flag(
                "kubelet-client-key",
                layout.key(APISERVER_KUBELET_CLIENT.name),
            ),
        ]);
    } else {
        // The `kubernetes` Service would list 127.0.0.1 as its endpoint, which Endpoints
        // validation rejects as loopback; without a real node nothing routes to it anyway.
        args.push(flag("endpoint-reconciler-type", "none"));
    }
    spec("kube-apiserver", inputs, args)
}

/// The flags a component needs to talk to, and authenticate its own callers with, the API
/// server as `kubeconfig`'s identity.
fn component_auth(layout: &Layout, identity: &str) -> Vec<OsString> {
    let kubeconfig = layout.component_kubeconfig(identity);
    vec![
        flag("kubeconfig", &kubeconfig),
        flag("authentication-kubeconfig", &kubeconfig),
        flag("authorization-kubeconfig", &kubeconfig),
    ]
}

fn kube_controller_manager(inputs: Inputs<'_>) -> ProcessSpec {
    let layout = inputs.layout;
    let controllers = std::iter::once("*".to_owned())
        .chain(DISABLED_CONTROLLERS.iter().map(|name| format!("-{name}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut args = component_auth(layout, CONTROLLER_MANAGER.name);
    args.extend([
        flag("bind-address", "127.0.0.1"),
        flag("secure-port", inputs.ports.controller_manager.to_string()),
        flag("leader-elect", "false"),
        flag("controllers", controllers),
        flag("use-service-account-credentials", "true"),
        flag(
            "service-account-private-key-file",
            layout.key(pki::SERVICE_ACCOUNT),
        ),
        flag("root-ca-file", layout.cert(pki::CA)),
        flag("cluster-signing-cert-file", layout.cert(pki::CA)),
        flag("cluster-signing-key-file", layout.key(pki::CA)),
        flag("service-cluster-ip-range", SERVICE_CLUSTER_IP_RANGE),
    ]);
    if inputs.high_throughput {
        args.extend([
            flag("kube-api-qps", HIGH_QPS),
            flag("kube-api-burst", HIGH_BURST),
            flag("concurrent-deployment-syncs", HIGH_CONCURRENCY),
            flag("concurrent-replicaset-syncs", HIGH_CONCURRENCY),
            flag("concurrent-job-syncs", HIGH_CONCURRENCY),
            flag("concurrent-gc-syncs", HIGH_CONCURRENCY),
            flag("concurrent-service-endpoint-syncs", HIGH_CONCURRENCY),
            flag("concurrent-endpoint-syncs", HIGH_CONCURRENCY),
            flag("concurrent-ttl-after-finished-syncs", HIGH_CONCURRENCY),
        ]);
    }
    spec("kube-controller-manager", inputs, args)
}

fn kube_scheduler(inputs: Inputs<'_>) -> ProcessSpec {
    let mut args = component_auth(inputs.layout, SCHEDULER.name);
    args.extend([
        flag("bind-address", "127.0.0.1"),
        flag("secure-port", inputs.ports.scheduler.to_string()),
        flag("leader-elect", "false"),
    ]);
    if inputs.high_throughput {
        args.extend([
            flag("kube-api-qps", HIGH_QPS),
            flag("kube-api-burst", HIGH_BURST),
        ]);
    }
    spec("kube-scheduler", inputs, args)
}

fn kwok(inputs: Inputs<'_>) -> ProcessSpec {
    let (key, value) = KWOK_NODE_ANNOTATION;
    let mut spec = spec(
        "kwok",
        inputs,
        vec![
            flag("kubeconfig", inputs.layout.component_kubeconfig(KWOK.name)),
            flag("manage-all-nodes", "false"),
            flag(
                "manage-nodes-with-annotation-selector",
                format!("{key}={value}"),
            ),
            flag("server-address", format!("127.0.0.1:{}", inputs.ports.kwok)),
            // Node leases are the heartbeat the node lifecycle controller reads; without
            // them every node is marked NotReady after its 50 s grace period.
            flag("node-lease-duration-seconds", "40"),
        ],
    );
    if inputs.high_throughput {
        spec.args
            .push(flag("config", kwok_config_path(inputs.layout)));
    }
    // kwok also reads ~/.kwok/kwok.yaml when it exists; its work dir keeps it hermetic, so
    // only the built-in stages apply.
    spec.envs
        .push(("KWOK_WORKDIR", inputs.layout.kwok_workdir().into()));
    spec
}

fn provisioner(inputs: Inputs<'_>) -> ProcessSpec {
    ProcessSpec {
        name: "provisioner",
        program: inputs.provisioner.to_path_buf(),
        args: vec![
            "provision".into(),
            "--kubeconfig".into(),
            inputs.layout.component_kubeconfig(PROVISIONER.name).into(),
            "--root".into(),
            inputs.layout.volumes_dir().into(),
        ],
        envs: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn all_specs() -> Vec<ProcessSpec> {
        specs(false, false)
    }

    fn specs(real_node: bool, high_throughput: bool) -> Vec<ProcessSpec> {
        let layout = Layout::new(PathBuf::from("/state"));
        let ports = Ports {
            etcd_client: 1001,
            etcd_peer: 1002,
            apiserver: 1003,
            controller_manager: 1004,
            scheduler: 1005,
            kwok: 1006,
        };
        let binaries = Binaries::unchecked(PathBuf::from("/bin-dir"));
        let inputs = Inputs {
            layout: &layout,
            ports: &ports,
            binaries: &binaries,
            provisioner: Path::new("/bin-dir/sd35-localcluster"),
            real_node,
            high_throughput,
        };
        let mut specs = api(inputs);
        specs.extend(clients(inputs));
        specs
    }

    fn args(spec: &ProcessSpec) -> Vec<String> {
        spec.args
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn every_address_is_loopback() {
        for spec in all_specs() {
            for arg in args(&spec) {
                let value = arg.split_once('=').map_or("", |(_, value)| value);
                let is_address_flag = ["address", "url", "cluster="]
                    .iter()
                    .any(|marker| arg.contains(marker));
                if is_address_flag && arg.starts_with("--") {
                    assert!(
                        value.contains("127.0.0.1"),
                        "{} listens beyond loopback: {arg}",
                        spec.name
                    );
                }
            }
        }
    }

    #[test]
    fn with_a_real_node_only_the_api_server_leaves_loopback_for_the_node_link() {
        for spec in specs(true, false) {
            for arg in args(&spec) {
                let value = arg.split_once('=').map_or("", |(_, value)| value);
                if arg.starts_with("--") && (arg.contains("address=") || arg.contains("url")) {
                    let on_link = value.contains("10.201.255.1");
                    assert!(
                        value.contains("127.0.0.1")
                            || (on_link && spec.name == "kube-apiserver")
                            || arg.starts_with("--kubelet-preferred-address-types"),
                        "{} listens beyond loopback and the node link: {arg}",
                        spec.name
                    );
                }
            }
        }
        let apiserver = args(&specs(true, false)[1]);
        assert!(apiserver.contains(&"--bind-address=10.201.255.1".to_owned()));
        assert!(
            !apiserver
                .iter()
                .any(|arg| arg.starts_with("--endpoint-reconciler-type"))
        );
        assert!(apiserver.contains(&"--kubelet-preferred-address-types=InternalIP".to_owned()));
    }

    #[test]
    fn every_file_is_in_the_state_dir() {
        for spec in all_specs() {
            for arg in args(&spec) {
                let value = arg.split_once('=').map_or(arg.as_str(), |(_, value)| value);
                if value.starts_with('/') {
                    assert!(
                        value.starts_with("/state/") || value.starts_with("/bin-dir/"),
                        "{} uses a file outside the state dir: {arg}",
                        spec.name
                    );
                }
            }
        }
    }

    #[test]
    fn etcd_skips_fsync_and_controllers_skip_cloud() {
        let specs = all_specs();
        assert!(args(&specs[0]).contains(&"--unsafe-no-fsync".to_owned()));
        let controllers = args(&specs[2])
            .into_iter()
            .find(|arg| arg.starts_with("--controllers="))
            .unwrap();
        assert!(controllers.starts_with("--controllers=*,"));
        assert!(controllers.contains("-cloud-node-lifecycle-controller"));
    }

    #[test]
    fn high_throughput_raises_client_limits_and_concurrency_only_when_asked() {
        let raised = |specs: &[ProcessSpec], name: &str| {
            let spec = specs.iter().find(|s| s.name == name).unwrap();
            args(spec)
        };
        let normal = specs(false, false);
        let fast = specs(false, true);
        for name in ["kube-controller-manager", "kube-scheduler"] {
            assert!(
                !raised(&normal, name)
                    .iter()
                    .any(|a| a.starts_with("--kube-api-qps"))
            );
            assert!(raised(&fast, name).contains(&format!("--kube-api-qps={HIGH_QPS}")));
        }
        assert!(
            raised(&fast, "kube-controller-manager")
                .contains(&"--concurrent-job-syncs=50".to_owned())
        );
        assert!(raised(&fast, "kwok").contains(&"--config=/state/kwok-config.yaml".to_owned()));
        assert!(
            !raised(&normal, "kwok")
                .iter()
                .any(|a| a.starts_with("--config"))
        );
        let gogc = |specs: &[ProcessSpec], name: &str| {
            let spec = specs.iter().find(|s| s.name == name).unwrap();
            spec.envs
                .iter()
                .find(|(key, _)| *key == "GOGC")
                .map(|(_, value)| value.to_string_lossy().into_owned())
        };
        for name in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
        ] {
            assert_eq!(gogc(&fast, name).as_deref(), Some(HIGH_THROUGHPUT_GOGC));
            assert_eq!(gogc(&normal, name), None);
        }
    }
}
