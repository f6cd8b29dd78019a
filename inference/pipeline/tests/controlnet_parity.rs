//! SD3.5 ControlNets against diffusers' `SD3ControlNetModel` on the tiny ControlNets made for
//! the tiny large model: the forward alone (residuals of every block) from both layouts
//! (diffusers folder, sharded or not, and Stability's single file), the forced-zero pooled
//! vector, reduced-precision storage, and the refusal of a ControlNet for another variant.
//! The models and goldens were made by `inference/reference/make_controlnet_goldens.py`.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd35_pipeline::controlnet::{ControlNet, ControlNetLayout};
use sd35_pipeline::mmdit::MmditConfig;
use sd35_pipeline::{Error, Precision, op_graph};

/// Relative L2 error allowed in f32.
const F32_TOLERANCE: f64 = 1e-4;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(testdata().join("golden").join(name), &Device::Cpu)
        .unwrap_or_else(|e| panic!("golden {name}: {e}"))
}

fn transformer(model: &str) -> MmditConfig {
    MmditConfig::from_diffusers(&testdata().join(model).join("transformer/config.json")).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap();
    (num.to_scalar::<f64>().unwrap() / den.to_scalar::<f64>().unwrap().max(1e-30)).sqrt()
}

/// The worst relative error of `net`'s residuals on the golden's inputs, against the golden's
/// residuals under `prefix` (`residual` or `residual_zero_pooled`).
fn worst_error(net: &ControlNet, g: &HashMap<String, Tensor>, prefix: &str) -> f64 {
    let scale = f64::from(g["scale"].to_vec1::<f32>().unwrap()[0]);
    let residuals = net
        .forward(
            &g["x_embedded"],
            &g["control_latents"],
            &g["pooled"],
            &g["timestep"],
            scale,
        )
        .unwrap();
    assert_eq!(residuals.len(), net.config().num_layers);
    residuals
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let want = &g[&format!("{prefix}.{i}")];
            assert_eq!(r.dims(), want.dims(), "residual {i}");
            rel_err(r, want)
        })
        .fold(0.0, f64::max)
}

#[test]
fn forward_matches_diffusers_in_both_layouts() {
    let large = transformer("sd35-tiny-large");
    for mode in ["canny", "blur"] {
        let g = golden(&format!("controlnet_forward_{mode}.safetensors"));
        let dir = testdata().join("controlnet");
        let sources = [
            (dir.join(mode), ControlNetLayout::Diffusers),
            (
                dir.join(format!("sd3.5_large_controlnet_{mode}.safetensors")),
                ControlNetLayout::Stability,
            ),
        ];
        for (path, layout) in sources {
            let net = ControlNet::load(&path, &large, &Device::Cpu, Precision::F32).unwrap();
            assert_eq!(net.layout(), layout);
            let cfg = net.config();
            assert_eq!(
                (cfg.num_layers, cfg.heads, cfg.hidden, cfg.patch_size),
                (2, 2, 32, 2)
            );
            assert_eq!((cfg.in_channels, cfg.pooled_projection_dim), (16, 192));
            assert!(!cfg.force_zeros_for_pooled_projection);
            assert!(net.weight_bytes() > 0);
            let err = worst_error(&net, &g, "residual");
            eprintln!(
                "controlnet {mode} {layout:?}: residuals rel err {err:.2e} ({} op graph)",
                op_graph::current().name()
            );
            assert!(err <= F32_TOLERANCE, "{mode} {layout:?}: {err:.2e}");
        }
    }
}

#[test]
fn a_config_that_forces_zero_pooled_vectors_is_honoured() {
    // The canny folder with `force_zeros_for_pooled_projection: true`, in a folder of its own.
    let src = testdata().join("controlnet/canny");
    let dir = std::env::temp_dir().join(format!("sd35-controlnet-zeros-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let forced = config.replace(
        "\"force_zeros_for_pooled_projection\": false",
        "\"force_zeros_for_pooled_projection\": true",
    );
    assert_ne!(config, forced);
    std::fs::write(dir.join("config.json"), forced).unwrap();
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let large = transformer("sd35-tiny-large");
    let net = ControlNet::load(&dir, &large, &Device::Cpu, Precision::F32).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(net.config().force_zeros_for_pooled_projection);
    assert_eq!(net.control_latent_shift(0.0609), 0.0);
    let g = golden("controlnet_forward_canny.safetensors");
    let err = worst_error(&net, &g, "residual_zero_pooled");
    eprintln!("controlnet canny, zero pooled: residuals rel err {err:.2e}");
    assert!(err <= F32_TOLERANCE, "{err:.2e}");

    let real = ControlNet::load(&src, &large, &Device::Cpu, Precision::F32).unwrap();
    assert_eq!(real.control_latent_shift(0.0609), 0.0609);
}

#[test]
fn reduced_precision_storage_stays_close() {
    // bf16 and fp8 weights, computed in f32 on the CPU: the error is the weights' rounding.
    let large = transformer("sd35-tiny-large");
    let g = golden("controlnet_forward_canny.safetensors");
    let path = testdata().join("controlnet/sd3.5_large_controlnet_canny.safetensors");
    for (precision, bound) in [(Precision::Bf16, 2e-2), (Precision::Fp8, 1e-1)] {
        let net = ControlNet::load(&path, &large, &Device::Cpu, precision).unwrap();
        let err = worst_error(&net, &g, "residual");
        eprintln!("controlnet canny {precision:?}: residuals rel err {err:.2e}");
        assert!(err <= bound, "{precision:?}: {err:.2e} > {bound}");
    }
}

#[test]
fn a_controlnet_for_another_variant_is_refused_with_the_file_and_both_shapes() {
    let medium = transformer("sd35-tiny-medium");
    let dir = testdata().join("controlnet");
    for path in [
        dir.join("canny"),
        dir.join("blur"),
        dir.join("sd3.5_large_controlnet_canny.safetensors"),
    ] {
        let refused = ControlNet::load(&path, &medium, &Device::Cpu, Precision::F32);
        let Err(err) = refused else {
            panic!("{} loaded for the medium transformer", path.display());
        };
        assert!(matches!(err, Error::Mismatch(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("another variant"), "{msg}");
        // The ControlNet's width and the transformer's (10 heads of 4).
        assert!(msg.contains("width 32"), "{msg}");
        assert!(msg.contains("width 40 (10 heads of 4)"), "{msg}");
        // The same answer without loading any weight.
        assert!(ControlNet::inspect(&path, &medium).is_err());
    }

    // A loaded ControlNet checks other transformers too.
    let large = transformer("sd35-tiny-large");
    let net = ControlNet::load(&dir.join("canny"), &large, &Device::Cpu, Precision::F32).unwrap();
    net.fits(&large).unwrap();
    assert!(matches!(net.fits(&medium), Err(Error::Mismatch(_))));
    assert_eq!(
        ControlNet::inspect(&dir.join("blur"), &large).unwrap(),
        *net.config()
    );
}

#[test]
fn files_that_are_not_sd35_controlnets_are_refused_by_name() {
    let large = transformer("sd35-tiny-large");
    // A transformer is not a ControlNet.
    let transformer_file = testdata().join("sd35-tiny-large-single/sd3.5_large.safetensors");
    let err = ControlNet::load(&transformer_file, &large, &Device::Cpu, Precision::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("controlnet_blocks"), "{err}");
    // A missing path names itself.
    let missing = testdata().join("controlnet/nothing-here");
    let err = ControlNet::load(&missing, &large, &Device::Cpu, Precision::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nothing-here"), "{err}");
}
