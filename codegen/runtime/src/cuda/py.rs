//! Python glue for the `CudaStep` of generated modules.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::exec::{GemmMode, HostData, Options};
use super::plan::ResultSpec;
use crate::py::to_numpy;

/// [`Options`] from `CudaStep`'s keyword arguments.
///
/// # Errors
/// `ValueError` for a `gemm` other than `"auto"`, `"cublas"`, `"kernel"`.
pub fn options(
    device: usize,
    graph: bool,
    gemm: &str,
    tf32: bool,
    sync: bool,
) -> PyResult<Options> {
    Ok(Options {
        device,
        graphs: graph,
        sync_each: sync,
        gemm: GemmMode::parse(gemm).map_err(PyValueError::new_err)?,
        tf32,
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
