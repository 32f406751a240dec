//! COM1: vm-superio's 8250 UART on port 0x3f8, its interrupt delivered through an irqfd.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::super::bus::BusDevice;
use crate::component_state::Persist;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;

/// An interrupt line backed by an eventfd that KVM watches (irqfd).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialOut = Box<dyn Write + Send>;

/// The UART's registers and receive FIFO, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid saved serial state: {0}")]
pub struct SerialStateError(String);

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<SerialState> for vm_superio::serial::SerialState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, NoEvents, SerialOut>,
}

impl Serial {
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Self {
            inner: vm_superio::Serial::new(EventFdTrigger(irq), out),
        }
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.inner.writer_mut().flush()
    }
}

/// Constructor arguments: the irqfd of its IRQ line and the console sink.
impl Persist for Serial {
    type State = SerialState;
    type ConstructorArgs<'a> = (EventFd, SerialOut);
    type Error = SerialStateError;

    fn save(&self) -> Result<SerialState, SerialStateError> {
        Ok(self.inner.state().into())
    }

    /// A FIFO longer than the hardware's is refused.
    fn restore(
        (irq, out): (EventFd, SerialOut),
        state: &SerialState,
    ) -> Result<Self, SerialStateError> {
        let inner = vm_superio::Serial::from_state(
            &state.clone().into(),
            EventFdTrigger(irq),
            NoEvents,
            out,
        )
        .map_err(|e| SerialStateError(format!("{e:?}")))?;
        Ok(Self { inner })
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.inner.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            // A failed write to the console sink must not stop the guest; the bytes are lost.
            let _ = self.inner.write(off, *value);
            if off == 0 {
                let _ = self.inner.writer_mut().flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_sink_and_lsr_says_empty() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x20, 0x20, "THR empty");
        // Odd-sized accesses are refused without touching state.
        let mut two = [0u8; 2];
        s.read(0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        s.write(0, b"xy");
        assert_eq!(out.0.lock().unwrap().len(), 3);
    }

    #[test]
    fn state_round_trips_and_rejects_an_overfull_fifo() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        s.write(3, &[0x83]); // DLAB on
        s.write(0, &[0x01]); // divisor low
        s.write(3, &[0x03]); // 8N1, DLAB off
        s.write(7, &[0x5a]); // scratch
        let saved = s.save().unwrap();
        let r = Serial::restore(
            (irq.try_clone().unwrap(), Box::new(std::io::sink())),
            &saved,
        )
        .unwrap();
        assert_eq!(r.save().unwrap(), saved);
        assert_eq!(
            (saved.baud_divisor_low, saved.line_control, saved.scratch),
            (1, 3, 0x5a)
        );
        let mut bad = saved;
        bad.in_buffer = vec![0; 1 << 20];
        assert!(Serial::restore((irq, Box::new(std::io::sink())), &bad).is_err());
    }

    #[test]
    fn thr_empty_interrupt_fires_when_enabled() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        // IER: enable THR-empty interrupt; the UART raises it at once.
        s.write(1, &[0x02]);
        assert_eq!(irq.read().unwrap(), 1);
    }
}
