//! Resources: what a user asks for ([`ResourceRequirements`]), what a sandbox gets
//! ([`ResourceInfo`], the seed's resource JSON), and the extraction that merges CRI annotations,
//! OCI `linux.resources` and the spec into it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxPids, LinuxResources};
use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::quantity::{
    MAX_CPU_CORES, QuantityError, format_bytes, format_cpu, parse_bandwidth, parse_bytes,
    parse_count, parse_cpu_millis,
};

/// CRI annotation: CPU limit, a quantity in cores ("2", "500m").
pub const ANNOTATION_CPU_LIMIT: &str = "resources.limits.cpu";
/// CRI annotation: memory limit in bytes ("2Gi").
pub const ANNOTATION_MEMORY_LIMIT: &str = "resources.limits.memory";
/// CRI annotation: CPU request in cores.
pub const ANNOTATION_CPU_REQUEST: &str = "resources.requests.cpu";
/// CRI annotation: memory request in bytes.
pub const ANNOTATION_MEMORY_REQUEST: &str = "resources.requests.memory";
/// CRI annotation: PID limit, a whole number ("1000").
pub const ANNOTATION_PID_LIMIT: &str = "resources.limits.pid";
/// CRI annotation: storage limit in bytes; wins over [`ANNOTATION_EPHEMERAL_STORAGE_LIMIT`].
pub const ANNOTATION_STORAGE_LIMIT: &str = "resources.limits.storage";
/// CRI annotation: Kubernetes' name for the storage limit, an alias of
/// [`ANNOTATION_STORAGE_LIMIT`].
pub const ANNOTATION_EPHEMERAL_STORAGE_LIMIT: &str = "resources.limits.ephemeral-storage";
/// CRI annotation: network bandwidth in bits per second, a decimal quantity ("100M").
pub const ANNOTATION_NETWORK_BANDWIDTH: &str = "resources.limits.network-bandwidth";

/// The CPU period [`resources_to_oci`] writes, in microseconds (the kernel's and runc's default).
pub const OCI_CPU_PERIOD: u64 = 100_000;

/// The CFS periods the kernel takes, in microseconds (1 ms to 1 s), and its smallest quota.
const CFS_PERIODS: std::ops::RangeInclusive<u64> = 1_000..=1_000_000;
const CFS_MIN_QUOTA: i64 = 1_000;
/// The CPU shares runc takes (cgroup v1's bounds; v2's weights 1..=10000 map onto them).
const CPU_SHARES: std::ops::RangeInclusive<u64> = 2..=262_144;

/// The resources a sandbox ends up with: the seed's resource JSON, written by every backend.
///
/// CPU in cores, memory and storage in bytes, bandwidth in bits per second, `None` (`null`)
/// when unset. Deserialization is lenient (unknown keys are ignored) so older readers keep
/// working when fields are added.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceInfo {
    pub cpu_limit: Option<f64>,
    pub cpu_request: Option<f64>,
    pub memory_limit: Option<u64>,
    pub memory_request: Option<u64>,
    pub pid_limit: Option<u64>,
    pub storage_limit: Option<u64>,
    pub network_bandwidth: Option<u64>,
}

impl ResourceInfo {
    /// Compact JSON, e.g. `{"cpu_limit":2.0,...,"network_bandwidth":null}`.
    pub fn to_json(&self) -> String {
        self.write_json(false)
    }

    /// The seed's exact form: one key per line, 2-space indent, no trailing newline.
    pub fn to_json_pretty(&self) -> String {
        self.write_json(true)
    }

    /// Written by hand rather than through `serde_json::to_string`, which returns a `Result` that
    /// can never be `Err` here; numbers still go through `serde_json::Number`, so every byte is
    /// what serde_json would write (a test checks that).
    fn write_json(&self, pretty: bool) -> String {
        let float = |v: Option<f64>| v.and_then(serde_json::Number::from_f64);
        let int = |v: Option<u64>| v.map(serde_json::Number::from);
        let fields = [
            ("cpu_limit", float(self.cpu_limit)),
            ("cpu_request", float(self.cpu_request)),
            ("memory_limit", int(self.memory_limit)),
            ("memory_request", int(self.memory_request)),
            ("pid_limit", int(self.pid_limit)),
            ("storage_limit", int(self.storage_limit)),
            ("network_bandwidth", int(self.network_bandwidth)),
        ];
        let (open, sep, colon, close) = if pretty {
            ("{\n  ", ",\n  ", ": ", "\n}")
        } else {
            ("{", ",", ":", "}")
        };
        let mut out = String::with_capacity(256);
        out.push_str(open);
        for (i, (key, value)) in fields.iter().enumerate() {
            if i > 0 {
                out.push_str(sep);
            }
            // Writing to a String cannot fail.
            let _ = match value {
                Some(n) => write!(out, "\"{key}\"{colon}{n}"),
                None => write!(out, "\"{key}\"{colon}null"),
            };
        }
        out.push_str(close);
        out
    }
}

/// Quantities as a user writes them, Kubernetes style: `cpu: 500m`, `memory: 2Gi`.
///
/// Each field accepts a string or a number (`cpu: 2`, `pids: 100`) and keeps it as a string;
/// parsing happens in [`extract_resources`] so the error can name the field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceList {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "quantity"
    )]
    pub cpu: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "quantity"
    )]
    pub memory: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "quantity"
    )]
    pub pids: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "quantity"
    )]
    pub storage: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "quantity"
    )]
    pub network_bandwidth: Option<String>,
}

impl ResourceList {
    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        *self == ResourceList::default()
    }
}

/// Requests (what the sandbox needs, used for placement) and limits (what it may use).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceRequirements {
    #[serde(default, skip_serializing_if = "ResourceList::is_empty")]
    pub requests: ResourceList,
    #[serde(default, skip_serializing_if = "ResourceList::is_empty")]
    pub limits: ResourceList,
}

impl ResourceRequirements {
    /// True when neither requests nor limits are set.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.limits.is_empty()
    }
}

/// Accepts `"2Gi"`, `2`, `0.5` or `null`; numbers keep their shortest decimal form.
pub(crate) fn quantity<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(r#"a quantity as a string or a number, e.g. "2Gi", "500m" or 2"#)
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    d.deserialize_any(Visitor)
}

/// A merged value and the field it came from, for error messages.
struct Sourced<T> {
    value: T,
    field: String,
}

/// Parses every given source of one field and keeps the first in precedence order.
///
/// Lower-precedence sources are still parsed: a typo in the spec should not hide just because
/// an annotation happens to override it today.
struct Field<'a, T> {
    best: Option<Sourced<T>>,
    errors: &'a mut Vec<SpecError>,
}

impl<'a, T> Field<'a, T> {
    fn new(errors: &'a mut Vec<SpecError>) -> Self {
        Field { best: None, errors }
    }

    /// A value read from OCI `linux.resources`, or why it is not one.
    fn oci(&mut self, field: &str, value: Result<Option<T>, SpecError>) {
        match value {
            Ok(value) => self.offer(field, value),
            Err(error) => self.errors.push(error),
        }
    }

    fn offer(&mut self, field: impl Into<String>, value: Option<T>) {
        if let (None, Some(value)) = (&self.best, value) {
            self.best = Some(Sourced {
                value,
                field: field.into(),
            });
        }
    }

    fn parse(
        &mut self,
        field: String,
        raw: Option<&str>,
        parse: fn(&str) -> Result<T, QuantityError>,
    ) {
        let Some(raw) = raw else { return };
        match parse(raw) {
            Ok(value) => self.offer(field, Some(value)),
            Err(error) => self.errors.push(SpecError::quantity(field, error)),
        }
    }

    fn annotation(
        &mut self,
        annotations: &BTreeMap<String, String>,
        key: &str,
        parse: fn(&str) -> Result<T, QuantityError>,
    ) {
        let raw = annotations.get(key).map(String::as_str);
        self.parse(format!("annotations[{key:?}]"), raw, parse);
    }

    fn spec(
        &mut self,
        path: &str,
        raw: &Option<String>,
        parse: fn(&str) -> Result<T, QuantityError>,
    ) {
        self.parse(format!("spec.resources.{path}"), raw.as_deref(), parse);
    }
}

/// Merges resources from all sources into a [`ResourceInfo`].
///
/// Per field, the first source that sets it wins: CRI annotation, then OCI `linux.resources`,
/// then the spec. All given values are validated, including overridden ones. After merging, a
/// request above its limit is an error (unless both come from OCI, where shares are only a
/// weight), as is a PID limit of 0.
pub fn extract_resources(
    annotations: &BTreeMap<String, String>,
    oci: Option<&LinuxResources>,
    spec: &ResourceRequirements,
) -> Result<ResourceInfo, SpecError> {
    let mut errors = Vec::new();
    let info = extract_resources_into(annotations, oci, spec, &mut errors);
    match errors.into_iter().next() {
        Some(error) => Err(error),
        None => Ok(info),
    }
}

/// [`extract_resources`] that reports every error instead of the first.
pub(crate) fn extract_resources_into(
    annotations: &BTreeMap<String, String>,
    oci: Option<&LinuxResources>,
    spec: &ResourceRequirements,
    errors: &mut Vec<SpecError>,
) -> ResourceInfo {
    let oci_cpu = oci.and_then(|r| r.cpu().as_ref());
    let oci_memory = oci.and_then(|r| r.memory().as_ref());
    let oci_pids = oci.and_then(|r| r.pids().as_ref());
    let (limits, requests) = (&spec.limits, &spec.requests);

    let mut f = Field::new(errors);
    f.annotation(annotations, ANNOTATION_CPU_LIMIT, parse_cpu_millis);
    f.oci(
        "linux.resources.cpu.quota",
        oci_cpu.map_or(Ok(None), oci_cpu_limit_millis),
    );
    f.spec("limits.cpu", &limits.cpu, parse_cpu_millis);
    let cpu_limit = f.best;

    let mut f = Field::new(errors);
    f.annotation(annotations, ANNOTATION_CPU_REQUEST, parse_cpu_millis);
    f.oci(
        "linux.resources.cpu.shares",
        oci_cpu.map_or(Ok(None), oci_cpu_request_millis),
    );
    f.spec("requests.cpu", &requests.cpu, parse_cpu_millis);
    let cpu_request = f.best;

    let mut f = Field::new(errors);
    f.annotation(annotations, ANNOTATION_MEMORY_LIMIT, parse_bytes);
    let field = "linux.resources.memory.limit";
    let limit = oci_memory.map_or(Ok(None), |m| oci_bytes(field, m.limit(), "no limit"));
    f.oci(field, limit);
    f.spec("limits.memory", &limits.memory, parse_bytes);
    let memory_limit = f.best;

    let mut f = Field::new(errors);
    f.annotation(annotations, ANNOTATION_MEMORY_REQUEST, parse_bytes);
    let field = "linux.resources.memory.reservation";
    let reservation = oci_memory.map_or(Ok(None), |m| oci_bytes(field, m.reservation(), "none"));
    f.oci(field, reservation);
    f.spec("requests.memory", &requests.memory, parse_bytes);
    let memory_request = f.best;

    let mut f = Field::new(errors);
    f.annotation(annotations, ANNOTATION_PID_LIMIT, parse_count);
    f.offer(
        "linux.resources.pids.limit",
        oci_pids.and_then(|p| positive(Some(p.limit()))),
    );
    f.spec("limits.pids", &limits.pids, parse_count);
    let pid_limit = f.best;

    let mut f = Field::new(errors);
    f.annotation(annotations, ANNOTATION_STORAGE_LIMIT, parse_bytes);
    f.annotation(annotations, ANNOTATION_EPHEMERAL_STORAGE_LIMIT, parse_bytes);
    f.spec("limits.storage", &limits.storage, parse_bytes);
    let storage_limit = f.best;

    let mut f = Field::new(errors);
    f.annotation(annotations, ANNOTATION_NETWORK_BANDWIDTH, parse_bandwidth);
    f.spec(
        "limits.networkBandwidth",
        &limits.network_bandwidth,
        parse_bandwidth,
    );
    let network_bandwidth = f.best;

    if let Some(Sourced { value: 0, field }) = &pid_limit {
        errors.push(SpecError::invalid(
            field,
            "0",
            "must be at least 1: no process could start",
        ));
    }
    check_request(errors, &cpu_request, &cpu_limit, |m| {
        format_cpu(m as f64 / 1000.0)
    });
    check_request(errors, &memory_request, &memory_limit, format_bytes);

    let cores = |s: Option<Sourced<u64>>| s.map(|s| s.value as f64 / 1000.0);
    let value = |s: Option<Sourced<u64>>| s.map(|s| s.value);
    ResourceInfo {
        cpu_limit: cores(cpu_limit),
        cpu_request: cores(cpu_request),
        memory_limit: value(memory_limit),
        memory_request: value(memory_request),
        pid_limit: value(pid_limit),
        storage_limit: value(storage_limit),
        network_bandwidth: value(network_bandwidth),
    }
}

fn check_request(
    errors: &mut Vec<SpecError>,
    request: &Option<Sourced<u64>>,
    limit: &Option<Sourced<u64>>,
    format: fn(u64) -> String,
) {
    let from_oci = |s: &Sourced<u64>| s.field.starts_with("linux.");
    if let (Some(request), Some(limit)) = (request, limit)
        && request.value > limit.value
        // OCI shares are a relative weight, not a request: runc accepts any pair, and so must a
        // caller such as containerd that hands us both.
        && !(from_oci(request) && from_oci(limit))
    {
        errors.push(SpecError::RequestExceedsLimit {
            field: request.field.clone(),
            request: format(request.value),
            limit: format(limit.value),
            limit_field: limit.field.clone(),
        });
    }
}

/// The pids limit as runc reads it: 0 is unset and any negative value is no limit.
fn positive(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok()).filter(|&v| v > 0)
}

/// A memory limit or reservation as runc reads it: 0 is unset and -1 is none ("max"); the
/// kernel refuses other negative values, so they are errors rather than nothing.
fn oci_bytes(field: &str, v: Option<i64>, minus_one: &str) -> Result<Option<u64>, SpecError> {
    match v {
        None | Some(0 | -1) => Ok(None),
        Some(v) => u64::try_from(v).map(Some).map_err(|_| {
            let reason = format!("is not a byte count (-1 means {minus_one})");
            SpecError::invalid(field, &v.to_string(), reason)
        }),
    }
}

/// quota/period in millicores, rounded up like every other CPU value.
///
/// As runc and the kernel read them: a quota of 0 is unset and any negative one is no limit; a
/// quota without a period (or with 0) runs under the cgroup's period, the kernel's default
/// [`OCI_CPU_PERIOD`], since runc writes the quota alone. A period or quota the kernel would
/// refuse is an error, as is a limit above [`MAX_CPU_CORES`].
fn oci_cpu_limit_millis(cpu: &LinuxCpu) -> Result<Option<u64>, SpecError> {
    let period = match cpu.period() {
        None | Some(0) => OCI_CPU_PERIOD,
        Some(p) if CFS_PERIODS.contains(&p) => p,
        Some(p) => {
            return Err(SpecError::invalid(
                "linux.resources.cpu.period",
                &p.to_string(),
                "is not a CFS period (expected 1000 to 1000000 µs, or 0 for the default)",
            ));
        }
    };
    let field = "linux.resources.cpu.quota";
    let quota = match cpu.quota() {
        None => return Ok(None),
        Some(q) if q <= 0 => return Ok(None),
        Some(q) if q < CFS_MIN_QUOTA => {
            return Err(SpecError::invalid(
                field,
                &q.to_string(),
                "is below the kernel's minimum of 1000 µs (-1 or 0 means no limit)",
            ));
        }
        Some(q) => q.unsigned_abs(),
    };
    let millis = (u128::from(quota) * 1000).div_ceil(u128::from(period));
    match u64::try_from(millis) {
        Ok(m) if m <= MAX_CPU_CORES * 1000 => Ok(Some(m)),
        _ => Err(SpecError::invalid(
            field,
            &quota.to_string(),
            format!("over a period of {period} µs is more than {MAX_CPU_CORES} cores"),
        )),
    }
}

/// shares/1024 in millicores, rounded up: the kubelet writes `floor(millis * 1024 / 1000)`
/// shares, and rounding up recovers its millicores exactly. 0 is unset; runc refuses shares
/// outside 2..=262144 (cgroup v1 reads them back, v2 has no weight for them).
fn oci_cpu_request_millis(cpu: &LinuxCpu) -> Result<Option<u64>, SpecError> {
    let shares = match cpu.shares() {
        None | Some(0) => return Ok(None),
        Some(s) if CPU_SHARES.contains(&s) => s,
        Some(s) => {
            return Err(SpecError::invalid(
                "linux.resources.cpu.shares",
                &s.to_string(),
                "is not a CPU weight runc accepts (expected 2 to 262144, or 0 for none)",
            ));
        }
    };
    Ok(Some((shares * 1000).div_ceil(1024)))
}

/// The inverse of the OCI part of [`extract_resources`], for backends that apply cgroups.
///
/// Follows the kubelet: quota = millicores × period / 1000 with a period of
/// [`OCI_CPU_PERIOD`] and at least 1000µs (the kernel's minimum); shares = millicores × 1024 /
/// 1000 clamped to 2..=262144. Storage and bandwidth have no OCI field and are left out.
pub fn resources_to_oci(info: &ResourceInfo) -> LinuxResources {
    let millis = |cores: f64| (cores * 1000.0).round() as u64;
    let mut resources = LinuxResources::default();

    let quota = info.cpu_limit.map(millis).filter(|&m| m > 0).map(|m| {
        let quota = m.saturating_mul(OCI_CPU_PERIOD) / 1000;
        i64::try_from(quota).unwrap_or(i64::MAX).max(1000)
    });
    let shares = info
        .cpu_request
        .map(|c| (millis(c).saturating_mul(1024) / 1000).clamp(2, 262_144));
    if quota.is_some() || shares.is_some() {
        let mut cpu = LinuxCpu::default();
        cpu.set_quota(quota);
        cpu.set_period(quota.map(|_| OCI_CPU_PERIOD));
        cpu.set_shares(shares);
        resources.set_cpu(Some(cpu));
    }

    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    if info.memory_limit.is_some() || info.memory_request.is_some() {
        let mut memory = LinuxMemory::default();
        memory.set_limit(info.memory_limit.map(to_i64));
        memory.set_reservation(info.memory_request.map(to_i64));
        resources.set_memory(Some(memory));
    }

    if let Some(pids) = info.pid_limit {
        let mut limit = LinuxPids::default();
        limit.set_limit(to_i64(pids));
        resources.set_pids(Some(limit));
    }
    resources
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
#[path = "resources_tests.rs"]
mod tests;
