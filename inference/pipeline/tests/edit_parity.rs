//! Image editing against diffusers on the tiny models: img2img as
//! `StableDiffusion3Img2ImgPipeline` and inpainting as `StableDiffusion3InpaintPipeline`, for
//! large with guidance, large-turbo's defaults and medium, at two strengths each. The goldens
//! and the input image and mask were made by `inference/reference/make_edit_goldens.py`.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{golden, golden_json, psnr, read_png, rel_err};
use sd35_pipeline::pipeline::first_step;
use sd35_pipeline::{Edit, Pipeline, PipelineOptions, Precision, image, op_graph};

/// A PNG's size, channels and 8-bit samples.

#[test]
fn strength_cuts_the_schedule_as_diffusers_get_timesteps() {
    // int(max(steps - min(steps * strength, steps), 0)), in floating point, truncated:
    // values Python's own arithmetic gives for the same inputs.
    assert_eq!(first_step(5, 0.6), 2);
    assert_eq!(first_step(5, 0.8), 1);
    assert_eq!(first_step(5, 0.5), 2);
    assert_eq!(first_step(4, 0.75), 1);
    assert_eq!(first_step(28, 1.0), 0);
    assert_eq!(
        first_step(28, 0.3),
        19,
        "28 - 8.4 = 19.6 truncates, it does not round"
    );
    assert_eq!(
        first_step(3, 0.7),
        0,
        "3 x 0.7 is 2.0999999999999996: 0.9 truncates to 0, all 3 steps run"
    );
    assert_eq!(first_step(10, 0.05), 9);
    assert_eq!(first_step(10, 0.01), 9, "0.1 of a step still runs one");
}

#[test]
fn edits_match_the_reference() {
    let manifest = golden_json("edits.json");
    let (w, h, channels, rgb) = read_png(manifest["image"].as_str().unwrap());
    assert_eq!(channels, 3);
    let rgb = image::RgbImage {
        width: w,
        height: h,
        pixels: rgb,
    };
    let (mw, mh, mc, grey) = read_png(manifest["mask"].as_str().unwrap());
    assert_eq!((mw, mh, mc), (w, h, 1));
    let mut loaded: HashMap<String, Pipeline> = HashMap::new();
    for case in manifest["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let model = case["model"].as_str().unwrap();
        let p = loaded.entry(model.to_owned()).or_insert_with(|| {
            let opts = PipelineOptions {
                precision: Some(Precision::F32),
                ..PipelineOptions::default()
            };
            Pipeline::load(
                &Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../testdata")
                    .join(model),
                &opts,
            )
            .unwrap()
        });
        let mut req = p.default_request(case["prompt"].as_str().unwrap());
        req.negative_prompt = case["negative_prompt"].as_str().unwrap().to_owned();
        req.width = case["width"].as_u64().unwrap() as usize;
        req.height = case["height"].as_u64().unwrap() as usize;
        req.steps = case["steps"].as_u64().unwrap() as usize;
        req.guidance = case["guidance"].as_f64().unwrap();
        // diffusers' edit pipelines have no skip-layer guidance.
        req.slg = None;
        req.init_latents = Some(golden(&format!("edit_{id}.init.safetensors"))["latents"].clone());
        let mask = (case["kind"] == "inpaint")
            .then(|| image::mask_tensor(&grey, w, h, &Device::Cpu).unwrap());
        req.edit = Some(Edit {
            image: image::to_tensor(&rgb, &Device::Cpu).unwrap(),
            mask,
            strength: case["strength"].as_f64().unwrap(),
        });
        let latents = p.sample(&req, &mut |_, _| {}).unwrap();
        let decoded = ((p.decode(&latents).unwrap() / 2.0).unwrap() + 0.5)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        let g = golden(&format!("edit_{id}.safetensors"));
        let (e_lat, e_img) = (
            rel_err(&latents, &g["latents"]),
            rel_err(&decoded, &g["image"]),
        );
        let db = psnr(&decoded, &g["image"]);
        eprintln!(
            "{id}: latents {e_lat:.2e}, image {e_img:.2e} relative, PSNR {db:.1} dB ({} op graph)",
            op_graph::current().name()
        );
        assert!(
            e_lat <= 1e-3 && e_img <= 1e-3,
            "{id}: {e_lat:.2e} {e_img:.2e}"
        );
        assert!(db >= 45.0, "{id}: PSNR {db:.1} dB");
    }
    assert_eq!(loaded.len(), 2);
}

#[test]
fn inpainting_keeps_the_unmasked_region_of_the_image() {
    // With a mask, the last step puts back the image's own latents outside it: what is kept
    // decodes from exactly the encoded image there.
    let p = Pipeline::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/sd35-tiny-large"),
        &PipelineOptions {
            precision: Some(Precision::F32),
            ..PipelineOptions::default()
        },
    )
    .unwrap();
    let (w, h, _, rgb) = read_png("edit_image.png");
    let rgb = image::RgbImage {
        width: w,
        height: h,
        pixels: rgb,
    };
    let (_, _, _, grey) = read_png("edit_mask.png");
    let image = image::to_tensor(&rgb, &Device::Cpu).unwrap();
    let mut req = p.default_request("a lighthouse");
    (req.width, req.height, req.steps) = (w, h, 3);
    req.edit = Some(Edit {
        image: image.clone(),
        mask: Some(image::mask_tensor(&grey, w, h, &Device::Cpu).unwrap()),
        strength: 1.0,
    });
    let latents = p.sample(&req, &mut |_, _| {}).unwrap();
    let encoded = p.encode_image(&image).unwrap();
    // Latent cell (row 0, col 0) is outside the mask (it starts at row 13, column 5).
    let cell = |t: &Tensor| t.narrow(2, 0, 1).unwrap().narrow(3, 0, 1).unwrap();
    assert_eq!(rel_err(&cell(&latents), &cell(&encoded)), 0.0);
    // Cell (row 2, col 2) is inside: repainted from noise, not the image.
    let inside = |t: &Tensor| t.narrow(2, 2, 1).unwrap().narrow(3, 2, 1).unwrap();
    assert!(rel_err(&inside(&latents), &inside(&encoded)) > 0.1);
}
