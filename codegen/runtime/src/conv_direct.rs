//! Direct convolution with stride 1: the convolution itself, its input
//! gradient (the same loop over the padded output gradient with flipped
//! weights) and its weight gradient, in explicit AVX-512 or AVX2 vectors
//! chosen at run time (this crate is built at the x86-64 baseline).
//!
//! im2col + GEMM writes every input pixel `kh·kw` times into a column matrix
//! that the GEMM then packs again; on small images (W4's 14×14×16) that
//! copying costs as much as the products. Here each image is copied once into
//! a zero-padded plane, and a register tile of `OB` output channels × two
//! vectors (two output rows when a row fits one vector, else two vectors along
//! the row) accumulates over every tap `(c, i, j)`: per tap, two unaligned
//! loads of the padded plane and `OB` broadcast weights feed `2·OB` fused
//! multiply-adds. Lanes past the output width compute on padding and are never
//! stored, so an output row should fill most of its vectors ([`plan`] decides).
//!
//! The weight gradient keeps one vector of partial sums per (output channel,
//! tap) in scratch, adds each image's `g[o, y, :] · x[c, y + i, j..]` products
//! into it, and sums the lanes once at the end. Images are split into
//! [`PARTIALS`] fixed groups, each with its own partial sums, added in order:
//! the result does not depend on the number of threads.

use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::conv::Conv2d;

/// Vectors per register tile along the output (rows or row segments).
const V: usize = 2;
/// Independent partial sums of the weight gradient (images split into this
/// many groups, which run in parallel).
pub(crate) const PARTIALS: usize = 4;
/// Images of a group padded at a time for the weight gradient: a register tile
/// then sums over all their rows before it goes back to memory.
const WG_BATCH: usize = 8;

/// The vector instruction set a direct convolution runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// 16 lanes, 8 output channels per tile.
    Avx512,
    /// 8 lanes, 4 output channels per tile (16 registers).
    Avx2,
}

impl Isa {
    /// The best this CPU has, or None (then im2col + GEMM runs).
    pub(crate) fn detect() -> Option<Isa> {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            Some(Isa::Avx512)
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Some(Isa::Avx2)
        } else {
            None
        }
    }

    fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
        }
    }

    /// Output channels per register tile.
    fn block(self) -> usize {
        match self {
            Isa::Avx512 => 8,
            Isa::Avx2 => 4,
        }
    }
}

/// How one stride-1 convolution runs directly: its padded planes and tiles.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub isa: Isa,
    /// Padded plane: rows (one spare for a tile's second row), row stride.
    hp: usize,
    ws: usize,
    /// Whether a tile's vectors are rows (output row within one vector).
    rows: bool,
}

impl Plan {
    /// Elements of one padded image (all channels).
    pub fn image_len(&self, c: usize) -> usize {
        c * self.hp * self.ws
    }

    /// Where tap `t` = `(c, i, j)` of `p` starts in a padded image.
    ///
    /// Not inlined: in the weight gradient's tile its divisions made LLVM spill
    /// accumulators to the stack (conv2's weight gradient 1.05 → 2.0 ms).
    #[inline(never)]
    fn tap_offset(&self, p: &Conv2d, t: usize) -> usize {
        let (c, i, j) = (t / (p.kh * p.kw), t / p.kw % p.kh, t % p.kw);
        (c * self.hp + i) * self.ws + j
    }
}

/// The direct plan for `p` on `isa`, or None where im2col + GEMM should run:
/// strided or 1×1 convolutions, and outputs too narrow to fill the vectors
/// (under 3/4 of the lanes a row touches would be used).
pub(crate) fn plan(p: &Conv2d, isa: Isa) -> Option<Plan> {
    let (oh, ow) = p.out_hw();
    if p.stride != (1, 1) || (p.kh == 1 && p.kw == 1) || oh == 0 || ow == 0 {
        return None;
    }
    let lanes = isa.lanes();
    let rows = ow <= lanes;
    let covered = if rows {
        lanes
    } else {
        ow.div_ceil(lanes * V) * lanes * V
    };
    if 4 * ow < 3 * covered {
        return None;
    }
    let ws = (covered + p.kw - 1).max(p.w + 2 * p.padding.1);
    let hp = p.h + 2 * p.padding.0 + 1;
    Some(Plan { isa, hp, ws, rows })
}

/// Scratch elements a direct forward (or input-gradient) pass needs for `p`:
/// the packed weights, then one padded plane per image of a chunk.
pub(crate) fn forward_len(p: &Conv2d, pl: &Plan, images: usize) -> usize {
    packed_len(p, pl.isa) + images * pl.image_len(p.c)
}

/// Scratch elements the direct weight gradient needs: per group of images its
/// partial sums (a vector per output channel and tap) and a batch of padded
/// images.
pub(crate) fn weight_grad_len(p: &Conv2d, pl: &Plan) -> usize {
    let taps = p.c * p.kh * p.kw;
    PARTIALS * (p.o * taps * pl.isa.lanes() + WG_BATCH * pl.image_len(p.c))
}

fn packed_len(p: &Conv2d, isa: Isa) -> usize {
    p.o.next_multiple_of(isa.block()) * p.c * p.kh * p.kw
}

/// Packs weight `(o, c, i, j)` (given by `weight`) as `[o / B][c][i][j][o % B]`
/// for blocks of `B` output channels, zero past the last channel.
pub(crate) fn pack_weights(
    p: &Conv2d,
    isa: Isa,
    weight: impl Fn(usize, usize, usize, usize) -> f32,
    dst: &mut [f32],
) {
    let b = isa.block();
    let taps = p.c * p.kh * p.kw;
    let dst = &mut dst[..packed_len(p, isa)];
    dst.fill(0.0);
    for o in 0..p.o {
        for c in 0..p.c {
            for i in 0..p.kh {
                for j in 0..p.kw {
                    let tap = (c * p.kh + i) * p.kw + j;
                    dst[(o / b * taps + tap) * b + o % b] = weight(o, c, i, j);
                }
            }
        }
    }
}

/// Copies image `x` (c × h × w) into the zero-padded plane `xp`.
fn pad_image(p: &Conv2d, pl: &Plan, x: &[f32], xp: &mut [f32]) {
    let plane = pl.hp * pl.ws;
    let (ph, pw) = p.padding;
    xp.fill(0.0);
    for (src, dst) in x.chunks_exact(p.h * p.w).zip(xp.chunks_exact_mut(plane)) {
        for (s, d) in src
            .chunks_exact(p.w)
            .zip(dst[ph * pl.ws..].chunks_mut(pl.ws))
        {
            d[pw..pw + p.w].copy_from_slice(s);
        }
    }
}

/// `out = conv2d(x, weight)` for stride 1: `packed` from [`pack_weights`],
/// `planes` the scratch after it (one padded plane per image of a chunk).
pub(crate) fn forward(
    p: &Conv2d,
    pl: &Plan,
    x: &[f32],
    packed: &[f32],
    out: &mut [f32],
    planes: &mut [f32],
) {
    let (oh, ow) = p.out_hw();
    let (x_img, out_img, plane_len) = (p.c * p.h * p.w, p.o * oh * ow, pl.image_len(p.c));
    let chunk = p.n.clamp(1, crate::conv::IMAGES_PER_CHUNK);
    let slots = &mut planes[..chunk * plane_len];
    for (xs, outs) in x.chunks(chunk * x_img).zip(out.chunks_mut(chunk * out_img)) {
        outs.par_chunks_exact_mut(out_img)
            .zip(xs.par_chunks_exact(x_img))
            .zip(slots.par_chunks_exact_mut(plane_len))
            .for_each(|((out, x), xp)| {
                pad_image(p, pl, x, xp);
                // SAFETY: plan() chose `isa` after detecting it on this CPU, the
                // plane holds every row and column a tile reads (hp includes the
                // spare row, ws the last vector's reach), and out is o·oh·ow.
                unsafe {
                    match pl.isa {
                        Isa::Avx512 => forward_avx512(p, pl, xp, packed, out),
                        Isa::Avx2 => forward_avx2(p, pl, xp, packed, out),
                    }
                }
            });
    }
}

#[target_feature(enable = "avx512f,fma")]
unsafe fn forward_avx512(p: &Conv2d, pl: &Plan, xp: &[f32], packed: &[f32], out: &mut [f32]) {
    // SAFETY: forwarded from forward().
    unsafe { forward_image::<Zmm, 8>(p, pl, xp, packed, out) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(p: &Conv2d, pl: &Plan, xp: &[f32], packed: &[f32], out: &mut [f32]) {
    // SAFETY: forwarded from forward().
    unsafe { forward_image::<Ymm, 4>(p, pl, xp, packed, out) }
}

/// One padded image `xp` to its output, tile by tile: `OB` output channels ×
/// `V` vectors, summed over every tap.
#[inline(always)]
unsafe fn forward_image<S: Simd, const OB: usize>(
    p: &Conv2d,
    pl: &Plan,
    xp: &[f32],
    packed: &[f32],
    out: &mut [f32],
) {
    let (oh, ow) = p.out_hw();
    let plane = pl.hp * pl.ws;
    let taps = p.c * p.kh * p.kw;
    // A tile's V vectors: V rows (narrow outputs) or V consecutive vectors of a row.
    let (v_step, x_step, y_step) = if pl.rows {
        (pl.ws, ow.max(1), V)
    } else {
        (S::LANES, S::LANES * V, 1)
    };
    let (xp, out_ptr) = (xp.as_ptr(), out.as_mut_ptr());
    for ob in 0..p.o.div_ceil(OB) {
        let w_block = packed[ob * taps * OB..][..taps * OB].as_ptr();
        let channels = OB.min(p.o - ob * OB);
        for y in (0..oh).step_by(y_step) {
            for x0 in (0..ow).step_by(x_step) {
                // SAFETY (all pointer reads and writes below): a tile reads rows
                // y + i (+ 1 for its second row) < hp and columns up to
                // x0 + j + V·lanes ≤ ws of each channel plane; weights stay in
                // this block; stores cover only outputs inside out.
                let mut acc = [[unsafe { S::zero() }; V]; OB];
                let mut w = w_block;
                for c in 0..p.c {
                    for i in 0..p.kh {
                        let row = unsafe { xp.add(c * plane + (y + i) * pl.ws + x0) };
                        for j in 0..p.kw {
                            let xv: [S; V] = std::array::from_fn(|v| unsafe {
                                S::load(row.add(j + v * v_step))
                            });
                            for (b, acc) in acc.iter_mut().enumerate() {
                                let wb = unsafe { S::splat(*w.add(b)) };
                                for (a, x) in acc.iter_mut().zip(&xv) {
                                    *a = unsafe { S::fma(wb, *x, *a) };
                                }
                            }
                            w = unsafe { w.add(OB) };
                        }
                    }
                }
                for (b, acc) in acc.iter().enumerate().take(channels) {
                    let o_row = ((ob * OB + b) * oh + y) * ow + x0;
                    for (v, a) in acc.iter().enumerate() {
                        let (at, n) = if pl.rows {
                            (o_row + v * ow, if y + v < oh { ow } else { 0 })
                        } else {
                            (o_row + v * S::LANES, ow.saturating_sub(x0 + v * S::LANES))
                        };
                        if n > 0 {
                            unsafe { a.store_first(out_ptr.add(at), n.min(S::LANES)) };
                        }
                    }
                }
            }
        }
    }
}

/// `dw = Σₙ g[n] ⋆ x[n]` for stride 1, overwriting `dw`; `scratch` holds
/// [`weight_grad_len`] elements.
pub(crate) fn weight_grad(
    p: &Conv2d,
    pl: &Plan,
    x: &[f32],
    g: &[f32],
    dw: &mut [f32],
    scratch: &mut [f32],
) {
    let (oh, ow) = p.out_hw();
    let taps = p.c * p.kh * p.kw;
    let lanes = pl.isa.lanes();
    let (x_img, g_img, plane_len) = (p.c * p.h * p.w, p.o * oh * ow, pl.image_len(p.c));
    let part_len = p.o * taps * lanes + WG_BATCH * plane_len;
    let per_group = p.n.div_ceil(PARTIALS).max(1);
    scratch[..PARTIALS * part_len]
        .par_chunks_exact_mut(part_len)
        .enumerate()
        .for_each(|(group, part)| {
            let (sums, xp) = part.split_at_mut(p.o * taps * lanes);
            sums.fill(0.0);
            let (first, end) = (
                (group * per_group).min(p.n),
                ((group + 1) * per_group).min(p.n),
            );
            for start in (first..end).step_by(WG_BATCH) {
                let batch = WG_BATCH.min(end - start);
                let xs = &x[start * x_img..(start + batch) * x_img];
                for (x, xp) in xs.chunks_exact(x_img).zip(xp.chunks_exact_mut(plane_len)) {
                    pad_image(p, pl, x, xp);
                }
                let b = Batch {
                    images: batch,
                    xp: &xp[..batch * plane_len],
                    plane_len,
                    g: &g[start * g_img..(start + batch) * g_img],
                };
                // SAFETY: the ISA was detected; rows y + i < hp and columns up to
                // j + ow ≤ ws of each plane; g rows are read only up to ow.
                unsafe {
                    match pl.isa {
                        Isa::Avx512 => weight_grad_avx512(p, pl, &b, sums),
                        Isa::Avx2 => weight_grad_avx2(p, pl, &b, sums),
                    }
                }
            }
        });
    // dw[o, tap] = the lanes of every group's partial sums, in a fixed order.
    let parts = &scratch[..PARTIALS * part_len];
    for (k, d) in dw[..p.o * taps].iter_mut().enumerate() {
        *d = parts
            .chunks_exact(part_len)
            .map(|part| part[k * lanes..][..lanes].iter().sum::<f32>())
            .sum();
    }
}

/// A few consecutive images of the weight gradient: padded, and their `g`.
struct Batch<'a> {
    images: usize,
    xp: &'a [f32],
    plane_len: usize,
    g: &'a [f32],
}

#[target_feature(enable = "avx512f,fma")]
unsafe fn weight_grad_avx512(p: &Conv2d, pl: &Plan, b: &Batch, sums: &mut [f32]) {
    // SAFETY: forwarded from weight_grad(). Few taps (one input channel): all
    // in one tile, so g streams through once.
    unsafe {
        if p.c * p.kh * p.kw <= 9 {
            weight_grad_batch::<Zmm, 3, 9>(p, pl, b, sums)
        } else {
            weight_grad_batch::<Zmm, 4, 6>(p, pl, b, sums)
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn weight_grad_avx2(p: &Conv2d, pl: &Plan, b: &Batch, sums: &mut [f32]) {
    // SAFETY: forwarded from weight_grad(); as for AVX-512, in 16 registers.
    unsafe {
        if p.c * p.kh * p.kw <= 9 {
            weight_grad_batch::<Ymm, 1, 9>(p, pl, b, sums)
        } else {
            weight_grad_batch::<Ymm, 2, 4>(p, pl, b, sums)
        }
    }
}

/// Adds a batch of images' products into `sums` (a vector per output channel
/// and tap), in tiles of `OB` output channels × `T` taps that sum over every
/// row of every image of the batch in registers.
#[inline(always)]
unsafe fn weight_grad_batch<S: Simd, const OB: usize, const T: usize>(
    p: &Conv2d,
    pl: &Plan,
    batch: &Batch,
    sums: &mut [f32],
) {
    let (oh, ow) = p.out_hw();
    let g_img = p.o * oh * ow;
    let taps = p.c * p.kh * p.kw;
    let (xp, g, sums) = (batch.xp.as_ptr(), batch.g.as_ptr(), sums.as_mut_ptr());
    for o0 in (0..p.o).step_by(OB) {
        let channels = OB.min(p.o - o0);
        for t0 in (0..taps).step_by(T) {
            let tile_taps = T.min(taps - t0);
            // Where each tap starts in a padded image, and each channel's g.
            let off: [usize; T] = std::array::from_fn(|t| pl.tap_offset(p, (t0 + t).min(taps - 1)));
            let g_off: [usize; OB] = std::array::from_fn(|b| (o0 + b).min(p.o - 1) * oh * ow);
            // A tile's places past the last channel or tap repeat the last one;
            // their sums are neither loaded nor stored.
            let at = |b: usize, t: usize| ((o0 + b) * taps + t0 + t) * S::LANES;
            let mut acc = [[unsafe { S::zero() }; T]; OB];
            for (b, acc) in acc.iter_mut().enumerate().take(channels) {
                for (t, a) in acc.iter_mut().enumerate().take(tile_taps) {
                    *a = unsafe { S::load(sums.add(at(b, t))) };
                }
            }
            for x0 in (0..ow).step_by(S::LANES) {
                let mask = unsafe { S::mask(S::LANES.min(ow - x0)) };
                for image in 0..batch.images {
                    // SAFETY: g rows (o, y) have ow elements from x0 (masked);
                    // plane rows y + i < hp, columns up to j + ow ≤ ws.
                    let mut g_row = unsafe { g.add(image * g_img + x0) };
                    let mut x_row = unsafe { xp.add(image * batch.plane_len + x0) };
                    for _ in 0..oh {
                        let gv: [S; OB] = std::array::from_fn(|b| unsafe {
                            S::load_masked(g_row.add(g_off[b]), mask)
                        });
                        for (t, &o) in off.iter().enumerate() {
                            let xv = unsafe { S::load_masked(x_row.add(o), mask) };
                            for (acc, gb) in acc.iter_mut().zip(&gv) {
                                acc[t] = unsafe { S::fma(*gb, xv, acc[t]) };
                            }
                        }
                        unsafe {
                            g_row = g_row.add(ow);
                            x_row = x_row.add(pl.ws);
                        }
                    }
                }
            }
            for (b, acc) in acc.iter().enumerate().take(channels) {
                for (t, a) in acc.iter().enumerate().take(tile_taps) {
                    unsafe { a.store(sums.add(at(b, t))) };
                }
            }
        }
    }
}

/// The few vector operations the tiles need, for one register width.
trait Simd: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(v: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// Lane mask: the first `n` (1..=LANES) lanes.
    type Mask: Copy;
    unsafe fn mask(n: usize) -> Self::Mask;
    /// The lanes of `mask` from `p`, zeros in the others (which are not read).
    unsafe fn load_masked(p: *const f32, mask: Self::Mask) -> Self;
    /// `a · b + c`, fused.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// Stores the first `n` (1..=LANES) lanes at `p`.
    unsafe fn store_first(self, p: *mut f32, n: usize);
}

#[derive(Clone, Copy)]
struct Zmm(__m512);

impl Simd for Zmm {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Zmm(unsafe { _mm512_setzero_ps() })
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Zmm(unsafe { _mm512_set1_ps(v) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Zmm(unsafe { _mm512_loadu_ps(p) })
    }
    type Mask = __mmask16;
    #[inline(always)]
    unsafe fn mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, mask: __mmask16) -> Self {
        Zmm(unsafe { _mm512_maskz_loadu_ps(mask, p) })
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Zmm(unsafe { _mm512_fmadd_ps(a.0, b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm512_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize) {
        unsafe { _mm512_mask_storeu_ps(p, Self::mask(n), self.0) }
    }
}

#[derive(Clone, Copy)]
struct Ymm(__m256);

/// `_mm256_maskload_ps` / `maskstore` masks: lane `l` of `YMM_MASKS[8 - n..]`
/// is set for `l < n`.
static YMM_MASKS: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

impl Simd for Ymm {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Ymm(unsafe { _mm256_setzero_ps() })
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Ymm(unsafe { _mm256_set1_ps(v) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Ymm(unsafe { _mm256_loadu_ps(p) })
    }
    type Mask = __m256i;
    #[inline(always)]
    unsafe fn mask(n: usize) -> __m256i {
        // SAFETY: 8 - n in 0..=7, so the eight lanes read stay in the table.
        unsafe { _mm256_loadu_si256(YMM_MASKS[8 - n..].as_ptr().cast()) }
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, mask: __m256i) -> Self {
        Ymm(unsafe { _mm256_maskload_ps(p, mask) })
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Ymm(unsafe { _mm256_fmadd_ps(a.0, b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm256_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize) {
        if n == 8 {
            return unsafe { self.store(p) };
        }
        unsafe { _mm256_maskstore_ps(p, Self::mask(n), self.0) }
    }
}
