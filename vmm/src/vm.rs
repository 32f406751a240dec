//! Building and running a VM: KVM set-up, guest memory, boot, legacy devices and vCPU threads.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::arch::boot::{self, BootSource};
use crate::arch::cpuid::{self, CpuidConfig};
use crate::arch::layout::{KVM_TSS_ADDRESS, MAX_VCPUS};
use crate::arch::mptable;
use crate::component_state::Persist;
use crate::devices::bus::Bus;
use crate::devices::legacy::serial;
use crate::devices::manager::DevicesState;
use crate::devices::{DeviceArgs, DeviceConfig, DeviceError, DeviceManager};
use crate::memory::{self, DirtyBitmap, GuestMemory};
use crate::vcpu::{BootVcpuConfig, Vcpu, VcpuArgs, VcpuError, VcpuHandle, VcpuState, VmEvent};

pub mod kvm_state;

pub use kvm_state::{KvmStateError, VmKvmState};
use serde::{Deserialize, Serialize};
use snapshot_boundary::{KeepAlive, RestoredMemory};

/// Where the guest's COM1 output goes.
pub enum Console {
    Stdout,
    File(PathBuf),
    Writer(Box<dyn Write + Send>),
}

/// What to boot and with how much.
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub console: Console,
    /// Virtio devices (none by default).
    pub devices: DeviceConfig,
}

/// How a guest ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    Reset,
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("this host's KVM lacks a required capability: {0}")]
    MissingCapability(&'static str),
    #[error("vCPU count must be between 1 and {max}, got {0}", max = MAX_VCPUS)]
    VcpuCount(u32),
    #[error("this host's KVM allows at most {max} vCPUs, asked for {asked}")]
    TooManyVcpus { asked: u8, max: usize },
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM set-up failed ({what}): {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    KvmState(#[from] KvmStateError),
    #[error("cannot open console file {path}: {source}")]
    Console {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("every vCPU thread is gone without an exit event")]
    VcpusGone,
    #[error("the guest is still running")]
    WaitTimeout,
}

/// A VM whose vCPUs are running.
pub struct Vm {
    // vCPU handles are dropped (threads joined) before the VM fd and memory they use.
    vcpus: Vec<VcpuHandle>,
    devices: DeviceManager,
    events: Mutex<Receiver<VmEvent>>,
    fd: VmFd,
    _kvm: Kvm,
    memory: GuestMemory,
    mem_mib: u64,
    /// `Some` once dirty tracking is on: pages taken from the logs but not yet captured (a
    /// failed capture puts its pages back here, so no write is ever lost to the next diff).
    dirty: Mutex<Option<Vec<Vec<u64>>>>,
    /// What a snapshot restore said to keep while guest memory is used (a lazy restore's
    /// connection to the process that fills it); dropped after `memory`.
    _restored: Option<KeepAlive>,
}

const REQUIRED_CAPS: [(Cap, &str); 6] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Opens KVM and checks it offers what we need.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// Validates the vCPU count before anything is allocated.
pub fn check_vcpus(n: u32) -> Result<u8, VmError> {
    u8::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_VCPUS).contains(n))
        .ok_or(VmError::VcpuCount(n))
}

fn open_console(console: Console) -> Result<serial::SerialOut, VmError> {
    Ok(match console {
        Console::Stdout => Box::new(std::io::stdout()),
        Console::Writer(w) => w,
        Console::File(path) => {
            let f: File = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| VmError::Console { path, source })?;
            Box::new(f)
        }
    })
}

/// A VM's complete KVM and device state (guest memory is saved separately, by the caller).
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub mem_mib: u64,
    pub kvm: VmKvmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// What a VM is restored with besides its `VmState`.
pub struct RestoreConfig {
    /// Guest RAM as the snapshot engine restored it (laid out as `memory::layout` says).
    pub memory: RestoredMemory<DirtyBitmap>,
    pub console: Console,
    /// Leave the vCPUs parked after restore.
    pub paused: bool,
    /// For a fork: the same devices with host sides of its own (disk copy, vsock socket,
    /// network). `None` re-creates the saved configuration.
    pub devices: Option<DeviceConfig>,
}

/// The parts boot and restore share, built the same way for both.
struct Parts {
    kvm: Kvm,
    fd: VmFd,
    devices: DeviceManager,
    /// The device buses, as every vCPU shares them.
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    event_tx: Sender<VmEvent>,
    events: Receiver<VmEvent>,
}

impl Parts {
    fn new(
        vcpu_count: u8,
        memory: &GuestMemory,
        console: Console,
        devices_state: Option<&DevicesState>,
        devices_config: &DeviceConfig,
    ) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        if usize::from(vcpu_count) > kvm.get_max_vcpus() {
            return Err(VmError::TooManyVcpus {
                asked: vcpu_count,
                max: kvm.get_max_vcpus(),
            });
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        memory::register(&fd, memory, 0)?;
        let (event_tx, events) = channel();
        let console = open_console(console)?;
        let devices = match devices_state {
            None => DeviceManager::new(&fd, memory, console, event_tx.clone(), devices_config)?,
            Some(s) => {
                let args = DeviceArgs {
                    vm: &fd,
                    memory,
                    console,
                    events: event_tx.clone(),
                    config: devices_config,
                };
                DeviceManager::restore(args, s)?
            }
        };
        Ok(Self {
            kvm,
            fd,
            pio: Arc::new(devices.pio.clone()),
            mmio: Arc::new(devices.mmio.clone()),
            devices,
            event_tx,
            events,
        })
    }

    fn vcpu_args(&self, id: u8) -> VcpuArgs<'_> {
        VcpuArgs {
            vm: &self.fd,
            id,
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            events: self.event_tx.clone(),
        }
    }

    /// Creates every vCPU before any runs: an IPI to a vCPU not yet created is lost.
    fn create_vcpus(&self, count: u8) -> Result<Vec<Vcpu>, VmError> {
        (0..count)
            .map(|id| Vcpu::new(self.vcpu_args(id)).map_err(VmError::from))
            .collect()
    }

    /// As `create_vcpus`, each from its saved state (`saved[i]` is vCPU i's).
    fn restore_vcpus(&self, saved: &[VcpuState]) -> Result<Vec<Vcpu>, VmError> {
        (0..)
            .zip(saved)
            .map(|(id, s)| Vcpu::restore(self.vcpu_args(id), s).map_err(VmError::from))
            .collect()
    }

    fn start(self, created: Vec<Vcpu>, memory: GuestMemory, paused: bool) -> Result<Vm, VmError> {
        let mut vcpus = Vec::with_capacity(created.len());
        for vcpu in created {
            vcpus.push(vcpu.start(paused)?);
        }
        Ok(Vm {
            vcpus,
            devices: self.devices,
            events: Mutex::new(self.events),
            fd: self.fd,
            _kvm: self.kvm,
            memory,
            mem_mib: 0,
            dirty: Mutex::new(None),
            _restored: None,
        })
    }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

impl Vm {
    /// Builds the VM from `config` and starts every vCPU.
    pub fn boot(config: VmConfig) -> Result<Self, VmError> {
        let vcpu_count = check_vcpus(u32::from(config.vcpus))?;
        memory::check_size(config.mem_mib)?;
        let memory = memory::create(config.mem_mib)?;
        let parts = Parts::new(vcpu_count, &memory, config.console, None, &config.devices)?;

        let mut cmdline = config.cmdline.clone();
        for word in parts.devices.cmdline_extra() {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(word);
        }
        let loaded = boot::load(
            &memory,
            &BootSource {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &cmdline,
            },
        )?;
        mptable::setup(&memory, vcpu_count)?;

        let supported = parts
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let hide_vmcall_features = cpuid::host_is_nested_pagetable_kvm();
        let tsc_deadline = parts.fd.check_extension(Cap::TscDeadlineTimer);
        let mut created = parts.create_vcpus(vcpu_count)?;
        for vcpu in created.iter_mut() {
            let id = vcpu.id;
            vcpu.configure_boot(
                &memory,
                &BootVcpuConfig {
                    supported_cpuid: &supported,
                    cpuid: CpuidConfig {
                        vcpu_id: id,
                        vcpu_count,
                        hide_vmcall_features,
                        tsc_deadline,
                    },
                    entry: (id == 0).then_some(loaded.entry),
                },
            )?;
            vcpu.probe_msrs(&parts.kvm)?;
        }
        let mut vm = parts.start(created, memory, false)?;
        vm.mem_mib = config.mem_mib;
        Ok(vm)
    }

    /// Starts recording which pages change (vCPU writes through KVM's dirty log, device writes
    /// through vm-memory's bitmap), for diff snapshots relative to the next capture.
    pub fn enable_dirty_tracking(&self) -> Result<(), VmError> {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if d.is_none() {
            memory::enable_dirty_log(&self.fd, &self.memory)?;
            memory::take_dirty(&self.fd, &self.memory)?;
            *d = Some(Vec::new());
        }
        Ok(())
    }

    /// Stops recording page changes (KVM's log off; pages not yet taken are dropped): diffs
    /// go back to comparing page digests.
    pub fn disable_dirty_tracking(&self) -> Result<(), VmError> {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if d.is_some() {
            memory::disable_dirty_log(&self.fd, &self.memory)?;
            *d = None;
        }
        Ok(())
    }

    /// Whether page changes are being recorded (see `enable_dirty_tracking`).
    pub fn dirty_tracking(&self) -> bool {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Pages written since the last call (per region, a bit per page); `None` without tracking.
    pub fn take_dirty_pages(&self) -> Result<Option<Vec<Vec<u64>>>, VmError> {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pending) = d.as_mut() else {
            return Ok(None);
        };
        let mut now = memory::take_dirty(&self.fd, &self.memory)?;
        for (region, old) in now.iter_mut().zip(pending.drain(..)) {
            for (w, o) in region.iter_mut().zip(old) {
                *w |= o;
            }
        }
        Ok(Some(now))
    }

    /// Puts back pages a failed capture took, so the next diff still includes them.
    pub fn requeue_dirty_pages(&self, bits: Vec<Vec<u64>>) {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pending) = d.as_mut() {
            if pending.is_empty() {
                *pending = bits;
            } else {
                for (p, b) in pending.iter_mut().zip(bits) {
                    for (w, o) in p.iter_mut().zip(b) {
                        *w |= o;
                    }
                }
            }
        }
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Pauses every vCPU; they stay out of KVM_RUN until `resume`.
    /// Parks every vCPU, then the device loop: after this nothing changes guest memory or device
    /// state until `resume`.
    pub fn pause(&self) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.pause()?;
        }
        self.devices.pause()?;
        Ok(())
    }

    pub fn resume(&self) -> Result<(), VmError> {
        self.devices.resume();
        for v in &self.vcpus {
            v.resume()?;
        }
        Ok(())
    }

    /// Waits until the guest resets or powers off, or a vCPU fails; then stops every vCPU.
    pub fn wait(self) -> Result<GuestExit, VmError> {
        self.wait_timeout(None)
            .map(|r| r.unwrap_or(GuestExit::Shutdown))
    }

    /// As `wait`, but gives up after `timeout` and returns `Ok(None)` with the VM stopped.
    pub fn wait_timeout(mut self, timeout: Option<Duration>) -> Result<Option<GuestExit>, VmError> {
        let r = match timeout {
            None => self.next_exit(None).map(Some),
            Some(t) => self.poll_exit(t),
        };
        self.stop();
        r.map(|o| o.flatten())
    }

    /// Waits up to `timeout` for the guest to end, without stopping the VM: `Ok(None)` if it
    /// is still running. For a VMM process that serves requests while the guest runs.
    pub fn poll_exit(&self, timeout: Duration) -> Result<Option<Option<GuestExit>>, VmError> {
        match self.next_exit(Some(timeout)) {
            Ok(e) => Ok(Some(e)),
            Err(VmError::WaitTimeout) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn next_exit(&self, timeout: Option<Duration>) -> Result<Option<GuestExit>, VmError> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let event = match timeout {
            None => events.recv().map_err(|_| VmError::VcpusGone)?,
            Some(t) => match events.recv_timeout(t) {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) => return Err(VmError::WaitTimeout),
                Err(RecvTimeoutError::Disconnected) => return Err(VmError::VcpusGone),
            },
        };
        match event {
            VmEvent::Reset => Ok(Some(GuestExit::Reset)),
            VmEvent::Shutdown => Ok(Some(GuestExit::Shutdown)),
            VmEvent::VcpuFailed { error, .. } => Err(VmError::Vcpu(error)),
        }
    }

    fn stop(&mut self) {
        for v in &mut self.vcpus {
            v.finish();
        }
        self.devices.flush_console();
    }
}

/// A whole VM: KVM's VM-wide state, every vCPU and every device. Guest memory is not part of
/// the state: the caller saves it beside, and a restore takes it, as the snapshot engine
/// rebuilt it, in its constructor arguments.
impl Persist for Vm {
    type State = VmState;
    type ConstructorArgs<'a> = RestoreConfig;
    type Error = VmError;

    /// The whole VM's state; every vCPU must be paused.
    fn save(&self) -> Result<VmState, VmError> {
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.save_state())
            .collect::<Result<Vec<_>, _>>()?;
        let kvm = kvm_state::save(&self.fd)?;
        Ok(VmState {
            mem_mib: self.mem_mib,
            kvm,
            vcpus,
            devices: self.devices.save()?,
        })
    }

    /// Rebuilds a VM from saved state and restored memory, then starts it (or leaves it paused).
    fn restore(config: RestoreConfig, state: &VmState) -> Result<Self, VmError> {
        let vcpu_count = u8::try_from(state.vcpus.len())
            .ok()
            .filter(|n| (1..=MAX_VCPUS).contains(n))
            .ok_or(VmError::VcpuCount(state.vcpus.len() as u32))?;
        let (memory, keep) = memory::from_restored(config.memory, state.mem_mib)?;
        let parts = Parts::new(
            vcpu_count,
            &memory,
            config.console,
            Some(&state.devices),
            config.devices.as_ref().unwrap_or(&state.devices.config),
        )?;
        kvm_state::restore(&parts.fd, &state.kvm)?;
        let created = parts.restore_vcpus(&state.vcpus)?;
        parts.devices.restored();
        if config.paused {
            parts.devices.pause()?;
        }
        let mut vm = parts.start(created, memory, config.paused)?;
        vm.mem_mib = state.mem_mib;
        vm._restored = Some(keep);
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::boot::tests::tiny_elf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn kvm_or_skip() -> bool {
        if std::path::Path::new("/dev/kvm").exists() {
            return true;
        }
        eprintln!("skipped: /dev/kvm is not available on this host");
        false
    }

    static N: AtomicU64 = AtomicU64::new(0);

    fn boot_code(code: &[u8], vcpus: u8) -> (Result<Vm, VmError>, Captured, PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "vmm-vm-{}-{}.elf",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, tiny_elf(code)).unwrap();
        let out = Captured::default();
        let vm = Vm::boot(VmConfig {
            kernel: path.clone(),
            initrd: None,
            cmdline: String::new(),
            mem_mib: 16,
            vcpus,
            console: Console::Writer(Box::new(out.clone())),
            devices: Default::default(),
        });
        (vm, out, path)
    }

    const HELLO_THEN_RESET: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'h', 0xee, // mov al, 'h'; out dx, al
        0xb0, b'i', 0xee, 0xb0, b'\n', 0xee, //
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
        0xf4, 0xeb, 0xfd, // hlt; jmp .-1
    ];

    #[test]
    fn guest_prints_on_com1_and_reset_ends_the_vm() {
        if !kvm_or_skip() {
            return;
        }
        for vcpus in [1, 2] {
            let (vm, out, path) = boot_code(HELLO_THEN_RESET, vcpus);
            let exit = vm
                .unwrap()
                .wait_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            assert_eq!(exit, Some(GuestExit::Reset), "{vcpus} vCPUs");
            assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn triple_fault_is_a_clear_error_with_registers() {
        if !kvm_or_skip() {
            return;
        }
        // ud2 with an empty IDT: #UD -> #GP -> #DF -> triple fault.
        let (vm, _, path) = boot_code(&[0x0f, 0x0b], 1);
        let err = vm
            .unwrap()
            .wait_timeout(Some(Duration::from_secs(20)))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, VmError::Vcpu(VcpuError::TripleFault { vcpu: 0, .. })),
            "{msg}"
        );
        assert!(msg.contains("rip=0x10000"), "{msg}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn paused_guest_makes_no_progress_until_resumed() {
        if !kvm_or_skip() {
            return;
        }
        // inc qword [0x5000]; jmp back
        let code = [0x48, 0xff, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, 0xeb, 0xf6];
        let (vm, _, path) = boot_code(&code, 1);
        let vm = vm.unwrap();
        let count = |vm: &Vm| vm.memory().read_obj::<u64>(GuestAddress(0x5000)).unwrap();
        let wait_for_progress = |vm: &Vm, from: u64| {
            for _ in 0..200 {
                if count(vm) > from {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            false
        };
        assert!(wait_for_progress(&vm, 0), "guest never ran");
        vm.pause().unwrap();
        let a = count(&vm);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(count(&vm), a, "counter moved while paused");
        vm.resume().unwrap();
        assert!(wait_for_progress(&vm, a), "no progress after resume");
        assert_eq!(
            vm.wait_timeout(Some(Duration::from_millis(1))).unwrap(),
            None
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_sizes_are_refused_before_kvm() {
        for (mem, vcpus) in [(0u64, 1u8), (16, 0), (16, 9)] {
            let r = Vm::boot(VmConfig {
                kernel: "/nonexistent".into(),
                initrd: None,
                cmdline: String::new(),
                mem_mib: mem,
                vcpus,
                console: Console::Writer(Box::new(std::io::sink())),
                devices: Default::default(),
            });
            assert!(
                matches!(r, Err(VmError::Memory(_)) | Err(VmError::VcpuCount(_))),
                "{mem} MiB {vcpus} vCPUs"
            );
        }
    }
}

#[cfg(test)]
mod restore_tests {
    use super::*;
    use crate::arch::boot::tests::tiny_elf;
    use snapshot::restore::RestoreMode;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    const COUNTER: GuestAddress = GuestAddress(0x5000);
    // inc qword [0x5000]; jmp back
    const COUNT_LOOP: [u8; 10] = [0x48, 0xff, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, 0xeb, 0xf6];

    pub(super) fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-restore-{}-{name}", std::process::id()))
    }

    pub(super) fn boot_counter(vcpus: u8) -> (Vm, PathBuf) {
        let k = tmp(&format!("count-{vcpus}.elf"));
        std::fs::write(&k, tiny_elf(&COUNT_LOOP)).unwrap();
        let vm = Vm::boot(VmConfig {
            kernel: k.clone(),
            initrd: None,
            cmdline: String::new(),
            mem_mib: 16,
            vcpus,
            console: Console::Writer(Box::new(std::io::sink())),
            devices: Default::default(),
        })
        .unwrap();
        (vm, k)
    }

    fn count(vm: &Vm) -> u64 {
        vm.memory().read_obj(COUNTER).unwrap()
    }

    fn wait_above(vm: &Vm, floor: u64) -> u64 {
        for _ in 0..500 {
            let c = count(vm);
            if c > floor {
                return c;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("counter stuck at {}", count(vm));
    }

    /// Restores from the memory file `mem` in `mode`, left paused, console discarded.
    pub(super) fn paused_config(
        mem: &std::path::Path,
        mode: RestoreMode,
        state: &VmState,
    ) -> RestoreConfig {
        let layout = memory::layout(state.mem_mib).unwrap();
        RestoreConfig {
            memory: snapshot::restore::GuestRam::from_file(&layout, mem, mode)
                .unwrap()
                .into_restored(),
            console: Console::Writer(Box::new(std::io::sink())),
            paused: true,
            devices: None,
        }
    }

    pub(super) fn dump_memory(vm: &Vm, path: &std::path::Path) {
        let mut f = File::create(path).unwrap();
        for r in vm.memory().iter() {
            let mut buf = vec![0u8; r.len() as usize];
            vm.memory().read_slice(&mut buf, r.start_addr()).unwrap();
            f.write_all(&buf).unwrap();
        }
    }

    #[test]
    fn restored_guest_continues_from_the_saved_count_in_every_mode() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is not available on this host");
            return;
        }
        let (vm, k) = boot_counter(1);
        wait_above(&vm, 1000);
        vm.pause().unwrap();
        let saved_count = count(&vm);
        let state = vm.save().unwrap();
        let mem = tmp("mem.bin");
        dump_memory(&vm, &mem);
        let encoded = snapshot::vmstate::encode(&state).unwrap();
        // The source runs on, far past the snapshot.
        vm.resume().unwrap();
        wait_above(&vm, saved_count + 1_000_000);
        drop(vm);

        for mode in [RestoreMode::Eager, RestoreMode::PrivateMap] {
            let state: VmState = snapshot::vmstate::decode(&encoded).unwrap();
            let rip = state.vcpus[0].regs.rip;
            let restored = Vm::restore(paused_config(&mem, mode, &state), &state).unwrap();
            assert_eq!(count(&restored), saved_count, "{mode:?}: memory as saved");
            let again = restored.save().unwrap();
            assert_eq!(again.vcpus[0].regs.rip, rip, "{mode:?}: same instruction");
            restored.resume().unwrap();
            let c = wait_above(&restored, saved_count);
            assert!(
                c < saved_count + 1_000_000,
                "{mode:?}: continued from the snapshot, not the source"
            );
        }
        std::fs::remove_file(mem).unwrap();
        std::fs::remove_file(k).unwrap();
    }

    #[test]
    fn vcpu_state_round_trips_byte_identical() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is not available on this host");
            return;
        }
        let (vm, k) = boot_counter(2);
        wait_above(&vm, 100);
        vm.pause().unwrap();
        let first = vm.save().unwrap();
        let mem = tmp("mem-rt.bin");
        dump_memory(&vm, &mem);
        drop(vm);
        let encoded = snapshot::vmstate::encode(&first).unwrap();
        let state: VmState = snapshot::vmstate::decode(&encoded).unwrap();
        let restored =
            Vm::restore(paused_config(&mem, RestoreMode::Eager, &state), &state).unwrap();
        let second = restored.save().unwrap();
        for (a, b) in first.vcpus.iter().zip(&second.vcpus) {
            let enc = |v: &VcpuState| {
                let mut v: VcpuState =
                    snapshot::vmstate::decode(&snapshot::vmstate::encode(v).unwrap()).unwrap();
                // The TSC keeps counting on the host between the two saves: compare all but it.
                for m in v
                    .msrs
                    .iter_mut()
                    .filter(|m| m.index == crate::arch::msr::MSR_IA32_TSC)
                {
                    m.data = 0;
                }
                snapshot::vmstate::encode(&v).unwrap()
            };
            assert_eq!(a.msrs.len(), b.msrs.len());
            for (x, y) in a.msrs.iter().zip(&b.msrs) {
                if x.index != crate::arch::msr::MSR_IA32_TSC {
                    assert_eq!((x.index, x.data), (y.index, y.data), "vCPU {} MSR", a.id);
                }
            }
            assert_eq!(
                enc(a),
                enc(b),
                "vCPU {} state differs after a round trip",
                a.id
            );
        }
        assert_eq!(
            snapshot::vmstate::encode(&first.devices).unwrap(),
            snapshot::vmstate::encode(&second.devices).unwrap()
        );
        std::fs::remove_file(mem).unwrap();
        std::fs::remove_file(k).unwrap();
    }
}

#[cfg(test)]
mod vcpu_order_tests {
    use super::restore_tests::{boot_counter, dump_memory, paused_config, tmp};
    use super::*;
    use snapshot::restore::RestoreMode;

    #[test]
    fn vcpu_states_out_of_order_are_refused() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is not available on this host");
            return;
        }
        let (vm, k) = boot_counter(2);
        vm.pause().unwrap();
        let mut state = vm.save().unwrap();
        let mem = tmp("mem-order.bin");
        dump_memory(&vm, &mem);
        drop(vm);
        state.vcpus.swap(0, 1);
        assert!(matches!(
            Vm::restore(paused_config(&mem, RestoreMode::Eager, &state), &state),
            Err(VmError::Vcpu(VcpuError::StateId { vcpu: 0, saved: 1 }))
        ));
        std::fs::remove_file(mem).unwrap();
        std::fs::remove_file(k).unwrap();
    }
}

#[cfg(test)]
mod sync_tests {
    /// The VMM process serves its control socket from another thread than the one that waits.
    #[test]
    fn vm_is_shareable_across_threads() {
        fn assert_sync<T: Send + Sync>() {}
        assert_sync::<super::Vm>();
    }
}
