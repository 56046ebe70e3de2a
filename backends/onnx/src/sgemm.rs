//! A single-threaded f32 matrix product for x86-64 CPUs with AVX2 and FMA, made for the
//! convolution's shapes: `C[m, n] += A[m, k] · B[k, n]` with every matrix row-major and read
//! in place (no packing). A 6×16 register tile (12 accumulators) walks `k` in blocks that
//! keep the 16-column strip of B in L1 and the rows of A in L2. Callers run one product per
//! thread on disjoint parts of C and fall back to the `gemm` crate when [`available`] is
//! false.

/// Rows of C one register tile covers.
const MR: usize = 6;
/// Columns of C one register tile covers (two 8-lane vectors).
const NR: usize = 16;
/// Depth of one pass over k.
const KC: usize = 256;
/// Rows of A one pass keeps hot.
const MC: usize = 96;

/// Where the right-hand matrix of [`sgemm`] lives.
#[derive(Clone, Copy)]
pub enum Rhs {
    /// Row-major `[k, n]` with row stride `ldb`, read in place.
    Rows { ptr: *const f32, ldb: usize },
    /// Packed by [`pack_panels`]: 16-column panels, each `[k, 16]` contiguous and
    /// zero-padded past `n`, so every strip streams from memory in order.
    Panels { ptr: *const f32, k: usize },
}

/// What C starts from and what happens when it is stored: `C = start + A·B`, then ReLU.
#[derive(Clone, Copy)]
pub struct Epilogue {
    /// `start`: C's own values (accumulate), zero, or another `[m, n]` matrix (row stride
    /// `ld`) such as a residual.
    pub base: Base,
    /// Added to every row `i`: `row_bias[i]` (a convolution's per-channel bias).
    pub row_bias: Option<*const f32>,
    /// Added to every column `j`: `col_bias[j]` (a linear layer's bias).
    pub col_bias: Option<*const f32>,
    /// Clamp the result at zero.
    pub relu: bool,
}

// SAFETY: the pointers are only read, by the one call they are given to, while the
// caller keeps the data alive.
unsafe impl Send for Epilogue {}
unsafe impl Sync for Epilogue {}

/// See [`Epilogue::base`].
#[derive(Clone, Copy)]
pub enum Base {
    /// C += A·B.
    Accumulate,
    /// C = A·B (C is only written).
    Zero,
    /// C = other + A·B.
    Other { ptr: *const f32, ld: usize },
}

impl Epilogue {
    /// `C += A · B`, nothing else.
    pub const ACCUMULATE: Epilogue = Epilogue {
        base: Base::Accumulate,
        row_bias: None,
        col_bias: None,
        relu: false,
    };
}

/// Packs row-major `b` (`[k, n]`) into the [`Rhs::Panels`] layout.
pub fn pack_panels(b: &[f32], k: usize, n: usize) -> Vec<f32> {
    let panels = n.div_ceil(NR);
    let mut out = vec![0f32; panels * k * NR];
    for (p, panel) in out.chunks_mut(k * NR).enumerate() {
        let (j0, w) = (p * NR, NR.min(n - p * NR));
        for (kk, row) in panel.chunks_mut(NR).enumerate() {
            row[..w].copy_from_slice(&b[kk * n + j0..kk * n + j0 + w]);
        }
    }
    out
}

/// An output buffer shared by jobs that write disjoint parts of it.
#[derive(Clone, Copy)]
pub struct SharedOut(pub *mut f32);

// SAFETY: users give each job its own region of the buffer, which outlives the jobs.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The element at `offset`.
    pub fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Whether this CPU can run [`sgemm`].
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C = start + A · B` (see [`Epilogue`]) for `A` `[m, k]` (row stride `lda`), `B`
/// `[k, n]` (see [`Rhs`]), `C` `[m, n]` (`ldc`).
///
/// # Safety
/// [`available`] must be true; `a`, `b`, `c` and the epilogue's pointers must be valid for
/// the rows and strides given, and no other thread may touch the `m × n` block of `c`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: Rhs,
    c: *mut f32,
    ldc: usize,
    epilogue: Epilogue,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller.
    unsafe {
        avx2::sgemm(m, n, k, a, lda, b, c, ldc, epilogue)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, a, lda, b, c, ldc, epilogue);
        unreachable!("sgemm needs AVX2 and FMA (check `available` first)")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Base, Epilogue, Rhs, KC, MC, MR, NR};
    use std::arch::x86_64::*;

    /// One register tile's epilogue: where its start values come from on the first pass
    /// over k (later passes start from C), and whether this is the last pass.
    #[derive(Clone, Copy)]
    struct Store {
        first: bool,
        last: bool,
        base: Base,
        row_bias: Option<*const f32>,
        col_bias: Option<*const f32>,
        relu: bool,
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sgemm(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        b: Rhs,
        c: *mut f32,
        ldc: usize,
        e: Epilogue,
    ) {
        // A strip of B narrower than 16 columns is copied here, zero-padded.
        let mut edge = vec![0f32; KC * NR];
        // k = 0 still writes the start values (one pass with an empty product).
        let passes: Vec<usize> = if k == 0 {
            vec![0]
        } else {
            (0..k).step_by(KC).collect()
        };
        for k0 in passes {
            let kc = KC.min(k - k0);
            for i0 in (0..m).step_by(MC) {
                let mc = MC.min(m - i0);
                for j in (0..n).step_by(NR) {
                    let nc = NR.min(n - j);
                    // SAFETY (whole block): offsets stay within the caller's matrices.
                    let (bp, bs) = match b {
                        Rhs::Panels { ptr, k } => {
                            (unsafe { ptr.add((j / NR) * k * NR + k0 * NR) }, NR)
                        }
                        Rhs::Rows { ptr, ldb } if nc == NR => {
                            (unsafe { ptr.add(k0 * ldb + j) }, ldb)
                        }
                        Rhs::Rows { ptr: b, ldb } => {
                            for kk in 0..kc {
                                let row = &mut edge[kk * NR..kk * NR + NR];
                                for (jj, v) in row.iter_mut().enumerate() {
                                    *v = if jj < nc {
                                        unsafe { *b.add((k0 + kk) * ldb + j + jj) }
                                    } else {
                                        0.0
                                    };
                                }
                            }
                            (edge.as_ptr(), NR)
                        }
                    };
                    let mut i = i0;
                    while i < i0 + mc {
                        let ap = unsafe { a.add(i * lda + k0) };
                        let cp = unsafe { c.add(i * ldc + j) };
                        let rows = MR.min(i0 + mc - i);
                        let st = Store {
                            first: k0 == 0,
                            last: k0 + kc >= k,
                            base: match e.base {
                                Base::Other { ptr, ld } => Base::Other {
                                    ptr: ptr.wrapping_add(i * ld + j),
                                    ld,
                                },
                                other => other,
                            },
                            row_bias: e.row_bias.map(|p| p.wrapping_add(i)),
                            col_bias: e.col_bias.map(|p| p.wrapping_add(j)),
                            relu: e.relu,
                        };
                        unsafe {
                            match rows {
                                6 => tile::<6>(kc, ap, lda, bp, bs, cp, ldc, nc, st),
                                5 => tile::<5>(kc, ap, lda, bp, bs, cp, ldc, nc, st),
                                4 => tile::<4>(kc, ap, lda, bp, bs, cp, ldc, nc, st),
                                3 => tile::<3>(kc, ap, lda, bp, bs, cp, ldc, nc, st),
                                2 => tile::<2>(kc, ap, lda, bp, bs, cp, ldc, nc, st),
                                _ => tile::<1>(kc, ap, lda, bp, bs, cp, ldc, nc, st),
                            }
                        }
                        i += rows;
                    }
                }
            }
        }
    }

    /// `R × 16` block of C (`nc` valid columns) = start + `R × kc` of A · `kc × 16` of B.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<const R: usize>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        nc: usize,
        st: Store,
    ) {
        unsafe {
            let mut lo = [_mm256_setzero_ps(); R];
            let mut hi = [_mm256_setzero_ps(); R];
            for kk in 0..kc {
                let b0 = _mm256_loadu_ps(b.add(kk * ldb));
                let b1 = _mm256_loadu_ps(b.add(kk * ldb + 8));
                for r in 0..R {
                    let av = _mm256_broadcast_ss(&*a.add(r * lda + kk));
                    lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
                }
            }
            // Loads 16 values (the first nc of them real) as two vectors.
            let load = |p: *const f32| {
                if nc == NR {
                    (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
                } else {
                    let mut t = [0f32; NR];
                    std::ptr::copy_nonoverlapping(p, t.as_mut_ptr(), nc);
                    (
                        _mm256_loadu_ps(t.as_ptr()),
                        _mm256_loadu_ps(t.as_ptr().add(8)),
                    )
                }
            };
            let zero = _mm256_setzero_ps();
            let col = match st.col_bias {
                Some(p) if st.first => load(p),
                _ => (zero, zero),
            };
            for r in 0..R {
                let row = c.add(r * ldc);
                let (mut s0, mut s1) = if !st.first {
                    load(row)
                } else {
                    match st.base {
                        Base::Accumulate => load(row),
                        Base::Zero => (zero, zero),
                        Base::Other { ptr, ld } => load(ptr.add(r * ld)),
                    }
                };
                if st.first {
                    if let Some(p) = st.row_bias {
                        let v = _mm256_broadcast_ss(&*p.add(r));
                        s0 = _mm256_add_ps(s0, v);
                        s1 = _mm256_add_ps(s1, v);
                    }
                    s0 = _mm256_add_ps(s0, col.0);
                    s1 = _mm256_add_ps(s1, col.1);
                }
                let mut v0 = _mm256_add_ps(s0, lo[r]);
                let mut v1 = _mm256_add_ps(s1, hi[r]);
                if st.last && st.relu {
                    v0 = _mm256_max_ps(v0, zero);
                    v1 = _mm256_max_ps(v1, zero);
                }
                if nc == NR {
                    _mm256_storeu_ps(row, v0);
                    _mm256_storeu_ps(row.add(8), v1);
                } else {
                    let mut t = [0f32; NR];
                    _mm256_storeu_ps(t.as_mut_ptr(), v0);
                    _mm256_storeu_ps(t.as_mut_ptr().add(8), v1);
                    std::ptr::copy_nonoverlapping(t.as_ptr(), row, nc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulates_the_product_for_ragged_shapes_and_strides() {
        if !available() {
            eprintln!("no AVX2/FMA on this CPU: the gemm crate path is used instead; skipped");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (6, 16, 3),
            (7, 17, 300),
            (13, 40, 513),
            (64, 5, 9),
        ] {
            let (lda, ldb, ldc) = (k + 3, n + 5, n + 2);
            let a: Vec<f32> = (0..m * lda).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let b: Vec<f32> = (0..k * ldb).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
            let mut c: Vec<f32> = (0..m * ldc).map(|i| (i % 3) as f32).collect();
            let before = c.clone();
            // SAFETY: available() checked; the buffers hold the strided matrices.
            let rows = Rhs::Rows {
                ptr: b.as_ptr(),
                ldb,
            };
            unsafe {
                sgemm(
                    m,
                    n,
                    k,
                    a.as_ptr(),
                    lda,
                    rows,
                    c.as_mut_ptr(),
                    ldc,
                    Epilogue::ACCUMULATE,
                )
            };
            // The same product from packed panels adds the same sums again.
            let dense: Vec<f32> = (0..k)
                .flat_map(|q| b[q * ldb..q * ldb + n].to_vec())
                .collect();
            let packed = pack_panels(&dense, k, n);
            let mut twice = c.clone();
            let panels = Rhs::Panels {
                ptr: packed.as_ptr(),
                k,
            };
            // SAFETY: as above, with the packed copy.
            unsafe {
                sgemm(
                    m,
                    n,
                    k,
                    a.as_ptr(),
                    lda,
                    panels,
                    twice.as_mut_ptr(),
                    ldc,
                    Epilogue::ACCUMULATE,
                )
            };
            for i in 0..m {
                for j in 0..n {
                    let delta = twice[i * ldc + j] - c[i * ldc + j];
                    assert_eq!(
                        delta,
                        c[i * ldc + j] - before[i * ldc + j],
                        "panels ({i}, {j})"
                    );
                }
            }
            for i in 0..m {
                for j in 0..ldc {
                    let want = if j < n {
                        before[i * ldc + j]
                            + (0..k).map(|q| a[i * lda + q] * b[q * ldb + j]).sum::<f32>()
                    } else {
                        before[i * ldc + j] // padding columns untouched
                    };
                    assert_eq!(c[i * ldc + j], want, "m{m} n{n} k{k} at ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn the_epilogue_adds_start_values_and_biases_and_clamps() {
        if !available() {
            eprintln!("no AVX2/FMA on this CPU; skipped");
            return;
        }
        for &(m, n, k) in &[(5, 21, 7), (13, 16, 300), (2, 3, 0)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
            let other: Vec<f32> = (0..m * n).map(|i| ((i * 3) % 17) as f32 - 8.0).collect();
            let rb: Vec<f32> = (0..m).map(|i| i as f32 - 2.0).collect();
            let cb: Vec<f32> = (0..n).map(|j| 1.0 - j as f32).collect();
            let product =
                |i: usize, j: usize| (0..k).map(|q| a[i * k + q] * b[q * n + j]).sum::<f32>();
            let cases = [
                (Base::Zero, Some(rb.as_ptr()), None, true),
                (Base::Zero, None, Some(cb.as_ptr()), false),
                (
                    Base::Other {
                        ptr: other.as_ptr(),
                        ld: n,
                    },
                    Some(rb.as_ptr()),
                    Some(cb.as_ptr()),
                    true,
                ),
            ];
            for (case, &(base, row_bias, col_bias, relu)) in cases.iter().enumerate() {
                let mut c = vec![f32::NAN; m * n]; // never read: every start is given
                let e = Epilogue {
                    base,
                    row_bias,
                    col_bias,
                    relu,
                };
                let rows = Rhs::Rows {
                    ptr: b.as_ptr(),
                    ldb: n,
                };
                // SAFETY: available() checked; all buffers hold the matrices named.
                unsafe { sgemm(m, n, k, a.as_ptr(), k, rows, c.as_mut_ptr(), n, e) };
                for i in 0..m {
                    for j in 0..n {
                        let mut want = product(i, j);
                        if matches!(base, Base::Other { .. }) {
                            want += other[i * n + j];
                        }
                        want += row_bias.map_or(0.0, |_| rb[i]) + col_bias.map_or(0.0, |_| cb[j]);
                        if relu {
                            want = want.max(0.0);
                        }
                        assert_eq!(c[i * n + j], want, "case {case} m{m} n{n} k{k} ({i}, {j})");
                    }
                }
            }
        }
    }
}
