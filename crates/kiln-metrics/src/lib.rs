//! Prometheus metrics with Triton's names and labels, rendered at scrape time from the
//! core's per-model statistics (the same numbers `/v2/models/stats` reports), plus the
//! host's CPU and memory gauges.
//!
//! The `prometheus` crate writes the classic text format (0.0.4) that Triton serves, so
//! counters keep Triton's exact names (OpenMetrics encoders would append `_total`, which
//! would break dashboards written for Triton).
mod system;

use kiln_core::stats::FailReason;
use kiln_core::Server;
use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use system::CpuSampler;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

type Metric<'a> = (
    &'a str,
    &'a str,
    fn(&kiln_core::stats::StatsSnapshot) -> u64,
);

/// Triton's per-model counters: name, help, value.
const COUNTERS: &[Metric<'static>] = &[
    (
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        |s| s.success.count,
    ),
    (
        "nv_inference_count",
        "Number of inferences performed (does not include cached requests)",
        |s| s.inference_count,
    ),
    (
        "nv_inference_exec_count",
        "Number of model executions performed (does not include cached requests)",
        |s| s.execution_count,
    ),
    (
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds (includes cached requests)",
        |s| s.success.ns / 1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
        |s| s.queue.ns / 1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds (does not include cached requests)",
        |s| s.compute_input.ns / 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
        |s| s.compute_infer.ns / 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds (does not include cached requests)",
        |s| s.compute_output.ns / 1000,
    ),
];

/// Triton's per-model response cache counters, served for models that use the cache.
const CACHE_COUNTERS: &[Metric<'static>] = &[
    (
        "nv_cache_num_hits_per_model",
        "Number of cache hits per model",
        |s| s.cache_hit.count,
    ),
    (
        "nv_cache_hit_duration_per_model",
        "Total cache hit duration per model, in microseconds",
        |s| s.cache_hit.ns / 1000,
    ),
    (
        "nv_cache_num_misses_per_model",
        "Number of cache misses per model",
        |s| s.cache_miss.count,
    ),
    (
        "nv_cache_miss_duration_per_model",
        "Total cache miss (insert+lookup) duration per model, in microseconds",
        |s| s.cache_miss.ns / 1000,
    ),
];

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Metric settings (tritonserver's `--metrics-config key=value`).
#[derive(Debug, Clone)]
pub struct MetricsOptions {
    /// `histogram_latencies=true`: also serve `nv_inference_first_response_histogram_ms`.
    pub histogram_latencies: bool,
    /// `summary_latencies=true`: also serve the `nv_inference_*_summary_us` summaries.
    pub summary_latencies: bool,
    /// `summary_quantiles=0.5:0.05,0.9:0.01,...`: the summaries' quantiles (the error
    /// after each colon is accepted; quantiles are exact over the recent requests).
    pub summary_quantiles: Vec<f64>,
    /// `counter_latencies=false`: leave out the `nv_inference_*_duration_us` counters.
    pub counter_latencies: bool,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        MetricsOptions {
            histogram_latencies: false,
            summary_latencies: false,
            summary_quantiles: vec![0.5, 0.9, 0.95, 0.99, 0.999],
            counter_latencies: true,
        }
    }
}

impl MetricsOptions {
    /// Applies one `key=value` setting; unknown keys are refused with the known ones.
    pub fn set(&mut self, setting: &str) -> Result<(), String> {
        let (k, v) = setting
            .split_once('=')
            .ok_or_else(|| format!("--metrics-config expects key=value, got '{setting}'"))?;
        let flag = || {
            v.parse::<bool>()
                .map_err(|_| format!("--metrics-config {k} must be true or false, got '{v}'"))
        };
        match k {
            "histogram_latencies" => self.histogram_latencies = flag()?,
            "summary_latencies" => self.summary_latencies = flag()?,
            "counter_latencies" => self.counter_latencies = flag()?,
            "summary_quantiles" => {
                self.summary_quantiles = v
                    .split(',')
                    .map(|item| {
                        let q = item.split(':').next().unwrap_or("").trim();
                        q.parse::<f64>()
                            .ok()
                            .filter(|q| (0.0..=1.0).contains(q))
                            .ok_or_else(|| {
                                format!("--metrics-config summary_quantiles: '{item}' is not <quantile>:<error> with a quantile in [0, 1]")
                            })
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => {
                return Err(format!(
                    "unsupported --metrics-config key '{k}' (supported: histogram_latencies, summary_latencies, summary_quantiles, counter_latencies)"
                ))
            }
        }
        Ok(())
    }
}

fn label(n: &str, v: &str) -> prometheus::proto::LabelPair {
    let mut l = prometheus::proto::LabelPair::default();
    l.set_name(n.into());
    l.set_value(v.into());
    l
}

/// Triton's latency summaries: name, help, and which latency and cumulative counter.
const SUMMARIES: [(&str, &str); 5] = [
    (
        "nv_inference_request_summary_us",
        "Summary of inference request duration in microseconds (includes cached requests)",
    ),
    (
        "nv_inference_queue_summary_us",
        "Summary of inference queuing duration in microseconds (includes cached requests)",
    ),
    (
        "nv_inference_compute_input_summary_us",
        "Summary of compute input duration in microseconds (does not include cached requests)",
    ),
    (
        "nv_inference_compute_infer_summary_us",
        "Summary of compute inference duration in microseconds (does not include cached requests)",
    ),
    (
        "nv_inference_compute_output_summary_us",
        "Summary of inference compute output duration in microseconds (does not include cached requests)",
    ),
];

/// Triton's latency summaries for every ready model version: quantiles over the recent
/// successful requests, and the cumulative sum and count.
fn summary_families(server: &Server, quantiles: &[f64]) -> Vec<prometheus::proto::MetricFamily> {
    use prometheus::proto::{Metric, MetricFamily, MetricType, Quantile, Summary};
    let mut per_family: Vec<Vec<Metric>> = vec![Vec::new(); SUMMARIES.len()];
    for mv in server.models().ready_versions() {
        let snap = mv.shared.stats.snapshot();
        let totals = [
            snap.success,
            snap.queue,
            snap.compute_input,
            snap.compute_infer,
            snap.compute_output,
        ];
        let recent = mv.shared.stats.recent_quantiles(quantiles);
        for (k, metrics) in per_family.iter_mut().enumerate() {
            let mut summary = Summary::default();
            summary.set_sample_count(totals[k].count);
            summary.set_sample_sum(totals[k].ns as f64 / 1e3);
            let values = recent.as_ref().map(|r| r[k].clone()).unwrap_or_default();
            summary.set_quantile(
                quantiles
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| {
                        let mut qq = Quantile::default();
                        qq.set_quantile(q);
                        qq.set_value(values.get(i).copied().unwrap_or(f64::NAN));
                        qq
                    })
                    .collect(),
            );
            let mut m = Metric::default();
            m.set_label(vec![
                label("model", &mv.shared.name),
                label("version", &mv.shared.version.to_string()),
            ]);
            m.set_summary(summary);
            metrics.push(m);
        }
    }
    SUMMARIES
        .iter()
        .zip(per_family)
        .filter(|(_, metrics)| !metrics.is_empty())
        .map(|((name, help), metrics)| {
            let mut family = MetricFamily::default();
            family.set_name((*name).into());
            family.set_help((*help).into());
            family.set_field_type(MetricType::SUMMARY);
            family.set_metric(metrics);
            family
        })
        .collect()
}

/// A Prometheus histogram from per-bucket (not cumulative) counts under `bounds`.
fn histogram(
    bounds: &[f64],
    counts: impl IntoIterator<Item = u64>,
    count: u64,
    sum: f64,
) -> prometheus::proto::Histogram {
    use prometheus::proto::{Bucket, Histogram};
    let mut cumulative = 0;
    let buckets = bounds
        .iter()
        .zip(counts)
        .map(|(&bound, n)| {
            cumulative += n;
            let mut b = Bucket::default();
            b.set_upper_bound(bound);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut h = Histogram::default();
    h.set_sample_count(count);
    h.set_sample_sum(sum);
    h.set_bucket(buckets);
    h
}

/// The families backends defined (`kiln_core::custom_metrics`), e.g. a Python model's
/// `pb_utils.MetricFamily`.
fn custom_families() -> Vec<prometheus::proto::MetricFamily> {
    use kiln_core::custom_metrics::{snapshot, Kind};
    use prometheus::proto::{Counter, Gauge, Metric, MetricFamily, MetricType};
    snapshot()
        .into_iter()
        .map(|(name, f)| {
            let metrics = f
                .series
                .iter()
                .map(|(labels, s)| {
                    let mut m = Metric::default();
                    m.set_label(labels.iter().map(|(k, v)| label(k, v)).collect());
                    match &f.kind {
                        Kind::Counter => {
                            let mut c = Counter::default();
                            c.set_value(s.value);
                            m.set_counter(c);
                        }
                        Kind::Gauge => {
                            let mut g = Gauge::default();
                            g.set_value(s.value);
                            m.set_gauge(g);
                        }
                        Kind::Histogram(bounds) => m.set_histogram(histogram(
                            bounds,
                            s.buckets.iter().copied(),
                            s.count,
                            s.value,
                        )),
                    }
                    m
                })
                .collect();
            let mut family = MetricFamily::default();
            family.set_name(name);
            family.set_help(f.description.clone());
            family.set_field_type(match f.kind {
                Kind::Counter => MetricType::COUNTER,
                Kind::Gauge => MetricType::GAUGE,
                Kind::Histogram(_) => MetricType::HISTOGRAM,
            });
            family.set_metric(metrics);
            family
        })
        .filter(|f| !f.get_metric().is_empty())
        .collect()
}

/// Triton's first-response histogram for every ready model version, in milliseconds.
fn first_response_family(server: &Server) -> prometheus::proto::MetricFamily {
    use kiln_core::stats::FIRST_RESPONSE_BUCKETS_MS;
    use prometheus::proto::{Metric, MetricFamily, MetricType};
    let mut metrics = Vec::new();
    for mv in server.models().ready_versions() {
        let h = mv.shared.stats.snapshot().first_response;
        let hist = histogram(&FIRST_RESPONSE_BUCKETS_MS, h.buckets, h.count, h.sum_ms);
        let mut m = Metric::default();
        m.set_label(vec![
            label("model", &mv.shared.name),
            label("version", &mv.shared.version.to_string()),
        ]);
        m.set_histogram(hist);
        metrics.push(m);
    }
    let mut family = MetricFamily::default();
    family.set_name("nv_inference_first_response_histogram_ms".into());
    family.set_help("Duration from request to first response in milliseconds".into());
    family.set_field_type(MetricType::HISTOGRAM);
    family.set_metric(metrics);
    family
}

/// Renders every metric in Prometheus' text format.
pub fn render(
    server: &Server,
    cpu: &CpuSampler,
    opts: &MetricsOptions,
) -> prometheus::Result<String> {
    let r = Registry::new();
    let labels = ["model", "version"];
    let family = |list: &[Metric<'static>]| -> prometheus::Result<Vec<(IntCounterVec, _)>> {
        list.iter()
            .map(|(name, help, value)| Ok((counter(&r, name, help, &labels)?, *value)))
            .collect()
    };
    let latency_counters: Vec<Metric<'static>> = COUNTERS
        .iter()
        .filter(|(name, ..)| opts.counter_latencies || !name.ends_with("_duration_us"))
        .copied()
        .collect();
    let counters = family(&latency_counters)?;
    let cache_counters = family(CACHE_COUNTERS)?;
    let failure = counter(
        &r,
        "nv_inference_request_failure",
        "Number of failed inference requests, all batch sizes",
        &["model", "version", "reason"],
    )?;
    let pending = IntGaugeVec::new(
        Opts::new(
            "nv_inference_pending_request_count",
            "Instantaneous number of pending requests awaiting execution per-model.",
        ),
        &labels,
    )?;
    r.register(Box::new(pending.clone()))?;
    let load_secs = GaugeVec::new(
        Opts::new("nv_model_load_duration_secs", "Model load time in seconds"),
        &labels,
    )?;
    r.register(Box::new(load_secs.clone()))?;

    for mv in server.models().ready_versions() {
        let (name, version) = (mv.shared.name.as_str(), mv.shared.version.to_string());
        let lv = [name, version.as_str()];
        let snap = mv.shared.stats.snapshot();
        for (c, value) in &counters {
            c.with_label_values(&lv).inc_by(value(&snap));
        }
        if mv.shared.cache.is_some() {
            for (c, value) in &cache_counters {
                c.with_label_values(&lv).inc_by(value(&snap));
            }
        }
        for reason in FailReason::ALL {
            failure
                .with_label_values(&[name, version.as_str(), reason.label()])
                .inc_by(snap.fail_reasons[reason as usize]);
        }
        pending.with_label_values(&lv).set(mv.pending() as i64);
        if let Some(d) = mv.load_duration() {
            load_secs.with_label_values(&lv).set(d.as_secs_f64());
        }
    }

    let gauge = |name: &str, help: &str, v: f64| -> prometheus::Result<()> {
        let g = Gauge::with_opts(Opts::new(name, help))?;
        g.set(v);
        r.register(Box::new(g))
    };
    // Kiln keeps no pinned (page-locked) host memory pool, as Triton on a host without a
    // GPU: both gauges are there for dashboards, at 0.
    gauge(
        "nv_pinned_memory_pool_total_bytes",
        "Pinned memory pool total memory size, in bytes",
        0.0,
    )?;
    gauge(
        "nv_pinned_memory_pool_used_bytes",
        "Pinned memory pool used memory size, in bytes",
        0.0,
    )?;
    if let Some(u) = cpu.utilization() {
        gauge("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", u)?;
    }
    if let Some((total, used)) = system::memory() {
        gauge(
            "nv_cpu_memory_total_bytes",
            "CPU total memory (RAM), in bytes",
            total as f64,
        )?;
        gauge(
            "nv_cpu_memory_used_bytes",
            "CPU used memory (RAM), in bytes",
            used as f64,
        )?;
    }

    let mut families = r.gather();
    if opts.histogram_latencies {
        families.push(first_response_family(server));
    }
    if opts.summary_latencies {
        families.extend(summary_families(server, &opts.summary_quantiles));
    }
    families.extend(custom_families());
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
}
