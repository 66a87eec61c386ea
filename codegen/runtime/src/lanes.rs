//! Row reductions in 32 independent lanes.
//!
//! A loop `acc += x[j]` is a chain of dependent adds that LLVM may not
//! reorder, so it runs one element per add latency. Generated row reductions
//! instead map a chunk of the row into a stack buffer (a plain loop, which
//! vectorizes) and fold it into 32 accumulators, element `j` into lane
//! `j % 32`, then combine the lanes pairwise. 32 f64 lanes are four AVX-512
//! registers (eight AVX2 ones), so four chains of adds run at once: a
//! 128-element row costs four add latencies, not sixteen as with one register
//! of eight lanes. The order is fixed, so results are deterministic and do not
//! depend on the thread count.

/// Lanes of a reduction: element `j` of a row goes to lane `j % LANES`.
pub const LANES: usize = 32;

/// Elements mapped into a stack buffer per pass of a generated row reduction.
pub const CHUNK: usize = 64;

/// The accumulators of a sum: [`LANES`] f64 lanes as four groups of eight,
/// lane `l` at `[l / 8][l % 8]`. Grouped, LLVM keeps them in four vector
/// registers; a flat `[f64; 32]` it splits into pairs joined by shuffles
/// (twice as slow at AVX-512).
pub type Sums = [[f64; 8]; LANES / 8];

/// Sums before the first element.
pub const SUMS: Sums = [[0.0; 8]; LANES / 8];

/// The accumulators of a maximum, lane `l` at `[l]`.
pub type Maxima = [f32; LANES];

/// Maxima before the first element.
pub const MAXIMA: Maxima = [f32::NEG_INFINITY; LANES];

/// Adds `values` into `lanes` (element `j` into lane `j % LANES`), in f64.
///
/// ```
/// use ferrograd_runtime::lanes::{add, sum, SUMS};
/// let mut lanes = SUMS;
/// add(&mut lanes, &[1.0; 10]);
/// assert_eq!(sum(&lanes), 10.0);
/// ```
#[inline(always)]
pub fn add(lanes: &mut Sums, values: &[f32]) {
    let mut chunks = values.chunks_exact(LANES);
    for c in &mut chunks {
        for (g, group) in lanes.iter_mut().enumerate() {
            for (l, lane) in group.iter_mut().enumerate() {
                *lane += f64::from(c[g * 8 + l]);
            }
        }
    }
    for (j, v) in chunks.remainder().iter().enumerate() {
        lanes[j / 8][j % 8] += f64::from(*v);
    }
}

/// The lanes' total, added pairwise (lane `l` with lane `l + half`, halving).
#[inline(always)]
pub fn sum(lanes: &Sums) -> f64 {
    let mut l: [f64; LANES] = std::array::from_fn(|i| lanes[i / 8][i % 8]);
    let mut half = LANES / 2;
    while half > 0 {
        for i in 0..half {
            l[i] += l[i + half];
        }
        half /= 2;
    }
    l[0]
}

/// Takes the maximum of `values` into `lanes` (element `j` into lane `j % LANES`).
///
/// ```
/// use ferrograd_runtime::lanes::{max, max_of, MAXIMA};
/// let mut lanes = MAXIMA;
/// max(&mut lanes, &[1.0, 5.0, -2.0]);
/// assert_eq!(max_of(&lanes), 5.0);
/// ```
#[inline(always)]
pub fn max(lanes: &mut Maxima, values: &[f32]) {
    let mut chunks = values.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    for (lane, v) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane = lane.max(*v);
    }
}

/// The largest lane (pairwise, as in [`sum`]).
#[inline(always)]
pub fn max_of(lanes: &Maxima) -> f32 {
    let mut l = *lanes;
    let mut half = LANES / 2;
    while half > 0 {
        for i in 0..half {
            l[i] = l[i].max(l[i + half]);
        }
        half /= 2;
    }
    l[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_and_maxima_match_a_plain_loop() {
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 200] {
            let values: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 4.5).collect();
            let mut lanes = SUMS;
            add(&mut lanes, &values);
            let want: f64 = values.iter().map(|v| f64::from(*v)).sum();
            assert_eq!(sum(&lanes), want, "n = {n}");
            let mut lanes = MAXIMA;
            max(&mut lanes, &values);
            let want = values.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(max_of(&lanes), want, "n = {n}");
        }
    }
}
