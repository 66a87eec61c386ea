//! CUDA graphs: an entry point's launches captured once from the stream, then
//! replayed with one call.

use std::cell::RefCell;

use cudarc::driver::result;
use cudarc::driver::sys;

use super::device::{check, Device};
use super::inputs::InputNode;
use crate::error::Error;

/// An instantiated graph, replayable on the device's stream.
pub struct Graph {
    exec: sys::CUgraphExec,
    /// The graph it was instantiated from, kept while its input nodes may be
    /// changed (their handles are its nodes).
    graph: sys::CUgraph,
    /// The copies of device inputs it starts with.
    inputs: Vec<InputNode>,
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
        Graph::capture_inputs(device, what, || Ok(Vec::new()), enqueue)
    }

    /// [`capture`](Self::capture), the graph starting with the copies of
    /// device inputs `inputs` queues (their nodes kept, to point them at other
    /// arrays later: [`Graph::inputs`]).
    pub(crate) fn capture_inputs(
        device: &Device,
        what: &str,
        inputs: impl FnOnce() -> Result<Vec<InputNode>, Error>,
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
        let queued = inputs().and_then(|nodes| enqueue().map(|()| nodes));
        // SAFETY: ends the capture begun above, whatever happened in between.
        let ended = unsafe { result::stream::end_capture(stream) };
        let (graph, inputs) = match (queued, ended) {
            (Err(e), Ok(graph)) => {
                if !graph.is_null() {
                    // SAFETY: the captured graph, never used.
                    let _ = unsafe { result::graph::destroy(graph) };
                }
                return Err(e);
            }
            (Err(e), Err(_)) => return Err(e),
            (Ok(nodes), ended) => (
                check(ended, || format!("capturing {what} into a CUDA graph"))?,
                nodes,
            ),
        };
        // SAFETY: a complete captured graph.
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
        let exec = match exec {
            Ok(exec) => exec,
            Err(e) => {
                // SAFETY: the captured graph, never used.
                let _ = unsafe { result::graph::destroy(graph) };
                return check(Err(e), || format!("instantiating the CUDA graph of {what}"));
            }
        };
        Ok(Graph {
            exec,
            graph,
            inputs,
            device: device.clone(),
        })
    }

    /// Records the steps `enqueue(i)` queues, for `i` in order, after the
    /// copies `inputs` queues, as [`capture_inputs`](Self::capture_inputs)
    /// does, but with step `i`'s first work
    /// depending only on the last work of the steps `after[i]` (indices below
    /// `i`): steps that do not wait for each other become parallel branches
    /// of the graph, which the GPU runs at once. A step that queues nothing
    /// passes its own dependencies on.
    ///
    /// This sets the stream's capture dependencies before each step
    /// (`cuStreamUpdateCaptureDependencies_v2`) and reads them after it
    /// (`cuStreamGetCaptureInfo_v3`); one stream, no events.
    pub(crate) fn capture_steps(
        device: &Device,
        what: &str,
        inputs: impl FnOnce() -> Result<Vec<InputNode>, Error>,
        after: &[Vec<usize>],
        mut enqueue: impl FnMut(usize) -> Result<(), Error>,
    ) -> Result<Graph, Error> {
        let stream = device.stream();
        let head = RefCell::new(Vec::new());
        let inputs = || {
            let nodes = inputs()?;
            if !nodes.is_empty() {
                *head.borrow_mut() = capture_ends(stream).map_err(|e| {
                    Error::Device(format!("capturing {what}: after its inputs' copies: {e}"))
                })?;
            }
            Ok(nodes)
        };
        Graph::capture_inputs(device, what, inputs, || {
            let mut ends: Vec<Vec<sys::CUgraphNode>> = Vec::with_capacity(after.len());
            for (i, waits) in after.iter().enumerate() {
                // A step that waits for no other step waits for the inputs' copies.
                let mut nodes: Vec<sys::CUgraphNode> = if waits.is_empty() {
                    head.borrow().clone()
                } else {
                    Vec::new()
                };
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

    /// The copies of device inputs the graph starts with, and its
    /// executable handle (to change them with).
    pub(crate) fn inputs(&mut self) -> (&mut [InputNode], sys::CUgraphExec) {
        (&mut self.inputs, self.exec)
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
pub(crate) fn capture_ends(stream: sys::CUstream) -> Result<Vec<sys::CUgraphNode>, String> {
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
            let _ = result::graph::destroy(self.graph);
        }
    }
}
