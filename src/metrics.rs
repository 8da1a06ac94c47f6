//! Prometheus metrics: the lease state, renewals, fences, handovers and
//! takeovers of every volume, rendered in the text exposition format for
//! `GET /metrics`. docs/METRICS.md lists every series and example alerts.
//!
//! Invariants:
//! - Each [`Metrics`] owns its own [`prometheus::Registry`]; nothing is put in
//!   the global default registry, so tests and several daemons in one process
//!   never see each other's series.
//! - Names follow Prometheus conventions: the `blockfence_` prefix, base units
//!   (`_seconds`), `_total` on counters, an `_info` gauge for build data. The
//!   only labels are `volume`, `state`, `reason` and `result`, all of small
//!   cardinality.
//! - Ages are computed at scrape time from a monotonic [`Instant`], never from
//!   the wall clock.
//!
//! This module records what it is told; it must not read lease state, do I/O
//! or decide anything. Recording never fails and never blocks for long (short
//! mutexes only).

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Buckets of `blockfence_renewal_latency_seconds`: 1 ms to 5 s.
pub const RENEWAL_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Buckets of `blockfence_fence_duration_seconds`: 10 ms to 1 min.
pub const FENCE_DURATION_BUCKETS: &[f64] =
    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Buckets of `blockfence_handover_duration_seconds`: 100 ms to 2 min.
pub const HANDOVER_DURATION_BUCKETS: &[f64] =
    &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Buckets of `blockfence_takeover_duration_seconds`: 1 s to 5 min (a
/// takeover after a crash waits out the previous holder's lease).
pub const TAKEOVER_DURATION_BUCKETS: &[f64] =
    &[1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 180.0, 300.0];

/// The lease state of a volume as this node sees it; exported one-hot as
/// `blockfence_lease_state{volume, state}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Nobody holds the lease.
    Free,
    /// This node wants the lease and waits for it.
    Waiting,
    /// This node holds the lease.
    Held,
    /// This node is giving the lease up.
    Releasing,
    /// This node held the lease and lost it (renewals failed or were late).
    Lost,
    /// This node is fencing its use of the volume.
    Fencing,
    /// The fence has completed.
    Fenced,
}

impl LeaseState {
    /// Every state, in the order of the enum.
    pub const ALL: [LeaseState; 7] = [
        LeaseState::Free,
        LeaseState::Waiting,
        LeaseState::Held,
        LeaseState::Releasing,
        LeaseState::Lost,
        LeaseState::Fencing,
        LeaseState::Fenced,
    ];

    /// The value of the `state` label.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Free => "free",
            LeaseState::Waiting => "waiting",
            LeaseState::Held => "held",
            LeaseState::Releasing => "releasing",
            LeaseState::Lost => "lost",
            LeaseState::Fencing => "fencing",
            LeaseState::Fenced => "fenced",
        }
    }
}

/// The daemon's metrics. Cheap to clone (one `Arc`); `Send + Sync`.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    lease_state: IntGaugeVec,
    lease_generation: IntGaugeVec,
    renewals: IntCounterVec,
    renewal_failures: IntCounterVec,
    renewal_latency: HistogramVec,
    since_last_renewal: GaugeVec,
    fences: IntCounterVec,
    fence_duration: HistogramVec,
    handover_duration: HistogramVec,
    takeover_duration: HistogramVec,
    sessions: IntGaugeVec,
    io_reads: IntCounterVec,
    io_blocks_read: IntCounterVec,
    io_writes: IntCounterVec,
    /// Per volume: when its last renewal succeeded (monotonic).
    last_renewal: Mutex<BTreeMap<String, Instant>>,
    /// Per volume: the fence reasons seen, so that [`Metrics::remove_volume`]
    /// can drop their series.
    fence_reasons: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

/// The values of the `result` label of `blockfence_fences_total`.
const FENCE_RESULTS: [&str; 2] = ["ok", "failed"];

const EXPECT_REGISTER: &str =
    "metric names, labels and buckets are constants of this module, valid and distinct";

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect(EXPECT_REGISTER);
    c
}

fn int_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect(EXPECT_REGISTER),
    )
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect(EXPECT_REGISTER),
    )
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> HistogramVec {
    register(
        registry,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            &["volume"],
        )
        .expect(EXPECT_REGISTER),
    )
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// A fresh registry with every metric registered, including
    /// `blockfence_build_info{version} 1`.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let build_info = int_gauge(
            &r,
            "blockfence_build_info",
            "Always 1; the version label says which blockfence runs.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let inner = Inner {
            lease_state: int_gauge(
                &r,
                "blockfence_lease_state",
                "1 for the volume's current lease state on this node, 0 for the others.",
                &["volume", "state"],
            ),
            lease_generation: int_gauge(
                &r,
                "blockfence_lease_generation",
                "The lease generation last seen for the volume (grows with every new holder).",
                &["volume"],
            ),
            renewals: counter(
                &r,
                "blockfence_renewals_total",
                "Successful lease renewals by this node.",
                &["volume"],
            ),
            renewal_failures: counter(
                &r,
                "blockfence_renewal_failures_total",
                "Lease renewals by this node that failed or missed their deadline.",
                &["volume"],
            ),
            renewal_latency: histogram(
                &r,
                "blockfence_renewal_latency_seconds",
                "Time a successful renewal took, from its start to the write being durable.",
                RENEWAL_LATENCY_BUCKETS,
            ),
            since_last_renewal: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "blockfence_seconds_since_last_renewal",
                        "Seconds since this node's last successful renewal (monotonic clock, at scrape time).",
                    ),
                    &["volume"],
                )
                .expect(EXPECT_REGISTER),
            ),
            fences: counter(
                &r,
                "blockfence_fences_total",
                "Fences this node carried out, by reason and result (ok or failed).",
                &["volume", "reason", "result"],
            ),
            fence_duration: histogram(
                &r,
                "blockfence_fence_duration_seconds",
                "Time from the start of a fence to its end.",
                FENCE_DURATION_BUCKETS,
            ),
            handover_duration: histogram(
                &r,
                "blockfence_handover_duration_seconds",
                "Time a planned handover took, from the request to the lease being passed on.",
                HANDOVER_DURATION_BUCKETS,
            ),
            takeover_duration: histogram(
                &r,
                "blockfence_takeover_duration_seconds",
                "Time this node took to take over a lease another node held, from the decision to wait to holding it.",
                TAKEOVER_DURATION_BUCKETS,
            ),
            sessions: int_gauge(
                &r,
                "blockfence_sessions",
                "Open API sessions (grants) for the volume on this node.",
                &["volume"],
            ),
            io_reads: counter(
                &r,
                "blockfence_lease_io_reads_total",
                "Read requests issued to the volume's lease area.",
                &["volume"],
            ),
            io_blocks_read: counter(
                &r,
                "blockfence_lease_io_blocks_read_total",
                "Blocks read from the volume's lease area.",
                &["volume"],
            ),
            io_writes: counter(
                &r,
                "blockfence_lease_io_writes_total",
                "Write requests issued to the volume's lease area.",
                &["volume"],
            ),
            last_renewal: Mutex::new(BTreeMap::new()),
            fence_reasons: Mutex::new(BTreeMap::new()),
            registry: r,
        };
        Metrics {
            inner: Arc::new(inner),
        }
    }

    /// The registry, to add metrics of other parts or gather directly.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Set the volume's lease state: its `state` series is 1, the others 0.
    pub fn set_state(&self, volume: &str, state: LeaseState) {
        for s in LeaseState::ALL {
            self.inner
                .lease_state
                .with_label_values(&[volume, s.as_str()])
                .set(i64::from(s == state));
        }
    }

    /// Set the volume's lease generation.
    pub fn set_generation(&self, volume: &str, generation: u64) {
        self.inner
            .lease_generation
            .with_label_values(&[volume])
            .set(saturating_i64(generation));
    }

    /// Count a successful renewal and record its latency. (Call
    /// [`Metrics::renewed_now`] too, with when it completed.)
    pub fn renewal(&self, volume: &str, latency: Duration) {
        self.inner.renewals.with_label_values(&[volume]).inc();
        self.inner
            .renewal_latency
            .with_label_values(&[volume])
            .observe(latency.as_secs_f64());
    }

    /// Count a renewal that failed or missed its deadline.
    pub fn renewal_failed(&self, volume: &str) {
        self.inner
            .renewal_failures
            .with_label_values(&[volume])
            .inc();
    }

    /// Note when the volume's last successful renewal completed, on the
    /// monotonic clock; `blockfence_seconds_since_last_renewal` is computed
    /// from it at scrape time. (A `tokio::time::Instant` converts with
    /// `into_std()`.)
    pub fn renewed_now(&self, volume: &str, at: Instant) {
        lock(&self.inner.last_renewal).insert(volume.to_string(), at);
    }

    /// Count a fence (`ok` false when a step failed or was late) and record
    /// how long it took.
    pub fn fence(&self, volume: &str, reason: &str, ok: bool, duration: Duration) {
        lock(&self.inner.fence_reasons)
            .entry(volume.to_string())
            .or_default()
            .insert(reason.to_string());
        let result = if ok {
            FENCE_RESULTS[0]
        } else {
            FENCE_RESULTS[1]
        };
        self.inner
            .fences
            .with_label_values(&[volume, reason, result])
            .inc();
        self.inner
            .fence_duration
            .with_label_values(&[volume])
            .observe(duration.as_secs_f64());
    }

    /// Record how long a planned handover took.
    pub fn handover(&self, volume: &str, duration: Duration) {
        self.inner
            .handover_duration
            .with_label_values(&[volume])
            .observe(duration.as_secs_f64());
    }

    /// Record how long a takeover took.
    pub fn takeover(&self, volume: &str, duration: Duration) {
        self.inner
            .takeover_duration
            .with_label_values(&[volume])
            .observe(duration.as_secs_f64());
    }

    /// Set the number of open API sessions for the volume.
    pub fn set_sessions(&self, volume: &str, n: usize) {
        self.inner
            .sessions
            .with_label_values(&[volume])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Add lease-area I/O done since the last call (deltas, not totals).
    pub fn lease_io(&self, volume: &str, reads: u64, blocks_read: u64, writes: u64) {
        let i = &self.inner;
        i.io_reads.with_label_values(&[volume]).inc_by(reads);
        i.io_blocks_read
            .with_label_values(&[volume])
            .inc_by(blocks_read);
        i.io_writes.with_label_values(&[volume]).inc_by(writes);
    }

    /// The volume went away: drop every series labelled with it.
    pub fn remove_volume(&self, volume: &str) {
        let i = &self.inner;
        // Errors here only mean "no such series": nothing to drop.
        for s in LeaseState::ALL {
            let _ = i.lease_state.remove_label_values(&[volume, s.as_str()]);
        }
        for vec in [
            &i.renewals,
            &i.renewal_failures,
            &i.io_reads,
            &i.io_blocks_read,
            &i.io_writes,
        ] {
            let _ = vec.remove_label_values(&[volume]);
        }
        for vec in [&i.lease_generation, &i.sessions] {
            let _ = vec.remove_label_values(&[volume]);
        }
        for vec in [
            &i.renewal_latency,
            &i.fence_duration,
            &i.handover_duration,
            &i.takeover_duration,
        ] {
            let _ = vec.remove_label_values(&[volume]);
        }
        let _ = i.since_last_renewal.remove_label_values(&[volume]);
        lock(&i.last_renewal).remove(volume);
        if let Some(reasons) = lock(&i.fence_reasons).remove(volume) {
            for reason in &reasons {
                for result in FENCE_RESULTS {
                    let _ = i.fences.remove_label_values(&[volume, reason, result]);
                }
            }
        }
    }

    /// Everything, in the Prometheus text format, as of now.
    pub fn render(&self) -> String {
        self.render_at(Instant::now())
    }

    /// Everything, in the Prometheus text format, with ages computed as of
    /// `now` (for tests; [`Metrics::render`] passes the current instant).
    pub fn render_at(&self, now: Instant) -> String {
        for (volume, at) in lock(&self.inner.last_renewal).iter() {
            self.inner
                .since_last_renewal
                .with_label_values(&[volume])
                .set(now.saturating_duration_since(*at).as_secs_f64());
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.inner.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding the metrics failed");
            return format!("# blockfence: encoding the metrics failed: {e}\n");
        }
        String::from_utf8(out).unwrap_or_else(|e| {
            tracing::error!(error = %e, "the metrics text is not UTF-8");
            format!("# blockfence: the metrics text is not UTF-8: {e}\n")
        })
    }
}

/// Lock a mutex; a panic elsewhere while it was held leaves plain data that is
/// still fine to use.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the one series `name{labels}` in `text`, where `labels` is
    /// the exact label set as rendered (sorted by name).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            (s == series).then(|| v.parse().expect("a number"))
        })
    }

    #[test]
    fn build_info_is_one_with_the_version() {
        let text = Metrics::new().render();
        let series = format!(
            "blockfence_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(value(&text, &series), Some(1.0), "{text}");
        assert!(text.contains("# TYPE blockfence_build_info gauge"));
    }

    #[test]
    fn every_recorded_value_is_rendered() {
        let m = Metrics::new();
        let v = "vol-a";
        m.set_state(v, LeaseState::Waiting);
        m.set_state(v, LeaseState::Held);
        m.set_generation(v, 7);
        m.renewal(v, Duration::from_millis(3));
        m.renewal(v, Duration::from_millis(30));
        m.renewal_failed(v);
        let t0 = Instant::now();
        m.renewed_now(v, t0);
        m.fence(v, "lease_lost", true, Duration::from_millis(200));
        m.fence(v, "lease_lost", false, Duration::from_secs(20));
        m.handover(v, Duration::from_secs(2));
        m.takeover(v, Duration::from_secs(40));
        m.set_sessions(v, 2);
        m.lease_io(v, 3, 24, 1);
        m.lease_io(v, 2, 16, 1);
        let text = m.render_at(t0 + Duration::from_millis(1500));

        let expect = [
            (
                r#"blockfence_lease_state{state="held",volume="vol-a"}"#,
                1.0,
            ),
            (
                r#"blockfence_lease_state{state="waiting",volume="vol-a"}"#,
                0.0,
            ),
            (
                r#"blockfence_lease_state{state="fenced",volume="vol-a"}"#,
                0.0,
            ),
            (r#"blockfence_lease_generation{volume="vol-a"}"#, 7.0),
            (r#"blockfence_renewals_total{volume="vol-a"}"#, 2.0),
            (r#"blockfence_renewal_failures_total{volume="vol-a"}"#, 1.0),
            (
                r#"blockfence_renewal_latency_seconds_bucket{volume="vol-a",le="0.005"}"#,
                1.0,
            ),
            (
                r#"blockfence_renewal_latency_seconds_bucket{volume="vol-a",le="0.05"}"#,
                2.0,
            ),
            (
                r#"blockfence_renewal_latency_seconds_count{volume="vol-a"}"#,
                2.0,
            ),
            (
                r#"blockfence_seconds_since_last_renewal{volume="vol-a"}"#,
                1.5,
            ),
            (
                r#"blockfence_fences_total{reason="lease_lost",result="ok",volume="vol-a"}"#,
                1.0,
            ),
            (
                r#"blockfence_fences_total{reason="lease_lost",result="failed",volume="vol-a"}"#,
                1.0,
            ),
            (
                r#"blockfence_fence_duration_seconds_count{volume="vol-a"}"#,
                2.0,
            ),
            (
                r#"blockfence_handover_duration_seconds_sum{volume="vol-a"}"#,
                2.0,
            ),
            (
                r#"blockfence_takeover_duration_seconds_bucket{volume="vol-a",le="60"}"#,
                1.0,
            ),
            (r#"blockfence_sessions{volume="vol-a"}"#, 2.0),
            (r#"blockfence_lease_io_reads_total{volume="vol-a"}"#, 5.0),
            (
                r#"blockfence_lease_io_blocks_read_total{volume="vol-a"}"#,
                40.0,
            ),
            (r#"blockfence_lease_io_writes_total{volume="vol-a"}"#, 2.0),
        ];
        for (series, want) in expect {
            assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
        }
        for (name, kind) in [
            ("blockfence_renewals_total", "counter"),
            ("blockfence_renewal_latency_seconds", "histogram"),
            ("blockfence_lease_state", "gauge"),
        ] {
            assert!(text.contains(&format!("# TYPE {name} {kind}")), "{name}");
        }
    }

    #[test]
    fn seconds_since_last_renewal_is_computed_at_scrape_time() {
        let m = Metrics::new();
        let t0 = Instant::now();
        m.renewed_now("v", t0);
        let series = r#"blockfence_seconds_since_last_renewal{volume="v"}"#;
        assert_eq!(value(&m.render_at(t0), series), Some(0.0));
        let later = t0 + Duration::from_secs(4);
        assert_eq!(value(&m.render_at(later), series), Some(4.0));
        // A newer renewal resets it.
        m.renewed_now("v", later);
        assert_eq!(value(&m.render_at(later), series), Some(0.0));
    }

    #[test]
    fn remove_volume_drops_its_series_and_keeps_the_others() {
        let m = Metrics::new();
        for v in ["gone", "kept"] {
            m.set_state(v, LeaseState::Held);
            m.set_generation(v, 1);
            m.renewal(v, Duration::from_millis(2));
            m.renewal_failed(v);
            m.renewed_now(v, Instant::now());
            m.fence(v, "shutdown", true, Duration::from_millis(5));
            m.handover(v, Duration::from_secs(1));
            m.takeover(v, Duration::from_secs(1));
            m.set_sessions(v, 1);
            m.lease_io(v, 1, 1, 1);
        }
        let before = m.render();
        assert!(before.contains(r#"volume="gone""#));
        m.remove_volume("gone");
        let after = m.render();
        assert!(!after.contains(r#""gone""#), "{after}");
        assert_eq!(
            value(&after, r#"blockfence_renewals_total{volume="kept"}"#),
            Some(1.0)
        );
        assert_eq!(
            value(
                &after,
                r#"blockfence_fences_total{reason="shutdown",result="ok",volume="kept"}"#
            ),
            Some(1.0)
        );
        // Removing an unknown volume is harmless.
        m.remove_volume("never-seen");
    }

    #[test]
    fn registries_are_independent() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.renewal_failed("v");
        assert!(a.render().contains("blockfence_renewal_failures_total{"));
        assert!(!b.render().contains("blockfence_renewal_failures_total{"));
    }

    #[test]
    fn huge_generations_saturate() {
        let m = Metrics::new();
        m.set_generation("v", u64::MAX);
        assert_eq!(
            value(&m.render(), r#"blockfence_lease_generation{volume="v"}"#),
            Some(i64::MAX as f64)
        );
    }
}
