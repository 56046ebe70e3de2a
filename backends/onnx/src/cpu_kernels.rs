//! CPU fast paths for f32 operators that dominate real models after the convolution: a
//! matrix product against a constant weight with its bias added in place, softmax over the
//! last axis in one pass per row, and 2-D max pooling. Each works on contiguous slices and
//! splits its rows over rayon's threads; the operators fall back to candle for anything else.
use crate::sgemm::{Lhs, Out, Rhs};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Work below this many elements runs on the calling thread: handing it to a thread pool
/// would cost more than it saves (and small models never wake the pool).
const PAR_MIN: usize = 32 * 1024;
/// The same threshold for matrix products, in multiply-adds.
const PAR_MIN_MACS: usize = 256 * 1024;

/// `f(i, chunk)` for each `chunk_len`-sized chunk of `data`, split over threads when `work`
/// is at least `min`.
fn chunks(
    data: &mut [f32],
    chunk_len: usize,
    work: usize,
    min: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    let chunk_len = chunk_len.max(1);
    if work < min {
        data.chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// A new `len`-element buffer filled by `fill(i, chunk)` for its `chunk_len`-element
/// chunks (split over threads when `len` is at least `min`), each of which must write
/// every element of its chunk. Not zeroed first: a large buffer comes from the heap (see
/// `allocator.rs`), where zeroing would be a full extra pass.
fn filled(
    len: usize,
    chunk_len: usize,
    min: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let spare = &mut out.spare_capacity_mut()[..len];
    let chunk_len = chunk_len.max(1);
    if len < min {
        spare
            .chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| fill(i, c));
    } else {
        spare
            .par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| fill(i, c));
    }
    // SAFETY: every chunk's elements were written by `fill` (its contract).
    unsafe { out.set_len(len) };
    out
}

/// The elements of `s` once every one of them has been written.
///
/// # Safety
/// Every element of `s` is initialised.
unsafe fn assume_init(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller promises initialisation.
    unsafe { &mut *(s as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `job(state, j)` for `j` in `0..count`, on the pool when `parallel` (and there is more
/// than one job); each thread makes its `state` (a scratch buffer) once with `init`.
pub(crate) fn jobs_with<S, I, F>(count: usize, parallel: bool, init: I, job: F)
where
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, usize) + Sync + Send,
{
    if parallel && count > 1 {
        (0..count).into_par_iter().for_each_init(init, job);
    } else {
        let mut s = init();
        (0..count).for_each(|j| job(&mut s, j));
    }
}

/// Row-major strides of a buffer of `dims` (elements between neighbours along each axis).
pub(crate) fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// `f(j)` for `j` in `0..count`, split over threads when `work` is at least `min`.
pub(crate) fn jobs(count: usize, work: usize, min: usize, f: impl Fn(usize) + Sync + Send) {
    if work < min {
        (0..count).for_each(f);
    } else {
        (0..count).into_par_iter().for_each(f);
    }
}

/// The weight of [`linear`]: row-major `[k, n]`, or packed by
/// [`crate::sgemm::pack_panels`] (only where [`crate::sgemm::available`]).
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    /// Row-major `[k, n]`.
    Rows(&'a [f32]),
    /// 16-column panels.
    Panels(&'a [f32]),
}

/// `x [rows, k] · w [k, n] (+ bias [n])` → `[rows, n]`, then the exact GELU with `gelu`
/// (each job's block as soon as it is computed, while in cache). Blocks of at most 96
/// rows, and when there are fewer blocks than threads, column panels too, so that each
/// thread streams its own part of the weight.
pub fn linear(
    x: &[f32],
    w: Weight<'_>,
    bias: Option<&[f32]>,
    [k, n]: [usize; 2],
    gelu: bool,
) -> Vec<f32> {
    let rows = x.len().checked_div(k).unwrap_or(0);
    let len = rows * n;
    if len == 0 {
        return Vec::new();
    }
    let fast = crate::sgemm::available();
    // The AVX2 kernel writes every element (from zero plus the bias), so its buffer is not
    // zeroed first; the length is set once the jobs are done.
    let mut out = if fast {
        Vec::with_capacity(len)
    } else {
        vec![0f32; len]
    };
    if let (Some(b), false) = (bias, fast) {
        // The gemm crate adds the product to what is there: start from the bias.
        for row in out.chunks_mut(n) {
            row.copy_from_slice(b);
        }
    }
    let epilogue = crate::sgemm::Epilogue {
        base: crate::sgemm::Base::Zero,
        row_bias: None,
        col_bias: bias.map(|b| b.as_ptr()),
        relu: false,
    };
    let threads = rayon::current_num_threads().max(1);
    let panels = n.div_ceil(16);
    let row_blocks = threads * rows.div_ceil(96 * threads);
    let per = rows.div_ceil(row_blocks).max(1);
    let row_blocks = rows.div_ceil(per);
    let groups = (2 * threads).div_ceil(row_blocks).clamp(1, panels);
    let per_group = panels.div_ceil(groups);
    let dst = crate::sgemm::SharedOut(out.as_mut_ptr());
    let epilogue = &epilogue; // shared whole (it is Sync; its raw fields alone are not)
    jobs(row_blocks * groups, rows * n * k, PAR_MIN_MACS, |job| {
        let (rb, g) = (job / groups, job % groups);
        let (r0, r1) = (rb * per, ((rb + 1) * per).min(rows));
        let (pa, pb) = (g * per_group, ((g + 1) * per_group).min(panels));
        let (j0, j1) = (pa * 16, (pb * 16).min(n));
        if r0 >= r1 || j0 >= j1 {
            return;
        }
        let a = x[r0 * k..].as_ptr();
        let lhs = Lhs::Rows { ptr: a, lda: k };
        let c = dst.at(r0 * n + j0);
        let e = crate::sgemm::Epilogue {
            col_bias: epilogue.col_bias.map(|p| p.wrapping_add(j0)),
            ..*epilogue
        };
        // SAFETY: this job owns rows r0..r1 × columns j0..j1 of `out` (row stride n); x
        // holds those rows of k values and w the k × n weight in the layout it says.
        unsafe {
            match w {
                Weight::Panels(p) if fast => {
                    let b = crate::sgemm::Rhs::Panels {
                        ptr: p[pa * k * 16..].as_ptr(),
                        k,
                    };
                    crate::sgemm::sgemm(r1 - r0, j1 - j0, k, lhs, b, Out::rows(c, n), e)
                }
                Weight::Rows(wr) if fast => {
                    let b = crate::sgemm::Rhs::Rows {
                        ptr: wr[j0..].as_ptr(),
                        ldb: n,
                    };
                    crate::sgemm::sgemm(r1 - r0, j1 - j0, k, lhs, b, Out::rows(c, n), e)
                }
                Weight::Rows(wr) => gemm::gemm(
                    r1 - r0,
                    j1 - j0,
                    k,
                    c,
                    1,
                    n as isize,
                    true,
                    a,
                    1,
                    k as isize,
                    wr[j0..].as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                ),
                Weight::Panels(_) => unreachable!("weights are packed only where sgemm runs"),
            }
            if gelu {
                for r in r0..r1 {
                    // SAFETY: this job's own row segment, written just above.
                    gelu_in_place(std::slice::from_raw_parts_mut(dst.at(r * n + j0), j1 - j0));
                }
            }
        }
    });
    if fast {
        // SAFETY: the jobs wrote every row block × column group of the output.
        unsafe { out.set_len(len) };
    }
    out
}

/// `batch` independent products `a[i] [m, k] · b[i] [k, n]`, one batch entry per job.
pub fn batched_matmul(a: &[f32], b: &[f32], batch: usize, [m, k, n]: [usize; 3]) -> Vec<f32> {
    let layout = |rs: usize, entry: usize| MatrixBatch {
        batch: [1, batch],
        strides: [0, entry],
        rs,
        cs: 1,
    };
    let (la, lb, lo) = (layout(k, m * k), layout(n, k * n), layout(n, m * n));
    if let Some(out) = strided_batched_matmul(a, la, b, lb, lo, batch * m * n, [m, k, n]) {
        return out;
    }
    let len = batch * m * n;
    let mut out = vec![0f32; len];
    if m * n == 0 {
        return out;
    }
    let dst = crate::sgemm::SharedOut(out.as_mut_ptr());
    jobs(batch, len * k, PAR_MIN_MACS, |i| {
        let (ap, bp) = (a[i * m * k..].as_ptr(), b[i * k * n..].as_ptr());
        // SAFETY: entry i of a is [m, k], of b [k, n], and this job's own [m, n] block of
        // the output starts at c.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.at(i * m * n),
                1,
                n as isize,
                false,
                ap,
                1,
                k as isize,
                bp,
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    out
}

/// Where the matrices of a batch lie in one buffer: the batch is `batch[0] × batch[1]`
/// matrices, entry `(i, j)` starting at `i·strides[0] + j·strides[1]`, its element `(r, c)`
/// `r·rs + c·cs` after that. Attention's heads read and write `[b, s, heads, d]` buffers
/// this way, with no transposed copies.
#[derive(Clone, Copy, Debug)]
pub struct MatrixBatch {
    /// The two batch dimensions.
    pub batch: [usize; 2],
    /// Offset between entries along each batch dimension.
    pub strides: [usize; 2],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl MatrixBatch {
    fn at(&self, entry: usize) -> usize {
        let b1 = self.batch[1].max(1);
        (entry / b1) * self.strides[0] + (entry % b1) * self.strides[1]
    }
}

/// `a[i] [m, k] · b[i] [k, n]` for every entry of the batch, read and written where the
/// layouts say (the output, `out_len` long, is covered by `lo`'s entries). Runs on the AVX2
/// kernel: `None` without it, or when `a`'s columns are not adjacent. A `b` that is not a
/// compact row-major matrix (a view of a wider buffer, or transposed) is packed per entry
/// first.
pub fn strided_batched_matmul(
    a: &[f32],
    la: MatrixBatch,
    b: &[f32],
    lb: MatrixBatch,
    lo: MatrixBatch,
    out_len: usize,
    [m, k, n]: [usize; 3],
) -> Option<Vec<f32>> {
    let batch = lo.batch[0] * lo.batch[1];
    if !crate::sgemm::available() || la.cs != 1 || (lb.cs != 1 && lb.rs != 1) {
        return None;
    }
    if m * n * batch == 0 {
        return Some(vec![0f32; out_len]);
    }
    // Every element is written by the kernel; the length is set once the jobs are done.
    let mut out: Vec<f32> = Vec::with_capacity(out_len);
    let dst = crate::sgemm::SharedOut(out.as_mut_ptr());
    let job = |panels: &mut Vec<f32>, i: usize| {
        let ap = a[la.at(i)..].as_ptr();
        let rhs = rhs_of(&b[lb.at(i)..], lb, [k, n], panels);
        let e = crate::sgemm::Epilogue {
            base: crate::sgemm::Base::Zero,
            ..crate::sgemm::Epilogue::ACCUMULATE
        };
        let lhs = Lhs::Rows {
            ptr: ap,
            lda: la.rs,
        };
        let c = Out {
            ptr: dst.at(lo.at(i)),
            rs: lo.rs,
            cs: lo.cs,
        };
        // SAFETY: entry i of a is [m, k] with row stride la.rs, of b [k, n] as its layout
        // says (or its packed copy), and entry i of the output is this job's own [m, n]
        // block (the layouts of distinct entries do not overlap).
        unsafe { crate::sgemm::sgemm(m, n, k, lhs, rhs, c, e) };
    };
    jobs_with(batch, batch * m * n * k >= PAR_MIN_MACS, Vec::new, job);
    // SAFETY: the entries' blocks cover the whole output (the caller's layout).
    unsafe { out.set_len(out_len) };
    Some(out)
}

/// Matrix `[k, n]` of a batch laid out as `lb` says, from its first element `b`, as the
/// kernel's right-hand operand: read in place where its rows are whole and adjacent
/// (contiguous), else packed into `panels` first: a view into a wider buffer (rows far
/// apart, which the kernel's 16-wide reads would spread over few cache sets) or a
/// transposed one (columns are the runs).
fn rhs_of(b: &[f32], lb: MatrixBatch, [k, n]: [usize; 2], panels: &mut Vec<f32>) -> Rhs {
    // (With k = 0 the kernel reads no B at all.)
    if (lb.cs == 1 && lb.rs == n) || k == 0 {
        return Rhs::Rows {
            ptr: b.as_ptr(),
            ldb: lb.rs,
        };
    }
    panels.clear();
    panels.resize(n.div_ceil(16) * 16 * k, 0.0);
    for (p, panel) in panels.chunks_exact_mut(16 * k).enumerate() {
        let c0 = p * 16;
        let width = 16.min(n - c0);
        if lb.cs == 1 {
            for (r, line) in panel.chunks_exact_mut(16).enumerate() {
                line[..width].copy_from_slice(&b[r * lb.rs + c0..][..width]);
            }
        } else {
            // Column by column: each column's values are neighbours (rs = 1 for a
            // transposed matrix), written 16 apart.
            for c in 0..width {
                let col = &b[(c0 + c) * lb.cs..];
                for (r, line) in panel.chunks_exact_mut(16).enumerate() {
                    line[c] = col[r * lb.rs];
                }
            }
        }
    }
    Rhs::Panels {
        ptr: panels.as_ptr(),
        k,
    }
}

/// One [`attention`]: per matrix `i` of the batch, `out[i] = softmax(q[i] · k[i] · scale +
/// shift + mask rows) · v[i]`, the softmax along each row of the scores.
pub struct Attention<'a> {
    /// The queries `[m, d]`, keys `[d, n]` and values `[n, e]` of each matrix of the batch,
    /// and where the results `[m, e]` go.
    pub q: (&'a [f32], MatrixBatch),
    pub k: (&'a [f32], MatrixBatch),
    pub v: (&'a [f32], MatrixBatch),
    pub out: MatrixBatch,
    /// `[m, d, n, e]`.
    pub dims: [usize; 4],
    pub scale: f32,
    pub shift: f32,
    /// The mask, where each row of the scores (all matrices' rows in order) finds its row
    /// of it, and its step along the row (0: one value for the row).
    pub mask: Option<(&'a [f32], &'a [usize], usize)>,
}

/// [`Attention`] into a new buffer of `out_len` elements (the output layout's): one job
/// per matrix of the batch, whose scores (`m × n`) stay in the thread's cache from their
/// product through their softmax to the product with `v`. `None` without the AVX2 kernel
/// or where the queries' rows are not contiguous.
pub fn attention(a: &Attention<'_>, out_len: usize) -> Option<Vec<f32>> {
    let [m, d, n, e] = a.dims;
    let ((q, lq), (k, lk), (v, lv), lo) = (a.q, a.k, a.v, a.out);
    let batch = lo.batch[0] * lo.batch[1];
    if !crate::sgemm::available() || lq.cs != 1 {
        return None;
    }
    if m * e * batch == 0 {
        return Some(vec![0f32; out_len]);
    }
    let mut out: Vec<f32> = Vec::with_capacity(out_len);
    let dst = crate::sgemm::SharedOut(out.as_mut_ptr());
    let zero = crate::sgemm::Epilogue {
        base: crate::sgemm::Base::Zero,
        ..crate::sgemm::Epilogue::ACCUMULATE
    };
    type Scratch = (Vec<f32>, Vec<f32>, Vec<f32>);
    let job = |(kp, vp, scores): &mut Scratch, i: usize| {
        scores.resize(m * n, 0.0);
        let keys = rhs_of(&k[lk.at(i)..], lk, [d, n], kp);
        let queries = Lhs::Rows {
            ptr: q[lq.at(i)..].as_ptr(),
            lda: lq.rs,
        };
        // SAFETY: entry i of q is [m, d] with row stride lq.rs, `keys` [d, n] (in place
        // or packed above), and `scores` this job's own [m, n].
        unsafe {
            crate::sgemm::sgemm(
                m,
                n,
                d,
                queries,
                keys,
                Out::rows(scores.as_mut_ptr(), n),
                zero,
            )
        };
        for (r, row) in scores.chunks_exact_mut(n.max(1)).enumerate().take(m) {
            let mask = match a.mask {
                Some((mask, offsets, inner)) => mask_row(mask, offsets[i * m + r], n, inner),
                None => &[0.0],
            };
            masked_softmax_row_in_place(row, a.scale, a.shift, mask);
        }
        let values = rhs_of(&v[lv.at(i)..], lv, [n, e], vp);
        let probs = Lhs::Rows {
            ptr: scores.as_ptr(),
            lda: n,
        };
        let c = Out {
            ptr: dst.at(lo.at(i)),
            rs: lo.rs,
            cs: lo.cs,
        };
        // SAFETY: `probs` is [m, n], `values` [n, e] (in place or packed), and entry i of
        // the output this job's own [m, e] block (the layouts of distinct entries do not
        // overlap).
        unsafe { crate::sgemm::sgemm(m, e, n, probs, values, c, zero) };
    };
    let work = batch * m * n * (d + e);
    jobs_with(batch, work >= PAR_MIN_MACS, Scratch::default, job);
    // SAFETY: the entries' blocks cover the whole output (the caller's layout).
    unsafe { out.set_len(out_len) };
    Some(out)
}

/// `x · scale[c] + shift[c]` (then ReLU if asked) over `[n, c, plane]` data, where `scale`
/// and `shift` hold one value per channel or a single value for all.
pub fn channel_affine(
    x: &[f32],
    channels: usize,
    plane: usize,
    scale: &[f32],
    shift: &[f32],
    relu: bool,
) -> Vec<f32> {
    let mut out = x.to_vec();
    if plane == 0 || channels == 0 {
        return out;
    }
    let pick = |v: &[f32], c: usize| if v.len() == 1 { v[0] } else { v[c] };
    let len = out.len();
    chunks(&mut out, plane, len, PAR_MIN, |i, p| {
        let c = i % channels;
        let (s, t) = (pick(scale, c), pick(shift, c));
        if relu {
            p.iter_mut().for_each(|v| *v = (*v * s + t).max(0.0));
        } else {
            p.iter_mut().for_each(|v| *v = *v * s + t);
        }
    });
    out
}

/// `$body(args)` (an `#[inline(always)]` fn) compiled for AVX-512F, for AVX2 and FMA, and
/// for neither, run the best way the CPU allows; returns from the enclosing function.
macro_rules! best_simd {
    ($body:ident($($arg:ident: $ty:ty),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                $body($($arg),*)
            }
            #[target_feature(enable = "avx2,fma,avx512f")]
            unsafe fn avx512($($arg: $ty),*) {
                $body($($arg),*)
            }
            if crate::sgemm::wide_available() {
                // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked just above).
                return unsafe { avx512($($arg),*) };
            }
            if crate::sgemm::available() {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { avx2($($arg),*) };
            }
        }
        $body($($arg),*)
    }};
}

/// `dst[i] = gelu(src[i])`, 32 lanes at a time ([`gelu_lanes`] works one step at a time
/// across the lanes, so each step is four independent 8-wide vectors and the long
/// polynomial chains overlap), compiled for each instruction set (`best_simd!`). (A
/// closure passed into a `target_feature` function is not reliably compiled with its
/// features; a loop written inside one is.)
fn gelu_into(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
    #[inline(always)]
    fn body(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        let mut blocks = dst.chunks_exact_mut(32).zip(src.chunks_exact(32));
        for (d, s) in &mut blocks {
            let s: &[f32; 32] = s.try_into().expect("chunks of 32");
            for (d, v) in d.iter_mut().zip(gelu_lanes(*s)) {
                d.write(v);
            }
        }
        let done = src.len() / 32 * 32;
        for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
            d.write(gelu_lanes([s])[0]);
        }
    }
    best_simd!(body(src: &[f32], dst: &mut [MaybeUninit<f32>]))
}

/// [`gelu_into`] in place.
fn gelu_in_place(v: &mut [f32]) {
    #[inline(always)]
    fn body(v: &mut [f32]) {
        let mut blocks = v.chunks_exact_mut(32);
        for b in &mut blocks {
            let s: [f32; 32] = (*b).try_into().expect("chunks of 32");
            b.copy_from_slice(&gelu_lanes(s));
        }
        for x in blocks.into_remainder() {
            *x = gelu_lanes([*x])[0];
        }
    }
    best_simd!(body(v: &mut [f32]))
}

#[inline(always)]
fn exp_shifted_lanes<const L: usize>(mut x: [f32; L], shift: f32) -> [f32; L] {
    x.iter_mut().for_each(|v| *v -= shift);
    exp_lanes(x)
}

/// `e^x` for f32: `2^n · e^y`, with `n` the nearest integer to `x·log2 e`, `y = x − n·ln2`
/// (`|y| ≤ ln2/2`) and a degree-7 Taylor polynomial (relative error below 2e-7); inputs
/// are clamped to [-87, 88].
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    exp_lanes([x])[0]
}

/// [`exp_approx`] of each lane, one step at a time across the lanes.
#[inline(always)]
fn exp_lanes<const L: usize>(x: [f32; L]) -> [f32; L] {
    let mut y = [0f32; L];
    let mut scale = [0f32; L];
    for i in 0..L {
        let x = x[i].clamp(-87.0, 88.0);
        // Round x·log2 e to nearest by adding 1.5 · 2^23: the sum's low mantissa bits then
        // hold the integer (read from the bits, as a float-to-int cast would not vectorise).
        let big = x.mul_add(std::f32::consts::LOG2_E, 12_582_912.0);
        let n = big - 12_582_912.0;
        let ni = (big.to_bits() as i32).wrapping_sub(0x4B40_0000);
        // y = x − n·ln2 in two steps (Cody–Waite): ln2's high part has few enough bits
        // that n·high is exact, so the small remainder keeps f32 precision.
        y[i] = n.mul_add(2.121_944_4e-4, n.mul_add(-0.693_359_4, x));
        scale[i] = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    }
    let mut p = [1.0f32 / 5040.0; L];
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        for i in 0..L {
            p[i] = p[i].mul_add(y[i], c);
        }
    }
    for i in 0..L {
        p[i] *= scale[i];
    }
    p
}

/// The exact (erf) GELU, `x · Φ(x) = ½ · x · erfc(−x/√2)`, with erfc from Numerical Recipes'
/// Chebyshev fit (relative error below 1.2e-7 everywhere, so tiny negative tails stay
/// accurate) and [`exp_approx`].
#[inline(always)]
pub fn gelu_approx(x: f32) -> f32 {
    gelu_lanes([x])[0]
}

/// [`gelu_approx`] of each lane, one step at a time across the lanes.
#[inline(always)]
fn gelu_lanes<const L: usize>(x: [f32; L]) -> [f32; L] {
    let mut z = [0f32; L];
    let mut t = [0f32; L];
    for i in 0..L {
        z[i] = (x[i] * std::f32::consts::FRAC_1_SQRT_2).abs();
        t[i] = 1.0 / z[i].mul_add(0.5, 1.0);
    }
    let mut poly = [0.170_872_78f32; L];
    for c in [
        -0.822_152_2,
        1.488_515_9,
        -1.135_204,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
        -1.265_512_2,
    ] {
        for i in 0..L {
            poly[i] = poly[i].mul_add(t[i], c);
        }
    }
    for i in 0..L {
        poly[i] = (-z[i]).mul_add(z[i], poly[i]);
    }
    let e = exp_lanes(poly);
    let mut out = [0f32; L];
    for i in 0..L {
        // erfc(w) for w = −x/√2: r for w ≥ 0 (x ≤ 0), 2 − r otherwise.
        let r = t[i] * e[i];
        let erfc = if x[i] <= 0.0 { r } else { 2.0 - r };
        out[i] = 0.5 * x[i] * erfc;
    }
    out
}

/// GELU (exact form) of every element, vectorised and split over threads.
pub fn gelu(x: &[f32]) -> Vec<f32> {
    // Written straight from x into a buffer that is not zeroed first.
    filled(x.len(), 16384, PAR_MIN, |i, c| {
        gelu_into(&x[i * 16384..][..c.len()], c)
    })
}

/// `f` applied to every element, chunks split over threads (for costly unary functions).
pub fn map_par(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = x.to_vec();
    let len = out.len();
    chunks(&mut out, 16384, len, PAR_MIN, |_, c| {
        c.iter_mut().for_each(|v| *v = f(*v))
    });
    out
}

/// Layer normalisation of each row of `d` values: `(x − mean) / √(var + eps) · scale + bias`,
/// of `x + residual` when a residual (same length as `x`) is given.
pub fn layer_norm(
    x: &[f32],
    residual: Option<&[f32]>,
    d: usize,
    scale: &[f32],
    bias: Option<&[f32]>,
    eps: f32,
) -> Vec<f32> {
    if d == 0 {
        return x.to_vec();
    }
    let per = (16384 / d).max(1) * d;
    // Each chunk is x copied into the output (one pass, no zeroing), then the residual
    // added and the rows normalised there.
    filled(x.len(), per, PAR_MIN, |i, rows| {
        let src = &x[i * per..][..rows.len()];
        for (o, &v) in rows.iter_mut().zip(src) {
            o.write(v);
        }
        // SAFETY: every element of the chunk was written just above.
        let rows = unsafe { assume_init(rows) };
        if let Some(r) = residual {
            // (The chunk is still in cache.)
            for (v, a) in rows.iter_mut().zip(r.get(i * per..).unwrap_or_default()) {
                *v += a;
            }
        }
        for row in rows.chunks_mut(d) {
            normalize_row(row, scale, bias, eps);
        }
    })
}

/// One row of [`layer_norm`], in place.
fn normalize_row(row: &mut [f32], scale: &[f32], bias: Option<&[f32]>, eps: f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::sgemm::available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { normalize_row_avx2(row, scale, bias, eps) };
    }
    normalize_row_any(row, scale, bias, eps)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn normalize_row_avx2(row: &mut [f32], scale: &[f32], bias: Option<&[f32]>, eps: f32) {
    normalize_row_any(row, scale, bias, eps)
}

#[inline(always)]
fn normalize_row_any(row: &mut [f32], scale: &[f32], bias: Option<&[f32]>, eps: f32) {
    let d = row.len() as f32;
    let mean = lane_sum(row, |v| v) / d;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / d;
    let inv = 1.0 / (var + eps).sqrt();
    match bias {
        Some(b) => {
            for ((v, &s), &b) in row.iter_mut().zip(scale).zip(b) {
                *v = (*v - mean) * inv * s + b;
            }
        }
        None => {
            for (v, &s) in row.iter_mut().zip(scale) {
                *v = (*v - mean) * inv * s;
            }
        }
    }
}

/// `Σ f(x)` in eight partial sums, so the loop vectorises (the order of additions differs
/// from a running sum by rounding only).
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

/// `x` (row-major, `dims`) with its axes permuted (`out` axis `i` is `x` axis `perm[i]`),
/// for permutations that move the last axis: every 2-D slice made of the output's last
/// axis and the axis that was `x`'s last is transposed in 8×8 tiles, so both sides are read
/// and written in runs (a plain strided copy would touch one element per cache line).
/// `None` when the last axis stays last (a copy of contiguous runs is then already fast).
pub fn transpose_moving_last(x: &[f32], dims: &[usize], perm: &[usize]) -> Option<Vec<f32>> {
    let rank = dims.len();
    if rank < 2 || perm.len() != rank || perm[rank - 1] == rank - 1 {
        return None;
    }
    let in_strides = strides(dims);
    let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let out_strides = strides(&out_dims);
    // The 2-D slice: rows along output axis `k` (x's last axis, stride 1 in x), columns
    // along the output's last axis (stride 1 in the output).
    let k = perm.iter().position(|&p| p == rank - 1)?;
    let (rows, cols) = (out_dims[k], out_dims[rank - 1]);
    let col_stride = in_strides[perm[rank - 1]];
    let outer: Vec<usize> = (0..rank - 1).filter(|&i| i != k).collect();
    let count: usize = outer.iter().map(|&i| out_dims[i]).product();
    if x.is_empty() {
        return Some(Vec::new());
    }
    // Every element is written below; not zeroed first (see `filled`).
    let mut out: Vec<f32> = Vec::with_capacity(x.len());
    let dst = crate::sgemm::SharedOut(out.as_mut_ptr());
    jobs(count, x.len(), PAR_MIN, |j| {
        // Output and input offsets of slice j.
        let (mut rem, mut o, mut s) = (j, 0, 0);
        for &i in outer.iter().rev() {
            let c = rem % out_dims[i];
            rem /= out_dims[i];
            o += c * out_strides[i];
            s += c * in_strides[perm[i]];
        }
        let ok = out_strides[k];
        for r0 in (0..rows).step_by(8) {
            for c0 in (0..cols).step_by(8) {
                for r in r0..(r0 + 8).min(rows) {
                    for c in c0..(c0 + 8).min(cols) {
                        // SAFETY: slice j's output elements are written only by job j,
                        // and every index is inside `out` (x and out have the same size).
                        unsafe { *dst.at(o + r * ok + c) = x[s + r + c * col_stride] };
                    }
                }
            }
        }
    });
    // SAFETY: the slices cover every output element (x and out have the same size).
    unsafe { out.set_len(x.len()) };
    Some(out)
}

/// Softmax (or log-softmax) of each row of `width` values.
pub fn softmax_rows(x: &[f32], width: usize, log: bool) -> Vec<f32> {
    let mut out = x.to_vec();
    if width == 0 {
        return out;
    }
    let per = (16384 / width).max(1) * width;
    let len = out.len();
    chunks(&mut out, per, len, PAR_MIN, |_, rows| {
        for row in rows.chunks_mut(width) {
            if log {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
                let shift = max + sum.ln();
                row.iter_mut().for_each(|v| *v -= shift);
            } else {
                softmax_in_place(row);
            }
        }
    });
    out
}

/// Softmax of each row of `width` values of `x · scale + shift + mask`, where row `r` adds
/// `mask[offsets[r] + j · inner]` at column `j` (`inner` 0 or 1: the mask broadcast).
pub fn masked_softmax_rows(
    x: &[f32],
    width: usize,
    scale: f32,
    shift: f32,
    mask: &[f32],
    offsets: &[usize],
    inner: usize,
) -> Vec<f32> {
    if width == 0 {
        return vec![0f32; x.len()];
    }
    let rows_per = (16384 / width).max(1);
    filled(x.len(), rows_per * width, PAR_MIN, |c, rows| {
        for (i, row) in rows.chunks_mut(width).enumerate() {
            let r = c * rows_per + i;
            let src = &x[r * width..(r + 1) * width];
            let m = mask_row(mask, offsets[r], width, inner);
            masked_softmax_row(row, src, scale, shift, m);
        }
    })
}

/// The mask's row from `off`: `width` values (`inner` 1) or one value for the whole row.
fn mask_row(mask: &[f32], off: usize, width: usize, inner: usize) -> &[f32] {
    if inner == 1 {
        &mask[off..off + width]
    } else {
        &mask[off..off + 1]
    }
}

/// [`masked_softmax_rows`] written over `x` itself.
pub fn masked_softmax_rows_in_place(
    x: &mut [f32],
    width: usize,
    scale: f32,
    shift: f32,
    mask: &[f32],
    offsets: &[usize],
    inner: usize,
) {
    if width == 0 {
        return;
    }
    let rows_per = (16384 / width).max(1);
    let len = x.len();
    chunks(x, rows_per * width, len, PAR_MIN, |c, rows| {
        for (i, row) in rows.chunks_mut(width).enumerate() {
            let m = mask_row(mask, offsets[c * rows_per + i], width, inner);
            masked_softmax_row_in_place(row, scale, shift, m);
        }
    });
}

/// [`masked_softmax_row`] of `row` in place.
fn masked_softmax_row_in_place(row: &mut [f32], scale: f32, shift: f32, mask: &[f32]) {
    #[inline(always)]
    fn body(row: &mut [f32], scale: f32, shift: f32, mask: &[f32]) {
        if let [m] = mask {
            let add = shift + m;
            row.iter_mut().for_each(|v| *v = *v * scale + add);
        } else {
            // A value per column (the caller slices `width` of them).
            for (v, &m) in row.iter_mut().zip(mask) {
                *v = *v * scale + shift + m;
            }
        }
        softmax_any(row)
    }
    best_simd!(body(row: &mut [f32], scale: f32, shift: f32, mask: &[f32]))
}

/// Softmax of one row, in place, compiled for each instruction set (`best_simd!`).
fn softmax_in_place(row: &mut [f32]) {
    best_simd!(softmax_any(row: &mut [f32]))
}

/// `row = softmax(src · scale + shift + mask)`, `mask` one value per column or one for all
/// (`row` is written whole before it is read), compiled for each instruction set.
fn masked_softmax_row(
    row: &mut [MaybeUninit<f32>],
    src: &[f32],
    scale: f32,
    shift: f32,
    mask: &[f32],
) {
    best_simd!(masked_softmax_any(
        row: &mut [MaybeUninit<f32>],
        src: &[f32],
        scale: f32,
        shift: f32,
        mask: &[f32]
    ))
}

#[inline(always)]
fn masked_softmax_any(
    row: &mut [MaybeUninit<f32>],
    src: &[f32],
    scale: f32,
    shift: f32,
    mask: &[f32],
) {
    let n = row.len().min(src.len());
    // (Rows and sources have the same length; anything past a short source is zero.)
    row[n..].iter_mut().for_each(|o| {
        o.write(0.0);
    });
    let row = &mut row[..n];
    if let [m] = mask {
        let add = shift + m;
        for (o, &v) in row.iter_mut().zip(src) {
            o.write(v * scale + add);
        }
    } else if mask.len() >= n {
        // A value per column (the caller slices `width` of them).
        for ((o, &v), &m) in row.iter_mut().zip(src).zip(&mask[..n]) {
            o.write(v * scale + shift + m);
        }
    } else {
        for (j, (o, &v)) in row.iter_mut().zip(src).enumerate() {
            o.write(v * scale + shift + mask.get(j).copied().unwrap_or(0.0));
        }
    }
    // SAFETY: each of the row's n elements was written just above.
    softmax_any(unsafe { assume_init(row) })
}

/// The row's maximum (eight running maxima, so it vectorises), exponentials 32 lanes at a
/// time, then the sum and the division.
#[inline(always)]
fn softmax_any(row: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let mut blocks = row.chunks_exact_mut(32);
    for b in &mut blocks {
        let b: &mut [f32; 32] = b.try_into().expect("chunks of 32");
        *b = exp_shifted_lanes(*b, max);
    }
    for v in blocks.into_remainder() {
        *v = exp_approx(*v - max);
    }
    let inv = 1.0 / lane_sum(row, |v| v);
    row.iter_mut().for_each(|v| *v *= inv);
}

/// The larger of a running maximum `m` (never NaN: it starts at −∞) and `v`, ignoring a
/// NaN `v` as `f32::max` does, in one compare-and-pick that vectorises to `maxps`.
#[inline(always)]
fn bigger(m: f32, v: f32) -> f32 {
    if v > m {
        v
    } else {
        m
    }
}

/// What a pooling takes of each window.
#[derive(Debug, Clone, Copy)]
enum Reduction {
    Max,
    /// The mean; over every kernel position with `include_pad`.
    Average {
        include_pad: bool,
    },
}

/// Geometry of a 2-D max or average pooling over `[planes, h, w]`.
#[derive(Debug, Clone, Copy)]
pub struct Pool2d {
    /// Images × channels.
    pub planes: usize,
    /// Input height and width.
    pub hw: [usize; 2],
    /// Window height and width.
    pub kernel: [usize; 2],
    /// Stride along height and width.
    pub stride: [usize; 2],
    /// Padding: top, left, bottom, right (padding never wins the maximum).
    pub pads: [usize; 4],
}

impl Pool2d {
    /// Output height and width; `None` when the window does not fit.
    pub fn out_hw(&self) -> Option<[usize; 2]> {
        let d = |i: usize, k: usize, s: usize, p: usize| {
            (i + p).checked_sub(k).map(|v| v / s.max(1) + 1)
        };
        Some([
            d(
                self.hw[0],
                self.kernel[0],
                self.stride[0],
                self.pads[0] + self.pads[2],
            )?,
            d(
                self.hw[1],
                self.kernel[1],
                self.stride[1],
                self.pads[1] + self.pads[3],
            )?,
        ])
    }

    /// Max over each window, planes split over threads.
    pub fn max(&self, x: &[f32]) -> Vec<f32> {
        self.each_plane(x, |src, dst| self.plane(src, dst, Reduction::Max))
    }

    /// Mean over each window: over its positions inside the input, or over all
    /// `kernel` positions with `include_pad` (ONNX's `count_include_pad`; without
    /// `ceil_mode` every window lies within the padding). Planes split over threads.
    pub fn average(&self, x: &[f32], include_pad: bool) -> Vec<f32> {
        let r = Reduction::Average { include_pad };
        self.each_plane(x, |src, dst| self.plane(src, dst, r))
    }

    /// The output of `plane(input plane, output plane)` for every plane of `x`.
    fn each_plane(&self, x: &[f32], plane: impl Fn(&[f32], &mut [f32]) + Sync + Send) -> Vec<f32> {
        let Some([oh, ow]) = self.out_hw() else {
            return Vec::new();
        };
        let [h, w] = self.hw;
        let mut out = vec![0f32; self.planes * oh * ow];
        if oh * ow == 0 {
            return out;
        }
        let work = out.len() * self.kernel[0] * self.kernel[1];
        chunks(&mut out, oh * ow, work, PAR_MIN, |i, dst| {
            plane(&x[i * h * w..(i + 1) * h * w], dst)
        });
        out
    }

    /// The input positions along axis `axis` (0 rows, 1 columns; `len` of them) that the
    /// window of output position `o` covers.
    fn window(&self, o: usize, axis: usize, len: usize) -> std::ops::Range<usize> {
        let x0 = (o * self.stride[axis]) as isize - self.pads[axis] as isize;
        let end = (x0 + self.kernel[axis] as isize).clamp(0, len as isize) as usize;
        (x0.max(0) as usize).min(end)..end
    }

    /// One plane: per output row, the reduction down the window's rows (whole input rows
    /// at a time, so it vectorises), then across each window's columns.
    fn plane(&self, src: &[f32], dst: &mut [f32], r: Reduction) {
        #[cfg(target_arch = "x86_64")]
        if crate::sgemm::available() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.plane_avx2(src, dst, r) };
        }
        self.plane_any(src, dst, r)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn plane_avx2(&self, src: &[f32], dst: &mut [f32], r: Reduction) {
        self.plane_any(src, dst, r)
    }

    #[inline(always)]
    fn plane_any(&self, src: &[f32], dst: &mut [f32], r: Reduction) {
        match r {
            // (Down the rows with `f32::max`: `bigger` there compiles to masked stores.)
            Reduction::Max => {
                let init = f32::NEG_INFINITY;
                self.rows(src, dst, init, f32::max, (bigger, true), |m, _| m)
            }
            Reduction::Average { include_pad } => {
                let all = self.kernel[0] * self.kernel[1];
                let add = |a: f32, v: f32| a + v;
                self.rows(src, dst, 0.0, add, (add, false), move |sum, count| {
                    let count = if include_pad { all } else { count };
                    if count == 0 {
                        0.0
                    } else {
                        sum / count as f32
                    }
                })
            }
        }
    }

    /// [`Pool2d::plane`] with its reduction spelled out: `down` folds each window row into
    /// the column totals (from `init`), `across` folds a window's columns (and says whether
    /// that is the maximum), and `finish` turns that into the output given the number of
    /// input positions in the window.
    #[inline(always)]
    fn rows(
        &self,
        src: &[f32],
        dst: &mut [f32],
        init: f32,
        down: impl Fn(f32, f32) -> f32,
        across: (impl Fn(f32, f32) -> f32 + Copy, bool),
        finish: impl Fn(f32, usize) -> f32 + Copy,
    ) {
        let [h, w] = self.hw;
        let ow = self.out_hw().map_or(1, |[_, ow]| ow).max(1);
        let mut column = vec![init; w];
        for (oy, out_row) in dst.chunks_mut(ow).enumerate() {
            let ys = self.window(oy, 0, h);
            let rows = ys.len();
            // The first row as it is (`down(init, v)` is v), the others folded in; three
            // rows (the usual window) in one pass.
            let row = |y: usize| &src[y * w..(y + 1) * w];
            match ys.start {
                y0 if rows == 3 => {
                    let (a, b, c) = (row(y0), row(y0 + 1), row(y0 + 2));
                    for (((o, &a), &b), &c) in column.iter_mut().zip(a).zip(b).zip(c) {
                        *o = down(down(a, b), c);
                    }
                }
                y0 if rows > 0 => {
                    column.copy_from_slice(row(y0));
                    for yy in ys.skip(1) {
                        for (c, &v) in column.iter_mut().zip(row(yy)) {
                            *c = down(*c, v);
                        }
                    }
                }
                _ => column.fill(init),
            }
            self.across(&column, out_row, init, across, move |v, cols| {
                finish(v, rows * cols)
            });
        }
    }

    /// One output row from the column totals of its window rows (`column`): each output
    /// is `finish(reduce of its window's columns, columns in it)`, with `reduce` folding
    /// from `init` (the maximum when `.1`). The outputs whose windows lie inside the row
    /// run without clamping, windows of 2 and 3 (the usual ones) unrolled, the 3-wide
    /// stride-2 maximum (CNN stems) in vector registers; the few at the edges take their
    /// part of the window.
    #[inline(always)]
    fn across(
        &self,
        column: &[f32],
        out_row: &mut [f32],
        init: f32,
        (reduce, max): (impl Fn(f32, f32) -> f32 + Copy, bool),
        finish: impl Fn(f32, usize) -> f32 + Copy,
    ) {
        let (w, ow) = (column.len(), out_row.len());
        let ([k, s], pad) = ([self.kernel[1], self.stride[1].max(1)], self.pads[1]);
        // Inner outputs: ox·s ≥ pad and ox·s − pad + k ≤ w.
        let first = pad.div_ceil(s).min(ow);
        let last = if w + pad >= k {
            ((w + pad - k) / s + 1).clamp(first, ow)
        } else {
            first
        };
        for ox in (0..first).chain(last..ow) {
            let xs = self.window(ox, 1, w);
            let n = xs.len();
            out_row[ox] = finish(column[xs].iter().fold(init, |m, &v| reduce(m, v)), n);
        }
        let inner = &mut out_row[first..last];
        if inner.is_empty() {
            return;
        }
        let n = inner.len();
        // Inner output i's window: columns (first + i)·s − pad .. + k.
        let src = &column[first * s - pad..][..(n - 1) * s + k];
        #[cfg(target_arch = "x86_64")]
        if max && k == 3 && s == 2 && crate::sgemm::available() {
            // SAFETY: the CPU has AVX2; `src` holds the 2n + 1 columns of n windows.
            return unsafe { max3_stride2(src, inner) };
        }
        #[inline(always)]
        fn fixed<const K: usize>(
            src: &[f32],
            s: usize,
            inner: &mut [f32],
            init: f32,
            reduce: impl Fn(f32, f32) -> f32,
            finish: impl Fn(f32, usize) -> f32,
        ) {
            for (i, o) in inner.iter_mut().enumerate() {
                if let Some(win) = src[i * s..].first_chunk::<K>() {
                    *o = finish(win.iter().fold(init, |m, &v| reduce(m, v)), K);
                }
            }
        }
        match k {
            2 => fixed::<2>(src, s, inner, init, reduce, finish),
            3 => fixed::<3>(src, s, inner, init, reduce, finish),
            _ => {
                for (i, o) in inner.iter_mut().enumerate() {
                    let v = src[i * s..i * s + k]
                        .iter()
                        .fold(init, |m, &v| reduce(m, v));
                    *o = finish(v, k);
                }
            }
        }
    }
}

/// `out[i]` = the maximum of `src[2i..2i + 3]` (`src` holds `2·out.len() + 1` values):
/// eight at a time, even and odd columns split by shuffles (a stride-2 window does not
/// vectorise on its own). With this and the first window row copied rather than folded,
/// ResNet-50's stem output pools in 0.26 ms instead of 0.37 on one thread (`pool_bench`).
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max3_stride2(src: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(src.len().saturating_sub(1) / 2);
    let mut i = 0;
    // Eight outputs read src[2i .. 2i + 18].
    while i + 8 <= n && 2 * i + 18 <= src.len() {
        // SAFETY: the loads stay within src (checked above), the store within out.
        unsafe {
            let p = src.as_ptr().add(2 * i);
            let (a, b) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
            let (c, d) = (_mm256_loadu_ps(p.add(2)), _mm256_loadu_ps(p.add(10)));
            // Lanes a0 a2 b0 b2 a4 a6 b4 b6: columns 2j, then 2j + 1, then 2j + 2.
            let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
            let next = _mm256_shuffle_ps::<0b10_00_10_00>(c, d);
            let m = _mm256_max_ps(_mm256_max_ps(even, odd), next);
            // Into output order: 64-bit lanes 0, 2, 1, 3.
            let m = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(m)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), m);
        }
        i += 8;
    }
    for (j, o) in out.iter_mut().enumerate().take(n).skip(i) {
        *o = bigger(bigger(src[2 * j], src[2 * j + 1]), src[2 * j + 2]);
    }
}

/// Writes `src[..n]` (`n` at most `src.len()`) to `dst` with fixed-size moves (a
/// variable-length copy of a few values would be a call to `memcpy`, which costs more
/// than the copy here).
///
/// # Safety
/// `dst..dst + n` must be valid for writes and not overlap `src`.
#[inline(always)]
pub(crate) unsafe fn write_prefix(dst: *mut f32, src: &[f32], n: usize) {
    #[inline(always)]
    unsafe fn fixed<const N: usize>(dst: *mut f32, src: &[f32]) {
        if let Some(s) = src.first_chunk::<N>() {
            // SAFETY: the caller's promise covers these N values.
            unsafe { dst.cast::<[f32; N]>().write_unaligned(*s) };
        }
    }
    let n = n.min(src.len());
    let mut i = 0;
    // SAFETY (all writes): within dst..dst + n, as the caller promises.
    unsafe {
        while i + 8 <= n {
            fixed::<8>(dst.add(i), &src[i..]);
            i += 8;
        }
        let (d, s) = (dst.add(i), &src[i..]);
        match n - i {
            1 => fixed::<1>(d, s),
            2 => fixed::<2>(d, s),
            3 => fixed::<3>(d, s),
            4 => fixed::<4>(d, s),
            5 => fixed::<5>(d, s),
            6 => fixed::<6>(d, s),
            7 => fixed::<7>(d, s),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_the_definition_with_and_without_bias_and_gelu() {
        let (rows, k, n) = (37, 29, 21);
        let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 3) % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let packed = crate::sgemm::pack_panels(&w, k, n);
        let mut layouts = vec![Weight::Rows(&w)];
        if crate::sgemm::available() {
            layouts.push(Weight::Panels(&packed));
        }
        for (bias, layout, gelu) in [None, Some(b.as_slice())]
            .into_iter()
            .flat_map(|b| layouts.iter().map(move |l| (b, *l)))
            .flat_map(|(b, l)| [(b, l, false), (b, l, true)])
        {
            let got = linear(&x, layout, bias, [k, n], gelu);
            for r in 0..rows {
                for j in 0..n {
                    let mut want = bias.map_or(0.0, |b| b[j])
                        + (0..k).map(|q| x[r * k + q] * w[q * n + j]).sum::<f32>();
                    if gelu {
                        want = gelu_approx(want);
                    }
                    assert_eq!(got[r * n + j], want, "({r}, {j}) gelu {gelu}");
                }
            }
        }
    }

    #[test]
    fn large_inputs_split_over_threads_give_the_same_values() {
        // Above PAR_MIN the kernels run in parallel chunks; each value must be what the
        // element-wise definition gives.
        let n = 4 * PAR_MIN + 123;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 37) % 1001) as f32 / 100.0 - 5.0)
            .collect();
        let g = gelu(&x);
        assert!(g.iter().zip(&x).all(|(a, &v)| *a == gelu_approx(v)));
        let width = 1000;
        let rows = &x[..(n / width) * width];
        let p = softmax_rows(rows, width, false);
        for (r, row) in p.chunks(width).enumerate() {
            let mut one = rows[r * width..(r + 1) * width].to_vec();
            softmax_in_place(&mut one);
            assert_eq!(row, one.as_slice(), "row {r}");
        }
        let a = channel_affine(&x, 1, n, &[2.0], &[-1.0], true);
        assert!(a
            .iter()
            .zip(&x)
            .all(|(a, v)| *a == (v * 2.0 - 1.0).max(0.0)));
    }

    #[test]
    fn batched_matmul_multiplies_each_entry() {
        let (batch, m, k, n) = (3, 5, 4, 18);
        let a: Vec<f32> = (0..batch * m * k)
            .map(|i| ((i * 7) % 5) as f32 - 2.0)
            .collect();
        let b: Vec<f32> = (0..batch * k * n)
            .map(|i| ((i * 3) % 7) as f32 - 3.0)
            .collect();
        let c = batched_matmul(&a, &b, batch, [m, k, n]);
        for e in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k)
                        .map(|q| a[e * m * k + i * k + q] * b[e * k * n + q * n + j])
                        .sum();
                    assert_eq!(c[e * m * n + i * n + j], want);
                }
            }
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_log_softmax_is_its_log() {
        let x: Vec<f32> = (0..3 * 5).map(|i| (i as f32 * 0.7).sin() * 30.0).collect();
        let p = softmax_rows(&x, 5, false);
        let lp = softmax_rows(&x, 5, true);
        for r in 0..3 {
            let row = &p[r * 5..r * 5 + 5];
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            // Order is kept: the largest input has the largest probability.
            let arg = |v: &[f32]| (0..5).max_by(|&a, &b| v[a].total_cmp(&v[b]));
            assert_eq!(arg(row), arg(&x[r * 5..r * 5 + 5]));
            for j in 0..5 {
                assert!((lp[r * 5 + j] - row[j].ln()).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn layer_norm_rows_have_zero_mean_unit_variance_before_scale_and_bias() {
        let d = 7;
        let x: Vec<f32> = (0..3 * d)
            .map(|i| ((i * 5) % 9) as f32 * 1.5 - 3.0)
            .collect();
        let ones = vec![1.0; d];
        let y = layer_norm(&x, None, d, &ones, None, 1e-6);
        for row in y.chunks(d) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
                "{mean} {var}"
            );
        }
        let scale: Vec<f32> = (0..d).map(|j| j as f32).collect();
        let bias: Vec<f32> = (0..d).map(|j| -(j as f32)).collect();
        let z = layer_norm(&x, None, d, &scale, Some(&bias), 1e-6);
        // With a residual: the same as normalising the sum.
        let half: Vec<f32> = x.iter().map(|v| v / 2.0).collect();
        assert_eq!(
            layer_norm(&half, Some(&half), d, &scale, Some(&bias), 1e-6),
            z
        );
        for (k, (&zv, &yv)) in z.iter().zip(&y).enumerate() {
            let j = k % d;
            assert!((zv - (yv * scale[j] + bias[j])).abs() < 1e-5);
        }
    }

    #[test]
    fn tiled_transposes_match_the_definition() {
        let cases: [(&[usize], &[usize]); 5] = [
            (&[13, 9], &[1, 0]),
            (&[2, 11, 3, 10], &[0, 2, 3, 1]),
            (&[3, 17, 5], &[2, 0, 1]),
            (&[4, 3, 9, 2], &[3, 1, 0, 2]),
            (&[5, 7, 6], &[1, 2, 0]),
        ];
        for (dims, perm) in cases {
            let n: usize = dims.iter().product();
            let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let got = transpose_moving_last(&x, dims, perm).expect("the last axis moves");
            let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
            // Naive: walk the output in order, computing each element's input index.
            let mut want = Vec::with_capacity(n);
            for flat in 0..n {
                let (mut rem, mut idx) = (flat, vec![0usize; dims.len()]);
                for i in (0..dims.len()).rev() {
                    idx[perm[i]] = rem % out_dims[i];
                    rem /= out_dims[i];
                }
                let at = idx.iter().zip(dims).fold(0, |a, (&i, &d)| a * d + i);
                want.push(x[at]);
            }
            assert_eq!(got, want, "dims {dims:?} perm {perm:?}");
        }
        assert!(transpose_moving_last(&[0.0; 6], &[2, 3], &[0, 1]).is_none());
    }

    #[test]
    fn exp_and_gelu_approximations_are_accurate_to_f32_precision() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let (got, want) = (exp_approx(x), (x as f64).exp());
            assert!(
                ((got as f64 - want) / want).abs() < 3e-7,
                "exp({x}) = {got}, not {want}"
            );
        }
        // Reference GELU in f64: Φ(x) = ½·erfc(−x/√2), with candle's f64 erfc (accurate in
        // the far negative tail, where 1 + erf would cancel).
        for i in -1000..=1000 {
            let x = i as f32 / 100.0;
            let erfc = candle_core::cpu::erf::erfc_f64(-(x as f64) / std::f64::consts::SQRT_2);
            let want = 0.5 * x as f64 * erfc;
            let got = gelu_approx(x) as f64;
            // f32 rounding of x² bounds the relative error in the tails near 1e-6.
            assert!(
                (got - want).abs() <= 1e-5 * want.abs() + 1e-12,
                "gelu({x}) = {got}, not {want}"
            );
        }
    }

    #[test]
    fn channel_affine_scales_each_channel_and_clamps_with_relu() {
        // [n=2, c=2, plane=3]
        let x: Vec<f32> = (0..12).map(|v| v as f32 - 6.0).collect();
        let got = channel_affine(&x, 2, 3, &[2.0, -1.0], &[1.0, 0.5], false);
        for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
            let c = (i / 3) % 2;
            assert_eq!(g, v * [2.0, -1.0][c] + [1.0, 0.5][c]);
        }
        let relu = channel_affine(&x, 2, 3, &[3.0], &[-1.0], true);
        assert_eq!(
            relu,
            x.iter()
                .map(|v| (v * 3.0 - 1.0).max(0.0))
                .collect::<Vec<_>>()
        );
    }

    /// A pooling geometry: hw, kernel, stride, pads [t, l, b, r].
    type Geometry = ([usize; 2], [usize; 2], [usize; 2], [usize; 4]);

    const POOLS: [Geometry; 6] = [
        ([112, 112], [3, 3], [2, 2], [1, 1, 1, 1]),
        ([56, 56], [2, 2], [2, 2], [0, 0, 0, 0]),
        ([9, 11], [3, 2], [1, 3], [0, 2, 1, 0]),
        ([7, 5], [1, 1], [2, 2], [0, 0, 0, 0]),
        ([6, 13], [4, 5], [3, 2], [2, 3, 2, 4]),
        ([5, 4], [2, 4], [1, 1], [0, 0, 0, 0]),
    ];

    /// Each case's pool over 3 planes, its input (one NaN in the second plane), and for
    /// every output (in order) the input values its window covers.
    fn pool_cases() -> Vec<(Pool2d, Vec<f32>, Vec<Vec<f32>>)> {
        POOLS
            .iter()
            .map(|&(hw, kernel, stride, pads)| {
                let p = Pool2d {
                    planes: 3,
                    hw,
                    kernel,
                    stride,
                    pads,
                };
                let [oh, ow] = p.out_hw().unwrap();
                let plane = hw[0] * hw[1];
                let mut x: Vec<f32> = (0..3 * plane)
                    .map(|i| ((i * 37) % 101) as f32 - 60.0)
                    .collect();
                x[plane + 7] = f32::NAN;
                let windows = (0..3 * oh * ow)
                    .map(|j| {
                        let (c, oy, ox) = (j / (oh * ow), j / ow % oh, j % ow);
                        let mut values = Vec::new();
                        for ky in 0..kernel[0] {
                            for kx in 0..kernel[1] {
                                let y = (oy * stride[0] + ky) as isize - pads[0] as isize;
                                let xx = (ox * stride[1] + kx) as isize - pads[1] as isize;
                                if (0..hw[0] as isize).contains(&y)
                                    && (0..hw[1] as isize).contains(&xx)
                                {
                                    values.push(x[c * plane + y as usize * hw[1] + xx as usize]);
                                }
                            }
                        }
                        values
                    })
                    .collect();
                (p, x, windows)
            })
            .collect()
    }

    #[test]
    fn max_pool_matches_the_definition() {
        for (p, x, windows) in pool_cases() {
            let got = p.max(&x);
            assert_eq!(got.len(), windows.len());
            for (j, (g, w)) in got.iter().zip(&windows).enumerate() {
                // The NaN is passed over, as f32::max does.
                let want = w.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let case = (p.hw, p.kernel, p.stride, p.pads);
                assert_eq!(*g, want, "{case:?} at {j}");
            }
        }
    }

    #[test]
    fn average_pool_counts_pads_only_when_asked() {
        for (p, x, windows) in pool_cases() {
            for include_pad in [false, true] {
                let got = p.average(&x, include_pad);
                assert_eq!(got.len(), windows.len());
                for (j, (g, w)) in got.iter().zip(&windows).enumerate() {
                    let count = if include_pad {
                        p.kernel[0] * p.kernel[1]
                    } else {
                        w.len()
                    };
                    // A window wholly in the padding averages nothing: 0, as pool.rs gives.
                    let want = if count == 0 {
                        0.0
                    } else {
                        w.iter().sum::<f32>() / count as f32
                    };
                    // (A window holding the NaN averages to NaN.)
                    assert!(
                        (g - want).abs() <= 1e-4 || (g.is_nan() && want.is_nan()),
                        "{:?} {include_pad} at {j}: {g} vs {want}",
                        (p.hw, p.kernel, p.stride, p.pads)
                    );
                }
            }
        }
    }

    #[test]
    fn max_pool_ignores_padding_even_for_negative_inputs() {
        // One 3×3 plane of negatives, 2×2 window, stride 2, one row/column of padding.
        let p = Pool2d {
            planes: 1,
            hw: [3, 3],
            kernel: [2, 2],
            stride: [2, 2],
            pads: [1, 1, 0, 0],
        };
        let x: Vec<f32> = (1..=9).map(|v| -(v as f32)).collect();
        assert_eq!(p.out_hw(), Some([2, 2]));
        assert_eq!(p.max(&x), vec![-1.0, -2.0, -4.0, -5.0]);
    }
}
