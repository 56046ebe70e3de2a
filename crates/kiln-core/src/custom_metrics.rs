//! Metrics that backends define (Triton's custom metrics API, e.g. a Python model's
//! `pb_utils.MetricFamily`): counters, gauges and histograms with labels, kept for the
//! process and served on the metrics port beside Triton's own (`kiln-metrics`).
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use kiln_abi::{self as abi, KilnError, KilnMetricOp};

use crate::error::CoreError;

/// What a family counts.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Set to any value.
    Gauge,
    /// Observations in buckets (upper bounds, ascending).
    Histogram(Vec<f64>),
}

/// One labelled series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Counter or gauge value; a histogram's sum.
    pub value: f64,
    /// A histogram's observations per bucket (not cumulative), then above the last.
    pub buckets: Vec<u64>,
    /// A histogram's number of observations.
    pub count: u64,
}

/// A family of series that share a name.
#[derive(Debug, Clone)]
pub struct Family {
    /// Help text.
    pub description: String,
    /// Kind (and a histogram's buckets).
    pub kind: Kind,
    /// Series by their labels (sorted name/value pairs).
    pub series: BTreeMap<Labels, Series>,
}

static FAMILIES: OnceLock<Mutex<BTreeMap<String, Family>>> = OnceLock::new();

fn families() -> std::sync::MutexGuard<'static, BTreeMap<String, Family>> {
    FAMILIES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// A series' labels: sorted (name, value) pairs.
pub type Labels = Vec<(String, String)>;

/// Every family, for the metrics endpoint.
pub fn snapshot() -> BTreeMap<String, Family> {
    families().clone()
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The operations of the ABI's `metric`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// Gauge: set.
    Set(f64),
    /// Counter (not negative) or gauge: add.
    Add(f64),
    /// Histogram: record one observation.
    Observe(f64),
    /// Any: read.
    Read,
}

/// Applies `op` to the series of `family` with `labels`, creating either on first use;
/// returns the series' value after it (a histogram's sum).
pub fn apply(
    family: &str,
    description: &str,
    kind: Kind,
    labels: Labels,
    op: Op,
) -> Result<f64, CoreError> {
    if !valid_name(family) {
        return Err(CoreError::invalid(format!(
            "metric family name '{family}' is not a valid Prometheus name"
        )));
    }
    let mut all = families();
    let f = all.entry(family.to_string()).or_insert_with(|| Family {
        description: description.to_string(),
        kind: kind.clone(),
        series: BTreeMap::new(),
    });
    if std::mem::discriminant(&f.kind) != std::mem::discriminant(&kind) {
        return Err(CoreError::invalid(format!(
            "metric family '{family}' already exists with another kind"
        )));
    }
    let mut labels = labels;
    labels.sort();
    let bounds = match &f.kind {
        Kind::Histogram(b) => b.len(),
        _ => 0,
    };
    let s = f.series.entry(labels).or_insert_with(|| Series {
        buckets: vec![0; bounds + usize::from(bounds > 0)],
        ..Default::default()
    });
    match (&f.kind, op) {
        (_, Op::Read) => {}
        (Kind::Counter, Op::Add(v)) if v >= 0.0 => s.value += v,
        (Kind::Counter, Op::Add(_)) => {
            return Err(CoreError::invalid(format!(
                "counter '{family}' cannot be decreased"
            )))
        }
        (Kind::Gauge, Op::Add(v)) => s.value += v,
        (Kind::Gauge, Op::Set(v)) => s.value = v,
        (Kind::Histogram(b), Op::Observe(v)) => {
            let i = b.iter().position(|&ub| v <= ub).unwrap_or(b.len());
            if let Some(c) = s.buckets.get_mut(i) {
                *c += 1;
            }
            s.count += 1;
            s.value += v;
        }
        (k, op) => {
            return Err(CoreError::invalid(format!(
                "{op:?} is not an operation of metric '{family}' ({k:?})"
            )))
        }
    }
    Ok(s.value)
}

use crate::host::owned_str as text;

/// Decodes the ABI's operation.
///
/// # Safety
/// `op`'s pointers must be valid for the call.
unsafe fn decode(op: &KilnMetricOp) -> Result<(Kind, Labels, Op), CoreError> {
    // SAFETY: guaranteed by the caller.
    let buckets = unsafe { abi::raw_slice(op.buckets, op.bucket_count) }.to_vec();
    let kind = match op.kind {
        abi::KILN_METRIC_COUNTER => Kind::Counter,
        abi::KILN_METRIC_GAUGE => Kind::Gauge,
        abi::KILN_METRIC_HISTOGRAM => Kind::Histogram(buckets),
        k => return Err(CoreError::invalid(format!("unknown metric kind {k}"))),
    };
    let labels_json = text(&op.labels_json);
    let labels = if labels_json.trim().is_empty() {
        Vec::new()
    } else {
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&labels_json)
            .map_err(|e| CoreError::invalid(format!("metric labels must be a JSON object: {e}")))?;
        v.into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => Ok((k, s)),
                other => Ok((k, other.to_string())),
            })
            .collect::<Result<_, CoreError>>()?
    };
    let operation = match op.op {
        abi::KILN_METRIC_SET => Op::Set(op.value),
        abi::KILN_METRIC_ADD => Op::Add(op.value),
        abi::KILN_METRIC_OBSERVE => Op::Observe(op.value),
        abi::KILN_METRIC_READ => Op::Read,
        o => return Err(CoreError::invalid(format!("unknown metric operation {o}"))),
    };
    Ok((kind, labels, operation))
}

/// `KilnHostApi::metric`.
pub(crate) unsafe extern "C" fn h_metric(
    op: *const KilnMetricOp,
    value: *mut f64,
) -> *mut KilnError {
    // SAFETY: the ABI requires a valid operation pointer.
    let Some(op) = (unsafe { op.as_ref() }) else {
        return crate::host::new_error(&CoreError::invalid("metric: null operation"));
    };
    // SAFETY: the operation's pointers are valid for the call.
    let r = unsafe { decode(op) }.and_then(|(kind, labels, o)| {
        apply(&text(&op.family), &text(&op.description), kind, labels, o)
    });
    match r {
        Ok(v) => {
            if !value.is_null() {
                // SAFETY: the backend passes a writable f64 (or null).
                unsafe { *value = v };
            }
            std::ptr::null_mut()
        }
        Err(e) => crate::host::new_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn counters_gauges_and_histograms_keep_their_rules() {
        let c = |op| {
            apply(
                "test_cm_requests",
                "requests",
                Kind::Counter,
                l(&[("m", "a")]),
                op,
            )
        };
        assert_eq!(c(Op::Add(2.0)).unwrap(), 2.0);
        assert_eq!(c(Op::Add(1.5)).unwrap(), 3.5);
        assert!(c(Op::Add(-1.0)).is_err());
        assert!(c(Op::Set(1.0)).is_err());
        // Label order does not make another series.
        let two = apply(
            "test_cm_requests",
            "",
            Kind::Counter,
            l(&[("m", "b"), ("v", "1")]),
            Op::Add(1.0),
        );
        assert_eq!(two.unwrap(), 1.0);
        let again = apply(
            "test_cm_requests",
            "",
            Kind::Counter,
            l(&[("v", "1"), ("m", "b")]),
            Op::Read,
        );
        assert_eq!(again.unwrap(), 1.0);
        assert!(apply("test_cm_requests", "", Kind::Gauge, vec![], Op::Set(1.0)).is_err());

        let g = |op| apply("test_cm_queue", "", Kind::Gauge, vec![], op);
        assert_eq!(g(Op::Set(5.0)).unwrap(), 5.0);
        assert_eq!(g(Op::Add(-2.0)).unwrap(), 3.0);

        let h = |v| {
            apply(
                "test_cm_latency",
                "",
                Kind::Histogram(vec![1.0, 10.0]),
                vec![],
                Op::Observe(v),
            )
        };
        h(0.5).unwrap();
        h(3.0).unwrap();
        assert_eq!(h(20.0).unwrap(), 23.5);
        let s = &snapshot()["test_cm_latency"].series[&vec![]];
        assert_eq!((s.buckets.clone(), s.count), (vec![1, 1, 1], 3));
        assert!(apply("bad name", "", Kind::Gauge, vec![], Op::Read).is_err());
    }
}
