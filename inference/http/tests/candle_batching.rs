//! The candle backend with the tiny models: a batch of images equals the images generated
//! one at a time (up to f32 rounding), an item dropped mid-batch does not disturb the
//! others, and asking for previews changes no image.

use std::path::Path;

use sd35_http::ServeConfig;
use sd35_http::backend::{
    Backend, GenControl, GenFailure, GenParams, StepControl, decode_png, pixel_difference,
};
use sd35_http::candle::CandleBackend;
use sd35_pipeline::ModelSource;
use sd35_pipeline::device::OpenedDevice;

/// Wants every item, except item 1 after the first step when `drop_second` is set.
struct Keep(Vec<bool>, bool);

impl StepControl for Keep {
    fn wanted(&mut self, index: usize) -> bool {
        self.0.get(index).copied().unwrap_or(false)
    }
    fn step_done(&mut self, step: usize, _: usize, _: usize, _: f64) {
        if self.1 && step == 1 && self.0.len() > 1 {
            self.0[1] = false;
        }
    }
}

impl GenControl for Keep {
    fn partial_image(&mut self, _: usize, _: usize, _: Vec<u8>) {}
}

/// Wants every item and a preview of each after `at`; keeps the previews.
struct Previews {
    at: Vec<usize>,
    got: Vec<(usize, usize, Vec<u8>)>,
}

impl StepControl for Previews {
    fn wanted(&mut self, _: usize) -> bool {
        true
    }
    fn step_done(&mut self, _: usize, _: usize, _: usize, _: f64) {}
    fn preview_wanted(&mut self, _: usize, step: usize, _: usize) -> bool {
        self.at.contains(&step)
    }
}

impl GenControl for Previews {
    fn partial_image(&mut self, index: usize, step: usize, png: Vec<u8>) {
        self.got.push((index, step, png));
    }
}

fn decode(png_bytes: &[u8]) -> Vec<u8> {
    decode_png(png_bytes).expect("a PNG")
}

fn load(model: &str) -> CandleBackend {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(model);
    let model = dir.display().to_string();
    let argv = ["serve", "--precision", "f32", "--model", model.as_str()];
    let config = ServeConfig::try_parse_from(argv).expect("flags parse");
    let source = ModelSource::serving(&dir, None).expect("the model's manifests");
    CandleBackend::load(&config, &source, &OpenedDevice::cpu()).expect("load")
}

fn batch_equals_singles(model: &str) {
    let mut backend = load(model);
    let items: Vec<GenParams> = (0..3)
        .map(|i| GenParams {
            prompt: format!("thing {i}"),
            negative_prompt: "blur".into(),
            width: 32,
            height: 32,
            steps: 2,
            guidance_scale: 4.5,
            seed: i,
            ..Default::default()
        })
        .collect();
    let batched = backend.generate(&items, &mut Keep(vec![true; 3], false));
    let pruned = backend.generate(&items, &mut Keep(vec![true; 3], true));
    assert_eq!(pruned[1], Err(GenFailure::Cancelled));
    for (i, item) in items.iter().enumerate() {
        let single = backend.generate(std::slice::from_ref(item), &mut Keep(vec![true], false));
        let a = decode(batched[i].as_ref().expect("batched image"));
        let b = decode(single[0].as_ref().expect("single image"));
        let (max, differing) = pixel_difference(&a, &b);
        eprintln!(
            "{model} item {i}: max diff {max}, {differing}/{} bytes differ",
            a.len()
        );
        // f32 GEMM blocking depends on the batch size, so sums may round differently:
        // allow a last-bit difference in a few 8-bit pixels, nothing visible.
        assert!(
            max <= 2 && differing * 100 <= a.len(),
            "{model}: item {i}: max diff {max}, {differing} bytes differ"
        );
        if i != 1 {
            let c = decode(pruned[i].as_ref().expect("pruned batch image"));
            let (max, _) = pixel_difference(&a, &c);
            assert!(
                max <= 2,
                "{model}: item {i} changed by {max} when item 1 left"
            );
        }
    }
}

#[test]
fn large_batch_equals_singles() {
    batch_equals_singles("sd35-tiny-large");
}

#[test]
fn medium_batch_equals_singles() {
    batch_equals_singles("sd35-tiny-medium");
}

#[test]
fn previews_are_decoded_at_the_steps_asked_for_and_change_no_image() {
    let mut backend = load("sd35-tiny-large");
    let items: Vec<GenParams> = (0..2)
        .map(|i| GenParams {
            prompt: format!("thing {i}"),
            negative_prompt: String::new(),
            width: 32,
            height: 32,
            steps: 4,
            guidance_scale: 3.5,
            seed: i,
            ..Default::default()
        })
        .collect();
    let plain = backend.generate(&items, &mut Keep(vec![true; 2], false));
    let mut previews = Previews {
        at: vec![1, 3],
        got: Vec::new(),
    };
    let watched = backend.generate(&items, &mut previews);
    assert_eq!(plain, watched, "asking for previews changed an image");
    let order: Vec<(usize, usize)> = previews.got.iter().map(|(i, s, _)| (*i, *s)).collect();
    assert_eq!(order, [(0, 1), (1, 1), (0, 3), (1, 3)]);
    let last = decode(watched[0].as_ref().expect("image"));
    let early = decode(&previews.got[0].2);
    let late = decode(&previews.got[2].2);
    assert_eq!((early.len(), late.len()), (last.len(), last.len()));
    // The model's prediction converges on the image: step 3 is nearer than step 1.
    let distance = |a: &[u8]| {
        a.iter()
            .zip(&last)
            .map(|(x, y)| u64::from(x.abs_diff(*y)))
            .sum::<u64>()
    };
    assert!(
        distance(&late) < distance(&early),
        "step 3 preview is not nearer the image than step 1's ({} vs {})",
        distance(&late),
        distance(&early)
    );
}
