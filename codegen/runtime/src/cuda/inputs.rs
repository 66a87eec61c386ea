//! Device inputs copied by an entry point's CUDA graph itself.
//!
//! An input given in device memory (a PyTorch or CuPy array) is copied into
//! its fixed arena before the steps read it. Queued as its own call before
//! the graph's launch, that copy costs host time the GPU waits through: on an
//! H200 host, 4.6 µs for `cuMemcpyDtoDAsync` and 4.3 µs for the launch of
//! the ids' checked copy, against 1.8 µs for the graph's launch
//! (`benches/gpu_driver_costs.py`) — a tenth of a small model's step.
//!
//! So the graph's first nodes are the copies: captured with the caller's
//! address of the call that captures, and pointed at another address when a
//! later call brings one (`cuGraphExecMemcpyNodeSetParams`, or
//! `cuGraphExecKernelNodeSetParams_v2` for the checked copy: under a µs,
//! and nothing at all for the same address, as in a loop over one buffer). A
//! call that gives that input from the host instead disables the node
//! (`cuGraphNodeSetEnabled`) and copies it before the launch, as without a
//! graph. Only inputs of a few MiB at most: the driver may run a graph's copy
//! node as a slower kernel, which for a large input costs more than the call
//! saves. A change applies to launches queued after it only, so each of
//! [`Executor::run_steps`](super::Executor::run_steps)' runs reads its own
//! batch.

use std::ffi::c_void;

use cudarc::driver::{result, sys};

use super::device::{check, Device};
use crate::error::Error;

/// How an input reaches its arena on the device.
pub(crate) enum InputCopy {
    /// A plain copy of `bytes` bytes to `dst`.
    Memcpy { dst: u64, bytes: usize },
    /// The ids' checked copy ([`IdsCheck`](super::ids::IdsCheck)): a kernel.
    Kernel(KernelLaunch),
}

impl InputCopy {
    /// Queues the copy from `src` on the device's stream (or its capture).
    pub(crate) fn queue(&mut self, device: &Device, src: u64, what: &str) -> Result<(), Error> {
        match self {
            InputCopy::Memcpy { dst, bytes } => {
                // SAFETY: `dst` is an input arena of at least `bytes` bytes and
                // `src` a device array of this device holding as many, kept by
                // the caller until the stream is synchronized (checked by the
                // executor before it builds the copy).
                check(
                    unsafe { result::memcpy_dtod_async(*dst, src, *bytes, device.stream()) },
                    || format!("copying {what} on the GPU"),
                )
            }
            InputCopy::Kernel(launch) => {
                launch.set_src(src);
                launch.queue(device, what)
            }
        }
    }

    fn node_type(&self) -> sys::CUgraphNodeType {
        match self {
            InputCopy::Memcpy { .. } => sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY,
            InputCopy::Kernel(_) => sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL,
        }
    }
}

/// A kernel launch whose first parameter is a source address: its function,
/// grid and parameter slots, kept to queue it or to set a graph node's
/// parameters.
pub(crate) struct KernelLaunch {
    pub(crate) function: sys::CUfunction,
    pub(crate) blocks: u32,
    pub(crate) threads: u32,
    /// One 8-byte slot per parameter (u32 parameters in the low bytes); slot
    /// 0 is the source address.
    pub(crate) slots: [u64; 6],
}

impl KernelLaunch {
    fn set_src(&mut self, src: u64) {
        self.slots[0] = src;
    }

    /// Queues the kernel on the device's stream.
    pub(crate) fn queue(&mut self, device: &Device, what: &str) -> Result<(), Error> {
        let mut params = self
            .slots
            .each_mut()
            .map(|s| (s as *mut u64).cast::<c_void>());
        // SAFETY: a kernel of the executor's module taking the six parameters
        // `params` points at, which the driver reads before this returns; the
        // addresses in them were checked by whoever built the launch.
        let status = unsafe {
            sys::cuLaunchKernel(
                self.function,
                self.blocks,
                1,
                1,
                self.threads,
                1,
                1,
                0,
                device.stream(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        check(status.result(), || {
            format!("{what}: launching its checked copy")
        })
    }
}

/// One input's copy as a node of an instantiated graph.
pub(crate) struct InputNode {
    /// The input arena's index among the executor's arenas.
    pub(crate) arena: usize,
    node: sys::CUgraphNode,
    copy: InputCopy,
    /// The address the node copies from.
    src: u64,
    enabled: bool,
}

// SAFETY: a node handle of the graph that owns this value, used with the
// device's context bound, by one thread at a time (`&mut` users only).
unsafe impl Send for InputNode {}

impl InputNode {
    /// Queues `copy` from `src` on the capturing stream, and keeps the node
    /// it becomes.
    ///
    /// # Errors
    /// [`Error::Device`] when the copy cannot be queued, or the capture does
    /// not end in one node of the copy's kind (a driver that captures copies
    /// otherwise).
    pub(crate) fn capture(
        device: &Device,
        arena: usize,
        mut copy: InputCopy,
        src: u64,
        what: &str,
    ) -> Result<InputNode, Error> {
        copy.queue(device, src, what)?;
        let nodes = super::graph::capture_ends(device.stream())
            .map_err(|e| Error::Device(format!("capturing the copy of {what}: {e}")))?;
        let [node] = nodes[..] else {
            return Err(Error::Device(format!(
                "capturing the copy of {what}: it ended in {} graph nodes, not one",
                nodes.len()
            )));
        };
        let mut kind = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
        // SAFETY: a node of the graph being captured; writes its type.
        check(
            unsafe { sys::cuGraphNodeGetType(node, &mut kind) }.result(),
            || format!("capturing the copy of {what}: reading its node's type"),
        )?;
        if kind != copy.node_type() {
            return Err(Error::Device(format!(
                "capturing the copy of {what}: the driver made it a {kind:?} node, not a {:?} \
                 one, which this runtime cannot point at another array (create the step \
                 with graph_inputs=False)",
                copy.node_type()
            )));
        }
        Ok(InputNode {
            arena,
            node,
            copy,
            src,
            enabled: true,
        })
    }

    /// Makes the node of `exec` copy from `src` (nothing to do when it
    /// already does), enabled.
    ///
    /// # Errors
    /// [`Error::Device`] naming `what` when the driver refuses the change.
    pub(crate) fn feed(
        &mut self,
        exec: sys::CUgraphExec,
        device: &Device,
        src: u64,
        what: &str,
    ) -> Result<(), Error> {
        if src != self.src {
            let status = match &mut self.copy {
                InputCopy::Memcpy { dst, bytes } => {
                    let params = memcpy_params(src, *dst, *bytes);
                    // SAFETY: a memcpy node of the graph `exec` was instantiated
                    // from (kept alive by it); device to device in the same
                    // context, as captured, the addresses checked by the caller.
                    unsafe {
                        sys::cuGraphExecMemcpyNodeSetParams(
                            exec,
                            self.node,
                            &params,
                            device.context(),
                        )
                    }
                }
                InputCopy::Kernel(launch) => {
                    launch.set_src(src);
                    let mut params = launch
                        .slots
                        .each_mut()
                        .map(|s| (s as *mut u64).cast::<c_void>());
                    let node = sys::CUDA_KERNEL_NODE_PARAMS {
                        func: launch.function,
                        gridDimX: launch.blocks,
                        gridDimY: 1,
                        gridDimZ: 1,
                        blockDimX: launch.threads,
                        blockDimY: 1,
                        blockDimZ: 1,
                        sharedMemBytes: 0,
                        kernelParams: params.as_mut_ptr(),
                        extra: std::ptr::null_mut(),
                        kern: std::ptr::null_mut(),
                        ctx: std::ptr::null_mut(),
                    };
                    // SAFETY: the kernel node of `exec`'s graph, set to the same
                    // function and grid with the new source; the driver copies
                    // the parameters before returning.
                    unsafe { sys::cuGraphExecKernelNodeSetParams_v2(exec, self.node, &node) }
                }
            };
            check(status.result(), || {
                format!(
                    "pointing the graph's copy of {what} at the array given (create the step \
                     with graph_inputs=False if this driver refuses it)"
                )
            })?;
            self.src = src;
        }
        self.set_enabled(exec, true, what)
    }

    /// Disables the node of `exec` (the input comes from the host this call,
    /// copied before the launch).
    pub(crate) fn skip(&mut self, exec: sys::CUgraphExec, what: &str) -> Result<(), Error> {
        self.set_enabled(exec, false, what)
    }

    fn set_enabled(&mut self, exec: sys::CUgraphExec, on: bool, what: &str) -> Result<(), Error> {
        if self.enabled == on {
            return Ok(());
        }
        // SAFETY: a node of the graph `exec` was instantiated from.
        check(
            unsafe { sys::cuGraphNodeSetEnabled(exec, self.node, u32::from(on)) }.result(),
            || format!("turning the graph's copy of {what} on or off"),
        )?;
        self.enabled = on;
        Ok(())
    }
}

/// A one-dimensional device-to-device copy, as `cuMemcpyDtoD` describes it.
fn memcpy_params(src: u64, dst: u64, bytes: usize) -> sys::CUDA_MEMCPY3D {
    let device = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
    sys::CUDA_MEMCPY3D {
        srcXInBytes: 0,
        srcY: 0,
        srcZ: 0,
        srcLOD: 0,
        srcMemoryType: device,
        srcHost: std::ptr::null(),
        srcDevice: src,
        srcArray: std::ptr::null_mut(),
        reserved0: std::ptr::null_mut(),
        srcPitch: bytes,
        srcHeight: 1,
        dstXInBytes: 0,
        dstY: 0,
        dstZ: 0,
        dstLOD: 0,
        dstMemoryType: device,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst,
        dstArray: std::ptr::null_mut(),
        reserved1: std::ptr::null_mut(),
        dstPitch: bytes,
        dstHeight: 1,
        WidthInBytes: bytes,
        Height: 1,
        Depth: 1,
    }
}
