//! A vCPU: its boot configuration, its saved state ([`state`]), and the thread that runs it as
//! an explicit state machine (running, paused, finished) driven by requests over a channel.

pub mod state;

use std::cell::Cell;
use std::fmt;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::cpuid::{self, CpuidConfig};
use crate::arch::{msr, regs};
use crate::component_state::Persist;
use crate::devices::bus::Bus;
use crate::memory::GuestMemory;

pub use state::{VcpuState, VcpuStateError};

/// What a vCPU thread reports to the VM when the guest stops or fails.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest asked for a reset (i8042 or a KVM system event).
    Reset,
    /// The guest powered off.
    Shutdown,
    /// A vCPU cannot go on.
    VcpuFailed { vcpu: u8, error: VcpuError },
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {vcpu}: KVM_CREATE_VCPU failed: {source}")]
    Create { vcpu: u8, source: kvm_ioctls::Error },
    #[error("vCPU {vcpu}: cannot set {what}: {source}")]
    Configure {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: {0}", vcpu = .1)]
    Msr(#[source] msr::MsrError, u8),
    #[error("vCPU {vcpu}: {0}", vcpu = .1)]
    Regs(#[source] regs::RegsError, u8),
    #[error("guest triple fault (KVM_EXIT_SHUTDOWN) on vCPU {vcpu}: {regs}")]
    TripleFault { vcpu: u8, regs: RegsDump },
    #[error("KVM internal error (suberror {suberror}) on vCPU {vcpu}: {regs}")]
    InternalError {
        vcpu: u8,
        suberror: u32,
        regs: RegsDump,
    },
    #[error("KVM failed to enter the guest on vCPU {vcpu} (hardware reason {reason:#x}): {regs}")]
    FailEntry {
        vcpu: u8,
        reason: u64,
        regs: RegsDump,
    },
    #[error("unexpected exit {exit} on vCPU {vcpu}: {regs}")]
    UnexpectedExit {
        vcpu: u8,
        exit: String,
        regs: RegsDump,
    },
    #[error("KVM_RUN failed on vCPU {vcpu}: {source}")]
    Run { vcpu: u8, source: kvm_ioctls::Error },
    #[error("cannot start the thread for vCPU {vcpu}: {source}")]
    Spawn { vcpu: u8, source: std::io::Error },
    #[error("vCPU {0} thread is gone")]
    Gone(u8),
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    #[error("vCPU {0} must be paused to save its state")]
    NotPaused(u8),
    #[error("vCPU {vcpu}: the saved state is vCPU {saved}'s")]
    StateId { vcpu: u8, saved: u8 },
    #[error(transparent)]
    State(#[from] VcpuStateError),
}

/// The registers worth showing when a guest dies.
#[derive(Debug, Clone, Default)]
pub struct RegsDump {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs_selector: u16,
    pub unavailable: bool,
}

impl RegsDump {
    fn of(fd: &VcpuFd) -> Self {
        match (fd.get_regs(), fd.get_sregs()) {
            (Ok(r), Ok(s)) => RegsDump {
                rip: r.rip,
                rsp: r.rsp,
                rflags: r.rflags,
                rax: r.rax,
                cr0: s.cr0,
                cr2: s.cr2,
                cr3: s.cr3,
                cr4: s.cr4,
                efer: s.efer,
                cs_selector: s.cs.selector,
                unavailable: false,
            },
            _ => RegsDump {
                unavailable: true,
                ..Default::default()
            },
        }
    }
}

impl fmt::Display for RegsDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unavailable {
            return write!(f, "registers unavailable");
        }
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            self.rip, self.rsp, self.rflags, self.rax, self.cs_selector, self.cr0, self.cr2, self.cr3, self.cr4, self.efer
        )
    }
}

/// Requests a vCPU thread answers between runs.
#[derive(Debug)]
pub enum VcpuRequest {
    Pause,
    Resume,
    /// Save the vCPU's KVM state; only answered while paused.
    SaveState,
    Finish,
}

#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    State(Box<Result<VcpuState, VcpuError>>),
    NotPaused,
}

thread_local! {
    // The running vCPU's kvm_run, so the kick signal handler can set immediate_exit.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's kvm_run mapping, alive while the vCPU runs;
            // a volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Registration only fails for an invalid signal number, which SIGRTMIN is not.
        let _ = register_signal_handler(kick_signal(), kick_handler);
    });
}

/// A vCPU not yet running: configured from the main thread, then moved into its thread.
pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: Sender<VmEvent>,
    /// MSRs saved with this vCPU's state.
    msr_indices: Vec<u32>,
}

/// What a vCPU is created with.
pub struct VcpuArgs<'a> {
    pub vm: &'a kvm_ioctls::VmFd,
    pub id: u8,
    /// Port I/O and MMIO exits go to these buses.
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    /// Where the vCPU reports the guest's end or its own failure.
    pub events: Sender<VmEvent>,
}

/// How to set up one vCPU at boot.
pub struct BootVcpuConfig<'a> {
    pub supported_cpuid: &'a CpuId,
    pub cpuid: CpuidConfig,
    /// Only the boot processor starts at the kernel entry; the others wait for INIT/SIPI.
    pub entry: Option<vm_memory::GuestAddress>,
}

impl Vcpu {
    pub fn new(args: VcpuArgs<'_>) -> Result<Self, VcpuError> {
        let VcpuArgs {
            vm,
            id,
            pio,
            mmio,
            events,
        } = args;
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { vcpu: id, source })?;
        Ok(Self {
            id,
            fd,
            pio,
            mmio,
            events,
            msr_indices: Vec::new(),
        })
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn cfg_err(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
        let vcpu = self.id;
        move |source| VcpuError::Configure { vcpu, what, source }
    }

    /// CPUID, MSRs, LAPIC LINT pins and, for the boot processor, registers for the 64-bit entry.
    pub fn configure_boot(&self, mem: &GuestMemory, cfg: &BootVcpuConfig) -> Result<(), VcpuError> {
        let mut cpuid = cfg.supported_cpuid.clone();
        cpuid::normalize(&mut cpuid, cfg.cpuid);
        self.fd.set_cpuid2(&cpuid).map_err(self.cfg_err("CPUID"))?;
        msr::set_msrs(&self.fd, &msr::boot_msrs()).map_err(|e| VcpuError::Msr(e, self.id))?;
        self.setup_lint()?;
        if let Some(entry) = cfg.entry {
            let mut sregs = self.fd.get_sregs().map_err(self.cfg_err("sregs"))?;
            regs::setup_sregs(mem, &mut sregs).map_err(|e| VcpuError::Regs(e, self.id))?;
            self.fd.set_sregs(&sregs).map_err(self.cfg_err("sregs"))?;
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(self.cfg_err("regs"))?;
            self.fd
                .set_fpu(&regs::boot_fpu())
                .map_err(self.cfg_err("FPU"))?;
        }
        Ok(())
    }

    /// Decides which MSRs this vCPU saves (after CPUID is set: it decides which exist).
    pub fn probe_msrs(&mut self, kvm: &kvm_ioctls::Kvm) -> Result<(), VcpuError> {
        self.msr_indices = state::saveable_msrs(kvm, &self.fd)?;
        Ok(())
    }

    /// LINT0 delivers the PIC's ExtINT, LINT1 delivers NMI, as on a PC.
    fn setup_lint(&self) -> Result<(), VcpuError> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const MODE_NMI: u32 = 0x4;
        const MODE_EXTINT: u32 = 0x7;
        let mut lapic = self.fd.get_lapic().map_err(self.cfg_err("LAPIC"))?;
        let set_mode = |regs: &mut [libc::c_char; 1024], off: usize, mode: u32| {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = regs[off + i] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (i, x) in v.to_le_bytes().iter().enumerate() {
                regs[off + i] = *x as libc::c_char;
            }
        };
        set_mode(&mut lapic.regs, APIC_LVT0, MODE_EXTINT);
        set_mode(&mut lapic.regs, APIC_LVT1, MODE_NMI);
        self.fd.set_lapic(&lapic).map_err(self.cfg_err("LAPIC"))
    }

    /// Starts the vCPU thread, running (or paused, when `paused`).
    pub fn start(self, paused: bool) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler();
        let id = self.id;
        let (req_tx, req_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run_loop(req_rx, resp_tx, paused))
            .map_err(|source| VcpuError::Spawn { vcpu: id, source })?;
        Ok(VcpuHandle {
            id,
            thread: Some(thread),
            requests: req_tx,
            responses: std::sync::Mutex::new(resp_rx),
        })
    }

    fn run_loop(
        mut self,
        requests: Receiver<VcpuRequest>,
        responses: Sender<VcpuResponse>,
        mut paused: bool,
    ) {
        crate::thread_hook::enter(crate::thread_hook::ThreadKind::Vcpu);
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        loop {
            // Requests first: a kick leaves its request queued before the signal lands.
            loop {
                let req = if paused {
                    match requests.recv() {
                        Ok(r) => r,
                        Err(_) => return self.detach(),
                    }
                } else {
                    match requests.try_recv() {
                        Ok(r) => r,
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(_) => return self.detach(),
                    }
                };
                match req {
                    VcpuRequest::Pause => {
                        paused = true;
                        let _ = responses.send(VcpuResponse::Paused);
                    }
                    VcpuRequest::Resume => {
                        if paused {
                            // Tells a kvmclock guest it was stopped, so it does not report a
                            // soft lockup; fails harmlessly when the guest has no kvmclock.
                            let _ = self.fd.kvmclock_ctrl();
                        }
                        paused = false;
                        let _ = responses.send(VcpuResponse::Resumed);
                    }
                    VcpuRequest::SaveState => {
                        let r = if paused {
                            VcpuResponse::State(Box::new(self.save()))
                        } else {
                            VcpuResponse::NotPaused
                        };
                        let _ = responses.send(r);
                    }
                    VcpuRequest::Finish => return self.detach(),
                }
            }
            if let Err(event) = self.run_once() {
                let _ = self.events.send(event);
                // Stay parked until told to finish: the VM tears everything down together.
                paused = true;
            }
        }
    }

    fn detach(&mut self) {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    /// One KVM_RUN and the handling of its exit. `Err` carries an event that ends the VM.
    fn run_once(&mut self) -> Result<(), VmEvent> {
        let id = self.id;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(u64::from(port), data);
                    Ok(())
                }
                VcpuExit::IoIn(port, data) => {
                    self.pio.read(u64::from(port), data);
                    Ok(())
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read(addr, data);
                    Ok(())
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
                    Ok(())
                }
                // With the in-kernel irqchip KVM handles HLT; a stray exit just resumes.
                VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => Ok(()),
                VcpuExit::Shutdown => Err(VmEvent::VcpuFailed {
                    vcpu: id,
                    error: VcpuError::TripleFault {
                        vcpu: id,
                        regs: RegsDump::of(&self.fd),
                    },
                }),
                VcpuExit::SystemEvent(kind, _) => Err(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmEvent::Reset,
                    _ => VmEvent::Shutdown,
                }),
                VcpuExit::InternalError => {
                    let suberror = self.internal_suberror();
                    Err(VmEvent::VcpuFailed {
                        vcpu: id,
                        error: VcpuError::InternalError {
                            vcpu: id,
                            suberror,
                            regs: RegsDump::of(&self.fd),
                        },
                    })
                }
                VcpuExit::FailEntry(reason, _) => Err(VmEvent::VcpuFailed {
                    vcpu: id,
                    error: VcpuError::FailEntry {
                        vcpu: id,
                        reason,
                        regs: RegsDump::of(&self.fd),
                    },
                }),
                other => {
                    let exit = format!("{other:?}");
                    Err(VmEvent::VcpuFailed {
                        vcpu: id,
                        error: VcpuError::UnexpectedExit {
                            vcpu: id,
                            exit,
                            regs: RegsDump::of(&self.fd),
                        },
                    })
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Ok(())
            }
            Err(source) => Err(VmEvent::VcpuFailed {
                vcpu: id,
                error: VcpuError::Run { vcpu: id, source },
            }),
        }
    }

    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the exit union is valid.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }
}

/// A vCPU's KVM state. It is read on the vCPU's own thread while paused: `VcpuHandle::save_state`
/// asks the thread for it.
impl Persist for Vcpu {
    type State = VcpuState;
    type ConstructorArgs<'a> = VcpuArgs<'a>;
    type Error = VcpuError;

    fn save(&self) -> Result<VcpuState, VcpuError> {
        Ok(state::save(&self.fd, self.id, &self.msr_indices)?)
    }

    /// Creates the vCPU and restores its KVM state; it saves the same MSRs again later.
    fn restore(args: VcpuArgs<'_>, saved: &VcpuState) -> Result<Self, VcpuError> {
        if saved.id != args.id {
            return Err(VcpuError::StateId {
                vcpu: args.id,
                saved: saved.id,
            });
        }
        let mut vcpu = Self::new(args)?;
        state::restore(&vcpu.fd, saved)?;
        vcpu.msr_indices = saved.msrs.iter().map(|m| m.index).collect();
        Ok(vcpu)
    }
}

/// The VM's side of a running vCPU thread.
pub struct VcpuHandle {
    pub id: u8,
    thread: Option<JoinHandle<()>>,
    requests: Sender<VcpuRequest>,
    // Held across send and receive, so concurrent callers get their own answers.
    responses: std::sync::Mutex<Receiver<VcpuResponse>>,
}

/// How long a vCPU may take to leave KVM_RUN after a kick. Generous: nested KVM exits are slow.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl VcpuHandle {
    fn kick(&self) {
        if let Some(t) = &self.thread {
            // Fails only if the thread already exited, which is what we wanted anyway.
            let _ = t.kill(kick_signal());
        }
    }

    fn request(&self, req: VcpuRequest) -> Result<VcpuResponse, VcpuError> {
        let responses = self.responses.lock().unwrap_or_else(|e| e.into_inner());
        self.requests
            .send(req)
            .map_err(|_| VcpuError::Gone(self.id))?;
        self.kick();
        match responses.recv_timeout(ANSWER_TIMEOUT) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout(self.id, ANSWER_TIMEOUT)),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone(self.id)),
        }
    }

    /// Takes the vCPU out of KVM_RUN and parks it; it stays parked until `resume`.
    pub fn pause(&self) -> Result<(), VcpuError> {
        match self.request(VcpuRequest::Pause)? {
            VcpuResponse::Paused => Ok(()),
            _ => Err(VcpuError::Gone(self.id)),
        }
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        match self.request(VcpuRequest::Resume)? {
            VcpuResponse::Resumed => Ok(()),
            _ => Err(VcpuError::Gone(self.id)),
        }
    }

    /// The vCPU's KVM state; it must be paused.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        match self.request(VcpuRequest::SaveState)? {
            VcpuResponse::State(r) => *r,
            VcpuResponse::NotPaused => Err(VcpuError::NotPaused(self.id)),
            _ => Err(VcpuError::Gone(self.id)),
        }
    }

    /// Stops the thread and waits for it.
    pub fn finish(&mut self) {
        let _ = self.requests.send(VcpuRequest::Finish);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.finish();
    }
}
