//! The SD35Deployment CRD on a real apiserver: `kubectl apply -f crds/` installs it, every
//! example applies, the schema's defaults are filled in, and invalid specs are rejected at
//! admission with a message a person can act on.

use std::process::Output;

use kube::api::Api;
use sd35_crds::SD35Deployment;
use sd35_e2e::{Cluster, repo_root, shared_cluster};

fn install_crd(cluster: &Cluster) {
    sd35_e2e::install_crd(cluster).expect("install the CRD");
}

fn kubectl_apply(cluster: &Cluster, namespace: &str, yaml: &str) -> Output {
    sd35_e2e::kubectl_apply(cluster, namespace, yaml).expect("run kubectl apply")
}

#[tokio::test]
async fn crd_installs_and_kubectl_explains_it() {
    let cluster = shared_cluster();
    install_crd(cluster);

    // The apiserver publishes a new CRD's OpenAPI (what explain reads) a little later.
    let text = sd35_e2e::poll_until(
        "kubectl explain sd35",
        std::time::Duration::from_secs(60),
        || async {
            let out = cluster
                .kubectl()
                .args(["explain", "sd35.spec.precision"])
                .output()?;
            Ok(if out.status.success() {
                sd35_e2e::Probe::Ready(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                sd35_e2e::Probe::Pending(String::from_utf8_lossy(&out.stderr).into_owned())
            })
        },
    )
    .await
    .expect("kubectl explain works");
    assert!(
        text.contains("F8E4M3"),
        "explain text lacks the field doc:\n{text}"
    );

    let out = cluster
        .kubectl()
        .args(["api-resources", "--api-group=sd35.io", "-o", "wide"])
        .output()
        .expect("run kubectl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("sd35deployments") && text.contains("sd35"),
        "{text}"
    );
}

#[tokio::test]
async fn every_example_applies_and_gets_schema_defaults() {
    let cluster = shared_cluster();
    install_crd(cluster);
    let ns = cluster.temp_namespace("examples").await;

    let mut applied = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("examples")).expect("read examples/") {
        let path = entry.expect("examples entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let yaml = std::fs::read_to_string(&path).expect("read example");
        let out = kubectl_apply(cluster, ns.name(), &yaml);
        assert!(
            out.status.success(),
            "{} was rejected: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let obj: SD35Deployment = serde_yaml::from_str(&yaml).expect("example parses");
        applied.push(obj.metadata.name.expect("example has a name"));
    }
    assert!(
        applied.len() >= 5,
        "expected at least five examples, applied {applied:?}"
    );

    // What the apiserver stored carries the schema's defaults.
    let api: Api<SD35Deployment> = Api::namespaced(ns.client(), ns.name());
    for name in &applied {
        let stored = api.get(name).await.expect("get applied example");
        assert_eq!(stored.spec.server.port, 8080, "{name}: server.port default");
        assert_eq!(
            stored.spec.server.gpu.resource_name, "nvidia.com/gpu",
            "{name}: gpu default"
        );
        assert!(stored.spec.replicas >= 1, "{name}: replicas");
    }
    let turbo = api.get("sd35-turbo").await.expect("get turbo example");
    assert_eq!(
        turbo.spec.precision,
        sd35_crds::EnginePrecision::Bf16,
        "precision default"
    );
    let raw = cluster
        .kubectl()
        .args([
            "get",
            "sd35",
            "sd35-turbo",
            "-n",
            ns.name(),
            "-o",
            "jsonpath={.spec.engine.build}",
        ])
        .output()
        .expect("run kubectl");
    assert_eq!(
        String::from_utf8_lossy(&raw.stdout),
        "Auto",
        "engine.build default is stored"
    );
}

/// Each case: a spec fragment and the words the rejection must contain.
const INVALID: &[(&str, &str, &str)] = &[
    (
        "bad-enum",
        "variant: xl",
        "supported values: \"large\", \"large-turbo\", \"medium\"",
    ),
    (
        "bad-precision",
        "variant: large\nprecision: int4",
        "supported values: \"bf16\", \"fp8\"",
    ),
    (
        "negative-replicas",
        "variant: large\nreplicas: -1",
        "should be greater than or equal to 0",
    ),
    (
        "two-sources",
        "variant: large\nmodel:\n  source:\n    huggingFace: {repo: a/b}\n    http: {url: 'https://m.example/x/'}",
        "model.source must set exactly one of huggingFace, http or pvc",
    ),
    (
        "no-source",
        "variant: large\nmodel:\n  source: {}",
        "model.source must set exactly one of huggingFace, http or pvc",
    ),
    (
        "bad-repo",
        "variant: large\nmodel:\n  source:\n    huggingFace: {repo: justaname}",
        "huggingFace.repo must look like owner/name",
    ),
    (
        "bad-url",
        "variant: large\nmodel:\n  source:\n    http: {url: 'ftp://m.example/x'}",
        "http.url must be an http:// or https:// URL",
    ),
    (
        "bad-width",
        "variant: large\nserver:\n  defaults: {width: 1000}",
        "server.defaults.width must be a multiple of 16",
    ),
    (
        "small-cache",
        "variant: large\ncache: {size: 10Mi}",
        "cache.size must be a quantity of at least 1Gi",
    ),
    (
        "not-a-size",
        "variant: large\ncache: {size: lots}",
        "cache.size must be a quantity of at least 1Gi",
    ),
    (
        "claim-and-size",
        "variant: large\ncache: {existingClaim: mine, size: 100Gi}",
        "cache.existingClaim cannot be combined with storageClassName, size or accessModes",
    ),
    (
        "surge-without-strategy",
        "variant: large\nrollout: {maxSurge: 2}",
        "rollout.maxSurge is only used with strategy Surge",
    ),
    (
        "bad-bucket",
        "variant: large\nserver:\n  artifacts: {bucket: My_Images, credentialsSecret: {name: s3}}",
        "artifacts.bucket must be an S3 bucket name",
    ),
    (
        "endpoint-with-path",
        "variant: large\nserver:\n  artifacts: {bucket: images, endpoint: 'https://s3.example/images', credentialsSecret: {name: s3}}",
        "artifacts.endpoint must be http(s)://host[:port] with no path, query or credentials",
    ),
    (
        "endpoint-with-credentials",
        "variant: large\nserver:\n  artifacts: {bucket: images, endpoint: 'https://key:secret@s3.example', credentialsSecret: {name: s3}}",
        "artifacts.endpoint must be http(s)://host[:port] with no path, query or credentials",
    ),
    (
        "url-longer-than-s3-allows",
        "variant: large\nserver:\n  artifacts: {bucket: images, urlSeconds: 604801, credentialsSecret: {name: s3}}",
        "should be less than or equal to 604800",
    ),
    (
        "absolute-prefix",
        "variant: large\nserver:\n  artifacts: {bucket: images, prefix: /sd35, credentialsSecret: {name: s3}}",
        "artifacts.prefix must not start with /",
    ),
    (
        "artifacts-without-credentials",
        "variant: large\nserver:\n  artifacts: {bucket: images}",
        "credentialsSecret: Required value",
    ),
    (
        "unknown-field",
        "variant: large\nreplica: 2",
        "unknown field \"spec.replica\"",
    ),
    (
        "duplicate-adapter-names",
        "variant: large\nadapters:\n- {name: detail, source: {huggingFace: {repo: a/b}}}\n- {name: detail, source: {huggingFace: {repo: a/c}}}",
        "spec.adapters must have unique names",
    ),
    (
        "bad-adapter-name",
        "variant: large\nadapters:\n- {name: 'Detail:v1', source: {huggingFace: {repo: a/b}}}",
        "adapters[].name must be lower-case letters, digits",
    ),
    (
        "adapter-with-two-sources",
        "variant: large\nadapters:\n- name: detail\n  source:\n    huggingFace: {repo: a/b}\n    http: {url: 'https://m.example/d.safetensors', sha256: '0000000000000000000000000000000000000000000000000000000000000000'}",
        "an adapter or ControlNet source must set exactly one of huggingFace, http or pvc",
    ),
    (
        "adapter-url-without-sha256",
        "variant: large\nadapters:\n- {name: detail, source: {http: {url: 'https://m.example/d.safetensors'}}}",
        "sha256: Required value",
    ),
    (
        "adapter-bad-sha256",
        "variant: large\nadapters:\n- {name: detail, source: {http: {url: 'https://m.example/d.safetensors', sha256: 'ABCDEF0000000000000000000000000000000000000000000000000000000000'}}}",
        "http.sha256 must be the file's sha256 as 64 lower-case hex digits",
    ),
    (
        "lora-folder-on-a-claim",
        "variant: large\nadapters:\n- {name: detail, source: {pvc: {claimName: loras, path: detail}}}",
        "a LoRA is one file: adapters[].source.pvc.path must name its .safetensors file",
    ),
    (
        "adapter-file-not-safetensors",
        "variant: large\nadapters:\n- {name: detail, source: {huggingFace: {repo: a/b, file: detail.ckpt}}}",
        "huggingFace.file must be a relative path to a .safetensors file",
    ),
    (
        "two-controlnets-of-one-mode",
        "variant: large\ncontrolNets:\n- {mode: canny, source: {huggingFace: {repo: a/b}}}\n- {mode: canny, source: {huggingFace: {repo: a/c}}}",
        "spec.controlNets must have one entry per mode",
    ),
    (
        "unknown-control-mode",
        "variant: large\ncontrolNets:\n- {mode: pose, source: {huggingFace: {repo: a/b}}}",
        "supported values: \"canny\", \"depth\", \"blur\"",
    ),
];

#[tokio::test]
async fn invalid_specs_are_rejected_at_apply_with_the_schema_message() {
    let cluster = shared_cluster();
    install_crd(cluster);
    let ns = cluster.temp_namespace("invalid").await;

    let mut failures = Vec::new();
    for (name, spec, expected) in INVALID {
        let indented = spec.lines().map(|l| format!("  {l}\n")).collect::<String>();
        let yaml = format!(
            "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata:\n  name: {name}\nspec:\n{indented}"
        );
        let out = kubectl_apply(cluster, ns.name(), &yaml);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{name}: was accepted"));
        } else if !stderr.contains(expected) {
            failures.push(format!("{name}: message lacks {expected:?}: {stderr}"));
        }
    }
    // A name that cannot name the Service is refused too.
    let long = "x".repeat(60);
    let out = kubectl_apply(
        cluster,
        ns.name(),
        &format!(
            "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata:\n  name: {long}\nspec:\n  variant: large\n"
        ),
    );
    if out.status.success()
        || !String::from_utf8_lossy(&out.stderr).contains("metadata.name must be a DNS label")
    {
        failures.push(format!(
            "long name: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing invalid was stored.
    let api: Api<SD35Deployment> = Api::namespaced(ns.client(), ns.name());
    let stored = api.list(&Default::default()).await.expect("list");
    assert!(
        stored.items.is_empty(),
        "invalid objects were stored: {:?}",
        stored
            .items
            .iter()
            .map(|o| &o.metadata.name)
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn kubectl_scale_sets_spec_replicas_through_the_scale_subresource() {
    let cluster = shared_cluster();
    install_crd(cluster);
    let ns = cluster.temp_namespace("scale").await;
    let out = kubectl_apply(
        cluster,
        ns.name(),
        "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata:\n  name: s\nspec:\n  variant: medium\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster
        .kubectl()
        .args(["scale", "-n", ns.name(), "sd35/s", "--replicas=3"])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl scale failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api: Api<SD35Deployment> = Api::namespaced(ns.client(), ns.name());
    assert_eq!(api.get("s").await.expect("get").spec.replicas, 3);
    let out = cluster
        .kubectl()
        .args(["scale", "-n", ns.name(), "sd35/s", "--replicas=-2"])
        .output()
        .expect("run kubectl");
    assert!(!out.status.success(), "negative scale was accepted");
}
