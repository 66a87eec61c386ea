//! Row reductions in eight independent lanes.
//!
//! A loop `acc += x[j]` is a chain of dependent adds that LLVM may not
//! reorder, so it runs one element per add latency. Generated row reductions
//! instead map a chunk of the row into a stack buffer (a plain loop, which
//! vectorizes) and fold it into eight accumulators, element `j` into lane
//! `j % 8`, then combine the lanes pairwise. The order is fixed, so results
//! are deterministic and do not depend on the thread count.

/// Lanes of a reduction.
pub const LANES: usize = 8;

/// Elements mapped into a stack buffer per pass of a generated row reduction.
pub const CHUNK: usize = 64;

/// Adds `values` into `lanes` (element `j` into lane `j % LANES`), in f64.
///
/// ```
/// use ferrograd_runtime::lanes::{add, sum};
/// let mut lanes = [0.0; 8];
/// add(&mut lanes, &[1.0; 10]);
/// assert_eq!(sum(&lanes), 10.0);
/// ```
#[inline(always)]
pub fn add(lanes: &mut [f64; LANES], values: &[f32]) {
    let mut chunks = values.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            lanes[l] += f64::from(c[l]);
        }
    }
    for (lane, v) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane += f64::from(*v);
    }
}

/// The lanes' total, added pairwise.
#[inline(always)]
pub fn sum(lanes: &[f64; LANES]) -> f64 {
    ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
        + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]))
}

/// Takes the maximum of `values` into `lanes` (element `j` into lane `j % LANES`).
///
/// ```
/// use ferrograd_runtime::lanes::{max, max_of};
/// let mut lanes = [f32::NEG_INFINITY; 8];
/// max(&mut lanes, &[1.0, 5.0, -2.0]);
/// assert_eq!(max_of(&lanes), 5.0);
/// ```
#[inline(always)]
pub fn max(lanes: &mut [f32; LANES], values: &[f32]) {
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

/// The largest lane.
#[inline(always)]
pub fn max_of(lanes: &[f32; LANES]) -> f32 {
    lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_and_maxima_match_a_plain_loop() {
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 200] {
            let values: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 4.5).collect();
            let mut lanes = [0.0; LANES];
            add(&mut lanes, &values);
            let want: f64 = values.iter().map(|v| f64::from(*v)).sum();
            assert_eq!(sum(&lanes), want, "n = {n}");
            let mut lanes = [f32::NEG_INFINITY; LANES];
            max(&mut lanes, &values);
            let want = values.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(max_of(&lanes), want, "n = {n}");
        }
    }
}
