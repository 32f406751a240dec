//! Boot benchmark: time from process start to the test guest's ready line, and to process exit
//! with `count=1`, for `microagent run --kernel builtin:testguest` and for
//! `qemu-system-x86_64 -M microvm -enable-kvm` booting the same ELF (through its PVH note), with
//! 1 and 2 vCPUs. Runs are interleaved (the order rotates every run) so that the machine's
//! noise hits every variant alike; the table shows median and min and the microagent/QEMU ratio.
//! A third row boots the guest in-process through `vmm::Vm::boot`, to show what the process
//! start-up of the CLI costs on top.
//!
//! With `MICROAGENT_BENCH_FIRECRACKER=/path/to/firecracker`, Firecracker boots the same ELF too
//! (`--no-api --config-file`: machine-config and boot-source, no devices), timed the same way.
//!
//! `cargo bench -p microagent --bench boot`; `MICROAGENT_BENCH_RUNS=N` (default 10) runs each.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MEM_MIB: u64 = 256;
const CMDLINE: &str = "mode=counter mem=1 count=1 tick_ms=0";
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    Microagent,
    InProcess,
    Qemu,
    Firecracker,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Microagent => "microagent run",
            Tool::InProcess => "vmm::Vm::boot (in-process)",
            Tool::Qemu => "qemu microvm",
            Tool::Firecracker => "firecracker",
        }
    }
}

/// Seconds from start to the ready line, to the guest's `done` line, and to the exit.
struct Sample {
    ready: f64,
    done: f64,
    exit: f64,
}

fn is_ready(l: &str) -> Option<()> {
    l.starts_with("testguest: ready").then_some(())
}

fn is_done(l: &str) -> Option<()> {
    l.starts_with("testguest: done").then_some(())
}

fn run_process(mut cmd: Command) -> Result<Sample, String> {
    wait_process(Proc::spawn(&mut cmd)?, false)
}

/// Firecracker runs whose process exited non-zero after the guest's done line (it sometimes
/// reports `Shutdown(GenericError)` when a 2-vCPU guest resets): counted, not failed.
static FC_EXIT_ERRORS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn wait_process(mut p: Proc, lenient_exit: bool) -> Result<Sample, String> {
    let deadline = p.started + TIMEOUT;
    let (i, ready, ()) = p
        .out
        .wait_from(0, deadline, "the ready line", is_ready)
        .map_err(|e| format!("{e}\n{}", p.tails()))?;
    let (exited, ok) = p.wait_exit(deadline)?;
    let done = p
        .out
        .wait_from(i, deadline, "the done line", is_done)
        .map_err(|e| format!("{e}\n{}", p.tails()))?
        .1;
    if !ok && lenient_exit {
        FC_EXIT_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    } else if !ok {
        return Err(format!("the VMM exited with an error\n{}", p.tails()));
    }
    Ok(Sample {
        ready: secs(ready - p.started),
        done: secs(done - p.started),
        exit: secs(exited - p.started),
    })
}

fn run_in_process(elf: &std::path::Path, vcpus: u8) -> Result<Sample, String> {
    let log = LineLog::new();
    let t0 = Instant::now();
    let vm = vmm::Vm::boot(vmm::VmConfig {
        kernel: elf.to_path_buf(),
        initrd: None,
        cmdline: CMDLINE.into(),
        mem_mib: MEM_MIB,
        vcpus,
        console: vmm::Console::Writer(Box::new(log.clone())),
        devices: Default::default(),
    })
    .map_err(|e| e.to_string())?;
    let (i, ready, ()) = log.wait_from(0, t0 + TIMEOUT, "the ready line", is_ready)?;
    let exit = vm.wait_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    let exited = Instant::now();
    if exit.is_none() {
        return Err(format!("the guest did not finish:\n{}", log.tail(10)));
    }
    let done = log.wait_from(i, t0 + TIMEOUT, "the done line", is_done)?.1;
    Ok(Sample {
        ready: secs(ready - t0),
        done: secs(done - t0),
        exit: secs(exited - t0),
    })
}

fn run(tool: Tool, elf: &std::path::Path, vcpus: u8, fc: Option<&Path>) -> Result<Sample, String> {
    match tool {
        Tool::Microagent => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_microagent"));
            c.args(["run", "--kernel", "builtin:testguest"])
                .args(["--vcpus", &vcpus.to_string()])
                .args(["--mem", &MEM_MIB.to_string()])
                .args(["--cmdline", CMDLINE]);
            run_process(c)
        }
        Tool::Qemu => run_process(qemu_command(elf, MEM_MIB, vcpus, CMDLINE)),
        Tool::InProcess => run_in_process(elf, vcpus),
        Tool::Firecracker => {
            let bin = fc.ok_or("no firecracker binary")?;
            let dir = elf.parent().unwrap_or(Path::new("."));
            let p = firecracker::Firecracker::spawn_configured(
                bin, dir, "fcboot", elf, CMDLINE, MEM_MIB, vcpus,
            )?;
            wait_process(p, true)
        }
    }
}

fn main() {
    if !have_kvm() {
        println!("boot benchmark skipped: /dev/kvm is not available");
        return;
    }
    let runs = env_usize("MICROAGENT_BENCH_RUNS", 10);
    let mut tools = vec![Tool::Microagent, Tool::InProcess];
    if have_qemu() {
        tools.push(Tool::Qemu);
    } else {
        println!("{QEMU} not found: QEMU rows skipped");
    }
    let fc = firecracker::binary_or_skip("boot");
    if fc.is_some() {
        tools.push(Tool::Firecracker);
    }
    let dir = scratch("boot");
    let elf = testguest(&dir);

    println!(
        "boot: {MEM_MIB} MiB guest, cmdline \"{CMDLINE}\", {runs} runs per variant, interleaved"
    );
    let mut rows = Vec::new();
    for vcpus in [1u8, 2] {
        // Warm-up: page cache, first exec of each binary.
        for &t in &tools {
            let _ = run(t, &elf, vcpus, fc.as_deref());
        }
        let mut samples: Vec<Vec<Sample>> = tools.iter().map(|_| Vec::new()).collect();
        for i in 0..runs {
            for k in 0..tools.len() {
                let j = (i + k) % tools.len();
                match run(tools[j], &elf, vcpus, fc.as_deref()) {
                    Ok(s) => samples[j].push(s),
                    Err(e) => {
                        eprintln!("{} vcpus={vcpus} run {i}: {e}", tools[j].name());
                        samples[j].push(Sample {
                            ready: f64::NAN,
                            done: f64::NAN,
                            exit: f64::NAN,
                        });
                    }
                }
            }
        }
        // [ready median, ready min, done median, exit median, exit min, exit - done median]
        let stat = |j: usize| {
            let col = |g: &dyn Fn(&Sample) -> f64| samples[j].iter().map(g).collect::<Vec<_>>();
            let r = col(&|s| s.ready);
            let x = col(&|s| s.exit);
            let ok = r.iter().filter(|v| v.is_finite()).count();
            let v = [
                median(&r),
                min(&r),
                median(&col(&|s| s.done)),
                median(&x),
                min(&x),
                median(&col(&|s| s.exit - s.done)),
            ];
            (v, ok)
        };
        for (j, t) in tools.iter().enumerate() {
            let (v, ok) = stat(j);
            let mut row = vec![vcpus.to_string(), t.name().into(), format!("{ok}/{runs}")];
            row.extend(v.iter().map(|x| f(x * 1e3, 1)));
            rows.push(row);
        }
        let peer = |t: &Tool| matches!(t, Tool::Qemu | Tool::Firecracker);
        if let Some(q) = tools.iter().position(|t| *t == Tool::Qemu) {
            let (qv, _) = stat(q);
            for (j, t) in tools.iter().enumerate() {
                if peer(t) {
                    continue;
                }
                let (v, _) = stat(j);
                let mut row = vec![
                    vcpus.to_string(),
                    format!("ratio {} / qemu", t.name()),
                    String::new(),
                ];
                row.extend(v.iter().zip(qv).map(|(a, b)| ratio(*a, b)));
                rows.push(row);
            }
        }
        // microagent run against Firecracker, and against the better peer per column.
        let ma = tools.iter().position(|t| *t == Tool::Microagent);
        let peers: Vec<[f64; 6]> = (0..tools.len())
            .filter(|&j| peer(&tools[j]))
            .map(|j| stat(j).0)
            .collect();
        if let (Some(m), Some(fcj)) = (ma, tools.iter().position(|t| *t == Tool::Firecracker)) {
            let (mv, _) = stat(m);
            let (fv, _) = stat(fcj);
            let mut row = vec![
                vcpus.to_string(),
                "ratio microagent run / firecracker".into(),
                String::new(),
            ];
            row.extend(mv.iter().zip(fv).map(|(a, b)| ratio(*a, b)));
            rows.push(row);
            let best: Vec<f64> = (0..6)
                .map(|k| min(&peers.iter().map(|p| p[k]).collect::<Vec<_>>()))
                .collect();
            let mut row = vec![
                vcpus.to_string(),
                "ratio microagent run / best peer".into(),
                String::new(),
            ];
            row.extend(mv.iter().zip(best).map(|(a, b)| ratio(*a, b)));
            rows.push(row);
        }
    }
    print_table(
        &[
            "vcpus",
            "tool",
            "ok",
            "to ready: median ms",
            "min ms",
            "to done line: median ms",
            "to exit: median ms",
            "min ms",
            "done -> exit: median ms",
        ],
        &rows,
    );
    let fc_errors = FC_EXIT_ERRORS.load(std::sync::atomic::Ordering::Relaxed);
    if fc_errors > 0 {
        println!(
            "firecracker exited non-zero after the guest's done line in {fc_errors} run(s) \
             (counted: the guest had finished)"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
