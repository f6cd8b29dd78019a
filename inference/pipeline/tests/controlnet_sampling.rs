//! ControlNets in the sampler against diffusers' `StableDiffusion3ControlNetPipeline` on the
//! tiny large model: canny at two conditioning scales without guidance, blur with guidance, and
//! a condition limited to the middle steps (control_guidance_start/end), from the diffusers
//! folder and from Stability's single file. Goldens by
//! `inference/reference/make_controlnet_goldens.py`.

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{golden, golden_json, image_of, psnr, read_rgb, rel_err, testdata};
use sd35_pipeline::pipeline::control_keeps;
use sd35_pipeline::{Control, Pipeline, PipelineOptions, Precision, image, op_graph};

#[test]
fn control_guidance_start_and_end_switch_steps_as_diffusers() {
    // 5 steps, 0.2..0.8: step 0 (0/5 < 0.2) and step 4 (5/5 > 0.8) are off.
    let on: Vec<bool> = (0..5).map(|i| control_keeps(i, 5, 0.2, 0.8)).collect();
    assert_eq!(on, [false, true, true, true, false]);
    assert!((0..28).all(|i| control_keeps(i, 28, 0.0, 1.0)));
}

#[test]
fn controlnets_in_the_sampler_match_the_reference() {
    let manifest = golden_json("controlnets.json");
    let mut ran = 0;
    for case in manifest["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let mode = case["mode"].as_str().unwrap().parse().unwrap();
        // Every case from the diffusers folder; the canny cases from the single file too.
        let mut sources = vec![case["controlnet"].as_str().unwrap()];
        if id.starts_with("canny") {
            sources.push(case["single_file"].as_str().unwrap());
        }
        for source in sources {
            let mut p = Pipeline::load(
                &testdata().join(case["model"].as_str().unwrap()),
                &PipelineOptions {
                    precision: Some(Precision::F32),
                    ..PipelineOptions::default()
                },
            )
            .unwrap();
            p.add_controlnet(mode, &testdata().join(source)).unwrap();
            let mut req = p.default_request(case["prompt"].as_str().unwrap());
            req.negative_prompt = case["negative_prompt"].as_str().unwrap().to_owned();
            req.width = case["width"].as_u64().unwrap() as usize;
            req.height = case["height"].as_u64().unwrap() as usize;
            req.steps = case["steps"].as_u64().unwrap() as usize;
            req.guidance = case["guidance"].as_f64().unwrap();
            req.slg = None;
            req.init_latents =
                Some(golden(&format!("controlnet_{id}.init.safetensors"))["latents"].clone());
            let picture = read_rgb(case["control_image"].as_str().unwrap());
            req.control = Some(Control {
                mode,
                image: image::to_tensor(&picture, &Device::Cpu).unwrap(),
                scale: case["scale"].as_f64().unwrap(),
                start: case["control_guidance_start"].as_f64().unwrap(),
                end: case["control_guidance_end"].as_f64().unwrap(),
            });
            let latents = p.sample(&req, &mut |_, _| {}).unwrap();
            let img = image_of(&p, &latents);
            let g = golden(&format!("controlnet_{id}.safetensors"));
            let (e_lat, e_img) = (rel_err(&latents, &g["latents"]), rel_err(&img, &g["image"]));
            let db = psnr(&img, &g["image"]);
            eprintln!(
                "controlnet {id} ({source}): latents {e_lat:.2e}, image {e_img:.2e} relative, \
                 PSNR {db:.1} dB ({} op graph)",
                op_graph::current().name()
            );
            assert!(
                e_lat <= 1e-3 && e_img <= 1e-3,
                "{id}: {e_lat:.2e} {e_img:.2e}"
            );
            assert!(db >= 45.0, "{id}: PSNR {db:.1} dB");
            // The condition matters: without it the latents are far away.
            let mut plain = req.clone();
            plain.control = None;
            let without = p.sample(&plain, &mut |_, _| {}).unwrap();
            assert!(
                rel_err(&without, &latents) > 1e-2,
                "{id}: the ControlNet did nothing"
            );
            ran += 1;
        }
    }
    assert_eq!(ran, 8);
}

#[test]
fn an_unserved_mode_is_named_with_the_served_ones() {
    let mut p = Pipeline::load(
        &testdata().join("sd35-tiny-large"),
        &PipelineOptions {
            precision: Some(Precision::F32),
            ..PipelineOptions::default()
        },
    )
    .unwrap();
    p.add_controlnet(
        sd35_contract::ControlMode::Canny,
        &testdata().join("controlnet/canny"),
    )
    .unwrap();
    let mut req = p.default_request("x");
    (req.width, req.height, req.steps) = (32, 32, 1);
    req.control = Some(Control {
        mode: sd35_contract::ControlMode::Depth,
        image: Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap(),
        scale: 1.0,
        start: 0.0,
        end: 1.0,
    });
    let err = p.sample(&req, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("`depth`") && err.contains("`canny`"), "{err}");
}
