//! The enums both sides share: which model, in which precision, on which device, and the
//! kinds of adapter files (LoRA, ControlNet) with the ControlNets' modes.
//!
//! They are defined once, here. The CRD types, the operator, `sd35-server` and the pipeline all
//! use these types; their serde names (`large-turbo`, `bf16`, `cuda`) are the CRD's and the
//! command line's, so a value is spelled the same in a manifest, on a pod's command line, in
//! `engine.json` and in `/v1/models`.

use std::fmt;
use std::str::FromStr;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// Which SD3.5 model.
#[derive(
    ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[value(rename_all = "kebab-case")]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// 8B MMDiT; model card: 28 steps, guidance 3.5.
    Large,
    /// 8B MMDiT distilled for 4 steps without classifier-free guidance.
    LargeTurbo,
    /// 2.5B MMDiT-X; model card: 40 steps, guidance 4.5, skip-layer guidance.
    Medium,
}

impl Variant {
    /// Every variant.
    pub const ALL: [Variant; 3] = [Variant::Large, Variant::LargeTurbo, Variant::Medium];

    /// The name on the command line, in manifests and in the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Variant::Large => "large",
            Variant::LargeTurbo => "large-turbo",
            Variant::Medium => "medium",
        }
    }

    /// The official Hugging Face repository of the variant.
    pub const fn official_repo(self) -> &'static str {
        match self {
            Variant::Large => "stabilityai/stable-diffusion-3.5-large",
            Variant::LargeTurbo => "stabilityai/stable-diffusion-3.5-large-turbo",
            Variant::Medium => "stabilityai/stable-diffusion-3.5-medium",
        }
    }

    /// The model card's image side in pixels: 1024 for all three.
    pub const fn card_size(self) -> u32 {
        1024
    }

    /// The model card's classifier-free guidance scale (large 3.5, large-turbo 0: none,
    /// medium 4.5). Guidance runs when it is above 1 and doubles the transformer's batch.
    pub const fn card_guidance(self) -> f64 {
        match self {
            Variant::Large => 3.5,
            Variant::LargeTurbo => 0.0,
            Variant::Medium => 4.5,
        }
    }
}

/// Numeric precision of weights: what an engine is stored in and what a server serves.
///
/// SD35Deployments and engines use `bf16` and `fp8`; `f32` exists for serving a model
/// directory on a CPU exactly as the reference computes it.
#[derive(
    ValueEnum,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
#[value(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Every weight in f32.
    F32,
    /// Every weight in bfloat16.
    #[default]
    Bf16,
    /// Linear weights in F8E4M3 with scales, everything else bfloat16.
    Fp8,
}

impl Precision {
    /// The name on the command line, in manifests and in the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }

    /// The engine precision this is, if an engine can be built in it (`bf16` or `fp8`).
    pub const fn engine(self) -> Option<EnginePrecision> {
        match self {
            Precision::Bf16 => Some(EnginePrecision::Bf16),
            Precision::Fp8 => Some(EnginePrecision::Fp8),
            Precision::F32 => None,
        }
    }
}

/// The precisions an engine is built and an SD35Deployment is served in: what the CRD's
/// `spec.precision`, `build-engine --precision` and `engine.json` accept, so no other value
/// needs a check anywhere.
#[derive(
    ValueEnum,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
#[value(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum EnginePrecision {
    /// Every weight in bfloat16.
    #[default]
    Bf16,
    /// Linear weights in F8E4M3 with scales, everything else bfloat16.
    Fp8,
}

impl EnginePrecision {
    /// The name on the command line, in manifests and in the API.
    pub const fn as_str(self) -> &'static str {
        Precision::from_engine(self).as_str()
    }
}

impl Precision {
    /// The weights' precision of an engine precision.
    pub const fn from_engine(p: EnginePrecision) -> Self {
        match p {
            EnginePrecision::Bf16 => Precision::Bf16,
            EnginePrecision::Fp8 => Precision::Fp8,
        }
    }
}

impl From<EnginePrecision> for Precision {
    fn from(p: EnginePrecision) -> Self {
        Precision::from_engine(p)
    }
}

impl std::fmt::Display for EnginePrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where `sd35-server` runs the model.
#[derive(ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[value(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The first CUDA GPU when the binary has CUDA and a GPU is usable, else the CPU (with a
    /// warning in the log and in `/v1/models`).
    #[default]
    Auto,
    /// The first CUDA GPU; no usable GPU is a start-up error (exit code 17).
    Cuda,
    /// The CPU (f32 compute).
    Cpu,
}

impl DeviceKind {
    /// The name on the command line and in the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Auto => "auto",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Cpu => "cpu",
        }
    }
}

/// How an S3-compatible endpoint addresses a bucket.
#[derive(ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[value(rename_all = "kebab-case")]
#[serde(rename_all = "kebab-case")]
pub enum S3UrlStyle {
    /// `https://<endpoint>/<bucket>/<key>`: works with every S3-compatible server and with
    /// endpoints given as an IP address.
    #[default]
    Path,
    /// `https://<bucket>.<endpoint>/<key>`: what AWS recommends; needs DNS (or a `*.localhost`
    /// endpoint) that resolves `<bucket>.<endpoint host>`.
    VirtualHost,
}

impl S3UrlStyle {
    /// The name on the command line and in the CRD.
    pub const fn as_str(self) -> &'static str {
        match self {
            S3UrlStyle::Path => "path",
            S3UrlStyle::VirtualHost => "virtual-host",
        }
    }
}

/// What an adapter file in an SD35Deployment is: a LoRA applied beside the transformer's (and
/// the text encoders') weights, or an SD3.5 ControlNet.
#[derive(
    ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[value(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// A LoRA: one safetensors file in diffusers' PEFT or kohya format.
    Lora,
    /// An SD3.5 ControlNet: a diffusers folder or one safetensors file.
    Controlnet,
}

impl AdapterKind {
    /// The name in the API and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            AdapterKind::Lora => "lora",
            AdapterKind::Controlnet => "controlnet",
        }
    }
}

/// What a ControlNet conditions on: the SD3.5 ControlNets Stability publishes.
#[derive(
    ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[value(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ControlMode {
    /// Canny edges of the control image.
    Canny,
    /// A depth map.
    Depth,
    /// A blurred control image (tile-style upscaling).
    Blur,
}

impl ControlMode {
    /// Every mode.
    pub const ALL: [ControlMode; 3] = [ControlMode::Canny, ControlMode::Depth, ControlMode::Blur];

    /// The name in the API and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            ControlMode::Canny => "canny",
            ControlMode::Depth => "depth",
            ControlMode::Blur => "blur",
        }
    }
}

macro_rules! text_enum {
    ($t:ty, $what:literal) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <$t as ValueEnum>::value_variants()
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = <$t as ValueEnum>::value_variants()
                            .iter()
                            .map(|v| v.as_str())
                            .collect();
                        format!(
                            concat!("unknown ", $what, " `{}`: expected one of {}"),
                            s,
                            names.join(", ")
                        )
                    })
            }
        }
    };
}

text_enum!(Variant, "variant");
text_enum!(Precision, "precision");
text_enum!(DeviceKind, "device");
text_enum!(S3UrlStyle, "S3 URL style");
text_enum!(AdapterKind, "adapter kind");
text_enum!(ControlMode, "control mode");

/// The model names a server answers to when none are given: the variant, its official
/// repository id (or `repo`, the repository it was fetched from), `sd3.5` and
/// `stable-diffusion-3.5-<variant>`. Clients send any of them as OpenAI's `model`.
pub fn default_served_names(variant: Variant, repo: Option<&str>) -> Vec<String> {
    let mut names = vec![
        variant.as_str().to_owned(),
        repo.unwrap_or(variant.official_repo()).to_owned(),
        "sd3.5".to_owned(),
        format!("stable-diffusion-3.5-{}", variant.as_str()),
    ];
    dedup_in_order(&mut names);
    names
}

/// Removes repeated names, keeping the first of each.
pub fn dedup_in_order(names: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
}

#[cfg(feature = "schema")]
mod schema {
    use std::borrow::Cow;

    use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

    use super::{AdapterKind, ControlMode, DeviceKind, Precision, S3UrlStyle, Variant};

    macro_rules! string_enum_schema {
        ($t:ty, $name:literal) => {
            impl JsonSchema for $t {
                fn schema_name() -> Cow<'static, str> {
                    Cow::Borrowed($name)
                }

                fn inline_schema() -> bool {
                    true
                }

                fn json_schema(_: &mut SchemaGenerator) -> Schema {
                    let names: Vec<&str> = <$t as clap::ValueEnum>::value_variants()
                        .iter()
                        .map(|v| v.as_str())
                        .collect();
                    json_schema!({"type": "string", "enum": names})
                }
            }
        };
    }

    string_enum_schema!(Variant, "Variant");
    string_enum_schema!(Precision, "Precision");
    string_enum_schema!(DeviceKind, "DeviceKind");
    string_enum_schema!(S3UrlStyle, "S3UrlStyle");
    string_enum_schema!(AdapterKind, "AdapterKind");
    string_enum_schema!(ControlMode, "ControlMode");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_serde_and_clap() {
        for v in Variant::ALL {
            assert_eq!(v.as_str().parse::<Variant>(), Ok(v));
            let json = serde_json::to_string(&v).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", v.as_str()));
            assert_eq!(<Variant as ValueEnum>::from_str(v.as_str(), false), Ok(v));
        }
        for p in [Precision::F32, Precision::Bf16, Precision::Fp8] {
            assert_eq!(p.as_str().parse::<Precision>(), Ok(p));
            assert_eq!(
                serde_json::to_string(&p).unwrap_or_default(),
                format!("\"{p}\"")
            );
        }
        for d in [DeviceKind::Auto, DeviceKind::Cuda, DeviceKind::Cpu] {
            assert_eq!(d.as_str().parse::<DeviceKind>(), Ok(d));
        }
        for s in [S3UrlStyle::Path, S3UrlStyle::VirtualHost] {
            assert_eq!(s.as_str().parse::<S3UrlStyle>(), Ok(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap_or_default(),
                format!("\"{s}\"")
            );
        }
        for k in [AdapterKind::Lora, AdapterKind::Controlnet] {
            assert_eq!(k.as_str().parse::<AdapterKind>(), Ok(k));
            assert_eq!(
                serde_json::to_string(&k).unwrap_or_default(),
                format!("\"{k}\"")
            );
        }
        for m in ControlMode::ALL {
            assert_eq!(m.as_str().parse::<ControlMode>(), Ok(m));
            assert_eq!(
                <ControlMode as ValueEnum>::from_str(m.as_str(), false),
                Ok(m)
            );
        }
        let err = "xl".parse::<Variant>().unwrap_err();
        assert!(err.contains("large-turbo"), "{err}");
        assert_eq!(Precision::F32.engine(), None);
        assert_eq!(Precision::Fp8.engine(), Some(EnginePrecision::Fp8));
        assert_eq!(Precision::from(EnginePrecision::Bf16), Precision::Bf16);
    }

    #[test]
    fn default_names_cover_what_clients_send() {
        assert_eq!(
            default_served_names(Variant::LargeTurbo, None),
            [
                "large-turbo",
                "stabilityai/stable-diffusion-3.5-large-turbo",
                "sd3.5",
                "stable-diffusion-3.5-large-turbo"
            ]
        );
        assert_eq!(
            default_served_names(Variant::Medium, Some("me/my-medium"))[1],
            "me/my-medium"
        );
    }
}
