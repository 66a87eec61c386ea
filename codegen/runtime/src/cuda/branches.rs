//! Parallel branches in an entry point's graph, kept only where they pay.
//!
//! Steps that do not wait for each other may run at once: for a small batch,
//! whose kernels each fill a fraction of the GPU, that hides most of their
//! latency (MLP b128 on an H200: 93 → 80 µs per step). For a large batch the
//! same overlap slows the step down (MLP b8192: 372 → 423 µs): the big GEMMs
//! then share SMs and L2, and the last one on the critical path finishes
//! later. Which wins depends on the sizes and the GPU, so the step is captured
//! in order and in each [`Schedule`] the runtime proposes (every branch the
//! plan allows; the same with the GEMMs kept one after another, so only the
//! small kernels run beside them), each graph replayed a few times on the
//! call's own inputs, and the fastest kept — as the autotuner times GEMM
//! algorithms.
//!
//! Replays of `train` change the params and optimizer state; those arenas
//! (the persistent ones) are saved first and put back after, so the timing
//! leaves nothing behind. If the copy cannot be allocated, or the driver
//! cannot time, the steps run one after another, and the report says why.

use super::autotune::Timer;
use super::device::{Device, DeviceBuffer};
use super::graph::Graph;
use super::inputs::InputNode;
use crate::error::Error;

/// Replays of each graph timed (alternating, the fastest kept), after one
/// untimed replay each.
const ROUNDS: usize = 5;

/// A graph with branches is kept only when it is this much faster: on a tie,
/// the steps one after another (the simpler schedule) win.
const MARGIN: f64 = 0.99;

/// A device memory range `(address, bytes)` that replays change.
pub type Persistent = (u64, usize);

/// A way to run the steps: its name for reports, and for each step the steps
/// it waits for.
pub type Schedule = (&'static str, Vec<Vec<usize>>);

/// The entry's graph — its steps one after another, or as one of
/// `schedules` (step `i` waiting for `after[i]` only), whichever replays
/// fastest — and one line saying which, with every time. `enqueue(i)` queues
/// step `i`; `persistent` are the ranges a replay changes, restored after the
/// timing. Each graph starts with the copies of device inputs `inputs`
/// queues.
pub(crate) fn capture_faster(
    device: &Device,
    what: &str,
    count: usize,
    schedules: &[Schedule],
    persistent: &[Persistent],
    inputs: impl Fn() -> Result<Vec<InputNode>, Error>,
    enqueue: impl Fn(usize) -> Result<(), Error>,
) -> Result<(Graph, String), Error> {
    let in_order =
        Graph::capture_inputs(device, what, &inputs, || (0..count).try_for_each(&enqueue))?;
    let mut graphs = vec![("in order", in_order)];
    for (name, after) in schedules {
        let graph = Graph::capture_steps(device, what, &inputs, after, &enqueue)?;
        graphs.push((name, graph));
    }
    if graphs.len() == 1 {
        return Ok((graphs.remove(0).1, "in order".into()));
    }
    let timer = match Timer::new(device) {
        Ok(timer) => timer,
        Err(why) => return Ok((graphs.remove(0).1, format!("in order (cannot time: {why})"))),
    };
    let bytes = persistent.iter().map(|&(_, n)| n).sum();
    let saved = match device.alloc_zeroed(bytes, "a copy of the params and state") {
        Ok(saved) => saved,
        Err(why) => return Ok((graphs.remove(0).1, format!("in order (untimed: {why})"))),
    };
    copy(&saved, persistent, Direction::Save, what)?;
    let times = time_all(&timer, &mut graphs, what);
    copy(&saved, persistent, Direction::Restore, what)?;
    device.synchronize(|| format!("restoring the params and state after timing {what}"))?;
    let times = times?;
    let fastest = (1..times.len())
        .filter(|&k| times[k] < MARGIN * times[0])
        .min_by(|&a, &b| times[a].total_cmp(&times[b]))
        .unwrap_or(0);
    let timings: Vec<String> = graphs
        .iter()
        .zip(&times)
        .map(|((name, _), us)| format!("{name} {us:.1} µs"))
        .collect();
    let (name, graph) = graphs.swap_remove(fastest);
    Ok((
        graph,
        format!("{name} (per replay: {})", timings.join(", ")),
    ))
}

/// The fastest of [`ROUNDS`] timed replays of each graph, in µs.
fn time_all(timer: &Timer, graphs: &mut [(&str, Graph)], what: &str) -> Result<Vec<f64>, Error> {
    for (_, graph) in graphs.iter_mut() {
        graph.upload(what)?;
        graph.launch(what)?;
    }
    let mut best = vec![f64::INFINITY; graphs.len()];
    for _ in 0..ROUNDS {
        for ((_, graph), best) in graphs.iter_mut().zip(&mut best) {
            *best = best.min(timer.elapsed_around(|| graph.launch(what))?);
        }
    }
    Ok(best)
}

enum Direction {
    Save,
    Restore,
}

/// Queues copies between the persistent ranges and `saved`, packed in order.
fn copy(
    saved: &DeviceBuffer,
    persistent: &[Persistent],
    direction: Direction,
    what: &str,
) -> Result<(), Error> {
    let mut at = 0;
    for &(address, bytes) in persistent {
        let what = format!("the params and state around timing {what}");
        match direction {
            Direction::Save => saved.copy_from_device_at_async::<u8>(at, address, bytes, &what)?,
            Direction::Restore => saved.copy_to_device_async(at, address, bytes, &what)?,
        }
        at += bytes;
    }
    Ok(())
}
