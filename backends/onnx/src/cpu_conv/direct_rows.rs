//! Stride-1 convolutions on small maps without a patch matrix, over pixel rows: for each
//! kernel tap, one accumulating product reads the padded input itself, shifted by the tap,
//! as its left-hand matrix (pixels as rows, channels as columns: column-major, in place),
//! times that tap's rows of the packed weight. Like `run_direct` it computes the output
//! over the padded width (the extra columns are dropped at the end), but with pixels as
//! rows a 7×7 map fills 8-row register tiles and a layer with few output channels (32)
//! still runs 32-column tiles, where gathering patches cost more than the products
//! (DenseNet's growth layers, ResNet-50's last 3×3 layers at batch 1).
use rayon::prelude::*;

use super::{Conv2d, Dest, Fused};
use crate::sgemm::{Base, Epilogue, Lhs, Out, Rhs, SharedOut, PANEL, TALL_SLIVER};

impl Conv2d {
    /// [`Conv2d::run`] this way (one group, stride 1, packed weight `panels`, AVX-512).
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
        let [b, ic, h, w] = self.input;
        let Some([oh, ow]) = self.out_hw() else {
            return;
        };
        let [pt, pl, pb, pr] = self.pads;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        let plane = hp * wp;
        let oc = self.out_channels;
        let taps = self.kernel[0] * self.kernel[1];
        let k = ic * taps;
        // Output pixel (y, x) is row y·wp + x of the padded-width grid.
        let ncols = oh * wp;
        if b * oc * ncols == 0 {
            return;
        }
        // The last rows of the grid read past the last plane by up to a kernel's width.
        let slack = (self.kernel[1] - 1) * self.dilation[1] + PANEL;
        let src = self.source(x, f.pre, true, slack);
        let offsets: Vec<usize> = (0..taps).map(|t| src.taps[t * ic]).collect();
        // Jobs as in `run_packed`: about 96 grid pixels each, in whole 8-pixel slivers;
        // 32-channel ranges as well when there are too few for the threads.
        let slivers = ncols.div_ceil(TALL_SLIVER);
        let oc_panels = oc.div_ceil(PANEL);
        let pairs = oc_panels.div_ceil(2);
        let mut tiles = ncols.div_ceil(96);
        let parts = if b * tiles >= 2 * threads {
            1
        } else {
            (2 * threads).div_ceil(b * tiles).min(pairs)
        };
        if b * tiles * parts < 2 * threads {
            tiles = (2 * threads)
                .div_ceil(b * parts)
                .clamp(tiles, slivers.max(1));
        }
        let grid_len = b * oc * ncols;
        let mut grid: Vec<f32> = Vec::with_capacity(grid_len);
        let g = SharedOut(grid.as_mut_ptr());
        // With a residual, it and the ReLU come in when the padding columns are dropped.
        let relu_in_product = f.relu && dest.residual.is_none();
        let job = |j: usize| {
            let (bi, pi, ti) = (j / (tiles * parts), (j / tiles) % parts, j % tiles);
            let (s0, s1) = (ti * slivers / tiles, (ti + 1) * slivers / tiles);
            let (r0, r1) = (s0 * TALL_SLIVER, (s1 * TALL_SLIVER).min(ncols));
            let (pa, pb) = (
                pi * pairs / parts * 2,
                ((pi + 1) * pairs / parts * 2).min(oc_panels),
            );
            let (c0, c1) = (pa * PANEL, (pb * PANEL).min(oc));
            if r0 >= r1 || c0 >= c1 {
                return;
            }
            let image = &src.data[bi * ic * plane..];
            for (t, &off) in offsets.iter().enumerate() {
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
                    ptr: g.at((bi * oc + c0) * ncols + r0),
                    rs: 1,
                    cs: ncols,
                };
                // SAFETY: this job owns grid rows r0..r1 of channels c0..c1 of image bi;
                // tap t's shifted channels stay inside `src.data`, whose slack covers the
                // grid's last rows; tap 0 writes every element first.
                unsafe { crate::sgemm::sgemm(r1 - r0, c1 - c0, ic, a, rhs, c, e) };
            }
        };
        let total = b * tiles * parts;
        if threads > 1 && total > 1 && b * oc * ncols * k >= 256 * 1024 {
            (0..total).into_par_iter().for_each(job);
        } else {
            (0..total).for_each(job);
        }
        // SAFETY: the jobs wrote every row of every channel of every image.
        unsafe { grid.set_len(grid_len) };
        // Drop the padding columns (adding the residual, then the ReLU, where there is one).
        let drop_pad = |i: usize| {
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
                                *to.add(x) = if f.relu { v.max(0.0) } else { v };
                            }
                        }
                    }
                }
            }
        };
        if threads > 1 && b * oc > 1 {
            (0..b * oc).into_par_iter().for_each(drop_pad);
        } else {
            (0..b * oc).for_each(drop_pad);
        }
    }
}
