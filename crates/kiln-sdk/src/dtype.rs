//! Tensor data types, numbered as Triton's.
use kiln_abi as abi;

/// A tensor element type (Triton's `TYPE_*`; `Bytes` is `TYPE_STRING`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DataType {
    Bool = abi::KILN_TYPE_BOOL,
    UInt8 = abi::KILN_TYPE_UINT8,
    UInt16 = abi::KILN_TYPE_UINT16,
    UInt32 = abi::KILN_TYPE_UINT32,
    UInt64 = abi::KILN_TYPE_UINT64,
    Int8 = abi::KILN_TYPE_INT8,
    Int16 = abi::KILN_TYPE_INT16,
    Int32 = abi::KILN_TYPE_INT32,
    Int64 = abi::KILN_TYPE_INT64,
    Fp16 = abi::KILN_TYPE_FP16,
    Fp32 = abi::KILN_TYPE_FP32,
    Fp64 = abi::KILN_TYPE_FP64,
    Bytes = abi::KILN_TYPE_BYTES,
    Bf16 = abi::KILN_TYPE_BF16,
}

impl DataType {
    /// All valid types, in ABI order.
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::UInt8,
        DataType::UInt16,
        DataType::UInt32,
        DataType::UInt64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
        DataType::Bf16,
    ];

    /// From the ABI number; `None` for INVALID or unknown numbers.
    pub fn from_abi(v: u32) -> Option<DataType> {
        Self::ALL.iter().copied().find(|d| *d as u32 == v)
    }

    /// Size of one element in bytes; `None` for variable-size BYTES.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::UInt8 | DataType::Int8 => 1,
            DataType::UInt16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::UInt32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::UInt64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// The KServe protocol name (`INT32`, `BYTES`, ...).
    pub fn protocol_name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::UInt8 => "UINT8",
            DataType::UInt16 => "UINT16",
            DataType::UInt32 => "UINT32",
            DataType::UInt64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
            DataType::Bf16 => "BF16",
        }
    }

    /// From the KServe protocol name.
    pub fn from_protocol_name(s: &str) -> Option<DataType> {
        Self::ALL.iter().copied().find(|d| d.protocol_name() == s)
    }

    /// The model-config name (`TYPE_INT32`, `TYPE_STRING`, ...).
    pub fn config_name(self) -> &'static str {
        match self {
            DataType::Bytes => "TYPE_STRING",
            DataType::Bool => "TYPE_BOOL",
            DataType::UInt8 => "TYPE_UINT8",
            DataType::UInt16 => "TYPE_UINT16",
            DataType::UInt32 => "TYPE_UINT32",
            DataType::UInt64 => "TYPE_UINT64",
            DataType::Int8 => "TYPE_INT8",
            DataType::Int16 => "TYPE_INT16",
            DataType::Int32 => "TYPE_INT32",
            DataType::Int64 => "TYPE_INT64",
            DataType::Fp16 => "TYPE_FP16",
            DataType::Fp32 => "TYPE_FP32",
            DataType::Fp64 => "TYPE_FP64",
            DataType::Bf16 => "TYPE_BF16",
        }
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.protocol_name())
    }
}

/// Iterates the elements of a serialized BYTES tensor (4-byte LE length + bytes each).
/// Yields `None` once if the buffer is malformed.
pub fn bytes_elements(data: &[u8]) -> impl Iterator<Item = Option<&[u8]>> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let buf = rest?;
        if buf.is_empty() {
            rest = None;
            return None;
        }
        if buf.len() < 4 {
            rest = None;
            return Some(None);
        }
        let n = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if buf.len() - 4 < n {
            rest = None;
            return Some(None);
        }
        rest = Some(&buf[4 + n..]);
        Some(Some(&buf[4..4 + n]))
    })
}

/// Appends one BYTES element (length prefix + bytes) to `out`.
pub fn push_bytes_element(out: &mut Vec<u8>, element: &[u8]) {
    out.extend_from_slice(&(element.len() as u32).to_le_bytes());
    out.extend_from_slice(element);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_roundtrip_and_malformed() {
        let mut buf = Vec::new();
        push_bytes_element(&mut buf, b"ab");
        push_bytes_element(&mut buf, b"");
        push_bytes_element(&mut buf, &[0xff, 0]);
        let els: Vec<_> = bytes_elements(&buf).collect();
        assert_eq!(
            els,
            vec![Some(&b"ab"[..]), Some(&b""[..]), Some(&[0xff, 0][..])]
        );
        let truncated = &buf[..buf.len() - 1];
        assert_eq!(bytes_elements(truncated).last(), Some(None));
    }

    #[test]
    fn names_roundtrip() {
        for d in DataType::ALL {
            assert_eq!(DataType::from_protocol_name(d.protocol_name()), Some(d));
            assert_eq!(DataType::from_abi(d as u32), Some(d));
        }
        assert_eq!(DataType::from_abi(0), None);
    }
}
