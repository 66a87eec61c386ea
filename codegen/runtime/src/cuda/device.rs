//! The GPU: the CUDA driver (loaded with dlopen on first use), one device's
//! primary context, one stream, and device allocations.

use std::ffi::c_int;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use crate::arena::Element;
use crate::error::Error;
use crate::py::ProducerStream;

/// `CUDA_ERROR_NAME (the driver's sentence)`.
pub(crate) fn describe(e: DriverError) -> String {
    let name = e.error_name().map_or_else(
        |_| format!("{:?}", e.0),
        |s| s.to_string_lossy().into_owned(),
    );
    match e.error_string() {
        Ok(text) => format!("{name} ({})", text.to_string_lossy()),
        Err(_) => name,
    }
}

/// A driver result as a runtime [`Error::Device`] that says what was being done.
pub(crate) fn check<T>(
    r: Result<T, DriverError>,
    what: impl FnOnce() -> String,
) -> Result<T, Error> {
    r.map_err(|e| Error::Device(format!("{}: {}", what(), describe(e))))
}

/// Whether the CUDA driver library (`libcuda.so`) can be loaded here. Loading
/// it never happens before this says yes, so machines without CUDA get an
/// error instead of a panic.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library under its usual names.
    unsafe { sys::is_culib_present() }
}

/// The message of [`Error::NoDevice`] when the driver library is missing.
pub const NO_DRIVER: &str = "no CUDA driver found: the NVIDIA driver library \
     (libcuda.so.1) is not on this machine's library path, so CUDA steps cannot \
     run here (the CPU step of the same module can: backend=\"cpu\")";

/// One GPU: its primary context (shared with other CUDA libraries in the
/// process, e.g. PyTorch or CuPy) and one stream every call of the runtime
/// is queued on. Cheap to clone.
#[derive(Clone)]
pub struct Device {
    inner: Arc<Inner>,
}

struct Inner {
    ordinal: usize,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    /// The event [`Device::wait_for`] records on a producer's stream: made
    /// once (creating and destroying one costs ~2 µs a call), and locked while
    /// recorded and waited for.
    event: Mutex<sys::CUevent>,
    name: String,
    capability: (i32, i32),
    driver_version: i32,
}

// SAFETY: CUDA contexts and streams may be used from any thread once the
// context is made current there, which every method does first (`bind`).
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

impl Device {
    /// Device `ordinal`: loads the driver, retains the primary context and
    /// creates a non-blocking stream.
    ///
    /// # Errors
    /// [`Error::NoDevice`] without a driver library, when `cuInit` fails (no
    /// GPU, or a driver/kernel-module mismatch) or when there is no device
    /// `ordinal`; [`Error::Device`] for the other failures.
    pub fn new(ordinal: usize) -> Result<Device, Error> {
        if !driver_available() {
            return Err(Error::NoDevice(NO_DRIVER.into()));
        }
        result::init().map_err(|e| {
            Error::NoDevice(format!(
                "the CUDA driver is installed but found no usable GPU: cuInit failed with {}",
                describe(e)
            ))
        })?;
        let count = check(result::device::get_count(), || {
            "counting CUDA devices".into()
        })?;
        let index = c_int::try_from(ordinal).ok().filter(|&i| i < count);
        let Some(index) = index else {
            return Err(Error::NoDevice(format!(
                "there is no CUDA device {ordinal}: the driver sees {count}"
            )));
        };
        let dev = check(result::device::get(index), || {
            format!("opening CUDA device {ordinal}")
        })?;
        // SAFETY: `dev` came from cuDeviceGet.
        let ctx = check(unsafe { result::primary_ctx::retain(dev) }, || {
            format!("creating a context on CUDA device {ordinal}")
        })?;
        let mut inner = Inner {
            ordinal,
            dev,
            ctx,
            stream: std::ptr::null_mut(),
            event: Mutex::new(std::ptr::null_mut()),
            name: String::new(),
            capability: (0, 0),
            driver_version: 0,
        };
        // From here on, dropping `inner` releases what was acquired.
        // SAFETY: `ctx` is the live primary context just retained.
        check(unsafe { result::ctx::set_current(ctx) }, || {
            "binding the CUDA context".into()
        })?;
        inner.stream = check(
            result::stream::create(result::stream::StreamKind::NonBlocking),
            || "creating a CUDA stream".into(),
        )?;
        *inner
            .event
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = check(
            result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING),
            || "creating a CUDA event".into(),
        )?;
        inner.name = result::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
        let attr = |a| {
            // SAFETY: `dev` is a valid device and `a` a valid attribute.
            check(unsafe { result::device::get_attribute(dev, a) }, || {
                "reading the device's compute capability".into()
            })
        };
        use sys::CUdevice_attribute::{
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR,
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR,
        };
        inner.capability = (attr(MAJOR)?, attr(MINOR)?);
        let mut version: c_int = 0;
        // SAFETY: writes one int.
        check(
            unsafe { sys::cuDriverGetVersion(&mut version) }.result(),
            || "reading the driver version".into(),
        )?;
        inner.driver_version = version;
        Ok(Device {
            inner: Arc::new(inner),
        })
    }

    /// Makes this device's context current on the calling thread (every
    /// method that talks to the GPU calls it first: a step may be used from
    /// any Python thread).
    pub fn bind(&self) -> Result<(), Error> {
        // SAFETY: the context lives as long as `self`.
        check(unsafe { result::ctx::set_current(self.inner.ctx) }, || {
            "binding the CUDA context".into()
        })
    }

    /// Waits for everything queued on the stream; an asynchronous failure of
    /// earlier work (an illegal address in a kernel, say) surfaces here.
    pub fn synchronize(&self, what: impl FnOnce() -> String) -> Result<(), Error> {
        // SAFETY: the stream lives as long as `self`.
        check(
            unsafe { result::stream::synchronize(self.inner.stream) },
            what,
        )
    }

    /// A zero-filled device allocation of `bytes` (none for 0 bytes).
    ///
    /// # Errors
    /// [`Error::DeviceAlloc`] (Python `MemoryError`) when the GPU's memory is
    /// exhausted, naming `what`.
    pub fn alloc_zeroed(&self, bytes: usize, what: &str) -> Result<DeviceBuffer, Error> {
        let mut buf = DeviceBuffer {
            ptr: 0,
            bytes: 0,
            device: self.clone(),
        };
        if bytes == 0 {
            return Ok(buf);
        }
        self.bind()?;
        // SAFETY: a plain allocation; zeroed below before anything reads it.
        buf.ptr = match unsafe { result::malloc_sync(bytes) } {
            Ok(ptr) => ptr,
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                return Err(Error::DeviceAlloc {
                    bytes,
                    what: what.into(),
                })
            }
            Err(e) => {
                return Err(Error::Device(format!(
                    "allocating {bytes} bytes for {what}: {}",
                    describe(e)
                )))
            }
        };
        buf.bytes = bytes;
        // SAFETY: [ptr, ptr + bytes) was just allocated; queued on our stream
        // so it is ordered before any later use of the buffer.
        check(
            unsafe { result::memset_d8_async(buf.ptr, 0, bytes, self.inner.stream) },
            || format!("zeroing {what}"),
        )?;
        Ok(buf)
    }

    /// The device's name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The CUDA ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// The compute capability `(major, minor)`, e.g. `(9, 0)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.capability
    }

    /// The driver's CUDA version as `1000 * major + 10 * minor` (13000 for 13.0).
    pub fn driver_version(&self) -> i32 {
        self.inner.driver_version
    }

    /// The CUDA ordinal of the device that holds address `ptr` (memory from
    /// another library: a CuPy or PyTorch array), or `None` when the driver
    /// does not know the address (host memory, a stale pointer).
    pub fn pointer_device(&self, ptr: u64) -> Option<usize> {
        let mut ordinal: c_int = -1;
        // SAFETY: the attribute is a C int written to `ordinal`; an unknown
        // pointer makes the call fail, which is the answer `None`.
        let r = unsafe {
            sys::cuPointerGetAttribute(
                std::ptr::from_mut(&mut ordinal).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            )
        };
        match r {
            sys::CUresult::CUDA_SUCCESS => usize::try_from(ordinal).ok(),
            _ => None,
        }
    }

    /// Makes our stream wait for `producer`'s queued work (stream-ordered, as
    /// the `__cuda_array_interface__` protocol asks): an event recorded on a
    /// stream handle, nothing when the producer says the data is ready, and
    /// the whole context when it says nothing.
    pub fn wait_for(&self, producer: ProducerStream, what: &str) -> Result<(), Error> {
        match producer {
            ProducerStream::Ready => Ok(()),
            ProducerStream::Unknown => check(result::ctx::synchronize(), || {
                format!("waiting for the GPU before reading {what}")
            }),
            ProducerStream::Handle(handle) => {
                // A poisoned lock guards no broken state: the event is only recorded.
                let event = self
                    .inner
                    .event
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                // SAFETY: `handle` is the producer's stream (1 and 2 are the
                // driver's own legacy / per-thread handles); the event is ours,
                // and a wait queued on it keeps the record it was queued after
                // (recording it again later changes nothing for that wait).
                let r = unsafe {
                    result::event::record(*event, handle as sys::CUstream).and_then(|()| {
                        result::stream::wait_event(
                            self.inner.stream,
                            *event,
                            sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                        )
                    })
                };
                check(r, || format!("waiting for the stream that produced {what}"))
            }
        }
    }

    pub(crate) fn stream(&self) -> sys::CUstream {
        self.inner.stream
    }

    pub(crate) fn context(&self) -> sys::CUcontext {
        self.inner.ctx
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.inner.ordinal)
            .field("name", &self.inner.name)
            .field("capability", &self.inner.capability)
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Errors are ignored: nothing can be done about them in a destructor,
        // and at interpreter exit the driver may already be shutting down.
        // SAFETY: our own context, stream and device; nothing uses them after.
        unsafe {
            let _ = result::ctx::set_current(self.ctx);
            if !self.stream.is_null() {
                let _ = result::stream::synchronize(self.stream);
                let _ = result::stream::destroy(self.stream);
            }
            let event = *self.event.get_mut().unwrap_or_else(PoisonError::into_inner);
            if !event.is_null() {
                let _ = result::event::destroy(event);
            }
            let _ = result::primary_ctx::release(self.dev);
        }
    }
}

/// One device allocation (an arena, a workspace), freed on drop.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    device: Device,
}

impl DeviceBuffer {
    /// The device address of the first byte (0 for an empty buffer).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn range<T>(&self, offset: usize, len: usize, what: &str) -> Result<(u64, usize), Error> {
        let size = std::mem::size_of::<T>();
        let fits = offset
            .checked_add(len)
            .and_then(|end| end.checked_mul(size))
            .is_some_and(|end| end <= self.bytes);
        if !fits {
            return Err(Error::layout(format!(
                "{what}: elements [{offset}, {offset} + {len}) of {size} bytes lie outside \
                 a device buffer of {} bytes",
                self.bytes
            )));
        }
        Ok((self.ptr + (offset * size) as u64, len * size))
    }

    /// Queues a copy of `data` to elements `offset..` (elements of `T`). The
    /// caller keeps `data` alive until the stream is synchronized.
    pub(crate) fn write_async<T: Element>(
        &self,
        offset: usize,
        data: &[T],
        what: &str,
    ) -> Result<(), Error> {
        let (dst, bytes) = self.range::<T>(offset, data.len(), what)?;
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the destination range lies inside this allocation (checked),
        // and `data` outlives the copy (the caller synchronizes before
        // returning to code that could free it).
        check(
            unsafe { result::memcpy_htod_async(dst, data, self.device.stream()) },
            || format!("copying {what} to the GPU"),
        )
    }

    /// Queues a copy of `len` elements of `T` from device address `src`
    /// (memory of this device) to elements `offset..offset + len`.
    pub(crate) fn copy_from_device_at_async<T: Element>(
        &self,
        offset: usize,
        src: u64,
        len: usize,
        what: &str,
    ) -> Result<(), Error> {
        let (dst, bytes) = self.range::<T>(offset, len, what)?;
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the destination range lies inside this allocation (checked);
        // the caller checked that `src` holds `len` elements of this device's
        // memory, and keeps it until the stream is synchronized.
        check(
            unsafe { result::memcpy_dtod_async(dst, src, bytes, self.device.stream()) },
            || format!("copying {what} on the GPU"),
        )
    }

    /// Queues a copy of this buffer's bytes `at..at + bytes` to device address
    /// `dst` (memory of this device).
    pub(crate) fn copy_to_device_async(
        &self,
        at: usize,
        dst: u64,
        bytes: usize,
        what: &str,
    ) -> Result<(), Error> {
        let (src, bytes) = self.range::<u8>(at, bytes, what)?;
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the source range lies inside this allocation (checked); the
        // caller checked that `dst` is memory of this device with room for
        // `bytes` bytes, and keeps this buffer until the stream is synchronized.
        check(
            unsafe { result::memcpy_dtod_async(dst, src, bytes, self.device.stream()) },
            || format!("copying {what} on the GPU"),
        )
    }

    /// Copies `data` to elements `offset..` and waits for the copy.
    pub fn write<T: Element>(&self, offset: usize, data: &[T], what: &str) -> Result<(), Error> {
        self.device.bind()?;
        self.write_async(offset, data, what)?;
        self.device
            .synchronize(|| format!("copying {what} to the GPU"))
    }

    /// Copies elements `offset..offset + out.len()` into `out`, after all
    /// work queued before.
    pub fn read<T: Element>(&self, offset: usize, out: &mut [T], what: &str) -> Result<(), Error> {
        let (src, bytes) = self.range::<T>(offset, out.len(), what)?;
        if bytes == 0 {
            return Ok(());
        }
        self.device.bind()?;
        // SAFETY: the source range lies inside this allocation (checked); we
        // wait for the copy before `out` is used.
        check(
            unsafe { result::memcpy_dtoh_async(out, src, self.device.stream()) },
            || format!("copying {what} from the GPU"),
        )?;
        self.device
            .synchronize(|| format!("copying {what} from the GPU"))
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        // SAFETY: allocated by cuMemAlloc and freed once; queued work that
        // used it is waited for first.
        unsafe {
            let _ = result::ctx::set_current(self.device.inner.ctx);
            let _ = result::stream::synchronize(self.device.stream());
            let _ = result::memory_free(self.ptr);
        }
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}
