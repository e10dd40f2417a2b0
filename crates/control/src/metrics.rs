//! Prometheus metrics and health endpoints: `GET /metrics` (text exposition format),
//! `GET /healthz` and `GET /readyz`, served over plain HTTP on their own listener
//! (`warren server --metrics-listen`, default `127.0.0.1:9091`).
//!
//! What is counted, and where:
//! - `warren_sandboxes{backend,phase}`: the registry, read at each scrape;
//! - `warren_create_duration_seconds{backend,mode}`: successful creates, from the request to
//!   the reply (without a `wait`);
//! - `warren_create_errors_total{backend,code}`: refused or failed creates by gRPC code;
//! - `warren_sandbox_ends_total{backend,phase,reason}`: every end a sandbox reaches
//!   (`Exited`, `Stopped`, `Failed` with the first word of its reason: `OOMKilled`,
//!   `Timeout`, `MemoryLimit`, `Trap`, `lost`...);
//! - `warren_deletes_total{backend}`;
//! - `warren_agents_up`: agents that are up (heartbeating, or the in-process one);
//! - `warren_schedule_duration_seconds`: time the scheduler takes to place a sandbox;
//! - `warren_errors_total{reason}`: failures by cause (`no_agent`, `capacity`,
//!   `port_conflict`, `agent_unreachable`, `agent_lost`, `persist`, `recreate_failed`,
//!   `pool_full`);
//! - `warren_recreations_total{backend,cause}`: AutoRecreate re-creates, `lost` or `failed`;
//! - `warren_pool_sandboxes{pool,state}`: per pool, `ready` and `target` pre-warmed
//!   sandboxes and those `in_use`, read at each scrape;
//! - `warren_pool_creates_total{pool,result}`: creates from a pool, `hit` or `miss`.
//!
//! Labels hold only fixed vocabularies (backend, phase, mode, code, reason class), never a
//! sandbox name or anything a workload wrote.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use warren_spec::{BackendKind, Phase};

use crate::plane::ControlPlane;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    backend: String,
    phase: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CreateLabels {
    backend: String,
    mode: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    backend: String,
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    backend: String,
    phase: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecreateLabels {
    backend: String,
    cause: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolCreateLabels {
    pool: String,
    result: String,
}

fn schedule_histogram() -> Histogram {
    // 100 ns to ~0.4 s.
    Histogram::new(exponential_buckets(100e-9, 2.0, 22))
}

fn create_histogram() -> Histogram {
    // 50 µs to ~13 s.
    Histogram::new(exponential_buckets(50e-6, 2.0, 19))
}

/// The server's metrics. Cheap to share; every method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    sandboxes: Family<PhaseLabels, Gauge>,
    creates: Family<CreateLabels, Histogram, fn() -> Histogram>,
    create_errors: Family<ErrorLabels, Counter>,
    ends: Family<EndLabels, Counter>,
    deletes: Family<BackendLabels, Counter>,
    agents_up: Gauge,
    schedule: Histogram,
    errors: Family<ReasonLabels, Counter>,
    recreations: Family<RecreateLabels, Counter>,
    pool_sandboxes: Family<PoolLabels, Gauge>,
    pool_creates: Family<PoolCreateLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let sandboxes = Family::<PhaseLabels, Gauge>::default();
        let creates = Family::<CreateLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            create_histogram,
        );
        let create_errors = Family::<ErrorLabels, Counter>::default();
        let ends = Family::<EndLabels, Counter>::default();
        let deletes = Family::<BackendLabels, Counter>::default();
        let agents_up = Gauge::default();
        let schedule = schedule_histogram();
        let errors = Family::<ReasonLabels, Counter>::default();
        let recreations = Family::<RecreateLabels, Counter>::default();
        let pool_sandboxes = Family::<PoolLabels, Gauge>::default();
        let pool_creates = Family::<PoolCreateLabels, Counter>::default();
        let mut registry = Registry::with_prefix("warren");
        registry.register(
            "sandboxes",
            "Sandboxes in the registry, by backend and phase",
            sandboxes.clone(),
        );
        registry.register(
            "create_duration_seconds",
            "Time from a create request to its reply, successful creates",
            creates.clone(),
        );
        registry.register(
            "create_errors",
            "Creates refused or failed, by gRPC code",
            create_errors.clone(),
        );
        registry.register(
            "sandbox_ends",
            "Sandboxes that ended, by phase and reason class",
            ends.clone(),
        );
        registry.register("deletes", "Sandboxes deleted", deletes.clone());
        registry.register(
            "agents_up",
            "Agents that are up (heartbeating, or in-process)",
            agents_up.clone(),
        );
        registry.register(
            "schedule_duration_seconds",
            "Time the scheduler takes to place a sandbox",
            schedule.clone(),
        );
        registry.register("errors", "Failures by cause", errors.clone());
        registry.register(
            "recreations",
            "Sandboxes AutoRecreate created again, by cause (lost, failed)",
            recreations.clone(),
        );
        registry.register(
            "pool_sandboxes",
            "Sandboxes of each pool: ready and target pre-warmed ones, and those in use",
            pool_sandboxes.clone(),
        );
        registry.register(
            "pool_creates",
            "Creates from a pool, hit (pre-warmed) or miss (cold)",
            pool_creates.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            sandboxes,
            creates,
            create_errors,
            ends,
            deletes,
            agents_up,
            schedule,
            errors,
            recreations,
            pool_sandboxes,
            pool_creates,
        }
    }
}

/// The class of a failure reason: its first word, without trailing punctuation, limited to
/// letters (a reason is free text; a label must stay a small vocabulary).
fn reason_class(reason: &str) -> String {
    let word: String = reason
        .split(|c: char| c.is_whitespace() || c == ':')
        .next()
        .unwrap_or_default()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .take(32)
        .collect();
    if word.is_empty() {
        "unknown".into()
    } else {
        word
    }
}

impl Metrics {
    pub fn create_ok(&self, backend: BackendKind, mode: &str, took: Duration) {
        self.creates
            .get_or_create(&CreateLabels {
                backend: backend.to_string(),
                mode: mode.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn create_failed(&self, backend: BackendKind, code: tonic::Code) {
        self.create_errors
            .get_or_create(&ErrorLabels {
                backend: backend.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// Time the scheduler took to place (or refuse) a sandbox.
    pub fn scheduled(&self, took: Duration) {
        self.schedule.observe(took.as_secs_f64());
    }

    /// A failure of kind `reason` (a fixed word).
    pub fn error(&self, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// An AutoRecreate re-create; `cause` is `lost` or `failed`.
    pub fn recreated(&self, backend: BackendKind, cause: &str) {
        self.recreations
            .get_or_create(&RecreateLabels {
                backend: backend.to_string(),
                cause: cause.to_string(),
            })
            .inc();
    }

    /// A create from a pool, which did (`hit`) or did not take a pre-warmed sandbox.
    pub fn pool_create(&self, pool: &str, hit: bool) {
        self.pool_creates
            .get_or_create(&PoolCreateLabels {
                pool: pool.to_string(),
                result: if hit { "hit" } else { "miss" }.to_string(),
            })
            .inc();
    }

    /// Counts `phase` if it is an end (called for every change of a sandbox).
    pub fn observe(&self, backend: BackendKind, phase: &Phase) {
        let (name, reason) = match phase {
            Phase::Exited { .. } => ("Exited", String::new()),
            Phase::Stopped => ("Stopped", String::new()),
            Phase::Failed { reason } => ("Failed", reason_class(reason)),
            Phase::Expired => ("Expired", String::new()),
            Phase::Deleted => {
                self.deletes
                    .get_or_create(&BackendLabels {
                        backend: backend.to_string(),
                    })
                    .inc();
                return;
            }
            _ => return,
        };
        self.ends
            .get_or_create(&EndLabels {
                backend: backend.to_string(),
                phase: name.into(),
                reason,
            })
            .inc();
    }

    /// The text exposition of every metric, the gauges read from `plane` now.
    pub fn render(&self, plane: &ControlPlane) -> String {
        self.sandboxes.clear();
        for ((backend, phase), n) in plane.count_by_phase() {
            self.sandboxes
                .get_or_create(&PhaseLabels {
                    backend: backend.to_string(),
                    phase,
                })
                .set(n as i64);
        }
        self.agents_up.set(plane.nodes().up_count() as i64);
        self.pool_sandboxes.clear();
        for (pool, st) in plane.pool_sizes() {
            for (state, n) in [
                ("ready", st.ready),
                ("target", st.target),
                ("in_use", st.in_use),
            ] {
                self.pool_sandboxes
                    .get_or_create(&PoolLabels {
                        pool: pool.clone(),
                        state: state.to_string(),
                    })
                    .set(i64::from(n));
            }
        }
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// The HTTP routes: `/metrics`, `/healthz` (the process answers), `/readyz` (recovery is
/// done, which it is whenever this is served, and the store answers).
pub fn router(plane: ControlPlane) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Arc::new(plane))
}

async fn metrics(State(plane): State<Arc<ControlPlane>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        plane.metrics().render(&plane),
    )
}

async fn ready(State(plane): State<Arc<ControlPlane>>) -> impl IntoResponse {
    match plane.store_ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_classes_are_a_small_vocabulary() {
        assert_eq!(reason_class("OOMKilled"), "OOMKilled");
        assert_eq!(reason_class("Trap: wasm `unreachable`"), "Trap");
        assert_eq!(reason_class("lost: the server restarted"), "lost");
        assert_eq!(reason_class("Timeout"), "Timeout");
        assert_eq!(reason_class(""), "unknown");
        assert_eq!(reason_class("\u{1b}[31mred"), "unknown");
        assert_eq!(reason_class(&"x".repeat(100)).len(), 32);
    }
}
