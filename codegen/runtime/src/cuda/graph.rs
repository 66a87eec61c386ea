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

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: instantiated once, destroyed once; errors are ignored.
        unsafe {
            let _ = self.device.bind();
            let _ = result::graph::exec_destroy(self.exec);
        }
    }
}
