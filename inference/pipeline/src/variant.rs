//! The model-card defaults of each variant. The variant and precision enums themselves are
//! the contract's, shared with the operator and the CRD.

pub use sd35_contract::{Precision, Variant};

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

/// The model-card defaults of a variant.
pub fn model_card(variant: Variant) -> VariantDefaults {
    match variant {
        Variant::Large => VariantDefaults {
            steps: 28,
            guidance: 3.5,
            slg: None,
            size: 1024,
        },
        Variant::LargeTurbo => VariantDefaults {
            steps: 4,
            guidance: 0.0,
            slg: None,
            size: 1024,
        },
        Variant::Medium => VariantDefaults {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_model_cards() {
        let large = model_card(Variant::Large);
        assert_eq!((large.steps, large.guidance, large.slg), (28, 3.5, None));
        let turbo = model_card(Variant::LargeTurbo);
        assert_eq!((turbo.steps, turbo.guidance), (4, 0.0));
        let medium = model_card(Variant::Medium);
        assert_eq!((medium.steps, medium.guidance), (40, 4.5));
        assert_eq!(medium.slg.unwrap().layers, vec![7, 8, 9]);
    }
}
