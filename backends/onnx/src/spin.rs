//! A run's pool threads wait for its jobs spinning instead of sleeping.
//!
//! The executor splits each large operator over the instance's rayon pool. Between two
//! such operators the other threads find no work, and rayon puts them to sleep after a
//! few rounds of yielding; the next operator then waits for the kernel to wake them (a
//! ResNet-50 run made ~150 context switches). While a run lasts, [`with_spinning`] keeps
//! one task per other thread polling the pool for work, as onnxruntime's own pool spins
//! between operators by default. `KILN_ONNX_SPIN=0` turns it off.

use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `f` on the current rayon pool with its other threads polling for work until `f`
/// returns; plain `f()` outside a pool, with one thread, or when turned off.
pub fn with_spinning<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads < 2 || rayon::current_thread_index().is_none() || !enabled() {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| spin(&done));
        }
        // Set when `f` returns and also when it panics: the scope waits for the spinners,
        // which would otherwise poll forever and hang the run instead of failing it.
        let _stop = StopOnDrop(&done);
        f()
    })
}

/// Sets its flag when dropped (also while a panic unwinds).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Whether runs spin (`KILN_ONNX_SPIN` is not `0`); read once per process.
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KILN_ONNX_SPIN").map_or(true, |v| v != "0"))
}

/// Polls without work before each further poll also offers the CPU to other threads.
const POLLS_BEFORE_YIELD: u32 = 64;

/// Runs the pool's pending jobs as they come until `done`. After [`POLLS_BEFORE_YIELD`]
/// polls that found nothing, it yields the CPU between polls, so that where more threads
/// than cores are busy (several instances at once) the spinning costs the others little.
fn spin(done: &AtomicBool) {
    let mut idle = 0u32;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle = 0;
        } else if idle < POLLS_BEFORE_YIELD {
            idle += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_spinning;
    use rayon::prelude::*;

    #[test]
    fn a_run_gets_its_result_and_its_parallel_jobs_done() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let sum: u64 =
            pool.install(|| with_spinning(|| (0..10_000u64).into_par_iter().map(|v| v * 2).sum()));
        assert_eq!(sum, 10_000 * 9_999);
        // Outside a pool it is a plain call.
        assert_eq!(with_spinning(|| 7), 7);
    }

    #[test]
    fn a_run_that_panics_fails_instead_of_hanging() {
        // On a thread of its own, so that a hang is reported below (the spinners would
        // keep the scope open forever) rather than stopping the test run.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| with_spinning(|| -> u32 { panic!("an operator failed") }))
            }));
            let after = pool.install(|| with_spinning(|| 5));
            let _ = tx.send((outcome.is_err(), after));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(60));
        assert_eq!(
            got.ok(),
            Some((true, 5)),
            "the panicking run must unwind, and the pool serve the next one"
        );
    }
}
