//! The cluster's certificates and keys, generated fresh for every cluster.
//!
//! One self-signed CA signs the API server's serving certificate and one client
//! certificate per identity (the real node's kubelet and kube-proxy included). The CA key doubles as the controller-manager's cluster signing
//! key. Service-account tokens are signed with their own ECDSA P-256 key. Everything is
//! written as PEM under `pki/`; nothing is trusted outside the cluster's state directory.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::layout::Layout;

/// Who a client certificate says its holder is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIdentity {
    /// File stem of the certificate, key and kubeconfig.
    pub(crate) name: &'static str,
    /// The user name the API server sees.
    pub(crate) user: &'static str,
    /// The group the API server sees, if any.
    pub(crate) group: Option<&'static str>,
}

/// The cluster administrator: the identity of the kubeconfig tests and users get.
pub(crate) const ADMIN: ClientIdentity = ClientIdentity {
    name: "admin",
    user: "admin",
    group: Some("system:masters"),
};

pub(crate) const CONTROLLER_MANAGER: ClientIdentity = ClientIdentity {
    name: "kube-controller-manager",
    user: "system:kube-controller-manager",
    group: None,
};

pub(crate) const SCHEDULER: ClientIdentity = ClientIdentity {
    name: "kube-scheduler",
    user: "system:kube-scheduler",
    group: None,
};

/// kwok plays every kubelet, so it gets a user of its own that audit records can tell apart.
pub(crate) const KWOK: ClientIdentity = ClientIdentity {
    name: "kwok",
    user: "system:kwok-controller",
    group: Some("system:masters"),
};

pub(crate) const PROVISIONER: ClientIdentity = ClientIdentity {
    name: "provisioner",
    user: "system:sd35-local-provisioner",
    group: Some("system:masters"),
};

/// The real node's kubelet, as the Node authorizer expects it.
pub(crate) const KUBELET: ClientIdentity = ClientIdentity {
    name: "kubelet",
    user: "system:node:real-0",
    group: Some("system:nodes"),
};

/// kube-proxy, bound to `system:node-proxier` by the default RBAC policy.
pub(crate) const KUBE_PROXY: ClientIdentity = ClientIdentity {
    name: "kube-proxy",
    user: "system:kube-proxy",
    group: None,
};

/// The API server when it calls a kubelet (logs, exec, port-forward); the kubelet asks the
/// API server whether this user may, through its Webhook authorization.
pub(crate) const APISERVER_KUBELET_CLIENT: ClientIdentity = ClientIdentity {
    name: "apiserver-kubelet-client",
    user: "kube-apiserver-kubelet-client",
    group: Some("system:masters"),
};

/// Flux's controllers (with `--flux`), one user each so the audit log tells them apart, all
/// cluster administrators, as Flux's own installation binds them.
pub(crate) const FLUX_SOURCE_CONTROLLER: ClientIdentity = ClientIdentity {
    name: "flux-source-controller",
    user: "flux:source-controller",
    group: Some("system:masters"),
};

pub(crate) const FLUX_KUSTOMIZE_CONTROLLER: ClientIdentity = ClientIdentity {
    name: "flux-kustomize-controller",
    user: "flux:kustomize-controller",
    group: Some("system:masters"),
};

pub(crate) const FLUX_HELM_CONTROLLER: ClientIdentity = ClientIdentity {
    name: "flux-helm-controller",
    user: "flux:helm-controller",
    group: Some("system:masters"),
};

/// Every identity that gets a client certificate and a kubeconfig.
pub(crate) const CLIENT_IDENTITIES: [ClientIdentity; 11] = [
    ADMIN,
    CONTROLLER_MANAGER,
    SCHEDULER,
    KWOK,
    PROVISIONER,
    KUBELET,
    KUBE_PROXY,
    APISERVER_KUBELET_CLIENT,
    FLUX_SOURCE_CONTROLLER,
    FLUX_KUSTOMIZE_CONTROLLER,
    FLUX_HELM_CONTROLLER,
];

/// File stems of the non-client material.
pub(crate) const CA: &str = "ca";
pub(crate) const APISERVER: &str = "apiserver";
pub(crate) const SERVICE_ACCOUNT: &str = "service-account";

/// The first address of `--service-cluster-ip-range`, which the `kubernetes` Service gets.
pub(crate) const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// Generates the CA, the serving and client certificates and the service-account key, and
/// writes them under the layout's `pki/` directory.
pub(crate) fn write_all(layout: &Layout) -> Result<()> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sd35-local-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write_pem(layout, CA, &ca_cert.pem(), &ca_key)?;
    let ca = Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate()?;
    let serving = serving_params()?.signed_by(&serving_key, &ca)?;
    write_pem(layout, APISERVER, &serving.pem(), &serving_key)?;

    for identity in CLIENT_IDENTITIES {
        let key = KeyPair::generate()?;
        let cert = client_params(identity).signed_by(&key, &ca)?;
        write_pem(layout, identity.name, &cert.pem(), &key)?;
    }

    let service_account_key = KeyPair::generate()?;
    write_file(
        &layout.key(SERVICE_ACCOUNT),
        &service_account_key.serialize_pem(),
        0o600,
    )?;
    write_file(
        &layout.service_account_public_key(),
        &service_account_key.public_key_pem(),
        0o644,
    )?;
    Ok(())
}

fn serving_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ])?;
    params.subject_alt_names.extend([
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V4(KUBERNETES_SERVICE_IP)),
        // Where the API server listens when the cluster has a real node.
        SanType::IpAddress(IpAddr::V4(crate::node::HOST_ADDRESS)),
    ]);
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn client_params(identity: ClientIdentity) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, identity.user);
    if let Some(group) = identity.group {
        params
            .distinguished_name
            .push(DnType::OrganizationName, group);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params
}

fn write_pem(layout: &Layout, name: &str, cert_pem: &str, key: &KeyPair) -> Result<()> {
    write_file(&layout.cert(name), cert_pem, 0o644)?;
    write_file(&layout.key(name), &key.serialize_pem(), 0o600)
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
