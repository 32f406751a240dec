//! Owns every device of a VM and the buses that route guest accesses to them. One path attaches
//! devices for boot and for restore, so no device can be forgotten in one of the two.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::{Bus, BusError};
use super::legacy::{i8042, serial, Serial, I8042};
use crate::arch::layout::SERIAL_IRQ;
use crate::vcpu::VmEvent;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot register {what} with KVM: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
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
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|source| DeviceError::Kvm {
                what: "the serial irqfd",
                source,
            })?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, console)));
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
