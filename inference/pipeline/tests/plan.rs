//! The memory plan's weight arithmetic against what the loaders really keep, on the tiny
//! models in every layout and precision: if a loader changes how it stores a tensor, the plan
//! (and with it every published figure) must change too.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use sd35_pipeline::plan::WeightSpec;
use sd35_pipeline::{Pipeline, PipelineOptions, Precision};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

#[test]
fn planned_weights_are_the_bytes_the_loaders_keep() {
    for model in [
        "sd35-tiny-large",
        "sd35-tiny-large-single",
        "sd35-tiny-medium",
        "sd35-tiny-medium-single",
    ] {
        for precision in [Precision::F32, Precision::Bf16, Precision::Fp8] {
            for load_t5 in [true, false] {
                let opts = PipelineOptions {
                    precision: Some(precision),
                    load_t5,
                    ..PipelineOptions::default()
                };
                let p = Pipeline::load(&testdata().join(model), &opts).unwrap();
                let kept = p.weight_bytes();
                let planned = WeightSpec::new(precision).model(&p.spec().unwrap());
                assert_eq!(planned, kept, "{model} {precision} t5={load_t5}");
                assert_eq!(kept.t5 > 0, load_t5, "{model}");
                assert!(kept.mmdit > 0 && kept.clip > 0 && kept.vae > 0, "{model}");
            }
        }
    }
    // A ComfyUI-style `fp8_scaled` checkpoint: its F8 linears keep their bytes.
    let opts = PipelineOptions {
        precision: Some(Precision::Fp8),
        ..PipelineOptions::default()
    };
    let p = Pipeline::load(&testdata().join("sd35-tiny-large-fp8"), &opts).unwrap();
    let planned = WeightSpec::new(Precision::Fp8).model(&p.spec().unwrap());
    assert_eq!(planned, p.weight_bytes());
}
