//! The API reference (`docs/api.md`), generated from the same CRD the cluster gets, so the
//! reference says exactly what `kubectl explain` and admission say: every field with its
//! type, default, limits and validation messages.

use std::fmt::Write as _;

use kube::CustomResourceExt;
use serde_json::Value;

use crate::{SD35Deployment, condition};

/// Fields whose types come from Kubernetes itself: documented upstream, not expanded here.
const EMBEDDED: [(&str, &str, &str); 5] = [
    (
        "from",
        "networking/v1 NetworkPolicyPeer",
        "https://kubernetes.io/docs/reference/kubernetes-api/policy-resources/network-policy-v1/",
    ),
    (
        "affinity",
        "core/v1 Affinity",
        "https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#scheduling",
    ),
    (
        "tolerations",
        "core/v1 Toleration",
        "https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#scheduling",
    ),
    (
        "resources",
        "core/v1 ResourceRequirements",
        "https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#resources",
    ),
    (
        "conditions",
        "meta/v1 Condition",
        "https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/object-meta/",
    ),
];

/// What each condition the operator sets means.
const CONDITIONS: [(&str, &str); 9] = [
    (
        condition::READY,
        "The latest generation is observed and every desired replica runs it and is available. \
         `kubectl wait --for=condition=Ready`, Helm, Argo CD and Flux wait on this.",
    ),
    (
        condition::RECONCILING,
        "The operator is working towards the latest spec (caching, building, rolling out); the \
         reason says which step.",
    ),
    (
        condition::STALLED,
        "The operator cannot make progress without a change to the spec or the cluster (a \
         failed fetch or build Job, an invalid spec, a rollout past its deadline); the \
         message names the cause and the fix.",
    ),
    (
        condition::CACHE_READY,
        "The weights are completely cached on the claim and verified.",
    ),
    (
        condition::ENGINE_READY,
        "The serving engine for the precision is built (or not needed).",
    ),
    (
        condition::AVAILABLE,
        "At least one serving pod is available (or the object is scaled to zero).",
    ),
    (
        condition::ADAPTERS_READY,
        "Every adapter and ControlNet of the spec is cached and verified (reason Cached; \
         NoneRequested when there are none). False while one is fetched (Fetching) and when \
         one failed (AdapterFailed): status.adapters says which, with its reason and message. \
         A failed adapter stalls only itself: the model and the other adapters are served, \
         and once nothing else is in progress Ready is False and Stalled True with reason \
         AdapterFailed (phase Degraded) until the spec changes.",
    ),
    (
        condition::ADDONS_READY,
        "Every add-on the spec asks for (ServiceMonitor, NetworkPolicy) is in place; False when \
         one is skipped (for example its CRD is not installed), with the reason in the message. \
         It never holds up Ready.",
    ),
    (
        condition::GPU_COMPATIBLE,
        "Set when the serving pods request GPUs: the GPUs of the nodes they run on (before \
         they are scheduled, of the GPU nodes matching spec.scheduling.nodeSelector), from GPU \
         feature discovery's labels, and the path the precision takes there (reason \
         FP8WeightOnly, FP8TensorCores or Supported), with the memory plan's peak for the \
         largest default request (default size, server.limits.maxBatchSize, guidance per the \
         model card, T5 as spec.model.textEncoders says) against one GPU's memory label \
         (nvidia.com/gpu.memory). False with ComputeCapabilityTooLow on a GPU older than \
         compute capability 8.0, where the server's CUDA build cannot run, and with \
         InsufficientGPUMemory when the plan needs more than one GPU holds (the message names \
         both figures and what would fit: fp8, T5 off, a smaller default size or batch); \
         Unknown when no node says. It never holds up Ready.",
    ),
];

/// The API reference as Markdown, exactly as committed in `docs/api.md`.
pub fn api_reference_markdown() -> String {
    let crd = serde_json::to_value(SD35Deployment::crd()).expect("a CRD always serialises");
    let spec = &crd["spec"];
    let version = &spec["versions"][0];
    let root = &version["schema"]["openAPIV3Schema"];
    let mut out = String::new();
    let names = &spec["names"];
    let _ = write!(
        out,
        "<!-- Generated from the Rust types in crds/src by `make crds`; do not edit. -->\n\
         # API reference: {kind}\n\n\
         {description}\n\n\
         | | |\n|---|---|\n\
         | API version | `{group}/{version}` |\n\
         | Kind | `{kind}` |\n\
         | Plural, short names | `{plural}`, {short} |\n\
         | Categories | {categories} |\n\
         | Scope | {scope} |\n\
         | Subresources | {subresources} |\n\n",
        kind = str_of(&names["kind"]),
        description = text(str_of(&root["description"])),
        group = str_of(&spec["group"]),
        version = str_of(&version["name"]),
        plural = str_of(&names["plural"]),
        short = code_list(&names["shortNames"]),
        categories = code_list(&names["categories"]),
        scope = str_of(&spec["scope"]),
        subresources = subresources(&version["subresources"]),
    );
    out.push_str(
        "Every field below is also documented by `kubectl explain sd35.spec` (and \
         `sd35.status`). Rules marked *Rule* are enforced at admission: `kubectl apply` \
         refuses a violating object with the message shown.\n\n",
    );
    if let Some(rules) = root
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        out.push_str("Object-level rules:\n\n");
        for rule in rules {
            let _ = writeln!(out, "- {}", text(str_of(&rule["message"])));
        }
        out.push('\n');
    }
    out.push_str("## Printer columns\n\n`kubectl get sd35` shows these; `-o wide` adds those of priority 1.\n\n| Column | Type | Priority | JSONPath |\n|---|---|---|---|\n");
    for column in version["additionalPrinterColumns"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let _ = writeln!(
            out,
            "| {} | {} | {} | `{}` |",
            str_of(&column["name"]),
            str_of(&column["type"]),
            column["priority"].as_i64().unwrap_or(0),
            str_of(&column["jsonPath"]).replace('|', "\\|"),
        );
    }
    out.push('\n');
    for top in ["spec", "status"] {
        let _ = writeln!(out, "## {top}\n");
        document_object(&mut out, top, &root["properties"][top], 3);
    }
    out.push_str("## Conditions\n\nEach condition carries a `reason`, a `message` and the `observedGeneration` it describes. `Ready`, `Reconciling` and `Stalled` follow [kstatus](https://github.com/kubernetes-sigs/cli-utils/blob/master/pkg/kstatus/README.md).\n\n| Type | True when |\n|---|---|\n");
    for (type_, meaning) in CONDITIONS {
        let _ = writeln!(out, "| `{type_}` | {meaning} |");
    }
    out
}

/// Writes the field table of the object at `path`, then a section for each nested object.
fn document_object(out: &mut String, path: &str, schema: &Value, depth: usize) {
    if let Some(description) = schema.get("description").and_then(Value::as_str) {
        let _ = writeln!(out, "{}\n", text(description));
    }
    let empty = serde_json::Map::new();
    let properties = schema
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut notes = notes_of(schema);
    if !notes.is_empty() {
        notes.insert(0, String::new());
        let _ = writeln!(out, "{}\n", notes.join("\n- ").trim_start());
    }
    out.push_str("| Field | Type | Default | Description |\n|---|---|---|---|\n");
    let mut nested = Vec::new();
    for (name, field) in properties {
        let field_path = format!("{path}.{name}");
        let (type_, expand) = type_of(name, &field_path, field);
        if let Some(sub) = expand {
            nested.push((field_path.clone(), sub));
        }
        let mut description = text(
            field
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or(""),
        );
        for note in notes_of(field) {
            let _ = write!(description, "<br>{note}");
        }
        let _ = writeln!(
            out,
            "| `{name}`{} | {type_} | {} | {} |",
            if required.contains(&name.as_str()) {
                " (required)"
            } else {
                ""
            },
            default_of(field),
            description.trim_start_matches("<br>"),
        );
    }
    out.push('\n');
    for (field_path, sub) in nested {
        let _ = writeln!(out, "{} {field_path}\n", "#".repeat(depth.min(6)));
        document_object(out, &field_path, sub, depth + 1);
    }
}

/// The type as shown in the table, and the object schema to document in a section of its
/// own, if any.
fn type_of<'a>(name: &str, path: &str, schema: &'a Value) -> (String, Option<&'a Value>) {
    if let Some((_, upstream, link)) = EMBEDDED.iter().find(|(n, ..)| *n == name) {
        let list = if schema["type"] == "array" { "[]" } else { "" };
        return (format!("{list}[{upstream}]({link})"), None);
    }
    if schema.get("x-kubernetes-int-or-string").is_some() {
        return ("int or string".into(), None);
    }
    match str_of(&schema["type"]) {
        "array" => {
            let (item, expand) = type_of("", &format!("{path}[]"), &schema["items"]);
            (format!("[]{item}"), expand)
        }
        "object" if schema.get("properties").is_some() => (
            format!("[object](#{})", anchor(path.trim_end_matches("[]"))),
            Some(schema),
        ),
        "object" => match schema.get("additionalProperties") {
            Some(values) if values.is_object() => {
                let (value, _) = type_of("", path, values);
                (format!("map[string]{value}"), None)
            }
            _ => ("object".into(), None),
        },
        "string" if schema.get("enum").is_some() => ("enum".into(), None),
        other => match schema.get("format").and_then(Value::as_str) {
            Some(format) => (format!("{other} ({format})"), None),
            None => (other.to_owned(), None),
        },
    }
}

/// Allowed values, limits and admission rules of one schema.
fn notes_of(schema: &Value) -> Vec<String> {
    let mut notes = Vec::new();
    let items = schema.get("items");
    let enum_values = schema
        .get("enum")
        .or_else(|| items.and_then(|i| i.get("enum")));
    if let Some(values) = enum_values.and_then(Value::as_array) {
        let values: Vec<String> = values
            .iter()
            .filter_map(Value::as_str)
            .map(|v| format!("`{v}`"))
            .collect();
        notes.push(format!("One of: {}.", values.join(", ")));
    }
    for (key, label) in [
        ("minimum", "Minimum"),
        ("maximum", "Maximum"),
        ("minLength", "Minimum length"),
        ("maxLength", "Maximum length"),
        ("minItems", "Minimum items"),
        ("maxItems", "Maximum items"),
    ] {
        if let Some(n) = schema.get(key).and_then(Value::as_f64) {
            notes.push(format!("{label}: {n}."));
        }
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        notes.push(format!("Pattern: `{}`.", pattern.replace('|', "\\|")));
    }
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for rule in rules {
            notes.push(format!("*Rule:* {}.", text(str_of(&rule["message"]))));
        }
    }
    notes
}

fn default_of(schema: &Value) -> String {
    match schema.get("default") {
        None | Some(Value::Null) => String::new(),
        Some(Value::Object(_)) => "*its fields' defaults*".into(),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("`{}`", f as i64),
            _ => format!("`{n}`"),
        },
        Some(Value::String(s)) => format!("`{s}`"),
        Some(v) => format!("`{}`", serde_json::to_string(v).unwrap_or_default()),
    }
}

fn subresources(value: &Value) -> String {
    let mut parts = Vec::new();
    if value.get("status").is_some() {
        parts.push("`status`".to_owned());
    }
    if let Some(scale) = value.get("scale") {
        parts.push(format!(
            "`scale` (`{}` ↔ `{}`, selector `{}`)",
            str_of(&scale["specReplicasPath"]),
            str_of(&scale["statusReplicasPath"]),
            str_of(&scale["labelSelectorPath"]),
        ));
    }
    parts.join(", ")
}

/// GitHub's anchor of a heading: lower case, with dots and brackets dropped.
fn anchor(heading: &str) -> String {
    heading
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_')
        .flat_map(char::to_lowercase)
        .collect()
}

fn code_list(values: &Value) -> String {
    values
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|v| format!("`{v}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}

/// A description made safe for one table cell: pipes escaped, angle brackets shown as
/// text, paragraphs kept as line breaks and wrapped lines joined.
fn text(description: &str) -> String {
    description
        .trim()
        .replace('|', "\\|")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .split("\n\n")
        .map(|paragraph| paragraph.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("<br>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_follow_github() {
        assert_eq!(anchor("spec.model.source"), "specmodelsource");
        assert_eq!(
            anchor("spec.scheduling.tolerations[]"),
            "specschedulingtolerations"
        );
    }

    #[test]
    fn text_fits_in_a_table_cell() {
        assert_eq!(text("a | b\nc\n\n<d>"), "a \\| b c<br>&lt;d&gt;");
    }
}
