#![allow(clippy::unwrap_used)] // tests panic on purpose

//! The generated CRD: committed copies match the types, the schema is one the apiserver
//! accepts and documents every field, and the examples parse into the types.

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use sd35_crds::{EnginePrecision, RolloutStrategy, SD35Deployment, Variant};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crds_match_the_types() {
    let expected = sd35_crds::crd_yaml();
    for dir in sd35_crds::CRD_DIRS {
        let path = repo_root().join(dir).join(sd35_crds::CRD_FILE_NAME);
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        assert!(
            committed == expected,
            "{} is out of date with the types in crds/src; run `make crds` and commit",
            path.display()
        );
    }
}

#[test]
fn committed_api_reference_matches_the_types() {
    let path = repo_root().join(sd35_crds::API_REFERENCE_PATH);
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        committed == sd35_crds::api_reference_markdown(),
        "{} is out of date with the types in crds/src; run `make crds` and commit",
        path.display()
    );
}

#[test]
fn api_reference_documents_every_field() {
    // Every field of ours appears in the reference under its own name, in the table of the
    // object that holds it.
    let markdown = sd35_crds::api_reference_markdown();
    let schema = spec_schema();
    for root in ["spec", "status"] {
        walk(root, &schema["properties"][root], &mut |path, _| {
            let embedded = ["affinity", "tolerations", "resources", "conditions", "from"]
                .iter()
                .any(|e| path.contains(&format!(".{e}.")) || path.contains(&format!(".{e}[]")));
            if embedded || path.ends_with("{}") || path.ends_with("[]") || !path.contains('.') {
                return;
            }
            let (parent, name) = path.rsplit_once('.').unwrap();
            // Sections of list items are named without the brackets: `spec.adapters.source`.
            let parent = parent.replace("[]", "");
            let section = if parent.contains('.') {
                markdown
                    .split_once(&format!(" {parent}\n"))
                    .map(|(_, rest)| rest)
                    .unwrap_or_else(|| panic!("no section for {parent}"))
            } else {
                markdown
                    .split_once(&format!("## {parent}\n"))
                    .map(|(_, rest)| rest)
                    .unwrap()
            };
            assert!(
                section.contains(&format!("| `{name}`")),
                "{path} is missing from the API reference"
            );
        });
    }
}

fn spec_schema() -> Value {
    let crd = serde_json::to_value(SD35Deployment::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Walks every property of a schema, calling `f(path, schema)`.
fn walk(path: &str, schema: &Value, f: &mut impl FnMut(&str, &Value)) {
    f(path, schema);
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            walk(&format!("{path}.{name}"), sub, f);
        }
    }
    if let Some(items) = schema.get("items") {
        walk(&format!("{path}[]"), items, f);
    }
    if let Some(extra) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        walk(&format!("{path}{{}}"), extra, f);
    }
}

#[test]
fn schema_is_structural() {
    // The apiserver rejects CRDs whose schemas use these at any level but the root of
    // value validations; none of our types need them.
    walk("", &spec_schema(), &mut |path, s| {
        for key in ["oneOf", "anyOf", "allOf", "$ref", "not"] {
            assert!(
                s.get(key).is_none(),
                "{path} uses {key}: not a structural schema"
            );
        }
        assert!(
            s.get("type").is_some()
                || s.get("x-kubernetes-int-or-string").is_some()
                || s.get("x-kubernetes-preserve-unknown-fields").is_some(),
            "{path} has no type"
        );
    });
}

#[test]
fn every_field_of_ours_is_documented_for_kubectl_explain() {
    let schema = spec_schema();
    let mut undocumented = Vec::new();
    for root in ["spec", "status"] {
        walk(root, &schema["properties"][root], &mut |path, s| {
            // Embedded Kubernetes types (affinity, tolerations, resources, conditions) carry
            // upstream docs; only check the fields we define.
            let embedded = ["affinity", "tolerations", "resources", "conditions", "from"]
                .iter()
                .any(|e| path.contains(&format!(".{e}.")) || path.contains(&format!(".{e}[]")));
            let described = s
                .get("description")
                .and_then(Value::as_str)
                .is_some_and(|d| !d.trim().is_empty());
            if !embedded && !described && !path.ends_with("{}") && !path.ends_with("[]") {
                undocumented.push(path.to_owned());
            }
        });
    }
    assert!(
        undocumented.is_empty(),
        "fields without a description: {undocumented:?}"
    );
}

#[test]
fn names_scale_and_columns_follow_the_design() {
    let crd = serde_json::to_value(SD35Deployment::crd()).unwrap();
    let names = &crd["spec"]["names"];
    assert_eq!(crd["metadata"]["name"], "sd35deployments.sd35.io");
    assert_eq!(names["kind"], "SD35Deployment");
    assert_eq!(names["shortNames"], serde_json::json!(["sd35"]));
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    let scale = &version["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.replicas");
    assert_eq!(scale["statusReplicasPath"], ".status.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.selector");
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("priority").is_none())
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        ["Variant", "Precision", "Desired", "Ready", "Phase", "Age"]
    );
}

#[test]
fn a_minimal_spec_gets_the_documented_defaults() {
    let obj: SD35Deployment = serde_yaml::from_str(
        "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata: {name: a}\nspec: {variant: large-turbo}\n",
    )
    .unwrap();
    let spec = &obj.spec;
    assert_eq!(spec.variant, Variant::LargeTurbo);
    assert_eq!(spec.precision, EnginePrecision::Bf16);
    assert_eq!(spec.replicas, 1);
    assert!(spec.model.source.is_none());
    assert!(spec.model.text_encoders.t5);
    assert_eq!(spec.model.text_encoders.t5_max_tokens, 256);
    assert_eq!(spec.server.port, 8080);
    assert_eq!(spec.server.gpu.count, 1);
    assert_eq!(spec.server.gpu.resource_name, "nvidia.com/gpu");
    assert_eq!(spec.rollout.strategy, RolloutStrategy::NoSurge);
    assert_eq!(spec.cache.fetch.backoff_limit, 3);
    assert!(!spec.paused);
}

#[test]
fn schema_defaults_agree_with_serde_defaults() {
    // The apiserver fills defaults from the schema, the operator's serde from the types; an
    // object defaulted by either must read the same.
    let schema = spec_schema();
    let spec_props = &schema["properties"]["spec"]["properties"];
    assert_eq!(spec_props["precision"]["default"], "bf16");
    assert_eq!(spec_props["replicas"]["default"], 1);
    let minimal: SD35Deployment = serde_yaml::from_str(
        "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata: {name: a}\nspec: {variant: medium}\n",
    )
    .unwrap();
    let serialised = serde_json::to_value(&minimal.spec).unwrap();
    for field in [
        "model",
        "cache",
        "engine",
        "server",
        "scheduling",
        "rollout",
    ] {
        assert_eq!(
            spec_props[field]["default"], serialised[field],
            "schema default of spec.{field} differs from the serde default"
        );
    }
}

#[test]
fn every_example_parses_into_the_types() {
    let dir = repo_root().join("examples");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let obj: SD35Deployment = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
        // Round-tripping must not drop anything the example says.
        let original: Value = serde_yaml::from_str(&text).unwrap();
        let back = serde_json::to_value(&obj).unwrap();
        assert_subset(
            &original["spec"],
            &back["spec"],
            &path.display().to_string(),
        );
        count += 1;
    }
    assert!(count >= 5, "expected the examples in {}", dir.display());
}

fn assert_subset(part: &Value, whole: &Value, at: &str) {
    match (part, whole) {
        (Value::Object(p), Value::Object(w)) => {
            for (k, v) in p {
                let sub = w
                    .get(k)
                    .unwrap_or_else(|| panic!("{at}: field {k} is lost by the types"));
                assert_subset(v, sub, &format!("{at}.{k}"));
            }
        }
        (Value::Array(p), Value::Array(w)) => {
            assert_eq!(p.len(), w.len(), "{at}: items lost or added by the types");
            for (i, (p, w)) in p.iter().zip(w).enumerate() {
                assert_subset(p, w, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(part, whole, "{at}"),
    }
}
