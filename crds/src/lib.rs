//! The `SD35Deployment` API (group `sd35.io`, version `v1alpha1`) and its CRD.
//!
//! These types are the source of truth: the CRD YAML under `crds/`, the Helm chart's copy
//! and the API reference `docs/api.md` are generated from them by the `crdgen` binary, and a
//! test fails when any of them drifts.

mod docs;
mod spec;
mod status;

pub use docs::api_reference_markdown;
pub use spec::*;
pub use status::*;

use kube::CustomResourceExt;

/// File name of the generated CRD, in each of [`CRD_DIRS`].
pub const CRD_FILE_NAME: &str = "sd35deployments.sd35.io.yaml";

/// Directories (relative to the repository root) holding a generated copy of the CRD:
/// `crds/` for `kubectl apply -f crds/`, and the Helm chart's `files/crds/`, which the chart
/// renders as a template so that `helm upgrade` upgrades the CRD too.
pub const CRD_DIRS: [&str; 2] = ["crds", "charts/sd35-operator/files/crds"];

/// The generated API reference, relative to the repository root.
pub const API_REFERENCE_PATH: &str = "docs/api.md";

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> String {
    let crd = SD35Deployment::crd();
    let body = serde_yaml::to_string(&crd).expect("a CRD always serialises to YAML");
    format!(
        "# Generated from the Rust types in crds/src by `cargo run -p sd35-crds --bin crdgen`.\n\
         # Do not edit by hand.\n{body}"
    )
}
