//! `extern "C"` trampolines behind `export_backend!`. Each catches panics.
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use kiln_abi::{
    self as abi, KilnError, KilnHostApi, KilnInstanceInfo, KilnModelInfo, KilnRequestView,
};

use crate::error::{Error, Result};
use crate::request::Request;
use crate::{compute, host, Backend, Instance, InstanceInfo, InstanceKind, Model, ModelInfo};

type ModelOf<B> = <B as Backend>::Model;
type InstanceOf<B> = <ModelOf<B> as Model>::Instance;

/// Instance state plus what is needed to recreate it after a panic.
struct InstanceCell<B: Backend> {
    model: *const ModelOf<B>,
    info: InstanceInfo,
    instance: Option<InstanceOf<B>>,
    /// The host's token for `report_compute`.
    host_instance: *mut abi::KilnInstance,
}

fn guard(f: impl FnOnce() -> Result<()>) -> *mut KilnError {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(e)) => host::to_abi_error(&e),
        Err(p) => host::to_abi_error(&Error::internal(format!(
            "backend panicked: {}",
            panic_message(&p)
        ))),
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

fn model_info(i: &KilnModelInfo) -> ModelInfo {
    ModelInfo {
        name: text(&i.name),
        version: i.version,
        repository_path: text(&i.repository_path).into(),
        config_json: text(&i.config_json),
    }
}

fn text(k: &abi::KilnStr) -> String {
    // SAFETY: the host passes valid strings for the duration of the call.
    String::from_utf8_lossy(unsafe { k.as_bytes() }).into_owned()
}

/// # Safety
/// Called by the host with a `'static` host table and a valid out pointer.
pub unsafe extern "C" fn backend_init<B: Backend>(
    h: *const KilnHostApi,
    state: *mut *mut c_void,
) -> *mut KilnError {
    // SAFETY: the host table lives for the whole process.
    let Some(hr) = (unsafe { h.as_ref() }) else {
        return std::ptr::null_mut();
    };
    if hr.header.magic != abi::KILN_ABI_MAGIC || hr.header.abi_major != abi::KILN_ABI_MAJOR {
        // Cannot even allocate an error through an unknown host; refuse by leaving state null.
        return std::ptr::null_mut();
    }
    host::set(hr);
    guard(|| {
        let b = B::initialize()?;
        // SAFETY: out pointer provided by the host.
        unsafe { *state = Box::into_raw(Box::new(b)) as *mut c_void };
        Ok(())
    })
}

/// # Safety
/// `state` came from `backend_init::<B>`.
pub unsafe extern "C" fn backend_fini<B: Backend>(state: *mut c_void) -> *mut KilnError {
    guard(|| {
        if !state.is_null() {
            // SAFETY: created by Box::into_raw in backend_init.
            drop(unsafe { Box::from_raw(state as *mut B) });
        }
        Ok(())
    })
}

/// # Safety
/// Valid backend state and info pointers.
pub unsafe extern "C" fn model_init<B: Backend>(
    backend: *mut c_void,
    info: *const KilnModelInfo,
    state: *mut *mut c_void,
) -> *mut KilnError {
    guard(|| {
        // SAFETY: pointers from the host, valid for the call.
        let (b, i) = unsafe { (&*(backend as *const B), &*info) };
        let m = b.load_model(&model_info(i))?;
        // SAFETY: out pointer from the host.
        unsafe { *state = Box::into_raw(Box::new(m)) as *mut c_void };
        Ok(())
    })
}

/// # Safety
/// `model` came from `model_init::<B>`.
pub unsafe extern "C" fn model_fini<B: Backend>(model: *mut c_void) -> *mut KilnError {
    guard(|| {
        if !model.is_null() {
            // SAFETY: created in model_init.
            drop(unsafe { Box::from_raw(model as *mut ModelOf<B>) });
        }
        Ok(())
    })
}

/// # Safety
/// Valid model state and info pointers.
pub unsafe extern "C" fn instance_init<B: Backend>(
    model: *mut c_void,
    info: *const KilnInstanceInfo,
    state: *mut *mut c_void,
) -> *mut KilnError {
    guard(|| {
        // SAFETY: pointers from the host.
        let (m, i) = unsafe { (&*(model as *const ModelOf<B>), &*info) };
        let kind = match i.kind {
            abi::KILN_INSTANCE_GPU => InstanceKind::Gpu(i.device_id),
            abi::KILN_INSTANCE_MODEL => InstanceKind::Model,
            _ => InstanceKind::Cpu,
        };
        let ii = InstanceInfo {
            name: text(&i.name),
            kind,
            index: i.index,
        };
        let inst = m.new_instance(&ii)?;
        let cell: InstanceCell<B> = InstanceCell {
            model: m,
            info: ii,
            instance: Some(inst),
            host_instance: i.host_instance,
        };
        // SAFETY: out pointer from the host.
        unsafe { *state = Box::into_raw(Box::new(cell)) as *mut c_void };
        Ok(())
    })
}

/// # Safety
/// `instance` came from `instance_init::<B>`.
pub unsafe extern "C" fn instance_fini<B: Backend>(instance: *mut c_void) -> *mut KilnError {
    guard(|| {
        if !instance.is_null() {
            // SAFETY: created in instance_init.
            drop(unsafe { Box::from_raw(instance as *mut InstanceCell<B>) });
        }
        Ok(())
    })
}

/// # Safety
/// `instance` came from `instance_init::<B>`; `requests` points to `count` views.
pub unsafe extern "C" fn instance_execute<B: Backend>(
    instance: *mut c_void,
    requests: *const KilnRequestView,
    count: usize,
) -> *mut KilnError {
    // SAFETY: host guarantees exclusive access to the instance during execute.
    let cell = unsafe { &mut *(instance as *mut InstanceCell<B>) };
    let views = if count == 0 {
        &[][..]
    } else {
        unsafe { std::slice::from_raw_parts(requests, count) }
    };
    let reqs: Vec<Request<'_>> = views.iter().map(Request::new).collect();
    compute::take_span();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let inst = match cell.instance.as_mut() {
            Some(i) => i,
            None => {
                // SAFETY: the model outlives its instances (host calls model_fini last).
                let m = unsafe { &*cell.model };
                cell.instance.insert(m.new_instance(&cell.info)?)
            }
        };
        inst.execute(&reqs)
    }));
    let err = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(p) => {
            // The instance may be in any state: drop it (catching a panic in its Drop too)
            // and create a new one before the next batch.
            let old = cell.instance.take();
            let _ = catch_unwind(AssertUnwindSafe(move || drop(old)));
            Some(Error::internal(format!(
                "backend panicked: {}",
                panic_message(&p)
            )))
        }
    };
    // Answer and release every request; the SDK owns them after a successful return.
    let Ok(h) = host::get() else {
        return std::ptr::null_mut();
    };
    if let Some((start, end)) = compute::take_span() {
        // SAFETY: the token the host gave this instance at init.
        let _ = host::check(unsafe { (h.report_compute)(cell.host_instance, start, end) });
    }
    for r in reqs.iter().filter(|r| !r.kept.get()) {
        if !r.finished.get() {
            let e = err
                .clone()
                .unwrap_or_else(|| Error::internal("backend returned no response for the request"));
            let _ = r.response().and_then(|resp| resp.send_error(e));
        }
        // SAFETY: each request handle is released exactly once here.
        let _ =
            host::check(unsafe { (h.request_release)(r.handle(), abi::KILN_REQUEST_RELEASE_ALL) });
    }
    std::ptr::null_mut()
}

/// # Safety
/// `backend` came from `backend_init::<B>`; `info` is valid for the call; `set_config`
/// copies the string it is given.
pub unsafe extern "C" fn model_autocomplete<B: Backend>(
    backend: *mut c_void,
    info: *const KilnModelInfo,
    ctx: *mut c_void,
    set_config: unsafe extern "C" fn(*mut c_void, abi::KilnStr),
) -> *mut KilnError {
    guard(|| {
        // SAFETY: created in backend_init and alive until backend_fini.
        let Some(b) = (unsafe { (backend as *const B).as_ref() }) else {
            return Err(Error::internal("autocomplete before backend_init"));
        };
        // SAFETY: valid for the call.
        let Some(info) = (unsafe { info.as_ref() }) else {
            return Err(Error::internal("autocomplete without model info"));
        };
        let info = model_info(info);
        if let Some(json) = b.autocomplete(&info)? {
            // SAFETY: the host copies the string before returning.
            unsafe { set_config(ctx, abi::KilnStr::from_str(&json)) };
        }
        Ok(())
    })
}

/// # Safety
/// `backend` came from `backend_init::<B>`; `config_json` is valid for the call.
pub unsafe extern "C" fn backend_configure<B: Backend>(
    backend: *mut c_void,
    config_json: abi::KilnStr,
) -> *mut KilnError {
    guard(|| {
        // SAFETY: created in backend_init and alive until backend_fini.
        let Some(b) = (unsafe { (backend as *const B).as_ref() }) else {
            return Err(Error::internal("configure before backend_init"));
        };
        // SAFETY: valid for the call.
        let bytes = unsafe { config_json.as_bytes() };
        let text = std::str::from_utf8(bytes)
            .map_err(|_| Error::invalid_arg("backend config is not UTF-8"))?;
        b.configure(text)
    })
}

/// Current host time in nanoseconds, for compute statistics.
pub fn now_ns() -> u64 {
    host::clock_ns()
}
