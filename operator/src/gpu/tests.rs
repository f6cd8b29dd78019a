//! Tests of the parent module.

use sd35_contract::GPU_MEMORY_LABEL;

use super::*;
use crate::config::OperatorConfig;

const GPU: &str = "nvidia.com/gpu";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn gpu(product: &str) -> NodeGpu {
    NodeGpu::of_labels(&labels(&[(GPU_PRODUCT_LABEL, product)]), GPU).unwrap()
}

/// A GPU with its product and memory labels (MiB), as GPU feature discovery writes them.
fn gpu_with_memory(product: &str, mib: &str) -> NodeGpu {
    NodeGpu::of_labels(
        &labels(&[(GPU_PRODUCT_LABEL, product), (GPU_MEMORY_LABEL, mib)]),
        GPU,
    )
    .unwrap()
}

fn workload(spec_yaml: &str) -> Workload {
    let indented: String = spec_yaml.lines().map(|l| format!("  {l}\n")).collect();
    let obj: sd35_crds::SD35Deployment = serde_yaml::from_str(&format!(
        "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata: {{name: a, namespace: ns}}\nspec:\n{indented}"
    ))
    .unwrap();
    Workload::of(&crate::resolve::resolve(&obj, &OperatorConfig::default()).unwrap())
}

fn plain(precision: &str) -> Workload {
    workload(&format!("variant: large\nprecision: {precision}"))
}

#[test]
fn nodes_without_gpu_labels_have_no_gpu() {
    assert_eq!(
        NodeGpu::of_labels(&labels(&[("kubernetes.io/os", "linux")]), GPU),
        None
    );
    let g = NodeGpu::of_labels(
        &labels(&[
            (GPU_COMPUTE_MAJOR_LABEL, "8"),
            (GPU_COMPUTE_MINOR_LABEL, "9"),
        ]),
        GPU,
    )
    .unwrap();
    assert_eq!(g.capability, Some(ComputeCapability { major: 8, minor: 9 }));
    assert_eq!(g.memory_bytes, None);
    assert_eq!(
        gpu_with_memory("NVIDIA-H100-80GB-HBM3", "81559").memory_bytes,
        Some(81559 << 20)
    );
}

#[test]
fn the_workload_is_the_largest_default_request_of_the_spec() {
    // The model card: 1024², guidance for large and medium, none for turbo; T5 on.
    let turbo = workload("variant: large-turbo");
    assert_eq!(
        (
            turbo.width,
            turbo.height,
            turbo.batch,
            turbo.guidance,
            turbo.t5
        ),
        (1024, 1024, 1, false, true)
    );
    assert!(workload("variant: medium").guidance);
    assert_eq!(turbo.t5_tokens, 256);
    // The spec's defaults and limits win.
    let custom = workload(
        "variant: large\nprecision: fp8\nmodel: {textEncoders: {t5: false, t5MaxTokens: 128}}\n\
         server:\n  defaults: {width: 768, height: 1344, guidanceScale: 1.0}\n  limits: {maxBatchSize: 4}",
    );
    assert_eq!(
        custom,
        Workload {
            variant: Variant::Large,
            precision: Precision::Fp8,
            width: 768,
            height: 1344,
            batch: 4,
            guidance: false,
            t5: false,
            t5_tokens: 128,
        }
    );
    // Each of these raises the plan.
    let base = plain("fp8").plan().peak_bytes;
    assert!(plain("bf16").plan().peak_bytes > base);
    assert!(
        workload("variant: large\nprecision: fp8\nserver: {limits: {maxBatchSize: 2}}")
            .plan()
            .peak_bytes
            > base
    );
    assert!(
        workload("variant: large\nprecision: fp8\nmodel: {textEncoders: {t5: false}}")
            .plan()
            .peak_bytes
            < base
    );
}

#[test]
fn a_gpu_too_small_for_the_plan_is_false_with_the_figures_and_what_to_change() {
    // Large bf16 with T5 at 1024² with guidance on an L4 (22.5 GiB).
    let w = plain("bf16");
    let l4 = gpu_with_memory("NVIDIA-L4", "23034");
    let r = report(&w, GPU, &[l4]);
    assert_eq!((r.status, r.reason), ("False", "InsufficientGPUMemory"));
    let plan = w.plan();
    let without_t5 = Workload { t5: false, ..w }.plan().peak_bytes;
    let fp8 = Workload {
        precision: Precision::Fp8,
        ..w
    }
    .plan()
    .peak_bytes;
    assert!(plan.peak_bytes > 23034 << 20 && without_t5 < 23034 << 20);
    let expected_start = format!(
        "large bf16 at 1024x1024, batch 1, with guidance, with T5 needs {} of GPU memory by \
         the memory plan (weights {}, ",
        gib(plan.peak_bytes),
        gib(plan.weights_bytes)
    );
    assert!(r.message.starts_with(&expected_start), "{}", r.message);
    for part in [
        "more than one GPU holds: NVIDIA-L4 with 22.5 GiB (nvidia.com/gpu.memory label)".to_owned(),
        format!("precision: fp8 ({}, ", gib(fp8)),
        format!("model.textEncoders.t5: false ({}, fits)", gib(without_t5)),
        "spec.scheduling.nodeSelector".to_owned(),
    ] {
        assert!(r.message.contains(&part), "{part:?} not in {}", r.message);
    }
    // One image per batch is only offered when the batch is larger; a smaller size only
    // when one fits (here the weights alone are more than the GPU holds).
    assert!(plan.weights_bytes > 23034 << 20);
    assert!(!r.message.contains("maxBatchSize"), "{}", r.message);
    assert!(!r.message.contains("width and height"), "{}", r.message);
}

#[test]
fn a_default_size_too_large_for_the_gpu_is_offered_the_largest_square_that_fits() {
    let w = workload(
        "variant: large\nprecision: fp8\nmodel: {textEncoders: {t5: false}}\n\
         server: {defaults: {width: 2048, height: 2048}, limits: {maxBatchSize: 4}}",
    );
    let memory: u64 = 16 << 30;
    let mib = (memory >> 20).to_string();
    let r = report(&w, GPU, &[gpu_with_memory("NVIDIA-A16", &mib)]);
    assert_eq!(r.reason, "InsufficientGPUMemory", "{}", r.message);
    let (change, smaller) = w
        .remedies(memory)
        .into_iter()
        .find(|(c, _)| c.contains("width and height"))
        .unwrap_or_else(|| panic!("no size offered: {}", r.message));
    let side = smaller.width;
    assert_eq!((smaller.height, side % 16), (side, 0));
    let at = |side| {
        Workload {
            width: side,
            height: side,
            ..w
        }
        .plan()
        .peak_bytes
    };
    assert!(at(side) <= memory && at(side + 16) > memory, "{side}");
    assert!(
        r.message
            .contains(&format!("{change} ({}, fits)", gib(at(side)))),
        "{}",
        r.message
    );
}

#[test]
fn when_no_single_change_is_enough_all_of_them_together_are_named() {
    let w = workload("variant: large\nserver: {limits: {maxBatchSize: 2}}");
    let small = gpu_with_memory("NVIDIA-A10", "12288");
    let r = report(&w, GPU, &[small]);
    assert_eq!(r.reason, "InsufficientGPUMemory");
    assert!(
        r.message.contains("server.limits.maxBatchSize: 1 ("),
        "{}",
        r.message
    );
    assert!(r.message.contains("still too much"), "{}", r.message);
    assert!(
        r.message.contains("all of these together ("),
        "{}",
        r.message
    );
}

#[test]
fn a_gpu_that_holds_the_plan_says_how_much_of_it_is_used() {
    let w = plain("bf16");
    let h100 = gpu_with_memory("NVIDIA-H100-80GB-HBM3", "81559");
    let r = report(&w, GPU, &[h100]);
    assert_eq!((r.status, r.reason), ("True", "Supported"));
    assert_eq!(
        r.message,
        format!(
            "bf16 on NVIDIA-H100-80GB-HBM3 (compute capability 9.0); the memory plan of \
             large bf16 at 1024x1024, batch 1, with guidance, with T5 needs {} of each GPU's \
             79.6 GiB",
            gib(w.plan().peak_bytes)
        )
    );
    // A MIG slice is judged by its own memory label, not the whole GPU's.
    let mig = "nvidia.com/mig-1g.10gb";
    let sliced = NodeGpu::of_labels(
        &labels(&[
            (GPU_PRODUCT_LABEL, "NVIDIA-H100-80GB-HBM3"),
            (GPU_MEMORY_LABEL, "81559"),
            ("nvidia.com/mig-1g.10gb.memory", "9856"),
        ]),
        mig,
    )
    .unwrap();
    let r = report(&w, mig, &[sliced]);
    assert_eq!(r.reason, "InsufficientGPUMemory");
    assert!(
        r.message.contains("(nvidia.com/mig-1g.10gb.memory label)"),
        "{}",
        r.message
    );
}

#[test]
fn fp8_on_hopper_is_weight_only_and_says_the_tensor_cores_are_unused() {
    let r = report(&plain("fp8"), GPU, &[gpu("NVIDIA-H100-80GB-HBM3")]);
    assert_eq!((r.status, r.reason), ("True", "FP8WeightOnly"));
    assert!(
        r.message
            .starts_with("fp8 on NVIDIA-H100-80GB-HBM3 (compute capability 9.0): weight-only"),
        "{}",
        r.message
    );
    assert!(r.message.contains("have FP8 tensor cores"), "{}", r.message);
}

#[test]
fn fp8_on_ampere_is_weight_only_without_tensor_cores() {
    let r = report(&plain("fp8"), GPU, &[gpu("NVIDIA-A100-SXM4-80GB")]);
    assert_eq!((r.status, r.reason), ("True", "FP8WeightOnly"));
    assert!(
        r.message.contains("compute capability 8.0"),
        "{}",
        r.message
    );
    assert!(r.message.contains("no FP8 tensor cores"), "{}", r.message);
}

#[test]
fn bf16_names_the_gpus_once_each() {
    let h100 = gpu("NVIDIA-H100-80GB-HBM3");
    let w = plain("bf16");
    let r = report(&w, GPU, &[h100.clone(), h100, gpu("NVIDIA-L40S")]);
    assert_eq!((r.status, r.reason), ("True", "Supported"));
    assert_eq!(
        r.message,
        format!(
            "bf16 on NVIDIA-H100-80GB-HBM3 (compute capability 9.0), NVIDIA-L40S (compute \
             capability 8.9); the memory plan of large bf16 at 1024x1024, batch 1, with \
             guidance, with T5 needs {} of each GPU (no nvidia.com/gpu.memory label to check \
             it against)",
            gib(w.plan().peak_bytes)
        )
    );
}

#[test]
fn a_gpu_older_than_ampere_is_false_and_names_the_fix() {
    // Too old is said first, whatever the memory.
    let t4 = gpu_with_memory("Tesla-T4", "15360");
    let r = report(&plain("bf16"), GPU, &[gpu("NVIDIA-H100-80GB-HBM3"), t4]);
    assert_eq!((r.status, r.reason), ("False", "ComputeCapabilityTooLow"));
    assert!(
        r.message
            .starts_with("Tesla-T4 (compute capability 7.5) is older than compute capability 8.0"),
        "{}",
        r.message
    );
    assert!(r.message.contains("spec.scheduling.nodeSelector"));
}

#[test]
fn an_unknown_product_or_no_labels_is_unknown() {
    let r = report(&plain("fp8"), GPU, &[gpu("Vendor-X-9000")]);
    assert_eq!(
        (r.status, r.reason),
        ("Unknown", "ComputeCapabilityUnknown")
    );
    assert!(
        r.message
            .starts_with("Vendor-X-9000 (compute capability unknown)")
    );
    let r = report(&plain("fp8"), GPU, &[]);
    assert_eq!((r.status, r.reason), ("Unknown", "NoGPULabels"));
}

#[test]
fn selectors_match_on_every_key() {
    let node = labels(&[(GPU_PRODUCT_LABEL, "NVIDIA-L4"), ("zone", "a")]);
    assert!(matches_selector(&node, &BTreeMap::new()));
    assert!(matches_selector(&node, &labels(&[("zone", "a")])));
    assert!(!matches_selector(
        &node,
        &labels(&[("zone", "a"), ("pool", "x")])
    ));
    assert!(!matches_selector(&node, &labels(&[("zone", "b")])));
}
