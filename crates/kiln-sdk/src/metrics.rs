//! Custom metrics a backend defines (Triton's custom metrics API), served on the server's
//! metrics port beside its own, through the host's `metric` (ABI 1.3).
use kiln_abi::{self as abi, KilnMetricOp, KilnStr};

use crate::error::{Error, Result};
use crate::host;

/// What a family counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Set to any value.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

/// One series: a family (created on first use) and its labels.
#[derive(Debug, Clone, Copy)]
pub struct MetricSeries<'a> {
    /// Family name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
    pub family: &'a str,
    /// Help text.
    pub description: &'a str,
    /// Kind.
    pub kind: MetricKind,
    /// Labels as a JSON object of strings (empty for none).
    pub labels_json: &'a str,
    /// A histogram's bucket upper bounds, ascending (fixed by the family's first use).
    pub buckets: &'a [f64],
}

/// An operation on a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MetricOp {
    /// Gauge: set.
    Set(f64),
    /// Counter (not negative) or gauge: add.
    Add(f64),
    /// Histogram: record an observation.
    Observe(f64),
    /// Read the value (a histogram's sum).
    Read,
}

/// Applies `op` to `series`; returns its value after (a histogram's sum).
pub fn metric(series: &MetricSeries<'_>, op: MetricOp) -> Result<f64> {
    let h = host::get()?;
    if (h.header.struct_size as usize) <= std::mem::offset_of!(abi::KilnHostApi, metric) {
        return Err(Error::unsupported(
            "this server's host API predates custom metrics (ABI 1.3)",
        ));
    }
    let (code, value) = match op {
        MetricOp::Set(v) => (abi::KILN_METRIC_SET, v),
        MetricOp::Add(v) => (abi::KILN_METRIC_ADD, v),
        MetricOp::Observe(v) => (abi::KILN_METRIC_OBSERVE, v),
        MetricOp::Read => (abi::KILN_METRIC_READ, 0.0),
    };
    let raw = KilnMetricOp {
        family: KilnStr::from_str(series.family),
        description: KilnStr::from_str(series.description),
        kind: match series.kind {
            MetricKind::Counter => abi::KILN_METRIC_COUNTER,
            MetricKind::Gauge => abi::KILN_METRIC_GAUGE,
            MetricKind::Histogram => abi::KILN_METRIC_HISTOGRAM,
        },
        op: code,
        labels_json: KilnStr::from_str(series.labels_json),
        buckets: series.buckets.as_ptr(),
        bucket_count: series.buckets.len(),
        value,
    };
    let mut out = 0.0;
    // SAFETY: `raw` and what it points to live for the call; `out` is writable.
    host::check(unsafe { (h.metric)(&raw, &mut out) })?;
    Ok(out)
}
