//! Owns every device of a VM and the buses that route guest accesses to them. One path attaches
//! devices for boot and for restore, so no device can be forgotten in one of the two.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::{Bus, BusError};
use super::legacy::{i8042, serial, Serial, SerialState, I8042};
use crate::arch::layout::SERIAL_IRQ;
use crate::vcpu::VmEvent;
use serde::{Deserialize, Serialize};

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
}

/// Every device's state, as saved in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
}

/// The devices of one VM.
pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    serial: Arc<Mutex<Serial>>,
    /// Extra kernel command-line words the devices need (e.g. `virtio_mmio.device=`).
    cmdline_extra: Vec<String>,
}

impl DeviceManager {
    /// Legacy devices every VM has: COM1 (its IRQ through an irqfd) and the i8042 reset line.
    pub fn new(
        vm: &VmFd,
        console: serial::SerialOut,
        events: Sender<VmEvent>,
    ) -> Result<Self, DeviceError> {
        Self::build(vm, console, events, None)
    }

    /// The same devices, their state taken from a snapshot.
    pub fn restore(
        vm: &VmFd,
        console: serial::SerialOut,
        events: Sender<VmEvent>,
        state: &DevicesState,
    ) -> Result<Self, DeviceError> {
        Self::build(vm, console, events, Some(state))
    }

    pub fn state(&self) -> DevicesState {
        let serial = match self.serial.lock() {
            Ok(s) => s.state(),
            Err(p) => p.into_inner().state(),
        };
        DevicesState { serial }
    }

    fn build(
        vm: &VmFd,
        console: serial::SerialOut,
        events: Sender<VmEvent>,
        state: Option<&DevicesState>,
    ) -> Result<Self, DeviceError> {
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|source| DeviceError::Kvm {
                what: "the serial irqfd",
                source,
            })?;
        let serial = match state {
            Some(s) => Serial::from_state(&s.serial, serial_irq, console)?,
            None => Serial::new(serial_irq, console),
        };
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(serial.clone(), serial::COM1_PORT, serial::COM1_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(ChannelTrigger(Mutex::new(events))))),
            i8042::I8042_PORT,
            i8042::I8042_LEN,
        )?;
        Ok(Self {
            pio,
            mmio: Bus::new(),
            serial,
            cmdline_extra: Vec::new(),
        })
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

/// Turns the i8042 reset line into a VM event.
struct ChannelTrigger(Mutex<Sender<VmEvent>>);

impl vm_superio::Trigger for ChannelTrigger {
    type E = ();
    fn trigger(&self) -> Result<(), ()> {
        let tx = self.0.lock().map_err(|_| ())?;
        tx.send(VmEvent::Reset).map_err(|_| ())
    }
}
