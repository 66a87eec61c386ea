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

/// The stream a device array's producer last used, from its
/// `__cuda_array_interface__` (version 3 of the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerStream {
    /// No `stream` key (protocol version 2 or earlier): the producer said
    /// nothing, so a consumer must wait for the whole device to be safe.
    Unknown,
    /// `stream: None`: the producer says no synchronization is needed.
    Ready,
    /// A `CUstream` handle (1 and 2: the legacy and per-thread default streams,
    /// which the driver accepts as handles too).
    Handle(u64),
}

/// An array in GPU memory, as its `__cuda_array_interface__` describes it
/// (CuPy, PyTorch CUDA tensors, Numba device arrays): checked C-contiguous
/// and of the expected shape and element type. Only the address is kept;
/// the caller holds the Python object (so the memory) while it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceArray {
    /// The device address of the first element.
    pub ptr: u64,
    /// The number of elements.
    pub len: usize,
    /// The size in bytes.
    pub bytes: usize,
    /// What must be waited for before reading it.
    pub stream: ProducerStream,
}

/// The device array behind `obj` when it has a `__cuda_array_interface__`
/// (`None` when it has none: a host array), checked against the input's
/// `shape` and `typestr` (`<f4`, `<i4`, `|b1`; `dtype` names it in messages).
///
/// # Errors
/// `ValueError` naming the input, the expected and the received shape,
/// element type or layout: a wrong shape or dtype, strides that are not C
/// order, a mask, a malformed interface.
pub fn device_array(
    obj: &Bound<'_, PyAny>,
    name: &str,
    shape: &[usize],
    typestr: &str,
    dtype: &str,
) -> PyResult<Option<DeviceArray>> {
    let Ok(iface) = obj.getattr(pyo3::intern!(obj.py(), "__cuda_array_interface__")) else {
        return Ok(None);
    };
    let fail = |what: String| {
        PyValueError::new_err(format!(
            "input '{name}': expected a {dtype} array of shape {}, got a CUDA array with {what}",
            fmt_shape(shape)
        ))
    };
    let iface = iface
        .cast_into::<pyo3::types::PyDict>()
        .map_err(|_| fail("a __cuda_array_interface__ that is not a dict".into()))?;
    let item = |key: &str| iface.get_item(key);
    let version: i64 = match item("version")? {
        Some(v) => v
            .extract()
            .map_err(|_| fail("a non-integer version".into()))?,
        None => return Err(fail("no version in its __cuda_array_interface__".into())),
    };
    if !(0..=3).contains(&version) {
        return Err(fail(format!(
            "__cuda_array_interface__ version {version} (versions 0 to 3 are understood)"
        )));
    }
    let got: Vec<usize> = match item("shape")? {
        Some(v) => v.extract().map_err(|_| fail("a malformed shape".into()))?,
        None => return Err(fail("no shape".into())),
    };
    let got_type: String = match item("typestr")? {
        Some(v) => v
            .extract()
            .map_err(|_| fail("a malformed typestr".into()))?,
        None => return Err(fail("no typestr".into())),
    };
    if got != shape || got_type != typestr {
        return Err(fail(format!(
            "typestr {got_type:?} and shape {} (expected typestr {typestr:?})",
            fmt_shape(&got)
        )));
    }
    if let Some(mask) = item("mask")? {
        if !mask.is_none() {
            return Err(fail("a mask (masked arrays are not supported)".into()));
        }
    }
    let elem: usize = typestr[2..].parse().unwrap_or(1);
    if let Some(strides) = item("strides")? {
        if !strides.is_none() {
            let strides: Vec<i64> = strides
                .extract()
                .map_err(|_| fail("malformed strides".into()))?;
            if !c_contiguous(shape, &strides, elem) {
                return Err(fail(format!(
                    "strides {strides:?} (bytes), which are not C order: make it contiguous \
                     first (.contiguous() in PyTorch, cupy.ascontiguousarray)"
                )));
            }
        }
    }
    let (ptr, _readonly): (u64, bool) = match item("data")? {
        Some(v) => v
            .extract()
            .map_err(|_| fail("malformed data (expected (pointer, read_only))".into()))?,
        None => return Err(fail("no data".into())),
    };
    let len: usize = shape.iter().product();
    if ptr == 0 && len != 0 {
        return Err(fail("a null data pointer".into()));
    }
    let stream = match item("stream")? {
        None => ProducerStream::Unknown,
        Some(v) if v.is_none() => ProducerStream::Ready,
        Some(v) => match v.extract::<u64>() {
            Ok(0) | Err(_) => {
                return Err(fail(format!("an invalid stream {v} (0 is not allowed)")))
            }
            Ok(h) => ProducerStream::Handle(h),
        },
    };
    Ok(Some(DeviceArray {
        ptr,
        len,
        bytes: len * elem,
        stream,
    }))
}

/// Whether byte `strides` are those of a C-ordered array of `shape` (the
/// stride of an extent-1 axis is free, as is everything of an empty array).
fn c_contiguous(shape: &[usize], strides: &[i64], elem: usize) -> bool {
    if strides.len() != shape.len() {
        return false;
    }
    if shape.contains(&0) {
        return true;
    }
    let mut want = elem as i64;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != want {
            return false;
        }
        want *= n as i64;
    }
    true
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

    #[test]
    fn device_arrays_are_read_from_their_cuda_array_interface() {
        Python::initialize();
        Python::attach(|py| {
            let fake = |iface: &str| {
                let code = format!("class A:\n    __cuda_array_interface__ = {iface}\nobj = A()\n");
                let globals = pyo3::types::PyDict::new(py);
                let code = std::ffi::CString::new(code).unwrap();
                py.run(&code, Some(&globals), None).unwrap();
                globals.get_item("obj").unwrap().unwrap()
            };
            let ok = fake(
                "{'version': 3, 'shape': (2, 3), 'typestr': '<f4', 'data': (4096, False), \
                 'strides': None, 'stream': 1}",
            );
            let d = device_array(&ok, "x", &[2, 3], "<f4", "float32")
                .unwrap()
                .unwrap();
            assert_eq!((d.ptr, d.len, d.bytes), (4096, 6, 24));
            assert_eq!(d.stream, ProducerStream::Handle(1));
            // C-order strides given explicitly, no stream key (version 2), None stream.
            let v2 = fake(
                "{'version': 2, 'shape': (2, 3), 'typestr': '<f4', 'data': (8, True), \
                 'strides': (12, 4)}",
            );
            let d = device_array(&v2, "x", &[2, 3], "<f4", "float32")
                .unwrap()
                .unwrap();
            assert_eq!(d.stream, ProducerStream::Unknown);
            let ready = fake(
                "{'version': 3, 'shape': (4,), 'typestr': '<i4', 'data': (8, False), \
                 'stream': None}",
            );
            let d = device_array(&ready, "ids", &[4], "<i4", "int32")
                .unwrap()
                .unwrap();
            assert_eq!(d.stream, ProducerStream::Ready);
            // A NumPy array or a list has no interface: the host path takes it.
            let list = pyo3::types::PyList::empty(py);
            assert!(device_array(&list, "x", &[], "<f4", "float32")
                .unwrap()
                .is_none());
            let bad = [
                (
                    "{'version': 3, 'shape': (3, 2), 'typestr': '<f4', 'data': (8, False)}",
                    "input 'x': expected a float32 array of shape (2, 3), got a CUDA array with \
                  typestr \"<f4\" and shape (3, 2) (expected typestr \"<f4\")",
                ),
                (
                    "{'version': 3, 'shape': (2, 3), 'typestr': '<f8', 'data': (8, False)}",
                    "input 'x': expected a float32 array of shape (2, 3), got a CUDA array with \
                  typestr \"<f8\" and shape (2, 3) (expected typestr \"<f4\")",
                ),
                (
                    "{'version': 3, 'shape': (2, 3), 'typestr': '<f4', 'data': (8, False), \
                  'strides': (4, 8)}",
                    "input 'x': expected a float32 array of shape (2, 3), got a CUDA array with \
                  strides [4, 8] (bytes), which are not C order: make it contiguous first \
                  (.contiguous() in PyTorch, cupy.ascontiguousarray)",
                ),
                (
                    "{'version': 3, 'shape': (2, 3), 'typestr': '<f4', 'data': (8, False), \
                  'stream': 0}",
                    "input 'x': expected a float32 array of shape (2, 3), got a CUDA array with \
                  an invalid stream 0 (0 is not allowed)",
                ),
                (
                    "{'version': 9, 'shape': (2, 3), 'typestr': '<f4', 'data': (8, False)}",
                    "input 'x': expected a float32 array of shape (2, 3), got a CUDA array with \
                  __cuda_array_interface__ version 9 (versions 0 to 3 are understood)",
                ),
            ];
            for (iface, want) in bad {
                let err =
                    device_array(&fake(iface), "x", &[2, 3], "<f4", "float32").expect_err(iface);
                assert!(err.is_instance_of::<PyValueError>(py));
                assert_eq!(err.value(py).to_string(), want);
            }
            assert!(c_contiguous(&[2, 1, 3], &[12, 999, 4], 4));
            assert!(c_contiguous(&[0, 3], &[7, 7], 4));
            assert!(!c_contiguous(&[2, 3], &[4, 8], 4));
        });
    }
}
