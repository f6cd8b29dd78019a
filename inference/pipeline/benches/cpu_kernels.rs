//! CPU kernel benchmark: f32 matrix multiply and attention at the shapes of the pipeline
//! benchmark (SD3 transformer, 24 heads of 64, 512×512 with CFG: batch 2, 1024 image + 333 text
//! tokens), each variant timed side by side in one run.
//!
//!     RAYON_NUM_THREADS=2 cargo bench -p sd35-pipeline --bench cpu_kernels
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) every kernel runs once on small
//! shapes, as a smoke test.

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sd35_pipeline::attention;

/// CPU time of this process (all threads, user + system) in seconds, from /proc (Linux).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Median wall time of `runs` calls and their mean CPU time, in seconds, after a warm-up call.
/// CPU time stays meaningful when other processes share the machine.
fn time(runs: usize, mut f: impl FnMut()) -> (f64, Option<f64>) {
    f();
    let cpu0 = cpu_seconds();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    let cpu = cpu0.zip(cpu_seconds()).map(|(a, b)| (b - a) / runs as f64);
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], cpu)
}

fn ms(t: Option<f64>) -> String {
    t.map_or_else(|| "n/a".into(), |t| format!("{:.0}", t * 1e3))
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

/// The attention this crate used before the fused kernel: candle matmuls and softmax, head by
/// head in blocks of 128 query rows (output `[B, H, N, D]`, then heads merged).
fn previous_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    use rayon::prelude::*;
    let q = (q * scale).unwrap();
    let (b, h, n, d) = q.dims4().unwrap();
    let m = k.dim(2).unwrap();
    let qf = q.reshape((b * h, n, d)).unwrap();
    let kf = k.contiguous().unwrap().reshape((b * h, m, d)).unwrap();
    let vf = v.contiguous().unwrap().reshape((b * h, m, d)).unwrap();
    let heads: Vec<Tensor> = (0..b * h)
        .into_par_iter()
        .map(|i| {
            let qi = qf.get(i).unwrap();
            let kt = kf.get(i).unwrap().t().unwrap();
            let vi = vf.get(i).unwrap();
            let blocks: Vec<Tensor> = (0..n)
                .step_by(128)
                .map(|s| {
                    let rows = 128.min(n - s);
                    let scores = qi.narrow(0, s, rows).unwrap().matmul(&kt).unwrap();
                    let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
                    p.matmul(&vi).unwrap()
                })
                .collect();
            Tensor::cat(&blocks, 0).unwrap()
        })
        .collect();
    let out = Tensor::stack(&heads, 0)
        .unwrap()
        .reshape((b, h, n, d))
        .unwrap();
    out.transpose(1, 2).unwrap().reshape((b, n, h * d)).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|a| a == "--bench");
    // A word given after `--` runs only the kernels whose label contains it (for profiling).
    let filter = args.iter().find(|a| !a.starts_with("--"));
    let wanted = |name: &str| filter.is_none_or(|f| name.contains(f.as_str()));
    let threads = rayon::current_num_threads();
    let (runs, size, (b, h, n, d)) = if full {
        (5, 2048, (2, 24, 1357, 64))
    } else {
        (1, 64, (1, 2, 70, 64))
    };
    println!("{threads} threads, f32");
    println!();
    println!("| kernel | shape | wall ms (median of {runs}) | CPU ms (mean) | |");
    println!("|---|---|---:|---:|---|");

    if wanted("sgemm") {
        let x = randn(&[size, size]);
        let y = randn(&[size, size]);
        let (t, cpu) = time(runs, || {
            x.matmul(&y).unwrap();
        });
        let gflops = 2.0 * (size as f64).powi(3) / t / 1e9;
        println!(
            "| sgemm (candle matmul) | {size}³ | {:.1} | {} | {gflops:.0} GFLOP/s |",
            t * 1e3,
            ms(cpu)
        );
    }

    if wanted("linear") {
        // The products of one MMDiT block at hidden 1536, 512² (2048 image and 666 text rows,
        // CFG batch 2), as the Linear layers compute them: `x · Wᵀ` with `W` stored `[out, in]`.
        let shapes: &[(usize, usize, usize)] = if full {
            &[
                (2048, 1536, 4608),
                (2048, 1536, 1536),
                (2048, 1536, 6144),
                (2048, 6144, 1536),
                (666, 1536, 4608),
                (666, 1536, 6144),
                (666, 6144, 1536),
            ]
        } else {
            &[(64, 32, 96)]
        };
        for &(m, k, n) in shapes {
            let x = randn(&[m, k]);
            let w = randn(&[n, k]);
            // `Linear` keeps an f32 weight on the CPU as `Wᵀ` (`[in, out]`, contiguous); the
            // other layout is `W` as stored, multiplied through a transposed view.
            let wt = w.t().unwrap().contiguous().unwrap();
            let (tv, cv) = time(runs, || {
                x.matmul(&w.t().unwrap()).unwrap();
            });
            let (t, cpu) = time(runs, || {
                x.matmul(&wt).unwrap();
            });
            let gflops = 2.0 * (m * k * n) as f64 / t / 1e9;
            let cpu_ratio = cpu
                .zip(cv)
                .map_or_else(|| "n/a".into(), |(c, v)| format!("{:.2}", c / v));
            println!(
                "| linear x·Wᵀ, Wᵀ stored `[in, out]` | {m}×{k}→{n} | {:.1} | {} | {gflops:.0} GFLOP/s; {:.2}× the wall time, {cpu_ratio}× the CPU time of W `[out, in]` through a view ({:.1} ms, {} ms CPU) |",
                t * 1e3,
                ms(cpu),
                t / tv,
                tv * 1e3,
                ms(cv),
            );
        }
    }

    let q = randn(&[b, h, n, d]);
    let k = randn(&[b, h, n, d]);
    let v = randn(&[b, h, n, d]);
    let scale = 1.0 / (d as f64).sqrt();
    let shape = format!("[{b},{h},{n},{d}]");
    let flops = 4.0 * (b * h * n * n * d) as f64;
    let fused = || {
        attention::attention(&q, &k, &v, scale, None).unwrap();
    };
    let previous = || {
        previous_attention(&q, &k, &v, scale);
    };
    let unfused = || {
        attention::attention_unfused(&q, &k, &v, scale, None).unwrap();
    };
    let variants: [(&str, &dyn Fn()); 3] = [
        ("attention: fused blocked kernel", &fused),
        (
            "attention: previous, candle ops per 128-row block",
            &previous,
        ),
        ("attention: candle ops, N×N scores", &unfused),
    ];
    let mut first = None;
    for (name, f) in variants {
        if !wanted(name) {
            continue;
        }
        let (t, cpu) = time(runs, f);
        let base = *first.get_or_insert((t, cpu));
        let cpu_ratio = cpu
            .zip(base.1)
            .map_or_else(|| "n/a".into(), |(c, b)| format!("{:.2}", c / b));
        println!(
            "| {name} | {shape} | {:.1} | {} | {:.0} GFLOP/s; {:.2}× the first's wall time, {cpu_ratio}× its CPU time |",
            t * 1e3,
            ms(cpu),
            flops / t / 1e9,
            t / base.0,
        );
    }

    if filter.is_none() {
        // The result is checked too, so a fast wrong kernel cannot pass for a fast one.
        let ours = attention::attention(&q, &k, &v, scale, None).unwrap();
        let want = previous_attention(&q, &k, &v, scale);
        let sum = |t: Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let rel = (sum((&ours - &want).unwrap()) / sum(want)).sqrt();
        println!();
        println!("fused against previous: relative L2 difference {rel:.1e}");
        assert!(rel < 1e-4, "fused attention disagrees: {rel:e}");
    }
}
