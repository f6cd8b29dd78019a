//! Validate and default an SD35Deployment (pure): everything the builders need, decided once.
//!
//! The schema already rejects what it can express; this step checks what it cannot and fills
//! in defaults that depend on other fields (the variant's official repository and cache size,
//! the keys). Its output is the single input of every builder.

use sd35_crds::{
    AccessMode, EngineBuild, Precision, SD35Deployment, SD35DeploymentSpec, SecretKeyRef, Variant,
};

use crate::config::OperatorConfig;
use crate::keys::{self, SourceIdentity};
use crate::labels;

/// GPU product node label set by NVIDIA's GPU feature discovery.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";

/// A spec the schema accepts but the operator cannot act on; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// Where the fetch Job gets the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchSource {
    HuggingFace {
        endpoint: String,
        repo: String,
        revision: String,
    },
    Http {
        url: String,
    },
    /// Copy from a claim mounted read-only at the import mount.
    Pvc {
        claim: String,
        path: String,
    },
}

/// The cache volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachePlan {
    /// Claim name.
    pub claim: String,
    /// Whether the operator creates and owns the claim (false for `existingClaim`).
    pub managed: bool,
    pub size: String,
    pub storage_class: Option<String>,
    pub access_modes: Vec<String>,
    pub retain: bool,
}

/// An SD35Deployment, validated and defaulted.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub name: String,
    pub namespace: String,
    pub generation: i64,
    pub spec: SD35DeploymentSpec,
    pub variant: Variant,
    pub precision: Precision,
    pub source: FetchSource,
    pub token: Option<SecretKeyRef>,
    pub cache_key: String,
    /// None when `engine.build` is `Never`.
    pub engine_key: Option<String>,
    pub cache: CachePlan,
    pub image: String,
}

/// Default cache size: weights of the variant's files plus one engine per precision.
pub fn default_cache_size(v: Variant) -> &'static str {
    match v {
        Variant::Large | Variant::LargeTurbo => "100Gi",
        Variant::Medium => "50Gi",
    }
}

fn access_mode(m: AccessMode) -> &'static str {
    match m {
        AccessMode::ReadWriteOnce => "ReadWriteOnce",
        AccessMode::ReadOnlyMany => "ReadOnlyMany",
        AccessMode::ReadWriteMany => "ReadWriteMany",
        AccessMode::ReadWriteOncePod => "ReadWriteOncePod",
    }
}

/// Validate and default one object.
pub fn resolve(obj: &SD35Deployment, config: &OperatorConfig) -> Result<Resolved, InvalidSpec> {
    let name = obj
        .metadata
        .name
        .clone()
        .ok_or_else(|| InvalidSpec("metadata.name is missing".into()))?;
    let namespace = obj
        .metadata
        .namespace
        .clone()
        .ok_or_else(|| InvalidSpec("metadata.namespace is missing".into()))?;
    let spec = obj.spec.clone();
    let variant = spec.variant;
    let precision = spec.precision;
    if !precision.is_engine_precision() {
        return Err(InvalidSpec(format!(
            "spec.precision {precision} is not served by the operator: use bf16 or fp8"
        )));
    }

    let (source, token) = match &spec.model.source {
        None => (
            FetchSource::HuggingFace {
                endpoint: config.hf_endpoint.clone(),
                repo: variant.official_repo().to_owned(),
                revision: "main".to_owned(),
            },
            None,
        ),
        Some(src) => match (&src.hugging_face, &src.http, &src.pvc) {
            (Some(hf), None, None) => (
                FetchSource::HuggingFace {
                    endpoint: hf
                        .endpoint
                        .clone()
                        .unwrap_or_else(|| config.hf_endpoint.clone()),
                    repo: hf.repo.clone(),
                    revision: hf.revision.clone(),
                },
                hf.token_secret_ref.clone(),
            ),
            (None, Some(http), None) => (
                FetchSource::Http {
                    url: http.url.clone(),
                },
                http.token_secret_ref.clone(),
            ),
            (None, None, Some(pvc)) => (
                FetchSource::Pvc {
                    claim: pvc.claim_name.clone(),
                    path: pvc.path.clone(),
                },
                None,
            ),
            _ => {
                return Err(InvalidSpec(
                    "spec.model.source must set exactly one of huggingFace, http or pvc".into(),
                ));
            }
        },
    };

    if let Some(limits) = spec
        .server
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        && limits.contains_key(&spec.server.gpu.resource_name)
    {
        return Err(InvalidSpec(format!(
            "spec.server.resources sets {0}: set GPUs with spec.server.gpu.count instead",
            spec.server.gpu.resource_name
        )));
    }
    if let (FetchSource::Pvc { claim, .. }, Some(existing)) = (&source, &spec.cache.existing_claim)
        && claim == existing
    {
        return Err(InvalidSpec(format!(
            "spec.model.source.pvc.claimName and spec.cache.existingClaim are both {claim}: the cache must be another claim, since the source is mounted read-only"
        )));
    }

    let identity = match &source {
        FetchSource::HuggingFace {
            endpoint,
            repo,
            revision,
        } => SourceIdentity::HuggingFace {
            endpoint: endpoint.clone(),
            repo: repo.clone(),
            revision: revision.clone(),
        },
        FetchSource::Http { url } => SourceIdentity::Http { url: url.clone() },
        FetchSource::Pvc { claim, path } => SourceIdentity::Pvc {
            claim: claim.clone(),
            path: path.clone(),
        },
    };
    let cache_key = keys::cache_key(variant.as_str(), &identity);
    let gpu_product = spec
        .scheduling
        .node_selector
        .get(GPU_PRODUCT_LABEL)
        .map(String::as_str);
    let engine_key = match spec.engine.build {
        EngineBuild::Auto => Some(keys::engine_key(
            &cache_key,
            precision.as_str(),
            gpu_product,
        )),
        EngineBuild::Never => None,
    };

    let cache = match &spec.cache.existing_claim {
        Some(claim) => CachePlan {
            claim: claim.clone(),
            managed: false,
            size: String::new(),
            storage_class: None,
            access_modes: Vec::new(),
            retain: true,
        },
        None => CachePlan {
            claim: labels::cache_claim(&cache_key),
            managed: true,
            size: spec
                .cache
                .size
                .clone()
                .unwrap_or_else(|| default_cache_size(variant).to_owned()),
            storage_class: spec.cache.storage_class_name.clone(),
            access_modes: spec
                .cache
                .access_modes
                .as_ref()
                .map(|m| m.iter().map(|m| access_mode(*m).to_owned()).collect())
                .unwrap_or_else(|| vec!["ReadWriteOnce".to_owned()]),
            retain: spec.cache.retain,
        },
    };

    Ok(Resolved {
        name,
        namespace,
        generation: obj.metadata.generation.unwrap_or(0),
        image: spec
            .server
            .image
            .clone()
            .unwrap_or_else(|| config.server_image.clone()),
        spec,
        variant,
        precision,
        source,
        token,
        cache_key,
        engine_key,
        cache,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(spec_yaml: &str) -> SD35Deployment {
        let indented: String = spec_yaml.lines().map(|l| format!("  {l}\n")).collect();
        serde_yaml::from_str(&format!(
            "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata: {{name: a, namespace: ns, generation: 3}}\nspec:\n{indented}"
        ))
        .unwrap()
    }

    #[test]
    fn no_source_means_the_official_repository_and_variant_cache_size() {
        let r = resolve(&obj("variant: medium"), &OperatorConfig::default()).unwrap();
        assert_eq!(
            r.source,
            FetchSource::HuggingFace {
                endpoint: "https://huggingface.co".into(),
                repo: "stabilityai/stable-diffusion-3.5-medium".into(),
                revision: "main".into()
            }
        );
        assert_eq!(r.cache.size, "50Gi");
        assert!(r.cache.managed);
        assert_eq!(r.cache.claim, format!("sd35-cache-{}", r.cache_key));
        assert_eq!(r.cache.access_modes, ["ReadWriteOnce"]);
        assert!(r.engine_key.is_some());
        assert_eq!(r.generation, 3);
    }

    #[test]
    fn the_same_model_shares_a_cache_but_not_an_engine_across_precisions() {
        let c = OperatorConfig::default();
        let a = resolve(&obj("variant: large\nprecision: bf16"), &c).unwrap();
        let b = resolve(&obj("variant: large\nprecision: fp8\nreplicas: 3"), &c).unwrap();
        assert_eq!(a.cache_key, b.cache_key);
        assert_eq!(a.cache.claim, b.cache.claim);
        assert_ne!(a.engine_key, b.engine_key);
    }

    #[test]
    fn engine_never_has_no_engine_key() {
        let r = resolve(
            &obj("variant: large\nengine: {build: Never}"),
            &OperatorConfig::default(),
        )
        .unwrap();
        assert_eq!(r.engine_key, None);
    }

    #[test]
    fn gpu_limits_in_resources_are_refused_with_the_field_to_use() {
        let err = resolve(
            &obj("variant: large\nserver:\n  resources: {limits: {nvidia.com/gpu: 2}}"),
            &OperatorConfig::default(),
        )
        .unwrap_err();
        assert!(err.0.contains("spec.server.gpu.count"), "{err}");
    }

    #[test]
    fn existing_claim_is_not_managed_and_always_kept() {
        let r = resolve(
            &obj("variant: large\ncache: {existingClaim: mine}"),
            &OperatorConfig::default(),
        )
        .unwrap();
        assert_eq!(r.cache.claim, "mine");
        assert!(!r.cache.managed);
        assert!(r.cache.retain);
    }

    #[test]
    fn importing_from_the_cache_claim_itself_is_refused() {
        let err = resolve(
            &obj(
                "variant: large\nmodel: {source: {pvc: {claimName: w}}}\ncache: {existingClaim: w}",
            ),
            &OperatorConfig::default(),
        )
        .unwrap_err();
        assert!(err.0.contains("existingClaim"), "{err}");
    }

    #[test]
    fn token_comes_from_the_source() {
        let r = resolve(
            &obj("variant: large\nmodel: {source: {huggingFace: {repo: a/b, tokenSecretRef: {name: hf}}}}"),
            &OperatorConfig::default(),
        )
        .unwrap();
        assert_eq!(
            r.token,
            Some(SecretKeyRef {
                name: "hf".into(),
                key: "token".into()
            })
        );
    }
}

/// Bytes of a storage quantity (`100Gi`, `50G`, `1.5Ti`, `1e9`), for comparing claim sizes;
/// None for what is not a plain storage quantity.
pub fn storage_bytes(quantity: &str) -> Option<f64> {
    let q = quantity.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        exp if exp.starts_with(['e', 'E']) => 10f64.powi(exp[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * scale)
}

#[cfg(test)]
mod quantity_tests {
    use super::storage_bytes;

    #[test]
    fn storage_quantities_compare_by_bytes() {
        assert_eq!(storage_bytes("1Gi"), Some(1024f64.powi(3)));
        assert_eq!(storage_bytes("1.5Ki"), Some(1536.0));
        assert_eq!(storage_bytes("2G"), Some(2e9));
        assert_eq!(storage_bytes("1e3"), Some(1000.0));
        assert!(storage_bytes("100Gi") > storage_bytes("100G"));
        assert_eq!(storage_bytes("lots"), None);
        assert_eq!(storage_bytes("5Xi"), None);
    }
}
