//! Where things live on the cache volume.
//!
//! ```text
//! /cache/                          the cache volume, mounted read-write by Jobs, read-only by servers
//!   models/<cache-key>/            the model's file tree (diffusers or single-file layout)
//!   models/<cache-key>/.sd35-complete.json   written last, atomically: the fetch manifest
//!   engines/<engine-key>/          a prebuilt engine for one precision
//!   engines/<engine-key>/engine.json         written last, atomically: the engine manifest
//!   adapters/<adapter-key>/        one LoRA or ControlNet, beside the model it serves with
//!   adapters/<adapter-key>/adapter.safetensors   a LoRA, or a single-file ControlNet
//!   adapters/<adapter-key>/config.json, *.safetensors   or a ControlNet in diffusers' layout
//!   adapters/<adapter-key>/.sd35-complete.json   written last, atomically: the fetch manifest
//! ```
//! Keys are content-derived hex strings, so two deployments asking for the same thing share
//! one directory. An adapter's key covers its source only (not the name it is served under), so
//! adding, removing or renaming one leaves the model and every other adapter where they are.

use std::path::{Path, PathBuf};

/// Mount path of the cache volume in every pod the operator builds.
pub const CACHE_MOUNT: &str = "/cache";

/// Mount path of a `pvc` model source (imported read-only) in the fetch Job.
pub const IMPORT_MOUNT: &str = "/import";

/// File written last, atomically, when a model directory is complete.
pub const COMPLETE_MARKER: &str = ".sd35-complete.json";

/// File written last, atomically, when an engine directory is complete.
pub const ENGINE_MANIFEST: &str = "engine.json";

/// Version of the engine layout; part of every engine key, so a new format gets new engines.
/// 3: `engine.json` records the smoke image servers check before they turn ready.
pub const ENGINE_FORMAT_VERSION: u32 = 3;

/// Where a container's termination message goes (Kubernetes' default
/// `terminationMessagePath`); `serve` writes its start-up failure there.
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// Name of the environment variable that carries a source's access token into `fetch`.
pub const TOKEN_ENV: &str = "SD35_SOURCE_TOKEN";

/// Directory of the model with this cache key under a cache root.
pub fn model_dir(cache_root: &Path, cache_key: &str) -> PathBuf {
    cache_root.join("models").join(cache_key)
}

/// Directory of the engine with this engine key under a cache root.
pub fn engine_dir(cache_root: &Path, engine_key: &str) -> PathBuf {
    cache_root.join("engines").join(engine_key)
}

/// The name a single-file adapter (every LoRA, and a ControlNet fetched as one file) is stored
/// under in its directory, whatever the source called it: the command lines never guess it.
pub const ADAPTER_FILE: &str = "adapter.safetensors";

/// Directory of the adapter (LoRA or ControlNet) with this key under a cache root.
pub fn adapter_dir(cache_root: &Path, adapter_key: &str) -> PathBuf {
    cache_root.join("adapters").join(adapter_key)
}

/// What a server loads for a cached adapter: its [`ADAPTER_FILE`] when it was fetched as one
/// file, else its directory (a ControlNet in diffusers' layout).
pub fn adapter_path(cache_root: &Path, adapter_key: &str, single_file: bool) -> PathBuf {
    let dir = adapter_dir(cache_root, adapter_key);
    if single_file {
        dir.join(ADAPTER_FILE)
    } else {
        dir
    }
}

/// Whether a source path names one adapter file rather than a folder: it ends in
/// `.safetensors`. The operator decides the served path by this rule and `fetch-adapter`
/// refuses a source that does not follow it, so both sides agree without looking.
pub fn names_one_file(path: &str) -> bool {
    path.trim_end_matches('/').ends_with(".safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_keyed_under_the_root() {
        let root = Path::new(CACHE_MOUNT);
        assert_eq!(model_dir(root, "abc"), Path::new("/cache/models/abc"));
        assert_eq!(engine_dir(root, "def"), Path::new("/cache/engines/def"));
        assert_eq!(
            adapter_path(root, "a1", true),
            Path::new("/cache/adapters/a1/adapter.safetensors")
        );
        assert_eq!(
            adapter_path(root, "a1", false),
            Path::new("/cache/adapters/a1")
        );
    }

    #[test]
    fn a_source_names_one_file_by_its_suffix() {
        assert!(names_one_file("loras/detail.safetensors"));
        assert!(!names_one_file("controlnets/canny"));
        assert!(!names_one_file(""));
        assert!(!names_one_file("model.bin"));
    }
}
