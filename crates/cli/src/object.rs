//! Sandboxes as Kubernetes-style objects, the form `get -o yaml` prints and `apply -f` reads:
//!
//! ```yaml
//! apiVersion: warren.dev/v1
//! kind: Sandbox
//! metadata: {name: web, labels: {app: web}, annotations: {...}}
//! spec: {backend: slot, resources: {limits: {cpu: 500m, memory: 1Gi}}}
//! status: {...}   # output only; ignored by apply
//! ```
//!
//! What `get -o yaml` prints, `apply -f` takes back unchanged.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use serde_json::{Map, Value, json};
use warren_proto::{resource_info_from_pb, spec_from_pb, v1};
use warren_spec::SandboxSpec;

pub const API_VERSION: &str = "warren.dev/v1";
pub const KIND: &str = "Sandbox";

pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The object form of a sandbox the server returned.
pub fn to_object(sb: &v1::Sandbox) -> anyhow::Result<Value> {
    let spec = spec_from_pb(sb.spec.clone().unwrap_or_default())
        .context("the server sent a spec this client cannot read")?;
    let mut body = serde_json::to_value(&spec)?;
    let fields = body.as_object_mut().context("spec is not an object")?;
    for f in ["name", "labels", "annotations"] {
        fields.remove(f);
    }
    let mut metadata = Map::new();
    metadata.insert("name".into(), json!(spec.name));
    metadata.insert("uid".into(), json!(sb.id));
    if !spec.labels.is_empty() {
        metadata.insert("labels".into(), json!(spec.labels));
    }
    if !spec.annotations.is_empty() {
        metadata.insert("annotations".into(), json!(spec.annotations));
    }
    metadata.insert("creationTimestamp".into(), json!(rfc3339(sb.created_at_ms)));
    metadata.insert("resourceVersion".into(), json!(sb.revision.to_string()));
    let st = sb.status.clone().unwrap_or_default();
    let mut status = Map::new();
    status.insert("phase".into(), json!(st.phase));
    if let Some(seed) = seed_phase(&st.phase) {
        // Seed 004 (Fast Sandbox) calls this phase by another name.
        status.insert("seedPhase".into(), json!(seed));
    }
    if st.paused {
        status.insert("paused".into(), json!(true));
    }
    if st.recreations > 0 {
        status.insert("recreations".into(), json!(st.recreations));
    }
    if let Some(code) = st.exit_code {
        status.insert("exitCode".into(), json!(code));
    }
    if !st.reason.is_empty() {
        status.insert("reason".into(), json!(st.reason));
    }
    status.insert("node".into(), json!(st.node));
    let resources = resource_info_from_pb(&st.resources.unwrap_or_default());
    status.insert("resources".into(), serde_json::to_value(resources)?);
    if !st.backend_info.is_empty() {
        let info: std::collections::BTreeMap<_, _> = st.backend_info.into_iter().collect();
        status.insert("backendInfo".into(), json!(info));
    }
    if let Some(p) = &st.policy {
        let decision = warren_proto::decision_from_pb(p);
        let mut value = serde_json::to_value(&decision)?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("verdict".into(), json!(decision.verdict()));
        }
        status.insert("policy".into(), value);
    }
    Ok(json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": body,
        "status": status,
    }))
}

/// Reads every Sandbox object in a YAML (or JSON) text, `---`-separated. Errors name the
/// document and the field.
pub fn from_documents(text: &str, source: &str) -> anyhow::Result<Vec<SandboxSpec>> {
    each_document(text, source, KIND, from_object)
}

/// Reads every object of a YAML (or JSON) text, `---`-separated, with `read`; errors name
/// the document. At least one object is required.
pub fn each_document<T>(
    text: &str,
    source: &str,
    kind: &str,
    read: impl Fn(Value) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::new();
    for (i, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let at = format!("{source}, document {}", i + 1);
        // Strictly: `.nan`/`.inf` and duplicate keys are refused, not dropped.
        let crate::strict::Strict(value) = serde::Deserialize::deserialize(doc)
            .with_context(|| format!("{at}: not valid YAML"))?;
        if value.is_null() {
            continue;
        }
        out.push(read(value).with_context(|| at.clone())?);
    }
    if out.is_empty() {
        bail!("{source}: no {kind} objects found");
    }
    Ok(out)
}

/// Seed 004's name for a phase warren names otherwise (docs/api.md, "Phases").
pub fn seed_phase(phase: &str) -> Option<&'static str> {
    match phase {
        "Creating" => Some("Bound"),
        "Stopping" => Some("Terminating"),
        _ => None,
    }
}

/// Checks `apiVersion` and `kind` and returns the object's `metadata` and `spec` (`status`,
/// output only, is dropped; any other top-level field is an error).
pub fn split_object(
    value: Value,
    kind: &str,
) -> anyhow::Result<(Map<String, Value>, Map<String, Value>)> {
    let Value::Object(mut obj) = value else {
        bail!("expected an object with apiVersion, kind, metadata, spec")
    };
    match obj.remove("apiVersion") {
        Some(Value::String(v)) if v == API_VERSION => {}
        Some(v) => bail!("apiVersion: {v} is not supported (expected {API_VERSION})"),
        None => bail!("apiVersion: missing (expected {API_VERSION})"),
    }
    match obj.remove("kind") {
        Some(Value::String(k)) if k == kind => {}
        Some(k) => bail!("kind: {k} is not supported (expected {kind})"),
        None => bail!("kind: missing (expected {kind})"),
    }
    let Some(Value::Object(metadata)) = obj.remove("metadata") else {
        bail!("metadata: missing or not an object")
    };
    let spec = match obj.remove("spec") {
        Some(Value::Object(s)) => s,
        None | Some(Value::Null) => Map::new(),
        Some(_) => bail!("spec: not an object"),
    };
    obj.remove("status");
    if let Some(extra) = obj.keys().next() {
        bail!(
            "{extra}: unknown top-level field (expected apiVersion, kind, metadata, spec, status)"
        );
    }
    Ok((metadata, spec))
}

fn from_object(value: Value) -> anyhow::Result<SandboxSpec> {
    let (mut metadata, mut spec) = split_object(value, KIND)?;
    for f in ["name", "labels", "annotations"] {
        if spec.contains_key(f) {
            bail!("spec.{f}: belongs in metadata.{f}");
        }
        if let Some(v) = metadata.remove(f) {
            spec.insert(f.into(), v);
        }
    }
    // Output-only metadata is accepted so `get -o yaml | apply -f -` works.
    for f in ["uid", "creationTimestamp", "resourceVersion"] {
        metadata.remove(f);
    }
    if let Some(extra) = metadata.keys().next() {
        bail!("metadata.{extra}: unknown field (expected name, labels, annotations)");
    }
    if !spec.contains_key("name") {
        bail!("metadata.name: missing");
    }
    serde_path_to_error::deserialize::<_, SandboxSpec>(Value::Object(spec)).map_err(|e| {
        let path = e.path().to_string();
        let place = match path.as_str() {
            "name" | "labels" | "annotations" => format!("metadata.{path}"),
            p if p.starts_with("labels.") || p.starts_with("annotations.") => {
                format!("metadata.{p}")
            }
            "." => "spec".to_string(),
            p => format!("spec.{p}"),
        };
        anyhow::anyhow!("{place}: {}", e.into_inner())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_multi_document_file() {
        let text = "apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata:\n  name: a\n  labels: {app: web}\n\
                    spec:\n  resources:\n    limits: {cpu: 500m, memory: 1Gi, pids: 100}\n---\n\
                    apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {name: b}\n---\n";
        let specs = from_documents(text, "f.yaml").expect("parses");
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].name, "a");
        assert_eq!(specs[0].labels["app"], "web");
        assert_eq!(specs[0].resources.limits.cpu.as_deref(), Some("500m"));
        assert_eq!(specs[0].resources.limits.pids.as_deref(), Some("100"));
        assert_eq!(specs[1].name, "b");
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let cases = [
            (
                "apiVersion: v1\nkind: Sandbox\nmetadata: {name: a}\n",
                "apiVersion",
            ),
            (
                "apiVersion: warren.dev/v1\nkind: Pod\nmetadata: {name: a}\n",
                "kind",
            ),
            (
                "apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {}\n",
                "metadata.name",
            ),
            (
                "apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {name: a}\nspec: {imagee: x}\n",
                "spec.imagee: unknown field `imagee`",
            ),
            (
                "apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {name: a}\nspec: {resources: {limits: {cpuu: 1}}}\n",
                "spec.resources.limits.cpuu: unknown field `cpuu`",
            ),
            (
                "apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {name: a, owner: me}\n",
                "metadata.owner",
            ),
            ("- a\n- b\n", "expected an object"),
            ("", "no Sandbox objects"),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", from_documents(text, "f.yaml").expect_err(want));
            assert!(e.contains(want), "{want:?} not in {e:?}");
            if !text.is_empty() {
                assert!(e.starts_with("f.yaml, document 1"), "{e}");
            }
        }
    }

    #[test]
    fn get_output_applies_back() {
        let mut spec = SandboxSpec {
            name: "w".into(),
            ..Default::default()
        };
        spec.labels.insert("app".into(), "web".into());
        spec.resources.limits.memory = Some("1Gi".into());
        let sb = v1::Sandbox {
            id: "abc".into(),
            spec: Some(warren_proto::spec_to_pb(&spec)),
            status: Some(v1::SandboxStatus {
                phase: "Running".into(),
                ..Default::default()
            }),
            revision: 3,
            created_at_ms: 1_700_000_000_000,
            updated_at_ms: 1_700_000_000_000,
        };
        let obj = to_object(&sb).expect("object");
        assert_eq!(obj["metadata"]["creationTimestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(obj["status"]["resources"]["cpu_limit"], Value::Null);
        let yaml = yaml_serde::to_string(&obj).expect("yaml");
        let back = from_documents(&yaml, "get").expect("applies back");
        assert_eq!(back, vec![spec]);
    }
}
