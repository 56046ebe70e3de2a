//! 2-D convolution on the CPU for f32 NCHW tensors: im2col straight from NCHW (rows in
//! the weight's own `[ic, kh, kw]` order, so ONNX weights are used as they are, never
//! repacked) and one matrix product per image and group with the `gemm` crate, written
//! directly into the NCHW output. A 1×1, stride-1, unpadded convolution skips im2col: the
//! input plane already is the right-hand matrix.
use gemm::Parallelism;

use crate::sgemm::{Base, Epilogue, Rhs, SharedOut};
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

    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.pads == [0; 4]
    }

    /// Runs the convolution: `x` is `[b, ic, h, w]`, `weight` `[oc, ic/groups, kh, kw]`,
    /// `bias` `[oc]`, `residual` (added to the result) `[b, oc, oh, ow]`; `relu` clamps the
    /// result at zero last. Returns `[b, oc, oh, ow]`. The caller checks the shapes.
    ///
    /// The work is cut into tiles of output pixels (and, when there are few tiles, of output
    /// channels); each tile builds its own small im2col block, which stays in cache, and runs
    /// one single-threaded matrix product into its part of the output. Tiles run in parallel.
    pub fn run(
        &self,
        x: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        relu: bool,
        threads: usize,
    ) -> Vec<f32> {
        let [b, ic, h, w] = self.input;
        let Some([oh, ow]) = self.out_hw() else {
            return Vec::new();
        };
        let oc = self.out_channels;
        let (g, n) = (self.groups, oh * ow);
        let (icg, ocg) = (ic / g, oc / g);
        let k = icg * self.kernel[0] * self.kernel[1];
        let fast = crate::sgemm::available();
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
        let rows = ocg.div_ceil(parts);
        let dst = SharedOut(out.as_mut_ptr());
        let job = |col: &mut Vec<f32>, j: usize| {
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
            let src = &x[(bi * ic + gi * icg) * h * w..][..icg * h * w];
            let (rhs, rhs_rs): (&[f32], usize) = if self.is_pointwise() {
                (&src[p0..], h * w)
            } else {
                col.resize(k * (p1 - p0), 0.0);
                self.im2col(src, [p0, p1], ow, col);
                (col, p1 - p0)
            };
            let lhs = &weight[(gi * ocg + m0) * k..][..(m1 - m0) * k];
            let at = (bi * oc + gi * ocg + m0) * n + p0;
            // SAFETY: this job writes rows m0..m1, columns p0..p1 of its image and group's
            // [ocg, n] output block (row stride n) and no other job touches them; lhs is
            // [m1-m0, k] and rhs [k, p1-p0] with row stride rhs_rs, all in bounds.
            unsafe {
                if fast {
                    let rhs = Rhs::Rows {
                        ptr: rhs.as_ptr(),
                        ldb: rhs_rs,
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
                    crate::sgemm::sgemm(m, cols, k, lhs.as_ptr(), k, rhs, dst.at(at), n, e);
                } else {
                    gemm::gemm(
                        m1 - m0,
                        p1 - p0,
                        k,
                        dst.at(at),
                        1,
                        n as isize,
                        true,
                        lhs.as_ptr(),
                        1,
                        k as isize,
                        rhs.as_ptr(),
                        1,
                        rhs_rs as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
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
                .for_each_init(Vec::new, |col, j| job(col, j));
        } else {
            let mut col = Vec::new();
            (0..total).for_each(|j| job(&mut col, j));
        }
        out
    }

    /// Fills `col` (`[icg·kh·kw, p1-p0]`) with the patches of output pixels `p0..p1` of one
    /// image's channel group `src` (`[icg, h, w]`).
    fn im2col(&self, src: &[f32], [p0, p1]: [usize; 2], ow: usize, col: &mut [f32]) {
        let [_, _, h, w] = self.input;
        let [kh, kw] = self.kernel;
        let [sy, sx] = self.stride;
        for (r, row) in col.chunks_mut(p1 - p0).enumerate() {
            let (c, ki, kj) = (r / (kh * kw), (r / kw) % kh, r % kw);
            let plane = &src[c * h * w..][..h * w];
            let dy = (ki * self.dilation[0]) as isize - self.pads[0] as isize;
            let dx = (kj * self.dilation[1]) as isize - self.pads[1] as isize;
            for oy in p0 / ow..=(p1 - 1) / ow {
                let lo = if oy == p0 / ow { p0 % ow } else { 0 };
                let hi = if oy == (p1 - 1) / ow {
                    (p1 - 1) % ow + 1
                } else {
                    ow
                };
                let out = &mut row[oy * ow + lo - p0..oy * ow + hi - p0];
                let iy = (oy * sy) as isize + dy;
                if iy < 0 || iy >= h as isize {
                    out.fill(0.0);
                    continue;
                }
                let line = &plane[iy as usize * w..][..w];
                if sx == 1 {
                    // Contiguous: zeros left of the image, one copy, zeros right of it.
                    let a = (-dx).clamp(lo as isize, hi as isize) as usize;
                    let z = (w as isize - dx).clamp(a as isize, hi as isize) as usize;
                    out[..a - lo].fill(0.0);
                    if z > a {
                        let start = (a as isize + dx) as usize;
                        out[a - lo..z - lo].copy_from_slice(&line[start..start + z - a]);
                    }
                    out[z - lo..].fill(0.0);
                } else {
                    for (o, ox) in out.iter_mut().zip(lo..hi) {
                        let ix = (ox * sx) as isize + dx;
                        *o = if ix >= 0 && ix < w as isize {
                            line[ix as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
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
                        let got = p.run(&x, &wt, b, res.map(|r| r.as_slice()), relu, threads);
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
