#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! The children the operator builds, for specs people apply: snapshots of the whole objects
//! (reviewed like code), plus the properties that must hold whatever the snapshot says.

use std::path::Path;

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use sd35_contract::{BuildEngineArgs, FetchAdapterArgs, FetchArgs, ServeArgs};
use sd35_crds::SD35Deployment;
use sd35_operator::children::{self, ServingTarget};
use sd35_operator::config::OperatorConfig;
use sd35_operator::resolve::{Resolved, resolve};

/// `sd35-server`'s command line as the server parses it.
#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Fetch(FetchArgs),
    FetchAdapter(FetchAdapterArgs),
    BuildEngine(BuildEngineArgs),
    Serve(ServeArgs),
}

fn example(file: &str) -> SD35Deployment {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    let mut obj: SD35Deployment =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    obj.metadata.namespace = Some("ml".into());
    obj.metadata.uid = Some(format!("uid-{file}"));
    obj.metadata.generation = Some(1);
    obj
}

fn resolved(obj: &SD35Deployment) -> (Resolved, OwnerReference) {
    let r = resolve(obj, &OperatorConfig::default()).unwrap();
    (r, obj.controller_owner_ref(&()).unwrap())
}

/// The users of a shared cache, as the reconciler passes them to the Jobs.
fn users() -> Vec<OwnerReference> {
    ["a", "b"]
        .map(|name| OwnerReference {
            api_version: "sd35.io/v1alpha1".into(),
            kind: "SD35Deployment".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            controller: Some(false),
            block_owner_deletion: Some(false),
        })
        .to_vec()
}

const CLAIM_UID: &str = "uid-claim";

fn pod_of_job(job: &k8s_openapi::api::batch::v1::Job) -> PodSpec {
    job.spec.as_ref().unwrap().template.spec.clone().unwrap()
}

fn parse(command: &[String], args: &[String]) -> Command {
    assert_eq!(command, ["sd35-server"]);
    let argv = std::iter::once("sd35-server".to_owned()).chain(args.iter().cloned());
    Cli::try_parse_from(argv)
        .unwrap_or_else(|e| panic!("the server would refuse {args:?}: {e}"))
        .command
}

fn assert_hardened(pod: &PodSpec) {
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    for c in &pod.containers {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        assert!(
            c.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path == "/tmp"),
            "writable /tmp"
        );
    }
}

#[test]
fn large_fp8_with_surge_on_h100_nodes() {
    let obj = example("large-fp8.yaml");
    let (r, owner) = resolved(&obj);
    let config = OperatorConfig::default();
    let target = ServingTarget::desired(&r, Vec::new());
    let deployment = children::deployment(&r, &config, &owner, &target);
    let fetch = children::fetch_job(&r, &config, &users(), CLAIM_UID);
    let engine_key = r.engine_key.clone().unwrap();
    let build_job = children::build_job(&r, &config, &users(), CLAIM_UID, &engine_key);

    // The contract: every command line the operator builds is one the server parses, and
    // points at the same cache paths.
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    let server = &pod.containers[0];
    match parse(
        server.command.as_ref().unwrap(),
        server.args.as_ref().unwrap(),
    ) {
        Command::Serve(s) => {
            assert_eq!(s.model, Path::new("/cache/models").join(&r.cache_key));
            assert_eq!(
                s.engine.unwrap(),
                Path::new("/cache/engines").join(&engine_key)
            );
            assert_eq!(s.port, 8080);
            // The pod says what the server must not guess: where to run, which variant in
            // which precision, and the names clients send.
            assert_eq!(s.device, sd35_contract::DeviceKind::Cuda);
            assert_eq!(s.variant, Some(sd35_contract::Variant::Large));
            assert_eq!(s.precision, Some(sd35_contract::Precision::Fp8));
            assert_eq!(s.served_model_names[0], "sd35-large-fp8");
            assert!(s.served_model_names.iter().any(|n| n == "sd3.5"));
            assert_eq!(
                s.termination_message_path.as_deref(),
                Some(Path::new(
                    server.termination_message_path.as_deref().unwrap()
                ))
            );
        }
        other => panic!("{other:?}"),
    }
    let fetch_pod = pod_of_job(&fetch);
    match parse(
        fetch_pod.containers[0].command.as_ref().unwrap(),
        fetch_pod.containers[0].args.as_ref().unwrap(),
    ) {
        Command::Fetch(f) => {
            assert_eq!(
                f.source.hf_repo.as_deref(),
                Some("stabilityai/stable-diffusion-3.5-large")
            );
            assert_eq!(f.cache_key, r.cache_key);
            // A failed fetch says why where Kubernetes reads it, for the operator to quote.
            assert_eq!(
                f.termination_message_path.as_deref(),
                Some(Path::new(
                    fetch_pod.containers[0]
                        .termination_message_path
                        .as_deref()
                        .unwrap()
                ))
            );
        }
        other => panic!("{other:?}"),
    }
    let build_pod = pod_of_job(&build_job);
    match parse(
        build_pod.containers[0].command.as_ref().unwrap(),
        build_pod.containers[0].args.as_ref().unwrap(),
    ) {
        Command::BuildEngine(b) => {
            assert_eq!(b.engine_key, engine_key);
            assert_eq!(b.precision, sd35_contract::EnginePrecision::Fp8);
            assert_eq!(
                b.termination_message_path.as_deref(),
                Some(Path::new(
                    build_pod.containers[0]
                        .termination_message_path
                        .as_deref()
                        .unwrap()
                ))
            );
        }
        other => panic!("{other:?}"),
    }

    // GPUs, placement, surge, read-only cache, hardening.
    let limits = server.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert_eq!(
        pod.node_selector.as_ref().unwrap()["nvidia.com/gpu.product"],
        "NVIDIA-H100-80GB-HBM3"
    );
    let rolling = deployment
        .spec
        .as_ref()
        .unwrap()
        .strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .clone()
        .unwrap();
    assert_eq!(
        serde_json::to_value(&rolling).unwrap(),
        serde_json::json!({"maxSurge": 1, "maxUnavailable": 0})
    );
    assert!(
        server
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.mount_path == "/cache" && m.read_only == Some(true))
    );
    assert_hardened(&pod);
    assert_hardened(&fetch_pod);
    assert!(
        server
            .startup_probe
            .as_ref()
            .unwrap()
            .failure_threshold
            .unwrap()
            * 10
            >= 600,
        "startup budget for ~16 GB"
    );
    // The token reaches the fetch process from the Secret, never as a literal.
    let env = fetch_pod.containers[0].env.clone().unwrap();
    let token = env
        .iter()
        .find(|e| e.name == sd35_contract::TOKEN_ENV)
        .unwrap();
    assert!(token.value.is_none());
    assert_eq!(
        token
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "hf-token"
    );

    insta::assert_yaml_snapshot!("large_fp8_deployment", deployment);
    insta::assert_yaml_snapshot!("large_fp8_fetch_job", fetch);
    insta::assert_yaml_snapshot!("large_fp8_build_job", build_job);
    insta::assert_yaml_snapshot!("large_fp8_service", children::service(&r, &owner));
    insta::assert_yaml_snapshot!("large_fp8_pdb", children::pdb(&r, &owner));
    insta::assert_yaml_snapshot!(
        "large_fp8_cache_claim",
        children::cache_claim(&r, std::slice::from_ref(&owner))
    );
}

#[test]
fn pvc_source_mounts_the_claim_read_only_and_imports_from_it() {
    let obj = example("large-bf16-pvc.yaml");
    let (r, _) = resolved(&obj);
    let fetch = children::fetch_job(&r, &OperatorConfig::default(), &users(), CLAIM_UID);
    let pod = pod_of_job(&fetch);
    let import = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "import")
        .unwrap();
    let claim = import.persistent_volume_claim.as_ref().unwrap();
    assert_eq!(claim.claim_name, "sd35-weights");
    assert_eq!(claim.read_only, Some(true));
    match parse(
        pod.containers[0].command.as_ref().unwrap(),
        pod.containers[0].args.as_ref().unwrap(),
    ) {
        Command::Fetch(f) => assert_eq!(
            f.source.import_dir.unwrap(),
            Path::new("/import/stable-diffusion-3.5-large")
        ),
        other => panic!("{other:?}"),
    }
    assert!(
        pod.containers[0].env.as_ref().is_none_or(Vec::is_empty),
        "no token for a pvc source"
    );
    insta::assert_yaml_snapshot!("pvc_fetch_job", fetch);
}

#[test]
fn medium_clip_only_defaults_and_single_replica() {
    let obj = example("medium-bf16-clip-only.yaml");
    let (r, owner) = resolved(&obj);
    let deployment = children::deployment(
        &r,
        &OperatorConfig::default(),
        &owner,
        &ServingTarget::desired(&r, Vec::new()),
    );
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    match parse(
        pod.containers[0].command.as_ref().unwrap(),
        pod.containers[0].args.as_ref().unwrap(),
    ) {
        Command::Serve(s) => {
            assert!(s.no_t5);
            assert_eq!(s.default_steps, Some(40));
            assert_eq!(s.default_guidance, Some(4.5));
        }
        other => panic!("{other:?}"),
    }
    let rolling = deployment
        .spec
        .as_ref()
        .unwrap()
        .strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .clone()
        .unwrap();
    assert_eq!(
        serde_json::to_value(&rolling).unwrap(),
        serde_json::json!({"maxSurge": 0, "maxUnavailable": 1})
    );
    assert!(
        children::pdb(&r, &owner).is_none(),
        "no PDB for one replica"
    );
    insta::assert_yaml_snapshot!("medium_deployment", deployment);
}

#[test]
fn a_pod_without_gpus_runs_on_its_cpu_and_a_custom_repository_is_a_served_name() {
    let obj: SD35Deployment = serde_yaml::from_str(
        "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata: {name: tiny, namespace: ns, uid: u1}\n\
         spec:\n  variant: large-turbo\n  model: {source: {huggingFace: {repo: me/turbo-mirror}}}\n  \
         server: {gpu: {count: 0}}\n",
    )
    .unwrap();
    let (r, owner) = resolved(&obj);
    let d = children::deployment(
        &r,
        &OperatorConfig::default(),
        &owner,
        &ServingTarget::desired(&r, Vec::new()),
    );
    let c = &d.spec.unwrap().template.spec.unwrap().containers[0];
    match parse(c.command.as_ref().unwrap(), c.args.as_ref().unwrap()) {
        Command::Serve(s) => {
            assert_eq!(s.device, sd35_contract::DeviceKind::Cpu);
            assert_eq!(s.variant, Some(sd35_contract::Variant::LargeTurbo));
            assert_eq!(
                s.served_model_names,
                [
                    "tiny",
                    "large-turbo",
                    "me/turbo-mirror",
                    "sd3.5",
                    "stable-diffusion-3.5-large-turbo"
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    let limits = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    assert!(!limits.contains_key("nvidia.com/gpu"), "{limits:?}");
}

#[test]
fn engine_never_serves_the_cache_in_the_asked_precision_not_a_silent_f32() {
    let obj: SD35Deployment = serde_yaml::from_str(
        "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata: {name: direct, namespace: ns, uid: u2}\n\
         spec: {variant: large, precision: fp8, engine: {build: Never}}\n",
    )
    .unwrap();
    let (r, owner) = resolved(&obj);
    assert_eq!(r.engine_key, None);
    let d = children::deployment(
        &r,
        &OperatorConfig::default(),
        &owner,
        &ServingTarget::desired(&r, Vec::new()),
    );
    let c = &d.spec.unwrap().template.spec.unwrap().containers[0];
    match parse(c.command.as_ref().unwrap(), c.args.as_ref().unwrap()) {
        Command::Serve(s) => {
            assert_eq!(s.engine, None);
            assert_eq!(s.precision, Some(sd35_contract::Precision::Fp8));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_serving_target_round_trips_through_the_pod_template() {
    let obj = example("large-fp8.yaml");
    let (r, owner) = resolved(&obj);
    let target = ServingTarget::desired(&r, Vec::new());
    let d = children::deployment(&r, &OperatorConfig::default(), &owner, &target);
    assert_eq!(ServingTarget::of(&d), Some(target));
}

#[test]
fn s3_artifacts_reach_the_server_as_flags_and_the_keys_by_secret_reference_only() {
    let obj = example("large-turbo-s3-artifacts.yaml");
    let (r, owner) = resolved(&obj);
    let deployment = children::deployment(
        &r,
        &OperatorConfig::default(),
        &owner,
        &ServingTarget::desired(&r, Vec::new()),
    );
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    let c = &pod.containers[0];
    match parse(c.command.as_ref().unwrap(), c.args.as_ref().unwrap()) {
        Command::Serve(s) => {
            let a = s.artifacts;
            assert_eq!(a.artifacts_s3_bucket.as_deref(), Some("generated-images"));
            assert_eq!(
                a.artifacts_s3_endpoint.as_deref(),
                Some("http://minio.storage.svc:9000")
            );
            assert_eq!(a.artifacts_s3_prefix, "sd35-turbo/");
            assert_eq!(a.artifacts_s3_region, "us-east-1");
            assert_eq!(a.artifacts_s3_url_style, sd35_contract::S3UrlStyle::Path);
            assert_eq!(a.artifacts_url_seconds, 900);
            assert_eq!(a.artifacts_dir, None);
        }
        other => panic!("{other:?}"),
    }
    // The key pair comes from the Secret by reference: no value is written anywhere the
    // operator writes, and nothing about the keys is on the command line.
    let env = c.env.clone().unwrap_or_default();
    let refs: Vec<(String, String, String)> = env
        .iter()
        .map(|e| {
            assert_eq!(e.value, None, "{} has a literal value", e.name);
            let r = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.clone())
                .unwrap();
            (e.name.clone(), r.name, r.key)
        })
        .collect();
    assert_eq!(
        refs,
        [
            (
                "AWS_ACCESS_KEY_ID".into(),
                "sd35-s3".into(),
                "AWS_ACCESS_KEY_ID".into()
            ),
            (
                "AWS_SECRET_ACCESS_KEY".into(),
                "sd35-s3".into(),
                "AWS_SECRET_ACCESS_KEY".into()
            ),
        ]
    );
    assert!(
        !c.args
            .as_ref()
            .unwrap()
            .iter()
            .any(|a| a.contains("sd35-s3")),
        "the Secret's name is not an argument"
    );
    // Without artifacts, no storage flag and no environment.
    let (plain, owner) = resolved(&example("large-turbo-bf16.yaml"));
    let d = children::deployment(
        &plain,
        &OperatorConfig::default(),
        &owner,
        &ServingTarget::desired(&plain, Vec::new()),
    );
    let c = &d.spec.unwrap().template.spec.unwrap().containers[0];
    assert!(c.env.is_none());
    assert!(
        !c.args
            .as_ref()
            .unwrap()
            .iter()
            .any(|a| a.contains("artifacts"))
    );
}

#[test]
fn adapters_and_a_controlnet_fetch_in_jobs_of_their_own_and_load_once_cached() {
    let obj = example("large-adapters-controlnet.yaml");
    let (r, owner) = resolved(&obj);
    let config = OperatorConfig::default();
    assert_eq!(r.adapters.len(), 3);
    let [detail, style, canny] = &r.adapters[..] else {
        panic!("two LoRAs and a ControlNet");
    };

    // One fetch Job per adapter, named by its key, labelled for the operator's pod watch;
    // each command line is one the server parses, to the adapter's own directory.
    let jobs: Vec<_> = r
        .adapters
        .iter()
        .map(|a| children::adapter_job(&r, &config, &users(), CLAIM_UID, a))
        .collect();
    for (job, adapter) in jobs.iter().zip(&r.adapters) {
        assert_eq!(
            job.metadata.name.as_deref(),
            Some(format!("sd35-adapter-{}", adapter.key).as_str())
        );
        let labels = job.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/name"], "sd35-adapter");
        assert_eq!(labels["sd35.io/adapter-key"], adapter.key);
        assert_eq!(labels["sd35.io/cache-key"], r.cache_key);
        let pod = pod_of_job(job);
        assert_hardened(&pod);
        let container = &pod.containers[0];
        assert_eq!(container.name, "adapter");
        match parse(
            container.command.as_ref().unwrap(),
            container.args.as_ref().unwrap(),
        ) {
            Command::FetchAdapter(f) => {
                assert_eq!(f, adapter.fetch);
                assert_eq!(f.adapter_key, adapter.key);
                assert_eq!(f.cache_root, Path::new("/cache"));
            }
            other => panic!("{other:?}"),
        }
        // A failed attempt's cause reaches the operator, and retrying cannot fix a 404.
        let policy = job
            .spec
            .as_ref()
            .unwrap()
            .pod_failure_policy
            .as_ref()
            .unwrap();
        let on_exit = policy.rules[0].on_exit_codes.as_ref().unwrap();
        assert_eq!(on_exit.container_name.as_deref(), Some("adapter"));
        assert!(on_exit.values.contains(&11));
    }
    // The gated repository's token travels by reference; the mirror's file needs none.
    let env = |job: &k8s_openapi::api::batch::v1::Job| pod_of_job(job).containers[0].env.clone();
    assert_eq!(
        env(&jobs[2]).unwrap()[0]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "hf-token"
    );
    assert!(env(&jobs[1]).is_none_or(|e| e.is_empty()));

    // The pods load the cached ones: here the first LoRA and the ControlNet, the second LoRA
    // still being fetched.
    let served = [detail, canny]
        .into_iter()
        .map(children::ServedAdapter::of)
        .collect();
    let target = ServingTarget::desired(&r, served);
    let deployment = children::deployment(&r, &config, &owner, &target);
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    match parse(
        pod.containers[0].command.as_ref().unwrap(),
        pod.containers[0].args.as_ref().unwrap(),
    ) {
        Command::Serve(s) => {
            assert_eq!(s.loras.len(), 1);
            assert_eq!(s.loras[0].name, "detail");
            assert_eq!(s.loras[0].scale, Some(0.8));
            assert_eq!(
                s.loras[0].path,
                Path::new("/cache/adapters")
                    .join(&detail.key)
                    .join("adapter.safetensors")
            );
            assert_eq!(s.controlnets.len(), 1);
            assert_eq!(s.controlnets[0].mode, sd35_contract::ControlMode::Canny);
            assert_eq!(s.controlnets[0].path, canny.served_path());
        }
        other => panic!("{other:?}"),
    }
    assert!(!style.served_path().as_os_str().is_empty());
    // The target recorded on the template reads back, and a target without adapters records
    // what it recorded before adapters existed (so an upgrade rolls nothing).
    assert_eq!(ServingTarget::of(&deployment), Some(target.clone()));
    let bare = ServingTarget::desired(&r, Vec::new()).to_annotation();
    assert!(!bare.contains("adapters"), "{bare}");

    insta::assert_yaml_snapshot!("adapter_fetch_job", jobs[0]);
    insta::assert_yaml_snapshot!("controlnet_fetch_job", jobs[2]);
    insta::assert_yaml_snapshot!("deployment_with_adapters", deployment);
}

#[test]
fn a_controlnet_folder_on_a_claim_is_imported_read_only_and_served_as_the_folder() {
    let mut obj = example("large-adapters-controlnet.yaml");
    obj.spec.adapters.clear();
    obj.spec.control_nets = serde_yaml::from_str(
        "- {mode: depth, source: {pvc: {claimName: controlnets, path: sd35-large/depth}}}",
    )
    .unwrap();
    let (r, _) = resolved(&obj);
    let adapter = &r.adapters[0];
    let job = children::adapter_job(&r, &OperatorConfig::default(), &users(), CLAIM_UID, adapter);
    let pod = pod_of_job(&job);
    let import = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "import")
        .unwrap();
    let claim = import.persistent_volume_claim.as_ref().unwrap();
    assert_eq!(
        (claim.claim_name.as_str(), claim.read_only),
        ("controlnets", Some(true))
    );
    let mounts = pod.containers[0].volume_mounts.as_ref().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m.name == "import" && m.mount_path == "/import" && m.read_only == Some(true))
    );
    match parse(
        pod.containers[0].command.as_ref().unwrap(),
        pod.containers[0].args.as_ref().unwrap(),
    ) {
        Command::FetchAdapter(f) => assert_eq!(
            f.source.import_path.as_deref(),
            Some(Path::new("/import/sd35-large/depth"))
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        adapter.served_path(),
        Path::new("/cache/adapters").join(&adapter.key)
    );
}
