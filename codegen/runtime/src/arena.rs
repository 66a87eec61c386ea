//! The arena: one zero-initialized, 64-byte aligned buffer, allocated once,
//! that a memory plan carves into sub-slices by `(offset, len)`.
//!
//! A generated step owns a few arenas (intermediates, params, gradients,
//! optimizer state). Its kernels borrow ranges of them: shared ranges with
//! [`Arena::slice`], exclusive ones with the `unsafe` [`Arena::slice_mut`],
//! which takes `&self` so that one kernel can read some ranges of an arena
//! while writing others. That is sound only because the memory planner proves
//! the ranges a kernel borrows at the same time are disjoint; `slice_mut`'s
//! safety contract states exactly this, and every call site in generated code
//! relies on the plan.
//!
//! ```
//! use ferrograd_runtime::Arena;
//! let arena = Arena::<f32>::new(1024);
//! let x = arena.slice(0, 256);
//! // SAFETY: [256, 512) overlaps no other live borrow of `arena`.
//! let y = unsafe { arena.slice_mut(256, 256) };
//! y.iter_mut().zip(x).for_each(|(y, &x)| *y = 2.0 * x + 1.0);
//! assert_eq!(arena.slice(256, 1)[0], 1.0);
//! ```

use std::alloc::{self, Layout};
use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::error::Error;

mod sealed {
    pub trait Sealed {}
}

/// Element types an arena can hold: plain numbers, for which all-zero bytes
/// are a valid value (so the arena can start zeroed) and any bytes are valid.
/// Sealed: implemented here for `f32, f64, i32, i64, u8, u32, u64` only.
pub trait Element: sealed::Sealed + Copy + Send + Sync + 'static {}

macro_rules! elements {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {}
    )*};
}
elements!(f32, f64, i32, i64, u8, u32, u64);

/// A fixed-size, zero-initialized buffer of `T`, 64-byte aligned (a cache line;
/// enough for any SIMD load), from which generated code borrows sub-slices.
pub struct Arena<T: Element> {
    ptr: NonNull<T>,
    len: usize,
    // The arena owns its `T`s (for drop check and variance, as `Vec<T>` does).
    _owns: PhantomData<T>,
}

// SAFETY: an Arena owns its allocation as a Vec<T> would, and T: Send + Sync.
// Sharing `&Arena` between threads is safe for the safe methods (they only
// read); the one method that writes through `&self`, `slice_mut`, is unsafe,
// and its contract (no overlap with any live borrow, on any thread) is what
// excludes data races.
unsafe impl<T: Element> Send for Arena<T> {}
unsafe impl<T: Element> Sync for Arena<T> {}

impl<T: Element> Arena<T> {
    /// The alignment of the buffer, in bytes.
    pub const ALIGN: usize = 64;

    /// A zeroed arena of `len` elements.
    ///
    /// # Panics
    /// If the size overflows or the allocation fails; use [`Arena::try_new`]
    /// to get an error instead.
    pub fn new(len: usize) -> Self {
        Self::try_new(len).unwrap_or_else(|e| panic!("Arena::new({len}): {e}"))
    }

    /// A zeroed arena of `len` elements, or [`Error::Alloc`] when the memory is
    /// not there (a Python `MemoryError` once converted).
    pub fn try_new(len: usize) -> Result<Self, Error> {
        let Some(layout) = Self::layout(len) else {
            return Err(Error::Alloc {
                bytes: len.saturating_mul(std::mem::size_of::<T>()),
            });
        };
        if layout.size() == 0 {
            return Ok(Arena {
                ptr: NonNull::dangling(),
                len,
                _owns: PhantomData,
            });
        }
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw.cast::<T>()).ok_or(Error::Alloc {
            bytes: layout.size(),
        })?;
        Ok(Arena {
            ptr,
            len,
            _owns: PhantomData,
        })
    }

    fn layout(len: usize) -> Option<Layout> {
        let size = len.checked_mul(std::mem::size_of::<T>())?;
        Layout::from_size_align(size, Self::ALIGN).ok()
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the arena holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The size in bytes.
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// The elements `[off, off + len)`, shared.
    ///
    /// # Panics
    /// If the range does not lie inside the arena.
    #[inline]
    pub fn slice(&self, off: usize, len: usize) -> &[T] {
        self.check(off, len);
        // SAFETY: in bounds (checked), initialized (zeroed at allocation, and
        // every T is valid for any bytes). Writes to overlapping memory while
        // this borrow lives are excluded by `slice_mut`'s contract.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) }
    }

    /// The elements `[off, off + len)`, exclusive, through a shared `&self`.
    ///
    /// # Safety
    /// While the returned slice lives, no other borrow of an overlapping range
    /// of this arena may be used — neither from [`Arena::slice`] nor from
    /// another `slice_mut`, on this thread or any other. The memory plan
    /// guarantees this for the ranges one kernel borrows together.
    ///
    /// In particular, an elementwise kernel that writes its result in place
    /// over an input must NOT borrow that input with `slice` and the output
    /// with `slice_mut` (two live borrows of the same memory are undefined
    /// behaviour in Rust even when each element is read before it is
    /// written): it borrows the range once, with `slice_mut`, and reads the
    /// input from the output slice (`for o in out { *o = f(*o, ..) }`).
    ///
    /// # Panics
    /// If the range does not lie inside the arena (checked in every build:
    /// one compare per kernel call, and out-of-bounds would be unsound).
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [T] {
        self.check(off, len);
        // SAFETY: in bounds (checked), initialized; exclusivity is the caller's
        // contract above. The allocation is owned through a raw pointer, not
        // behind `&self`, so writing through it does not mutate through a
        // shared reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), len) }
    }

    /// All elements, shared.
    pub fn as_slice(&self) -> &[T] {
        self.slice(0, self.len)
    }

    /// All elements, exclusive (safe: `&mut self` excludes every other borrow).
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: `&mut self` means no other borrow of the arena is live.
        unsafe { self.slice_mut(0, self.len) }
    }

    #[inline]
    fn check(&self, off: usize, len: usize) {
        match off.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => panic!(
                "arena range [{off}, {off} + {len}) is outside the arena of {} elements",
                self.len
            ),
        }
    }
}

impl<T: Element> Drop for Arena<T> {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.len) {
            if layout.size() != 0 {
                // SAFETY: allocated in try_new with this same layout.
                unsafe { alloc::dealloc(self.ptr.as_ptr().cast::<u8>(), layout) };
            }
        }
    }
}

impl<T: Element> fmt::Debug for Arena<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena")
            .field("type", &std::any::type_name::<T>())
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn zeroed_and_aligned() {
        for len in [1usize, 3, 1000, 1 << 20] {
            let a = Arena::<f32>::new(len);
            assert_eq!(a.as_slice().as_ptr() as usize % 64, 0);
            assert!(a.as_slice().iter().all(|&x| x == 0.0));
            assert_eq!(a.bytes(), 4 * len);
        }
        let a = Arena::<i32>::new(7);
        assert!(a.as_slice().iter().all(|&x| x == 0));
    }

    #[test]
    fn empty_arena() {
        let mut a = Arena::<f64>::new(0);
        assert!(a.is_empty());
        assert!(a.slice(0, 0).is_empty());
        assert!(a.as_mut_slice().is_empty());
    }

    #[test]
    fn disjoint_ranges_from_several_threads() {
        let a = Arena::<f32>::new(4 * 1000);
        (0..4usize).into_par_iter().for_each(|t| {
            // SAFETY: thread t borrows [1000 t, 1000 (t + 1)) only.
            let s = unsafe { a.slice_mut(1000 * t, 1000) };
            s.iter_mut().for_each(|x| *x = t as f32);
        });
        for t in 0..4 {
            assert!(a.slice(1000 * t, 1000).iter().all(|&x| x == t as f32));
        }
    }

    #[test]
    #[should_panic(expected = "outside the arena")]
    fn out_of_bounds_panics() {
        let a = Arena::<f32>::new(10);
        let _ = a.slice(8, 3);
    }

    #[test]
    #[should_panic(expected = "outside the arena")]
    fn overflowing_range_panics() {
        let a = Arena::<f32>::new(10);
        // SAFETY: never returns.
        let _ = unsafe { a.slice_mut(usize::MAX, 2) };
    }

    #[test]
    fn impossible_sizes_are_errors() {
        assert!(matches!(
            Arena::<f32>::try_new(usize::MAX / 2),
            Err(Error::Alloc { .. })
        ));
    }
}
