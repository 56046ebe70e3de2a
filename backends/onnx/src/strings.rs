//! STRING tensors. candle has no string type, so the executor holds a STRING tensor as an
//! I64 tensor of indices into a [`StringTable`], where equal strings share one index. Shape
//! and indexing operators (Reshape, Gather, Concat, Slice, Where, …) then move strings as
//! they move numbers, and `Equal` compares them. The planner works out which values hold
//! strings ([`mark`]), rejects operators that cannot take them, and turns casts from and to
//! STRING into [`PARSE`] and [`FORMAT`] nodes, which read the table.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_onnx::onnx::{NodeProto, TensorProto};

use crate::attrs;

/// ONNX's element type number for STRING.
pub const ONNX_STRING: i32 = 8;

/// Internal operator for a cast from STRING: the strings parsed as numbers of type `to`
/// (an ONNX type), or of input 1's type when `to` is absent (from a `CastLike`).
pub const PARSE: &str = "KilnParseStrings";
/// Internal operator for a cast to STRING: each number as decimal text, as onnxruntime
/// writes it (`%.8g` for FLOAT and DOUBLE alike, `NaN`, `INF`, `-INF`).
pub const FORMAT: &str = "KilnFormatStrings";

/// Strings with their indices; each distinct string once.
#[derive(Default, Debug)]
pub struct Interned {
    strings: Vec<Box<[u8]>>,
    index: HashMap<Box<[u8]>, i64>,
}

impl Interned {
    fn find(&self, s: &[u8]) -> Option<i64> {
        self.index.get(s).copied()
    }

    fn push(&mut self, s: &[u8], at: i64) -> i64 {
        let b: Box<[u8]> = s.into();
        self.strings.push(b.clone());
        self.index.insert(b, at);
        at
    }
}

/// The strings one run of a plan sees: the plan's constant strings (shared) and those the
/// run adds (its inputs and casts).
#[derive(Debug)]
pub struct StringTable {
    base: Arc<Interned>,
    local: Mutex<Interned>,
}

impl Default for StringTable {
    fn default() -> Self {
        Self::on(Arc::default())
    }
}

impl StringTable {
    /// A table for one run over `base` (a plan's constant strings).
    pub fn on(base: Arc<Interned>) -> Self {
        StringTable {
            base,
            local: Mutex::default(),
        }
    }

    /// Ends planning: the strings added to this table (made with `StringTable::default()`,
    /// so it has no base) become the base of every run's table.
    pub fn freeze(self) -> Arc<Interned> {
        debug_assert!(self.base.strings.is_empty(), "freeze a planning table only");
        Arc::new(
            self.local
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// The index of `s`, added if new.
    pub fn intern(&self, s: &[u8]) -> i64 {
        if let Some(i) = self.base.find(s) {
            return i;
        }
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        match local.find(s) {
            Some(i) => i,
            None => {
                let at = (self.base.strings.len() + local.strings.len()) as i64;
                local.push(s, at)
            }
        }
    }

    /// A STRING tensor of `elements`, shaped `dims`, on `dev`.
    pub fn tensor<'a>(
        &self,
        elements: impl IntoIterator<Item = &'a [u8]>,
        dims: &[usize],
        dev: &Device,
    ) -> Result<Tensor> {
        let idx: Vec<i64> = elements.into_iter().map(|s| self.intern(s)).collect();
        Tensor::from_vec(idx, dims, dev)
    }

    /// The strings of a STRING tensor, in row-major order, each passed to `f` (which must
    /// not add strings to this table: the table is locked meanwhile).
    pub fn each(&self, t: &Tensor, mut f: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let idx = t
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?;
        let local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        let nb = self.base.strings.len();
        for i in idx {
            let s = usize::try_from(i).ok().and_then(|i| {
                if i < nb {
                    self.base.strings.get(i)
                } else {
                    local.strings.get(i - nb)
                }
            });
            match s {
                Some(s) => f(s)?,
                None => bail!("string index {i} is not in the table"),
            }
        }
        Ok(())
    }

    /// `f` of each string of a STRING tensor, in row-major order.
    pub fn map<T>(&self, t: &Tensor, mut f: impl FnMut(&[u8]) -> Result<T>) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(t.elem_count());
        self.each(t, |s| {
            out.push(f(s)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// The strings of a STRING tensor, in row-major order.
    pub fn strings(&self, t: &Tensor) -> Result<Vec<Vec<u8>>> {
        self.map(t, |s| Ok(s.to_vec()))
    }

    /// A STRING tensor as Triton's BYTES wire format (4-byte little-endian length, then
    /// the bytes, per element).
    pub fn serialize(&self, t: &Tensor) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.each(t, |s| {
            kiln_sdk::push_bytes_element(&mut out, s);
            Ok(())
        })?;
        Ok(out)
    }

    /// A serialized BYTES buffer (see [`StringTable::serialize`]) as a STRING tensor.
    pub fn deserialize(&self, data: &[u8], dims: &[usize], dev: &Device) -> Result<Tensor> {
        let elements = kiln_sdk::bytes_elements(data)
            .collect::<Option<Vec<&[u8]>>>()
            .ok_or_else(|| candle_core::Error::Msg("malformed BYTES data".into()))?;
        let want: usize = dims.iter().product();
        if elements.len() != want {
            bail!(
                "BYTES data holds {} elements but the shape {dims:?} needs {want}",
                elements.len()
            )
        }
        self.tensor(elements, dims, dev)
    }

    /// An ONNX STRING `TensorProto` (initializer, Constant value, test data) as a tensor.
    pub fn from_proto(&self, t: &TensorProto, dev: &Device) -> Result<Tensor> {
        let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
        let want: usize = dims.iter().product();
        if t.string_data.len() != want {
            bail!(
                "STRING tensor '{}' holds {} strings for shape {dims:?}",
                t.name,
                t.string_data.len()
            )
        }
        self.tensor(t.string_data.iter().map(Vec::as_slice), &dims, dev)
    }
}

/// `%.<digits>g` of C's printf: `digits` significant digits, trailing zeros dropped,
/// exponent form (`1.5e+20`, `1e-05`) below 1e-4 and from 10^digits.
fn format_g(v: f64, digits: usize) -> String {
    if v == 0.0 {
        return if v.is_sign_negative() { "-0" } else { "0" }.into();
    }
    let sci = format!("{:.*e}", digits - 1, v);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if exp < -4 || exp >= digits as i32 {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exp.abs())
    } else {
        let decimals = (digits as i32 - 1 - exp).max(0) as usize;
        trim(&format!("{v:.decimals$}"))
    }
}

/// One number as onnxruntime's Cast writes it.
fn format_float(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v < 0.0 { "-INF" } else { "INF" }.into()
    } else {
        format_g(v, digits)
    }
}

/// Runs a [`PARSE`] or [`FORMAT`] node.
pub fn run(node: &NodeProto, ins: &[Option<Tensor>], table: &StringTable) -> Result<Tensor> {
    let Some(Some(x)) = ins.first() else {
        bail!("{} node '{}' has no input", node.op_type, node.name)
    };
    let dev = x.device();
    if node.op_type == FORMAT {
        let texts: Vec<String> = match x.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => {
                let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                v.iter().map(|&f| format_float(f as f64, 8)).collect()
            }
            // onnxruntime writes doubles with 8 significant digits too.
            DType::F64 => {
                let v = x.flatten_all()?.to_vec1::<f64>()?;
                v.iter().map(|&f| format_float(f, 8)).collect()
            }
            _ => {
                let v = x.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
                v.iter().map(i64::to_string).collect()
            }
        };
        return table.tensor(texts.iter().map(|s| s.as_bytes()), x.dims(), dev);
    }
    let to = match attrs::has(node, "to") {
        true => crate::convert::onnx_dtype(attrs::int(node, "to", 1) as i32)
            .ok_or_else(|| candle_core::Error::Msg("Cast to an unsupported type".into()))?,
        false => match ins.get(1) {
            Some(Some(like)) => like.dtype(),
            _ => bail!("{} node '{}' has no target type", node.op_type, node.name),
        },
    };
    let parsed = if to.is_float() {
        Tensor::from_vec(table.map(x, parse_float)?, x.dims(), dev)?
    } else {
        Tensor::from_vec(table.map(x, parse_int)?, x.dims(), dev)?
    };
    parsed.to_dtype(to)
}

fn not_a_number(s: &[u8]) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "cannot cast the string '{}' to a number",
        String::from_utf8_lossy(s)
    ))
}

/// A string as an integer the way onnxruntime reads it (C++'s `stoll`): leading spaces, an
/// optional sign and the digits that follow; anything after them is ignored.
fn parse_int(s: &[u8]) -> Result<i64> {
    let text = std::str::from_utf8(s).unwrap_or("").trim_start();
    let sign = usize::from(text.starts_with(['+', '-']));
    let digits = text[sign..].bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(not_a_number(s));
    }
    text[..sign + digits]
        .parse::<i64>()
        .map_err(|_| not_a_number(s))
}

/// A string as a float the way onnxruntime reads it (C's `strtod`): the longest prefix
/// (after leading spaces) that is a decimal number, optionally with an exponent, or
/// `NaN`, `INF`, `INFINITY` with an optional sign, in any case. (Hexadecimal floats, which
/// strtod also reads, are not.)
fn parse_float(s: &[u8]) -> Result<f64> {
    let text = std::str::from_utf8(s).unwrap_or("").trim_start();
    let sign = usize::from(text.starts_with(['+', '-']));
    let negative = text.starts_with('-');
    let rest = text[sign..].to_ascii_lowercase();
    let special = if rest.starts_with("nan") {
        Some(f64::NAN)
    } else if rest.starts_with("inf") {
        Some(f64::INFINITY)
    } else {
        None
    };
    if let Some(v) = special {
        return Ok(if negative { -v } else { v });
    }
    (1..=text.len())
        .rev()
        .filter(|&end| text.is_char_boundary(end))
        .find_map(|end| {
            let p = &text[..end];
            // Rust also reads "inf"/"nan" words, handled above, so only digits count here.
            let numeric = p.bytes().any(|b| b.is_ascii_digit())
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
            numeric.then(|| p.parse::<f64>().ok()).flatten()
        })
        // Out of range, as stod reports it: too large, or too small for a nonzero number.
        .filter(|v| v.is_finite())
        .filter(|&v| {
            v != 0.0
                || !rest
                    .split(['e', 'E'])
                    .next()
                    .unwrap_or("")
                    .bytes()
                    .any(|b| (b'1'..=b'9').contains(&b))
        })
        .ok_or_else(|| not_a_number(s))
}

/// Where each operator may take STRING inputs (`None`: any input) and whether its outputs
/// are then STRING. Every other operator rejects STRING inputs at load.
fn string_inputs(op: &str) -> Option<(Option<&'static [usize]>, bool)> {
    Some(match op {
        "Identity"
        | "Reshape"
        | "Flatten"
        | "Squeeze"
        | "Unsqueeze"
        | "Transpose"
        | "Gather"
        | "GatherElements"
        | "GatherND"
        | "Slice"
        | "Split"
        | "Expand"
        | "Tile"
        | "Compress"
        | "ReverseSequence"
        | "DepthToSpace"
        | "SpaceToDepth"
        | "ArrayFeatureExtractor" => (Some(&[0]), true),
        "Concat" => (None, true),
        "ScatterElements" | "ScatterND" => (Some(&[0, 2]), true),
        "Where" => (Some(&[1, 2]), true),
        "Shape" | "Size" => (Some(&[0]), false),
        "Equal" => (Some(&[0, 1]), false),
        _ => return None,
    })
}

/// Whether `node` is a `Constant` whose value is STRING (folded with [`constant`]).
pub fn constant_is_string(node: &NodeProto) -> bool {
    node.op_type == "Constant"
        && (attrs::tensor(node, "value").is_some_and(|t| t.data_type == ONNX_STRING)
            || attrs::has(node, "value_strings")
            || attrs::has(node, "value_string"))
}

/// A STRING `Constant` node's value, interned in `table`.
pub fn constant(node: &NodeProto, table: &StringTable, dev: &Device) -> Result<Tensor> {
    if let Some(t) = attrs::tensor(node, "value") {
        return table.from_proto(t, dev);
    }
    let a = node
        .attribute
        .iter()
        .find(|a| a.name == "value_strings" || a.name == "value_string");
    match a {
        Some(a) if a.name == "value_string" => table.tensor([a.s.as_slice()], &[], dev),
        Some(a) => table.tensor(a.strings.iter().map(Vec::as_slice), &[a.strings.len()], dev),
        None => bail!("Constant node '{}' has no value", node.name),
    }
}

/// Works out which values of `nodes` (in graph order) hold strings, starting from the
/// STRING graph inputs and initializers in `seeds`; checks that every operator reading a
/// string can; and rewrites casts from or to STRING into [`PARSE`] / [`FORMAT`] (a cast
/// from STRING to STRING into `Identity`). Returns every STRING value.
pub fn mark(
    nodes: &mut [NodeProto],
    seeds: HashSet<String>,
) -> std::result::Result<HashSet<String>, String> {
    let mut strings = seeds;
    for node in nodes.iter_mut() {
        let is_str = |i: &String| strings.contains(i);
        let reads: Vec<usize> = (0..node.input.len())
            .filter(|&k| is_str(&node.input[k]))
            .collect();
        // The ai.onnx.ml operators whose STRING typing depends on their attributes.
        if node.domain == crate::ml::DOMAIN {
            if let Some(outs) = crate::ml::string_outputs(node, &reads) {
                let outs = outs?.into_iter().filter_map(|k| node.output.get(k));
                strings.extend(outs.filter(|o| !o.is_empty()).cloned());
                continue;
            }
        }
        let op = node.op_type.as_str();
        let out_string = match op {
            "Constant" => constant_is_string(node),
            "Cast" | "CastLike" => {
                let to_string = if op == "Cast" {
                    attrs::int(node, "to", 1) as i32 == ONNX_STRING
                } else {
                    node.input.get(1).is_some_and(is_str)
                };
                let from_string = reads.contains(&0);
                node.op_type = match (from_string, to_string) {
                    (true, true) => "Identity",
                    (true, false) => PARSE,
                    (false, true) => FORMAT,
                    (false, false) => op,
                }
                .into();
                if node.op_type == "Identity" || node.op_type == FORMAT {
                    node.input.truncate(1);
                }
                to_string
            }
            _ if reads.is_empty() => false,
            _ if crate::text::handles(node) => {
                let (at, out) = crate::text::string_io(op).unwrap_or((&[], false));
                if let Some(k) = reads.iter().find(|k| !at.contains(k)) {
                    return Err(format!(
                        "node '{}' ({op}): input '{}' must not be STRING",
                        node.name, node.input[*k]
                    ));
                }
                // StringSplit's second output counts the parts.
                if out {
                    strings.extend(node.output.first().filter(|o| !o.is_empty()).cloned());
                }
                continue;
            }
            _ => {
                let allowed = string_inputs(op)
                    .filter(|(at, _)| at.is_none_or(|at| reads.iter().all(|k| at.contains(k))));
                let Some((_, out)) = allowed else {
                    let what = if crate::control::is_control(op) {
                        "STRING values inside If/Loop subgraphs are not supported".to_string()
                    } else {
                        format!(
                            "the operator does not take STRING input '{}'",
                            node.input[reads[0]]
                        )
                    };
                    return Err(format!("node '{}' ({op}): {what}", node.name));
                };
                out
            }
        };
        if out_string {
            // Shape and Size report only their first output as numbers.
            strings.extend(node.output.iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    Ok(strings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_printf_g() {
        let cases = [
            (0.9767611f32 as f64, 8, "0.9767611"),
            (0.039187793f32 as f64, 8, "0.039187793"),
            (1e10, 8, "1e+10"),
            (123456789.0, 8, "1.2345679e+08"),
            (12345678.0, 8, "12345678"),
            (0.0001, 8, "0.0001"),
            (0.00001, 8, "1e-05"),
            (-2.5, 8, "-2.5"),
            (0.1, 17, "0.10000000000000001"),
            (3.0, 17, "3"),
        ];
        for (v, d, want) in cases {
            assert_eq!(format_g(v, d), want, "{v} with {d} digits");
        }
        assert_eq!(format_float(f64::NEG_INFINITY, 8), "-INF");
        assert_eq!(format_float(f64::NAN, 8), "NaN");
    }

    /// FLOAT → STRING as onnxruntime 1.20.1's Cast wrote these values (the ONNX reference
    /// writes the shortest round-trip text instead, e.g. 0.6048455; Triton runs onnxruntime).
    #[test]
    fn formats_floats_as_onnxruntime_does() {
        let cases: [(f32, &str); 20] = [
            (0.6048455, "0.60484552"),
            (0.7392636, "0.73926359"),
            (1e10, "1e+10"),
            (123456789.0, "1.2345679e+08"),
            (16777216.0, "16777216"),
            (0.1, "0.1"),
            (1.0 / 3.0, "0.33333334"),
            (1e-5, "9.9999997e-06"),
            (f32::INFINITY, "INF"),
            (3.0, "3"),
            (-0.0, "-0"),
            (1.0000001, "1.0000001"),
            (2.5e-7, "2.5e-07"),
            (1e16, "1e+16"),
            (1e15, "9.9999999e+14"),
            (123456.7, "123456.7"),
            (1e-4, "9.9999997e-05"),
            (0.00012345678, "0.00012345678"),
            (99999999.0, "1e+08"),
            (4e-45, "4.2038954e-45"),
        ];
        for (v, want) in cases {
            assert_eq!(format_float(v as f64, 8), want, "{v:e}");
        }
        // DOUBLE → STRING, as onnxruntime 1.20.1 wrote these: also 8 digits.
        let doubles = [
            (1.0 / 3.0, "0.33333333"),
            (1e20, "1e+20"),
            (-2.5e-7, "-2.5e-07"),
            (123456789.123, "1.2345679e+08"),
        ];
        for (v, want) in doubles {
            assert_eq!(format_float(v, 8), want, "{v:e}");
        }
    }

    #[test]
    fn equal_strings_share_an_index_across_base_and_run() {
        let plan = StringTable::default();
        let a = plan.intern(b"a");
        let base = plan.freeze();
        let run = StringTable::on(base);
        assert_eq!(run.intern(b"a"), a);
        let b = run.intern(b"b");
        assert_ne!(b, a);
        assert_eq!(run.intern(b"b"), b);
        let t = run
            .tensor([&b"b"[..], b"a", b"", b"b"], &[2, 2], &Device::Cpu)
            .unwrap();
        assert_eq!(
            run.strings(&t).unwrap(),
            vec![b"b".to_vec(), b"a".to_vec(), vec![], b"b".to_vec()]
        );
        let wire = run.serialize(&t).unwrap();
        let back = run.deserialize(&wire, &[4], &Device::Cpu).unwrap();
        assert_eq!(run.strings(&back).unwrap(), run.strings(&t).unwrap());
        assert!(run.deserialize(&wire, &[5], &Device::Cpu).is_err());
    }

    #[test]
    fn parses_numbers_and_rejects_text() {
        assert_eq!(parse_int(b"-12").unwrap(), -12);
        assert_eq!(parse_int(b"  +7").unwrap(), 7);
        assert_eq!(parse_int(b"9007199254740993").unwrap(), 9007199254740993);
        // As stoll: the digits before anything else.
        assert_eq!(parse_int(b"1.5").unwrap(), 1);
        assert_eq!(parse_int(b"12abc").unwrap(), 12);
        assert!(parse_int(b"x1").is_err());
        assert!(parse_int(b"").is_err());
        assert!(parse_int(b"99999999999999999999").is_err());
        assert_eq!(parse_float(b"2.5e-3xyz").unwrap(), 2.5e-3);
        assert_eq!(parse_float(b"-Infinity").unwrap(), f64::NEG_INFINITY);
        assert_eq!(parse_float(b"1e").unwrap(), 1.0);
        assert_eq!(parse_float(b"-.5e1").unwrap(), -5.0);
        assert_eq!(parse_float(b"0.0").unwrap(), 0.0);
        assert!(parse_float(b"1e400").is_err());
        assert!(parse_float(b"1e-400").is_err());
        assert!(parse_float(b"").is_err());
        assert_eq!(parse_float(b"1.5e3").unwrap(), 1500.0);
        assert_eq!(parse_float(b"+INF").unwrap(), f64::INFINITY);
        assert_eq!(parse_float(b"-inf").unwrap(), f64::NEG_INFINITY);
        assert!(parse_float(b"NaN").unwrap().is_nan());
        assert!(parse_float(b"abc").is_err());
    }
}
