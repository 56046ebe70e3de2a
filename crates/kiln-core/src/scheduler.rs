//! Request queue shared by a model's instance threads: the default scheduler (one request
//! per execution) and the dynamic batcher (merge queued requests along the batch dimension).
//!
//! Instances *pull*: each idle instance thread calls [`Scheduler::next_batch`], so work
//! spreads over idle instances by construction. The batching decision is the pure
//! function [`decide`] and the queue bookkeeping (priority levels, timeouts) lives in
//! [`Queues`]; both take the time as an argument and are tested with a fake clock.
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{CoreError, CoreResult};
use crate::request::{InferRequest, ResponseEvent, ResponseSink};
use crate::sink::OrderGate;
use crate::stats::{FailReason, ModelStats};

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

/// What happens to a request whose queue timeout expires (`timeout_action`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TimeoutAction {
    /// Fail it with UNAVAILABLE.
    #[default]
    Reject,
    /// Keep it, behind every request of its level that has not timed out.
    Delay,
}

/// One priority level's queue policy (`default_queue_policy` / `priority_queue_policy`).
#[derive(Debug, Clone, Default)]
pub struct QueuePolicy {
    /// `max_queue_size` (0 = unbounded).
    pub max_queue_size: usize,
    /// `default_timeout_microseconds` (zero = none).
    pub default_timeout: Duration,
    /// `allow_timeout_override`: a request's own `timeout` parameter wins.
    pub allow_timeout_override: bool,
    /// `timeout_action`.
    pub timeout_action: TimeoutAction,
}

impl QueuePolicy {
    /// The queue deadline of a request with `timeout_us` (0 = none) queued at `at`.
    pub fn deadline(&self, timeout_us: u64, at: Instant) -> Option<Instant> {
        let t = if self.allow_timeout_override && timeout_us > 0 {
            Duration::from_micros(timeout_us)
        } else {
            self.default_timeout
        };
        (!t.is_zero()).then(|| at + t)
    }
}

/// Scheduling policy of a model.
#[derive(Debug, Clone)]
pub struct SchedulerPolicy {
    /// `None`: default scheduler (one request per execution).
    pub batching: Option<BatchPolicy>,
    /// One policy per priority level (index 0 = level 1, the highest); at least one.
    pub levels: Vec<QueuePolicy>,
    /// `default_priority_level`, 1-based.
    pub default_level: usize,
    /// `preserve_ordering`: responses leave in arrival order.
    pub preserve_ordering: bool,
    /// `sequence_batching`: each sequence's requests run on the instance that took its
    /// first one, in order, until its END.
    pub sequences: bool,
    /// Sequences an instance runs at once (the Direct strategy's batch slots; 0 = any
    /// number). A sequence beyond them waits in the backlog until one ends or idles out.
    pub sequence_slots: usize,
    /// `max_sequence_idle_microseconds`: a sequence with no request for this long gives up
    /// its slot.
    pub sequence_idle: Duration,
}

impl Default for SchedulerPolicy {
    fn default() -> Self {
        SchedulerPolicy {
            batching: None,
            levels: vec![QueuePolicy::default()],
            default_level: 1,
            preserve_ordering: false,
            sequences: false,
            sequence_slots: 0,
            sequence_idle: Duration::from_secs(1),
        }
    }
}

impl SchedulerPolicy {
    /// The 0-based level a request of `priority` goes to: 0 or out of range means the
    /// default level, as Triton does.
    pub fn level_of(&self, priority: u64) -> usize {
        let n = self.levels.len() as u64;
        let p = if priority == 0 || priority > n {
            self.default_level as u64
        } else {
            priority
        };
        (p.clamp(1, n) - 1) as usize
    }
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
    /// When its queue timeout expires, if it has one (set by [`Queues::push`]).
    pub deadline: Option<Instant>,
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

/// A sequence's place: the instance that runs it, and when its last request was taken.
#[derive(Debug, Clone, Copy)]
struct Binding {
    instance: usize,
    last: Instant,
}

/// The chooser of a sequence model's next batch on `instance`: in queue order, the first
/// request of each sequence that is bound to this instance (or not bound yet, while the
/// instance has `free_slots`), while the batch has room (`batching`; without it, one
/// request) and the same non-batch shapes as its first request. A sequence whose first
/// queued request cannot join adds none of its later ones, so each sequence's requests
/// still run in order.
fn sequence_batch<'a>(
    bound: &'a HashMap<u64, Binding>,
    instance: usize,
    batching: Option<&'a BatchPolicy>,
    mut free_slots: usize,
) -> impl FnMut(&Pending) -> bool + 'a {
    let max = batching.map_or(1, |b| b.max_batch_size.max(1));
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut shape: Option<Vec<Vec<i64>>> = None;
    move |p: &Pending| {
        let id = p.request.correlation_id;
        if !seen.insert(id) {
            return false;
        }
        let new = match bound.get(&id) {
            Some(b) if b.instance != instance => return false,
            Some(_) => false,
            None if free_slots == 0 => return false,
            None => true,
        };
        let size = if batching.is_some() { p.batch_size } else { 1 };
        let fits = match &shape {
            None => true,
            Some(s) => *s == p.shape_key && total + size <= max,
        };
        if fits && new {
            free_slots -= 1;
        }
        if fits {
            shape.get_or_insert_with(|| p.shape_key.clone());
            total += size;
        }
        fits
    }
}

/// The queued requests of one model: per priority level, those in time and those
/// delayed by an expired timeout (`timeout_action: DELAY`). Dispatch order is level 1
/// first, and within a level FIFO, delayed requests after the others.
pub struct Queues {
    levels: Vec<(VecDeque<Pending>, VecDeque<Pending>)>,
}

impl Queues {
    /// Empty queues for `levels` priority levels.
    pub fn new(levels: usize) -> Self {
        Queues {
            levels: (0..levels.max(1))
                .map(|_| (VecDeque::new(), VecDeque::new()))
                .collect(),
        }
    }

    /// Number of queued requests.
    pub fn len(&self) -> usize {
        self.levels.iter().map(|(a, b)| a.len() + b.len()).sum()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether level `level` (0-based) holds `policy.max_queue_size` requests already.
    pub fn is_full(&self, level: usize, policy: &QueuePolicy) -> bool {
        let (main, delayed) = &self.levels[level.min(self.levels.len() - 1)];
        policy.max_queue_size > 0 && main.len() + delayed.len() >= policy.max_queue_size
    }

    /// Queues `p` at level `level` (0-based), with its deadline under `policy`.
    pub fn push(&mut self, level: usize, policy: &QueuePolicy, mut p: Pending) {
        let level = level.min(self.levels.len() - 1);
        p.deadline = policy.deadline(p.request.timeout_us, p.enqueued);
        self.levels[level].0.push_back(p);
    }

    /// Removes requests whose client has gone away.
    pub fn remove_cancelled(&mut self) -> Vec<Pending> {
        let mut gone = Vec::new();
        for (main, delayed) in &mut self.levels {
            for q in [main, delayed] {
                let (keep, drop): (VecDeque<_>, VecDeque<_>) =
                    q.drain(..).partition(|p| !p.sink.is_closed());
                *q = keep;
                gone.extend(drop);
            }
        }
        gone
    }

    /// Applies queue timeouts at `now`: returns the requests to reject; those whose level
    /// delays instead move behind the level's other requests.
    pub fn expire(&mut self, policies: &[QueuePolicy], now: Instant) -> Vec<Pending> {
        let mut rejected = Vec::new();
        for (i, (main, delayed)) in self.levels.iter_mut().enumerate() {
            if !main.iter().any(|p| p.deadline.is_some_and(|d| d <= now)) {
                continue;
            }
            let action = policies
                .get(i)
                .map(|p| p.timeout_action)
                .unwrap_or_default();
            let (keep, expired): (VecDeque<_>, VecDeque<_>) = main
                .drain(..)
                .partition(|p| p.deadline.is_none_or(|d| d > now));
            *main = keep;
            match action {
                TimeoutAction::Reject => rejected.extend(expired),
                TimeoutAction::Delay => delayed.extend(expired),
            }
        }
        rejected
    }

    /// The earliest pending timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.levels
            .iter()
            .flat_map(|(main, _)| main.iter().filter_map(|p| p.deadline))
            .min()
    }

    /// Requests in dispatch order.
    pub fn iter(&self) -> impl Iterator<Item = &Pending> {
        self.levels
            .iter()
            .flat_map(|(main, delayed)| main.iter().chain(delayed.iter()))
    }

    /// Visits every request once, in dispatch order, and takes those `pick` accepts.
    pub fn take_each(&mut self, mut pick: impl FnMut(&Pending) -> bool) -> Vec<Pending> {
        let mut out = Vec::new();
        for (main, delayed) in &mut self.levels {
            for q in [main, delayed] {
                let mut kept = VecDeque::with_capacity(q.len());
                for p in q.drain(..) {
                    if pick(&p) {
                        out.push(p);
                    } else {
                        kept.push_back(p);
                    }
                }
                *q = kept;
            }
        }
        out
    }

    /// Takes the first `n` requests in dispatch order.
    pub fn take(&mut self, n: usize) -> Vec<Pending> {
        let mut out = Vec::with_capacity(n);
        for (main, delayed) in &mut self.levels {
            for q in [main, delayed] {
                while out.len() < n {
                    match q.pop_front() {
                        Some(p) => out.push(p),
                        None => break,
                    }
                }
            }
        }
        out
    }
}

struct QueueState {
    queues: Queues,
    closed: bool,
    /// Sequences (correlation ids) and the instance that runs them.
    bound: HashMap<u64, Binding>,
}

impl QueueState {
    /// Frees the slots of sequences idle past `idle` with nothing queued; returns when the
    /// next slot would idle out (for a backlog to wait on).
    fn release_idle(&mut self, idle: Duration, now: Instant) -> Option<Instant> {
        if self.bound.is_empty() {
            return None;
        }
        let queued: std::collections::HashSet<u64> = self
            .queues
            .iter()
            .map(|p| p.request.correlation_id)
            .collect();
        self.bound
            .retain(|id, b| queued.contains(id) || now.duration_since(b.last) <= idle);
        self.bound
            .iter()
            .filter(|(id, _)| !queued.contains(id))
            .map(|(_, b)| b.last + idle)
            .min()
    }

    /// Slots `instance` has free (`usize::MAX` when unlimited).
    fn free_slots(&self, instance: usize, slots: usize) -> usize {
        if slots == 0 {
            return usize::MAX;
        }
        let used = self
            .bound
            .values()
            .filter(|b| b.instance == instance)
            .count();
        slots.saturating_sub(used)
    }
}

/// A model's request queue.
pub struct Scheduler {
    policy: SchedulerPolicy,
    stats: Arc<ModelStats>,
    order: Option<Arc<OrderGate>>,
    state: Mutex<QueueState>,
    ready: Condvar,
}

impl Scheduler {
    /// A scheduler with `policy`; rejections and cancellations are counted in `stats`.
    pub fn new(policy: SchedulerPolicy, stats: Arc<ModelStats>) -> Self {
        Scheduler {
            order: policy.preserve_ordering.then(Default::default),
            state: Mutex::new(QueueState {
                queues: Queues::new(policy.levels.len()),
                closed: false,
                bound: HashMap::new(),
            }),
            policy,
            stats,
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a request; refuses at once when its priority level's queue is full or the
    /// model is unloading.
    pub fn enqueue(&self, mut p: Pending) -> CoreResult<()> {
        let mut st = self.lock();
        if st.closed {
            return Err(CoreError::unavailable(format!(
                "model '{}' is being unloaded and accepts no new requests",
                p.request.model_name
            )));
        }
        let level = self.policy.level_of(p.request.priority);
        let policy = &self.policy.levels[level];
        if st.queues.is_full(level, policy) {
            return Err(CoreError::unavailable("Exceeds maximum queue size"));
        }
        if let Some(gate) = &self.order {
            p.sink.set_order(gate.clone(), gate.issue());
        }
        st.queues.push(level, policy, p);
        drop(st);
        if self.policy.sequences {
            // Only the instance a sequence is bound to may take it: wake them all.
            self.ready.notify_all();
        } else {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Number of queued requests.
    pub fn pending(&self) -> usize {
        self.lock().queues.len()
    }

    /// Stops accepting requests; queued ones still run, then `next_batch` returns `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Fails requests that are not going to run (outside the queue lock).
    fn fail(&self, dropped: Vec<Pending>, reason: FailReason) {
        for p in dropped {
            let message = match reason {
                FailReason::Canceled => "the request was cancelled before it ran",
                _ => "Request timeout expired",
            };
            let e = match reason {
                FailReason::Canceled => CoreError::new(crate::ErrorKind::Cancelled, message),
                _ => CoreError::unavailable(message),
            };
            p.sink.send(ResponseEvent::Error(e));
            self.stats
                .record_failure(p.request.arrival.elapsed(), reason);
        }
    }

    /// Blocks until a batch is due (or returns `None` once closed and drained).
    pub fn next_batch(&self) -> Option<Vec<Pending>> {
        self.next_batch_for(0)
    }

    /// [`Scheduler::next_batch`] for instance `instance` (which matters for sequences:
    /// see [`SchedulerPolicy::sequences`]).
    pub fn next_batch_for(&self, instance: usize) -> Option<Vec<Pending>> {
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            let cancelled = st.queues.remove_cancelled();
            let expired = st.queues.expire(&self.policy.levels, now);
            if !cancelled.is_empty() || !expired.is_empty() {
                drop(st);
                self.fail(cancelled, FailReason::Canceled);
                self.fail(expired, FailReason::Rejected);
                st = self.lock();
                continue;
            }
            if st.queues.is_empty() {
                if st.closed {
                    return None;
                }
                st = self.ready.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if self.policy.sequences {
                let slots = self.policy.sequence_slots;
                let idle_at = if slots > 0 {
                    st.release_idle(self.policy.sequence_idle, now)
                } else {
                    None
                };
                let free = st.free_slots(instance, slots);
                let QueueState {
                    queues,
                    bound,
                    closed,
                } = &mut *st;
                let batch = queues.take_each(sequence_batch(
                    bound,
                    instance,
                    self.policy.batching.as_ref(),
                    free,
                ));
                if !batch.is_empty() {
                    for p in &batch {
                        let id = p.request.correlation_id;
                        if p.request.flags & crate::sequence::FLAG_END != 0 {
                            bound.remove(&id);
                        } else {
                            let b = Binding {
                                instance,
                                last: now,
                            };
                            bound.insert(id, b);
                        }
                    }
                    drop(st);
                    self.ready.notify_all();
                    return Some(batch);
                }
                // What is queued belongs to other instances, or waits for a slot.
                if *closed {
                    return None;
                }
                st = self.wait(st, idle_at, now);
                continue;
            }
            let items: Vec<QueuedItem<'_>> = st
                .queues
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
                    let batch = st.queues.take(n.max(1));
                    let more = !st.queues.is_empty();
                    drop(st);
                    if more {
                        self.ready.notify_one();
                    }
                    return Some(batch);
                }
                // Closing: no more requests will arrive to fill the batch; drain one at a time.
                Decision::WaitUntil(_) if st.closed => return Some(st.queues.take(1)),
                Decision::WaitUntil(t) => st = self.wait(st, Some(t), now),
            }
        }
    }

    /// Waits for a new request, or until `until` or the next queue timeout, whichever
    /// comes first (with neither, until a request arrives).
    fn wait<'a>(
        &self,
        st: MutexGuard<'a, QueueState>,
        until: Option<Instant>,
        now: Instant,
    ) -> MutexGuard<'a, QueueState> {
        let t = match (until, st.queues.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match t {
            Some(t) => {
                let wait = t.saturating_duration_since(now);
                self.ready
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => self.ready.wait(st).unwrap_or_else(|p| p.into_inner()),
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

    fn pending(
        priority: u64,
        timeout_us: u64,
        at: Instant,
    ) -> (Pending, crate::request::ResponseStream) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut r = InferRequest::new("m");
        r.priority = priority;
        r.timeout_us = timeout_us;
        r.id = format!("p{priority}-t{timeout_us}");
        let p = Pending {
            request: Arc::new(r),
            sink: ResponseSink::new(tx),
            batch_size: 1,
            shape_key: vec![],
            enqueued: at,
            deadline: None,
        };
        (p, rx)
    }

    fn order(q: &Queues) -> Vec<String> {
        q.iter().map(|p| p.request.id.clone()).collect()
    }

    fn two_levels(action: TimeoutAction, override_ok: bool) -> SchedulerPolicy {
        let qp = QueuePolicy {
            max_queue_size: 0,
            default_timeout: Duration::from_millis(10),
            allow_timeout_override: override_ok,
            timeout_action: action,
        };
        SchedulerPolicy {
            batching: Some(policy(8, &[], 1_000_000)),
            levels: vec![qp.clone(), qp],
            default_level: 2,
            ..Default::default()
        }
    }

    #[test]
    fn priority_levels_dispatch_high_first_and_default_out_of_range() {
        let p = two_levels(TimeoutAction::Reject, false);
        assert_eq!(
            (p.level_of(0), p.level_of(1), p.level_of(2), p.level_of(9)),
            (1, 0, 1, 1)
        );
        let t0 = Instant::now();
        let mut q = Queues::new(2);
        let mut keep = Vec::new();
        for prio in [2, 0, 1] {
            let (item, rx) = pending(prio, 0, t0);
            keep.push(rx);
            q.push(p.level_of(prio), &p.levels[p.level_of(prio)], item);
        }
        assert_eq!(order(&q), ["p1-t0", "p2-t0", "p0-t0"]);
        assert_eq!(q.take(2).len(), 2);
        assert_eq!(order(&q), ["p0-t0"]);
    }

    #[test]
    fn timeouts_reject_or_delay_and_override_only_when_allowed() {
        let t0 = Instant::now();
        // Reject: the default 10 ms timeout applies; the request's own 1 s is not allowed.
        let p = two_levels(TimeoutAction::Reject, false);
        let mut q = Queues::new(2);
        let (a, _ra) = pending(1, 1_000_000, t0);
        q.push(0, &p.levels[0], a);
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert!(q
            .expire(&p.levels, t0 + Duration::from_millis(9))
            .is_empty());
        let gone = q.expire(&p.levels, t0 + Duration::from_millis(10));
        assert_eq!(gone.len(), 1);
        assert!(q.is_empty());

        // Override allowed: the request's 1 s wins over the default.
        let p = two_levels(TimeoutAction::Reject, true);
        let mut q = Queues::new(2);
        let (a, _ra) = pending(1, 1_000_000, t0);
        q.push(0, &p.levels[0], a);
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_secs(1)));

        // Delay: the expired request goes behind its level's others, ahead of level 2.
        let p = two_levels(TimeoutAction::Delay, true);
        let mut q = Queues::new(2);
        let mut keep = Vec::new();
        for (prio, timeout) in [(1, 5_000), (1, 50_000), (2, 50_000)] {
            let (item, rx) = pending(prio, timeout, t0);
            keep.push(rx);
            q.push(p.level_of(prio), &p.levels[p.level_of(prio)], item);
        }
        assert!(q
            .expire(&p.levels, t0 + Duration::from_millis(6))
            .is_empty());
        assert_eq!(order(&q), ["p1-t50000", "p1-t5000", "p2-t50000"]);
        // A delayed request is never rejected later.
        assert!(q
            .expire(&p.levels, t0 + Duration::from_millis(40))
            .is_empty());
    }

    #[test]
    fn expired_request_is_answered_unavailable_and_counted_as_rejected() {
        let stats = Arc::new(ModelStats::default());
        let mut p = two_levels(TimeoutAction::Reject, true);
        p.batching = Some(policy(8, &[], 60_000_000));
        let s = Arc::new(Scheduler::new(p, stats.clone()));
        let (mut item, mut rx) = pending(1, 1_000, Instant::now());
        item.enqueued = Instant::now();
        s.enqueue(item).unwrap();
        let worker = {
            let s = s.clone();
            std::thread::spawn(move || while s.next_batch().is_some() {})
        };
        match rx.blocking_recv() {
            Some(ResponseEvent::Error(e)) => {
                assert_eq!(e.kind, crate::error::ErrorKind::Unavailable);
                assert!(e.message.contains("timeout"), "{}", e.message);
            }
            other => panic!("expected a timeout error, got {other:?}"),
        }
        s.close();
        worker.join().unwrap();
        let snap = stats.snapshot();
        assert_eq!(snap.fail.count, 1);
        assert_eq!(snap.fail_reasons[FailReason::Rejected as usize], 1);
    }

    #[test]
    fn full_queue_rejects_immediately() {
        let mut p = SchedulerPolicy::default();
        p.levels[0].max_queue_size = 1;
        let s = Scheduler::new(p, Arc::new(ModelStats::default()));
        let (a, _ra) = pending(0, 0, Instant::now());
        let (b, _rb) = pending(0, 0, Instant::now());
        s.enqueue(a).unwrap();
        let e = s.enqueue(b).unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Unavailable);
        s.close();
        assert_eq!(s.next_batch().map(|b| b.len()), Some(1));
        assert!(s.next_batch().is_none());
    }

    #[test]
    fn a_sequence_stays_on_the_instance_that_took_its_start() {
        let policy = SchedulerPolicy {
            sequences: true,
            ..Default::default()
        };
        let s = Scheduler::new(policy, Arc::new(ModelStats::default()));
        let mut keep = Vec::new();
        // (correlation id, flags, label), in arrival order.
        for (id, flags, label) in [
            (1, 1, "s1-start"),
            (1, 0, "s1-mid"),
            (2, 1, "s2-start"),
            (1, 2, "s1-end"),
        ] {
            let (mut p, rx) = pending(0, 0, Instant::now());
            let mut r = (*p.request).clone();
            (r.correlation_id, r.flags, r.id) = (id, flags, label.to_string());
            p.request = Arc::new(r);
            keep.push(rx);
            s.enqueue(p).unwrap();
        }
        // Closed: an instance with nothing of its own left returns None instead of waiting.
        s.close();
        let take = |instance| s.next_batch_for(instance).map(|b| b[0].request.id.clone());
        assert_eq!(take(0).as_deref(), Some("s1-start"));
        // Instance 1 passes over sequence 1, now instance 0's, to the next sequence.
        assert_eq!(take(1).as_deref(), Some("s2-start"));
        assert_eq!(take(1), None);
        assert_eq!(take(0).as_deref(), Some("s1-mid"));
        assert_eq!(take(0).as_deref(), Some("s1-end"));
        assert_eq!(take(0), None);
    }

    #[test]
    fn sequences_batch_together_one_request_each_in_order() {
        let policy = SchedulerPolicy {
            sequences: true,
            batching: Some(policy(3, &[], 0)),
            ..Default::default()
        };
        let s = Scheduler::new(policy, Arc::new(ModelStats::default()));
        let mut keep = Vec::new();
        let wide = vec![vec![2i64]];
        // (correlation id, label, non-batch shape), in arrival order.
        for (id, label, shape) in [
            (1, "s1-a", vec![]),
            (2, "s2-a", vec![]),
            (1, "s1-b", vec![]),
            (3, "s3-a", wide.clone()),
            (3, "s3-b", vec![]),
            (4, "s4-a", vec![]),
            (5, "s5-a", vec![]),
        ] {
            let (mut p, rx) = pending(0, 0, Instant::now());
            let mut r = (*p.request).clone();
            (r.correlation_id, r.flags, r.id) = (id, 1, label.to_string());
            p.request = Arc::new(r);
            p.shape_key = shape;
            keep.push(rx);
            s.enqueue(p).unwrap();
        }
        s.close();
        let take = |instance| {
            s.next_batch_for(instance)
                .map(|b| b.iter().map(|p| p.request.id.clone()).collect::<Vec<_>>())
        };
        // s1's second request waits for its first; s3's first has another shape, so its
        // second may not pass it; the batch stops at max_batch_size 3.
        assert_eq!(take(0).unwrap(), ["s1-a", "s2-a", "s4-a"]);
        // Instance 1 takes what is not bound to instance 0.
        assert_eq!(take(1).unwrap(), ["s3-a"]);
        assert_eq!(take(0).unwrap(), ["s1-b", "s5-a"]);
        assert_eq!(take(1).unwrap(), ["s3-b"]);
        assert_eq!(take(0), None);
    }
}
