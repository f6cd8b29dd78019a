//! Kubeconfig files: one per client identity, all pointing at the loopback API server and
//! naming the certificate files under `pki/` by absolute path; and ServiceAccount token ones.

use std::path::Path;

use anyhow::{Context, Result};
use kube::config::{
    AuthInfo, Cluster as KubeconfigCluster, Context as KubeconfigContext, Kubeconfig,
    NamedAuthInfo, NamedCluster, NamedContext,
};

use crate::layout::Layout;
use crate::pki::{self, ClientIdentity};

/// The name of the cluster, context and user entries in every kubeconfig written here.
pub const CONTEXT_NAME: &str = "sd35-local";

/// Writes the kubeconfig of `identity` to `path`.
pub(crate) fn write(
    layout: &Layout,
    server_url: &str,
    identity: ClientIdentity,
    path: &Path,
) -> Result<()> {
    let user = AuthInfo {
        client_certificate: Some(path_string(&layout.cert(identity.name))?),
        client_key: Some(path_string(&layout.key(identity.name))?),
        ..Default::default()
    };
    write_with(layout, server_url, user, "default", path)
}

/// Writes a kubeconfig that authenticates with a bearer `token` (for example a
/// ServiceAccount's, from the TokenRequest API) instead of a client certificate.
pub(crate) fn write_token(
    layout: &Layout,
    server_url: &str,
    token: &str,
    namespace: &str,
    path: &Path,
) -> Result<()> {
    let user = AuthInfo {
        token: Some(token.to_owned().into()),
        ..Default::default()
    };
    write_with(layout, server_url, user, namespace, path)
}

fn write_with(
    layout: &Layout,
    server_url: &str,
    user: AuthInfo,
    namespace: &str,
    path: &Path,
) -> Result<()> {
    let config = Kubeconfig {
        clusters: vec![NamedCluster {
            name: CONTEXT_NAME.to_owned(),
            cluster: Some(KubeconfigCluster {
                server: Some(server_url.to_owned()),
                certificate_authority: Some(path_string(&layout.cert(pki::CA))?),
                ..Default::default()
            }),
            other: Default::default(),
        }],
        auth_infos: vec![NamedAuthInfo {
            name: CONTEXT_NAME.to_owned(),
            auth_info: Some(user),
            other: Default::default(),
        }],
        contexts: vec![NamedContext {
            name: CONTEXT_NAME.to_owned(),
            context: Some(KubeconfigContext {
                cluster: CONTEXT_NAME.to_owned(),
                user: Some(CONTEXT_NAME.to_owned()),
                namespace: Some(namespace.to_owned()),
                ..Default::default()
            }),
            other: Default::default(),
        }],
        current_context: Some(CONTEXT_NAME.to_owned()),
        api_version: Some("v1".to_owned()),
        kind: Some("Config".to_owned()),
        ..Default::default()
    };
    let yaml = serde_yaml::to_string(&config).context("serializing a kubeconfig")?;
    std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))
}

/// Reads a kubeconfig written by [`write`] into a client configuration.
pub async fn client_config(path: &Path) -> Result<kube::Config> {
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", path.display()))
}

fn path_string(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not valid UTF-8", path.display()))
}
