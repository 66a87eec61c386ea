//! CUDA graphs: an entry point's launches captured once from the stream, then
//! replayed with one call.

use cudarc::driver::result;
use cudarc::driver::sys;

use super::device::{check, Device};
use crate::error::Error;

/// An instantiated graph, replayable on the device's stream.
pub struct Graph {
    exec: sys::CUgraphExec,
    device: Device,
}

// SAFETY: a graph exec may be launched from any thread with its context
// current (bound first), one launch at a time (`&mut` users only).
unsafe impl Send for Graph {}

impl Graph {
    /// Records what `enqueue` queues on the device's stream (nothing runs),
    /// and instantiates it.
    ///
    /// Capture is thread-local: CUDA calls other threads make meanwhile (a
    /// PyTorch allocation, say) are not disturbed. If `enqueue` fails, the
    /// capture is ended and discarded and its error returned.
    pub fn capture(
        device: &Device,
        what: &str,
        enqueue: impl FnOnce() -> Result<(), Error>,
    ) -> Result<Graph, Error> {
        device.bind()?;
        let stream = device.stream();
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        // SAFETY: our stream, not capturing yet.
        check(
            unsafe { result::stream::begin_capture(stream, mode) },
            || format!("starting the CUDA graph capture of {what}"),
        )?;
        let queued = enqueue();
        // SAFETY: ends the capture begun above, whatever happened in between.
        let ended = unsafe { result::stream::end_capture(stream) };
        let graph = match (queued, ended) {
            (Err(e), Ok(graph)) => {
                if !graph.is_null() {
                    // SAFETY: the captured graph, never used.
                    let _ = unsafe { result::graph::destroy(graph) };
                }
                return Err(e);
            }
            (Err(e), Err(_)) => return Err(e),
            (Ok(()), ended) => check(ended, || format!("capturing {what} into a CUDA graph"))?,
        };
        // SAFETY: a complete captured graph; destroyed right after, as the
        // executable graph does not need it.
        let exec = unsafe {
            let exec = result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0));
            let _ = result::graph::destroy(graph);
            exec
        };
        let exec = check(exec, || format!("instantiating the CUDA graph of {what}"))?;
        Ok(Graph {
            exec,
            device: device.clone(),
        })
    }

    /// Records the steps `enqueue(i)` queues, for `i` in order, as
    /// [`capture`](Self::capture) does, but with step `i`'s first work
    /// depending only on the last work of the steps `after[i]` (indices below
    /// `i`): steps that do not wait for each other become parallel branches
    /// of the graph, which the GPU runs at once. A step that queues nothing
    /// passes its own dependencies on.
    ///
    /// This sets the stream's capture dependencies before each step
    /// (`cuStreamUpdateCaptureDependencies_v2`) and reads them after it
    /// (`cuStreamGetCaptureInfo_v3`); one stream, no events.
    pub fn capture_steps(
        device: &Device,
        what: &str,
        after: &[Vec<usize>],
        mut enqueue: impl FnMut(usize) -> Result<(), Error>,
    ) -> Result<Graph, Error> {
        let stream = device.stream();
        Graph::capture(device, what, || {
            let mut ends: Vec<Vec<sys::CUgraphNode>> = Vec::with_capacity(after.len());
            for (i, waits) in after.iter().enumerate() {
                let mut nodes: Vec<sys::CUgraphNode> = Vec::new();
                for &j in waits {
                    let Some(end) = ends.get(j).filter(|_| j < i) else {
                        return Err(Error::layout(format!(
                            "{what}: step {i} waits for step {j}, which is not before it"
                        )));
                    };
                    nodes.extend_from_slice(end);
                }
                nodes.sort_unstable();
                nodes.dedup();
                let flags =
                    sys::CUstreamUpdateCaptureDependencies_flags::CU_STREAM_SET_CAPTURE_DEPENDENCIES
                        as u32;
                // SAFETY: our stream, capturing; `nodes` are nodes of its graph
                // (what earlier steps added) and lives through the call.
                check(
                    unsafe {
                        sys::cuStreamUpdateCaptureDependencies_v2(
                            stream,
                            nodes.as_mut_ptr(),
                            std::ptr::null(), // plain edges
                            nodes.len(),
                            flags,
                        )
                    }
                    .result(),
                    || format!("capturing {what}: making step {i} wait for steps {waits:?}"),
                )?;
                enqueue(i)?;
                ends.push(capture_ends(stream).map_err(|e| {
                    Error::Device(format!("capturing {what}: after step {i}: {e}"))
                })?);
            }
            Ok(())
        })
    }

    /// Queues the graph's upload to the device (what its first launch would
    /// otherwise do), so that a timed launch times only the replay.
    pub fn upload(&self, what: &str) -> Result<(), Error> {
        // SAFETY: a live graph exec and our stream.
        check(
            unsafe { sys::cuGraphUpload(self.exec, self.device.stream()) }.result(),
            || format!("uploading the CUDA graph of {what}"),
        )
    }

    /// Queues one replay on the device's stream.
    pub fn launch(&mut self, what: &str) -> Result<(), Error> {
        // SAFETY: a live graph exec and our stream.
        check(
            unsafe { result::graph::launch(self.exec, self.device.stream()) },
            || format!("launching the CUDA graph of {what}"),
        )
    }
}

/// The nodes that work queued next on `stream`, which is capturing, would
/// depend on: the last nodes captured there.
fn capture_ends(stream: sys::CUstream) -> Result<Vec<sys::CUgraphNode>, String> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    let (mut id, mut graph) = (0, std::ptr::null_mut());
    let (mut nodes, mut count): (*const sys::CUgraphNode, usize) = (std::ptr::null(), 0);
    // SAFETY: our stream; every out-pointer is a live local. The node array
    // the driver returns stays valid until the next call on the stream, and
    // is copied before that.
    unsafe {
        sys::cuStreamGetCaptureInfo_v3(
            stream,
            &mut status,
            &mut id,
            &mut graph,
            &mut nodes,
            std::ptr::null_mut(), // plain edges: no edge data wanted
            &mut count,
        )
        .result()
        .map_err(|e| format!("cuStreamGetCaptureInfo_v3: {e}"))?;
        if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE {
            return Err(format!("the stream's capture is {status:?}"));
        }
        Ok(if count == 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts(nodes, count).to_vec()
        })
    }
}

/// Why the driver cannot capture steps as branches
/// ([`Graph::capture_steps`]), if it cannot: it lacks an entry point (CUDA
/// 12.3 added them).
pub fn why_no_branches() -> Option<String> {
    const NEEDED: [&str; 2] = [
        "cuStreamUpdateCaptureDependencies_v2",
        "cuStreamGetCaptureInfo_v3",
    ];
    // SAFETY: the driver library is loaded (a device was opened); looking a
    // symbol up runs nothing.
    let lib = unsafe { sys::culib() };
    let missing: Vec<&str> = NEEDED
        .into_iter()
        // SAFETY: only the symbol's presence is checked; it is never called.
        .filter(|name| unsafe { lib.get::<*const ()>(name.as_bytes()) }.is_err())
        .collect();
    (!missing.is_empty()).then(|| format!("the CUDA driver lacks {}", missing.join(" and ")))
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: instantiated once, destroyed once; errors are ignored.
        unsafe {
            let _ = self.device.bind();
            let _ = result::graph::exec_destroy(self.exec);
        }
    }
}
