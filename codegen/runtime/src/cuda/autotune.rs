//! Autotuning a GEMM step: time its candidate algorithms on its own operands
//! and keep the fastest.
//!
//! cuBLASLt's heuristic ranks algorithms by an estimate; for fp32 its first
//! choice is often not the fastest (another SIMT tile shape, split-K for a
//! long inner dimension). So when a step is created — in `Executor::new`,
//! before any entry point has run and therefore before any CUDA graph
//! capture — each GEMM's candidates run a few times on the executor's stream,
//! timed with CUDA events: up to [`TuneConfig::candidates`] results of the
//! heuristic, plus the plain cuBLAS call for a GEMM without an epilogue (the
//! path used before autotuning existed, kept unless something is clearly
//! faster). The choice holds for the executor's life; a GEMM identical to
//! one already timed (layout, epilogue, alignment, beta zero or not: `forward`
//! and `train` share most products) keeps that choice without timing, so each
//! product is computed the same way in every entry point. Another executor
//! times again and, timing being noisy, may choose otherwise.
//!
//! Nothing an entry point reads is written while timing: C is replaced by a
//! scratch buffer of C's extent at the same address offset modulo 256 (so the
//! same alignment-dependent algorithms apply; with beta ≠ 0 the scratch is
//! what is read and accumulated into), A, B and the bias are only read, and
//! the workspaces are the libraries' own. The operands hold whatever the
//! arenas hold at creation (zeros, mostly), which is fine for timing.
//!
//! Every candidate computes in strict fp32 (`CUBLAS_COMPUTE_32F`) unless the
//! `tf32` option allows TF32; but different algorithms may sum the inner
//! dimension in a different order (split-K, other tiles), so results differ
//! by rounding from another choice's, as between any two fp32 GEMM libraries.

use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use cudarc::driver::{result, sys};

use super::blas::{Blas, Scale};
use super::blaslt::{BlasLt, LtEpilogue, LtGemm};
use super::device::{check, Device, DeviceBuffer};
use super::graph::Graph;
use super::layout::CublasGemm;
use crate::error::Error;

/// How hard to look (see [`TuneConfig::DEFAULT`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TuneConfig {
    /// Heuristic results asked of cuBLASLt (it may return fewer).
    pub candidates: usize,
    /// Runs of each candidate before the timed batches, one at a time (lazy
    /// kernel loading, clocks, caches); the last one's time sets how many
    /// runs a timed batch needs.
    pub warmup: u32,
    /// Timed batches per candidate, interleaved across the candidates so
    /// that a clock change does not favour one; the fastest batch counts.
    pub rounds: u32,
    /// A timed batch runs at least this long (µs), as estimated...
    pub batch_us: f64,
    /// ...but at most this many runs.
    pub max_reps: u32,
    /// Another candidate replaces the incumbent (the path used without
    /// autotuning) only when faster by this fraction: a tie within the noise
    /// keeps today's summation order.
    pub margin: f64,
}

impl TuneConfig {
    /// 8 candidates, 2 warm-up runs, 3 rounds of ~300 µs (≤ 20 runs), 2 %:
    /// ~15 ms for a 50 µs GEMM.
    pub const DEFAULT: TuneConfig = TuneConfig {
        candidates: 8,
        warmup: 2,
        rounds: 3,
        batch_us: 300.0,
        max_reps: 20,
        margin: 0.02,
    };
}

/// The runs a timed batch needs to last `cfg.batch_us`, for a candidate
/// estimated at `us` per run.
fn reps_for(us: f64, cfg: &TuneConfig) -> u32 {
    if us > 0.0 && us.is_finite() {
        let reps = (cfg.batch_us / us).ceil().min(f64::from(cfg.max_reps));
        (reps as u32).max(1)
    } else {
        cfg.max_reps.max(1)
    }
}

/// Queued work, `Err` when it could not be queued (its message).
pub type Queue<'a> = dyn FnMut() -> Result<(), String> + 'a;

/// The GPU time in µs of what a [`Queue`] queues (outer `Err`: timing itself
/// failed; inner: the queue's own error).
pub type Clock<'a> = dyn FnMut(&mut Queue<'_>) -> Result<Result<f64, String>, Error> + 'a;

/// Times `n` candidates: `run(i)` queues candidate `i` once (an `Err` for a
/// candidate that cannot run: it is skipped, with the reason kept); `time(f)`
/// is the GPU time (µs) of what `f` queues (outer `Err`: timing itself
/// failed, which ends the search). Returns each candidate's µs per run (its
/// fastest round) or why it was skipped.
pub fn time_candidates(
    n: usize,
    cfg: &TuneConfig,
    run: &mut dyn FnMut(usize) -> Result<(), String>,
    time: &mut Clock<'_>,
) -> Result<Vec<Result<f64, String>>, Error> {
    let mut reps = vec![0u32; n];
    let mut out: Vec<Result<f64, String>> = Vec::with_capacity(n);
    for (i, reps) in reps.iter_mut().enumerate() {
        // One run at a time: the first is cold, the last estimates a run.
        let mut estimate = Ok(f64::INFINITY);
        for _ in 0..cfg.warmup.max(1) {
            estimate = time(&mut || run(i))?;
            if estimate.is_err() {
                break;
            }
        }
        out.push(estimate.map(|us| {
            *reps = reps_for(us, cfg);
            f64::INFINITY
        }));
    }
    for _ in 0..cfg.rounds.max(1) {
        for (i, slot) in out.iter_mut().enumerate() {
            let best = match slot {
                Ok(best) => *best,
                Err(_) => continue,
            };
            let n = reps[i];
            *slot = time(&mut || (0..n).try_for_each(|_| run(i)))?
                .map(|us| best.min(us / f64::from(n)));
        }
    }
    Ok(out)
}

/// The candidate to keep: the fastest, unless `incumbent` ran and the
/// fastest beats it by less than `margin` (then the incumbent). `None` when
/// no candidate ran.
pub fn fastest(times: &[Result<f64, String>], incumbent: usize, margin: f64) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, t) in times.iter().enumerate() {
        if let Ok(us) = *t {
            if best.is_none_or(|(_, b)| us < b) {
                best = Some((i, us));
            }
        }
    }
    let (i, us) = best?;
    match times.get(incumbent) {
        Some(Ok(inc)) if us >= inc * (1.0 - margin) => Some(incumbent),
        _ => Some(i),
    }
}

/// A generated kernel for the same product, timed with the libraries'
/// algorithms: `run(c)` queues it with C at `c` (the stand-in while timing).
pub struct KernelCandidate<'a> {
    /// `32×32 tiles, k in 4 splits`, for reports.
    pub name: String,
    /// Queues the kernel, or says why it cannot run.
    pub run: Box<dyn FnMut(u64) -> Result<(), String> + 'a>,
}

/// What was measured for one GEMM, and what was kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuned {
    /// µs per run of each candidate, or why it was skipped: cuBLASLt's
    /// heuristic results in its order, then plain cuBLAS when it competed,
    /// then the generated kernels (`kernels`).
    pub times: Vec<Result<f64, String>>,
    /// How many of `times` are cuBLASLt algorithms.
    pub lt: usize,
    /// The names of the generated kernels that competed (the last of `times`).
    pub kernels: Vec<String>,
    /// The index into `times` kept.
    pub chosen: usize,
    /// Not timed again: an identical GEMM was (same layout, epilogue,
    /// alignment, beta zero or not), and its choice is kept for consistency
    /// (e.g. `forward` and `train` compute one product the same way).
    pub reused: bool,
}

impl Tuned {
    /// The index of the first generated kernel in `times`.
    fn first_kernel(&self) -> usize {
        self.times.len() - self.kernels.len()
    }

    /// Plain cuBLAS won (a GEMM without an epilogue).
    pub fn is_cublas(&self) -> bool {
        self.chosen >= self.lt && self.chosen < self.first_kernel()
    }

    /// Which generated kernel won, if one did.
    pub fn kernel(&self) -> Option<usize> {
        self.chosen.checked_sub(self.first_kernel())
    }

    /// A cuBLASLt algorithm other than the heuristic's first won.
    pub fn not_first(&self) -> bool {
        self.chosen != 0 && self.chosen < self.lt
    }

    /// `algorithm #2 of 8 by timing: 41.3 µs (#0: 50.2 µs, cuBLAS: 48.0 µs)`,
    /// or for cuBLAS `by timing against 8 cuBLASLt algorithms: 48.0 µs (#0:
    /// 50.2 µs, #3: 49.1 µs)`: the choice, then the heuristic's first, the
    /// fastest cuBLASLt algorithm and cuBLAS, where they are not the choice.
    pub fn describe(&self) -> String {
        let us = |i: usize| match &self.times[i] {
            Ok(t) => format!("{t:.1} µs"),
            Err(_) => "failed".to_string(),
        };
        let first_kernel = self.first_kernel();
        let name = |i: usize| {
            if i < self.lt {
                format!("#{i}")
            } else if i < first_kernel {
                "cuBLAS".to_string()
            } else {
                format!("kernel ({})", self.kernels[i - first_kernel])
            }
        };
        let fastest_lt = fastest(&self.times[..self.lt], usize::MAX, 0.0);
        let fastest_kernel =
            fastest(&self.times[first_kernel..], usize::MAX, 0.0).map(|i| i + first_kernel);
        let mut others: Vec<usize> = [
            Some(0),
            fastest_lt,
            (first_kernel > self.lt).then_some(self.lt),
            fastest_kernel,
        ]
        .into_iter()
        .flatten()
        .filter(|&i| i != self.chosen && i < self.times.len())
        .collect();
        others.dedup();
        let what = if let Some(k) = self.kernel() {
            format!(
                "({}) by timing against {} cuBLASLt algorithms",
                self.kernels[k], self.lt
            )
        } else if self.is_cublas() {
            format!("by timing against {} cuBLASLt algorithms", self.lt)
        } else {
            format!("algorithm #{} of {} by timing", self.chosen, self.lt)
        };
        let mut text = format!("{what}: {}", us(self.chosen));
        if !others.is_empty() {
            let others: Vec<String> = others
                .iter()
                .map(|&i| format!("{}: {}", name(i), us(i)))
                .collect();
            text += &format!(" ({})", others.join(", "));
        }
        let skipped = self.times.iter().filter(|t| t.is_err()).count();
        if skipped > 0 {
            text += &format!("; {skipped} could not run");
        }
        if self.reused {
            text += "; as timed for an identical GEMM";
        }
        text
    }
}

/// Two CUDA events on the device's stream: the GPU time of what is queued
/// between them.
pub struct Timer {
    start: sys::CUevent,
    end: sys::CUevent,
    device: Device,
}

// SAFETY: events may be used from any thread with their context current
// (bound first), one user at a time (`&mut` owners only).
unsafe impl Send for Timer {}

impl Timer {
    /// Two events, checked by timing an empty interval (the driver must
    /// have `cuEventElapsedTime_v2`, CUDA 12.8 and later).
    ///
    /// # Errors
    /// Why CUDA events cannot time GEMMs here.
    pub fn new(device: &Device) -> Result<Timer, Error> {
        device.bind()?;
        let create = || {
            check(
                result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT),
                || "creating a CUDA event to time GEMMs".into(),
            )
        };
        let start = create()?;
        let end = match create() {
            Ok(end) => end,
            Err(e) => {
                // SAFETY: created above, not used after.
                let _ = unsafe { result::event::destroy(start) };
                return Err(e);
            }
        };
        let timer = Timer {
            start,
            end,
            device: device.clone(),
        };
        timer.elapsed_around(|| Ok(()))?;
        Ok(timer)
    }

    /// The GPU time in µs of the work `queue` puts on the stream, waited for.
    /// Outer `Err`: the events failed (or queued work faulted); inner `Err`:
    /// `queue` itself failed, with its message.
    ///
    /// The work is captured into a CUDA graph and timed as one replay, since
    /// that is how a step runs it: there a few-µs GEMM follows the kernel
    /// before it by about a µs, while launched from the host one by one it
    /// would wait on each launch (~5 µs of cuBLASLt's host time), and every
    /// candidate of a small product would time about the same.
    pub fn time(&self, queue: &mut Queue<'_>) -> Result<Result<f64, String>, Error> {
        let mut queued = Ok(());
        let what = "a GEMM being timed";
        let graph = Graph::capture(&self.device, what, || {
            queued = queue();
            queued.clone().map_err(Error::Device)
        });
        let mut graph = match (graph, queued) {
            (_, Err(why)) => return Ok(Err(why)),
            (graph, Ok(())) => graph?,
        };
        graph.upload(what)?;
        Ok(Ok(self.elapsed_around(|| graph.launch(what))?))
    }

    /// The GPU time in µs between events recorded before and after what
    /// `queue` queues, waited for.
    pub(crate) fn elapsed_around(
        &self,
        queue: impl FnOnce() -> Result<(), Error>,
    ) -> Result<f64, Error> {
        let stream = self.device.stream();
        // SAFETY: our live events and stream.
        check(unsafe { result::event::record(self.start, stream) }, || {
            "recording a CUDA event to time GEMMs".into()
        })?;
        let queued = queue();
        // SAFETY: as above; waiting for `end` waits for the queued work.
        unsafe {
            check(result::event::record(self.end, stream), || {
                "recording a CUDA event to time GEMMs".into()
            })?;
            check(result::event::synchronize(self.end), || {
                "running a GEMM being timed".into()
            })?;
        }
        queued?;
        // cudarc panics when the driver lacks the entry point.
        // SAFETY: both events recorded on one stream and complete.
        let ms = panic::catch_unwind(AssertUnwindSafe(|| unsafe {
            result::event::elapsed(self.start, self.end)
        }))
        .map_err(|_| {
            Error::Device(
                "cuEventElapsedTime_v2 is missing from the CUDA driver (it came with CUDA 12.8)"
                    .into(),
            )
        })?;
        let ms = check(ms, || "reading a CUDA event's time".into())?;
        Ok(f64::from(ms) * 1000.0)
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once; errors are ignored.
        unsafe {
            let _ = self.device.bind();
            let _ = result::event::destroy(self.start);
            let _ = result::event::destroy(self.end);
        }
    }
}

/// A device buffer standing in for C while timing, grown as needed.
struct Scratch {
    buf: Option<DeviceBuffer>,
    device: Device,
}

impl Scratch {
    /// An address with `bytes` bytes behind it, at the same offset modulo
    /// 256 as `like` (allocations are 256-byte aligned: checked).
    fn like(&mut self, like: u64, bytes: usize) -> Result<u64, Error> {
        let need = bytes + 256;
        if self.buf.as_ref().is_none_or(|b| b.bytes() < need) {
            self.buf = None; // the old one goes first
            let what = "a stand-in for C while autotuning GEMMs (autotune=False does without)";
            self.buf = Some(self.device.alloc_zeroed(need, what)?);
        }
        let base = self.buf.as_ref().map_or(0, DeviceBuffer::ptr);
        if !base.is_multiple_of(256) {
            return Err(Error::Device(format!(
                "the autotuning scratch buffer at {base:#x} is not 256-byte aligned"
            )));
        }
        Ok(base + like % 256)
    }
}

/// What makes two GEMMs the same problem for autotuning: the addresses
/// differ, everything that selects and drives a kernel does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Problem {
    call: CublasGemm,
    epilogue: LtEpilogue,
    /// The operand alignment the candidates were asked for.
    alignment: u64,
    /// beta ≠ 0: C is read.
    reads_c: bool,
    /// Plain cuBLAS competed.
    with_cublas: bool,
    /// How many generated kernels competed.
    kernels: usize,
}

/// Times GEMMs while an executor prepares its plans; dropped when done
/// (freeing its scratch buffer and events).
pub struct Tuner {
    timer: Timer,
    scratch: Scratch,
    cfg: TuneConfig,
    spent: Duration,
    /// What each problem timed so far found.
    seen: HashMap<Problem, Tuned>,
}

impl Tuner {
    /// A tuner on `device`'s stream.
    ///
    /// # Errors
    /// Why GEMMs cannot be timed here (see [`Timer::new`]).
    pub fn new(device: &Device, cfg: TuneConfig) -> Result<Tuner, Error> {
        Ok(Tuner {
            timer: Timer::new(device)?,
            scratch: Scratch {
                buf: None,
                device: device.clone(),
            },
            cfg,
            spent: Duration::ZERO,
            seen: HashMap::new(),
        })
    }

    /// The wall time spent tuning so far.
    pub fn spent(&self) -> Duration {
        self.spent
    }

    /// Times `p`'s candidates — cuBLASLt's heuristic results for the
    /// operands' alignment, when given `blas`'s run of the same `call`, and
    /// the generated `kernels` — on the operands `[a, b, c, bias]` (`bias` 0
    /// without one) with C replaced by scratch of `c_bytes`, and keeps the
    /// fastest cuBLASLt algorithm in `p` (unless cuBLAS or a kernel won:
    /// [`Tuned::is_cublas`], [`Tuned::kernel`]). A problem met before is not
    /// timed again: its choice is kept ([`Tuned::reused`]).
    ///
    /// # Errors
    /// Outer: timing failed (the device, not a candidate). Inner: no
    /// candidate could run, with the reasons.
    ///
    /// # Safety
    /// The operands are as [`BlasLt::run`] and [`Blas::sgemm`] require for
    /// `call` (which `p` was prepared from); `c_bytes` covers C's extent.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tune(
        &mut self,
        lt: &BlasLt,
        p: &mut LtGemm,
        call: &CublasGemm,
        blas: Option<&Blas>,
        scale: Scale,
        [a, b, c, bias]: [u64; 4],
        c_bytes: usize,
        kernels: &mut [KernelCandidate<'_>],
    ) -> Result<Result<Tuned, String>, Error> {
        let started = Instant::now();
        let found = match lt.candidates(p, a | b | c | bias, self.cfg.candidates) {
            Ok(found) => found,
            Err(why) => return Ok(Err(why)),
        };
        let problem = Problem {
            call: *call,
            epilogue: p.epilogue(),
            alignment: found.alignment(),
            reads_c: scale.beta != 0.0,
            with_cublas: blas.is_some(),
            kernels: kernels.len(),
        };
        // The heuristic is deterministic: the same problem, the same list.
        if let Some(seen) = self.seen.get(&problem).filter(|t| t.lt == found.len()) {
            if seen.chosen < seen.lt {
                p.keep(&found, seen.chosen);
            }
            self.spent += started.elapsed();
            return Ok(Ok(Tuned {
                reused: true,
                ..seen.clone()
            }));
        }
        let stand_in = self.scratch.like(c, c_bytes)?;
        let n_lt = found.len();
        let first_kernel = n_lt + usize::from(blas.is_some());
        let names: Vec<String> = kernels.iter().map(|k| k.name.clone()).collect();
        let p_ref = &*p;
        let mut run = |i: usize| -> Result<(), String> {
            if let Some(kernel) = i.checked_sub(first_kernel) {
                return (kernels[kernel].run)(stand_in);
            }
            // SAFETY: the caller's contract, with C's stand-in (same extent
            // and alignment, overlapping nothing) in place of C.
            unsafe {
                match blas {
                    Some(blas) if i == n_lt => blas.sgemm(call, scale, a, b, stand_in),
                    _ => lt.run_candidate(p_ref, &found, i, scale, a, b, stand_in, bias),
                }
            }
        };
        let timer = &self.timer;
        let n = first_kernel + names.len();
        // Each candidate once outside any capture first, waited for: the
        // kernels the libraries load lazily load here, not while capturing.
        // (A candidate that fails says why when it is timed.)
        for i in 0..n {
            let _ = run(i);
        }
        timer
            .device
            .synchronize(|| "running the GEMM candidates once before timing them".into())?;
        let times = time_candidates(n, &self.cfg, &mut run, &mut |queue| timer.time(queue))?;
        // The incumbent is what runs without autotuning: cuBLAS for a plain
        // GEMM, the heuristic's first choice for an epilogue.
        let incumbent = if blas.is_some() { n_lt } else { 0 };
        self.spent += started.elapsed();
        let Some(chosen) = fastest(&times, incumbent, self.cfg.margin) else {
            let why: Vec<String> = times.iter().filter_map(|t| t.clone().err()).collect();
            return Ok(Err(format!(
                "no candidate algorithm ran: {}",
                why.join("; ")
            )));
        };
        if chosen < n_lt {
            p.keep(&found, chosen);
        }
        let tuned = Tuned {
            times,
            lt: n_lt,
            kernels: names,
            chosen,
            reused: false,
        };
        self.seen.insert(problem, tuned.clone());
        Ok(Ok(tuned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `time_candidates` with a fake clock: candidate `i` takes `us[i]` per
    /// run (`None`: cannot run), plus `cold` µs on its first run.
    fn simulate(us: &[Option<f64>], cold: f64) -> (Vec<Result<f64, String>>, Vec<u32>) {
        let cfg = TuneConfig::DEFAULT;
        let mut runs = vec![0u32; us.len()];
        let elapsed = std::cell::Cell::new(0.0);
        let mut run = |i: usize| match us[i] {
            Some(t) => {
                elapsed.set(elapsed.get() + t + if runs[i] == 0 { cold } else { 0.0 });
                runs[i] += 1;
                Ok(())
            }
            None => Err(format!("candidate {i} is not supported")),
        };
        let mut time = |queue: &mut Queue<'_>| {
            elapsed.set(0.0);
            Ok(queue().map(|()| elapsed.get()))
        };
        let times = time_candidates(us.len(), &cfg, &mut run, &mut time).unwrap();
        (times, runs)
    }

    #[test]
    fn each_candidate_gets_its_fastest_round_and_failures_are_kept() {
        let (times, runs) = simulate(&[Some(50.0), None, Some(40.0), Some(5.0)], 1000.0);
        assert_eq!(times[0], Ok(50.0));
        assert!(times[1].as_ref().unwrap_err().contains("candidate 1"));
        assert_eq!(times[2], Ok(40.0));
        assert_eq!(times[3], Ok(5.0));
        // The cold first run inflates the warm-up estimate, never a timed round.
        assert_eq!(runs[1], 0);
        assert!(runs[0] >= 2 + 3, "{runs:?}");
        // Short GEMMs run more times per batch, up to max_reps.
        assert!(runs[3] > runs[0], "{runs:?}");
        assert!(runs[3] <= 2 + 3 * TuneConfig::DEFAULT.max_reps, "{runs:?}");
    }

    #[test]
    fn reps_cover_the_batch_time_within_bounds() {
        let cfg = TuneConfig::DEFAULT;
        assert_eq!(reps_for(50.0, &cfg), 6);
        assert_eq!(reps_for(300.0, &cfg), 1);
        assert_eq!(reps_for(5000.0, &cfg), 1);
        assert_eq!(reps_for(1.0, &cfg), cfg.max_reps);
        assert_eq!(reps_for(0.0, &cfg), cfg.max_reps);
    }

    #[test]
    fn the_incumbent_stays_unless_clearly_beaten() {
        let t = |v: &[f64]| v.iter().map(|&x| Ok(x)).collect::<Vec<_>>();
        assert_eq!(fastest(&t(&[50.0, 40.0, 45.0]), 0, 0.02), Some(1));
        assert_eq!(fastest(&t(&[50.0, 49.5, 60.0]), 0, 0.02), Some(0));
        assert_eq!(fastest(&t(&[50.0, 49.5, 60.0]), 2, 0.02), Some(1));
        assert_eq!(fastest(&t(&[50.0, 40.0, 40.5]), 2, 0.02), Some(2));
        assert_eq!(fastest(&t(&[50.0, 38.0, 40.5]), 2, 0.02), Some(1));
        let mut failed = t(&[50.0, 40.0]);
        failed[1] = Err("no".into());
        assert_eq!(fastest(&failed, 0, 0.02), Some(0));
        assert_eq!(fastest(&failed, 1, 0.02), Some(0));
        assert_eq!(fastest(&[Err("a".into()), Err("b".into())], 0, 0.02), None);
        // Ties go to the earlier candidate (the heuristic's order).
        assert_eq!(fastest(&t(&[50.0, 30.0, 30.0]), 0, 0.0), Some(1));
    }

    #[test]
    fn descriptions_name_the_choice_and_what_it_beat() {
        let lt = Tuned {
            times: vec![Ok(50.2), Err("x".into()), Ok(41.3), Ok(48.0)],
            lt: 3,
            kernels: vec![],
            chosen: 2,
            reused: false,
        };
        assert!(!lt.is_cublas() && lt.not_first());
        assert_eq!(
            lt.describe(),
            "algorithm #2 of 3 by timing: 41.3 µs (#0: 50.2 µs, cuBLAS: 48.0 µs); 1 could not run"
        );
        let blas = Tuned {
            chosen: 3,
            ..lt.clone()
        };
        assert!(blas.is_cublas() && !blas.not_first());
        assert_eq!(
            blas.describe(),
            "by timing against 3 cuBLASLt algorithms: 48.0 µs (#0: 50.2 µs, #2: 41.3 µs); 1 \
             could not run"
        );
        // The margin kept #0 though #1 was a little faster.
        let kept = Tuned {
            times: vec![Ok(10.0), Ok(9.9)],
            lt: 2,
            kernels: vec![],
            chosen: 0,
            reused: false,
        };
        assert_eq!(
            kept.describe(),
            "algorithm #0 of 2 by timing: 10.0 µs (#1: 9.9 µs)"
        );
        let first = Tuned {
            times: vec![Ok(10.0)],
            lt: 1,
            kernels: vec![],
            chosen: 0,
            reused: false,
        };
        assert_eq!(first.describe(), "algorithm #0 of 1 by timing: 10.0 µs");
        let again = Tuned {
            reused: true,
            ..first
        };
        assert_eq!(
            again.describe(),
            "algorithm #0 of 1 by timing: 10.0 µs; as timed for an identical GEMM"
        );
        // Generated kernels come last; one wins over cuBLASLt and cuBLAS.
        let kernel = Tuned {
            times: vec![Ok(8.2), Ok(7.9), Ok(5.5), Ok(4.1)],
            lt: 1,
            kernels: vec!["32×32 tiles".into(), "32×32 tiles, k in 4 splits".into()],
            chosen: 3,
            reused: false,
        };
        assert_eq!(kernel.kernel(), Some(1));
        assert!(!kernel.is_cublas() && !kernel.not_first());
        assert_eq!(
            kernel.describe(),
            "(32×32 tiles, k in 4 splits) by timing against 1 cuBLASLt algorithms: 4.1 µs \
             (#0: 8.2 µs, cuBLAS: 7.9 µs)"
        );
        let blas = Tuned {
            chosen: 1,
            ..kernel.clone()
        };
        assert!(blas.is_cublas() && blas.kernel().is_none());
        assert_eq!(
            blas.describe(),
            "by timing against 1 cuBLASLt algorithms: 7.9 µs (#0: 8.2 µs, kernel (32×32 \
             tiles, k in 4 splits): 4.1 µs)"
        );
    }
}
