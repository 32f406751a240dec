//! The one save/restore contract every stateful part of a VM follows (after Firecracker's
//! `Persist`): `save` returns plain serde data that owns no host resource (no fd, no path, no
//! thread); `restore` builds the part from what the host supplies now (a disk file, a back end,
//! an event fd: its constructor arguments) plus that data, and checks the data against those
//! arguments. The data comes from a file: a state that does not fit is a typed error, never a
//! panic.
//!
//! A state struct is part of the snapshot format (`vmstate.bin`): see docs/architecture.md,
//! "Rule for adding a field to a state struct", before changing one.

/// A part of the VM that can be saved and rebuilt.
pub trait Persist: Sized {
    /// What a snapshot keeps of the part.
    type State;
    /// What only the host can supply when the part is rebuilt (it may borrow the host's
    /// configuration).
    type ConstructorArgs<'a>;
    type Error;

    /// The part's state. Parts whose state lives in this process never fail here; the vCPU and
    /// the VM read theirs from KVM, which can. Take it with the VM paused.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Rebuilds the part from `args` and a saved `state`.
    fn restore(args: Self::ConstructorArgs<'_>, state: &Self::State) -> Result<Self, Self::Error>;
}
