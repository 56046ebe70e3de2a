//! gzip / deflate (zlib) bodies, as tritonclient's `request_compression_algorithm` and
//! `response_compression_algorithm` use them.
use std::io::{Read, Write};

use flate2::read::{GzDecoder, ZlibDecoder};
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;

/// A supported content coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
}

impl Coding {
    /// From a `Content-Encoding` value; `Ok(None)` for identity; `Err` for unknown codings.
    pub fn from_header(v: &str) -> Result<Option<Coding>, String> {
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(None),
            "gzip" => Ok(Some(Coding::Gzip)),
            "deflate" => Ok(Some(Coding::Deflate)),
            other => Err(format!(
                "unsupported Content-Encoding '{other}'; use gzip or deflate"
            )),
        }
    }

    /// Picks a coding the client accepts (`Accept-Encoding`), preferring gzip.
    pub fn negotiate(accept: &str) -> Option<Coding> {
        let accepted = |name: &str| {
            accept.split(',').any(|p| {
                let mut it = p.split(';');
                let n = it.next().unwrap_or("").trim();
                let q0 = it.any(|q| q.trim().replace(' ', "") == "q=0");
                n.eq_ignore_ascii_case(name) && !q0
            })
        };
        if accepted("gzip") {
            Some(Coding::Gzip)
        } else if accepted("deflate") {
            Some(Coding::Deflate)
        } else {
            None
        }
    }

    /// Header value.
    pub fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// Inflates `data`, refusing to produce more than `limit` bytes.
pub fn decompress(coding: Coding, data: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let r: Box<dyn Read> = match coding {
        Coding::Gzip => Box::new(GzDecoder::new(data)),
        Coding::Deflate => Box::new(ZlibDecoder::new(data)),
    };
    let n = r
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("failed to decompress {} request body: {e}", coding.name()))?;
    if n > limit {
        return Err(format!(
            "decompressed request body exceeds the maximum input size of {limit} bytes"
        ));
    }
    Ok(out)
}

/// Compresses `data`.
pub fn compress(coding: Coding, data: &[u8]) -> Vec<u8> {
    let fast = Compression::fast();
    let r = match coding {
        Coding::Gzip => {
            let mut e = GzEncoder::new(Vec::new(), fast);
            e.write_all(data).and_then(|_| e.finish())
        }
        Coding::Deflate => {
            let mut e = ZlibEncoder::new(Vec::new(), fast);
            e.write_all(data).and_then(|_| e.finish())
        }
    };
    // Writing into a Vec cannot fail.
    r.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_limit() {
        for c in [Coding::Gzip, Coding::Deflate] {
            let z = compress(c, &[7u8; 1000]);
            assert_eq!(decompress(c, &z, 1000).unwrap(), vec![7u8; 1000]);
            assert!(decompress(c, &z, 999).is_err());
        }
        assert_eq!(
            Coding::negotiate("deflate, gzip;q=0"),
            Some(Coding::Deflate)
        );
        assert_eq!(Coding::negotiate("br"), None);
    }
}
