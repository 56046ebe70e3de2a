//! 2-D convolution on the CPU for f32 NCHW tensors: im2col straight from NCHW (rows in
//! the weight's own `[ic, kh, kw]` order, so ONNX weights are used as they are, never
//! repacked) and one matrix product per image and group with the `gemm` crate, written
//! directly into the NCHW output. A 1×1, stride-1, unpadded convolution skips im2col: the
//! input plane already is the right-hand matrix.
use gemm::Parallelism;

use crate::sgemm::{to_blocks, Base, Epilogue, Lhs, Out, Rhs, SharedOut, PANEL, SLIVER};
use rayon::prelude::*;

/// Geometry of one convolution (2-D, NCHW).
#[derive(Debug, Clone, Copy)]
pub struct Conv2d {
    /// Batch, input channels, input height and width.
    pub input: [usize; 4],
    /// Output channels.
    pub out_channels: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride along height and width.
    pub stride: [usize; 2],
    /// Dilation along height and width.
    pub dilation: [usize; 2],
    /// Padding: top, left, bottom, right.
    pub pads: [usize; 4],
    /// Channel groups.
    pub groups: usize,
}

impl Conv2d {
    /// Output height and width; `None` when the kernel does not fit the padded input.
    pub fn out_hw(&self) -> Option<[usize; 2]> {
        let dim = |i: usize, k: usize, s: usize, d: usize, p0: usize, p1: usize| {
            let span = d * (k - 1) + 1;
            (i + p0 + p1).checked_sub(span).map(|v| v / s + 1)
        };
        let [_, _, h, w] = self.input;
        Some([
            dim(
                h,
                self.kernel[0],
                self.stride[0],
                self.dilation[0],
                self.pads[0],
                self.pads[2],
            )?,
            dim(
                w,
                self.kernel[1],
                self.stride[1],
                self.dilation[1],
                self.pads[1],
                self.pads[3],
            )?,
        ])
    }

    /// Runs the convolution: `x` is `[b, ic, h, w]`, `weight` `[oc, ic/groups, kh, kw]`
    /// (or packed, see [`Weight`]), `bias` `[oc]`, `residual` (added to the result) `[b,
    /// oc, oh, ow]`; `relu` clamps the result at zero last. Returns `[b, oc, oh, ow]`. The
    /// caller checks the shapes.
    ///
    /// The work is cut into tiles of output pixels (and, when there are few tiles, of output
    /// channels); each tile builds its own small im2col block, which stays in cache, and runs
    /// one single-threaded matrix product into its part of the output. Tiles run in parallel.
    /// A packed weight on a small map (≤ 256 pixels) takes [`Conv2d::run_packed`].
    pub fn run(
        &self,
        x: &[f32],
        weight: Weight<'_>,
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        relu: bool,
        threads: usize,
    ) -> Vec<f32> {
        let [b, ic, _, _] = self.input;
        let Some([oh, ow]) = self.out_hw() else {
            return Vec::new();
        };
        let oc = self.out_channels;
        let (g, n) = (self.groups, oh * ow);
        let (icg, ocg) = (ic / g, oc / g);
        let k = icg * self.kernel[0] * self.kernel[1];
        let fast = crate::sgemm::available();
        if let Weight::Packed(p) = weight {
            if !fast || g != 1 {
                let dense = unpack_weight(p, oc, k);
                return self.run(x, Weight::Dense(&dense), bias, residual, relu, threads);
            }
            if n <= 256 {
                return self.run_packed(x, p, bias, residual, relu, threads);
            }
        }
        // The AVX2 kernel starts each output block from the residual and bias itself; the
        // gemm crate adds to what is there, so it gets them written in first.
        let mut out = match residual {
            Some(r) if !fast => r.to_vec(),
            _ => vec![0f32; b * oc * n],
        };
        if let (Some(bias), false) = (bias, fast) {
            for (plane, &v) in out.chunks_mut(n).zip(bias.iter().cycle()) {
                plane.iter_mut().for_each(|o| *o += v);
            }
        }
        // Pixel tiles are runs of 16-pixel panels: at most ~256 KiB of patches (but at least
        // 4 panels, so each pass over the weights serves 64 pixels), at least 4 jobs per
        // thread where the image allows, panels spread evenly so the threads finish together.
        let panels = n.div_ceil(16);
        let widest = (64 * 1024 / k.max(1) / 16).max(4);
        let images = b * g;
        let mut tiles = panels.div_ceil(widest);
        if images * tiles < 4 * threads {
            tiles = tiles.max((4 * threads).div_ceil(images).min(panels / 4));
        }
        let tiles = tiles.clamp(1, panels.max(1));
        let jobs = images * tiles;
        // Too few pixel tiles to keep every thread busy: split the output channels too.
        let parts = if jobs >= 2 * threads {
            1
        } else {
            (2 * threads).div_ceil(jobs).min(ocg.div_ceil(8)).max(1)
        };
        // Packed weights come in 16-channel blocks, which a channel range must not split.
        let rows = match weight {
            Weight::Packed(_) => ocg.div_ceil(parts).next_multiple_of(PANEL),
            Weight::Dense(_) => ocg.div_ceil(parts),
        };
        let dst = SharedOut(out.as_mut_ptr());
        let (xp, plane) = self.padded(x);
        let taps = self.taps();
        let job = |col: &mut (Vec<f32>, Vec<usize>), j: usize| {
            let (bi, rest) = (j / (g * tiles * parts), j % (g * tiles * parts));
            let (gi, rest) = (rest / (tiles * parts), rest % (tiles * parts));
            let (ti, pi) = (rest / parts, rest % parts);
            // Tile ti holds panels ti·panels/tiles .. (ti+1)·panels/tiles.
            let p0 = (ti * panels / tiles) * 16;
            let p1 = ((ti + 1) * panels / tiles * 16).min(n);
            let (m0, m1) = (pi * rows, ((pi + 1) * rows).min(ocg));
            if m0 >= m1 {
                return;
            }
            let src = &xp[(bi * g + gi) * icg * plane..][..icg * plane];
            // The columns this job reads, packed into 16-column panels (`[k, 16]` each,
            // contiguous): rows of a strided plane would all fall in a few cache sets.
            let width = p1 - p0;
            col.0.resize(k * width.div_ceil(PANEL) * PANEL, 0.0);
            self.pixel_offsets([p0, p1], &mut col.1);
            pack_patches::<PANEL>(src, &taps, &col.1, &mut col.0);
            let col = &col.0;
            // Dense rows of this job's channels (a packed weight is read below instead).
            let lhs = match weight {
                Weight::Dense(wt) => &wt[(gi * ocg + m0) * k..][..(m1 - m0) * k],
                Weight::Packed(_) => &[][..],
            };
            let at = (bi * oc + gi * ocg + m0) * n + p0;
            // SAFETY: this job writes rows m0..m1, columns p0..p1 of its image and group's
            // [ocg, n] output block (row stride n) and no other job touches them; lhs is
            // [m1-m0, k] and rhs [k, p1-p0] with row stride rhs_rs, all in bounds.
            unsafe {
                if fast {
                    let rhs = Rhs::Panels {
                        ptr: col.as_ptr(),
                        k,
                    };
                    let e = Epilogue {
                        base: match residual {
                            Some(r) => Base::Other {
                                ptr: r[at..].as_ptr(),
                                ld: n,
                            },
                            None => Base::Zero,
                        },
                        row_bias: bias.map(|v| v[gi * ocg + m0..].as_ptr()),
                        col_bias: None,
                        relu,
                    };
                    let (m, cols) = (m1 - m0, p1 - p0);
                    let a = match weight {
                        Weight::Dense(_) => Lhs::Rows {
                            ptr: lhs.as_ptr(),
                            lda: k,
                        },
                        Weight::Packed(p) => Lhs::Blocks {
                            ptr: p[m0 * k..].as_ptr(),
                            k,
                            bw: PANEL,
                        },
                    };
                    crate::sgemm::sgemm(m, cols, k, a, rhs, Out::rows(dst.at(at), n), e);
                } else {
                    // One product per 16-column panel (the gemm crate takes plain strides).
                    for (pi, panel) in col.chunks(16 * k).enumerate().take(width.div_ceil(16)) {
                        gemm::gemm(
                            m1 - m0,
                            16.min(width - pi * 16),
                            k,
                            dst.at(at + pi * 16),
                            1,
                            n as isize,
                            true,
                            lhs.as_ptr(),
                            1,
                            k as isize,
                            panel.as_ptr(),
                            1,
                            16,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        );
                    }
                }
                if relu && !fast {
                    for r in 0..m1 - m0 {
                        std::slice::from_raw_parts_mut(dst.at(at + r * n), p1 - p0)
                            .iter_mut()
                            .for_each(|v| *v = v.max(0.0));
                    }
                }
            }
        };
        let total = jobs * parts;
        // Small convolutions stay on the calling thread (a pool hand-off costs more).
        let macs = b * oc * n * k;
        if threads > 1 && total > 1 && macs >= 256 * 1024 {
            (0..total)
                .into_par_iter()
                .for_each_init(Default::default, |col, j| job(col, j));
        } else {
            let mut col = Default::default();
            (0..total).for_each(|j| job(&mut col, j));
        }
        out
    }

    /// [`Conv2d::run`] for one channel group with the weight packed by [`pack_weight`]:
    /// the product runs with output pixels as rows and output channels as columns, so a
    /// small feature map (7×7 = 49 pixels) fills whole 6-row register tiles where it would
    /// leave a 16-pixel panel mostly empty, and each job's patches are packed in 6-pixel
    /// slivers that stream in order. Jobs are tiles of at most 96 pixels (each weight panel
    /// is read once per tile) and, when those are few, ranges of output channels.
    #[allow(clippy::too_many_arguments)]
    fn run_packed(
        &self,
        x: &[f32],
        panels: &[f32],
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        relu: bool,
        threads: usize,
    ) -> Vec<f32> {
        let [b, ic, _, _] = self.input;
        let Some([oh, ow]) = self.out_hw() else {
            return Vec::new();
        };
        let (oc, n) = (self.out_channels, oh * ow);
        let k = ic * self.kernel[0] * self.kernel[1];
        let mut out = vec![0f32; b * oc * n];
        if n == 0 || oc == 0 {
            return out;
        }
        let slivers = n.div_ceil(SLIVER);
        let tiles = n.div_ceil(96);
        let oc_panels = oc.div_ceil(PANEL);
        let parts = if b * tiles >= 2 * threads {
            1
        } else {
            (2 * threads).div_ceil(b * tiles).min(oc_panels)
        };
        let dst = SharedOut(out.as_mut_ptr());
        let (xp, plane) = self.padded(x);
        let taps = self.taps();
        let job = |col: &mut (Vec<f32>, Vec<usize>), j: usize| {
            let (bi, ti, pi) = (j / (tiles * parts), (j / parts) % tiles, j % parts);
            // Tile ti holds slivers ti·slivers/tiles .. (ti+1)·slivers/tiles.
            let r0 = ti * slivers / tiles * SLIVER;
            let r1 = ((ti + 1) * slivers / tiles * SLIVER).min(n);
            let (pa, pb) = (pi * oc_panels / parts, (pi + 1) * oc_panels / parts);
            let (c0, c1) = (pa * PANEL, (pb * PANEL).min(oc));
            if r0 >= r1 || c0 >= c1 {
                return;
            }
            let src = &xp[bi * ic * plane..][..ic * plane];
            let width = r1 - r0;
            col.0.resize(k * width.div_ceil(SLIVER) * SLIVER, 0.0);
            self.pixel_offsets([r0, r1], &mut col.1);
            pack_patches::<SLIVER>(src, &taps, &col.1, &mut col.0);
            let col = &col.0;
            let at = (bi * oc + c0) * n + r0;
            let e = Epilogue {
                base: match residual {
                    Some(res) => Base::Other {
                        ptr: res[at..].as_ptr(),
                        ld: 1,
                    },
                    None => Base::Zero,
                },
                row_bias: None,
                col_bias: bias.map(|v| v[c0..].as_ptr()),
                relu,
            };
            let a = Lhs::Blocks {
                ptr: col.as_ptr(),
                k,
                bw: SLIVER,
            };
            let rhs = Rhs::Panels {
                ptr: panels[pa * k * PANEL..].as_ptr(),
                k,
            };
            let c = Out {
                ptr: dst.at(at),
                rs: 1,
                cs: n,
            };
            // SAFETY: this job writes pixels r0..r1 of channels c0..c1 of image bi (an
            // NCHW block: pixel stride 1, channel stride n) and no other job touches them;
            // col holds the job's slivers and panels the packed [k, oc] weight.
            unsafe { crate::sgemm::sgemm(width, c1 - c0, k, a, rhs, c, e) };
        };
        let total = b * tiles * parts;
        if threads > 1 && total > 1 && b * oc * n * k >= 256 * 1024 {
            (0..total)
                .into_par_iter()
                .for_each_init(Default::default, |col, j| job(col, j));
        } else {
            let mut col = Default::default();
            (0..total).for_each(|j| job(&mut col, j));
        }
        out
    }

    /// The input with its padding written out as zeros (`[b, ic, hp, wp]`) and the size of
    /// one padded plane; the input itself when there is no padding.
    fn padded<'x>(&self, x: &'x [f32]) -> (std::borrow::Cow<'x, [f32]>, usize) {
        let [b, ic, h, w] = self.input;
        let [pt, pl, pb, pr] = self.pads;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        if self.pads == [0; 4] {
            return (x.into(), h * w);
        }
        let mut out = vec![0f32; b * ic * hp * wp];
        for (dst, src) in out.chunks_mut(hp * wp).zip(x.chunks(h * w)) {
            for (y, line) in src.chunks(w).enumerate() {
                dst[(y + pt) * wp + pl..][..w].copy_from_slice(line);
            }
        }
        (out.into(), hp * wp)
    }

    /// For each row of the patch matrix (input channel of a group, kernel row, kernel
    /// column), where its tap starts in the padded input of one group.
    fn taps(&self) -> Vec<usize> {
        let [_, ic, h, w] = self.input;
        let [pt, pl, pb, pr] = self.pads;
        let wp = w + pl + pr;
        let plane = (h + pt + pb) * wp;
        let [kh, kw] = self.kernel;
        let mut taps = Vec::with_capacity(ic / self.groups * kh * kw);
        for c in 0..ic / self.groups {
            for ki in 0..kh {
                for kj in 0..kw {
                    taps.push(c * plane + ki * self.dilation[0] * wp + kj * self.dilation[1]);
                }
            }
        }
        taps
    }

    /// Where output pixels `p0..p1` read the padded input, relative to a tap.
    fn pixel_offsets(&self, [p0, p1]: [usize; 2], offs: &mut Vec<usize>) {
        let wp = self.input[3] + self.pads[1] + self.pads[3];
        let ow = self.out_hw().map_or(1, |[_, ow]| ow.max(1));
        offs.clear();
        offs.extend((p0..p1).map(|q| (q / ow) * self.stride[0] * wp + (q % ow) * self.stride[1]));
    }
}

/// Packs the patch matrix (`[taps, pixels]`: row `r`, column `q` is `src[taps[r] +
/// offs[q]]`) into blocks of `BW` columns, as [`to_blocks`] lays them out. A whole block of
/// neighbouring pixels (one output row, stride 1) is one fixed-size copy.
fn pack_patches<const BW: usize>(src: &[f32], taps: &[usize], offs: &[usize], blocks: &mut [f32]) {
    let k = taps.len();
    for (bi, o) in offs.chunks(BW).enumerate() {
        let out = &mut blocks[bi * k * BW..][..k * BW];
        let n = o.len();
        if n == BW && o[n - 1] - o[0] == n - 1 {
            for (dst, &t) in out.chunks_exact_mut(BW).zip(taps) {
                let dst: &mut [f32; BW] = dst.try_into().expect("chunks_exact_mut yields BW");
                let from: &[f32; BW] = src[t + o[0]..][..BW].try_into().expect("BW long");
                *dst = *from;
            }
        } else {
            for (dst, &t) in out.chunks_exact_mut(BW).zip(taps) {
                for (d, &q) in dst.iter_mut().zip(o) {
                    *d = src[t + q];
                }
            }
        }
    }
}

/// A convolution's weight as [`Conv2d::run`] takes it.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    /// `[oc, ic/groups, kh, kw]`, as ONNX stores it.
    Dense(&'a [f32]),
    /// From [`pack_weight`] (one group only).
    Packed(&'a [f32]),
}

/// A convolution weight `[oc, k]` (k = input channels × kernel height × width) packed for
/// [`Conv2d::run`]: transposed to `[k, oc]`, in 16-channel panels, which serve as the
/// right-hand panels of a product over pixel rows and (per 16-channel block) as the
/// left-hand blocks of a product over pixel columns.
pub fn pack_weight(weight: &[f32], oc: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; oc.div_ceil(PANEL) * k * PANEL];
    to_blocks(&mut out, PANEL, k, oc, |r, row| {
        for (co, v) in row.iter_mut().enumerate() {
            *v = weight[co * k + r];
        }
    });
    out
}

/// The `[oc, k]` weight back from [`pack_weight`]'s panels.
pub fn unpack_weight(panels: &[f32], oc: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; oc * k];
    for (co, row) in out.chunks_mut(k.max(1)).enumerate().take(oc) {
        for (r, v) in row.iter_mut().enumerate() {
            *v = panels[((co / PANEL) * k + r) * PANEL + co % PANEL];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct convolution by definition, the oracle for the fast path.
    fn naive(p: &Conv2d, x: &[f32], wt: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let [b, ic, h, w] = p.input;
        let [oh, ow] = p.out_hw().unwrap_or([0, 0]);
        let (oc, g) = (p.out_channels, p.groups);
        let (icg, ocg) = (ic / g, oc / g);
        let [kh, kw] = p.kernel;
        let mut out = vec![0f32; b * oc * oh * ow];
        for bi in 0..b {
            for o in 0..oc {
                let gi = o / ocg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias.map_or(0.0, |v| v[o]);
                        for c in 0..icg {
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let iy = (oy * p.stride[0] + ki * p.dilation[0]) as isize
                                        - p.pads[0] as isize;
                                    let ix = (ox * p.stride[1] + kj * p.dilation[1]) as isize
                                        - p.pads[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv = x[((bi * ic + gi * icg + c) * h + iy as usize) * w
                                        + ix as usize];
                                    acc += xv * wt[((o * icg + c) * kh + ki) * kw + kj];
                                }
                            }
                        }
                        out[((bi * oc + o) * oh + oy) * ow + ox] = acc;
                    }
                }
            }
        }
        out
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_the_definition_over_many_geometries() {
        let cases = [
            // (input, oc, kernel, stride, dilation, pads, groups)
            ([1, 3, 9, 11], 4, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1),
            ([2, 4, 8, 8], 6, [1, 1], [1, 1], [1, 1], [0, 0, 0, 0], 1),
            ([1, 4, 8, 8], 6, [1, 1], [2, 2], [1, 1], [0, 0, 0, 0], 2),
            ([2, 3, 13, 10], 5, [7, 7], [2, 2], [1, 1], [3, 3, 3, 3], 1),
            ([1, 6, 7, 9], 6, [3, 3], [1, 2], [1, 1], [0, 1, 2, 0], 6),
            ([1, 2, 10, 10], 3, [3, 2], [1, 1], [2, 3], [2, 0, 1, 4], 1),
            ([3, 8, 5, 5], 4, [5, 5], [3, 3], [1, 1], [2, 2, 2, 2], 2),
            // Taps that fall wholly in the right padding.
            ([1, 2, 3, 2], 2, [1, 3], [1, 1], [1, 3], [0, 0, 0, 5], 1),
            ([2, 3, 40, 40], 8, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1),
            // Many channels on a small map (several panels, ragged slivers, k > 256).
            ([1, 40, 7, 7], 37, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1),
            ([2, 300, 5, 5], 20, [1, 1], [1, 1], [1, 1], [0, 0, 0, 0], 1),
            ([1, 20, 17, 17], 40, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1),
        ];
        for (i, &(input, oc, kernel, stride, dilation, pads, groups)) in cases.iter().enumerate() {
            let p = Conv2d {
                input,
                out_channels: oc,
                kernel,
                stride,
                dilation,
                pads,
                groups,
            };
            let x = data(input.iter().product(), 7 + i as u32);
            let wt = data(oc * input[1] / groups * kernel[0] * kernel[1], 99);
            let bias = data(oc, 3);
            let n_out = naive(&p, &x, &wt, None).len();
            let residual = data(n_out, 5);
            for threads in [1, 2] {
                for b in [None, Some(bias.as_slice())] {
                    for (res, relu) in [(None, false), (None, true), (Some(&residual), true)] {
                        let res = res.map(|r| r.as_slice());
                        let got = p.run(&x, Weight::Dense(&wt), b, res, relu, threads);
                        let mut want = naive(&p, &x, &wt, b);
                        for (k, v) in want.iter_mut().enumerate() {
                            *v += res.map_or(0.0, |r| r[k]);
                            if relu {
                                *v = v.max(0.0);
                            }
                        }
                        assert_eq!(got.len(), want.len(), "case {i}");
                        for (a, e) in got.iter().zip(&want) {
                            assert!(
                                (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                "case {i} relu {relu}: {a} vs {e}"
                            );
                        }
                        // The packed weight: pixel rows on small maps, 16-channel blocks on
                        // larger ones, unpacked again for groups.
                        let k = wt.len() / oc;
                        let packed = pack_weight(&wt, oc, k);
                        assert_eq!(unpack_weight(&packed, oc, k), wt);
                        {
                            let got = p.run(&x, Weight::Packed(&packed), b, res, relu, threads);
                            assert_eq!(got.len(), want.len(), "case {i}");
                            for (a, e) in got.iter().zip(&want) {
                                assert!(
                                    (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                    "packed, case {i} relu {relu}: {a} vs {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_kernel_larger_than_the_padded_input_has_no_output_size() {
        let p = Conv2d {
            input: [1, 1, 2, 2],
            out_channels: 1,
            kernel: [5, 5],
            stride: [1, 1],
            dilation: [1, 1],
            pads: [0; 4],
            groups: 1,
        };
        assert_eq!(p.out_hw(), None);
    }
}
