//! COM1: vm-superio's 8250 UART on port 0x3f8, its interrupt delivered through an irqfd.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::super::bus::BusDevice;

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

pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, NoEvents, SerialOut>,
}

impl Serial {
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Self {
            inner: vm_superio::Serial::new(EventFdTrigger(irq), out),
        }
    }

    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.inner.state()
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.inner.writer_mut().flush()
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
        s.write(0, &[b'x', b'y']);
        assert_eq!(out.0.lock().unwrap().len(), 3);
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
