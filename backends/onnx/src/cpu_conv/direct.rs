//! Stride-1 convolutions on small maps without a patch matrix: for each kernel tap, one
//! accumulating product reads the padded input itself, shifted by the tap (channel `c` of
//! tap `(ki, kj)` starts `ki` rows and `kj` columns into channel `c`'s plane). That computes
//! the output over the padded width, a grid whose extra columns are dropped at the end.
//!
//! Two layouts of the products:
//! * pixel columns (`run_direct`): output channels as rows, the shifted input as the
//!   right-hand matrix read in place; for 14×14-sized maps, whose padding columns add
//!   little;
//! * pixel rows (`run_direct_rows`): grid pixels as rows, the shifted input as a
//!   column-major left-hand matrix read in place, times the tap's rows of the packed
//!   weight; a 7×7 map fills 8-row register tiles and 32 output channels still run
//!   32-column tiles, where gathering patches cost more than the products they serve
//!   (DenseNet's growth layers).
use rayon::prelude::*;

use super::{Conv2d, Dest, Fused, RowJob, RowJobs, Source};
use crate::sgemm::{Base, Epilogue, Lhs, Out, Rhs, SharedOut, PANEL, TALL_SLIVER};

/// What both layouts share: the padded input and where each tap starts in it.
pub(super) struct Grid<'x> {
    /// The padded copy (with slack after the last plane: the grid's last pixels read past
    /// it by up to a kernel's width).
    pub(super) src: Source<'x>,
    /// Where tap `t` of channel 0 starts in a plane.
    pub(super) offsets: Vec<usize>,
    /// Elements of one padded plane, and of one padded row.
    pub(super) plane: usize,
    pub(super) wp: usize,
    /// Output height and width; grid pixels per image (`oh · wp`).
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) ncols: usize,
}

impl Conv2d {
    /// The padded grid of this convolution, for products that read up to `reach` pixels
    /// from a grid pixel; `None` when it has no output.
    pub(super) fn grid<'x>(&self, x: &'x [f32], f: &Fused<'x>, reach: usize) -> Option<Grid<'x>> {
        let [b, ic, h, w] = self.input;
        let [oh, ow] = self.out_hw()?;
        let [pt, pl, pb, pr] = self.pads;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        // Output pixel (y, x) is pixel y·wp + x of the padded-width grid.
        let ncols = oh * wp;
        if b * self.out_channels * ncols == 0 {
            return None;
        }
        let slack = (self.kernel[1] - 1) * self.dilation[1] + reach;
        let src = self.source(x, f.pre, true, slack);
        let taps = self.kernel[0] * self.kernel[1];
        let offsets = (0..taps).map(|t| src.taps[t * ic]).collect();
        Some(Grid {
            src,
            offsets,
            plane: hp * wp,
            wp,
            oh,
            ow,
            ncols,
        })
    }

    /// Writes the output from the finished grid `grid` (`[b, oc, ncols]`), its padding
    /// columns dropped; with a residual in `dest`, that is added and then, with `relu`,
    /// the ReLU applied.
    ///
    /// # Safety
    /// As `Conv2d::run_to`.
    unsafe fn drop_padding(
        &self,
        g: &Grid<'_>,
        grid: &[f32],
        dest: Dest,
        relu: bool,
        parallel: bool,
    ) {
        let (oh, ow, wp, ncols) = (g.oh, g.ow, g.wp, g.ncols);
        let plane = |i: usize| {
            for y in 0..oh {
                let from = &grid[i * ncols + y * wp..][..ow];
                let at = i * oh * ow + y * ow;
                // SAFETY: plane i of the output is this job's alone; the residual's
                // element is read before the output's (possibly the same) is written.
                unsafe {
                    let to = dest.out.at(at);
                    match dest.residual_at(at) {
                        None => std::ptr::copy_nonoverlapping(from.as_ptr(), to, ow),
                        Some(r) => {
                            for (x, &v) in from.iter().enumerate() {
                                let v = v + *r.add(x);
                                *to.add(x) = if relu { v.max(0.0) } else { v };
                            }
                        }
                    }
                }
            }
        };
        let planes = self.input[0] * self.out_channels;
        if parallel && planes > 1 {
            (0..planes).into_par_iter().for_each(plane);
        } else {
            (0..planes).for_each(plane);
        }
    }

    /// Runs `total` jobs, `job(j, grid)` writing its part of the padded grid (`[b, oc,
    /// ncols]`, every element by some job), over the threads when the convolution is
    /// large enough; then writes the output from the grid ([`Conv2d::drop_padding`]).
    ///
    /// # Safety
    /// As `Conv2d::run_to`.
    unsafe fn over_grid(
        &self,
        g: &Grid<'_>,
        (total, threads): (usize, usize),
        (dest, relu): (Dest, bool),
        job: impl Fn(usize, SharedOut) + Sync,
    ) {
        let [b, ic, _, _] = self.input;
        let grid_len = b * self.out_channels * g.ncols;
        let mut grid: Vec<f32> = Vec::with_capacity(grid_len);
        let gp = SharedOut(grid.as_mut_ptr());
        let macs = grid_len * ic * g.offsets.len();
        if threads > 1 && total > 1 && macs >= 256 * 1024 {
            (0..total).into_par_iter().for_each(|j| job(j, gp));
        } else {
            (0..total).for_each(|j| job(j, gp));
        }
        // SAFETY: the jobs wrote every element of the grid; `dest` is the caller's.
        unsafe {
            grid.set_len(grid_len);
            self.drop_padding(g, &grid, dest, relu, threads > 1);
        }
    }

    /// [`Conv2d::run`] over pixel columns (one group, stride 1, packed weight, no residual).
    ///
    /// # Safety
    /// `out` is valid for writing the whole output, which nothing else touches meanwhile.
    pub(super) unsafe fn run_direct(
        &self,
        x: &[f32],
        panels: &[f32],
        f: &Fused<'_>,
        threads: usize,
        out: SharedOut,
    ) {
        let [b, ic, _, _] = self.input;
        let Some(g) = self.grid(x, f, PANEL) else {
            return;
        };
        let (oc, ncols, plane) = (self.out_channels, g.ncols, g.plane);
        let (taps, k) = (g.offsets.len(), ic * g.offsets.len());
        // Column tiles keep each job's output block (all its taps accumulate into it) near
        // 256 KiB; channel ranges split the work when there are few tiles.
        let oc_blocks = oc.div_ceil(PANEL);
        let width = ((64 * 1024 / oc.max(1)) / PANEL * PANEL).clamp(4 * PANEL, 1 << 20);
        let tiles = ncols.div_ceil(width);
        let parts = if b * tiles >= 2 * threads {
            1
        } else {
            (2 * threads).div_ceil(b * tiles).min(oc_blocks)
        };
        let job = |j: usize, gp: SharedOut| {
            let (bi, ti, pi) = (j / (tiles * parts), (j / parts) % tiles, j % parts);
            let (q0, q1) = (ti * ncols / tiles, ((ti + 1) * ncols / tiles).min(ncols));
            let (c0, c1) = (
                pi * oc_blocks / parts * PANEL,
                ((pi + 1) * oc_blocks / parts * PANEL).min(oc),
            );
            if q0 >= q1 || c0 >= c1 {
                return;
            }
            let image = &g.src.data[bi * ic * plane..];
            for (t, &off) in g.offsets.iter().enumerate() {
                let a = Lhs::Blocks {
                    ptr: panels[c0 * k + t * ic * PANEL..].as_ptr(),
                    k,
                    bw: PANEL,
                };
                let rhs = Rhs::Rows {
                    ptr: image[off + q0..].as_ptr(),
                    ldb: plane,
                };
                let first = t == 0;
                let e = Epilogue {
                    base: if first { Base::Zero } else { Base::Accumulate },
                    row_bias: f.bias.filter(|_| first).map(|v| v[c0..].as_ptr()),
                    col_bias: None,
                    relu: f.relu && t + 1 == taps,
                };
                let c = Out::rows(gp.at((bi * oc + c0) * ncols + q0), ncols);
                // SAFETY: this job owns rows c0..c1 × columns q0..q1 of image bi's grid
                // block; tap t's weights are rows t·ic.. of each 16-channel block; the
                // shifted input rows (plane apart) stay inside `src.data`, whose slack
                // covers the grid's last columns; tap 0 writes every element first.
                unsafe { crate::sgemm::sgemm(c1 - c0, q1 - q0, ic, a, rhs, c, e) };
            }
        };
        let dest = Dest {
            out,
            residual: None,
        };
        // SAFETY: forwarded from the caller; the jobs cover every column of every channel
        // of every image.
        unsafe { self.over_grid(&g, (b * tiles * parts, threads), (dest, false), job) }
    }

    /// [`Conv2d::run`] over pixel rows (one group, stride 1, packed weight `panels`,
    /// AVX-512).
    ///
    /// # Safety
    /// As `Conv2d::run_to`.
    pub(super) unsafe fn run_direct_rows(
        &self,
        x: &[f32],
        panels: &[f32],
        f: &Fused<'_>,
        threads: usize,
        dest: Dest,
    ) {
        let [b, ic, _, _] = self.input;
        let Some(g) = self.grid(x, f, PANEL) else {
            return;
        };
        let (oc, ncols, plane) = (self.out_channels, g.ncols, g.plane);
        let (taps, k) = (g.offsets.len(), ic * g.offsets.len());
        let jobs = RowJobs::new(b, ncols, TALL_SLIVER, oc, threads);
        // With a residual, it and the ReLU come in when the padding columns are dropped.
        let relu_in_product = f.relu && dest.residual.is_none();
        let job = |j: usize, gp: SharedOut| {
            let Some(RowJob {
                bi,
                rows: [r0, r1],
                panel: pa,
                channels: [c0, c1],
            }) = jobs.job(j)
            else {
                return;
            };
            let image = &g.src.data[bi * ic * plane..];
            for (t, &off) in g.offsets.iter().enumerate() {
                let (first, last) = (t == 0, t + 1 == taps);
                let a = Lhs::Cols {
                    ptr: image[off + r0..].as_ptr(),
                    ld: plane,
                };
                // Tap t's rows of the weight's panels (tap-major: rows t·ic..).
                let rhs = Rhs::Panels {
                    ptr: panels[pa * k * PANEL + t * ic * PANEL..].as_ptr(),
                    k,
                };
                let e = Epilogue {
                    base: if first { Base::Zero } else { Base::Accumulate },
                    row_bias: None,
                    col_bias: f.bias.filter(|_| first).map(|v| v[c0..].as_ptr()),
                    relu: relu_in_product && last,
                };
                let c = Out {
                    ptr: gp.at((bi * oc + c0) * ncols + r0),
                    rs: 1,
                    cs: ncols,
                };
                // SAFETY: this job owns grid rows r0..r1 of channels c0..c1 of image bi;
                // tap t's shifted channels stay inside `src.data`, whose slack covers the
                // grid's last rows; tap 0 writes every element first.
                unsafe { crate::sgemm::sgemm(r1 - r0, c1 - c0, ic, a, rhs, c, e) };
            }
        };
        // SAFETY: forwarded from the caller; the jobs cover every row of every channel of
        // every image.
        unsafe { self.over_grid(&g, (jobs.count(b), threads), (dest, f.relu), job) }
    }
}
