//! A backend that misbehaves on purpose, to prove a failure never crosses the ABI.
//!
//! Model parameter `fail_in` selects where: `model_init` / `instance_init` / `execute`
//! panic there; `execute_once` panics in the first execution of each instance only;
//! `execute_error` returns an error from execute. Otherwise OUTPUT0 = INPUT0.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kiln_sdk::{
    export_backend, Backend, Error, Instance, InstanceInfo, Model, ModelInfo, Request, Response,
    Result,
};

struct Faulty;
struct FaultyModel {
    fail_in: String,
    panicked_once: Arc<AtomicBool>,
}
struct FaultyInstance {
    fail_in: String,
    panicked_once: Arc<AtomicBool>,
}

impl Backend for Faulty {
    type Model = FaultyModel;
    fn initialize() -> Result<Self> {
        Ok(Faulty)
    }
    fn load_model(&self, info: &ModelInfo) -> Result<FaultyModel> {
        let cfg: serde_json::Value =
            serde_json::from_str(&info.config_json).map_err(|e| Error::internal(e.to_string()))?;
        let fail_in = cfg["parameters"]["fail_in"]["string_value"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if fail_in == "model_init" {
            panic!("faulty backend: panic in model_init");
        }
        Ok(FaultyModel {
            fail_in,
            panicked_once: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl Model for FaultyModel {
    type Instance = FaultyInstance;
    fn new_instance(&self, _info: &InstanceInfo) -> Result<FaultyInstance> {
        if self.fail_in == "instance_init" {
            panic!("faulty backend: panic in instance_init");
        }
        Ok(FaultyInstance {
            fail_in: self.fail_in.clone(),
            panicked_once: self.panicked_once.clone(),
        })
    }
}

impl Instance for FaultyInstance {
    fn execute(&mut self, requests: &[Request<'_>]) -> Result<()> {
        match self.fail_in.as_str() {
            "execute" => panic!("faulty backend: panic in execute"),
            "execute_once" if !self.panicked_once.swap(true, Ordering::SeqCst) => {
                panic!("faulty backend: first execution panics")
            }
            "execute_error" => return Err(Error::internal("faulty backend: execute failed")),
            _ => {}
        }
        kiln_sdk::infer_each(self, requests)
    }

    fn infer(&mut self, request: &Request<'_>, response: &mut Response) -> Result<()> {
        let t = request.require_input("INPUT0")?;
        response
            .output("OUTPUT0", t.dtype, t.shape, t.data.len())?
            .copy_from_slice(t.data);
        Ok(())
    }
}

export_backend!(Faulty);
