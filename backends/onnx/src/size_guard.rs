//! Sizes a request decides, checked before anything is allocated for them.
//!
//! A shape tensor (Expand, ConstantOfShape), a repeat count (Tile), a range's bounds or the
//! broadcast of two request-sized inputs can ask for more elements than `usize` counts or
//! than the machine holds. Unchecked, the first wraps to a small count (an output whose
//! shape and data disagree) and the second aborts the whole server when the allocation
//! fails. Checked here, both fail only the request, with the size named.
use candle_core::{Result, Tensor};

/// Physical memory in bytes (`u64::MAX` where the system does not say).
fn memory_bytes() -> u64 {
    static BYTES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        #[cfg(unix)]
        {
            // SAFETY: sysconf only reads system constants.
            let (pages, size) = unsafe {
                (
                    libc::sysconf(libc::_SC_PHYS_PAGES),
                    libc::sysconf(libc::_SC_PAGESIZE),
                )
            };
            if pages > 0 && size > 0 {
                return (pages as u64).saturating_mul(size as u64);
            }
        }
        u64::MAX
    })
}

/// Fails unless a tensor of `dims` with `elem_bytes`-byte elements fits in `usize` and in
/// the machine's memory (the caller's error names the operator).
pub fn check(dims: &[usize], elem_bytes: usize) -> Result<()> {
    check_within(dims, elem_bytes, memory_bytes())
}

/// [`check`] against a memory size of `limit` bytes.
fn check_within(dims: &[usize], elem_bytes: usize, limit: u64) -> Result<()> {
    let elems = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let bytes = elems.and_then(|n| n.checked_mul(elem_bytes.max(1)));
    match bytes {
        Some(b) if (b as u64) <= limit => Ok(()),
        _ => Err(candle_core::Error::Msg(format!(
            "an output of shape {dims:?} would take {}, more than this machine's memory ({:.1} GiB)",
            describe(dims, elem_bytes),
            limit as f64 / (1u64 << 30) as f64
        ))),
    }
}

/// The size of `dims` in words: GiB below 2^64 bytes, else "2^64 bytes or more".
fn describe(dims: &[usize], elem_bytes: usize) -> String {
    let bytes: f64 = dims.iter().map(|&d| d as f64).product::<f64>() * elem_bytes.max(1) as f64;
    if bytes < u64::MAX as f64 {
        format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
    } else {
        "2^64 bytes or more".to_string()
    }
}

/// The multidirectional (numpy) broadcast of the inputs' shapes, axis by axis the larger
/// size (whether the shapes are compatible is the operator's own check).
pub fn broadcast_dims<'a>(shapes: impl IntoIterator<Item = &'a [usize]>) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for s in shapes {
        if s.len() > out.len() {
            let extra = s.len() - out.len();
            out.splice(0..0, std::iter::repeat_n(1, extra));
        }
        let off = out.len() - s.len();
        for (o, &d) in out[off..].iter_mut().zip(s) {
            *o = (*o).max(d);
        }
    }
    out
}

/// [`check`] for the broadcast of `ins` (the present ones), with the widest one's element
/// size.
pub fn check_broadcast(ins: &[Option<Tensor>]) -> Result<()> {
    let widest = ins
        .iter()
        .flatten()
        .map(|t| t.dtype().size_in_bytes())
        .max();
    let dims = broadcast_dims(ins.iter().flatten().map(|t| t.dims()));
    check(&dims, widest.unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_past_usize_or_memory_fail_with_the_shape_named() {
        assert!(check_within(&[1 << 20, 1 << 10], 4, 1 << 33).is_ok());
        let e = check_within(&[1 << 20, 1 << 20], 4, 1 << 33).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("[1048576, 1048576]") && msg.contains("4096.0 GiB"),
            "{msg}"
        );
        // 2^80 elements: wraps to 0 in a plain product.
        let e = check_within(&[1 << 40, 1 << 40], 4, u64::MAX).unwrap_err();
        assert!(e.to_string().contains("2^64 bytes or more"), "{e}");
        // An empty dimension is an empty tensor, whatever the others.
        assert!(check_within(&[0, usize::MAX], 4, 1).is_ok());
    }

    #[test]
    fn broadcast_takes_the_larger_size_per_aligned_axis() {
        let a: &[usize] = &[1_000_000, 1];
        let b: &[usize] = &[1, 1_000_000];
        assert_eq!(broadcast_dims([a, b]), vec![1_000_000, 1_000_000]);
        let c: &[usize] = &[3, 1, 5];
        let d: &[usize] = &[4, 1];
        assert_eq!(broadcast_dims([c, d]), vec![3, 4, 5]);
        assert_eq!(broadcast_dims([d]), vec![4, 1]);
        let none: [&[usize]; 0] = [];
        assert_eq!(broadcast_dims(none), Vec::<usize>::new());
    }
}
