//! Where things live on the cache volume.
//!
//! ```text
//! /cache/                          the cache volume, mounted read-write by Jobs, read-only by servers
//!   models/<cache-key>/            the model's file tree (diffusers or single-file layout)
//!   models/<cache-key>/.sd35-complete.json   written last, atomically: the fetch manifest
//!   engines/<engine-key>/          a prebuilt engine for one precision
//!   engines/<engine-key>/engine.json         written last, atomically: the engine manifest
//! ```
//! Keys are content-derived hex strings, so two deployments asking for the same thing share
//! one directory.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_keyed_under_the_root() {
        let root = Path::new(CACHE_MOUNT);
        assert_eq!(model_dir(root, "abc"), Path::new("/cache/models/abc"));
        assert_eq!(engine_dir(root, "def"), Path::new("/cache/engines/def"));
    }
}
