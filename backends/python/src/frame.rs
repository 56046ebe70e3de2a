//! The framing between the backend and its stub process: a u32 LE header length, a u64 LE
//! payload length, the JSON header, then the payload (tensor bytes, in the order the header
//! lists them).
use std::io::{Read, Write};

use serde_json::Value;

/// One message: its JSON header and the bytes that follow it.
pub struct Frame {
    /// The JSON header.
    pub header: Value,
    /// Tensor bytes, in the order the header lists them.
    pub payload: Vec<u8>,
}

/// Writes a message made of `header` and the concatenation of `blobs`.
pub fn write(w: &mut impl Write, header: &Value, blobs: &[&[u8]]) -> std::io::Result<()> {
    let head = serde_json::to_vec(header)?;
    let len: usize = blobs.iter().map(|b| b.len()).sum();
    let mut prefix = Vec::with_capacity(12);
    prefix.extend_from_slice(&(head.len() as u32).to_le_bytes());
    prefix.extend_from_slice(&(len as u64).to_le_bytes());
    w.write_all(&prefix)?;
    w.write_all(&head)?;
    for b in blobs {
        w.write_all(b)?;
    }
    w.flush()
}

/// Reads one message.
pub fn read(r: &mut impl Read) -> std::io::Result<Frame> {
    let mut prefix = [0u8; 12];
    r.read_exact(&mut prefix)?;
    let head_len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&prefix[4..]);
    let len = u64::from_le_bytes(len8) as usize;
    let mut head = vec![0u8; head_len];
    r.read_exact(&mut head)?;
    let header = serde_json::from_slice(&head)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Frame { header, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write(&mut buf, &serde_json::json!({"op": "x"}), &[b"ab", b"c"]).unwrap();
        write(&mut buf, &serde_json::json!({"op": "y"}), &[]).unwrap();
        let mut r = &buf[..];
        let f = read(&mut r).unwrap();
        assert_eq!(
            (f.header["op"].as_str(), &f.payload[..]),
            (Some("x"), &b"abc"[..])
        );
        let f = read(&mut r).unwrap();
        assert_eq!(f.header["op"], "y");
        assert!(f.payload.is_empty());
        assert!(read(&mut r).is_err());
    }
}
