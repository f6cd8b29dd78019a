//! Validate and default an SD35Deployment (pure): everything the builders need, decided once.
//!
//! The schema already rejects what it can express; this step checks what it cannot and fills
//! in defaults that depend on other fields (the variant's official repository and cache size,
//! the keys). Its output is the single input of every builder.

use std::path::PathBuf;

use sd35_contract::{
    AdapterSourceArgs, CACHE_MOUNT, FetchAdapterArgs, IMPORT_MOUNT, TERMINATION_MESSAGE_PATH,
};
use sd35_crds::{
    AccessMode, AdapterKind, AdapterSource, EngineBuild, EnginePrecision, SD35Deployment,
    SD35DeploymentSpec, SecretKeyRef, Variant,
};

use crate::config::OperatorConfig;
use crate::keys::{self, AdapterSourceIdentity, SourceIdentity};
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

/// An adapter or ControlNet of the spec: validated, keyed, with the command line of its fetch
/// Job (paths as the pods see them).
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedAdapter {
    pub kind: AdapterKind,
    /// The adapter's name, or the ControlNet's mode.
    pub name: String,
    /// A LoRA's scale for requests that name it without one.
    pub scale: Option<f64>,
    /// Content-derived key: its directory in the cache and its fetch Job's name.
    pub key: String,
    /// `sd35-server fetch-adapter`'s arguments.
    pub fetch: FetchAdapterArgs,
    /// The Secret key of the source's token, if it needs one.
    pub token: Option<SecretKeyRef>,
    /// The claim mounted read-only at the import mount for a `pvc` source.
    pub import_claim: Option<String>,
}

impl ResolvedAdapter {
    /// Where a serving pod finds it once cached: the `PATH` of its `--lora` or
    /// `--controlnet`.
    pub fn served_path(&self) -> PathBuf {
        self.fetch.served_path()
    }
}

/// An SD35Deployment, validated and defaulted.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub name: String,
    pub namespace: String,
    pub generation: i64,
    pub spec: SD35DeploymentSpec,
    pub variant: Variant,
    pub precision: EnginePrecision,
    pub source: FetchSource,
    pub token: Option<SecretKeyRef>,
    pub cache_key: String,
    /// None when `engine.build` is `Never`.
    pub engine_key: Option<String>,
    pub cache: CachePlan,
    pub image: String,
    /// The LoRAs (in spec order), then the ControlNets.
    pub adapters: Vec<ResolvedAdapter>,
}

/// Default cache size: weights of the variant's files plus one engine per precision.
pub fn default_cache_size(v: Variant) -> &'static str {
    match v {
        Variant::Large | Variant::LargeTurbo => "100Gi",
        Variant::Medium => "50Gi",
    }
}

/// Resolves one adapter (`field` is its place in the spec, for messages) of a model cached
/// under `cache_key`.
fn resolve_adapter(
    field: &str,
    kind: AdapterKind,
    name: &str,
    source: &AdapterSource,
    variant: Variant,
    cache_key: &str,
    config: &OperatorConfig,
) -> Result<ResolvedAdapter, InvalidSpec> {
    let mut args = FetchAdapterArgs {
        kind,
        name: name.to_owned(),
        source: AdapterSourceArgs {
            hf_repo: None,
            http_url: None,
            import_path: None,
        },
        hf_file: None,
        revision: "main".to_owned(),
        hf_endpoint: config.hf_endpoint.clone(),
        sha256: None,
        variant,
        cache_root: CACHE_MOUNT.into(),
        adapter_key: String::new(),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
    };
    let (identity, token, import_claim) = match (&source.hugging_face, &source.http, &source.pvc) {
        (Some(hf), None, None) => {
            args.source.hf_repo = Some(hf.repo.clone());
            args.hf_file.clone_from(&hf.file);
            args.revision.clone_from(&hf.revision);
            if let Some(endpoint) = &hf.endpoint {
                args.hf_endpoint.clone_from(endpoint);
            }
            let identity = AdapterSourceIdentity::HuggingFace {
                endpoint: args.hf_endpoint.clone(),
                repo: hf.repo.clone(),
                revision: hf.revision.clone(),
                file: hf.file.clone(),
            };
            (identity, hf.token_secret_ref.clone(), None)
        }
        (None, Some(http), None) => {
            args.source.http_url = Some(http.url.clone());
            args.sha256 = Some(http.sha256.to_ascii_lowercase());
            let identity = AdapterSourceIdentity::Http {
                sha256: http.sha256.to_ascii_lowercase(),
            };
            (identity, http.token_secret_ref.clone(), None)
        }
        (None, None, Some(pvc)) => {
            let path = pvc.path.trim_matches('/');
            args.source.import_path = Some(if path.is_empty() {
                IMPORT_MOUNT.into()
            } else {
                format!("{IMPORT_MOUNT}/{path}").into()
            });
            let identity = AdapterSourceIdentity::Pvc {
                claim: pvc.claim_name.clone(),
                path: path.to_owned(),
            };
            (identity, None, Some(pvc.claim_name.clone()))
        }
        _ => {
            return Err(InvalidSpec(format!(
                "{field}.source must set exactly one of huggingFace, http or pvc"
            )));
        }
    };
    let key = keys::adapter_key(cache_key, kind.as_str(), &identity);
    args.adapter_key.clone_from(&key);
    Ok(ResolvedAdapter {
        kind,
        name: name.to_owned(),
        scale: None,
        key,
        fetch: args,
        token,
        import_claim,
    })
}

/// The adapters and ControlNets of `spec`, LoRAs first, each in spec order.
fn resolve_adapters(
    spec: &SD35DeploymentSpec,
    cache_key: &str,
    config: &OperatorConfig,
) -> Result<Vec<ResolvedAdapter>, InvalidSpec> {
    let mut out = Vec::new();
    for (i, a) in spec.adapters.iter().enumerate() {
        let field = format!("spec.adapters[{i}]");
        if !sd35_contract::is_adapter_name(&a.name) {
            return Err(InvalidSpec(format!(
                "{field}.name {:?} is not an adapter name: lower-case letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
                a.name
            )));
        }
        if out.iter().any(|o: &ResolvedAdapter| o.name == a.name) {
            return Err(InvalidSpec(format!(
                "{field}.name {} is used twice: adapter names must be unique",
                a.name
            )));
        }
        let mut resolved = resolve_adapter(
            &field,
            AdapterKind::Lora,
            &a.name,
            &a.source,
            spec.variant,
            cache_key,
            config,
        )?;
        resolved.scale = a.scale;
        out.push(resolved);
    }
    for (i, c) in spec.control_nets.iter().enumerate() {
        let field = format!("spec.controlNets[{i}]");
        let mode = c.mode.as_str();
        if out
            .iter()
            .any(|o| o.kind == AdapterKind::Controlnet && o.name == mode)
        {
            return Err(InvalidSpec(format!(
                "{field}.mode {mode} is used twice: one ControlNet per mode"
            )));
        }
        out.push(resolve_adapter(
            &field,
            AdapterKind::Controlnet,
            mode,
            &c.source,
            spec.variant,
            cache_key,
            config,
        )?);
    }
    Ok(out)
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
    let adapters = resolve_adapters(&spec, &cache_key, config)?;
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
        adapters,
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
    fn adapters_get_keys_of_their_sources_and_the_fetch_command_line() {
        let spec = "variant: large\nadapters:\n\
            - {name: detail, scale: 0.5, source: {huggingFace: {repo: a/loras, file: d.safetensors, tokenSecretRef: {name: hf}}}}\n\
            - {name: style, source: {http: {url: 'https://m.example/s.safetensors', sha256: ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB}}}\n\
            controlNets:\n\
            - {mode: depth, source: {pvc: {claimName: nets, path: depth/}}}\n\
            - {mode: canny, source: {huggingFace: {repo: s/canny, file: c.safetensors}}}";
        let r = resolve(&obj(spec), &OperatorConfig::default()).unwrap();
        let names: Vec<(&str, &str)> = r
            .adapters
            .iter()
            .map(|a| (a.kind.as_str(), a.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("lora", "detail"),
                ("lora", "style"),
                ("controlnet", "depth"),
                ("controlnet", "canny")
            ]
        );
        let [detail, style, depth, canny] = &r.adapters[..] else {
            panic!("four adapters");
        };
        assert_eq!(detail.scale, Some(0.5));
        assert_eq!(detail.token.as_ref().map(|t| t.name.as_str()), Some("hf"));
        assert_eq!(detail.fetch.hf_file.as_deref(), Some("d.safetensors"));
        assert_eq!(
            detail.served_path(),
            PathBuf::from(format!(
                "/cache/adapters/{}/adapter.safetensors",
                detail.key
            ))
        );
        assert_eq!(style.fetch.sha256.as_deref(), Some(&*"ab".repeat(32)));
        // A ControlNet folder on a claim is served as the folder; a file as the file.
        assert_eq!(depth.import_claim.as_deref(), Some("nets"));
        assert_eq!(
            depth.fetch.source.import_path.as_deref(),
            Some(std::path::Path::new("/import/depth"))
        );
        assert_eq!(
            depth.served_path(),
            PathBuf::from(format!("/cache/adapters/{}", depth.key))
        );
        assert!(canny.served_path().ends_with("adapter.safetensors"));
        let mut keys: Vec<&str> = r.adapters.iter().map(|a| a.key.as_str()).collect();
        keys.dedup();
        assert_eq!(keys.len(), 4);
        assert!(r.adapters.iter().all(|a| a.fetch.adapter_key == a.key));

        // Renaming or rescaling an adapter keeps its key; another model's cache gets another.
        let renamed = resolve(
            &obj("variant: large\nadapters:\n- {name: fine, scale: 2, source: {huggingFace: {repo: a/loras, file: d.safetensors}}}"),
            &OperatorConfig::default(),
        )
        .unwrap();
        assert_eq!(renamed.adapters[0].key, detail.key);
        let medium = resolve(
            &obj("variant: medium\nadapters:\n- {name: detail, source: {huggingFace: {repo: a/loras, file: d.safetensors}}}"),
            &OperatorConfig::default(),
        )
        .unwrap();
        assert_ne!(medium.adapters[0].key, detail.key);
        // Adapters do not touch the model's keys.
        let plain = resolve(&obj("variant: large"), &OperatorConfig::default()).unwrap();
        assert_eq!(
            (&plain.cache_key, &plain.engine_key),
            (&r.cache_key, &r.engine_key)
        );
    }

    #[test]
    fn what_the_schema_refuses_is_refused_here_too() {
        for (spec, said) in [
            (
                "variant: large\nadapters:\n- {name: a, source: {huggingFace: {repo: x/y}}}\n- {name: a, source: {huggingFace: {repo: x/z}}}",
                "spec.adapters[1].name a is used twice",
            ),
            (
                "variant: large\nadapters:\n- {name: A, source: {huggingFace: {repo: x/y}}}",
                "spec.adapters[0].name \"A\" is not an adapter name",
            ),
            (
                "variant: large\nadapters:\n- {name: a, source: {}}",
                "spec.adapters[0].source must set exactly one",
            ),
            (
                "variant: large\ncontrolNets:\n- {mode: blur, source: {huggingFace: {repo: x/y}}}\n- {mode: blur, source: {huggingFace: {repo: x/z}}}",
                "spec.controlNets[1].mode blur is used twice",
            ),
        ] {
            let err = resolve(&obj(spec), &OperatorConfig::default()).unwrap_err();
            assert!(err.0.contains(said), "{said:?} not in {err}");
        }
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
