//! Per-model statistics with Triton's fields (read by perf_analyzer around each window).
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// A count and total nanoseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dur {
    /// Number of events.
    pub count: u64,
    /// Summed duration.
    pub ns: u64,
}

impl Dur {
    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.ns += d.as_nanos() as u64;
    }
    fn json(&self) -> Value {
        json!({"count": self.count, "ns": self.ns})
    }
}

/// Compute durations of one execution.
#[derive(Debug, Default, Clone, Copy)]
pub struct ComputeTimes {
    /// Gathering inputs.
    pub input: Duration,
    /// Running the model.
    pub infer: Duration,
    /// Writing outputs.
    pub output: Duration,
}

/// Why a request failed, as Triton's `nv_inference_request_failure{reason=...}` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// Refused by the scheduler: queue full or queue timeout.
    Rejected,
    /// The client went away before it ran.
    Canceled,
    /// The backend returned an error.
    Backend,
    /// Anything else (e.g. the request did not validate).
    Other,
}

impl FailReason {
    /// Every reason, in the order of [`StatsSnapshot::fail_reasons`].
    pub const ALL: [FailReason; 4] = [
        FailReason::Rejected,
        FailReason::Canceled,
        FailReason::Backend,
        FailReason::Other,
    ];

    /// Triton's label value.
    pub fn label(self) -> &'static str {
        match self {
            FailReason::Rejected => "REJECTED",
            FailReason::Canceled => "CANCELED",
            FailReason::Backend => "BACKEND",
            FailReason::Other => "OTHER",
        }
    }
}

/// Upper bounds (ms) of the first-response latency histogram: Triton's default buckets for
/// `nv_inference_first_response_histogram_ms`.
pub const FIRST_RESPONSE_BUCKETS_MS: [f64; 4] = [100.0, 500.0, 2000.0, 5000.0];

/// Time to a request's first response: per-bucket counts (not cumulative; the last slot
/// is above every bound), total count and sum.
#[derive(Debug, Default, Clone)]
pub struct LatencyHistogram {
    /// Observations per bucket of [`FIRST_RESPONSE_BUCKETS_MS`], then the overflow.
    pub buckets: [u64; 5],
    /// Observations.
    pub count: u64,
    /// Their sum in milliseconds.
    pub sum_ms: f64,
}

/// Snapshot of every counter.
#[derive(Debug, Default, Clone)]
pub struct StatsSnapshot {
    pub last_inference_ms: u64,
    pub inference_count: u64,
    pub execution_count: u64,
    pub success: Dur,
    pub fail: Dur,
    /// Failures per [`FailReason`], indexed as [`FailReason::ALL`].
    pub fail_reasons: [u64; 4],
    pub queue: Dur,
    pub compute_input: Dur,
    pub compute_infer: Dur,
    pub compute_output: Dur,
    /// Per batch size: compute input / infer / output.
    pub batch: BTreeMap<u64, [Dur; 3]>,
    /// Time from arrival to the first successful response.
    pub first_response: LatencyHistogram,
    /// Response cache hits and their lookup times.
    pub cache_hit: Dur,
    /// Response cache misses and their lookup plus insertion times.
    pub cache_miss: Dur,
}

/// How many recent successful requests the latency summaries are computed over.
const RECENT_CAPACITY: usize = 2048;

/// How long a request's latencies stay in the summaries (Triton's summaries' max age).
pub const RECENT_MAX_AGE: Duration = Duration::from_secs(600);

/// One successful request's latencies in microseconds: request, queue, compute input,
/// compute infer, compute output.
pub type Latencies = [f64; 5];

/// Thread-safe statistics of one model version.
#[derive(Debug, Default)]
pub struct ModelStats {
    inner: Mutex<Counters>,
}

/// What one lock guards: the counters and the recent latencies.
#[derive(Debug, Default)]
struct Counters {
    snap: StatsSnapshot,
    /// The latest successful requests' latencies, for the summaries (`summary_latencies`).
    recent: std::collections::VecDeque<(std::time::Instant, Latencies)>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ModelStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        // A poisoned lock only means another thread panicked mid-update; counters stay usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with(&self, f: impl FnOnce(&mut StatsSnapshot)) {
        f(&mut self.lock().snap)
    }

    /// Back to no events (after warm-up, which is not counted).
    pub fn reset(&self) {
        *self.lock() = Counters::default();
    }

    /// A request finished successfully after `total`, having queued `queue` and computed `compute`.
    pub fn record_success(&self, total: Duration, queue: Duration, compute: ComputeTimes) {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mut g = self.lock();
        let s = &mut g.snap;
        s.success.add(total);
        s.queue.add(queue);
        s.compute_input.add(compute.input);
        s.compute_infer.add(compute.infer);
        s.compute_output.add(compute.output);
        s.last_inference_ms = now_ms();
        let recent = &mut g.recent;
        if recent.len() == RECENT_CAPACITY {
            recent.pop_front();
        }
        recent.push_back((
            std::time::Instant::now(),
            [
                us(total),
                us(queue),
                us(compute.input),
                us(compute.infer),
                us(compute.output),
            ],
        ));
    }

    /// The `quantiles` of each latency (request, queue, compute input, infer, output) over
    /// the successful requests of the last [`RECENT_MAX_AGE`] (at most the latest 2048);
    /// `None` before any.
    pub fn recent_quantiles(&self, quantiles: &[f64]) -> Option<[Vec<f64>; 5]> {
        let recent: Vec<Latencies> = {
            let mut g = self.lock();
            while g
                .recent
                .front()
                .is_some_and(|(at, _)| at.elapsed() > RECENT_MAX_AGE)
            {
                g.recent.pop_front();
            }
            g.recent.iter().map(|(_, l)| *l).collect()
        };
        if recent.is_empty() {
            return None;
        }
        let mut out: [Vec<f64>; 5] = Default::default();
        for (k, q_out) in out.iter_mut().enumerate() {
            let mut v: Vec<f64> = recent.iter().map(|l| l[k]).collect();
            v.sort_by(f64::total_cmp);
            *q_out = quantiles
                .iter()
                .map(|q| {
                    let rank = (q * (v.len() - 1) as f64).round() as usize;
                    v[rank.min(v.len() - 1)]
                })
                .collect();
        }
        Some(out)
    }

    /// A request answered from the response cache after `total`, having waited `queue`
    /// before a lookup that took `lookup`.
    pub fn record_cache_hit(&self, total: Duration, queue: Duration, lookup: Duration) {
        self.with(|s| {
            s.success.add(total);
            s.queue.add(queue);
            s.cache_hit.add(lookup);
            s.last_inference_ms = now_ms();
        })
    }

    /// A request that missed the response cache; `lookup_and_insert` is the time spent on
    /// the cache.
    pub fn record_cache_miss(&self, lookup_and_insert: Duration) {
        self.with(|s| s.cache_miss.add(lookup_and_insert))
    }

    /// A request failed after `total`.
    pub fn record_failure(&self, total: Duration, reason: FailReason) {
        self.with(|s| {
            s.fail.add(total);
            s.fail_reasons[reason as usize] += 1;
            s.last_inference_ms = now_ms();
        })
    }

    /// A request's first successful response left `latency` after it arrived.
    pub fn record_first_response(&self, latency: Duration) {
        let ms = latency.as_secs_f64() * 1e3;
        self.with(|s| {
            let h = &mut s.first_response;
            let slot = FIRST_RESPONSE_BUCKETS_MS
                .iter()
                .position(|&b| ms <= b)
                .unwrap_or(FIRST_RESPONSE_BUCKETS_MS.len());
            h.buckets[slot] += 1;
            h.count += 1;
            h.sum_ms += ms;
        })
    }

    /// One execution of `batch_size` items.
    pub fn record_execution(&self, batch_size: u64, compute: ComputeTimes) {
        self.with(|s| {
            s.execution_count += 1;
            s.inference_count += batch_size;
            let b = s.batch.entry(batch_size).or_default();
            b[0].add(compute.input);
            b[1].add(compute.infer);
            b[2].add(compute.output);
        })
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        self.lock().snap.clone()
    }

    /// Triton's JSON for one entry of `model_stats`.
    pub fn to_json(&self, name: &str, version: i64) -> Value {
        let s = self.snapshot();
        json!({
            "name": name,
            "version": version.to_string(),
            "last_inference": s.last_inference_ms,
            "inference_count": s.inference_count,
            "execution_count": s.execution_count,
            "inference_stats": {
                "success": s.success.json(),
                "fail": s.fail.json(),
                "queue": s.queue.json(),
                "compute_input": s.compute_input.json(),
                "compute_infer": s.compute_infer.json(),
                "compute_output": s.compute_output.json(),
                "cache_hit": s.cache_hit.json(),
                "cache_miss": s.cache_miss.json(),
            },
            "response_stats": {},
            "batch_stats": s.batch.iter().map(|(bs, d)| json!({
                "batch_size": bs,
                "compute_input": d[0].json(),
                "compute_infer": d[1].json(),
                "compute_output": d[2].json(),
            })).collect::<Vec<_>>(),
            "memory_usage": [],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_batches_and_requests_separately() {
        let s = ModelStats::default();
        let c = ComputeTimes {
            input: Duration::from_nanos(1),
            infer: Duration::from_nanos(10),
            output: Duration::from_nanos(2),
        };
        s.record_execution(3, c);
        for _ in 0..3 {
            s.record_success(Duration::from_nanos(100), Duration::from_nanos(5), c);
        }
        s.record_failure(Duration::from_nanos(7), FailReason::Rejected);
        let j = s.to_json("m", 1);
        assert_eq!(j["inference_count"], 3);
        assert_eq!(j["execution_count"], 1);
        assert_eq!(j["inference_stats"]["success"]["count"], 3);
        assert_eq!(j["inference_stats"]["success"]["ns"], 300);
        assert_eq!(j["inference_stats"]["fail"]["ns"], 7);
        assert_eq!(j["batch_stats"][0]["batch_size"], 3);
        assert_eq!(j["batch_stats"][0]["compute_infer"]["ns"], 10);
        assert_eq!(j["version"], "1");
    }

    #[test]
    fn summaries_take_quantiles_of_the_recent_requests() {
        let s = ModelStats::default();
        assert!(s.recent_quantiles(&[0.5]).is_none());
        for ms in 1..=100u64 {
            let c = ComputeTimes {
                infer: Duration::from_millis(ms),
                ..Default::default()
            };
            s.record_success(Duration::from_millis(2 * ms), Duration::ZERO, c);
        }
        let q = s.recent_quantiles(&[0.5, 0.99]).expect("samples");
        assert_eq!(q[0], vec![102_000.0, 198_000.0]);
        assert_eq!(q[3], vec![51_000.0, 99_000.0]);
        assert_eq!(q[1], vec![0.0, 0.0]);
    }
}
