//! The i8042 keyboard controller, present only so that a guest's reset (command 0xFE on port
//! 0x64) ends the VM cleanly.

use vm_superio::Trigger;

use super::super::bus::BusDevice;

/// Ports 0x60 (data) to 0x64 (command/status).
pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

pub struct I8042<T: Trigger> {
    inner: vm_superio::I8042Device<T>,
}

impl<T: Trigger> I8042<T> {
    pub fn new(reset: T) -> Self {
        Self {
            inner: vm_superio::I8042Device::new(reset),
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: input and output buffers empty, so a guest polling before reset proceeds.
        let v = u8::try_from(offset)
            .map(|o| self.inner.read(o))
            .unwrap_or(0);
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            // The trigger only fails if the VM is already going away.
            let _ = self.inner.write(off, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Count(Arc<AtomicUsize>);
    impl Trigger for Count {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn reset_command_triggers_exactly_once() {
        let n = Arc::new(AtomicUsize::new(0));
        let mut d = I8042::new(Count(n.clone()));
        d.write(0, &[0xfe]); // data port: not a command
        d.write(4, &[0xd1]); // another command
        assert_eq!(n.load(Ordering::SeqCst), 0);
        d.write(4, &[0xfe]);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let mut s = [0xffu8];
        d.read(4, &mut s);
        assert_eq!(s[0], 0);
    }
}
