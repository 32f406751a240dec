//! The i8042 keyboard controller, present only so that a guest's reset (command 0xFE on port
//! 0x64) ends the VM cleanly.

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use super::super::bus::BusDevice;
use crate::component_state::Persist;

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

/// The controller keeps nothing a guest could observe across a snapshot (it only passes a reset
/// command on), so its state is empty and not stored in `DevicesState`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

/// Constructor argument: the reset line.
impl<T: Trigger> Persist for I8042<T> {
    type State = I8042State;
    type ConstructorArgs<'a> = T;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<I8042State, Self::Error> {
        Ok(I8042State {})
    }

    fn restore(reset: T, _state: &I8042State) -> Result<Self, Self::Error> {
        Ok(Self::new(reset))
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

    #[test]
    fn a_restored_controller_still_resets() {
        let n = Arc::new(AtomicUsize::new(0));
        let saved = I8042::new(Count(n.clone())).save().unwrap();
        let mut d = I8042::restore(Count(n.clone()), &saved).unwrap();
        d.write(4, &[0xfe]);
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
