//! Request queue shared by a model's instance threads: the default scheduler (one request
//! per execution) and the dynamic batcher (merge queued requests along the batch dimension).
//!
//! Instances *pull*: each idle instance thread calls [`Scheduler::next_batch`], so work
//! spreads over idle instances by construction. The batching decision is the pure
//! function [`decide`], tested with a fake clock.
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{CoreError, CoreResult};
use crate::request::{InferRequest, ResponseSink};

/// Dynamic batching settings (from `dynamic_batching { ... }`).
#[derive(Debug, Clone, Default)]
pub struct BatchPolicy {
    /// `max_batch_size` of the model.
    pub max_batch_size: u64,
    /// `preferred_batch_size`, ascending.
    pub preferred: Vec<u64>,
    /// `max_queue_delay_microseconds`.
    pub max_delay: Duration,
}

/// Scheduling policy of a model.
#[derive(Debug, Clone, Default)]
pub struct SchedulerPolicy {
    /// `None`: default scheduler (one request per execution).
    pub batching: Option<BatchPolicy>,
    /// `max_queue_size` (0 = unbounded).
    pub max_queue_size: usize,
}

/// A queued request.
pub struct Pending {
    /// The validated request.
    pub request: Arc<InferRequest>,
    /// Where its responses go.
    pub sink: ResponseSink,
    /// Batch size (first dimension, or 1).
    pub batch_size: u64,
    /// Non-batch input shapes; only equal keys are merged.
    pub shape_key: Vec<Vec<i64>>,
    /// When it entered the queue.
    pub enqueued: Instant,
}

/// What an idle instance should do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Take the first `n` queued requests as one batch.
    Dispatch(usize),
    /// Wait for more requests until this instant.
    WaitUntil(Instant),
}

/// A queued request as the batching decision sees it.
#[derive(Debug, Clone)]
pub struct QueuedItem<'a> {
    /// Batch size.
    pub batch_size: u64,
    /// Shape key.
    pub shape_key: &'a [Vec<i64>],
    /// Enqueue time.
    pub enqueued: Instant,
}

/// The batching decision for a non-empty queue at time `now`.
pub fn decide(policy: Option<&BatchPolicy>, queue: &[QueuedItem<'_>], now: Instant) -> Decision {
    let Some(p) = policy else {
        return Decision::Dispatch(1);
    };
    let Some(first) = queue.first() else {
        return Decision::WaitUntil(now + Duration::from_secs(3600));
    };
    let mut total = 0u64;
    let mut n = 0usize;
    let mut blocked = false;
    for item in queue {
        if n > 0
            && (item.shape_key != first.shape_key || total + item.batch_size > p.max_batch_size)
        {
            blocked = true;
            break;
        }
        total += item.batch_size;
        n += 1;
    }
    // The batch cannot grow (size limit or a request that cannot join): send it now,
    // shrunk to the largest preferred size it covers when that keeps it non-empty.
    if blocked || total >= p.max_batch_size {
        return Decision::Dispatch(n);
    }
    if p.preferred.last().is_some_and(|&largest| total >= largest) {
        return Decision::Dispatch(n);
    }
    let deadline = first.enqueued + p.max_delay;
    if now >= deadline || (p.preferred.contains(&total) && p.max_delay.is_zero()) {
        return Decision::Dispatch(n);
    }
    Decision::WaitUntil(deadline)
}

struct QueueState {
    queue: VecDeque<Pending>,
    closed: bool,
}

/// A model's request queue.
pub struct Scheduler {
    policy: SchedulerPolicy,
    state: Mutex<QueueState>,
    ready: Condvar,
}

impl Scheduler {
    /// A scheduler with `policy`.
    pub fn new(policy: SchedulerPolicy) -> Self {
        Scheduler {
            policy,
            state: Mutex::new(QueueState {
                queue: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a request; refuses at once when the queue is full or closed.
    pub fn enqueue(&self, p: Pending) -> CoreResult<()> {
        let mut st = self.lock();
        if st.closed {
            return Err(CoreError::unavailable(format!(
                "model '{}' is being unloaded and accepts no new requests",
                p.request.model_name
            )));
        }
        if self.policy.max_queue_size > 0 && st.queue.len() >= self.policy.max_queue_size {
            return Err(CoreError::unavailable("Exceeds maximum queue size"));
        }
        st.queue.push_back(p);
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// Number of queued requests.
    pub fn pending(&self) -> usize {
        self.lock().queue.len()
    }

    /// Stops accepting requests; queued ones still run, then `next_batch` returns `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Blocks until a batch is due (or returns `None` once closed and drained).
    pub fn next_batch(&self) -> Option<Vec<Pending>> {
        let mut st = self.lock();
        loop {
            // Requests whose client went away are dropped before execution.
            st.queue.retain(|p| !p.sink.is_closed());
            if st.queue.is_empty() {
                if st.closed {
                    return None;
                }
                st = self.ready.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let now = Instant::now();
            let items: Vec<QueuedItem<'_>> = st
                .queue
                .iter()
                .map(|p| QueuedItem {
                    batch_size: p.batch_size,
                    shape_key: &p.shape_key,
                    enqueued: p.enqueued,
                })
                .collect();
            let decision = decide(self.policy.batching.as_ref(), &items, now);
            drop(items);
            match decision {
                Decision::Dispatch(n) => {
                    let batch: Vec<Pending> = st.queue.drain(..n.max(1)).collect();
                    let more = !st.queue.is_empty();
                    drop(st);
                    if more {
                        self.ready.notify_one();
                    }
                    return Some(batch);
                }
                // Closing: no more requests will arrive to fill the batch; drain one at a time.
                Decision::WaitUntil(_) if st.closed => {
                    return st.queue.pop_front().map(|p| vec![p])
                }
                Decision::WaitUntil(t) => {
                    let wait = t.saturating_duration_since(now);
                    st = self
                        .ready
                        .wait_timeout(st, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(t0: Instant, sizes: &[u64], key: &'static [Vec<i64>]) -> Vec<QueuedItem<'static>> {
        sizes
            .iter()
            .map(|&b| QueuedItem {
                batch_size: b,
                shape_key: key,
                enqueued: t0,
            })
            .collect()
    }

    fn policy(max: u64, preferred: &[u64], delay_us: u64) -> BatchPolicy {
        BatchPolicy {
            max_batch_size: max,
            preferred: preferred.to_vec(),
            max_delay: Duration::from_micros(delay_us),
        }
    }

    #[test]
    fn default_scheduler_takes_one() {
        let t0 = Instant::now();
        assert_eq!(
            decide(None, &items(t0, &[1, 1, 1], &[]), t0),
            Decision::Dispatch(1)
        );
    }

    #[test]
    fn waits_for_delay_then_dispatches_all() {
        let t0 = Instant::now();
        let p = policy(8, &[4, 8], 100_000);
        let q = items(t0, &[1, 1], &[]);
        assert_eq!(
            decide(Some(&p), &q, t0),
            Decision::WaitUntil(t0 + Duration::from_millis(100))
        );
        assert_eq!(
            decide(Some(&p), &q, t0 + Duration::from_millis(100)),
            Decision::Dispatch(2)
        );
    }

    #[test]
    fn largest_preferred_size_dispatches_immediately() {
        let t0 = Instant::now();
        let p = policy(16, &[4, 8], 1_000_000);
        assert_eq!(
            decide(Some(&p), &items(t0, &[1; 8], &[]), t0),
            Decision::Dispatch(8)
        );
        // only the smaller preferred size reached: keep waiting for a bigger batch
        assert!(matches!(
            decide(Some(&p), &items(t0, &[1; 4], &[]), t0),
            Decision::WaitUntil(_)
        ));
    }

    #[test]
    fn never_exceeds_max_batch_size() {
        let t0 = Instant::now();
        let p = policy(8, &[], 1_000_000);
        assert_eq!(
            decide(Some(&p), &items(t0, &[3, 3, 3], &[]), t0),
            Decision::Dispatch(2)
        );
        assert_eq!(
            decide(Some(&p), &items(t0, &[8, 1], &[]), t0),
            Decision::Dispatch(1)
        );
    }

    #[test]
    fn different_shapes_are_not_merged() {
        let t0 = Instant::now();
        static A: [Vec<i64>; 0] = [];
        let a: &'static [Vec<i64>] = &A;
        let b: &'static [Vec<i64>] = Box::leak(Box::new([vec![3i64]]));
        let p = policy(8, &[], 1_000_000);
        let q = vec![
            QueuedItem {
                batch_size: 1,
                shape_key: a,
                enqueued: t0,
            },
            QueuedItem {
                batch_size: 1,
                shape_key: b,
                enqueued: t0,
            },
        ];
        assert_eq!(decide(Some(&p), &q, t0), Decision::Dispatch(1));
    }

    #[test]
    fn zero_delay_dispatches_what_is_there() {
        let t0 = Instant::now();
        let p = policy(8, &[], 0);
        assert_eq!(
            decide(Some(&p), &items(t0, &[1, 1, 1], &[]), t0),
            Decision::Dispatch(3)
        );
    }

    #[test]
    fn full_queue_rejects_immediately() {
        let s = Scheduler::new(SchedulerPolicy {
            batching: None,
            max_queue_size: 1,
        });
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let mk = || Pending {
            request: Arc::new(InferRequest::new("m")),
            sink: tx.clone(),
            batch_size: 1,
            shape_key: vec![],
            enqueued: Instant::now(),
        };
        s.enqueue(mk()).unwrap();
        let e = s.enqueue(mk()).unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Unavailable);
        s.close();
        assert_eq!(s.next_batch().map(|b| b.len()), Some(1));
        assert!(s.next_batch().is_none());
    }
}
