//! Python glue for the `CudaStep` of generated modules.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::exec::{Feed, GemmMode, HostData, HostInput, Options};
use super::plan::{Elem, ResultSpec};
use crate::py::{device_array, input_f32, input_i32, to_numpy, DeviceArray, Input};

/// An input of a CUDA step's method: a NumPy array (borrowed, copied to the
/// device by the call) or an array already on a GPU, found through its
/// `__cuda_array_interface__` (CuPy, PyTorch CUDA tensors, Numba; copied on
/// the device). The Python object stays borrowed by the method meanwhile.
pub enum CudaInput<'py, T: numpy::Element> {
    /// Host elements in C order.
    Host(Input<'py, T>),
    /// A checked device array (shape, dtype, C order; its device is checked
    /// when the step runs).
    Device(DeviceArray),
}

impl<T: numpy::Element> CudaInput<'_, T> {
    /// The host elements, or `None` for a device array.
    pub fn host(&self) -> Option<&[T]> {
        match self {
            CudaInput::Host(h) => Some(h),
            CudaInput::Device(_) => None,
        }
    }
}

impl CudaInput<'_, f32> {
    /// What [`Executor::run`](super::Executor::run) takes.
    pub fn feed(&self) -> Feed<'_> {
        match self {
            CudaInput::Host(h) => Feed::Host(HostInput::F32(h)),
            CudaInput::Device(d) => Feed::Device(Elem::F32, *d),
        }
    }
}

impl CudaInput<'_, i32> {
    /// What [`Executor::run`](super::Executor::run) takes.
    pub fn feed(&self) -> Feed<'_> {
        match self {
            CudaInput::Host(h) => Feed::Host(HostInput::I32(h)),
            CudaInput::Device(d) => Feed::Device(Elem::I32, *d),
        }
    }
}

/// The `float32` input `name`: a device array (`typestr` `<f4`) or, without a
/// `__cuda_array_interface__`, a NumPy array as [`input_f32`] takes it.
///
/// # Errors
/// `ValueError` naming the input, what was expected and what came.
pub fn feed_f32<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    shape: &[usize],
) -> PyResult<CudaInput<'py, f32>> {
    match device_array(obj, name, shape, "<f4", "float32")? {
        Some(d) => Ok(CudaInput::Device(d)),
        None => Ok(CudaInput::Host(input_f32(obj, name, shape)?)),
    }
}

/// The `int32` input `name` (`typestr` `<i4`); as [`feed_f32`].
///
/// # Errors
/// `ValueError` naming the input, what was expected and what came.
pub fn feed_i32<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    shape: &[usize],
) -> PyResult<CudaInput<'py, i32>> {
    match device_array(obj, name, shape, "<i4", "int32")? {
        Some(d) => Ok(CudaInput::Device(d)),
        None => Ok(CudaInput::Host(input_i32(obj, name, shape)?)),
    }
}

/// [`Options`] from `CudaStep`'s keyword arguments.
///
/// # Errors
/// `ValueError` for a `gemm` other than `"auto"`, `"cublas"`, `"kernel"`.
#[allow(clippy::too_many_arguments)]
pub fn options(
    device: usize,
    graph: bool,
    gemm: &str,
    tf32: bool,
    sync: bool,
    autotune: bool,
    branches: bool,
    graph_inputs: bool,
) -> PyResult<Options> {
    Ok(Options {
        device,
        graphs: graph,
        sync_each: sync,
        gemm: GemmMode::parse(gemm).map_err(PyValueError::new_err)?,
        tf32,
        autotune,
        branches,
        graph_inputs,
    })
}

/// Results copied back from the device as `{name: ndarray}` (`out:logits`
/// becomes `logits`); bools come back as `uint8`, as from the CPU step.
pub fn results_dict<'py>(
    py: Python<'py>,
    results: Vec<(&'static ResultSpec, HostData)>,
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for (spec, data) in results {
        let array = match &data {
            HostData::F32(v) => to_numpy(py, v, spec.shape)?.into_any(),
            HostData::I32(v) => to_numpy(py, v, spec.shape)?.into_any(),
            HostData::U8(v) => to_numpy(py, v, spec.shape)?.into_any(),
            HostData::U32(v) => to_numpy(py, v, spec.shape)?.into_any(),
        };
        out.set_item(spec.name(), array)?;
    }
    Ok(out)
}
