//! The `identity` backend: output `OUTPUT<x>` is an exact copy (bytes and shape) of input
//! `INPUT<x>`. Serves `identity_fp32`, `identity_all_dtypes` and `simple_identity`.
//!
//! Like Triton's identity backend, every response carries the parameters `param0`
//! (a string), `param1` (42) and `param2` (false).
//!
//! Model parameter `execute_delay_ms` (optional) sleeps in every execution, which tests
//! use to observe batching and graceful shutdown.
use std::time::Duration;

use kiln_sdk::{
    export_backend, Backend, Instance, InstanceInfo, Model, ModelInfo, Parameter, Request,
    Response, Result,
};

/// The backend (stateless).
pub struct Identity;

/// A model: only its configured delay.
pub struct IdentityModel {
    delay: Duration,
}

/// An instance.
pub struct IdentityInstance {
    delay: Duration,
}

impl Backend for Identity {
    type Model = IdentityModel;
    fn initialize() -> Result<Self> {
        Ok(Identity)
    }
    fn load_model(&self, info: &ModelInfo) -> Result<IdentityModel> {
        let cfg: serde_json::Value = serde_json::from_str(&info.config_json)
            .map_err(|e| kiln_sdk::Error::internal(format!("bad config JSON: {e}")))?;
        let delay_ms = cfg["parameters"]["execute_delay_ms"]["string_value"]
            .as_str()
            .map(|s| {
                s.parse::<u64>().map_err(|_| {
                    kiln_sdk::Error::invalid_arg(format!(
                        "parameter execute_delay_ms must be an integer, got '{s}'"
                    ))
                })
            })
            .transpose()?
            .unwrap_or(0);
        Ok(IdentityModel {
            delay: Duration::from_millis(delay_ms),
        })
    }
}

impl Model for IdentityModel {
    type Instance = IdentityInstance;
    fn new_instance(&self, _info: &InstanceInfo) -> Result<IdentityInstance> {
        Ok(IdentityInstance { delay: self.delay })
    }
}

/// The input an output copies: `OUTPUT_FP32` ← `INPUT_FP32`, `OUTPUT0` ← `INPUT0`.
pub fn source_input(output: &str) -> Option<String> {
    output
        .strip_prefix("OUTPUT")
        .map(|rest| format!("INPUT{rest}"))
}

impl Instance for IdentityInstance {
    fn execute(&mut self, requests: &[Request<'_>]) -> Result<()> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        kiln_sdk::infer_each(self, requests)
    }

    fn infer(&mut self, request: &Request<'_>, response: &mut Response) -> Result<()> {
        for out in request.requested_outputs() {
            let Some(src) = source_input(out).and_then(|n| request.input(&n)) else {
                continue;
            };
            response
                .output(out, src.dtype, src.shape, src.data.len())?
                .copy_from_slice(src.data);
        }
        // The response parameters Triton's identity backend attaches to every response.
        response.set_parameter("param0", Parameter::Str("an example string parameter"))?;
        response.set_parameter("param1", Parameter::Int(42))?;
        response.set_parameter("param2", Parameter::Bool(false))?;
        Ok(())
    }
}

export_backend!(Identity);
