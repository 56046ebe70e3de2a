//! Wide stride-2 kernels without a patch matrix (ResNet's and DenseNet's 7×7 stems, whose
//! patches are 49 times the input): one AVX-512 tile holds 12 neighbouring output pixels
//! of one row × 32 output channels, two registers per pixel (an AVX2 tile: 6 pixels × 16
//! channels, two 8-lane registers per pixel). Each row of the packed weight (one tap of
//! one input channel: a panel of 16 channels' weights, two with AVX-512) meets the input
//! values the pixels read there, each broadcast from the padded copy in place; 16 × 16
//! (AVX2: 8 × 8) transposes then turn the pixels' registers into the channels' rows of
//! the NCHW output.

use super::{Conv2d, Dest, Fused};
use crate::sgemm::PANEL;

/// Output pixels (of one row) one AVX-512 tile covers: with two 16-channel panels, 24
/// accumulators.
const PIXELS: usize = 12;

/// Output pixels one AVX2 tile covers: with one 16-channel panel, 12 accumulators.
const PIXELS_AVX2: usize = 6;

/// Output pixels and channels one tile covers on this CPU.
fn tile_shape() -> (usize, usize) {
    if crate::sgemm::wide_available() {
        (PIXELS, 2 * PANEL)
    } else {
        (PIXELS_AVX2, PANEL)
    }
}

/// Whether [`Conv2d::run_strided`] serves this convolution: one group, stride 2 with a
/// kernel wide enough that its padded copy splits columns by parity (`split_columns`: the
/// stems; 3×3 and 1×1 stride-2 layers run faster from patches), output rows at least one
/// tile wide, on a CPU with AVX2 and FMA.
pub(super) fn applies(geo: &Conv2d) -> bool {
    geo.groups == 1
        && geo.stride == [2, 2]
        && geo.split_columns()
        && crate::sgemm::available()
        && geo.out_hw().is_some_and(|[_, ow]| ow >= tile_shape().0)
}

impl Conv2d {
    /// [`Conv2d::run`] through 12 × 32 register tiles (see the module; [`applies`] holds;
    /// `panels` from [`super::pack_weight`]).
    ///
    /// # Safety
    /// As `Conv2d::run_to`.
    pub(super) unsafe fn run_strided(
        &self,
        x: &[f32],
        panels: &[f32],
        f: &Fused<'_>,
        threads: usize,
        dest: Dest,
    ) {
        let [b, _, _, _] = self.input;
        let Some([oh, ow]) = self.out_hw() else {
            return;
        };
        let oc = self.out_channels;
        let wide = crate::sgemm::wide_available();
        let (pixels, channels) = tile_shape();
        // A tile's last pixels may read up to a tile past a row's end (the slack covers the
        // last row of the last plane).
        let src = self.source(x, f.pre, true, pixels + self.kernel[1]);
        let k = src.taps.len();
        if b * oc * oh * ow == 0 {
            return;
        }
        // Output pixel (y, x) reads the padded copy at y·row + x past each tap (as
        // `pixel_offsets`: columns split by parity are neighbours).
        let (_, _, wq) = self.padded_geometry();
        let row = self.stride[0] * wq;
        let (groups, tiles_x) = (oc.div_ceil(channels), ow.div_ceil(pixels));
        // Jobs: runs of output rows of one image, at least four per thread; each row's
        // input stays in cache while every channel panel passes over it.
        let rows = b * oh;
        let jobs = (4 * threads).min(rows);
        let job = |j: usize| {
            for r in j * rows / jobs..(j + 1) * rows / jobs {
                let (bi, y) = (r / oh, r % oh);
                let image = src.data[bi * src.group..].as_ptr();
                for p in 0..groups {
                    let c0 = p * channels;
                    // The tile's panels: with two, a last panel alone reads its own
                    // weights twice (the copy is dropped).
                    let first = c0 / PANEL;
                    let second = (first + 1).min(oc.div_ceil(PANEL) - 1);
                    let at = (bi * oc + c0) * oh * ow + y * ow;
                    for tx in 0..tiles_x {
                        let x0 = tx * pixels;
                        let tile = Tile {
                            // SAFETY (all): inside the padded copy (its slack covers a
                            // last tile's reads past the row) and the packed panels.
                            x: unsafe { image.add(y * row + x0) },
                            w: unsafe {
                                [first, second].map(|q| panels.as_ptr().add(q * k * PANEL))
                            },
                            out: dest.out.at(at + x0),
                            residual: dest.residual_at(at + x0),
                            bias: f.bias.map(|v| &v[c0..]),
                            channels: channels.min(oc - c0),
                            pixels: pixels.min(ow - x0),
                            plane: oh * ow,
                            relu: f.relu,
                        };
                        // SAFETY: `applies` checked AVX2 and FMA (and `wide` AVX-512);
                        // this job alone writes row y of image bi; `src.taps` holds the k
                        // rows of the patch matrix.
                        unsafe {
                            if wide {
                                tile.run(&src.taps)
                            } else {
                                tile.run_avx2(&src.taps)
                            }
                        };
                    }
                }
            }
        };
        let parallel = threads > 1 && b * oc * oh * ow * k >= 256 * 1024;
        crate::cpu_kernels::jobs_with(jobs, parallel, || (), |_, j| job(j));
    }
}

/// One register tile's operands.
struct Tile<'a> {
    /// Where the tile's first pixel reads channel 0's first tap in the padded copy.
    x: *const f32,
    /// The tile's weight panels (the AVX2 tile reads the first): row `r` (tap-major) at
    /// `w + 16·r`.
    w: [*const f32; 2],
    /// The first pixel in the first channel's output plane (planes `plane` apart), and in
    /// the residual's.
    out: *mut f32,
    residual: Option<*const f32>,
    bias: Option<&'a [f32]>,
    /// Output channels (at most the tile's 32 or 16) and pixels (at most its width) kept.
    channels: usize,
    pixels: usize,
    plane: usize,
    relu: bool,
}

impl Tile<'_> {
    /// Sums every row of the patch matrix (`taps[r]`: where row `r` starts, relative to
    /// `x`) for [`PIXELS`] neighbouring pixels, then stores the tile with the bias and
    /// residual added (and ReLU).
    ///
    /// # Safety
    /// The CPU has AVX-512F; the pointers are valid as [`Tile`] says.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run(&self, taps: &[usize]) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); PIXELS]; 2];
        for (r, &t) in taps.iter().enumerate() {
            // SAFETY: see the function's contract.
            unsafe {
                let xs = self.x.add(t);
                let w0 = _mm512_loadu_ps(self.w[0].add(r * PANEL));
                let w1 = _mm512_loadu_ps(self.w[1].add(r * PANEL));
                let [lo, hi] = &mut acc;
                for (j, (a, b)) in lo.iter_mut().zip(hi.iter_mut()).enumerate() {
                    let v = _mm512_set1_ps(*xs.add(j));
                    *a = _mm512_fmadd_ps(v, w0, *a);
                    *b = _mm512_fmadd_ps(v, w1, *b);
                }
            }
        }
        let mask: __mmask16 = ((1u32 << self.pixels) - 1) as u16;
        let zero = _mm512_setzero_ps();
        for (h, half) in acc.iter().enumerate() {
            let rows = transpose(std::array::from_fn(|j| {
                half.get(j).copied().unwrap_or(zero)
            }));
            for (c, &v) in rows
                .iter()
                .enumerate()
                .take(self.channels.saturating_sub(16 * h))
            {
                let (c, at) = (16 * h + c, (16 * h + c) * self.plane);
                let mut v = _mm512_add_ps(v, _mm512_set1_ps(self.bias.map_or(0.0, |b| b[c])));
                // SAFETY: the masked lanes are the tile's pixels of channel c; the
                // residual's are read before the output's (possibly the same) are written.
                unsafe {
                    if let Some(res) = self.residual {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, res.add(at)));
                    }
                    if self.relu {
                        v = _mm512_max_ps(v, zero);
                    }
                    _mm512_mask_storeu_ps(self.out.add(at), mask, v);
                }
            }
        }
    }

    /// [`Tile::run`] for [`PIXELS_AVX2`] pixels × 16 channels (the first panel) with AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the pointers are valid as [`Tile`] says.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, taps: &[usize]) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); 2]; PIXELS_AVX2];
        for (r, &t) in taps.iter().enumerate() {
            // SAFETY: see the function's contract.
            unsafe {
                let xs = self.x.add(t);
                let w = self.w[0].add(r * PANEL);
                let (w0, w1) = (_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8)));
                for (j, a) in acc.iter_mut().enumerate() {
                    let v = _mm256_broadcast_ss(&*xs.add(j));
                    a[0] = _mm256_fmadd_ps(v, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(v, w1, a[1]);
                }
            }
        }
        // Lanes of the tile's pixels.
        let lanes: [i32; 8] = std::array::from_fn(|j| -i32::from(j < self.pixels));
        // SAFETY: eight values from an array of eight.
        let mask = unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) };
        let zero = _mm256_setzero_ps();
        let full = self.pixels == PIXELS_AVX2;
        for h in 0..2 {
            // SAFETY: the CPU has AVX2 (the function's contract).
            let rows = unsafe {
                crate::sgemm::transpose8(std::array::from_fn(|j| acc.get(j).map_or(zero, |a| a[h])))
            };
            for (c, &v) in rows
                .iter()
                .enumerate()
                .take(self.channels.saturating_sub(8 * h))
            {
                let (c, at) = (8 * h + c, (8 * h + c) * self.plane);
                let mut v = _mm256_add_ps(v, _mm256_set1_ps(self.bias.map_or(0.0, |b| b[c])));
                // SAFETY: the lanes read and written are the tile's pixels of channel c;
                // the residual's are read before the output's (possibly the same) are
                // written.
                unsafe {
                    if let Some(res) = self.residual {
                        let r = if full {
                            crate::sgemm::load6(res.add(at))
                        } else {
                            _mm256_maskload_ps(res.add(at), mask)
                        };
                        v = _mm256_add_ps(v, r);
                    }
                    if self.relu {
                        v = _mm256_max_ps(v, zero);
                    }
                    // (A masked store costs several times two plain ones.)
                    if full {
                        crate::sgemm::store6(self.out.add(at), v);
                    } else {
                        _mm256_maskstore_ps(self.out.add(at), mask, v);
                    }
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run(&self, _: &[usize]) {
        unreachable!("applies() is false off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_avx2(&self, _: &[usize]) {
        unreachable!("applies() is false off x86-64")
    }
}

/// The 16 × 16 transpose of `m` (`m[i]` lane `j` becomes lane `i` of the result's `j`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose(m: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // Pairs of rows interleaved, then pairs of pairs (within each 128-bit lane): s[4i + c]
    // holds, in lane L, column 4L + c of rows 4i..4i+4.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (m[i & !1], m[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    let s: [__m512; 16] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (a, b) = (
            _mm512_castps_pd(t[4 * g + c / 2]),
            _mm512_castps_pd(t[4 * g + 2 + c / 2]),
        );
        _mm512_castpd_ps(if c % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    // Then, per column c, a 4 × 4 transpose of 128-bit lanes across s[c], s[4 + c], ...
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        let x = [s[c], s[4 + c], s[8 + c], s[12 + c]];
        let p0 = _mm512_shuffle_f32x4::<0x88>(x[0], x[1]);
        let p1 = _mm512_shuffle_f32x4::<0xDD>(x[0], x[1]);
        let p2 = _mm512_shuffle_f32x4::<0x88>(x[2], x[3]);
        let p3 = _mm512_shuffle_f32x4::<0xDD>(x[2], x[3]);
        out[c] = _mm512_shuffle_f32x4::<0x88>(p0, p2);
        out[8 + c] = _mm512_shuffle_f32x4::<0xDD>(p0, p2);
        out[4 + c] = _mm512_shuffle_f32x4::<0x88>(p1, p3);
        out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(p1, p3);
    }
    out
}
