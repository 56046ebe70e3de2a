//! Where a request's responses go, and `preserve_ordering`: responses leave in the order
//! the requests arrived, even when later requests finish first on another instance.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedSender;

use crate::error::CoreError;
use crate::request::ResponseEvent;

/// The sending end of one request's responses. Every request ends with exactly one final
/// event; a sink dropped without one sends an error, so ordered delivery never stalls.
pub struct ResponseSink {
    tx: UnboundedSender<ResponseEvent>,
    order: Option<(Arc<OrderGate>, u64)>,
    done: AtomicBool,
}

impl ResponseSink {
    /// A sink delivering straight to `tx`.
    pub fn new(tx: UnboundedSender<ResponseEvent>) -> Self {
        ResponseSink {
            tx,
            order: None,
            done: AtomicBool::new(false),
        }
    }

    /// Routes this sink through `gate` as the request with arrival number `seq`.
    pub fn set_order(&mut self, gate: Arc<OrderGate>, seq: u64) {
        self.order = Some((gate, seq));
    }

    /// Delivers an event (held back while earlier requests are unanswered, if ordered).
    pub fn send(&self, event: ResponseEvent) {
        if event.is_final() {
            self.done.store(true, Ordering::Relaxed);
        }
        match &self.order {
            None => {
                let _ = self.tx.send(event);
            }
            Some((gate, seq)) => gate.deliver(*seq, &self.tx, event),
        }
    }

    /// Whether the receiver (the client) has gone away.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Drop for ResponseSink {
    fn drop(&mut self) {
        if !self.done.load(Ordering::Relaxed) {
            self.send(ResponseEvent::Error(CoreError::internal(
                "the request ended without a response",
            )));
        }
    }
}

#[derive(Default)]
struct GateState {
    /// Arrival number of the oldest request not yet finished.
    next: u64,
    /// Next arrival number to hand out.
    issued: u64,
    /// Events of later requests, waiting for `next` to finish: (receiver, events, finished).
    held: BTreeMap<u64, (UnboundedSender<ResponseEvent>, Vec<ResponseEvent>, bool)>,
}

/// Releases responses in arrival order (one per model with `preserve_ordering: true`).
#[derive(Default)]
pub struct OrderGate {
    state: Mutex<GateState>,
}

impl OrderGate {
    /// The next arrival number; call in arrival order.
    pub fn issue(&self) -> u64 {
        let mut st = self.lock();
        st.issued += 1;
        st.issued - 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver(&self, seq: u64, tx: &UnboundedSender<ResponseEvent>, event: ResponseEvent) {
        let mut st = self.lock();
        if seq != st.next {
            let last = event.is_final();
            let entry = st
                .held
                .entry(seq)
                .or_insert_with(|| (tx.clone(), Vec::new(), false));
            entry.1.push(event);
            entry.2 |= last;
            return;
        }
        let last = event.is_final();
        let _ = tx.send(event);
        if !last {
            return;
        }
        st.next += 1;
        // Release what later requests produced meanwhile, stopping at one still running.
        loop {
            let next = st.next;
            let Some((tx, events, finished)) = st.held.remove(&next) else {
                break;
            };
            for e in events {
                let _ = tx.send(e);
            }
            if !finished {
                break;
            }
            st.next += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::InferResponse;

    fn resp(id: &str, last: bool) -> ResponseEvent {
        ResponseEvent::Response {
            response: InferResponse {
                model_name: "m".into(),
                model_version: 1,
                id: id.into(),
                outputs: vec![],
                parameters: Default::default(),
            },
            last,
        }
    }

    fn ids(rx: &mut tokio::sync::mpsc::UnboundedReceiver<ResponseEvent>) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(e) = rx.try_recv() {
            v.push(match e {
                ResponseEvent::Response { response, last } => {
                    format!("{}{}", response.id, if last { "!" } else { "" })
                }
                ResponseEvent::Error(_) | ResponseEvent::StreamError(_) => "err".into(),
                ResponseEvent::Final => "final".into(),
            });
        }
        v
    }

    #[test]
    fn later_requests_wait_for_earlier_ones() {
        let gate = Arc::new(OrderGate::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sinks: Vec<_> = (0..3)
            .map(|_| {
                let mut s = ResponseSink::new(tx.clone());
                s.set_order(gate.clone(), gate.issue());
                s
            })
            .collect();
        sinks[2].send(resp("c", true));
        sinks[1].send(resp("b", false));
        assert!(ids(&mut rx).is_empty());
        sinks[0].send(resp("a", true));
        assert_eq!(ids(&mut rx), ["a!", "b"]);
        sinks[1].send(resp("b", true));
        assert_eq!(ids(&mut rx), ["b!", "c!"]);
    }

    #[test]
    fn a_dropped_sink_does_not_stall_the_others() {
        let gate = Arc::new(OrderGate::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut first = ResponseSink::new(tx.clone());
        first.set_order(gate.clone(), gate.issue());
        let mut second = ResponseSink::new(tx.clone());
        second.set_order(gate.clone(), gate.issue());
        second.send(resp("b", true));
        drop(first);
        assert_eq!(ids(&mut rx), ["err", "b!"]);
    }
}
