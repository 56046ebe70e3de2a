//! The `repeat` backend, for decoupled models: Triton's `repeat_int32` test model.
//!
//! For a request with `IN` (INT32, shape [N]), `DELAY` (UINT32 milliseconds, shape [N])
//! and `WAIT` (UINT32 milliseconds, shape [1]) it sends N responses from a thread of its
//! own, the i-th with `OUT` = [IN[i]] and `IDX` = [i] after sleeping DELAY[i] ms, then ends
//! the request with the final flag alone (N = 0 gives only the final flag). `execute`
//! returns WAIT ms after it handed the request over, so with WAIT below the sum of the
//! delays one instance streams several requests at once and their responses interleave,
//! as with Triton's repeat backend. `DELAY` and `WAIT` may be left out (no delay).
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_sdk::{
    export_backend, Backend, DataType, Error, Instance, InstanceInfo, Model, ModelInfo,
    OwnedRequest, Request, Response, Result,
};

/// The backend (stateless).
pub struct Repeat;
/// A model (stateless).
pub struct RepeatModel;
/// An instance: how many of its response threads are still running.
pub struct RepeatInstance {
    streaming: Arc<AtomicUsize>,
}

impl Backend for Repeat {
    type Model = RepeatModel;
    fn initialize() -> Result<Self> {
        Ok(Repeat)
    }
    fn load_model(&self, _info: &ModelInfo) -> Result<RepeatModel> {
        Ok(RepeatModel)
    }
}

impl Model for RepeatModel {
    type Instance = RepeatInstance;
    fn new_instance(&self, _info: &InstanceInfo) -> Result<RepeatInstance> {
        Ok(RepeatInstance {
            streaming: Arc::new(AtomicUsize::new(0)),
        })
    }
}

/// What one request asks for: the values to repeat, the delay before each, and how long
/// `execute` waits before it returns.
struct Plan {
    values: Vec<i32>,
    delays: Vec<u32>,
    wait_ms: u32,
}

fn plan(request: &Request<'_>) -> Result<Plan> {
    let values: Vec<i32> = request.require_input("IN")?.to_vec()?;
    let delays: Vec<u32> = match request.input("DELAY") {
        Some(t) => t.to_vec()?,
        None => Vec::new(),
    };
    if !delays.is_empty() && delays.len() != values.len() {
        return Err(Error::invalid_arg(format!(
            "expected IN and DELAY shape to match, got [{}] and [{}]",
            values.len(),
            delays.len()
        )));
    }
    let wait_ms = match request.input("WAIT") {
        Some(t) => match t.to_vec::<u32>()?.as_slice() {
            [w] => *w,
            _ => return Err(Error::invalid_arg("unexpected size for WAIT input")),
        },
        None => 0,
    };
    Ok(Plan {
        values,
        delays,
        wait_ms,
    })
}

/// Sends the responses of one request, then the final flag.
fn stream(owned: &OwnedRequest, plan: &Plan) -> Result<()> {
    let request = owned.request();
    for (i, v) in plan.values.iter().enumerate() {
        if request.is_cancelled() {
            break;
        }
        if let Some(&ms) = plan.delays.get(i) {
            std::thread::sleep(Duration::from_millis(ms.into()));
        }
        let mut r = request.response()?;
        if request.wants("OUT") {
            r.output_from("OUT", DataType::Int32, &[1], &[*v])?;
        }
        if request.wants("IDX") {
            r.output_from("IDX", DataType::UInt32, &[1], &[i as u32])?;
        }
        r.send_partial()?;
    }
    request.complete()
}

impl RepeatInstance {
    /// Hands the request to a response thread; returns how long to wait before returning.
    fn start(&self, request: &Request<'_>) -> Result<u32> {
        let plan = plan(request)?;
        let owned = request.keep()?;
        let wait_ms = plan.wait_ms;
        let streaming = self.streaming.clone();
        streaming.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("kiln-repeat".into())
            .spawn(move || {
                if let Err(e) = stream(&owned, &plan) {
                    let _ = owned.request().response().and_then(|r| r.send_error(e));
                }
                drop(owned);
                streaming.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.streaming.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::internal(format!(
                "cannot start a response thread: {e}"
            )));
        }
        Ok(wait_ms)
    }
}

impl Instance for RepeatInstance {
    fn infer(&mut self, _request: &Request<'_>, _response: &mut Response) -> Result<()> {
        Err(Error::internal("repeat answers through execute"))
    }

    fn execute(&mut self, requests: &[Request<'_>]) -> Result<()> {
        for request in requests {
            match self.start(request) {
                Ok(wait_ms) => std::thread::sleep(Duration::from_millis(wait_ms.into())),
                // Only this request fails; the error is its final response.
                Err(e) => request.response()?.send_error(e)?,
            }
        }
        Ok(())
    }
}

impl Drop for RepeatInstance {
    /// Waits for the response threads, which answer requests of this instance.
    fn drop(&mut self) {
        while self.streaming.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

export_backend!(Repeat);
