//! Run-time selected instruction sets for the fused CPU kernels, and a vectorisable `exp2`.
//!
//! Kernels are plain Rust loops written so that the compiler vectorises them, with `pulp`'s
//! portable vector operations where it does not (see [`Kernel::run`]). [`dispatch`]
//! runs a kernel compiled for the best instruction set the CPU has — AVX-512, AVX2 with FMA,
//! or the portable baseline — detected at run time by `pulp`, the crate `gemm` dispatches
//! with, so one binary runs everywhere and no `unsafe` is needed here. A kernel is generic over
//! [`MulAdd`]: fused multiply-add where the instruction set has it, a separate multiply and add
//! in the baseline build (where `f32::mul_add` would be a library call). Results on one machine
//! are therefore deterministic; across machines they may differ in the last bits.

/// `a * b + c`, fused or not.
pub(crate) trait MulAdd {
    /// `a * b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// One rounding: compiled to an FMA instruction inside [`dispatch`] on AVX2 and AVX-512.
pub(crate) struct Fused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Two roundings, for instruction sets without FMA.
pub(crate) struct Separate;

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// A computation to run with the CPU's best instruction set. Implementations mark `run` and
/// every helper it calls `#[inline(always)]`: only code inlined into the dispatched function is
/// compiled for the wider instruction set.
pub(crate) trait Kernel {
    /// What the kernel returns.
    type Output;
    /// The kernel, with `M` the multiply-add to use and `simd` the instruction set's token, for
    /// the few reductions the compiler does not vectorise on its own (the attention's block
    /// maximum).
    fn run<M: MulAdd, S: pulp::Simd>(self, simd: S) -> Self::Output;
}

struct Dispatched<K>(K);

impl<K: Kernel> pulp::WithSimd for Dispatched<K> {
    type Output = K::Output;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) -> K::Output {
        if S::IS_SCALAR {
            self.0.run::<Separate, S>(simd)
        } else {
            self.0.run::<Fused, S>(simd)
        }
    }
}

/// Runs `kernel` compiled for the best instruction set this CPU supports.
#[inline]
pub(crate) fn dispatch<K: Kernel>(kernel: K) -> K::Output {
    pulp::Arch::new().dispatch(Dispatched(kernel))
}

/// `log2(e)`: `e^x = 2^(x · LOG2_E)`.
pub(crate) const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// `2^x` without a library call, so loops over it vectorise: `x = n + f` with `n` the nearest
/// integer and `|f| ≤ 1/2`, `2^f` from its degree-6 Taylor polynomial (relative error below
/// 3e-7 over the whole range), `2^n` built in the exponent bits. Inputs below −126 give 0
/// (so `−∞` gives 0), inputs above 127 give `2^127`; NaN gives an unspecified finite value.
#[inline(always)]
pub(crate) fn exp2(x: f32) -> f32 {
    exp2_with::<Separate>(x)
}

/// [`exp2`] with the polynomial evaluated by `M` (fused inside dispatched kernels).
#[inline(always)]
pub(crate) fn exp2_with<M: MulAdd>(x: f32) -> f32 {
    // Comparisons written as selects compile to vector compare-and-blend.
    let x = if x > 127.0 { 127.0 } else { x };
    let small = x < -126.0;
    let x = if small { -126.0 } else { x };
    // Adding 1.5·2^23 rounds to an integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let t = x + ROUND;
    let n = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let f = x - (t - ROUND);
    // ln(2)^k / k!
    const C1: f32 = std::f32::consts::LN_2;
    const C2: f32 = 0.240_226_5;
    const C3: f32 = 0.055_504_11;
    const C4: f32 = 0.009_618_129;
    const C5: f32 = 0.001_333_355_8;
    const C6: f32 = 0.000_154_035_3;
    let p = M::mul_add(C6, f, C5);
    let p = M::mul_add(p, f, C4);
    let p = M::mul_add(p, f, C3);
    let p = M::mul_add(p, f, C2);
    let p = M::mul_add(p, f, C1);
    let p = M::mul_add(p, f, 1.0);
    let scale = f32::from_bits(((n + 127) as u32) << 23);
    if small { 0.0 } else { p * scale }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp2_is_within_3e7_of_libm_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -126.0f32;
        while x <= 127.0 {
            let want = (x as f64).exp2();
            let got = exp2(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
    }

    #[test]
    fn exp2_handles_the_ends() {
        assert_eq!(exp2(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2(-200.0), 0.0);
        assert_eq!(exp2(0.0), 1.0);
        assert_eq!(exp2(1.0), 2.0);
        assert_eq!(exp2(-1.0), 0.5);
        assert!(exp2(1000.0).is_finite());
    }

    struct Dot<'a>(&'a [f32], &'a [f32]);

    impl Kernel for Dot<'_> {
        type Output = f32;
        #[inline(always)]
        fn run<M: MulAdd, S: pulp::Simd>(self, _simd: S) -> f32 {
            self.0
                .iter()
                .zip(self.1)
                .fold(0.0, |acc, (&a, &b)| M::mul_add(a, b, acc))
        }
    }

    #[test]
    fn dispatch_runs_the_kernel() {
        let a: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let b = vec![2.0f32; 100];
        assert_eq!(dispatch(Dot(&a, &b)), 9900.0);
    }
}
