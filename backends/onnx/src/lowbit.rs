//! ONNX's 8-bit floats (`FLOAT8E4M3FN`, `FLOAT8E4M3FNUZ`, `FLOAT8E5M2`, `FLOAT8E5M2FNUZ`)
//! and 4-bit integers (`INT4`, `UINT4`), which candle has no types for. The executor holds
//! their values widened — an 8-bit float as the F32 it stands for, INT4 as I16 (as INT8),
//! UINT4 as U8 — so every operator computes on them as on their wide type; a `Cast` (or a
//! `QuantizeLinear`) to one of them rounds and saturates as ONNX specifies, and tensors
//! stored in these types are decoded when read.
use candle_core::{bail, DType, Device, Result, Tensor};

/// ONNX type numbers.
pub const FLOAT8E4M3FN: i32 = 17;
/// See [`FLOAT8E4M3FN`].
pub const FLOAT8E4M3FNUZ: i32 = 18;
/// See [`FLOAT8E4M3FN`].
pub const FLOAT8E5M2: i32 = 19;
/// See [`FLOAT8E4M3FN`].
pub const FLOAT8E5M2FNUZ: i32 = 20;
/// See [`FLOAT8E4M3FN`].
pub const UINT4: i32 = 21;
/// See [`FLOAT8E4M3FN`].
pub const INT4: i32 = 22;

/// Whether ONNX type `t` is one of this module's.
pub fn handles(t: i32) -> bool {
    (FLOAT8E4M3FN..=INT4).contains(&t)
}

/// The layout of an 8-bit float.
#[derive(Clone, Copy)]
struct Fp8 {
    mantissa_bits: i32,
    /// Exponent of the smallest normal number.
    min_exp: i32,
    /// Largest finite value.
    max: f64,
    /// Has infinities (E5M2 only).
    inf: bool,
    /// No negative zero: its bit pattern is NaN (the FNUZ types).
    uz: bool,
}

fn fp8(t: i32) -> Option<Fp8> {
    Some(match t {
        FLOAT8E4M3FN => Fp8 {
            mantissa_bits: 3,
            min_exp: -6,
            max: 448.0,
            inf: false,
            uz: false,
        },
        FLOAT8E4M3FNUZ => Fp8 {
            mantissa_bits: 3,
            min_exp: -7,
            max: 240.0,
            inf: false,
            uz: true,
        },
        FLOAT8E5M2 => Fp8 {
            mantissa_bits: 2,
            min_exp: -14,
            max: 57344.0,
            inf: true,
            uz: false,
        },
        FLOAT8E5M2FNUZ => Fp8 {
            mantissa_bits: 2,
            min_exp: -15,
            max: 57344.0,
            inf: false,
            uz: true,
        },
        _ => return None,
    })
}

impl Fp8 {
    /// `x` rounded to this format (to nearest, ties to even), as ONNX's Cast does: out of
    /// range values saturate to ±max when `saturate`, else become ±inf (E5M2) or NaN.
    fn round(self, x: f32, saturate: bool) -> f32 {
        let x = x as f64;
        if x.is_nan() {
            return f32::NAN;
        }
        let overflow = |neg: bool| {
            let v = if saturate {
                self.max
            } else if self.inf {
                f64::INFINITY
            } else {
                return f32::NAN;
            };
            (if neg { -v } else { v }) as f32
        };
        if x.is_infinite() {
            return overflow(x < 0.0);
        }
        let a = x.abs();
        // The binary exponent of `a` (from its bits: exact), at least the smallest normal's.
        let exp = if a < f64::MIN_POSITIVE {
            self.min_exp
        } else {
            (((a.to_bits() >> 52) & 0x7FF) as i32 - 1023).max(self.min_exp)
        };
        let quantum = 2f64.powi(exp - self.mantissa_bits);
        let r = (a / quantum).round_ties_even() * quantum;
        if r > self.max {
            return overflow(x < 0.0);
        }
        if r == 0.0 && self.uz {
            return 0.0;
        }
        (if x.is_sign_negative() { -r } else { r }) as f32
    }

    /// The value of the 8-bit pattern `b`.
    fn decode(self, b: u8) -> f32 {
        let e_bits = 7 - self.mantissa_bits;
        let m_mask = (1u8 << self.mantissa_bits) - 1;
        let (neg, e, m) = (
            b & 0x80 != 0,
            (b >> self.mantissa_bits) & ((1 << e_bits) - 1),
            b & m_mask,
        );
        let max_e = (1u8 << e_bits) - 1;
        if self.uz && b == 0x80 {
            return f32::NAN;
        }
        if !self.uz && e == max_e {
            if self.inf {
                return if m == 0 {
                    if neg {
                        f32::NEG_INFINITY
                    } else {
                        f32::INFINITY
                    }
                } else {
                    f32::NAN
                };
            }
            if m == m_mask {
                return f32::NAN;
            }
        }
        let frac = m as f64 / (1u32 << self.mantissa_bits) as f64;
        let v = if e == 0 {
            frac * 2f64.powi(self.min_exp)
        } else {
            (1.0 + frac) * 2f64.powi(e as i32 - 1 + self.min_exp)
        };
        (if neg { -v } else { v }) as f32
    }
}

/// `x` cast to ONNX type `to` (one of this module's), held widened.
pub fn cast(x: &Tensor, to: i32, saturate: bool) -> Result<Tensor> {
    if let Some(f) = fp8(to) {
        let v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let r: Vec<f32> = v.into_iter().map(|a| f.round(a, saturate)).collect();
        return Tensor::from_vec(r, x.dims(), &Device::Cpu)?.to_device(x.device());
    }
    // 4-bit integers: clipped, then rounded half to even (ONNX's reference).
    let (lo, hi, dt) = match to {
        INT4 => (-8.0, 7.0, DType::I16),
        UINT4 => (0.0, 15.0, DType::U8),
        _ => bail!("ONNX type {to} is not an 8-bit float or 4-bit integer"),
    };
    if matches!(
        x.dtype(),
        DType::F16 | DType::BF16 | DType::F32 | DType::F64
    ) {
        let v: Vec<f64> = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let r: Vec<f64> = v
            .into_iter()
            .map(|a| a.clamp(lo, hi).round_ties_even())
            .collect();
        Tensor::from_vec(r, x.dims(), &Device::Cpu)?
            .to_device(x.device())?
            .to_dtype(dt)
    } else {
        x.to_dtype(DType::F64)?.clamp(lo, hi)?.to_dtype(dt)
    }
}

/// A stored tensor of ONNX type `t` (one of this module's), widened: one byte per 8-bit
/// float, two 4-bit integers per byte (low nibble first), from `raw` or else from the
/// bytes in `int32_data`.
pub fn decode(t: i32, raw: &[u8], int32_data: &[i32], dims: &[usize]) -> Result<Tensor> {
    let bytes: Vec<u8> = if raw.is_empty() {
        int32_data.iter().map(|&v| v as u8).collect()
    } else {
        raw.to_vec()
    };
    let n: usize = dims.iter().product();
    let dev = &Device::Cpu;
    if let Some(f) = fp8(t) {
        if bytes.len() < n {
            bail!(
                "FLOAT8 tensor holds {} values for shape {dims:?}",
                bytes.len()
            )
        }
        let v: Vec<f32> = bytes[..n].iter().map(|&b| f.decode(b)).collect();
        return Tensor::from_vec(v, dims, dev);
    }
    if bytes.len() < n.div_ceil(2) {
        bail!(
            "4-bit tensor holds {} bytes for shape {dims:?}",
            bytes.len()
        )
    }
    let nibble = |i: usize| (bytes[i / 2] >> (4 * (i % 2))) & 0x0F;
    match t {
        INT4 => {
            let v: Vec<i16> = (0..n)
                .map(|i| ((nibble(i) << 4) as i8 >> 4) as i16)
                .collect();
            Tensor::from_vec(v, dims, dev)
        }
        UINT4 => Tensor::from_vec((0..n).map(nibble).collect::<Vec<u8>>(), dims, dev),
        _ => bail!("ONNX type {t} is not an 8-bit float or 4-bit integer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fp8_pattern_survives_a_round_trip() {
        for t in FLOAT8E4M3FN..=FLOAT8E5M2FNUZ {
            let f = fp8(t).unwrap();
            for b in 0..=255u8 {
                let v = f.decode(b);
                if v.is_nan() || v.is_infinite() {
                    continue;
                }
                let r = f.round(v, false);
                assert_eq!(
                    r.to_bits(),
                    v.to_bits(),
                    "type {t} pattern {b:#x}: {v} -> {r}"
                );
            }
        }
    }

    #[test]
    fn rounds_saturates_and_overflows_as_onnx() {
        let e4 = fp8(FLOAT8E4M3FN).unwrap();
        assert_eq!(e4.round(464.0, true), 448.0); // the tie goes to 448 (even)
        assert_eq!(e4.round(470.0, true), 448.0);
        assert!(e4.round(470.0, false).is_nan());
        assert_eq!(e4.round(f32::INFINITY, true), 448.0);
        assert_eq!(e4.round(0.3, true), 0.3125);
        assert_eq!(e4.round(1e-4, true), 0.0);
        let e5 = fp8(FLOAT8E5M2).unwrap();
        assert_eq!(e5.round(1e6, false), f32::INFINITY);
        assert_eq!(e5.round(-1e6, true), -57344.0);
        let uz = fp8(FLOAT8E4M3FNUZ).unwrap();
        assert!(uz.round(-0.0, true).is_sign_positive());
        assert!(uz.decode(0x80).is_nan());
        assert_eq!(e4.decode(0x7E), 448.0);
        assert!(e4.decode(0x7F).is_nan());
    }

    #[test]
    fn decodes_packed_int4() {
        // 0x98: low nibble 8 (-8), high nibble 9 (-7); 0x07: 7.
        let t = decode(INT4, &[0x98, 0x07], &[], &[3]).unwrap();
        assert_eq!(t.to_vec1::<i16>().unwrap(), [-8, -7, 7]);
        let u = decode(UINT4, &[], &[0x98, 0x07], &[3]).unwrap();
        assert_eq!(u.to_vec1::<u8>().unwrap(), [8, 9, 7]);
    }
}
