//! 2-D convolution and its two gradients: NCHW activations, OIHW weights,
//! cross-correlation as in PyTorch.
//!
//! Stride-1 convolutions whose output rows fill most of a vector run directly
//! on AVX-512 or AVX2 (`conv_direct`, chosen at run time): one zero-padded
//! copy of each image, register tiles of output channels × output vectors. The
//! rest (strides, 1×1 kernels, narrow outputs, CPUs without AVX2) run by
//! im2col + [`sgemm`], as follows.
//!
//! The column matrix of one image is (C·kh·kw) × (Ho·Wo), row `(c, i, j)`
//! holding the input pixels that kernel tap `(i, j)` of channel `c` meets at
//! each output position (zero where it falls on the padding). Then
//!
//! - forward:      `out[n] = W · col(x[n])`, W viewed as O × (C·kh·kw);
//! - input grad:   `dx[n] = col2im(Wᵀ · g[n])`;
//! - weight grad:  `dW = Σₙ g[n] · col(x[n])ᵀ`, one product per chunk of
//!   images (their column matrices side by side, K = images · Ho·Wo).
//!
//! The column matrices live in a caller-provided scratch buffer of
//! [`im2col_len`] elements (the memory plan sizes it; nothing is allocated per
//! call), which holds up to [`IMAGES_PER_CHUNK`] images at a time; the images
//! of a chunk are processed in parallel. (The forward and input-gradient
//! passes of a 1×1 kernel with stride 1 and no padding use the image as its
//! own column matrix.) Outputs are overwritten, never accumulated into.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::conv_direct::{self as direct, Isa};
use crate::error::Error;
use crate::gemm::sgemm;

/// Stand-in for the direct convolution's instruction set where there is none.
#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy, Debug)]
enum Isa {}

#[cfg(not(target_arch = "x86_64"))]
impl Isa {
    fn detect() -> Option<Isa> {
        None
    }
}

/// Images whose column matrices the scratch buffer holds at once: enough to
/// keep every core busy on small images, few enough to bound the scratch.
pub const IMAGES_PER_CHUNK: usize = 16;

/// The sizes of one convolution: input `x` is `n × c × h × w`, weight is
/// `o × c × kh × kw`, output is `n × o × oh × ow` (see [`Conv2d::out_hw`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conv2d {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub o: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// `(vertical, horizontal)` stride, both > 0. (All sizes but `n` must be
    /// positive; `n == 0` is an empty batch.)
    pub stride: (usize, usize),
    /// `(vertical, horizontal)` zero padding on each side.
    pub padding: (usize, usize),
}

impl Conv2d {
    /// Output `(height, width)`: `(h + 2 ph - kh) / sh + 1`, and likewise for
    /// the width.
    pub fn out_hw(&self) -> (usize, usize) {
        let (sh, sw) = self.stride;
        let (ph, pw) = self.padding;
        // (0, 0) for an invalid convolution, which validate() then rejects.
        let side = |size: usize, pad: usize, k: usize, s: usize| {
            (size + 2 * pad)
                .checked_sub(k)
                .and_then(|span| span.checked_div(s))
                .map_or(0, |q| q + 1)
        };
        (side(self.h, ph, self.kh, sh), side(self.w, pw, self.kw, sw))
    }

    /// Elements of `x` (and of the input gradient).
    pub fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    /// Elements of the weight (and of its gradient).
    pub fn weight_len(&self) -> usize {
        self.o * self.c * self.kh * self.kw
    }

    /// Elements of the output (and of its gradient).
    pub fn out_len(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.n * self.o * oh * ow
    }

    /// Whether the column matrix of an image is the image itself.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == (1, 1) && self.padding == (0, 0)
    }

    /// Rows and columns of one image's column matrix.
    fn col_dims(&self) -> (usize, usize) {
        let (oh, ow) = self.out_hw();
        (self.c * self.kh * self.kw, oh * ow)
    }

    fn validate(
        &self,
        operands: &[(&str, usize, usize)],
        scratch: usize,
        isa: Option<Isa>,
    ) -> Result<(), Error> {
        let (sh, sw) = self.stride;
        let (ph, pw) = self.padding;
        if [sh, sw, self.kh, self.kw, self.c, self.o, self.h, self.w].contains(&0) {
            return Err(Error::layout(format!("conv2d: invalid sizes {self:?}")));
        }
        if self.h + 2 * ph < self.kh || self.w + 2 * pw < self.kw {
            return Err(Error::layout(format!(
                "conv2d: the kernel does not fit the padded input in {self:?}"
            )));
        }
        for &(what, got, want) in operands {
            if got != want {
                return Err(Error::layout(format!(
                    "conv2d: {what} has {got} elements, expected {want} for {self:?}"
                )));
            }
        }
        let need = scratch_len(self, isa);
        if scratch < need {
            return Err(Error::layout(format!(
                "conv2d: scratch has {scratch} elements, expected im2col_len = {need}"
            )));
        }
        Ok(())
    }
}

/// The scratch elements any of the three conv functions needs for `p` on this
/// CPU: for `min(n, IMAGES_PER_CHUNK)` images, their column matrices and (for
/// the weight gradient) their output gradients regrouped by channel; or what
/// the direct convolution needs (padded images, packed weights, partial sums),
/// where that is more.
pub fn im2col_len(p: &Conv2d) -> usize {
    scratch_len(p, Isa::detect())
}

fn scratch_len(p: &Conv2d, isa: Option<Isa>) -> usize {
    let (rows, cols) = p.col_dims();
    let gemm = p.n.min(IMAGES_PER_CHUNK) * (rows + p.o) * cols;
    gemm.max(direct_len(p, isa))
}

#[cfg(target_arch = "x86_64")]
fn direct_len(p: &Conv2d, isa: Option<Isa>) -> usize {
    let Some(isa) = isa else { return 0 };
    let images = p.n.min(IMAGES_PER_CHUNK);
    let forward = direct::plan(p, isa).map_or(0, |pl| {
        direct::forward_len(p, &pl, images).max(direct::weight_grad_len(p, &pl))
    });
    let input_grad = transposed(p)
        .and_then(|q| Some((q, direct::plan(&q, isa)?)))
        .map_or(0, |(q, pl)| direct::forward_len(&q, &pl, images));
    forward.max(input_grad)
}

#[cfg(not(target_arch = "x86_64"))]
fn direct_len(_: &Conv2d, _: Option<Isa>) -> usize {
    0
}

/// The stride-1 convolution whose forward pass is `p`'s input gradient: the
/// output gradient (o channels, oh × ow) padded by `k - 1 - pad`, with weights
/// flipped and in and out channels swapped. None for strides, and for padding
/// wider than the kernel (then the gradient crops, which this cannot express).
#[cfg(target_arch = "x86_64")]
fn transposed(p: &Conv2d) -> Option<Conv2d> {
    let (oh, ow) = p.out_hw();
    let (ph, pw) = p.padding;
    if p.stride != (1, 1) || ph >= p.kh || pw >= p.kw {
        return None;
    }
    Some(Conv2d {
        n: p.n,
        c: p.o,
        h: oh,
        w: ow,
        o: p.c,
        kh: p.kh,
        kw: p.kw,
        stride: (1, 1),
        padding: (p.kh - 1 - ph, p.kw - 1 - pw),
    })
}

/// `out = conv2d(x, weight)` (cross-correlation), overwriting `out`.
///
/// ```
/// use ferrograd_runtime::conv::{conv2d_forward, im2col_len, Conv2d};
/// // One 3×3 image, one 2×2 kernel of ones: sums of 2×2 windows.
/// let p = Conv2d { n: 1, c: 1, h: 3, w: 3, o: 1, kh: 2, kw: 2, stride: (1, 1), padding: (0, 0) };
/// let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
/// let mut out = vec![0.0; p.out_len()];
/// let mut scratch = vec![0.0; im2col_len(&p)];
/// conv2d_forward(&p, &x, &[1.0; 4], &mut out, &mut scratch).unwrap();
/// assert_eq!(out, [12.0, 16.0, 24.0, 28.0]);
/// ```
pub fn conv2d_forward(
    p: &Conv2d,
    x: &[f32],
    weight: &[f32],
    out: &mut [f32],
    scratch: &mut [f32],
) -> Result<(), Error> {
    forward_on(p, x, weight, out, scratch, Isa::detect())
}

fn forward_on(
    p: &Conv2d,
    x: &[f32],
    weight: &[f32],
    out: &mut [f32],
    scratch: &mut [f32],
    isa: Option<Isa>,
) -> Result<(), Error> {
    p.validate(
        &[
            ("x", x.len(), p.x_len()),
            ("weight", weight.len(), p.weight_len()),
            ("out", out.len(), p.out_len()),
        ],
        scratch.len(),
        isa,
    )?;
    #[cfg(target_arch = "x86_64")]
    if let Some(pl) = isa.and_then(|isa| direct::plan(p, isa)) {
        let taps = p.c * p.kh * p.kw;
        let (packed, planes) = scratch.split_at_mut(direct::forward_len(p, &pl, 0));
        let at =
            |o: usize, c: usize, i: usize, j: usize| weight[o * taps + (c * p.kh + i) * p.kw + j];
        direct::pack_weights(p, pl.isa, at, packed);
        direct::forward(p, &pl, x, packed, out, planes);
        return Ok(());
    }
    let (rows, cols) = p.col_dims();
    let (x_img, out_img) = (p.c * p.h * p.w, p.o * cols);
    let one = |x: &[f32], out: &mut [f32], col: &mut [f32]| -> Result<(), Error> {
        let col: &[f32] = if p.is_pointwise() {
            x
        } else {
            im2col(p, x, col);
            col
        };
        sgemm(
            p.o,
            cols,
            rows,
            weight,
            (rows as isize, 1),
            col,
            (cols as isize, 1),
            out,
            (cols as isize, 1),
            false,
        )
    };
    for_chunks(p, x_img, out_img, rows * cols, x, out, scratch, one)
}

/// `dx`, the gradient of `conv2d(x, weight)` with respect to `x` given the
/// output gradient `g`; `dx` (n × c × h × w) is overwritten.
pub fn conv2d_input_grad(
    p: &Conv2d,
    g: &[f32],
    weight: &[f32],
    dx: &mut [f32],
    scratch: &mut [f32],
) -> Result<(), Error> {
    input_grad_on(p, g, weight, dx, scratch, Isa::detect())
}

fn input_grad_on(
    p: &Conv2d,
    g: &[f32],
    weight: &[f32],
    dx: &mut [f32],
    scratch: &mut [f32],
    isa: Option<Isa>,
) -> Result<(), Error> {
    p.validate(
        &[
            ("g", g.len(), p.out_len()),
            ("weight", weight.len(), p.weight_len()),
            ("dx", dx.len(), p.x_len()),
        ],
        scratch.len(),
        isa,
    )?;
    #[cfg(target_arch = "x86_64")]
    if let Some((q, pl)) = transposed(p).and_then(|q| Some((q, direct::plan(&q, isa?)?))) {
        // dx = conv2d(g padded, weight flipped, in/out channels swapped).
        let (packed, planes) = scratch.split_at_mut(direct::forward_len(&q, &pl, 0));
        let at = |c: usize, o: usize, i: usize, j: usize| {
            weight[((o * p.c + c) * p.kh + p.kh - 1 - i) * p.kw + p.kw - 1 - j]
        };
        direct::pack_weights(&q, pl.isa, at, packed);
        direct::forward(&q, &pl, g, packed, dx, planes);
        return Ok(());
    }
    let (rows, cols) = p.col_dims();
    let (g_img, dx_img) = (p.o * cols, p.c * p.h * p.w);
    // Wᵀ is W (O × rows, row-major) with swapped strides.
    let w_t = (1, rows as isize);
    let one = |g: &[f32], dx: &mut [f32], col: &mut [f32]| -> Result<(), Error> {
        if p.is_pointwise() {
            return sgemm(
                rows,
                cols,
                p.o,
                weight,
                w_t,
                g,
                (cols as isize, 1),
                dx,
                (cols as isize, 1),
                false,
            );
        }
        sgemm(
            rows,
            cols,
            p.o,
            weight,
            w_t,
            g,
            (cols as isize, 1),
            col,
            (cols as isize, 1),
            false,
        )?;
        col2im(p, col, dx);
        Ok(())
    };
    for_chunks(p, g_img, dx_img, rows * cols, g, dx, scratch, one)
}

/// `dw`, the gradient of `conv2d(x, weight)` with respect to the weight given
/// the output gradient `g`; `dw` (o × c × kh × kw) is overwritten.
pub fn conv2d_weight_grad(
    p: &Conv2d,
    x: &[f32],
    g: &[f32],
    dw: &mut [f32],
    scratch: &mut [f32],
) -> Result<(), Error> {
    weight_grad_on(p, x, g, dw, scratch, Isa::detect())
}

fn weight_grad_on(
    p: &Conv2d,
    x: &[f32],
    g: &[f32],
    dw: &mut [f32],
    scratch: &mut [f32],
    isa: Option<Isa>,
) -> Result<(), Error> {
    p.validate(
        &[
            ("x", x.len(), p.x_len()),
            ("g", g.len(), p.out_len()),
            ("dw", dw.len(), p.weight_len()),
        ],
        scratch.len(),
        isa,
    )?;
    #[cfg(target_arch = "x86_64")]
    if let Some(pl) = isa.and_then(|isa| direct::plan(p, isa)) {
        direct::weight_grad(p, &pl, x, g, dw, scratch);
        return Ok(());
    }
    let (rows, cols) = p.col_dims();
    let (x_img, g_img, plane) = (p.c * p.h * p.w, p.o * cols, p.h * p.w);
    if p.n == 0 {
        dw.fill(0.0);
        return Ok(());
    }
    let chunk = p.n.min(IMAGES_PER_CHUNK);
    for first in (0..p.n).step_by(chunk) {
        let count = chunk.min(p.n - first);
        let xs = &x[first * x_img..(first + count) * x_img];
        let gs = &g[first * g_img..(first + count) * g_img];
        // The chunk's images side by side: col (rows × count·cols), row
        // (c, i, j) holding every image's (oy, ox) in turn, and g regrouped
        // as gt (o × count·cols). Then one product covers the chunk.
        let k = count * cols;
        let (col, rest) = scratch.split_at_mut(rows * k);
        let gt = &mut rest[..p.o * k];
        col.par_chunks_exact_mut(k)
            .enumerate()
            .for_each(|(r, row)| {
                let (c, i, j) = (r / (p.kh * p.kw), r / p.kw % p.kh, r % p.kw);
                for (img, dst) in row.chunks_exact_mut(cols).enumerate() {
                    im2col_row(p, &xs[img * x_img + c * plane..][..plane], i, j, dst);
                }
            });
        gt.par_chunks_exact_mut(k).enumerate().for_each(|(o, row)| {
            for (img, dst) in row.chunks_exact_mut(cols).enumerate() {
                dst.copy_from_slice(&gs[img * g_img + o * cols..][..cols]);
            }
        });
        // dW (+)= gt (o × k) · colᵀ (k × rows); the chunks add up in order.
        let ki = k as isize;
        sgemm(
            p.o,
            rows,
            k,
            gt,
            (ki, 1),
            col,
            (1, ki),
            dw,
            (rows as isize, 1),
            first > 0,
        )?;
    }
    Ok(())
}

/// Runs `one(input image, output image, column slot)` over every image, in
/// chunks of [`IMAGES_PER_CHUNK`] whose images run in parallel.
#[allow(clippy::too_many_arguments)]
fn for_chunks<F>(
    p: &Conv2d,
    in_img: usize,
    out_img: usize,
    col_len: usize,
    input: &[f32],
    output: &mut [f32],
    scratch: &mut [f32],
    one: F,
) -> Result<(), Error>
where
    F: Fn(&[f32], &mut [f32], &mut [f32]) -> Result<(), Error> + Sync,
{
    if p.n == 0 || out_img == 0 {
        return Ok(());
    }
    let chunk = p.n.min(IMAGES_PER_CHUNK);
    if p.is_pointwise() || col_len == 0 {
        return output
            .par_chunks_exact_mut(out_img)
            .zip(input.par_chunks_exact(in_img.max(1)))
            .try_for_each(|(out, inp)| one(inp, out, &mut []));
    }
    let slots = &mut scratch[..chunk * col_len];
    for (ins, outs) in input
        .chunks(chunk * in_img)
        .zip(output.chunks_mut(chunk * out_img))
    {
        outs.par_chunks_exact_mut(out_img)
            .zip(ins.par_chunks_exact(in_img))
            .zip(slots.par_chunks_exact_mut(col_len))
            .try_for_each(|((out, inp), col)| one(inp, out, col))?;
    }
    Ok(())
}

/// The rows `(c, i, j)` × columns `(oy, ox)` of one image's column matrix.
fn im2col(p: &Conv2d, x: &[f32], col: &mut [f32]) {
    let (oh, ow) = p.out_hw();
    let mut rows = col.chunks_exact_mut(oh * ow);
    for plane in x.chunks_exact(p.h * p.w) {
        for i in 0..p.kh {
            for j in 0..p.kw {
                let dst = rows.next().expect("col has c * kh * kw rows");
                im2col_row(p, plane, i, j, dst);
            }
        }
    }
}

/// Row `(c, i, j)` of a column matrix: the input pixels of `plane` (channel
/// `c` of one image, h × w) that kernel tap `(i, j)` meets at each output
/// position `(oy, ox)`, and zeros where it meets the padding.
fn im2col_row(p: &Conv2d, plane: &[f32], i: usize, j: usize, dst: &mut [f32]) {
    let (sh, sw) = p.stride;
    let (ph, pw) = p.padding;
    let (_, ow) = p.out_hw();
    let (lo, hi) = valid_range(ow, sw, j, pw, p.w);
    for (oy, d) in dst.chunks_exact_mut(ow).enumerate() {
        let iy = (oy * sh + i).wrapping_sub(ph);
        if iy >= p.h {
            d.fill(0.0);
            continue;
        }
        let src = &plane[iy * p.w..(iy + 1) * p.w];
        d[..lo].fill(0.0);
        d[hi..].fill(0.0);
        let start = lo * sw + j - pw;
        if sw == 1 {
            d[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
        } else {
            for (d, s) in d[lo..hi].iter_mut().zip(src[start..].iter().step_by(sw)) {
                *d = *s;
            }
        }
    }
}

/// Adds one image's column matrix back onto the pixels it came from (the
/// transpose of [`im2col`]); `dx` is zeroed first.
fn col2im(p: &Conv2d, col: &[f32], dx: &mut [f32]) {
    let (oh, ow) = p.out_hw();
    let (sh, sw) = p.stride;
    let (ph, pw) = p.padding;
    dx.fill(0.0);
    let mut rows = col.chunks_exact(oh * ow);
    for plane in dx.chunks_exact_mut(p.h * p.w) {
        for i in 0..p.kh {
            for j in 0..p.kw {
                let src = rows.next().expect("col has c * kh * kw rows");
                let (lo, hi) = valid_range(ow, sw, j, pw, p.w);
                for (oy, s) in src.chunks_exact(ow).enumerate() {
                    let iy = (oy * sh + i).wrapping_sub(ph);
                    if iy >= p.h || lo >= hi {
                        continue;
                    }
                    let d = &mut plane[iy * p.w..(iy + 1) * p.w];
                    let start = lo * sw + j - pw;
                    if sw == 1 {
                        d[start..start + (hi - lo)]
                            .iter_mut()
                            .zip(&s[lo..hi])
                            .for_each(|(d, s)| *d += s);
                    } else {
                        for (d, s) in d[start..].iter_mut().step_by(sw).zip(&s[lo..hi]) {
                            *d += s;
                        }
                    }
                }
            }
        }
    }
}

/// The output columns `[lo, hi)` whose input column `ox * sw + j - pw` lies in
/// `[0, w)`; `lo <= hi` always.
fn valid_range(ow: usize, sw: usize, j: usize, pw: usize, w: usize) -> (usize, usize) {
    // ox * sw + j >= pw  <=>  ox >= ceil((pw - j) / sw)
    let lo = pw.saturating_sub(j).div_ceil(sw).min(ow);
    // ox * sw + j - pw < w  <=>  ox * sw < w + pw - j
    let hi = if w + pw > j {
        (w + pw - j).div_ceil(sw).min(ow)
    } else {
        0
    };
    (lo, hi.max(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Index of input pixel `(y, x)` met by output `(oy, ox)` at tap `(i, j)`.
    fn tap(p: &Conv2d, oy: usize, ox: usize, i: usize, j: usize) -> Option<(usize, usize)> {
        let y = (oy * p.stride.0 + i).checked_sub(p.padding.0)?;
        let x = (ox * p.stride.1 + j).checked_sub(p.padding.1)?;
        (y < p.h && x < p.w).then_some((y, x))
    }

    /// The three ops by their definition, in f64.
    fn naive(p: &Conv2d, x: &[f32], w: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (oh, ow) = p.out_hw();
        let mut out = vec![0.0f64; p.out_len()];
        let mut dx = vec![0.0f64; p.x_len()];
        let mut dw = vec![0.0f64; p.weight_len()];
        for n in 0..p.n {
            for o in 0..p.o {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let oi = ((n * p.o + o) * oh + oy) * ow + ox;
                        for c in 0..p.c {
                            for i in 0..p.kh {
                                for j in 0..p.kw {
                                    if let Some((y, xx)) = tap(p, oy, ox, i, j) {
                                        let xi = ((n * p.c + c) * p.h + y) * p.w + xx;
                                        let wi = ((o * p.c + c) * p.kh + i) * p.kw + j;
                                        out[oi] += x[xi] as f64 * w[wi] as f64;
                                        dx[xi] += g[oi] as f64 * w[wi] as f64;
                                        dw[wi] += g[oi] as f64 * x[xi] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
        (f(out), f(dx), f(dw))
    }

    fn assert_close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// The instruction sets to test on this CPU: im2col + GEMM always, and
    /// each direct variant the CPU has.
    fn isas() -> Vec<Option<Isa>> {
        let mut all = vec![None];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                all.push(Some(Isa::Avx2));
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                all.push(Some(Isa::Avx512));
            }
        }
        all
    }

    fn check(p: &Conv2d, isa: Option<Isa>) {
        let x = fill(p.x_len(), 1);
        let wt = fill(p.weight_len(), 2);
        let g = fill(p.out_len(), 3);
        let (want_out, want_dx, want_dw) = naive(p, &x, &wt, &g);
        let mut scratch = vec![f32::NAN; scratch_len(p, isa)];
        let mut out = vec![f32::NAN; p.out_len()];
        let mut dx = vec![f32::NAN; p.x_len()];
        let mut dw = vec![f32::NAN; p.weight_len()];
        forward_on(p, &x, &wt, &mut out, &mut scratch, isa).unwrap();
        input_grad_on(p, &g, &wt, &mut dx, &mut scratch, isa).unwrap();
        weight_grad_on(p, &x, &g, &mut dw, &mut scratch, isa).unwrap();
        assert_close(&format!("{p:?} {isa:?} out"), &out, &want_out);
        assert_close(&format!("{p:?} {isa:?} dx"), &dx, &want_dx);
        assert_close(&format!("{p:?} {isa:?} dw"), &dw, &want_dw);
    }

    fn conv(
        (n, c, h, w, o): (usize, usize, usize, usize, usize),
        (kh, kw): (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Conv2d {
        Conv2d {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            stride,
            padding,
        }
    }

    #[test]
    fn matches_the_definition() {
        let cases = [
            conv((2, 1, 5, 5, 1), (3, 3), (1, 1), (0, 0)),
            conv((3, 2, 7, 6, 4), (3, 3), (1, 1), (1, 1)),
            conv((2, 3, 9, 8, 5), (3, 2), (2, 3), (1, 2)),
            conv((1, 2, 4, 4, 3), (5, 5), (1, 1), (2, 2)), // kernel larger than input
            conv((2, 3, 6, 5, 4), (1, 1), (1, 1), (0, 0)), // pointwise: no scratch
            conv((2, 3, 6, 5, 4), (1, 1), (2, 2), (0, 0)), // 1×1 but strided
            conv((20, 2, 6, 6, 3), (3, 3), (1, 1), (1, 1)), // more images than a chunk
            conv((17, 3, 5, 5, 2), (1, 1), (1, 1), (0, 0)), // pointwise, several chunks
            conv((0, 2, 5, 5, 3), (3, 3), (1, 1), (0, 0)), // empty batch
        ];
        for p in &cases {
            for isa in isas() {
                check(p, isa);
            }
        }
    }

    /// Stride-1 shapes that the direct convolution takes on AVX2 and AVX-512:
    /// rows of one vector (two rows a tile, odd heights), rows of several
    /// (a partial last vector), channel counts off the tile, padding wider than
    /// the kernel (the input gradient then falls back), more images than a chunk
    /// and fewer than the weight gradient's groups.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn direct_matches_the_definition() {
        let cases = [
            conv((3, 2, 14, 14, 5), (3, 3), (1, 1), (1, 1)), // 14 wide, odd o
            conv((2, 3, 7, 16, 9), (3, 3), (1, 1), (1, 1)),  // 16 wide, 7 high
            conv((2, 1, 28, 28, 16), (3, 3), (1, 1), (1, 1)), // one channel, 28 wide
            conv((1, 4, 9, 31, 3), (2, 3), (1, 1), (0, 1)),  // 29 wide: partial vector
            conv((2, 2, 6, 48, 8), (5, 5), (1, 1), (2, 2)),  // 48 wide: two tiles a row
            conv((2, 3, 8, 11, 4), (3, 3), (1, 1), (3, 3)),  // padding wider than kernel
            conv((19, 2, 6, 12, 3), (3, 3), (1, 1), (1, 1)), // several chunks and groups
            conv((1, 5, 10, 12, 12), (3, 5), (1, 1), (1, 2)), // one image, 12 wide
        ];
        for p in &cases {
            for isa in isas().into_iter().flatten() {
                let pl = direct::plan(p, isa);
                assert!(pl.is_some(), "{p:?} should run directly on {isa:?}");
                check(p, Some(isa));
            }
        }
    }

    #[test]
    fn scratch_is_bounded_by_the_chunk() {
        let p = Conv2d {
            n: 1000,
            c: 3,
            h: 8,
            w: 8,
            o: 4,
            kh: 3,
            kw: 3,
            stride: (1, 1),
            padding: (1, 1),
        };
        // Column matrices (27 rows) and regrouped gradients (4 rows) of 64
        // output positions, for a chunk of images.
        assert_eq!(im2col_len(&p), IMAGES_PER_CHUNK * (27 + 4) * 64);
        let p1 = Conv2d { n: 1, ..p };
        assert_eq!(im2col_len(&p1), (27 + 4) * 64);
    }

    #[test]
    fn bad_operands_are_errors() {
        let p = Conv2d {
            n: 2,
            c: 1,
            h: 4,
            w: 4,
            o: 2,
            kh: 3,
            kw: 3,
            stride: (1, 1),
            padding: (0, 0),
        };
        let x = vec![0.0; p.x_len()];
        let wt = vec![0.0; p.weight_len()];
        let mut out = vec![0.0; p.out_len()];
        let mut scratch = vec![0.0; im2col_len(&p)];
        assert!(conv2d_forward(&p, &x[1..], &wt, &mut out, &mut scratch).is_err());
        assert!(conv2d_forward(&p, &x, &wt, &mut out, &mut scratch[1..]).is_err());
        let tiny = Conv2d { h: 2, ..p };
        assert!(conv2d_forward(&tiny, &x[..8], &wt, &mut out, &mut scratch).is_err());
        let zero_stride = Conv2d {
            stride: (0, 1),
            ..p
        };
        assert!(conv2d_forward(&zero_stride, &x, &wt, &mut out, &mut scratch).is_err());
    }
}
