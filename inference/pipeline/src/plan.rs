//! The memory plan of a loaded model: the shapes and weight bytes [`sd35_contract::plan`]
//! computes with, read off the pipeline, and the plan device of an opened device.

pub use sd35_contract::plan::*;

use crate::device::OpenedDevice;
use crate::mmdit::MmditConfig;
use crate::op_graph::OpGraph;
use crate::vae::VaeConfig;
use crate::variant::Precision;

impl From<&MmditConfig> for MmditSpec {
    fn from(c: &MmditConfig) -> Self {
        Self {
            patch_size: c.patch_size,
            in_channels: c.in_channels,
            out_channels: c.out_channels,
            depth: c.depth,
            heads: c.heads,
            hidden: c.hidden,
            pos_embed_max_size: c.pos_embed_max_size,
            joint_attention_dim: c.joint_attention_dim,
            pooled_projection_dim: c.pooled_projection_dim,
            dual_attention_layers: c.dual_attention_layers.clone(),
            qk_norm: c.qk_norm,
        }
    }
}

/// The plan's view of a VAE of `config`, with or without its encoder.
pub fn vae_spec(config: &VaeConfig, encoder: bool) -> VaeSpec {
    VaeSpec {
        block_out_channels: config.block_out_channels.clone(),
        layers_per_block: config.layers_per_block,
        latent_channels: config.latent_channels,
        encoder,
    }
}

/// How the plan sees `device` running weights of `precision` on the process's op graph.
pub fn plan_device(device: &OpenedDevice, precision: Precision, graph: OpGraph) -> PlanDevice {
    PlanDevice {
        kind: device.kind,
        precision,
        generic: graph.generic,
        chunk_elements: graph.chunk_elements,
    }
}
