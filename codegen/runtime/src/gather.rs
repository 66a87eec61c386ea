//! Row gather (`take`, an embedding lookup) and its transpose, scatter-add.
//!
//! Ids are `i32` (ferrograd's index dtype) and are all checked before anything
//! is written, so a bad id leaves the output untouched and names itself.

use rayon::prelude::*;

use crate::error::{Error, IndexError};
use crate::threads::PAR_CHUNK;

/// Checks that every id lies in `[0, bound)`; the error names the first one
/// that does not (`what` says what was indexed, e.g. the input's name).
///
/// ```
/// use ferrograd_runtime::gather::check_ids;
/// assert!(check_ids("labels", &[0, 9, 3], 10).is_ok());
/// let e = check_ids("labels", &[0, 10], 10).unwrap_err();
/// assert_eq!(e.to_string(), "labels: index 10 (at position 1) is out of range [0, 10)");
/// ```
pub fn check_ids(what: &str, ids: &[i32], bound: usize) -> Result<(), IndexError> {
    // One branch-free pass (vectorizes) for the common all-good case, then a
    // search only when something is wrong.
    // A negative id becomes a u32 above i32::MAX, so one unsigned compare
    // against a bound capped at i32::MAX + 1 rejects it too.
    let cap = bound.min(1 << 31);
    let all_good = ids
        .iter()
        .fold(true, |ok, &i| ok & ((i as u32 as usize) < cap));
    if all_good {
        return Ok(());
    }
    let position = ids
        .iter()
        .position(|&i| i < 0 || i as usize >= bound)
        .expect("a bad id exists");
    Err(IndexError {
        what: what.to_string(),
        index: i64::from(ids[position]),
        position,
        bound,
    })
}

/// `out[i, :] = table[ids[i], :]`: rows of a row-major `table` (rows × `row_len`)
/// gathered into `out` (`ids.len()` × `row_len`), which is overwritten.
///
/// ```
/// use ferrograd_runtime::gather::take_rows;
/// let table = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]; // 3 rows of 2
/// let mut out = [0.0; 4];
/// take_rows(&table, 2, &[2, 0], &mut out).unwrap();
/// assert_eq!(out, [2.0, 2.5, 0.0, 0.5]);
/// assert!(take_rows(&table, 2, &[3, 0], &mut out).is_err());
/// ```
pub fn take_rows(table: &[f32], row_len: usize, ids: &[i32], out: &mut [f32]) -> Result<(), Error> {
    if row_len == 0 || !table.len().is_multiple_of(row_len) {
        return Err(Error::layout(format!(
            "take_rows: a table of {} elements is not made of rows of {row_len}",
            table.len()
        )));
    }
    if Some(out.len()) != ids.len().checked_mul(row_len) {
        return Err(Error::layout(format!(
            "take_rows: out has {} elements, expected {} ids × {row_len}",
            out.len(),
            ids.len()
        )));
    }
    check_ids("take", ids, table.len() / row_len)?;
    let copy = |(o, &id): (&mut [f32], &i32)| {
        let start = id as usize * row_len;
        o.copy_from_slice(&table[start..start + row_len]);
    };
    if out.len() <= PAR_CHUNK {
        out.chunks_exact_mut(row_len).zip(ids).for_each(copy);
    } else {
        out.par_chunks_exact_mut(row_len)
            .zip(ids.par_iter())
            .with_min_len(PAR_CHUNK.div_ceil(row_len))
            .for_each(copy);
    }
    Ok(())
}

/// `out = zeros(rows, row_len); out[ids[i], :] += vals[i, :]` for every `i`:
/// the transpose of [`take_rows`] (the gradient of an embedding table).
/// `out` is zeroed first; rows are added in the order of `ids`, so the result
/// does not depend on the number of threads.
///
/// ```
/// use ferrograd_runtime::gather::scatter_add_rows;
/// let vals = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 3 rows of 2
/// let mut out = [9.0; 4]; // 2 rows of 2, overwritten
/// scatter_add_rows(&[1, 0, 1], &vals, 2, &mut out, 2).unwrap();
/// assert_eq!(out, [3.0, 4.0, 6.0, 8.0]);
/// ```
pub fn scatter_add_rows(
    ids: &[i32],
    vals: &[f32],
    row_len: usize,
    out: &mut [f32],
    rows: usize,
) -> Result<(), Error> {
    if Some(vals.len()) != ids.len().checked_mul(row_len) {
        return Err(Error::layout(format!(
            "scatter_add_rows: vals has {} elements, expected {} ids × {row_len}",
            vals.len(),
            ids.len()
        )));
    }
    if Some(out.len()) != rows.checked_mul(row_len) {
        return Err(Error::layout(format!(
            "scatter_add_rows: out has {} elements, expected {rows} rows × {row_len}",
            out.len()
        )));
    }
    check_ids("scatter_add", ids, rows)?;
    if row_len == 0 {
        return Ok(());
    }
    // Threads split the columns, so each one owns a strip of every output row
    // and still adds the rows in id order.
    let strips = if vals.len() <= PAR_CHUNK {
        1
    } else {
        (rayon::current_num_threads() * 4).min(row_len.div_ceil(16))
    };
    let width = row_len.div_ceil(strips.max(1));
    let out_ptr = OutPtr(out.as_mut_ptr());
    let strip = |s: usize| {
        let lo = s * width;
        let hi = (lo + width).min(row_len);
        for r in 0..rows {
            // SAFETY: strips [lo, hi) of distinct `s` are disjoint, and every
            // row's strip lies inside `out` (out.len() == rows * row_len).
            let row = unsafe { out_ptr.strip(r * row_len + lo, hi - lo) };
            row.fill(0.0);
        }
        for (&id, v) in ids.iter().zip(vals.chunks_exact(row_len)) {
            // SAFETY: as above; ids were checked to be < rows.
            let row = unsafe { out_ptr.strip(id as usize * row_len + lo, hi - lo) };
            row.iter_mut().zip(&v[lo..hi]).for_each(|(o, &v)| *o += v);
        }
    };
    if strips <= 1 {
        strip(0);
    } else {
        (0..row_len.div_ceil(width)).into_par_iter().for_each(strip);
    }
    Ok(())
}

/// The output pointer of [`scatter_add_rows`], shared by the threads that own
/// disjoint column strips of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: only used by scatter_add_rows, whose threads write disjoint strips.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `[start, start + len)` must lie in the slice this points into, and no
    /// other live reference may overlap it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn strip<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: the caller's contract above.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn take_matches_naive_small_and_large() {
        let mut seed = 1;
        for &(rows, row_len, n) in &[(5, 3, 7), (1000, 64, 3000), (10, 1, 100_000)] {
            let table: Vec<f32> = (0..rows * row_len).map(|i| i as f32 * 0.25).collect();
            let ids: Vec<i32> = (0..n)
                .map(|_| (lcg(&mut seed) % rows as u64) as i32)
                .collect();
            let mut out = vec![f32::NAN; n * row_len];
            take_rows(&table, row_len, &ids, &mut out).unwrap();
            for (i, &id) in ids.iter().enumerate() {
                for j in 0..row_len {
                    assert_eq!(out[i * row_len + j], table[id as usize * row_len + j]);
                }
            }
        }
    }

    #[test]
    fn scatter_matches_naive_small_and_large() {
        let mut seed = 7;
        for &(rows, row_len, n) in &[(5, 3, 7), (100, 300, 2000), (50, 1, 100_000), (4, 0, 3)] {
            let ids: Vec<i32> = (0..n)
                .map(|_| (lcg(&mut seed) % rows as u64) as i32)
                .collect();
            let vals: Vec<f32> = (0..n * row_len)
                .map(|_| (lcg(&mut seed) % 1000) as f32 / 64.0)
                .collect();
            let mut want = vec![0.0f32; rows * row_len];
            for (i, &id) in ids.iter().enumerate() {
                for j in 0..row_len {
                    want[id as usize * row_len + j] += vals[i * row_len + j];
                }
            }
            let mut out = vec![f32::NAN; rows * row_len];
            scatter_add_rows(&ids, &vals, row_len, &mut out, rows).unwrap();
            // Same order of additions: bitwise equal.
            assert_eq!(out, want);
        }
    }

    #[test]
    fn bad_ids_are_named_and_leave_the_output_alone() {
        let table = [1.0f32; 6];
        let mut out = [7.0f32; 4];
        let e = take_rows(&table, 2, &[0, -1], &mut out).unwrap_err();
        assert_eq!(
            e.to_string(),
            "take: index -1 (at position 1) is out of range [0, 3)"
        );
        assert_eq!(out, [7.0; 4]);
        let e = scatter_add_rows(&[0, 2, 5], &[1.0; 6], 2, &mut out, 2).unwrap_err();
        assert!(matches!(
            e,
            Error::Index(IndexError {
                index: 2,
                position: 1,
                bound: 2,
                ..
            })
        ));
        assert_eq!(out, [7.0; 4]);
        assert_eq!(
            check_ids("ids", &[i32::MIN], 4).unwrap_err().index,
            i64::from(i32::MIN)
        );
    }

    #[test]
    fn wrong_lengths_are_layout_errors() {
        let mut out = [0.0f32; 3];
        assert!(matches!(
            take_rows(&[1.0; 6], 2, &[0, 1], &mut out),
            Err(Error::Layout(_))
        ));
        assert!(matches!(
            take_rows(&[1.0; 5], 2, &[0], &mut out),
            Err(Error::Layout(_))
        ));
        assert!(matches!(
            scatter_add_rows(&[0], &[1.0; 2], 2, &mut out, 2),
            Err(Error::Layout(_))
        ));
    }
}
