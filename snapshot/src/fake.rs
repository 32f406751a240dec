//! A VM without KVM for the engine's tests: plain guest memory and a text for its state, so
//! capture, verification, restore planning and pruning run where there is no /dev/kvm. Nothing
//! here (nor in the engine paths the tests drive) opens /dev/kvm.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::capture::{capture, CaptureRequest};
use crate::restore::{KeepAlive, RegionLayout, Restorable, RestorePlan, RestoredMemory};
use crate::{CpuidLeaf, GuestMemory, Manifest, SavedVm, SnapshotError, Snapshottable};

pub const PAGE: usize = 4096;
/// Guest RAM of a [`Setup`] made with [`Setup::new`]: one region.
pub const MEM: usize = 1 << 20;

/// Where the fake VM fails, as a host whose KVM refuses a call would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Save,
    TakeDirty,
}

/// CBOR keeps a text's bytes as they are, so a secret put in the state lands in vmstate.bin
/// verbatim, as a device's buffer would.
pub struct FakeVm {
    pub mem: GuestMemory,
    pub state: RefCell<String>,
    /// Pages written through [`FakeVm::write_page`] since the last capture took them (per
    /// region, a bit per page), when the VM tracks them as a running VM's dirty log does.
    dirty: RefCell<Option<Vec<Vec<u64>>>>,
    pub fail: Cell<Option<Failure>>,
    /// What the engine's restore said to keep while `mem` is used.
    _restored: Option<KeepAlive>,
}

impl FakeVm {
    /// A VM without a dirty log: diffs find their pages by content, as after a restore.
    pub fn new(mem: GuestMemory, state: impl Into<String>) -> Self {
        Self {
            mem,
            state: RefCell::new(state.into()),
            dirty: RefCell::new(None),
            fail: Cell::new(None),
            _restored: None,
        }
    }

    /// A VM whose dirty log says which pages a diff holds, as during a live capture.
    pub fn with_dirty_log(mem: GuestMemory, state: impl Into<String>) -> Self {
        let vm = Self::new(mem, state);
        *vm.dirty.borrow_mut() = Some(vm.no_pages());
        vm
    }

    fn no_pages(&self) -> Vec<Vec<u64>> {
        self.mem
            .iter()
            .map(|r| vec![0; (r.len() as usize / PAGE).div_ceil(64)])
            .collect()
    }

    /// Fills page `page` (counted over all regions back to back, as in memory.bin) with `byte`.
    pub fn write_page(&self, page: usize, byte: u8) {
        let mut first = 0;
        for (i, r) in self.mem.iter().enumerate() {
            let pages = r.len() as usize / PAGE;
            if page < first + pages {
                let at = r.start_addr().0 + ((page - first) * PAGE) as u64;
                self.mem
                    .write_slice(&[byte; PAGE], GuestAddress(at))
                    .unwrap();
                if let Some(d) = self.dirty.borrow_mut().as_mut() {
                    d[i][(page - first) / 64] |= 1 << ((page - first) % 64);
                }
                return;
            }
            first += pages;
        }
        panic!("page {page} is beyond guest memory");
    }

    /// Guest memory as memory.bin lays it out: the regions back to back.
    pub fn memory(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for r in self.mem.iter() {
            let mut buf = vec![0u8; r.len() as usize];
            self.mem.read_slice(&mut buf, r.start_addr()).unwrap();
            out.extend(buf);
        }
        out
    }

    fn failing(&self, at: Failure) -> Result<(), std::io::Error> {
        if self.fail.get() == Some(at) {
            return Err(std::io::Error::other(format!("injected {at:?} failure")));
        }
        Ok(())
    }
}

impl Snapshottable for FakeVm {
    type State = String;
    type Error = std::io::Error;
    type Memory = GuestMemory;
    fn save(&self) -> Result<SavedVm<String>, std::io::Error> {
        self.failing(Failure::Save)?;
        Ok(SavedVm {
            state: self.state.borrow().clone(),
            vcpus: 1,
            mem_mib: 1,
            cpuid: Vec::<CpuidLeaf>::new(),
        })
    }
    fn guest_memory(&self) -> &GuestMemory {
        &self.mem
    }
    fn take_dirty(&self) -> Result<Option<Vec<Vec<u64>>>, std::io::Error> {
        self.failing(Failure::TakeDirty)?;
        let fresh = self.dirty.borrow().as_ref().map(|_| self.no_pages());
        Ok(std::mem::replace(&mut *self.dirty.borrow_mut(), fresh))
    }
    fn requeue_dirty(&self, pages: Vec<Vec<u64>>) {
        if let Some(d) = self.dirty.borrow_mut().as_mut() {
            for (region, back) in d.iter_mut().zip(pages) {
                for (w, b) in region.iter_mut().zip(back) {
                    *w |= b;
                }
            }
        }
    }
}

/// The fake VM restores as a VMM does: its state decoded, its RAM the engine's mappings wrapped in
/// its own memory type. Its layout is always one region of [`MEM`] bytes.
impl Restorable for FakeVm {
    type State = String;
    type Error = std::io::Error;
    type Args = ();
    type Bitmap = vm_memory::bitmap::AtomicBitmap;

    fn memory_layout(_state: &String) -> Result<Vec<RegionLayout>, std::io::Error> {
        Ok(vec![RegionLayout {
            guest_addr: 0,
            len: MEM as u64,
        }])
    }

    fn restore(
        state: &String,
        memory: RestoredMemory<Self::Bitmap>,
        _: (),
    ) -> Result<Self, std::io::Error> {
        let (mappings, keep) = memory.into_parts();
        let regions = mappings
            .into_iter()
            .map(|(at, map)| {
                vm_memory::GuestRegionMmap::new(map, GuestAddress(at))
                    .ok_or_else(|| std::io::Error::other("region wraps"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mem = GuestMemory::from_regions(regions).map_err(std::io::Error::other)?;
        let mut vm = FakeVm::new(mem, state.clone());
        vm._restored = Some(keep);
        Ok(vm)
    }
}

/// A scratch directory with a kernel file, a snapshot directory and a fake VM to capture.
pub struct Setup {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub snaps: PathBuf,
    pub vm: FakeVm,
    /// Whether dropping the setup removes `dir` (not in a child process sharing it).
    owns_dir: bool,
}

impl Setup {
    /// A fresh directory named for the test and a VM with [`MEM`] bytes of RAM.
    pub fn new(name: &str) -> Setup {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        Self::fresh(name, FakeVm::new(mem, ""))
    }

    /// A fresh directory named for the test, and `vm`.
    pub fn fresh(name: &str, vm: FakeVm) -> Setup {
        let dir = std::env::temp_dir().join(format!("engine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kernel"), b"kernel").unwrap();
        let mut s = Self::at(&dir, vm);
        s.owns_dir = true;
        s
    }

    /// The directory another process made with [`Setup::fresh`], left in place on drop.
    pub fn at(dir: &Path, vm: FakeVm) -> Setup {
        Setup {
            dir: dir.to_path_buf(),
            kernel: dir.join("kernel"),
            snaps: dir.join("snaps"),
            vm,
            owns_dir: false,
        }
    }

    /// A request for `tag` in this setup's snapshot directory, nothing besides memory and state.
    pub fn request<'a>(&'a self, tag: &'a str, parent: Option<&'a str>) -> CaptureRequest<'a> {
        CaptureRequest {
            dir: &self.snaps,
            tag,
            kernel: &self.kernel,
            cmdline: "",
            rootfs: None,
            image: None,
            workspace: None,
            note: None,
            parent,
            secrets: None,
        }
    }

    /// Fills `page` with `byte`, sets the state and captures.
    pub fn capture(&self, tag: &str, parent: Option<&str>, page: usize, byte: u8, state: &str) {
        self.try_capture(tag, parent, page, byte, state).unwrap();
    }

    pub fn try_capture(
        &self,
        tag: &str,
        parent: Option<&str>,
        page: usize,
        byte: u8,
        state: &str,
    ) -> Result<Manifest, SnapshotError> {
        self.vm.write_page(page, byte);
        *self.vm.state.borrow_mut() = state.to_string();
        capture(&self.vm, &self.request(tag, parent), &mut |_| {})
    }

    /// Guest memory as the plan rebuilds it: the base file (as long as all of RAM), each
    /// overlay's pages over it.
    pub fn rebuild(plan: &RestorePlan<String>) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut mem = std::fs::read(&plan.base_memory).unwrap();
        for (path, bits) in &plan.overlays {
            let f = std::fs::File::open(path).unwrap();
            for p in 0..mem.len() / PAGE {
                if bits.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0) {
                    f.read_exact_at(&mut mem[p * PAGE..(p + 1) * PAGE], (p * PAGE) as u64)
                        .unwrap();
                }
            }
        }
        mem
    }

    /// The names in the snapshot directory, sorted, hidden ones (leftovers) included.
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.snaps)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
