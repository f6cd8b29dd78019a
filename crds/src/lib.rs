//! The `SD35Deployment` API (group `sd35.io`, version `v1alpha1`) and its CRD.
//!
//! These types are the source of truth: the CRD YAML under `crds/` and the Helm chart's copy
//! are generated from them by the `crdgen` binary, and a test fails when either drifts.

mod spec;
mod status;

pub use spec::*;
pub use status::*;

use kube::CustomResourceExt;

/// File name of the generated CRD, both in `crds/` and in the chart's `crds/`.
pub const CRD_FILE_NAME: &str = "sd35deployments.sd35.io.yaml";

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> String {
    let crd = SD35Deployment::crd();
    let body = serde_yaml::to_string(&crd).expect("a CRD always serialises to YAML");
    format!(
        "# Generated from the Rust types in crds/src by `cargo run -p sd35-crds --bin crdgen`.\n\
         # Do not edit by hand.\n{body}"
    )
}
