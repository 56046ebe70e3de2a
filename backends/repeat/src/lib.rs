//! The `repeat` backend, for decoupled models (like Triton's `repeat_int32` test model).
//!
//! For a request with `IN` (INT32, shape [N]) and optional `DELAY` (UINT32 milliseconds,
//! shape [N]) it sends N responses, the i-th with `OUT` = [IN[i]] and `IDX` = [i] after
//! sleeping DELAY[i] ms, then ends the request with the final flag alone. N = 0 gives
//! only the final flag.
use std::time::Duration;

use kiln_sdk::{
    export_backend, Backend, DataType, Error, Instance, InstanceInfo, Model, ModelInfo, Request,
    Response, Result,
};

/// The backend (stateless).
pub struct Repeat;
/// A model (stateless).
pub struct RepeatModel;
/// An instance (stateless).
pub struct RepeatInstance;

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
        Ok(RepeatInstance)
    }
}

impl RepeatInstance {
    fn repeat(&self, request: &Request<'_>) -> Result<()> {
        let values: Vec<i32> = request.require_input("IN")?.to_vec()?;
        let delays: Vec<u32> = match request.input("DELAY") {
            Some(t) => t.to_vec()?,
            None => Vec::new(),
        };
        if !delays.is_empty() && delays.len() != values.len() {
            return Err(Error::invalid_arg(format!(
                "DELAY has {} elements but IN has {}",
                delays.len(),
                values.len()
            )));
        }
        for (i, v) in values.iter().enumerate() {
            if request.is_cancelled() {
                break;
            }
            if let Some(&ms) = delays.get(i) {
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
}

impl Instance for RepeatInstance {
    fn infer(&mut self, _request: &Request<'_>, _response: &mut Response) -> Result<()> {
        Err(Error::internal("repeat answers through execute"))
    }

    fn execute(&mut self, requests: &[Request<'_>]) -> Result<()> {
        for request in requests {
            if let Err(e) = self.repeat(request) {
                // Only this request fails; the error is its final response.
                request.response()?.send_error(e)?;
            }
        }
        Ok(())
    }
}

export_backend!(Repeat);
