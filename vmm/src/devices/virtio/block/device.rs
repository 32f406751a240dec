//! The virtio-blk device: config space, features, and execution of parsed requests against the
//! image file. I/O goes straight between the file and guest memory (pread/pwrite on vm-memory
//! slices), synchronously on the device event loop.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;

use super::request::{self, Limits, Request, RequestType, SECTOR_SHIFT};
use crate::component_state::Persist;
use crate::devices::config::BlockConfig;
use crate::devices::virtio::chain::{self, Buf};
use crate::devices::virtio::{
    drain_queue, VirtioCommon, VirtioDevice, COMMON_FEATURES, TYPE_BLOCK,
};
use crate::memory::GuestMemory;

pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request we advertise (VIRTIO_BLK_F_SEG_MAX); a chain may hold two more
/// descriptors (header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
const MAX_DISCARD_SEGMENTS: u32 = 32;
/// 4 GiB - 512 in sectors: the largest a u32 sector count can hold at 512 bytes.
const MAX_DISCARD_SECTORS: u32 = u32::MAX >> SECTOR_SHIFT;
const CONFIG_LEN: usize = 60;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image {0} does not exist")]
    NotFound(PathBuf),
    #[error("disk image {path} cannot be opened for writing ({source}); attach it read-only?")]
    NotWritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {0} is neither a regular file nor a block device")]
    NotAFile(PathBuf),
    #[error("disk id {0:?} is longer than 20 bytes")]
    IdTooLong(String),
    #[error("disk image {path} has {now} sectors, the snapshot was taken with {saved}")]
    CapacityChanged { path: PathBuf, saved: u64, now: u64 },
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// What a snapshot keeps of a block device (the queues live in the transport's state).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub id: String,
    pub avail_features: u64,
}

pub struct Block {
    path: PathBuf,
    file: File,
    read_only: bool,
    id: String,
    capacity: u64,
    config: [u8; CONFIG_LEN],
    common: VirtioCommon,
}

/// Whether the file system punches holes (probed past the end of the file, which changes
/// nothing with KEEP_SIZE).
fn punch_hole_supported(file: &File, size: u64) -> bool {
    let offset = size.next_multiple_of(4096) as libc::off_t;
    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            4096,
        )
    };
    r == 0
}

fn file_size(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: the ioctl writes one u64 into `size`.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(size);
    }
    Ok(meta.len())
}

impl Block {
    /// Opens the image; every problem with it is reported here, not at the guest's first access.
    pub fn new(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, BlockError> {
        let id = id.unwrap_or_default().to_string();
        if id.len() > VIRTIO_BLK_ID_BYTES as usize {
            return Err(BlockError::IdTooLong(id));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| match source.kind() {
                ErrorKind::NotFound => BlockError::NotFound(path.to_path_buf()),
                ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem if !read_only => {
                    BlockError::NotWritable {
                        path: path.to_path_buf(),
                        source,
                    }
                }
                _ => BlockError::Open {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(BlockError::NotAFile(path.to_path_buf()));
        }
        let size = file_size(&file).map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let capacity = size >> SECTOR_SHIFT;
        let mut avail_features =
            COMMON_FEATURES | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX;
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else if meta.is_file() && punch_hole_supported(&file, size) {
            avail_features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let mut b = Self {
            path: path.to_path_buf(),
            file,
            read_only,
            id,
            capacity,
            config: [0; CONFIG_LEN],
            common: VirtioCommon::new(avail_features, 1).map_err(BlockError::EventFd)?,
        };
        b.build_config();
        Ok(b)
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn build_config(&mut self) {
        let c = &mut self.config;
        c.fill(0);
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        let avail_features = self.common.avail_features;
        if avail_features & 1 << VIRTIO_BLK_F_DISCARD != 0 {
            c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
            c[44..48].copy_from_slice(&1u32.to_le_bytes());
        }
        if avail_features & 1 << VIRTIO_BLK_F_WRITE_ZEROES != 0 {
            c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
            c[56] = 1; // write_zeroes_may_unmap
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            capacity: self.capacity,
            max_segments: MAX_DISCARD_SEGMENTS,
            max_segment_sectors: MAX_DISCARD_SECTORS,
        }
    }

    /// Serves every pending request; returns whether the guest was interrupted.
    pub fn process_queue(&mut self) -> bool {
        let limits = self.limits();
        let Some(a) = self.common.active.as_mut() else {
            return false;
        };
        let mem = &a.mem;
        let file = &self.file;
        let id = self.id.as_bytes();
        let read_only = self.read_only;
        let drained = drain_queue(&mut a.queues[0], mem, |c| {
            let Ok(chain) = chain::collect(c, mem, MAX_DESCRIPTORS) else {
                // Nothing trustworthy to write a status into.
                return Some(0);
            };
            match request::parse(&chain, mem, &limits) {
                Ok(req) => {
                    let (code, data) = execute(file, mem, &req, id, read_only);
                    let _ = mem.write_obj(code, req.status);
                    Some(data + 1)
                }
                Err((Some(status), e)) => {
                    let _ = mem.write_obj(e.status(), status);
                    Some(1)
                }
                Err((None, _)) => Some(0),
            }
        });
        if drained.notify {
            a.interrupt.signal_used_queue();
        }
        drained.notify
    }
}

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

/// Runs a parsed request; returns the status and the bytes written into the guest's data buffers.
fn execute(file: &File, mem: &GuestMemory, req: &Request, id: &[u8], read_only: bool) -> (u8, u32) {
    let offset = req.sector << SECTOR_SHIFT;
    match req.kind {
        RequestType::In => match transfer(file, mem, &req.data, offset, Direction::FromFile) {
            Ok(()) => (S_OK, req.data_len as u32),
            Err(_) => (S_IOERR, 0),
        },
        RequestType::Out if read_only => (S_IOERR, 0),
        RequestType::Out => match transfer(file, mem, &req.data, offset, Direction::ToFile) {
            Ok(()) => (S_OK, 0),
            Err(_) => (S_IOERR, 0),
        },
        RequestType::Flush if read_only => (S_OK, 0),
        RequestType::Flush => match file.sync_all() {
            Ok(()) => (S_OK, 0),
            Err(_) => (S_IOERR, 0),
        },
        RequestType::GetId => {
            let mut idbuf = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            idbuf[..id.len()].copy_from_slice(id);
            let n = (req.data_len as usize).min(idbuf.len());
            let mut w = chain::BufWriter::new(mem, &req.data);
            match w.write_all(&idbuf[..n]) {
                Ok(()) => (S_OK, n as u32),
                Err(_) => (S_IOERR, 0),
            }
        }
        RequestType::Discard | RequestType::WriteZeroes if read_only => (S_IOERR, 0),
        RequestType::Discard | RequestType::WriteZeroes => {
            for s in &req.segments {
                if s.num_sectors == 0 {
                    continue;
                }
                // SAFETY: fallocate on our own file descriptor; no memory is passed. The range
                // was checked against the capacity, so it lies inside the file.
                let r = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        (s.sector << SECTOR_SHIFT) as libc::off_t,
                        (u64::from(s.num_sectors) << SECTOR_SHIFT) as libc::off_t,
                    )
                };
                if r != 0 {
                    return (S_IOERR, 0);
                }
            }
            (S_OK, 0)
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    FromFile,
    ToFile,
}

/// Moves `bufs` (guest memory) to or from the file at `offset`, one pread/pwrite per contiguous
/// host piece.
fn transfer(
    file: &File,
    mem: &GuestMemory,
    bufs: &[Buf],
    mut offset: u64,
    dir: Direction,
) -> std::io::Result<()> {
    for b in bufs {
        for slice in GuestMemoryBackend::get_slices(mem, b.addr, b.len as usize) {
            let slice = slice.map_err(|e| std::io::Error::other(e.to_string()))?;
            let mut done = 0usize;
            while done < slice.len() {
                let n = match dir {
                    Direction::FromFile => {
                        let guard = slice.ptr_guard_mut();
                        // SAFETY: the slice is `slice.len()` bytes of mapped guest memory that
                        // lives as long as `mem`; the kernel writes at most the remaining length.
                        unsafe {
                            libc::pread(
                                file.as_raw_fd(),
                                guard.as_ptr().add(done).cast(),
                                slice.len() - done,
                                (offset + done as u64) as libc::off_t,
                            )
                        }
                    }
                    Direction::ToFile => {
                        let guard = slice.ptr_guard();
                        // SAFETY: as above; the kernel only reads from the slice.
                        unsafe {
                            libc::pwrite(
                                file.as_raw_fd(),
                                guard.as_ptr().add(done).cast(),
                                slice.len() - done,
                                (offset + done as u64) as libc::off_t,
                            )
                        }
                    }
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Err(ErrorKind::UnexpectedEof.into());
                }
                done += n as usize;
            }
            offset += slice.len() as u64;
        }
    }
    Ok(())
}

/// Constructor argument: the disk as configured now (a fork's is its own copy).
impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs<'a> = &'a BlockConfig;
    type Error = BlockError;

    fn save(&self) -> Result<BlockState, BlockError> {
        Ok(BlockState {
            capacity_sectors: self.capacity,
            read_only: self.read_only,
            id: self.id.clone(),
            avail_features: self.common.avail_features,
        })
    }

    /// Opens the image and checks it still has the saved capacity.
    fn restore(config: &BlockConfig, state: &BlockState) -> Result<Self, BlockError> {
        let path = &config.path;
        let mut b = Self::new(path, config.read_only, config.id.as_deref())?;
        if b.capacity != state.capacity_sectors {
            return Err(BlockError::CapacityChanged {
                path: path.clone(),
                saved: state.capacity_sectors,
                now: b.capacity,
            });
        }
        // The driver negotiated against the saved feature set: keep offering exactly that.
        b.common.avail_features = state.avail_features;
        b.build_config();
        Ok(b)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn config_space(&self) -> &[u8] {
        &self.config
    }
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.common.queue_evts[0], EventSet::IN)) {
            tracing::error!(
                "virtio-blk {}: cannot watch its queue: {e:?}",
                self.path.display()
            );
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.common.queue_evts[0].read();
        self.process_queue();
    }
}
