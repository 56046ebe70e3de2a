//! Nodes the instance's device cannot run fall back to the CPU, as onnxruntime's CUDA
//! provider hands such nodes to its CPU provider: when an operator fails on a GPU (candle
//! has no kernel for it there, or one of this backend's kernels is CPU-only), its inputs are
//! copied to the CPU, it runs there, and its outputs are copied back. A step that needed
//! the CPU once goes straight there on later runs; a node that fails on the CPU as well
//! (a bad input) returns that error and changes nothing.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::ops::Ctx;

/// Whether a planned step has had to run on the CPU.
#[derive(Debug, Default)]
pub(crate) struct OnCpu(AtomicBool);

/// Runs `op` (the node's operator on `ins`) on `ctx.dev`, with the CPU fallback above when
/// that is not the CPU. Every output is returned on `ctx.dev`. `seen` is the step's memory
/// of a fallback (none while planning: a folded node runs once).
pub(crate) fn run(
    node: &NodeProto,
    ins: &[Option<Tensor>],
    ctx: &Ctx<'_>,
    seen: Option<&OnCpu>,
    op: impl Fn(&[Option<Tensor>], &Ctx<'_>) -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    if ctx.dev.is_cpu() {
        return op(ins, ctx);
    }
    let on_device = |outs: Vec<Tensor>| -> Result<Vec<Tensor>> {
        outs.into_iter().map(|t| t.to_device(ctx.dev)).collect()
    };
    let cpu = Ctx {
        dev: &Device::Cpu,
        opset: ctx.opset,
        threads: ctx.threads,
    };
    let on_cpu = || -> Result<Vec<Tensor>> {
        let ins = ins
            .iter()
            .map(|t| t.as_ref().map(|t| t.to_device(&Device::Cpu)).transpose())
            .collect::<Result<Vec<_>>>()?;
        op(&ins, &cpu)
    };
    if seen.is_some_and(|s| s.0.load(Ordering::Relaxed)) {
        return on_device(on_cpu()?);
    }
    let why = match catch_unwind(AssertUnwindSafe(|| op(ins, ctx))) {
        Ok(Ok(outs)) => return on_device(outs),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into()),
    };
    let outs = on_cpu()?;
    if seen.is_none_or(|s| !s.0.swap(true, Ordering::Relaxed)) {
        kiln_sdk::log(
            kiln_sdk::LogLevel::Warn,
            &format!(
                "onnx: node '{}' ({}) runs on the CPU: on {:?} it failed: {why}",
                node.name,
                node.op_type,
                ctx.dev.location()
            ),
        );
    }
    on_device(outs)
}
