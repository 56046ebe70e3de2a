//! The compute phase of a batch, for Triton's `compute_input` / `compute_infer` /
//! `compute_output` statistics (Triton's `TRITONBACKEND_ModelInstanceReportStatistics`).

use std::cell::Cell;

use crate::host;

thread_local! {
    /// Host-clock start and end of the compute marked so far in the current `execute`.
    static SPAN: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
}

/// Runs `f` as the compute phase of the batch under execution and returns what it returns.
///
/// Call it from `Instance::execute` (or `infer`), on the thread the host called, around the
/// model's own work: the time before it counts as compute input (reading and converting the
/// requests' tensors), the time after it as compute output (writing the responses). Called
/// more than once in one execution, the phase runs from the first call's start to the last
/// call's end. Without any call, the whole execution counts as compute infer.
pub fn compute<T>(f: impl FnOnce() -> T) -> T {
    let start = host::clock_ns();
    let out = f();
    let end = host::clock_ns();
    SPAN.with(|s| {
        let first = s.get().map_or(start, |(first, _)| first);
        s.set(Some((first, end)));
    });
    out
}

/// Takes (and clears) the span marked on this thread.
pub(crate) fn take_span() -> Option<(u64, u64)> {
    SPAN.with(Cell::take)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_join_into_one_span_and_taking_clears_it() {
        assert_eq!(take_span(), None);
        assert_eq!(compute(|| 7), 7);
        let (a, b) = take_span().expect("a span after compute");
        assert!(a <= b);
        assert_eq!(take_span(), None);
        compute(|| ());
        let first = SPAN.with(Cell::get).expect("span").0;
        compute(|| ());
        assert_eq!(SPAN.with(Cell::get).expect("span").0, first);
    }
}
