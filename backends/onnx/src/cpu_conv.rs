//! 2-D convolution on the CPU for f32 NCHW tensors, as matrix products written directly
//! into the NCHW output. Patches are gathered from a zero-padded copy of the input (or the
//! input itself) through precomputed offsets, into 16-pixel panels (pixel columns) or, on
//! small maps, 8-pixel slivers with AVX-512, else 6 (pixel rows); stride-1 layers on
//! 14×14-sized maps, or with few output channels on small ones, skip the patch matrix
//! (`direct.rs`: one product per kernel tap over the shifted input). With AVX-512, two
//! register-tiled kernels skip it too: stride-1 layers with few output channels sum every
//! tap in registers (`taps.rs`), and the 7×7 stride-2 stems broadcast input values against
//! the weight panels (`strided.rs`).
//! Weights packed at plan time ([`pack_weight`]) feed the AVX2 kernel (`sgemm.rs`); ONNX's
//! own layout, used as it is, feeds it or the `gemm` crate (grouped convolutions, CPUs
//! without AVX2).
use gemm::Parallelism;

use crate::sgemm::{
    to_blocks, Base, Epilogue, Lhs, Out, Rhs, SharedOut, PANEL, SLIVER, TALL_SLIVER,
};

mod direct;
mod strided;
mod taps;

/// Fewest output tiles (over the batch) for the Winograd path, by tile side: fewer 4×4
/// tiles leave the kernel's 16-column strips part empty; 2×2 tiles (the widest layers,
/// whose transformed weight is 16/9 the size) need more work per weight than one 7×7
/// image gives (ResNet-50's 512-channel layers at batch 1: 1.7 ms each with F(2×2, 3×3),
/// 1.4 ms direct, 2 threads).
fn winograd_min_tiles(tile: usize) -> usize {
    if tile == 2 {
        32
    } else {
        16
    }
}

/// Most output channels for which stride-1 layers sum their taps in registers
/// (`taps.rs`); ResNet's 64-channel layers run faster through Winograd.
const TAPS_MAX_CHANNELS: usize = 32;

/// Whether a stride-1, ungrouped convolution with a kernel larger than 1×1 and `oc`
/// output channels sums its taps in registers on this CPU (so needs no Winograd
/// transform of its weight).
pub fn sums_taps(oc: usize) -> bool {
    oc <= TAPS_MAX_CHANNELS && crate::sgemm::wide_available()
}

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
    /// (or packed, see [`Weight`]), with what [`Fused`] adds before and after. Returns `[b,
    /// oc, oh, ow]`. The caller checks the shapes.
    ///
    /// The work is cut into tiles of output pixels (and, when there are few tiles, of output
    /// channels); each tile builds its own small im2col block, which stays in cache, and runs
    /// one single-threaded matrix product into its part of the output. Tiles run in parallel.
    /// A packed weight on a small map (≤ 256 pixels) runs with pixel rows (`run_packed`),
    /// and on 14×14-sized stride-1 maps without a patch matrix (`run_direct`).
    pub fn run(&self, x: &[f32], weight: Weight<'_>, f: &Fused<'_>, threads: usize) -> Vec<f32> {
        let len = self.out_len();
        if let Some(r) = f.residual {
            assert_eq!(
                r.len(),
                len,
                "Conv2d::run: the residual is not the output's size"
            );
        }
        let mut out = Vec::with_capacity(len);
        let dest = Dest {
            out: SharedOut(out.as_mut_ptr()),
            residual: f.residual.map(<[f32]>::as_ptr),
        };
        // SAFETY: `out` has room for the `len` elements, all of which `run_to` writes; the
        // residual is a separate slice of `len`.
        unsafe {
            self.run_to(x, weight, f, threads, dest);
            out.set_len(len);
        }
        out
    }

    /// [`Conv2d::run`] with `acc` (`[b, oc, oh, ow]`) as the residual, replaced by the result
    /// (no second buffer: each element is read just before it is overwritten). `f` has no
    /// residual of its own.
    pub fn run_over(
        &self,
        x: &[f32],
        weight: Weight<'_>,
        f: &Fused<'_>,
        threads: usize,
        acc: &mut [f32],
    ) {
        assert!(
            f.residual.is_none() && acc.len() == self.out_len(),
            "Conv2d::run_over: acc is the residual, and the output's size"
        );
        let p = acc.as_mut_ptr();
        let dest = Dest {
            out: SharedOut(p),
            residual: Some(p),
        };
        // SAFETY: `acc` holds the whole output, and is read only where it is written.
        unsafe { self.run_to(x, weight, f, threads, dest) }
    }

    /// Elements of the output (0 when the kernel does not fit).
    fn out_len(&self) -> usize {
        let [b, _, _, _] = self.input;
        self.out_hw()
            .map_or(0, |[oh, ow]| b * self.out_channels * oh * ow)
    }

    /// [`Conv2d::run`] into `dest` (`f`'s residual is ignored: `dest` says where it is).
    ///
    /// # Safety
    /// `dest.out` is valid for writing the whole output, and `dest.residual` (if any) for
    /// reading as many elements, each no later than the output element at its place is
    /// written; nothing else touches them meanwhile.
    unsafe fn run_to(
        &self,
        x: &[f32],
        weight: Weight<'_>,
        f: &Fused<'_>,
        threads: usize,
        dest: Dest,
    ) {
        let Fused { bias, relu, .. } = *f;
        let [b, ic, _, _] = self.input;
        let Some([oh, ow]) = self.out_hw() else {
            return;
        };
        let oc = self.out_channels;
        let (g, n) = (self.groups, oh * ow);
        let (icg, ocg) = (ic / g, oc / g);
        let k = icg * self.kernel[0] * self.kernel[1];
        let fast = crate::sgemm::available();
        if let Weight::Packed(p) = weight {
            if !fast || g != 1 {
                let taps = self.kernel[0] * self.kernel[1];
                let dense = unpack_weight(p, oc, icg, taps);
                // SAFETY: forwarded from the caller.
                return unsafe { self.run_to(x, Weight::Dense(&dense), f, threads, dest) };
            }
            // A 3×3 stride-1 kernel's Winograd transform follows its panels (plan.rs).
            let (p, winograd) = p.split_at(p.len().min(oc.div_ceil(PANEL) * PANEL * k));
            // The 7×7 stride-2 stems: patches 49 times the input cost more than the
            // products they feed (ResNet-50's stem 1.4 → 1.1 ms in the model).
            if strided::applies(self) {
                // SAFETY: forwarded from the caller.
                return unsafe { self.run_strided(x, p, f, threads, dest) };
            }
            // Few output channels (DenseNet's growth layers): every tap summed in
            // registers beats both the Winograd transform, whose weight is four times the
            // size, and gathering patches (DenseNet-121 at batch 1: 1.06 → 0.98 of
            // onnxruntime's time).
            if taps::applies(self) {
                // SAFETY: forwarded from the caller.
                return unsafe { self.run_taps(x, p, f, threads, dest) };
            }
            let tile = crate::winograd::variant(winograd.len(), oc, ic);
            if tile.is_some_and(|t| crate::winograd::applies(self, winograd_min_tiles(t), t)) {
                // SAFETY: forwarded from the caller.
                return unsafe { crate::winograd::run_to(self, x, winograd, f, threads, dest) };
            }
            // Small maps (14×14) whose padding columns add little: the direct path saves
            // gathering patches, which small channel counts amortise badly. (Measured on
            // DenseNet-121 and ResNet-50; 7×7 and larger maps do better below.)
            let pad_cols = self.pads[1] + self.pads[3];
            if self.stride == [1, 1]
                && self.kernel != [1, 1]
                && dest.residual.is_none()
                && n <= 256
                && pad_cols * 7 <= ow
            {
                // SAFETY: forwarded from the caller.
                return unsafe { self.run_direct(x, p, f, threads, dest.out) };
            }
            // Few output channels on a small map: gathering the patches would cost more
            // than the products they serve (DenseNet's 32-channel growth layers on 7×7:
            // 89 → 45 µs on one thread), so the products read the shifted input in place.
            if n <= 256
                && oc <= 64
                && self.stride == [1, 1]
                && self.kernel != [1, 1]
                && crate::sgemm::wide_available()
            {
                // SAFETY: forwarded from the caller.
                return unsafe { self.run_direct_rows(x, p, f, threads, dest) };
            }
            if n <= 256 {
                // SAFETY: forwarded from the caller.
                return unsafe { self.run_packed(x, p, f, threads, dest) };
            }
        }
        // The AVX2 kernel starts each output block from the residual and bias itself (and
        // writes every element); the gemm crate adds to what is there, so it gets them
        // written in first.
        if !fast {
            let len = b * oc * n;
            // SAFETY: the caller's buffers, of `len` elements each.
            let out = unsafe {
                match dest.residual {
                    Some(r) if r != dest.out.0.cast_const() => {
                        std::ptr::copy_nonoverlapping(r, dest.out.0, len)
                    }
                    Some(_) => {}
                    None => std::ptr::write_bytes(dest.out.0, 0, len),
                }
                std::slice::from_raw_parts_mut(dest.out.0, len)
            };
            if let Some(bias) = bias {
                for (plane, &v) in out.chunks_mut(n).zip(bias.iter().cycle()) {
                    plane.iter_mut().for_each(|o| *o += v);
                }
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
        let mut tiles = tiles.clamp(1, panels.max(1));
        // Few jobs: a count the threads share evenly, so that none waits while another
        // runs a last one (13 tiles on 2 threads leave one idle for a twelfth of the time).
        if threads > 1 && images * tiles < 16 * threads {
            tiles = (images * tiles)
                .next_multiple_of(threads)
                .div_ceil(images)
                .min(panels.max(1));
        }
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
        let dst = dest.out;
        let src = self.source(x, f.pre, matches!(weight, Weight::Packed(_)), 0);
        // A 1×1, stride-1, unpadded convolution with nothing to apply to its input reads
        // the input in place (`[k = icg, n]` per image and group). (With AVX2 tiles too:
        // ResNet-50's 1×1 layers on 56×56 maps, one thread, 30.0 → 27.2 ms in the model.)
        let in_place = fast
            && self.kernel == [1, 1]
            && self.stride == [1, 1]
            && self.pads == [0; 4]
            && f.pre.is_none();
        let job = |col: &mut (Scratch, Vec<usize>), j: usize| {
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
            // The columns this job reads, packed into 16-column panels (`[k, 16]` each,
            // contiguous): rows of a strided plane would all fall in a few cache sets.
            // (A pointwise convolution's input is its right-hand matrix as it is: read
            // in place.)
            let width = p1 - p0;
            if !in_place {
                col.0.grow(k * width.div_ceil(PANEL) * PANEL);
                self.pixel_offsets([p0, p1], &mut col.1);
                src.pack::<PANEL>(bi * g + gi, &col.1, &mut col.0);
            }
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
                    let rhs = if in_place {
                        Rhs::Rows {
                            ptr: src.data[(bi * g + gi) * k * n + p0..].as_ptr(),
                            ldb: n,
                        }
                    } else {
                        Rhs::Panels {
                            ptr: col.as_ptr(),
                            k,
                        }
                    };
                    let e = Epilogue {
                        base: match dest.residual_at(at) {
                            Some(ptr) => Base::Other { ptr, ld: n },
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
        crate::cpu_kernels::jobs_with(
            total,
            threads > 1 && macs >= 256 * 1024,
            Default::default,
            job,
        );
    }

    /// [`Conv2d::run`] for one channel group with the weight packed by [`pack_weight`]:
    /// the product runs with output pixels as rows and output channels as columns, so a
    /// small feature map (7×7 = 49 pixels) fills whole 8-row (AVX2: 6-row) register tiles
    /// where it would leave a 16-pixel panel mostly empty. Each image's patches are packed
    /// once, in slivers as high as the tiles, that stream in order (or, for a pointwise
    /// layer that narrows the channels, the image is read in place); then jobs of at most
    /// 96 pixels (each weight panel is read once per job) and, when those are few, ranges
    /// of output channels run.
    ///
    /// # Safety
    /// As [`Conv2d::run_to`].
    unsafe fn run_packed(
        &self,
        x: &[f32],
        panels: &[f32],
        f: &Fused<'_>,
        threads: usize,
        dest: Dest,
    ) {
        let Fused { bias, relu, .. } = *f;
        let [b, ic, _, _] = self.input;
        let Some([oh, ow]) = self.out_hw() else {
            return;
        };
        let (oc, n) = (self.out_channels, oh * ow);
        let k = ic * self.kernel[0] * self.kernel[1];
        if b * oc * n == 0 {
            return;
        }
        // Slivers as high as the register tiles: 8 pixels with AVX-512, else 6.
        let sliver = if crate::sgemm::wide_available() {
            TALL_SLIVER
        } else {
            SLIVER
        };
        let jobs = RowJobs::new(b, n, sliver, oc, threads);
        let (slivers, tiles) = (jobs.slivers, jobs.tiles);
        let dst = dest.out;
        let src = self.source(x, f.pre, true, 0);
        let parallel = threads > 1 && b * oc * n * k >= 256 * 1024;
        // Each image's patches are packed once (in slivers, shared by the jobs that split
        // its channels), a few images at a time so the buffer stays near 8 MiB.
        // A pointwise, stride-1, unpadded convolution with nothing to apply to its input
        // and no more output channels than input ones reads the image in place as its
        // left-hand matrix (pixels as rows, channels as columns: column-major), with no
        // patches to pack. (Strided rows of A cost the tiles a little; the copy costs more
        // where few output channels share it: measured on ResNet-50's 1×1 layers.)
        let in_place = self.kernel == [1, 1]
            && oc <= ic
            && self.stride == [1, 1]
            && self.pads == [0; 4]
            && f.pre.is_none()
            && crate::sgemm::wide_available();
        let per_image = if in_place { 0 } else { slivers * sliver * k };
        let chunk = (2 * 1024 * 1024 / per_image.max(1)).clamp(1, b);
        let mut patches = Scratch::take(chunk * per_image);
        // Packing splits by slivers into at least two jobs per thread where one image
        // would leave a thread idle (a 7×7 map is one 96-pixel tile).
        let pack_jobs = if b * tiles >= 2 * threads {
            tiles
        } else {
            (2 * threads).div_ceil(b).clamp(tiles, slivers.max(1))
        };
        for b0 in (0..b).step_by(chunk) {
            let nb = chunk.min(b - b0);
            let shared = SharedOut(patches.as_mut_ptr());
            let pack = |offs: &mut Vec<usize>, j: usize| {
                let (bi, pj) = (j / pack_jobs, j % pack_jobs);
                let [s0, s1] = [pj * slivers / pack_jobs, (pj + 1) * slivers / pack_jobs];
                let (r0, r1) = (s0 * sliver, (s1 * sliver).min(n));
                if r0 >= r1 {
                    return;
                }
                self.pixel_offsets([r0, r1], offs);
                // SAFETY: slivers s0..s1 of image bi are this job's own part of `patches`.
                let region = unsafe {
                    let at = bi * per_image + s0 * sliver * k;
                    std::slice::from_raw_parts_mut(shared.at(at), (s1 - s0) * sliver * k)
                };
                if sliver == TALL_SLIVER {
                    src.pack::<TALL_SLIVER>(b0 + bi, offs, region);
                } else {
                    src.pack::<SLIVER>(b0 + bi, offs, region);
                }
            };
            // Channel ranges outermost: the jobs a thread runs in a row (rayon hands out
            // neighbouring indices) share their weight panels, read once into its cache.
            let gemm = |j: usize| {
                let Some(RowJob {
                    bi,
                    rows: [r0, r1],
                    panel: pa,
                    channels: [c0, c1],
                }) = jobs.job(j)
                else {
                    return;
                };
                let s0 = r0 / sliver;
                let at = ((b0 + bi) * oc + c0) * n + r0;
                let e = Epilogue {
                    base: match dest.residual_at(at) {
                        Some(ptr) => Base::Other { ptr, ld: 1 },
                        None => Base::Zero,
                    },
                    row_bias: None,
                    col_bias: bias.map(|v| v[c0..].as_ptr()),
                    relu,
                };
                let a = if in_place {
                    Lhs::Cols {
                        ptr: src.data[(b0 + bi) * k * n + r0..].as_ptr(),
                        ld: n,
                    }
                } else {
                    Lhs::Blocks {
                        ptr: shared.at(bi * per_image + s0 * sliver * k),
                        k,
                        bw: sliver,
                    }
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
                // SAFETY: this job writes pixels r0..r1 of channels c0..c1 of its image
                // (an NCHW block: pixel stride 1, channel stride n) and no other job touches
                // them; the image's slivers were packed above and are only read now.
                unsafe { crate::sgemm::sgemm(r1 - r0, c1 - c0, k, a, rhs, c, e) };
            };
            if !in_place {
                crate::cpu_kernels::jobs_with(nb * pack_jobs, parallel, Vec::new, pack);
            }
            crate::cpu_kernels::jobs_with(jobs.count(nb), parallel, || (), |_, j| gemm(j));
        }
    }

    /// What the patches are gathered from: the input, copied with its padding written out
    /// as zeros (`[b, ic, hp, wp]`) when it has any; `pre` is applied in that copy, or
    /// else while gathering.
    fn source<'x>(
        &self,
        x: &'x [f32],
        pre: Option<PreAffine<'x>>,
        tap_major: bool,
        slack: usize,
    ) -> Source<'x> {
        let [b, ic, h, w] = self.input;
        let [pt, pl, _, _] = self.pads;
        let (hp, wp, wq) = self.padded_geometry();
        let split = self.split_columns();
        let taps = self.taps(tap_major);
        let icg = ic / self.groups;
        if self.pads == [0; 4] && slack == 0 && !split {
            // Each tap row reads one channel: its affine, per group.
            let per_tap = pre.map(|p| {
                let taps_per_channel = (taps.len() / icg.max(1)).max(1);
                let channel = |r: usize| {
                    if tap_major {
                        r % icg.max(1)
                    } else {
                        r / taps_per_channel
                    }
                };
                let pick = |v: &[f32], c: usize| if v.len() == 1 { v[0] } else { v[c] };
                let per = |v: &[f32]| -> Vec<f32> {
                    (0..self.groups * taps.len())
                        .map(|i| {
                            let (gi, r) = (i / taps.len(), i % taps.len());
                            pick(v, gi * icg + channel(r))
                        })
                        .collect()
                };
                (per(p.scale), per(p.shift), p.relu)
            });
            return Source {
                data: x.into(),
                group: pre
                    .and_then(|p| p.image)
                    .filter(|_| self.groups == 1)
                    .unwrap_or(icg * h * w),
                groups: self.groups,
                taps,
                per_tap,
            };
        }
        // `slack` zeros after the last plane let a reader run past it (see `run_direct`).
        let plane = if split { 2 * hp * wq } else { hp * wp };
        // Plane by plane, in parallel when large: each zeroed just before it is filled,
        // while it is in cache (not all of it first, on one thread).
        let (planes, len) = (b * ic, b * ic * plane + slack);
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let at = SharedOut(out.as_mut_ptr());
        let fill = |_: &mut (), i: usize| {
            // SAFETY: plane i is this job's own part of the allocation, zeroed before the
            // slice over it is made.
            let dst = unsafe {
                std::ptr::write_bytes(at.at(i * plane), 0, plane);
                std::slice::from_raw_parts_mut(at.at(i * plane), plane)
            };
            // (An empty input leaves the copy all padding.)
            let src = match x.get(i * h * w..(i + 1) * h * w) {
                Some(src) if w > 0 => src,
                _ => return,
            };
            let c = i % ic;
            let (sc, sh, lo) = PreAffine::of_channel(pre, c);
            let value = |v: f32| {
                if pre.is_some() {
                    (v * sc + sh).max(lo)
                } else {
                    v
                }
            };
            for (y, line) in src.chunks(w).enumerate() {
                if split {
                    // Padded column x goes to half x % 2, column x / 2.
                    for (j, &v) in line.iter().enumerate() {
                        let x = j + pl;
                        dst[(x % 2) * hp * wq + (y + pt) * wq + x / 2] = value(v);
                    }
                } else {
                    let dst = &mut dst[(y + pt) * wp + pl..][..w];
                    match pre {
                        None => dst.copy_from_slice(line),
                        Some(_) => {
                            for (d, &v) in dst.iter_mut().zip(line) {
                                *d = value(v);
                            }
                        }
                    }
                }
            }
        };
        let parallel = rayon::current_num_threads() > 1 && len >= 1 << 18;
        crate::cpu_kernels::jobs_with(planes, parallel, || (), fill);
        // SAFETY: every plane was written above; the slack after them is zeroed here.
        unsafe {
            std::ptr::write_bytes(at.at(planes * plane), 0, slack);
            out.set_len(len);
        }
        Source {
            data: out.into(),
            group: icg * plane,
            groups: self.groups,
            taps,
            per_tap: None,
        }
    }

    /// Stride 2 along rows with a wide kernel (the 7×7 stems of ResNet, DenseNet,
    /// Inception; no dilation): the padded copy keeps even and odd columns in separate
    /// halves of each plane, so the pixels of an output row read neighbouring values (runs)
    /// instead of every other one. (Measured: the ResNet-50 stem 9.2 → 4.1 ms; for 1×1 and
    /// 3×3 kernels the extra copy costs more than the gather it saves.)
    fn split_columns(&self) -> bool {
        self.stride[1] == 2 && self.dilation[1] == 1 && self.kernel[1] >= 5
    }

    /// Padded height and width, and the width of one column-parity half (see
    /// [`Conv2d::split_columns`]; the padded width when not split).
    fn padded_geometry(&self) -> (usize, usize, usize) {
        let [_, _, h, w] = self.input;
        let [pt, pl, pb, pr] = self.pads;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        let wq = if self.split_columns() {
            wp.div_ceil(2)
        } else {
            wp
        };
        (hp, wp, wq)
    }

    /// For each row of the patch matrix, where its tap starts in the padded input of one
    /// group: rows in ONNX's weight order (input channel, kernel row, kernel column), or
    /// `tap_major` (kernel row, kernel column, input channel: [`pack_weight`]'s order).
    fn taps(&self, tap_major: bool) -> Vec<usize> {
        let ic = self.input[1];
        let (hp, wp, wq) = self.padded_geometry();
        let split = self.split_columns();
        let plane = if split { 2 * hp * wq } else { hp * wp };
        let [kh, kw] = self.kernel;
        let icg = ic / self.groups;
        let at = |c: usize, ki: usize, kj: usize| {
            if split {
                c * plane + (kj % 2) * hp * wq + ki * self.dilation[0] * wq + kj / 2
            } else {
                c * plane + ki * self.dilation[0] * wp + kj * self.dilation[1]
            }
        };
        let mut taps = Vec::with_capacity(icg * kh * kw);
        if tap_major {
            for ki in 0..kh {
                for kj in 0..kw {
                    taps.extend((0..icg).map(|c| at(c, ki, kj)));
                }
            }
        } else {
            for c in 0..icg {
                for ki in 0..kh {
                    taps.extend((0..kw).map(|kj| at(c, ki, kj)));
                }
            }
        }
        taps
    }

    /// Where output pixels `p0..p1` read the padded input, relative to a tap.
    fn pixel_offsets(&self, [p0, p1]: [usize; 2], offs: &mut Vec<usize>) {
        let (_, _, wq) = self.padded_geometry();
        let ow = self.out_hw().map_or(1, |[_, ow]| ow.max(1));
        // Split columns: output column ox reads column ox (+ tap) of its parity half.
        let sx = if self.split_columns() {
            1
        } else {
            self.stride[1]
        };
        offs.clear();
        offs.extend((p0..p1).map(|q| (q / ow) * self.stride[0] * wq + (q % ow) * sx));
    }
}

/// A buffer of patches that stays with its thread between convolutions (up to
/// [`Scratch::KEEP`] elements), so that each run neither allocates nor zeroes it: every
/// element a product reads is packed first (the lanes of a last sliver past the pixels
/// are never read).
struct Scratch(Vec<f32>);

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Scratch {
    /// The most elements a thread keeps (16 MiB).
    const KEEP: usize = 4 << 20;

    /// This thread's buffer, at least `len` long.
    fn take(len: usize) -> Scratch {
        let mut s = Scratch(SCRATCH.with(|s| s.take()));
        s.grow(len);
        s
    }

    /// At least `len` long (growing keeps what is there).
    fn grow(&mut self, len: usize) {
        if self.0.len() < len {
            self.0.resize(len, 0.0);
        }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::take(0)
    }
}

impl Drop for Scratch {
    /// Returns the buffer to its thread (unless it is too large to keep, or the thread
    /// already holds another).
    fn drop(&mut self) {
        if self.0.len() <= Self::KEEP {
            let v = std::mem::take(&mut self.0);
            SCRATCH.with(|s| {
                let held = s.take();
                s.set(if held.len() >= v.len() { held } else { v });
            });
        }
    }
}

impl std::ops::Deref for Scratch {
    type Target = Vec<f32>;
    fn deref(&self) -> &Vec<f32> {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Vec<f32> {
        &mut self.0
    }
}

/// What a convolution gathers its patches from (see [`Conv2d::source`]).
struct Source<'x> {
    data: std::borrow::Cow<'x, [f32]>,
    /// Elements of one image's channel group.
    group: usize,
    /// Channel groups of the convolution.
    groups: usize,
    /// Where each row of the patch matrix starts within a group (see [`Conv2d::taps`]).
    taps: Vec<usize>,
    /// Scale, shift (per group and tap row) and ReLU still to apply while gathering.
    per_tap: Option<(Vec<f32>, Vec<f32>, bool)>,
}

impl Source<'_> {
    /// Packs the patch matrix of image-group `ig` (`[taps, pixels]`: row `r`, column `q`
    /// is `data[taps[r] + offs[q]]`) into blocks of `BW` columns, as [`to_blocks`] lays
    /// them out. A whole block of neighbouring pixels (one output row, stride 1) is one
    /// fixed-size copy.
    fn pack<const BW: usize>(&self, ig: usize, offs: &[usize], blocks: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::sgemm::available() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.pack_avx2::<BW>(ig, offs, blocks) };
        }
        self.pack_any::<BW>(ig, offs, blocks)
    }

    /// [`Source::pack`] compiled for AVX2 (the affine and copies vectorise 8 wide).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pack_avx2<const BW: usize>(&self, ig: usize, offs: &[usize], blocks: &mut [f32]) {
        self.pack_any::<BW>(ig, offs, blocks)
    }

    #[inline(always)]
    fn pack_any<const BW: usize>(&self, ig: usize, offs: &[usize], blocks: &mut [f32]) {
        let src = &self.data[ig * self.group..][..self.group];
        let k = self.taps.len();
        let g = ig % self.groups;
        // Row by row of the patch matrix, each across all of this job's blocks: the reads
        // of one row are neighbours (whole cache lines in order, which the prefetcher
        // follows), where block by block they jumped a channel plane per row.
        for (r, &t) in self.taps.iter().enumerate() {
            let affine = self
                .per_tap
                .as_ref()
                .map(|(sc, sh, relu)| (sc[g * k + r], sh[g * k + r], *relu));
            for (bi, o) in offs.chunks(BW).enumerate() {
                let dst = &mut blocks[(bi * k + r) * BW..][..BW];
                let n = o.len();
                let run = n == BW && o[n - 1] - o[0] == n - 1;
                match (affine, run) {
                    (None, true) => {
                        let dst: &mut [f32; BW] = dst.try_into().expect("BW long");
                        *dst = src[t + o[0]..][..BW].try_into().expect("BW long");
                    }
                    // Every other value (stride 2 along a row): one fixed-size
                    // de-interleave the compiler turns into vector shuffles.
                    (None, false) if n == BW && o[n - 1] - o[0] == 2 * (n - 1) => {
                        let from = &src[t + o[0]..][..2 * BW - 1];
                        for (i, d) in dst.iter_mut().enumerate() {
                            *d = from[2 * i];
                        }
                    }
                    (None, false) => {
                        for (d, &q) in dst.iter_mut().zip(o) {
                            *d = src[t + q];
                        }
                    }
                    (Some((a, b, relu)), run) => {
                        let lo = if relu { 0.0 } else { f32::NEG_INFINITY };
                        if run {
                            let dst: &mut [f32; BW] = dst.try_into().expect("BW long");
                            let from: &[f32; BW] = src[t + o[0]..][..BW].try_into().expect("BW");
                            for (d, &v) in dst.iter_mut().zip(from) {
                                *d = (v * a + b).max(lo);
                            }
                        } else {
                            for (d, &q) in dst.iter_mut().zip(o) {
                                *d = (src[t + q] * a + b).max(lo);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// How a product over pixel rows (`run_packed`, `run_direct_rows`) splits into jobs: per
/// image, `tiles` ranges of whole slivers (about 96 pixels each) times ranges of whole
/// 32-channel strips (the AVX-512 tiles' width), enough of them for the threads. Where
/// there are too few strips, pixel ranges get smaller instead (DenseNet's 32-channel
/// layers on 7×7 maps: two 16-channel halves each ran the narrower tiles).
#[derive(Clone, Copy)]
struct RowJobs {
    /// Pixel rows per image and per sliver; slivers per image.
    n: usize,
    sliver: usize,
    slivers: usize,
    /// Pixel ranges per image, and channel ranges.
    tiles: usize,
    parts: usize,
    /// Output channels, their 16-channel panels, and 32-channel strips.
    oc: usize,
    panels: usize,
    pairs: usize,
}

/// One job of [`RowJobs`]: image `bi`'s pixel rows, and output channels from panel `panel`.
struct RowJob {
    bi: usize,
    rows: [usize; 2],
    panel: usize,
    channels: [usize; 2],
}

impl RowJobs {
    fn new(b: usize, n: usize, sliver: usize, oc: usize, threads: usize) -> RowJobs {
        let slivers = n.div_ceil(sliver);
        let mut tiles = n.div_ceil(96);
        let panels = oc.div_ceil(PANEL);
        let pairs = panels.div_ceil(2);
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
        RowJobs {
            n,
            sliver,
            slivers,
            tiles,
            parts,
            oc,
            panels,
            pairs,
        }
    }

    /// Jobs for `images` images.
    fn count(&self, images: usize) -> usize {
        images * self.tiles * self.parts
    }

    /// Job `j` (channel ranges outermost within an image: the jobs a thread runs in a row,
    /// neighbouring indices, share their weight panels); `None` where it is empty.
    fn job(&self, j: usize) -> Option<RowJob> {
        let (tiles, parts, pairs) = (self.tiles, self.parts, self.pairs);
        let (bi, pi, ti) = (j / (tiles * parts), (j / tiles) % parts, j % tiles);
        let [s0, s1] = [ti * self.slivers / tiles, (ti + 1) * self.slivers / tiles];
        let (r0, r1) = (s0 * self.sliver, (s1 * self.sliver).min(self.n));
        let (pa, pb) = (
            pi * pairs / parts * 2,
            ((pi + 1) * pairs / parts * 2).min(self.panels),
        );
        let (c0, c1) = (pa * PANEL, (pb * PANEL).min(self.oc));
        (r0 < r1 && c0 < c1).then_some(RowJob {
            bi,
            rows: [r0, r1],
            panel: pa,
            channels: [c0, c1],
        })
    }
}

/// Where a convolution's `[b, oc, oh, ow]` result goes, and where the residual it adds is
/// read: possibly the same place ([`Conv2d::run_over`]), every element read just before
/// it is written.
#[derive(Clone, Copy)]
pub(crate) struct Dest {
    pub(crate) out: SharedOut,
    pub(crate) residual: Option<*const f32>,
}

// SAFETY: the jobs of one convolution read and write disjoint parts through it, while the
// caller keeps the buffers alive.
unsafe impl Send for Dest {}
unsafe impl Sync for Dest {}

impl Dest {
    /// Where the residual's element `at` is read, if there is a residual.
    fn residual_at(self, at: usize) -> Option<*const f32> {
        self.residual.map(|r| r.wrapping_add(at))
    }
}

/// What the planner fused into a convolution (`fuse.rs`), for [`Conv2d::run`].
#[derive(Clone, Copy, Default)]
pub struct Fused<'a> {
    /// Per output channel, added to the result.
    pub bias: Option<&'a [f32]>,
    /// `[b, oc, oh, ow]`, added to the result.
    pub residual: Option<&'a [f32]>,
    /// Clamp the result at zero last.
    pub relu: bool,
    /// Applied to the input first.
    pub pre: Option<PreAffine<'a>>,
}

/// `x · scale[c] + shift[c]` per input channel `c` (one value: for all), then ReLU if
/// `relu`, applied to a convolution's input as it is read (padding stays zero).
#[derive(Clone, Copy)]
pub struct PreAffine<'a> {
    /// Per input channel, or one value.
    pub scale: &'a [f32],
    /// Per input channel, or one value.
    pub shift: &'a [f32],
    /// Clamp at zero after the affine.
    pub relu: bool,
    /// Elements from one image of the input to the next, where they are not adjacent: the
    /// input is the first channels of a wider batch (a dense block's features,
    /// `append.rs`), read in place. Only for an unpadded, ungrouped convolution with a
    /// 1×1 kernel.
    pub image: Option<usize>,
}

impl PreAffine<'_> {
    /// Input channel `c`'s scale, shift and lower clamp (0 with the ReLU, else −∞); with
    /// no affine, the identity.
    pub fn of_channel(pre: Option<PreAffine<'_>>, c: usize) -> (f32, f32, f32) {
        match pre {
            Some(p) => {
                let pick = |v: &[f32]| if v.len() == 1 { v[0] } else { v[c] };
                let lo = if p.relu { 0.0 } else { f32::NEG_INFINITY };
                (pick(p.scale), pick(p.shift), lo)
            }
            None => (1.0, 0.0, f32::NEG_INFINITY),
        }
    }
}

/// A convolution's weight as [`Conv2d::run`] takes it.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    /// `[oc, ic/groups, kh, kw]`, as ONNX stores it.
    Dense(&'a [f32]),
    /// From [`pack_weight`] (one group only); for 3×3 kernels possibly followed by the
    /// Winograd weight of [`crate::winograd::transform_weight`], used where it applies.
    Packed(&'a [f32]),
}

/// A convolution weight `[oc, icg, taps]` (`taps` = kernel height × width) packed for
/// [`Conv2d::run`]: transposed to `[k, oc]` with `k` in tap-major order (row `t·icg + c`
/// holds tap `t` of input channel `c`, so each tap's rows are one contiguous range), in
/// 16-channel panels, which serve as the right-hand panels of a product over pixel rows
/// and (per 16-channel block) as the left-hand blocks of a product over pixel columns.
pub fn pack_weight(weight: &[f32], oc: usize, icg: usize, taps: usize) -> Vec<f32> {
    pack_weight_in(PANEL, weight, oc, icg, taps)
}

/// [`pack_weight`] in blocks of `bw` channels (a divisor of 16; `oc` still padded to 16):
/// left-hand blocks only, as tall as the tiles that read them.
pub fn pack_weight_in(bw: usize, weight: &[f32], oc: usize, icg: usize, taps: usize) -> Vec<f32> {
    let k = icg * taps;
    let mut out = vec![0f32; oc.div_ceil(PANEL) * k * PANEL];
    to_blocks(&mut out, bw, k, oc, |r, row| {
        let (t, c) = (r / icg.max(1), r % icg.max(1));
        for (co, v) in row.iter_mut().enumerate() {
            *v = weight[co * k + c * taps + t];
        }
    });
    out
}

/// The `[oc, icg, taps]` weight back from [`pack_weight`]'s panels.
pub fn unpack_weight(panels: &[f32], oc: usize, icg: usize, taps: usize) -> Vec<f32> {
    let k = icg * taps;
    let mut out = vec![0f32; oc * k];
    for (co, row) in out.chunks_mut(k.max(1)).enumerate().take(oc) {
        for (r, v) in row.iter_mut().enumerate() {
            let (c, t) = (r / taps.max(1), r % taps.max(1));
            *v = panels[((co / PANEL) * k + t * icg + c) * PANEL + co % PANEL];
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
            // Wide stride-2 kernels on rows of at least one tile (`strided.rs`: 12 pixels
            // with AVX-512, 6 with AVX2 only): whole tiles, a ragged last tile and a last
            // 16-channel panel alone; uneven padding.
            ([2, 3, 30, 29], 37, [7, 7], [2, 2], [1, 1], [3, 3, 3, 3], 1),
            ([1, 2, 31, 40], 20, [5, 5], [2, 2], [1, 1], [2, 1, 2, 0], 1),
            ([1, 6, 7, 9], 6, [3, 3], [1, 2], [1, 1], [0, 1, 2, 0], 6),
            ([1, 2, 10, 10], 3, [3, 2], [1, 1], [2, 3], [2, 0, 1, 4], 1),
            ([3, 8, 5, 5], 4, [5, 5], [3, 3], [1, 1], [2, 2, 2, 2], 2),
            // Taps that fall wholly in the right padding.
            ([1, 2, 3, 2], 2, [1, 3], [1, 1], [1, 3], [0, 0, 0, 5], 1),
            ([2, 3, 40, 40], 8, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1),
            // Many channels on a small map (several panels, ragged slivers, k > 256).
            ([1, 40, 7, 7], 37, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1),
            ([2, 300, 5, 5], 20, [1, 1], [1, 1], [1, 1], [0, 0, 0, 0], 1),
            // Pointwise on a small map, the image read in place as pixel rows (whole
            // 8 × 32 tiles, k over one pass).
            ([2, 300, 7, 7], 64, [1, 1], [1, 1], [1, 1], [0, 0, 0, 0], 1),
            // Pointwise on a larger map: the input read in place (rows of 323 pixels, so
            // unaligned, and a last strip of 8 output channels).
            ([2, 24, 17, 19], 40, [1, 1], [1, 1], [1, 1], [0, 0, 0, 0], 1),
            ([1, 20, 17, 17], 40, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1),
            // Stride 2 on a large map (16-pixel panels, some across output rows) and on
            // a small one (6-pixel slivers across rows).
            ([2, 5, 70, 70], 6, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1], 1),
            ([1, 9, 27, 27], 20, [1, 1], [2, 2], [1, 1], [0, 0, 0, 0], 1),
            // Five pixel tiles of four panels, rounded up to six for two threads.
            (
                [1, 1024, 16, 20],
                4,
                [1, 1],
                [1, 1],
                [1, 1],
                [0, 0, 0, 0],
                1,
            ),
            // The direct path: stride 1 on small maps, padded and not (it reads past the
            // last plane's end).
            ([2, 5, 9, 8], 7, [3, 3], [1, 1], [1, 1], [0, 0, 0, 0], 1),
            ([2, 12, 14, 14], 48, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1),
            // Taps summed in registers (at most 32 output channels, stride 1): a grid
            // three pixels wide (each vector spans rows), a 5×5 kernel over several
            // 48-pixel blocks with a ragged last group of channels, a 14×14 map.
            ([1, 3, 2, 1], 5, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1),
            ([2, 33, 23, 29], 13, [5, 5], [1, 1], [1, 1], [2, 2, 2, 2], 1),
            ([2, 12, 14, 14], 24, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1),
            // The direct path over pixel rows (few output channels on a small map, and
            // the above with a residual): padded, dilated, 40 channels in 32 + 8.
            ([1, 16, 7, 7], 40, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1),
            ([2, 8, 9, 9], 20, [3, 3], [1, 1], [2, 2], [2, 1, 2, 1], 1),
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
                        // A pre-affine on the input (scale, shift per channel, ReLU).
                        let (sc, sh) = (data(input[1], 11), data(input[1], 12));
                        let pre = (res.is_some() && b.is_some()).then_some(PreAffine {
                            image: None,
                            scale: &sc,
                            shift: &sh,
                            relu: true,
                        });
                        let f = Fused {
                            bias: b,
                            residual: res,
                            relu,
                            pre,
                        };
                        let got = p.run(&x, Weight::Dense(&wt), &f, threads);
                        let plane = input[2] * input[3];
                        let xa: Vec<f32> = match pre {
                            Some(_) => (x.iter().enumerate())
                                .map(|(i, v)| {
                                    let c = i / plane % input[1];
                                    (v * sc[c] + sh[c]).max(0.0)
                                })
                                .collect(),
                            None => x.clone(),
                        };
                        let mut want = naive(&p, &xa, &wt, b);
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
                        let (icg, taps) = (input[1] / groups, kernel[0] * kernel[1]);
                        let packed = pack_weight(&wt, oc, icg, taps);
                        assert_eq!(unpack_weight(&packed, oc, icg, taps), wt);
                        {
                            let got = p.run(&x, Weight::Packed(&packed), &f, threads);
                            assert_eq!(got.len(), want.len(), "case {i}");
                            for (a, e) in got.iter().zip(&want) {
                                assert!(
                                    (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                    "packed, case {i} relu {relu}: {a} vs {e}"
                                );
                            }
                        }
                        // The result written over the residual itself, on every path.
                        if let Some(r) = res {
                            let over = Fused {
                                residual: None,
                                ..f
                            };
                            for w in [Weight::Dense(&wt), Weight::Packed(&packed)] {
                                let mut acc = r.to_vec();
                                p.run_over(&x, w, &over, threads, &mut acc);
                                for (a, e) in acc.iter().zip(&want) {
                                    assert!(
                                        (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                        "over the residual, case {i}: {a} vs {e}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// A zero-sized input dimension padded out to the kernel's width: every window is
    /// padding, so every output is the bias (dense, packed and Winograd-carrying weights).
    #[test]
    fn an_empty_input_with_padding_gives_the_bias() {
        let geo = Conv2d {
            input: [1, 16, 7, 0],
            out_channels: 16,
            kernel: [3, 3],
            stride: [1, 1],
            dilation: [1, 1],
            pads: [1, 2, 1, 2],
            groups: 1,
        };
        let w = data(16 * 16 * 9, 3);
        let bias = data(16, 5);
        let f = Fused {
            bias: Some(&bias),
            ..Default::default()
        };
        let mut packed = pack_weight(&w, 16, 16, 9);
        let panels = packed.clone();
        packed.extend(crate::winograd::transform_weight(&w, 16, 16, 4));
        for weight in [
            Weight::Dense(&w),
            Weight::Packed(&panels),
            Weight::Packed(&packed),
        ] {
            let out = geo.run(&[], weight, &f, 2);
            assert_eq!(out.len(), 16 * 7 * 2);
            for (plane, &b) in out.chunks(14).zip(&bias) {
                assert!(plane.iter().all(|&v| v == b), "{plane:?} vs {b}");
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
