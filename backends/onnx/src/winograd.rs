//! 3×3 stride-1 convolutions by Winograd's minimal filtering, F(4×4, 3×3) and F(2×2, 3×3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): with F(4×4,
//! 3×3) each 4×4 block of outputs comes from the 6×6 block of input around it through 36
//! element-wise products per channel pair instead of 144, so summed over input channels
//! the convolution becomes 36 matrix products — transformed weight `U[ξ]` (`[oc, ic]`,
//! made once at plan time by [`transform_weight`]) times transformed input `V[ξ]` (`[ic,
//! tiles]`) — which the AVX2 kernel runs. 2.25× fewer multiplications than the direct
//! product (3× on 14×14 maps once the edge tiles are counted), for input and output
//! transforms that cost a few additions per element. Rounding differs from the direct sum
//! by a few ulps of the larger terms (the transforms use 4, 5 and 8 as factors), as in
//! other runtimes' Winograd kernels. F(2×2, 3×3) (16 products per 2×2 block, 2.25× fewer
//! than direct) serves wide layers whose 36 transformed matrices would take too much
//! memory, and fills the kernel's 16-column strips on 7×7 maps at batch 1 (16 tiles).
//!
//! The work runs in three parallel passes per group of images: input tiles into `V`
//! (per image and channel), the 36 products into `M` (per `ξ` and column range), and `M`
//! back into output blocks with bias, residual and ReLU (per image and channel).
use crate::cpu_conv::{pack_weight_in, Conv2d, Dest, Fused, PreAffine};
use crate::cpu_kernels::{jobs_with, write_prefix};
use crate::sgemm::{Base, Epilogue, Lhs, Out, Rhs, SharedOut, PANEL, TALL_SLIVER};

/// Largest tile side: inputs per tile side of F(4×4, 3×3). Arrays of tile values have this
/// size; F(2×2, 3×3) uses the first 4 of each.
const MAX_IN: usize = 6;

/// Inputs per tile side for `out` outputs per side (a 3-tap kernel).
const fn inputs(out: usize) -> usize {
    out + 2
}

/// G of F(4×4, 3×3): a kernel row (3 taps) to its 6 transformed values.
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// G of F(2×2, 3×3): a kernel row to its 4 transformed values.
const G2: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// The tile sizes (outputs per side) there are transforms for, preferred first.
const TILES: [usize; 2] = [4, 2];

/// Which transform a weight of `oc × ic` channels gets, as outputs per tile side: F(4×4,
/// 3×3) where its 36 matrices take at most `max_bytes`, else F(2×2, 3×3) where its 16 do.
pub fn pick(oc: usize, ic: usize, max_bytes: usize) -> Option<usize> {
    TILES
        .into_iter()
        .find(|&out| weight_len(oc, ic, out) * 4 <= max_bytes)
}

/// Outputs per tile side of a transformed weight of `len` values ([`transform_weight`]),
/// if it is one for `oc × ic` channels.
pub fn variant(len: usize, oc: usize, ic: usize) -> Option<usize> {
    TILES
        .into_iter()
        .find(|&out| len > 0 && len == weight_len(oc, ic, out))
}

/// Whether [`run`] serves this convolution with `out × out` output tiles: 3×3, stride and
/// dilation 1, one group, with enough output tiles (`min_tiles`, over the batch) to fill
/// the kernel's 16-column strips.
pub fn applies(geo: &Conv2d, min_tiles: usize, out: usize) -> bool {
    let Some([oh, ow]) = geo.out_hw() else {
        return false;
    };
    let [b, ic, h, w] = geo.input;
    geo.kernel == [3, 3]
        && b * ic * h * w > 0
        && geo.stride == [1, 1]
        && geo.dilation == [1, 1]
        && geo.groups == 1
        && b * oh.div_ceil(out) * ow.div_ceil(out) >= min_tiles
}

/// Length of [`transform_weight`]'s result for `out × out` output tiles.
pub fn weight_len(oc: usize, ic: usize, out: usize) -> usize {
    inputs(out).pow(2) * oc.div_ceil(PANEL) * PANEL * ic
}

/// `U[ξ] = G g Gᵀ` for every output/input channel pair of a `[oc, ic, 3, 3]` weight
/// (computed in f64), for `out × out` output tiles (4 or 2): `(out + 2)²` `[oc, ic]`
/// matrices, each packed by [`pack_weight_in`] as the kernel's left-hand operand, in blocks
/// of 8 channels where the CPU has AVX-512, else 16.
pub fn transform_weight(weight: &[f32], oc: usize, ic: usize, out: usize) -> Vec<f32> {
    let mut u = Vec::with_capacity(weight_len(oc, ic, out));
    transform_weight_into(&mut u, weight, oc, ic, out);
    u
}

/// [`transform_weight`] appended to `dst`, one `[oc, ic]` matrix at a time (a model's
/// widest layers would otherwise hold all of them twice while planning).
pub fn transform_weight_into(dst: &mut Vec<f32>, weight: &[f32], oc: usize, ic: usize, out: usize) {
    let g_rows: &[[f64; 3]] = if out == 4 { &G4 } else { &G2 };
    let inn = g_rows.len();
    let mut u = vec![0f32; oc * ic];
    for i in 0..inn {
        for j in 0..inn {
            // U[i·inn + j][pair] = Σ_r Σ_c G[i][r] · g[r][c] · G[j][c].
            for (v, g) in u.iter_mut().zip(weight.chunks_exact(9)) {
                let mut sum = 0f64;
                for r in 0..3 {
                    let row: f64 = (0..3).map(|c| g[r * 3 + c] as f64 * g_rows[j][c]).sum();
                    sum += g_rows[i][r] * row;
                }
                *v = sum as f32;
            }
            dst.extend(pack_weight_in(u_block(), &u, oc, ic, 1));
        }
    }
}

/// Rows of U per packed block: the AVX-512 tiles' height where they run (each tile then
/// reads its rows of U as one stream, not half of each line of a 16-row block), else a
/// 16-channel panel.
fn u_block() -> usize {
    if crate::sgemm::wide_available() {
        TALL_SLIVER
    } else {
        PANEL
    }
}

/// Eight values computed together (eight tiles side by side); plain loops over the lanes,
/// which the compiler turns into vector instructions.
#[derive(Clone, Copy, Default)]
struct Lanes([f32; LANES]);

/// Tiles per [`Lanes`].
const LANES: usize = 8;

/// Eight side-by-side tiles' values as the transforms compute them: [`Lanes`] anywhere,
/// [`simd::V`] (one AVX2 register) on x86-64.
trait Lane:
    Copy
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<f32, Output = Self>
{
    /// Tiles side by side.
    const N: usize;
    /// All zero.
    fn zero() -> Self;
    /// The eight values at `q[at..at + 8]`, zeros past the end of `q`.
    fn load(q: &[f32], at: usize) -> Self;
    /// Writes lanes `skip..skip + n` to `dst`.
    ///
    /// # Safety
    /// `dst..dst + n` is valid for writes; `skip + n ≤ 8`.
    unsafe fn write(self, dst: *mut f32, skip: usize, n: usize);
}

impl Lane for Lanes {
    const N: usize = LANES;

    #[inline(always)]
    fn zero() -> Self {
        Lanes::default()
    }

    #[inline(always)]
    fn load(q: &[f32], at: usize) -> Self {
        let mut t = Lanes::default();
        let have = q.get(at..).unwrap_or_default();
        let n = have.len().min(LANES);
        t.0[..n].copy_from_slice(&have[..n]);
        t
    }

    #[inline(always)]
    unsafe fn write(self, dst: *mut f32, skip: usize, n: usize) {
        // SAFETY: the caller's promise.
        unsafe { write_prefix(dst, &self.0[skip..], n) }
    }
}

impl Lanes {
    /// The values as an array (themselves; on x86-64 the transforms use `simd::V`'s).
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    #[inline(always)]
    fn lanes(self) -> Lanes {
        self
    }
}

/// [`Lane`] in an AVX2 register (only used inside functions built with AVX2).
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Lane, Lanes, LANES};
    use std::arch::x86_64::*;

    /// Eight lanes in one register.
    #[derive(Clone, Copy)]
    pub(super) struct V(__m256);

    /// `+`, `-` and `· f32` on a register type through its intrinsics.
    macro_rules! arithmetic {
        ($t:ident, $add:ident, $sub:ident, $mul:ident, $splat:ident) => {
            impl std::ops::Add for $t {
                type Output = $t;
                #[inline(always)]
                fn add(self, o: $t) -> $t {
                    unsafe { $t($add(self.0, o.0)) }
                }
            }

            impl std::ops::Sub for $t {
                type Output = $t;
                #[inline(always)]
                fn sub(self, o: $t) -> $t {
                    unsafe { $t($sub(self.0, o.0)) }
                }
            }

            impl std::ops::Mul<f32> for $t {
                type Output = $t;
                #[inline(always)]
                fn mul(self, k: f32) -> $t {
                    unsafe { $t($mul(self.0, $splat(k))) }
                }
            }
        };
    }

    // SAFETY (every intrinsic below): these inline into the transforms, which are built
    // with AVX2 (`V`) or AVX-512F (`V16`, `input_channel_wide`) and only called where the
    // CPU has it.
    arithmetic!(
        V,
        _mm256_add_ps,
        _mm256_sub_ps,
        _mm256_mul_ps,
        _mm256_set1_ps
    );

    impl Lane for V {
        const N: usize = LANES;

        #[inline(always)]
        fn zero() -> Self {
            unsafe { V(_mm256_setzero_ps()) }
        }

        #[inline(always)]
        fn load(q: &[f32], at: usize) -> Self {
            match q.get(at..at + LANES) {
                Some(v) => unsafe { V(_mm256_loadu_ps(v.as_ptr())) },
                None => V::from(Lanes::load(q, at)),
            }
        }

        #[inline(always)]
        unsafe fn write(self, dst: *mut f32, skip: usize, n: usize) {
            unsafe {
                if skip == 0 && n == LANES {
                    _mm256_storeu_ps(dst, self.0);
                } else {
                    // Lanes skip..skip + n under a mask, at their place relative to dst
                    // (the masked-off lanes touch no memory).
                    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                    let from = _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(skip as i32 - 1));
                    let to = _mm256_cmpgt_epi32(_mm256_set1_epi32((skip + n) as i32), lane);
                    let mask = _mm256_and_si256(from, to);
                    _mm256_maskstore_ps(dst.wrapping_sub(skip), mask, self.0);
                }
            }
        }
    }

    /// Sixteen lanes in one AVX-512 register (only used inside functions built with
    /// AVX-512F).
    #[derive(Clone, Copy)]
    pub(super) struct V16(__m512);

    arithmetic!(
        V16,
        _mm512_add_ps,
        _mm512_sub_ps,
        _mm512_mul_ps,
        _mm512_set1_ps
    );

    impl Lane for V16 {
        const N: usize = 16;

        #[inline(always)]
        fn zero() -> Self {
            unsafe { V16(_mm512_setzero_ps()) }
        }

        #[inline(always)]
        fn load(q: &[f32], at: usize) -> Self {
            let have = q.len().saturating_sub(at).min(16);
            unsafe {
                if have == 16 {
                    V16(_mm512_loadu_ps(q.as_ptr().add(at)))
                } else if have == 0 {
                    V16(_mm512_setzero_ps())
                } else {
                    V16(_mm512_maskz_loadu_ps(
                        (1u16 << have) - 1,
                        q.as_ptr().add(at),
                    ))
                }
            }
        }

        #[inline(always)]
        unsafe fn write(self, dst: *mut f32, skip: usize, n: usize) {
            unsafe {
                if skip == 0 && n == 16 {
                    _mm512_storeu_ps(dst, self.0);
                } else {
                    // Lanes skip..skip + n under a mask, at their place relative to dst.
                    let mask = (((1u32 << n) - 1) << skip) as u16;
                    _mm512_mask_storeu_ps(dst.wrapping_sub(skip), mask, self.0);
                }
            }
        }
    }

    impl V {
        /// The values as an array.
        #[inline(always)]
        pub(super) fn lanes(self) -> Lanes {
            let mut t = Lanes::default();
            unsafe { _mm256_storeu_ps(t.0.as_mut_ptr(), self.0) };
            t
        }
    }

    impl From<Lanes> for V {
        #[inline(always)]
        fn from(l: Lanes) -> V {
            unsafe { V(_mm256_loadu_ps(l.0.as_ptr())) }
        }
    }
}

/// The lane type the transforms use on this target.
#[cfg(target_arch = "x86_64")]
type Fast = simd::V;
#[cfg(not(target_arch = "x86_64"))]
type Fast = Lanes;

impl std::ops::Add for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn add(self, o: Lanes) -> Lanes {
        Lanes(std::array::from_fn(|l| self.0[l] + o.0[l]))
    }
}

impl std::ops::Sub for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn sub(self, o: Lanes) -> Lanes {
        Lanes(std::array::from_fn(|l| self.0[l] - o.0[l]))
    }
}

impl std::ops::Mul<f32> for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn mul(self, k: f32) -> Lanes {
        Lanes(self.0.map(|v| v * k))
    }
}

/// Bᵀ along one axis: `OUT + 2` inputs to as many transformed values (the rest of the
/// array passes through).
#[inline(always)]
fn input_1d<const OUT: usize, T>(d: [T; MAX_IN]) -> [T; MAX_IN]
where
    T: Copy
        + std::ops::Add<Output = T>
        + std::ops::Sub<Output = T>
        + std::ops::Mul<f32, Output = T>,
{
    if OUT == 2 {
        return [
            d[0] - d[2],
            d[1] + d[2],
            d[2] - d[1],
            d[1] - d[3],
            d[4],
            d[5],
        ];
    }
    let (a, b) = (d[4] - d[2] * 4.0, d[3] - d[1] * 4.0);
    let (c, e) = (d[4] - d[2], (d[3] - d[1]) * 2.0);
    [
        d[0] * 4.0 - d[2] * 5.0 + d[4],
        a + b,
        a - b,
        c + e,
        c - e,
        d[1] * 4.0 - d[3] * 5.0 + d[5],
    ]
}

/// Aᵀ along one axis: `OUT + 2` products to `OUT` outputs (the rest of the array is
/// unused).
#[inline(always)]
fn output_1d<const OUT: usize, T>(m: [T; MAX_IN]) -> [T; 4]
where
    T: Copy
        + std::ops::Add<Output = T>
        + std::ops::Sub<Output = T>
        + std::ops::Mul<f32, Output = T>,
{
    if OUT == 2 {
        return [m[0] + m[1] + m[2], m[1] - m[2] - m[3], m[0], m[0]];
    }
    let (s1, d1) = (m[1] + m[2], m[1] - m[2]);
    let (s2, d2) = (m[3] + m[4], m[3] - m[4]);
    [
        m[0] + s1 + s2,
        d1 + d2 * 2.0,
        s1 + s2 * 4.0,
        d1 + d2 * 8.0 + m[5],
    ]
}

/// The `(OUT + 2)²` transformed values of eight side-by-side tiles (lane `l`: tile `tx0 +
/// l`) of one tile row, read from the channel's padded plane split by column phase: `q`
/// holds `OUT` planes (`phase·rows·qw`), plane `p` column `t` = padded column `OUT·t + p`,
/// and tile row `ty` starts at row `OUT·ty`.
#[inline(always)]
fn input_tiles<const OUT: usize, T: Lane>(
    q: &[f32],
    rows: usize,
    qw: usize,
    ty: usize,
    tx0: usize,
) -> [[T; MAX_IN]; MAX_IN] {
    let inn = inputs(OUT);
    let load = |r: usize, k: usize| {
        if r >= inn || k >= inn {
            return T::zero();
        }
        T::load(q, ((k % OUT) * rows + OUT * ty + r) * qw + tx0 + k / OUT)
    };
    // Bᵀ along each row of the block, then down each column.
    let h: [[T; MAX_IN]; MAX_IN] =
        std::array::from_fn(|r| input_1d::<OUT, _>(std::array::from_fn(|k| load(r, k))));
    let mut v = [[T::zero(); MAX_IN]; MAX_IN];
    for j in 0..inn {
        for (i, t) in input_1d::<OUT, _>(std::array::from_fn(|r| h[r][j]))
            .into_iter()
            .enumerate()
        {
            v[i][j] = t;
        }
    }
    v
}

/// The `OUT × OUT` outputs of eight side-by-side tiles from their products (`m[i][j]`).
#[inline(always)]
fn output_tiles<const OUT: usize, T: Lane>(m: &[[T; MAX_IN]; MAX_IN]) -> [[T; 4]; 4] {
    let mut z = [[T::zero(); MAX_IN]; 4];
    for j in 0..inputs(OUT) {
        for (r, t) in output_1d::<OUT, _>(std::array::from_fn(|i| m[i][j]))
            .into_iter()
            .enumerate()
        {
            z[r][j] = t;
        }
    }
    z.map(output_1d::<OUT, _>)
}

/// Where the tiles of one group of images lie.
#[derive(Clone, Copy)]
struct Grid {
    /// Tile rows and columns per image.
    th: usize,
    tw: usize,
    /// Tiles per image (`th · tw`): columns of V and M per image.
    per_image: usize,
    /// Columns of V and M (all images of the group, padded to 16).
    cp: usize,
    /// Rows and columns of each column phase of a padded plane (see [`input_tiles`]).
    ph: usize,
    qw: usize,
    /// Output height and width.
    oh: usize,
    ow: usize,
}

/// Channel `c` of image `bi`'s columns of every V[ξ] (`[ic, cp]` in 16-column panels),
/// from its phase-split padded plane `q`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `v` holds `(OUT + 2)²` such matrices and nothing else writes
/// this channel's columns of image `bi`.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn input_channel<const OUT: usize>(
    g: &Grid,
    q: &[f32],
    ic: usize,
    c: usize,
    bi: usize,
    v: SharedOut,
) {
    // SAFETY: the caller's promise.
    unsafe { input_channel_with::<OUT, Fast>(g, q, ic, c, bi, v) }
}

/// [`input_channel`] sixteen tiles at a time in AVX-512 registers (for rows of at least
/// 12 tiles, which it fills).
///
/// # Safety
/// As [`input_channel`], and the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn input_channel_wide<const OUT: usize>(
    g: &Grid,
    q: &[f32],
    ic: usize,
    c: usize,
    bi: usize,
    v: SharedOut,
) {
    // SAFETY: the caller's promise.
    unsafe { input_channel_with::<OUT, simd::V16>(g, q, ic, c, bi, v) }
}

/// [`input_channel`]'s body, `T::N` tiles at a time.
#[inline(always)]
unsafe fn input_channel_with<const OUT: usize, T: Lane>(
    g: &Grid,
    q: &[f32],
    ic: usize,
    c: usize,
    bi: usize,
    v: SharedOut,
) {
    let inn = inputs(OUT);
    for ty in 0..g.th {
        for tx0 in (0..g.tw).step_by(T::N) {
            let vt = input_tiles::<OUT, T>(q, g.ph, g.qw, ty, tx0);
            let n = T::N.min(g.tw - tx0);
            let col0 = bi * g.per_image + ty * g.tw + tx0;
            // The lanes in runs, split where a 16-column panel ends.
            let mut l = 0;
            while l < n {
                let col = col0 + l;
                let run = (PANEL - col % PANEL).min(n - l);
                let at = (col / PANEL) * ic * PANEL + c * PANEL + col % PANEL;
                for (i, row) in vt.iter().enumerate().take(inn) {
                    for (j, t) in row.iter().enumerate().take(inn) {
                        let xi = i * inn + j;
                        // SAFETY: (ξ, c, col..col + run) are this job's own elements.
                        unsafe { t.write(v.at(xi * ic * g.cp + at), l, run) };
                    }
                }
                l += run;
            }
        }
    }
}

/// Output channel `o` of image `bi` (the plane at `plane`, with `bias` added) from the
/// `(OUT + 2)²` products in M (`[oc, cp]` each), with `f`'s residual and ReLU.
///
/// # Safety
/// The CPU has AVX2 and FMA; `dest` holds the output (and residual) and nothing else
/// writes this plane.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn output_channel<const OUT: usize>(
    g: &Grid,
    m: &[f32],
    (oc, o, bi): (usize, usize, usize),
    (plane, bias): (usize, f32),
    f: &Fused<'_>,
    dest: Dest,
) {
    let (oh, ow, cp) = (g.oh, g.ow, g.cp);
    let inn = inputs(OUT);
    for ty in 0..g.th {
        for tx0 in (0..g.tw).step_by(LANES) {
            let n = LANES.min(g.tw - tx0);
            let at = o * cp + bi * g.per_image + ty * g.tw + tx0;
            // Lanes past n hold other tiles' (or rows') products, or zeros: each lane's
            // transform is its own, and those lanes' outputs are not written.
            let prods: [[Fast; MAX_IN]; MAX_IN] = std::array::from_fn(|i| {
                std::array::from_fn(|jj| {
                    if i >= inn || jj >= inn {
                        return Fast::zero();
                    }
                    Fast::load(m, (i * inn + jj) * oc * cp + at)
                })
            });
            let y = output_tiles::<OUT, Fast>(&prods).map(|row| row.map(|t| t.lanes()));
            let x0 = OUT * tx0;
            let width = (OUT * n).min(ow - x0);
            for (r, yr) in y.iter().take(OUT).enumerate() {
                let yy = OUT * ty + r;
                if yy >= oh {
                    break;
                }
                // SAFETY: this function runs with AVX2 (its own target features).
                let mut row = unsafe { interleave::<OUT>(yr, bias) };
                let idx = plane + yy * ow + x0;
                if let Some(res) = dest.residual {
                    for (i, v) in row.iter_mut().take(width).enumerate() {
                        // SAFETY: the residual covers the output; this element is read
                        // before it (possibly the same place) is written below.
                        *v += unsafe { *res.add(idx + i) };
                    }
                }
                if f.relu {
                    row.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                // SAFETY: each output element belongs to one (image, channel) job and
                // one tile of it.
                unsafe { write_prefix(dest.out.at(idx), &row, width) };
            }
        }
    }
}

/// Runs the convolution (`u` from [`transform_weight`], for tiles that [`applies`]
/// accepts): `x` is `[b, ic, h, w]`, the result `[b, oc, oh, ow]` with `f`'s bias,
/// residual (read from `dest`), ReLU and input affine, written to `dest`.
///
/// # Safety
/// As `Conv2d::run_to`: `dest` is valid for the whole output, its residual read only
/// where the output is written.
pub(crate) unsafe fn run_to(
    geo: &Conv2d,
    x: &[f32],
    u: &[f32],
    f: &Fused<'_>,
    threads: usize,
    dest: Dest,
) {
    let [_, ic, _, _] = geo.input;
    // SAFETY: forwarded from the caller.
    unsafe {
        match variant(u.len(), geo.out_channels, ic) {
            Some(2) => run_tiles::<2>(geo, x, u, f, threads, dest),
            _ => run_tiles::<4>(geo, x, u, f, threads, dest),
        }
    }
}

/// [`run_to`] with `OUT × OUT` output tiles.
///
/// # Safety
/// As [`run_to`].
unsafe fn run_tiles<const OUT: usize>(
    geo: &Conv2d,
    x: &[f32],
    u: &[f32],
    f: &Fused<'_>,
    threads: usize,
    dest: Dest,
) {
    let xi_count = inputs(OUT).pow(2);
    let [b, ic, h, w] = geo.input;
    let oc = geo.out_channels;
    let Some([oh, ow]) = geo.out_hw() else {
        return;
    };
    let (th, tw) = (oh.div_ceil(OUT), ow.div_ceil(OUT));
    let per_image = th * tw;
    let len = b * oc * oh * ow;
    if len == 0 || ic == 0 {
        // SAFETY: the caller's output, of `len` elements.
        return unsafe { std::ptr::write_bytes(dest.out.0, 0, len) };
    }
    let ulen = weight_len(oc, ic, OUT) / xi_count;
    // Images go through in groups whose V and M stay near 16 MiB.
    let chunk = ((4 << 20) / (xi_count * (ic + oc) * per_image)).clamp(1, b);
    let parallel = threads > 1;
    // The padded plane every tile reads: OUT·th + 2 rows of OUT·tw + 2 columns, split
    // into OUT column phases of `qw` columns (eight tiles read past the last one).
    let ph = OUT * th + 2;
    // Rows of 12 tiles or more go sixteen at a time where the CPU has AVX-512.
    let sixteen = cfg!(target_arch = "x86_64") && tw >= 12 && crate::sgemm::wide_available();
    let qw = tw.next_multiple_of(if sixteen { 16 } else { LANES }) + 2;
    for b0 in (0..b).step_by(chunk) {
        let nb = chunk.min(b - b0);
        let cols = nb * per_image;
        let cp = cols.next_multiple_of(PANEL);
        let grid = Grid {
            th,
            tw,
            per_image,
            cp,
            ph,
            qw,
            oh,
            ow,
        };
        // V[ξ]: [ic, cp] in 16-column panels. The columns past `cols` only meet unused
        // columns of M; they are zeroed here, the rest written by the jobs below.
        let mut v: Vec<f32> = Vec::with_capacity(xi_count * ic * cp);
        let vs = SharedOut(v.as_mut_ptr());
        if cols < cp {
            for r in 0..xi_count * ic {
                let at = (r / ic) * ic * cp + (cols / PANEL) * ic * PANEL + (r % ic) * PANEL;
                // SAFETY: within the allocation (the last panel of row r % ic of V[r / ic]).
                unsafe { std::ptr::write_bytes(vs.at(at + cols % PANEL), 0, cp - cols) };
            }
        }
        let input = |q: &mut Vec<f32>, j: usize| {
            let (bi, c) = (j / ic, j % ic);
            // Zeroed once per buffer: every channel writes the same interior positions,
            // so the padding stays zero.
            if q.len() != OUT * ph * qw {
                q.clear();
                q.resize(OUT * ph * qw, 0.0);
            }
            let src = &x[((b0 + bi) * ic + c) * h * w..][..h * w];
            let (pt, pl) = (geo.pads[0], geo.pads[1]);
            let (sc, sh, lo) = PreAffine::of_channel(f.pre, c);
            // The padded plane, split by column phase (see `input_tiles`); only the rows
            // and columns the tiles read (the bottom/right padding may be cut short).
            let used = w.min((OUT * tw + 2).saturating_sub(pl));
            for (y, line) in src.chunks(w).enumerate().take(ph.saturating_sub(pt)) {
                // Padded column OUT·t + phase is column t of that phase's plane.
                for phase in 0..OUT {
                    let first = (phase + OUT - pl % OUT) % OUT;
                    let row = &mut q[(phase * ph + y + pt) * qw + (first + pl) / OUT..];
                    let from = line[..used].iter().skip(first).step_by(OUT);
                    for (d, &s) in row.iter_mut().zip(from) {
                        *d = if f.pre.is_some() {
                            (s * sc + sh).max(lo)
                        } else {
                            s
                        };
                    }
                }
            }
            // SAFETY: run() is only called where the AVX2 kernel is available (and
            // `sixteen` only with AVX-512F); this job owns channel c of image bi in V.
            #[cfg(target_arch = "x86_64")]
            if sixteen {
                unsafe { input_channel_wide::<OUT>(&grid, q, ic, c, bi, vs) };
                return;
            }
            unsafe { input_channel::<OUT>(&grid, q, ic, c, bi, vs) };
        };
        jobs_with(nb * ic, parallel, Vec::new, input);
        // SAFETY: the padding columns were zeroed and the jobs wrote every other element.
        unsafe { v.set_len(xi_count * ic * cp) };
        // M[ξ] = U[ξ] · V[ξ]: [oc, cp] each.
        let mut m: Vec<f32> = Vec::with_capacity(xi_count * oc * cp);
        let ms = SharedOut(m.as_mut_ptr());
        let strips = cp / PANEL;
        let per_job = strips
            .div_ceil((4 * threads).div_ceil(xi_count).max(1))
            .clamp(1, 8);
        let parts = strips.div_ceil(per_job);
        let product = |_: &mut (), j: usize| {
            let (xi, s0) = (j / parts, (j % parts) * per_job);
            let s1 = (s0 + per_job).min(strips);
            let a = Lhs::Blocks {
                ptr: u[xi * ulen..].as_ptr(),
                k: ic,
                bw: u_block(),
            };
            let rhs = Rhs::Panels {
                ptr: v[xi * ic * cp + s0 * ic * PANEL..].as_ptr(),
                k: ic,
            };
            let e = Epilogue {
                base: Base::Zero,
                row_bias: None,
                col_bias: None,
                relu: false,
            };
            let c = Out::rows(ms.at(xi * oc * cp + s0 * PANEL), cp);
            // SAFETY: this job writes columns s0·16..s1·16 of M[ξ] and nothing else; U[ξ]
            // holds oc rows in blocks of k = ic, V[ξ] those strips' panels.
            unsafe { crate::sgemm::sgemm(oc, (s1 - s0) * PANEL, ic, a, rhs, c, e) };
        };
        jobs_with(xi_count * parts, parallel, || (), product);
        // SAFETY: the jobs wrote every column of every row of every M[ξ].
        unsafe { m.set_len(xi_count * oc * cp) };
        let output = |_: &mut (), j: usize| {
            let (bi, o) = (j / oc, j % oc);
            let plane = ((b0 + bi) * oc + o) * oh * ow;
            let bias = f.bias.map_or(0.0, |v| v[o]);
            // SAFETY: run() is only called where the AVX2 kernel is available; this job
            // owns output plane `plane`.
            unsafe { output_channel::<OUT>(&grid, &m, (oc, o, bi), (plane, bias), f, dest) };
        };
        jobs_with(nb * oc, parallel, || (), output);
    }
}

/// One output row of eight tiles, `bias` added: value `s` of tile `l` (`y[s]` lane `l`)
/// goes to column `OUT·l + s` (the first `OUT · 8` values of the result). With AVX2 an
/// `OUT × 8` transpose in registers.
///
/// # Safety
/// On x86-64 the CPU has AVX2.
#[inline(always)]
unsafe fn interleave<const OUT: usize>(y: &[Lanes; 4], bias: f32) -> [f32; 4 * LANES] {
    let mut row = [0f32; 4 * LANES];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 (the caller's promise); loads and stores stay inside the arrays.
    unsafe {
        use std::arch::x86_64::*;
        let b = _mm256_set1_ps(bias);
        let v = |i: usize| _mm256_add_ps(_mm256_loadu_ps(y[i].0.as_ptr()), b);
        let p = row.as_mut_ptr();
        if OUT == 2 {
            let (y0, y1) = (v(0), v(1));
            // Tiles 0-1 and 4-5, then 2-3 and 6-7, two values each.
            let (lo, hi) = (_mm256_unpacklo_ps(y0, y1), _mm256_unpackhi_ps(y0, y1));
            _mm256_storeu_ps(p, _mm256_permute2f128_ps::<0x20>(lo, hi));
            _mm256_storeu_ps(p.add(8), _mm256_permute2f128_ps::<0x31>(lo, hi));
            return row;
        }
        let (y0, y1, y2, y3) = (v(0), v(1), v(2), v(3));
        let (t0, t1) = (_mm256_unpacklo_ps(y0, y1), _mm256_unpackhi_ps(y0, y1));
        let (t2, t3) = (_mm256_unpacklo_ps(y2, y3), _mm256_unpackhi_ps(y2, y3));
        // u_j holds tiles j (low half) and j + 4 (high half), four values each.
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        _mm256_storeu_ps(p, _mm256_permute2f128_ps::<0x20>(u0, u1));
        _mm256_storeu_ps(p.add(8), _mm256_permute2f128_ps::<0x20>(u2, u3));
        _mm256_storeu_ps(p.add(16), _mm256_permute2f128_ps::<0x31>(u0, u1));
        _mm256_storeu_ps(p.add(24), _mm256_permute2f128_ps::<0x31>(u2, u3));
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (s, ys) in y.iter().take(OUT).enumerate() {
        for (l, &val) in ys.0.iter().enumerate() {
            row[l * OUT + s] = val + bias;
        }
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_conv::{PreAffine, Weight};

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Against the direct convolution (`Weight::Dense`, checked against the definition in
    /// `cpu_conv`'s tests) over ragged map sizes, paddings, batches and fused extras.
    #[test]
    fn matches_the_direct_convolution() {
        // (batch, ic, oc, h, w, pads [t, l, b, r])
        let cases = [
            (1, 16, 16, 8, 8, [1, 1, 1, 1]),
            (2, 16, 32, 7, 7, [1, 1, 1, 1]),
            (1, 24, 20, 14, 14, [1, 1, 1, 1]),
            (3, 17, 33, 9, 13, [0, 0, 0, 0]),
            (1, 32, 16, 10, 6, [2, 0, 1, 2]),
            (2, 16, 48, 5, 23, [1, 2, 0, 1]),
            // Ten tiles per row: full groups of eight, and groups across 16-column panels.
            (2, 16, 16, 6, 40, [1, 1, 1, 1]),
            // Rows of 13 and 16 tiles: sixteen at a time where the CPU has AVX-512.
            (1, 16, 16, 6, 50, [1, 1, 1, 1]),
            (2, 8, 16, 5, 64, [1, 1, 1, 1]),
            (1, 16, 24, 38, 37, [1, 1, 1, 1]),
        ];
        for (i, &(b, ic, oc, h, w, pads)) in cases.iter().enumerate() {
            let geo = Conv2d {
                input: [b, ic, h, w],
                out_channels: oc,
                kernel: [3, 3],
                stride: [1, 1],
                dilation: [1, 1],
                pads,
                groups: 1,
            };
            let [oh, ow] = geo.out_hw().unwrap();
            let x = data(b * ic * h * w, i as u32 + 1);
            let wt = data(oc * ic * 9, i as u32 + 7);
            let bias = data(oc, 3);
            let residual = data(b * oc * oh * ow, 5);
            let (scale, shift) = (data(ic, 11), data(ic, 13));
            let variants = [
                Fused::default(),
                Fused {
                    bias: Some(&bias),
                    relu: true,
                    ..Default::default()
                },
                Fused {
                    bias: Some(&bias),
                    residual: Some(&residual),
                    relu: true,
                    pre: Some(PreAffine {
                        image: None,
                        scale: &scale,
                        shift: &shift,
                        relu: true,
                    }),
                },
            ];
            for tile in [4, 2] {
                let u = transform_weight(&wt, oc, ic, tile);
                assert_eq!(u.len(), weight_len(oc, ic, tile));
                assert_eq!(variant(u.len(), oc, ic), Some(tile));
                for (v, f) in variants.iter().enumerate() {
                    let want = geo.run(&x, Weight::Dense(&wt), f, 1);
                    for threads in [1, 2] {
                        let mut got = vec![f32::NAN; want.len()];
                        let p = got.as_mut_ptr();
                        let dest = Dest {
                            out: SharedOut(p),
                            residual: f.residual.map(<[f32]>::as_ptr),
                        };
                        // SAFETY: `got` and the residual hold the whole output.
                        unsafe { run_to(&geo, &x, &u, f, threads, dest) };
                        // With a residual, also written over it.
                        let mut over = f.residual.map(<[f32]>::to_vec);
                        if let Some(acc) = over.as_mut() {
                            let p = acc.as_mut_ptr();
                            let dest = Dest {
                                out: SharedOut(p),
                                residual: Some(p),
                            };
                            // SAFETY: `acc` holds the whole output.
                            unsafe { run_to(&geo, &x, &u, f, threads, dest) };
                        }
                        for got in std::iter::once(&got).chain(over.as_ref()) {
                            assert_eq!(got.len(), want.len());
                            for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                                assert!(
                                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()) * (ic as f32).sqrt(),
                                    "case {i} F({tile}) variant {v} threads {threads} at {j}: {g} vs {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn picks_the_larger_tile_where_its_weight_fits() {
        // F(4×4): 36 · 64 · 64 floats; F(2×2): 16 · 512 · 512 = exactly 16 MiB.
        assert_eq!(pick(64, 64, 16 << 20), Some(4));
        assert_eq!(pick(512, 512, 16 << 20), Some(2));
        assert_eq!(pick(1024, 512, 16 << 20), None);
        // A length that is neither transform's is no Winograd weight.
        assert_eq!(variant(weight_len(64, 64, 4) + 1, 64, 64), None);
        assert_eq!(variant(0, 64, 64), None);
    }

    #[test]
    fn applies_to_3x3_stride_1_with_enough_tiles() {
        let geo = |b, h, stride| Conv2d {
            input: [b, 16, h, h],
            out_channels: 16,
            kernel: [3, 3],
            stride: [stride, stride],
            dilation: [1, 1],
            pads: [1, 1, 1, 1],
            groups: 1,
        };
        assert!(applies(&geo(1, 14, 1), 16, 4));
        assert!(!applies(&geo(1, 7, 1), 16, 4));
        assert!(applies(&geo(1, 7, 1), 16, 2));
        assert!(applies(&geo(4, 7, 1), 16, 4));
        assert!(!applies(&geo(1, 28, 2), 16, 4));
        assert!(!applies(&geo(1, 28, 2), 16, 2));
        // An empty input (a zero-sized dimension, padded out to a kernel's width) is left
        // to the direct path.
        let empty = Conv2d {
            input: [4, 16, 7, 0],
            pads: [1, 2, 1, 2],
            ..geo(4, 7, 1)
        };
        assert!(empty.out_hw().is_some() && !applies(&empty, 16, 4) && !applies(&empty, 16, 2));
    }
}
