//! Which files of a repository tree a variant needs, in the layout the repository offers.
//!
//! Official SD3.5 repositories carry both layouts (a 16 GB single file and the diffusers
//! folders); downloading one of them is enough. The diffusers layout wins when the tree has
//! `model_index.json`; otherwise the single-file checkpoint of the variant is taken with its
//! text encoders and tokenizers.

use sd35_contract::Variant;

/// Folders of the diffusers layout the pipeline reads.
const DIFFUSERS_COMPONENTS: [&str; 9] = [
    "scheduler",
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
];

/// Extensions of the files the pipeline reads (weights, configs, tokenizers).
const NEEDED_EXTENSIONS: [&str; 4] = ["safetensors", "json", "txt", "model"];

fn extension(path: &str) -> &str {
    path.rsplit_once('.').map_or("", |(_, e)| e)
}

fn is_tokenizer(path: &str) -> bool {
    path.split_once('/')
        .is_some_and(|(dir, _)| dir.starts_with("tokenizer"))
}

/// The subset of `paths` (repository-relative, `/`-separated) to download, sorted; an error
/// names what is missing.
pub fn select(paths: &[String], variant: Variant) -> Result<Vec<String>, String> {
    let needed_ext = |p: &str| NEEDED_EXTENSIONS.contains(&extension(p));
    let mut out: Vec<String> = if paths.iter().any(|p| p == "model_index.json") {
        paths
            .iter()
            .filter(|p| {
                *p == "model_index.json"
                    || p.split_once('/').is_some_and(|(dir, rest)| {
                        DIFFUSERS_COMPONENTS.contains(&dir) && !rest.contains('/')
                    }) && needed_ext(p)
            })
            .cloned()
            .collect()
    } else {
        let roots: Vec<&String> = paths
            .iter()
            .filter(|p| !p.contains('/') && extension(p) == "safetensors")
            .collect();
        let token = match variant {
            Variant::Large => "large",
            Variant::LargeTurbo => "turbo",
            Variant::Medium => "medium",
        };
        let matching: Vec<&String> = roots
            .iter()
            .copied()
            .filter(|p| {
                let p = p.to_lowercase();
                p.contains(token) && (variant != Variant::Large || !p.contains("turbo"))
            })
            .collect();
        let checkpoint = match (matching.as_slice(), roots.as_slice()) {
            ([one, ..], _) => (*one).clone(),
            ([], [only]) => (*only).clone(),
            _ => {
                return Err(format!(
                    "the tree has neither model_index.json (diffusers layout) nor a single-file \
                     checkpoint for {} (*.safetensors at the top level)",
                    variant.as_str()
                ));
            }
        };
        let encoders: Vec<&String> = paths
            .iter()
            .filter(|p| {
                p.strip_prefix("text_encoders/")
                    .is_some_and(|f| !f.contains('/') && extension(f) == "safetensors")
            })
            .collect();
        // Of the T5 variants, one is enough: prefer the full-precision file.
        let has_t5_full = encoders
            .iter()
            .any(|p| p.contains("t5") && !p.contains("fp8"));
        let mut out = vec![checkpoint];
        out.extend(
            encoders
                .into_iter()
                .filter(|p| !(has_t5_full && p.contains("t5") && p.contains("fp8")))
                .cloned(),
        );
        out.extend(
            paths
                .iter()
                .filter(|p| is_tokenizer(p) && needed_ext(p))
                .cloned(),
        );
        out
    };
    out.sort();
    out.dedup();
    for needed in ["tokenizer/", "tokenizer_2/"] {
        if !out.iter().any(|p| p.starts_with(needed)) {
            return Err(format!(
                "the tree has no `{needed}` folder, which the server needs in either layout"
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(paths: &[&str]) -> Vec<String> {
        paths.iter().map(|p| (*p).to_owned()).collect()
    }

    #[test]
    fn diffusers_layout_wins_and_skips_other_formats() {
        let t = tree(&[
            ".gitattributes",
            "README.md",
            "model_index.json",
            "sd3.5_large.safetensors",
            "text_encoders/clip_l.safetensors",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.bin",
            "tokenizer/vocab.json",
            "tokenizer_2/merges.txt",
            "tokenizer_3/spiece.model",
            "scheduler/scheduler_config.json",
            "sd3.5_large_demo.png",
        ]);
        let s = select(&t, Variant::Large).unwrap();
        assert_eq!(
            s,
            tree(&[
                "model_index.json",
                "scheduler/scheduler_config.json",
                "tokenizer/vocab.json",
                "tokenizer_2/merges.txt",
                "tokenizer_3/spiece.model",
                "transformer/config.json",
                "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                "transformer/diffusion_pytorch_model.safetensors.index.json",
                "vae/diffusion_pytorch_model.safetensors",
            ])
        );
    }

    #[test]
    fn single_file_takes_the_variant_checkpoint_and_one_t5() {
        let t = tree(&[
            "sd3.5_large.safetensors",
            "sd3.5_large_turbo.safetensors",
            "text_encoders/clip_g.safetensors",
            "text_encoders/t5xxl_fp16.safetensors",
            "text_encoders/t5xxl_fp8_e4m3fn.safetensors",
            "tokenizer/vocab.json",
            "tokenizer_2/vocab.json",
        ]);
        let s = select(&t, Variant::LargeTurbo).unwrap();
        assert_eq!(
            s,
            tree(&[
                "sd3.5_large_turbo.safetensors",
                "text_encoders/clip_g.safetensors",
                "text_encoders/t5xxl_fp16.safetensors",
                "tokenizer/vocab.json",
                "tokenizer_2/vocab.json",
            ])
        );
        let s = select(&t, Variant::Large).unwrap();
        assert_eq!(s[0], "sd3.5_large.safetensors");
    }

    #[test]
    fn a_tree_without_a_model_is_refused() {
        let err = select(&tree(&["README.md"]), Variant::Medium).unwrap_err();
        assert!(err.contains("model_index.json"), "{err}");
    }
}
