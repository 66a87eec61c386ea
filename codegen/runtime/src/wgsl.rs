//! The WebGPU runtime (feature `wgsl`): runs the WGSL compute shaders of a
//! generated module through `wgpu` (Vulkan, Metal or DX12; on a CPU-only Linux
//! machine, Mesa's lavapipe).
//!
//! A generated module describes its step as static data and this module does
//! the rest:
//!
//! - **Storage.** Every value lives in one of three storage buffers, bound to
//!   group 0 of every shader: `f32s` (binding 0: params, optimizer state, f32
//!   temps, f32 constants and f32 inputs, each a region at a fixed element
//!   offset), `i32s` (binding 1) and `bools` (binding 2, one `u32` per bool).
//!   Binding 3, `status`, is one atomic `u32` that a shader sets when it meets
//!   an id out of range. Offsets are baked into the shaders, so a shader needs no
//!   uniforms and a model needs 4 of the 8 storage buffers WebGPU allows a stage.
//! - **Creation** ([`Device::new`]): the adapter (any GPU, else a CPU one such as
//!   lavapipe), a device with the adapter's buffer-size limits, the buffers,
//!   and one compute pipeline per shader. A shader that fails validation is an
//!   error here, naming the shader; nothing is skipped.
//! - **A step** ([`Device::run`]): the inputs are written to their regions, then
//!   one command encoder records one compute pass (the dispatches in order,
//!   wgpu orders them) and the copies of what comes back into a staging
//!   buffer, which is mapped and read once the queue is done.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::error::Error;

/// The storage buffer an element lives in: its binding in group 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// `f32s`: params, state, f32 temps, constants and inputs.
    F32 = 0,
    /// `i32s`: i32 temps, constants and inputs.
    I32 = 1,
    /// `bools`: bool temps and constants, one `u32` (0 or 1) each.
    Bool = 2,
}

/// `len` elements of one binding from element `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// The buffer.
    pub binding: Binding,
    /// First element.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
}

/// One WGSL compute shader; its entry point is `main`.
#[derive(Clone, Copy, Debug)]
pub struct Shader {
    /// Name, for messages (the first kernel that uses it).
    pub name: &'static str,
    /// WGSL source.
    pub source: &'static str,
}

/// One dispatch of a step: `shader` (an index into the module's shaders) over
/// `groups` workgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// Index of the shader.
    pub shader: usize,
    /// Workgroups in x, y, z (each at most 65,535).
    pub groups: [u32; 3],
}

impl Dispatch {
    /// `shader` over `groups` workgroups.
    pub const fn new(shader: usize, groups: [u32; 3]) -> Self {
        Dispatch { shader, groups }
    }
}

/// Elements of each storage buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Elements of `f32s`.
    pub f32_len: usize,
    /// Elements of `i32s`.
    pub i32_len: usize,
    /// Elements of `bools`.
    pub bool_len: usize,
}

const STATUS_BINDING: u32 = 3;

/// What came back from the device: one vector of 4-byte words per region read.
#[derive(Debug, Default)]
pub struct Readback {
    words: Vec<Vec<u32>>,
}

impl Readback {
    /// Region `i` as f32.
    pub fn f32(&self, i: usize) -> Vec<f32> {
        self.words[i].iter().map(|w| f32::from_bits(*w)).collect()
    }

    /// Region `i` as i32.
    pub fn i32(&self, i: usize) -> Vec<i32> {
        self.words[i].iter().map(|w| *w as i32).collect()
    }

    /// Region `i` as bools (bytes 0/1, as the CPU backend returns them).
    pub fn bool(&self, i: usize) -> Vec<u8> {
        self.words[i].iter().map(|w| u8::from(*w != 0)).collect()
    }
}

/// A wgpu device holding one model's buffers and pipelines.
pub struct Device {
    model: String,
    adapter: String,
    device: wgpu::Device,
    queue: wgpu::Queue,
    buffers: [wgpu::Buffer; 4],
    staging: Option<wgpu::Buffer>,
    pipelines: Vec<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    lost: Arc<Mutex<Option<String>>>,
}

impl Device {
    /// Choose an adapter, create the device, the buffers (zeroed) and a pipeline
    /// per shader.
    ///
    /// # Errors
    /// [`Error::NoDevice`] when no adapter exists (with what to install),
    /// [`Error::Device`] when a shader fails validation (its name and the
    /// validator's message) or the device refuses something, and
    /// [`Error::DeviceAlloc`] when a buffer is larger than the adapter allows.
    pub fn new(model: &str, shaders: &[Shader], layout: Layout) -> Result<Self, Error> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| {
            Error::NoDevice(format!(
                "no WebGPU adapter for model `{model}` ({e}): the wgsl backend needs a GPU \
                 with Vulkan, Metal or DX12 drivers, or a CPU implementation such as \
                 Mesa's lavapipe (Debian/Ubuntu: apt-get install mesa-vulkan-drivers)"
            ))
        })?;
        let info = adapter.get_info();
        let adapter_name = format!("{} ({:?}, {})", info.name, info.backend, info.driver);
        let supported = adapter.limits();
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: supported.max_storage_buffer_binding_size,
            max_buffer_size: supported.max_buffer_size,
            ..wgpu::Limits::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some(model),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::NoDevice(format!("{adapter_name}: cannot create a device: {e}")))?;
        let lost = Arc::new(Mutex::new(None));
        // Errors outside a scope would panic in wgpu's default handler: keep them.
        let sink = Arc::clone(&lost);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut slot) = sink.lock() {
                slot.get_or_insert_with(|| e.to_string());
            }
        }));

        let sizes = [layout.f32_len, layout.i32_len, layout.bool_len, 1];
        let names = ["f32s", "i32s", "bools", "status"];
        let limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let mut made = Vec::with_capacity(4);
        for (len, name) in sizes.iter().zip(names) {
            let bytes = 4 * (*len).max(1) as u64;
            if bytes > limit {
                return Err(Error::DeviceAlloc {
                    bytes: bytes as usize,
                    what: format!(
                        "the `{name}` storage buffer of model `{model}` ({adapter_name} binds \
                         at most {limit} bytes)"
                    ),
                });
            }
            made.push(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(name),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }));
        }
        let buffers: [wgpu::Buffer; 4] =
            made.try_into().map_err(|_| Error::layout("four buffers"))?;

        let entries: Vec<wgpu::BindGroupLayoutEntry> = (0..=STATUS_BINDING)
            .map(|binding| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: false },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let bind_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("ferrograd storage"),
            entries: &entries,
        });
        let bind_entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .zip(0..)
            .map(|(buffer, binding)| wgpu::BindGroupEntry {
                binding,
                resource: buffer.as_entire_binding(),
            })
            .collect();
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("ferrograd storage"),
            layout: &bind_layout,
            entries: &bind_entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("ferrograd"),
            bind_group_layouts: &[Some(&bind_layout)],
            immediate_size: 0,
        });
        // Shader compilation dominates creation: compile on every core. Error
        // scopes are per thread, so each shader gets its own.
        let pipelines = shaders
            .par_iter()
            .map(|shader| pipeline(&device, &pipeline_layout, shader))
            .collect::<Result<Vec<_>, Error>>()?;
        let step = Device {
            model: model.to_string(),
            adapter: adapter_name,
            device,
            queue,
            buffers,
            staging: None,
            pipelines,
            bind_group,
            lost,
        };
        step.check()?;
        Ok(step)
    }

    /// The adapter in use: name, backend and driver.
    pub fn adapter(&self) -> &str {
        &self.adapter
    }

    /// Write `data` into `binding` from element `offset` (before the next run).
    pub fn write_f32(&self, offset: usize, data: &[f32]) {
        let words: Vec<u32> = data.iter().map(|v| v.to_bits()).collect();
        self.write(Binding::F32, offset, &words);
    }

    /// Write i32 values; see [`Device::write_f32`].
    pub fn write_i32(&self, offset: usize, data: &[i32]) {
        let words: Vec<u32> = data.iter().map(|v| *v as u32).collect();
        self.write(Binding::I32, offset, &words);
    }

    /// Write bools given as bytes (nonzero is true); see [`Device::write_f32`].
    pub fn write_bool(&self, offset: usize, data: &[u8]) {
        let words: Vec<u32> = data.iter().map(|v| u32::from(*v != 0)).collect();
        self.write(Binding::Bool, offset, &words);
    }

    fn write(&self, binding: Binding, offset: usize, words: &[u32]) {
        if words.is_empty() {
            return;
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.queue
            .write_buffer(&self.buffers[binding as usize], 4 * offset as u64, &bytes);
    }

    /// Run `plan` (one compute pass in one command encoder), then read `reads`
    /// back through a mapped staging buffer.
    ///
    /// # Errors
    /// [`Error::Device`] for anything the device reports (a lost device, a
    /// validation error), and when a shader met an id out of range.
    pub fn run(&mut self, plan: &[Dispatch], reads: &[Region]) -> Result<Readback, Error> {
        let total: usize = reads.iter().map(|r| r.len).sum::<usize>() + 1;
        let staging = self.staging(4 * total as u64);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some(&self.model),
            });
        encoder.clear_buffer(&self.buffers[STATUS_BINDING as usize], 0, None);
        if !plan.is_empty() {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            pass.set_bind_group(0, &self.bind_group, &[]);
            for d in plan {
                let pipeline = self.pipelines.get(d.shader).ok_or_else(|| {
                    Error::layout(format!(
                        "dispatch of shader {} of {}",
                        d.shader,
                        self.pipelines.len()
                    ))
                })?;
                pass.set_pipeline(pipeline);
                pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
            }
        }
        let mut at = 0_u64;
        for r in reads {
            let bytes = 4 * r.len as u64;
            if bytes > 0 {
                let src = &self.buffers[r.binding as usize];
                encoder.copy_buffer_to_buffer(src, 4 * r.offset as u64, &staging, at, bytes);
            }
            at += bytes;
        }
        let status = &self.buffers[STATUS_BINDING as usize];
        encoder.copy_buffer_to_buffer(status, 0, &staging, at, 4);
        self.queue.submit([encoder.finish()]);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Device(format!("{}: {e}", self.model)));
        }
        let words = self.map(&staging, at + 4)?;
        self.check()?;
        if words[words.len() - 1] != 0 {
            return Err(Error::Device(format!(
                "{}: an id computed inside the model is out of range of its table \
                 (a gather or scatter-add kernel skipped it)",
                self.model
            )));
        }
        let mut out = Readback::default();
        let mut start = 0;
        for r in reads {
            out.words.push(words[start..start + r.len].to_vec());
            start += r.len;
        }
        Ok(out)
    }

    /// A staging buffer of at least `bytes`, grown when needed (kept between runs).
    fn staging(&mut self, bytes: u64) -> wgpu::Buffer {
        if let Some(s) = &self.staging {
            if s.size() >= bytes {
                return s.clone();
            }
        }
        let s = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("ferrograd staging"),
            size: bytes.next_power_of_two().max(256),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.staging = Some(s.clone());
        s
    }

    /// The first `bytes` of `staging` as words, once the queue is done.
    fn map(&self, staging: &wgpu::Buffer, bytes: u64) -> Result<Vec<u32>, Error> {
        let slice = staging.slice(..bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("{}: waiting for the device: {e}", self.model)))?;
        rx.recv()
            .map_err(|_| {
                Error::Device(format!(
                    "{}: the staging buffer was never mapped",
                    self.model
                ))
            })?
            .map_err(|e| {
                Error::Device(format!(
                    "{}: cannot map the staging buffer: {e}",
                    self.model
                ))
            })?;
        let words = {
            let view = slice.get_mapped_range().map_err(|e| {
                Error::Device(format!(
                    "{}: cannot read the staging buffer: {e}",
                    self.model
                ))
            })?;
            view.chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        staging.unmap();
        Ok(words)
    }

    /// An error the device reported outside a scope (or its loss), if any.
    fn check(&self) -> Result<(), Error> {
        match self.lost.lock().map(|slot| slot.clone()) {
            Ok(None) => Ok(()),
            Ok(Some(msg)) => Err(Error::Device(format!(
                "{} on {}: {msg}",
                self.model, self.adapter
            ))),
            Err(_) => Err(Error::Device(format!(
                "{}: error state poisoned",
                self.model
            ))),
        }
    }
}

/// The compute pipeline of one shader; a validation error names the shader.
fn pipeline(
    device: &wgpu::Device,
    layout: &wgpu::PipelineLayout,
    shader: &Shader,
) -> Result<wgpu::ComputePipeline, Error> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(shader.name),
        source: wgpu::ShaderSource::Wgsl(Cow::Borrowed(shader.source)),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(shader.name),
        layout: Some(layout),
        module: &module,
        entry_point: Some("main"),
        compilation_options: wgpu::PipelineCompilationOptions::default(),
        cache: None,
    });
    match pollster::block_on(scope.pop()) {
        None => Ok(pipeline),
        Some(e) => Err(Error::Device(format!(
            "shader `{}` failed validation (a ferrograd bug): {e}",
            shader.name
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOUBLE: &str = "
@group(0) @binding(0) var<storage, read_write> f32s: array<f32>;
@group(0) @binding(1) var<storage, read_write> i32s: array<i32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= 100u) {
        return;
    }
    f32s[128u + i] = 2.0 * f32s[i] + f32(i32s[i]);
}
";

    fn device(shaders: &[Shader]) -> Option<Result<Device, Error>> {
        let layout = Layout {
            f32_len: 256,
            i32_len: 100,
            bool_len: 0,
        };
        match Device::new("test", shaders, layout) {
            Err(Error::NoDevice(msg)) => {
                eprintln!("skipped: {msg}");
                None
            }
            other => Some(other),
        }
    }

    #[test]
    fn a_shader_runs_and_reads_back() {
        let shaders = [Shader {
            name: "double",
            source: DOUBLE,
        }];
        let Some(dev) = device(&shaders) else { return };
        let mut dev = dev.expect("device");
        let x: Vec<f32> = (0..100).map(|i| i as f32 * 0.5).collect();
        let k: Vec<i32> = (0..100).collect();
        dev.write_f32(0, &x);
        dev.write_i32(0, &k);
        let plan = [Dispatch {
            shader: 0,
            groups: [2, 1, 1],
        }];
        let reads = [Region {
            binding: Binding::F32,
            offset: 128,
            len: 100,
        }];
        let out = dev.run(&plan, &reads).expect("run").f32(0);
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, 2.0 * x[i] + i as f32);
        }
    }

    #[test]
    fn an_invalid_shader_is_an_error_naming_it() {
        let shaders = [Shader {
            name: "broken",
            source: "@compute @workgroup_size(64) fn main() { let x: f32 = 1u; }",
        }];
        let Some(result) = device(&shaders) else {
            return;
        };
        let msg = result.err().expect("an error").to_string();
        assert!(
            msg.contains("broken") && msg.contains("validation"),
            "{msg}"
        );
    }
}
