//! Owns every device of a VM and the buses that route guest accesses to them. One path attaches
//! devices for boot and for restore, so no device can be forgotten in one of the two: the
//! virtio slots are a list ([`kind::slots`]) whose entries build, save and restore themselves.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::{Bus, BusError};
use super::config::DeviceConfig;
use super::legacy::{i8042, serial, I8042State, Serial, SerialState, I8042};
use super::virtio::block::BlockError;
use super::virtio::event_loop::{EventLoop, EventLoopError};
use super::virtio::kind::{self, VirtioComponent};
use super::virtio::mmio::{self, lock, MmioTransport, MmioTransportState, TransportArgs};
use super::virtio::net::NetError;
use super::virtio::rng::RngError;
use super::virtio::vsock::VsockError;
use super::virtio::Interrupt;
use crate::arch::layout::{
    IRQ_BASE, IRQ_MAX, SERIAL_IRQ, VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_START,
};
use crate::component_state::Persist;
use crate::memory::GuestMemory;
use crate::vcpu::VmEvent;
use serde::{Deserialize, Serialize};

pub use super::virtio::kind::VirtioDeviceState;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    SerialState(#[from] serial::SerialStateError),
    #[error("cannot register {what} with KVM: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("virtio-blk: {0}")]
    Block(#[from] BlockError),
    #[error("virtio-vsock: {0}")]
    Vsock(#[from] VsockError),
    #[error("virtio-net: {0}")]
    Net(#[from] NetError),
    #[error("virtio-rng: {0}")]
    Rng(#[from] RngError),
    #[error("{0} virtio devices configured, at most {max} fit the IRQ lines", max = IRQ_MAX - IRQ_BASE + 1)]
    TooManyDevices(usize),
    #[error("the snapshot's devices do not match the configuration: {0}")]
    StateMismatch(String),
    #[error("virtio slot {slot}: {source}")]
    Transport {
        slot: usize,
        source: mmio::RestoreError,
    },
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
}

impl From<std::convert::Infallible> for DeviceError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// Every device's state, as saved in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    /// The device configuration the VM was built with (restore rebuilds the same devices).
    #[serde(default)]
    pub config: DeviceConfig,
    /// One entry per virtio-mmio slot, in slot order.
    #[serde(default)]
    pub virtio: Vec<VirtioSlotState>,
}

/// A virtio-mmio slot's saved state: where it sits, its transport registers and its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSlotState {
    pub base: u64,
    pub irq: u32,
    pub transport: MmioTransportState,
    pub device: VirtioDeviceState,
}

/// Where a virtio device sits and how to reach it.
pub struct VirtioSlot {
    /// Guest-physical base of its 4 KiB register window.
    pub base: u64,
    /// Its IOAPIC pin (edge-triggered, through an irqfd).
    pub irq: u32,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub device: Box<dyn VirtioComponent>,
}

/// The devices of one VM.
pub struct DeviceManager {
    // Dropped first: the loop thread stops before the devices it drives go away.
    event_loop: Option<EventLoop>,
    pub pio: Bus,
    pub mmio: Bus,
    serial: Arc<Mutex<Serial>>,
    virtio: Vec<VirtioSlot>,
    config: DeviceConfig,
    /// Extra kernel command-line words the devices need (e.g. `virtio_mmio.device=`).
    cmdline_extra: Vec<String>,
}

/// What the host supplies to build a VM's devices.
pub struct DeviceArgs<'a> {
    pub vm: &'a VmFd,
    pub memory: &'a GuestMemory,
    pub console: serial::SerialOut,
    /// Where the i8042 reports a guest reset.
    pub events: Sender<VmEvent>,
    /// The devices and their host sides. A restore takes the snapshot's own configuration
    /// (`DevicesState::config`), or for a fork the same devices with host sides of its own
    /// (disk copy, vsock socket, network): the device list must match the snapshot's.
    pub config: &'a DeviceConfig,
}

impl DeviceManager {
    /// Legacy devices every VM has (COM1 with its IRQ through an irqfd, the i8042 reset line)
    /// and the virtio devices of `config`, each on its own virtio-mmio slot; then starts the
    /// device event loop. Every problem with a device's host side (missing disk image, a vsock
    /// path that is not a socket, no passt) is reported here.
    pub fn new(
        vm: &VmFd,
        memory: &GuestMemory,
        console: serial::SerialOut,
        events: Sender<VmEvent>,
        config: &DeviceConfig,
    ) -> Result<Self, DeviceError> {
        Self::build(
            DeviceArgs {
                vm,
                memory,
                console,
                events,
                config,
            },
            None,
        )
    }

    /// Parks the device event loop: no device touches guest memory or a queue until `resume`.
    pub fn pause(&self) -> Result<(), DeviceError> {
        if let Some(l) = &self.event_loop {
            l.pause()?;
        }
        Ok(())
    }

    pub fn resume(&self) {
        if let Some(l) = &self.event_loop {
            l.resume();
        }
    }

    /// The virtio slots, in slot order.
    pub fn virtio_slots(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    fn build(args: DeviceArgs<'_>, state: Option<&DevicesState>) -> Result<Self, DeviceError> {
        let DeviceArgs {
            vm,
            memory,
            console,
            events,
            config,
        } = args;
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|source| DeviceError::Kvm {
                what: "the serial irqfd",
                source,
            })?;
        let serial = match state {
            Some(s) => Serial::restore((serial_irq, console), &s.serial)?,
            None => Serial::new(serial_irq, console),
        };
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(serial.clone(), serial::COM1_PORT, serial::COM1_LEN)?;
        let reset = ChannelTrigger(Mutex::new(events));
        let i8042 = match state {
            Some(_) => I8042::restore(reset, &I8042State {})?,
            None => I8042::new(reset),
        };
        pio.insert(
            Arc::new(Mutex::new(i8042)),
            i8042::I8042_PORT,
            i8042::I8042_LEN,
        )?;

        let specs = kind::slots(config);
        let count = specs.len();
        if count > (IRQ_MAX - IRQ_BASE + 1) as usize {
            return Err(DeviceError::TooManyDevices(count));
        }
        let saved = state.map(|s| s.virtio.as_slice());
        if let Some(saved) = saved {
            if saved.len() != count {
                return Err(DeviceError::StateMismatch(format!(
                    "the snapshot has {} virtio devices, the configuration {count}",
                    saved.len()
                )));
            }
        }
        // Every device first, then the slots: a host side that is missing fails before any
        // device is registered with KVM.
        let devices = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| spec.build(i, saved.map(|s| &s[i].device)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut mmio = Bus::new();
        let mut virtio = Vec::with_capacity(count);
        let mut cmdline_extra = Vec::new();
        for (i, device) in devices.into_iter().enumerate() {
            let slot = attach_virtio(vm, memory, &mut mmio, i, device, saved.map(|s| &s[i]))?;
            cmdline_extra.push(format!(
                "virtio_mmio.device=4K@{:#x}:{}",
                slot.base, slot.irq
            ));
            virtio.push(slot);
        }
        let event_loop = if virtio.is_empty() {
            None
        } else {
            Some(EventLoop::start(
                virtio.iter().map(|s| s.device.subscriber()).collect(),
            )?)
        };
        Ok(Self {
            event_loop,
            pio,
            mmio,
            serial,
            virtio,
            config: config.clone(),
            cmdline_extra,
        })
    }

    /// Tells every device that the VM it was restored into is complete: a device whose host
    /// side did not survive the snapshot tells the guest (vsock: TRANSPORT_RESET). Call it once
    /// the VM's interrupt controllers are restored, or the interrupts it raises are lost.
    pub fn restored(&self) {
        for s in &self.virtio {
            s.device.restored();
        }
    }

    pub fn serial(&self) -> &Arc<Mutex<Serial>> {
        &self.serial
    }

    /// Words to append to the kernel command line.
    pub fn cmdline_extra(&self) -> &[String] {
        &self.cmdline_extra
    }

    /// Flushes the console sink (used before a VM exits).
    pub fn flush_console(&self) {
        if let Ok(mut s) = self.serial.lock() {
            let _ = s.flush();
        }
    }
}

/// The devices of a VM: the serial port, the i8042 (nothing to save), and every virtio slot
/// (transport registers and device), in slot order.
impl Persist for DeviceManager {
    type State = DevicesState;
    type ConstructorArgs<'a> = DeviceArgs<'a>;
    type Error = DeviceError;

    /// Take it with the vCPUs and the device loop paused (`pause`), so that queue indices and
    /// guest memory agree.
    fn save(&self) -> Result<DevicesState, DeviceError> {
        let serial = lock(&self.serial).save()?;
        let virtio = self
            .virtio
            .iter()
            .enumerate()
            .map(|(slot, s)| {
                Ok(VirtioSlotState {
                    base: s.base,
                    irq: s.irq,
                    transport: lock(&s.transport)
                        .save()
                        .map_err(|source| DeviceError::Transport { slot, source })?,
                    device: s.device.save()?,
                })
            })
            .collect::<Result<_, DeviceError>>()?;
        Ok(DevicesState {
            serial,
            config: self.config.clone(),
            virtio,
        })
    }

    /// The same devices, their state taken from `state`. Then call `restored`.
    fn restore(args: DeviceArgs<'_>, state: &DevicesState) -> Result<Self, DeviceError> {
        Self::build(args, Some(state))
    }
}

/// Puts `device` on slot `index`: its irqfd, one ioeventfd per queue on QueueNotify (datamatch =
/// queue index), and its transport on the MMIO bus, with the registers of `saved` if given.
fn attach_virtio(
    vm: &VmFd,
    memory: &GuestMemory,
    mmio: &mut Bus,
    index: usize,
    device: Box<dyn VirtioComponent>,
    saved: Option<&VirtioSlotState>,
) -> Result<VirtioSlot, DeviceError> {
    let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SLOT_SIZE;
    let irq = IRQ_BASE + index as u32;
    if let Some(s) = saved {
        if (s.base, s.irq) != (base, irq) {
            return Err(DeviceError::StateMismatch(format!(
                "virtio slot {index} was at {:#x} IRQ {} in the snapshot",
                s.base, s.irq
            )));
        }
    }
    let kvm = |what| move |source| DeviceError::Kvm { what, source };
    let interrupt = Arc::new(Interrupt::new().map_err(DeviceError::EventFd)?);
    vm.register_irqfd(interrupt.irqfd(), irq)
        .map_err(kvm("a virtio irqfd"))?;
    let dev = device.device();
    for (q, evt) in lock(&dev).queue_events().iter().enumerate() {
        vm.register_ioevent(
            evt,
            &IoEventAddress::Mmio(base + mmio::QUEUE_NOTIFY),
            q as u32,
        )
        .map_err(kvm("a virtio queue ioeventfd"))?;
    }
    let transport = match saved {
        None => MmioTransport::new(memory.clone(), dev, interrupt),
        Some(s) => {
            let args = TransportArgs {
                mem: memory.clone(),
                device: dev,
                interrupt,
            };
            MmioTransport::restore(args, &s.transport).map_err(|source| DeviceError::Transport {
                slot: index,
                source,
            })?
        }
    };
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), base, VIRTIO_MMIO_SLOT_SIZE)?;
    Ok(VirtioSlot {
        base,
        irq,
        transport,
        device,
    })
}

/// Turns the i8042 reset line into a VM event.
struct ChannelTrigger(Mutex<Sender<VmEvent>>);

impl vm_superio::Trigger for ChannelTrigger {
    type E = ();
    fn trigger(&self) -> Result<(), ()> {
        let tx = self.0.lock().map_err(|_| ())?;
        tx.send(VmEvent::Reset).map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::config::{BlockConfig, VsockConfig};
    use crate::devices::virtio::testutil::TestQueue;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-dm-{}-{name}", std::process::id()))
    }

    fn vm() -> Option<(kvm_ioctls::Kvm, VmFd)> {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is not available on this host");
            return None;
        }
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let fd = kvm.create_vm().unwrap();
        fd.create_irq_chip().unwrap();
        Some((kvm, fd))
    }

    fn config(tag: &str) -> (DeviceConfig, PathBuf, PathBuf) {
        let img = tmp(&format!("{tag}.img"));
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&img, data).unwrap();
        let sock = tmp(&format!("{tag}.sock"));
        (
            DeviceConfig {
                blocks: vec![BlockConfig {
                    path: img.clone(),
                    read_only: false,
                    id: Some("root".into()),
                }],
                net: None,
                vsock: Some(VsockConfig {
                    guest_cid: 3,
                    uds_path: sock.clone(),
                }),
                rng: true,
            },
            img,
            sock,
        )
    }

    fn mmio_write(bus: &Bus, addr: u64, v: u32) {
        assert!(bus.write(addr, &v.to_le_bytes()));
    }

    fn mmio_read(bus: &Bus, addr: u64) -> u32 {
        let mut d = [0u8; 4];
        assert!(bus.read(addr, &mut d));
        u32::from_le_bytes(d)
    }

    #[test]
    fn slots_cmdline_and_a_block_read_through_transport_and_event_loop() {
        let Some((_kvm, fd)) = vm() else { return };
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let (cfg, img, sock) = config("e2e");
        let (tx, _rx) = std::sync::mpsc::channel();
        let dm = DeviceManager::new(&fd, &mem, Box::new(std::io::sink()), tx, &cfg).unwrap();
        assert_eq!(
            dm.cmdline_extra(),
            &[
                "virtio_mmio.device=4K@0xd0000000:5",
                "virtio_mmio.device=4K@0xd0001000:6",
                "virtio_mmio.device=4K@0xd0002000:7",
            ]
        );
        let base = VIRTIO_MMIO_START;
        assert_eq!(mmio_read(&dm.mmio, base), mmio::MMIO_MAGIC);
        assert_eq!(mmio_read(&dm.mmio, base + 8), 2, "block");
        assert_eq!(mmio_read(&dm.mmio, base + 0x1008), 19, "vsock");
        assert_eq!(mmio_read(&dm.mmio, base + 0x2008), 4, "rng");
        assert!(sock.exists());

        // Bring the block device up the way a driver does.
        let mut q = TestQueue::new(&mem, 0x1_0000, 16);
        let live = q.queue();
        use virtio_queue::QueueT;
        mmio_write(&dm.mmio, base + 0x70, 1);
        mmio_write(&dm.mmio, base + 0x70, 3);
        mmio_write(&dm.mmio, base + 0x24, 1);
        mmio_write(&dm.mmio, base + 0x20, 1); // VIRTIO_F_VERSION_1
        mmio_write(&dm.mmio, base + 0x70, 11);
        assert_eq!(mmio_read(&dm.mmio, base + 0x70), 11);
        mmio_write(&dm.mmio, base + 0x30, 0);
        mmio_write(&dm.mmio, base + 0x38, 16);
        mmio_write(&dm.mmio, base + 0x80, live.desc_table() as u32);
        mmio_write(&dm.mmio, base + 0x90, live.avail_ring() as u32);
        mmio_write(&dm.mmio, base + 0xa0, live.used_ring() as u32);
        mmio_write(&dm.mmio, base + 0x44, 1);
        mmio_write(&dm.mmio, base + 0x70, 15);
        assert_eq!(mmio_read(&dm.mmio, base + 0x70), 15);

        // Read sector 3.
        mem.write_obj(0u32, GuestAddress(0x10_0000)).unwrap();
        mem.write_obj(0u32, GuestAddress(0x10_0004)).unwrap();
        mem.write_obj(3u64, GuestAddress(0x10_0008)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x10_3000)).unwrap();
        q.push(&[
            (0x10_0000, 16, false),
            (0x10_1000, 512, true),
            (0x10_3000, 1, true),
        ]);
        // The guest's notify would hit the ioeventfd; here it takes the bus path.
        mmio_write(&dm.mmio, base + 0x50, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while q.used_idx() == 0 {
            assert!(Instant::now() < deadline, "request not served");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_3000)).unwrap(), 0);
        let mut sector = vec![0u8; 512];
        mem.read_slice(&mut sector, GuestAddress(0x10_1000))
            .unwrap();
        let expect: Vec<u8> = (3 * 512..4 * 512u32).map(|i| (i % 253) as u8).collect();
        assert_eq!(sector, expect);
        assert_eq!(mmio_read(&dm.mmio, base + 0x60), 1, "InterruptStatus");

        // State is plain data, and restores onto a fresh manager with the same queues.
        dm.pause().unwrap();
        let state = dm.save().unwrap();
        dm.resume();
        assert_eq!(state.virtio.len(), 3);
        assert_eq!(state.virtio[0].transport.queues[0].next_avail, 1);
        let bytes = snapshot::vmstate::encode(&state).unwrap();
        let back: DevicesState = snapshot::vmstate::decode(&bytes).unwrap();
        assert_eq!(back.virtio, state.virtio);
        drop(dm);
        let Some((_kvm2, fd2)) = vm() else { return };
        let (tx, _rx) = std::sync::mpsc::channel();
        let args = DeviceArgs {
            vm: &fd2,
            memory: &mem,
            console: Box::new(std::io::sink()),
            events: tx,
            config: &back.config,
        };
        let dm2 = DeviceManager::restore(args, &back).unwrap();
        dm2.restored();
        assert_eq!(mmio_read(&dm2.mmio, base + 0x70), 15);
        let s2 = dm2.save().unwrap();
        assert_eq!(s2.virtio[0].transport.queues[0].next_avail, 1);
        std::fs::remove_file(img).unwrap();
        let _ = std::fs::remove_file(sock);
    }

    #[test]
    fn a_slot_state_of_another_kind_or_slot_count_is_refused() {
        let Some((_kvm, fd)) = vm() else { return };
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (cfg, img, sock) = config("kind");
        let (tx, _rx) = std::sync::mpsc::channel();
        let dm =
            DeviceManager::new(&fd, &mem, Box::new(std::io::sink()), tx.clone(), &cfg).unwrap();
        let saved = dm.save().unwrap();
        drop(dm);
        let restore = |state: &DevicesState| {
            let Some((_kvm, fd)) = vm() else {
                unreachable!()
            };
            let args = DeviceArgs {
                vm: &fd,
                memory: &mem,
                console: Box::new(std::io::sink()),
                events: tx.clone(),
                config: &state.config,
            };
            DeviceManager::restore(args, state).map(|_| ())
        };
        restore(&saved).unwrap();
        let mut swapped = saved.clone();
        swapped.virtio.swap(0, 2);
        match restore(&swapped) {
            Err(DeviceError::StateMismatch(m)) => {
                assert_eq!(m, "virtio slot 0 is not a block device in the snapshot")
            }
            other => panic!("{:?}", other.err()),
        }
        let mut fewer = saved.clone();
        fewer.virtio.pop();
        assert!(matches!(
            restore(&fewer),
            Err(DeviceError::StateMismatch(m)) if m.contains("has 2 virtio devices, the configuration 3")
        ));
        let _ = std::fs::remove_file(img);
        let _ = std::fs::remove_file(sock);
    }

    #[test]
    fn bad_host_input_fails_at_construction() {
        let Some((_kvm, fd)) = vm() else { return };
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (mut cfg, img, sock) = config("bad");
        cfg.blocks[0].path = "/nonexistent/disk.img".into();
        let (tx, _rx) = std::sync::mpsc::channel();
        let e = DeviceManager::new(&fd, &mem, Box::new(std::io::sink()), tx.clone(), &cfg)
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("/nonexistent/disk.img does not exist"),
            "{e}"
        );
        let (mut cfg, _, _) = config("bad");
        std::fs::write(&sock, b"x").unwrap();
        let e = DeviceManager::new(&fd, &mem, Box::new(std::io::sink()), tx.clone(), &cfg)
            .err()
            .unwrap();
        assert!(e.to_string().contains("exists and is not a socket"), "{e}");
        cfg.vsock = None;
        cfg.net = Some(crate::devices::config::NetConfig {
            backend: crate::devices::config::NetBackendConfig::Passt {
                binary: Some("/nonexistent/passt".into()),
                args: vec![],
            },
            mac: crate::devices::config::MacAddr([0x52, 0x54, 0, 0, 0, 1]),
        });
        let e = DeviceManager::new(&fd, &mem, Box::new(std::io::sink()), tx.clone(), &cfg)
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("passt binary /nonexistent/passt"),
            "{e}"
        );
        cfg.net = None;
        cfg.blocks = (0..20)
            .map(|_| BlockConfig {
                path: img.clone(),
                read_only: true,
                id: None,
            })
            .collect();
        assert!(matches!(
            DeviceManager::new(&fd, &mem, Box::new(std::io::sink()), tx, &cfg),
            Err(DeviceError::TooManyDevices(21))
        ));
        let _ = std::fs::remove_file(img);
        let _ = std::fs::remove_file(sock);
    }
}
