//! The boundary between a VM and its snapshot engine, in a crate of its own so that the crate
//! graph says what the code does: the VMM (`vmm`) depends on this and nothing of the engine
//! (`snapshot`: formats, capture, restore, page server); the engine depends on this and nothing
//! of the VMM. The CLI puts the two together.
//!
//! - Save: a paused VM is [`Snapshottable`]: it hands its state ([`SavedVm`]), its guest memory
//!   (read through vm-memory's interface) and the pages written since the last capture.
//! - Restore: a VM is [`Restorable`]: it says where its RAM lies ([`RegionLayout`]) and rebuilds
//!   itself from a decoded state over the guest RAM the engine built ([`RestoredMemory`]), which
//!   may hold something that must outlive every use of it ([`KeepAlive`]: for a lazy restore,
//!   the page-server connection, opaque to the VM).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegion;

/// One CPUID leaf as the guest saw it (recorded in a snapshot's manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidLeaf {
    pub function: u32,
    pub index: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// What a paused VM hands to a capture.
pub struct SavedVm<S> {
    pub state: S,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// The CPUID the guest was given (vCPU 0), recorded in the manifest.
    pub cpuid: Vec<CpuidLeaf>,
}

/// The save half: what the engine needs from a VM to capture it.
pub trait Snapshottable {
    type State: Serialize;
    type Error: std::error::Error + Send + Sync + 'static;

    /// The VM's complete state besides guest memory. The VM must be paused.
    fn save(&self) -> Result<SavedVm<Self::State>, Self::Error>;

    /// The VM's own guest memory type: the engine reads it through vm-memory's interface
    /// (regions, host slices, bounds-checked reads) and never names the type.
    type Memory: vm_memory::GuestMemoryBackend + Sync;

    /// Guest RAM, regions in address order.
    fn guest_memory(&self) -> &Self::Memory;

    /// The pages written since the previous capture (per region, one bit per 4 KiB page), or
    /// `None` when the VM does not track them. Taking them clears them.
    fn take_dirty(&self) -> Result<Option<Vec<Vec<u64>>>, Self::Error>;

    /// Gives back pages from `take_dirty` when a capture failed.
    fn requeue_dirty(&self, pages: Vec<Vec<u64>>);
}

/// The restore half: the VM rebuilds itself from a decoded state and guest RAM the engine
/// built.
pub trait Restorable: Sized {
    type State: DeserializeOwned;
    type Error: std::error::Error + Send + Sync + 'static;
    /// What only the host supplies now (a console, the devices' host sides, start paused).
    type Args;
    /// The dirty bitmap the VM keeps over guest memory (device writes), in the mappings the
    /// engine builds for it.
    type Bitmap: NewBitmap;

    /// Where `state`'s guest RAM lies, region by region in the order a memory file holds them.
    /// Refuses a size this VM cannot have (the state comes from a file).
    fn memory_layout(state: &Self::State) -> Result<Vec<RegionLayout>, Self::Error>;

    /// Rebuilds the VM from `state` over `memory` (laid out as `memory_layout` said), which it
    /// keeps (its [`KeepAlive`] included) for as long as it uses the mappings.
    fn restore(
        state: &Self::State,
        memory: RestoredMemory<Self::Bitmap>,
        args: Self::Args,
    ) -> Result<Self, Self::Error>;
}

/// One region of guest RAM as the VM lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionLayout {
    /// Where the guest sees it.
    pub guest_addr: u64,
    /// Bytes; a multiple of the page size.
    pub len: u64,
}

/// One region of restored guest RAM: where the guest sees it and where it is mapped here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRegion {
    pub guest_addr: u64,
    /// Start of a private, readable and writable mapping of `len` bytes, page aligned.
    pub host_addr: *mut u8,
    pub len: u64,
}

/// Guest RAM the engine built for a restore: one vm-memory mapping per region of the VM's
/// layout (with the dirty bitmap the VM tracks device writes in, `B`), and what must outlive
/// them. The VM wraps the mappings in its own guest memory type ([`RestoredMemory::into_parts`]).
#[derive(Debug)]
pub struct RestoredMemory<B> {
    regions: Vec<(RegionLayout, MmapRegion<B>)>,
    keep: KeepAlive,
}

/// What must outlive every use of restored guest memory, opaque to the VM: for a lazy restore,
/// the page-server connection (closing its userfaultfd would hand blocked vCPUs zero pages).
/// Keep it, never drop it before the VM stops.
pub struct KeepAlive(Option<Box<dyn std::any::Any + Send + Sync>>);

impl KeepAlive {
    /// Nothing to keep (memory read from a file or mapped from it).
    pub fn nothing() -> Self {
        Self(None)
    }

    /// Keeps `it` alive as long as this lives.
    pub fn holding<T: Send + Sync + 'static>(it: T) -> Self {
        Self(Some(Box::new(it)))
    }

    /// Whether something is kept (a lazy restore's connection).
    pub fn is_holding(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_holding() {
            "KeepAlive(held)"
        } else {
            "KeepAlive(nothing)"
        })
    }
}

impl<B: NewBitmap> RestoredMemory<B> {
    /// The engine's mappings for `regions` (in layout order), with what must outlive them.
    pub fn new(regions: Vec<(RegionLayout, MmapRegion<B>)>, keep: KeepAlive) -> Self {
        Self { regions, keep }
    }

    /// The same mappings, keeping `keep` (instead of what they kept before) as long as they live.
    pub fn keeping(self, keep: KeepAlive) -> Self {
        Self { keep, ..self }
    }

    /// The regions in layout order (which is the memory file's order).
    pub fn regions(&self) -> Vec<HostRegion> {
        self.regions
            .iter()
            .map(|(l, m)| HostRegion {
                guest_addr: l.guest_addr,
                host_addr: m.as_ptr(),
                len: l.len,
            })
            .collect()
    }

    /// Each region's guest address and mapping, and what must be kept while they are used.
    pub fn into_parts(self) -> (Vec<(u64, MmapRegion<B>)>, KeepAlive) {
        (
            self.regions
                .into_iter()
                .map(|(l, m)| (l.guest_addr, m))
                .collect(),
            self.keep,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restored memory gives back its regions in layout order, and its keep-alive keeps what
    /// it holds until the keep-alive itself is dropped.
    #[test]
    fn parts_come_back_in_order_and_the_keepalive_holds() {
        let layout = [
            RegionLayout {
                guest_addr: 0,
                len: 8192,
            },
            RegionLayout {
                guest_addr: 1 << 32,
                len: 4096,
            },
        ];
        let regions = layout
            .iter()
            .map(|l| (*l, MmapRegion::<()>::new(l.len as usize).unwrap()))
            .collect();
        let held = std::sync::Arc::new(());
        let mem = RestoredMemory::new(regions, KeepAlive::holding(held.clone()));
        let hosts = mem.regions();
        assert_eq!(
            hosts
                .iter()
                .map(|r| (r.guest_addr, r.len))
                .collect::<Vec<_>>(),
            vec![(0, 8192), (1 << 32, 4096)]
        );
        let (parts, keep) = mem.into_parts();
        assert_eq!(parts[1].0, 1 << 32);
        assert_eq!(parts[0].1.as_ptr(), hosts[0].host_addr);
        drop(parts);
        assert_eq!(std::sync::Arc::strong_count(&held), 2);
        assert!(keep.is_holding());
        drop(keep);
        assert_eq!(std::sync::Arc::strong_count(&held), 1);
        assert!(!KeepAlive::nothing().is_holding());
    }
}
