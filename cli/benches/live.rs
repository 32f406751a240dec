//! Guest pause during a capture: how long a 1 GiB test guest that rewrites all of its memory
//! (`mode=counter mem=1008 tick_ms=0`, one vCPU) is stopped by `snapshot create --live` (bound
//! 20 ms) and by the default stop-and-copy capture, through the real binary, against QEMU's
//! live migration to a file with `downtime-limit` 20 ms (the `downtime` it reports) and QEMU's
//! stop + migrate + cont (stop to cont), same guest, side by side in one run. Repetitions
//! alternate the order of the two microagent captures.
//!
//! With `MICROAGENT_BENCH_FIRECRACKER=/path/to/firecracker`, Firecracker too (it has no live
//! capture): `PATCH /vm Paused`, `PUT /snapshot/create` (Full), an fsync of its memory file,
//! `PATCH /vm Resumed`, timed from the pause request to the resume's answer.
//!
//! `cargo bench -p microagent --bench live`
//!   `MICROAGENT_BENCH_REPS=N` (default 3), `MICROAGENT_BENCH_LIVE_MIB=M` (guest RAM, default 1024)
//!   `MICROAGENT_BENCH_DIR=/path` (scratch space; default the temp dir)

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const BOUND_MS: u64 = 20;
/// QEMU never stops a guest that out-dirties the bound (no auto-converge): give up after this.
const QEMU_LIVE_LIMIT: Duration = Duration::from_secs(120);

fn cmdline(mib: u64) -> String {
    format!("mode=counter mem={} tick_ms=0", mib - 16)
}

fn ma(home: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_microagent"))
        .env("MICROAGENT_HOME", home)
        .args(args)
        .output()
        .map_err(|e| format!("run microagent: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "microagent {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cpu0_count(home: &Path) -> u64 {
    std::fs::read_to_string(home.join("workspaces/w/console.log"))
        .unwrap_or_default()
        .lines()
        .rev()
        .filter_map(count_line)
        .find(|(c, _)| *c == 0)
        .map_or(0, |(_, n)| n)
}

fn wait_count(home: &Path, above: u64) -> Result<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let n = cpu0_count(home);
        if n > above {
            return Ok(n);
        }
        if Instant::now() > deadline {
            return Err(format!("the guest never passed count {above}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One microagent capture: (pause ms, command seconds, live rounds or 0, fell back).
fn ma_capture(home: &Path, tag: &str, live: bool) -> Result<(f64, f64, u64, bool), String> {
    let mut args = vec!["--json", "snapshot", "create", "w", "--tag", tag];
    if live {
        args.push("--live");
    }
    let t = Instant::now();
    let out = ma(home, &args)?;
    let wall = secs(t.elapsed());
    let js: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("bad JSON {out:?}: {e}"))?;
    let pause = js["pause_ms"].as_f64().unwrap_or(f64::NAN);
    let rounds = js["live"]["rounds"].as_u64().unwrap_or(0);
    let fell_back = js["live"]["converged"] == serde_json::Value::Bool(false);
    ma(home, &["snapshot", "delete", "w", tag])?;
    Ok((pause, wall, rounds, fell_back))
}

#[derive(Default)]
struct Runs {
    pause: Vec<f64>,
    wall: Vec<f64>,
    rounds: Vec<f64>,
    fallbacks: usize,
}

impl Runs {
    fn add(&mut self, (pause, wall, rounds, fell_back): (f64, f64, u64, bool)) {
        self.pause.push(pause);
        self.wall.push(wall);
        self.rounds.push(rounds as f64);
        self.fallbacks += usize::from(fell_back);
    }
}

fn microagent(dir: &Path, mib: u64, reps: usize) -> Result<(Runs, Runs), String> {
    let home = dir.join("home");
    ma(
        &home,
        &[
            "create",
            "w",
            "--kernel",
            "builtin:testguest",
            "--vcpus",
            "1",
            "--mem",
            &mib.to_string(),
            "--cmdline",
            &cmdline(mib),
        ],
    )?;
    ma(&home, &["start", "w"])?;
    let result = (|| {
        // Count 2: the whole region written and verified once.
        wait_count(&home, 2)?;
        let (mut live, mut stop) = (Runs::default(), Runs::default());
        for rep in 0..reps {
            for live_first in [rep % 2 == 0, rep % 2 == 1] {
                let tag = format!("r{rep}-{}", if live_first { "live" } else { "stop" });
                let r = ma_capture(&home, &tag, live_first)?;
                if live_first {
                    live.add(r);
                } else {
                    stop.add(r);
                }
                // The guest runs on (a round) before the next capture.
                let now = cpu0_count(&home);
                wait_count(&home, now)?;
            }
        }
        Ok((live, stop))
    })();
    let _ = ma(&home, &["halt", "w"]);
    let _ = ma(&home, &["delete", "w", "--yes"]);
    result
}

/// QEMU, one process: (live downtime ms or NaN, live seconds; stop-and-copy ms, seconds) per rep.
fn qemu(dir: &Path, mib: u64, reps: usize) -> Result<(Runs, Runs, usize), String> {
    let elf = testguest(dir);
    let sock = dir.join("q.sock");
    let file = dir.join("qemu-state.bin");
    let mut c = qemu_command(&elf, mib, 1, &cmdline(mib));
    c.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()));
    let _ = std::fs::remove_file(&sock);
    let p = Proc::spawn(&mut c)?;
    let mut q = Qmp::connect(&sock, Instant::now() + Duration::from_secs(30))
        .map_err(|e| format!("{e}\n{}", p.tails()))?;
    q.cmd(
        "migrate-set-parameters",
        Some(serde_json::json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": BOUND_MS })),
    )?;
    p.out
        .wait_all_counts(1, 2, Instant::now() + Duration::from_secs(900))?;
    let (mut live, mut stop, mut unfinished) = (Runs::default(), Runs::default(), 0);
    let migrate = |q: &mut Qmp, limit: Duration| -> Result<Option<serde_json::Value>, String> {
        let _ = std::fs::remove_file(&file);
        q.cmd(
            "migrate",
            Some(serde_json::json!({ "uri": format!("exec:cat > {}", file.display()) })),
        )?;
        let t = Instant::now();
        loop {
            let r = q.cmd("query-migrate", None)?;
            match r.get("status").and_then(|s| s.as_str()) {
                Some("completed") => return Ok(Some(r)),
                Some("failed") | Some("cancelled") => return Err(format!("migration failed: {r}")),
                _ if t.elapsed() > limit => {
                    q.cmd("migrate_cancel", None)?;
                    while q
                        .cmd("query-migrate", None)?
                        .get("status")
                        .and_then(|s| s.as_str())
                        == Some("cancelling")
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    return Ok(None);
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    };
    for _ in 0..reps {
        // Live: the guest runs until QEMU stops it for the last pages; it stays stopped
        // (`postmigrate`) until `cont`.
        let t = Instant::now();
        match migrate(&mut q, QEMU_LIVE_LIMIT)? {
            Some(r) => {
                let wall = secs(t.elapsed());
                q.cmd("cont", None)?;
                live.add((
                    r.get("downtime")
                        .and_then(|v| v.as_f64())
                        .unwrap_or(f64::NAN),
                    wall,
                    0,
                    false,
                ));
            }
            None => unfinished += 1,
        }
        // Stop and copy: stop to cont.
        q.cmd("stop", None)?;
        let t = Instant::now();
        migrate(&mut q, Duration::from_secs(900))?
            .ok_or("stop-and-copy migration did not finish")?;
        std::fs::File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("fsync: {e}"))?;
        q.cmd("cont", None)?;
        let stopped = secs(t.elapsed());
        stop.add((stopped * 1000.0, stopped, 0, false));
    }
    let _ = q.cmd("quit", None);
    let mut p = p;
    let _ = p.wait_exit(Instant::now() + Duration::from_secs(30));
    Ok((live, stop, unfinished))
}

/// Firecracker, one process: pause + full snapshot + fsync + resume per rep (pause ms, seconds).
fn firecracker(dir: &Path, bin: &Path, mib: u64, reps: usize) -> Result<Runs, String> {
    let elf = testguest(dir);
    let fc = firecracker::Firecracker::spawn(bin, dir, "fclive")?;
    let r = (|| {
        fc.boot(&elf, &cmdline(mib), mib, 1)?;
        fc.proc
            .out
            .wait_all_counts(1, 2, Instant::now() + Duration::from_secs(900))?;
        let (state, mem) = (dir.join("fc-state.bin"), dir.join("fc-mem.bin"));
        let mut stop = Runs::default();
        for _ in 0..reps {
            let _ = std::fs::remove_file(&mem);
            let t = Instant::now();
            fc.pause()?;
            fc.snapshot_full(&state, &mem)?;
            std::fs::File::open(&mem)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("fsync: {e}"))?;
            fc.resume()?;
            let stopped = secs(t.elapsed());
            stop.add((stopped * 1000.0, stopped, 0, false));
            // The guest runs on (a round) before the next capture.
            let from = fc.proc.out.len();
            fc.proc
                .out
                .wait_count(from, 0, 0, Instant::now() + Duration::from_secs(900))?;
        }
        Ok(stop)
    })();
    let r = r.map_err(|e: String| format!("{e}\n{}", fc.proc.tails()));
    fc.kill();
    r
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !have_kvm() {
        println!("live bench skipped: no /dev/kvm");
        return;
    }
    let reps = env_usize("MICROAGENT_BENCH_REPS", 3);
    let mib = env_usize("MICROAGENT_BENCH_LIVE_MIB", 1024) as u64;
    let dir = scratch("live");
    let (ma_live, ma_stop) = match microagent(&dir, mib, reps) {
        Ok(r) => r,
        Err(e) => panic!("microagent: {e}"),
    };
    let q = if have_qemu() {
        match qemu(&dir, mib, reps) {
            Ok(r) => Some(r),
            Err(e) => {
                println!("QEMU failed: {e}");
                None
            }
        }
    } else {
        println!("QEMU not found: its rows are empty");
        None
    };
    let fc = firecracker::binary_or_skip("live").and_then(|bin| {
        firecracker(&dir, &bin, mib, reps)
            .map_err(|e| println!("Firecracker failed: {e}"))
            .ok()
    });
    let _ = std::fs::remove_dir_all(&dir);
    let best_stop = min(&[
        q.as_ref().map_or(f64::NAN, |q| median(&q.1.pause)),
        fc.as_ref().map_or(f64::NAN, |r| median(&r.pause)),
    ]);
    let q_live = q.as_ref().map_or(f64::NAN, |q| median(&q.0.pause));
    let row = |what: &str, r: &Runs, note: String| {
        let pause = median(&r.pause);
        vec![
            what.to_string(),
            f(pause, 1),
            f(min(&r.pause), 1),
            f(median(&r.wall), 2),
            ratio(pause, q_live),
            ratio(pause, best_stop),
            note,
        ]
    };
    let mut rows = vec![
        row(
            "microagent --live",
            &ma_live,
            format!(
                "rounds {} (median), {} of {} fell back to stop-and-copy",
                f(median(&ma_live.rounds), 0),
                ma_live.fallbacks,
                ma_live.pause.len()
            ),
        ),
        row("microagent stop-and-copy", &ma_stop, "incl. fsync".into()),
    ];
    if let Some((live, stop, unfinished)) = &q {
        rows.push(row(
            "QEMU live (downtime-limit 20 ms)",
            live,
            format!(
                "its reported downtime; {unfinished} of {reps} did not finish in {} s",
                QEMU_LIVE_LIMIT.as_secs()
            ),
        ));
        rows.push(row(
            "QEMU stop + migrate + cont",
            stop,
            "incl. fsync".into(),
        ));
    }
    if let Some(stop) = &fc {
        rows.push(row(
            "Firecracker pause + snapshot/create + resume",
            stop,
            "Full; incl. fsync of its memory file".into(),
        ));
    }
    println!(
        "\nGuest pause during capture, {mib} MiB test guest rewriting {} MiB continuously, 1 vCPU, {reps} reps\n",
        mib - 16
    );
    print_table(
        &[
            "capture",
            "pause ms (median)",
            "pause ms (min)",
            "command s (median)",
            "pause vs QEMU live",
            "vs best peer stop-and-copy",
            "",
        ],
        &rows,
    );
}
