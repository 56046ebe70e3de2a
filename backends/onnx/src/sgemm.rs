//! A single-threaded f32 matrix product for x86-64 CPUs with AVX2 and FMA (and, where the
//! CPU has AVX-512, 8×32 and 6×32 tiles in 512-bit registers over two strips of B), made for the
//! convolution's and linear layers' shapes: `C[m, n] = start + A[m, k] · B[k, n]`, each
//! operand either row-major in place or packed by the caller (A in 6- or 8-row slivers, B in
//! 16-column panels), C with any row and column stride (so a product over pixel rows can
//! write an NCHW plane). A 6×16 register tile (12 accumulators) walks `k` in blocks that
//! keep the 16-column strip of B in L1 and the rows of A in L2. Callers run one product per
//! thread on disjoint parts of C and fall back to the `gemm` crate when [`available`] is
//! false.

/// Rows of C one register tile covers.
const MR: usize = 6;
/// Columns of C one register tile covers (two 8-lane vectors).
const NR: usize = 16;
/// Rows of an AVX-512 tile where A's layout allows (one register per row and strip: with
/// one strip, eight so that enough products are in flight; with two, 16 accumulators).
const TALL: usize = 8;
/// Depth of one pass over k.
const KC: usize = 384;
/// Depth of one pass with 32-column tiles (measured best of 192, 256 and 384 on ResNet-50
/// and a BERT encoder).
const KC_WIDE: usize = 256;
/// Columns of C from which the AVX-512 path copies an A in place into 8-row blocks, pass
/// by pass (three strips of 32 read each copy).
const PACK_A_COLS: usize = 96;
/// How many steps over k ahead the AVX-512 tiles fetch a packed A into cache.
const A_AHEAD: usize = 64;
/// Elements of A one pass keeps hot (in L2): 96 rows at the full depth [`KC`], more rows
/// when k is shallower (a 1×1 convolution from 64 channels runs 576 rows per pass, so each
/// strip of B, loaded once, serves them all).
const MC_ELEMS: usize = 96 * KC;

/// Where the left-hand matrix of [`sgemm`] lives.
#[derive(Clone, Copy)]
pub enum Lhs {
    /// Row-major `[m, k]` with row stride `lda`, read in place.
    Rows { ptr: *const f32, lda: usize },
    /// Packed in blocks of `bw` rows: block `s` holds rows `s·bw..(s+1)·bw` as `[k, bw]`,
    /// contiguous (see [`to_blocks`]), so a register tile reads its rows of A as one
    /// stream. `bw` divides 96; tiles never cross a block (16 rows run as 6 + 6 + 4).
    Blocks {
        ptr: *const f32,
        k: usize,
        bw: usize,
    },
    /// Column-major `[m, k]`: element `(i, kk)` at `ptr + kk·ld + i`, read in place (an
    /// NCHW image with its pixels as rows and channels as columns).
    Cols { ptr: *const f32, ld: usize },
}

/// Where [`sgemm`] writes C: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct Out {
    /// The element (0, 0).
    pub ptr: *mut f32,
    /// Row stride.
    pub rs: usize,
    /// Column stride (1 for a row-major C; the vector stores need it).
    pub cs: usize,
}

impl Out {
    /// A row-major C with row stride `ld`.
    pub fn rows(ptr: *mut f32, ld: usize) -> Out {
        Out { ptr, rs: ld, cs: 1 }
    }
}

/// Rows of one register tile: the natural [`Lhs::Blocks`] width.
pub const SLIVER: usize = MR;
/// Rows of one AVX-512 register tile: the [`Lhs::Blocks`] width that lets products with
/// C stored transposed (`rs` = 1) run 8-row tiles where [`wide_available`].
pub const TALL_SLIVER: usize = TALL;
/// Columns of a packed right-hand panel.
pub const PANEL: usize = NR;

/// Where the right-hand matrix of [`sgemm`] lives.
#[derive(Clone, Copy)]
pub enum Rhs {
    /// Row-major `[k, n]` with row stride `ldb`, read in place.
    Rows { ptr: *const f32, ldb: usize },
    /// Packed by [`pack_panels`]: 16-column panels, each `[k, 16]` contiguous and
    /// padded past `n` (zeros from `pack_panels`; whatever is there is read but only
    /// lands in columns that are never stored), so every strip streams from memory in
    /// order.
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
    /// C = other + A·B, `other` laid out like C but with row stride `ld`.
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
    let mut out = vec![0f32; n.div_ceil(NR) * k * NR];
    to_blocks(&mut out, NR, k, n, |r, row| {
        row.copy_from_slice(&b[r * n..(r + 1) * n])
    });
    out
}

/// Writes a `[k, width]` matrix, produced a row at a time by `row`, into `blocks` as
/// blocks of `bw` columns (`[k, bw]` each, contiguous; block `i` starts at `i·k·bw`):
/// [`Rhs::Panels`] for `bw` = [`PANEL`], and, for the transpose of the matrix,
/// [`Lhs::Blocks`]. Columns past `width` in the last block are
/// left as they are (products from them are never stored).
pub fn to_blocks(
    blocks: &mut [f32],
    bw: usize,
    k: usize,
    width: usize,
    mut row: impl FnMut(usize, &mut [f32]),
) {
    let mut line = vec![0f32; width];
    for r in 0..k {
        row(r, &mut line);
        for (bi, chunk) in line.chunks(bw).enumerate() {
            blocks[(bi * k + r) * bw..][..chunk.len()].copy_from_slice(chunk);
        }
    }
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

/// `C = start + A · B` (see [`Epilogue`]) for `A` `[m, k]` (see [`Lhs`]), `B` `[k, n]`
/// (see [`Rhs`]), `C` `[m, n]` (see [`Out`]).
///
/// # Safety
/// [`available`] must be true; `a`, `b`, `c` and the epilogue's pointers must be valid for
/// the rows and strides given, and no other thread may touch the `m × n` block of `c`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(m: usize, n: usize, k: usize, a: Lhs, b: Rhs, c: Out, epilogue: Epilogue) {
    // SAFETY: forwarded from the caller.
    unsafe { sgemm_with(wide_available(), m, n, k, a, b, c, epilogue) }
}

/// Whether this CPU also has AVX-512 (F), which [`sgemm`] then uses for 32-column tiles
/// (unless `KILN_SGEMM_AVX2` is set, for comparing the two).
pub fn wide_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *WIDE.get_or_init(|| {
            available()
                && std::is_x86_feature_detected!("avx512f")
                && std::env::var_os("KILN_SGEMM_AVX2").is_none()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`sgemm`] with (`wide`) or without the AVX-512 tiles.
///
/// # Safety
/// As [`sgemm`]; with `wide`, [`wide_available`] must be true.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_with(
    wide: bool,
    m: usize,
    n: usize,
    k: usize,
    a: Lhs,
    b: Rhs,
    c: Out,
    epilogue: Epilogue,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller.
    unsafe {
        if wide {
            avx2::sgemm_wide(m, n, k, a, b, c, epilogue)
        } else {
            avx2::sgemm(m, n, k, a, b, c, epilogue)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (wide, m, n, k, a, b, c, epilogue);
        unreachable!("sgemm needs AVX2 and FMA (check `available` first)")
    }
}

/// Calls `$tile::<R, IN_ROWS>$args` for a tile of `$rows` rows (one of `$heights`, else 1)
/// and A read in place (`$in_rows`) or packed: the const-generic tile for the case at hand.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($tile:ident, $rows:expr, $in_rows:expr, [$($h:literal),*], $args:tt) => {
        match ($rows, $in_rows) {
            $(
                ($h, true) => $tile::<$h, true> $args,
                ($h, false) => $tile::<$h, false> $args,
            )*
            (_, true) => $tile::<1, true> $args,
            (_, false) => $tile::<1, false> $args,
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::{load6, store6, transpose8};

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{
        Base, Epilogue, Lhs, Out, Rhs, A_AHEAD, KC, KC_WIDE, MC_ELEMS, MR, NR, PACK_A_COLS, TALL,
    };
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

    /// The product with AVX2 tiles only.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sgemm(m: usize, n: usize, k: usize, a: Lhs, b: Rhs, c: Out, e: Epilogue) {
        // SAFETY: forwarded from the caller.
        unsafe { drive::<false>(m, n, k, a, b, c, e) }
    }

    /// The product with AVX-512 tiles two strips of B wide where B has them (AVX2 tiles
    /// for a last single strip).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn sgemm_wide(m: usize, n: usize, k: usize, a: Lhs, b: Rhs, c: Out, e: Epilogue) {
        // SAFETY: forwarded from the caller.
        unsafe { drive::<true>(m, n, k, a, b, c, e) }
    }

    /// Where a tile at row `i`, column `j` stores (and what it starts from).
    #[inline(always)]
    fn place(c: Out, e: Epilogue, i: usize, j: usize, first: bool, last: bool) -> (Out, Store) {
        let out = Out {
            ptr: c.ptr.wrapping_add(i * c.rs + j * c.cs),
            ..c
        };
        let st = Store {
            first,
            last,
            base: match e.base {
                Base::Other { ptr, ld } => Base::Other {
                    ptr: ptr.wrapping_add(i * ld + j * c.cs),
                    ld,
                },
                other => other,
            },
            row_bias: e.row_bias.map(|p| p.wrapping_add(i)),
            col_bias: e.col_bias.map(|p| p.wrapping_add(j)),
            relu: e.relu,
        };
        (out, st)
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn drive<const WIDE: bool>(
        m: usize,
        n: usize,
        k: usize,
        a: Lhs,
        b: Rhs,
        c: Out,
        e: Epilogue,
    ) {
        // A strip of B narrower than 16 columns is copied here, zero-padded.
        // Equal passes of at most KC (k = 384 in one pass, not 256 + 128); at most
        // KC_WIDE with two strips at once, so that what a tile streams from B stays in L1.
        let kc_max = if WIDE { KC_WIDE } else { KC };
        let step = k.div_ceil(k.div_ceil(kc_max).max(1)).max(1);
        // (Allocated on first use: most products have none, and run by the thousand.)
        let mut edge: Vec<f32> = Vec::new();
        // A pass's block of A, when A in place is copied (below).
        let mut a_pack: Vec<f32> = Vec::new();
        // k = 0 still writes the start values (one pass with an empty product).
        let passes: Vec<usize> = if k == 0 {
            vec![0]
        } else {
            (0..k).step_by(step).collect()
        };
        for k0 in passes {
            let kc = step.min(k - k0);
            let (first, last) = (k0 == 0, k0 + kc >= k);
            // A multiple of 96 rows, so that passes split no packed block (see `Lhs`).
            let rows = (MC_ELEMS / kc.max(1) / 96).max(1) * 96;
            for i0 in (0..m).step_by(rows) {
                let mc = rows.min(m - i0);
                // A in place, read by enough strips: this pass's block of it is copied
                // into 8-row blocks first, which the tiles read as one stream (in place,
                // each step reads eight rows far apart, whose addresses cost more than the
                // copy once more than a few strips share it).
                let (a, a_from) = match a {
                    Lhs::Rows { ptr, lda } if WIDE && n >= PACK_A_COLS => {
                        unsafe { pack_rows(&mut a_pack, (ptr, lda), (i0, mc), (k0, kc)) };
                        let packed = Lhs::Blocks {
                            ptr: a_pack.as_ptr(),
                            k: kc,
                            bw: TALL,
                        };
                        (packed, (i0, k0))
                    }
                    a => (a, (0, 0)),
                };
                let p = Pass {
                    a,
                    a_from,
                    b,
                    c,
                    e,
                    n,
                    k0,
                    kc,
                    first,
                    last,
                    end: i0 + mc,
                };
                let mut j = 0;
                while j < n {
                    let s = unsafe { p.strip::<WIDE>(j, &mut edge) };
                    let mut i = i0;
                    while i < i0 + mc {
                        // The first tile of a strip fetches the next strip of B into
                        // cache while it works (later tiles fetch nothing). B in place
                        // needs it most: its rows are far apart (a pointwise convolution's
                        // input channels), more streams than the hardware follows.
                        let pf = p.panel(j + s.width()).filter(|_| i == i0);
                        i += unsafe { p.tile::<WIDE>(i, j, &s, pf) };
                    }
                    j += s.width();
                }
            }
        }
    }

    /// One pass over k for one block of rows of A (`..end`).
    struct Pass {
        a: Lhs,
        /// The row and depth where `a` starts: (0, 0), or this pass's first row and
        /// `k0` where `a` is a copy of the pass's block.
        a_from: (usize, usize),
        b: Rhs,
        c: Out,
        e: Epilogue,
        n: usize,
        k0: usize,
        kc: usize,
        first: bool,
        last: bool,
        end: usize,
    }

    /// Where one strip of B (16 or, with AVX-512, 32 columns) is read for a pass.
    struct Strip {
        /// Its first 16 columns and the next 16 (when `wide`).
        b: (*const f32, *const f32),
        /// Elements between rows of B.
        ldb: usize,
        /// Valid columns of the first 16.
        nc: usize,
        /// Two panels at once.
        wide: bool,
    }

    impl Strip {
        /// Columns it covers: 16 or 32.
        #[inline(always)]
        fn width(&self) -> usize {
            if self.wide {
                2 * NR
            } else {
                NR
            }
        }
    }

    impl Pass {
        /// Where the strip of B at column `j` starts in this pass (a packed panel, or B's
        /// first row in place), for fetching it into cache ahead; `None` past B.
        #[inline(always)]
        fn panel(&self, j: usize) -> Option<*const f32> {
            match self.b {
                Rhs::Panels { ptr, k } if j < self.n => {
                    Some(ptr.wrapping_add((j / NR) * k * NR + self.k0 * NR))
                }
                Rhs::Rows { ptr, ldb } if j < self.n => Some(ptr.wrapping_add(self.k0 * ldb + j)),
                _ => None,
            }
        }

        /// The strip of B at column `j`; a strip of B in place narrower than 16 columns
        /// is copied into `edge`, zero-padded.
        #[inline(always)]
        unsafe fn strip<const WIDE: bool>(&self, j: usize, edge: &mut Vec<f32>) -> Strip {
            let (n, k0, kc) = (self.n, self.k0, self.kc);
            let nc = NR.min(n - j);
            // Two strips at once where a second packed panel exists (padded past
            // n), or, for B in place, where 32 columns of its rows remain.
            let wide = WIDE
                && match self.b {
                    Rhs::Panels { .. } => j + NR < n,
                    Rhs::Rows { .. } => j + 2 * NR <= n,
                };
            // SAFETY (whole block): offsets stay within the caller's matrices.
            let (bp, ldb) = match self.b {
                Rhs::Panels { ptr, k } => (unsafe { ptr.add((j / NR) * k * NR + k0 * NR) }, NR),
                Rhs::Rows { ptr, ldb } if nc == NR => (unsafe { ptr.add(k0 * ldb + j) }, ldb),
                Rhs::Rows { ptr: b, ldb } => {
                    edge.resize(edge.len().max(kc * NR), 0.0);
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
            // The second strip: the next panel (or, unused, the next 16 columns).
            let bp2 = match self.b {
                Rhs::Panels { k, .. } => bp.wrapping_add(k * NR),
                Rhs::Rows { .. } => bp.wrapping_add(NR),
            };
            Strip {
                b: (bp, bp2),
                ldb,
                nc,
                wide,
            }
        }

        /// Runs the register tile at row `i` of strip `s` (at column `j`), fetching `pf`
        /// into cache as it goes; returns its rows.
        #[inline(always)]
        unsafe fn tile<const WIDE: bool>(
            &self,
            i: usize,
            j: usize,
            s: &Strip,
            pf: Option<*const f32>,
        ) -> usize {
            let (a, c, e, kc, end) = (self.a, self.c, self.e, self.kc, self.end);
            let (first, last, nc) = (self.first, self.last, s.nc);
            // AVX-512 tiles 8 rows high where A has them (packed A in blocks of a
            // multiple of 8 rows, or in place); 6-row slivers keep 6 rows with two strips.
            // C stored transposed (rows adjacent, `rs` = 1) takes 8 rows only from 8-row
            // blocks, whose tiles store whole 8-value runs.
            let eight = match a {
                Lhs::Rows { .. } | Lhs::Cols { .. } => true,
                Lhs::Blocks { bw, .. } => bw % TALL == 0,
            };
            let tall = WIDE && (!s.wide || eight) && (c.cs == 1 || (c.rs == 1 && eight));
            let height = if tall { TALL } else { MR };
            let (ap, lda, rows) = match a {
                Lhs::Rows { ptr, lda } => (
                    unsafe { ptr.add(i * lda + self.k0) },
                    lda,
                    height.min(end - i),
                ),
                Lhs::Cols { ptr, ld } => (
                    unsafe { ptr.add(self.k0 * ld + i) },
                    ld,
                    height.min(end - i),
                ),
                Lhs::Blocks { ptr, k, bw } => {
                    let (ia, ka) = (i - self.a_from.0, self.k0 - self.a_from.1);
                    let at = (ia / bw) * k * bw + ka * bw + ia % bw;
                    let rows = height.min(end - i).min(bw - ia % bw);
                    (unsafe { ptr.add(at) }, bw, rows)
                }
            };
            let (cp, st) = place(c, e, i, j, first, last);
            let ab = (ap, lda);
            let (bp, bs) = (s.b.0, s.ldb);
            let in_rows = matches!(a, Lhs::Rows { .. });
            // The AVX-512 tiles: up to TALL rows.
            macro_rules! up_to_eight {
                ($tile:ident, $args:tt) => {
                    unsafe { by_rows!($tile, rows, in_rows, [8, 7, 6, 5, 4, 3, 2], $args) }
                };
            }
            if s.wide {
                let (cp2, st2) = place(c, e, i, j + NR, first, last);
                let halves = [(cp, nc, st), (cp2, NR.min(self.n - j - NR), st2)];
                up_to_eight!(wide_tile, (kc, ab, (bp, s.b.1, pf), bs, halves))
            } else if tall {
                up_to_eight!(tile16, (kc, ab, (bp, pf), bs, cp, nc, st))
            } else {
                unsafe {
                    by_rows!(
                        tile,
                        rows,
                        in_rows,
                        [6, 5, 4, 3, 2],
                        (kc, ab, (bp, pf.unwrap_or(bp)), bs, cp, nc, st)
                    )
                }
            }
            rows
        }
    }

    /// Copies rows `i0..i0 + mc`, columns `k0..k0 + kc` of row-major A (`lda`) into `dst`
    /// as [`Lhs::Blocks`] of [`TALL`] rows (`[kc, TALL]` each; a last partial block's
    /// missing rows are left as they are: no tile reads them).
    ///
    /// # Safety
    /// The rows and columns are inside A; the CPU has AVX2.
    #[inline(always)]
    unsafe fn pack_rows(
        dst: &mut Vec<f32>,
        (a, lda): (*const f32, usize),
        (i0, mc): (usize, usize),
        (k0, kc): (usize, usize),
    ) {
        let blocks = mc.div_ceil(TALL);
        if dst.len() < blocks * kc * TALL {
            dst.resize(blocks * kc * TALL, 0.0);
        }
        for s in 0..blocks {
            let rows = TALL.min(mc - s * TALL);
            // SAFETY (whole loop): reads stay in rows i0 + s·8 .. + rows, columns
            // k0..k0 + kc of A; writes in block s of `dst`, sized above.
            unsafe {
                let out = dst.as_mut_ptr().add(s * kc * TALL);
                let src = a.add((i0 + s * TALL) * lda + k0);
                let mut kk = 0;
                if rows == TALL {
                    // Eight columns of the eight rows at a time, transposed in registers.
                    while kk + 8 <= kc {
                        let r = std::array::from_fn(|r| _mm256_loadu_ps(src.add(r * lda + kk)));
                        for (q, v) in transpose8(r).into_iter().enumerate() {
                            _mm256_storeu_ps(out.add((kk + q) * TALL), v);
                        }
                        kk += 8;
                    }
                }
                for kk in kk..kc {
                    for r in 0..rows {
                        *out.add(kk * TALL + r) = *src.add(r * lda + kk);
                    }
                }
            }
        }
    }

    /// `R × 16` block of C (R ≤ [`TALL`]) from one strip of B, one 512-bit accumulator per
    /// row; otherwise as [`tile`].
    #[inline(always)]
    unsafe fn tile16<const R: usize, const ROWS: bool>(
        kc: usize,
        (a, lda): (*const f32, usize),
        (b, pf): (*const f32, Option<*const f32>),
        ldb: usize,
        c: Out,
        nc: usize,
        st: Store,
    ) {
        unsafe {
            fetch_start::<R>(c, st);
            let acc = match pf {
                Some(pf) => steps16::<R, ROWS, true>(kc, (a, lda), (b, pf), ldb),
                None => steps16::<R, ROWS, false>(kc, (a, lda), (b, b), ldb),
            };
            store512::<R>(acc, c, nc, st);
        }
    }

    /// [`tile16`]'s products, fetching the strip at `pf` as they go with `FETCH`.
    #[inline(always)]
    unsafe fn steps16<const R: usize, const ROWS: bool, const FETCH: bool>(
        kc: usize,
        (a, lda): (*const f32, usize),
        (b, pf): (*const f32, *const f32),
        ldb: usize,
    ) -> [__m512; R] {
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            for kk in 0..kc {
                if FETCH {
                    _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(kk * ldb) as *const i8);
                }
                if !ROWS {
                    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add((kk + A_AHEAD) * lda) as *const i8);
                }
                let bv = _mm512_loadu_ps(b.add(kk * ldb));
                for (r, v) in acc.iter_mut().enumerate() {
                    let at = a_at::<ROWS>(a, lda, r, kk);
                    *v = _mm512_fmadd_ps(_mm512_set1_ps(*at), bv, *v);
                }
            }
            acc
        }
    }

    /// Starts fetching the start values a tile of `R` rows of 16 will add as it stores
    /// (another matrix's rows, such as a convolution's residual: far apart, which the
    /// hardware does not fetch ahead), and the rows it stores, so that they arrive while
    /// it computes.
    #[inline(always)]
    unsafe fn fetch_start<const R: usize>(c: Out, st: Store) {
        if let (true, Base::Other { ptr, ld }, 1) = (st.first, st.base, c.cs) {
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(r * ld) as *const i8);
            }
        }
        // On the last pass, the rows it will store, for writing (so that fetching the
        // lines does not hold up the stores; C is often far from cache: a 56×56 layer's
        // output planes are megabytes apart).
        if st.last && c.cs == 1 {
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_ET0>(c.ptr.wrapping_add(r * c.rs) as *const i8);
            }
        }
    }

    /// [`store`] for a tile of `R` 512-bit rows: with C's rows stored as rows, in whole
    /// registers (the `nc` valid columns under a mask); otherwise through [`store`].
    #[inline(always)]
    unsafe fn store512<const R: usize>(acc: [__m512; R], c: Out, nc: usize, st: Store) {
        unsafe {
            if c.cs != 1 {
                let mut lo = [_mm256_setzero_ps(); R];
                let mut hi = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    (lo[r], hi[r]) = split(acc[r]);
                }
                return store::<R>(lo, hi, c, nc, st);
            }
            let zero = _mm512_setzero_ps();
            let mask: __mmask16 = if nc >= NR { !0 } else { (1u16 << nc) - 1 };
            let col = match st.col_bias {
                Some(p) if st.first => _mm512_maskz_loadu_ps(mask, p),
                _ => zero,
            };
            let row_bias = st.row_bias.filter(|_| st.first);
            let start = match (st.first, st.base) {
                (false, _) | (true, Base::Accumulate) => Some((c.ptr as *const f32, c.rs)),
                (true, Base::Zero) => None,
                (true, Base::Other { ptr, ld }) => Some((ptr, ld)),
            };
            let relu = st.last && st.relu;
            for (r, &v) in acc.iter().enumerate() {
                // As `finish`: start + (row bias + column bias), then + the products.
                let b = row_bias.map_or(zero, |p| _mm512_set1_ps(*p.add(r)));
                let mut s = _mm512_add_ps(b, col);
                if let Some((sp, srs)) = start {
                    s = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, sp.add(r * srs)), s);
                }
                let mut v = _mm512_add_ps(s, v);
                if relu {
                    v = _mm512_max_ps(v, zero);
                }
                _mm512_mask_storeu_ps(c.ptr.add(r * c.rs), mask, v);
            }
        }
    }

    /// Where a tile finds A's element `(r, kk)`: `a + r·lda + kk` with A's rows in place
    /// (`ROWS`), else `a + kk·lda + r` (a packed block).
    #[inline(always)]
    fn a_at<const ROWS: bool>(a: *const f32, lda: usize, r: usize, kk: usize) -> *const f32 {
        if ROWS {
            a.wrapping_add(r * lda + kk)
        } else {
            a.wrapping_add(kk * lda + r)
        }
    }

    /// A 512-bit register as its two 256-bit halves.
    #[inline(always)]
    unsafe fn split(v: __m512) -> (__m256, __m256) {
        unsafe {
            let upper = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v));
            (_mm512_castps512_ps256(v), _mm256_castpd_ps(upper))
        }
    }

    /// `R × 32` block of C, as two 16-column halves (`(out, valid columns, store)` each):
    /// start + `R × kc` of A · the `kc × 16` strips of B at `b.0` and `b.1`, accumulated in
    /// 512-bit registers (one per row and strip: twice the AVX2 tile's work per step), then
    /// stored half by half through the AVX2 epilogue.
    #[inline(always)]
    unsafe fn wide_tile<const R: usize, const ROWS: bool>(
        kc: usize,
        (a, lda): (*const f32, usize),
        (b, b2, pf): (*const f32, *const f32, Option<*const f32>),
        ldb: usize,
        halves: [(Out, usize, Store); 2],
    ) {
        unsafe {
            fetch_start::<R>(halves[0].0, halves[0].2);
            fetch_start::<R>(halves[1].0, halves[1].2);
            let (lo, hi) = match pf {
                Some(pf) => wide_steps::<R, ROWS, true>(kc, (a, lda), (b, b2, pf), ldb),
                None => wide_steps::<R, ROWS, false>(kc, (a, lda), (b, b2, b), ldb),
            };
            for (acc, (c, nc, st)) in [lo, hi].into_iter().zip(halves) {
                store512::<R>(acc, c, nc, st);
            }
        }
    }

    /// [`wide_tile`]'s products, fetching the strip at `pf` as they go with `FETCH`.
    #[inline(always)]
    unsafe fn wide_steps<const R: usize, const ROWS: bool, const FETCH: bool>(
        kc: usize,
        (a, lda): (*const f32, usize),
        (b, b2, pf): (*const f32, *const f32, *const f32),
        ldb: usize,
    ) -> ([__m512; R], [__m512; R]) {
        unsafe {
            let mut lo = [_mm512_setzero_ps(); R];
            let mut hi = [_mm512_setzero_ps(); R];
            // The next strip's second panel lies as far from its first as this one's.
            let pf2 = pf.wrapping_byte_add((b2 as usize).wrapping_sub(b as usize));
            for kk in 0..kc {
                if FETCH {
                    _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(kk * ldb) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(pf2.wrapping_add(kk * ldb) as *const i8);
                }
                if !ROWS {
                    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add((kk + A_AHEAD) * lda) as *const i8);
                }
                let b0 = _mm512_loadu_ps(b.add(kk * ldb));
                let b1 = _mm512_loadu_ps(b2.add(kk * ldb));
                for r in 0..R {
                    let at = a_at::<ROWS>(a, lda, r, kk);
                    let av = _mm512_set1_ps(*at);
                    lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
                }
            }
            (lo, hi)
        }
    }

    /// One row of a tile as stored: the 16 start values at `start`, plus the row bias
    /// `bias`, the column biases `col` and the products `acc`, then ReLU if `relu`.
    #[inline(always)]
    unsafe fn finish(
        start: *const f32,
        bias: f32,
        col: (__m256, __m256),
        acc: (__m256, __m256),
        relu: bool,
    ) -> (__m256, __m256) {
        unsafe {
            let b = _mm256_set1_ps(bias);
            let s0 = _mm256_add_ps(_mm256_loadu_ps(start), _mm256_add_ps(b, col.0));
            let s1 = _mm256_add_ps(_mm256_loadu_ps(start.add(8)), _mm256_add_ps(b, col.1));
            let (mut v0, mut v1) = (_mm256_add_ps(s0, acc.0), _mm256_add_ps(s1, acc.1));
            if relu {
                let zero = _mm256_setzero_ps();
                v0 = _mm256_max_ps(v0, zero);
                v1 = _mm256_max_ps(v1, zero);
            }
            (v0, v1)
        }
    }

    /// The 8 × 8 transpose: lane `j` of result `i` is lane `i` of row `j`.
    #[inline(always)]
    pub(crate) unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// Six values at `p` into lanes 0..6 (lanes 6 and 7 zero).
    #[inline(always)]
    pub(crate) unsafe fn load6(p: *const f32) -> __m256 {
        unsafe {
            let lo = _mm_loadu_ps(p);
            let hi = _mm_castpd_ps(_mm_load_sd(p.add(4) as *const f64));
            _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(lo), hi)
        }
    }

    /// Lanes 0..6 of `v` to `p`.
    #[inline(always)]
    pub(crate) unsafe fn store6(p: *mut f32, v: __m256) {
        unsafe {
            _mm_storeu_ps(p, _mm256_castps256_ps128(v));
            _mm_store_sd(
                p.add(4) as *mut f64,
                _mm_castps_pd(_mm256_extractf128_ps::<1>(v)),
            );
        }
    }

    /// `R × 16` block of C (`nc` valid columns) = start + `R × kc` of A · `kc × 16` of B.
    /// With `ROWS`, A's element `(r, kk)` is at `a.0 + r·a.1 + kk` (rows in place);
    /// otherwise at `a.0 + kk·a.1 + r` (a packed block).
    #[inline(always)]
    unsafe fn tile<const R: usize, const ROWS: bool>(
        kc: usize,
        (a, lda): (*const f32, usize),
        (b, pf): (*const f32, *const f32),
        ldb: usize,
        c: Out,
        nc: usize,
        st: Store,
    ) {
        unsafe {
            let mut lo = [_mm256_setzero_ps(); R];
            let mut hi = [_mm256_setzero_ps(); R];
            for kk in 0..kc {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(kk * ldb) as *const i8);
                let b0 = _mm256_loadu_ps(b.add(kk * ldb));
                let b1 = _mm256_loadu_ps(b.add(kk * ldb + 8));
                for r in 0..R {
                    let at = a_at::<ROWS>(a, lda, r, kk);
                    let av = _mm256_broadcast_ss(&*at);
                    lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
                }
            }
            store::<R>(lo, hi, c, nc, st);
        }
    }

    /// Stores an `R × 16` tile's products `lo` (columns 0..8) and `hi` (8..16): adds the
    /// start values and biases [`Store`] names, applies ReLU on the last pass, and writes
    /// the `nc` valid columns to `c`.
    #[inline(always)]
    unsafe fn store<const R: usize>(
        lo: [__m256; R],
        hi: [__m256; R],
        c: Out,
        nc: usize,
        st: Store,
    ) {
        unsafe {
            let zero = _mm256_setzero_ps();
            // Stride-0 stand-ins for an absent start or row bias, so that every row below
            // runs the same straight-line code (no per-row branches or spilled rows).
            let zeros = [0f32; NR];
            let col = match st.col_bias {
                // (Whole strips load it as it is: a copy of a run whose length is only
                // known at run time is a call, around which every accumulator is saved.)
                Some(p) if st.first && nc == NR => (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))),
                Some(p) if st.first => {
                    let mut t = [0f32; NR];
                    std::ptr::copy_nonoverlapping(p, t.as_mut_ptr(), nc);
                    (
                        _mm256_loadu_ps(t.as_ptr()),
                        _mm256_loadu_ps(t.as_ptr().add(8)),
                    )
                }
                _ => (zero, zero),
            };
            let (rb, rbs) = match st.row_bias {
                Some(p) if st.first => (p, 1),
                _ => (zeros.as_ptr(), 0),
            };
            let relu = st.last && st.relu;
            // Where the start values are: C itself after the first pass (or when
            // accumulating), another matrix, or nothing; `(pointer, row stride)`.
            let start = match (st.first, st.base) {
                (false, _) | (true, Base::Accumulate) => Some((c.ptr as *const f32, c.rs)),
                (true, Base::Zero) => None,
                (true, Base::Other { ptr, ld }) => Some((ptr, ld)),
            };
            // C transposed (a tile row's 16 values `cs` apart, its 6 or 8 rows adjacent:
            // the pixel-row convolutions' NCHW output): the block is transposed in
            // registers, so each column is one run of R values instead of R single ones.
            let start_in_runs = start.is_none_or(|(_, rs)| rs == 1);
            if (R == 6 || R == TALL) && c.rs == 1 && c.cs != 1 && nc == NR && start_in_runs {
                let mut rows_lo = [zero; 8];
                let mut rows_hi = [zero; 8];
                for r in 0..R {
                    let b = _mm256_broadcast_ss(&*rb.add(r * rbs));
                    rows_lo[r] = _mm256_add_ps(lo[r], _mm256_add_ps(b, col.0));
                    rows_hi[r] = _mm256_add_ps(hi[r], _mm256_add_ps(b, col.1));
                }
                let (sp, scs) = start.map_or((zeros.as_ptr(), 0), |(p, _)| (p, c.cs));
                for (half, block) in [transpose8(rows_lo), transpose8(rows_hi)]
                    .iter()
                    .enumerate()
                {
                    for (j, &t) in block.iter().enumerate() {
                        let col_at = half * 8 + j;
                        let (from, to) = (sp.add(col_at * scs), c.ptr.add(col_at * c.cs));
                        let run = if R == TALL {
                            _mm256_loadu_ps(from)
                        } else {
                            load6(from)
                        };
                        let mut v = _mm256_add_ps(t, run);
                        if relu {
                            v = _mm256_max_ps(v, zero);
                        }
                        if R == TALL {
                            _mm256_storeu_ps(to, v);
                        } else {
                            store6(to, v);
                        }
                    }
                }
                return;
            }
            if nc == NR && c.cs == 1 {
                let (sp, srs) = start.unwrap_or((zeros.as_ptr(), 0));
                for r in 0..R {
                    let (row, s) = (c.ptr.add(r * c.rs), sp.add(r * srs));
                    let (v0, v1) = finish(s, *rb.add(r * rbs), col, (lo[r], hi[r]), relu);
                    _mm256_storeu_ps(row, v0);
                    _mm256_storeu_ps(row.add(8), v1);
                }
                return;
            }
            // Ragged or strided columns: through a 16-value staging row.
            for r in 0..R {
                let row = c.ptr.add(r * c.rs);
                let mut t = [0f32; NR];
                if let Some((sp, srs)) = start {
                    for (jj, v) in t.iter_mut().enumerate().take(nc) {
                        *v = *sp.add(r * srs + jj * c.cs);
                    }
                }
                let (v0, v1) = finish(t.as_ptr(), *rb.add(r * rbs), col, (lo[r], hi[r]), relu);
                _mm256_storeu_ps(t.as_mut_ptr(), v0);
                _mm256_storeu_ps(t.as_mut_ptr().add(8), v1);
                for (jj, v) in t.iter().enumerate().take(nc) {
                    *row.add(jj * c.cs) = *v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each shape with the AVX2 tiles, and again with the AVX-512 ones where the CPU has
    /// them.
    fn both_paths<const N: usize>(
        shapes: [(usize, usize, usize); N],
    ) -> impl Iterator<Item = (bool, (usize, usize, usize))> {
        let paths = if wide_available() {
            vec![false, true]
        } else {
            vec![false]
        };
        paths
            .into_iter()
            .flat_map(move |w| shapes.into_iter().map(move |s| (w, s)))
    }

    #[test]
    fn accumulates_the_product_for_ragged_shapes_and_strides() {
        if !available() {
            eprintln!("no AVX2/FMA on this CPU: the gemm crate path is used instead; skipped");
            return;
        }
        for (wide, (m, n, k)) in both_paths([
            (1, 1, 1),
            (6, 16, 3),
            (7, 17, 300),
            (13, 40, 513),
            (64, 5, 9),
            // Two whole 32-column strips of B in place.
            (9, 64, 20),
            // Wide enough that the AVX-512 path copies A into 8-row blocks: ragged rows
            // and depth, two passes over k, and (201 rows at k = 260) two row blocks.
            (21, 100, 27),
            (201, 130, 260),
        ]) {
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
                sgemm_with(
                    wide,
                    m,
                    n,
                    k,
                    Lhs::Rows {
                        ptr: a.as_ptr(),
                        lda,
                    },
                    rows,
                    Out::rows(c.as_mut_ptr(), ldc),
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
                sgemm_with(
                    wide,
                    m,
                    n,
                    k,
                    Lhs::Rows {
                        ptr: a.as_ptr(),
                        lda,
                    },
                    panels,
                    Out::rows(twice.as_mut_ptr(), ldc),
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

    /// A `[m, k]` and B `[k, n]` (row-major, small integers, so sums are exact), start
    /// values (`other_len` of them), a row bias (`m`) and a column bias (`n`).
    struct Operands {
        a: Vec<f32>,
        b: Vec<f32>,
        other: Vec<f32>,
        rb: Vec<f32>,
        cb: Vec<f32>,
        k: usize,
        n: usize,
    }

    impl Operands {
        fn new(m: usize, n: usize, k: usize, other_len: usize) -> Self {
            Operands {
                a: (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect(),
                b: (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect(),
                other: (0..other_len)
                    .map(|i| ((i * 3) % 17) as f32 - 8.0)
                    .collect(),
                rb: (0..m).map(|i| i as f32 - 2.0).collect(),
                cb: (0..n).map(|j| 1.0 - j as f32).collect(),
                k,
                n,
            }
        }

        /// Row i of A times column j of B.
        fn product(&self, i: usize, j: usize) -> f32 {
            (0..self.k)
                .map(|q| self.a[i * self.k + q] * self.b[q * self.n + j])
                .sum()
        }
    }

    /// C written transposed (rows adjacent, columns `ldc` apart), as the pixel-row
    /// convolutions write NCHW: every start value, bias and clamp as with row-major C,
    /// over full 6- and 8-row tiles, edge tiles and more than one pass over k, with A in
    /// place and packed in 6- and 8-row blocks.
    #[test]
    #[allow(clippy::needless_range_loop)] // (i, j) index A, B, C and both biases
    fn a_transposed_output_gets_the_same_values() {
        if !available() {
            eprintln!("no AVX2/FMA on this CPU; skipped");
            return;
        }
        let shapes = both_paths([(12, 32, 20), (13, 37, 700), (6, 16, 1), (49, 64, 300)]);
        for ((wide, (m, n, k)), bw) in shapes.flat_map(|s| [(s, 0), (s, SLIVER), (s, TALL)]) {
            let ldc = m + 3;
            // Start values laid out like C (element (i, j) at j·ldc + i).
            let ops = Operands::new(m, n, k, n * ldc);
            let (a, b, other, rb, cb) = (&ops.a, &ops.b, &ops.other, &ops.rb, &ops.cb);
            let cases = [
                (Base::Zero, Some(rb.as_ptr()), Some(cb.as_ptr()), true),
                (Base::Accumulate, None, Some(cb.as_ptr()), false),
                (
                    Base::Other {
                        ptr: other.as_ptr(),
                        ld: 1,
                    },
                    None,
                    Some(cb.as_ptr()),
                    true,
                ),
            ];
            for (case, &(base, row_bias, col_bias, relu)) in cases.iter().enumerate() {
                let mut c: Vec<f32> = (0..n * ldc).map(|i| (i % 5) as f32).collect();
                let before = c.clone();
                let e = Epilogue {
                    base,
                    row_bias,
                    col_bias,
                    relu,
                };
                let out = Out {
                    ptr: c.as_mut_ptr(),
                    rs: 1,
                    cs: ldc,
                };
                // bw = 0: A in place; else packed in blocks of bw rows.
                let mut blocks = vec![0f32; m.next_multiple_of(bw.max(1)) * k];
                to_blocks(&mut blocks, bw.max(1), k, m, |q, line| {
                    for (i, v) in line.iter_mut().enumerate() {
                        *v = a[i * k + q];
                    }
                });
                let lhs = match bw {
                    0 => Lhs::Rows {
                        ptr: a.as_ptr(),
                        lda: k,
                    },
                    _ => Lhs::Blocks {
                        ptr: blocks.as_ptr(),
                        k,
                        bw,
                    },
                };
                let rhs = Rhs::Rows {
                    ptr: b.as_ptr(),
                    ldb: n,
                };
                // SAFETY: available() checked; C holds n columns of ldc ≥ m values.
                unsafe { sgemm_with(wide, m, n, k, lhs, rhs, out, e) };
                for j in 0..n {
                    for i in 0..ldc {
                        let at = j * ldc + i;
                        if i >= m {
                            assert_eq!(c[at], before[at], "padding ({i}, {j}) untouched");
                            continue;
                        }
                        let start = match base {
                            Base::Zero => 0.0,
                            Base::Accumulate => before[at],
                            Base::Other { .. } => other[at],
                        };
                        let bias = row_bias.map_or(0.0, |_| rb[i]) + cb[j];
                        let mut want = start + bias + ops.product(i, j);
                        if relu {
                            want = want.max(0.0);
                        }
                        let tol = 1e-3 * (1.0 + want.abs());
                        assert!(
                            (c[at] - want).abs() <= tol,
                            "m{m} n{n} k{k} bw{bw} case {case} at ({i}, {j}): {} vs {want}",
                            c[at]
                        );
                    }
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
        for (wide, (m, n, k)) in both_paths([(5, 21, 7), (13, 16, 300), (2, 3, 0)]) {
            let ops = Operands::new(m, n, k, m * n);
            let (a, b, other, rb, cb) = (&ops.a, &ops.b, &ops.other, &ops.rb, &ops.cb);
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
                let lhs = Lhs::Rows {
                    ptr: a.as_ptr(),
                    lda: k,
                };
                unsafe { sgemm_with(wide, m, n, k, lhs, rows, Out::rows(c.as_mut_ptr(), n), e) };
                for i in 0..m {
                    for j in 0..n {
                        let mut want = ops.product(i, j);
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
