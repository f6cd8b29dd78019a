//! Content-derived keys of caches and engines.
//!
//! The cache key names what is downloaded (variant, source identity, revision); the engine key
//! names what is built from it (cache key, precision, engine format version, GPU product where
//! known). Two SD35Deployments asking for the same thing get the same keys, so they share one
//! cache volume and one engine; anything that changes the bytes changes the key.

use sd35_contract::hex;
use sha2::{Digest, Sha256};

/// Length of a key in hex characters (64 bits: collisions are not a practical concern for
/// the handful of models in a namespace, and names built from keys stay short).
pub const KEY_LEN: usize = 16;

fn digest(parts: &[(&str, &str)]) -> String {
    let mut hasher = Sha256::new();
    for (name, value) in parts {
        // Length-prefixed so that no two different part lists hash alike.
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((value.len() as u64).to_le_bytes());
        hasher.update(value.as_bytes());
    }
    hex(&hasher.finalize())[..KEY_LEN].to_owned()
}

/// A short content hash of `bytes` ([`KEY_LEN`] hex characters of their SHA-256).
pub fn content_hash(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))[..KEY_LEN].to_owned()
}

/// Identity of a model source, as it enters the cache key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceIdentity {
    /// A Hugging Face repository at a revision, from an endpoint.
    HuggingFace {
        endpoint: String,
        repo: String,
        revision: String,
    },
    /// A plain HTTP mirror.
    Http { url: String },
    /// A claim in the namespace and a path inside it.
    Pvc { claim: String, path: String },
}

/// The cache key of a variant from a source.
pub fn cache_key(variant: &str, source: &SourceIdentity) -> String {
    match source {
        SourceIdentity::HuggingFace {
            endpoint,
            repo,
            revision,
        } => digest(&[
            ("variant", variant),
            ("source", "huggingface"),
            ("endpoint", endpoint.trim_end_matches('/')),
            ("repo", repo),
            ("revision", revision),
        ]),
        SourceIdentity::Http { url } => digest(&[
            ("variant", variant),
            ("source", "http"),
            ("url", url.trim_end_matches('/')),
        ]),
        SourceIdentity::Pvc { claim, path } => digest(&[
            ("variant", variant),
            ("source", "pvc"),
            ("claim", claim),
            ("path", path.trim_matches('/')),
        ]),
    }
}

/// Identity of an adapter's (or ControlNet's) source, as it enters the adapter key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterSourceIdentity {
    /// A file (or the root folder) of a Hugging Face repository at a revision.
    HuggingFace {
        endpoint: String,
        repo: String,
        revision: String,
        file: Option<String>,
    },
    /// One file by its content: the same sha256 from another URL is the same file.
    Http { sha256: String },
    /// A file or folder on a claim in the namespace.
    Pvc { claim: String, path: String },
}

/// The key of an adapter of `kind` (`lora`, `controlnet`) from a source, cached on the claim of
/// `cache_key`: its directory under `adapters/` and the name of its fetch Job. The name it is
/// served under and its scale are not part of it, so renaming or rescaling one fetches
/// nothing.
pub fn adapter_key(cache_key: &str, kind: &str, source: &AdapterSourceIdentity) -> String {
    match source {
        AdapterSourceIdentity::HuggingFace {
            endpoint,
            repo,
            revision,
            file,
        } => digest(&[
            ("cache", cache_key),
            ("kind", kind),
            ("source", "huggingface"),
            ("endpoint", endpoint.trim_end_matches('/')),
            ("repo", repo),
            ("revision", revision),
            (
                "file",
                file.as_deref().unwrap_or("").trim_start_matches('/'),
            ),
        ]),
        AdapterSourceIdentity::Http { sha256 } => digest(&[
            ("cache", cache_key),
            ("kind", kind),
            ("source", "http"),
            ("sha256", sha256),
        ]),
        AdapterSourceIdentity::Pvc { claim, path } => digest(&[
            ("cache", cache_key),
            ("kind", kind),
            ("source", "pvc"),
            ("claim", claim),
            ("path", path.trim_matches('/')),
        ]),
    }
}

/// The engine key of a cache built for a precision (and a GPU product, when pinned).
pub fn engine_key(cache_key: &str, precision: &str, gpu_product: Option<&str>) -> String {
    let format = sd35_contract::ENGINE_FORMAT_VERSION.to_string();
    digest(&[
        ("cache", cache_key),
        ("precision", precision),
        ("format", &format),
        ("gpu", gpu_product.unwrap_or("")),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf(repo: &str, revision: &str) -> SourceIdentity {
        SourceIdentity::HuggingFace {
            endpoint: "https://huggingface.co".into(),
            repo: repo.into(),
            revision: revision.into(),
        }
    }

    #[test]
    fn same_request_same_key_and_any_change_a_new_one() {
        let base = cache_key("large", &hf("a/b", "main"));
        assert_eq!(base, cache_key("large", &hf("a/b", "main")));
        assert_eq!(base.len(), KEY_LEN);
        assert!(base.chars().all(|c| c.is_ascii_hexdigit()));
        let others = [
            cache_key("medium", &hf("a/b", "main")),
            cache_key("large", &hf("a/c", "main")),
            cache_key("large", &hf("a/b", "v2")),
            cache_key(
                "large",
                &SourceIdentity::Http {
                    url: "https://m/a/b".into(),
                },
            ),
            cache_key(
                "large",
                &SourceIdentity::Pvc {
                    claim: "a".into(),
                    path: "b".into(),
                },
            ),
        ];
        for other in others {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn trailing_slashes_do_not_split_a_cache() {
        let a = cache_key(
            "large",
            &SourceIdentity::Http {
                url: "https://m/x/".into(),
            },
        );
        let b = cache_key(
            "large",
            &SourceIdentity::Http {
                url: "https://m/x".into(),
            },
        );
        assert_eq!(a, b);
    }

    #[test]
    fn parts_cannot_bleed_into_each_other() {
        let a = cache_key(
            "large",
            &SourceIdentity::Pvc {
                claim: "ab".into(),
                path: "c".into(),
            },
        );
        let b = cache_key(
            "large",
            &SourceIdentity::Pvc {
                claim: "a".into(),
                path: "bc".into(),
            },
        );
        assert_ne!(a, b);
    }

    #[test]
    fn an_adapter_key_is_its_source_on_its_cache() {
        let hub = |file: Option<&str>| AdapterSourceIdentity::HuggingFace {
            endpoint: "https://huggingface.co/".into(),
            repo: "a/loras".into(),
            revision: "main".into(),
            file: file.map(str::to_owned),
        };
        let base = adapter_key("c1", "lora", &hub(Some("x.safetensors")));
        assert_eq!(base.len(), KEY_LEN);
        assert_eq!(
            base,
            adapter_key("c1", "lora", &hub(Some("/x.safetensors")))
        );
        for other in [
            adapter_key("c2", "lora", &hub(Some("x.safetensors"))),
            adapter_key("c1", "controlnet", &hub(Some("x.safetensors"))),
            adapter_key("c1", "lora", &hub(Some("y.safetensors"))),
            adapter_key("c1", "lora", &hub(None)),
        ] {
            assert_ne!(base, other);
        }
        // A file over HTTP is its content: another URL of the same bytes is the same file.
        let http = |sha: &str| AdapterSourceIdentity::Http { sha256: sha.into() };
        assert_eq!(
            adapter_key("c1", "lora", &http("ab")),
            adapter_key("c1", "lora", &http("ab"))
        );
        assert_ne!(
            adapter_key("c1", "lora", &http("ab")),
            adapter_key("c1", "lora", &http("cd"))
        );
    }

    #[test]
    fn engine_key_depends_on_precision_and_gpu() {
        let c = cache_key("large", &hf("a/b", "main"));
        let bf16 = engine_key(&c, "bf16", None);
        assert_ne!(bf16, engine_key(&c, "fp8", None));
        assert_ne!(bf16, engine_key(&c, "bf16", Some("NVIDIA-H100-80GB-HBM3")));
        assert_ne!(bf16, engine_key("other", "bf16", None));
        assert_eq!(bf16, engine_key(&c, "bf16", None));
    }
}
