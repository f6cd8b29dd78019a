//! Model variants, their model-card defaults, and the numeric precision of the weights.

use std::fmt;
use std::str::FromStr;

/// Which SD3.5 model a checkpoint holds; decides the sampling defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// SD3.5 Large: MMDiT, 28 steps, guidance 3.5.
    Large,
    /// SD3.5 Large Turbo: MMDiT distilled for 4 steps without guidance.
    LargeTurbo,
    /// SD3.5 Medium: MMDiT-X, 40 steps, guidance 4.5, skip-layer guidance on layers 7, 8, 9.
    Medium,
}

/// Skip-layer guidance: an extra transformer pass without `layers`, pushed away from by `scale`
/// for the steps whose index `i` satisfies `start * steps < i < stop * steps`.
#[derive(Debug, Clone, PartialEq)]
pub struct SkipLayerGuidance {
    /// Indices of the transformer blocks skipped in the extra pass.
    pub layers: Vec<usize>,
    /// Weight of the skip-layer term.
    pub scale: f64,
    /// Fraction of the steps after which it starts.
    pub start: f64,
    /// Fraction of the steps before which it stops.
    pub stop: f64,
}

/// Sampling defaults from a variant's model card.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantDefaults {
    /// Number of denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale (≤ 1 disables guidance).
    pub guidance: f64,
    /// Skip-layer guidance, when the variant uses it.
    pub slg: Option<SkipLayerGuidance>,
    /// Image width and height in pixels.
    pub size: usize,
}

impl Variant {
    /// The model-card defaults of the variant.
    pub fn defaults(self) -> VariantDefaults {
        match self {
            Self::Large => VariantDefaults {
                steps: 28,
                guidance: 3.5,
                slg: None,
                size: 1024,
            },
            Self::LargeTurbo => VariantDefaults {
                steps: 4,
                guidance: 0.0,
                slg: None,
                size: 1024,
            },
            Self::Medium => VariantDefaults {
                steps: 40,
                guidance: 4.5,
                slg: Some(SkipLayerGuidance {
                    layers: vec![7, 8, 9],
                    scale: 2.8,
                    start: 0.01,
                    stop: 0.2,
                }),
                size: 1024,
            },
        }
    }

    /// The name used in the API and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Large => "large",
            Self::LargeTurbo => "large-turbo",
            Self::Medium => "medium",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "large" => Ok(Self::Large),
            "large-turbo" => Ok(Self::LargeTurbo),
            "medium" => Ok(Self::Medium),
            _ => Err(format!(
                "unknown variant `{s}`: expected large, large-turbo or medium"
            )),
        }
    }
}

/// How weights are stored in memory. Computation runs in f32 on CPU (candle's CPU backend has
/// no BF16 or F8 matmul) and in bf16 on CUDA for the reduced precisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Every weight in f32.
    F32,
    /// Every weight in bf16.
    Bf16,
    /// Linear weights in F8E4M3 with a per-tensor or per-output-channel scale, dequantised at
    /// use; every other weight in bf16.
    Fp8,
}

impl Precision {
    /// The name used in the API and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "fp8" => Ok(Self::Fp8),
            _ => Err(format!(
                "unknown precision `{s}`: expected f32, bf16 or fp8"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_defaults_follow_model_cards() {
        for v in [Variant::Large, Variant::LargeTurbo, Variant::Medium] {
            assert_eq!(v.as_str().parse::<Variant>().unwrap(), v);
        }
        for p in [Precision::F32, Precision::Bf16, Precision::Fp8] {
            assert_eq!(p.as_str().parse::<Precision>().unwrap(), p);
        }
        assert!("xl".parse::<Variant>().unwrap_err().contains("large-turbo"));
        let large = Variant::Large.defaults();
        assert_eq!((large.steps, large.guidance, large.slg), (28, 3.5, None));
        let turbo = Variant::LargeTurbo.defaults();
        assert_eq!((turbo.steps, turbo.guidance), (4, 0.0));
        let medium = Variant::Medium.defaults();
        assert_eq!((medium.steps, medium.guidance), (40, 4.5));
        assert_eq!(medium.slg.unwrap().layers, vec![7, 8, 9]);
    }
}
