//! What a pod and its containers ask for, read from what containerd sends, and what the pod
//! holds in total.
//!
//! A `Create` request says three things about a pod's resources:
//!
//! - its own entry, the pause container's: resource annotations (the request's `annotations`,
//!   the CRI `PodSandboxConfig` in `options`, and the OCI spec in `sandbox.spec`) and the OCI
//!   spec's `linux.resources` (containerd sets `cpu.shares: 2`);
//! - what its containers hold together, declared: the `PodSandboxConfig`'s `linux.resources`,
//!   "the sum of container resources for this sandbox" (CRI), which the kubelet fills in; else
//!   containerd's copy of it in the pause spec's `io.kubernetes.cri.sandbox-*` annotations,
//!   read for a caller that sends the spec without the config (the two are one declaration:
//!   the config wins, and both are checked);
//! - its overhead: the `PodSandboxConfig`'s `linux.overhead` (the RuntimeClass's pod overhead).
//!
//! Containers arrive later through `Update` with `fields = ["extensions.tasks"]`:
//! `sandbox.extensions["tasks"]` holds Kuasar's task list, JSON `{"tasks": [{"task_id": ...,
//! "spec": <OCI spec>, ...}]}`, each spec carrying the container's annotations and
//! `linux.resources`. The pod holds its own entry, its containers (the declaration or their
//! sum, whichever is larger) and its overhead ([`total`]; seeds 000/001: the sandbox accounts
//! for the containers appended to it).
//!
//! Everything here is pure, so the parsing of what containerd sends is unit-tested.

use std::collections::BTreeMap;

use prost::Message as _;
use serde::Deserialize;
use warren_spec::{
    ANNOTATION_CPU_LIMIT, ANNOTATION_CPU_REQUEST, ANNOTATION_EPHEMERAL_STORAGE_LIMIT,
    ANNOTATION_MEMORY_LIMIT, ANNOTATION_MEMORY_REQUEST, ANNOTATION_NETWORK_BANDWIDTH,
    ANNOTATION_PID_LIMIT, ANNOTATION_STORAGE_LIMIT, LinuxResources, ResourceInfo,
    ResourceRequirements, SpecError, extract_resources,
};

use crate::api::services::sandbox::v1::ControllerCreateRequest;
use crate::cri;

/// The key of the task list in `sandbox.extensions`, and the field path naming it.
pub const TASKS_EXTENSION: &str = "tasks";
pub const TASKS_FIELD: &str = "extensions.tasks";

/// Every annotation key that carries a resource: the pod's total replaces them in the warren
/// sandbox, so no container's or pod's own value shadows the sum.
pub const RESOURCE_ANNOTATIONS: [&str; 8] = [
    ANNOTATION_CPU_LIMIT,
    ANNOTATION_CPU_REQUEST,
    ANNOTATION_MEMORY_LIMIT,
    ANNOTATION_MEMORY_REQUEST,
    ANNOTATION_PID_LIMIT,
    ANNOTATION_STORAGE_LIMIT,
    ANNOTATION_EPHEMERAL_STORAGE_LIMIT,
    ANNOTATION_NETWORK_BANDWIDTH,
];

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("options: {type_url:?} does not decode as a CRI runtime.v1.PodSandboxConfig")]
    Options {
        type_url: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{field}: not an OCI runtime spec in JSON")]
    Spec {
        field: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{context}: {source}")]
    Resources {
        context: String,
        #[source]
        source: SpecError,
    },
    #[error(
        "sandbox.extensions[\"tasks\"]: not a task list (expected JSON {{\"tasks\": [{{\"task_id\": ..., \"spec\": {{...}}}}]}})"
    )]
    Tasks(#[source] serde_json::Error),
    #[error("sandbox.extensions[\"tasks\"].tasks[{index}].task_id: must not be empty")]
    EmptyTaskId { index: usize },
    #[error("sandbox.extensions[\"tasks\"].tasks[{index}].task_id: {id:?} appears twice")]
    DuplicateTask { index: usize, id: String },
}

/// The part of an OCI runtime spec that says what a sandbox or container asks for.
#[derive(Debug, Default, Deserialize)]
struct OciSubset {
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    linux: Option<OciLinux>,
}

#[derive(Debug, Default, Deserialize)]
struct OciLinux {
    #[serde(default)]
    resources: Option<LinuxResources>,
}

/// One container of Kuasar's task list; fields other than these are ignored.
#[derive(Debug, Clone, Deserialize)]
struct Task {
    #[serde(default)]
    task_id: String,
    #[serde(default)]
    spec: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Tasks {
    #[serde(default)]
    tasks: Vec<Task>,
}

/// What a pod's `Create` asks for, and the annotations it keeps (all but the resource keys).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pod {
    pub annotations: BTreeMap<String, String>,
    /// The pod's own entry: the pause container's.
    pub resources: ResourceInfo,
    /// What its containers hold together, as the CRI pod-level `linux.resources` declares it;
    /// `None` when nothing was declared.
    pub declared: Option<ResourceInfo>,
    /// The CRI `linux.overhead`, held on top of everything else.
    pub overhead: ResourceInfo,
}

fn parse_oci(field: &str, bytes: &[u8]) -> Result<OciSubset, ResourceError> {
    if bytes.is_empty() {
        return Ok(OciSubset::default());
    }
    serde_json::from_slice(bytes).map_err(|source| ResourceError::Spec {
        field: field.to_string(),
        source,
    })
}

fn extract(
    context: &str,
    annotations: &BTreeMap<String, String>,
    oci: Option<&LinuxResources>,
) -> Result<ResourceInfo, ResourceError> {
    extract_resources(annotations, oci, &ResourceRequirements::default())
        .map_err(in_context(context))
}

fn in_context(context: &str) -> impl Fn(SpecError) -> ResourceError + '_ {
    move |source| ResourceError::Resources {
        context: context.to_string(),
        source,
    }
}

/// What a `Create` request asks for.
pub fn pod(req: &ControllerCreateRequest) -> Result<Pod, ResourceError> {
    let config = match &req.options {
        Some(any) if any.type_url.ends_with(cri::POD_SANDBOX_CONFIG) => Some(
            cri::PodSandboxConfig::decode(any.value.as_slice()).map_err(|source| {
                ResourceError::Options {
                    type_url: any.type_url.clone(),
                    source,
                }
            })?,
        ),
        _ => None,
    };
    let spec = match req.sandbox.as_ref().and_then(|s| s.spec.as_ref()) {
        Some(any) => parse_oci("sandbox.spec", &any.value)?,
        None => OciSubset::default(),
    };
    // containerd's copy of the pod-level resources is read from the spec it wrote alone: a
    // pod's own annotation of the same key is the pod's, not containerd's.
    let spec_annotations = spec.annotations.unwrap_or_default();
    // Later sources win on a conflict: the spec, then the CRI config, then the request itself.
    let mut annotations = spec_annotations.clone();
    if let Some(c) = &config {
        annotations.extend(c.annotations.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    annotations.extend(req.annotations.iter().map(|(k, v)| (k.clone(), v.clone())));
    let oci = spec.linux.and_then(|l| l.resources);
    let resources = extract("sandbox", &annotations, oci.as_ref())?;

    let linux = config.as_ref().and_then(|c| c.linux.as_ref());
    let cri_field = |part: &'static str| move |f: &str| format!("linux.{part}.{f}");
    let declared = linux
        .and_then(|l| l.resources.as_ref())
        .map(|r| r.info(cri_field("resources")))
        .transpose()
        .map_err(in_context("options"))?;
    let annotated = if declared.is_some() {
        None
    } else {
        cri::annotated_resources(&spec_annotations)
            .and_then(|r| r.map(|r| r.info(cri::annotation_of)).transpose())
            .map_err(in_context("sandbox.spec"))?
    };
    // All zeros (containerd's annotations for an empty message) declare nothing.
    let declared = declared
        .or(annotated)
        .filter(|d| *d != ResourceInfo::default());
    let overhead = linux
        .and_then(|l| l.overhead.as_ref())
        .map(|r| r.info(cri_field("overhead")))
        .transpose()
        .map_err(in_context("options"))?
        .unwrap_or_default();

    annotations.retain(|k, _| {
        !RESOURCE_ANNOTATIONS.contains(&k.as_str())
            && !cri::SANDBOX_RESOURCE_ANNOTATIONS
                .iter()
                .any(|(key, _)| key == k)
    });
    Ok(Pod {
        annotations,
        resources,
        declared,
        overhead,
    })
}

/// Each container of the task list, in order, with what it asks for.
pub fn containers(tasks: &prost_types::Any) -> Result<Vec<(String, ResourceInfo)>, ResourceError> {
    let list: Tasks = serde_json::from_slice(&tasks.value).map_err(ResourceError::Tasks)?;
    let mut out: Vec<(String, ResourceInfo)> = Vec::with_capacity(list.tasks.len());
    for (index, task) in list.tasks.into_iter().enumerate() {
        if task.task_id.is_empty() {
            return Err(ResourceError::EmptyTaskId { index });
        }
        if out.iter().any(|(id, _)| *id == task.task_id) {
            return Err(ResourceError::DuplicateTask {
                index,
                id: task.task_id,
            });
        }
        let context = format!(
            "sandbox.extensions[\"tasks\"].tasks[{index}] (task {:?}).spec",
            task.task_id
        );
        let spec: OciSubset = match task.spec {
            None | Some(serde_json::Value::Null) => OciSubset::default(),
            Some(v) => serde_json::from_value(v).map_err(|source| ResourceError::Spec {
                field: context.clone(),
                source,
            })?,
        };
        let annotations = spec.annotations.unwrap_or_default();
        let oci = spec.linux.and_then(|l| l.resources);
        let resources = extract(&context, &annotations, oci.as_ref())?;
        out.push((task.task_id, resources));
    }
    Ok(out)
}

/// What a pod holds: its own entry, plus its containers, plus its overhead, field by field; a
/// field nobody sets stays unset.
///
/// The containers count as the larger of their sum and the pod's declaration of it, not
/// both: a pod whose containers have not all arrived holds its declared size, and a client
/// that appends more than it declared is not under-counted. Overhead is added as Kubernetes
/// adds it to the pod's cgroup.
///
/// A container without a CPU or memory limit (a Kubernetes Burstable or BestEffort one) can
/// use any amount, so the pod has no such limit either; so does a declaration without one
/// (the kubelet's has a limit when any container has one). The pod's own entry (the pause
/// container's, whose `cpu.shares` containerd sets to 2) and its overhead do not count for
/// this. A request still above its limit comes only from OCI shares (a weight; runc takes
/// any pair) and is counted as the limit: the total is a sandbox's resources, where
/// request ≤ limit holds.
pub fn total<'a>(
    pod: &Pod,
    containers: impl IntoIterator<Item = &'a ResourceInfo>,
) -> ResourceInfo {
    let containers: Vec<&ResourceInfo> = containers.into_iter().collect();
    let mut t = ResourceInfo::default();
    for r in &containers {
        warren_control::plane::add(&mut t, r);
    }
    if let Some(declared) = &pod.declared {
        t = larger(&t, declared);
    }
    warren_control::plane::add(&mut t, &pod.resources);
    warren_control::plane::add(&mut t, &pod.overhead);
    let declared = pod.declared.as_ref();
    let unlimited = |limited: fn(&ResourceInfo) -> bool| {
        containers.iter().any(|r| !limited(r)) || declared.is_some_and(|d| !limited(d))
    };
    if unlimited(|r| r.cpu_limit.is_some()) {
        t.cpu_limit = None;
    }
    if unlimited(|r| r.memory_limit.is_some()) {
        t.memory_limit = None;
    }
    // Sums of millicores in f64 drift ("0.30000000000000004"): keep whole millicores.
    let millis = |c: Option<f64>| c.map(|c| (c * 1000.0).round() / 1000.0);
    t.cpu_limit = millis(t.cpu_limit);
    t.cpu_request = millis(t.cpu_request);
    if let (Some(request), Some(limit)) = (t.cpu_request, t.cpu_limit) {
        t.cpu_request = Some(request.min(limit));
    }
    if let (Some(request), Some(limit)) = (t.memory_request, t.memory_limit) {
        t.memory_request = Some(request.min(limit));
    }
    t
}

/// The larger of `a` and `b`, field by field; a field one of them leaves unset is the other's.
fn larger(a: &ResourceInfo, b: &ResourceInfo) -> ResourceInfo {
    fn max<T: PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b > a { b } else { a }),
            (a, b) => a.or(b),
        }
    }
    ResourceInfo {
        cpu_limit: max(a.cpu_limit, b.cpu_limit),
        cpu_request: max(a.cpu_request, b.cpu_request),
        memory_limit: max(a.memory_limit, b.memory_limit),
        memory_request: max(a.memory_request, b.memory_request),
        pid_limit: max(a.pid_limit, b.pid_limit),
        storage_limit: max(a.storage_limit, b.storage_limit),
        network_bandwidth: max(a.network_bandwidth, b.network_bandwidth),
    }
}

/// `info` as CRI resource annotations, which warren's extraction reads first: the warren
/// sandbox of a pod carries its total this way.
pub fn as_annotations(info: &ResourceInfo) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    let cpu = |c: f64| format!("{}m", (c * 1000.0).round() as u64);
    let mut put = |key: &str, v: Option<String>| {
        if let Some(v) = v {
            a.insert(key.to_string(), v);
        }
    };
    put(ANNOTATION_CPU_LIMIT, info.cpu_limit.map(cpu));
    put(ANNOTATION_CPU_REQUEST, info.cpu_request.map(cpu));
    put(
        ANNOTATION_MEMORY_LIMIT,
        info.memory_limit.map(|v| v.to_string()),
    );
    put(
        ANNOTATION_MEMORY_REQUEST,
        info.memory_request.map(|v| v.to_string()),
    );
    put(ANNOTATION_PID_LIMIT, info.pid_limit.map(|v| v.to_string()));
    put(
        ANNOTATION_STORAGE_LIMIT,
        info.storage_limit.map(|v| v.to_string()),
    );
    put(
        ANNOTATION_NETWORK_BANDWIDTH,
        info.network_bandwidth.map(|v| v.to_string()),
    );
    a
}

#[cfg(test)]
mod tests;
