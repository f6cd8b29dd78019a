//! `sd35-server build-engine` on the tiny model: the engine serves the same image as the cache
//! in bf16, holds the fp8 PSNR bound, is refused when damaged, is built in bounded memory, and
//! records its smoke image — which a server repeats before it turns ready, refusing an engine
//! whose weights were changed even when its manifest was made to match.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use candle_core::{DType, Device, Tensor};
use common::serving::{BIN, Server};
use common::{server, stderr, testdata};
use sd35_contract::{ENGINE_MANIFEST, ExitReason};
use sd35_pipeline::{Pipeline, PipelineOptions, Precision};

/// A cache root holding the tiny model imported under key `c`.
fn cache_with(model: &str) -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let root = cache.path().to_str().unwrap().to_owned();
    let src = format!("--import-dir={}", testdata(model).display());
    let out = server(
        &[
            "fetch",
            "--variant=large",
            "--cache-root",
            &root,
            "--cache-key=c",
            &src,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    cache
}

fn build(cache: &Path, key: &str, precision: &str, extra: &[&str]) -> std::process::Output {
    let root = cache.to_str().unwrap();
    let mut args = vec![
        "build-engine",
        "--cache-root",
        root,
        "--cache-key=c",
        "--engine-key",
        key,
        "--precision",
        precision,
    ];
    args.extend_from_slice(extra);
    server(&args, &[])
}

/// The image of a fixed request; `precision` None takes an engine's own.
fn image(path: &Path, precision: Option<Precision>) -> Tensor {
    let opts = PipelineOptions {
        precision,
        device: Device::Cpu,
        load_t5: true,
        ..PipelineOptions::default()
    };
    let p = Pipeline::load(path, &opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut req = p.default_request("a red cube on a table");
    req.negative_prompt = "blurry".into();
    req.width = 64;
    req.height = 64;
    req.steps = 3;
    req.guidance = 3.5;
    req.seed = 7;
    let latents = p.sample(&req, &mut |_, _| {}).unwrap();
    ((p.decode(&latents).unwrap() / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    10.0 * (1.0 / mse.max(1e-20)).log10()
}

/// The reference's own fp8 degradation recorded with the golden outputs.
fn reference_fp8_psnr() -> f64 {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(testdata("golden/manifest.json")).unwrap()).unwrap();
    m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "large_fp8_cfg")
        .unwrap()["reference_psnr_vs_f32_db"]
        .as_f64()
        .unwrap()
}

fn engine(cache: &Path, key: &str) -> PathBuf {
    cache.join("engines").join(key)
}

#[test]
fn bf16_engine_gives_the_same_image_as_the_cache_in_bf16() {
    let cache = cache_with("sd35-tiny-large");
    let out = build(cache.path(), "e-bf16", "bf16", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = engine(cache.path(), "e-bf16");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(ENGINE_MANIFEST)).unwrap()).unwrap();
    assert_eq!(manifest["precision"], "bf16");
    assert_eq!(manifest["source_cache_key"], "c");
    assert_eq!(manifest["engine_key"], "e-bf16");
    // Not given on the command line: the variant the cache was fetched as.
    assert_eq!(manifest["variant"], "large");
    assert_eq!(
        manifest["format_version"],
        sd35_contract::ENGINE_FORMAT_VERSION
    );
    assert!(
        manifest["tool_version"]
            .as_str()
            .unwrap()
            .starts_with("sd35-server")
    );
    assert!(
        manifest["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["sha256"].as_str().unwrap().len() == 64)
    );
    // The smoke image: its parameters, where it was made, its pixels and their hash.
    let smoke = &manifest["smoke"];
    assert_eq!(
        (smoke["width"].as_u64(), smoke["height"].as_u64()),
        (Some(32), Some(32))
    );
    assert_eq!(
        (smoke["steps"].as_u64(), smoke["seed"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(smoke["device"], "cpu");
    let pixels = base64::engine::general_purpose::STANDARD
        .decode(smoke["pixels"].as_str().unwrap())
        .unwrap();
    assert_eq!(pixels.len(), 32 * 32 * 3);
    assert_eq!(smoke["sha256"], common::sha256_hex(&pixels));
    // Every float weight is stored in bf16.
    let shard = dir.join("transformer/diffusion_pytorch_model-00001-of-00003.safetensors");
    for (name, t) in candle_core::safetensors::load(&shard, &Device::Cpu).unwrap() {
        assert_eq!(t.dtype(), DType::BF16, "{name}");
    }

    let from_cache = image(&cache.path().join("models/c"), Some(Precision::Bf16));
    // An engine brings its own precision; asking for another is refused, naming both.
    let from_engine = image(&dir, None);
    let asked_f32 = PipelineOptions {
        precision: Some(Precision::F32),
        ..PipelineOptions::default()
    };
    let err = Pipeline::load(&dir, &asked_f32).unwrap_err();
    assert_eq!(err.exit_reason(), ExitReason::EngineMismatch);
    assert!(
        err.to_string().contains("f32") && err.to_string().contains("bf16"),
        "{err}"
    );
    assert_eq!(
        max_abs_diff(&from_cache, &from_engine),
        0.0,
        "engine image differs from the cache image"
    );

    // A second run keeps the verified engine.
    let out = build(cache.path(), "e-bf16", "bf16", &[]);
    assert!(out.status.success());
    assert!(stderr(&out).contains("already built"), "{}", stderr(&out));
}

#[test]
fn fp8_engine_holds_the_psnr_bound_and_matches_quantisation_at_load() {
    let cache = cache_with("sd35-tiny-large");
    let out = build(cache.path(), "e-fp8", "fp8", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = engine(cache.path(), "e-fp8");
    let shard = dir.join("transformer/diffusion_pytorch_model-00001-of-00003.safetensors");
    let tensors = candle_core::safetensors::load(&shard, &Device::Cpu).unwrap();
    let f8 = tensors
        .iter()
        .filter(|(_, t)| t.dtype() == DType::F8E4M3 && t.elem_count() > 0)
        .count();
    assert!(f8 > 0, "no F8 weights in the fp8 engine");
    for (name, t) in &tensors {
        if t.dtype() == DType::F8E4M3 && t.elem_count() > 0 {
            let scale = &tensors[&format!("{}scale_weight", name.trim_end_matches("weight"))];
            assert_eq!(scale.dims(), &[t.dim(0).unwrap(), 1], "{name}");
        }
    }

    let f32_image = image(&cache.path().join("models/c"), Some(Precision::F32));
    let at_load = image(&cache.path().join("models/c"), Some(Precision::Fp8));
    let from_engine = image(&dir, None);
    let ours = psnr(&from_engine, &f32_image);
    let floor = reference_fp8_psnr() - 1.0;
    eprintln!(
        "fp8 engine: PSNR vs f32 {ours:.2} dB (floor {floor:.2} dB); vs fp8 quantised at load {:.2} dB",
        psnr(&from_engine, &at_load)
    );
    assert!(ours >= floor, "PSNR {ours:.2} dB < {floor:.2} dB");
    // Same quantiser, same weights: the engine is what the pipeline would build at load.
    assert_eq!(max_abs_diff(&from_engine, &at_load), 0.0);

    let out = build(cache.path(), "e-fp8-t", "fp8", &["--fp8-scale=per-tensor"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let per_tensor = image(&engine(cache.path(), "e-fp8-t"), None);
    let ours = psnr(&per_tensor, &f32_image);
    eprintln!("fp8 per-tensor engine: PSNR vs f32 {ours:.2} dB");
    assert!(
        ours >= floor,
        "per-tensor PSNR {ours:.2} dB < {floor:.2} dB"
    );
}

#[test]
fn fp8_scaled_single_file_converts_to_both_precisions() {
    let cache = cache_with("sd35-tiny-large-fp8");
    for precision in ["bf16", "fp8"] {
        let out = build(cache.path(), precision, precision, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let from_cache = image(&cache.path().join("models/c"), Some(Precision::Fp8));
    let fp8 = image(&engine(cache.path(), "fp8"), None);
    let bf16 = image(&engine(cache.path(), "bf16"), None);
    // The fp8 engine keeps the checkpoint's F8 weights as they are.
    assert!(
        psnr(&fp8, &from_cache) > 60.0,
        "{}",
        psnr(&fp8, &from_cache)
    );
    assert!(
        psnr(&bf16, &from_cache) > 30.0,
        "{}",
        psnr(&bf16, &from_cache)
    );
}

#[test]
fn damaged_or_foreign_engines_are_refused() {
    let cache = cache_with("sd35-tiny-large");
    let out = build(cache.path(), "e", "bf16", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = engine(cache.path(), "e");
    let opts = PipelineOptions::default();

    let vae = dir.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&vae).unwrap();
    std::fs::write(&vae, &bytes[..bytes.len() - 10]).unwrap();
    let err = Pipeline::load(&dir, &opts).unwrap_err().to_string();
    assert!(err.contains("corrupt") && err.contains("rebuild"), "{err}");
    // build-engine notices (sha256) and rebuilds.
    let out = build(cache.path(), "e", "bf16", &[]);
    assert!(out.status.success());
    assert!(!stderr(&out).contains("already built"));
    Pipeline::load(&dir, &opts).unwrap();

    let manifest = dir.join(ENGINE_MANIFEST);
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["format_version"] = 999.into();
    std::fs::write(&manifest, v.to_string()).unwrap();
    let err = Pipeline::load(&dir, &opts).unwrap_err().to_string();
    assert!(err.contains("format version 999"), "{err}");

    std::fs::remove_file(&manifest).unwrap();
    let err = sd35_pipeline::engine::open(&dir, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("incomplete"), "{err}");

    // No complete cache: a clear refusal with its own exit code.
    let empty = tempfile::tempdir().unwrap();
    let out = build(empty.path(), "e", "fp8", &[]);
    assert_eq!(out.status.code(), Some(ExitReason::NotFound.code()));
    assert!(stderr(&out).contains("run fetch first"), "{}", stderr(&out));
}

/// Writes a safetensors file of f32 matrices `[rows, cols]` filled with a ramp.
fn write_big(path: &Path, names: &[String], rows: usize, cols: usize) {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let bytes = (rows * cols * 4) as u64;
    for (i, n) in names.iter().enumerate() {
        let i = i as u64;
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": "F32", "shape": [rows, cols], "data_offsets": [i * bytes, (i + 1) * bytes]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    let row: Vec<u8> = (0..cols)
        .flat_map(|c| ((c as f32 - cols as f32 / 2.0) * 1e-3).to_le_bytes())
        .collect();
    for _ in names {
        for _ in 0..rows {
            f.write_all(&row).unwrap();
        }
    }
}

/// Runs build-engine while sampling its `VmHWM` from `/proc/<pid>/status`.
fn build_polling_rss(cache: &Path, key: &str, precision: &str) -> (std::process::Output, u64) {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_sd35-server"))
        .args([
            "build-engine",
            "--cache-root",
            cache.to_str().unwrap(),
            "--cache-key=c",
            "--engine-key",
            key,
            "--precision",
            precision,
        ])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = PathBuf::from(format!("/proc/{}/status", child.id()));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0u64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(s) = std::fs::read_to_string(&status)
                && let Some(kb) = s
                    .lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            {
                peak = peak.max(kb * 1024);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        peak
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    (out, sampler.join().unwrap())
}

#[test]
fn build_memory_stays_near_one_tensor_not_the_model() {
    // A cache whose transformer holds 6 matrices of 32 MiB (192 MiB in all).
    let cache = tempfile::tempdir().unwrap();
    let model = cache.path().join("models/c");
    std::fs::create_dir_all(model.join("transformer")).unwrap();
    std::fs::write(model.join("model_index.json"), b"{}").unwrap();
    let (rows, cols) = (2048, 4096);
    let names: Vec<String> = (0..6)
        .map(|i| format!("transformer_blocks.{i}.ff.net.0.proj.weight"))
        .collect();
    write_big(
        &model.join("transformer/diffusion_pytorch_model.safetensors"),
        &names,
        rows,
        cols,
    );
    let marker = serde_json::json!({
        "source": {"kind": "import", "dir": "/synthetic"},
        "revision": "main",
        "variant": "large",
        "files": [],
        "completedAt": 0,
    });
    std::fs::write(model.join(".sd35-complete.json"), marker.to_string()).unwrap();

    for precision in ["fp8", "bf16"] {
        let (out, polled) = build_polling_rss(cache.path(), precision, precision);
        // The files convert; a transformer alone cannot make the smoke image, and an engine
        // without one is not complete (no server would serve it).
        let log = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(ExitReason::InvalidModel.code()),
            "{log}"
        );
        assert!(log.contains("smoke image could not be made"), "{log}");
        // The builder's high-water mark after the conversion, read from /proc/self/status.
        let logged: u64 = log
            .split("peak_rss_bytes")
            .nth(1)
            .map(|s| {
                s.chars()
                    .skip_while(|c| !c.is_ascii_digit())
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no peak_rss_bytes in {log}"));
        assert!(log.contains("engine files written"), "{log}");
        let peak = logged.max(polled);
        let largest = (rows * cols * 4) as u64;
        let model_bytes = largest * names.len() as u64;
        let bound = 2 * largest + (48 << 20);
        eprintln!(
            "{precision}: peak RSS {} MiB (polled {} MiB), largest tensor {} MiB, model {} MiB, bound {} MiB",
            peak >> 20,
            polled >> 20,
            largest >> 20,
            model_bytes >> 20,
            bound >> 20
        );
        assert!(peak < bound, "peak RSS {peak} ≥ {bound}");
        assert!(
            peak < model_bytes,
            "peak RSS {peak} not below the model size"
        );
    }
    // The fp8 output is what the quantiser gives for these rows.
    let t = candle_core::safetensors::load(
        engine(cache.path(), "fp8").join("transformer/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(t[&names[0]].dtype(), DType::F8E4M3);
    assert_eq!(
        t["transformer_blocks.0.ff.net.0.proj.scale_weight"].dims(),
        &[rows, 1]
    );
}

/// Runs `serve` on an engine expecting it to fail at start-up; its exit code and termination
/// message.
fn refused(cache: &Path, engine: &Path) -> (Option<i32>, String) {
    let message = cache.join("termination-log");
    let out = std::process::Command::new(BIN)
        .arg("serve")
        .arg("--model")
        .arg(cache.join("models/c"))
        .arg(format!("--engine={}", engine.display()))
        .args(["--host", "127.0.0.1", "--port", "0", "--no-warmup"])
        .arg(format!("--termination-message-path={}", message.display()))
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&message).unwrap_or_default();
    assert_eq!(
        text.lines().count(),
        1,
        "one line: {text:?} ({})",
        stderr(&out)
    );
    (out.status.code(), text)
}

/// Negates every value of one bf16 tensor in place: same size, other weights.
fn negate_tensor(file: &Path, name: &str) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[name];
    assert_eq!(t["dtype"], "BF16", "{name}");
    let (from, to) = (
        t["data_offsets"][0].as_u64().unwrap() as usize,
        t["data_offsets"][1].as_u64().unwrap() as usize,
    );
    for pair in bytes[8 + n + from..8 + n + to].chunks_exact_mut(2) {
        pair[1] ^= 0x80; // the sign bit of a little-endian bf16
    }
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn a_server_repeats_the_smoke_image_and_refuses_an_engine_whose_weights_changed() {
    let cache = cache_with("sd35-tiny-large");
    let out = build(cache.path(), "e", "bf16", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = engine(cache.path(), "e");

    // The engine as built: the server repeats the image exactly on this machine.
    let model = cache.path().join("models/c");
    let engine_flag = format!("--engine={}", dir.display());
    let s = Server::start(model.to_str().unwrap(), &[&engine_flag, "--no-warmup"]);
    let passed = s
        .log()
        .into_iter()
        .find(|l| l["fields"]["message"] == "engine smoke check passed")
        .expect("the smoke check ran before ready");
    assert_eq!(passed["fields"]["identical"], true, "{passed}");
    drop(s);

    // The final projection's weights negated, and the manifest made to match them: sizes
    // and checksums hold, so only the smoke image can tell.
    let shard = "transformer/diffusion_pytorch_model-00003-of-00003.safetensors";
    negate_tensor(&dir.join(shard), "proj_out.weight");
    let manifest_path = dir.join(ENGINE_MANIFEST);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let sum = common::sha256_hex(&std::fs::read(dir.join(shard)).unwrap());
    for f in manifest["files"].as_array_mut().unwrap() {
        if f["path"] == shard {
            f["sha256"] = sum.clone().into();
        }
    }
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    sd35_pipeline::engine::open(&dir, true).expect("the manifest matches the changed files");
    let (code, text) = refused(cache.path(), &dir);
    eprintln!("changed engine: {text}");
    assert_eq!(code, Some(ExitReason::EngineMismatch.code()), "{text}");
    assert!(
        text.starts_with("EngineMismatch: ") && text.contains("smoke check") && text.contains("dB"),
        "{text}"
    );
    let psnr: f64 = text
        .split(" dB PSNR")
        .next()
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no PSNR in {text}"));
    assert!(psnr < 40.0, "{psnr}");

    // An engine whose manifest lost its smoke image is incomplete: refused too.
    manifest.as_object_mut().unwrap().remove("smoke");
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let (code, text) = refused(cache.path(), &dir);
    assert_eq!(code, Some(ExitReason::EngineMismatch.code()), "{text}");
    assert!(text.contains("no smoke image"), "{text}");
    // build-engine does not take it for built: it builds it again, smoke image and all.
    let out = build(cache.path(), "e", "bf16", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("already built"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("smoke image recorded"),
        "{}",
        stderr(&out)
    );
}
