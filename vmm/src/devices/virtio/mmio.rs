//! The virtio-mmio transport, version 2 (virtio 1.x §4.2.2): the register block the driver
//! programs, feature negotiation, the device status state machine and queue set-up.
//!
//! Every value the guest writes is checked: registers are 32-bit, aligned accesses only (others
//! are ignored and read as zero); queue sizes must be powers of two no larger than the device's
//! maximum; queue addresses must be aligned and, when the driver sets DRIVER_OK, lie in guest
//! memory; features the device did not offer, or a driver without VIRTIO_F_VERSION_1, make
//! FEATURES_OK fail. A device that cannot start sets DEVICE_NEEDS_RESET.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{
    ActiveQueues, Interrupt, QueueSnapshot, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::component_state::Persist;
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("MAGT").
pub const VENDOR_ID: u32 = 0x5447_414d;

// Register offsets (virtio 1.x §4.2.2).
const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
/// Where the driver writes a queue index to notify; KVM ioeventfds catch those writes.
pub const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const SHM_SEL: u64 = 0x0ac;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_LEN_HIGH: u64 = 0x0b4;
const SHM_BASE_LOW: u64 = 0x0b8;
const SHM_BASE_HIGH: u64 = 0x0bc;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

const S_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// The transport's registers as plain data (a snapshot's view of the slot).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
    /// Queues the driver configured with values we refused (they fail activation).
    #[serde(default)]
    pub bad_queues: Vec<bool>,
}

/// Why a saved transport state cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    #[error("saved device type {saved} does not match the configured device type {device}")]
    DeviceType { saved: u32, device: u32 },
    #[error("saved state has {saved} queues, the device has {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("saved queue {0} is invalid")]
    Queue(usize),
    #[error("the device did not accept its restored queues: {0}")]
    Activate(String),
}

/// A virtio-mmio slot: registers plus the device behind them.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    device_type: u32,
    max_sizes: Vec<u16>,
    avail_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    queues: Vec<Queue>,
    bad_queues: Vec<bool>,
    /// Why the last activation failed (for logs and tests).
    last_error: Option<String>,
}

impl MmioTransport {
    pub fn new(
        mem: GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let (device_type, max_sizes, avail_features) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.queue_max_sizes().to_vec(),
                d.avail_features() | VIRTIO_F_VERSION_1,
            )
        };
        let queues = fresh_queues(&max_sizes);
        let n = queues.len();
        Self {
            device,
            mem,
            interrupt,
            device_type,
            max_sizes,
            avail_features,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            queues,
            bad_queues: vec![false; n],
            last_error: None,
        }
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    fn selected_queue(&mut self) -> Option<(&mut Queue, &mut bool)> {
        let i = self.queue_sel as usize;
        self.queues.get_mut(i).zip(self.bad_queues.get_mut(i))
    }

    /// Queue registers may change only while the driver sets the device up (FEATURES_OK, not yet
    /// DRIVER_OK).
    fn queue_config_allowed(&self) -> bool {
        self.status & (S_FEATURES_OK | S_DRIVER_OK | S_FAILED) == S_FEATURES_OK
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device_type,
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            // No shared memory regions: a length of all ones means "no such region".
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            DRIVER_FEATURES => {
                if self.status & (S_DRIVER | S_FEATURES_OK | S_FAILED) != S_DRIVER {
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NUM if self.queue_config_allowed() => {
                if let Some((q, bad)) = self.selected_queue() {
                    let ok = u16::try_from(v)
                        .ok()
                        .is_some_and(|n| q.try_set_size(n).is_ok());
                    *bad |= !ok;
                }
            }
            QUEUE_READY if self.queue_config_allowed() => {
                if let Some((q, _)) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH
                if self.queue_config_allowed() =>
            {
                if let Some((q, bad)) = self.selected_queue() {
                    let high = offset & 4 != 0;
                    let (cur, set): (u64, fn(&mut Queue, GuestAddress) -> bool) = match offset {
                        QUEUE_DESC_LOW | QUEUE_DESC_HIGH => (q.desc_table(), |q, a| {
                            q.try_set_desc_table_address(a).is_ok()
                        }),
                        QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH => (q.avail_ring(), |q, a| {
                            q.try_set_avail_ring_address(a).is_ok()
                        }),
                        _ => (q.used_ring(), |q, a| q.try_set_used_ring_address(a).is_ok()),
                    };
                    let addr = if high {
                        (cur & 0xffff_ffff) | (u64::from(v) << 32)
                    } else {
                        (cur & !0xffff_ffff) | u64::from(v)
                    };
                    if !set(q, GuestAddress(addr)) {
                        *bad = true;
                    }
                }
            }
            // Normally caught by the ioeventfd (datamatch = queue index) and never seen here; a
            // notify we do see is forwarded, or dropped if the index is bogus.
            QUEUE_NOTIFY if self.status & S_DRIVER_OK != 0 => {
                let dev = lock(&self.device);
                if let Some(evt) = dev.queue_events().get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            INTERRUPT_ACK => self.interrupt.ack(v),
            STATUS => self.write_status(v),
            SHM_SEL => {}
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits; anything else is a driver bug we ignore.
        if v & self.status != self.status {
            return;
        }
        let new = v & !self.status;
        if new & S_FAILED != 0 {
            self.status |= S_FAILED;
            return;
        }
        let mut status = self.status;
        // Set bits in the order the spec mandates; stop at the first out-of-order one.
        for bit in [S_ACKNOWLEDGE, S_DRIVER, S_FEATURES_OK, S_DRIVER_OK] {
            if new & bit == 0 {
                continue;
            }
            let prerequisite = match bit {
                S_ACKNOWLEDGE => 0,
                S_DRIVER => S_ACKNOWLEDGE,
                S_FEATURES_OK => S_ACKNOWLEDGE | S_DRIVER,
                _ => S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK,
            };
            if status & prerequisite != prerequisite {
                break;
            }
            match bit {
                S_FEATURES_OK => {
                    let unknown = self.acked_features & !self.avail_features;
                    if unknown != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                        // FEATURES_OK stays clear: the driver reads it back and gives up.
                        self.last_error = Some(format!(
                            "driver features {:#x} refused (offered {:#x})",
                            self.acked_features, self.avail_features
                        ));
                        break;
                    }
                    status |= bit;
                }
                S_DRIVER_OK => {
                    self.status = status;
                    match self.activate() {
                        Ok(()) => status |= S_DRIVER_OK,
                        Err(e) => {
                            self.last_error = Some(e);
                            status |= S_DRIVER_OK | S_NEEDS_RESET;
                            self.status = status;
                            self.interrupt.trigger(INT_CONFIG);
                            return;
                        }
                    }
                }
                _ => status |= bit,
            }
        }
        self.status = status;
    }

    /// Validates every queue against guest memory and starts the device on copies of them.
    fn activate(&mut self) -> Result<(), String> {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let in_use = lock(&self.device)
            .queues_in_use(self.acked_features)
            .min(self.queues.len());
        let mut live = Vec::with_capacity(in_use);
        for (i, q) in self.queues.iter_mut().enumerate().take(in_use) {
            if self.bad_queues[i] {
                return Err(format!("queue {i} was given an invalid size or address"));
            }
            if !q.ready() {
                return Err(format!("queue {i} is not ready"));
            }
            if !q.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i} (size {}, desc {:#x}, avail {:#x}, used {:#x}) is not in guest memory",
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring()
                ));
            }
            q.set_event_idx(event_idx);
            live.push(
                QueueSnapshot::of(q)
                    .to_queue()
                    .ok_or_else(|| format!("queue {i} cannot be copied"))?,
            );
        }
        lock(&self.device)
            .activate(ActiveQueues {
                mem: self.mem.clone(),
                acked_features: self.acked_features,
                queues: live,
                interrupt: self.interrupt.clone(),
            })
            .map_err(|e| e.to_string())
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        self.queues = fresh_queues(&self.max_sizes);
        self.bad_queues = vec![false; self.queues.len()];
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.set_status(0);
    }
}

/// What a transport is built on: guest memory, the device behind the registers and the slot's
/// interrupt line.
pub struct TransportArgs {
    pub mem: GuestMemory,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub interrupt: Arc<Interrupt>,
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs<'a> = TransportArgs;
    type Error = RestoreError;

    /// The registers, with queue indices taken from the live device when it runs.
    fn save(&self) -> Result<MmioTransportState, RestoreError> {
        let dev = lock(&self.device);
        // A device may run on fewer queues than it has (those its features use): the rest are
        // as the driver left them.
        let live = dev.active_queues().unwrap_or(&[]);
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| QueueSnapshot::of(live.get(i).unwrap_or(q)))
            .collect();
        Ok(MmioTransportState {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues,
            bad_queues: self.bad_queues.clone(),
        })
    }

    /// Builds the transport from saved registers; a device that was running (DRIVER_OK) is
    /// activated again on its saved queues, so it continues where it stopped.
    fn restore(args: TransportArgs, state: &MmioTransportState) -> Result<Self, RestoreError> {
        let mut t = Self::new(args.mem, args.device, args.interrupt);
        if state.device_type != t.device_type {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                device: t.device_type,
            });
        }
        if state.queues.len() != t.max_sizes.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                device: t.max_sizes.len(),
            });
        }
        for (i, (s, &max)) in state.queues.iter().zip(&t.max_sizes).enumerate() {
            if s.max_size != max {
                return Err(RestoreError::Queue(i));
            }
            t.queues[i] = s.to_queue().ok_or(RestoreError::Queue(i))?;
        }
        t.status = state.status;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.acked_features = state.acked_features;
        t.queue_sel = state.queue_sel;
        t.config_generation = state.config_generation;
        if state.bad_queues.len() == t.queues.len() {
            t.bad_queues = state.bad_queues.clone();
        }
        t.interrupt.set_status(state.interrupt_status);
        if t.status & S_DRIVER_OK != 0 && t.status & S_NEEDS_RESET == 0 {
            t.activate().map_err(RestoreError::Activate)?;
        }
        Ok(t)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            lock(&self.device).read_config(offset - CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            if self.status & S_FAILED == 0 {
                lock(&self.device).write_config(offset - CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

fn fresh_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .map(|&m| Queue::new(m).expect("device queue max sizes are powers of two <= 32768"))
        .collect()
}

/// A poisoned device lock means the device panicked mid-operation; keep serving the guest.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, VirtioCommon, COMMON_FEATURES};
    use vmm_sys_util::eventfd::EventFd;

    /// A device that records what the transport does to it.
    pub struct Dummy {
        pub common: VirtioCommon,
        pub evts: Vec<EventFd>,
        pub active: Option<ActiveQueues>,
        pub resets: u32,
        pub config: [u8; 8],
        /// The second queue is used only with feature bit 3 (as net's control queue).
        pub optional_second: bool,
    }

    impl Dummy {
        pub fn new() -> Self {
            Self {
                common: VirtioCommon::new(COMMON_FEATURES | 1 << 3, 2).unwrap(),
                evts: super::super::queue_eventfds(2).unwrap(),
                active: None,
                resets: 0,
                config: *b"abcdefgh",
                optional_second: false,
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            COMMON_FEATURES | 1 << 3
        }
        fn queues_in_use(&self, acked_features: u64) -> usize {
            if self.optional_second && acked_features & 1 << 3 == 0 {
                1
            } else {
                2
            }
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data)
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(c) = self
                .config
                .get_mut(offset as usize..offset as usize + data.len())
            {
                c.copy_from_slice(data)
            }
        }
        fn common(&self) -> &VirtioCommon {
            &self.common
        }
        fn common_mut(&mut self) -> &mut VirtioCommon {
            &mut self.common
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
            self.active = Some(active);
            Ok(())
        }
        fn active_queues(&self) -> Option<&[Queue]> {
            self.active.as_ref().map(|a| a.queues.as_slice())
        }
        fn reset(&mut self) {
            self.active = None;
            self.resets += 1;
        }
    }

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn args(device: Arc<Mutex<Dummy>>) -> TransportArgs {
        TransportArgs {
            mem: mem(),
            device,
            interrupt: Arc::new(Interrupt::new().unwrap()),
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let t = MmioTransport::new(mem(), dev.clone(), Arc::new(Interrupt::new().unwrap()));
        (t, dev)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the transport like a Linux driver up to (not including) DRIVER_OK.
    pub fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, STATUS, S_ACKNOWLEDGE);
        w(t, STATUS, S_ACKNOWLEDGE | S_DRIVER);
        w(t, DRIVER_FEATURES_SEL, 0);
        w(t, DRIVER_FEATURES, features as u32);
        w(t, DRIVER_FEATURES_SEL, 1);
        w(t, DRIVER_FEATURES, (features >> 32) as u32);
        w(t, STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
        w(t, QUEUE_SEL, sel);
        w(t, QUEUE_NUM, size);
        w(t, QUEUE_DESC_LOW, base as u32);
        w(t, QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, QUEUE_DRIVER_HIGH, 0);
        w(t, QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, QUEUE_DEVICE_HIGH, 0);
        w(t, QUEUE_READY, 1);
    }

    const ALL: u32 = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(r(&mut t, VERSION), 2);
        assert_eq!(r(&mut t, DEVICE_ID), 42);
        assert_eq!(r(&mut t, VENDOR), VENDOR_ID);
        w(&mut t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, DEVICE_FEATURES), 1); // VERSION_1 is bit 32
        w(&mut t, DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            u64::from(r(&mut t, DEVICE_FEATURES)),
            (COMMON_FEATURES | 1 << 3) & 0xffff_ffff
        );
        w(&mut t, QUEUE_SEL, 1);
        assert_eq!(r(&mut t, QUEUE_NUM_MAX), 8);
        w(&mut t, QUEUE_SEL, 7);
        assert_eq!(r(&mut t, QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn odd_sized_and_unaligned_accesses_are_ignored() {
        let (mut t, _) = transport();
        let mut d = [0xffu8; 2];
        t.read(MAGIC_VALUE, &mut d);
        assert_eq!(d, [0, 0]);
        let mut d = [0xffu8; 4];
        t.read(MAGIC_VALUE + 1, &mut d);
        assert_eq!(d, [0; 4]);
        let mut d = [0xffu8; 8];
        t.read(MAGIC_VALUE, &mut d);
        assert_eq!(d, [0; 8]);
        t.write(STATUS, &[1]);
        t.write(STATUS + 1, &1u32.to_le_bytes());
        assert_eq!(r(&mut t, STATUS), 0);
    }

    #[test]
    fn full_bring_up_activates_the_device() {
        let (mut t, dev) = transport();
        negotiate(&mut t, COMMON_FEATURES);
        assert_eq!(r(&mut t, STATUS), S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 4, 0x2_0000);
        w(&mut t, STATUS, ALL);
        assert_eq!(r(&mut t, STATUS), ALL, "{:?}", t.last_error());
        let d = dev.lock().unwrap();
        let a = d.active.as_ref().expect("activated");
        assert_eq!(a.queues[1].size(), 4);
        assert_eq!(a.queues[0].desc_table(), 0x1_0000);
        assert!(a.queues[0].event_idx_enabled());
        assert_eq!(a.acked_features, COMMON_FEATURES);
    }

    #[test]
    fn a_queue_for_a_feature_not_taken_may_stay_unconfigured() {
        let (mut t, dev) = transport();
        dev.lock().unwrap().optional_second = true;
        negotiate(&mut t, COMMON_FEATURES);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        w(&mut t, STATUS, ALL);
        assert_eq!(r(&mut t, STATUS), ALL, "{:?}", t.last_error());
        assert_eq!(dev.lock().unwrap().active.as_ref().unwrap().queues.len(), 1);
        // The snapshot view: the live first queue, the second as the driver left it.
        let state = t.save().unwrap();
        assert_eq!(state.queues.len(), 2);
        assert!(state.queues[0].ready);
        assert!(!state.queues[1].ready);
        let dev2 = Arc::new(Mutex::new(Dummy::new()));
        dev2.lock().unwrap().optional_second = true;
        let t2 = MmioTransport::restore(args(dev2.clone()), &state).unwrap();
        assert_eq!(t2.save().unwrap(), state);
        assert_eq!(
            dev2.lock().unwrap().active.as_ref().unwrap().queues.len(),
            1
        );
        // With the feature taken, the second queue is needed.
        w(&mut t, STATUS, 0);
        negotiate(&mut t, COMMON_FEATURES | 1 << 3);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        w(&mut t, STATUS, ALL);
        assert_ne!(r(&mut t, STATUS) & S_NEEDS_RESET, 0);
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_bits() {
        let (mut t, _) = transport();
        negotiate(&mut t, 1 << 3);
        assert_eq!(r(&mut t, STATUS) & S_FEATURES_OK, 0, "no VERSION_1");
        w(&mut t, STATUS, 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 5);
        assert_eq!(r(&mut t, STATUS) & S_FEATURES_OK, 0, "bit 5 not offered");
        w(&mut t, STATUS, 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 3);
        assert_ne!(r(&mut t, STATUS) & S_FEATURES_OK, 0);
        // Features are frozen once FEATURES_OK is set.
        w(&mut t, DRIVER_FEATURES_SEL, 0);
        w(&mut t, DRIVER_FEATURES, 0);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1 | 1 << 3);
    }

    #[test]
    fn status_bits_out_of_order_or_cleared_are_ignored() {
        let (mut t, dev) = transport();
        // DRIVER_OK before anything else.
        w(&mut t, STATUS, S_DRIVER_OK);
        assert_eq!(r(&mut t, STATUS), 0);
        w(&mut t, STATUS, S_ACKNOWLEDGE | S_DRIVER);
        // FEATURES_OK and DRIVER_OK at once without queues: FEATURES_OK sticks, activation fails.
        w(&mut t, DRIVER_FEATURES_SEL, 1);
        w(&mut t, DRIVER_FEATURES, 1);
        w(&mut t, STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        // Clearing a bit is not allowed (only a write of 0 resets).
        w(&mut t, STATUS, S_ACKNOWLEDGE);
        assert_eq!(r(&mut t, STATUS), S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        w(&mut t, STATUS, ALL);
        assert_eq!(r(&mut t, STATUS), ALL | S_NEEDS_RESET, "queues not ready");
        assert!(dev.lock().unwrap().active.is_none());
        assert_ne!(t.interrupt().status() & INT_CONFIG, 0);
        w(&mut t, STATUS, 0);
        assert_eq!(r(&mut t, STATUS), 0);
        assert_eq!(t.interrupt().status(), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
    }

    #[test]
    fn bad_queue_sizes_and_addresses_fail_activation() {
        for (size, base) in [
            (3u32, 0x1_0000u64),    // not a power of two
            (32, 0x1_0000),         // above the maximum
            (0, 0x1_0000),          // zero
            (0x1_0010, 0x1_0000),   // does not fit in u16
            (16, 0x1_0008),         // descriptor table misaligned
            (16, 0x4000_0000),      // outside guest memory
            (16, 0xffff_ffff_0000), // far outside
        ] {
            let (mut t, dev) = transport();
            negotiate(&mut t, VIRTIO_F_VERSION_1);
            setup_queue(&mut t, 0, size, base);
            setup_queue(&mut t, 1, 8, 0x3_0000);
            w(&mut t, STATUS, ALL);
            assert_ne!(
                r(&mut t, STATUS) & S_NEEDS_RESET,
                0,
                "size {size} base {base:#x}"
            );
            assert!(dev.lock().unwrap().active.is_none());
        }
    }

    #[test]
    fn queue_registers_are_frozen_outside_setup() {
        let (mut t, dev) = transport();
        // Before FEATURES_OK.
        setup_queue(&mut t, 0, 4, 0x1_0000);
        assert_eq!(r(&mut t, QUEUE_READY), 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x3_0000);
        w(&mut t, STATUS, ALL);
        // After DRIVER_OK: ignored.
        w(&mut t, QUEUE_SEL, 0);
        w(&mut t, QUEUE_NUM, 2);
        w(&mut t, QUEUE_READY, 0);
        assert_eq!(r(&mut t, QUEUE_READY), 1);
        assert_eq!(
            dev.lock().unwrap().active.as_ref().unwrap().queues[0].size(),
            16
        );
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (mut t, _) = transport();
        t.interrupt().trigger(INT_VRING | INT_CONFIG);
        assert_eq!(t.interrupt().irqfd().read().unwrap(), 1);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), 3);
        w(&mut t, INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), INT_CONFIG);
    }

    use crate::devices::virtio::INT_VRING;

    #[test]
    fn config_space_reads_and_writes() {
        let (mut t, _) = transport();
        let mut d = [0u8; 2];
        t.read(CONFIG + 2, &mut d);
        assert_eq!(&d, b"cd");
        t.write(CONFIG + 6, b"XY");
        let mut d = [0u8; 4];
        t.read(CONFIG + 6, &mut d);
        assert_eq!(&d, b"XY\0\0");
        t.read(CONFIG + 0x800, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn bogus_notify_is_dropped_and_valid_one_forwarded() {
        let (mut t, dev) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x3_0000);
        w(&mut t, STATUS, ALL);
        w(&mut t, QUEUE_NOTIFY, 1000);
        w(&mut t, QUEUE_NOTIFY, 1);
        let d = dev.lock().unwrap();
        assert!(d.evts[0].read().is_err());
        assert_eq!(d.evts[1].read().unwrap(), 1);
    }

    #[test]
    fn state_round_trip_reactivates_a_running_device() {
        let (mut t, _) = transport();
        negotiate(&mut t, COMMON_FEATURES);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x3_0000);
        w(&mut t, STATUS, ALL);
        let s = t.save().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        let s2: MmioTransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(s, s2);
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let t2 = MmioTransport::restore(args(dev.clone()), &s2).unwrap();
        assert_eq!(t2.status(), ALL);
        assert_eq!(
            dev.lock().unwrap().active.as_ref().unwrap().queues[1].avail_ring(),
            0x3_1000
        );
        // A state for another device type is refused.
        let mut bad = s2.clone();
        bad.device_type = 1;
        assert!(MmioTransport::restore(args(Arc::new(Mutex::new(Dummy::new()))), &bad).is_err());
    }
}
