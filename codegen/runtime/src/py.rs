//! Helpers for the `#[pymethods]` of generated modules: NumPy in, NumPy out, and
//! a guard that turns panics into Python exceptions.
//!
//! A generated method reads like this (`forward` of a model with one input):
//!
//! ```ignore
//! fn forward<'py>(&mut self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
//!     let x = input_f32(x, "x", &[32, 784])?;           // borrowed, no copy
//!     let x: &[f32] = &x;
//!     py.detach(|| guard("forward", || self.run_forward(x)))?;
//!     to_numpy_f32(py, self.logits(), &[32, 10])
//! }
//! ```

use std::any::Any;
use std::fmt::Write;
use std::ops::Deref;
use std::panic::{self, AssertUnwindSafe};

use numpy::{
    Element, IxDyn, PyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// An input array's elements in C order: borrowed from the NumPy array when it
/// is C-contiguous, aligned and of the exact dtype (no copy), else an owned
/// copy. Dereferences to `&[T]`.
pub struct Input<'py, T: Element> {
    data: Data<'py, T>,
}

enum Data<'py, T: Element> {
    Borrowed(PyReadonlyArrayDyn<'py, T>),
    Owned(Vec<T>),
}

impl<T: Element> Input<'_, T> {
    /// Whether the elements are the NumPy array's own memory (no copy was made).
    pub fn is_borrowed(&self) -> bool {
        matches!(self.data, Data::Borrowed(_))
    }
}

impl<T: Element> Deref for Input<'_, T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.data {
            // Checked C-contiguous and aligned when borrowed; the borrow flag
            // keeps other Rust code from writing it meanwhile. (Should the
            // check somehow fail, an empty slice makes the caller's length
            // check report it instead of a panic.)
            Data::Borrowed(a) => a.as_slice().unwrap_or(&[]),
            Data::Owned(v) => v,
        }
    }
}

/// The `float32` input `name` of the given shape, without a copy when the array
/// is C-contiguous (see [`Input`]).
///
/// # Errors
/// `ValueError` naming the input, the expected dtype and shape, and what came:
/// `input 'x': expected a float32 array of shape (32, 784), got a float64 array
/// of shape (32, 784)`. No conversion of dtype is ever made silently.
pub fn input_f32<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    shape: &[usize],
) -> PyResult<Input<'py, f32>> {
    input(obj, name, shape, "float32")
}

/// The `int32` input `name` of the given shape; as [`input_f32`].
pub fn input_i32<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    shape: &[usize],
) -> PyResult<Input<'py, i32>> {
    input(obj, name, shape, "int32")
}

fn input<'py, T: Element + Copy>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    shape: &[usize],
    dtype: &str,
) -> PyResult<Input<'py, T>> {
    let mismatch = |got: String| {
        PyValueError::new_err(format!(
            "input '{name}': expected a {dtype} array of shape {}, got {got}",
            fmt_shape(shape)
        ))
    };
    let Ok(array) = obj.cast::<PyArrayDyn<T>>() else {
        return Err(mismatch(describe(obj)));
    };
    if array.shape() != shape {
        return Err(mismatch(describe(obj)));
    }
    let borrowed = array.try_readonly().map_err(|e| {
        PyValueError::new_err(format!("input '{name}': cannot read the array: {e}"))
    })?;
    if array.is_c_contiguous() && (array.len() == 0 || array.is_aligned()) {
        return Ok(Input {
            data: Data::Borrowed(borrowed),
        });
    }
    // Strided, Fortran-ordered or unaligned: copy in C (logical) order.
    let owned: Vec<T> = borrowed.as_array().iter().copied().collect();
    Ok(Input {
        data: Data::Owned(owned),
    })
}

/// `a float64 array of shape (3,)`, or `list` for what is not an array.
fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!("a {} array of shape {}", a.dtype(), fmt_shape(a.shape())),
        Err(_) => match obj.get_type().name() {
            Ok(n) => format!("an object of type {n}"),
            Err(_) => "an object of unknown type".to_string(),
        },
    }
}

/// A shape as Python writes it: `(32, 784)`, `(5,)`, `()`.
pub fn fmt_shape(shape: &[usize]) -> String {
    let mut s = String::from("(");
    for (i, d) in shape.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{d}");
    }
    if shape.len() == 1 {
        s.push(',');
    }
    s.push(')');
    s
}

/// A new NumPy array of the given shape holding a copy of `data`.
///
/// # Errors
/// `RuntimeError` (an internal error) when `data` does not have
/// `shape.iter().product()` elements.
pub fn to_numpy<'py, T: Element + Copy>(
    py: Python<'py>,
    data: &[T],
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let want: usize = shape.iter().product();
    if want != data.len() {
        return Err(PyRuntimeError::new_err(format!(
            "ferrograd internal error: {} elements do not make an array of shape {}",
            data.len(),
            fmt_shape(shape)
        )));
    }
    // SAFETY: the array is fresh (no other reference can see it), C-ordered,
    // and every element is written by copy_from_slice before it is returned.
    unsafe {
        let array = PyArray::<T, IxDyn>::new(py, IxDyn(shape), false);
        if let Ok(dst) = array.as_slice_mut() {
            dst.copy_from_slice(data);
        }
        Ok(array)
    }
}

/// [`to_numpy`] for `f32`.
pub fn to_numpy_f32<'py>(
    py: Python<'py>,
    data: &[f32],
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    to_numpy(py, data, shape)
}

/// Runs `f`, converting its error to a Python exception and any panic (a bug in
/// ferrograd or in generated code) to `RuntimeError("ferrograd internal error
/// in <what>: <panic message>")`, so that no panic unwinds into Python.
///
/// Needs no GIL: it can run inside `py.detach`. Rust's panic hook still prints
/// the panic's location to stderr, which is what a bug report needs.
///
/// ```
/// use ferrograd_runtime::py::guard;
/// use ferrograd_runtime::Error;
/// use pyo3::Python;
/// assert_eq!(guard("step", || Ok::<_, Error>(3)).unwrap(), 3);
/// let err = guard("step", || -> Result<(), Error> { panic!("boom") }).unwrap_err();
/// Python::initialize();
/// Python::attach(|py| {
///     assert_eq!(err.value(py).to_string(), "ferrograd internal error in step: boom");
/// });
/// ```
pub fn guard<T, E, F>(what: &str, f: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, E>,
    E: Into<PyErr>,
{
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(Into::into),
        Err(payload) => Err(PyRuntimeError::new_err(format!(
            "ferrograd internal error in {what}: {}",
            panic_message(payload.as_ref())
        ))),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "a panic without a message"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_print_like_python() {
        assert_eq!(fmt_shape(&[32, 784]), "(32, 784)");
        assert_eq!(fmt_shape(&[5]), "(5,)");
        assert_eq!(fmt_shape(&[]), "()");
    }

    #[test]
    fn guard_passes_values_and_errors_and_catches_panics() {
        use crate::error::{Error, IndexError};
        use pyo3::exceptions::PyValueError;
        Python::initialize();
        assert_eq!(guard("x", || Ok::<_, Error>(1)).unwrap(), 1);
        let bad_id = guard("x", || -> Result<(), Error> {
            Err(IndexError {
                what: "labels".into(),
                index: 11,
                position: 0,
                bound: 10,
            }
            .into())
        })
        .unwrap_err();
        let out_of_bounds = guard("step", || -> Result<(), Error> {
            let v: Vec<i32> = Vec::new();
            let i = v.len() + 3;
            let _ = v[i];
            Ok(())
        })
        .unwrap_err();
        // A panic on a rayon worker reaches the guard too.
        let on_worker = guard("par", || -> Result<(), Error> {
            rayon::join(|| (), || panic!("worker {}", 7));
            Ok(())
        })
        .unwrap_err();
        Python::attach(|py| {
            assert!(bad_id.is_instance_of::<PyValueError>(py));
            assert!(bad_id.to_string().contains("labels: index 11"), "{bad_id}");
            assert!(out_of_bounds.is_instance_of::<PyRuntimeError>(py));
            assert!(
                out_of_bounds
                    .to_string()
                    .contains("ferrograd internal error in step: index out of bounds"),
                "{out_of_bounds}"
            );
            assert!(
                on_worker.to_string().contains("in par: worker 7"),
                "{on_worker}"
            );
        });
    }

    /// NumPy as the embedded interpreter sees it. The test binary links the
    /// libpython that the dynamic loader finds first, whose `sys.path` may lack
    /// the environment that has NumPy; tests/test_runtime.py points it at the
    /// right one and sets FERROGRAD_REQUIRE_NUMPY=1 so that this cannot pass
    /// by skipping.
    fn numpy(py: Python<'_>) -> Option<Bound<'_, PyModule>> {
        match py.import("numpy") {
            Ok(np) => Some(np),
            Err(e) if std::env::var_os("FERROGRAD_REQUIRE_NUMPY").is_some() => {
                panic!("numpy is not importable from the test binary: {e}")
            }
            Err(e) => {
                eprintln!(
                    "skipping: numpy is not importable from the test binary ({e}); \
                           run tests/test_runtime.py, which sets PYTHONPATH for it"
                );
                None
            }
        }
    }

    #[test]
    fn inputs_borrow_contiguous_arrays_and_copy_the_rest() {
        Python::initialize();
        Python::attach(|py| {
            let Some(np) = numpy(py) else { return };
            let arange = |n: usize, dtype: &str| {
                np.call_method1("arange", (n,))
                    .unwrap()
                    .call_method1("astype", (dtype,))
                    .unwrap()
            };
            let a = arange(6, "float32")
                .call_method1("reshape", ((2, 3),))
                .unwrap();
            let x = input_f32(&a, "x", &[2, 3]).unwrap();
            assert!(x.is_borrowed());
            assert_eq!(&*x, &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
            // A transposed view is copied, in logical (C) order.
            let t = a.getattr("T").unwrap();
            let xt = input_f32(&t, "x", &[3, 2]).unwrap();
            assert!(!xt.is_borrowed());
            assert_eq!(&*xt, &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
            let ids = arange(4, "int32");
            assert_eq!(&*input_i32(&ids, "ids", &[4]).unwrap(), &[0, 1, 2, 3]);
            let messages = [
                (input_f32(&arange(6, "float64"), "x", &[6]).err(),
                 "input 'x': expected a float32 array of shape (6,), got a float64 array of shape (6,)"),
                (input_f32(&a, "x", &[3, 2]).err(),
                 "input 'x': expected a float32 array of shape (3, 2), got a float32 array of shape (2, 3)"),
                (input_i32(&pyo3::types::PyList::empty(py), "ids", &[]).err(),
                 "input 'ids': expected a int32 array of shape (), got an object of type list"),
            ];
            for (err, want) in messages {
                let err = err.expect("an error");
                assert!(err.is_instance_of::<PyValueError>(py));
                assert_eq!(err.value(py).to_string(), want);
            }
            let out = to_numpy_f32(py, &[1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
            assert_eq!(out.shape(), &[2, 2]);
            assert_eq!(out.readonly().as_slice().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
            assert!(to_numpy_f32(py, &[1.0], &[2, 2]).is_err());
        });
    }
}
