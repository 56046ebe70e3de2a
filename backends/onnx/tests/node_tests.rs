//! The ONNX project's own node tests (`onnx/backend/test/data/node/*` from the `onnx` wheel,
//! fetched by `cargo xtask test` into `$KILN_ONNX_TESTS`) run through the executor.
//!
//! Every test is classified pass / fail / unsupported and the report is written to
//! `$CARGO_TARGET_TMPDIR/onnx-node-report.txt`. Each test listed in `node_tests_pass.txt`
//! must pass (a ratchet: the list grows as operators are added). Tolerances are the ONNX
//! backend runner's: rtol 1e-3, atol 1e-7.
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::TensorProto;
use kiln_onnx::plan::{Plan, Value};
use kiln_onnx::strings::StringTable;
use prost::Message;

/// ONNX's `SequenceProto` (onnx-data.proto; candle-onnx leaves it out): test data of a
/// sequence value.
#[derive(Clone, PartialEq, Message)]
struct SequenceProto {
    #[prost(int32, tag = "2")]
    elem_type: i32,
    #[prost(message, repeated, tag = "3")]
    tensor_values: Vec<TensorProto>,
}

/// ONNX's `OptionalProto`: test data of an optional value (a tensor, a sequence, or none).
#[derive(Clone, PartialEq, Message)]
struct OptionalProto {
    #[prost(int32, tag = "2")]
    elem_type: i32,
    #[prost(message, optional, tag = "3")]
    tensor_value: Option<TensorProto>,
    #[prost(message, optional, tag = "5")]
    sequence_value: Option<SequenceProto>,
}

/// How a graph input or output is typed: tensor, sequence or optional.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Tensor,
    Sequence,
    Optional,
}

fn kind_of(model: &candle_onnx::onnx::ModelProto, name: &str, output: bool) -> Kind {
    use candle_onnx::onnx::type_proto::Value as T;
    let g = model.graph.as_ref();
    let list = g.map(|g| if output { &g.output } else { &g.input });
    match list
        .and_then(|l| l.iter().find(|v| v.name == name))
        .and_then(|v| v.r#type.as_ref()?.value.as_ref())
    {
        Some(T::SequenceType(_)) => Kind::Sequence,
        Some(T::OptionalType(_)) => Kind::Optional,
        _ => Kind::Tensor,
    }
}

/// A test-data value of `kind` (a sequence or optional one holds tensors).
fn read_value(path: &Path, kind: Kind, strings: &StringTable) -> Result<Value, String> {
    let conv = |t: &TensorProto| {
        kiln_onnx::convert::tensor_from_proto(t).map_err(|e| format!("{}: {e}", path.display()))
    };
    let bytes = || std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let seq = |s: &SequenceProto| -> Result<Value, String> {
        if s.elem_type > 1 {
            return Err(format!("{}: a sequence of non-tensors", path.display()));
        }
        Ok(Value::Sequence(
            s.tensor_values.iter().map(conv).collect::<Result<_, _>>()?,
        ))
    };
    match kind {
        Kind::Tensor => read_tensor(path, strings).map(Value::Tensor),
        Kind::Sequence => {
            let s = SequenceProto::decode(bytes()?.as_slice()).map_err(|e| e.to_string())?;
            seq(&s)
        }
        Kind::Optional => {
            let o = OptionalProto::decode(bytes()?.as_slice()).map_err(|e| e.to_string())?;
            Ok(Value::Optional(
                match (o.elem_type, &o.tensor_value, &o.sequence_value) {
                    (1, Some(t), _) => Some(Box::new(Value::Tensor(conv(t)?))),
                    (3, _, Some(s)) => Some(Box::new(seq(s)?)),
                    _ => None,
                },
            ))
        }
    }
}

/// Whether two values agree (tensors within the runner's tolerances).
fn same_value(got: &Value, want: &Value) -> Result<(), String> {
    match (got, want) {
        (Value::Tensor(g), Value::Tensor(w)) => close(g, w),
        (Value::Sequence(g), Value::Sequence(w)) => {
            if g.len() != w.len() {
                return Err(format!("a sequence of {}, expected {}", g.len(), w.len()));
            }
            g.iter()
                .zip(w)
                .enumerate()
                .try_for_each(|(i, (g, w))| close(g, w).map_err(|e| format!("item {i}: {e}")))
        }
        (Value::Optional(None), Value::Optional(None)) => Ok(()),
        (Value::Optional(Some(g)), Value::Optional(Some(w))) => same_value(g, w),
        // An optional output holding a value compares as that value.
        (Value::Optional(Some(g)), w) => same_value(g, w),
        (g, Value::Optional(Some(w))) => same_value(g, w),
        _ => Err(format!("{got:?}, expected {want:?}")),
    }
}

enum Outcome {
    Pass,
    Fail(String),
    Unsupported(String),
}

/// A test-data tensor; STRING ones are interned in `strings`.
fn read_tensor(path: &Path, strings: &StringTable) -> Result<Tensor, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tp =
        TensorProto::decode(bytes.as_slice()).map_err(|e| format!("{}: {e}", path.display()))?;
    if tp.data_type == kiln_onnx::strings::ONNX_STRING {
        return strings
            .from_proto(&tp, &Device::Cpu)
            .map_err(|e| format!("{}: {e}", path.display()));
    }
    kiln_onnx::convert::tensor_from_proto(&tp).map_err(|e| format!("{}: {e}", path.display()))
}

/// ONNX's test data stores BFLOAT16 tensors as UINT16 bit patterns (the runner hands them
/// to the model as BFLOAT16): such a tensor (widened to U32 on reading) becomes the BF16
/// tensor it stands for when the graph declares BF16.
fn as_declared(t: Tensor, declared: Option<kiln_sdk::DataType>) -> Result<Tensor, String> {
    if declared != Some(kiln_sdk::DataType::Bf16) || t.dtype() != DType::U32 {
        return Ok(t);
    }
    let bits = t
        .flatten_all()
        .and_then(|f| f.to_vec1::<u32>())
        .map_err(|e| e.to_string())?;
    let v: Vec<half::bf16> = bits
        .iter()
        .map(|&b| half::bf16::from_bits(b as u16))
        .collect();
    Tensor::from_vec(v, t.dims(), &Device::Cpu).map_err(|e| e.to_string())
}

fn close(got: &Tensor, want: &Tensor) -> Result<(), String> {
    if got.dims() != want.dims() {
        return Err(format!(
            "shape {:?}, expected {:?}",
            got.dims(),
            want.dims()
        ));
    }
    let f = |t: &Tensor| -> Result<Vec<f64>, String> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(|e| e.to_string())
    };
    let (g, w) = (f(got)?, f(want)?);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-7 + 1e-3 * b.abs();
        if !ok {
            return Err(format!("element {i}: {a}, expected {b}"));
        }
    }
    Ok(())
}

/// Compares each graph output with its expected tensor file, in output order.
fn compare(
    plan: &Plan,
    outputs: &HashMap<String, Tensor>,
    strings: &StringTable,
    expected: impl Fn(usize) -> Option<std::path::PathBuf>,
) -> Outcome {
    for (i, info) in plan.outputs.iter().enumerate() {
        let Some(path) = expected(i) else { continue };
        let want = match read_tensor(&path, strings).and_then(|t| as_declared(t, info.dtype)) {
            Ok(t) => t,
            Err(e) => return Outcome::Fail(e),
        };
        let Some(got) = outputs.get(&info.name) else {
            return Outcome::Fail(format!("output '{}' missing", info.name));
        };
        if info.dtype == Some(kiln_sdk::DataType::Bytes) {
            let (g, w) = (strings.strings(got), strings.strings(&want));
            if g.is_err() || g.as_ref().ok() != w.as_ref().ok() || got.dims() != want.dims() {
                return Outcome::Fail(format!(
                    "output '{}': {g:?} {:?}, expected {w:?} {:?}",
                    info.name,
                    got.dims(),
                    want.dims()
                ));
            }
            continue;
        }
        // What a client receives: the output in its declared type (INT8 and UINT16 are
        // computed wider and narrowed on the way out).
        let got = match info.dtype {
            Some(dt @ (kiln_sdk::DataType::Int8 | kiln_sdk::DataType::UInt16)) => {
                let shape: Vec<i64> = got.dims().iter().map(|&d| d as i64).collect();
                match kiln_onnx::convert::to_bytes(got, dt)
                    .and_then(|b| kiln_onnx::convert::to_tensor(dt, &shape, &b, &Device::Cpu))
                {
                    Ok(t) => t,
                    Err(e) => return Outcome::Fail(format!("output '{}': {e:?}", info.name)),
                }
            }
            _ => got.clone(),
        };
        if let Err(e) = close(&got, &want) {
            return Outcome::Fail(format!("output '{}': {e}", info.name));
        }
    }
    Outcome::Pass
}

fn run_one(dir: &Path) -> Outcome {
    let model = match candle_onnx::read_file(dir.join("model.onnx")) {
        Ok(m) => m,
        Err(e) => return Outcome::Fail(format!("read: {e}")),
    };
    let plan = match Plan::new(&model, &Device::Cpu) {
        Ok(p) => p,
        Err(e) if e.starts_with("unsupported ONNX operators") => return Outcome::Unsupported(e),
        Err(e) => return Outcome::Fail(e),
    };
    let data = dir.join("test_data_set_0");
    let strings = plan.string_table();
    let kinds_in: Vec<Kind> = plan
        .inputs
        .iter()
        .map(|i| kind_of(&model, &i.name, false))
        .collect();
    let kinds_out: Vec<Kind> = plan
        .outputs
        .iter()
        .map(|o| kind_of(&model, &o.name, true))
        .collect();
    if kinds_in
        .iter()
        .chain(&kinds_out)
        .any(|k| *k != Kind::Tensor)
    {
        return run_values(&plan, &data, &kinds_in, &kinds_out, &strings);
    }
    let mut inputs = HashMap::new();
    for (i, info) in plan.inputs.iter().enumerate() {
        let p = data.join(format!("input_{i}.pb"));
        if !p.exists() {
            continue;
        }
        match read_tensor(&p, &strings).and_then(|t| as_declared(t, info.dtype)) {
            Ok(t) => {
                inputs.insert(info.name.clone(), t);
            }
            Err(e) => return Outcome::Fail(e),
        }
    }
    let outputs = match plan.run_with(inputs, &strings) {
        Ok(o) => o,
        Err(e) => return Outcome::Fail(e),
    };
    compare(&plan, &outputs, &strings, |i| {
        let p = data.join(format!("output_{i}.pb"));
        p.exists().then_some(p)
    })
}

/// `$KILN_ONNX_TESTS/<sub>`, or `None` (with a note) when the test data is not fetched.
fn test_data(sub: &str) -> Option<std::path::PathBuf> {
    let Some(root) = std::env::var_os("KILN_ONNX_TESTS") else {
        eprintln!("KILN_ONNX_TESTS is not set (cargo xtask test fetches the onnx wheel's test data): skipped");
        return None;
    };
    Some(Path::new(&root).join(sub))
}

/// A node test whose graph takes or returns sequences or optionals.
fn run_values(
    plan: &Plan,
    data: &Path,
    kinds_in: &[Kind],
    kinds_out: &[Kind],
    strings: &StringTable,
) -> Outcome {
    let mut inputs = HashMap::new();
    for (i, (info, kind)) in plan.inputs.iter().zip(kinds_in).enumerate() {
        let p = data.join(format!("input_{i}.pb"));
        if !p.exists() {
            continue;
        }
        match read_value(&p, *kind, strings) {
            Ok(v) => {
                inputs.insert(info.name.clone(), v);
            }
            Err(e) => return Outcome::Fail(e),
        }
    }
    let outputs = match plan.run_values(inputs, strings, None, false) {
        Ok(o) => o,
        Err(e) => return Outcome::Fail(e),
    };
    for (i, (info, kind)) in plan.outputs.iter().zip(kinds_out).enumerate() {
        let p = data.join(format!("output_{i}.pb"));
        if !p.exists() {
            continue;
        }
        let want = match read_value(&p, *kind, strings) {
            Ok(v) => v,
            Err(e) => return Outcome::Fail(e),
        };
        let Some(got) = outputs.get(&info.name) else {
            return Outcome::Fail(format!("output '{}' missing", info.name));
        };
        if let Err(e) = same_value(got, &want) {
            return Outcome::Fail(format!("output '{}': {e}", info.name));
        }
    }
    Outcome::Pass
}

#[test]
fn onnx_node_tests() {
    let Some(node) = test_data("node") else {
        return;
    };
    let mut cases: Vec<(String, std::path::PathBuf)> = std::fs::read_dir(&node)
        .expect("node test folder")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("model.onnx").exists())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    cases.sort();
    run_suite(
        &cases,
        run_one,
        "onnx-node-report.txt",
        include_str!("node_tests_pass.txt"),
    );
}

/// Runs every case, writes `<report>` under CARGO_TARGET_TMPDIR (first line: the summary)
/// and asserts that every name listed in `must_pass` (the committed ratchet) passed.
fn run_suite(
    cases: &[(String, std::path::PathBuf)],
    run: fn(&Path) -> Outcome,
    report_name: &str,
    must_pass: &str,
) {
    let mut report = String::new();
    let (mut pass, mut fail, mut unsupported) = (0, 0, 0);
    let mut passed = std::collections::HashSet::new();
    for (name, path) in cases {
        let outcome = catch_unwind(AssertUnwindSafe(|| run(path)))
            .unwrap_or_else(|_| Outcome::Fail("panicked".into()));
        let line = match outcome {
            Outcome::Pass => {
                pass += 1;
                passed.insert(name.clone());
                format!("PASS {name}")
            }
            Outcome::Fail(e) => {
                fail += 1;
                format!("FAIL {name}: {e}")
            }
            Outcome::Unsupported(e) => {
                unsupported += 1;
                format!("UNSUPPORTED {name}: {e}")
            }
        };
        report.push_str(&line);
        report.push('\n');
    }
    let summary = format!(
        "{report_name}: {pass} pass, {fail} fail, {unsupported} unsupported of {}",
        cases.len()
    );
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(report_name);
    std::fs::write(&out, format!("{summary}\n{report}")).expect("write report");
    eprintln!("{summary} (report: {})", out.display());
    // Test data whose expected outputs are onnxruntime's (tests/bench/ort_node_reference.py)
    // holds only the tests onnxruntime runs: the report is the result, not the ratchet.
    if std::env::var_os("KILN_ONNX_REFERENCE_IS_ORT").is_some() {
        return;
    }
    let regressed: Vec<&str> = must_pass
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|n| !passed.contains(*n))
        .collect();
    assert!(
        regressed.is_empty(),
        "cases that passed before now fail: {regressed:?} (see {})",
        out.display()
    );
}

/// The `light` real-architecture models (ResNet-50, DenseNet-121, Inception, VGG, …) with
/// ONNX's reference outputs; the input is ONNX's dummy input (arange(n) / n, unknown dims 1).
fn run_light(model_path: &Path) -> Outcome {
    let model = match candle_onnx::read_file(model_path) {
        Ok(m) => m,
        Err(e) => return Outcome::Fail(format!("read: {e}")),
    };
    let plan = match Plan::new(&model, &Device::Cpu) {
        Ok(p) => p,
        Err(e) if e.starts_with("unsupported ONNX operators") => return Outcome::Unsupported(e),
        Err(e) => return Outcome::Fail(e),
    };
    let mut inputs = HashMap::new();
    for info in &plan.inputs {
        let dims: Vec<usize> = info
            .dims
            .iter()
            .map(|&d| if d > 0 { d as usize } else { 1 })
            .collect();
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
        match Tensor::from_vec(v, dims, &Device::Cpu) {
            Ok(t) => inputs.insert(info.name.clone(), t),
            Err(e) => return Outcome::Fail(e.to_string()),
        };
    }
    let outputs = match plan.run(inputs) {
        Ok(o) => o,
        Err(e) => return Outcome::Fail(e),
    };
    let stem = model_path.with_extension("");
    compare(&plan, &outputs, &plan.string_table(), |i| {
        Some(format!("{}_output_{i}.pb", stem.display()).into())
    })
}

#[test]
fn onnx_light_models() {
    let Some(light) = test_data("light") else {
        return;
    };
    let mut cases: Vec<(String, std::path::PathBuf)> = std::fs::read_dir(&light)
        .expect("light model folder")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .map(|p| {
            (
                p.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                p,
            )
        })
        .collect();
    cases.sort();
    run_suite(
        &cases,
        run_light,
        "onnx-light-report.txt",
        include_str!("light_pass.txt"),
    );
}
