//! The fused kernel against the unfused form in f64, on SD3's shapes, masks, strided heads and
//! thread counts; the chunked unfused form against one block.

#![allow(clippy::unwrap_used)]

use super::*;
use rand::{Rng, SeedableRng};

fn random(shape: &[usize], spread: f32, seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-spread..spread)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The unfused form in f64: the ground truth.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Tensor {
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let bias = bias.map(f);
    attention_unfused(&f(q), &f(k), &f(v), scale, bias.as_ref()).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let norm = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (diff / norm).sqrt()
}

fn check(shape_q: [usize; 4], m: usize, spread: f32, seed: u64) {
    let [b, h, n, d] = shape_q;
    let q = random(&[b, h, n, d], spread, seed);
    let k = random(&[b, h, m, d], spread, seed + 1);
    let v = random(&[b, h, m, d], 1.0, seed + 2);
    let scale = 1.0 / (d as f64).sqrt();
    let ours = attention(&q, &k, &v, scale, None).unwrap();
    let e = rel_err(&ours, &reference(&q, &k, &v, scale, None));
    assert!(
        e < F32_RELATIVE_ERROR_BOUND,
        "{shape_q:?} x {m}: relative error {e:e}"
    );
}

#[test]
fn matches_the_unfused_form_on_odd_and_sd3_shapes() {
    // Tails everywhere: rows not a multiple of 4 or of the block, keys not of the tile,
    // head widths below, at and beyond the register groups.
    check([1, 1, 1, 8], 1, 1.0, 1);
    check([1, 2, 5, 16], 3, 2.0, 2);
    check([2, 3, 67, 64], 131, 2.0, 3);
    check([1, 2, 130, 40], 65, 2.0, 4);
    check([1, 1, 70, 96], 200, 1.0, 5);
    // SD3.5 medium's joint attention at 256x256 (256 image + 333 text tokens), 4 heads.
    check([2, 4, 589, 64], 589, 2.0, 6);
}

#[test]
fn large_scores_stay_accurate() {
    // Scaled scores up to about ±30: the online maximum keeps exp in range.
    check([1, 2, 100, 64], 150, 3.0, 7);
}

#[test]
fn reads_strided_heads_in_place() {
    // Heads split from a fused [B, N, 3·H·D] projection, as the models produce them.
    let (b, n, h, d) = (2, 37, 3, 32);
    let qkv = random(&[b, n, 3 * h * d], 2.0, 8);
    let split = |i: usize| {
        qkv.narrow(2, i * h * d, h * d)
            .unwrap()
            .reshape((b, n, h, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    };
    let (q, k, v) = (split(0), split(1), split(2));
    assert!(!q.is_contiguous());
    let ours = attention(&q, &k, &v, 0.3, None).unwrap();
    let e = rel_err(&ours, &reference(&q, &k, &v, 0.3, None));
    assert!(e < F32_RELATIVE_ERROR_BOUND, "relative error {e:e}");
}

#[test]
fn joint_parts_equal_attention_over_the_concatenation() {
    let (b, h, d) = (2, 2, 64);
    let parts: Vec<(Tensor, Tensor, Tensor)> = [(70, 1), (13, 2)]
        .iter()
        .map(|&(n, s)| {
            (
                random(&[b, h, n, d], 2.0, s * 10),
                random(&[b, h, n, d], 2.0, s * 10 + 1),
                random(&[b, h, n, d], 1.0, s * 10 + 2),
            )
        })
        .collect();
    let qkv: Vec<Qkv<'_>> = parts.iter().map(|(q, k, v)| Qkv { q, k, v }).collect();
    let outs = joint_attention(&qkv, 0.125).unwrap();
    let cat = |i: usize| {
        let ts: Vec<&Tensor> = parts.iter().map(|p| [&p.0, &p.1, &p.2][i]).collect();
        Tensor::cat(&ts, 2).unwrap()
    };
    let whole = reference(&cat(0), &cat(1), &cat(2), 0.125, None);
    assert_eq!(outs[0].dims(), &[b, 70, h * d]);
    assert_eq!(outs[1].dims(), &[b, 13, h * d]);
    let joined = Tensor::cat(&[&outs[0], &outs[1]], 1).unwrap();
    let e = rel_err(&joined, &whole);
    assert!(e < F32_RELATIVE_ERROR_BOUND, "relative error {e:e}");
}

#[test]
fn additive_bias_and_causal_mask() {
    let (b, h, n, d) = (1, 3, 77, 64);
    let q = random(&[b, h, n, d], 2.0, 20);
    let k = random(&[b, h, n, d], 2.0, 21);
    let v = random(&[b, h, n, d], 1.0, 22);
    // T5-style per-head bias [1, H, N, N].
    let bias = random(&[1, h, n, n], 3.0, 23);
    let ours = attention(&q, &k, &v, 1.0, Some(&bias)).unwrap();
    let e = rel_err(&ours, &reference(&q, &k, &v, 1.0, Some(&bias)));
    assert!(e < F32_RELATIVE_ERROR_BOUND, "bias: relative error {e:e}");
    // CLIP's causal mask [N, N] with -inf above the diagonal: row 0 sees one key only.
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (n, n), &Device::Cpu).unwrap();
    let ours = attention(&q, &k, &v, 0.125, Some(&mask)).unwrap();
    let e = rel_err(&ours, &reference(&q, &k, &v, 0.125, Some(&mask)));
    assert!(e < F32_RELATIVE_ERROR_BOUND, "causal: relative error {e:e}");
    let first = ours.narrow(1, 0, 1).unwrap().flatten_all().unwrap();
    let v0 = v
        .narrow(2, 0, 1)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .flatten_all()
        .unwrap();
    assert!(
        rel_err(&first, &v0) < 1e-6,
        "a query seeing one key returns its value"
    );
}

#[test]
fn same_result_with_one_thread_and_many() {
    let q = random(&[1, 2, 300, 64], 2.0, 30);
    let k = random(&[1, 2, 300, 64], 2.0, 31);
    let v = random(&[1, 2, 300, 64], 1.0, 32);
    let many = attention(&q, &k, &v, 0.125, None).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let one = pool.install(|| attention(&q, &k, &v, 0.125, None).unwrap());
    let (a, b) = (
        many.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    assert_eq!(a, b);
}

#[test]
fn non_cpu_dtypes_take_the_unfused_path() {
    // f64 is not fused: the result is the unfused form's, heads merged all the same.
    let q = random(&[1, 2, 9, 16], 1.0, 40)
        .to_dtype(DType::F64)
        .unwrap();
    let ours = attention(&q, &q, &q, 0.25, None).unwrap();
    assert_eq!(ours.dims(), &[1, 9, 32]);
    assert_eq!(ours.dtype(), DType::F64);
}

#[test]
fn unfused_attention_in_query_blocks_equals_one_block() {
    let (b, h, n, m, d) = (2, 3, 23, 23, 16);
    let q = random(&[b, h, n, d], 2.0, 40);
    let k = random(&[b, h, m, d], 2.0, 41);
    let v = random(&[b, h, m, d], 1.0, 42);
    let per_head = random(&[1, h, n, m], 3.0, 43);
    let causal: Vec<f32> = (0..n)
        .flat_map(|i| (0..m).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let causal = Tensor::from_vec(causal, (n, m), &Device::Cpu).unwrap();
    for bias in [None, Some(&per_head), Some(&causal)] {
        let whole = attention_unfused_under(&q, &k, &v, 0.25, bias, usize::MAX).unwrap();
        // One row of scores for every (batch, head) is b·h·m elements: blocks of 1, 2 and
        // 5 query rows.
        for rows in [1, 2, 5] {
            let blocks = attention_unfused_under(&q, &k, &v, 0.25, bias, rows * b * h * m).unwrap();
            let e = rel_err(&blocks, &whole);
            assert!(e < 1e-6, "{rows} rows: relative error {e:e}");
        }
    }
}
