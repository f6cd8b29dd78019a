//! Scaled dot-product attention: a fused, blocked CPU kernel, and the unfused form every other
//! device runs with candle's own operations.
//!
//! `softmax(Q Kᵀ · scale + bias) V` for queries `[B, H, N, D]`, keys and values `[B, H, M, D]`
//! and an optional additive bias broadcastable to `[B, H, N, M]`. [`joint_attention`] takes the
//! sequence in parts (the MMDiT's image and text tokens) and returns each part's output with the
//! heads merged, `[B, n, H·D]`, so neither the inputs are concatenated nor the output split.
//!
//! # The blocked algorithm
//!
//! This is the reference accelerator kernels are checked against. For each batch `b` and head
//! `h`:
//! 1. Pack the keys transposed in blocks of [`KEY_BLOCK`] (`[D][KEY_BLOCK]`, zero padded) and
//!    the values `[M][D]`, once per head.
//! 2. Split the queries into blocks of [`QUERY_BLOCK`] rows, computed in parallel. Row `i` keeps a
//!    running maximum `m_i = −∞`, a running sum `l_i = 0` and an accumulator `o_i = 0` (`D`
//!    values). Everything is in base 2: queries are multiplied by `scale · log2(e)` when they
//!    are loaded and the bias by `log2(e)`, so that `2^s` replaces `e^s`.
//! 3. For each key block: `s_ij = q_i · k_j (+ bias_ij)`, then `m' = max(m_i, max_j s_ij)`,
//!    `p_ij = 2^(s_ij − m')`, `c = 2^(m_i − m')`, `l_i ← c · l_i + Σ_j p_ij`,
//!    `o_i ← c · o_i + Σ_j p_ij v_j`, `m_i ← m'`. Padded keys count as `s = −∞`.
//! 4. `out_i = o_i / l_i`.
//!
//! Only a `QUERY_BLOCK × KEY_BLOCK` tile of scores exists at any time: the `N × M` matrix is
//! never materialised.
//!
//! # Guarantees of the CPU kernel
//! - Agrees with the unfused form evaluated in f64 to a relative L2 error below
//!   [`F32_RELATIVE_ERROR_BOUND`] for f32 inputs whose scaled scores stay within ±30 (the tests
//!   below cover both SD3 shapes and masks).
//! - Deterministic: every output row is reduced by one task, over the keys in order, so the
//!   result does not depend on the number of threads.
//! - Reads its inputs in place through their strides (heads split from a fused qkv projection
//!   are not copied first); `exp` is [`crate::simd::exp2`], vectorised, never a libm call; the
//!   loops run with AVX-512 or AVX2+FMA where the CPU has them.
//! - Keys masked by a `−∞` bias get weight 0. A row whose keys are all masked gives NaN, as
//!   the unfused form does.
//!
//! On CUDA (or for dtypes other than f32) the unfused form runs instead: two matmuls
//! (cuBLAS, in the tensors' dtype, bf16 included) around candle's last-dimension softmax.

use candle_core::{DType, Device, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::simd::{self, LOG2_E, MulAdd};
use crate::{Error, Result};

/// Keys per block: the tile of scores is `QUERY_BLOCK × KEY_BLOCK`.
pub const KEY_BLOCK: usize = 64;
/// Queries per parallel task.
pub const QUERY_BLOCK: usize = 64;
/// Relative L2 error bound of the CPU kernel against the f64 unfused form (see the module doc).
pub const F32_RELATIVE_ERROR_BOUND: f64 = 1e-5;
/// Query rows whose scores are computed together (register blocking).
const ROWS: usize = 4;
/// Head-dimension columns accumulated together in `P V` (register blocking).
const COLS: usize = 64;
/// Keys whose scores are accumulated together (register blocking; divides `KEY_BLOCK`).
const KEYS: usize = 64;

/// One part of a joint sequence: its queries, keys and values, each `[B, H, n, D]`.
#[derive(Debug, Clone, Copy)]
pub struct Qkv<'a> {
    /// Queries `[B, H, n, D]`.
    pub q: &'a Tensor,
    /// Keys `[B, H, n, D]`.
    pub k: &'a Tensor,
    /// Values `[B, H, n, D]`.
    pub v: &'a Tensor,
}

/// Attention of `q` over `k`, `v` (all `[B, H, ·, D]`), `scale` applied to the scores before the
/// optional additive `bias` (broadcastable to `[B, H, N, M]`). Returns `[B, N, H·D]`: heads
/// merged.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let mut out = attend(&[Qkv { q, k, v }], scale, bias)?;
    out.pop()
        .ok_or_else(|| Error::Layout("attention produced no output".into()))
}

/// Attention over the concatenation, along the sequence, of `parts` (queries and keys alike):
/// every query attends to the keys of every part. Returns one `[B, n_i, H·D]` tensor per part.
pub fn joint_attention(parts: &[Qkv<'_>], scale: f64) -> Result<Vec<Tensor>> {
    attend(parts, scale, None)
}

fn attend(parts: &[Qkv<'_>], scale: f64, bias: Option<&Tensor>) -> Result<Vec<Tensor>> {
    let first = parts
        .first()
        .ok_or_else(|| Error::Layout("attention over no tensors".into()))?;
    let fused = crate::op_graph::fused_cpu(first.q)
        && parts
            .iter()
            .all(|p| [p.q, p.k, p.v].iter().all(|t| t.dtype() == DType::F32))
        && bias.is_none_or(|b| b.dtype() == DType::F32);
    if fused {
        fused_cpu(parts, scale, bias)
    } else {
        unfused_parts(parts, scale, bias)
    }
}

/// The unfused form with candle operations: `softmax(Q Kᵀ · scale + bias) V`, the scores
/// materialised, in the inputs' dtype. `[B, H, N, D]` in, `[B, N, H·D]` out. What every device
/// but the fused CPU path runs, and the baseline the fused kernel is measured against.
///
/// The queries are taken in blocks of rows so that no block's scores exceed the op graph's
/// chunk size ([`crate::op_graph`]): candle's CUDA softmax indexes with a 32-bit `int`, and
/// the scores of a large image (SD3.5 Large at 1152² with guidance: 2.3·10⁹) would overflow
/// it. Each score row is computed whole, so blocks change nothing in the result.
pub fn attention_unfused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let limit = crate::op_graph::current().chunk_elements;
    attention_unfused_under(q, k, v, scale, bias, limit)
}

/// [`attention_unfused`] with an explicit chunk size.
fn attention_unfused_under(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
    limit: usize,
) -> Result<Tensor> {
    let (b, h, n, _) = q.dims4()?;
    let m = k.dim(2)?;
    let kt = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let rows = crate::op_graph::rows_per_chunk(n, b * h * m, limit);
    let block = |start: usize, len: usize| -> Result<Tensor> {
        let q = (q.narrow(2, start, len)? * scale)?;
        let mut scores = q.matmul(&kt)?;
        if let Some(bias) = bias {
            // The bias's query dimension (second to last) is narrowed with the queries,
            // unless it broadcasts (size 1).
            let rank = bias.rank();
            let bias = if rank >= 2 && bias.dim(rank - 2)? == n && len < n {
                bias.narrow(rank - 2, start, len)?
            } else {
                bias.clone()
            };
            scores = scores.broadcast_add(&bias)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs.matmul(&v)?)
    };
    let out = if rows >= n {
        block(0, n)?
    } else {
        crate::op_graph::note_chunked();
        let blocks = (0..n)
            .step_by(rows)
            .map(|start| block(start, rows.min(n - start)))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&blocks, 2)?
    };
    let d = out.dim(3)?;
    Ok(out.transpose(1, 2)?.reshape((b, n, h * d))?)
}

fn unfused_parts(parts: &[Qkv<'_>], scale: f64, bias: Option<&Tensor>) -> Result<Vec<Tensor>> {
    let cat = |which: usize| -> Result<Tensor> {
        let ts: Vec<&Tensor> = parts.iter().map(|p| [p.q, p.k, p.v][which]).collect();
        Ok(Tensor::cat(&ts, 2)?)
    };
    let (q, k, v) = (cat(0)?, cat(1)?, cat(2)?);
    let out = attention_unfused(&q, &k, &v, scale, bias)?;
    let mut start = 0;
    let mut outs = Vec::with_capacity(parts.len());
    for p in parts {
        let n = p.q.dim(2)?;
        outs.push(out.narrow(1, start, n)?);
        start += n;
    }
    Ok(outs)
}

/// A read-only view of `[B, H, n, D]` f32 rows whose last dimension is contiguous.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    /// Strides of b, h and the row index.
    strides: [usize; 3],
    len: usize,
}

impl<'a> Rows<'a> {
    #[inline(always)]
    fn row(&self, b: usize, h: usize, i: usize, width: usize) -> &'a [f32] {
        let o = self.start + b * self.strides[0] + h * self.strides[1] + i * self.strides[2];
        &self.data[o..o + width]
    }
}

fn cpu_slice(storage: &Storage) -> Result<&[f32]> {
    match storage {
        Storage::Cpu(s) => Ok(s.as_slice::<f32>()?),
        _ => Err(Error::Layout("fused attention needs CPU tensors".into())),
    }
}

fn rows<'a>(data: &'a [f32], layout: &Layout) -> Rows<'a> {
    let s = layout.stride();
    Rows {
        data,
        start: layout.start_offset(),
        strides: [s[0], s[1], s[2]],
        len: layout.dims()[2],
    }
}

/// The parts' rows as one sequence: global row `i` is row `i - offset` of part `p`.
#[derive(Clone)]
struct Sequence<'a> {
    parts: Vec<Rows<'a>>,
    offsets: Vec<usize>,
    total: usize,
}

impl<'a> Sequence<'a> {
    fn new(parts: Vec<Rows<'a>>) -> Self {
        let mut offsets = Vec::with_capacity(parts.len());
        let mut total = 0;
        for p in &parts {
            offsets.push(total);
            total += p.len;
        }
        Self {
            parts,
            offsets,
            total,
        }
    }

    #[inline(always)]
    fn row(&self, b: usize, h: usize, i: usize, width: usize) -> &'a [f32] {
        let p = self.offsets.partition_point(|&o| o <= i) - 1;
        self.parts[p].row(b, h, i - self.offsets[p], width)
    }
}

/// Everything one head's computation reads.
struct Problem<'a> {
    q: Sequence<'a>,
    k: Sequence<'a>,
    v: Sequence<'a>,
    bias: Option<Rows<'a>>,
    /// Head dimension.
    d: usize,
    /// `scale · log2(e)`.
    q_scale: f32,
}

fn fused_cpu(parts: &[Qkv<'_>], scale: f64, bias: Option<&Tensor>) -> Result<Vec<Tensor>> {
    let (b, h, _, d) = parts[0].q.dims4()?;
    let mut n = 0;
    let mut m = 0;
    for p in parts {
        let (qb, qh, qn, qd) = p.q.dims4()?;
        let (kb, kh, kn, kd) = p.k.dims4()?;
        if (qb, qh, qd) != (b, h, d) || (kb, kh, kd) != (b, h, d) || p.v.dims() != p.k.dims() {
            return Err(Error::Layout(format!(
                "attention shapes do not agree: q {:?}, k {:?}, v {:?} (first q {:?})",
                p.q.dims(),
                p.k.dims(),
                p.v.dims(),
                parts[0].q.dims()
            )));
        }
        n += qn;
        m += kn;
    }
    // Inputs are read through their strides; only a non-contiguous last dimension is copied.
    let last_contiguous = |t: &Tensor| -> Result<Tensor> {
        Ok(if t.dim(3)? <= 1 || t.stride()[3] == 1 {
            t.clone()
        } else {
            t.contiguous()?
        })
    };
    let mut tensors = Vec::with_capacity(parts.len() * 3 + 1);
    for p in parts {
        for t in [p.q, p.k, p.v] {
            tensors.push(last_contiguous(t)?);
        }
    }
    if let Some(bias) = bias {
        tensors.push(last_contiguous(&bias.broadcast_as((b, h, n, m))?)?);
    }
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        views.push(rows(cpu_slice(storage)?, layout));
    }
    let pick = |k: usize| -> Vec<Rows<'_>> {
        views
            .chunks(3)
            .filter(|c| c.len() == 3)
            .map(|c| c[k])
            .collect()
    };
    let problem = Problem {
        q: Sequence::new(pick(0)),
        k: Sequence::new(pick(1)),
        v: Sequence::new(pick(2)),
        bias: bias.and(views.last().copied()),
        d,
        q_scale: (scale * f64::from(LOG2_E)) as f32,
    };

    // One contiguous [N, D] output per (batch, head), query blocks in parallel inside it.
    let mut heads = vec![0f32; b * h * n * d];
    if n > 0 && d > 0 {
        heads
            .par_chunks_mut(n * d)
            .enumerate()
            .for_each(|(bh, out)| head(&problem, bh / h, bh % h, out));
    }
    drop(guards);

    // Merge the heads into each part's [B, n_i, H·D].
    let mut outs = Vec::with_capacity(parts.len());
    let mut start = 0;
    for p in parts {
        let np = p.q.dim(2)?;
        let mut merged = vec![0f32; b * np * h * d];
        if np > 0 && d > 0 {
            merged
                .par_chunks_mut(h * d)
                .enumerate()
                .for_each(|(row, dst)| {
                    let (bi, i) = (row / np, start + row % np);
                    for (hi, chunk) in dst.chunks_exact_mut(d).enumerate() {
                        let src = &heads[((bi * h + hi) * n + i) * d..][..d];
                        chunk.copy_from_slice(src);
                    }
                });
        }
        outs.push(Tensor::from_vec(merged, (b, np, h * d), &Device::Cpu)?);
        start += np;
    }
    Ok(outs)
}

/// One (batch, head): packs its keys and values, then runs its query blocks in parallel.
fn head(p: &Problem<'_>, b: usize, h: usize, out: &mut [f32]) {
    let d = p.d;
    let m = p.k.total;
    let blocks = m.div_ceil(KEY_BLOCK);
    let mut kt = vec![0f32; blocks * d * KEY_BLOCK];
    let mut v = vec![0f32; m * d];
    // Key rows are gathered a tile at a time and written transposed, one contiguous
    // `KEY_BLOCK`-wide line per head dimension.
    let mut tiles = kt.chunks_exact_mut(d * KEY_BLOCK);
    let mut pending: Vec<&[f32]> = Vec::with_capacity(KEY_BLOCK);
    let mut flush = |pending: &mut Vec<&[f32]>| {
        if let Some(tile) = tiles.next() {
            for (k, line) in tile.chunks_exact_mut(KEY_BLOCK).enumerate() {
                for (dst, row) in line.iter_mut().zip(pending.iter()) {
                    *dst = row[k];
                }
            }
        }
        pending.clear();
    };
    let mut vrows = v.chunks_exact_mut(d.max(1));
    for (kpart, vpart) in p.k.parts.iter().zip(&p.v.parts) {
        for j in 0..kpart.len {
            pending.push(kpart.row(b, h, j, d));
            if let Some(dst) = vrows.next() {
                dst.copy_from_slice(vpart.row(b, h, j, d));
            }
            if pending.len() == KEY_BLOCK {
                flush(&mut pending);
            }
        }
    }
    if !pending.is_empty() {
        flush(&mut pending);
    }
    out.par_chunks_mut(QUERY_BLOCK * d)
        .enumerate()
        .for_each(|(qb, out)| {
            simd::dispatch(QueryBlock {
                p,
                b,
                h,
                first: qb * QUERY_BLOCK,
                kt: &kt,
                v: &v,
                out,
            })
        });
}

/// One block of query rows of one head, against all its keys.
struct QueryBlock<'a> {
    p: &'a Problem<'a>,
    b: usize,
    h: usize,
    /// Index of the block's first query row.
    first: usize,
    /// Packed transposed key blocks.
    kt: &'a [f32],
    /// Packed values `[M][D]`.
    v: &'a [f32],
    /// The block's rows of the head's output `[rows][D]`.
    out: &'a mut [f32],
}

impl simd::Kernel for QueryBlock<'_> {
    type Output = ();

    #[inline(always)]
    fn run<M: MulAdd, S: pulp::Simd>(self, simd: S) {
        let p = self.p;
        let d = p.d;
        let rows = self.out.len() / d;
        let m = p.k.total;
        // Rows in groups of ROWS, zero-padded; the queries transposed within a group
        // (`q[g·d + k][r]`) so the score loop reads one array per step.
        let groups = rows.div_ceil(ROWS);
        let mut q = vec![[0f32; ROWS]; groups * d];
        for r in 0..rows {
            let src = p.q.row(self.b, self.h, self.first + r, d);
            let group = &mut q[(r / ROWS) * d..][..d];
            for (dst, x) in group.iter_mut().zip(src) {
                dst[r % ROWS] = x * p.q_scale;
            }
        }
        let padded = groups * ROWS;
        let mut max = vec![f32::NEG_INFINITY; padded];
        // Running sums kept as 16 lanes per row, reduced once at the end.
        let mut sum = vec![[0f32; 16]; padded];
        // Per row, the factor `2^(m_old − m_new)` the accumulator is scaled by in `pv`.
        let mut rescale = vec![1f32; padded];
        let mut acc = vec![0f32; padded * d];
        let mut s = vec![[0f32; KEY_BLOCK]; padded];
        for (blk, kt) in self.kt.chunks_exact(d * KEY_BLOCK).enumerate() {
            let j0 = blk * KEY_BLOCK;
            let kn = KEY_BLOCK.min(m - j0);
            for (qg, sg) in q.chunks_exact(d).zip(s.chunks_exact_mut(ROWS)) {
                scores::<M>(qg, kt, sg);
            }
            for (r, srow) in s.iter_mut().enumerate() {
                if let Some(bias) = &p.bias
                    && r < rows
                {
                    let brow = bias.row(self.b, self.h, self.first + r, m);
                    for (x, &bv) in srow.iter_mut().zip(&brow[j0..j0 + kn]) {
                        *x += bv * LOG2_E;
                    }
                }
                for x in &mut srow[kn..] {
                    *x = f32::NEG_INFINITY;
                }
                let new_max = max[r].max(block_max(simd, srow));
                if new_max == f32::NEG_INFINITY {
                    // Every key so far is masked: nothing to accumulate yet.
                    srow.fill(0.0);
                    rescale[r] = 1.0;
                    continue;
                }
                // Unchanged maximum (most blocks once a few have been seen): no rescaling.
                let c = if new_max == max[r] {
                    1.0
                } else {
                    simd::exp2_with::<M>(max[r] - new_max)
                };
                let lanes = &mut sum[r];
                for l in lanes.iter_mut() {
                    *l *= c;
                }
                for chunk in srow.chunks_exact_mut(16) {
                    for (l, x) in lanes.iter_mut().zip(chunk) {
                        *x = simd::exp2_with::<M>(*x - new_max);
                        *l += *x;
                    }
                }
                rescale[r] = c;
                max[r] = new_max;
            }
            let v = &self.v[j0 * d..][..kn * d];
            for ((sg, ag), cg) in s
                .chunks_exact(ROWS)
                .zip(acc.chunks_exact_mut(ROWS * d))
                .zip(rescale.chunks_exact(ROWS))
            {
                pv::<M>(sg, v, d, cg, ag);
            }
        }
        for ((o, a), l) in self
            .out
            .chunks_exact_mut(d)
            .zip(acc.chunks_exact(d))
            .zip(&sum)
        {
            let inv = 1.0 / fold_lanes(*l, |a, b| a + b);
            for (o, a) in o.iter_mut().zip(a) {
                *o = a * inv;
            }
        }
    }
}

/// Largest value of a score row, with the instruction set's vector maximum (the compiler does
/// not vectorise this reduction on its own). Rows hold no NaN unless the inputs do.
#[inline(always)]
fn block_max<S: pulp::Simd>(simd: S, row: &[f32; KEY_BLOCK]) -> f32 {
    let (vectors, tail) = S::as_simd_f32s(row);
    let mut m = simd.splat_f32s(f32::NEG_INFINITY);
    for &v in vectors {
        m = simd.max_f32s(m, v);
    }
    tail.iter()
        .fold(simd.reduce_max_f32s(m), |a, &x| if x > a { x } else { a })
}

/// Reduces 16 lanes pairwise (8, 4, 2, 1), which vectorises, unlike a fold left to right.
#[inline(always)]
fn fold_lanes(mut lanes: [f32; 16], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = 8;
    while width > 0 {
        for i in 0..width {
            lanes[i] = f(lanes[i], lanes[i + width]);
        }
        width /= 2;
    }
    lanes[0]
}

/// `s[r][j] = q[r] · k_j` for one group of `ROWS` queries (transposed, `q[k][r]`) and the
/// tile's keys (`kt[k][j]`).
#[inline(always)]
fn scores<M: MulAdd>(q: &[[f32; ROWS]], kt: &[f32], s: &mut [[f32; KEY_BLOCK]]) {
    for k0 in (0..KEY_BLOCK).step_by(KEYS) {
        // ROWS × KEYS sums, kept in registers.
        let mut acc = [[0f32; KEYS]; ROWS];
        for (qk, krow) in q.iter().zip(kt.chunks_exact(KEY_BLOCK)) {
            let kv = &krow[k0..k0 + KEYS];
            for (a, &x) in acc.iter_mut().zip(qk) {
                for (a, &kv) in a.iter_mut().zip(kv) {
                    *a = M::mul_add(x, kv, *a);
                }
            }
        }
        for (dst, a) in s.iter_mut().zip(&acc) {
            dst[k0..k0 + KEYS].copy_from_slice(a);
        }
    }
}

/// `acc[r] ← c[r] · acc[r] + Σ_j p[r][j] · v_j` for one group of `ROWS` rows over the tile's
/// keys: the online softmax's rescaling done in the same pass as the accumulation.
#[inline(always)]
fn pv<M: MulAdd>(p: &[[f32; KEY_BLOCK]], v: &[f32], d: usize, c: &[f32], acc: &mut [f32]) {
    let (Ok(p), Ok(c)) = (
        <&[[f32; KEY_BLOCK]; ROWS]>::try_from(p),
        <&[f32; ROWS]>::try_from(c),
    ) else {
        return;
    };
    // Columns in register-sized groups; the keys stream through each group.
    let mut c0 = 0;
    while c0 + COLS <= d {
        let mut t = [[0f32; COLS]; ROWS];
        for (j, vrow) in v.chunks_exact(d).enumerate().take(KEY_BLOCK) {
            let vc = &vrow[c0..c0 + COLS];
            for (t, pr) in t.iter_mut().zip(p) {
                let w = pr[j];
                for (t, &x) in t.iter_mut().zip(vc) {
                    *t = M::mul_add(w, x, *t);
                }
            }
        }
        for ((t, a), &c) in t.iter().zip(acc.chunks_exact_mut(d)).zip(c) {
            for (a, &x) in a[c0..c0 + COLS].iter_mut().zip(t) {
                *a = M::mul_add(*a, c, x);
            }
        }
        c0 += COLS;
    }
    if c0 < d {
        for (a, &c) in acc.chunks_exact_mut(d).zip(c) {
            for a in &mut a[c0..] {
                *a *= c;
            }
        }
        for (j, vrow) in v.chunks_exact(d).enumerate().take(KEY_BLOCK) {
            for (pr, a) in p.iter().zip(acc.chunks_exact_mut(d)) {
                let w = pr[j];
                for (a, &x) in a[c0..].iter_mut().zip(&vrow[c0..]) {
                    *a = M::mul_add(w, x, *a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
