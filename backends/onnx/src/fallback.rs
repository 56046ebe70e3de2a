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
    let cpu = Ctx {
        dev: &Device::Cpu,
        opset: ctx.opset,
        threads: ctx.threads,
    };
    off_cpu(node, ins, [ctx, &cpu], seen, op)
}

/// [`run`] off the CPU: the node on `ctx` (the device), else on `cpu`.
fn off_cpu(
    node: &NodeProto,
    ins: &[Option<Tensor>],
    [ctx, cpu]: [&Ctx<'_>; 2],
    seen: Option<&OnCpu>,
    op: impl Fn(&[Option<Tensor>], &Ctx<'_>) -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let on_device = |outs: Vec<Tensor>| -> Result<Vec<Tensor>> {
        outs.into_iter().map(|t| t.to_device(ctx.dev)).collect()
    };
    let on_cpu = || -> Result<Vec<Tensor>> {
        let ins = ins
            .iter()
            .map(|t| t.as_ref().map(|t| t.to_device(cpu.dev)).transpose())
            .collect::<Result<Vec<_>>>()?;
        op(&ins, cpu)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// The "device" here is the CPU with 99 threads, so the fallback runs without a GPU.
    fn contexts() -> [Ctx<'static>; 2] {
        let ctx = |threads| Ctx {
            dev: &Device::Cpu,
            opset: 17,
            threads,
        };
        [ctx(99), ctx(1)]
    }

    fn one() -> Vec<Option<Tensor>> {
        vec![Some(Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap())]
    }

    /// Doubles its input on the CPU; on the device, `device` says what happens.
    fn op<'a>(
        device: &'a dyn Fn() -> Result<()>,
        calls: &'a AtomicUsize,
    ) -> impl Fn(&[Option<Tensor>], &Ctx<'_>) -> Result<Vec<Tensor>> + 'a {
        move |ins, ctx| {
            if ctx.threads == 99 {
                calls.fetch_add(1, Ordering::Relaxed);
                device()?;
            }
            Ok(vec![(ins[0].as_ref().unwrap() * 2.0)?])
        }
    }

    fn run_once(
        seen: &OnCpu,
        device: &dyn Fn() -> Result<()>,
        calls: &AtomicUsize,
    ) -> Result<Vec<f32>> {
        let [dev, cpu] = contexts();
        let outs = off_cpu(
            &NodeProto::default(),
            &one(),
            [&dev, &cpu],
            Some(seen),
            op(device, calls),
        )?;
        outs[0].to_vec1::<f32>()
    }

    #[test]
    fn a_node_the_device_fails_runs_on_the_cpu_from_then_on() {
        let (seen, calls) = (OnCpu::default(), AtomicUsize::new(0));
        let fails = || Err(candle_core::Error::Msg("no kernel".into()));
        assert_eq!(run_once(&seen, &fails, &calls).unwrap(), [2.0, 4.0]);
        assert!(seen.0.load(Ordering::Relaxed));
        assert_eq!(run_once(&seen, &fails, &calls).unwrap(), [2.0, 4.0]);
        assert_eq!(calls.load(Ordering::Relaxed), 1, "the device is tried once");
    }

    #[test]
    fn a_panic_on_the_device_falls_back_too() {
        let (seen, calls) = (OnCpu::default(), AtomicUsize::new(0));
        let panics = || -> Result<()> { panic!("unsupported dtype") };
        assert_eq!(run_once(&seen, &panics, &calls).unwrap(), [2.0, 4.0]);
        assert!(seen.0.load(Ordering::Relaxed));
    }

    #[test]
    fn a_node_that_runs_on_the_device_stays_there() {
        let (seen, calls) = (OnCpu::default(), AtomicUsize::new(0));
        assert_eq!(run_once(&seen, &|| Ok(()), &calls).unwrap(), [2.0, 4.0]);
        assert_eq!(run_once(&seen, &|| Ok(()), &calls).unwrap(), [2.0, 4.0]);
        assert!(!seen.0.load(Ordering::Relaxed));
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_bad_input_fails_everywhere_and_changes_nothing() {
        let [dev, cpu] = contexts();
        let seen = OnCpu::default();
        let bad = |_: &[Option<Tensor>], _: &Ctx<'_>| -> Result<Vec<Tensor>> {
            Err(candle_core::Error::Msg("shape mismatch".into()))
        };
        let err = off_cpu(
            &NodeProto::default(),
            &one(),
            [&dev, &cpu],
            Some(&seen),
            bad,
        )
        .unwrap_err();
        assert!(err.to_string().contains("shape mismatch"));
        assert!(!seen.0.load(Ordering::Relaxed));
    }
}
