//! Legacy PC devices: the COM1 8250 UART and the i8042 controller (only for its reset line).

pub mod i8042;
pub mod serial;

pub use i8042::{I8042State, I8042};
pub use serial::{EventFdTrigger, Serial, SerialState};
