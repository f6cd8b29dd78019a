//! What a pipeline is loaded from: a directory of weights and the manifests that say what it
//! is, each read once and handed to [`super::Pipeline::load_source`], so a server that checks
//! its engine before listening does not open it again to load it.

use std::path::{Path, PathBuf};

use sd35_contract::{CacheManifest, EngineManifest};

use crate::Result;

/// A model to load, its manifests read.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// The directory whose weights are loaded: a prebuilt engine's, or the model's own.
    pub weights: PathBuf,
    /// The engine's manifest (every file present at its recorded size), when `weights` is an
    /// engine.
    pub engine: Option<EngineManifest>,
    /// The completion marker of the cache model directory the weights (or the engine) come
    /// from, when there is one.
    pub marker: Option<CacheManifest>,
}

impl ModelSource {
    /// `path` on its own: an engine directory (its manifest checked) or a model directory
    /// (its cache marker read when it has one).
    pub fn open(path: &Path) -> Result<Self> {
        if crate::engine::is_engine(path) {
            return Ok(Self {
                weights: path.to_owned(),
                engine: Some(crate::engine::open(path, false)?),
                marker: None,
            });
        }
        Ok(Self {
            weights: path.to_owned(),
            engine: None,
            marker: CacheManifest::read(path).ok(),
        })
    }

    /// A server's pair: the cache model directory `model` and, when given, the engine built
    /// from it, which is what is loaded (its manifest checked).
    pub fn serving(model: &Path, engine: Option<&Path>) -> Result<Self> {
        let marker = CacheManifest::read(model).ok();
        Ok(match engine {
            Some(dir) => Self {
                weights: dir.to_owned(),
                engine: Some(crate::engine::open(dir, false)?),
                marker,
            },
            None => Self {
                weights: model.to_owned(),
                engine: None,
                marker,
            },
        })
    }
}
