//! Stride-1 convolutions with few output channels (DenseNet's 32-channel growth layers)
//! summed in registers: one AVX-512 tile holds 8 output channels × 48 pixels of the padded
//! grid (`direct.rs`: output pixel `(y, x)` is grid pixel `y·wp + x`) and runs every input
//! channel over every kernel tap before it stores once, straight into the output (the
//! grid's padding columns masked off). No patch matrix and no Winograd transform: the
//! input vectors are the shifted padded planes read in place and the weights are broadcast
//! from the packed panels, a quarter of what the Winograd transform streams per layer.

use super::{Conv2d, Dest, Fused};
use crate::sgemm::PANEL;

/// Output channels one register tile covers (half a 16-channel weight panel).
const CHANNELS: usize = 8;
/// Vectors of grid pixels one tile covers.
const VECTORS: usize = 3;
/// Grid pixels one tile covers.
const PIXELS: usize = 16 * VECTORS;

/// Whether [`Conv2d::run_taps`] serves this convolution: stride 1, one group, a kernel
/// larger than 1×1 and few enough output channels ([`super::sums_taps`]: the CPU has
/// AVX-512).
pub(super) fn applies(geo: &Conv2d) -> bool {
    geo.stride == [1, 1]
        && geo.groups == 1
        && geo.kernel != [1, 1]
        && super::sums_taps(geo.out_channels)
}

impl Conv2d {
    /// [`Conv2d::run`] with the taps summed in registers (see the module; [`applies`]
    /// holds; `panels` from [`super::pack_weight`]).
    ///
    /// # Safety
    /// As `Conv2d::run_to`.
    pub(super) unsafe fn run_taps(
        &self,
        x: &[f32],
        panels: &[f32],
        f: &Fused<'_>,
        threads: usize,
        dest: Dest,
    ) {
        let [b, ic, _, _] = self.input;
        // A tile reads up to PIXELS past its first grid pixel.
        let Some(g) = self.grid(x, f, PIXELS) else {
            return;
        };
        let (oc, plane, ncols) = (self.out_channels, g.plane, g.ncols);
        let k = ic * g.offsets.len();
        let (blocks, groups) = (ncols.div_ceil(PIXELS), oc.div_ceil(CHANNELS));
        let pass = Pass {
            offsets: &g.offsets,
            rows: g.offsets.iter().step_by(self.kernel[1]).copied().collect(),
            ic,
            plane,
            grid: [g.wp, g.oh, g.ow],
            relu: f.relu,
        };
        // Tiles in order (image, pixel block, channel group), in equal runs, at least four
        // per thread where there are enough: a run's tiles of one block share its input.
        let tiles = b * blocks * groups;
        let jobs = (4 * threads).min(tiles);
        let job = |j: usize| {
            for t in j * tiles / jobs..(j + 1) * tiles / jobs {
                let (bi, block, group) = (t / (blocks * groups), t / groups % blocks, t % groups);
                let (q0, c0) = (block * PIXELS, group * CHANNELS);
                let at = (bi * oc + c0) * g.oh * g.ow;
                let tile = Tile {
                    // SAFETY (both): within the padded copy and the packed panels; the
                    // tile's reads past the grid fall in the copy's slack (`grid`), its
                    // weight lanes past `oc` in the last panel's padding.
                    x: unsafe { g.src.data.as_ptr().add(bi * ic * plane + q0) },
                    w: unsafe { panels.as_ptr().add(c0 / PANEL * k * PANEL + c0 % PANEL) },
                    q0,
                    out: dest.out.at(at),
                    residual: dest.residual_at(at),
                    bias: f.bias.map(|v| &v[c0..]),
                    channels: CHANNELS.min(oc - c0),
                    width: PIXELS.min(ncols - q0),
                };
                // SAFETY: `applies` checked AVX-512; this job alone writes the output
                // pixels of grid pixels q0.. (`width` of them) of channels c0.. of image
                // bi, and reads the residual's just before.
                unsafe { tile.run(&pass) };
            }
        };
        let parallel = threads > 1 && b * oc * ncols * k >= 256 * 1024;
        crate::cpu_kernels::jobs_with(jobs, parallel, || (), |_, j| job(j));
    }
}

/// What every tile sums: `ic` input channels (`plane` apart) over every tap (`offsets`:
/// where tap `t` starts in a plane; `rows`: where each kernel row's first tap does).
struct Pass<'a> {
    offsets: &'a [usize],
    rows: Vec<usize>,
    ic: usize,
    plane: usize,
    /// The grid's row width, and the output's height and width.
    grid: [usize; 3],
    relu: bool,
}

/// One register tile's operands.
struct Tile<'a> {
    /// Grid pixel `q0` of channel 0 of the padded input.
    x: *const f32,
    /// The tile's first output channel in row 0 of its weight panel.
    w: *const f32,
    /// The tile's first grid pixel.
    q0: usize,
    /// The output plane of the tile's first channel (planes `oh·ow` apart), and the
    /// residual's.
    out: *mut f32,
    residual: Option<*const f32>,
    bias: Option<&'a [f32]>,
    /// Output channels (at most [`CHANNELS`]) and grid pixels (at most [`PIXELS`]) kept.
    channels: usize,
    width: usize,
}

/// For the 16 grid pixels from a grid pixel, each output row they fall in: where lane 0
/// would sit in the output plane (as if the row ran on to the left) and which lanes are
/// output pixels (not padding columns, not past the grid).
struct Rows {
    count: usize,
    /// At most one row per lane (a grid one pixel wide), and one more.
    runs: [(isize, u16); 17],
}

impl Rows {
    /// The rows of grid pixels `q..q + lanes` (`lanes` ≤ 16) in a grid `wp` wide whose
    /// output rows are `ow` wide.
    fn of(q: usize, lanes: usize, [wp, _, ow]: [usize; 3]) -> Rows {
        let mut rows = Rows {
            count: 0,
            runs: [(0, 0); 17],
        };
        let (mut y, mut x) = (q / wp, q % wp);
        let mut l = 0;
        while l < lanes {
            let in_row = (wp - x).min(lanes - l);
            let real = ow.saturating_sub(x).min(in_row);
            if real > 0 {
                let mask = (((1u32 << real) - 1) << l) as u16;
                rows.runs[rows.count] = ((y * ow + x) as isize - l as isize, mask);
                rows.count += 1;
            }
            l += in_row;
            (y, x) = (y + 1, 0);
        }
        rows
    }

    fn iter(&self) -> impl Iterator<Item = &(isize, u16)> {
        self.runs[..self.count].iter()
    }
}

impl Tile<'_> {
    /// Sums every input channel over every tap into the tile, starting from the residual
    /// (or zero), and stores it with the bias added (and ReLU when `p.relu`).
    ///
    /// # Safety
    /// The CPU has AVX-512F; the pointers are valid as [`Tile`] and [`Pass`] say.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run(&self, p: &Pass<'_>) {
        use std::arch::x86_64::*;
        let plane = p.grid[1] * p.grid[2];
        let rows: [Rows; VECTORS] = std::array::from_fn(|i| {
            let lanes = self.width.saturating_sub(16 * i).min(16);
            Rows::of(self.q0 + 16 * i, lanes, p.grid)
        });
        let mut acc = [[_mm512_setzero_ps(); VECTORS]; CHANNELS];
        if let Some(residual) = self.residual {
            for (r, row) in acc.iter_mut().enumerate().take(self.channels) {
                let from = residual.wrapping_add(r * plane);
                for (a, rows) in row.iter_mut().zip(&rows) {
                    for &(off, m) in rows.iter() {
                        // SAFETY: the masked lanes are this tile's output pixels (the
                        // others are neither read nor faulted on).
                        *a = unsafe { _mm512_mask_loadu_ps(*a, m, from.wrapping_offset(off)) };
                    }
                }
            }
        }
        for c in 0..p.ic {
            // SAFETY: see the function's contract (a prefetch may point a little past the
            // copy: its address is only a hint, never read).
            unsafe {
                let xc = self.x.add(c * p.plane);
                // The next channel's rows, while this one's taps run.
                if c + 1 < p.ic {
                    let next = xc.add(p.plane);
                    for &row in &p.rows {
                        for l in 0..=VECTORS {
                            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(row + 16 * l).cast());
                        }
                    }
                }
                for (t, &off) in p.offsets.iter().enumerate() {
                    let xs = xc.add(off);
                    let v: [__m512; VECTORS] =
                        std::array::from_fn(|i| _mm512_loadu_ps(xs.add(16 * i)));
                    // Row t·ic + c of the tap-major panel: this tile's channels' weights.
                    let wt = self.w.add((t * p.ic + c) * PANEL);
                    for (r, row) in acc.iter_mut().enumerate() {
                        let wv = _mm512_set1_ps(*wt.add(r));
                        for (a, &xv) in row.iter_mut().zip(&v) {
                            *a = _mm512_fmadd_ps(wv, xv, *a);
                        }
                    }
                }
            }
        }
        let zero = _mm512_setzero_ps();
        for (r, row) in acc.iter().enumerate().take(self.channels) {
            let bias = _mm512_set1_ps(self.bias.map_or(0.0, |v| v[r]));
            let out = self.out.wrapping_add(r * plane);
            for (&a, rows) in row.iter().zip(&rows) {
                let mut v = _mm512_add_ps(a, bias);
                if p.relu {
                    v = _mm512_max_ps(v, zero);
                }
                for &(off, m) in rows.iter() {
                    // SAFETY: as for the loads above.
                    unsafe { _mm512_mask_storeu_ps(out.wrapping_offset(off), m, v) };
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run(&self, _: &Pass<'_>) {
        unreachable!("applies() is false off x86-64")
    }
}
